//! `dejavu ppl`: perplexity of a text file with the dense reference forward.

use std::path::PathBuf;

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};

use dejavu::ppl::{perplexity, windows};
use dejavu::ModelFiles;

use super::common::{ModelArgs, ModelCommand, load_model, run_with_model};

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Step between window starts; each window scores only tokens past the previous window's end.
    #[arg(long, default_value_t = 512)]
    pub stride: usize,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.ctx < 2 {
        bail!("--ctx must be at least 2 (got {})", args.ctx);
    }
    if args.stride == 0 || args.stride > args.ctx {
        bail!("--stride must be in 1..=--ctx ({}) (got {})", args.ctx, args.stride);
    }
    run_with_model(args)
}

impl ModelCommand for Args {
    fn model_args(&self) -> &ModelArgs {
        &self.model
    }

    fn run_on<B: Backend>(self, files: ModelFiles, device: B::Device) -> anyhow::Result<()> {
        let args = self;
        let bytes = std::fs::read(&args.text).with_context(|| format!("while reading {}", args.text.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text (invalid byte at offset {})", args.text.display(), e.utf8_error().valid_up_to()))?;
        let enc = files
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("{}: tokenization failed: {e}", args.text.display()))?;
        let mut ids: Vec<u32> = enc.get_ids().to_vec();
        if let Some(n) = args.max_tokens {
            ids.truncate(n);
        }
        if ids.len() < 2 {
            bail!("{}: the text has {} token(s); perplexity needs at least 2", args.text.display(), ids.len());
        }
        if files.config.family == dejavu::Family::Opt && args.ctx > files.config.max_positions {
            bail!("--ctx {} exceeds the model's max_position_embeddings {}", args.ctx, files.config.max_positions);
        }
        let model = load_model::<B>(&files, &device, false)?;
        let total: usize = windows(ids.len(), args.ctx, args.stride).iter().map(|w| w.1 - w.0).sum();
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("ppl [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let r = perplexity(&model, &ids, args.ctx, args.stride, None, None, |n| bar.inc(n as u64));
        bar.finish_and_clear();
        let secs = r.elapsed.as_secs_f64();
        println!("| model | text | tokens | scored | ctx | stride | ppl | tokens/s |");
        println!("|---|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.4} | {:.1} |",
            files.identity,
            args.text.display(),
            r.tokens,
            r.scored,
            args.ctx,
            args.stride,
            r.ppl,
            r.forward_tokens as f64 / secs.max(1e-9)
        );
        if let Some(path) = &args.json {
            let rec = serde_json::json!({
                "model": files.identity, "text": args.text, "ctx": args.ctx, "stride": args.stride,
                "device": args.model.device, "result": r, "seconds": secs,
                "forward_tokens_per_s": r.forward_tokens as f64 / secs.max(1e-9),
                "steady_tokens_per_s": r.steady_tokens_per_s(),
            });
            std::fs::write(path, serde_json::to_string_pretty(&rec)?)
                .with_context(|| format!("while writing {}", path.display()))?;
        }
        Ok(())
    }
}
