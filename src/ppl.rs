//! Perplexity with a sliding window, as the Hugging Face perplexity recipe computes it: windows of `ctx` tokens
//! start every `stride` tokens, and each window scores only the tokens the previous window did not.

use std::time::{Duration, Instant};

use crate::decode::{DecodeError, Decoder};

#[derive(Debug, Clone, serde::Serialize)]
pub struct PplResult {
    /// Tokens in the text after any `max_tokens` cap.
    pub tokens: usize,
    /// Tokens whose log-likelihood was counted.
    pub scored: usize,
    pub nll_sum: f64,
    pub ppl: f64,
    pub windows: usize,
    /// Tokens run through the forward (window lengths summed), for throughput.
    pub forward_tokens: usize,
    /// The first window alone (on GPU backends it carries the one-off kernel compilation and autotuning):
    /// its tokens and the seconds until its scores were back.
    pub first_window_tokens: usize,
    pub first_window_seconds: f64,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl PplResult {
    /// Forward tokens per second after the first window (the steady rate; NaN with a single window).
    pub fn steady_tokens_per_s(&self) -> f64 {
        (self.forward_tokens - self.first_window_tokens) as f64 / (self.elapsed.as_secs_f64() - self.first_window_seconds)
    }
}

/// The windows of the Hugging Face recipe: `(begin, end, counted)` where the last `counted` positions of
/// `ids[begin..end]` are scored.
pub fn windows(n: usize, ctx: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + ctx).min(n);
        let counted = end - prev_end;
        out.push((begin, end, counted));
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

/// Sum of negative log-likelihoods of `ids[1..]` positions that fall in each window's counted tail.
/// `on_window` is called after each window with the window's length (for progress).
/// The decoder's plan applies (a sparse decoder gives the sparse perplexity and counts its realised sparsity).
pub fn perplexity(
    dec: &mut dyn Decoder,
    ids: &[u32],
    ctx: usize,
    stride: usize,
    mut on_window: impl FnMut(usize),
) -> Result<PplResult, DecodeError> {
    let t0 = Instant::now();
    let mut nll_sum = 0.0f64;
    let mut scored = 0usize;
    let mut forward_tokens = 0usize;
    let mut first = (0usize, 0.0f64);
    let wins = windows(ids.len(), ctx, stride);
    for &(begin, end, counted) in &wins {
        let w = &ids[begin..end];
        let len = w.len();
        // Position i predicts token i+1; targets are scored when i+1 lies in the counted tail.
        let first_target = (len - counted).max(1);
        if first_target < len {
            let nll = token_nll(dec, w)?;
            for &x in &nll[first_target - 1..] {
                nll_sum += x as f64;
            }
            scored += len - first_target;
        }
        forward_tokens += len;
        if first.0 == 0 {
            first = (len, t0.elapsed().as_secs_f64());
        }
        on_window(len);
    }
    let ppl = if scored > 0 { (nll_sum / scored as f64).exp() } else { f64::NAN };
    Ok(PplResult {
        tokens: ids.len(),
        scored,
        nll_sum,
        ppl,
        windows: wins.len(),
        forward_tokens,
        first_window_tokens: first.0,
        first_window_seconds: first.1,
        elapsed: t0.elapsed(),
    })
}

/// Negative log-likelihood of each next token in one sequence from an empty cache:
/// `nll[i] = -log p(w[i+1] | w[..=i])`, length `len-1`.
pub fn token_nll(dec: &mut dyn Decoder, w: &[u32]) -> Result<Vec<f32>, DecodeError> {
    let len = w.len();
    if len < 2 {
        return Ok(Vec::new());
    }
    dec.reset();
    dec.prefill(&[w[..len - 1].to_vec()], None)?;
    let scores = dec.score(&[w[1..].to_vec()])?;
    Ok(scores.into_iter().flatten().map(|s| -s.logprob).collect())
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn windows_cover_each_token_once() {
        for (n, ctx, stride) in [(10, 4, 4), (10, 4, 2), (3, 8, 8), (1024, 512, 256), (1000, 512, 512)] {
            let w = windows(n, ctx, stride);
            let counted: usize = w.iter().map(|x| x.2).sum();
            assert_eq!(counted, n, "n={n} ctx={ctx} stride={stride}");
            assert!(w.iter().all(|&(b, e, c)| e - b <= ctx && c <= e - b));
            assert_eq!(w.last().map(|x| x.1), Some(n));
        }
    }
}
