//! `dejavu eval`: zero-shot accuracy, perplexity and realised sparsity for dense and sparse modes.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};

use dejavu::backend::{dispatch, BackendTask};
use dejavu::eval::{run_task, tasks, Evaluator, TaskResult};
use dejavu::sparse::{Mode, SparsityStats};
use dejavu::store::{write_eval_results, ArtifactHeader, RunDir, EVAL_FORMAT, EVAL_VERSION};
use dejavu::ModelFiles;

use super::common::{
    check_device, check_engine_mode, engine_decoder, load_model, resolve, tokenize_file, uses_engine, AnyDecoder, DecodeArgs,
    WindowArgs,
};
use super::{out, usage, usage_of};

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub decode: DecodeArgs,
    /// Tasks, comma-separated (default: all eight).
    #[arg(long, value_delimiter = ',', default_value = "arc_easy,boolq,copa,hellaswag,lambada_openai,openbook_qa,piqa,winogrande")]
    pub tasks: Vec<String>,
    /// Directory of task files (default: $DEJAVU_SHARED/data/tasks, else ../shared/data/tasks).
    #[arg(long, env = "DEJAVU_TASKS")]
    pub tasks_dir: Option<PathBuf>,
    /// Several modes in one run, compared to the first (e.g. dense,cats@0.5,oracle@0.5); replaces --mode.
    #[arg(long, value_delimiter = ',', conflicts_with = "mode")]
    pub compare: Vec<Mode>,
    /// First N examples of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also report perplexity on this text file.
    #[arg(long)]
    pub ppl: Option<PathBuf>,
    /// Tokens of --ppl text scored.
    #[arg(long, default_value_t = 16384)]
    pub ppl_tokens: usize,
    /// The --ppl scoring window.
    #[command(flatten)]
    #[serde(flatten)]
    pub window: WindowArgs,
    /// Longest sequence scored (contexts are cut from the left).
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Write every scored request (token ids, log-likelihood, greedy match, gold) as JSON lines to this file,
    /// for cross-checking with another implementation (scripts/hf_eval_check.py).
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// Run directory: thresholds, predictors, rule calibration and score copies default to RUN/thresholds.json,
    /// RUN/predictors, RUN/rules.json and RUN/qscore.safetensors; results go to RUN/eval.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Directory for results.json, results.csv and layers.csv (default: RUN/eval with --run).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    let modes: Vec<Mode> = if args.compare.is_empty() { vec![args.decode.mode] } else { args.compare.clone() };
    if let Some(run) = &args.run {
        let run = RunDir::at(run);
        if args.decode.thresholds.is_none() && run.thresholds().is_file() {
            args.decode.thresholds = Some(run.thresholds());
        }
        if args.decode.predictors.is_none() && run.predictors_manifest().is_file() {
            args.decode.predictors = Some(run.predictors());
        }
        if args.decode.rules.is_none() && run.rules().is_file() {
            args.decode.rules = Some(run.rules());
        }
        if args.decode.qscore.is_none() && run.qscore().is_file() {
            args.decode.qscore = Some(run.qscore());
        }
        if args.out.is_none() {
            args.out = Some(run.eval());
        }
    }
    let Some(out_dir) = args.out.clone() else {
        return Err(usage("give --out DIR (or --run RUN to write into RUN/eval)"));
    };
    let stride = args.window.stride(None)?;
    check_device(args.decode.model.device)?;
    check_engine_mode(&args.decode, &modes)?;
    let tasks_dir = args.tasks_dir.clone().unwrap_or_else(|| {
        let shared = std::env::var_os("DEJAVU_SHARED").map_or_else(|| PathBuf::from("../shared"), PathBuf::from);
        shared.join("data/tasks")
    });
    let specs: Vec<&'static tasks::TaskSpec> = args.tasks.iter().map(|t| tasks::spec(t).map_err(usage_of)).collect::<anyhow::Result<_>>()?;
    // Read every task file and check the output directory up front, so a bad input fails before any model work.
    let loaded: Vec<tasks::Task> =
        specs.iter().map(|s| tasks::load(&tasks_dir, s, args.limit)).collect::<Result<_, _>>()?;
    std::fs::create_dir_all(&out_dir).with_context(|| format!("while creating the output directory {}", out_dir.display()))?;
    let files = resolve(&args.decode.model.model)?;
    // The CUDA engine needs no burn backend: generic code runs CPU-typed and idle.
    let kind = if uses_engine(&args.decode.model) { dejavu::backend::DeviceKind::Cpu } else { args.decode.model.device };
    dispatch(kind, Task { args: args.clone(), files, modes, tasks: loaded, out_dir, stride })
}

struct Task {
    args: Args,
    files: ModelFiles,
    modes: Vec<Mode>,
    tasks: Vec<tasks::Task>,
    out_dir: PathBuf,
    stride: usize,
}

/// Results of one mode.
#[derive(serde::Serialize)]
struct ModeResult {
    mode: Mode,
    tasks: Vec<TaskResult>,
    ppl: Option<dejavu::ppl::PplResult>,
    ppl_mlp_sparsity: Option<f64>,
    /// MLP weights read per token over the --ppl text, as a fraction of dense.
    ppl_mlp_read_fraction: Option<f64>,
    /// Over everything this mode scored (tasks and --ppl).
    mlp_read_fraction: f64,
    layers: Vec<LayerRow>,
}

