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

/// Host copy of one trained predictor.
#[derive(Debug, Clone)]
pub(super) struct LowRankHost {
    pub(super) in_mean: Vec<f32>,
    pub(super) in_inv_std: Vec<f32>,
    pub(super) w1: Vec<f32>,
    pub(super) b1: Vec<f32>,
    pub(super) w2: Vec<f32>,
    pub(super) b2: Vec<f32>,
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
