//! Subcommands, one file each: clap arguments plus a `run` that calls into the library.

pub mod calibrate;
pub mod collect;
pub mod common;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod ppl;
pub mod train_predictors;

use clap::{Parser, Subcommand};

/// dejavu: find and run the sparse parts of an LLM (Deja Vu predictors, CATS thresholds).
#[derive(Debug, Parser)]
#[command(name = "dejavu", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt with the dense reference forward (greedy by default).
    Generate(generate::Args),
    /// Perplexity of a text file with a sliding window.
    Ppl(ppl::Args),
    /// CATS: per-layer activation thresholds at requested sparsity levels.
    Calibrate(calibrate::Args),
    /// Zero-shot accuracy, perplexity and realised sparsity, dense or sparse.
    Eval(eval::Args),
    /// Record per-layer activations over calibration text into RUN/acts (resumable).
    Collect(collect::Args),
    /// Train per-layer neuron and head predictors from RUN/acts into RUN/predictors.
    TrainPredictors(train_predictors::Args),
    /// What a model holds (config, dtype mix, tensor table); `--read` streams its raw bytes and reports GB/s.
    Inspect(inspect::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Ppl(a) => ppl::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Collect(a) => collect::run(a),
        Command::TrainPredictors(a) => train_predictors::run(a),
        Command::Inspect(a) => inspect::run(a),
    }
}
