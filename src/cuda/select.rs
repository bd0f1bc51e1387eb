//! Top-k selection and the low-bit score pass on the GPU (kernels/select.cu, kernels/qscore.cu): the kept sets of
//! the top-k MLP rules (`exactdown`, `qscore`) are chosen on the device with the host reference's rules
//! ([`crate::sparse::select`]: the k largest, ties to the lower index, NaN last), so one captured graph serves
//! every token and the kept sets can be compared with the CPU reference's one for one.

use cudarc::driver::sys::CUdeviceptr;

use crate::config::Family;
use crate::sparse::quant::{QMatrix, QScheme, QScoreCopies};

use super::launcher::Launcher;
use crate::launch::{k_of, GEMV_SMEM};
use super::gpu::{Args, DBuf, GpuError, GpuResult};
use super::gather::{In, Kept};

/// What [`topk_mark`] ranks: f32 scores, or the magnitudes of 16-bit hidden values (in the engine's type).
#[derive(Debug, Clone, Copy)]
pub enum Scores {
    F32(CUdeviceptr),
    Abs16(CUdeviceptr),
}

/// Keep flags (u8 `[rows, n]`, 1 kept) of each row's top `k` of `scores` (`[rows, n]`). With `compact` (one row
/// only), the same launch also does [`topk_compact`]'s work into that kept set (with its optional gather), so the
/// batch-1 path needs one selection launch instead of two. The engine's select algorithm (binned unless
/// `DEJAVU_TOPK_BINNED=0`).
pub fn topk_mark(
    e: &Launcher,
    scores: Scores,
    rows: usize,
    n: usize,
    k: usize,
    keep: CUdeviceptr,
    compact: Option<(Kept, Option<(CUdeviceptr, CUdeviceptr)>)>,
) -> GpuResult<()> {
    topk_mark_with(e, e.topk_binned, scores, rows, n, k, keep, compact)
}

/// Shared memory (bytes) of the binned select over `n` keys: the keys, a 4,096-bin histogram and the candidates'
/// keys and indices (`TOPK_CAP` = 4,096 in kernels/select.cu).
fn binned_smem(n: usize) -> usize {
    (n + 4096 + 2 * 4096) * 4
}

/// [`topk_mark`] with the algorithm chosen: `binned` (where its shared memory fits; else the radix passes) or the
/// radix passes over the whole row.
#[allow(clippy::too_many_arguments)]
pub fn topk_mark_with(
    e: &Launcher,
    binned: bool,
    scores: Scores,
    rows: usize,
    n: usize,
    k: usize,
    keep: CUdeviceptr,
    compact: Option<(Kept, Option<(CUdeviceptr, CUdeviceptr)>)>,
) -> GpuResult<()> {
    let (name, p) = match scores {
        Scores::F32(p) => ("topk_mark_f32".to_string(), p),
        Scores::Abs16(p) => (format!("topk_mark_abs{}", e.dt().name()), p),
    };
    // The row's keys held in shared memory for the passes when they fit (every shape of the shape table).
    // (Rows of at most 256 units, TOPK_SHORT, count ranks directly either way.)
    let binned = binned && n > 256 && binned_smem(n) <= GEMV_SMEM;
    let smem = if binned { binned_smem(n) } else { n * 4 };
    let cached = smem <= GEMV_SMEM;
    let f = if cached { e.k.get_smem(&name, GEMV_SMEM)? } else { e.k.get(&name)? };
    let mut args = Args::new().ptr(p).i32(n as i32).i32(k.min(i32::MAX as usize) as i32).ptr(keep).i32(i32::from(cached));
    match compact {
        Some((kept, gather)) => {
            if rows != 1 || kept.cap < n {
                return Err(GpuError(format!("internal: a fused compaction of {rows} rows into a kept set of capacity {} for {n} units", kept.cap)));
            }
            let (src, dst) = gather.unwrap_or((0, 0));
            args = args.ptr(kept.idx).ptr(kept.cnt).ptr(src).ptr(dst);
        }
        None => args = args.ptr(0).ptr(0).ptr(0).ptr(0),
    }
    args = args.i32(i32::from(binned));
    let threads = (n.div_ceil(32) * 32).clamp(32, 1024) as u32;
    e.gpu.launch(f, (rows as u32, 1, 1), threads, if cached { smem as u32 } else { 0 }, &mut args)
}

