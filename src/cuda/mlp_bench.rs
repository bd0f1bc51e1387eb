//! `bench --mlp-block`: one MLP block at a real shape, random weights, sparse (the kept neurons only: gather of the
//! up rows, transposed down) and dense (our GEMVs) side by side. Each timing is one CUDA-graph replay with the L2
//! flushed before it, bracketed by events, as `../shared/docs/PERF.md` times Deja Vu's and TEAL's kernels; the floor
//! is the kept weight bytes over the device-to-device copy bandwidth measured in the same process.

use crate::bench::{median_p90, BlockRule, MlpBlockResult, Shape};
use crate::config::Family;
use crate::source::weights::Half;

use super::launcher::Launcher;
use super::launcher::Epi;
use super::gpu::{DBuf, Gpu, GpuResult, Graph};
use super::kernels::Kernels;
use super::predict::GpuPredictor;
use super::select::QCopy;
use super::gather::{down_t, gather_up, random_kept, In, Kept};
use super::sparse::{sparse_mlp, GpuMlp, PredIn, SparseMlp, SparseParts};
use super::weights::Weights;

/// Bytes the block needs on the GPU beyond the engine's (transposed down copy, activations, flush buffer).
pub fn needed_bytes(sh: &Shape, batch: usize) -> usize {
    let (d, f) = (sh.hidden, sh.ffn);
    let up_rows = if sh.family == Family::Llama { 2 * f } else { f };
    // up + down + transposed down, one layer; attention weights of that layer; flush; small buffers.
    (up_rows * d + 2 * f * d + 4 * d * d) * 2 + FLUSH_BYTES + batch * (f * 2 + up_rows * 4 + d * 8) + (64 << 20)
}

/// Written before each timed replay: twice the H200's 60 MB L2.
pub(super) const FLUSH_BYTES: usize = 128 << 20;

/// An engine on one layer of `sh` with random weights (and a 256-token vocabulary: the head is not timed).
pub(super) fn one_layer(sh: &Shape, dt: Half) -> GpuResult<Launcher> {
    let mut cfg = sh.config();
    cfg.layers = 1;
    cfg.vocab_size = 256;
    let gpu = Gpu::new(0)?;
    let k = Kernels::load(gpu.arch)?;
    let w = Weights::random(&gpu, &k, &cfg, dt, 11)?;
    Launcher::new(gpu, k, w, cfg)
}

pub(super) fn time_graph(e: &Launcher, g: &Graph, flush: &DBuf, reps: usize) -> GpuResult<(f64, f64)> {
    for _ in 0..3 {
        e.gpu.replay(g)?;
    }
    let mut us = Vec::with_capacity(reps);
    let mut evs = Vec::with_capacity(reps);
    for _ in 0..reps {
        e.gpu.memset(flush, 0)?;
        let (a, b) = (e.gpu.event()?, e.gpu.event()?);
        e.gpu.record(&a)?;
        e.gpu.replay(g)?;
        e.gpu.record(&b)?;
        evs.push((a, b));
    }
    e.gpu.sync()?;
    for (a, b) in &evs {
        us.push(a.elapsed_ms(b)? as f64 * 1e3);
    }
    Ok(median_p90(&mut us))
}

/// Time the block at `sh` for every kept fraction in `keep`, at each batch size: `rule` gather (the kept ids
/// given), or a SwiGLU rule whose selection runs inside the timed graph (`qscore`: random int4 score copies).
pub fn run(sh: &Shape, dt: Half, batches: &[usize], keep: &[f64], reps: usize, rule: BlockRule, rank: Option<usize>) -> GpuResult<Vec<MlpBlockResult>> {
    let e = one_layer(sh, dt)?;
    let cfg = e.cfg.clone();
    let (d, f) = (cfg.hidden, cfg.ffn);
    let llama = cfg.family == Family::Llama;
    let epi = if llama { Epi::Glu } else { Epi::Relu };
    let mats = if llama { 3 } else { 2 };
    let copy_bw = e.copy_bandwidth(1 << 30, 10)?;
    let lw = &e.w.layers[0];
    let (up, up_b, down, down_b) = (lw.up.ptr, lw.up_b.as_ref().map(|b| b.ptr), lw.down.ptr, lw.down_b.as_ref().map(|b| b.ptr));
    // The transposed down copy [F, d] (random like the rest).
    let wt = Weights::random_half(&e.gpu, &e.k, dt, f * d, 0x5eed, (3.0 / f as f64).sqrt() as f32)?;
    let flush = e.gpu.alloc(FLUSH_BYTES)?;
    let max_b = batches.iter().copied().max().unwrap_or(1);
    let x = Weights::random_half(&e.gpu, &e.k, dt, max_b * d, 0x1234, 1.0)?;
    let out = e.gpu.alloc(max_b * d * 4)?;
    e.gpu.memset(&out, 0)?;
    let act = e.gpu.alloc(max_b * f * 2)?;
    let y = e.gpu.alloc(max_b * 2 * f * 4)?;
    let idx = e.gpu.alloc(f * 4)?;
    let cnt = e.gpu.alloc(4)?;
    let mut results = Vec::new();
    for &b in batches {
        // Dense: our GEMV kernels on the untransposed weights.
        e.gpu.begin_capture()?;
        e.linear(up, up_b, x.ptr, act.ptr, b, f, d, epi, y.ptr)?;
        e.linear(down, down_b, act.ptr, out.ptr, b, d, f, Epi::Acc, y.ptr)?;
        let g = e.gpu.end_capture()?;
        let (dense_us, _) = time_graph(&e, &g, &flush, reps)?;
        for &frac in keep {
            let kk = ((frac * f as f64).round() as usize).clamp(1, f);
            if rule != BlockRule::Gather {
                results.push(time_rule(&e, sh, rule, b, kk, x.ptr, out.ptr, &flush, reps, copy_bw, dense_us, rank)?);
                continue;
            }
            e.gpu.upload(&idx, 0, &random_kept(f, kk, 99 + kk as u64))?;
            e.gpu.upload(&cnt, 0, &[kk as i32])?;
            let kept = Kept { idx: idx.ptr, cnt: cnt.ptr, cap: kk, early: true };
            e.gpu.begin_capture()?;
            gather_up(&e, up, up_b, f, In::Half(x.ptr), kept, act.ptr, b, d, epi, None)?;
            down_t(&e, wt.ptr, down_b, act.ptr, kk, Some(kept), kk, out.ptr, b, d, false)?;
            let g = e.gpu.end_capture()?;
            let (med, p90) = time_graph(&e, &g, &flush, reps)?;
            let bias_bytes = if up_b.is_some() { kk * 2 + d * 2 } else { 0 };
            let bytes = mats * kk * d * 2 + bias_bytes;
            results.push(block_row(&e, sh, b, kk, "gather_up + down_t (kept ids given)".into(), (med, p90), bytes, copy_bw, dense_us));
        }
    }
    Ok(results)
}

