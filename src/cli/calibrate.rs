//! `dejavu calibrate`: CATS per-layer thresholds at requested sparsity levels, from streaming histograms.

use std::path::PathBuf;

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;

use dejavu::calibrate::{criterion, threshold_plan, Calibrator, ThresholdLevel, Thresholds};
use dejavu::text::TokenWindows;
use dejavu::ModelFiles;

use super::common::{load_model, run_with_model, CorpusArgs, ModelCommand};
use super::usage;

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub corpus: CorpusArgs,
    /// Target MLP sparsity levels (fraction of neurons zeroed), comma-separated, e.g. 0.5,0.7.
    #[arg(long, value_delimiter = ',', required = true)]
    pub sparsity: Vec<f64>,
    /// Calibration tokens.
    #[arg(long, default_value_t = 65536)]
    pub tokens: usize,
    /// Tokens per forward window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Refinement passes per level: re-measure each layer's magnitudes with the earlier layers already masked at
    /// the current thresholds, so every layer (not only the first) realises the requested sparsity.
    #[arg(long, default_value_t = 1)]
    pub refine: usize,
    /// Output thresholds file (JSON).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    for &s in &args.sparsity {
        if !(0.0..1.0).contains(&s) {
            return Err(usage(format!("--sparsity: {s} is not in [0, 1)")));
        }
    }
    if args.tokens == 0 || args.seq_len == 0 {
        return Err(usage("--tokens and --seq-len must be positive"));
    }
    run_with_model(&args.corpus.model.clone(), args)
}

impl ModelCommand for Args {
    fn run_on<B: Backend>(args: Self, files: ModelFiles, device: B::Device) -> anyhow::Result<()> {
        if let Some(max) = files.config.position_limit().filter(|&max| args.seq_len > max) {
            return Err(usage(format!("--seq-len: {} exceeds the model's max_position_embeddings {max}", args.seq_len)));
        }
        // Inputs and the output are checked before any model work: a late failure would discard the whole run.
        let mut windows = TokenWindows::new(&files.tokenizer, &args.corpus.text, args.seq_len, args.tokens)?;
        super::common::check_output_file(&args.out)?;
        let identity = files.identity().context("while fingerprinting the model")?;
        let model = load_model::<B>(&files, &device, false)?;
        let mut cal = Calibrator::new(files.config.layers);
        // One bar over every pass (the first, then --refine passes per level), so its ETA is the command's.
        let passes = 1 + args.sparsity.len() * args.refine;
        let bar = super::progress::bar((args.tokens * passes) as u64, "calibrate {msg} [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}");
        bar.set_message(format!("pass 1/{passes}"));
        while let Some(w) = windows.next_window()? {
            cal.add_sequence(&model, &w).context("while calibrating")?;
            bar.inc(w.len() as u64);
        }
        // A text shorter than --tokens makes every pass shorter: the bar's length follows.
        bar.set_length(cal.tokens * passes as u64);
        let mut pass_no = 1;
        if cal.tokens == 0 {
            bail!("{}: no tokens in the calibration text", args.corpus.text.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
        }
        if (cal.tokens as usize) < args.tokens {
            eprintln!("note: the text provided {} tokens, fewer than --tokens {}; calibrated on what there is", cal.tokens, args.tokens);
        }
        let mut out = Thresholds {
            header: Thresholds::header(identity, &args),
            criterion: criterion(files.config.family).to_string(),
            tokens: cal.tokens,
            text: args.corpus.text.iter().map(|p| p.display().to_string()).collect(),
            levels: Vec::new(),
        };
        for &sp in &args.sparsity {
            let mut hists = cal.layers.clone();
            let mut thresholds: Vec<f32> = hists.iter().map(|h| h.quantile(sp)).collect();
            for pass in 0..args.refine {
                let plan = threshold_plan(&thresholds);
                let mut refined = Calibrator::new(files.config.layers);
                let mut windows = TokenWindows::new(&files.tokenizer, &args.corpus.text, args.seq_len, args.tokens)?;
                pass_no += 1;
                bar.set_message(format!("pass {pass_no}/{passes}: refine {sp} ({}/{})", pass + 1, args.refine));
                while let Some(w) = windows.next_window()? {
                    refined.add_sequence_under(&model, &w, Some(&plan)).context("while refining the thresholds")?;
                    bar.inc(w.len() as u64);
                }
                hists = refined.layers;
                thresholds = hists.iter().map(|h| h.quantile(sp)).collect();
            }
            let realised = hists.iter().zip(&thresholds).map(|(h, &t)| h.fraction_below(t)).collect();
            out.levels.push(ThresholdLevel { sparsity: sp, thresholds, realised });
            // Each finished level is on disk at once (atomically), so a late failure loses only the level it
            // happened in.
            out.save(&args.out).context("while writing the thresholds")?;
        }
        bar.finish_and_clear();
        println!("| sparsity | min threshold | median threshold | max threshold | realised (calibration text) |");
        println!("|---|---|---|---|---|");
        for l in &out.levels {
            let mut t = l.thresholds.clone();
            t.sort_by(f32::total_cmp);
            let mean_real = l.realised.iter().sum::<f64>() / l.realised.len() as f64;
            println!("| {:.2} | {:.4} | {:.4} | {:.4} | {:.4} |", l.sparsity, t[0], t[t.len() / 2], t[t.len() - 1], mean_real);
        }
        eprintln!("wrote {} ({} tokens, {} layers)", args.out.display(), out.tokens, files.config.layers);
        Ok(())
    }
}
