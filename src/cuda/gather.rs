//! Kept sets on the device and the launches over them, which the sparse MLP ([`super::sparse`]), the head-sparse
//! attention ([`super::heads`]), the selection ([`super::select`]) and the predictors ([`super::predict`]) share:
//! - [`gather_up`]: the kept rows of fc1 (OPT, + bias + ReLU) or of gate and up together (SwiGLU), one warp per
//!   kept row (`gemv_gather_*`, kernels/gemv.cu), written compactly; [`gather_store`], [`gather_mul`] and
//!   [`cats_select`] its other epilogues; on the tensor cores past a few rows (`gemv_mma_*`, kernels/mma.cu);
//! - [`down_t`]: a down projection over the kept neurons, from its transposed copy `[F, D]` so that each kept
//!   neuron is one contiguous row, accumulated in f32 into the residual stream (`down_t_*`, kernels/sparse.cu);
//! - [`transpose`], and the row chunks ([`chunks`]) a forward's rows go through these kernels in.
//!
//! A kept set lives on the device (ids and their count), written by the selection that precedes it, so one captured
//! graph serves every token. At batch > 1 the set is the union over the rows: each kept row is read once for all.

use cudarc::driver::sys::CUdeviceptr;

use crate::config::Family;
use crate::launch::{k_of, GEMV_SMEM};

use super::gpu::{Args, GpuError, GpuResult};
use super::launcher::{Epi, Launcher, NormIn, GEMV_MAX_ROWS};

/// A kept set on the device: `idx` `[cap]` i32 neuron ids, `cnt` `[1]` i32 how many of them are valid (<= cap).
#[derive(Debug, Clone, Copy)]
pub struct Kept {
    pub idx: CUdeviceptr,
    pub cnt: CUdeviceptr,
    pub cap: usize,
    /// The set was complete before the launch ahead of the kernel that reads it (a kernel before that one wrote it,
    /// or the side stream's, joined): the reader loads it, and its first weight rows, before its programmatic wait.
    pub early: bool,
}

/// A sorted random subset of `0..f` of size `k` (kept sets for kernel checks and block timings).
pub fn random_kept(f: usize, k: usize, seed: u64) -> Vec<i32> {
    let mut r = crate::decode::SplitMix64(seed);
    let mut all: Vec<i32> = (0..f as i32).collect();
    for i in 0..k.min(f) {
        let j = i + (r.next_u64() % (f - i) as u64) as usize;
        all.swap(i, j);
    }
    let mut v = all[..k.min(f)].to_vec();
    v.sort_unstable();
    v
}

/// Warps per gather block: one warp per kept row, at least two blocks per multiprocessor when the rows allow,
/// 16 warps at most.
fn gather_threads(cap: usize, sms: usize) -> u32 {
    ((cap / (2 * sms.max(1))).clamp(1, 16) * 32) as u32
}

/// The input of a sparse projection: 16-bit rows, or the f32 residual stream normalised on the fly.
#[derive(Debug, Clone, Copy)]
pub enum In {
    Half(CUdeviceptr),
    Norm(NormIn),
}

/// One launch of a sparse GEMV kernel (`gemv_{kind}_{dt}_{epi}_b{rows}`, kernels/gemv.cu).
struct SparseGemv {
    kind: &'static str,
    epi: &'static str,
    w: CUdeviceptr,
    w2: CUdeviceptr,
    bias: CUdeviceptr,
    bias2: CUdeviceptr,
    input: In,
    out: CUdeviceptr,
    /// Output stride, and rows of `w` (CATS) or the capacity of the kept set (gather).
    n: usize,
    k: usize,
    rows: usize,
    idx: CUdeviceptr,
    cnt: CUdeviceptr,
    pre: CUdeviceptr,
    t: f32,
    tally: CUdeviceptr,
    /// Gathers: the kept set may be read before the programmatic wait ([`Kept::early`]).
    early: bool,
}

impl SparseGemv {
    /// The arguments every `gemv_{gather,cats,mma}_*` kernel starts with: weights, biases, the input rows `x`, the
    /// output and the shape.
    fn leading_args(&self, x: CUdeviceptr) -> Args {
        Args::new().ptr(self.w).ptr(self.w2).ptr(self.bias).ptr(self.bias2).ptr(x).ptr(self.out).i32(self.n as i32).i32(self.k as i32).i32(self.rows as i32)
    }
}

