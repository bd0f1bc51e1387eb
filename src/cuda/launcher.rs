//! One model on one GPU as the forward's pieces launch it: the weights, the compiled kernels, cuBLAS, and the
//! launch settings (the `DEJAVU_*` knobs, read once at start), with the launches every piece shares: projections
//! and norms (`linear`), the one-launch MLP (`mlp_fused`), and the grids of the row-looping kernels. The dense
//! forward ([`super::engine`]) and the sparse layers ([`super::sparse`], [`super::heads`], [`super::select`],
//! [`super::predict`]) all launch through it. Of a forward's state it holds only whether the forward under way
//! runs one sequence (`one_seq`, which picks the projections' kernels), none of its buffers (cache, scratch, graphs,
//! plan).

mod linear;
mod mlp_fused;

use std::collections::HashMap;

use crate::config::{Family, ModelConfig};
use crate::source::weights::Half;

use super::gemm::Blas;
use super::gpu::{Args, DBuf, Gpu, GpuError, GpuResult};
use super::kernels::Kernels;
use super::weights::Weights;

pub(in crate::cuda) use linear::norm_kernel;
pub use linear::{Epi, NormIn};
use mlp_fused::mlp_fuse_default;

/// Rows at or below this go through our GEMV kernels (one weight pass serves them all); above, through cuBLAS.
pub const GEMV_MAX_ROWS: usize = 16;
/// Below width 2048, a one-sequence forward of up to this many tokens (a short prompt, Sirius' checks) runs on our
/// GEMV, 16 rows a launch, instead of cuBLAS (`DEJAVU_PREFILL_GEMV=0` restores cuBLAS): the GEMV keeps the
/// normalised input in f32 (cuBLAS reads it rounded to 16 bits), as the decode steps and the CPU reference do. With
/// `f32_acts` it lifted tiny-llama from 43 to 45 of 50 greedy continuations identical to the CPU path (one H100,
/// 2026-12-07); it costs time: a SmolLM2-shape prefill of 32 / 64 tokens took 5.6 / 10.5 ms against cuBLAS' 1.8 /
/// 2.0 (`kernels/NOTES.md`, twentieth session).
pub const SMALL_PREFILL_GEMV: usize = 64;
/// Threads per GEMV block (16 warps, one output row each): measured faster than 8 on the H200 at SmolLM2,
/// OPT-6.7B and Llama-2-7B shapes.
const GEMV_THREADS: u32 = 512;

