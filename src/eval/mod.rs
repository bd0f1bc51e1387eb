//! Zero-shot evaluation on the reference forward, dense or sparse: the lm-evaluation-harness scoring rules
//! (log-likelihood of a continuation, acc and acc_norm, greedy match for LAMBADA) with the shared context of
//! each example computed once and its continuations scored together as one batch.

pub mod tasks;

use tokenizers::Tokenizer;

use crate::decode::correct::{generate_corrected, Accept};
use crate::decode::{generate, host_score, DecodeError, Decoder, Sampling};
use crate::error::{Error, Result};
use crate::sparse::SparsityStats;
use tasks::{Example, Task, TaskKind};

/// Log-likelihood of one continuation and whether greedy decoding reproduces it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RequestScore {
    pub loglik: f64,
    pub greedy: bool,
    /// The sequence as scored (context after any truncation, then the continuation).
    pub tokens: Vec<u32>,
    /// How many trailing tokens of `tokens` are the scored continuation.
    pub n_cont: usize,
    /// Generation tasks: the text generated (then `loglik` is not computed and `greedy` is the exact match).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated: Option<String>,
}

/// How a generation task continues its prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Continuation {
    /// Greedy decoding under the decoder's plan.
    #[default]
    Greedy,
    /// Greedy sparse decoding checked by the dense model every `period` tokens (Sirius; [`generate_corrected`]).
    Corrected { period: usize, accept: Accept },
}

/// Whether `generated` is the target: after leading whitespace, it starts with the trimmed `target` and goes on
/// (if at all) with a character that is not a letter or digit, so `signs.` matches `signs` but `signals` does
/// not.
pub fn generation_matches(generated: &str, target: &str) -> bool {
    let t = target.trim();
    !t.is_empty() && generated.trim_start().strip_prefix(t).is_some_and(|rest| !rest.chars().next().is_some_and(char::is_alphanumeric))
}

/// Turns task requests into token sequences and scores them on a [`Decoder`] (dense or sparse: the decoder's
/// plan applies).
pub struct Evaluator<'a> {
    pub tokenizer: &'a Tokenizer,
    /// Longest sequence fed to the model; contexts are cut from the left to fit (capped further by a learned
    /// position table).
    pub max_len: usize,
    /// Token put before an empty context (the harness uses end-of-text).
    pub empty_context_token: u32,
}

