//! Text generation above any [`Decoder`]: one prefill over the prompt, then one cached step per token.

use std::time::{Duration, Instant};

use super::{DecodeError, Decoder};

/// How to pick each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1]; 1 keeps the whole distribution.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// What a generation produced and how long each phase took.
#[derive(Debug, Clone)]
pub struct Generation {
    pub new_tokens: Vec<u32>,
    pub prefill: Duration,
    /// Time of each decode step (one new token through the cached forward), in order.
    pub step_times: Vec<Duration>,
    pub stopped_at_eos: bool,
}

/// Generate up to `max_new` tokens after `prompt` (which must not be empty) from an empty cache. `on_token` sees
/// each new token as it is chosen (for streaming output) and may stop the generation by returning `false`.
/// Stops early at one of `eos`.
pub fn generate(
    dec: &mut dyn Decoder,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation, DecodeError> {
    let mut rng = SplitMix64(sampling.seed);
    let mut out = Generation { new_tokens: Vec::new(), prefill: Duration::ZERO, step_times: Vec::new(), stopped_at_eos: false };
    if prompt.is_empty() {
        return Err(DecodeError::Empty);
    }
    if max_new == 0 {
        return Ok(out);
    }
    dec.reset();
    let t0 = Instant::now();
    dec.prefill(&[prompt.to_vec()], None)?;
    let mut next = next_token(dec, sampling, &mut rng)?;
    out.prefill = t0.elapsed();
    loop {
        out.new_tokens.push(next);
        if !on_token(next) {
            break;
        }
        if eos.contains(&next) {
            out.stopped_at_eos = true;
            break;
        }
        if out.new_tokens.len() >= max_new {
            break;
        }
        let t = Instant::now();
        dec.step(&[next])?;
        next = next_token(dec, sampling, &mut rng)?;
        out.step_times.push(t.elapsed());
    }
    Ok(out)
}

/// Greedy decoding asks the decoder for the argmax (one id back from a GPU); sampling needs the logits.
fn next_token(dec: &mut dyn Decoder, s: Sampling, rng: &mut SplitMix64) -> Result<u32, DecodeError> {
    if s.temperature <= 0.0 {
        return dec.greedy()?.first().copied().ok_or(DecodeError::Empty);
    }
    Ok(pick(first_row(dec.logits()?), s, rng))
}

fn first_row(mut rows: Vec<Vec<f32>>) -> Vec<f32> {
    if rows.is_empty() { Vec::new() } else { rows.swap_remove(0) }
}

fn pick(logits: Vec<f32>, s: Sampling, rng: &mut SplitMix64) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(&logits) as u32;
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, (((l - max) / s.temperature) as f64).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (i, p) in probs {
        kept.push((i, p / total));
        mass += p / total;
        if mass >= s.top_p as f64 {
            break;
        }
    }
    let mut r = rng.next_f64() * mass;
    for &(i, p) in &kept {
        if r < p {
            return i as u32;
        }
        r -= p;
    }
    kept.last().map(|k| k.0 as u32).unwrap_or(0)
}

/// Index of the largest value (first one on ties, as torch.argmax).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// A tiny deterministic generator (SplitMix64) so sampling is reproducible from `--seed`.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
