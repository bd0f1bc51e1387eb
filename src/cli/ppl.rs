//! `dejavu ppl`: perplexity of a text file on the reference decoder (dense or sparse) or the CUDA engine (dense).

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::backend::Backend;

use dejavu::ppl::{perplexity, windows};
use dejavu::ModelFiles;

use super::common::{check_engine_mode, decoder_for, run_decoding, tokenize_file, DecodeArgs, ModelCommand, WindowArgs};
use super::out;

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub decode: DecodeArgs,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub text: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub window: WindowArgs,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.window.stride(None)?;
    check_engine_mode(&args.decode, &[args.decode.mode])?;
    if let Some(j) = &args.json {
        super::common::check_output_file(j)?;
    }
    run_decoding(&args.decode.model.clone(), args)
}

impl ModelCommand for Args {
    fn run_on<B: Backend>(args: Self, files: ModelFiles, device: B::Device) -> anyhow::Result<()> {
        let stride = args.window.stride(files.config.position_limit())?;
        let loaded = args.decode.load::<B>(&[args.decode.mode], &files, &device)?;
        let plan = args.decode.plan(args.decode.mode, &files.config, &loaded)?;
        let ids = tokenize_file(&files, &args.text, args.max_tokens)?;
        if ids.len() < 2 {
            anyhow::bail!("{}: the text has {} token(s); perplexity needs at least 2", args.text.display(), ids.len());
        }
        let mut slot = None;
        let mut any = decoder_for::<B>(&args.decode, &files, &device, &loaded, &plan, &mut slot)?;
        let dec = any.as_dyn();
        let total: usize = windows(ids.len(), args.window.ctx, stride).iter().map(|w| w.1 - w.0).sum();
        let bar = super::progress::bar(total as u64, "ppl [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}");
        let r = perplexity(&mut *dec, &ids, args.window.ctx, stride, |n| bar.inc(n as u64))
            .with_context(|| format!("while scoring {}", args.text.display()))?;
        bar.finish_and_clear();
        let secs = r.elapsed.as_secs_f64();
        let stats = dec.take_stats();
        let mode = args.decode.mode;
        // A dense decoder counts nothing: it reads every MLP weight.
        let read = if plan.is_dense() { 1.0 } else { stats.mlp_read_fraction() };
        out(&format!(
            "| model | mode | text | tokens | scored | ctx | stride | ppl | MLP sparsity | head sparsity | MLP bytes read | tokens/s |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n\
             | {} | {mode} | {} | {} | {} | {} | {stride} | {:.4} | {:.3} | {:.3} | {read:.4} | {:.1} |\n",
            files.identity,
            args.text.display(),
            r.tokens,
            r.scored,
            args.window.ctx,
            r.ppl,
            stats.mlp_sparsity(),
            stats.head_sparsity(),
            r.forward_tokens as f64 / secs.max(1e-9)
        ))?;
        if let Some(path) = &args.json {
            let rec = serde_json::json!({
                "model": files.identity, "mode": mode, "text": args.text, "ctx": args.window.ctx, "stride": stride,
                "device": args.decode.model.device, "result": r, "seconds": secs,
                "forward_tokens_per_s": r.forward_tokens as f64 / secs.max(1e-9),
                "steady_tokens_per_s": r.steady_tokens_per_s(),
                "mlp_sparsity": stats.mlp_sparsity(), "head_sparsity": stats.head_sparsity(), "mlp_read_fraction": read,
                "layers": stats.layers,
            });
            dejavu::store::write_json(path, &rec).with_context(|| format!("while writing {}", path.display()))?;
        }
        Ok(())
    }
}