impl Evaluator<'_> {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| Error::Tokenize(e.to_string()))?.get_ids().to_vec())
    }

    /// The harness's pair encoding: trailing spaces of the context move to the continuation; the continuation's
    /// tokens are those of `context + continuation` past the context's own tokens.
    pub fn encode_pair(&self, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let trimmed = context.trim_end_matches(' ');
        let moved = &context[trimmed.len()..];
        let cont = format!("{moved}{continuation}");
        let whole = self.encode(&format!("{trimmed}{cont}"))?;
        let mut ctx = self.encode(trimmed)?;
        let split = ctx.len().min(whole.len());
        let mut cont_ids = whole[split..].to_vec();
        if cont_ids.is_empty() {
            cont_ids = self.encode(&cont)?;
        }
        if ctx.is_empty() {
            ctx.push(self.empty_context_token);
        }
        Ok((ctx, cont_ids))
    }

    /// Score all requests of one example, grouping those that share a context.
    pub fn score_example(&self, dec: &mut dyn Decoder, ex: &Example) -> Result<Vec<RequestScore>> {
        let mut out = vec![RequestScore { loglik: 0.0, greedy: false, tokens: Vec::new(), n_cont: 0, generated: None }; ex.requests.len()];
        let mut done = vec![false; ex.requests.len()];
        for i in 0..ex.requests.len() {
            if done[i] {
                continue;
            }
            let members: Vec<usize> = (i..ex.requests.len()).filter(|&j| !done[j] && ex.requests[j].0 == ex.requests[i].0).collect();
            let mut ctx = Vec::new();
            let mut conts = Vec::new();
            for &j in &members {
                let (c, x) = self.encode_pair(&ex.requests[j].0, &ex.requests[j].1)?;
                ctx = c;
                conts.push(x);
                done[j] = true;
            }
            let scores = self.score_group(dec, &ctx, &conts)?;
            for (score, &j) in scores.into_iter().zip(&members) {
                out[j] = score;
            }
        }
        Ok(out)
    }

    /// Prefill `ctx` once, then score every continuation in one batch from copies of its cache.
    pub fn score_group(&self, dec: &mut dyn Decoder, ctx: &[u32], conts: &[Vec<u32>]) -> Result<Vec<RequestScore>> {
        let cfg = dec.config();
        let max_len = cfg.position_limit().map_or(self.max_len, |p| p.min(self.max_len)).max(2);
        // As the harness does, the window keeps the end of the sequence: a continuation longer than the window
        // is scored on its last `max_len - 1` tokens, after at least one context token.
        let conts: Vec<Vec<u32>> = conts.iter().map(|c| c[c.len().saturating_sub(max_len - 1)..].to_vec()).collect();
        let conts = &conts[..];
        let longest = conts.iter().map(|c| c.len()).max().unwrap_or(0);
        if longest == 0 {
            return Err(DecodeError::Empty.into());
        }
        let keep = max_len.saturating_sub(longest).max(1);
        let ctx = &ctx[ctx.len().saturating_sub(keep)..];
        dec.reset();
        dec.prefill(&[ctx.to_vec()], None)?;
        let first = dec.logits()?.swap_remove(0);
        let mut scores: Vec<RequestScore> = conts
            .iter()
            .map(|c| {
                let s = host_score(&first, c[0]);
                RequestScore {
                    loglik: s.logprob as f64,
                    greedy: s.argmax,
                    tokens: ctx.iter().chain(c).copied().collect(),
                    n_cont: c.len(),
                    generated: None,
                }
            })
            .collect();
        if longest <= 1 {
            return Ok(scores);
        }
        // Rows: each continuation minus its last token, right-padded; targets: the continuation minus its first.
        let (n, w) = (conts.len(), longest - 1);
        let mut rows = vec![vec![0u32; w]; n];
        let mut lens = vec![0usize; n];
        let mut targets = vec![Vec::new(); n];
        for (r, c) in conts.iter().enumerate() {
            rows[r][..c.len() - 1].copy_from_slice(&c[..c.len() - 1]);
            // A one-token continuation still takes a row, all padding: it scores and counts nothing there.
            lens[r] = c.len() - 1;
            targets[r] = c[1..].to_vec();
        }
        dec.fork(n)?;
        dec.prefill(&rows, Some(&lens))?;
        for (score, r) in scores.iter_mut().zip(dec.score(&targets)?) {
            for t in r {
                score.loglik += t.logprob as f64;
                score.greedy &= t.argmax;
            }
        }
        Ok(scores)
    }

    /// Generate after the prompt of a generation example (its one request: `context + delimiter`, target) and
    /// judge the text by [`generation_matches`]. `max_tokens` defaults to the target's own token count; the
    /// prompt is cut from the left so prompt and generation fit `max_len`. Generation stops early at an
    /// end-of-sequence token of the model.
    pub fn generate_example(
        &self,
        dec: &mut dyn Decoder,
        ex: &Example,
        max_tokens: Option<usize>,
        how: Continuation,
    ) -> Result<RequestScore> {
        let (prompt, target) = ex.requests.first().ok_or(DecodeError::Empty)?;
        let (ctx, cont) = self.encode_pair(prompt, target)?;
        let n = max_tokens.unwrap_or(cont.len()).max(1);
        let cfg = dec.config();
        let max_len = cfg.position_limit().map_or(self.max_len, |p| p.min(self.max_len)).max(2);
        let eos = cfg.eos_token_ids.clone();
        let n = n.min(max_len - 1);
        let ctx = &ctx[ctx.len().saturating_sub(max_len - n)..];
        let new = match how {
            Continuation::Greedy => generate(dec, ctx, n, Sampling::default(), &eos, |_| true)?.new_tokens,
            Continuation::Corrected { period, accept } => generate_corrected(dec, ctx, n, period, accept, &eos)?.new_tokens,
        };
        let text = self.tokenizer.decode(&new, false).map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(RequestScore {
            loglik: f64::NAN,
            greedy: generation_matches(&text, target),
            n_cont: new.len(),
            tokens: ctx.iter().chain(&new).copied().collect(),
            generated: Some(text),
        })
    }
}

