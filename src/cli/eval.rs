//! `dejavu eval`: zero-shot accuracy, perplexity and realised sparsity for dense and sparse modes.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};

use dejavu::backend::{dispatch, BackendTask};
use dejavu::calibrate::Thresholds;
use dejavu::eval::{run_task, tasks, Evaluator, TaskResult};
use dejavu::model::sparse::{HeadRule, LayerPlan, MlpRule, SparsityPlan, SparsityStats};
use dejavu::ModelFiles;

use super::common::{load_model, resolve, ModelArgs};

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Tasks, comma-separated (default: all eight).
    #[arg(long, value_delimiter = ',', default_value = "arc_easy,boolq,copa,hellaswag,lambada_openai,openbook_qa,piqa,winogrande")]
    pub tasks: Vec<String>,
    /// Directory of task files.
    #[arg(long, env = "DEJAVU_TASKS", default_value = "../shared/data/tasks")]
    pub tasks_dir: PathBuf,
    /// dense | cats | oracle | dejavu; `MODE@S` sets the MLP sparsity S (cats, oracle; dejavu overrides its k).
    #[arg(long, default_value = "dense")]
    pub mode: String,
    /// MLP sparsity for --mode (same as MODE@S).
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// Fraction of attention heads dropped per token in oracle mode (and dejavu, overriding its k).
    #[arg(long)]
    pub head_sparsity: Option<f64>,
    /// Several modes in one run, compared to the first (e.g. dense,cats@0.5,oracle@0.5).
    #[arg(long, value_delimiter = ',')]
    pub compare: Vec<String>,
    /// Thresholds file from `dejavu calibrate` (cats mode).
    #[arg(long)]
    pub thresholds: Option<PathBuf>,
    /// Predictor directory from `dejavu train-predictors` (dejavu mode).
    #[arg(long)]
    pub predictors: Option<PathBuf>,
    /// First N examples of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also report perplexity on this text file.
    #[arg(long)]
    pub ppl: Option<PathBuf>,
    /// Tokens of --ppl text scored.
    #[arg(long, default_value_t = 16384)]
    pub ppl_tokens: usize,
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    #[arg(long, default_value_t = 512)]
    pub stride: usize,
    /// Longest sequence scored (contexts are cut from the left).
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Write every scored request (token ids, log-likelihood, greedy match, gold) as JSON lines to this file,
    /// for cross-checking with another implementation (scripts/hf_eval_check.py).
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// Directory for results.json, results.csv and layers.csv.
    #[arg(long, default_value = "dejavu-eval")]
    pub out: PathBuf,
}

/// One evaluation mode, parsed from `MODE[@S]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Mode {
    pub kind: String,
    pub sparsity: Option<f64>,
}

impl Mode {
    pub fn parse(spec: &str, default_sparsity: Option<f64>) -> anyhow::Result<Mode> {
        let (kind, s) = match spec.split_once('@') {
            Some((k, s)) => (k, Some(s.parse::<f64>().map_err(|_| anyhow::anyhow!("mode `{spec}`: `{s}` is not a number"))?)),
            None => (spec, default_sparsity),
        };
        if !["dense", "cats", "oracle", "dejavu"].contains(&kind) {
            bail!("mode `{spec}`: unknown; expected dense, cats@S, oracle@S or dejavu[@S]");
        }
        if let Some(s) = s {
            if !(0.0..1.0).contains(&s) {
                bail!("mode `{spec}`: sparsity {s} is not in [0, 1)");
            }
        }
        if matches!(kind, "cats" | "oracle") && s.is_none() {
            bail!("mode `{spec}` needs a sparsity: write {kind}@0.5 or pass --sparsity");
        }
        Ok(Mode { kind: kind.to_string(), sparsity: if kind == "dense" { None } else { s } })
    }

