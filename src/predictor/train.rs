//! Training: labels from the recorded activations, one low-rank predictor per layer and unit kind fitted with
//! AdamW on a weighted BCE, early-stopped on the held-out k, layers trained in parallel; the result written under
//! `RUN/predictors`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use super::metrics::{hits_by_k, k_at_recall, LayerMetrics};
use super::model::{host, normalize_input, rms_normalize, write_weights, LowRank, LowRankHost};
use super::svg::svg_plot;
use super::{ActsLink, PredictorsManifest, WEIGHTS_FILE};
use crate::error::{Error, Result};
use crate::collect::{Activations, Tap};
use crate::config::Family;
use crate::decode::SplitMix64;
use crate::store::{self, ArtifactHeader, RunDir, PREDICTORS_FORMAT, PREDICTORS_VERSION};

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

/// What the neuron predictor of layer l reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NeuronInput {
    /// The residual entering layer l's MLP (after its attention): the set is known only once the attention ran.
    #[default]
    Mlp,
    /// The residual entering layer l itself (Deja Vu's asynchronous look-ahead): the set can be predicted while
    /// the layer's attention runs, at some cost in recall (the attention's output is not seen).
    Block,
    /// The residual entering layer l - 1 (layer 0: its own block input), as the head predictors read it: the set
    /// can be predicted a whole layer ahead, at a further cost in recall.
    Prev,
}

impl NeuronInput {
    pub fn tap(self) -> Tap {
        match self {
            NeuronInput::Mlp => Tap::MlpInput,
            NeuronInput::Block | NeuronInput::Prev => Tap::BlockInput,
        }
    }
    /// The layer whose [`NeuronInput::tap`] layer `l`'s neuron predictor reads.
    pub fn layer(self, l: usize) -> usize {
        match self {
            NeuronInput::Prev => l.saturating_sub(1),
            _ => l,
        }
    }
    pub fn describe(self) -> &'static str {
        match self {
            NeuronInput::Mlp => "layer.{i}.mlp_input: residual entering layer i's MLP, before its norm",
            NeuronInput::Block => "layer.{i}.block_input: residual entering layer i (before its attention and norm; look-ahead)",
            NeuronInput::Prev => "layer.{i-1}.block_input: residual entering layer i - 1 (layer 0: its own; look-ahead by a layer)",
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
    /// What the neuron predictors read (absent from the options of older dejavus: the MLP input).
    #[serde(default)]
    pub neuron_input: NeuronInput,
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
    let id = m.model();
    let total = m.tokens.min(opts.max_tokens);
    let heldout = ((total as f64 * opts.holdout).round() as usize).clamp(1, total.saturating_sub(1).max(1));
    let train_n = total - heldout;
    if train_n < 1 || total < 2 {
        return Err(Error::format(
            acts.manifest_path(),
            format!("{total} tokens are too few to train on (need a training and a held-out split)"),
        ));
    }
    if !(opts.holdout > 0.0 && opts.holdout < 1.0) {
        return Err(Error::option("holdout", format!("must be in (0, 1) (got {})", opts.holdout)));
    }
    for (name, v) in [("target_recall", opts.target_recall), ("head_target_recall", opts.head_target_recall)] {
        if !(v > 0.0 && v <= 1.0) {
            return Err(Error::option(name, format!("must be in (0, 1] (got {v})")));
        }
    }
    for (name, v) in [("neuron_density", opts.neuron_density), ("head_density", opts.head_density)] {
        if !(v > 0.0 && v < 1.0) {
            return Err(Error::option(name, format!("must be in (0, 1) (got {v})")));
        }
    }
    for (name, v) in [("rank", opts.rank), ("epochs", opts.epochs), ("batch_size", opts.batch_size), ("jobs", opts.jobs)] {
        if v == 0 {
            return Err(Error::option(name, "must be at least 1"));
        }
    }
    let layers: Vec<usize> = match &opts.layers {
        Some(v) => {
            if let Some(&bad) = v.iter().find(|&&l| l >= id.layers) {
                return Err(Error::option("layers", format!("layer {bad} out of range (the model has {})", id.layers)));
            }
            v.clone()
        }
        None => (0..id.layers).collect(),
    };
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<(LayerMetrics, LowRankHost, LowRankHost)>>> = Mutex::new(vec![None; id.layers]);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
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
    let results = results.into_inner().map_err(|_| Error::Internal("a training thread panicked".into()))?;
    let out = RunDir::at(&acts.run).predictors();
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
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
        header: ArtifactHeader::new(PREDICTORS_FORMAT, PREDICTORS_VERSION, id.clone(), opts),
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
        neuron_input: opts.neuron_input.describe().into(),
        neuron_tap: opts.neuron_input,
        head_input: "layer.{i-1}.block_input (layer 0: layer.0.block_input): residual entering the previous layer, before its norm".into(),
        normalisation: "z = (x / sqrt(mean(x^2) + 1e-6) - in_mean) * in_inv_std; logits = (z @ w1 + b1) @ w2 + b2".into(),
        layers: metrics,
    };
    let mpath = out.join("manifest.json");
    store::write_json(&mpath, &manifest)?;
    store::write_csv(&out.join("metrics.csv"), &manifest.layers)?;
    store::write_atomic(&out.join("recall_density.svg"), svg_plot(&manifest).as_bytes())?;
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
    let id = m.model();
    let (d, ffn, heads) = (id.hidden, id.ffn, id.heads);
    // Neurons.
    let (x, _) = acts.read(opts.neuron_input.layer(l), opts.neuron_input.tap(), total)?;
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

/// Weighted binary cross-entropy with logits, mean over elements: `pw·y·softplus(-z) + (1-y)·softplus(z)`.
fn weighted_bce<B: Backend>(z: Tensor<B, 2>, y: Tensor<B, 2>, pos_weight: f64) -> Tensor<B, 1> {
    // softplus(z) = max(z, 0) + log1p(exp(-|z|)); softplus(-z) = softplus(z) - z.
    let sp = z.clone().clamp_min(0.0) + z.clone().abs().neg().exp().log1p();
    let pos = (sp.clone() - z) * y.clone() * pos_weight;
    let neg = sp * (y.neg() + 1.0);
    (pos + neg).mean()
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
    let mut init_rng = SplitMix64(seed ^ 0x1A17_5EED);
    let mut model = LowRank::<AB<B>> { l1: seeded_linear(d, r, &mut init_rng, dev), l2: seeded_linear(r, n, &mut init_rng, dev) };
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
        return Err(Error::Internal("no epoch was run".into()));
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

/// A linear layer `d_in -> d_out` with burn's default initial distribution (uniform in ±1/√d_in for weight and
/// bias) drawn from `rng` rather than burn's global generator, so training is reproducible from `--seed` whatever
/// else runs in the process.
fn seeded_linear<B: Backend>(d_in: usize, d_out: usize, rng: &mut SplitMix64, dev: &B::Device) -> Linear<B> {
    let mut l = LinearConfig::new(d_in, d_out).init(dev);
    let bound = 1.0 / (d_in as f64).sqrt();
    let mut uniform = |len: usize| (0..len).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect::<Vec<f32>>();
    // [d_in, d_out]: burn's Linear computes x · W.
    l.weight = Param::from_data(TensorData::new(uniform(d_in * d_out), [d_in, d_out]), dev);
    if l.bias.is_some() {
        l.bias = Some(Param::from_data(TensorData::new(uniform(d_out), [d_out]), dev));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

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
