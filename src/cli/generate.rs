//! `dejavu generate`: greedy (or sampled) text generation on the reference decoder (dense or sparse) or the CUDA
//! engine (dense).

mod prompt_set;

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::backend::Backend;

use dejavu::decode::{generate, Sampling};
use dejavu::sparse::Mode;
use dejavu::ModelFiles;

use super::common::{check_engine_mode, decoder_for, run_decoding, DecodeArgs, ModelCommand};
use super::{out, usage};

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub decode: DecodeArgs,
    /// Prompt text. Empty starts from the model's BOS token.
    #[arg(long, short = 'p', default_value = "")]
    pub prompt: String,
    /// A prompt set: one prompt per line (blank lines skipped). Every prompt is decoded greedily by the dense model
    /// and by each sparse mode (--mode or --compare; corrected with --correct), and each mode's continuations are
    /// judged against dense's: exact-continuation rate, first divergence, sparse fraction, dense passes. Prints a
    /// table; --json writes it with every continuation.
    #[arg(long, value_name = "FILE", conflicts_with = "prompt", help_heading = "Prompt set")]
    pub prompts: Option<PathBuf>,
    /// First N prompts of --prompts.
    #[arg(long, requires = "prompts", help_heading = "Prompt set")]
    pub limit: Option<usize>,
    /// Several sparse modes judged in one run (e.g. cats@0.5,oracle@0.5); replaces --mode.
    #[arg(long, value_delimiter = ',', requires = "prompts", conflicts_with = "mode", help_heading = "Prompt set")]
    #[serde(default)]
    pub compare: Vec<dejavu::sparse::Mode>,
    /// Number of new tokens.
    #[arg(short = 'n', long = "max-new-tokens", default_value_t = 32)]
    pub n: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler (with --temperature > 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print timing (prefill, per-token decode) to stderr.
    #[arg(long)]
    pub timings: bool,
    /// Write a JSON record (tokens, text, timings, realised sparsity) to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Sirius correction: the sparse --mode decodes and the dense model checks every --period tokens in one
    /// forward over the shared KV cache, keeping the sparse tokens it accepts (greedy decoding only).
    #[arg(long, help_heading = "Correction")]
    pub correct: bool,
    /// Sparse tokens between dense checks; with --prompts a comma-separated list runs each period.
    #[arg(long, value_delimiter = ',', default_value = "8", requires = "correct", help_heading = "Correction")]
    pub period: Vec<usize>,
    /// Keep a sparse token while the dense model gives it probability >= P, or only if it is the dense argmax.
    #[arg(long, value_name = "P|argmax", default_value = "0.1", requires = "correct", help_heading = "Correction")]
    pub accept: dejavu::decode::correct::Accept,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.temperature < 0.0 || !args.temperature.is_finite() {
        return Err(usage(format!("--temperature must be >= 0 (got {})", args.temperature)));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(usage(format!("--top-p must be in (0, 1] (got {})", args.top_p)));
    }
    if let Some(j) = &args.json {
        super::common::check_output_file(j)?;
    }
    let modes: Vec<Mode> = if args.compare.is_empty() { vec![args.decode.mode] } else { args.compare.clone() };
    if args.correct {
        if modes.iter().all(|m| *m == Mode::Dense) {
            return Err(usage("--correct needs a sparse --mode (dense decoding has nothing to correct)"));
        }
        if args.temperature > 0.0 {
            return Err(usage("--correct decodes greedily; drop --temperature"));
        }
        if args.period.contains(&0) {
            return Err(usage("--period must be at least 1"));
        }
        if args.period.len() != 1 && args.prompts.is_none() {
            return Err(usage("several --period values need --prompts (one prompt runs one period)"));
        }
    }
    check_engine_mode(&args.decode, &modes)?;
    if args.prompts.is_some() {
        if args.temperature > 0.0 {
            return Err(usage("--prompts judges greedy continuations against dense greedy ones; drop --temperature"));
        }
        if args.limit == Some(0) {
            return Err(usage("--limit must be at least 1"));
        }
        return run_decoding(&args.decode.model.clone(), prompt_set::PromptSet(args));
    }
    run_decoding(&args.decode.model.clone(), args)
}