/// Accuracy numbers of one task.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskResult {
    pub task: String,
    pub kind: TaskKind,
    /// The text put between context and continuation.
    pub delimiter: String,
    pub n: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: Option<f64>,
    pub acc_norm_stderr: Option<f64>,
    pub mlp_sparsity: f64,
    pub head_sparsity: f64,
    /// MLP weights read per token as a fraction of the dense MLP's (see [`SparsityStats::mlp_read_fraction`];
    /// 0 when the decoder counted nothing, as a dense one does not).
    pub mlp_read_fraction: f64,
    pub seconds: f64,
    pub examples_per_s: f64,
    #[serde(skip)]
    pub stats: SparsityStats,
}

/// Sample standard error of a mean of 0/1 outcomes, as the harness reports it.
pub fn stderr(p: f64, n: usize) -> f64 {
    if n < 2 { 0.0 } else { (p * (1.0 - p) / (n as f64 - 1.0)).sqrt() }
}

fn argmax_f64(v: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in v.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Evaluate one task on `dec` (its realised-sparsity counts start from zero and end in the result);
/// `on_example` sees each example's index and request scores (progress, dumps).
pub fn run_task(ev: &Evaluator<'_>, dec: &mut dyn Decoder, task: &Task, on_example: impl FnMut(usize, &[RequestScore])) -> Result<TaskResult> {
    run_task_with(ev, dec, task, Continuation::Greedy, on_example)
}

/// [`run_task`], with generation tasks continued as `how` says (other kinds do not generate).
pub fn run_task_with(
    ev: &Evaluator<'_>,
    dec: &mut dyn Decoder,
    task: &Task,
    how: Continuation,
    mut on_example: impl FnMut(usize, &[RequestScore]),
) -> Result<TaskResult> {
    let t0 = std::time::Instant::now();
    // Count this task alone: whatever the decoder had counted before is the caller's to have read.
    dec.take_stats();
    let (mut hits, mut hits_norm) = (0usize, 0usize);
    for (idx, ex) in task.examples.iter().enumerate() {
        let scores = match task.kind {
            TaskKind::Generation => vec![ev.generate_example(dec, ex, task.spec.max_tokens, how)?],
            _ => ev.score_example(dec, ex)?,
        };
        match task.kind {
            TaskKind::LanguageModel | TaskKind::Generation => hits += scores.first().is_some_and(|s| s.greedy) as usize,
            TaskKind::Schema => hits += (argmax_f64(scores.iter().map(|s| s.loglik)) == ex.gold) as usize,
            TaskKind::MultipleChoice => {
                hits += (argmax_f64(scores.iter().map(|s| s.loglik)) == ex.gold) as usize;
                let norm = scores.iter().zip(&ex.choice_bytes).map(|(s, &b)| s.loglik / b.max(1) as f64);
                hits_norm += (argmax_f64(norm) == ex.gold) as usize;
            }
        }
        on_example(idx, &scores);
    }
    let n = task.examples.len();
    let acc = hits as f64 / n as f64;
    let acc_norm = (task.kind == TaskKind::MultipleChoice).then(|| hits_norm as f64 / n as f64);
    let secs = t0.elapsed().as_secs_f64();
    let stats = dec.take_stats();
    Ok(TaskResult {
        task: task.spec.name.clone(),
        kind: task.kind,
        delimiter: task.delimiter.clone(),
        n,
        acc,
        acc_stderr: stderr(acc, n),
        acc_norm,
        acc_norm_stderr: acc_norm.map(|a| stderr(a, n)),
        mlp_sparsity: stats.mlp_sparsity(),
        head_sparsity: stats.head_sparsity(),
        mlp_read_fraction: stats.mlp_read_fraction(),
        seconds: secs,
        examples_per_s: n as f64 / secs.max(1e-9),
        stats,
    })
}