    pub fn label(&self) -> String {
        match self.sparsity {
            Some(s) => format!("{}@{s}", self.kind),
            None => self.kind.clone(),
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let modes: Vec<Mode> = if args.compare.is_empty() {
        vec![Mode::parse(&args.mode, args.sparsity)?]
    } else {
        args.compare.iter().map(|m| Mode::parse(m, None)).collect::<anyhow::Result<_>>()?
    };
    let specs: Vec<&'static tasks::TaskSpec> = args.tasks.iter().map(|t| tasks::spec(t)).collect::<anyhow::Result<_>>()?;
    // Read every task file up front so a bad line fails before any model work.
    let loaded: Vec<tasks::Task> =
        specs.iter().map(|s| tasks::load(&args.tasks_dir, s, args.limit)).collect::<anyhow::Result<_>>()?;
    let files = resolve(&args.model.model)?;
    dispatch(args.model.device, Task { args: args.clone(), files, modes, tasks: loaded })
}

struct Task {
    args: Args,
    files: ModelFiles,
    modes: Vec<Mode>,
    tasks: Vec<tasks::Task>,
}

/// Results of one mode.
#[derive(serde::Serialize)]
struct ModeResult {
    mode: Mode,
    tasks: Vec<TaskResult>,
    ppl: Option<dejavu::ppl::PplResult>,
    ppl_mlp_sparsity: Option<f64>,
    layers: Vec<LayerRow>,
}

#[derive(serde::Serialize)]
struct LayerRow {
    layer: usize,
    mlp_sparsity: f64,
    mlp_token_min: f64,
    mlp_token_max: f64,
    head_sparsity: f64,
}

impl BackendTask for Task {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let Task { args, files, modes, tasks } = self;
        let identity = files.identity().context("while fingerprinting the model")?;
        let cfg = files.config.clone();
        let thresholds = match &args.thresholds {
            Some(p) => Some(Thresholds::load(p, &identity)?),
            None => None,
        };
        if let (dejavu::Family::Opt, true) = (cfg.family, args.ppl.is_some() && args.ctx > cfg.max_positions) {
            bail!("--ctx {} exceeds the model's max_position_embeddings {}", args.ctx, cfg.max_positions);
        }
        if args.stride == 0 || args.stride > args.ctx {
            bail!("--stride must be in 1..=--ctx ({}) (got {})", args.ctx, args.stride);
        }
        let predictors = match &args.predictors {
            Some(dir) => Some(dejavu::predictor::Predictors::<B>::load(dir, &identity, &device)?),
            None => None,
        };
        let model = load_model::<B>(&files, &device, false)?;
        let eot = cfg.eos_token_ids.first().copied().or(cfg.bos_token_id).unwrap_or(0);
        let ppl_ids: Option<Vec<u32>> = match &args.ppl {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("while reading {}", p.display()))?;
                let enc = files.tokenizer.encode(text.as_str(), true).map_err(|e| anyhow::anyhow!("{}: tokenization failed: {e}", p.display()))?;
                let mut ids = enc.get_ids().to_vec();
                ids.truncate(args.ppl_tokens);
                Some(ids)
            }
            None => None,
        };
        let head_k = |s: f64| ((1.0 - s) * cfg.heads as f64).round().max(1.0) as usize;
        let mut results: Vec<ModeResult> = Vec::new();
        let mut dump = match &args.dump {
            Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("while creating {}", p.display()))?)),
            None => None,
        };
        for mode in &modes {
            let layers: Vec<LayerPlan> = match mode.kind.as_str() {
                "dense" => vec![LayerPlan::DENSE; cfg.layers],
                "cats" => {
                    let s = mode.sparsity.unwrap_or(0.0);
                    let (t, path) = match (&thresholds, &args.thresholds) {
                        (Some(t), Some(p)) => (t, p),
                        _ => bail!("mode {}: needs --thresholds FILE from `dejavu calibrate`", mode.label()),
                    };
                    let level = t.level(s).ok_or_else(|| {
                        anyhow::anyhow!(
                            "{}: no thresholds for sparsity {s} (has {})",
                            path.display(),
                            t.levels.iter().map(|l| l.sparsity.to_string()).collect::<Vec<_>>().join(", ")
                        )
                    })?;
                    level.thresholds.iter().map(|&th| LayerPlan { mlp: MlpRule::Threshold(th), heads: HeadRule::Dense }).collect()
                }
                "oracle" => {
                    let k = ((1.0 - mode.sparsity.unwrap_or(0.0)) * cfg.ffn as f64).round() as usize;
                    let heads = match args.head_sparsity {
                        Some(hs) => HeadRule::OracleTopK(head_k(hs)),
                        None => HeadRule::Dense,
                    };
                    vec![LayerPlan { mlp: MlpRule::OracleTopK(k), heads }; cfg.layers]
                }
                _ => {
                    let Some(p) = &predictors else {
                        bail!("mode {}: needs --predictors DIR from `dejavu train-predictors`", mode.label());
                    };
                    (0..cfg.layers)
                        .map(|l| LayerPlan {
                            mlp: MlpRule::PredictedTopK(match mode.sparsity {
                                Some(s) => ((1.0 - s) * cfg.ffn as f64).round() as usize,
                                None => p.k_neurons(l),
                            }),
                            heads: HeadRule::PredictedTopK(match args.head_sparsity {
                                Some(hs) => head_k(hs),
                                None => p.k_heads(l),
                            }),
                        })
                        .collect()
                }
            };
            let scorer = predictors.as_ref().map(|p| p as &dyn dejavu::model::sparse::Scorer<B>);
            let plan = SparsityPlan { layers, scorer };
            let ev = Evaluator { model: &model, tokenizer: &files.tokenizer, plan: Some(&plan), max_len: args.max_len, empty_context_token: eot };
            let mut task_results = Vec::new();
            let mut all_stats = SparsityStats::new(cfg.layers);
            for task in &tasks {
                let bar = ProgressBar::new(task.examples.len() as u64);
                bar.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} examples {per_sec} eta {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message(format!("{} {}", mode.label(), task.spec.name));
                let mut dump_err = None;
                let r = run_task(&ev, task, |i, scores| {
                    bar.inc(1);
                    if let Some(w) = dump.as_mut() {
                        let ex = &task.examples[i];
                        let rec = serde_json::json!({
                            "mode": mode.label(), "task": task.spec.name, "example": i, "gold": ex.gold,
                            "choice_bytes": ex.choice_bytes, "requests": scores,
                        });
                        if let Err(e) = writeln!(w, "{rec}") {
                            dump_err = Some(e);
                        }
                    }
                })
                .with_context(|| format!("while evaluating {}", task.path.display()))?;
                if let Some(e) = dump_err {
                    bail!("while writing the --dump file: {e}");
                }
                bar.finish_and_clear();
                all_stats.merge(&r.stats);
                task_results.push(r);
            }
            let (ppl, ppl_sp) = match &ppl_ids {
                Some(ids) if ids.len() >= 2 => {
                    let mut st = SparsityStats::new(cfg.layers);
                    let r = dejavu::ppl::perplexity(&model, ids, args.ctx, args.stride, Some(&plan), Some(&mut st), |_| {});
                    all_stats.merge(&st);
                    (Some(r), Some(st.mlp_sparsity()))
                }
                _ => (None, None),
            };
            let layers = all_stats
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| LayerRow {
                    layer: i,
                    mlp_sparsity: l.mlp_sparsity(),
                    mlp_token_min: if l.tokens > 0 { l.mlp_token_min } else { 0.0 },
                    mlp_token_max: l.mlp_token_max,
                    head_sparsity: l.head_sparsity(),
                })
                .collect();
            results.push(ModeResult { mode: mode.clone(), tasks: task_results, ppl, ppl_mlp_sparsity: ppl_sp, layers });
        }
        report(&args, &files.identity, &results)
    }
}

