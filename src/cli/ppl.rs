//! `dejavu ppl`: perplexity of a text file on the reference decoder, dense or sparse.

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};

use dejavu::decode::Decoder;
use dejavu::ppl::{perplexity, windows};
use dejavu::ModelFiles;

use super::common::{load_model, run_with_model, ModelArgs, ModelCommand, SparseArgs};
use super::{out, usage};

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub sparse: SparseArgs,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Step between window starts (default: --ctx); each window scores only tokens past the previous window's end.
    #[arg(long)]
    pub stride: Option<usize>,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Validate `--ctx`/`--stride` (stride defaults to ctx) and, for learned position tables, the window length.
pub fn check_window(ctx: usize, stride: Option<usize>, limit: Option<usize>) -> anyhow::Result<usize> {
    if ctx < 2 {
        return Err(usage(format!("--ctx must be at least 2 (got {ctx})")));
    }
    let stride = stride.unwrap_or(ctx);
    if stride == 0 || stride > ctx {
        return Err(usage(format!("--stride must be in 1..=--ctx ({ctx}) (got {stride})")));
    }
    if let Some(max) = limit.filter(|&m| ctx > m) {
        return Err(usage(format!("--ctx {ctx} exceeds the model's max_position_embeddings {max}")));
    }
    Ok(stride)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check_window(args.ctx, args.stride, None)?;
    run_with_model(args)
}

/// Read and tokenize a text file, keeping the first `max_tokens` ids.
pub fn tokenize_file(files: &ModelFiles, path: &std::path::Path, max_tokens: Option<usize>) -> anyhow::Result<Vec<u32>> {
    let bytes = std::fs::read(path).with_context(|| format!("while reading {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text (invalid byte at offset {})", path.display(), e.utf8_error().valid_up_to()))?;
    let enc = files.tokenizer.encode(text.as_str(), true).map_err(|e| anyhow::anyhow!("{}: tokenization failed: {e}", path.display()))?;
    let mut ids: Vec<u32> = enc.get_ids().to_vec();
    if let Some(n) = max_tokens {
        ids.truncate(n);
    }
    Ok(ids)
}

impl ModelCommand for Args {
    fn model_args(&self) -> &ModelArgs {
        &self.model
    }

    fn run_on<B: Backend>(self, files: ModelFiles, device: B::Device) -> anyhow::Result<()> {
        let args = self;
        let stride = check_window(args.ctx, args.stride, files.config.position_limit())?;
        let loaded = args.sparse.load::<B>(&[args.sparse.mode], &files, &device)?;
        let plan = args.sparse.plan(args.sparse.mode, &files.config, &loaded)?;
        let ids = tokenize_file(&files, &args.text, args.max_tokens)?;
        if ids.len() < 2 {
            anyhow::bail!("{}: the text has {} token(s); perplexity needs at least 2", args.text.display(), ids.len());
        }
        let model = load_model::<B>(&files, &device, false)?;
        let mut dec = loaded.decoder(&model, &plan)?;
        let total: usize = windows(ids.len(), args.ctx, stride).iter().map(|w| w.1 - w.0).sum();
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("ppl [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let r = perplexity(&mut dec, &ids, args.ctx, stride, |n| bar.inc(n as u64))
            .with_context(|| format!("while scoring {}", args.text.display()))?;
        bar.finish_and_clear();
        let secs = r.elapsed.as_secs_f64();
        let stats = dec.take_stats();
        let mode = args.sparse.mode;
        out(&format!(
            "| model | mode | text | tokens | scored | ctx | stride | ppl | MLP sparsity | head sparsity | tokens/s |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n\
             | {} | {mode} | {} | {} | {} | {} | {stride} | {:.4} | {:.3} | {:.3} | {:.1} |\n",
            files.identity,
            args.text.display(),
            r.tokens,
            r.scored,
            args.ctx,
            r.ppl,
            stats.mlp_sparsity(),
            stats.head_sparsity(),
            r.forward_tokens as f64 / secs.max(1e-9)
        ))?;
        if let Some(path) = &args.json {
            let rec = serde_json::json!({
                "model": files.identity, "mode": mode, "text": args.text, "ctx": args.ctx, "stride": stride,
                "device": args.model.device, "result": r, "seconds": secs,
                "forward_tokens_per_s": r.forward_tokens as f64 / secs.max(1e-9),
                "steady_tokens_per_s": r.steady_tokens_per_s(),
                "mlp_sparsity": stats.mlp_sparsity(), "head_sparsity": stats.head_sparsity(), "layers": stats.layers,
            });
            dejavu::manifest::write_json(path, &rec).with_context(|| format!("while writing {}", path.display()))?;
        }
        Ok(())
    }
}
