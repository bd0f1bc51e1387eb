//! The sparse rules' kept sets on the GPU against the host's, given the same inputs.

use cudarc::driver::sys::CUdeviceptr;

use crate::cuda::launcher::Epi;
use crate::cuda::gpu::GpuResult;
use crate::source::weights::Half;
use crate::source::ModelFiles;

use super::*;

/// Kept sets on the GPU against the CPU reference's, given the same inputs: the reference's normed MLP inputs of
/// every prompt token (dense forward), rounded to the engine's 16-bit type, go through the GPU's selection, 16
/// tokens at a time sharing one kept set, each token's own set read from its flags. The reference's sets:
/// - CATS (`gemv_cats_*`): neuron j kept when its |SiLU(gate_j)| (OPT: ReLU(fc1_j)) is >= the layer's threshold;
/// - exactdown (dense gate/up GEMV, `topk_mark_abs*`, `topk_compact`): the top k of |SiLU(gate)·up|;
/// - qscore (`qscore_*`, `topk_mark_f32`, `topk_compact`): the top k of the score copies' |SiLU(ĝ)·û| as the
///   reference computes them ([`crate::model::QScorer`]).
/// - dejavu (the folded predictor's two GEMVs on the residual, `topk_mark_f32`, `topk_compact`): the top k of the
///   trained predictor's scores of the MLP's input residual as the reference computes them.
pub enum KeptRule<'a> {
    Cats(&'a [f32]),
    ExactDown(usize),
    QScore(usize, &'a crate::sparse::quant::QScoreCopies),
    Predicted(usize, &'a crate::predictor::Predictors<crate::backend::CpuBackend>),
    /// Heads: the top k of the look-ahead head predictor's scores of the previous layer's block input (layer 0:
    /// its own), against the GPU's predictor and top-k on the same f32 input.
    Heads(usize, &'a crate::predictor::Predictors<crate::backend::CpuBackend>),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KeptCheck {
    pub model: String,
    pub dtype: &'static str,
    pub tokens: usize,
    pub layers: usize,
    /// (token, layer) pairs whose two sets are equal, of all.
    pub equal: usize,
    pub total: usize,
    /// Mean size of the symmetric difference per (token, layer), and mean kept count (reference).
    pub mean_symdiff: f64,
    pub mean_kept: f64,
    /// Against the engine's selection function computed on the host in f64 from the same inputs and the engine's
    /// 16-bit weights (see [`EngineSel`]): pairs equal, and the mean symmetric difference.
    pub engine_equal: usize,
    pub engine_mean_symdiff: f64,
    /// At least 99% of the pairs equal to the engine function's sets (the test of the GPU's kernels; the burn
    /// reference's agreement above is reported beside it).
    pub pass: bool,
}

/// The engine's selection function, computed on the host in f64 from the inputs the GPU got and the 16-bit
/// weights it holds (downloaded from it), with the engine's rounding points: `exactdown` ranks the hidden values
/// rounded to the 16-bit type (the engine stores them so before the top-k); `qscore` ranks the int4 copies'
/// scores of the 16-bit input; the predictors' hidden layer is rounded to the 16-bit type between their two
/// GEMVs; CATS compares |SiLU(gate)| (OPT: ReLU(fc1 + b)) with the threshold. Ties as the host reference's.
enum EngineSel {
    /// Per layer: `[2f, d]` gate then up rows (llama) or `[f, d]` fc1 rows, and the fc1 bias.
    Glu(Vec<(Vec<f32>, Option<Vec<f32>>)>),
    /// Per layer: the dequantized gate and up copies `[f, d]`.
    Q(Vec<(Vec<f32>, Vec<f32>)>),
    /// Per layer: a folded predictor's weights rounded to the 16-bit type.
    Pred(Vec<crate::predictor::FoldedPredictor>),
}

fn dot64(w: &[f32], x: &[f64]) -> f64 {
    w.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum()
}

fn silu64(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

impl EngineSel {
    /// The kept set of one token at layer `l`: `xn` its normed MLP input (as given to the GPU, before rounding),
    /// `xr` its residual (predictors).
    #[allow(clippy::too_many_arguments)]
    /// `u16`: the predictor's normalised input is rounded to the 16-bit type before its hidden layer (the
    /// tensor-core path at 3-16 rows, [`crate::cuda::predict::rounds_input`]).
    #[allow(clippy::too_many_arguments)]
    fn kept(&self, th: Option<&[f32]>, k: usize, l: usize, xn: &[f32], xr: &[f32], dt: Half, llama: bool, f: usize, u16: bool) -> Vec<usize> {
        let x16: Vec<f64> = rounded(xn, dt).into_iter().map(f64::from).collect();
        match (self, th) {
            (EngineSel::Glu(ws), Some(th)) => {
                let (w, b) = &ws[l];
                let d = x16.len();
                (0..f)
                    .filter(|&j| {
                        let g = dot64(&w[j * d..(j + 1) * d], &x16) + b.as_ref().map_or(0.0, |b| b[j] as f64);
                        let a = if llama { silu64(g).abs() } else { g.max(0.0) };
                        a >= th[l] as f64
                    })
                    .collect()
            }
            (EngineSel::Glu(ws), None) => {
                let (w, _) = &ws[l];
                let d = x16.len();
                let h: Vec<f32> = (0..f).map(|j| (silu64(dot64(&w[j * d..(j + 1) * d], &x16)) * dot64(&w[(f + j) * d..(f + j + 1) * d], &x16)) as f32).collect();
                let a: Vec<f32> = rounded(&h, dt).into_iter().map(f32::abs).collect();
                crate::sparse::select::top_k(&a, k)
            }
            (EngineSel::Q(qs), _) => {
                let (gq, uq) = &qs[l];
                let d = x16.len();
                let a: Vec<f32> = (0..f).map(|j| (silu64(dot64(&gq[j * d..(j + 1) * d], &x16)) * dot64(&uq[j * d..(j + 1) * d], &x16)).abs() as f32).collect();
                crate::sparse::select::top_k(&a, k)
            }
            (EngineSel::Pred(ps), _) => {
                let p = &ps[l];
                let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / xr.len() as f64;
                let rstd = 1.0 / (ms + crate::predictor::RMS_EPS).sqrt();
                let mut z: Vec<f64> = xr.iter().map(|&v| v as f64 * rstd).collect();
                if u16 {
                    let zr: Vec<f32> = z.iter().map(|&v| v as f32).collect();
                    z = rounded(&zr, dt).into_iter().map(f64::from).collect();
                }
                let t: Vec<f32> = (0..p.r).map(|j| (dot64(&p.w1t[j * p.d..(j + 1) * p.d], &z) + p.b1[j] as f64) as f32).collect();
                let t16: Vec<f64> = rounded(&t, dt).into_iter().map(f64::from).collect();
                let sc: Vec<f32> = (0..p.n).map(|c| (dot64(&p.w2t[c * p.r..(c + 1) * p.r], &t16) + p.b2[c] as f64) as f32).collect();
                crate::sparse::select::top_k(&sc, k)
            }
        }
    }
}

pub fn kept_sets(files: &ModelFiles, dt: Option<Half>, rule: KeptRule<'_>, prompts: &[Vec<u32>]) -> Result<KeptCheck, String> {
    use crate::cuda::predict::GpuPredictor;
    use crate::cuda::select::{qscore, topk_compact, topk_mark, QCopy, Scores};
    use crate::cuda::gather::{cats_select, In, Kept};
    use crate::model::{to_host_3d, Forward, TapSet};
    use burn::tensor::{Tensor, TensorData};
    type Cpu = crate::backend::CpuBackend;
    let dev = Default::default();
    let m = crate::model::Model::<Cpu>::load(&files.config, files.checkpoint.as_ref(), &dev, |_| {}).map_err(|e| e.to_string())?;
    let (gpu, _) = crate::cuda::CudaDecoder::load(files, dt, 0, |_| {}).map_err(|e| e.0)?;
    let e = &gpu.engine.ctx;
    let g = |r: GpuResult<()>| r.map_err(|x| x.0);
    let cfg = &files.config;
    let (d, f, nl) = (cfg.hidden, cfg.ffn, cfg.layers);
    let llama = cfg.family == crate::config::Family::Llama;
    match rule {
        KeptRule::Cats(th) if th.len() != nl => return Err(format!("{} thresholds for {nl} layers", th.len())),
        KeptRule::ExactDown(_) | KeptRule::QScore(..) if !llama => return Err("the top-k rules apply to SwiGLU models".into()),
        _ => {}
    }
    let (qs, qgpu) = match rule {
        KeptRule::QScore(_, c) => (Some(crate::model::QScorer::<Cpu>::from_copies(c, &dev)), Some(QCopy::upload_all(e, c).map_err(|x| x.0)?)),
        _ => (None, None),
    };
    let pgpu: Vec<GpuPredictor> = match rule {
        KeptRule::Predicted(_, p) => (0..nl).map(|l| GpuPredictor::upload(e, &p.host(l, false).fold())).collect::<GpuResult<_>>().map_err(|x| x.0)?,
        KeptRule::Heads(_, p) => (0..nl).map(|l| GpuPredictor::upload(e, &p.host(l, true).fold())).collect::<GpuResult<_>>().map_err(|x| x.0)?,
        _ => Vec::new(),
    };
    let dt = e.w.dt;
    let round_pred = |p: crate::predictor::FoldedPredictor| crate::predictor::FoldedPredictor { w1t: rounded(&p.w1t, dt), b1: rounded(&p.b1, dt), w2t: rounded(&p.w2t, dt), b2: rounded(&p.b2, dt), ..p };
    let down16 = |ptr: CUdeviceptr, n: usize| -> Result<Vec<f32>, String> {
        let mut v = vec![0u16; n];
        e.gpu.download(ptr, &mut v).map_err(|x| x.0)?;
        Ok(unbits(&v, dt))
    };
    let esel = match rule {
        KeptRule::Cats(_) | KeptRule::ExactDown(_) => {
            let rows = if llama { 2 * f } else { f };
            EngineSel::Glu((0..nl).map(|l| {
                let lw = &e.w.layers[l];
                Ok((down16(lw.up.ptr, rows * d)?, lw.up_b.as_ref().map(|b| down16(b.ptr, f)).transpose()?))
            }).collect::<Result<_, String>>()?)
        }
        KeptRule::QScore(_, c) => EngineSel::Q(c.layers.iter().map(|(g, u)| (g.dequantize(), u.dequantize())).collect()),
        KeptRule::Predicted(_, p) => EngineSel::Pred((0..nl).map(|l| round_pred(p.host(l, false).fold())).collect()),
        KeptRule::Heads(_, p) => EngineSel::Pred((0..nl).map(|l| round_pred(p.host(l, true).fold())).collect()),
    };
    let (sel_th, sel_k) = match rule {
        KeptRule::Cats(th) => (Some(th), 0),
        KeptRule::ExactDown(k) | KeptRule::QScore(k, _) | KeptRule::Predicted(k, _) | KeptRule::Heads(k, _) => (None, k),
    };
    // The units a rule ranks: neurons, or heads.
    let f = if matches!(rule, KeptRule::Heads(..)) { cfg.heads } else { f };
    let alloc = |n: usize| e.gpu.alloc(n).map_err(|x| x.0);
    let (idx, cnt, out, tally, xin) = (alloc(f * 4)?, alloc(4)?, alloc(16 * 2 * f * 4)?, alloc(16 * 8 * 4)?, alloc(16 * d * 2)?);
    let (keep, flags, hid) = (alloc(16 * f)?, alloc(16 * f * 4)?, alloc(16 * f * 2)?);
    let (resid, ptmp) = (alloc(16 * d * 4)?, alloc(pgpu.iter().map(|p| p.scratch_bytes(16)).max().unwrap_or(4))?);
    let taps_want = TapSet { mlp_normed: true, mlp_act: true, mlp_input: true, block_input: true, ..Default::default() };
    let (mut equal, mut total, mut symdiff, mut kept_sum) = (0usize, 0usize, 0usize, 0usize);
    let (mut e_equal, mut e_symdiff) = (0usize, 0usize);
    let symd = |a: &[usize], b: &[usize]| a.len() + b.len() - 2 * a.iter().filter(|j| b.binary_search(j).is_ok()).count();
    let mut tokens = 0;
    for p in prompts {
        let mut cache = m.new_cache();
        let mut taps = Vec::new();
        let _ = m.forward_with(m.tokens(std::slice::from_ref(p)), &mut cache, Forward { taps: Some((&taps_want, &mut taps)), ..Default::default() });
        tokens += p.len();
        let blocks: Vec<Vec<f32>> = taps.iter().map(|lt| lt.block_input.clone().map(|t| to_host_3d(t).0).unwrap_or_default()).collect();
        for (l, lt) in taps.into_iter().enumerate() {
            let (xn, [_, s, _]) = to_host_3d(lt.mlp_normed.ok_or("no normed taps")?);
            // Neuron predictors read the MLP's input residual (look-ahead ones the layer's block input); head
            // predictors the previous block's input.
            let xr = match rule {
                KeptRule::Heads(..) => blocks[l.saturating_sub(1)].clone(),
                KeptRule::Predicted(_, p) if p.neuron_input() != crate::predictor::NeuronInput::Mlp => blocks[p.neuron_input().layer(l)].clone(),
                _ => to_host_3d(lt.mlp_input.ok_or("no residual taps")?).0,
            };
            // The reference's ranking per token: CATS's magnitudes, the exact hidden values, the copies' scores, or
            // the predictor's scores of the residual.
            let mag = match rule {
                KeptRule::Cats(_) if llama => lt.gate_act,
                KeptRule::QScore(..) => {
                    let x = Tensor::<Cpu, 3>::from_data(TensorData::new(xn.clone(), [1, s, d]), &dev);
                    qs.as_ref().map(|q| q.scores(l, x))
                }
                KeptRule::Predicted(_, p) => Some(p.neuron_scores(l, Tensor::<Cpu, 3>::from_data(TensorData::new(xr.clone(), [1, s, d]), &dev))),
                KeptRule::Heads(_, p) => Some(p.head_scores(l, Tensor::<Cpu, 3>::from_data(TensorData::new(xr.clone(), [1, s, d]), &dev))),
                _ => lt.mlp_act,
            };
            let (mag, _) = to_host_3d(mag.ok_or("no activation taps")?);
            for c0 in (0..s).step_by(16) {
                let nb = (s - c0).min(16);
                g(e.gpu.upload(&xin, 0, &bits(&xn[c0 * d..(c0 + nb) * d], dt)))?;
                g(e.gpu.memset(&cnt, 0))?;
                g(e.gpu.memset(&tally, 0))?;
                let kept = Kept { idx: idx.ptr, cnt: cnt.ptr, cap: f, early: false };
                let lw = &e.w.layers[l];
                let up_b = lw.up_b.as_ref().map(|b| b.ptr);
                match rule {
                    KeptRule::Cats(th) => g(cats_select(e, lw.up.ptr, up_b, llama, In::Half(xin.ptr), th[l], kept, out.ptr, nb, d, tally.ptr))?,
                    KeptRule::ExactDown(k) => {
                        g(e.linear(lw.up.ptr, up_b, xin.ptr, hid.ptr, nb, f, d, Epi::Glu, out.ptr))?;
                        g(topk_mark(e, Scores::Abs16(hid.ptr), nb, f, k, keep.ptr, None))?;
                        g(topk_compact(e, keep.ptr, nb, f, kept, Some(flags.ptr), None))?;
                    }
                    KeptRule::QScore(k, _) => {
                        let q = &qgpu.as_ref().ok_or("no score copies")?[l];
                        g(qscore(e, q, In::Half(xin.ptr), out.ptr, nb, f, d))?;
                        g(topk_mark(e, Scores::F32(out.ptr), nb, f, k, keep.ptr, None))?;
                        g(topk_compact(e, keep.ptr, nb, f, kept, Some(flags.ptr), None))?;
                    }
                    KeptRule::Predicted(k, _) | KeptRule::Heads(k, _) => {
                        // The predictor reads the f32 residual as it is (not rounded).
                        g(e.gpu.upload(&resid, 0, &xr[c0 * d..(c0 + nb) * d]))?;
                        g(pgpu[l].scores(e, resid.ptr, nb, ptmp.ptr, out.ptr))?;
                        g(topk_mark(e, Scores::F32(out.ptr), nb, f, k, keep.ptr, None))?;
                        g(topk_compact(e, keep.ptr, nb, f, kept, Some(flags.ptr), None))?;
                    }
                }
                let mut n = [0i32];
                g(e.gpu.download(cnt.ptr, &mut n))?;
                let n = n[0].max(0) as usize;
                let mut ids = vec![0i32; n];
                g(e.gpu.download(idx.ptr, &mut ids))?;
                // Per row and kept slot: nonzero where the row keeps it (CATS: its value; top-k: its flag).
                let vals: Vec<f32> = match rule {
                    KeptRule::Cats(_) if !llama => {
                        let mut v = vec![0u16; nb * f];
                        g(e.gpu.download(out.ptr, &mut v))?;
                        unbits(&v, dt)
                    }
                    KeptRule::Cats(_) => {
                        let mut v = vec![0f32; nb * f];
                        g(e.gpu.download(out.ptr, &mut v))?;
                        v
                    }
                    _ => {
                        let mut v = vec![0f32; nb * f];
                        g(e.gpu.download(flags.ptr, &mut v))?;
                        v
                    }
                };
                // The engine function's sets of the chunk's tokens, one thread per token.
                let u16 = crate::cuda::predict::rounds_input(e, d, nb);
                let eng: Vec<Vec<usize>> = std::thread::scope(|sc| -> Result<_, String> {
                    let hs: Vec<_> = (0..nb)
                        .map(|b| {
                            let (xn, xr, esel) = (&xn[(c0 + b) * d..(c0 + b + 1) * d], &xr[(c0 + b) * d..(c0 + b + 1) * d], &esel);
                            sc.spawn(move || esel.kept(sel_th, sel_k, l, xn, xr, dt, llama, f, u16))
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().map_err(|_| format!("the host's selection function panicked at layer {l}"))).collect()
                })?;
                for b in 0..nb {
                    let mut gpu_set: Vec<usize> = (0..n).filter(|&s_| vals[b * f + s_] != 0.0).map(|s_| ids[s_] as usize).collect();
                    gpu_set.sort_unstable();
                    let ed = symd(&eng[b], &gpu_set);
                    e_equal += usize::from(ed == 0);
                    e_symdiff += ed;
                    let row = &mag[(c0 + b) * f..(c0 + b + 1) * f];
                    let cpu_set: Vec<usize> = match rule {
                        KeptRule::Cats(th) => (0..f).filter(|&j| row[j].abs() >= th[l]).collect(),
                        // The predictor's logits rank as they are (a GPU top-k of f32 scores).
                        KeptRule::Predicted(k, _) | KeptRule::Heads(k, _) => crate::sparse::select::top_k(row, k),
                        KeptRule::ExactDown(k) | KeptRule::QScore(k, _) => {
                            let a: Vec<f32> = row.iter().map(|v| v.abs()).collect();
                            crate::sparse::select::top_k(&a, k)
                        }
                    };
                    let diff = symd(&cpu_set, &gpu_set);
                    equal += usize::from(diff == 0);
                    total += 1;
                    symdiff += diff;
                    kept_sum += cpu_set.len();
                }
            }
        }
    }
    Ok(KeptCheck {
        model: files.identity.clone(),
        dtype: dt.name(),
        tokens,
        layers: nl,
        equal,
        total,
        mean_symdiff: symdiff as f64 / total.max(1) as f64,
        mean_kept: kept_sum as f64 / total.max(1) as f64,
        engine_equal: e_equal,
        engine_mean_symdiff: e_symdiff as f64 / total.max(1) as f64,
        pass: total > 0 && e_equal * 100 >= total * 99,
    })
}
