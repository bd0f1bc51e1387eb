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
//! The neuron predictor of layer l reads layer l's MLP input; the head predictor of layer l reads layer l−1's
//! block input (look-ahead: it can run while layer l−1 computes), layer 0 its own block input. A unit is kept
//! when it is among the top `k` scores of its token; `k` per layer is the smallest that reaches the target recall
//! on held-out tokens (the last `holdout` fraction of the collected stream, so different text).
//!
//! Files under `RUN/predictors`: `predictors.safetensors` (f32; `layer.{i}.{mlp,att}.{w1,b1,w2,b2,in_mean,
//! in_inv_std}`), `manifest.json` (model identity, per-layer k and metrics, rank, label rules, input taps),
//! `metrics.csv` and `recall_density.svg`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::collect::{Activations, CollectError, Tap};
use crate::config::Family;
use crate::decode::SplitMix64;
use crate::manifest;
use crate::source::ModelIdentity;

pub const PREDICTORS_FORMAT: &str = "dejavu-predictors/1";
pub const WEIGHTS_FILE: &str = "predictors.safetensors";
/// Epsilon of the per-token RMS normalisation of predictor inputs.
pub const RMS_EPS: f64 = 1e-6;

#[derive(Debug, thiserror::Error)]
pub enum PredictorError {
    #[error(transparent)]
    Acts(#[from] CollectError),
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// Predictors or activations of another model.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Invalid(String),
}

impl PredictorError {
    fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        PredictorError::File { path: path.into(), msg: msg.into() }
    }
}

pub type Result<T, E = PredictorError> = std::result::Result<T, E>;

/// Default rank: a quarter of the hidden size, rounded down to a multiple of 32, within 16..=1024 (and at most
/// `hidden`). SmolLM2 (d=576) gets 128 (~12M f32 values for 30 layers' neuron and head predictors), OPT-1.3B 512,
/// OPT-6.7B 1024 (Deja Vu's ~1000).
pub fn default_rank(hidden: usize) -> usize {
    ((hidden / 4) / 32 * 32).clamp(16, 1024).min(hidden)
}

/// Which recorded Llama activation the neuron labels rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NeuronTarget {
    /// |SiLU(gate)·up|: the neuron's actual contribution to the MLP output (Deja Vu's sense of "needed").
    #[default]
    Act,
    /// |SiLU(gate)|: CATS' criterion.
    Gate,
}

impl NeuronTarget {
    fn tap(self) -> Tap {
        match self {
            NeuronTarget::Act => Tap::MlpAct,
            NeuronTarget::Gate => Tap::GateAct,
        }
    }
    fn describe(self) -> &'static str {
        match self {
            NeuronTarget::Act => "|SiLU(gate)·up|",
            NeuronTarget::Gate => "|SiLU(gate)|",
        }
    }
}

/// How training is run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainOptions {
    pub rank: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f32,
    /// Epochs without a better held-out score before stopping.
    pub patience: usize,
    /// Fraction of tokens (the tail of the stream) held out.
    pub holdout: f64,
    pub target_recall: f64,
    pub head_target_recall: f64,
    /// Llama: fraction of neurons labelled active per token (top-k of `neuron_target`).
    pub neuron_density: f64,
    /// Llama: the activation the neuron labels rank.
    #[serde(default)]
    pub neuron_target: NeuronTarget,
    /// Fraction of heads labelled active per token (top-k of head output norm).
    pub head_density: f64,
    pub seed: u64,
    /// Use at most this many collected tokens.
    pub max_tokens: usize,
    /// Held-out tokens scored after each epoch for early stopping (all of them are scored at the end).
    pub eval_tokens: usize,
    /// Train only these layers (timing runs); `None` trains all.
    pub layers: Option<Vec<usize>>,
    /// Layers trained at once (threads).
    pub jobs: usize,
}

