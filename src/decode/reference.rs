//! The burn reference forward behind the [`Decoder`] interface: the ground truth the CUDA engine is tested
//! against. Sparse plans run as exact masks on the dense computation, except the SwiGLU rules, which gather only the
//! weights they read (`model::sparse_mlp`).

use burn::tensor::{activation, backend::Backend, Int, Tensor, TensorData};

use crate::config::ModelConfig;
use crate::error::OptionError;
use crate::model::{to_host, Forward, KvCache, Model, QScorer, Scorer, Sparse};
use crate::sparse::{Plan, SparsityStats};

use super::{check_rows, DecodeError, Decoder, TokenScore};

/// A [`Model`] with its KV cache, a sparse plan and realised-sparsity counts.
pub struct RefDecoder<'a, B: Backend> {
    model: &'a Model<B>,
    sparse: Option<Sparse<'a, B>>,
    cache: KvCache<B>,
    /// Final hidden states of the last forward, `[rows, seq, embed_dim]`, and each row's real length.
    last: Option<(Tensor<B, 3>, Vec<usize>)>,
    stats: SparsityStats,
    count_stats: bool,
    /// Forwards run dense while set (see [`Decoder::set_dense`]).
    dense_now: bool,
}

impl<'a, B: Backend> RefDecoder<'a, B> {
    /// A dense decoder.
    pub fn dense(model: &'a Model<B>) -> Self {
        RefDecoder {
            model,
            sparse: None,
            cache: model.new_cache(),
            last: None,
            stats: SparsityStats::default(),
            count_stats: false,
            dense_now: false,
        }
    }

    /// A decoder running `plan` (validated against the model); `scorer` must be given when the plan has
    /// predicted rules.
    pub fn new(model: &'a Model<B>, plan: &'a Plan, scorer: Option<&'a dyn Scorer<B>>) -> Result<Self, OptionError> {
        Self::with_qscore(model, plan, scorer, None)
    }

    /// As [`RefDecoder::new`], with the low-bit score copies the `qscore` and `cascade` rules read.
    pub fn with_qscore(
        model: &'a Model<B>,
        plan: &'a Plan,
        scorer: Option<&'a dyn Scorer<B>>,
        qscore: Option<&'a QScorer<B>>,
    ) -> Result<Self, OptionError> {
        plan.validate(&model.cfg)?;
        let sparse = if plan.is_dense() { None } else { Some(Sparse::with_qscore(plan, scorer, qscore)?) };
        Ok(RefDecoder { sparse, ..Self::dense(model) })
    }

    /// Count realised sparsity on every forward (costs a few small readbacks per layer).
    pub fn counting(mut self, on: bool) -> Self {
        self.count_stats = on;
        self.stats = SparsityStats::new(if on { self.model.cfg.layers } else { 0 });
        self
    }

    pub fn model(&self) -> &'a Model<B> {
        self.model
    }

    /// The KV cache (tests compare it with a dense prefill's).
    pub fn cache(&self) -> &KvCache<B> {
        &self.cache
    }

    fn last(&self) -> Result<&(Tensor<B, 3>, Vec<usize>), DecodeError> {
        self.last.as_ref().ok_or_else(|| DecodeError::Usage("no forward has run since the last reset".into()))
    }
}

