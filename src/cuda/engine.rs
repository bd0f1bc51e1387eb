//! The dense forward on the GPU: our kernels for everything at decode sizes (fused q/k/v, fused SwiGLU, residual
//! adds inside the projections' epilogues), cuBLAS for the projections of a prefill, and the decode step captured
//! into a CUDA graph per batch size and replayed.
//!
//! State that changes between steps (the token ids, the number of cached positions) lives in device buffers that
//! the kernels read, so one captured graph serves every step; the host writes them before each replay.

use std::collections::HashMap;

use cudarc::driver::sys::CUdeviceptr;

use crate::config::{Family, ModelConfig};

use super::gemm::Blas;
use super::gpu::{Args, DBuf, Gpu, GpuError, GpuResult, Graph};
use super::kernels::Kernels;
use super::predict::GpuPredictor;
use super::select::QCopy;
use super::heads::SparseHeads;
use super::sparse::{sparse_mlp, GpuMlp, In, PredIn, SparseMlp, SparseParts};
use super::weights::Weights;
use crate::source::weights::Half;
use crate::predictor::FoldedPredictor;
use crate::sparse::plan::{HeadKv, HeadRule, MlpRule, Plan};
use crate::sparse::quant::QScoreCopies;

/// What a sparse plan on the GPU reads besides the model: the `qscore` score copies, and the trained MLP
/// predictors (one per layer, folded) of the `dejavu` rule.
#[derive(Default, Clone, Copy)]
pub struct GpuArtifacts<'a> {
    pub qscore: Option<&'a QScoreCopies>,
    pub mlp_predictors: Option<&'a [FoldedPredictor]>,
    /// The look-ahead head predictors (one per layer, folded) of a predicted head rule.
    pub head_predictors: Option<&'a [FoldedPredictor]>,
    /// What the MLP predictors read (`train-predictors --neuron-input`): from a block input (`block`, `prev`) the
    /// engine selects the layer's neurons on the side stream ahead of its MLP ([`super::sparse::MlpAhead`]).
    pub mlp_input: crate::predictor::NeuronInput,
}

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
/// Attention key splits at most, for decode.
const MAX_SPLITS: usize = 32;
/// Dynamic shared memory a GEMV block may take to stage its f32 inputs.
pub(super) const GEMV_SMEM: usize = 200 * 1024;

/// Shared memory of the cp.async GEMV's ring: per thread, ASYNC_STAGES (4) x ASYNC_U (2) 16-byte slots per matrix
/// (kernels/gemv.cu), two matrices for the GLU.
fn gemv_ring_bytes(threads: usize, epi: Epi) -> usize {
    threads * 4 * 2 * 16 * if epi.is_glu() { 2 } else { 1 }
}

/// Warps a row the one-row GEMV may take (`gemv_grp{S}_*`, S > 1).
const GROUPS: [usize; 3] = [1, 2, 4];

/// Warps a row for `n` rows of width `k` over `warps` resident warps: at s warps a row a warp's work is
/// ceil(n s / warps) / s rows; the fewest s within 5% of the least, or 1 unless that saves at least 10% (Llama-2-7B's
/// gate/up rows, 11,008 on 2,112 warps, split in two would save 8% of a warp's rows and measured 0.2-0.4% slower a
/// token on an H100; Llama-2-13B's out- and down-projections, 5,120 rows, save 37% at four). A part must
/// hold at least one full round of a warp's loads (k / s >= 1,024: 32 lanes x 4 loads of 8 elements), since a
/// shorter row takes one round whatever its split (SmolLM2's k = 576 split four ways measured 10% slower). N = 5,120
/// on 4,224 warps: 2 rows' time at s = 1, 1.25 at s = 4; N = 4,096: 1 either way.
fn split_for(n: usize, k: usize, warps: usize) -> usize {
    let allowed = |s: &usize| k / s >= 1024;
    let work = |s: usize| (n * s).div_ceil(warps.max(1)) as f64 / s as f64;
    let best = GROUPS.iter().filter(|s| allowed(s)).map(|&s| work(s)).fold(f64::INFINITY, f64::min);
    let s = GROUPS.iter().copied().filter(allowed).find(|&s| work(s) <= best * 1.05).unwrap_or(1);
    if work(s) <= work(1) * 0.90 {
        s
    } else {
        1
    }
}

/// Projection epilogues, matching `kernels/gemv.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epi {
    Store,
    Acc,
    Relu,
    Glu,
    /// `Relu` and `Glu` writing f32 (one row, our GEMV only): the dense decode step's MLP hidden, read unrounded by
    /// the down projection.
    Relu32,
    Glu32,
}

impl Epi {
    fn name(self) -> &'static str {
        match self {
            Epi::Store => "store",
            Epi::Acc => "acc",
            Epi::Relu => "relu",
            Epi::Glu => "glu",
            Epi::Relu32 => "relu32",
            Epi::Glu32 => "glu32",
        }
    }

    fn is_glu(self) -> bool {
        matches!(self, Epi::Glu | Epi::Glu32)
    }

    /// The f32 hidden epilogues (one row, our GEMV only).
    pub(crate) fn is_f32_hidden(self) -> bool {
        matches!(self, Epi::Relu32 | Epi::Glu32)
    }

    /// Bytes of one output element.
    fn out_bytes(self) -> usize {
        match self {
            Epi::Relu | Epi::Glu => 2,
            Epi::Store | Epi::Acc | Epi::Relu32 | Epi::Glu32 => 4,
        }
    }
}

/// A projection's input normalised on the fly: `x` is the f32 residual stream, `g`/`gb` the norm's weight and
/// bias (0: none). The GEMV kernels fuse it; the GEMM path runs the norm kernel into `tmp` (16-bit) first.
#[derive(Debug, Clone, Copy)]
pub struct NormIn {
    pub x: CUdeviceptr,
    pub g: CUdeviceptr,
    pub gb: CUdeviceptr,
    pub tmp: CUdeviceptr,
}

impl NormIn {
    /// A raw f32 input `[K]`, read as it is (no norm weight: `rms` 3 of the GEMV kernels).
    pub fn raw(x: CUdeviceptr) -> Self {
        NormIn { x, g: 0, gb: 0, tmp: 0 }
    }

    pub fn is_raw(self) -> bool {
        self.g == 0
    }
}

/// Kernel classes, for the per-class time breakdown of `bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Embed,
    Norm,
    Qkv,
    Attention,
    OutProj,
    Mlp,
    Head,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Embed => "embed",
            Class::Norm => "norm",
            Class::Qkv => "qkv",
            Class::Attention => "attention",
            Class::OutProj => "out_proj",
            Class::Mlp => "mlp",
            Class::Head => "lm_head",
        }
    }
}

/// The norm kernel for width `d` and its block size: the register-held variant (`rmsnorm4_*` / `layernorm4_*`, NV
/// float4 groups a thread, at most 512 threads) where `d` is a multiple of 4 and at most 16,384, else the plain one.
pub(super) fn norm_kernel(rms: bool, dt: Half, d: usize) -> (String, u32) {
    let base = if rms { "rmsnorm" } else { "layernorm" };
    match [1usize, 2, 4, 8].into_iter().find(|nv| d.div_ceil(4 * nv) <= 512).filter(|_| d % 4 == 0) {
        Some(nv) => (format!("{base}4_{}_v{nv}", dt.name()), (d.div_ceil(4 * nv).div_ceil(32) * 32) as u32),
        None => (format!("{base}_{}", dt.name()), (d.div_ceil(32) * 32).clamp(32, 1024) as u32),
    }
}

/// Per-forward scratch, sized for `rows` tokens.
struct Scratch {
    rows: usize,
    /// f32 residual stream `[rows, d]`
    x: DBuf,
    /// 16-bit normed input of a projection `[rows, max(d, E)]`
    h: DBuf,
    /// f32 fused q/k/v `[rows, (H + 2 KV) hd]`
    qkv: DBuf,
    /// 16-bit attention output `[rows, H hd]`
    att: DBuf,
    /// attention partials `[rows * H * splits, hd + 2]`
    part: DBuf,
    /// f32 GEMM output `[rows, max(2F, E, d)]`
    y: DBuf,
    /// 16-bit MLP hidden `[rows, F]`
    act: DBuf,
    /// f32 MLP hidden `[F]` and attention output `[H hd]` of a one-row dense decode step (`f32_acts`)
    act32: DBuf,
    att32: DBuf,
    /// 16-bit final hidden `[rows, E]` (after the final norm and project_out): the head's input
    fin: DBuf,
}

/// The KV cache: per layer, K and V `[rows, KV, cap, hd]` in the 16-bit type.
struct Cache {
    rows: usize,
    cap: usize,
    k: Vec<DBuf>,
    v: Vec<DBuf>,
    /// Per layer, u8 `[rows, kv_heads, cap]`: 1 where the key/value head was computed at that position, 0 where a
    /// head-sparse token (`--head-kv kept`) skipped it. Written by every forward; read when a plan may skip.
    present: Vec<DBuf>,
}

/// What the last forward left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Last {
    pub rows: usize,
    pub seq: usize,
    /// Real tokens per row.
    pub lens: Vec<usize>,
    /// The logits of every row's single position are already in `logits` (a captured step ran).
    pub step_logits: bool,
}