impl ModelCommand for Args {
    fn run_on<B: Backend>(args: Self, files: ModelFiles, device: B::Device) -> anyhow::Result<()> {
        let cfg = &files.config;
        let loaded = args.decode.load::<B>(&[args.decode.mode], &files, &device)?;
        let plan = args.decode.plan(args.decode.mode, cfg, &loaded)?;
        let tok = &files.tokenizer;
        let enc = tok.encode(args.prompt.as_str(), true).map_err(|e| anyhow::anyhow!("while tokenizing the prompt: {e}"))?;
        let mut prompt: Vec<u32> = enc.get_ids().to_vec();
        if prompt.is_empty() {
            let bos = cfg.bos_token_id.context("the prompt is empty and the model config has no bos_token_id to start from; give --prompt")?;
            prompt.push(bos);
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            anyhow::bail!("the tokenizer produced id {bad}, outside the model's vocab_size {}", cfg.vocab_size);
        }
        if let Some(max) = cfg.position_limit().filter(|&m| prompt.len() + args.n > m) {
            return Err(usage(format!("prompt ({}) + -n ({}) exceeds the model's max_position_embeddings {max}", prompt.len(), args.n)));
        }
        let mut slot = None;
        let mut any = decoder_for::<B>(&args.decode, &files, &device, &loaded, &plan, &mut slot)?;
        let dec = any.as_dyn();
        let eos = if args.ignore_eos { vec![] } else { cfg.eos_token_ids.clone() };
        if args.correct {
            let period = args.period.first().copied().unwrap_or(8);
            let c = dejavu::decode::correct::generate_corrected(&mut *dec, &prompt, args.n, period, args.accept, &eos)
                .context("while generating with correction")?;
            let text = tok.decode(&c.new_tokens, true).unwrap_or_default();
            out(&format!("{}{text}\n", args.prompt))?;
            let ms = c.elapsed.as_secs_f64() * 1e3 / c.new_tokens.len().max(1) as f64;
            eprintln!(
                "corrected {}: {} tokens, sparse fraction {:.3}, {:.1} dense passes per 100 tokens, mean accepted run {:.2}, {ms:.2} ms/token; {} sparse steps at {} ms, {} dense checks at {} ms (period {}, accept {:?})",
                args.decode.mode,
                c.new_tokens.len(),
                c.sparse_fraction(),
                c.dense_passes_per_100(),
                c.mean_accepted_run(),
                c.sparse_steps,
                c.ms_per_sparse_step().map_or("—".into(), |v| format!("{v:.3}")),
                c.dense_passes,
                c.ms_per_check().map_or("—".into(), |v| format!("{v:.3}")),
                period,
                args.accept
            );
            if let Some(path) = &args.json {
                let rec = serde_json::json!({
                    "model": files.identity, "mode": args.decode.mode, "prompt": args.prompt, "prompt_ids": prompt,
                    "new_ids": c.new_tokens, "text": text, "stopped_at_eos": c.stopped_at_eos,
                    "period": period, "accept": args.accept, "sparse_tokens": c.sparse_tokens,
                    "sparse_fraction": c.sparse_fraction(), "dense_passes": c.dense_passes,
                    "dense_passes_per_100_tokens": c.dense_passes_per_100(), "mean_accepted_run": c.mean_accepted_run(),
                    "accepted_runs": c.accepted_runs, "ms_per_token": ms, "sparse_steps": c.sparse_steps,
                    "ms_per_sparse_step": c.ms_per_sparse_step(), "ms_per_dense_check": c.ms_per_check(),
                });
                dejavu::store::write_json(path, &rec).with_context(|| format!("while writing {}", path.display()))?;
            }
            return Ok(());
        }
        out(&args.prompt)?;
        // Decode the growing sequence and print only the new suffix, so multi-token characters come out whole.
        let prefix = tok.decode(&prompt, true).unwrap_or_default();
        let mut shown = String::new();
        let mut new_ids = Vec::new();
        let mut closed = None;
        let gen = generate(
            &mut *dec,
            &prompt,
            args.n,
            Sampling { temperature: args.temperature, top_p: args.top_p, seed: args.seed },
            &eos,
            |t| {
                new_ids.push(t);
                let all: Vec<u32> = prompt.iter().chain(new_ids.iter()).cloned().collect();
                let text = tok.decode(&all, true).unwrap_or_default();
                let text = text.strip_prefix(prefix.as_str()).unwrap_or(&text).to_string();
                if let Some(suffix) = text.strip_prefix(shown.as_str()) {
                    if !suffix.ends_with('\u{FFFD}') {
                        if let Err(e) = out(suffix) {
                            closed = Some(e);
                            return false;
                        }
                        shown = text.clone();
                    }
                }
                true
            },
        )
        .context("while generating")?;
        if let Some(e) = closed {
            return Err(e);
        }
        out("\n")?;
        let decode_s: f64 = gen.step_times.iter().map(|d| d.as_secs_f64()).sum();
        let steps = gen.step_times.len();
        let stats = dec.stats();
        if args.timings {
            eprintln!(
                "prompt {} tokens, prefill {:.3}s ({:.1} tok/s); decode {} tokens in {:.3}s ({:.2} tok/s, {:.1} ms/token)",
                prompt.len(),
                gen.prefill.as_secs_f64(),
                prompt.len() as f64 / gen.prefill.as_secs_f64().max(1e-9),
                steps,
                decode_s,
                steps as f64 / decode_s.max(1e-9),
                1e3 * decode_s / (steps.max(1) as f64)
            );
        }
        if !plan.is_dense() {
            eprintln!(
                "mode {}: realised MLP sparsity {:.3} (plan-dropped {:.3}), head sparsity {:.3}",
                args.decode.mode,
                stats.mlp_sparsity(),
                stats.mlp_plan_sparsity(),
                stats.head_sparsity()
            );
        }
        if let Some(path) = &args.json {
            let text = tok.decode(&gen.new_tokens, true).unwrap_or_default();
            let rec = serde_json::json!({
                "model": files.identity,
                "mode": args.decode.mode,
                "prompt": args.prompt,
                "prompt_ids": prompt,
                "new_ids": gen.new_tokens,
                "text": text,
                "stopped_at_eos": gen.stopped_at_eos,
                "prefill_s": gen.prefill.as_secs_f64(),
                "step_ms": gen.step_times.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
                "mlp_sparsity": stats.mlp_sparsity(),
                "head_sparsity": stats.head_sparsity(),
            });
            dejavu::store::write_json(path, &rec).with_context(|| format!("while writing {}", path.display()))?;
        }
        Ok(())
    }
}
