//! `dejavu engine-check` (hidden; for the GPU box): the CUDA engine against CPU references, kernel by kernel on
//! random inputs and model by model against the burn forward. Prints tables; exits 1 when a check fails.

use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Models to compare with the burn reference (directories, GGUF files, Hub ids).
    #[arg(long, num_args = 0..)]
    pub models: Vec<String>,
    /// Text file whose first non-empty lines become the prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Number of prompts.
    #[arg(long, default_value_t = 50)]
    pub n: usize,
    /// Greedy steps per prompt.
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Tokens kept of each prompt line.
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Weight type of the engine (default: by checkpoint).
    #[arg(long, value_enum)]
    pub dtype: Option<dejavu::source::weights::Half>,
    /// Skip the kernel checks.
    #[arg(long)]
    pub no_kernels: bool,
    /// Also compare both engines under CATS: a `calibrate` thresholds file (with `--sparsity`), for one model.
    #[arg(long, requires = "sparsity")]
    pub thresholds: Option<PathBuf>,
    /// The thresholds file's level to run.
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// Also compare both engines under CATS with this one threshold in every layer (any model).
    #[arg(long)]
    pub cats_t: Option<f32>,
    /// Also compare both engines, and their kept sets, under the top-k rules at this MLP sparsity (SwiGLU models):
    /// `exactdown@S`, and `qscore@S` with `--qscore`.
    #[arg(long, value_name = "S")]
    pub topk_sparsity: Option<f64>,
    /// Score copies from `calibrate --rule qscore` (int4, groups of 32) for the `qscore` check; one model.
    #[arg(long, value_name = "FILE", requires = "topk_sparsity")]
    pub qscore: Option<PathBuf>,
    /// Trained predictors (`train-predictors`) for the `dejavu@S` check at `--topk-sparsity` (MLP predicted, heads
    /// dense; any family); one model.
    #[arg(long, value_name = "DIR")]
    pub predictors: Option<PathBuf>,
    /// With `--predictors`: also compare both engines, and the kept head sets, with this fraction of heads dropped
    /// by the look-ahead head predictors (`--head-kv all`; MLP dense).
    #[arg(long, value_name = "H", requires = "predictors")]
    pub head_sparsity: Option<f64>,
    /// The key/value heads of dropped heads under `--head-sparsity`: computed (`all`) or skipped (`kept`).
    #[arg(long, value_enum, default_value_t = dejavu::sparse::HeadKv::All)]
    pub head_kv: dejavu::sparse::HeadKv,
    /// Also decode the prompts in batches of these sizes (3-16 rows run the tensor-core kernels) under every plan
    /// checked, against each prompt decoded alone on the engine: identical tokens on 90% of the prompts, the other
    /// divergences at a top-2 margin under 0.05 of the single run.
    #[arg(long, num_args = 1.., value_name = "ROWS", value_parser = clap::value_parser!(u32).range(2..=16))]
    pub batched: Vec<u32>,
    /// Write every check as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Only compile the kernels to PTX for this compute capability (e.g. 90 for sm_90), part by part in parallel,
    /// and list what each part holds; needs NVRTC, not a GPU.
    #[arg(long, value_name = "SM", value_parser = clap::value_parser!(u32).range(50..200))]
    pub compile_only: Option<u32>,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("engine-check needs a build with `--features cuda`")
}

