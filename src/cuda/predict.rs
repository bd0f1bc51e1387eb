//! The trained low-rank predictors on the GPU (Deja Vu's MLP rule): the input transform folded into the first
//! matrix ([`FoldedPredictor`]), so a predictor is two of our GEMVs on the raw f32 residual — the first
//! normalising it on the fly (RMS, the predictors' epsilon, unit weight) — then the top-k of its scores.

use cudarc::driver::sys::CUdeviceptr;

use crate::launch::{hidden_split, GEMV_SMEM};
use crate::predictor::{FoldedPredictor, RMS_EPS};

use super::launcher::{Epi, Launcher, NormIn};
use super::gather::{mma_dense, mma_dense_fits};
use super::gpu::{Args, DBuf, GpuError, GpuResult};

/// One layer's predictor on the device, in the engine's 16-bit type: `w1t [r, d]`, `w2t [n, r]`, their biases,
/// and a unit norm weight `[d]` for the on-the-fly normalisation.
pub struct GpuPredictor {
    pub d: usize,
    pub r: usize,
    pub n: usize,
    w1t: DBuf,
    b1: DBuf,
    w2t: DBuf,
    b2: DBuf,
    ones: DBuf,
}

impl GpuPredictor {
    pub fn upload(e: &Launcher, f: &FoldedPredictor) -> GpuResult<Self> {
        if f.d != e.cfg.hidden {
            return Err(GpuError(format!("a predictor of input width {}, the model's hidden size is {}", f.d, e.cfg.hidden)));
        }
        Self::upload_any(e, f)
    }

    /// [`GpuPredictor::upload`] at any input width (the kernel checks try widths other than the engine's model).
    pub(crate) fn upload_any(e: &Launcher, f: &FoldedPredictor) -> GpuResult<Self> {
        let dt = e.dt();
        let put = |v: &[f32]| -> GpuResult<DBuf> {
            let b = e.gpu.alloc(v.len() * 2)?;
            e.gpu.upload(&b, 0, &dt.encode(v))?;
            Ok(b)
        };
        Ok(GpuPredictor {
            d: f.d,
            r: f.r,
            n: f.n,
            w1t: put(&f.w1t)?,
            b1: put(&f.b1)?,
            w2t: put(&f.w2t)?,
            b2: put(&f.b2)?,
            ones: put(&vec![1.0; f.d])?,
        })
    }

    /// A predictor of random weights (small values of the engine's type) at real shapes, for timing.
    pub fn random(e: &Launcher, r: usize, n: usize, seed: u64) -> GpuResult<Self> {
        let d = e.cfg.hidden;
        let rnd = |len: usize, seed: u64, scale: f32| super::Weights::random_half(&e.gpu, &e.k, e.dt(), len, seed, scale);
        let ones = e.gpu.alloc(d * 2)?;
        e.gpu.upload(&ones, 0, &e.dt().encode(&vec![1.0; d]))?;
        Ok(GpuPredictor { d, r, n, w1t: rnd(r * d, seed, 0.05)?, b1: rnd(r, seed + 1, 0.1)?, w2t: rnd(n * r, seed + 2, 0.05)?, b2: rnd(n, seed + 3, 0.1)?, ones })
    }

    /// Weight bytes one prediction reads.
    pub fn bytes(&self) -> usize {
        Self::bytes_for(self.d, self.r, self.n)
    }

    /// [`GpuPredictor::bytes`] of a predictor `d -> r -> n`.
    pub fn bytes_for(d: usize, r: usize, n: usize) -> usize {
        (r * d + n * r + r + n) * 2
    }

    /// Scratch a prediction over `rows` rows needs: f32 `[rows, r]`, 16-bit `[rows, r]` and 16-bit `[rows, d]` (the
    /// normalised input on the tensor-core path).
    pub fn scratch_bytes(&self, rows: usize) -> usize {
        rows * (self.r * 6 + self.d * 2)
    }

