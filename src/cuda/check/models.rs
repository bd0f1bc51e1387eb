//! Whole models on the engine against the burn reference: greedy continuations and teacher-forced log-probs.

use crate::decode::{generate, Decoder, RefDecoder, Sampling};
use crate::source::weights::Half;
use crate::source::ModelFiles;

/// The engine against the burn reference on one model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelCheck {
    pub model: String,
    pub dtype: &'static str,
    pub prompts: usize,
    pub steps: usize,
    pub identical: usize,
    /// Prompts whose first divergence sits where the reference's top-2 log-prob margin is under 0.05.
    pub divergences_at_near_ties: usize,
    /// The largest reference margin at a divergence.
    pub worst_margin: f64,
    /// max |log p_gpu - log p_cpu| of the reference's tokens, teacher-forced.
    pub max_dlogprob: f64,
    pub pass: bool,
}

fn top2_margin(logits: &[f32]) -> f64 {
    let mut a = f64::NEG_INFINITY;
    let mut b = f64::NEG_INFINITY;
    for &x in logits {
        let x = x as f64;
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b // a difference of logits is a difference of log-probs
}

/// Greedy `steps` tokens after each prompt on both decoders, then teacher-forced scores of the reference's
/// tokens on both.
pub fn compare(name: &str, cpu: &mut dyn Decoder, gpu: &mut dyn Decoder, dt: Half, prompts: &[Vec<u32>], steps: usize) -> Result<ModelCheck, String> {
    let mut identical = 0;
    let mut near = 0;
    let mut worst = 0f64;
    let mut max_d = 0f64;
    let greedy = Sampling::default();
    for p in prompts {
        let steps = match cpu.config().position_limit() {
            Some(l) => steps.min(l.saturating_sub(p.len())),
            None => steps,
        };
        if steps == 0 {
            continue;
        }
        let r = generate(cpu, p, steps, greedy, &[], |_| true).map_err(|e| format!("cpu: {e}"))?.new_tokens;
        let g = generate(gpu, p, steps, greedy, &[], |_| true).map_err(|e| format!("gpu: {e}"))?.new_tokens;
        match r.iter().zip(&g).position(|(a, b)| a != b) {
            None => identical += 1,
            Some(i) => {
                let mut ctx = p.clone();
                ctx.extend_from_slice(&r[..i]);
                cpu.reset();
                cpu.prefill(&[ctx], None).map_err(|e| format!("cpu: {e}"))?;
                let l = cpu.logits().map_err(|e| format!("cpu: {e}"))?;
                let m = top2_margin(&l[0]);
                worst = worst.max(m);
                if m < 0.05 {
                    near += 1;
                }
            }
        }
        // Teacher-forced: the sequence prompt + reference continuation, scored for the continuation.
        let mut seq = p.clone();
        seq.extend_from_slice(&r[..r.len() - 1]);
        let mut tg: Vec<u32> = p[1..].to_vec();
        tg.extend_from_slice(&r);
        let forced = |dec: &mut dyn Decoder| -> Result<Vec<f64>, String> {
            dec.reset();
            dec.prefill(std::slice::from_ref(&seq), None).map_err(|e| format!("score: {e}"))?;
            let s = dec.score(std::slice::from_ref(&tg)).map_err(|e| format!("score: {e}"))?;
            Ok(s[0].iter().skip(p.len() - 1).map(|t| t.logprob as f64).collect())
        };
        let lps = [forced(&mut *cpu)?, forced(&mut *gpu)?];
        for (a, b) in lps[0].iter().zip(&lps[1]) {
            max_d = max_d.max((a - b).abs());
        }
    }
    let n = prompts.len();
    let ok = identical * 10 >= n * 9 && identical + near == n && max_d < 0.05;
    Ok(ModelCheck {
        model: name.to_string(),
        dtype: dt.name(),
        prompts: n,
        steps,
        identical,
        divergences_at_near_ties: near,
        worst_margin: worst,
        max_dlogprob: max_d,
        pass: ok,
    })
}

/// `files` on the engine, running `plan` (None: dense) with the score copies and predictors it needs.
fn engine_decoder(
    files: &ModelFiles,
    dt: Option<Half>,
    plan: Option<&crate::sparse::Plan>,
    copies: Option<&crate::sparse::quant::QScoreCopies>,
    predictors: Option<&crate::predictor::Predictors<crate::backend::CpuBackend>>,
) -> Result<crate::cuda::CudaDecoder, String> {
    let (mut gpu, _) = crate::cuda::CudaDecoder::load(files, dt, 0, |_| {}).map_err(|e| e.0)?;
    if let Some(p) = plan {
        let fold = |heads: bool| -> Option<Vec<crate::predictor::FoldedPredictor>> { predictors.map(|ps| (0..ps.layers()).map(|l| ps.host(l, heads).fold()).collect()) };
        let (fm, fh) = (fold(false), fold(true));
        let mlp_input = predictors.map_or(crate::predictor::NeuronInput::Mlp, |ps| ps.neuron_input());
        let art = crate::cuda::engine::GpuArtifacts { qscore: copies, mlp_predictors: fm.as_deref(), head_predictors: fh.as_deref(), mlp_input };
        gpu.set_plan(p, &art).map_err(|e| e.0)?;
    }
    Ok(gpu)
}

/// Load `files` on both engines and [`compare`], both running `plan` (None: dense; `label` names it in the table),
/// with the score copies `copies` where the plan has `qscore` layers.
pub fn model(
    files: &ModelFiles,
    dt: Option<Half>,
    prompts: &[Vec<u32>],
    steps: usize,
    plan: Option<(&crate::sparse::Plan, &str)>,
    copies: Option<&crate::sparse::quant::QScoreCopies>,
    predictors: Option<&crate::predictor::Predictors<crate::backend::CpuBackend>>,
) -> Result<ModelCheck, String> {
    type Cpu = crate::backend::CpuBackend;
    let dev = Default::default();
    let m = crate::model::Model::<Cpu>::load(&files.config, files.checkpoint.as_ref(), &dev, |_| {}).map_err(|e| e.to_string())?;
    let qs = copies.map(|c| crate::model::QScorer::<Cpu>::from_copies(c, &dev));
    let scorer = predictors.map(|p| p as &dyn crate::model::Scorer<Cpu>);
    let mut cpu = match plan {
        Some((p, _)) => RefDecoder::with_qscore(&m, p, scorer, qs.as_ref()).map_err(|e| e.to_string())?,
        None => RefDecoder::dense(&m),
    };
    let mut gpu = engine_decoder(files, dt, plan.map(|(p, _)| p), copies, predictors)?;
    let dt = gpu.engine.ctx.w.dt;
    let name = match plan {
        Some((_, label)) => format!("{} ({label})", files.identity),
        None => files.identity.clone(),
    };
    compare(&name, &mut cpu, &mut gpu, dt, prompts, steps)
}

/// Batched sparse decoding against the same engine decoding each prompt alone: an invariant of the union kept sets
/// (each row uses only its own units, so a row's tokens must not depend on what it is batched with).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchCheck {
    pub model: String,
    pub rows: usize,
    /// Prompts compared (whole groups of `rows`).
    pub prompts: usize,
    pub steps: usize,
    pub identical: usize,
    /// Prompts whose first divergence sits where the single-row run's top-2 log-prob margin is under 0.05.
    pub divergences_at_near_ties: usize,
    pub worst_margin: f64,
    pub pass: bool,
}