#[derive(serde::Serialize)]
struct LayerRow {
    layer: usize,
    mlp_sparsity: f64,
    mlp_plan_sparsity: f64,
    mlp_natural_sparsity: f64,
    mlp_token_min: f64,
    mlp_token_max: f64,
    head_sparsity: f64,
    mlp_read_fraction: f64,
}

impl BackendTask for Task {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let Task { args, files, modes, tasks, out_dir, stride } = self;
        let cfg = files.config.clone();
        if args.ppl.is_some() {
            args.window.stride(cfg.position_limit())?;
        }
        let artifacts = args.decode.load::<B>(&modes, &files, &device)?;
        let ppl_ids: Option<Vec<u32>> = match &args.ppl {
            Some(p) => Some(tokenize_file(&files, p, Some(args.ppl_tokens))?),
            None => None,
        };
        let engine = uses_engine(&args.decode.model);
        let model = if engine { None } else { Some(load_model::<B>(&files, &device, false)?) };
        let mut engine_dec: Option<AnyDecoder<'static, B>> =
            if engine { Some(engine_decoder::<B>(&files, &args.decode, false)?) } else { None };
        let eot = cfg.eos_token_ids.first().copied().or(cfg.bos_token_id).unwrap_or(0);
        let mut results: Vec<ModeResult> = Vec::new();
        let mut dump = match &args.dump {
            Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("while creating {}", p.display()))?)),
            None => None,
        };
        let ev = Evaluator { tokenizer: &files.tokenizer, max_len: args.max_len, empty_context_token: eot };
        for &mode in &modes {
            let plan = args.decode.plan(mode, &cfg, &artifacts)?;
            let mut ref_dec = match &model {
                Some(m) => Some(AnyDecoder::Ref(artifacts.decoder(m, &plan)?)),
                None => None,
            };
            let dec: &mut dyn dejavu::decode::Decoder = match (&mut ref_dec, &mut engine_dec) {
                (Some(d), _) => d.as_dyn(),
                (None, Some(d)) => d.as_dyn(),
                (None, None) => bail!("internal: no decoder"),
            };
            let mut task_results = Vec::new();
            let mut all_stats = SparsityStats::new(cfg.layers);
            for task in &tasks {
                let bar = ProgressBar::new(task.examples.len() as u64);
                bar.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} examples {per_sec} eta {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message(format!("{mode} {}", task.spec.name));
                let mut dump_err = None;
                let r = run_task(&ev, &mut *dec, task, |i, scores| {
                    bar.inc(1);
                    if let Some(w) = dump.as_mut() {
                        let ex = &task.examples[i];
                        let rec = serde_json::json!({
                            "mode": mode, "task": task.spec.name, "example": i, "gold": ex.gold,
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
                let mut r = r;
                r.mlp_read_fraction = read_fraction(mode, &r.stats);
                task_results.push(r);
            }
            let (ppl, ppl_sp, ppl_read) = match &ppl_ids {
                Some(ids) if ids.len() >= 2 => {
                    let bar = ProgressBar::new(dejavu::ppl::windows(ids.len(), args.window.ctx, stride).iter().map(|w| (w.1 - w.0) as u64).sum());
                    bar.set_style(
                        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_message(format!("{mode} ppl"));
                    dec.take_stats();
                    let r = dejavu::ppl::perplexity(&mut *dec, ids, args.window.ctx, stride, |n| bar.inc(n as u64))
                        .context("while scoring --ppl")?;
                    bar.finish_and_clear();
                    let st = dec.take_stats();
                    all_stats.merge(&st);
                    (Some(r), Some(st.mlp_sparsity()), Some(read_fraction(mode, &st)))
                }
                _ => (None, None, None),
            };
            let layers = all_stats
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| LayerRow {
                    layer: i,
                    mlp_sparsity: l.mlp_sparsity(),
                    mlp_plan_sparsity: l.mlp_plan_sparsity(),
                    mlp_natural_sparsity: l.mlp_natural_sparsity(),
                    mlp_token_min: l.token_min(),
                    mlp_token_max: l.mlp_token_max,
                    head_sparsity: l.head_sparsity(),
                    mlp_read_fraction: if mode.is_dense() { 1.0 } else { l.mlp_read_fraction() },
                })
                .collect();
            let mlp_read_fraction = read_fraction(mode, &all_stats);
            results.push(ModeResult {
                mode,
                tasks: task_results,
                ppl,
                ppl_mlp_sparsity: ppl_sp,
                ppl_mlp_read_fraction: ppl_read,
                mlp_read_fraction,
                layers,
            });
            // Each finished mode is on disk at once, so a late failure loses only the mode it happened in.
            write_results(&args, &out_dir, &artifacts.identity, &results)?;
        }
        out(&summary(&results)?)?;
        eprintln!("wrote {}/results.json, results.csv, layers.csv", out_dir.display());
        Ok(())
    }
}

/// MLP weights read per token as a fraction of dense: 1 for the dense mode (whose decoder counts nothing).
fn read_fraction(mode: Mode, stats: &SparsityStats) -> f64 {
    if mode.is_dense() { 1.0 } else { stats.mlp_read_fraction() }
}

/// The markdown tables printed on stdout.
fn summary(results: &[ModeResult]) -> anyhow::Result<String> {
    let mut md = String::new();
    writeln!(md, "| mode | task | n | acc | acc_norm | MLP sparsity | head sparsity | MLP bytes read | examples/s |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    for m in results {
        for t in &m.tasks {
            let norm = match (t.acc_norm, t.acc_norm_stderr) {
                (Some(a), Some(e)) => format!("{:.4} ± {:.4}", a, e),
                _ => "—".into(),
            };
            writeln!(
                md,
                "| {} | {} | {} | {:.4} ± {:.4} | {} | {:.3} | {:.3} | {:.3} | {:.2} |",
                m.mode, t.task, t.n, t.acc, t.acc_stderr, norm, t.mlp_sparsity, t.head_sparsity, t.mlp_read_fraction, t.examples_per_s
            )?;
        }
        if let Some(p) = &m.ppl {
            writeln!(
                md,
                "| {} | ppl ({} tokens) | {} | {:.4} | — | {:.3} | — | {:.3} | — |",
                m.mode,
                p.scored,
                p.scored,
                p.ppl,
                m.ppl_mlp_sparsity.unwrap_or(0.0),
                m.ppl_mlp_read_fraction.unwrap_or(0.0)
            )?;
        }
    }
    if results.len() > 1 {
        let base = &results[0];
        writeln!(md, "\n| mode | MLP bytes read | mean acc | Δ acc vs {} (points) | ppl | Δ ppl |", base.mode)?;
        writeln!(md, "|---|---|---|---|---|---|")?;
        let mean = |m: &ModeResult| m.tasks.iter().map(|t| t.acc).sum::<f64>() / m.tasks.len().max(1) as f64;
        for m in results {
            let (ppl, dppl) = match (&m.ppl, &base.ppl) {
                (Some(p), Some(b)) => (format!("{:.3}", p.ppl), format!("{:+.2}%", 100.0 * (p.ppl / b.ppl - 1.0))),
                _ => ("—".into(), "—".into()),
            };
            writeln!(
                md,
                "| {} | {:.3} | {:.4} | {:+.2} | {} | {} |",
                m.mode,
                m.mlp_read_fraction,
                mean(m),
                100.0 * (mean(m) - mean(base)),
                ppl,
                dppl
            )?;
        }
    }
    Ok(md)
}

/// Write results.json, results.csv and layers.csv into `dir`, each atomically.
fn write_results(args: &Args, dir: &std::path::Path, model: &dejavu::source::ModelIdentity, results: &[ModeResult]) -> anyhow::Result<()> {
    let header = ArtifactHeader::new(EVAL_FORMAT, EVAL_VERSION, model.clone(), args);
    let json = serde_json::json!({ "model": model.source, "modes": results });
    let opt = |x: Option<f64>| x.map(|x| x.to_string()).unwrap_or_default();
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "mode", "task", "n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "ppl", "mlp_sparsity", "head_sparsity", "examples_per_s",
        "mlp_read_fraction",
    ])?;
    for m in results {
        for t in &m.tasks {
            w.write_record([
                m.mode.to_string(), t.task.clone(), t.n.to_string(), t.acc.to_string(), t.acc_stderr.to_string(),
                opt(t.acc_norm), opt(t.acc_norm_stderr), String::new(),
                t.mlp_sparsity.to_string(), t.head_sparsity.to_string(), t.examples_per_s.to_string(),
                t.mlp_read_fraction.to_string(),
            ])?;
        }
        if let Some(pp) = &m.ppl {
            w.write_record([m.mode.to_string(), "ppl".into(), pp.scored.to_string(), String::new(), String::new(), String::new(), String::new(),
                pp.ppl.to_string(), opt(m.ppl_mlp_sparsity), String::new(), String::new(), opt(m.ppl_mlp_read_fraction)])?;
        }
    }
    let results_csv = w.into_inner()?;
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "mode", "layer", "mlp_sparsity", "mlp_plan_sparsity", "mlp_natural_sparsity", "mlp_token_min", "mlp_token_max", "head_sparsity",
        "mlp_read_fraction",
    ])?;
    for m in results {
        for l in &m.layers {
            w.write_record([
                m.mode.to_string(), l.layer.to_string(), l.mlp_sparsity.to_string(), l.mlp_plan_sparsity.to_string(),
                l.mlp_natural_sparsity.to_string(), l.mlp_token_min.to_string(), l.mlp_token_max.to_string(), l.head_sparsity.to_string(),
                l.mlp_read_fraction.to_string(),
            ])?;
        }
    }
    let layers_csv = w.into_inner()?;
    write_eval_results(dir, &header, &json, &[("results.csv", &results_csv), ("layers.csv", &layers_csv)])
        .with_context(|| format!("while writing the results into {}", dir.display()))?;
    Ok(())
}
