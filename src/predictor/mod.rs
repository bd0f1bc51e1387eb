//! Deja Vu's learned sparsity predictors: per layer, a low-rank neuron predictor (which MLP neurons a token
//! needs) and a low-rank head predictor (which attention heads), trained in burn with autodiff from the
//! activations `collect` recorded, plus [`Predictors`], the loaded form later stages call.
//!
//! Each predictor is `Linear(d, r) → Linear(r, n)` with no non-linearity between (Deja Vu's low-rank form), fed
//! a normalised input:
//!
//! ```text
//! u = x / sqrt(mean(x²) + 1e-6)          // per token, over the d features (no learned weight)
//! z = (u - in_mean) * in_inv_std          // per feature, statistics of u over the training tokens
//! logits = (z @ w1 + b1) @ w2 + b2        // w1 [d, r], w2 [r, n]
//! ```
//!
//! The neuron predictor of layer l reads layer l's MLP input (or, trained with `--neuron-input block`, layer l's
//! block input: Deja Vu's asynchronous look-ahead, predicted while the attention runs; with `prev`, layer l−1's
//! block input, layer 0 its own, predicted a layer ahead); the head predictor of layer l reads layer l−1's
//! block input (look-ahead: it can run while layer l−1 computes), layer 0 its own block input. A unit is kept
//! when it is among the top `k` scores of its token; `k` per layer is the smallest that reaches the target recall
//! on held-out tokens (the last `holdout` fraction of the collected stream, so different text).
//!
//! Files under `RUN/predictors`: `predictors.safetensors` (f32; `layer.{i}.{mlp,att}.{w1,b1,w2,b2,in_mean,
//! in_inv_std}`), `manifest.json` (model identity, per-layer k and metrics, rank, label rules, input taps),
//! `metrics.csv` and `recall_density.svg`.

mod load;
mod metrics;
mod model;
mod svg;
mod train;

use crate::source::ModelIdentity;
use crate::store::ArtifactHeader;

pub use load::Predictors;
pub use metrics::LayerMetrics;
pub use model::{normalize_input, rms_normalize, FoldedPredictor, LowRankHost, RMS_EPS};
pub use svg::svg_plot;
pub use train::{default_rank, topk_count, train, NeuronInput, NeuronTarget, TrainEvent, TrainOptions};

pub const WEIGHTS_FILE: &str = "predictors.safetensors";


#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ActsLink {
    /// The activations manifest, relative to the predictors directory.
    pub manifest: String,
    pub tokens: usize,
    pub seq_len: usize,
    pub sources: Vec<crate::collect::TextSource>,
}

/// `RUN/predictors/manifest.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PredictorsManifest {
    /// Format `dejavu.predictors`, the model, and the [`TrainOptions`] used.
    pub header: ArtifactHeader,
    pub acts: ActsLink,
    pub rank: usize,
    pub train_tokens: usize,
    pub heldout_tokens: usize,
    pub neuron_label: String,
    pub head_label: String,
    pub neuron_input: String,
    /// What the neuron predictors read, as [`NeuronInput`] (absent from older manifests: the MLP input).
    #[serde(default)]
    pub neuron_tap: NeuronInput,
    pub head_input: String,
    pub normalisation: String,
    pub layers: Vec<LayerMetrics>,
}

impl PredictorsManifest {
    /// The model the predictors were trained for.
    pub fn model(&self) -> &ModelIdentity {
        &self.header.model
    }
}