/// Metrics of one layer's predictors on the held-out tokens.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerMetrics {
    pub layer: usize,
    pub k_neurons: usize,
    pub ffn: usize,
    /// k_neurons / ffn
    pub neuron_density: f64,
    pub neuron_recall: f64,
    pub neuron_precision: f64,
    /// Mean fraction of neurons labelled active.
    pub neuron_label_density: f64,
    pub neuron_pos_weight: f64,
    pub neuron_epochs: usize,
    /// Held-out neuron recall when keeping the top half of the neurons (k = ffn/2).
    pub neuron_recall_at_half: f64,
    pub k_heads: usize,
    pub heads: usize,
    pub head_density: f64,
    pub head_recall: f64,
    pub head_precision: f64,
    pub head_label_density: f64,
    pub head_epochs: usize,
    /// Held-out head recall when keeping floor(0.7 × heads) heads.
    pub head_recall_at_70: f64,
    pub seconds: f64,
}

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
    pub format: String,
    pub dejavu_version: String,
    pub model: ModelIdentity,
    pub acts: ActsLink,
    pub rank: usize,
    pub train_tokens: usize,
    pub heldout_tokens: usize,
    pub neuron_label: String,
    pub head_label: String,
    pub neuron_input: String,
    pub head_input: String,
    pub normalisation: String,
    pub options: TrainOptions,
    pub layers: Vec<LayerMetrics>,
}

/// Low-rank predictor under training.
#[derive(Module, Debug)]
struct LowRank<B: Backend> {
    l1: Linear<B>,
    l2: Linear<B>,
}

impl<B: Backend> LowRank<B> {
    fn forward(&self, z: Tensor<B, 2>) -> Tensor<B, 2> {
        self.l2.forward(self.l1.forward(z))
    }
}

/// Per-token RMS normalisation `x / sqrt(mean(x²) + eps)` over the last dimension. `x: [rows, d]`
pub fn rms_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let ms = x.clone().powi_scalar(2).mean_dim(1); // [rows, 1]
    x / (ms + RMS_EPS).sqrt()
}

/// The predictor input transform (see the module docs). `x: [rows, d]`, `mean, inv_std: [d]`
pub fn normalize_input<B: Backend>(x: Tensor<B, 2>, mean: Tensor<B, 1>, inv_std: Tensor<B, 1>) -> Tensor<B, 2> {
    (rms_normalize(x) - mean.unsqueeze::<2>()) * inv_std.unsqueeze::<2>()
}

