//! `dejavu collect`: record per-layer activations of the dense model over calibration text into `RUN/acts`.

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::backend::Backend;

use dejavu::backend::DeviceKind;
use dejavu::collect::{CollectOptions, Collector, DEFAULT_CHUNK_BYTES};
use dejavu::store::human_bytes;
use dejavu::ModelFiles;

use super::common::{load_model, run_with_model, CorpusArgs, ModelCommand};

#[derive(Debug, Clone, clap::Args, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub corpus: CorpusArgs,
    /// Tokens to record (BOS positions are run but not counted). Fewer are recorded if the text runs out.
    #[arg(long, short = 'n')]
    pub tokens: usize,
    /// Sequence length, including the BOS token when the model has one.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Run directory; activations go to RUN/acts. Rerunning with the same arguments resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// Upper bound on a shard's size in MB (a shard always holds at least one sequence). Recording holds up to
    /// three shards in memory (one filling, two being written); the last shard's write is not overlapped with a forward.
    #[arg(long, default_value_t = 512.0)]
    pub shard_mb: f64,
    /// Full-length sequences per forward. Default: 4 on GPUs, where one sequence leaves the device underused
    /// (on the H100 batch 4 recorded SmolLM2 1.9× as fast as batch 1), 1 on CPUs, where batching does not help.
    #[arg(long)]
    #[serde(default)]
    pub batch: Option<usize>,
    /// Also write the report as JSON to this file (as `ppl --json FILE` does); the table is printed either way.
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub json: Option<PathBuf>,
    /// How the taps come back from the device after each forward: `packed` (cast to f16 and concatenated on the
    /// device, one transfer) or `per-tap` (one f32 transfer per layer and tap, converted on the host). Default:
    /// packed on GPUs, per-tap on CPUs.
    #[arg(long, value_enum)]
    #[serde(default)]
    pub readback: Option<Readback>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readback {
    Packed,
    PerTap,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !(args.shard_mb.is_finite() && args.shard_mb > 0.0) {
        anyhow::bail!("--shard-mb must be > 0 (got {})", args.shard_mb);
    }
    run_with_model(&args.corpus.model.clone(), args)
}

impl ModelCommand for Args {
    fn run_on<B: Backend>(args: Self, files: ModelFiles, device: B::Device) -> anyhow::Result<()> {
        let identity = files.identity().with_context(|| format!("while fingerprinting model `{}`", files.identity))?;
        let gpu = matches!(args.corpus.model.device, DeviceKind::Cuda | DeviceKind::BurnCuda | DeviceKind::Wgpu);
        let opts = CollectOptions {
            texts: args.corpus.text.clone(),
            tokens: args.tokens,
            seq_len: args.seq_len,
            shard_bytes: (args.shard_mb * 1e6) as u64,
            batch: args.batch.unwrap_or(if gpu { 4 } else { 1 }),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            pack_on_device: match args.readback {
                Some(r) => r == Readback::Packed,
                None => gpu,
            },
        };
        if let Some(j) = &args.json {
            super::common::check_output_file(j)?;
        }
        let collector = Collector::open(&args.out, &files.config, identity, opts)
            .with_context(|| format!("while preparing the collection in {}", args.out.display()))?;
        let m = collector.manifest().clone();
        if m.complete {
            eprintln!(
                "{}: already complete ({} tokens{}); nothing to do",
                collector.dir().display(),
                m.tokens,
                if m.text_exhausted { ", text exhausted" } else { "" }
            );
            return Ok(());
        }
        if m.tokens > 0 {
            eprintln!("resuming {}: {} of {} tokens already recorded in {} shards", collector.dir().display(), m.tokens, m.tokens_requested, m.shards.len());
        }
        eprintln!(
            "recording {} tokens × {} per token = {} into {}",
            m.tokens_requested - m.tokens,
            human_bytes(m.bytes_per_token),
            human_bytes((m.tokens_requested - m.tokens) as u64 * m.bytes_per_token),
            collector.dir().display()
        );
        let model = load_model::<B>(&files, &device, false)?;
        let bar = super::progress::bar(m.tokens_requested as u64, "collect [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}");
        bar.set_position(m.tokens as u64);
        bar.reset_eta();
        let dir = collector.dir().to_path_buf();
        let r = collector
            .run(&model, &files.tokenizer, |n| bar.inc(n as u64))
            .with_context(|| format!("while collecting activations into {}", dir.display()))?;
        bar.finish_and_clear();
        if r.text_exhausted {
            eprintln!(
                "warning: the text ran out after {} tokens of the {} asked; recorded {} tokens (manifest `tokens`)",
                r.tokens, r.tokens_requested, r.tokens
            );
        }
        let secs = r.seconds.max(1e-9);
        if let Some(path) = &args.json {
            let mut v = serde_json::to_value(&r)?;
            v["steady_tokens_per_s"] = serde_json::json!(r.steady_tokens_per_s());
            dejavu::store::write_json(path, &v).with_context(|| format!("while writing {}", path.display()))?;
        }
        {
            println!("| model | tokens | shards | size | recorded now | seconds | tokens/s | forward tokens/s | forward s | record s | write wait s | handoff wait s |");
            println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
            println!(
                "| {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |",
                files.identity,
                r.tokens,
                r.shards,
                human_bytes(r.bytes),
                r.recorded_now,
                r.seconds,
                r.recorded_now as f64 / secs,
                r.forward_tokens_now as f64 / secs,
                r.forward_seconds,
                r.record_seconds,
                r.write_wait_seconds,
                r.handoff_wait_seconds
            );
        }
        Ok(())
    }
}
