//! The reference forward for OPT and Llama in burn, generic over the backend. It is the ground truth every
//! later stage (collection, calibration, CPU evaluation, the CUDA engine) is checked against.
//!
//! One forward serves scoring and decoding: it takes a batch of equal-length token rows (pad on the right
//! when scoring rows of different lengths: causal attention keeps padding from touching earlier tokens),
//! appends to a [`KvCache`], and can record per-layer [`Taps`] on the way.

pub mod layers;
mod load;
pub mod scorer;
pub mod sparse_mlp;

use burn::tensor::{activation, backend::Backend, Int, Tensor, TensorData};

use crate::config::{Family, ModelConfig};
use crate::sparse::{select, HeadKv, HeadRule, LayerPlan, MlpRule, SparsityStats};
use layers::{apply_rope, causal_attention, rope_tables, Linear, Norm};
pub use scorer::{Scorer, Sparse};
pub use sparse_mlp::{HostMlp, QScorer, SERVED_BITS};

/// Which per-layer values a forward records. Collection asks for all of them in one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapSet {
    /// Residual stream entering the block (the attention input, before its norm).
    pub block_input: bool,
    /// Residual stream entering the MLP sub-block (before its norm).
    pub mlp_input: bool,
    /// MLP hidden activation: OPT post-ReLU fc1 output; Llama SiLU(gate)·up, plus SiLU(gate) alone.
    pub mlp_act: bool,
    /// L2 norm of each attention head's output (before the output projection).
    pub head_norm: bool,
    /// The MLP input after its norm (what gate/up multiply).
    pub mlp_normed: bool,
    /// Which MLP neurons reached the down projection (1.0 kept, 0.0 dropped).
    pub mlp_keep: bool,
}

impl TapSet {
    /// What collection records (the four activations; not the normed input or the keep-mask).
    pub fn all() -> Self {
        TapSet { block_input: true, mlp_input: true, mlp_act: true, head_norm: true, ..Default::default() }
    }
    pub fn any(&self) -> bool {
        self.block_input || self.mlp_input || self.mlp_act || self.head_norm || self.mlp_normed || self.mlp_keep
    }
}

/// Values recorded in one layer during one forward call.
#[derive(Debug, Clone)]
pub struct LayerTaps<B: Backend> {
    /// `[batch, seq, hidden]`
    pub block_input: Option<Tensor<B, 3>>,
    /// `[batch, seq, hidden]`
    pub mlp_input: Option<Tensor<B, 3>>,
    /// `[batch, seq, ffn]`: OPT post-ReLU fc1; Llama SiLU(gate)·up (signed; take |·| for magnitudes).
    pub mlp_act: Option<Tensor<B, 3>>,
    /// `[batch, seq, ffn]`: Llama only, SiLU(gate) (CATS thresholds this).
    pub gate_act: Option<Tensor<B, 3>>,
    /// `[batch, seq, heads]`
    pub head_norm: Option<Tensor<B, 3>>,
    /// `[batch, seq, hidden]`: the MLP input after its norm.
    pub mlp_normed: Option<Tensor<B, 3>>,
    /// `[batch, seq, ffn]`: 1.0 for the neurons that reached the down projection (all of them when dense).
    pub mlp_keep: Option<Tensor<B, 3>>,
}

impl<B: Backend> Default for LayerTaps<B> {
    fn default() -> Self {
        LayerTaps { block_input: None, mlp_input: None, mlp_act: None, gate_act: None, head_norm: None, mlp_normed: None, mlp_keep: None }
    }
}

/// Per-layer key/value cache. `k, v: [batch, kv_heads, positions, head_dim]`, keys after RoPE; `present`
/// `[batch, kv_heads, positions]` is 1 where the entry was computed, 0 where a head-sparse token skipped that
/// key/value head ([`HeadKv::Kept`]); `None` while every entry is present.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerKv<B>>>,
}

