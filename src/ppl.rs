//! Perplexity with a sliding window, as the Hugging Face perplexity recipe computes it: windows of `ctx` tokens
//! start every `stride` tokens, and each window scores only the tokens the previous window did not.

use std::time::{Duration, Instant};

use burn::tensor::{activation, backend::Backend, Int, Tensor, TensorData};

use crate::model::sparse::{SparsityPlan, SparsityStats};
use crate::model::{Forward, Model};

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
/// With a `plan`, the forward is sparse and realised sparsity is added to `stats`.
pub fn perplexity<B: Backend>(
    model: &Model<B>,
    ids: &[u32],
    ctx: usize,
    stride: usize,
    plan: Option<&SparsityPlan<'_, B>>,
    mut stats: Option<&mut SparsityStats>,
    mut on_window: impl FnMut(usize),
) -> PplResult {
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
            let nll = token_nll(model, w, plan, stats.as_deref_mut());
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
    PplResult {
        tokens: ids.len(),
        scored,
        nll_sum,
        ppl,
        windows: wins.len(),
        forward_tokens,
        first_window_tokens: first.0,
        first_window_seconds: first.1,
        elapsed: t0.elapsed(),
    }
}

/// Negative log-likelihood of each next token in one sequence: `nll[i] = -log p(w[i+1] | w[..=i])`, length `len-1`.
pub fn token_nll<B: Backend>(
    model: &Model<B>,
    w: &[u32],
    plan: Option<&SparsityPlan<'_, B>>,
    stats: Option<&mut SparsityStats>,
) -> Vec<f32> {
    let len = w.len();
    if len < 2 {
        return Vec::new();
    }
    let mut cache = model.new_cache();
    let h = model.forward_with(model.tokens(&[w[..len - 1].to_vec()]), &mut cache, Forward { plan, stats, ..Default::default() });
    let logp = activation::log_softmax(model.logits(h), 2); // [1, len-1, vocab]
    let targets: Vec<i64> = w[1..].iter().map(|&t| t as i64).collect();
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [1, len - 1, 1]), model.device());
    let picked = logp.gather(2, targets); // [1, len-1, 1]
    picked.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default().into_iter().map(|x| -x).collect()
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
