//! `dejavu run RECIPE`: collect → train-predictors → calibrate → eval from one recipe into one run directory.
//! Each stage's recipe table becomes the stage's own arguments, parsed by its own parser (flags and recipes share
//! one schema, defaults included). `RUN/run.json` records the resolved recipe, the tool version and each stage's
//! arguments; a stage whose arguments are unchanged, whose artifact is there with the right header, and whose
//! inputs did not change this time is skipped. A killed stage has no finished record and runs again (collect
//! resumes where it stopped).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

use dejavu::recipe::{Recipe, STAGES};
use dejavu::store::{self, RunDir};

use super::{usage, Cli, Command};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The recipe (TOML; see recipes/README.md).
    pub recipe: PathBuf,
    /// Run directory (overrides the recipe's `run`).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Model (overrides the recipe's `model`).
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Device (overrides the top `device` of the recipe; a stage table's own `device` still applies to that stage).
    #[arg(long)]
    pub device: Option<String>,
    /// Override one recipe value: STAGE.KEY=VALUE (e.g. eval.limit=500) or KEY=VALUE for a top key; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Data directory (text/ and tasks/): the value of `${DEJAVU_DATA}` in the recipe and eval's --tasks-dir
    /// (default: $DEJAVU_SHARED/data, else ../shared/data).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Apply the recipe's `[full]` table (its full-size settings, e.g. more tokens and examples) before any --set.
    #[arg(long)]
    pub full: bool,
    /// Print each stage's resolved command and whether it would run, and stop.
    #[arg(long)]
    pub dry_run: bool,
}

/// `RUN/run.json`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct RunRecord {
    format: String,
    version: u32,
    tool_version: String,
    build: String,
    recipe: PathBuf,
    /// The recipe as resolved (overrides applied).
    resolved: serde_json::Value,
    /// Per stage: the arguments it ran with and when it finished (absent while it runs or after a kill).
    stages: BTreeMap<String, StageRecord>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct StageRecord {
    args: Vec<String>,
    finished: Option<String>,
}

const RUN_FORMAT: &str = "dejavu.run";
const RUN_VERSION: u32 = 1;

/// The stages whose outputs a stage reads.
fn inputs(stage: &str) -> &'static [&'static str] {
    match stage {
        "train-predictors" => &["collect"],
        "eval" => &["train-predictors", "calibrate"],
        _ => &[],
    }
}

/// The artifact a finished stage leaves, with its header's format tag.
fn artifact(run: &RunDir, stage: &str) -> (PathBuf, &'static str) {
    match stage {
        "collect" => (run.acts_manifest(), store::ACTS_FORMAT),
        "train-predictors" => (run.predictors_manifest(), store::PREDICTORS_FORMAT),
        "calibrate" => (run.thresholds(), store::THRESHOLDS_FORMAT),
        _ => (run.eval().join("results.json"), store::EVAL_FORMAT),
    }
}

/// Whether the artifact at `path` is there, of `format`, and (for activations) complete.
fn artifact_ok(path: &Path, format: &str) -> bool {
    let Some(doc) = std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) else {
        return false;
    };
    let header_ok = doc.get("header").and_then(|h| h.get("format")).and_then(|f| f.as_str()) == Some(format);
    header_ok && (format != store::ACTS_FORMAT || doc.get("complete").and_then(|c| c.as_bool()) == Some(true))
}

/// A stage's recipe table parsed by the stage's own parser. Unknown keys and bad values name the recipe and key.
fn parse_stage(recipe: &Recipe, stage: &str, args: &[String]) -> anyhow::Result<Command> {
    let argv = std::iter::once("dejavu".to_string()).chain(std::iter::once(stage.to_string())).chain(args.iter().cloned());
    Cli::try_parse_from(argv).map(|c| c.command).map_err(|e| {
        let file = recipe.path.display();
        let first = e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
        match e.kind() {
            clap::error::ErrorKind::UnknownArgument => {
                let bad = e.get(clap::error::ContextKind::InvalidArg).map(|a| a.to_string()).unwrap_or_default();
                let key = bad.trim_start_matches('-').split('=').next().unwrap_or_default().replace('-', "_");
                anyhow::anyhow!("{file}: [{stage}] unknown key `{key}` (not a `dejavu {stage}` flag; see `dejavu {stage} --help`)")
            }
            _ => anyhow::anyhow!("{file}: [{stage}]: {first}"),
        }
    })
}

fn run_stage(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Collect(a) => super::collect::run(a),
        Command::TrainPredictors(a) => super::train_predictors::run(a),
        Command::Calibrate(a) => super::calibrate::run(a),
        Command::Eval(a) => super::eval::run(a),
        _ => Err(anyhow::anyhow!("internal: not a recipe stage")),
    }
}