#[derive(Debug, Clone)]
struct LayerKv<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    present: Option<Tensor<B, 3>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(layers: usize) -> Self {
        KvCache { layers: vec![None; layers] }
    }
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|l| l.k.dims()[2]).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every layer's keys and values on the host, each `[rows, kv_heads, len, head_dim]` flattened (empty layers
    /// give empty vectors): for tests that compare caches.
    pub fn to_host(&self) -> Vec<(Vec<f32>, Vec<f32>)> {
        self.layers
            .iter()
            .map(|l| match l {
                Some(l) => (to_host(l.k.clone()), to_host(l.v.clone())),
                None => (Vec::new(), Vec::new()),
            })
            .collect()
    }
    /// Layer `layer`'s presence flags on the host, `[rows, kv_heads, len]` flattened (1 present, 0 skipped);
    /// `None` while every entry is present.
    pub fn present(&self, layer: usize) -> Option<Vec<f32>> {
        self.layers.get(layer)?.as_ref()?.present.clone().map(to_host)
    }
    /// Rows of the batch the cache holds (0 when empty).
    pub fn batch(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|l| l.k.dims()[0]).unwrap_or(0)
    }
    /// Keep only the first `len` positions (no-op when `len >= self.len()`); `0` empties the cache.
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            if len == 0 {
                *l = None;
                continue;
            }
            if let Some(l) = l.as_mut() {
                let [b, h, t, d] = l.k.dims();
                if len < t {
                    l.k = l.k.clone().slice([0..b, 0..h, 0..len, 0..d]);
                    l.v = l.v.clone().slice([0..b, 0..h, 0..len, 0..d]);
                    l.present = l.present.take().map(|p| p.slice([0..b, 0..h, 0..len]));
                }
            }
        }
    }
    /// The cache of a batch-1 prefix repeated `n` times along the batch axis (to score several continuations
    /// of one shared context together).
    pub fn repeat_batch(&self, n: usize) -> Self {
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.as_ref().map(|l| LayerKv {
                        k: l.k.clone().repeat_dim(0, n),
                        v: l.v.clone().repeat_dim(0, n),
                        present: l.present.clone().map(|p| p.repeat_dim(0, n)),
                    })
                })
                .collect(),
        }
    }
    /// Append `k, v` `[b, kv, s, dh]` to layer `index`, with `present` `[b, kv, s]` (None: all present); returns the
    /// whole layer's keys, values and presence (None while all present).
    fn append(&mut self, index: usize, k: Tensor<B, 4>, v: Tensor<B, 4>, present: Option<Tensor<B, 3>>) -> LayerKv<B> {
        let [b, kv, s, _] = k.dims();
        let dev = k.device();
        let l = match self.layers[index].take() {
            Some(old) => {
                let t = old.k.dims()[2];
                let present = match (old.present, present) {
                    (None, None) => None,
                    (p, q) => Some(Tensor::cat(
                        vec![p.unwrap_or_else(|| Tensor::ones([b, kv, t], &dev)), q.unwrap_or_else(|| Tensor::ones([b, kv, s], &dev))],
                        2,
                    )),
                };
                LayerKv { k: Tensor::cat(vec![old.k, k], 2), v: Tensor::cat(vec![old.v, v], 2), present }
            }
            None => LayerKv { k, v, present },
        };
        self.layers[index] = Some(l.clone());
        l
    }
}

enum Mlp<B: Backend> {
    /// OPT: fc2(ReLU(fc1 x))
    Relu { fc1: Linear<B>, fc2: Linear<B> },
    /// Llama: down(SiLU(gate x) · up x)
    SwiGlu { gate: Linear<B>, up: Linear<B>, down: Linear<B> },
}

struct Layer<B: Backend> {
    attn_norm: Norm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    mlp_norm: Norm<B>,
    mlp: Mlp<B>,
}

/// A loaded model on one burn device.
pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    /// `[vocab, embed_dim]`
    embed: Tensor<B, 2>,
    /// OPT: `[max_positions + 2, hidden]` (positions are offset by 2, as in fairseq).
    pos_embed: Option<Tensor<B, 2>>,
    /// OPT-350m style: `[embed_dim -> hidden]` and back.
    project_in: Option<Linear<B>>,
    project_out: Option<Linear<B>>,
    layers: Vec<Layer<B>>,
    final_norm: Option<Norm<B>>,
    /// `[embed_dim, vocab]`
    lm_head: Tensor<B, 2>,
    device: B::Device,
    /// Host copies of the MLPs for the gathered SwiGLU rules, built on first use.
    host: std::sync::OnceLock<Vec<HostMlp>>,
}

