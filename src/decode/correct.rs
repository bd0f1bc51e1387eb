//! Sirius-style correction above any [`Decoder`]: the sparse model decodes; every `period` tokens the dense model
//! checks the pending tokens in one forward over the shared KV cache, keeps the sparse tokens it accepts, rolls
//! back at the first it does not and continues from its own token there. Checked positions end with the dense
//! model's keys and values (the verification forward rewrites them), as in Sirius.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{DecodeError, Decoder, TokenScore};

/// When a sparse token survives the dense check.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accept {
    /// Kept while the dense model gives it probability >= p (Sirius' rule).
    Prob(f32),
    /// Kept only if it is the dense argmax: corrected output then equals dense greedy decoding.
    Argmax,
}

impl std::str::FromStr for Accept {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "argmax" {
            return Ok(Accept::Argmax);
        }
        match s.parse::<f32>() {
            Ok(p) if (0.0..=1.0).contains(&p) => Ok(Accept::Prob(p)),
            _ => Err(format!("`{s}` is neither `argmax` nor a probability in [0, 1]")),
        }
    }
}

/// What a corrected generation produced and what the correction cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Corrected {
    pub new_tokens: Vec<u32>,
    /// Tokens the sparse model produced and the dense model kept.
    pub sparse_tokens: usize,
    /// Dense verification forwards.
    pub dense_passes: usize,
    /// Length of each run of accepted sparse tokens, one per check.
    pub accepted_runs: Vec<usize>,
    pub stopped_at_eos: bool,
    /// Sparse decode steps run, the proposals a check later rejected included.
    pub sparse_steps: usize,
    /// Wall time in those steps (each ends with its token read back).
    #[serde(skip)]
    pub sparse_time: Duration,
    /// Wall time in the dense checks: the rollback, the verification forward, its scores read back and judged.
    #[serde(skip)]
    pub check_time: Duration,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl Corrected {
    pub fn sparse_fraction(&self) -> f64 {
        self.sparse_tokens as f64 / self.new_tokens.len().max(1) as f64
    }
    pub fn dense_passes_per_100(&self) -> f64 {
        100.0 * self.dense_passes as f64 / self.new_tokens.len().max(1) as f64
    }
    pub fn mean_accepted_run(&self) -> f64 {
        self.accepted_runs.iter().sum::<usize>() as f64 / self.accepted_runs.len().max(1) as f64
    }
    /// Mean wall time of one sparse step, ms (`None` without steps).
    pub fn ms_per_sparse_step(&self) -> Option<f64> {
        super::mean_ms(self.sparse_time.as_secs_f64(), self.sparse_steps)
    }
    /// Mean wall time of one dense check, ms (`None` without checks).
    pub fn ms_per_check(&self) -> Option<f64> {
        super::mean_ms(self.check_time.as_secs_f64(), self.dense_passes)
    }
}

/// Whether the dense model's score of a proposal keeps it.
fn accepts(rule: Accept, s: &TokenScore) -> bool {
    match rule {
        Accept::Argmax => s.argmax,
        Accept::Prob(p) => (s.logprob as f64).exp() >= p as f64,
    }
}

/// Greedy sparse decoding of up to `max_new` tokens after `prompt`, checked by the dense model after every
/// `period` sparse tokens. `dec` runs its plan unless told to run dense ([`Decoder::set_dense`]); the prompt is
/// prefilled dense. Each round: the token in hand (always a dense one) plus up to `period` sparse proposals are run
/// by the dense model in one forward from the round's start, which rewrites their cache entries and predicts each
/// proposal; proposals are kept up to the first the rule rejects, which the dense argmax replaces.
pub fn generate_corrected(
    dec: &mut dyn Decoder,
    prompt: &[u32],
    max_new: usize,
    period: usize,
    rule: Accept,
    eos: &[u32],
) -> Result<Corrected, DecodeError> {
    if prompt.is_empty() {
        return Err(DecodeError::Empty);
    }
    if period == 0 {
        return Err(DecodeError::Usage("the correction period must be at least 1".into()));
    }
    let t0 = Instant::now();
    let mut out = Corrected::default();
    if max_new == 0 {
        return Ok(out);
    }
    dec.reset();
    dec.set_dense(true);
    dec.prefill(&[prompt.to_vec()], None)?;
    // The token in hand: chosen by the dense model, not yet in the cache.
    let mut next = first(dec.greedy()?)?;
    let result = (|| loop {
        let base = dec.len();
        // The round's time, less its sparse steps, is its dense check.
        let round = Instant::now();
        let mut stepping = Duration::ZERO;
        let m = period.min(max_new - out.new_tokens.len() - 1);
        let mut pending = vec![next];
        if m > 0 && !eos.contains(&next) {
            dec.set_dense(false);
            let ts = Instant::now();
            while pending.len() <= m {
                let last = pending[pending.len() - 1];
                dec.step(&[last])?;
                let x = first(dec.greedy()?)?;
                out.sparse_steps += 1;
                pending.push(x);
                if eos.contains(&x) {
                    break;
                }
            }
            stepping = ts.elapsed();
            out.sparse_time += stepping;
            dec.truncate(base)?;
            dec.set_dense(true);
            dec.prefill(&[pending.clone()], None)?;
            out.dense_passes += 1;
        }
        out.new_tokens.push(next);
        if eos.contains(&next) {
            out.stopped_at_eos = true;
            return Ok(());
        }
        if pending.len() == 1 {
            // No room left for a proposal.
            return Ok(());
        }
        // The dense forward judged on the decoder itself (log-probs and argmaxes, no logits read back): position i
        // predicts proposal i + 1; the last position's target is a placeholder, only its argmax is used.
        let mut targets = pending[1..].to_vec();
        targets.push(0);
        let scores = dec.score(&[targets])?.into_iter().next().ok_or(DecodeError::Empty)?;
        let mut kept = 0;
        let mut replacement = None;
        for s in scores.iter().take(pending.len() - 1) {
            if accepts(rule, s) {
                kept += 1;
            } else {
                replacement = Some(s.top);
                break;
            }
        }
        out.check_time += round.elapsed().saturating_sub(stepping);
        out.accepted_runs.push(kept);
        out.sparse_tokens += kept;
        for &x in &pending[1..1 + kept] {
            out.new_tokens.push(x);
            if eos.contains(&x) {
                out.stopped_at_eos = true;
                return Ok(());
            }
        }
        next = match replacement {
            Some(t) => {
                // Keep the dense entries of the token in hand and the kept proposals; drop the rejected tail.
                dec.truncate(base + 1 + kept)?;
                t
            }
            // All kept: the forward's last position predicts the token after them.
            None => scores[pending.len() - 1].top,
        };
        if out.new_tokens.len() >= max_new {
            return Ok(());
        }
    })();
    dec.set_dense(false);
    out.elapsed = t0.elapsed();
    result.map(|_| out)
}

fn first(v: Vec<u32>) -> Result<u32, DecodeError> {
    v.first().copied().ok_or(DecodeError::Empty)
}
