//! The predictor itself: the low-rank module trained in burn, its host copy, the safetensors layout it is saved
//! in, the loaded weights that score tokens, and the input normalisation both training and inference apply.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};
use safetensors::{tensor::TensorView, Dtype};

use crate::error::{Error, Result};
use crate::store::{self, PREDICTORS_FORMAT, PREDICTORS_VERSION};

/// Epsilon of the per-token RMS normalisation of predictor inputs.
pub const RMS_EPS: f64 = 1e-6;

/// Low-rank predictor under training.
#[derive(Module, Debug)]
pub(super) struct LowRank<B: Backend> {
    pub(super) l1: Linear<B>,
    pub(super) l2: Linear<B>,
}

impl<B: Backend> LowRank<B> {
    pub(super) fn forward(&self, z: Tensor<B, 2>) -> Tensor<B, 2> {
        self.l2.forward(self.l1.forward(z))
    }
}

/// Per-token RMS normalisation `x / sqrt(mean(x²) + eps)` over the last dimension. `x: [rows, d]`
pub fn rms_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let ms = x.clone().powi_scalar(2).mean_dim(1); // [rows, 1]
    x / (ms + RMS_EPS).sqrt()
}

/// The predictor input transform (see the module docs). `x: [rows, d]`, `mean, inv_std: [d]`
pub fn normalize_input<B: Backend>(x: Tensor<B, 2>, mean: Tensor<B, 1>, inv_std: Tensor<B, 1>) -> Tensor<B, 2> {
    (rms_normalize(x) - mean.unsqueeze::<2>()) * inv_std.unsqueeze::<2>()
}

/// Host copy of one trained predictor: `w1: [d, r]`, `w2: [r, n]`.
#[derive(Debug, Clone)]
pub struct LowRankHost {
    pub in_mean: Vec<f32>,
    pub in_inv_std: Vec<f32>,
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
}

/// A predictor with its input transform folded into the first matrix, as a GEMV engine runs it on the raw
/// residual `x` (`[d]`): `h = rstd(x) * (w1t . x) + b1`, `scores = w2t . h + b2`, with
/// `rstd(x) = 1 / sqrt(mean(x²) + RMS_EPS)`. Row-major `w1t: [r, d]`, `w2t: [n, r]`.
#[derive(Debug, Clone)]
pub struct FoldedPredictor {
    pub d: usize,
    pub r: usize,
    pub n: usize,
    pub w1t: Vec<f32>,
    pub b1: Vec<f32>,
    pub w2t: Vec<f32>,
    pub b2: Vec<f32>,
}

impl LowRankHost {
    /// Fold `z = (rms(x) - mean) * inv_std` into the first layer: `w1t[j, i] = w1[i, j] * inv_std[i]`,
    /// `b1'[j] = b1[j] - sum_i w1[i, j] * inv_std[i] * mean[i]` (in f64), and transpose both matrices.
    pub fn fold(&self) -> FoldedPredictor {
        let d = self.in_mean.len();
        let r = self.b1.len();
        let n = self.b2.len();
        let mut w1t = vec![0f32; r * d];
        let mut b1 = vec![0f32; r];
        for j in 0..r {
            let mut shift = 0f64;
            for i in 0..d {
                let w = self.w1[i * r + j] as f64 * self.in_inv_std[i] as f64;
                w1t[j * d + i] = w as f32;
                shift += w * self.in_mean[i] as f64;
            }
            b1[j] = (self.b1[j] as f64 - shift) as f32;
        }
        let mut w2t = vec![0f32; n * r];
        for j in 0..r {
            for c in 0..n {
                w2t[c * r + j] = self.w2[j * n + c];
            }
        }
        FoldedPredictor { d, r, n, w1t, b1, w2t, b2: self.b2.clone() }
    }
}

pub(super) fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    crate::model::to_host(t)
}