/// OPT position offset (fairseq legacy: positions 0 and 1 are reserved).
const OPT_POS_OFFSET: usize = 2;

impl<B: Backend> Model<B> {
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.cfg.layers)
    }

    /// Token rows (all the same length) as an Int tensor `[batch, seq]`.
    pub fn tokens(&self, rows: &[Vec<u32>]) -> Tensor<B, 2, Int> {
        let b = rows.len();
        let s = rows.first().map(|r| r.len()).unwrap_or(0);
        debug_assert!(rows.iter().all(|r| r.len() == s), "token rows must have equal lengths");
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&t| t as i64)).collect();
        Tensor::from_data(TensorData::new(flat, [b, s]), &self.device)
    }

    /// Run the decoder over `tokens: [batch, seq]` placed after the `cache.len()` cached positions, append their
    /// keys/values to the cache, and return the final hidden states `[batch, seq, embed_dim]` (after the final
    /// norm and `project_out`: feed them to [`Model::logits`]). When `taps` is given, the values it asks for are
    /// recorded, one [`LayerTaps`] per layer, replacing what it held.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        taps: Option<(&TapSet, &mut Vec<LayerTaps<B>>)>,
    ) -> Tensor<B, 3> {
        self.forward_with(tokens, cache, Forward { taps, ..Default::default() })
    }

    /// [`Model::forward`] with every option: taps, a sparsity plan, and realised-sparsity counting.
    pub fn forward_with(&self, tokens: Tensor<B, 2, Int>, cache: &mut KvCache<B>, mut opts: Forward<'_, B>) -> Tensor<B, 3> {
        let c = &self.cfg;
        let [b, s] = tokens.dims();
        let past = cache.len();
        let ids = tokens.reshape([b * s]);
        let mut x = self.embed.clone().select(0, ids).reshape([b, s, c.embed_dim]); // [b, s, embed_dim]
        if let Some(p) = &self.project_in {
            x = p.forward(x);
        }
        if let Some(pos) = &self.pos_embed {
            let start = past + OPT_POS_OFFSET;
            let pe = pos.clone().slice([start..start + s, 0..c.hidden]); // [s, hidden]
            x = x + pe.unsqueeze::<3>();
        }
        let rope = (c.family == Family::Llama).then(|| rope_tables::<B>(past, s, c.head_dim, c.rope_theta, &self.device));
        if let Some((_, out)) = opts.taps.as_mut() {
            out.clear();
        }
        if let Some(st) = opts.stats.as_mut() {
            if st.layers.len() != c.layers {
                **st = SparsityStats::new(c.layers);
            }
        }
        let mut prev_block_input = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let mut lt = LayerTaps::default();
            let want = opts.taps.as_ref().map(|(w, _)| **w).unwrap_or_default();
            let plan = opts.sparse.map_or(LayerPlan::DENSE, |sp| sp.plan().layer(i));
            let ctx = LayerCtx {
                index: i,
                rope: rope.as_ref(),
                want,
                plan,
                scorer: opts.sparse.and_then(|sp| sp.scorer()),
                qscore: opts.sparse.and_then(|sp| sp.qscore()),
                prev_block_input: &prev_block_input,
                stats: opts.stats.as_deref_mut(),
                valid: opts.valid.as_ref(),
            };
            let input = x.clone();
            x = self.layer_forward(layer, x, cache, ctx, &mut lt);
            prev_block_input = input;
            if let Some((_, out)) = opts.taps.as_mut() {
                out.push(lt);
            }
        }
        if let Some(n) = &self.final_norm {
            x = n.forward(x);
        }
        if let Some(p) = &self.project_out {
            x = p.forward(x);
        }
        x
    }

    /// `h: [batch, seq, embed_dim] -> logits [batch, seq, vocab]`
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, e] = h.dims();
        h.reshape([b * s, e]).matmul(self.lm_head.clone()).reshape([b, s, self.cfg.vocab_size])
    }

    fn layer_forward(
        &self,
        layer: &Layer<B>,
        x: Tensor<B, 3>,
        cache: &mut KvCache<B>,
        ctx: LayerCtx<'_, B>,
        taps: &mut LayerTaps<B>,
    ) -> Tensor<B, 3> {
        let LayerCtx { index, rope, want, plan, scorer, qscore, prev_block_input, stats, valid } = ctx;
        let want = &want;
        let c = &self.cfg;
        let [b, s, _] = x.dims();
        let (h, kv, dh) = (c.heads, c.kv_heads, c.head_dim);
        if want.block_input {
            taps.block_input = Some(x.clone());
        }

        // A look-ahead neuron predictor reads a block input (this layer's, before the attention, or the previous
        // layer's).
        let block_in = match (plan.mlp, scorer) {
            (MlpRule::PredictedTopK { .. }, Some(sc)) => match sc.neuron_input() {
                crate::predictor::NeuronInput::Block => Some(x.clone()),
                crate::predictor::NeuronInput::Prev => Some(prev_block_input.clone()),
                crate::predictor::NeuronInput::Mlp => None,
            },
            _ => None,
        };

        // Attention sub-block.
        let residual = x.clone();
        let a_in = if c.norm_before { layer.attn_norm.forward(x) } else { x };
        let q = layer.q.forward(a_in.clone()).reshape([b, s, h, dh]).swap_dims(1, 2); // [b, h, s, dh]
        let k = layer.k.forward(a_in.clone()).reshape([b, s, kv, dh]).swap_dims(1, 2); // [b, kv, s, dh]
        let v = layer.v.forward(a_in).reshape([b, s, kv, dh]).swap_dims(1, 2); // [b, kv, s, dh]
        let (q, k) = match rope {
            Some((cos, sin)) => (apply_rope(q, cos, sin), apply_rope(k, cos, sin)),
            None => (q, k),
        };
        // A predicted head set is known before the attention (look-ahead); the oracle's needs the heads' outputs.
        let predicted_heads = match (plan.heads, scorer) {
            (HeadRule::PredictedTopK { k, kv }, Some(sc)) => Some((topk_mask(sc.head_scores(index, prev_block_input.clone()), k), kv)),
            (HeadRule::PredictedTopK { .. }, None) => unreachable!("Sparse::new refuses predicted rules without a scorer"),
            _ => None,
        }; // [b, s, h]
        // Under `HeadKv::Kept` a key/value head is present at a position where one of its query heads is kept.
        let present = match &predicted_heads {
            Some((m, HeadKv::Kept)) => Some(m.clone().reshape([b, s, kv, h / kv]).max_dim(3).reshape([b, s, kv]).swap_dims(1, 2)),
            _ => None,
        }; // [b, kv, s]
        let all = cache.append(index, k, v, present);
        let att = causal_attention(q, all.k, all.v, all.present, 1.0 / (dh as f64).sqrt()); // [b, h, s, dh]
        let need_norm = want.head_norm || matches!(plan.heads, HeadRule::OracleTopK { .. });
        let norms = need_norm.then(|| att.clone().powi_scalar(2).sum_dim(3).sqrt().reshape([b, h, s]).swap_dims(1, 2)); // [b, s, h]
        if want.head_norm {
            taps.head_norm = norms.clone();
        }
        let head_mask = match plan.heads {
            HeadRule::OracleTopK { k } => norms.map(|n| topk_mask(n, k)),
            _ => predicted_heads.map(|(m, _)| m),
        }; // [b, s, h]
        let mut att = att.swap_dims(1, 2); // [b, s, h, dh]
        if let Some(m) = &head_mask {
            att = att * m.clone().unsqueeze_dim::<4>(3);
        }
        let att = att.reshape([b, s, h * dh]);
        let mut x = residual + layer.o.forward(att);
        if !c.norm_before {
            x = layer.attn_norm.forward(x);
        }

        // MLP sub-block.
        if want.mlp_input {
            taps.mlp_input = Some(x.clone());
        }
        let residual = x.clone();
        let m_in = if c.norm_before { layer.mlp_norm.forward(x) } else { x };
        if want.mlp_normed {
            taps.mlp_normed = Some(m_in.clone());
        }
        if plan.mlp.is_gathered() {
            let m_out = self.gathered_mlp(layer, index, m_in, plan.mlp, qscore, want, taps, stats, head_mask.as_ref(), valid);
            return residual + m_out;
        }
        let predicted = match (plan.mlp, scorer) {
            (MlpRule::PredictedTopK { k }, Some(sc)) => Some(topk_mask(sc.neuron_scores(index, block_in.unwrap_or_else(|| residual.clone())), k)),
            (MlpRule::PredictedTopK { .. }, None) => unreachable!("Sparse::new refuses predicted rules without a scorer"),
            _ => None,
        };
        // `gate_mag` is what CATS thresholds, `act` the hidden value fed to the down projection. [b, s, ffn]
        let (gate_mag, act) = match &layer.mlp {
            Mlp::Relu { fc1, .. } => {
                let act = activation::relu(fc1.forward(m_in));
                (act.clone(), act)
            }
            Mlp::SwiGlu { gate, up, .. } => {
                let g = activation::silu(gate.forward(m_in.clone()));
                if want.mlp_act {
                    taps.gate_act = Some(g.clone());
                }
                let act = g.clone() * up.forward(m_in);
                (g.abs(), act)
            }
        };
        if want.mlp_act {
            taps.mlp_act = Some(act.clone());
        }
        // Keep-masks, [b, s, ffn]. The threshold compares on the device with `>=`, the same rule as
        // `select::threshold_mask`; top-k rules go through the host reference so ties break by the lower index.
        let mask = match plan.mlp {
            MlpRule::Dense => None,
            MlpRule::Threshold { t } => Some(gate_mag.greater_equal_elem(t).float()),
            MlpRule::OracleTopK { k } => Some(topk_mask(act.clone().abs(), k)),
            MlpRule::PredictedTopK { .. } => predicted,
            // Gathered rules returned above.
            MlpRule::ExactDownTopK { .. } | MlpRule::QScoreTopK { .. } | MlpRule::Cascade { .. } | MlpRule::Teal { .. } | MlpRule::Wina { .. } => None,
        };
        if want.mlp_keep {
            taps.mlp_keep = Some(mask.clone().unwrap_or_else(|| act.ones_like()));
        }
        if let Some(st) = stats {
            let swiglu = matches!(layer.mlp, Mlp::SwiGlu { .. });
            record_stats(st, index, &act, mask.as_ref(), head_mask.as_ref(), h, valid, reads_of(plan.mlp, swiglu, c.hidden));
        }
        let act = match mask {
            Some(m) => act * m,
            None => act,
        };
        let m_out = match &layer.mlp {
            Mlp::Relu { fc2, .. } => fc2.forward(act),
            Mlp::SwiGlu { down, .. } => down.forward(act),
        };
        let mut x = residual + m_out;
        if !c.norm_before {
            x = layer.mlp_norm.forward(x);
        }
        x
    }
}