impl<B: Backend> Decoder for RefDecoder<'_, B> {
    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    fn len(&self) -> usize {
        self.cache.len()
    }

    fn reset(&mut self) {
        self.cache = self.model.new_cache();
        self.last = None;
    }

    fn prefill(&mut self, rows: &[Vec<u32>], lens: Option<&[usize]>) -> Result<(), DecodeError> {
        let m = self.model;
        let s = check_rows(&m.cfg, self.cache.len(), rows)?;
        let b = rows.len();
        let batch = self.cache.batch();
        if batch != 0 && batch != b {
            return Err(DecodeError::Usage(format!("the cache holds {batch} rows, the forward has {b}")));
        }
        let lens: Vec<usize> = match lens {
            Some(l) if l.len() != b || l.iter().any(|&n| n > s) => {
                return Err(DecodeError::Usage(format!("row lengths {l:?} do not fit {b} rows of {s} tokens")));
            }
            Some(l) => l.to_vec(),
            None => vec![s; b],
        };
        let valid = (lens.iter().any(|&n| n < s) && self.count_stats).then(|| {
            let v: Vec<f32> = lens.iter().flat_map(|&n| (0..s).map(move |i| if i < n { 1.0 } else { 0.0 })).collect();
            Tensor::<B, 2>::from_data(TensorData::new(v, [b, s]), m.device())
        });
        let sparse = if self.dense_now { None } else { self.sparse };
        // Dense forwards of a sparse decoder (verification passes) are not counted as realised sparsity.
        let stats = (self.count_stats && !self.dense_now).then_some(&mut self.stats);
        let h = m.forward_with(m.tokens(rows), &mut self.cache, Forward { sparse, stats, valid, ..Default::default() });
        self.last = Some((h, lens));
        Ok(())
    }

    fn logits(&mut self) -> Result<Vec<Vec<f32>>, DecodeError> {
        let (h, lens) = self.last()?;
        let [b, _, e] = h.dims();
        let v = self.model.cfg.vocab_size;
        // A padding-only row (length 0) reads position 0.
        let rows: Vec<Tensor<B, 3>> =
            lens.iter().enumerate().map(|(r, &n)| h.clone().slice([r..r + 1, n.max(1) - 1..n.max(1), 0..e])).collect();
        let flat = to_host(self.model.logits(Tensor::cat(rows, 0))); // [b, 1, vocab]
        Ok((0..b).map(|r| flat[r * v..(r + 1) * v].to_vec()).collect())
    }

    fn position_logits(&mut self) -> Result<Vec<Vec<f32>>, DecodeError> {
        let (h, _) = self.last()?;
        let [_, s, e] = h.dims();
        let v = self.model.cfg.vocab_size;
        let flat = to_host(self.model.logits(h.clone().slice([0..1, 0..s, 0..e]))); // [1, s, vocab]
        Ok(flat.chunks(v).map(<[f32]>::to_vec).collect())
    }

    fn score(&mut self, targets: &[Vec<u32>]) -> Result<Vec<Vec<TokenScore>>, DecodeError> {
        let (h, _) = self.last()?;
        let [b, s, _] = h.dims();
        let v = self.model.cfg.vocab_size;
        if targets.len() != b || targets.iter().any(|t| t.len() > s) {
            return Err(DecodeError::Usage(format!("{} target rows for a forward of {b} rows of {s} positions", targets.len())));
        }
        if let Some(&id) = targets.iter().flatten().find(|&&t| t as usize >= v) {
            return Err(DecodeError::TokenOutOfVocab { id, vocab: v });
        }
        let logp = activation::log_softmax(self.model.logits(h.clone()), 2); // [b, s, vocab]
        let mut tgt = vec![0i64; b * s];
        for (r, t) in targets.iter().enumerate() {
            for (p, &id) in t.iter().enumerate() {
                tgt[r * s + p] = id as i64;
            }
        }
        let greedy = logp.clone().argmax(2).reshape([b * s]).into_data().convert::<i64>();
        let greedy: Vec<i64> = greedy.to_vec::<i64>().map_err(|e| DecodeError::Engine(format!("argmax readback: {e:?}")))?;
        let tgt_t = Tensor::<B, 3, Int>::from_data(TensorData::new(tgt.clone(), [b, s, 1]), self.model.device());
        let picked = to_host(logp.gather(2, tgt_t).reshape([b * s]));
        Ok(targets
            .iter()
            .enumerate()
            .map(|(r, t)| (0..t.len()).map(|p| TokenScore { logprob: picked[r * s + p], argmax: greedy[r * s + p] == tgt[r * s + p], top: greedy[r * s + p] as u32 }).collect())
            .collect())
    }

    fn truncate(&mut self, len: usize) -> Result<(), DecodeError> {
        let have = self.cache.len();
        if len > have {
            return Err(DecodeError::Usage(format!("cannot truncate a cache of {have} positions to {len}")));
        }
        self.cache.truncate(len);
        self.last = None;
        Ok(())
    }

    fn fork(&mut self, n: usize) -> Result<(), DecodeError> {
        let b = self.cache.batch();
        if b != 1 || n == 0 {
            return Err(DecodeError::Usage(format!("fork needs a one-row cache and n >= 1 (cache has {b} rows, n = {n})")));
        }
        self.cache = self.cache.repeat_batch(n);
        self.last = None;
        Ok(())
    }

    fn set_dense(&mut self, dense: bool) {
        self.dense_now = dense;
    }

    fn stats(&self) -> &SparsityStats {
        &self.stats
    }

    fn take_stats(&mut self) -> SparsityStats {
        let n = self.stats.layers.len();
        std::mem::replace(&mut self.stats, SparsityStats::new(n))
    }
}