/// Host copy of one trained predictor.
#[derive(Debug, Clone)]
struct LowRankHost {
    in_mean: Vec<f32>,
    in_inv_std: Vec<f32>,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

struct Fit {
    weights: LowRankHost,
    k: usize,
    recall: f64,
    precision: f64,
    label_density: f64,
    pos_weight: f64,
    epochs: usize,
    /// Held-out recall at the fixed `report_k` given to [`fit`].
    recall_at_report_k: f64,
}

/// Progress events from [`train`].
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Epoch { layer: usize, what: &'static str, epoch: usize, k: usize, n: usize },
    /// A predictor stopped early; `skipped` epochs were not run.
    Stopped { layer: usize, what: &'static str, skipped: usize },
    LayerDone(LayerMetrics),
}

/// Train the predictors of every layer of `acts` on backend `B` (autodiff through `Autodiff<B>`) and write them
/// under `acts.run/predictors`. Layers are trained `opts.jobs` at a time.
pub fn train<B: Backend>(
    acts: &Activations,
    opts: &TrainOptions,
    device: &B::Device,
    on_event: &(dyn Fn(TrainEvent) + Sync),
) -> Result<PredictorsManifest> {
    let m = &acts.manifest;
    let id = &m.model;
    let total = m.tokens.min(opts.max_tokens);
    let heldout = ((total as f64 * opts.holdout).round() as usize).clamp(1, total.saturating_sub(1).max(1));
    let train_n = total - heldout;
    if train_n < 1 || total < 2 {
        return Err(PredictorError::Invalid(format!(
            "{}: {total} tokens are too few to train on (need a training and a held-out split)",
            acts.dir.join("manifest.json").display()
        )));
    }
    if !(opts.holdout > 0.0 && opts.holdout < 1.0) {
        return Err(PredictorError::Invalid(format!("--holdout must be in (0, 1) (got {})", opts.holdout)));
    }
    for (name, v) in [("--target-recall", opts.target_recall), ("--head-target-recall", opts.head_target_recall)] {
        if !(v > 0.0 && v <= 1.0) {
            return Err(PredictorError::Invalid(format!("{name} must be in (0, 1] (got {v})")));
        }
    }
    for (name, v) in [("--neuron-density", opts.neuron_density), ("--head-density", opts.head_density)] {
        if !(v > 0.0 && v < 1.0) {
            return Err(PredictorError::Invalid(format!("{name} must be in (0, 1) (got {v})")));
        }
    }
    if opts.rank == 0 || opts.epochs == 0 || opts.batch_size == 0 || opts.jobs == 0 {
        return Err(PredictorError::Invalid("--rank, --epochs, --batch-size and --jobs must be at least 1".into()));
    }
    let layers: Vec<usize> = match &opts.layers {
        Some(v) => {
            if let Some(&bad) = v.iter().find(|&&l| l >= id.layers) {
                return Err(PredictorError::Invalid(format!("--layers: layer {bad} out of range (the model has {})", id.layers)));
            }
            v.clone()
        }
        None => (0..id.layers).collect(),
    };
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<(LayerMetrics, LowRankHost, LowRankHost)>>> = Mutex::new(vec![None; id.layers]);
    let first_err: Mutex<Option<PredictorError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.min(layers.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= layers.len() || failed.load(Ordering::SeqCst) {
                    break;
                }
                let l = layers[i];
                match train_layer::<B>(acts, l, train_n, total, opts, device, on_event) {
                    Ok(r) => {
                        on_event(TrainEvent::LayerDone(r.0.clone()));
                        if let Ok(mut g) = results.lock() {
                            g[l] = Some(r);
                        }
                    }
                    Err(e) => {
                        failed.store(true, Ordering::SeqCst);
                        if let Ok(mut g) = first_err.lock() {
                            g.get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    let results = results.into_inner().map_err(|_| PredictorError::Invalid("a training thread panicked".into()))?;
    let out = acts.run.join("predictors");
    std::fs::create_dir_all(&out).map_err(|e| PredictorError::Io { path: out.clone(), err: e })?;
    let mut metrics = Vec::new();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let r = opts.rank;
    for (l, res) in results.into_iter().enumerate() {
        let Some((lm, mlp, att)) = res else { continue };
        for (part, w, n) in [("mlp", mlp, id.ffn), ("att", att, id.heads)] {
            let p = format!("layer.{l}.{part}");
            tensors.push((format!("{p}.w1"), vec![id.hidden, r], w.w1));
            tensors.push((format!("{p}.b1"), vec![r], w.b1));
            tensors.push((format!("{p}.w2"), vec![r, n], w.w2));
            tensors.push((format!("{p}.b2"), vec![n], w.b2));
            tensors.push((format!("{p}.in_mean"), vec![id.hidden], w.in_mean));
            tensors.push((format!("{p}.in_inv_std"), vec![id.hidden], w.in_inv_std));
        }
        metrics.push(lm);
    }
    write_weights(&out.join(WEIGHTS_FILE), &tensors)?;
    let neuron_label = match id.family {
        Family::Opt => "active when post-ReLU fc1 output > 0".to_string(),
        Family::Llama => format!(
            "top-k of {} per token, k = round({} × ffn) = {}",
            opts.neuron_target.describe(),
            opts.neuron_density,
            topk_count(opts.neuron_density, id.ffn)
        ),
    };
    let manifest = PredictorsManifest {
        format: PREDICTORS_FORMAT.into(),
        dejavu_version: manifest::VERSION.into(),
        model: id.clone(),
        acts: ActsLink { manifest: "../acts/manifest.json".into(), tokens: m.tokens, seq_len: m.seq_len, sources: m.sources.clone() },
        rank: r,
        train_tokens: train_n,
        heldout_tokens: heldout,
        neuron_label,
        head_label: format!(
            "top-k of attention head output norm per token, k = round({} × heads) = {}",
            opts.head_density,
            topk_count(opts.head_density, id.heads)
        ),
        neuron_input: "layer.{i}.mlp_input: residual entering layer i's MLP, before its norm".into(),
        head_input: "layer.{i-1}.block_input (layer 0: layer.0.block_input): residual entering the previous layer, before its norm".into(),
        normalisation: "z = (x / sqrt(mean(x^2) + 1e-6) - in_mean) * in_inv_std; logits = (z @ w1 + b1) @ w2 + b2".into(),
        options: opts.clone(),
        layers: metrics,
    };
    let mpath = out.join("manifest.json");
    manifest::write_json(&mpath, &manifest).map_err(|e| PredictorError::Io { path: mpath.clone(), err: e })?;
    write_csv(&out.join("metrics.csv"), &manifest.layers)?;
    let svg = out.join("recall_density.svg");
    manifest::write_atomic(&svg, svg_plot(&manifest).as_bytes()).map_err(|e| PredictorError::Io { path: svg, err: e })?;
    Ok(manifest)
}

/// `max(1, round(density × n))`, at most `n`.
pub fn topk_count(density: f64, n: usize) -> usize {
    ((density * n as f64).round() as usize).clamp(1, n)
}

#[allow(clippy::too_many_arguments)]
fn train_layer<B: Backend>(
    acts: &Activations,
    l: usize,
    train_n: usize,
    total: usize,
    opts: &TrainOptions,
    device: &B::Device,
    on_event: &(dyn Fn(TrainEvent) + Sync),
) -> Result<(LayerMetrics, LowRankHost, LowRankHost)> {
    let t0 = Instant::now();
    let m = &acts.manifest;
    let id = &m.model;
    let (d, ffn, heads) = (id.hidden, id.ffn, id.heads);
    // Neurons.
    let (x, _) = acts.read(l, Tap::MlpInput, total)?;
    let target = if id.family == Family::Llama { opts.neuron_target.tap() } else { Tap::MlpAct };
    let (act, _) = acts.read(l, target, total)?;
    let labels = match id.family {
        Family::Opt => act.iter().map(|&v| (v > 0.0) as u8).collect(),
        Family::Llama => topk_labels(&act, ffn, topk_count(opts.neuron_density, ffn)),
    };
    drop(act);
    let seed = opts.seed ^ (l as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let neur = fit::<B>(device, &x, &labels, d, ffn, train_n, opts, opts.target_recall, ffn / 2, seed, &|e, k| {
        on_event(TrainEvent::Epoch { layer: l, what: "neurons", epoch: e, k, n: ffn })
    }, &|skipped| on_event(TrainEvent::Stopped { layer: l, what: "neurons", skipped }))?;
    drop((x, labels));
    // Heads, from the previous layer's block input.
    let (x, _) = acts.read(l.saturating_sub(1), Tap::BlockInput, total)?;
    let (hn, _) = acts.read(l, Tap::HeadNorm, total)?;
    let labels = topk_labels(&hn, heads, topk_count(opts.head_density, heads));
    let head = fit::<B>(device, &x, &labels, d, heads, train_n, opts, opts.head_target_recall, (heads * 7) / 10, seed ^ 1, &|e, k| {
        on_event(TrainEvent::Epoch { layer: l, what: "heads", epoch: e, k, n: heads })
    }, &|skipped| on_event(TrainEvent::Stopped { layer: l, what: "heads", skipped }))?;
    let lm = LayerMetrics {
        layer: l,
        k_neurons: neur.k,
        ffn,
        neuron_density: neur.k as f64 / ffn as f64,
        neuron_recall: neur.recall,
        neuron_precision: neur.precision,
        neuron_label_density: neur.label_density,
        neuron_pos_weight: neur.pos_weight,
        neuron_epochs: neur.epochs,
        neuron_recall_at_half: neur.recall_at_report_k,
        k_heads: head.k,
        heads,
        head_density: head.k as f64 / heads as f64,
        head_recall: head.recall,
        head_precision: head.precision,
        head_label_density: head.label_density,
        head_epochs: head.epochs,
        head_recall_at_70: head.recall_at_report_k,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((lm, neur.weights, head.weights))
}

/// Per row of `v: [rows, n]`, 1 for its `k` largest entries.
fn topk_labels(v: &[f32], n: usize, k: usize) -> Vec<u8> {
    let mut out = vec![0u8; v.len()];
    let mut idx: Vec<usize> = Vec::with_capacity(n);
    for (row, lab) in v.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        idx.clear();
        idx.extend(0..n);
        if k < n {
            idx.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        }
        for &i in &idx[..k] {
            lab[i] = 1;
        }
    }
    out
}

/// `hits[k]` = labelled units among each row's top-`k` scores, summed over rows, for `k = 0..=n`.
fn hits_by_k(scores: &[f32], labels: &[u8], n: usize) -> Vec<u64> {
    let mut hist = vec![0u64; n + 1];
    let mut idx: Vec<usize> = Vec::with_capacity(n);
    for (row, lab) in scores.chunks_exact(n).zip(labels.chunks_exact(n)) {
        idx.clear();
        idx.extend(0..n);
        idx.sort_unstable_by(|&a, &b| row[b].total_cmp(&row[a]));
        for (rank, &i) in idx.iter().enumerate() {
            hist[rank + 1] += lab[i] as u64;
        }
    }
    for k in 1..=n {
        hist[k] += hist[k - 1];
    }
    hist
}

/// Smallest `k` whose recall reaches `target`, with its recall and precision over `rows` rows.
fn k_at_recall(hits: &[u64], target: f64, rows: usize) -> (usize, f64, f64) {
    let n = hits.len() - 1;
    let p = hits[n];
    if p == 0 {
        return (0, 1.0, 1.0);
    }
    let need = ((target * p as f64) - 1e-9).ceil().max(0.0) as u64;
    let k = hits.iter().position(|&h| h >= need).unwrap_or(n);
    let recall = hits[k] as f64 / p as f64;
    let precision = if k == 0 { 1.0 } else { hits[k] as f64 / (k * rows) as f64 };
    (k, recall, precision)
}

/// Weighted binary cross-entropy with logits, mean over elements: `pw·y·softplus(-z) + (1-y)·softplus(z)`.
fn weighted_bce<B: Backend>(z: Tensor<B, 2>, y: Tensor<B, 2>, pos_weight: f64) -> Tensor<B, 1> {
    // softplus(z) = max(z, 0) + log1p(exp(-|z|)); softplus(-z) = softplus(z) - z.
    let sp = z.clone().clamp_min(0.0) + z.clone().abs().neg().exp().log1p();
    let pos = (sp.clone() - z) * y.clone() * pos_weight;
    let neg = sp * (y.neg() + 1.0);
    (pos + neg).mean()
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
}

/// Train one predictor `x: [T, d] → labels [T, n]` on the first `train_n` rows, early-stopping on the k needed
/// for `target` recall on (a prefix of) the rest, and measure the best model on all held-out rows.
#[allow(clippy::too_many_arguments)]
fn fit<B: Backend>(
    dev: &B::Device,
    x: &[f32],
    labels: &[u8],
    d: usize,
    n: usize,
    train_n: usize,
    opts: &TrainOptions,
    target: f64,
    report_k: usize,
    seed: u64,
    on_epoch: &dyn Fn(usize, usize),
    on_stop: &dyn Fn(usize),
) -> Result<Fit> {
    type AB<B> = Autodiff<B>;
    let rows = x.len() / d;
    let val_n = rows - train_n;
    let x_all = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [rows, d]), dev);
    let u = rms_normalize(x_all.clone());
    let u_train = u.slice([0..train_n, 0..d]);
    let mean = u_train.clone().mean_dim(0).reshape([d]);
    let inv_std = u_train.var(0).reshape([d]).sqrt().clamp_min(1e-6).recip();
    let z = normalize_input(x_all, mean.clone(), inv_std.clone()); // [rows, d]
    let z_train = z.clone().slice([0..train_n, 0..d]);
    let z_val = z.slice([train_n..rows, 0..d]);
    let pos: u64 = labels[..train_n * n].iter().map(|&v| v as u64).sum();
    let label_density = labels[train_n * n..].iter().map(|&v| v as u64).sum::<u64>() as f64 / (val_n * n) as f64;
    let neg = (train_n * n) as u64 - pos;
    let pos_weight = if pos == 0 { 1.0 } else { (neg as f64 / pos as f64).clamp(1.0, 1e3) };
    let y_train = Tensor::<B, 2>::from_data(
        TensorData::new(labels[..train_n * n].iter().map(|&v| v as f32).collect::<Vec<f32>>(), [train_n, n]),
        dev,
    );
    let val_labels = &labels[train_n * n..];
    let eval_n = val_n.min(opts.eval_tokens.max(1));
    let z_eval = z_val.clone().slice([0..eval_n, 0..d]);

    let r = opts.rank;
    let mut model = LowRank::<AB<B>> { l1: LinearConfig::new(d, r).init(dev), l2: LinearConfig::new(r, n).init(dev) };
    let mut optim = AdamWConfig::new().with_weight_decay(opts.weight_decay).init::<AB<B>, LowRank<AB<B>>>();
    let mut rng = SplitMix64(seed);
    let mut best: Option<(usize, f64, LowRank<B>)> = None;
    let mut since_best = 0;
    let mut epochs = 0;
    // Early stopping compares the k needed for the target recall, then (when k does not move, e.g. when it is
    // already n) the recall at the mean label count.
    let k_label = ((label_density * n as f64).round() as usize).clamp(1, n);
    let score = |m: &LowRank<B>, z: Tensor<B, 2>, labels: &[u8], rows: usize| {
        let s = host(m.forward(z));
        let hits = hits_by_k(&s, &labels[..rows * n], n);
        let (k, recall, precision) = k_at_recall(&hits, target, rows);
        let p = hits[n].max(1) as f64;
        (k, recall, precision, hits[k_label] as f64 / p, hits[report_k.min(n)] as f64 / p)
    };
    for epoch in 0..opts.epochs {
        let mut perm: Vec<i64> = (0..train_n as i64).collect();
        for i in (1..perm.len()).rev() {
            let j = (rng.next_f64() * (i + 1) as f64) as usize;
            perm.swap(i, j.min(i));
        }
        for batch in perm.chunks(opts.batch_size) {
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(batch.to_vec(), [batch.len()]), dev);
            let xb = Tensor::<AB<B>, 2>::from_inner(z_train.clone().select(0, idx.clone()));
            let yb = Tensor::<AB<B>, 2>::from_inner(y_train.clone().select(0, idx));
            let loss = weighted_bce(model.forward(xb), yb, pos_weight);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(opts.lr, model, grads);
        }
        epochs = epoch + 1;
        let valid = model.valid();
        let (k, _, _, recall_at_label, _) = score(&valid, z_eval.clone(), val_labels, eval_n);
        on_epoch(epochs, k);
        let better = match &best {
            None => true,
            Some((bk, br, _)) => k < *bk || (k == *bk && recall_at_label > *br + 1e-6),
        };
        if better {
            best = Some((k, recall_at_label, valid));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= opts.patience {
                on_stop(opts.epochs - epochs);
                break;
            }
        }
    }
    let Some((_, _, best)) = best else {
        return Err(PredictorError::Invalid("no epoch was run".into()));
    };
    let (k, recall, precision, _, recall_at_report_k) = score(&best, z_val, val_labels, val_n);
    let bias = |b: &Option<burn::module::Param<Tensor<B, 1>>>, len: usize| b.as_ref().map(|p| host(p.val())).unwrap_or_else(|| vec![0.0; len]);
    let weights = LowRankHost {
        in_mean: host(mean),
        in_inv_std: host(inv_std),
        w1: host(best.l1.weight.val()),
        b1: bias(&best.l1.bias, r),
        w2: host(best.l2.weight.val()),
        b2: bias(&best.l2.bias, n),
    };
    Ok(Fit { weights, k, recall, precision, label_density, pos_weight, epochs, recall_at_report_k })
}

fn write_weights(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let bad = |e: safetensors::SafeTensorError| PredictorError::file(path, e.to_string());
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (name.clone(), v)).map_err(bad))
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), PREDICTORS_FORMAT.to_string())].into_iter().collect();
    let tmp = manifest::tmp_path(path);
    safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(bad)?;
    manifest::commit_tmp(&tmp, path).map_err(|e| PredictorError::Io { path: path.to_path_buf(), err: e })
}

