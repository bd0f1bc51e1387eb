//! Sparsity plans for the reference forward: which MLP neurons and attention heads each token keeps.
//! Every mode is an exact mask on the dense computation, so this path is the ground truth the CUDA engine must
//! reproduce. Realised sparsity is counted from the masked tensors themselves, per layer and per token.

use burn::tensor::{backend::Backend, Tensor};

/// How one layer's MLP neurons are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MlpRule {
    Dense,
    /// CATS: zero neurons whose gate magnitude is below the threshold (Llama |SiLU(gate)|, OPT post-ReLU fc1).
    Threshold(f32),
    /// Keep the k neurons with the largest true activation magnitude (Llama |SiLU(gate)·up|, OPT post-ReLU).
    OracleTopK(usize),
    /// Keep the k neurons a predictor ranks highest from the MLP input.
    PredictedTopK(usize),
}

/// How one layer's attention heads are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HeadRule {
    Dense,
    /// Keep the k heads whose output has the largest L2 norm.
    OracleTopK(usize),
    /// Keep the k heads a predictor ranks highest from the previous layer's block input (look-ahead).
    PredictedTopK(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerPlan {
    pub mlp: MlpRule,
    pub heads: HeadRule,
}

impl LayerPlan {
    pub const DENSE: LayerPlan = LayerPlan { mlp: MlpRule::Dense, heads: HeadRule::Dense };
}

/// Scores neurons and heads for the `Predicted*` rules (implemented by trained Deja Vu predictors).
pub trait Scorer<B: Backend> {
    /// `mlp_input: [b, s, d] -> [b, s, ffn]`, larger means more likely needed.
    fn neuron_scores(&self, layer: usize, mlp_input: Tensor<B, 3>) -> Tensor<B, 3>;
    /// `prev_block_input: [b, s, d] -> [b, s, heads]`
    fn head_scores(&self, layer: usize, prev_block_input: Tensor<B, 3>) -> Tensor<B, 3>;
}

/// A plan for every layer, plus the scorer the `Predicted*` rules need.
pub struct SparsityPlan<'a, B: Backend> {
    pub layers: Vec<LayerPlan>,
    pub scorer: Option<&'a dyn Scorer<B>>,
}

impl<'a, B: Backend> SparsityPlan<'a, B> {
    pub fn dense(layers: usize) -> Self {
        SparsityPlan { layers: vec![LayerPlan::DENSE; layers], scorer: None }
    }
    pub fn uniform(layers: usize, plan: LayerPlan) -> Self {
        SparsityPlan { layers: vec![plan; layers], scorer: None }
    }
}

/// Realised sparsity, accumulated over forwards. Counts are over real (non-padding) tokens.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SparsityStats {
    pub layers: Vec<LayerStats>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerStats {
    pub tokens: u64,
    /// MLP hidden entries that were exactly zero when fed to the down projection, summed over tokens.
    pub mlp_zero: u64,
    pub mlp_total: u64,
    /// Smallest and largest per-token MLP sparsity seen.
    pub mlp_token_min: f64,
    pub mlp_token_max: f64,
    pub heads_off: u64,
    pub heads_total: u64,
}

impl LayerStats {
    pub fn mlp_sparsity(&self) -> f64 {
        if self.mlp_total == 0 { 0.0 } else { self.mlp_zero as f64 / self.mlp_total as f64 }
    }
    pub fn head_sparsity(&self) -> f64 {
        if self.heads_total == 0 { 0.0 } else { self.heads_off as f64 / self.heads_total as f64 }
    }
}

impl SparsityStats {
    pub fn new(layers: usize) -> Self {
        SparsityStats {
            layers: vec![LayerStats { mlp_token_min: f64::INFINITY, mlp_token_max: 0.0, ..Default::default() }; layers],
        }
    }
    /// Mean over layers of the per-layer MLP sparsity.
    pub fn mlp_sparsity(&self) -> f64 {
        mean(self.layers.iter().map(|l| l.mlp_sparsity()))
    }
    pub fn head_sparsity(&self) -> f64 {
        mean(self.layers.iter().map(|l| l.head_sparsity()))
    }
    pub fn merge(&mut self, other: &SparsityStats) {
        if self.layers.len() < other.layers.len() {
            self.layers.resize(other.layers.len(), LayerStats { mlp_token_min: f64::INFINITY, ..Default::default() });
        }
        for (a, b) in self.layers.iter_mut().zip(&other.layers) {
            a.tokens += b.tokens;
            a.mlp_zero += b.mlp_zero;
            a.mlp_total += b.mlp_total;
            a.heads_off += b.heads_off;
            a.heads_total += b.heads_total;
            a.mlp_token_min = a.mlp_token_min.min(b.mlp_token_min);
            a.mlp_token_max = a.mlp_token_max.max(b.mlp_token_max);
        }
    }

    /// Count one layer's masked MLP activation `act: [b, s, ffn]` and head mask `heads_kept: [b, s, heads]`
    /// (1 kept, 0 dropped; `None` = all kept) over the positions where `valid: [b, s]` is 1.
    pub fn record<B: Backend>(
        &mut self,
        layer: usize,
        act: &Tensor<B, 3>,
        heads_kept: Option<&Tensor<B, 3>>,
        n_heads: usize,
        valid: Option<&Tensor<B, 2>>,
    ) {
        let [b, s, f] = act.dims();
        let zeros: Vec<f32> = to_vec(act.clone().equal_elem(0.0).float().sum_dim(2).reshape([b * s]));
        let valid: Vec<f32> = match valid {
            Some(v) => to_vec(v.clone().reshape([b * s])),
            None => vec![1.0; b * s],
        };
        let off: Option<Vec<f32>> = heads_kept.map(|h| to_vec(h.clone().sum_dim(2).reshape([b * s])));
        let st = &mut self.layers[layer];
        for i in 0..b * s {
            if valid[i] < 0.5 {
                continue;
            }
            st.tokens += 1;
            st.mlp_zero += zeros[i] as u64;
            st.mlp_total += f as u64;
            let frac = zeros[i] as f64 / f as f64;
            st.mlp_token_min = st.mlp_token_min.min(frac);
            st.mlp_token_max = st.mlp_token_max.max(frac);
            st.heads_total += n_heads as u64;
            if let Some(kept) = &off {
                st.heads_off += n_heads as u64 - kept[i].round() as u64;
            }
        }
    }
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = it.collect();
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
}

/// 1.0 where `scores` is among the `k` largest along the last axis, else 0.0. `scores: [b, s, n]`.
/// Ties at the k-th value are all kept (exact ties are measure-zero for real-valued scores).
pub fn topk_mask<B: Backend>(scores: Tensor<B, 3>, k: usize) -> Tensor<B, 3> {
    let [b, s, n] = scores.dims();
    if k >= n {
        return Tensor::ones([b, s, n], &scores.device());
    }
    if k == 0 {
        return Tensor::zeros([b, s, n], &scores.device());
    }
    let kth = scores.clone().topk(k, 2).slice([0..b, 0..s, k - 1..k]); // [b, s, 1]
    scores.greater_equal(kth.expand([b, s, n])).float()
}