/// Each row's top `k` of `scores` as keep flags in `keep` and their union as the kept set `kept`, with `pre` and
/// `gather` as in [`topk_compact`]: one launch for one row (no `pre` then), [`topk_mark`] and [`topk_compact`] for more.
#[allow(clippy::too_many_arguments)]
pub fn topk_select(
    e: &Launcher,
    scores: Scores,
    rows: usize,
    n: usize,
    k: usize,
    keep: CUdeviceptr,
    kept: Kept,
    pre: Option<CUdeviceptr>,
    gather: Option<(CUdeviceptr, CUdeviceptr)>,
) -> GpuResult<()> {
    if rows == 1 && pre.is_none() {
        return topk_mark(e, scores, rows, n, k, keep, Some((kept, gather)));
    }
    topk_mark(e, scores, rows, n, k, keep, None)?;
    topk_compact(e, keep, rows, n, kept, pre, gather)
}

/// The union of `rows` rows of keep flags (`[rows, n]`) as the ascending kept set `kept` (capacity `n`); with
/// `pre` (f32 `[rows, n]`), each row's 0/1 flag per kept id; with `gather = (src, dst)` (16-bit `[rows, n]`),
/// `dst[b, s] = src[b, kept[s]]` where row b keeps it, else 0.
pub fn topk_compact(e: &Launcher, keep: CUdeviceptr, rows: usize, n: usize, kept: Kept, pre: Option<CUdeviceptr>, gather: Option<(CUdeviceptr, CUdeviceptr)>) -> GpuResult<()> {
    if kept.cap < n {
        return Err(GpuError(format!("internal: a kept set of capacity {} for {n} units", kept.cap)));
    }
    let (src, dst) = gather.unwrap_or((0, 0));
    let mut args = Args::new().ptr(keep).i32(n as i32).i32(rows as i32).ptr(kept.idx).ptr(kept.cnt).ptr(pre.unwrap_or(0)).ptr(src).ptr(dst);
    // Past 2,048 units (the MLP's neurons) one block per 1,024 units, each recounting the flags before its own;
    // below (heads) and where the four-unit loads do not apply, one block.
    let f = e.k.get("topk_compact")?;
    if e.compact_grid && n > 2048 && n % 4 == 0 && keep % 4 == 0 && rows <= 16 {
        return e.gpu.launch(f, (n.div_ceil(1024) as u32, 1, 1), 256, 0, &mut args);
    }
    e.gpu.launch(f, (1, 1, 1), 1024, 0, &mut args)
}

/// One layer's score copies on the device: symmetric int4 codes packed two per byte (element 2j in the low
/// nibble of byte j, so a group of 32 is one 16-byte word) and the groups' f16 scales, for gate and for up.
pub struct QCopy {
    pub gate: DBuf,
    pub up: DBuf,
    pub gate_scale: DBuf,
    pub up_scale: DBuf,
}

/// The packed codes and f16 scale bits of one matrix (the layout [`QCopy`] holds).
pub fn pack_int4(m: &QMatrix) -> Result<(Vec<u8>, Vec<u16>), String> {
    let o = m.opts;
    if o.bits != 4 || o.group != 32 || o.scheme != QScheme::Sym {
        return Err(format!("the GPU reads int4 symmetric score copies in groups of 32; these are int{} {:?} g{}", o.bits, o.scheme, o.group));
    }
    if m.cols % 32 != 0 {
        return Err(format!("the GPU's score pass needs a width that is a multiple of 32, got {}", m.cols));
    }
    let mut codes = vec![0u8; m.rows * m.cols / 2];
    for (j, pair) in m.codes.chunks_exact(2).enumerate() {
        codes[j] = (pair[0] & 15) | ((pair[1] & 15) << 4);
    }
    Ok((codes, m.scale.iter().map(|&s| half::f16::from_f32(s).to_bits()).collect()))
}

impl QCopy {
    pub fn upload(e: &Launcher, gate: &QMatrix, up: &QMatrix) -> GpuResult<Self> {
        let put = |m: &QMatrix| -> GpuResult<(DBuf, DBuf)> {
            let (codes, scale) = pack_int4(m).map_err(GpuError)?;
            let (c, s) = (e.gpu.alloc(codes.len())?, e.gpu.alloc(scale.len() * 2)?);
            e.gpu.upload(&c, 0, &codes)?;
            e.gpu.upload(&s, 0, &scale)?;
            Ok((c, s))
        };
        let (g, gs) = put(gate)?;
        let (u, us) = put(up)?;
        Ok(QCopy { gate: g, up: u, gate_scale: gs, up_scale: us })
    }