/// MLP weights a mask rule reads for one token that kept `kept` neurons: `(read, dense)` in weights.
/// Dense reads everything; CATS reads the gate (fc1) to decide and then up and down rows of the kept neurons;
/// the oracle reads gate/up (fc1) densely and the kept rows of down (fc2); predictors read the kept rows of every
/// matrix (the predictor's own weights are not counted).
fn reads_of(rule: MlpRule, swiglu: bool, d: usize) -> impl Fn(usize, usize) -> (f64, f64) {
    move |kept: usize, f: usize| {
        let (d, f, k) = (d as f64, f as f64, kept as f64);
        let (ins, dense) = if swiglu { (2.0, 3.0 * f * d) } else { (1.0, 2.0 * f * d) };
        let read = match rule {
            MlpRule::Dense => dense,
            MlpRule::Threshold { .. } if swiglu => f * d + 2.0 * k * d,
            MlpRule::Threshold { .. } => f * d + k * d,
            MlpRule::OracleTopK { .. } => ins * f * d + k * d,
            MlpRule::PredictedTopK { .. } => (ins + 1.0) * k * d,
            // Gathered rules count their own reads.
            _ => dense,
        };
        (read, dense)
    }
}

impl<B: Backend> Model<B> {
    /// The MLP sub-block of a gathered SwiGLU rule (see [`sparse_mlp`]): `m_in: [b, s, d]` the normed input,
    /// returns the MLP output `[b, s, d]`.
    #[allow(clippy::too_many_arguments)]
    fn gathered_mlp(
        &self,
        layer: &Layer<B>,
        index: usize,
        m_in: Tensor<B, 3>,
        rule: MlpRule,
        qscore: Option<&QScorer<B>>,
        want: &TapSet,
        taps: &mut LayerTaps<B>,
        stats: Option<&mut SparsityStats>,
        head_mask: Option<&Tensor<B, 3>>,
        valid: Option<&Tensor<B, 2>>,
    ) -> Tensor<B, 3> {
        let [b, s, d] = m_in.dims();
        let c = &self.cfg;
        let f = c.ffn;
        let host = &self.host_mlps()[index];
        // The score pass reads the whole low-bit copy; `Sparse::with_qscore` guarantees one where a rule needs it.
        let (score, bits) = match (rule.needs_qscore(), qscore) {
            (true, Some(q)) => (Some(to_host(q.scores(index, m_in.clone()))), q.bits_per_weight),
            _ => (None, 0.0),
        };
        // Exact-down pays for the full gate/up pass: it is computed densely here.
        let act = match (&layer.mlp, rule) {
            (Mlp::SwiGlu { gate, up, .. }, MlpRule::ExactDownTopK { .. }) => {
                Some(to_host(activation::silu(gate.forward(m_in.clone())) * up.forward(m_in.clone())))
            }
            _ => None,
        };
        let x = to_host(m_in.clone());
        let (out, work, hidden) = host.run(rule, &x, score.as_deref(), act.as_deref(), bits, want.mlp_act);
        let dev = m_in.device();
        if let Some(hid) = hidden {
            taps.mlp_act = Some(Tensor::from_data(TensorData::new(hid, [b, s, f]), &dev));
        }
        if want.mlp_keep {
            let mut m = vec![0f32; b * s * f];
            for (t, w) in work.iter().enumerate() {
                for &j in &w.kept {
                    m[t * f + j] = 1.0;
                }
            }
            taps.mlp_keep = Some(Tensor::from_data(TensorData::new(m, [b, s, f]), &dev));
        }
        if let Some(st) = stats {
            let kept_heads = head_mask.map(|h| to_host(h.clone().sum_dim(2).reshape([b * s])));
            let valid = valid.map(|v| to_host(v.clone().reshape([b * s])));
            let dense = host.dense_read();
            if let Some(ls) = st.layers.get_mut(index) {
                for (t, w) in work.iter().enumerate() {
                    if valid.as_ref().is_some_and(|v| v[t] < 0.5) {
                        continue;
                    }
                    let hk = kept_heads.as_ref().map_or(c.heads as u64, |k| k[t].round() as u64);
                    ls.add_token(f as u64, 0, (f - w.kept.len()) as u64, c.heads as u64, hk);
                    ls.add_reads(w.read, dense);
                }
            }
        }
        Tensor::from_data(TensorData::new(out, [b, s, d]), &dev)
    }
}

