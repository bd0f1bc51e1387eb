//! Subcommands, one file each: clap arguments plus a `run` that calls into the library. This module also owns
//! how failures leave the process: bad usage exits 2 naming the flag, other failures exit 1, and a closed stdout
//! (`dejavu generate | head`) ends the command quietly.

pub mod bench;
pub mod calibrate;
pub mod collect;
pub mod common;
pub mod engine_check;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod ppl;
pub mod progress;
pub mod report;
pub mod run;
pub mod train_predictors;

use std::io::Write;

use clap::{Parser, Subcommand};

use dejavu::error::OptionError;

/// dejavu: find and run the sparse parts of an LLM (Deja Vu predictors, CATS thresholds).
#[derive(Debug, Parser)]
#[command(name = "dejavu", version = env!("DEJAVU_LONG_VERSION"), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a recipe (recipes/*.toml): collect → train-predictors → calibrate → eval into one run directory,
    /// skipping stages whose artifacts are up to date and resuming a killed one.
    Run(run::Args),
    /// Generate text from a prompt (greedy by default), dense or in a sparse --mode (--device cuda: the CUDA engine).
    Generate(generate::Args),
    /// Perplexity of a text file with a sliding window, dense or in a sparse --mode.
    Ppl(ppl::Args),
    /// Calibrate a rule: CATS thresholds (default), or with --rule the SwiGLU rules' score copies, budgets, TEAL thresholds.
    Calibrate(calibrate::Args),
    /// Zero-shot accuracy, perplexity and realised sparsity, dense or sparse.
    Eval(eval::Args),
    /// Record per-layer activations over calibration text into RUN/acts (resumable).
    Collect(collect::Args),
    /// Train per-layer neuron and head predictors from RUN/acts into RUN/predictors.
    TrainPredictors(train_predictors::Args),
    /// What a model holds (config, dtype mix, tensor table); `--read` streams its raw bytes and reports GB/s.
    Inspect(inspect::Args),
    /// Decode latency on the CUDA engine (named real shapes with random weights, or a model) against the
    /// weight-read floor.
    Bench(bench::Args),
    /// A run directory's results as one HTML page with SVG charts and a markdown summary (RUN/report).
    Report(report::Args),
    /// The CUDA engine against CPU references (kernels on random inputs; models against the burn forward).
    #[command(hide = true)]
    EngineCheck(engine_check::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Ppl(a) => ppl::run(a),
        Command::Report(a) => report::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Collect(a) => collect::run(a),
        Command::TrainPredictors(a) => train_predictors::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::EngineCheck(a) => engine_check::run(a),
    }
}

/// A bad flag value or combination: exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// The flag that sets the library option `field` (snake_case field, kebab-case flag), so a library error that
/// names the field can name the flag too.
pub fn flag_of(field: &str) -> String {
    match field {
        "plan" => "--mode".to_string(),
        "texts" => "--text".to_string(),
        "calibration" => "--rules".to_string(),
        f => format!("--{}", f.replace('_', "-")),
    }
}

/// An option error from the library, restated with the flag that set the field.
pub fn usage_of(e: OptionError) -> anyhow::Error {
    usage(format!("{}: {}", flag_of(e.field), e.msg))
}

/// Standard output went away (its reader closed the pipe): the command stops quietly with exit 0.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// Write `text` to stdout and flush; a closed pipe becomes [`StdoutClosed`].
pub fn out(text: &str) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        r => Ok(r?),
    }
}

/// Print a failure and give the exit code: 0 for a closed stdout, 2 for bad usage, 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.chain().any(|c| c.is::<StdoutClosed>()) {
        return 0;
    }
    // A bare `OptionError`, or one inside `dejavu::Error::Option` (transparent, so the chain holds the `Error`).
    let option = e.chain().find_map(|c| {
        c.downcast_ref::<OptionError>().or_else(|| c.downcast_ref::<dejavu::Error>().and_then(dejavu::Error::as_option))
    });
    if let Some(o) = option {
        eprintln!("error: {}: {}", flag_of(o.field), o.msg);
        return 2;
    }
    eprintln!("error: {e:#}");
    if e.chain().any(|c| c.is::<UsageError>()) { 2 } else { 1 }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag of every subcommand says what it does in `--help`.
    #[test]
    fn every_flag_has_help() {
        let cli = super::Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{} --{}", sub.get_name(), arg.get_long().unwrap_or(id)));
                }
            }
        }
        assert!(missing.is_empty(), "flags without help: {}", missing.join(", "));
    }

    /// `--version` names the commit and the features of the build.
    #[test]
    fn version_names_commit_and_features() {
        let v = super::Cli::command().render_version();
        assert!(v.contains(env!("CARGO_PKG_VERSION")) && v.contains("commit ") && v.contains("features: "), "{v}");
        assert_eq!(v.contains("cuda"), cfg!(feature = "cuda"), "{v}");
    }
}