    /// Random copies (any codes, small f16 scales) of an `[f, d]` gate and up, for timing.
    pub fn random(e: &Launcher, f: usize, d: usize, seed: u64) -> GpuResult<Self> {
        let rnd = |bytes: usize, seed: u64, scale: f32| super::Weights::random_half(&e.gpu, &e.k, crate::source::weights::Half::F16, bytes / 2, seed, scale);
        Ok(QCopy { gate: rnd(f * d / 2, seed, 1.0)?, up: rnd(f * d / 2, seed + 1, 1.0)?, gate_scale: rnd(f * d / 16, seed + 2, 0.01)?, up_scale: rnd(f * d / 16, seed + 3, 0.01)? })
    }

    /// Bytes a score pass reads: the codes and scales of gate and up.
    pub fn bytes(f: usize, d: usize) -> usize {
        f * d + 2 * f * (d / 32) * 2
    }

    /// Every layer's copies, checked against the engine's model.
    pub fn upload_all(e: &Launcher, c: &QScoreCopies) -> GpuResult<Vec<QCopy>> {
        let (d, f) = (e.cfg.hidden, e.cfg.ffn);
        if c.layers.len() != e.cfg.layers {
            return Err(GpuError(format!("score copies for {} layers, the model has {}", c.layers.len(), e.cfg.layers)));
        }
        c.layers
            .iter()
            .enumerate()
            .map(|(l, (g, u))| {
                if (g.rows, g.cols, u.rows, u.cols) != (f, d, f, d) {
                    return Err(GpuError(format!("layer {l}: score copies of [{}, {}], the model's gate/up are [{f}, {d}]", g.rows, g.cols)));
                }
                QCopy::upload(e, g, u)
            })
            .collect()
    }
}

/// `out[b, n] = |silu(gate_n . x_b) * (up_n . x_b)|` from the copies `q` (`n < f`), f32 `[rows, f]`; `x` the MLP
/// input (`k` wide) of `rows` <= 16 rows.
pub fn qscore(e: &Launcher, q: &QCopy, input: In, out: CUdeviceptr, rows: usize, f: usize, k: usize) -> GpuResult<()> {
    if rows == 0 || rows > super::launcher::GEMV_MAX_ROWS {
        return Err(GpuError(format!("internal: the score pass runs 1..=16 rows, got {rows}")));
    }
    if let (In::Half(x), true) = (input, e.mma_rows > 0 && rows >= e.mma_rows && k % 32 == 0) {
        // 3-16 rows on the tensor cores (`qscore_mma_*`, kernels/mma.cu): 8 warps a block over 16 neurons.
        let func = e.k.get(&format!("qscore_mma_{}_n{}", e.dt().name(), rows.div_ceil(8)))?;
        let mut args = Args::new().ptr(q.gate.ptr).ptr(q.up.ptr).ptr(q.gate_scale.ptr).ptr(q.up_scale.ptr).ptr(x).ptr(out).i32(f as i32).i32(k as i32).i32(rows as i32);
        let grid = e.block_grid(func, f.div_ceil(16), 256, 0)?;
        return e.gpu.launch(func, (grid, 1, 1), 256, 0, &mut args);
    }
    let name = format!("qscore_{}_b{}", e.dt().name(), k_of(rows));
    let (x, xf, g, gb) = match input {
        In::Half(x) => (x, 0, 0, 0),
        In::Norm(m) => (0, m.x, m.g, m.gb),
    };
    let staged = rows * k * 4;
    let stage = e.stage && staged <= GEMV_SMEM;
    let func = if stage { e.k.get_smem(&name, GEMV_SMEM)? } else { e.k.get(&name)? };
    let mut args = Args::new()
        .ptr(q.gate.ptr)
        .ptr(q.up.ptr)
        .ptr(q.gate_scale.ptr)
        .ptr(q.up_scale.ptr)
        .ptr(x)
        .ptr(out)
        .i32(f as i32)
        .i32(k as i32)
        .i32(rows as i32)
        .ptr(xf)
        .ptr(g)
        .ptr(gb)
        .f32(e.cfg.norm_eps as f32)
        .i32(i32::from(e.cfg.family == Family::Llama))
        .i32(i32::from(stage));
    let threads = 256u32;
    let smem = if stage { staged } else { 0 };
    let grid = e.row_grid(func, f, threads, smem)?;
    e.gpu.launch(func, (grid, 1, 1), threads, smem as u32, &mut args)
}
