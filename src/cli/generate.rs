//! `dejavu generate`: greedy (or sampled) text generation with the dense reference forward.

use std::io::Write;

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;

use dejavu::generate::{generate, Sampling};
use dejavu::ModelFiles;

use super::common::{ModelArgs, ModelCommand, load_model, run_with_model};

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Prompt text. Empty starts from the model's BOS token.
    #[arg(long, short = 'p', default_value = "")]
    pub prompt: String,
    /// Number of new tokens.
    #[arg(short = 'n', long = "max-new-tokens", default_value_t = 32)]
    pub n: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print timing (prefill, per-token decode) to stderr.
    #[arg(long)]
    pub timings: bool,
    /// Write a JSON record (tokens, text, timings) to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.temperature < 0.0 || !args.temperature.is_finite() {
        bail!("--temperature must be >= 0 (got {})", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1] (got {})", args.top_p);
    }
    run_with_model(args)
}

impl ModelCommand for Args {
    fn model_args(&self) -> &ModelArgs {
        &self.model
    }

    fn run_on<B: Backend>(self, files: ModelFiles, device: B::Device) -> anyhow::Result<()> {
        let args = self;
        let model = load_model::<B>(&files, &device, false)?;
        let tok = &files.tokenizer;
        let enc = tok.encode(args.prompt.as_str(), true).map_err(|e| anyhow::anyhow!("while tokenizing the prompt: {e}"))?;
        let mut prompt: Vec<u32> = enc.get_ids().to_vec();
        if prompt.is_empty() {
            let bos = files.config.bos_token_id.context(
                "the prompt is empty and the model config has no bos_token_id to start from; give --prompt",
            )?;
            prompt.push(bos);
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= files.config.vocab_size) {
            bail!("the tokenizer produced id {bad}, outside the model's vocab_size {}", files.config.vocab_size);
        }
        let max_pos = files.config.max_positions;
        if files.config.family == dejavu::Family::Opt && prompt.len() + args.n > max_pos {
            bail!("prompt ({}) + -n ({}) exceeds the model's max_position_embeddings {max_pos}", prompt.len(), args.n);
        }
        let eos = if args.ignore_eos { vec![] } else { files.config.eos_token_ids.clone() };
        print!("{}", args.prompt);
        std::io::stdout().flush().ok();
        // Decode the growing sequence and print only the new suffix, so multi-token characters come out whole.
        let mut shown = String::new();
        let mut new_ids = Vec::new();
        let out = generate(
            &model,
            &prompt,
            args.n,
            Sampling { temperature: args.temperature, top_p: args.top_p, seed: args.seed },
            &eos,
            |t| {
                new_ids.push(t);
                let all: Vec<u32> = prompt.iter().chain(new_ids.iter()).cloned().collect();
                let text = tok.decode(&all, true).unwrap_or_default();
                let prefix = tok.decode(&prompt, true).unwrap_or_default();
                let gen = text.strip_prefix(prefix.as_str()).unwrap_or(&text).to_string();
                if let Some(suffix) = gen.strip_prefix(shown.as_str()) {
                    if !suffix.ends_with('\u{FFFD}') {
                        print!("{suffix}");
                        std::io::stdout().flush().ok();
                        shown = gen.clone();
                    }
                }
            },
        );
        println!();
        let decode_s: f64 = out.step_times.iter().map(|d| d.as_secs_f64()).sum();
        let steps = out.step_times.len();
        if args.timings {
            eprintln!(
                "prompt {} tokens, prefill {:.3}s ({:.1} tok/s); decode {} tokens in {:.3}s ({:.2} tok/s, {:.1} ms/token)",
                prompt.len(),
                out.prefill.as_secs_f64(),
                prompt.len() as f64 / out.prefill.as_secs_f64().max(1e-9),
                steps,
                decode_s,
                steps as f64 / decode_s.max(1e-9),
                1e3 * decode_s / (steps.max(1) as f64)
            );
        }
        if let Some(path) = &args.json {
            let text = tok.decode(&out.new_tokens, true).unwrap_or_default();
            let rec = serde_json::json!({
                "model": files.identity,
                "prompt": args.prompt,
                "prompt_ids": prompt,
                "new_ids": out.new_tokens,
                "text": text,
                "stopped_at_eos": out.stopped_at_eos,
                "prefill_s": out.prefill.as_secs_f64(),
                "step_ms": out.step_times.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            });
            std::fs::write(path, serde_json::to_string_pretty(&rec)?)
                .with_context(|| format!("while writing {}", path.display()))?;
        }
        Ok(())
    }
}