/// One model on one GPU, with its cache and graphs.
pub struct Engine {
    pub gpu: Gpu,
    pub k: Kernels,
    pub w: Weights,
    pub cfg: ModelConfig,
    blas: Option<Blas>,
    scratch: Option<Scratch>,
    cache: Option<Cache>,
    /// `[0]`: positions cached before the running forward.
    state: DBuf,
    /// token ids of the running forward `[rows]`; a captured step writes its argmax back here.
    tok: DBuf,
    tok_cap: usize,
    /// f32 logits `[rows, V]`
    logits: Option<DBuf>,
    logits_rows: usize,
    /// `score`'s targets, log-probs and argmaxes (4 bytes a row each), kept between calls.
    score_bufs: Option<[DBuf; 3]>,
    score_rows: usize,
    /// int per row: argmax / gathered row index.
    small: DBuf,
    /// Captured forwards by (rows, tokens a row: 0 for the decode step with its head and argmax, attention key
    /// splits, sparse plan active).
    graphs: HashMap<(usize, usize, usize, bool), Graph>,
    /// Short prefills (at most `GEMV_MAX_ROWS` tokens in all: Sirius' verification forwards, short prompts) run
    /// from captured graphs too (`DEJAVU_PREFILL_GRAPH=0`: launched one by one). Measured on an H100 (SmolLM2,
    /// `exactdown@0.5` corrected at K = 4): a dense check 1.54 -> 0.91 ms; same greedy results with and without.
    prefill_graphs: bool,
    /// Positions in the cache.
    pub len: usize,
    pub last: Option<Last>,
    /// Set by `bench --breakdown`: per-class events recorded around each launch.
    pub profile: Option<Vec<(Class, super::gpu::Event, super::gpu::Event)>>,
    cur_class: Class,
    /// Normalise inside the GEMV projections (default); `DEJAVU_FUSE_NORM=0` runs the norm kernel instead, for
    /// side-by-side timing.
    fuse_norm: bool,
    /// A fused RMSNorm stages x * g and scales the projection's sums by 1 / rms instead of normalising the staged
    /// input in place (default; `DEJAVU_NORM_EPI=0` normalises in place, as before).
    pub(super) norm_epi: bool,
    /// Stage GEMV inputs in shared memory (default; `DEJAVU_GEMV_STAGE=0` turns it off).
    pub(super) stage: bool,
    /// Threads per GEMV block (`DEJAVU_GEMV_THREADS`, default 512).
    gemv_threads: u32,
    /// Size the grids of the row-looping kernels (GEMV, gathers, score pass) to what the multiprocessors hold at
    /// once, each warp taking several rows (default); `DEJAVU_GEMV_PERSIST=0`: one row per warp, as before.
    persist: bool,
    /// Kernels read kept sets marked [`super::sparse::Kept::early`] (and their first weights) before the programmatic
    /// wait (default; `DEJAVU_EARLY_IDS=0`: after it).
    pub(super) early_ids: bool,
    /// Gathers of at least this many rows run on the tensor cores (`gemv_mma_*`, kernels/mma.cu;
    /// `DEJAVU_MMA_ROWS`, default 3; 0: never).
    pub(super) mma_rows: usize,
    /// The union of several rows' kept sets over many blocks past 2,048 units (`topk_compact` on a grid;
    /// `DEJAVU_COMPACT_GRID=0`: one block).
    pub(super) compact_grid: bool,
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
    /// the resident warps that way (`gemv_grp{S}_*`): by [`split_for`] (the default, `DEJAVU_GEMV_GROUP=1`), `=2` or
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
    one_seq: bool,
    /// Keys per attention split at least (`DEJAVU_ATTN_KEYS`, default 128: with the values loaded beside the keys,
    /// measured side by side on an H100, prompt 128 + 128 tokens, 128 was faster than 64 and 32 at Llama-2-7B/13B,
    /// OPT-6.7B and SmolLM2; `kernels/NOTES.md`).
    attn_keys: usize,
    /// Fold RoPE and the cache write into the attention kernel at decode: one launch a layer fewer. Default on
    /// below width 2048, where launches dominate (`DEJAVU_ROPE_FUSE=0/1` overrides): measured side by side on an
    /// H100, SmolLM2 0.597 -> 0.569 ms, Llama-2-7B unchanged (5.159), Llama-2-13B 9.737 -> 9.811, OPT-6.7B 5.242
    /// -> 5.269 (`kernels/NOTES.md`); bit for bit the same output, cache and flags (`engine-check`).
    rope_fuse: bool,
    /// At batch-1 decode with dense heads, the out-projection merges the attention's key splits itself
    /// (`gemv_comb_*`) instead of a separate `attn_combine` launch. Default on below width 2048, as `rope_fuse`
    /// (`DEJAVU_COMB_FOLD=0/1` overrides): measured side by side on an H200, SmolLM2 0.640 -> 0.621 ms, Llama-2-7B
    /// 4.103 -> 4.168, Llama-2-13B 7.687 -> 7.833, OPT-6.7B 4.182 -> 4.255 (`kernels/NOTES.md`); `engine-check`
    /// compares it bit for bit with attn_combine + the GEMV.
    comb_fold: bool,
    /// A one-row dense decode step keeps the MLP hidden and the attention output in f32 between the kernels
    /// (`DEJAVU_F32_ACTS=0` turns it off). Alone it moved as many continuations one way as the other (one H100,
    /// eighteenth session); with the short prefills on the GEMV ([`SMALL_PREFILL_GEMV`]) tiny-llama went from 43 to
    /// 45 of 50 and no model fell below 45 (one H100, twentieth); decode time unchanged (kernels/NOTES.md).
    f32_acts: bool,
    /// Top-k over a row by the binned select (a 12-bit histogram while the keys load, then a radix select over
    /// the k-th key's bin only) instead of four radix passes over the row (`DEJAVU_TOPK_BINNED=0`).
    pub(crate) topk_binned: bool,
    /// The sparse MLP of the plan set by [`Engine::set_plan`] (None: dense; present, possibly with every MLP
    /// dense, whenever the plan is sparse: it keeps the statistics).
    sparse: Option<SparseMlp>,
    /// The head-sparse attention of the plan (None: dense attention).
    heads: Option<SparseHeads>,
    /// Run dense even with a sparse plan set (the correction passes of Sirius).
    dense_now: bool,
    /// Kept-neuron statistics of the sparse forwards since the last take.
    pub stats: crate::sparse::SparsityStats,
    /// The transposed down projections `[F, d]` per layer (empty unless [`mlp_fuse_default`]): with them a one-row
    /// dense decode step runs its MLP as one launch (`mlp_fused_*`, kernels/mlp.cu) where the input is the norm's
    /// 16-bit output: each block streams its neurons' gate / up rows and then their down rows from these copies,
    /// so no launch boundary sits between the two products. A sparse plan's layers read them too instead of making
    /// their own. Made at start: one more copy of every down projection in memory.
    pub(super) down_t: Vec<DBuf>,
    /// Warps a fused-MLP block, 8 or 16 (`mlp_fused_*_x16`, one block of 512 threads a multiprocessor with two
    /// words of the output a thread up to width 8,192): `DEJAVU_MLPF_WARPS=8` or `=16`, else picked at start for
    /// the model's shape ([`mlpf_pick`]; 0 until then).
    mlpf_warps: u32,
}

/// Threads of a fused-MLP block (W = 8 warps in kernels/mlp.cu; the `_x16` kernels take twice as many).
const MLPF_THREADS: u32 = 256;

/// Widths the fused MLP takes: input `k` and output `d` multiples of 8, `d` within 4 16-byte words a thread, the
/// staged input within the default 48 KB of shared memory.
pub fn mlp_fused_fits(k: usize, d: usize) -> bool {
    k % 8 == 0 && d % 8 == 0 && k > 0 && d > 0 && d / 8 <= 4 * MLPF_THREADS as usize && k * 4 <= 48 * 1024
}

/// Whether an engine for `cfg` runs the one-launch MLP: `DEJAVU_MLP_FUSE=0` no, `=1` wherever
/// [`mlp_fused_fits`], unset at widths 2,049-5,120, where it was measured to win. Side by side on an H100
/// (`bench --prompt 128 --tokens 128`, kernels/NOTES.md) it took Llama-2-7B f16 from 5.11 to 5.06 ms and OPT-6.7B
/// from 5.14 to 5.04 (bf16 alike), and with 16-warp blocks OPT-13B from 9.41 to 9.13 and Llama-2-13B from 9.31 to
/// 9.11. It is not used below width 2,048 (the norm is fused into the GEMV there), nor by default above 5,120:
/// OPT-30B gained 2% forced, but its copies (20 GB at f16) would no longer leave it room on an 80 GB card.
pub fn mlp_fuse_default(cfg: &ModelConfig) -> bool {
    let fits = mlp_fused_fits(cfg.hidden, cfg.hidden);
    match std::env::var("DEJAVU_MLP_FUSE") {
        Ok(v) => v != "0" && fits,
        Err(_) => fits && cfg.hidden > 2048 && cfg.hidden <= 5120,
    }
}

/// Neurons the busiest multiprocessor sums in a fused-MLP launch over `f` neurons with `warps` warps a block on a
/// grid of `grid` blocks: chunks of `warps` neurons go to the blocks in turn (chunk c to block c mod grid,
/// kernels/mlp.cu) and the blocks to the `sms` multiprocessors in waves (block b to b mod sms). Only which
/// multiprocessors get a wave's extra blocks depends on that last assumption, not the maximum.
fn mlpf_busiest(f: usize, warps: usize, grid: usize, sms: usize) -> usize {
    let chunks = f.div_ceil(warps.max(1));
    let grid = grid.clamp(1, chunks.max(1));
    let sms = sms.max(1);
    let mut per_sm = vec![0usize; sms.min(grid)];
    for b in 0..grid {
        per_sm[b % sms] += chunks / grid + usize::from(b < chunks % grid);
    }
    per_sm.into_iter().max().unwrap_or(0) * warps
}

/// Warps a fused-MLP block for `f` neurons on `sms` multiprocessors that hold `per_sm8` 8-warp blocks or
/// `per_sm16` 16-warp blocks at once: 16 unless the 8-warp kernel keeps at least as many warps resident and its
/// busiest multiprocessor sums fewer neurons ([`mlpf_busiest`]). Measured on an H100 (kernels/NOTES.md,
/// twenty-seventh session): at width 5,120 the 8-warp kernel holds three words of the output a thread, one block a
/// multiprocessor, and 16 warps took OPT-13B and Llama-2-13B 2-3% faster; at width 4,096 both keep 16 warps a
/// multiprocessor, and the 16-warp blocks were 1.3% faster at OPT-6.7B and 0.9% at Mistral-7B (the same busiest
/// multiprocessor) but 0.7% slower at Llama-2-7B (11,008 neurons: 96 on the busiest against 88).
fn mlpf_pick(f: usize, sms: usize, per_sm8: usize, per_sm16: usize) -> u32 {
    let sms = sms.max(1);
    let (c8, c16) = (f.div_ceil(8), f.div_ceil(16));
    let (g8, g16) = (c8.min(per_sm8.max(1) * sms), c16.min(per_sm16.max(1) * sms));
    if per_sm8 * 8 >= per_sm16 * 16 && mlpf_busiest(f, 8, g8, sms) < mlpf_busiest(f, 16, g16, sms) {
        8
    } else {
        16
    }
}

pub(super) fn k_of(n: usize) -> usize {
    // GEMV template batch sizes.
    [1, 2, 4, 8, 16].into_iter().find(|&b| b >= n).unwrap_or(16)
}