    /// `out` f32 `[rows, n]`: the scores of the residual rows `x` (f32 `[rows, d]`); `tmp` holds
    /// [`GpuPredictor::scratch_bytes`].
    pub fn scores(&self, e: &Launcher, x: CUdeviceptr, rows: usize, tmp: CUdeviceptr, out: CUdeviceptr) -> GpuResult<()> {
        self.scores_by(e, x, rows, tmp, out, e.pred_split)
    }

    /// [`GpuPredictor::scores`] with the hidden layer by `pred_hidden_*` where it applies (`split`) or by the GEMV
    /// path.
    pub(crate) fn scores_by(&self, e: &Launcher, x: CUdeviceptr, rows: usize, tmp: CUdeviceptr, out: CUdeviceptr, split: bool) -> GpuResult<()> {
        let (h, h16) = (tmp, tmp + (rows * self.r * 4) as u64);
        match hidden_split(self.d, rows) {
            // Up to 4 rows: the hidden layer by `pred_hidden_*` (S warps a row), written in 16 bits directly.
            Some(s) if split => {
                let name = format!("pred_hidden_{}_b{}", e.dt().name(), rows.next_power_of_two());
                let smem = rows * self.d * 4;
                let f = e.k.get_smem(&name, GEMV_SMEM)?;
                let rpb = PRED_WARPS / s;
                let mut args = Args::new().ptr(self.w1t.ptr).ptr(self.b1.ptr).ptr(x).ptr(h16).i32(self.r as i32).i32(self.d as i32).i32(rows as i32).i32(s as i32).f32(RMS_EPS as f32);
                e.gpu.launch(f, (self.r.div_ceil(rpb) as u32, 1, 1), (PRED_WARPS * 32) as u32, smem as u32, &mut args)?;
            }
            // 3-16 rows on the tensor cores: the input normalised into 16 bits first (the CUDA-core GEMV normalises
            // it in f32 on the fly), then the hidden layer.
            _ if mma_dense_fits(e, rows, self.d) => {
                let u = tmp + (rows * self.r * 6) as u64;
                e.rms_half(x, self.ones.ptr, u, rows, self.d, RMS_EPS as f32)?;
                mma_dense(e, self.w1t.ptr, Some(self.b1.ptr), u, h, rows, self.r, self.d)?;
                e.to_half(h, h16, rows * self.r)?;
            }
            _ => {
                let norm = NormIn { x, g: self.ones.ptr, gb: 0, tmp: 0 };
                e.gemv(self.w1t.ptr, Some(self.b1.ptr), 0, Some(norm), h, rows, self.r, self.d, Epi::Store, true, RMS_EPS as f32)?;
                e.to_half(h, h16, rows * self.r)?;
            }
        }
        // The second layer: on the tensor cores at 3-16 rows; below, a GEMV (a kernel holding 8 loads a lane over
        // 8 rows a warp, `pred_out`, tenth session, measured no faster at 20,480 outputs (8.93 us both, H100, ncu)
        // and slower at 40 (5.2 vs 4.0 us)).
        if mma_dense_fits(e, rows, self.r) {
            return mma_dense(e, self.w2t.ptr, Some(self.b2.ptr), h16, out, rows, self.n, self.r);
        }
        e.gemv(self.w2t.ptr, Some(self.b2.ptr), h16, None, out, rows, self.n, self.r, Epi::Store, true, RMS_EPS as f32)
    }
}

/// Whether a prediction over `rows` rows of width `d` rounds its normalised input to the 16-bit type before the
/// hidden layer: the tensor-core path ([`GpuPredictor::scores`] at 3-16 rows past `pred_hidden_*`'s 4); the other
/// paths normalise in f32.
pub(crate) fn rounds_input(e: &Launcher, d: usize, rows: usize) -> bool {
    !(e.pred_split && hidden_split(d, rows).is_some()) && mma_dense_fits(e, rows, d)
}

/// Warps of a `pred_hidden_*` block.
const PRED_WARPS: usize = 8;