/// Options of [`Model::forward_with`].
pub struct Forward<'a, B: Backend> {
    pub taps: Option<(&'a TapSet, &'a mut Vec<LayerTaps<B>>)>,
    /// The sparse plan with its scorer; `None` runs dense.
    pub sparse: Option<Sparse<'a, B>>,
    /// Where realised sparsity is counted (reset to the model's layer count if its length differs).
    pub stats: Option<&'a mut SparsityStats>,
    /// `[batch, seq]`: 1.0 for real tokens, 0.0 for right padding (excluded from `stats`).
    pub valid: Option<Tensor<B, 2>>,
}

impl<B: Backend> Default for Forward<'_, B> {
    fn default() -> Self {
        Forward { taps: None, sparse: None, stats: None, valid: None }
    }
}

/// Per-layer inputs of `layer_forward` beyond the hidden state.
struct LayerCtx<'a, B: Backend> {
    index: usize,
    rope: Option<&'a (Tensor<B, 2>, Tensor<B, 2>)>,
    want: TapSet,
    plan: LayerPlan,
    scorer: Option<&'a dyn Scorer<B>>,
    qscore: Option<&'a QScorer<B>>,
    /// Block input of the previous layer (layer 0: its own), read by look-ahead head predictors.
    prev_block_input: &'a Tensor<B, 3>,
    stats: Option<&'a mut SparsityStats>,
    valid: Option<&'a Tensor<B, 2>>,
}