impl Engine {
    /// An engine over weights already on `gpu`.
    pub fn new(gpu: Gpu, k: Kernels, w: Weights, cfg: ModelConfig) -> GpuResult<Self> {
        if !cfg.head_dim.is_power_of_two() || !(8..=256).contains(&cfg.head_dim) {
            return Err(GpuError(format!("head_dim {} is not supported by the CUDA engine (powers of two from 8 to 256)", cfg.head_dim)));
        }
        if cfg.heads % cfg.kv_heads != 0 {
            return Err(GpuError(format!("{} heads are not a multiple of {} kv heads", cfg.heads, cfg.kv_heads)));
        }
        let blas = Blas::new(gpu.stream).ok();
        let small_model = cfg.hidden < 2048;
        let state = gpu.alloc(16)?;
        let small = gpu.alloc(4 * 1024)?;
        let tok = gpu.alloc(4 * 64)?;
        let mut e = Engine {
            gpu,
            k,
            w,
            cfg,
            blas,
            scratch: None,
            cache: None,
            state,
            tok,
            tok_cap: 64,
            logits: None,
            logits_rows: 0,
            score_bufs: None,
            score_rows: 0,
            small,
            graphs: HashMap::new(),
            len: 0,
            last: None,
            profile: None,
            cur_class: Class::Embed,
            // Fusing the norm into each GEMV block pays at small widths (launches dominate) and costs at 4096
            // (every block re-reads the row): measured on the H200, SmolLM2 0.721 vs 0.757 ms, Llama-2-7B 4.75 vs 4.55.
            fuse_norm: std::env::var("DEJAVU_FUSE_NORM").map_or(small_model, |v| v != "0"),
            norm_epi: std::env::var("DEJAVU_NORM_EPI").map_or(true, |v| v != "0"),
            rope_fuse: std::env::var("DEJAVU_ROPE_FUSE").map_or(small_model, |v| v != "0"),
            prefill_graphs: std::env::var("DEJAVU_PREFILL_GRAPH").map_or(true, |v| v != "0"),
            comb_fold: std::env::var("DEJAVU_COMB_FOLD").map_or(small_model, |v| v != "0"),
            f32_acts: std::env::var("DEJAVU_F32_ACTS").map_or(true, |v| v != "0"),
            topk_binned: std::env::var("DEJAVU_TOPK_BINNED").map_or(true, |v| v != "0"),
            attn_keys: std::env::var("DEJAVU_ATTN_KEYS").ok().and_then(|v| v.parse().ok()).filter(|&k: &usize| k >= 16).unwrap_or(128),
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
            sparse: None,
            heads: None,
            dense_now: false,
            stats: Default::default(),
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
        if mlp_fuse_default(&e.cfg) {
            if let Err(err) = e.transpose_downs() {
                if std::env::var_os("DEJAVU_MLP_FUSE").is_some() {
                    return Err(GpuError(format!("the one-launch MLP's transposed down copies (DEJAVU_MLP_FUSE=1; 0 turns them off): {err}")));
                }
                // By default only: no room for the transposed copies, so the MLP keeps its two GEMVs.
                e.down_t.clear();
            }
        }
        if !e.down_t.is_empty() && e.mlpf_warps == 0 {
            let glu = e.cfg.family != Family::Opt;
            e.mlpf_warps = e.mlpf_warps_for(e.cfg.ffn, e.cfg.hidden, e.cfg.hidden, glu)?;
        }
        Ok(e)
    }

    /// Device bytes an engine for `cfg` holds beyond the checkpoint's weights at start: the fused MLP's
    /// transposed down copies when the fused MLP is on ([`mlp_fuse_default`]; for `bench`'s fit check).
    pub fn extra_weight_bytes(cfg: &ModelConfig) -> usize {
        if mlp_fuse_default(cfg) {
            cfg.layers * cfg.ffn * cfg.hidden * 2
        } else {
            0
        }
    }

    /// Make [`Engine::down_t`], the transposed down copies of every layer (the fused MLP's widths only, see
    /// [`mlp_fused_fits`]).
    fn transpose_downs(&mut self) -> GpuResult<()> {
        if mlp_fused_fits(self.cfg.hidden, self.cfg.hidden) {
            let (d, f) = (self.cfg.hidden, self.cfg.ffn);
            for l in 0..self.cfg.layers {
                let b = self.gpu.alloc(f * d * 2)?;
                super::sparse::transpose(self, self.w.layers[l].down.ptr, b.ptr, d, f)?;
                self.down_t.push(b);
            }
            self.gpu.sync()?;
        }
        Ok(())
    }

    /// `out[:] += down_b + down^T act(up . x)` for one 16-bit input row `x` in one launch (`mlp_fused_*`): `up`
    /// `[2F, k]` (gate rows, then up rows) with `glu`, else fc1 `[F, k]`; `wt` the transposed down `[F, d]`; `out`
    /// the f32 residual stream `[d]`; `warps` a block, 8 or 16. Shapes [`mlp_fused_fits`] refuses are an error.
    #[allow(clippy::too_many_arguments)]
    pub fn mlp_fused(&self, up: CUdeviceptr, up_b: Option<CUdeviceptr>, wt: CUdeviceptr, down_b: Option<CUdeviceptr>, x: CUdeviceptr, out: CUdeviceptr, f: usize, k: usize, d: usize, glu: bool, warps: u32) -> GpuResult<()> {
        if !mlp_fused_fits(k, d) || ![8, 16].contains(&warps) {
            return Err(GpuError(format!("internal: the fused MLP takes widths that are multiples of 8 up to 8192 and 8 or 16 warps (k {k}, d {d}, {warps} warps)")));
        }
        let (func, threads) = self.mlpf_kernel(d, glu, warps)?;
        let (w2, b2) = if glu { (up + (f * k * 2) as u64, up_b.map_or(0, |b| b + (f * 2) as u64)) } else { (0, 0) };
        let smem = k * 4;
        let grid = self.block_grid(func, f.div_ceil(warps as usize), threads, smem)?;
        let mut args = Args::new()
            .ptr(up)
            .ptr(w2)
            .ptr(up_b.unwrap_or(0))
            .ptr(b2)
            .ptr(wt)
            .ptr(down_b.unwrap_or(0))
            .ptr(x)
            .ptr(out)
            .i32(f as i32)
            .i32(k as i32)
            .i32(d as i32);
        self.gpu.launch(func, (grid, 1, 1), threads, smem as u32, &mut args)
    }

    /// The fused-MLP kernel for output width `d` with `warps` warps a block, and its threads a block.
    fn mlpf_kernel(&self, d: usize, glu: bool, warps: u32) -> GpuResult<(cudarc::driver::sys::CUfunction, u32)> {
        let threads = 32 * warps;
        let mw = (d / 8).div_ceil(threads as usize);
        let x16 = if warps == 16 { "_x16" } else { "" };
        let name = format!("mlp_fused_{}_{}_w{mw}{x16}", self.dt().name(), if glu { "glu" } else { "relu" });
        Ok((self.k.get(&name)?, threads))
    }

    /// Warps a fused-MLP block for `f` neurons of input width `k` and output width `d` by [`mlpf_pick`] from the
    /// occupancy of both kernels.
    fn mlpf_warps_for(&self, f: usize, k: usize, d: usize, glu: bool) -> GpuResult<u32> {
        let per_sm = |warps: u32| -> GpuResult<usize> {
            let (func, threads) = self.mlpf_kernel(d, glu, warps)?;
            Ok(self.blocks_per_sm(func, threads, k * 4)? as usize)
        };
        Ok(mlpf_pick(f, self.gpu.sms as usize, per_sm(8)?, per_sm(16)?))
    }

    /// Run `plan` from now on. The GPU runs, on the MLP (any layer may stay dense): CATS thresholds, the SwiGLU
    /// top-k rules `exactdown` and `qscore` (its int4 score copies from `art`), and the trained predictors' top-k
    /// (`art`'s folded MLP predictors); on attention, the predicted head rule with `--head-kv all` (`art`'s head
    /// predictors; see [`super::heads`]). Other rules are refused with their name. Sparse layers get transposed
    /// copies of their down projection and out-projection (made here, once).
    pub fn set_plan(&mut self, plan: &Plan, art: &GpuArtifacts<'_>) -> GpuResult<()> {
        if plan.layers.len() != self.cfg.layers {
            return Err(GpuError(format!("the plan has {} layers, the model {}", plan.layers.len(), self.cfg.layers)));
        }
        let mut rules = Vec::with_capacity(plan.layers.len());
        let mut heads_k = Vec::with_capacity(plan.layers.len());
        let mut kv_kept = false;
        for (l, lp) in plan.layers.iter().enumerate() {
            heads_k.push(match lp.heads {
                HeadRule::Dense => None,
                HeadRule::PredictedTopK { k, .. } if k >= self.cfg.heads => None,
                HeadRule::PredictedTopK { k, kv } => {
                    kv_kept |= kv == HeadKv::Kept;
                    Some(k)
                }
                r => return Err(GpuError(format!("layer {l}: head rule {r:?} does not run on the GPU yet (predicted heads do)"))),
            });
            rules.push(match lp.mlp {
                MlpRule::Dense => None,
                MlpRule::Threshold { t } => Some(GpuMlp::Cats(t)),
                MlpRule::ExactDownTopK { k } => Some(GpuMlp::ExactDown(k)),
                MlpRule::QScoreTopK { k } => Some(GpuMlp::QScore(k)),
                MlpRule::PredictedTopK { k } => Some(GpuMlp::Predicted(k)),
                r => return Err(GpuError(format!("layer {l}: MLP rule {r:?} does not run on the GPU yet (CATS, exactdown, qscore and dejavu do)"))),
            });
        }
        let mut parts = SparseParts::default();
        if let Some(c) = art.qscore.filter(|_| rules.iter().any(|r| matches!(r, Some(GpuMlp::QScore(_))))) {
            parts.q = QCopy::upload_all(self, c)?.into_iter().map(Some).collect();
            parts.score_bits = c.opts.bits_per_weight();
        }
        let upload = |ps: Option<&[FoldedPredictor]>, want: &dyn Fn(usize) -> bool| -> GpuResult<Vec<Option<GpuPredictor>>> {
            (0..plan.layers.len())
                .map(|l| match ps.and_then(|ps| ps.get(l)).filter(|_| want(l)) {
                    Some(p) => GpuPredictor::upload(self, p).map(Some),
                    None => Ok(None),
                })
                .collect()
        };
        parts.pred = upload(art.mlp_predictors, &|l| matches!(rules[l], Some(GpuMlp::Predicted(_))))?;
        parts.neuron_input = art.mlp_input;
        let head_pred = upload(art.head_predictors, &|l| heads_k[l].is_some())?;
        self.install(rules, heads_k, kv_kept, parts, head_pred)
    }

    /// Run these per-layer rules from now on (see [`Engine::set_plan`]): the MLP rules with what they read
    /// (`parts`), the heads kept per layer (None: dense attention) with their predictors, and whether a token skips
    /// the key/value heads none of its kept heads reads (`--head-kv kept`).
    pub fn install(&mut self, rules: Vec<Option<GpuMlp>>, heads_k: Vec<Option<usize>>, kv_kept: bool, parts: SparseParts, head_pred: Vec<Option<GpuPredictor>>) -> GpuResult<()> {
        self.graphs.clear();
        self.sparse = None;
        self.heads = None;
        if heads_k.iter().any(Option::is_some) {
            self.heads = Some(SparseHeads::new(self, heads_k.clone(), kv_kept, head_pred)?);
        }
        if rules.iter().any(Option::is_some) || self.heads.is_some() {
            let mut sp = SparseMlp::new(self, rules, parts)?;
            sp.heads_k = heads_k;
            self.sparse = Some(sp);
        }
        Ok(())
    }

    /// The sparse MLP the next forward runs (None: dense).
    fn sparse_active(&self) -> Option<&SparseMlp> {
        self.sparse.as_ref().filter(|_| !self.dense_now)
    }

    /// Layer `l`'s head-sparse attention in the next forward (None: dense attention there).
    fn heads_at(&self, l: usize) -> Option<&SparseHeads> {
        self.heads_on().filter(|h| h.k[l].is_some())
    }

    /// The head-sparse state while the plan runs (None without head sparsity or while running dense).
    fn heads_on(&self) -> Option<&SparseHeads> {
        self.heads.as_ref().filter(|_| !self.dense_now)
    }

    /// Run dense (`true`) or the plan set (`false`) from the next forward on.
    pub fn set_dense(&mut self, dense: bool) {
        self.dense_now = dense;
    }

    /// Add the last forward's kept counts to [`Engine::stats`] (nothing when it ran dense).
    fn add_stats(&mut self, batch: usize, seq: usize, lens: &[usize]) -> GpuResult<()> {
        let mut st = std::mem::take(&mut self.stats);
        let r = match self.sparse_active() {
            Some(sp) => sp.add_stats(self, batch, seq, lens, &mut st),
            None => Ok(()),
        };
        self.stats = st;
        r
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

    pub(super) fn dt(&self) -> Half {
        self.w.dt
    }

    fn kname(&self, base: &str) -> String {
        format!("{base}_{}", self.dt().name())
    }

    /// Blocks of `threads` for a kernel whose warps loop over `rows` rows (kernels/gemv.cu, qscore.cu): one warp a
    /// row when they fit on the multiprocessors at once, else as many blocks as fit, with the rows spread evenly
    /// (every warp gets the same number, give or take one, and each block stages its input once for all of them).
    pub(super) fn row_grid(&self, f: cudarc::driver::sys::CUfunction, rows: usize, threads: u32, smem: usize) -> GpuResult<u32> {
        let wpb = (threads as usize / 32).max(1);
        let one_each = rows.div_ceil(wpb).max(1);
        if let Some(c) = self.grid_cap {
            return Ok((one_each as u32).min(c.max(1)));
        }
        if !self.persist {
            return Ok(one_each as u32);
        }
        let per_sm = self.blocks_per_sm(f, threads, smem)?;
        let cap_warps = per_sm as usize * self.gpu.sms.max(1) as usize * wpb;
        let per_warp = rows.div_ceil(cap_warps).max(1);
        Ok(rows.div_ceil(per_warp).div_ceil(wpb).clamp(1, one_each) as u32)
    }

    /// Blocks of `f` one multiprocessor holds at once (the occupancy calculator, cached per kernel and shape).
    fn blocks_per_sm(&self, f: cudarc::driver::sys::CUfunction, threads: u32, smem: usize) -> GpuResult<u32> {
        let key = (f as usize, threads, smem);
        if let Some(n) = self.occupancy.borrow().get(&key).copied() {
            return Ok(n);
        }
        let n = self.gpu.occupancy(f, threads, smem)?.max(1);
        self.occupancy.borrow_mut().insert(key, n);
        Ok(n)
    }

    /// Blocks for a kernel whose blocks loop over `items` work items: what the multiprocessors hold at once, at
    /// most one block an item (and at most the checks' cap).
    pub(super) fn block_grid(&self, f: cudarc::driver::sys::CUfunction, items: usize, threads: u32, smem: usize) -> GpuResult<u32> {
        let items = items.max(1);
        if let Some(c) = self.grid_cap {
            return Ok((items as u32).min(c.max(1)));
        }
        let per_sm = self.blocks_per_sm(f, threads, smem)?;
        Ok(items.min(per_sm as usize * self.gpu.sms.max(1) as usize) as u32)
    }

    /// `bench --launch-cost`'s persistent chain (`gemv_chain_*`): `chain` consecutive `n`-row slices of `w`
    /// (`[chain n, k]`) times the 16-bit `x` (`[k]`) added into `out` (`[chain, n]` f32) in one launch, the slices
    /// separated by a grid barrier (`bar`: 8 zeroed bytes) instead of launch boundaries; the grid as the one-row
    /// GEMV's, capped at what the multiprocessors hold at once (the barrier needs every block resident).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_chain(&self, w: CUdeviceptr, x: CUdeviceptr, out: CUdeviceptr, n: usize, k: usize, chain: usize, bar: CUdeviceptr) -> GpuResult<()> {
        let name = format!("gemv_chain_{}_acc_b1", self.dt().name());
        let stage = self.stage && k % 4 == 0 && k * 4 <= GEMV_SMEM;
        let smem = if stage { k * 4 } else { 0 };
        let f = self.gemv_fn(&name, smem)?;
        let threads = self.gemv_threads;
        let resident = self.blocks_per_sm(f, threads, smem)? * self.gpu.sms.max(1) as u32;
        let grid = self.row_grid(f, n, threads, smem)?.min(resident);
        let mut args = Args::new().ptr(w).ptr(x).ptr(out).i32(n as i32).i32(k as i32).i32(chain as i32).i32(i32::from(stage)).ptr(bar);
        self.gpu.launch(f, (grid, 1, 1), threads, smem as u32, &mut args)
    }

    /// One-row products over groups of warps (0 off, 1 where it balances the rows better, 2 or 4 always), for the
    /// kernel checks.
    pub fn set_gemv_group(&mut self, s: usize) {
        self.gemv_group = if [0, 1, 2, 4].contains(&s) { s } else { 0 };
    }

    /// The one-row group setting (see [`Engine::set_gemv_group`]).
    pub fn gemv_group(&self) -> usize {
        self.gemv_group
    }

    /// Cap the grids of the row-looping kernels at `blocks` (None: sized by occupancy), for the kernel checks.
    pub fn set_grid_cap(&mut self, blocks: Option<u32>) {
        self.grid_cap = blocks;
    }

    fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: Args) -> GpuResult<()> {
        let f = self.k.get(name)?;
        let mut args = args;
        self.gpu.launch(f, grid, block, 0, &mut args)
    }