fn write_csv(path: &Path, rows: &[LayerMetrics]) -> Result<()> {
    let io = |e: std::io::Error| PredictorError::Io { path: path.to_path_buf(), err: e };
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r).map_err(|e| PredictorError::file(path, e.to_string()))?;
    }
    let bytes = w.into_inner().map_err(|e| PredictorError::file(path, e.to_string()))?;
    manifest::write_atomic(path, &bytes).map_err(io)
}

/// Recall and density (k/n) by layer for neurons and heads, as a hand-written SVG line chart.
pub fn svg_plot(m: &PredictorsManifest) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 380.0, 60.0, 190.0, 30.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let layers = m.model.layers.max(2) as f64;
    let x = |l: usize| left + pw * l as f64 / (layers - 1.0);
    let y = |v: f64| top + ph * (1.0 - v.clamp(0.0, 1.0));
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"14\">{} — predictor recall and kept fraction by layer (held-out)</text>\n",
        xml_escape(&m.model.source)
    );
    for i in 0..=10 {
        let v = i as f64 / 10.0;
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>\n",
            left + pw,
            y(v),
            y(v),
            left - 6.0,
            y(v) + 4.0
        );
    }
    let step = ((layers as usize) / 15).max(1);
    for l in (0..m.model.layers).step_by(step) {
        s += &format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{l}</text>\n", x(l), top + ph + 16.0);
    }
    s += &format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">layer</text>\n", left + pw / 2.0, h - 10.0);
    type Series = (&'static str, &'static str, &'static str, fn(&LayerMetrics) -> f64);
    let series: [Series; 4] = [
        ("neuron recall", "#1f77b4", "", |r| r.neuron_recall),
        ("neuron density k/ffn", "#1f77b4", "6,4", |r| r.neuron_density),
        ("head recall", "#d62728", "", |r| r.head_recall),
        ("heads kept k/heads", "#d62728", "6,4", |r| r.head_density),
    ];
    for (i, (name, color, dash, f)) in series.iter().enumerate() {
        let pts: Vec<String> = m.layers.iter().map(|r| format!("{:.1},{:.1}", x(r.layer), y(f(r)))).collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        for r in &m.layers {
            s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{color}\"/>\n", x(r.layer), y(f(r)));
        }
        let ly = top + 20.0 * i as f64 + 10.0;
        let lx = left + pw + 15.0;
        s += &format!(
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            lx + 25.0,
            lx + 30.0,
            ly + 4.0
        );
    }
    s += "</svg>\n";
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One layer's loaded predictor weights. `w1: [d, r]`, `w2: [r, n]`.
#[derive(Debug, Clone)]
struct LowRankWeights<B: Backend> {
    in_mean: Tensor<B, 1>,
    in_inv_std: Tensor<B, 1>,
    w1: Tensor<B, 2>,
    b1: Tensor<B, 1>,
    w2: Tensor<B, 2>,
    b2: Tensor<B, 1>,
}

