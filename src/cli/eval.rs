//! `dejavu eval`: zero-shot accuracy, perplexity and realised sparsity for dense and sparse modes.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;

use dejavu::backend::{dispatch, BackendTask};
use dejavu::decode::correct::Accept;
use dejavu::eval::{run_task_with, tasks, Continuation, Evaluator, TaskResult};
use dejavu::sparse::{Mode, SparsityStats};
use dejavu::store::{write_eval_results, ArtifactHeader, RunDir, EVAL_FORMAT, EVAL_VERSION};
use dejavu::ModelFiles;

use super::common::{
    check_device, check_engine_mode, resolve, tokenize_file, uses_engine, DecodeArgs, Decoders, WindowArgs,
};
use super::{out, usage};

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub decode: DecodeArgs,
    /// Tasks, comma-separated (default: the eight built-in ones). A name is a built-in task (also
    /// lambada_openai_gen: LAMBADA by greedy generation), or any NAME.jsonl in --tasks-dir (multiple choice,
    /// schema or language modelling, told by its fields; a NAME.toml beside it may set kind, delimiter, file,
    /// max_tokens), or a path to a .jsonl file or a .toml task definition.
    #[arg(long, value_delimiter = ',', default_value = "arc_easy,boolq,copa,hellaswag,lambada_openai,openbook_qa,piqa,winogrande")]
    pub tasks: Vec<String>,
    /// Text between context and continuation for tasks that define none (neither built in nor set in their
    /// .toml); default: a space.
    #[arg(long, value_name = "TEXT")]
    pub delimiter: Option<String>,
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
    /// Generation tasks in sparse modes: Sirius correction (the sparse mode decodes, the dense model checks every
    /// --period tokens over the shared KV cache and keeps the tokens it accepts). Dense modes decode as usual.
    #[arg(long, help_heading = "Correction")]
    #[serde(default)]
    pub correct: bool,
    /// Sparse tokens between dense checks.
    #[arg(long, default_value_t = 8, requires = "correct", help_heading = "Correction")]
    #[serde(default = "default_period")]
    pub period: usize,
    /// Keep a sparse token while the dense model gives it probability >= P, or only if it is the dense argmax.
    #[arg(long, value_name = "P|argmax", default_value = "0.1", requires = "correct", help_heading = "Correction")]
    #[serde(default = "default_accept")]
    pub accept: Accept,
}

fn default_period() -> usize {
    8
}

