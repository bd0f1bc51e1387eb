//! `dejavu generate --prompts FILE`: every prompt of a set decoded greedily by the dense model and by each sparse
//! mode, uncorrected and (with --correct) corrected at each --period, and each continuation judged against dense's
//! (exact-continuation rate, first divergence, sparse fraction, dense passes per 100 tokens, accepted runs, time).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::backend::Backend;

use dejavu::decode::compare::{Outcome, Summary};
use dejavu::decode::correct::{generate_corrected, Accept};
use dejavu::decode::{generate, Decoder, Sampling};
use dejavu::sparse::Mode;
use dejavu::ModelFiles;

use crate::cli::common::{Decoders, ModelCommand};
use crate::cli::{out, usage};
use super::Args;

/// The generate arguments of a prompt-set run.
pub struct PromptSet(pub Args);

/// One setting of the table: a mode, uncorrected or corrected at one period.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Setting {
    mode: Mode,
    /// `None`: uncorrected.
    period: Option<usize>,
}

impl Setting {
    fn correction(&self, accept: Accept) -> String {
        match (self.period, accept) {
            (None, _) => "none".into(),
            (Some(k), Accept::Argmax) => format!("K={k}, argmax"),
            (Some(k), Accept::Prob(p)) => format!("K={k}, P={p}"),
        }
    }
}

/// The prompts of `path` (one per non-blank line, trimmed), the first `limit`, each tokenized. Errors name the file
/// and the line.
fn read_prompts(files: &ModelFiles, path: &Path, limit: Option<usize>) -> anyhow::Result<Vec<(String, Vec<u32>)>> {
    let text = std::fs::read(path).with_context(|| format!("while reading {}", path.display()))?;
    let text = String::from_utf8(text)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text (invalid byte at offset {})", path.display(), e.utf8_error().valid_up_to()))?;
    let vocab = files.config.vocab_size;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if limit.is_some_and(|n| prompts.len() >= n) {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let enc = files.tokenizer.encode(line, true).map_err(|e| anyhow::anyhow!("{}:{}: tokenization failed: {e}", path.display(), i + 1))?;
        let ids = enc.get_ids().to_vec();
        if ids.is_empty() {
            anyhow::bail!("{}:{}: the prompt tokenizes to nothing", path.display(), i + 1);
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            anyhow::bail!("{}:{}: the tokenizer produced id {bad}, outside the model's vocab_size {vocab}", path.display(), i + 1);
        }
        prompts.push((line.to_string(), ids));
    }
    if prompts.is_empty() {
        return Err(usage(format!("--prompts {}: no prompt in the file (one per non-blank line)", path.display())));
    }
    Ok(prompts)
}

fn decode_one(dec: &mut dyn Decoder, prompt: &[u32], s: Setting, args: &Args, eos: &[u32], dense: &[u32]) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    Ok(match s.period {
        None => {
            let g = generate(dec, prompt, args.n, Sampling::default(), eos, |_| true)?;
            let sparse = if s.mode == Mode::Dense { 0 } else { g.new_tokens.len() };
            Outcome::judge(g.new_tokens, dense, sparse, 0, Vec::new(), t0.elapsed())
        }
        Some(k) => {
            let c = generate_corrected(dec, prompt, args.n, k, args.accept, eos)?;
            let (steps, st, ct) = (c.sparse_steps, c.sparse_time, c.check_time);
            Outcome::judge(c.new_tokens, dense, c.sparse_tokens, c.dense_passes, c.accepted_runs, c.elapsed).with_costs(steps, st, ct)
        }
    })
}

