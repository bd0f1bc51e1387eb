//! The engine checked against f32/f64 CPU references, on the GPU box (`dejavu engine-check`):
//! - [`kernels`]: every kernel on fresh random inputs, f16 and bf16, output poisoned with NaN first (relative error
//!   < 1e-2, no NaN, every element written);
//! - [`models`]: whole models against the burn reference: greedy continuations, divergences only where the
//!   reference's top-2 log-prob margin is under 0.05, teacher-forced log-probs of the reference's tokens within 0.05;
//! - [`kept`]: the sparse rules' kept sets on real weights, given the same inputs;
//! - [`batched`]: a batch of prompts decoded together against each decoded alone (same engine and plan).
//!
//! The helpers below (random inputs, 16-bit rounding, error measures, poisoned device buffers) serve all three.

mod kept;
mod kernels;
mod mma;
mod models;

pub use kept::{kept_sets, KeptCheck, KeptRule};
pub use kernels::{kernels, KernelCheck};
pub use models::{batched, compare, model, BatchCheck, ModelCheck};

use half::{bf16, f16};

use crate::source::weights::Half;

use super::launcher::Launcher;
use super::gpu::{Args, DBuf, GpuResult};

fn rng(seed: u64) -> crate::decode::SplitMix64 {
    crate::decode::SplitMix64(seed)
}

fn randv(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| ((r.next_f64() * 2.0 - 1.0) as f32) * scale).collect()
}

fn bits(v: &[f32], dt: Half) -> Vec<u16> {
    dt.encode(v)
}

fn unbits(b: &[u16], dt: Half) -> Vec<f32> {
    match dt {
        Half::F16 => b.iter().map(|&x| f16::from_bits(x).to_f32()).collect(),
        Half::Bf16 => b.iter().map(|&x| bf16::from_bits(x).to_f32()).collect(),
    }
}

/// Round through the 16-bit type (what the GPU sees).
fn rounded(v: &[f32], dt: Half) -> Vec<f32> {
    unbits(&bits(v, dt), dt)
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn verdict(kernel: String, dt: Half, got: &[f32], want: &[f32], tol: f64) -> KernelCheck {
    let nan = got.iter().filter(|x| !x.is_finite()).count();
    let e = rel_err(got, want);
    KernelCheck { kernel, dtype: dt.name(), rel_err: e, nan, pass: nan == 0 && e < tol && got.len() == want.len() }
}

struct Dev<'a> {
    e: &'a Launcher,
}

impl Dev<'_> {
    fn halfbuf(&self, v: &[f32], dt: Half) -> GpuResult<DBuf> {
        let b = self.e.gpu.alloc(v.len() * 2)?;
        self.e.gpu.upload(&b, 0, &bits(v, dt))?;
        Ok(b)
    }
    fn f32buf(&self, v: &[f32]) -> GpuResult<DBuf> {
        let b = self.e.gpu.alloc(v.len() * 4)?;
        self.e.gpu.upload(&b, 0, v)?;
        Ok(b)
    }
    fn i32buf(&self, v: &[i32]) -> GpuResult<DBuf> {
        let b = self.e.gpu.alloc(v.len() * 4)?;
        self.e.gpu.upload(&b, 0, v)?;
        Ok(b)
    }
    fn poisoned(&self, bytes: usize) -> GpuResult<DBuf> {
        let b = self.e.gpu.alloc(bytes)?;
        self.e.gpu.memset(&b, 0xff)?;
        Ok(b)
    }
    fn read_f32(&self, b: &DBuf, n: usize) -> GpuResult<Vec<f32>> {
        let mut v = vec![0f32; n];
        self.e.gpu.download(b.ptr, &mut v)?;
        Ok(v)
    }
    fn read_half(&self, b: &DBuf, n: usize, dt: Half) -> GpuResult<Vec<f32>> {
        let mut v = vec![0u16; n];
        self.e.gpu.download(b.ptr, &mut v)?;
        Ok(unbits(&v, dt))
    }
    fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: Args) -> GpuResult<()> {
        let f = self.e.k.get(name)?;
        let mut a = args;
        self.e.gpu.launch(f, grid, block, 0, &mut a)
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}