    fn class(&mut self, c: Class) -> GpuResult<()> {
        if let Some(p) = &mut self.profile {
            let (s, e) = (self.gpu.event()?, self.gpu.event()?);
            self.gpu.record(&s)?;
            if let Some(last) = p.last() {
                self.gpu.record(&last.2)?;
            }
            p.push((c, s, e));
        }
        self.cur_class = c;
        Ok(())
    }

    fn end_profile(&mut self) -> GpuResult<()> {
        if let Some(p) = &self.profile {
            if let Some(last) = p.last() {
                self.gpu.record(&last.2)?;
            }
        }
        Ok(())
    }

    /// Make room for a forward of `rows` tokens in `batch` rows reaching `need` cached positions. Reallocation
    /// drops the captured graphs (they hold the old addresses).
    fn reserve(&mut self, batch: usize, rows: usize, need: usize) -> GpuResult<()> {
        let c = &self.cfg;
        let (d, e, f, hd) = (c.hidden, c.embed_dim, c.ffn, c.head_dim);
        let qkv = (c.heads + 2 * c.kv_heads) * hd;
        if self.scratch.as_ref().is_none_or(|s| s.rows < rows) {
            let r = rows.max(GEMV_MAX_ROWS);
            let g = &self.gpu;
            let splits = if r <= GEMV_MAX_ROWS { MAX_SPLITS } else { 1 };
            self.graphs.clear();
            self.scratch = None;
            self.scratch = Some(Scratch {
                rows: r,
                x: g.alloc(r * d * 4)?,
                h: g.alloc(r * d.max(e) * 2)?,
                qkv: g.alloc(r * qkv * 4)?,
                att: g.alloc(r * c.heads * hd * 2)?,
                part: g.alloc((r * c.heads * splits).max(GEMV_MAX_ROWS * c.heads * MAX_SPLITS) * (hd + 2) * 4)?,
                y: g.alloc(r * (2 * f).max(e).max(d) * 4)?,
                act: g.alloc(r * f * 2)?,
                act32: g.alloc(f * 4)?,
                att32: g.alloc(c.heads * hd * 4)?,
                fin: g.alloc(r * e.max(d) * 2)?,
            });
        }
        if rows > self.tok_cap {
            self.graphs.clear();
            self.tok_cap = rows.next_power_of_two();
            self.tok = self.gpu.alloc(self.tok_cap * 4)?;
        }
        let limit = c.position_limit().unwrap_or(usize::MAX);
        let grow = match &self.cache {
            None => true,
            Some(k) => k.rows < batch || k.cap < need,
        };
        if grow {
            let (old_rows, old_cap) = self.cache.as_ref().map_or((0, 0), |k| (k.rows, k.cap));
            let rows_new = batch.max(old_rows);
            let cap = need.max(256).max(old_cap.saturating_mul(2)).min(limit.max(need));
            let bytes = rows_new * c.kv_heads * cap * hd * 2;
            let mut k = Vec::with_capacity(c.layers);
            let mut v = Vec::with_capacity(c.layers);
            let mut present = Vec::with_capacity(c.layers);
            for l in 0..c.layers {
                let (kb, vb) = (self.gpu.alloc(bytes)?, self.gpu.alloc(bytes)?);
                let pb = self.gpu.alloc(rows_new * c.kv_heads * cap)?;
                if let Some(old) = &self.cache {
                    // Keep the cached positions: copy each (row, kv head) run of `len` positions.
                    let run = self.len * hd * 2;
                    for r in 0..old.rows {
                        for j in 0..c.kv_heads {
                            let src = ((r * c.kv_heads + j) * old.cap * hd * 2) as u64;
                            let dst = ((r * c.kv_heads + j) * cap * hd * 2) as u64;
                            self.gpu.copy(kb.ptr + dst, old.k[l].ptr + src, run)?;
                            self.gpu.copy(vb.ptr + dst, old.v[l].ptr + src, run)?;
                            let (ps, pd) = (((r * c.kv_heads + j) * old.cap) as u64, ((r * c.kv_heads + j) * cap) as u64);
                            self.gpu.copy(pb.ptr + pd, old.present[l].ptr + ps, self.len)?;
                        }
                    }
                }
                k.push(kb);
                v.push(vb);
                present.push(pb);
            }
            self.gpu.sync()?;
            self.graphs.clear();
            self.cache = Some(Cache { rows: rows_new, cap, k, v, present });
        }
        Ok(())
    }

    /// Bytes the cache and scratch would take for `batch` rows of `ctx` positions and `rows` tokens per forward.
    pub fn working_bytes(cfg: &ModelConfig, batch: usize, ctx: usize, rows: usize) -> usize {
        let (d, e, f, hd) = (cfg.hidden, cfg.embed_dim, cfg.ffn, cfg.head_dim);
        let cache = 2 * cfg.layers * batch * cfg.kv_heads * ctx.max(256) * hd * 2;
        let r = rows.max(GEMV_MAX_ROWS);
        let qkv = (cfg.heads + 2 * cfg.kv_heads) * hd;
        let scratch = r * (d * 4 + d.max(e) * 2 + qkv * 4 + cfg.heads * hd * 2 + (2 * f).max(e).max(d) * 4 + f * 2 + e.max(d) * 2)
            + (f + cfg.heads * hd) * 4
            + (r * cfg.heads).max(GEMV_MAX_ROWS * cfg.heads * MAX_SPLITS) * (hd + 2) * 4;
        cache + scratch + r * cfg.vocab_size * 4
    }

    /// `out = x W^T` over `rows` rows with the epilogue `epi`. `x` is 16-bit `[rows, k]`; `w` is `[n, k]` (for
    /// `Glu`, `[2n, k]` with gate rows first); `out` is f32 `[rows, n]` (Store/Acc) or 16-bit (Relu/Glu).
    #[allow(clippy::too_many_arguments)]
    pub fn linear(&self, w: CUdeviceptr, bias: Option<CUdeviceptr>, x: CUdeviceptr, out: CUdeviceptr, rows: usize, n: usize, k: usize, epi: Epi, y: CUdeviceptr) -> GpuResult<()> {
        self.linear_in(w, bias, x, None, out, rows, n, k, epi, y)
    }