#[cfg(feature = "cuda")]
pub fn run(args: Args) -> anyhow::Result<()> {
    use super::out;
    use dejavu::cuda::check;
    use dejavu::sparse::plan::{HeadRule, LayerPlan, MlpRule};
    if let Some(sm) = args.compile_only {
        let arch = ((sm / 10) as i32, (sm % 10) as i32);
        let (names, secs) = dejavu::cuda::kernels::compile_all_ptx(arch).map_err(|e| anyhow::anyhow!("engine-check: {e}"))?;
        let mut all: Vec<&String> = names.iter().flat_map(|(n, _)| n).collect();
        let total = all.len();
        all.sort();
        all.dedup();
        let mut s = String::from("| part | kernels | compile s |\n|---|---|---|\n");
        for (i, (n, t)) in names.iter().enumerate() {
            s += &format!("| {i} | {} | {t:.1} |\n", n.len());
        }
        s += &format!("\n{} parts compiled in {secs:.1} s (parallel): {total} kernels, {} distinct\n", names.len(), all.len());
        out(&s)?;
        if total != all.len() {
            anyhow::bail!("engine-check: {} kernels are compiled in more than one part", total - all.len());
        }
        return Ok(());
    }
    dejavu::cuda::probe().map_err(|e| anyhow::anyhow!("engine-check: {e}"))?;
    let mut failed = 0;
    let mut kernels = Vec::new();
    if !args.no_kernels {
        kernels = check::kernels(20261201).map_err(|e| anyhow::anyhow!("engine-check: {e}"))?;
        let mut s = String::from("| kernel | dtype | rel err | NaN/unwritten | pass |\n|---|---|---|---|---|\n");
        for k in &kernels {
            s += &format!("| {} | {} | {:.2e} | {} | {} |\n", k.kernel, k.dtype, k.rel_err, k.nan, if k.pass { "yes" } else { "NO" });
            failed += usize::from(!k.pass);
        }
        out(&s)?;
    }
    let mut models = Vec::new();
    let mut batches = Vec::new();
    if !args.models.is_empty() {
        let path = args.prompts.clone().ok_or_else(|| super::usage("--models needs --prompts FILE"))?;
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| l.len() > 8 && !l.starts_with('=')).take(args.n).collect();
        let mut s = String::from(
            "\n| model | dtype | prompts | steps | identical | divergences at margin < 0.05 | worst margin | max abs dlogprob | pass |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        let mut bs = String::from(
            "\n| model, batched against alone | rows | prompts | steps | identical | divergences at margin < 0.05 | worst margin | pass |\n|---|---|---|---|---|---|---|---|\n",
        );
        for m in &args.models {
            let files = super::common::resolve(m)?;
            let prompts: Vec<Vec<u32>> = lines
                .iter()
                .map(|l| {
                    let mut ids = files.tokenizer.encode(*l, true).map(|e| e.get_ids().to_vec()).unwrap_or_default();
                    ids.truncate(args.prompt_tokens);
                    ids.retain(|&t| (t as usize) < files.config.vocab_size);
                    ids
                })
                .filter(|p| p.len() >= 2)
                .collect();
            eprintln!("{}: {} prompts x {} steps", files.identity, prompts.len(), args.steps);
            let cfg = &files.config;
            let mut plans: Vec<(dejavu::sparse::Plan, String)> = Vec::new();
            let kept_line = |label: &str, kc: &check::KeptCheck| {
                format!(
                    "kept sets at {label}, {} ({}), same inputs: against the engine's function in f64 {} of {} (token, layer) pairs equal ({:.2}%, mean symmetric difference {:.3}): {}; against the burn reference {} equal ({:.2}%), mean symmetric difference {:.3} of {:.1} kept\n",
                    kc.model,
                    kc.dtype,
                    kc.engine_equal,
                    kc.total,
                    100.0 * kc.engine_equal as f64 / kc.total.max(1) as f64,
                    kc.engine_mean_symdiff,
                    if kc.pass { "pass" } else { "FAIL (< 99%)" },
                    kc.equal,
                    100.0 * kc.equal as f64 / kc.total.max(1) as f64,
                    kc.mean_symdiff,
                    kc.mean_kept
                )
            };
            if let Some(t) = args.cats_t {
                plans.push((
                    dejavu::sparse::Plan::uniform(cfg.layers, LayerPlan { mlp: MlpRule::Threshold { t }, heads: HeadRule::Dense }),
                    format!("cats t={t}"),
                ));
            }
            if let (Some(p), Some(sp)) = (&args.thresholds, args.sparsity) {
                let th = dejavu::calibrate::Thresholds::load(p, &files.identity()?)?;
                let level = th.level(sp).ok_or_else(|| super::usage(format!("--sparsity {sp}: {} has no such level", p.display())))?;
                plans.push((dejavu::calibrate::threshold_plan(&level.thresholds), format!("cats@{sp}")));
                let kc = check::kept_sets(&files, args.dtype, check::KeptRule::Cats(&level.thresholds), &prompts).map_err(|e| anyhow::anyhow!("{m}: kept sets: {e}"))?;
                out(&kept_line(&format!("cats@{sp}"), &kc))?;
                failed += usize::from(!kc.pass);
            }
            let copies = match &args.qscore {
                Some(p) => Some(dejavu::sparse::quant::QScoreCopies::load(p, &files.identity()?)?),
                None => None,
            };
            let predictors = match &args.predictors {
                Some(p) => Some(dejavu::predictor::Predictors::<dejavu::backend::CpuBackend>::load(p, &files.identity()?, &Default::default())?),
                None => None,
            };
            if let (Some(hsp), Some(p)) = (args.head_sparsity, &predictors) {
                if !(0.0..1.0).contains(&hsp) {
                    return Err(super::usage(format!("--head-sparsity {hsp}: not in [0, 1)")));
                }
                let k = dejavu::sparse::keep_count(hsp, cfg.heads).max(1);
                let label = format!("heads {k}/{} predicted, k/v {:?}", cfg.heads, args.head_kv).to_lowercase();
                let kc = check::kept_sets(&files, args.dtype, check::KeptRule::Heads(k, p), &prompts).map_err(|e| anyhow::anyhow!("{m}: kept heads: {e}"))?;
                out(&kept_line(&label, &kc))?;
                failed += usize::from(!kc.pass);
                let heads = HeadRule::PredictedTopK { k, kv: args.head_kv };
                plans.push((dejavu::sparse::Plan::uniform(cfg.layers, LayerPlan { mlp: MlpRule::Dense, heads }), label));
            }
            if let Some(sp) = args.topk_sparsity {
                if !(0.0..1.0).contains(&sp) {
                    return Err(super::usage(format!("--topk-sparsity {sp}: not in [0, 1)")));
                }
                let k = dejavu::sparse::keep_count(sp, cfg.ffn);
                let mut rules = Vec::new();
                if cfg.family == dejavu::config::Family::Llama {
                    rules.push((MlpRule::ExactDownTopK { k }, format!("exactdown@{sp}"), check::KeptRule::ExactDown(k)));
                    if let Some(c) = &copies {
                        rules.push((MlpRule::QScoreTopK { k }, format!("qscore@{sp}"), check::KeptRule::QScore(k, c)));
                    }
                } else {
                    eprintln!("{}: exactdown/qscore skipped (SwiGLU rules)", files.identity);
                }
                if let Some(p) = &predictors {
                    rules.push((MlpRule::PredictedTopK { k }, format!("dejavu@{sp} (MLP)"), check::KeptRule::Predicted(k, p)));
                }
                for (mlp, label, kr) in rules {
                    let kc = check::kept_sets(&files, args.dtype, kr, &prompts).map_err(|e| anyhow::anyhow!("{m}: kept sets: {e}"))?;
                    out(&kept_line(&label, &kc))?;
                    failed += usize::from(!kc.pass);
                    plans.push((dejavu::sparse::Plan::uniform(cfg.layers, LayerPlan { mlp, heads: HeadRule::Dense }), label));
                }
            }
            let runs = std::iter::once(None).chain(plans.iter().map(|(p, l)| Some((p, l.as_str()))));
            for plan in runs {
                let c = check::model(&files, args.dtype, &prompts, args.steps, plan, copies.as_ref(), predictors.as_ref()).map_err(|e| anyhow::anyhow!("{m}: {e}"))?;
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} | {:.4} | {:.4} | {} |\n",
                    c.model, c.dtype, c.prompts, c.steps, c.identical, c.divergences_at_near_ties, c.worst_margin, c.max_dlogprob, if c.pass { "yes" } else { "NO" }
                );
                failed += usize::from(!c.pass);
                models.push(c);
                for &rows in &args.batched {
                    let b = check::batched(&files, args.dtype, &prompts, args.steps, rows as usize, plan, copies.as_ref(), predictors.as_ref()).map_err(|e| anyhow::anyhow!("{m}: batched: {e}"))?;
                    bs += &format!(
                        "| {} | {} | {} | {} | {} | {} | {:.4} | {} |\n",
                        b.model, b.rows, b.prompts, b.steps, b.identical, b.divergences_at_near_ties, b.worst_margin, if b.pass { "yes" } else { "NO" }
                    );
                    failed += usize::from(!b.pass);
                    batches.push(b);
                }
            }
        }
        out(&s)?;
        if !args.batched.is_empty() {
            out(&bs)?;
        }
    }
    if let Some(p) = &args.json {
        dejavu::store::write_json(p, &serde_json::json!({ "kernels": kernels, "models": models, "batched": batches }))?;
    }
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}
