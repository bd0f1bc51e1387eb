//! The sparse MLP on the GPU: only the kept neurons' weights are read.
//! - [`gather_up`]: the kept rows of fc1 (OPT, + bias + ReLU) or of gate and up together (SwiGLU), one warp per
//!   kept row (`gemv_gather_*`, kernels/gemv.cu), written compactly;
//! - [`down_t`]: the down projection (fc2 / down) over the kept neurons, from its transposed copy `[F, D]` so that
//!   each kept neuron is one contiguous row, accumulated in f32 into the residual stream (`down_t_*`,
//!   kernels/sparse.cu).
//!
//! A kept set lives on the device (ids and their count), written by the selection that precedes it, so one captured
//! graph serves every token. At batch > 1 the set is the union over the rows: each kept row is read once for all.

use cudarc::driver::sys::CUdeviceptr;

use super::engine::{k_of, Engine, Epi, GEMV_MAX_ROWS, GEMV_SMEM};
use super::gpu::{Args, GpuError, GpuResult};

/// A kept set on the device: `idx` `[cap]` i32 neuron ids, `cnt` `[1]` i32 how many of them are valid (<= cap).
#[derive(Debug, Clone, Copy)]
pub struct Kept {
    pub idx: CUdeviceptr,
    pub cnt: CUdeviceptr,
    pub cap: usize,
}

/// Warps per gather block: one warp per kept row, at least two blocks per multiprocessor when the rows allow,
/// 16 warps at most.
fn gather_threads(cap: usize, sms: usize) -> u32 {
    ((cap / (2 * sms.max(1))).clamp(1, 16) * 32) as u32
}

/// `out[b, s] = epi(W[kept s] . x_b)` for `s < cnt`, `b < rows`: OPT fc1 + bias + ReLU (`Epi::Relu`, `w` `[f, k]`,
/// `bias` `[f]`) or SwiGLU (`Epi::Glu`, `w` `[2f, k]` gate rows then up rows, `bias` `[2f]`). `x` is 16-bit
/// `[rows, k]`; `out` 16-bit `[rows, kept.cap]` (columns at or past `cnt` are left as they were).
#[allow(clippy::too_many_arguments)]
pub fn gather_up(e: &Engine, w: CUdeviceptr, bias: Option<CUdeviceptr>, f: usize, x: CUdeviceptr, kept: Kept, out: CUdeviceptr, rows: usize, k: usize, epi: Epi) -> GpuResult<()> {
    if !matches!(epi, Epi::Relu | Epi::Glu) {
        return Err(GpuError::new("internal: gather_up takes the ReLU or SwiGLU epilogue"));
    }
    if rows == 0 || rows > GEMV_MAX_ROWS {
        return Err(GpuError(format!("internal: the sparse MLP runs 1..={GEMV_MAX_ROWS} rows at a time, got {rows}")));
    }
    let glu = epi == Epi::Glu;
    let (w2, b0, bias2) = match (glu, bias) {
        (true, b) => (w + (f * k * 2) as u64, b.unwrap_or(0), b.map_or(0, |b| b + (f * 2) as u64)),
        (false, b) => (0, b.unwrap_or(0), 0),
    };
    let nb = k_of(rows);
    let name = format!("gemv_gather_{}_{}_b{nb}", e.dt().name(), if glu { "glu" } else { "relu" });
    let staged = rows * k * 4;
    let stage = e.stage && k % 4 == 0 && staged <= GEMV_SMEM;
    let smem = if stage { staged } else { 0 };
    let f_ = if smem > 0 { e.k.get_smem(&name, GEMV_SMEM)? } else { e.k.get(&name)? };
    let threads = gather_threads(kept.cap, e.gpu.sms as usize);
    let mut args = Args::new()
        .ptr(w)
        .ptr(w2)
        .ptr(b0)
        .ptr(bias2)
        .ptr(x)
        .ptr(out)
        .i32(kept.cap as i32)
        .i32(k as i32)
        .i32(rows as i32)
        .ptr(0)
        .ptr(0)
        .ptr(0)
        .f32(0.0)
        .i32(0)
        .i32(i32::from(stage))
        .ptr(kept.idx)
        .ptr(kept.cnt);
    let grid = ((kept.cap as u32).div_ceil(threads / 32).max(1), 1, 1);
    e.gpu.launch(f_, grid, threads, smem as u32, &mut args)
}

/// Kept rows per `down_t` block (`DEJAVU_DOWN_ROWS`, else enough blocks for ~8 per multiprocessor, at least 4).
pub fn down_rows(cap: usize, tiles: usize, sms: usize) -> usize {
    if let Some(r) = std::env::var("DEJAVU_DOWN_ROWS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&r| r > 0) {
        return r;
    }
    (cap * tiles).div_ceil(8 * sms.max(1)).max(4)
}

/// `out[b, :] += bias + sum_{s < cnt} act[b, s] * wt[idx[s], :]` for `b < rows`: the down projection over the kept
/// neurons. `wt` is the transposed down / fc2 `[F, d]`; `act` 16-bit `[rows, lda]` (the gather's output, `lda` =
/// its capacity); `out` the f32 residual stream `[rows, d]`. With `kept` None the first `n` rows of `wt` are used in
/// order (the dense product from the transposed copy).
#[allow(clippy::too_many_arguments)]
pub fn down_t(e: &Engine, wt: CUdeviceptr, bias: Option<CUdeviceptr>, act: CUdeviceptr, lda: usize, kept: Option<Kept>, n: usize, out: CUdeviceptr, rows: usize, d: usize) -> GpuResult<()> {
    if d % 8 != 0 {
        return Err(GpuError(format!("the sparse down projection needs a width that is a multiple of 8, got {d}")));
    }
    if rows == 0 || rows > GEMV_MAX_ROWS {
        return Err(GpuError(format!("internal: the sparse MLP runs 1..={GEMV_MAX_ROWS} rows at a time, got {rows}")));
    }
    let cap = kept.map_or(n, |k| k.cap);
    let tc = (d / 8).div_ceil(32).clamp(1, 8) * 32;
    let rg = 256 / tc;
    let tiles = (d / 8).div_ceil(tc);
    let r = down_rows(cap, tiles, e.gpu.sms as usize);
    let chunks = cap.div_ceil(r).max(1);
    let name = format!("down_t_{}_b{}", e.dt().name(), k_of(rows));
    let f = e.k.get(&name)?;
    let mut args = Args::new()
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
        .i32(r as i32)
        .i32(tc as i32);
    e.gpu.launch(f, (tiles as u32, chunks as u32, 1), (tc * rg) as u32, 0, &mut args)
}