pub(super) fn write_weights(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let bad = |e: safetensors::SafeTensorError| Error::format(path, e.to_string());
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (name.clone(), v)).map_err(bad))
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> =
        [("format".to_string(), PREDICTORS_FORMAT.to_string()), ("version".to_string(), PREDICTORS_VERSION.to_string())]
            .into_iter()
            .collect();
    store::write_safetensors(path, views, meta)
}

/// One layer's loaded predictor weights. `w1: [d, r]`, `w2: [r, n]`.
#[derive(Debug, Clone)]
pub(super) struct LowRankWeights<B: Backend> {
    pub(super) in_mean: Tensor<B, 1>,
    pub(super) in_inv_std: Tensor<B, 1>,
    pub(super) w1: Tensor<B, 2>,
    pub(super) b1: Tensor<B, 1>,
    pub(super) w2: Tensor<B, 2>,
    pub(super) b2: Tensor<B, 1>,
}

impl<B: Backend> LowRankWeights<B> {
    /// `x: [b, s, d] -> logits [b, s, n]`
    pub(super) fn scores(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let z = normalize_input(x.reshape([b * s, d]), self.in_mean.clone(), self.in_inv_std.clone());
        let h = z.matmul(self.w1.clone()) + self.b1.clone().unsqueeze::<2>(); // [b*s, r]
        let out = h.matmul(self.w2.clone()) + self.b2.clone().unsqueeze::<2>(); // [b*s, n]
        let n = out.dims()[1];
        out.reshape([b, s, n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = crate::backend::CpuBackend;

    #[test]
    fn the_folded_predictor_computes_the_same_scores() {
        let (d, r, n, rows) = (24, 8, 10, 5);
        let mut g = crate::decode::SplitMix64(3);
        let mut v = |k: usize, lo: f32, hi: f32| -> Vec<f32> { (0..k).map(|_| lo + (hi - lo) * (g.next_u64() % 10_000) as f32 / 10_000.0).collect() };
        let host = LowRankHost { in_mean: v(d, -0.5, 0.5), in_inv_std: v(d, 0.5, 2.0), w1: v(d * r, -1.0, 1.0), b1: v(r, -1.0, 1.0), w2: v(r * n, -1.0, 1.0), b2: v(n, -1.0, 1.0) };
        let x = v(rows * d, -3.0, 3.0);
        let dev = Default::default();
        let t1 = |a: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(a.to_vec(), [a.len()]), &dev);
        let t2 = |a: &[f32], s: [usize; 2]| Tensor::<B, 2>::from_data(TensorData::new(a.to_vec(), s), &dev);
        let w = LowRankWeights::<B> {
            in_mean: t1(&host.in_mean),
            in_inv_std: t1(&host.in_inv_std),
            w1: t2(&host.w1, [d, r]),
            b1: t1(&host.b1),
            w2: t2(&host.w2, [r, n]),
            b2: t1(&host.b2),
        };
        let want = crate::model::to_host(w.scores(Tensor::<B, 3>::from_data(TensorData::new(x.clone(), [1, rows, d]), &dev)));
        let f = host.fold();
        assert_eq!((f.d, f.r, f.n), (d, r, n));
        let mut worst = 0f64;
        for b in 0..rows {
            let xr = &x[b * d..(b + 1) * d];
            let rstd = 1.0 / (xr.iter().map(|&a| a as f64 * a as f64).sum::<f64>() / d as f64 + RMS_EPS).sqrt();
            let h: Vec<f64> = (0..r).map(|j| rstd * (0..d).map(|i| f.w1t[j * d + i] as f64 * xr[i] as f64).sum::<f64>() + f.b1[j] as f64).collect();
            for c in 0..n {
                let s = (0..r).map(|j| f.w2t[c * r + j] as f64 * h[j]).sum::<f64>() + f.b2[c] as f64;
                worst = worst.max((s - want[b * n + c] as f64).abs() / (1.0 + s.abs()));
            }
        }
        assert!(worst < 1e-4, "folded vs burn predictor: {worst}");
    }
}