/// The sparse kernels take 1..=16 rows sharing one kept set.
fn check_rows(rows: usize) -> GpuResult<()> {
    if rows == 0 || rows > GEMV_MAX_ROWS {
        return Err(GpuError(format!("internal: the sparse MLP runs 1..={GEMV_MAX_ROWS} rows at a time, got {rows}")));
    }
    Ok(())
}

fn launch_sparse(e: &Launcher, l: SparseGemv) -> GpuResult<()> {
    check_rows(l.rows)?;
    if let (true, In::Half(x)) = (l.kind == "gather" && e.mma_rows > 0 && l.rows >= e.mma_rows && l.k % 32 == 0, l.input) {
        return launch_mma(e, &l, x);
    }
    let name = format!("gemv_{}_{}_{}_b{}", l.kind, e.dt().name(), l.epi, k_of(l.rows));
    let (x, xf, g, gb) = match l.input {
        In::Half(x) => (x, 0, 0, 0),
        In::Norm(m) => (0, m.x, m.g, m.gb),
    };
    let staged = l.rows * l.k * 4;
    let stage = e.stage && l.k % 4 == 0 && staged <= GEMV_SMEM;
    let smem = if stage { staged } else { 0 };
    let f = if smem > 0 { e.k.get_smem(&name, GEMV_SMEM)? } else { e.k.get(&name)? };
    let threads = gather_threads(l.n, e.gpu.sms as usize);
    let mut args = l.leading_args(x)
        .ptr(xf)
        .ptr(g)
        .ptr(gb)
        .f32(e.cfg.norm_eps as f32)
        .i32(e.rms_arg(e.cfg.family == Family::Llama, stage && xf != 0))
        .i32(i32::from(stage))
        .ptr(l.idx)
        .ptr(l.cnt)
        .ptr(l.pre)
        .f32(l.t)
        .ptr(l.tally)
        .i32(i32::from(l.early && e.early_ids));
    let grid = (e.row_grid(f, l.n, threads, smem)?, 1, 1);
    e.gpu.launch(f, grid, threads, smem as u32, &mut args)
}

/// A gather on the tensor cores (`gemv_mma_{dt}_{epi}_n{1,2}`, kernels/mma.cu): 8 warps a block over 16 kept
/// rows at a time, blocks looping over the kept set.
fn launch_mma(e: &Launcher, l: &SparseGemv, x: CUdeviceptr) -> GpuResult<()> {
    let name = format!("gemv_mma_{}_{}_n{}", e.dt().name(), l.epi, l.rows.div_ceil(8));
    let f = e.k.get(&name)?;
    let threads = MMA_THREADS;
    let mut args = l.leading_args(x)
        .ptr(l.idx)
        .ptr(l.cnt)
        .ptr(l.pre)
        .i32(i32::from(l.early && e.early_ids));
    let grid = (e.block_grid(f, l.n.div_ceil(16), threads, 0)?, 1, 1);
    e.gpu.launch(f, grid, threads, 0, &mut args)
}

/// `out` f32 `[rows, n]` = `w` `[n, k]` times each 16-bit row of `x` `[rows, k]` (+ `bias`), on the tensor cores
/// (`gemv_mma_*` with no index list): for 3-16 rows where the CUDA-core GEMV is bound by its per-row work.
/// Whether it applies: [`mma_dense_fits`].
#[allow(clippy::too_many_arguments)]
pub fn mma_dense(e: &Launcher, w: CUdeviceptr, bias: Option<CUdeviceptr>, x: CUdeviceptr, out: CUdeviceptr, rows: usize, n: usize, k: usize) -> GpuResult<()> {
    check_rows(rows)?;
    let l = SparseGemv { kind: "gather", epi: "store", w, w2: 0, bias: bias.unwrap_or(0), bias2: 0, input: In::Half(x), out, n, k, rows, idx: 0, cnt: 0, pre: 0, t: 0.0, tally: 0, early: false };
    launch_mma(e, &l, x)
}

/// Whether [`mma_dense`] takes `rows` rows of width `k` on this engine (`DEJAVU_MMA_ROWS`).
pub fn mma_dense_fits(e: &Launcher, rows: usize, k: usize) -> bool {
    e.mma_rows > 0 && rows >= e.mma_rows && rows <= GEMV_MAX_ROWS && k % 32 == 0
}