/// One row of a rule's block: selection and compute in one graph, `k` kept per row (the union over `b` rows is
/// what is read). Bytes: `qscore` the int4 codes and f16 scales of gate and up, then the kept rows of gate, up and
/// down; `exactdown` gate and up whole, then the kept rows of down; `dejavu` the predictor's two matrices, then the
/// kept rows of every matrix.
#[allow(clippy::too_many_arguments)]
fn time_rule(e: &Launcher, sh: &Shape, rule: BlockRule, b: usize, k: usize, x: u64, out: u64, flush: &DBuf, reps: usize, copy_bw: f64, dense_us: f64, rank: Option<usize>) -> GpuResult<MlpBlockResult> {
    let (d, f) = (sh.hidden, sh.ffn);
    let mut parts = SparseParts { score_bits: 4.5, ..Default::default() };
    let rank = rank.unwrap_or_else(|| crate::predictor::default_rank(d));
    let gr = match rule {
        BlockRule::Qscore => {
            parts.q.push(Some(QCopy::random(e, f, d, 21)?));
            GpuMlp::QScore(k)
        }
        BlockRule::Dejavu => {
            // A random predictor of the rank `train-predictors` gives this width (its weights are read each token).
            parts.pred.push(Some(GpuPredictor::random(e, rank, f, 31)?));
            GpuMlp::Predicted(k)
        }
        _ => GpuMlp::ExactDown(k),
    };
    let sp = SparseMlp::new(e, vec![Some(gr)], parts)?;
    let act = e.gpu.alloc(16 * f * 2)?;
    let pre = e.gpu.alloc(16 * f * 4)?;
    e.gpu.begin_capture()?;
    sparse_mlp(e, &sp, 0, gr, b, |r0| In::Half(x + (r0 * d * 2) as u64), out, PredIn { x: out, selected: false }, pre.ptr, act.ptr)?;
    let g = e.gpu.end_capture()?;
    let (med, p90) = time_graph(e, &g, flush, reps)?;
    let mut n = [0i32];
    e.gpu.download(sp.kept(0, 0, f).cnt, &mut n)?;
    let kept = (n[0].max(0) as usize).min(f);
    let mats = if sh.family == Family::Llama { 3 } else { 2 };
    let bytes = match rule {
        BlockRule::Qscore => QCopy::bytes(f, d) + 3 * kept * d * 2,
        BlockRule::Dejavu => (rank * d + f * rank + rank + f) * 2 + mats * kept * d * 2,
        _ => 2 * f * d * 2 + kept * d * 2,
    };
    let kernels = match rule {
        BlockRule::Qscore => "qscore: int4 score pass + top-k + gather_up + down_t (score and selection included)".into(),
        BlockRule::Dejavu => format!("dejavu: rank-{rank} predictor + top-k + gather_up + down_t (predictor and selection included)"),
        _ => "exactdown: dense gate/up + top-k + down_t (selection included)".into(),
    };
    Ok(block_row(e, sh, b, kept, kernels, (med, p90), bytes, copy_bw, dense_us))
}

/// One table row: the timing `(median, p90)` in µs of a block reading `bytes`, beside its floor (bytes over the copy
/// bandwidth `copy_bw`, bytes/s), the 1.2 × floor + 4 µs bound and our dense block.
#[allow(clippy::too_many_arguments)]
fn block_row(e: &Launcher, sh: &Shape, batch: usize, kept: usize, kernels: String, (med, p90): (f64, f64), bytes: usize, copy_bw: f64, dense_us: f64) -> MlpBlockResult {
    let floor_us = bytes as f64 / copy_bw * 1e6;
    MlpBlockResult {
        shape: sh.name.to_string(),
        device: e.gpu.name.clone(),
        dtype: e.dt().name().to_string(),
        batch,
        kept,
        ffn: sh.ffn,
        kept_frac: kept as f64 / sh.ffn as f64,
        kernels,
        median_us: med,
        p90_us: p90,
        bytes,
        copy_gbps: copy_bw / 1e9,
        floor_us,
        ratio_to_floor: med / floor_us,
        bound_us: 1.2 * floor_us + 4.0,
        dense_us,
    }
}