/// Read a `[batch, seq, n]` float tensor back to the host, row-major, with its dims.
pub fn to_host_3d<B: Backend>(t: Tensor<B, 3>) -> (Vec<f32>, [usize; 3]) {
    let dims = t.dims();
    (to_host(t), dims)
}

/// Read any float tensor back to the host as f32, row-major.
pub fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    let data = t.into_data().convert::<f32>();
    // After `convert::<f32>` the element type is f32, so `to_vec::<f32>` cannot fail.
    data.to_vec::<f32>().expect("tensor data converted to f32 reads back as f32")
}

/// 1.0 where `scores: [b, s, n]` is among the `k` largest of its row (ties by the lower index, through the host
/// reference [`select::top_k_rows`]), else 0.0.
pub fn topk_mask<B: Backend>(scores: Tensor<B, 3>, k: usize) -> Tensor<B, 3> {
    let [b, s, n] = scores.dims();
    let dev = scores.device();
    if k >= n {
        return Tensor::ones([b, s, n], &dev);
    }
    if k == 0 {
        return Tensor::zeros([b, s, n], &dev);
    }
    let mask = select::top_k_rows(&to_host(scores), n, k);
    Tensor::from_data(TensorData::new(mask, [b, s, n]), &dev)
}

/// Count one layer's realised sparsity: `act: [b, s, ffn]` the dense hidden value, `mask` its keep-mask (1 kept),
/// `heads_kept: [b, s, heads]` (`None` = all kept), over positions where `valid: [b, s]` is 1.
#[allow(clippy::too_many_arguments)]
fn record_stats<B: Backend>(
    st: &mut SparsityStats,
    layer: usize,
    act: &Tensor<B, 3>,
    mask: Option<&Tensor<B, 3>>,
    heads_kept: Option<&Tensor<B, 3>>,
    n_heads: usize,
    valid: Option<&Tensor<B, 2>>,
    reads: impl Fn(usize, usize) -> (f64, f64),
) {
    let [b, s, f] = act.dims();
    let nonzero = act.clone().not_equal_elem(0.0).float(); // [b, s, ffn]
    let natural = to_host(nonzero.clone().sum_dim(2).reshape([b * s]));
    let dropped = match mask {
        Some(m) => to_host((nonzero * (m.clone().neg() + 1.0)).sum_dim(2).reshape([b * s])),
        None => vec![0.0; b * s],
    };
    let kept_mask = mask.map(|m| to_host(m.clone().sum_dim(2).reshape([b * s])));
    let kept_heads = heads_kept.map(|h| to_host(h.clone().sum_dim(2).reshape([b * s])));
    let valid = valid.map(|v| to_host(v.clone().reshape([b * s])));
    let Some(st) = st.layers.get_mut(layer) else { return };
    for i in 0..b * s {
        if valid.as_ref().is_some_and(|v| v[i] < 0.5) {
            continue;
        }
        let heads_kept = kept_heads.as_ref().map_or(n_heads as u64, |k| k[i].round() as u64);
        st.add_token(f as u64, f as u64 - natural[i].round() as u64, dropped[i].round() as u64, n_heads as u64, heads_kept);
        let kept = kept_mask.as_ref().map_or(f, |k| k[i].round() as usize);
        let (read, dense) = reads(kept, f);
        st.add_reads(read, dense);
    }
}