/// The weights, kernels and launch settings of one model on one GPU (see the module).
pub struct Launcher {
    pub gpu: Gpu,
    pub k: Kernels,
    pub w: Weights,
    pub cfg: ModelConfig,
    blas: Option<Blas>,
    /// A fused RMSNorm stages x * g and scales the projection's sums by 1 / rms instead of normalising the staged
    /// input in place (default; `DEJAVU_NORM_EPI=0` normalises in place, as before).
    norm_epi: bool,
    /// Stage GEMV inputs in shared memory (default; `DEJAVU_GEMV_STAGE=0` turns it off).
    pub(in crate::cuda) stage: bool,
    /// Threads per GEMV block (`DEJAVU_GEMV_THREADS`, default 512).
    gemv_threads: u32,
    /// Size the grids of the row-looping kernels (GEMV, gathers, score pass) to what the multiprocessors hold at
    /// once, each warp taking several rows (default); `DEJAVU_GEMV_PERSIST=0`: one row per warp, as before.
    persist: bool,
    /// Kernels read kept sets marked [`super::gather::Kept::early`] (and their first weights) before the programmatic
    /// wait (default; `DEJAVU_EARLY_IDS=0`: after it).
    pub(in crate::cuda) early_ids: bool,
    /// Gathers of at least this many rows run on the tensor cores (`gemv_mma_*`, kernels/mma.cu;
    /// `DEJAVU_MMA_ROWS`, default 3; 0: never).
    pub(in crate::cuda) mma_rows: usize,
    /// The union of several rows' kept sets over many blocks past 2,048 units (`topk_compact` on a grid;
    /// `DEJAVU_COMPACT_GRID=0`: one block).
    pub(in crate::cuda) compact_grid: bool,
    /// The predictors' hidden layer by `pred_hidden_*` (S warps a row, 16-bit output) up to 4 rows
    /// (`DEJAVU_PRED_SPLIT=0`: the GEMV + `to_half` path).
    pub pred_split: bool,
    /// Blocks per multiprocessor by (kernel, threads, dynamic shared memory), from the occupancy calculator.
    occupancy: std::cell::RefCell<HashMap<(usize, u32, usize), u32>>,
    /// At most this many blocks for the row-looping kernels (the kernel checks run with a small cap, so that every
    /// warp loops over many rows).
    grid_cap: Option<u32>,
    /// Stream GEMV weights through shared memory with cp.async (`DEJAVU_GEMV_ASYNC=1`) instead of registers.
    gemv_async: bool,
    /// One-row products with a row's sum split over a group of warps of a block where the rows balance better over
    /// the resident warps that way (`gemv_grp{S}_*`): by [`crate::launch::split_for`] (the default, `DEJAVU_GEMV_GROUP=1`), `=2` or
    /// `=4` always that many warps a row (where the width is a multiple of 8), `=0` off. On an H100, side by side:
    /// Llama-2-13B 9.620 -> 9.371 ms a token (its 5,120-row projections split four ways), OPT-13B 9.540 -> 9.448.
    gemv_group: usize,
    /// Batches of each warp's first row after the first (2 KB a warp each) that a one-row product asks of the L2
    /// before waiting for the previous kernel, so the memory keeps streaming while the block stages its input
    /// (`gemv_pf_*`; `DEJAVU_GEMV_PF=P`, default 1, 0 off). On an H100, side by side: Llama-2-7B 5.217 -> 5.111 ms a
    /// token, SmolLM2 0.608 -> 0.566 (2 batches: 5.156, 0.568).
    gemv_pf: usize,
    /// Rows up to which projections use our GEMV (`DEJAVU_GEMV_ROWS`, default 1); above, cuBLAS (tensor cores):
    /// at Llama-2-7B batch 4 our GEMV took 14.8 ms a step, cuBLAS at batch 16 5.4 ms.
    gemv_rows: usize,
    /// Tokens up to which a one-sequence forward uses our GEMV: [`SMALL_PREFILL_GEMV`] below width 2048, else 0
    /// (`DEJAVU_PREFILL_GEMV=0` off, `=1` the default, `=N`: N tokens at any width).
    prefill_gemv: usize,
    /// The forward under way (or the last) runs one sequence (batch 1).
    pub(in crate::cuda) one_seq: bool,
    /// Top-k over a row by the binned select (a 12-bit histogram while the keys load, then a radix select over
    /// the k-th key's bin only) instead of four radix passes over the row (`DEJAVU_TOPK_BINNED=0`).
    pub(crate) topk_binned: bool,
    /// The transposed down projections `[F, d]` per layer (empty unless [`mlp_fuse_default`]): with them a one-row
    /// dense decode step runs its MLP as one launch (`mlp_fused_*`, kernels/mlp.cu) where the input is the norm's
    /// 16-bit output: each block streams its neurons' gate / up rows and then their down rows from these copies,
    /// so no launch boundary sits between the two products. A sparse plan's layers read them too instead of making
    /// their own. Made at start: one more copy of every down projection in memory.
    pub(in crate::cuda) down_t: Vec<DBuf>,
    /// Warps a fused-MLP block, 8 or 16 (`mlp_fused_*_x16`, one block of 512 threads a multiprocessor with two
    /// words of the output a thread up to width 8,192): `DEJAVU_MLPF_WARPS=8` or `=16`, else picked at start for
    /// the model's shape ([`crate::launch::mlpf_pick`]; 0 until then).
    pub(in crate::cuda) mlpf_warps: u32,
}