    /// Our GEMV kernels over `rows` rows, 16 at a time: `x` 16-bit rows, or `norm` (RMSNorm when `rms`, else
    /// LayerNorm, with `eps`) of an f32 residual; the epilogue `epi`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv(&self, w: CUdeviceptr, bias: Option<CUdeviceptr>, x: CUdeviceptr, norm: Option<NormIn>, out: CUdeviceptr, rows: usize, n: usize, k: usize, epi: Epi, rms: bool, eps: f32) -> GpuResult<()> {
        let b0 = bias.unwrap_or(0);
        let (xf, g, gb) = norm.map_or((0, 0, 0), |m| (m.x, m.g, m.gb));
        // A norm input without a weight is the raw f32 input itself (`rms` 3 of the kernels).
        let raw = norm.is_some_and(NormIn::is_raw);
        let (w2, bias2) = if epi.is_glu() { (w + (n * k * 2) as u64, bias.map_or(0, |b| b + (n * 2) as u64)) } else { (0, 0) };
        let mut r0 = 0;
        while r0 < rows {
            let nb = (rows - r0).min(GEMV_MAX_ROWS);
            let name = format!("gemv_{}_{}_b{}", self.dt().name(), epi.name(), k_of(nb));
            let out_elem = epi.out_bytes();
            let args = Args::new()
                .ptr(w)
                .ptr(w2)
                .ptr(b0)
                .ptr(bias2)
                .ptr(x + (r0 * k * 2) as u64)
                .ptr(out + (r0 * n * out_elem) as u64)
                .i32(n as i32)
                .i32(k as i32)
                .i32(nb as i32)
                .ptr(if xf == 0 { 0 } else { xf + (r0 * k * 4) as u64 })
                .ptr(g)
                .ptr(gb)
                .f32(eps);
            let threads = self.gemv_threads;
            // The cp.async variant needs its ring of in-flight weights in shared memory beside the inputs.
            // (not instantiated for the f32 hidden epilogues or a raw f32 input)
            let ring = if self.gemv_async && k % 8 == 0 && !epi.is_f32_hidden() && !raw {
                gemv_ring_bytes(threads as usize, epi)
            } else {
                0
            };
            let staged = nb * k * 4;
            let stage = self.stage && k % 4 == 0 && staged + ring <= GEMV_SMEM;
            let smem = if stage { staged } else { 0 } + ring;
            let rms_arg = if raw { 3 } else { self.rms_arg(rms, stage && ring == 0 && xf != 0) };
            let mut args = args.i32(rms_arg).i32(i32::from(stage));
            // One row of a width of whole 16-byte words: a row split over a group of warps where that balances the
            // rows better, else the prefetching kernel (its batch count one more argument).
            let one_row = nb == 1 && ring == 0 && k % 8 == 0;
            let split = if one_row { self.group_split(n, k, epi, threads, smem)? } else { 1 };
            let (dt, en) = (self.dt().name(), epi.name());
            let name = if ring > 0 {
                name.replacen("gemv_", "gemv_async_", 1)
            } else if split > 1 {
                format!("gemv_grp{split}_{dt}_{en}_b1")
            } else if one_row && self.gemv_pf > 0 {
                args = args.i32(self.gemv_pf as i32);
                format!("gemv_pf_{dt}_{en}_b1")
            } else {
                name
            };
            let f = self.gemv_fn(&name, smem)?;
            // The cp.async variant computes one row per warp.
            let grid = if ring > 0 { (n as u32).div_ceil(threads / 32) } else { self.row_grid(f, n * split, threads, smem)? };
            self.gpu.launch(f, (grid, 1, 1), threads, smem as u32, &mut args)?;
            r0 += nb;
        }
        Ok(())
    }

    /// A GEMV kernel by name, with `smem` bytes of dynamic shared memory allowed when it takes any.
    fn gemv_fn(&self, name: &str, smem: usize) -> GpuResult<cudarc::driver::sys::CUfunction> {
        if smem > 0 {
            self.k.get_smem(name, GEMV_SMEM)
        } else {
            self.k.get(name)
        }
    }

    /// Warps a row for a one-row product of `n` rows of width `k` (a multiple of 8): the `gemv_group` setting, or
    /// with `1` [`split_for`] over the warps the grouped kernel keeps resident.
    fn group_split(&self, n: usize, k: usize, epi: Epi, threads: u32, smem: usize) -> GpuResult<usize> {
        if self.gemv_group != 1 {
            return Ok(self.gemv_group.max(1));
        }
        let f = self.gemv_fn(&format!("gemv_grp2_{}_{}_b1", self.dt().name(), epi.name()), smem)?;
        let warps = self.blocks_per_sm(f, threads, smem)? as usize * self.gpu.sms.max(1) as usize * (threads as usize / 32);
        Ok(split_for(n, k, warps))
    }

    /// The GEMV kernels' `rms` argument: 0 LayerNorm, 1 RMSNorm normalising the staged input in place, 2 RMSNorm
    /// staging x * g and scaling the sums by 1 / rms (only for a staged, normalised input: `staged_norm`).
    pub(super) fn rms_arg(&self, rms: bool, staged_norm: bool) -> i32 {
        if rms && self.norm_epi && staged_norm {
            2
        } else {
            i32::from(rms)
        }
    }

    /// The batch-1 decode out-projection from the attention's key-split partials: `out[n] += W x + bias`, `x` the
    /// merged attention output of `k / hd` heads over `splits` partials (`part`, `[heads * splits, hd + 2]` f32).
    /// `r16`: the merged input rounded to the 16-bit type first, as attn_combine's 16-bit output (else as its f32
    /// output).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_comb(&self, w: CUdeviceptr, bias: Option<CUdeviceptr>, part: CUdeviceptr, out: CUdeviceptr, n: usize, k: usize, splits: usize, hd: usize, r16: bool) -> GpuResult<()> {
        let name = format!("gemv_comb_{}_acc_b1", self.dt().name());
        let smem = k * 4;
        let f = self.k.get_smem(&name, GEMV_SMEM)?;
        let threads = GEMV_THREADS;
        let grid = self.row_grid(f, n, threads, smem)?;
        let mut args = Args::new().ptr(w).ptr(bias.unwrap_or(0)).ptr(part).ptr(out).i32(n as i32).i32(k as i32).i32(splits as i32).i32(hd as i32).i32(i32::from(r16));
        self.gpu.launch(f, (grid, 1, 1), threads, smem as u32, &mut args)
    }

    /// Whether layer `l`'s attention output stays in f32 for the out-projection: a one-row step with every head
    /// (`f32_acts`; the out-projection stages it, so it must fit the staging memory).
    fn f32_att(&self, l: usize, rows: usize) -> bool {
        let k = self.cfg.heads * self.cfg.head_dim;
        self.f32_acts && rows == 1 && self.heads_at(l).is_none() && self.stage && k * 4 <= GEMV_SMEM && self.cfg.head_dim % 4 == 0
    }

    /// Whether the out-projection of a decode step over `rows` rows with `splits` key splits merges them itself.
    fn folds_combine(&self, rows: usize, splits: usize) -> bool {
        let k = self.cfg.heads * self.cfg.head_dim;
        self.comb_fold && splits > 1 && rows == 1 && self.stage && k * 4 <= GEMV_SMEM && self.cfg.head_dim % 4 == 0
    }

    /// [`Engine::linear`] whose input is `norm(x)` when `norm` is given (then `x` is ignored).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_in(&self, w: CUdeviceptr, bias: Option<CUdeviceptr>, x: CUdeviceptr, norm: Option<NormIn>, out: CUdeviceptr, rows: usize, n: usize, k: usize, epi: Epi, y: CUdeviceptr) -> GpuResult<()> {
        let b0 = bias.unwrap_or(0);
        let rms = i32::from(self.cfg.family == Family::Llama);
        let eps = self.cfg.norm_eps as f32;
        if (epi.is_f32_hidden() || norm.is_some_and(NormIn::is_raw)) && rows != 1 {
            return Err(GpuError::new("internal: the f32 hidden epilogues and raw f32 inputs take one row"));
        }
        if rows <= self.gemv_rows || (self.one_seq && rows <= self.prefill_gemv) || self.blas.is_none() {
            return self.gemv(w, bias, x, norm, out, rows, n, k, epi, rms == 1, eps);
        }
        let x = match norm {
            Some(m) => {
                let name = if rms == 1 { self.kname("rmsnorm") } else { self.kname("layernorm") };
                let threads = (k.div_ceil(32) * 32).clamp(32, 1024) as u32;
                let args = Args::new().ptr(m.x).ptr(m.g).ptr(m.gb).ptr(m.tmp).ptr(0).ptr(0).i32(k as i32).f32(eps);
                self.launch(&name, (rows as u32, 1, 1), threads, args)?;
                m.tmp
            }
            None => x,
        };
        let blas = self.blas.as_ref().ok_or_else(|| GpuError::new("internal: no cuBLAS"))?;
        let dt = self.dt();
        let ep = self.kname("epilogue");
        let ep_args = |yb: CUdeviceptr, m: usize, mode: i32, o: CUdeviceptr| {
            Args::new().ptr(yb).ptr(b0).ptr(o).i64(rows as i64).i32(m as i32).i32(mode)
        };
        let grid = |elems: usize| ((elems.div_ceil(256)).clamp(1, 65_535) as u32, 1, 1);
        match epi {
            Epi::Store => {
                blas.gemm(dt, w, x, out, rows, n, k, false)?;
                if bias.is_some() {
                    self.launch(&ep, grid(rows * n), 256, ep_args(out, n, 0, 0))?;
                }
            }
            Epi::Acc => {
                blas.gemm(dt, w, x, out, rows, n, k, true)?;
                if bias.is_some() {
                    self.launch(&ep, grid(rows * n), 256, ep_args(out, n, 0, 0))?;
                }
            }
            Epi::Relu => {
                blas.gemm(dt, w, x, y, rows, n, k, false)?;
                self.launch(&ep, grid(rows * n), 256, ep_args(y, n, 1, out))?;
            }
            Epi::Glu => {
                blas.gemm(dt, w, x, y, rows, 2 * n, k, false)?;
                self.launch(&ep, grid(rows * n), 256, ep_args(y, 2 * n, 2, out))?;
            }
            Epi::Relu32 | Epi::Glu32 => return Err(GpuError::new("internal: the f32 hidden epilogues take one row (the GEMV)")),
        }
        Ok(())
    }

    fn norm(&self, w: &DBuf, b: Option<&DBuf>, x: CUdeviceptr, out: CUdeviceptr, xout: CUdeviceptr, rows: usize) -> GpuResult<()> {
        self.norm_copy(w, b, x, out, xout, 0, rows)
    }

    /// [`Engine::norm`], also copying `x` itself to `xraw` (f32 `[rows, d]`) where it is not 0.
    #[allow(clippy::too_many_arguments)]
    fn norm_copy(&self, w: &DBuf, b: Option<&DBuf>, x: CUdeviceptr, out: CUdeviceptr, xout: CUdeviceptr, xraw: CUdeviceptr, rows: usize) -> GpuResult<()> {
        let rms = self.cfg.family == Family::Llama;
        self.norm_launch(rms, w.ptr, b.map_or(0, |b| b.ptr), x, out, xout, xraw, rows, self.cfg.hidden, self.cfg.norm_eps as f32)
    }

    /// The engine's norm kernel at width `d` (`norm_kernel`; kernels/norm.cu says what each pointer is, 0: none).
    #[allow(clippy::too_many_arguments)]
    fn norm_launch(&self, rms: bool, w: CUdeviceptr, b: CUdeviceptr, x: CUdeviceptr, out: CUdeviceptr, xout: CUdeviceptr, xraw: CUdeviceptr, rows: usize, d: usize, eps: f32) -> GpuResult<()> {
        let (name, threads) = norm_kernel(rms, self.dt(), d);
        let args = Args::new().ptr(x).ptr(w).ptr(b).ptr(out).ptr(xout).ptr(xraw).i32(d as i32).f32(eps);
        self.launch(&name, (rows as u32, 1, 1), threads, args)
    }

    /// `out` 16-bit `[rows, d]` = RMSNorm of `x` f32 `[rows, d]` with weight `g` and `eps` (the engine's norm kernel).
    pub fn rms_half(&self, x: CUdeviceptr, g: CUdeviceptr, out: CUdeviceptr, rows: usize, d: usize, eps: f32) -> GpuResult<()> {
        self.norm_launch(true, g, 0, x, out, 0, 0, rows, d, eps)
    }

    /// `out` 16-bit `[n]` = `x` f32 `[n]` rounded.
    pub fn to_half(&self, x: CUdeviceptr, out: CUdeviceptr, n: usize) -> GpuResult<()> {
        let args = Args::new().ptr(x).ptr(out).i64(n as i64);
        self.launch(&self.kname("to_half"), ((n.div_ceil(256)).clamp(1, 65_535) as u32, 1, 1), 256, args)
    }

    /// Attention key splits for `rows` queries reaching `len` positions: enough (token, head, split) blocks to
    /// fill the GPU at decode, but at least `attn_keys` keys per split; 1 (no combine pass) for prefill and short
    /// contexts.
    fn splits(&self, rows: usize, len: usize) -> usize {
        if rows > GEMV_MAX_ROWS {
            return 1;
        }
        let blocks = rows * self.cfg.heads;
        let occ = (2 * self.gpu.sms as usize).div_ceil(blocks);
        occ.min(len.div_ceil(self.attn_keys)).clamp(1, MAX_SPLITS)
    }

    /// The transformer over `batch` rows of `seq` tokens already in `tok`, after `state[0]` cached positions:
    /// appends to the cache and leaves the final hidden states (16-bit, `[rows, E]`) in `fin`.
    fn forward(&mut self, batch: usize, seq: usize) -> GpuResult<()> {
        let rows = batch * seq;
        self.one_seq = batch == 1;
        let cfg = self.cfg.clone();
        let (d, e, f, hd) = (cfg.hidden, cfg.embed_dim, cfg.ffn, cfg.head_dim);
        let (h_, kv) = (cfg.heads, cfg.kv_heads);
        let qkv_n = (h_ + 2 * kv) * hd;
        let opt = cfg.family == Family::Opt;
        let pre = !opt || cfg.norm_before;
        let s = self.scratch.as_ref().ok_or_else(|| GpuError::new("internal: no scratch"))?;
        let (x, h, qkv, att, part, y, act, fin) = (s.x.ptr, s.h.ptr, s.qkv.ptr, s.att.ptr, s.part.ptr, s.y.ptr, s.act.ptr, s.fin.ptr);
        let (act32, att32) = (s.act32.ptr, s.att32.ptr);
        let cache = self.cache.as_ref().ok_or_else(|| GpuError::new("internal: no cache"))?;
        let cap = cache.cap;
        let kc: Vec<CUdeviceptr> = cache.k.iter().map(|b| b.ptr).collect();
        let vc: Vec<CUdeviceptr> = cache.v.iter().map(|b| b.ptr).collect();
        let pc: Vec<CUdeviceptr> = cache.present.iter().map(|b| b.ptr).collect();
        // Attention reads the presence flags only while a plan that skips key/value heads is set (dense passes of
        // such a plan too: an absent entry stays absent).
        let skips = self.heads.as_ref().is_some_and(|h| h.kv_kept);
        let (tok, state) = (self.tok.ptr, self.state.ptr);
        let emb_threads = (e.max(d).div_ceil(32) * 32).clamp(32, 1024) as u32;

        self.class(Class::Embed)?;
        let w = &self.w;
        if let Some(pin) = &w.project_in {
            let args = Args::new().ptr(tok).ptr(w.embed.ptr).ptr(0).ptr(0).ptr(h).ptr(state).i32(seq as i32).i32(e as i32).i32(2);
            self.launch(&self.kname("embed"), (rows as u32, 1, 1), emb_threads, args)?;
            self.linear(pin.ptr, None, h, x, rows, d, e, Epi::Store, y)?;
            if let Some(p) = &w.positions {
                let args = Args::new().ptr(x).ptr(p.ptr).ptr(state).i32(seq as i32).i32(d as i32).i32(2);
                self.launch(&self.kname("add_positions"), (rows as u32, 1, 1), emb_threads, args)?;
            }
        } else {
            let pos = w.positions.as_ref().map_or(0, |p| p.ptr);
            let args = Args::new().ptr(tok).ptr(w.embed.ptr).ptr(pos).ptr(x).ptr(0).ptr(state).i32(seq as i32).i32(d as i32).i32(2);
            self.launch(&self.kname("embed"), (rows as u32, 1, 1), emb_threads, args)?;
        }
        if let Some(sp) = self.sparse_active() {
            sp.zero(self, rows)?;
        }
        let splits = self.splits(rows, self.len + seq);
        let scale = 1.0 / (hd as f32).sqrt();
        for l in 0..cfg.layers {
            if let Some(hs) = self.heads_on() {
                hs.join(self)?;
            }
            // The look-ahead MLP selection forked before the norm, reading x itself (`MlpAhead::early`).
            let early_sel = match self.sparse_active() {
                Some(sp) if sp.forks_early(l, rows) => sp.fork_ahead(self, l, x, rows)?,
                _ => false,
            };
            let lw = &self.w.layers[l];
            // Pre-norm layers normalise inside the projection; post-LN layers project x itself.
            let fused = pre && (self.fuse_norm || rows > GEMV_MAX_ROWS);
            let attn_in = fused.then(|| NormIn { x, g: lw.attn_norm.ptr, gb: lw.attn_norm_b.as_ref().map_or(0, |b| b.ptr), tmp: h });
            // The block input's copy, where the head look-ahead forks at this layer or the MLP predictor reads it
            // (then the heads' copy serves both); the norm writes it as it reads x.
            let mlp_block = self.sparse_active().filter(|sp| sp.reads_block(l)).and_then(|sp| sp.ahead.as_ref()).map(|a| a.snap[0].ptr);
            let heads_snap = self.heads_on().and_then(|hs| hs.snapshot(l));
            // Under `prev` predictors, the copy of x the next layer's MLP selection reads.
            let prev_own = self.sparse_active().and_then(|sp| sp.prev_copy(l, rows, heads_snap.is_some()));
            let snap = heads_snap.or(mlp_block).or(prev_own);
            let copied = pre && !fused;
            if !pre {
                self.class(Class::Norm)?;
                self.to_half(x, h, rows * d)?;
            } else if !fused {
                self.class(Class::Norm)?;
                let lw = &self.w.layers[l];
                self.norm_copy(&lw.attn_norm, lw.attn_norm_b.as_ref(), x, h, 0, snap.unwrap_or(0), rows)?;
            }
            self.class(Class::Qkv)?;
            if let Some(hs) = self.heads_on() {
                hs.select(self, l, x, rows, copied)?;
            }
            // The MLP's own copy, where the norm did not write it (a `block` predictor reads the heads' copy instead
            // where there is one).
            let own = mlp_block.filter(|_| heads_snap.is_none()).or(prev_own);
            if let Some(own) = own.filter(|&own| !(copied && snap == Some(own))) {
                self.gpu.copy(own, x, rows * d * 4)?;
            }
            // The look-ahead MLP selection from the block input, on the side stream beside the attention.
            let pred_in = match (self.sparse_active(), mlp_block.and(snap)) {
                _ if early_sel => PredIn { x, selected: true },
                (Some(sp), Some(src)) => PredIn { x: src, selected: sp.fork_ahead(self, l, src, rows)? },
                // `prev` predictors: the next layer's selection forked from this layer's copy.
                (Some(sp), None) => PredIn { x: sp.prev_src(l).unwrap_or(x), selected: sp.fork_prev(self, l, heads_snap.or(prev_own), rows)? },
                _ => PredIn { x, selected: false },
            };
            if let Some(hs) = self.heads_at(l) {
                let input = |r0: usize| match attn_in {
                    Some(m) => In::Norm(NormIn { x: m.x + (r0 * d * 4) as u64, ..m }),
                    None => In::Half(h + (r0 * d * 2) as u64),
                };
                hs.qkv(self, l, rows, input, qkv)?;
            } else {
                let lw = &self.w.layers[l];
                self.linear_in(lw.qkv.ptr, lw.qkv_b.as_ref().map(|b| b.ptr), h, attn_in, qkv, rows, qkv_n, d, Epi::Store, y)?;
            }
            self.class(Class::Attention)?;
            let rope = i32::from(cfg.family == Family::Llama);
            let rope_hkeep = self.heads_at(l).filter(|hs| hs.kv_kept).map_or(0, |hs| hs.keep_of(self, l));
            // Decode (one token a row): RoPE and the cache write inside the attention kernel (`rope_fuse`).
            let fold = self.rope_fuse && seq == 1 && rows <= GEMV_MAX_ROWS;
            let a32 = self.f32_att(l, rows);
            if !fold {
                let args = Args::new()
                    .ptr(qkv)
                    .ptr(kc[l])
                    .ptr(vc[l])
                    .ptr(state)
                    .i32(seq as i32)
                    .i32(h_ as i32)
                    .i32(kv as i32)
                    .i32(hd as i32)
                    .i32(cap as i32)
                    .f32(cfg.rope_theta as f32)
                    .i32(rope)
                    .ptr(rope_hkeep)
                    .ptr(pc[l]);
                let rope_threads = ((hd / 2).div_ceil(32) * 32).clamp(32, 128) as u32;
                self.launch(&self.kname("rope_kv"), (rows as u32, (h_ + kv) as u32, 1), rope_threads, args)?;
            }
            let args = Args::new()
                .ptr(qkv)
                .ptr(kc[l])
                .ptr(vc[l])
                .ptr(part)
                .ptr(state)
                .i32(seq as i32)
                .i32(h_ as i32)
                .i32(kv as i32)
                .i32(hd as i32)
                .i32(cap as i32)
                .i32(splits as i32)
                .f32(scale)
                .ptr(if splits == 1 && !a32 { att } else { 0 })
                .ptr(self.heads_at(l).map_or(0, |hs| hs.keep_of(self, l)))
                .ptr(if skips { pc[l] } else { 0 });
            // The out-projection after the attention writes x: an early predictor must have read it.
            if let Some(sp) = self.sparse_active() {
                sp.wait_read(self)?;
            }
            if fold {
                let args = args.f32(cfg.rope_theta as f32).i32(rope).ptr(rope_hkeep).ptr(pc[l]);
                self.launch(&format!("attn_split_rope_{}_h{hd}", self.dt().name()), ((rows * h_) as u32, splits as u32, 1), 128, args)?;
            } else {
                self.launch(&format!("attn_split_{}_h{hd}", self.dt().name()), ((rows * h_) as u32, splits as u32, 1), 128, args)?;
            }
            // With the output kept in f32 and one split, the partial goes straight to the out-projection, which
            // normalises it as it stages it.
            let fold_comb = self.heads_at(l).is_none() && (self.folds_combine(rows, splits) || (a32 && splits == 1));
            if splits > 1 && !fold_comb {
                let args = Args::new().ptr(part).ptr(if a32 { att32 } else { att }).i32(hd as i32).i32(splits as i32).i32(i32::from(a32));
                self.launch(&self.kname("attn_combine"), ((rows * h_) as u32, 1, 1), hd as u32, args)?;
            }
            self.class(Class::OutProj)?;
            if let Some(hs) = self.heads_at(l) {
                hs.out_proj(self, l, rows, att, x)?;
            } else if fold_comb {
                let lw = &self.w.layers[l];
                self.gemv_comb(lw.o.ptr, lw.o_b.as_ref().map(|b| b.ptr), part, x, d, h_ * hd, splits, hd, !a32)?;
            } else if a32 {
                let lw = &self.w.layers[l];
                self.linear_in(lw.o.ptr, lw.o_b.as_ref().map(|b| b.ptr), 0, Some(NormIn::raw(att32)), x, rows, d, h_ * hd, Epi::Acc, y)?;
            } else {
                let lw = &self.w.layers[l];
                self.linear(lw.o.ptr, lw.o_b.as_ref().map(|b| b.ptr), att, x, rows, d, h_ * hd, Epi::Acc, y)?;
            }
            let lw = &self.w.layers[l];
            let mlp_in = fused.then(|| NormIn { x, g: lw.mlp_norm.ptr, gb: lw.mlp_norm_b.as_ref().map_or(0, |b| b.ptr), tmp: h });
            if pre && !fused {
                self.class(Class::Norm)?;
                let lw = &self.w.layers[l];
                self.norm(&lw.mlp_norm, lw.mlp_norm_b.as_ref(), x, h, 0, rows)?;
            }
            if !pre {
                // Post-LN: x = LN(x + attn), and the MLP reads it.
                self.class(Class::Norm)?;
                let lw = &self.w.layers[l];
                self.norm(&lw.attn_norm, lw.attn_norm_b.as_ref(), x, h, x, rows)?;
            }
            self.class(Class::Mlp)?;
            // The MLP waits for its look-ahead selection only (a mark of the side stream's work up to it), so the
            // head look-ahead forked next is not waited for here.
            if let Some(sp) = self.sparse_active() {
                sp.join_ahead(self, l)?;
            }
            if let Some(hs) = self.heads_on() {
                hs.fork_next(self, l, rows)?;
            }
            if let Some((sp, rule)) = self.sparse_active().and_then(|sp| sp.rules[l].map(|r| (sp, r))) {
                let input = |r0: usize| match mlp_in {
                    Some(m) => In::Norm(NormIn { x: m.x + (r0 * d * 4) as u64, ..m }),
                    None => In::Half(h + (r0 * d * 2) as u64),
                };
                sparse_mlp(self, sp, l, rule, rows, input, x, pred_in, y, act)?;
            } else {
                let lw = &self.w.layers[l];
                if rows == 1 && mlp_in.is_none() && !self.down_t.is_empty() {
                    // One row, one launch: each neuron's activation goes straight into its down row's products.
                    let glu = !opt;
                    self.mlp_fused(lw.up.ptr, lw.up_b.as_ref().map(|b| b.ptr), self.down_t[l].ptr, lw.down_b.as_ref().map(|b| b.ptr), h, x, f, d, d, glu, self.mlpf_warps)?;
                } else if self.f32_acts && rows == 1 {
                    // One row: the hidden stays in f32 between the two products.
                    let epi = if opt { Epi::Relu32 } else { Epi::Glu32 };
                    self.linear_in(lw.up.ptr, lw.up_b.as_ref().map(|b| b.ptr), h, mlp_in, act32, rows, f, d, epi, y)?;
                    self.linear_in(lw.down.ptr, lw.down_b.as_ref().map(|b| b.ptr), 0, Some(NormIn::raw(act32)), x, rows, d, f, Epi::Acc, y)?;
                } else {
                    let epi = if opt { Epi::Relu } else { Epi::Glu };
                    self.linear_in(lw.up.ptr, lw.up_b.as_ref().map(|b| b.ptr), h, mlp_in, act, rows, f, d, epi, y)?;
                    self.linear(lw.down.ptr, lw.down_b.as_ref().map(|b| b.ptr), act, x, rows, d, f, Epi::Acc, y)?;
                }
            }
            if !pre {
                self.class(Class::Norm)?;
                let lw = &self.w.layers[l];
                self.norm(&lw.mlp_norm, lw.mlp_norm_b.as_ref(), x, h, x, rows)?;
            }
        }
        if let Some(hs) = self.heads_on() {
            hs.join(self)?; // nothing is pending after the last layer; kept for the capture's sake
        }
        self.class(Class::Norm)?;
        let w = &self.w;
        let hidden = match &w.final_norm {
            Some(fw) => {
                self.norm(fw, w.final_norm_b.as_ref(), x, h, 0, rows)?;
                h
            }
            None if pre => {
                self.to_half(x, h, rows * d)?;
                h
            }
            // Post-LN without a final norm: h already holds the last layer's normed output.
            None => h,
        };
        match &w.project_out {
            Some(po) => {
                self.linear(po.ptr, None, hidden, y, rows, e, d, Epi::Store, 0)?;
                self.to_half(y, fin, rows * e)?;
            }
            None => self.gpu.copy(fin, hidden, rows * e * 2)?,
        }
        Ok(())
    }

    fn set_inputs(&mut self, tokens: &[i32], past: usize) -> GpuResult<()> {
        self.gpu.upload(&self.tok, 0, tokens)?;
        self.gpu.upload(&self.state, 0, &[past as i32])
    }

    fn ensure_logits(&mut self, rows: usize) -> GpuResult<CUdeviceptr> {
        if self.logits.is_none() || self.logits_rows < rows {
            self.graphs.clear();
            self.logits = None;
            let r = rows.max(GEMV_MAX_ROWS);
            self.logits = Some(self.gpu.alloc(r * self.cfg.vocab_size * 4)?);
            self.logits_rows = r;
        }
        Ok(self.logits.as_ref().map_or(0, |b| b.ptr))
    }

    fn head_ptr(&self) -> CUdeviceptr {
        self.w.lm_head.as_ref().map_or(self.w.embed.ptr, |b| b.ptr)
    }

    /// Logits f32 `[rows, V]` of `rows` 16-bit hidden rows at `src`.
    fn head(&mut self, src: CUdeviceptr, rows: usize) -> GpuResult<CUdeviceptr> {
        let out = self.ensure_logits(rows)?;
        self.class(Class::Head)?;
        let (v, e) = (self.cfg.vocab_size, self.cfg.embed_dim);
        let y = self.scratch.as_ref().map_or(0, |s| s.y.ptr);
        self.linear(self.head_ptr(), None, src, out, rows, v, e, Epi::Store, y)?;
        Ok(out)
    }

    fn argmax_rows(&self, logits: CUdeviceptr, rows: usize, targets: CUdeviceptr, lp: CUdeviceptr, am: CUdeviceptr) -> GpuResult<()> {
        let args = Args::new().ptr(logits).i32(self.cfg.vocab_size as i32).ptr(targets).ptr(lp).ptr(am);
        self.launch("row_argmax_logprob", (rows as u32, 1, 1), 1024, args)
    }

    /// Run `batch` rows of `seq` tokens (row-major ids) after the cached positions.
    pub fn prefill(&mut self, ids: &[i32], batch: usize, seq: usize, lens: Vec<usize>) -> GpuResult<()> {
        self.gpu.bind()?;
        let rows = batch * seq;
        self.reserve(batch, rows, self.len + seq)?;
        if let Some(c) = &self.cache {
            if c.rows < batch {
                return Err(GpuError::new("internal: cache rows"));
            }
        }
        self.set_inputs(ids, self.len)?;
        if self.prefill_graphs && rows <= GEMV_MAX_ROWS && self.profile.is_none() {
            // The forward reads its positions from `state`, so one graph serves every prefill of this shape.
            let key = (batch, seq, self.splits(rows, self.len + seq), self.sparse_active().is_some());
            self.replay_or_capture(key, |e| e.forward(batch, seq))?;
        } else {
            self.forward(batch, seq)?;
            self.end_profile()?;
        }
        self.len += seq;
        self.add_stats(batch, seq, &lens)?;
        self.last = Some(Last { rows: batch, seq, lens, step_logits: false });
        Ok(())
    }

    /// One token per row through the captured graph of this batch size (captured on first use): forward, head
    /// and argmax, which lands in `tok` for the next step.
    pub fn step(&mut self, ids: Option<&[i32]>, batch: usize) -> GpuResult<()> {
        self.gpu.bind()?;
        self.reserve(batch, batch, self.len + 1)?;
        self.ensure_logits(batch)?;
        if let Some(ids) = ids {
            self.gpu.upload(&self.tok, 0, ids)?;
        }
        self.gpu.upload(&self.state, 0, &[self.len as i32])?;
        if self.profile.is_some() {
            self.step_body(batch)?;
            self.end_profile()?;
        } else {
            // One graph per batch size and attention split count (which follows the context length).
            let key = (batch, 0, self.splits(batch, self.len + 1), self.sparse_active().is_some());
            self.replay_or_capture(key, |e| e.step_body(batch))?;
        }
        self.len += 1;
        self.add_stats(batch, 1, &vec![1; batch])?;
        self.last = Some(Last { rows: batch, seq: 1, lens: vec![1; batch], step_logits: true });
        Ok(())
    }

    /// Replay the graph of `key`, capturing `body` into it first if there is none.
    fn replay_or_capture(&mut self, key: (usize, usize, usize, bool), body: impl FnOnce(&mut Self) -> GpuResult<()>) -> GpuResult<()> {
        if !self.graphs.contains_key(&key) {
            self.gpu.sync()?;
            self.gpu.begin_capture()?;
            let r = body(self);
            let graph = self.gpu.end_capture();
            r?;
            self.graphs.insert(key, graph?);
        }
        let g = self.graphs.get(&key).ok_or_else(|| GpuError::new("internal: graph"))?;
        self.gpu.replay(g)
    }

    /// The decode step of `batch` rows at the current position, captured into a graph of its own (not kept by the
    /// engine, and the position not advanced): `bench --kernels` times prefixes of it.
    pub(super) fn capture_step(&mut self, batch: usize) -> GpuResult<super::gpu::Graph> {
        self.gpu.bind()?;
        self.reserve(batch, batch, self.len + 1)?;
        self.ensure_logits(batch)?;
        self.gpu.upload(&self.state, 0, &[self.len as i32])?;
        self.gpu.sync()?;
        self.gpu.begin_capture()?;
        let body = self.step_body(batch);
        let graph = self.gpu.end_capture();
        body?;
        graph
    }

    fn step_body(&mut self, batch: usize) -> GpuResult<()> {
        self.forward(batch, 1)?;
        let fin = self.scratch.as_ref().map_or(0, |s| s.fin.ptr);
        let logits = self.head(fin, batch)?;
        self.argmax_rows(logits, batch, 0, 0, self.tok.ptr)
    }

    /// The argmax of each row's last real position (the captured step's own, or computed now).
    pub fn argmax(&mut self) -> GpuResult<Vec<u32>> {
        let last = self.last.clone().ok_or_else(|| GpuError::new("no forward has run since the last reset"))?;
        let mut out = vec![0i32; last.rows];
        if last.step_logits {
            self.gpu.download(self.tok.ptr, &mut out)?;
        } else {
            let logits = self.last_logits(&last)?;
            self.argmax_rows(logits, last.rows, 0, 0, self.small.ptr)?;
            self.gpu.download(self.small.ptr, &mut out)?;
        }
        Ok(out.into_iter().map(|v| v as u32).collect())
    }

    fn last_logits(&mut self, last: &Last) -> GpuResult<CUdeviceptr> {
        if last.step_logits {
            return Ok(self.logits.as_ref().map_or(0, |b| b.ptr));
        }
        let idx: Vec<i32> = last.lens.iter().enumerate().map(|(r, &n)| (r * last.seq + n.max(1) - 1) as i32).collect();
        self.gpu.upload(&self.small, 0, &idx)?;
        let fin = self.scratch.as_ref().map_or(0, |s| s.fin.ptr);
        let e = self.cfg.embed_dim;
        // Gather into the projection-input buffer (free after the forward), then the head.
        let tmp = self.scratch.as_ref().map_or(0, |s| s.h.ptr);
        let args = Args::new().ptr(fin).ptr(self.small.ptr).ptr(tmp).i32(e as i32);
        self.launch("gather_rows", (last.rows as u32, 1, 1), 256, args)?;
        self.head(tmp, last.rows)
    }

    /// Logits `[rows][V]` at each row's last real position.
    pub fn logits(&mut self) -> GpuResult<Vec<Vec<f32>>> {
        let last = self.last.clone().ok_or_else(|| GpuError::new("no forward has run since the last reset"))?;
        let p = self.last_logits(&last)?;
        let v = self.cfg.vocab_size;
        let mut flat = vec![0f32; last.rows * v];
        self.gpu.download(p, &mut flat)?;
        Ok(flat.chunks(v).map(|c| c.to_vec()).collect())
    }

    /// Logits `[positions][V]` of row 0 of the last forward.
    pub fn position_logits(&mut self) -> GpuResult<Vec<Vec<f32>>> {
        let last = self.last.clone().ok_or_else(|| GpuError::new("no forward has run since the last reset"))?;
        if last.step_logits {
            return Ok(self.logits()?.into_iter().take(1).collect());
        }
        let fin = self.scratch.as_ref().map_or(0, |s| s.fin.ptr);
        let p = self.head(fin, last.seq)?;
        let v = self.cfg.vocab_size;
        let mut flat = vec![0f32; last.seq * v];
        self.gpu.download(p, &mut flat)?;
        Ok(flat.chunks(v).map(<[f32]>::to_vec).collect())
    }

    /// (log-prob, argmax) of `targets[r][p]` at every position `p` of the last forward's row `r`.
    pub fn score(&mut self, targets: &[Vec<u32>]) -> GpuResult<Vec<Vec<(f32, u32)>>> {
        let last = self.last.clone().ok_or_else(|| GpuError::new("no forward has run since the last reset"))?;
        // A captured step's hidden rows are in `fin` too: scored like a prefill's.
        let rows = last.rows * last.seq;
        let fin = self.scratch.as_ref().map_or(0, |s| s.fin.ptr);
        let e = self.cfg.embed_dim;
        let mut tgt = vec![0i32; rows];
        for (r, t) in targets.iter().enumerate() {
            for (p, &id) in t.iter().enumerate() {
                tgt[r * last.seq + p] = id as i32;
            }
        }
        let mut lp = vec![0f32; rows];
        let mut am = vec![0i32; rows];
        // Chunks of rows whose logits fit a bounded buffer.
        let chunk = (256usize << 20) / (self.cfg.vocab_size * 4);
        let chunk = chunk.clamp(GEMV_MAX_ROWS, 4096);
        if self.score_bufs.is_none() || self.score_rows < rows {
            let n = rows.next_power_of_two().max(GEMV_MAX_ROWS);
            self.score_bufs = None;
            self.score_bufs = Some([self.gpu.alloc(n * 4)?, self.gpu.alloc(n * 4)?, self.gpu.alloc(n * 4)?]);
            self.score_rows = n;
        }
        let bufs = self.score_bufs.as_ref().ok_or_else(|| GpuError::new("internal: score buffers"))?;
        self.gpu.upload(&bufs[0], 0, &tgt)?;
        let [tbuf, lbuf, abuf] = [bufs[0].ptr, bufs[1].ptr, bufs[2].ptr];
        let mut r0 = 0;
        while r0 < rows {
            let n = (rows - r0).min(chunk);
            let logits = self.head(fin + (r0 * e * 2) as u64, n)?;
            self.argmax_rows(logits, n, tbuf + (r0 * 4) as u64, lbuf + (r0 * 4) as u64, abuf + (r0 * 4) as u64)?;
            r0 += n;
        }
        self.gpu.download(lbuf, &mut lp)?;
        self.gpu.download(abuf, &mut am)?;
        Ok(targets
            .iter()
            .enumerate()
            .map(|(r, t)| (0..t.len()).map(|p| (lp[r * last.seq + p], am[r * last.seq + p] as u32)).collect())
            .collect())
    }

    pub fn reset(&mut self) {
        self.len = 0;
        self.last = None;
    }

    pub fn truncate(&mut self, len: usize) -> GpuResult<()> {
        if len > self.len {
            return Err(GpuError(format!("cannot truncate a cache of {} positions to {len}", self.len)));
        }
        self.len = len;
        self.last = None;
        Ok(())
    }

    /// Repeat row 0 of the cache into rows 1..n.
    pub fn fork(&mut self, n: usize) -> GpuResult<()> {
        self.gpu.bind()?;
        self.reserve(n, GEMV_MAX_ROWS, self.len.max(1))?;
        let c = self.cache.as_ref().ok_or_else(|| GpuError::new("internal: no cache"))?;
        let row = self.cfg.kv_heads * c.cap * self.cfg.head_dim * 2;
        let prow = self.cfg.kv_heads * c.cap;
        for l in 0..self.cfg.layers {
            for r in 1..n {
                self.gpu.copy(c.k[l].ptr + (r * row) as u64, c.k[l].ptr, row)?;
                self.gpu.copy(c.v[l].ptr + (r * row) as u64, c.v[l].ptr, row)?;
                self.gpu.copy(c.present[l].ptr + (r * prow) as u64, c.present[l].ptr, prow)?;
            }
        }
        self.last = None;
        Ok(())
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

    /// Upload random ids, for `bench`.
    pub fn put_tokens(&mut self, ids: &[i32]) -> GpuResult<()> {
        self.reserve(1, ids.len(), 1)?;
        self.gpu.upload(&self.tok, 0, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::{mlpf_busiest, mlpf_pick, split_for};

    #[test]
    fn fused_mlp_warps_follow_the_busiest_multiprocessor() {
        // Worked by hand, 132 multiprocessors. Llama-2-7B, 11,008 neurons: 8 warps, 2 blocks a multiprocessor,
        // 1,376 chunks on 264 blocks = 5 each and 56 with 6, so at most 6 + 5 chunks of 8 = 88 neurons; 16 warps,
        // 1 block, 688 chunks on 132 = 5 each and 28 with 6: 96.
        assert_eq!(mlpf_busiest(11008, 8, 264, 132), 88);
        assert_eq!(mlpf_busiest(11008, 16, 132, 132), 96);
        assert_eq!(mlpf_pick(11008, 132, 2, 1), 8);
        // Mistral-7B, 14,336: 1,792 chunks on 264 = 6 each and 208 with 7, so 76 multiprocessors hold 7 + 7 = 14
        // chunks, 112 neurons; 896 on 132 = 6 and 104 with 7: 112. A tie takes 16.
        assert_eq!(mlpf_busiest(14336, 8, 264, 132), 112);
        assert_eq!(mlpf_busiest(14336, 16, 132, 132), 112);
        assert_eq!(mlpf_pick(14336, 132, 2, 1), 16);
        // OPT-6.7B, 16,384: 2,048 chunks on 264 = 7 each and 200 with 8, so 68 multiprocessors hold 8 + 8 = 16
        // chunks, 128 neurons; 1,024 on 132 = 7 and 100 with 8: 128. 16.
        assert_eq!(mlpf_busiest(16384, 8, 264, 132), 128);
        assert_eq!(mlpf_busiest(16384, 16, 132, 132), 128);
        assert_eq!(mlpf_pick(16384, 132, 2, 1), 16);
        // Llama-2-13B, 13,824, and OPT-13B, 20,480: the 8-warp kernel holds 1 block (8 warps) a multiprocessor,
        // fewer than 16, so 16 even where 8 would put fewer neurons on the busiest one.
        assert_eq!(mlpf_pick(13824, 132, 1, 1), 16);
        assert_eq!(mlpf_pick(20480, 132, 1, 1), 16);
        assert_eq!(mlpf_pick(11008, 132, 1, 1), 16);
        // Fewer chunks than blocks: 100 neurons, 13 chunks of 8 on 13 blocks, one a multiprocessor: 8.
        assert_eq!(mlpf_busiest(100, 8, 264, 132), 8);
    }

    #[test]
    fn split_balances_rows_just_above_a_multiple_of_the_warps() {
        // Worked by hand: 5,120 rows on 4,224 warps take 2 rows' time at 1 warp a row, 3/2 at 2, 5/4 at 4.
        assert_eq!(split_for(5120, 5120, 4224), 4);
        // 4,096 rows: one round at 1 warp a row; 12,288: 3 rows' time at every split; no split.
        assert_eq!(split_for(4096, 4096, 4224), 1);
        assert_eq!(split_for(12288, 4096, 4224), 1);
        // 15,360 rows (13B q/k/v): 4 at 1, 8/2 = 4 at 2, 15/4 = 3.75 at 4 (6% less): under 10%.
        assert_eq!(split_for(15360, 5120, 4224), 1);
        // 11,008 GLU rows on 2,112 warps: 6 at 1, 11/2 = 5.5 at 2 (8% less), 21/4 = 5.25 at 4: under 10%.
        assert_eq!(split_for(11008, 4096, 2112), 1);
        // 7,000 rows on 4,224 warps: 2 at 1, 4/2 = 2 at 2, 7/4 = 1.75 at 4 (12.5% less).
        assert_eq!(split_for(7000, 4096, 4224), 4);
        // 13,824 on 2,112: 7 at 1, 7 at 2, 27/4 = 6.75 at 4 (3.6% less): not worth splitting.
        assert_eq!(split_for(13824, 5120, 2112), 1);
        // Fewer rows than warps but short rows (SmolLM2's 576 x 576): a part would be under one round of loads.
        assert_eq!(split_for(576, 576, 4224), 1);
        // The same rows at width 2,048 may split in two, not four (1,024 a part at least).
        assert_eq!(split_for(576, 2048, 4224), 2);
    }
}