fn default_accept() -> Accept {
    Accept::Prob(0.1)
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
    let tasks_dir = args.tasks_dir.clone().unwrap_or_else(|| dejavu::recipe::shared_dir().join("data/tasks"));
    let specs: Vec<tasks::TaskSpec> = args.tasks.iter().map(|t| tasks::find(t, &tasks_dir)).collect::<Result<_, _>>()?;
    if args.delimiter.is_some() && specs.iter().all(|s| s.delimiter.is_some()) {
        return Err(usage(format!(
            "--delimiter: every task asked for defines its own delimiter ({}); change it in a NAME.toml beside the task file",
            specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    if args.correct {
        if args.period == 0 {
            return Err(usage("--period must be at least 1"));
        }
        if modes.iter().all(|m| *m == Mode::Dense) {
            return Err(usage("--correct needs a sparse mode in --mode or --compare (dense decoding has nothing to correct)"));
        }
    }
    // Read every task file and check the output directory up front, so a bad input fails before any model work.
    let loaded: Vec<tasks::Task> =
        specs.iter().map(|s| tasks::read(s, args.delimiter.as_deref(), args.limit)).collect::<Result<_, _>>()?;
    if args.correct && !loaded.iter().any(|t| t.kind == tasks::TaskKind::Generation) {
        return Err(usage("--correct: no generation task in --tasks (e.g. lambada_openai_gen, or kind = \"generation\" in a task definition)"));
    }
    super::common::check_output_dir(&out_dir).with_context(|| format!("while preparing the output directory {}", out_dir.display()))?;
    if let Some(d) = &args.dump {
        super::common::check_output_file(d)?;
    }
    if let Some(p) = args.ppl.as_ref().filter(|p| !p.is_file()) {
        bail!("{}: no such file (--ppl)", p.display());
    }
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
    /// How generation tasks were decoded in this mode.
    continuation: Continuation,
    tasks: Vec<TaskResult>,
    ppl: Option<dejavu::ppl::PplResult>,
    ppl_mlp_sparsity: Option<f64>,
    /// MLP weights read per token over the --ppl text, as a fraction of dense.
    ppl_mlp_read_fraction: Option<f64>,
    /// Over everything this mode scored (tasks and --ppl).
    mlp_read_fraction: f64,
    layers: Vec<LayerRow>,
}

impl ModeResult {
    /// The mode as the tables name it: `+correct` when its generation tasks were corrected.
    fn label(&self) -> String {
        match self.continuation {
            Continuation::Greedy => self.mode.to_string(),
            Continuation::Corrected { .. } => format!("{}+correct", self.mode),
        }
    }
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
        let mut decoders = Decoders::<B>::load(&files, &args.decode, &device)?;
        let eot = cfg.eos_token_ids.first().copied().or(cfg.bos_token_id).unwrap_or(0);
        let mut results: Vec<ModeResult> = Vec::new();
        let mut dump = match &args.dump {
            Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("while creating {}", p.display()))?)),
            None => None,
        };
        let ev = Evaluator { tokenizer: &files.tokenizer, max_len: args.max_len, empty_context_token: eot };
        for &mode in &modes {
            let plan = args.decode.plan(mode, &cfg, &artifacts)?;
            let mut plan_dec = decoders.for_plan(&artifacts, &plan)?;
            let dec = plan_dec.as_dyn();
            let how = if args.correct && mode != Mode::Dense {
                Continuation::Corrected { period: args.period, accept: args.accept }
            } else {
                Continuation::Greedy
            };
            let mut task_results = Vec::new();
            let mut all_stats = SparsityStats::new(cfg.layers);
            for task in &tasks {
                let bar = super::progress::bar(task.examples.len() as u64, "{msg} [{bar:30}] {pos}/{len} examples {per_sec} eta {eta}");
                bar.set_message(format!("{mode} {}", task.spec.name));
                let mut dump_err = None;
                let r = run_task_with(&ev, &mut *dec, task, how, |i, scores| {
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
                    let bar = super::progress::bar(dejavu::ppl::windows(ids.len(), args.window.ctx, stride).iter().map(|w| (w.1 - w.0) as u64).sum(), "{msg} [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}");
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
                continuation: how,
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

/// Mean accuracy over a mode's tasks and its standard error (the tasks' standard errors combined as independent).
fn mean_acc(m: &ModeResult) -> (f64, f64) {
    let n = m.tasks.len().max(1) as f64;
    let mean = m.tasks.iter().map(|t| t.acc).sum::<f64>() / n;
    let se = m.tasks.iter().map(|t| t.acc_stderr * t.acc_stderr).sum::<f64>().sqrt() / n;
    (mean, se)
}

/// `a - b` and its standard error, the two taken as independent (a conservative figure for paired runs).
fn delta(a: f64, a_se: f64, b: f64, b_se: f64) -> (f64, f64) {
    (a - b, (a_se * a_se + b_se * b_se).sqrt())
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
                m.label(), t.task, t.n, t.acc, t.acc_stderr, norm, t.mlp_sparsity, t.head_sparsity, t.mlp_read_fraction, t.examples_per_s
            )?;
        }
        if let Some(p) = &m.ppl {
            writeln!(
                md,
                "| {} | ppl ({} tokens) | {} | {:.4} | — | {:.3} | — | {:.3} | — |",
                m.label(),
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
        let (base_acc, base_se) = mean_acc(base);
        for (i, m) in results.iter().enumerate() {
            let (ppl, dppl) = match (&m.ppl, &base.ppl) {
                (Some(p), Some(b)) => (format!("{:.3}", p.ppl), format!("{:+.2}%", 100.0 * (p.ppl / b.ppl - 1.0))),
                _ => ("—".into(), "—".into()),
            };
            let (acc, se) = mean_acc(m);
            let (d, d_se) = if i == 0 { (0.0, 0.0) } else { delta(acc, se, base_acc, base_se) };
            writeln!(
                md,
                "| {} | {:.3} | {:.4} ± {:.4} | {:+.2} ± {:.2} | {} | {} |",
                m.label(),
                m.mlp_read_fraction,
                acc,
                se,
                100.0 * d,
                100.0 * d_se,
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
    // Mean accuracy per mode and its difference from the first mode, each with its standard error.
    let comparison: Vec<serde_json::Value> = results
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (acc, se) = mean_acc(m);
            let (b, b_se) = mean_acc(&results[0]);
            let (d, d_se) = if i == 0 { (0.0, 0.0) } else { delta(acc, se, b, b_se) };
            serde_json::json!({ "mode": m.mode, "mean_acc": acc, "mean_acc_stderr": se, "delta_acc": d, "delta_acc_stderr": d_se })
        })
        .collect();
    let json = serde_json::json!({ "model": model.source, "modes": results, "comparison": comparison });
    let opt = |x: Option<f64>| x.map(|x| x.to_string()).unwrap_or_default();
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "mode", "task", "n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "ppl", "mlp_sparsity", "head_sparsity", "examples_per_s",
        "mlp_read_fraction",
    ])?;
    for m in results {
        for t in &m.tasks {
            w.write_record([
                m.label(), t.task.clone(), t.n.to_string(), t.acc.to_string(), t.acc_stderr.to_string(),
                opt(t.acc_norm), opt(t.acc_norm_stderr), String::new(),
                t.mlp_sparsity.to_string(), t.head_sparsity.to_string(), t.examples_per_s.to_string(),
                t.mlp_read_fraction.to_string(),
            ])?;
        }
        if let Some(pp) = &m.ppl {
            w.write_record([m.label(), "ppl".into(), pp.scored.to_string(), String::new(), String::new(), String::new(), String::new(),
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