/// Threads of a `gemv_mma_*` block (`MMA_WARPS` in kernels/mma.cu).
const MMA_THREADS: u32 = 256;

/// `out[b, s] = epi(W[kept s] . x_b)` for `s < cnt`, `b < rows`: OPT fc1 + bias + ReLU (`Epi::Relu`, `w` `[f, k]`,
/// `bias` `[f]`) or SwiGLU (`Epi::Glu`, `w` `[2f, k]` gate rows then up rows, `bias` `[2f]`). `out` is 16-bit
/// `[rows, kept.cap]` (columns at or past `cnt` are left as they were). With `flags` (f32 `[rows, kept.cap]`, 0 or
/// 1: whether row b keeps the unit of slot s) each output is multiplied by its row's flag.
#[allow(clippy::too_many_arguments)]
pub fn gather_up(e: &Launcher, w: CUdeviceptr, bias: Option<CUdeviceptr>, f: usize, input: In, kept: Kept, out: CUdeviceptr, rows: usize, k: usize, epi: Epi, flags: Option<CUdeviceptr>) -> GpuResult<()> {
    let glu = match epi {
        Epi::Glu => true,
        Epi::Relu => false,
        _ => return Err(GpuError::new("internal: gather_up takes the ReLU or SwiGLU epilogue")),
    };
    let (w2, bias2) = if glu { (w + (f * k * 2) as u64, bias.map_or(0, |b| b + (f * 2) as u64)) } else { (0, 0) };
    launch_sparse(
        e,
        SparseGemv { kind: "gather", epi: if glu { "glu" } else { "relu" }, w, w2, bias: bias.unwrap_or(0), bias2, input, out, n: kept.cap, k, rows, idx: kept.idx, cnt: kept.cnt, pre: flags.unwrap_or(0), t: 0.0, tally: 0, early: kept.early },
    )
}

/// CATS selection over every row of `w` `[f, k]` (+ `bias` `[f]`): `a = silu(w x + b)` (`silu`, the SwiGLU gate) or
/// `max(w x + b, 0)` (OPT fc1); a row is kept when `|a_b| >= t` for some `b < rows` and appended to the kept set
/// (`kept.cnt` must be zero before), with `out[b, s] = a_b` (0 where `|a_b| < t`): f32 for `silu`, the 16-bit hidden
/// values for ReLU. `kept.cap` must be `f`. The order of the kept rows is that of the warps' finishing. With `tally`
/// (i32 `[16, 8]`, zeroed), row b's kept count is added into `tally[b, 0..8)`.
#[allow(clippy::too_many_arguments)]
pub fn cats_select(e: &Launcher, w: CUdeviceptr, bias: Option<CUdeviceptr>, silu: bool, input: In, t: f32, kept: Kept, out: CUdeviceptr, rows: usize, k: usize, tally: CUdeviceptr) -> GpuResult<()> {
    launch_sparse(
        e,
        SparseGemv { kind: "cats", epi: if silu { "silu" } else { "relu" }, w, w2: 0, bias: bias.unwrap_or(0), bias2: 0, input, out, n: kept.cap, k, rows, idx: kept.idx, cnt: kept.cnt, pre: 0, t, tally, early: false },
    )
}

/// The kept weight rows of `w` (`[kept.cap, k]`, + `bias`) written at their own columns: `out[b, idx[s]] = W[idx[s]]
/// . x_b (+ bias)`, f32 `[rows, kept.cap]` (the other columns are left as they were).
#[allow(clippy::too_many_arguments)]
pub fn gather_store(e: &Launcher, w: CUdeviceptr, bias: Option<CUdeviceptr>, input: In, kept: Kept, out: CUdeviceptr, rows: usize, k: usize) -> GpuResult<()> {
    launch_sparse(
        e,
        SparseGemv { kind: "gather", epi: "store", w, w2: 0, bias: bias.unwrap_or(0), bias2: 0, input, out, n: kept.cap, k, rows, idx: kept.idx, cnt: kept.cnt, pre: 0, t: 0.0, tally: 0, early: kept.early },
    )
}