fn report(args: &Args, model: &str, results: &[ModeResult]) -> anyhow::Result<()> {
    let mut md = String::new();
    writeln!(md, "| mode | task | n | acc | acc_norm | MLP sparsity | head sparsity | examples/s |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for m in results {
        for t in &m.tasks {
            let norm = match (t.acc_norm, t.acc_norm_stderr) {
                (Some(a), Some(e)) => format!("{:.4} ± {:.4}", a, e),
                _ => "—".into(),
            };
            writeln!(
                md,
                "| {} | {} | {} | {:.4} ± {:.4} | {} | {:.3} | {:.3} | {:.2} |",
                m.mode.label(), t.task, t.n, t.acc, t.acc_stderr, norm, t.mlp_sparsity, t.head_sparsity, t.examples_per_s
            )?;
        }
        if let Some(p) = &m.ppl {
            writeln!(md, "| {} | ppl ({} tokens) | {} | {:.4} | — | {:.3} | — | — |", m.mode.label(), p.scored, p.scored, p.ppl, m.ppl_mlp_sparsity.unwrap_or(0.0))?;
        }
    }
    if results.len() > 1 {
        let base = &results[0];
        writeln!(md, "\n| mode | mean acc | Δ acc vs {} (points) | ppl | Δ ppl |", base.mode.label())?;
        writeln!(md, "|---|---|---|---|---|")?;
        let mean = |m: &ModeResult| m.tasks.iter().map(|t| t.acc).sum::<f64>() / m.tasks.len().max(1) as f64;
        for m in results {
            let (ppl, dppl) = match (&m.ppl, &base.ppl) {
                (Some(p), Some(b)) => (format!("{:.3}", p.ppl), format!("{:+.2}%", 100.0 * (p.ppl / b.ppl - 1.0))),
                _ => ("—".into(), "—".into()),
            };
            writeln!(md, "| {} | {:.4} | {:+.2} | {} | {} |", m.mode.label(), mean(m), 100.0 * (mean(m) - mean(base)), ppl, dppl)?;
        }
    }
    print!("{md}");
    std::fs::create_dir_all(&args.out).with_context(|| format!("while creating {}", args.out.display()))?;
    let json = serde_json::json!({"model": model, "args": args, "modes": results});
    let p = args.out.join("results.json");
    std::fs::write(&p, serde_json::to_string_pretty(&json)?).with_context(|| format!("while writing {}", p.display()))?;
    let p = args.out.join("results.csv");
    let mut w = csv::Writer::from_path(&p).with_context(|| format!("while writing {}", p.display()))?;
    w.write_record(["mode", "task", "n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "mlp_sparsity", "head_sparsity", "examples_per_s"])?;
    for m in results {
        for t in &m.tasks {
            w.write_record([
                m.mode.label(), t.task.clone(), t.n.to_string(), t.acc.to_string(), t.acc_stderr.to_string(),
                t.acc_norm.map(|x| x.to_string()).unwrap_or_default(), t.acc_norm_stderr.map(|x| x.to_string()).unwrap_or_default(),
                t.mlp_sparsity.to_string(), t.head_sparsity.to_string(), t.examples_per_s.to_string(),
            ])?;
        }
        if let Some(pp) = &m.ppl {
            w.write_record([m.mode.label(), "ppl".into(), pp.scored.to_string(), pp.ppl.to_string(), String::new(), String::new(), String::new(),
                m.ppl_mlp_sparsity.unwrap_or(0.0).to_string(), String::new(), String::new()])?;
        }
    }
    w.flush()?;
    let p = args.out.join("layers.csv");
    let mut w = csv::Writer::from_path(&p).with_context(|| format!("while writing {}", p.display()))?;
    w.write_record(["mode", "layer", "mlp_sparsity", "mlp_token_min", "mlp_token_max", "head_sparsity"])?;
    for m in results {
        for l in &m.layers {
            w.write_record([m.mode.label(), l.layer.to_string(), l.mlp_sparsity.to_string(), l.mlp_token_min.to_string(), l.mlp_token_max.to_string(), l.head_sparsity.to_string()])?;
        }
    }
    w.flush()?;
    eprintln!("wrote {}/results.json, results.csv, layers.csv", args.out.display());
    Ok(())
}