/// Load `files` on the engine under `plan` (None: dense) and decode `prompts` greedily in groups of `rows` (each
/// group cut to its shortest prompt), then each prompt alone; compare the tokens row by row.
#[allow(clippy::too_many_arguments)]
pub fn batched(
    files: &ModelFiles,
    dt: Option<Half>,
    prompts: &[Vec<u32>],
    steps: usize,
    rows: usize,
    plan: Option<(&crate::sparse::Plan, &str)>,
    copies: Option<&crate::sparse::quant::QScoreCopies>,
    predictors: Option<&crate::predictor::Predictors<crate::backend::CpuBackend>>,
) -> Result<BatchCheck, String> {
    let mut gpu = engine_decoder(files, dt, plan.map(|(p, _)| p), copies, predictors)?;
    let name = match plan {
        Some((_, label)) => format!("{} ({label})", files.identity),
        None => files.identity.clone(),
    };
    let limit = gpu.config().position_limit();
    let (mut identical, mut near, mut worst, mut n) = (0, 0, 0f64, 0);
    let mut steps_run = steps;
    for group in prompts.chunks(rows).filter(|g| g.len() == rows) {
        let len = group.iter().map(|p| p.len()).min().unwrap_or(0);
        if len == 0 {
            continue;
        }
        let steps = limit.map_or(steps, |l| steps.min(l.saturating_sub(len)));
        if steps == 0 {
            continue;
        }
        steps_run = steps;
        let cut: Vec<Vec<u32>> = group.iter().map(|p| p[..len].to_vec()).collect();
        // Together.
        gpu.reset();
        gpu.prefill(&cut, None).map_err(|e| format!("batched prefill: {e}"))?;
        let mut together = vec![Vec::with_capacity(steps); rows];
        for j in 0..steps {
            let t = gpu.greedy().map_err(|e| format!("batched greedy: {e}"))?;
            for (r, &x) in t.iter().enumerate() {
                together[r].push(x);
            }
            if j + 1 < steps {
                gpu.step(&t).map_err(|e| format!("batched step: {e}"))?;
            }
        }
        // Alone, with the top-2 margin at every step.
        for (r, p) in cut.iter().enumerate() {
            gpu.reset();
            gpu.prefill(std::slice::from_ref(p), None).map_err(|e| format!("prefill: {e}"))?;
            let mut alone = Vec::with_capacity(steps);
            let mut margins = Vec::with_capacity(steps);
            for j in 0..steps {
                let l = gpu.logits().map_err(|e| format!("logits: {e}"))?;
                margins.push(top2_margin(&l[0]));
                let x = gpu.greedy().map_err(|e| format!("greedy: {e}"))?[0];
                alone.push(x);
                if j + 1 < steps {
                    gpu.step(&[x]).map_err(|e| format!("step: {e}"))?;
                }
            }
            n += 1;
            match alone.iter().zip(&together[r]).position(|(a, b)| a != b) {
                None => identical += 1,
                Some(i) => {
                    worst = worst.max(margins[i]);
                    if margins[i] < 0.05 {
                        near += 1;
                    }
                }
            }
        }
    }
    let pass = n > 0 && identical * 10 >= n * 9 && identical + near == n;
    Ok(BatchCheck { model: name, rows, prompts: n, steps: steps_run, identical, divergences_at_near_ties: near, worst_margin: worst, pass })
}