/// The SwiGLU up rows of the kept neurons times their gate factors: `out[b, s] = pre[b, s] * (up[idx[s]] . x_b)`,
/// `up` `[f, k]`, `pre` f32 `[rows, kept.cap]`, `out` 16-bit `[rows, kept.cap]`.
#[allow(clippy::too_many_arguments)]
pub fn gather_mul(e: &Launcher, up: CUdeviceptr, bias: Option<CUdeviceptr>, input: In, pre: CUdeviceptr, kept: Kept, out: CUdeviceptr, rows: usize, k: usize) -> GpuResult<()> {
    launch_sparse(
        e,
        SparseGemv { kind: "gather", epi: "mul", w: up, w2: 0, bias: bias.unwrap_or(0), bias2: 0, input, out, n: kept.cap, k, rows, idx: kept.idx, cnt: kept.cnt, pre, t: 0.0, tally: 0, early: kept.early },
    )
}

/// The most kept rows one `down_t` block takes (`DOWN_T_MAXR` in kernels/sparse.cu: their ids and activations are
/// staged in shared memory).
pub const DOWN_T_MAXR: usize = 128;

/// A `down_t` launch's shape: `tc` threads across column groups of 8 (the block's other 256 / tc threads are row
/// groups whose sums meet in shared memory), `tiles` column tiles, `r` kept rows a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownShape {
    pub tc: usize,
    pub tiles: usize,
    pub r: usize,
}

/// The `down_t` shape for width `d` and `cap` kept rows on `sms` multiprocessors. Each block adds its `d` sums into
/// the residual with atomics, so fewer, taller row chunks mean fewer atomics per weight byte (2 / r of the bytes
/// read) and fewer prologues: `tc` = 64 threads (1 KB of each row) where the width fills them, else 32; `r` = 16
/// rows per row group (two batches of loads in flight), halved while that leaves fewer than 2 blocks per
/// multiprocessor. Swept at sparse OPT-13B (H100, 2026-12-06, e2e ms/token): 16-32 rows per thread 4.27-4.35,
/// 8 rows 4.51, 4 rows 5.09; 64-128 rows (too few blocks) 4.55-5.26; the shape before this one 4.51.
/// `DEJAVU_DOWN_TC` (32, 64, 128 or 256) and `DEJAVU_DOWN_ROWS` override.
pub fn down_shape(d: usize, cap: usize, sms: usize) -> DownShape {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok()).filter(|&v| v > 0);
    let g = d / 8;
    let tc = match env("DEJAVU_DOWN_TC").filter(|t| [32, 64, 128, 256].contains(t)) {
        Some(t) => t,
        None if g % 64 == 0 || g >= 256 => 64,
        None => 32,
    };
    let rg = 256 / tc;
    let tiles = g.div_ceil(tc).max(1);
    let r = match env("DEJAVU_DOWN_ROWS") {
        Some(r) => r,
        None => {
            let mut r = (16 * rg).min(DOWN_T_MAXR);
            while r > rg && tiles * cap.div_ceil(r) < 2 * sms.max(1) {
                r /= 2;
            }
            r
        }
    };
    DownShape { tc, tiles, r: r.min(DOWN_T_MAXR) }
}

/// `out[b, :] += bias + sum_{s < cnt} act[b, s] * wt[idx[s], :]` for `b < rows`: the down projection over the kept
/// neurons. `wt` is the transposed down / fc2 `[F, d]`; `act` 16-bit `[rows, lda]` (the gather's output, `lda` =
/// its capacity); `out` the f32 residual stream `[rows, d]`. With `kept` None the first `n` rows of `wt` are used in
/// order (the dense product from the transposed copy). With `by_id`, `act` is laid out by unit id (`act[b, idx[s]]`,
/// the head-sparse out-projection reading the attention output in place).
#[allow(clippy::too_many_arguments)]
pub fn down_t(e: &Launcher, wt: CUdeviceptr, bias: Option<CUdeviceptr>, act: CUdeviceptr, lda: usize, kept: Option<Kept>, n: usize, out: CUdeviceptr, rows: usize, d: usize, by_id: bool) -> GpuResult<()> {
    if d % 8 != 0 {
        return Err(GpuError(format!("the sparse down projection needs a width that is a multiple of 8, got {d}")));
    }
    check_rows(rows)?;
    let cap = kept.map_or(n, |k| k.cap);
    if e.mma_rows > 0 && rows >= e.mma_rows && d % 64 == 0 {
        return down_mma(e, wt, bias, act, lda, kept, cap, out, rows, d, by_id);
    }
    let DownShape { tc, tiles, r } = down_shape(d, cap, e.gpu.sms as usize);
    let chunks = cap.div_ceil(r).max(1);
    let name = format!("down_t_{}{}_b{}", if by_id { "id_" } else { "" }, e.dt().name(), k_of(rows));
    let f = e.k.get(&name)?;
    let early = i32::from(kept.is_some_and(|k| k.early) && e.early_ids);
    let mut args = down_args(wt, bias, act, lda, kept, cap, out, d, rows).i32(r as i32).i32(tc as i32).i32(early);
    e.gpu.launch(f, (tiles as u32, chunks as u32, 1), 256, 0, &mut args)
}