fn save(path: &Path, rec: &RunRecord) -> anyhow::Result<()> {
    store::write_json(path, rec).with_context(|| format!("while writing {}", path.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(d) = args.data.as_ref().filter(|d| !d.is_dir()) {
        return Err(usage(format!("--data {}: not a directory (it holds text/ and tasks/, like ../shared/data)", d.display())));
    }
    let mut sets = args.set.clone();
    if let Some(m) = &args.model {
        sets.push(format!("model={}", toml::Value::String(m.clone())));
    }
    if let Some(d) = &args.device {
        sets.push(format!("device={}", toml::Value::String(d.clone())));
    }
    if let Some(r) = &args.run {
        sets.push(format!("run={}", toml::Value::String(r.to_string_lossy().into_owned())));
    }
    let recipe = Recipe::load(&args.recipe, &sets, args.full, args.data.as_deref())?;
    if recipe.stages.is_empty() {
        return Err(usage(format!("{}: `stages` lists no stage of {}", recipe.path.display(), STAGES.join(", "))));
    }
    // Every stage is resolved before any runs: a bad key in [eval] fails now, not after collection.
    let mut planned = Vec::new();
    for stage in &recipe.stages {
        let a = recipe.stage_args(stage)?;
        let cmd = parse_stage(&recipe, stage, &a)?;
        planned.push((stage.clone(), a, cmd));
    }
    let run = RunDir::at(&recipe.run);
    let record_path = recipe.run.join("run.json");
    let mut rec: RunRecord = std::fs::read_to_string(&record_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|r: &RunRecord| r.format == RUN_FORMAT && r.version == RUN_VERSION)
        .unwrap_or_default();
    rec.format = RUN_FORMAT.to_string();
    rec.version = RUN_VERSION;
    rec.tool_version = store::VERSION.to_string();
    rec.build = store::BUILD.to_string();
    rec.recipe = recipe.path.clone();
    rec.resolved = serde_json::to_value(&recipe).unwrap_or_default();
    let mut ran: Vec<String> = Vec::new();
    if !args.dry_run {
        RunDir::create(&recipe.run)?;
        save(&record_path, &rec)?;
    }
    for (stage, stage_args, cmd) in planned {
        let (path, format) = artifact(&run, &stage);
        let prev = rec.stages.get(&stage).cloned();
        let same_args = prev.as_ref().is_some_and(|p| p.args == stage_args);
        let finished = prev.as_ref().is_some_and(|p| p.finished.is_some());
        let inputs_changed = inputs(&stage).iter().any(|s| ran.iter().any(|r| r == s));
        let skip = same_args && finished && !inputs_changed && artifact_ok(&path, format);
        let shown = format!("dejavu {stage} {}", stage_args.iter().map(|a| shell_word(a)).collect::<Vec<_>>().join(" "));
        if args.dry_run {
            println!("{} {shown}", if skip { "skip" } else { "run " });
            continue;
        }
        if skip {
            eprintln!("== {stage}: up to date ({}), skipped", path.display());
            continue;
        }
        let why = match (&prev, same_args, inputs_changed) {
            (None, _, _) => "not run yet",
            (Some(_), false, _) => "its settings changed",
            (Some(_), true, true) => "an input stage ran again",
            (Some(p), true, false) if p.finished.is_none() => "it did not finish last time; resuming",
            _ => "its artifact is missing",
        };
        eprintln!("== {stage}: running ({why})\n   {shown}");
        // Collection refuses a run directory started with other settings: start it over.
        if stage == "collect" && !same_args && run.acts().exists() {
            std::fs::remove_dir_all(run.acts()).with_context(|| format!("while removing {}", run.acts().display()))?;
        }
        rec.stages.insert(stage.clone(), StageRecord { args: stage_args.clone(), finished: None });
        save(&record_path, &rec)?;
        let t0 = std::time::Instant::now();
        run_stage(cmd).with_context(|| format!("stage {stage} of {}", recipe.path.display()))?;
        rec.stages.insert(stage.clone(), StageRecord { args: stage_args, finished: Some(store::now_rfc3339()) });
        save(&record_path, &rec)?;
        eprintln!("== {stage}: done in {:.1}s", t0.elapsed().as_secs_f64());
        ran.push(stage);
    }
    if !args.dry_run {
        eprintln!("run directory {} (run.json records the resolved recipe and the tool version)", recipe.run.display());
        if recipe.stages.iter().any(|s| s == "eval") && !ran.iter().any(|s| s == "eval") {
            eprintln!("eval was up to date: `dejavu report {} --print` prints its tables", shell_word(&recipe.run.to_string_lossy()));
        }
    }
    Ok(())
}

/// `s` quoted for a shell when it needs quoting (for the printed commands).
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=@,:+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