impl<B: Backend> LowRankWeights<B> {
    /// `x: [b, s, d] -> logits [b, s, n]`
    fn scores(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let z = normalize_input(x.reshape([b * s, d]), self.in_mean.clone(), self.in_inv_std.clone());
        let h = z.matmul(self.w1.clone()) + self.b1.clone().unsqueeze::<2>(); // [b*s, r]
        let out = h.matmul(self.w2.clone()) + self.b2.clone().unsqueeze::<2>(); // [b*s, n]
        let n = out.dims()[1];
        out.reshape([b, s, n])
    }
}

/// Trained predictors of one model, loaded for inference.
pub struct Predictors<B: Backend> {
    pub manifest: PredictorsManifest,
    mlp: Vec<LowRankWeights<B>>,
    att: Vec<LowRankWeights<B>>,
}

impl<B: Backend> Predictors<B> {
    /// Load `dir` (a `RUN/predictors` directory), refusing predictors trained for a model other than `model`.
    pub fn load(dir: &Path, model: &ModelIdentity, device: &B::Device) -> Result<Self> {
        let mpath = dir.join("manifest.json");
        if !mpath.is_file() {
            return Err(PredictorError::file(&mpath, "not found: not a predictors directory (run `dejavu train-predictors` first)"));
        }
        let text = std::fs::read_to_string(&mpath).map_err(|e| PredictorError::Io { path: mpath.clone(), err: e })?;
        let manifest: PredictorsManifest =
            serde_json::from_str(&text).map_err(|e| PredictorError::file(&mpath, format!("invalid predictors manifest: {e}")))?;
        if manifest.format != PREDICTORS_FORMAT {
            return Err(PredictorError::file(&mpath, format!("field `format`: expected `{PREDICTORS_FORMAT}`, found `{}`", manifest.format)));
        }
        model.ensure_same(&manifest.model, &mpath).map_err(PredictorError::Mismatch)?;
        let id = &manifest.model;
        let have: Vec<usize> = manifest.layers.iter().map(|l| l.layer).collect();
        if have != (0..id.layers).collect::<Vec<_>>() {
            return Err(PredictorError::file(&mpath, format!("holds predictors for layers {have:?}, not all {} layers", id.layers)));
        }
        let wpath = dir.join(WEIGHTS_FILE);
        let f = std::fs::File::open(&wpath).map_err(|e| PredictorError::Io { path: wpath.clone(), err: e })?;
        // SAFETY: the file is only read, and not modified while loaded.
        let bytes = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| PredictorError::Io { path: wpath.clone(), err: e })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| PredictorError::file(&wpath, e.to_string()))?;
        let r = manifest.rank;
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let v = st.tensor(name).map_err(|e| PredictorError::file(&wpath, format!("tensor `{name}`: {e}")))?;
            if v.dtype() != Dtype::F32 || v.shape() != shape {
                return Err(PredictorError::file(
                    &wpath,
                    format!("tensor `{name}`: expected F32 {shape:?}, found {:?} {:?}", v.dtype(), v.shape()),
                ));
            }
            Ok(v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let load = |l: usize, part: &str, n: usize| -> Result<LowRankWeights<B>> {
            let p = format!("layer.{l}.{part}");
            let d = id.hidden;
            let t1 = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), device);
            Ok(LowRankWeights {
                in_mean: t1(get(&format!("{p}.in_mean"), &[d])?),
                in_inv_std: t1(get(&format!("{p}.in_inv_std"), &[d])?),
                w1: Tensor::from_data(TensorData::new(get(&format!("{p}.w1"), &[d, r])?, [d, r]), device),
                b1: t1(get(&format!("{p}.b1"), &[r])?),
                w2: Tensor::from_data(TensorData::new(get(&format!("{p}.w2"), &[r, n])?, [r, n]), device),
                b2: t1(get(&format!("{p}.b2"), &[n])?),
            })
        };
        let mut mlp = Vec::new();
        let mut att = Vec::new();
        for l in 0..id.layers {
            mlp.push(load(l, "mlp", id.ffn)?);
            att.push(load(l, "att", id.heads)?);
        }
        Ok(Predictors { manifest, mlp, att })
    }

    pub fn layers(&self) -> usize {
        self.mlp.len()
    }

    /// Neuron logits of `layer` from its MLP input: `[b, s, d] -> [b, s, ffn]`.
    pub fn neuron_scores(&self, layer: usize, mlp_input: Tensor<B, 3>) -> Tensor<B, 3> {
        self.mlp[layer].scores(mlp_input)
    }

    /// Head logits of `layer` from the previous layer's block input (layer 0: its own): `[b, s, d] -> [b, s, heads]`.
    pub fn head_scores(&self, layer: usize, prev_block_input: Tensor<B, 3>) -> Tensor<B, 3> {
        self.att[layer].scores(prev_block_input)
    }

    /// Neurons to keep per token in `layer` (reaches the target recall on held-out tokens).
    pub fn k_neurons(&self, layer: usize) -> usize {
        self.manifest.layers[layer].k_neurons
    }

    /// Heads to keep per token in `layer`.
    pub fn k_heads(&self, layer: usize) -> usize {
        self.manifest.layers[layer].k_heads
    }
}