impl ModelCommand for PromptSet {
    fn run_on<B: Backend>(PromptSet(args): Self, files: ModelFiles, device: B::Device) -> anyhow::Result<()> {
        let path = args.prompts.clone().ok_or_else(|| usage("internal: a prompt set needs --prompts"))?;
        let cfg = files.config.clone();
        let modes: Vec<Mode> = if args.compare.is_empty() { vec![args.decode.mode] } else { args.compare.clone() };
        let loaded = args.decode.load::<B>(&modes, &files, &device)?;
        let prompts = read_prompts(&files, &path, args.limit)?;
        if let Some(max) = cfg.position_limit() {
            if let Some((i, (_, p))) = prompts.iter().enumerate().find(|(_, (_, p))| p.len() + args.n > max) {
                return Err(usage(format!(
                    "{} prompt {}: {} tokens + -n {} exceed the model's max_position_embeddings {max}",
                    path.display(),
                    i + 1,
                    p.len(),
                    args.n
                )));
            }
        }
        let mut settings = vec![Setting { mode: Mode::Dense, period: None }];
        for &m in modes.iter().filter(|m| **m != Mode::Dense) {
            settings.push(Setting { mode: m, period: None });
            if args.correct {
                settings.extend(args.period.iter().map(|&k| Setting { mode: m, period: Some(k) }));
            }
        }
        let eos = if args.ignore_eos { vec![] } else { cfg.eos_token_ids.clone() };
        let mut decoders = Decoders::<B>::load(&files, &args.decode, &device)?;
        eprintln!(
            "{} prompts from {} x {} tokens, {} settings (dense first: every other continuation is judged against it)",
            prompts.len(),
            path.display(),
            args.n,
            settings.len()
        );
        let bar = crate::cli::progress::bar((prompts.len() * settings.len()) as u64, "{msg} [{bar:30}] {pos}/{len} continuations {per_sec} eta {eta}");
        let mut dense: Vec<Vec<u32>> = Vec::new();
        let mut results: Vec<(Setting, Vec<Outcome>)> = Vec::new();
        for s in &settings {
            let plan = args.decode.plan(s.mode, &cfg, &loaded)?;
            let mut plan_dec = decoders.for_plan(&loaded, &plan)?;
            let dec = plan_dec.as_dyn();
            bar.set_message(format!("{} {}", s.mode, s.correction(args.accept)));
            let mut outcomes = Vec::with_capacity(prompts.len());
            for (i, (_, ids)) in prompts.iter().enumerate() {
                let reference = dense.get(i).cloned().unwrap_or_default();
                let mut o = decode_one(dec, ids, *s, &args, &eos, &reference)
                    .with_context(|| format!("{} prompt {}, mode {} ({})", path.display(), i + 1, s.mode, s.correction(args.accept)))?;
                if s.mode == Mode::Dense {
                    dense.push(o.new_ids.clone());
                    o.exact = true;
                    o.first_divergence = None;
                }
                outcomes.push(o);
                bar.inc(1);
            }
            results.push((*s, outcomes));
            // Each finished setting is written at once, so a long run that dies keeps what it did.
            if let Some(j) = &args.json {
                let rec = record(&results, &args, &loaded.identity, &path, &prompts);
                dejavu::store::write_json(j, &rec).with_context(|| format!("while writing {}", j.display()))?;
            }
        }
        bar.finish_and_clear();
        let rows: Vec<(Setting, Summary)> = results.iter().map(|(s, o)| (*s, Summary::of(o))).collect();
        out(&table(&rows, args.accept, args.n))?;
        Ok(())
    }
}

/// The JSON record of the settings finished so far, each with its summary and every continuation.
fn record(
    results: &[(Setting, Vec<Outcome>)],
    args: &Args,
    identity: &dejavu::source::ModelIdentity,
    path: &Path,
    prompts: &[(String, Vec<u32>)],
) -> serde_json::Value {
    let settings: Vec<serde_json::Value> = results
        .iter()
        .map(|(s, o)| {
            let sum = Summary::of(o);
            serde_json::json!({
                "mode": s.mode, "period": s.period, "accept": s.period.map(|_| args.accept),
                "exact_rate": sum.exact_rate(), "sparse_fraction": sum.sparse_fraction(),
                "dense_passes_per_100_tokens": sum.dense_passes_per_100(), "mean_accepted_run": sum.mean_accepted_run(),
                "ms_per_token": sum.ms_per_token(), "ms_per_sparse_step": sum.ms_per_sparse_step(),
                "ms_per_dense_check": sum.ms_per_check(), "summary": sum, "outcomes": o,
            })
        })
        .collect();
    serde_json::json!({
        "format": "dejavu.prompt-set", "version": 1, "tool_version": dejavu::store::VERSION, "build": dejavu::store::BUILD,
        "created": dejavu::store::now_rfc3339(), "model": identity, "prompts_file": path, "tokens": args.n,
        "ignore_eos": args.ignore_eos, "prompts": prompts.iter().map(|(t, _)| t).collect::<Vec<_>>(), "settings": settings,
    })
}

fn table(rows: &[(Setting, Summary)], accept: Accept, n: usize) -> String {
    let mut t = String::from(
        "| mode | correction | prompts | tokens | exact continuation | first divergence (mean; identical = length) | over diverged | sparse fraction | dense passes / 100 tok | mean accepted run | ms/token | ms / sparse step | ms / dense check |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (s, r) in rows {
        let opt = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.2}"));
        t += &format!(
            "| {} | {} | {} | {} | {:.3} ({}/{}) | {:.2} | {} | {:.3} | {:.1} | {} | {:.2} | {} | {} |\n",
            s.mode,
            s.correction(accept),
            r.prompts,
            r.tokens,
            r.exact_rate(),
            r.exact,
            r.prompts,
            r.mean_first_divergence,
            opt(r.mean_first_divergence_diverged),
            r.sparse_fraction(),
            r.dense_passes_per_100(),
            opt(r.mean_accepted_run()),
            r.ms_per_token(),
            opt(r.ms_per_sparse_step()),
            opt(r.ms_per_check())
        );
    }
    t + &format!(
        "(-n {n}; continuations judged against the dense row's, token for token; ms/token includes the prefill; a corrected row's sparse steps include proposals a check rejected, and a dense check is the rollback, the verification forward and its scores read back and judged)\n"
    )
}
