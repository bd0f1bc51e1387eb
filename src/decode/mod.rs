//! The decoder interface every engine implements (the burn reference in [`reference`], the CUDA engine later),
//! and what is written once above it: generation and sampling ([`generate`]); `ppl` and `eval` also take a
//! `&mut dyn Decoder`.
//!
//! A decoder owns a KV cache of `len()` positions for a batch of rows. `prefill` runs equal-length token rows after
//! the cached positions and appends them; `logits` and `score` read the outputs of that last run; `truncate` rolls
//! the cache back (speculative correction needs it); `fork` repeats a one-row cache to score several
//! continuations of one context together.

pub mod compare;
pub mod correct;
pub mod generate;
pub mod reference;

pub use generate::{argmax, generate, Generation, Sampling, SplitMix64};
pub use reference::RefDecoder;
/// Why a decoder refused a request (defined with the library's other errors, which wrap it).
pub use crate::error::DecodeError;

use crate::config::ModelConfig;
use crate::sparse::SparsityStats;

/// The log-probability a forward gave one target token, whether that token was its argmax, and the argmax itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenScore {
    pub logprob: f32,
    pub argmax: bool,
    /// The position's argmax token (first on ties).
    pub top: u32,
}

/// Mean milliseconds of `n` events that took `seconds` in all (`None` when there were none).
pub(crate) fn mean_ms(seconds: f64, n: usize) -> Option<f64> {
    (n > 0).then(|| 1e3 * seconds / n as f64)
}

/// A model that decodes: the one interface `generate`, `ppl` and `eval` are written against.
pub trait Decoder {
    fn config(&self) -> &ModelConfig;
    /// Positions in the KV cache.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Empty the cache and forget the last outputs (realised-sparsity counts are kept).
    fn reset(&mut self);
    /// Run `rows` (all the same length; row `i` has `lens[i]` real tokens followed by right padding, all real
    /// when `lens` is `None`; a row of length 0 is padding only) after the cached positions and append them to
    /// the cache. Padding is computed but not counted in realised sparsity.
    fn prefill(&mut self, rows: &[Vec<u32>], lens: Option<&[usize]>) -> Result<(), DecodeError>;
    /// One new token per row: a prefill of length 1 (engines make this the fast path).
    fn step(&mut self, tokens: &[u32]) -> Result<(), DecodeError> {
        let rows: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
        self.prefill(&rows, None)
    }
    /// Logits `[rows][vocab]` at the last real position of each row of the last forward.
    fn logits(&mut self) -> Result<Vec<Vec<f32>>, DecodeError>;
    /// The argmax (first index on ties) of each row's logits at its last real position. Engines that can pick
    /// it on the device override this, so greedy decoding reads one id per row instead of the logits.
    fn greedy(&mut self) -> Result<Vec<u32>, DecodeError> {
        Ok(self.logits()?.iter().map(|l| argmax(l) as u32).collect())
    }
    /// Logits `[positions][vocab]` of every position of row 0 of the last forward (speculative correction reads
    /// the dense model's prediction at each pending token).
    fn position_logits(&mut self) -> Result<Vec<Vec<f32>>, DecodeError>;
    /// For each row `r` and position `p < targets[r].len()` of the last forward: log p(`targets[r][p]`) and
    /// whether it is the argmax (first index on ties).
    fn score(&mut self, targets: &[Vec<u32>]) -> Result<Vec<Vec<TokenScore>>, DecodeError>;
    /// Keep the first `len` cached positions (rollback). `len > self.len()` is an error.
    fn truncate(&mut self, len: usize) -> Result<(), DecodeError>;
    /// Repeat a one-row cache `n` times along the batch.
    fn fork(&mut self, n: usize) -> Result<(), DecodeError>;
    /// Run the following forwards dense (`true`) or under the decoder's plan (`false`), over the same KV cache:
    /// speculative correction verifies sparse tokens with the dense model this way. A dense-only decoder accepts
    /// both (it has nothing sparse to switch to).
    fn set_dense(&mut self, dense: bool);
    /// Realised sparsity counted so far (empty layers when counting is off).
    fn stats(&self) -> &SparsityStats;
    fn take_stats(&mut self) -> SparsityStats;
}

/// Checks shared by every engine before a forward: rows non-empty and of equal length, ids in the vocabulary,
/// and (for learned position tables) the cache plus the rows within the table.
pub fn check_rows(cfg: &ModelConfig, past: usize, rows: &[Vec<u32>]) -> Result<usize, DecodeError> {
    let s = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || s == 0 {
        return Err(DecodeError::Empty);
    }
    if rows.iter().any(|r| r.len() != s) {
        return Err(DecodeError::RaggedRows(rows.iter().map(Vec::len).collect()));
    }
    if let Some(&id) = rows.iter().flatten().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(DecodeError::TokenOutOfVocab { id, vocab: cfg.vocab_size });
    }
    if let Some(max) = cfg.position_limit() {
        if past + s > max {
            return Err(DecodeError::TooLong { len: past + s, max });
        }
    }
    Ok(s)
}

/// `log_softmax(logits)[target]` in f64, and whether `target` is the first argmax.
pub fn host_score(logits: &[f32], target: u32) -> TokenScore {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    let t = target as usize;
    let top = argmax(logits);
    TokenScore { logprob: (logits.get(t).copied().unwrap_or(f32::NEG_INFINITY) as f64 - lse) as f32, argmax: top == t, top: top as u32 }
}