/// [`down_t`] on the tensor cores (`down_mma_*`, kernels/mma.cu) for 3-16 rows: 64 columns a block, the kept set
/// split over enough blocks to give each multiprocessor about four.
#[allow(clippy::too_many_arguments)]
fn down_mma(e: &Launcher, wt: CUdeviceptr, bias: Option<CUdeviceptr>, act: CUdeviceptr, lda: usize, kept: Option<Kept>, cap: usize, out: CUdeviceptr, rows: usize, d: usize, by_id: bool) -> GpuResult<()> {
    let name = format!("down_mma_{}{}", if by_id { "id_" } else { "" }, e.dt().name());
    let f = e.k.get(&name)?;
    let tiles = d / 64;
    // Splits: ~4 blocks a multiprocessor, but at least two steps of 16 kept rows for each of a block's warps.
    let splits = (4 * e.gpu.sms as usize).div_ceil(tiles).clamp(1, cap.div_ceil(16 * DM_WARPS * 2).max(1));
    let early = i32::from(kept.is_some_and(|k| k.early) && e.early_ids);
    let mut args = down_args(wt, bias, act, lda, kept, cap, out, d, rows).i32(early);
    e.gpu.launch(f, (tiles as u32, splits as u32, 1), (32 * DM_WARPS) as u32, 0, &mut args)
}

/// The arguments `down_t_*` and `down_mma_*` share, in their order: weights, bias, activations and their stride,
/// the kept set and its capacity, the output, its width and the rows.
#[allow(clippy::too_many_arguments)]
fn down_args(wt: CUdeviceptr, bias: Option<CUdeviceptr>, act: CUdeviceptr, lda: usize, kept: Option<Kept>, cap: usize, out: CUdeviceptr, d: usize, rows: usize) -> Args {
    Args::new()
        .ptr(wt)
        .ptr(bias.unwrap_or(0))
        .ptr(act)
        .i32(lda as i32)
        .ptr(kept.map_or(0, |k| k.idx))
        .ptr(kept.map_or(0, |k| k.cnt))
        .i32(cap as i32)
        .ptr(out)
        .i32(d as i32)
        .i32(rows as i32)
}

/// Warps of a `down_mma_*` block (`DM_WARPS` in kernels/mma.cu).
const DM_WARPS: usize = 4;

/// `out [c, r] = in [r, c]` transposed, 16-bit.
pub fn transpose(e: &Launcher, input: CUdeviceptr, out: CUdeviceptr, r: usize, c: usize) -> GpuResult<()> {
    let f = e.k.get("transpose16")?;
    let mut args = Args::new().ptr(input).ptr(out).i32(r as i32).i32(c as i32);
    e.gpu.launch(f, (c.div_ceil(32) as u32, r.div_ceil(32) as u32, 1), 256, 0, &mut args)
}

/// Rows of one sparse MLP pass: the kernels take up to 16 rows sharing one kept set.
pub const CHUNK: usize = GEMV_MAX_ROWS;
/// Chunks one forward may run through the sparse MLP (8,192 rows; the counters are sized for this many).
pub const MAX_CHUNKS: usize = 512;

/// The chunks of at most [`CHUNK`] rows a forward of `rows` rows runs in: `(chunk, first row, rows)`; more than
/// [`MAX_CHUNKS`] is an error (the per-chunk state is sized for that many).
pub fn chunks(rows: usize, what: &str) -> GpuResult<impl Iterator<Item = (usize, usize, usize)>> {
    if rows > MAX_CHUNKS * CHUNK {
        return Err(GpuError(format!("a forward of {rows} rows is over {what}'s {} rows", MAX_CHUNKS * CHUNK)));
    }
    Ok((0..rows.div_ceil(CHUNK)).map(move |c| (c, c * CHUNK, (rows - c * CHUNK).min(CHUNK))))
}