impl Launcher {
    /// The launch settings for `cfg` (from the environment), and the one-launch MLP's transposed down copies where
    /// it runs ([`mlp_fuse_default`]).
    pub fn new(gpu: Gpu, k: Kernels, w: Weights, cfg: ModelConfig) -> GpuResult<Self> {
        let blas = Blas::new(gpu.stream).ok();
        let small_model = cfg.hidden < 2048;
        let mut l = Launcher {
            gpu,
            k,
            w,
            cfg,
            blas,
            norm_epi: std::env::var("DEJAVU_NORM_EPI").map_or(true, |v| v != "0"),
            topk_binned: std::env::var("DEJAVU_TOPK_BINNED").map_or(true, |v| v != "0"),
            stage: std::env::var("DEJAVU_GEMV_STAGE").map_or(true, |v| v != "0"),
            gemv_rows: std::env::var("DEJAVU_GEMV_ROWS").ok().and_then(|v| v.parse().ok()).filter(|&r: &usize| r >= 1).unwrap_or(1),
            prefill_gemv: match std::env::var("DEJAVU_PREFILL_GEMV").ok().and_then(|v| v.parse::<usize>().ok()) {
                Some(1) | None if small_model => SMALL_PREFILL_GEMV,
                Some(1) | None => 0,
                Some(n) => n,
            },
            one_seq: false,
            gemv_async: std::env::var("DEJAVU_GEMV_ASYNC").is_ok_and(|v| v != "0"),
            gemv_pf: std::env::var("DEJAVU_GEMV_PF").ok().and_then(|v| v.parse::<usize>().ok()).map_or(1, |v| v.min(8)),
            gemv_group: std::env::var("DEJAVU_GEMV_GROUP").ok().and_then(|v| v.parse::<usize>().ok()).filter(|v| [0, 1, 2, 4].contains(v)).unwrap_or(1),
            gemv_threads: std::env::var("DEJAVU_GEMV_THREADS").ok().and_then(|v| v.parse().ok()).filter(|t| [128, 256, 512].contains(t)).unwrap_or(GEMV_THREADS),
            persist: std::env::var("DEJAVU_GEMV_PERSIST").map_or(true, |v| v != "0"),
            early_ids: std::env::var("DEJAVU_EARLY_IDS").map_or(true, |v| v != "0"),
            mma_rows: std::env::var("DEJAVU_MMA_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(3),
            compact_grid: std::env::var("DEJAVU_COMPACT_GRID").map_or(true, |v| v != "0"),
            pred_split: std::env::var("DEJAVU_PRED_SPLIT").map_or(true, |v| v != "0"),
            occupancy: Default::default(),
            grid_cap: None,
            down_t: Vec::new(),
            mlpf_warps: std::env::var("DEJAVU_MLPF_WARPS").ok().and_then(|v| v.parse().ok()).filter(|w| [8, 16].contains(w)).unwrap_or(0),
        };
        if mlp_fuse_default(&l.cfg) {
            if let Err(err) = l.transpose_downs() {
                if std::env::var_os("DEJAVU_MLP_FUSE").is_some() {
                    return Err(GpuError(format!("the one-launch MLP's transposed down copies (DEJAVU_MLP_FUSE=1; 0 turns them off): {err}")));
                }
                // By default only: no room for the transposed copies, so the MLP keeps its two GEMVs.
                l.down_t.clear();
            }
        }
        if !l.down_t.is_empty() && l.mlpf_warps == 0 {
            let glu = l.cfg.family != Family::Opt;
            l.mlpf_warps = l.mlpf_warps_for(l.cfg.ffn, l.cfg.hidden, l.cfg.hidden, glu)?;
        }
        Ok(l)
    }

    /// Gathers of at least `rows` rows on the tensor cores from now on (0: never); returns the previous setting.
    pub fn set_mma_rows(&mut self, rows: usize) -> usize {
        std::mem::replace(&mut self.mma_rows, rows)
    }

    /// Rows up to which projections run on the GEMV kernels.
    pub fn gemv_rows(&self) -> usize {
        if self.blas.is_some() { self.gemv_rows } else { usize::MAX }
    }

    pub fn has_blas(&self) -> bool {
        self.blas.is_some()
    }

    pub(in crate::cuda) fn dt(&self) -> Half {
        self.w.dt
    }

    pub(in crate::cuda) fn kname(&self, base: &str) -> String {
        format!("{base}_{}", self.dt().name())
    }

    pub(in crate::cuda) fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: Args) -> GpuResult<()> {
        let f = self.k.get(name)?;
        let mut args = args;
        self.gpu.launch(f, grid, block, 0, &mut args)
    }

    /// Device-to-device copy bandwidth (bytes read + written per second) over a `bytes` buffer, median of `reps`.
    pub fn copy_bandwidth(&self, bytes: usize, reps: usize) -> GpuResult<f64> {
        let (a, b) = (self.gpu.alloc(bytes)?, self.gpu.alloc(bytes)?);
        self.gpu.memset(&a, 1)?;
        let mut t = Vec::new();
        for i in 0..reps + 2 {
            let (s, e) = (self.gpu.event()?, self.gpu.event()?);
            self.gpu.record(&s)?;
            self.gpu.copy(b.ptr, a.ptr, bytes)?;
            self.gpu.record(&e)?;
            let ms = s.elapsed_ms(&e)? as f64;
            if i >= 2 {
                t.push(ms);
            }
        }
        t.sort_by(f64::total_cmp);
        let ms = t[t.len() / 2];
        Ok(2.0 * bytes as f64 / (ms * 1e-3))
    }
}