/// Trained predictors drive the reference forward's `PredictedTopK` rules.
impl<B: Backend> crate::model::Scorer<B> for Predictors<B> {
    fn neuron_scores(&self, layer: usize, mlp_input: Tensor<B, 3>) -> Tensor<B, 3> {
        Predictors::neuron_scores(self, layer, mlp_input)
    }
    fn head_scores(&self, layer: usize, prev_block_input: Tensor<B, 3>) -> Tensor<B, 3> {
        Predictors::head_scores(self, layer, prev_block_input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_curve_and_k() {
        // Two rows of 4; labels {0,1} and {3}.
        let scores = [0.9, 0.8, 0.1, 0.0, 0.5, 0.4, 0.3, 0.2];
        let labels = [1, 1, 0, 0, 0, 0, 0, 1];
        let hits = hits_by_k(&scores, &labels, 4);
        assert_eq!(hits, vec![0, 1, 2, 2, 3]);
        assert_eq!(k_at_recall(&hits, 0.6, 2).0, 2);
        let (k, r, p) = k_at_recall(&hits, 1.0, 2);
        assert_eq!((k, r), (4, 1.0));
        assert!((p - 3.0 / 8.0).abs() < 1e-12);
    }

    #[test]
    fn topk_labels_count() {
        let v = [3.0, 1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let l = topk_labels(&v, 4, 2);
        assert_eq!(&l[..4], &[1, 0, 1, 0]);
        assert_eq!(l[4..].iter().map(|&x| x as usize).sum::<usize>(), 2);
    }

    #[test]
    fn default_ranks() {
        assert_eq!(default_rank(576), 128);
        assert_eq!(default_rank(2048), 512);
        assert_eq!(default_rank(4096), 1024);
        assert_eq!(default_rank(64), 16);
        assert_eq!(default_rank(12288), 1024);
    }

    #[test]
    fn bce_matches_formula() {
        type B = burn::backend::NdArray<f32>;
        let dev = Default::default();
        let z = Tensor::<B, 2>::from_data(TensorData::new(vec![2.0f32, -1.0], [1, 2]), &dev);
        let y = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, 0.0], [1, 2]), &dev);
        let got = host(weighted_bce(z, y, 3.0))[0] as f64;
        let sp = |x: f64| (1.0 + x.exp()).ln();
        let want = (3.0 * sp(-2.0) + sp(-1.0)) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
