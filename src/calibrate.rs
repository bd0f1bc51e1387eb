//! CATS calibration: per-layer thresholds at a quantile of MLP gate magnitudes (Llama |SiLU(gate)|, OPT
//! post-ReLU fc1), from streaming histograms so memory stays bounded for any number of tokens.

use std::path::Path;

use burn::tensor::backend::Backend;

use crate::decode::check_rows;
use crate::error::{Error, Result};
use crate::model::{to_host, Forward, LayerTaps, Model, QScorer, Sparse, TapSet};
use crate::sparse::calib::{budget_from_curves, interpolate_curve, BudgetLevel, RankError, Ranking, TealLevel, ERROR_PROXY};
use crate::sparse::quant::{QMatrix, QScoreCopies, QuantOptions};
use crate::sparse::{HeadRule, LayerPlan, MlpRule, Plan};
use crate::source::ModelIdentity;
use crate::store::{self, ArtifactHeader, THRESHOLDS_FORMAT, THRESHOLDS_VERSION};

/// Mantissa bits kept per bin: bins are 2^-7 ≈ 0.8% wide in relative terms.
const MANTISSA_BITS: u32 = 7;
const BINS: usize = 1 << (8 + MANTISSA_BITS);

/// Histogram of magnitudes with log-spaced bins taken straight from the f32 bit pattern (sign dropped):
/// bin = exponent and top mantissa bits, so binning is exact, monotone and costs one shift.
#[derive(Debug, Clone)]
pub struct MagnitudeHistogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for MagnitudeHistogram {
    fn default() -> Self {
        MagnitudeHistogram { counts: vec![0; BINS], total: 0 }
    }
}

impl MagnitudeHistogram {
    fn bin(v: f32) -> usize {
        ((v.abs().to_bits() & 0x7fff_ffff) >> (23 - MANTISSA_BITS)) as usize
    }
    fn bin_lo(i: usize) -> f32 {
        f32::from_bits((i as u32) << (23 - MANTISSA_BITS))
    }

    pub fn add_all(&mut self, values: &[f32]) {
        for &v in values {
            if v.is_finite() {
                self.counts[Self::bin(v)] += 1;
                self.total += 1;
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The magnitude below which a fraction `q` of the values lie (linear within a bin).
    pub fn quantile(&self, q: f64) -> f32 {
        if self.total == 0 || q <= 0.0 {
            return 0.0;
        }
        let target = q.min(1.0) * self.total as f64;
        let mut seen = 0.0f64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if seen + c as f64 >= target {
                // Exact zeros share bin 0 with subnormals; a quantile inside a mass of zeros is 0 (keep all).
                let (lo, hi) = (Self::bin_lo(i) as f64, Self::bin_lo(i + 1) as f64);
                if i == 0 {
                    return 0.0;
                }
                let frac = (target - seen) / c as f64;
                return (lo + frac * (hi - lo)) as f32;
            }
            seen += c as f64;
        }
        f32::MAX
    }

    /// Fraction of recorded values strictly below `t` (up to bin resolution).
    pub fn fraction_below(&self, t: f32) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let b = Self::bin(t);
        let below: u64 = self.counts[..b].iter().sum();
        below as f64 / self.total as f64
    }
}

/// One histogram per layer over the magnitudes CATS thresholds.
pub struct Calibrator {
    pub layers: Vec<MagnitudeHistogram>,
    pub tokens: u64,
}

impl Calibrator {
    pub fn new(layers: usize) -> Self {
        Calibrator { layers: vec![MagnitudeHistogram::default(); layers], tokens: 0 }
    }

    /// Run one batch-1 sequence and add its gate magnitudes. Ids outside the vocabulary and sequences longer
    /// than the model's position table are refused ([`crate::decode::DecodeError`]).
    pub fn add_sequence<B: Backend>(&mut self, model: &Model<B>, ids: &[u32]) -> Result<()> {
        self.add_sequence_under(model, ids, None)
    }

    /// As [`Calibrator::add_sequence`], with the forward itself sparse under `plan`: each layer's gate magnitudes
    /// are then those it sees when the layers before it are already masked, which is what a refinement pass
    /// needs so that the realised sparsity of every layer, not just the first, meets the requested level.
    /// `plan` may not have predicted rules (there is no scorer here).
    pub fn add_sequence_under<B: Backend>(&mut self, model: &Model<B>, ids: &[u32], plan: Option<&Plan>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        check_rows(&model.cfg, 0, &[ids.to_vec()])?;
        let sparse = plan.map(Sparse::unscored).transpose()?;
        let want = TapSet { mlp_act: true, ..Default::default() };
        let mut taps: Vec<LayerTaps<B>> = Vec::new();
        let mut cache = model.new_cache();
        let _ = model.forward_with(
            model.tokens(&[ids.to_vec()]),
            &mut cache,
            Forward { taps: Some((&want, &mut taps)), sparse, ..Default::default() },
        );
        for (hist, t) in self.layers.iter_mut().zip(taps) {
            // Llama: |SiLU(gate)|; OPT: post-ReLU fc1 (non-negative already).
            let Some(g) = t.gate_act.or(t.mlp_act) else { continue };
            hist.add_all(&to_host(g));
        }
        self.tokens += ids.len() as u64;
        Ok(())
    }
}

/// What the SwiGLU rules calibrate, gathered over dense forwards of the calibration text: TEAL's histograms of
/// |x| (the normed MLP input) and |h| (the hidden value), and the per-layer error curves of the budgets.
pub struct RuleCalibrator {
    pub input: Vec<MagnitudeHistogram>,
    pub hidden: Vec<MagnitudeHistogram>,
    /// Error curves with neurons ranked by `ranking` (see [`RankError`]); empty when no budgets are wanted.
    pub errors: Vec<RankError>,
    pub ranking: Ranking,
    pub tokens: u64,
}

impl RuleCalibrator {
    /// `teal`: gather the TEAL histograms; `budgets`: gather error curves ranked by `ranking`.
    pub fn new(layers: usize, ffn: usize, teal: bool, budgets: bool, ranking: Ranking) -> Self {
        let hist = if teal { vec![MagnitudeHistogram::default(); layers] } else { Vec::new() };
        RuleCalibrator {
            input: hist.clone(),
            hidden: hist,
            errors: if budgets { vec![RankError::new(ffn); layers] } else { Vec::new() },
            ranking,
            tokens: 0,
        }
    }

    /// Run one batch-1 sequence densely and add what it shows. `qscore` ranks the neurons when the ranking is
    /// [`Ranking::QScore`] (required then). The model must be SwiGLU (Llama).
    pub fn add_sequence<B: Backend>(&mut self, model: &Model<B>, ids: &[u32], qscore: Option<&QScorer<B>>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        check_rows(&model.cfg, 0, &[ids.to_vec()])?;
        let host = model.host_mlps();
        if host.len() != model.cfg.layers {
            return Err(Error::option("rule", "the SwiGLU rules need a Llama-family model"));
        }
        if self.ranking == Ranking::QScore && !self.errors.is_empty() && qscore.is_none() {
            return Err(Error::option("qscore", "budgets ranked by the low-bit score need the score copies"));
        }
        let want = TapSet { mlp_act: true, mlp_input: true, mlp_normed: true, ..Default::default() };
        let mut taps: Vec<LayerTaps<B>> = Vec::new();
        let mut cache = model.new_cache();
        let _ = model.forward_with(model.tokens(&[ids.to_vec()]), &mut cache, Forward { taps: Some((&want, &mut taps)), ..Default::default() });
        let (d, f) = (model.cfg.hidden, model.cfg.ffn);
        for (l, t) in taps.into_iter().enumerate() {
            let (Some(act), Some(normed), Some(resid)) = (t.mlp_act, t.mlp_normed, t.mlp_input) else { continue };
            let h = to_host(act);
            if !self.input.is_empty() {
                self.input[l].add_all(&to_host(normed.clone()));
                self.hidden[l].add_all(&h);
            }
            if self.errors.is_empty() {
                continue;
            }
            let score = match (self.ranking, qscore) {
                (Ranking::QScore, Some(q)) => to_host(q.scores(l, normed)),
                _ => h.iter().map(|v| v.abs()).collect(),
            };
            let resid = to_host(resid);
            let dn = &host[l].down_norm;
            for tok in 0..h.len() / f {
                let r2: f64 = resid[tok * d..(tok + 1) * d].iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().max(1e-30);
                let contrib: Vec<f64> =
                    h[tok * f..(tok + 1) * f].iter().zip(dn).map(|(&hj, &n)| (hj as f64 * n as f64).powi(2) / r2).collect();
                self.errors[l].add(&score[tok * f..(tok + 1) * f], &contrib);
            }
        }
        self.tokens += ids.len() as u64;
        Ok(())
    }

    /// TEAL's thresholds at `sparsity`: the per-layer `sparsity`-quantiles of |x| and |h|.
    pub fn teal_level(&self, sparsity: f64) -> TealLevel {
        TealLevel {
            sparsity,
            t_in: self.input.iter().map(|h| h.quantile(sparsity)).collect(),
            t_hidden: self.hidden.iter().map(|h| h.quantile(sparsity)).collect(),
            tokens: self.tokens,
        }
    }

    /// TEAL's thresholds of layer `l` alone at `sparsity`: the `sparsity`-quantiles of its |x| and |h|.
    pub fn teal_thresholds(&self, l: usize, sparsity: f64) -> (f32, f32) {
        (self.input[l].quantile(sparsity), self.hidden[l].quantile(sparsity))
    }

    /// Give a [`Ranking::Teal`] budget its per-layer thresholds: layer `l` keeping `k[l]` of `ffn` neurons runs
    /// at sparsity `1 − k[l]/ffn`.
    pub fn with_teal_thresholds(&self, mut b: BudgetLevel, ffn: usize) -> BudgetLevel {
        let (t_in, t_hidden) = b.k.iter().enumerate().map(|(l, &k)| self.teal_thresholds(l, 1.0 - k as f64 / ffn as f64)).unzip();
        b.t_in = t_in;
        b.t_hidden = t_hidden;
        b
    }

    /// Greedy per-layer budgets at `sparsity`, giving up `step` neurons at a time, each layer keeping at least
    /// `min_keep`.
    pub fn budget_level(&self, sparsity: f64, step: usize, min_keep: usize) -> BudgetLevel {
        let t = self.tokens.max(1) as f64;
        let curves: Vec<Vec<f64>> = self.errors.iter().map(|e| e.curve().into_iter().map(|x| x / t).collect()).collect();
        budget_from_curves(&curves, self.ranking, sparsity, step, min_keep, self.tokens, ERROR_PROXY)
    }
}

/// Per-layer loss curves for budgets: for each layer `l` alone running the rule `rule(l, k)` (every other layer dense)
/// at each keep in `keeps`, the mean over the tokens of `windows` of KL(dense ‖ sparse) between the next-token
/// distributions (always >= 0, and far less noisy than a difference of NLLs on a few hundred tokens);
/// interpolated to every k by [`interpolate_curve`]. `qscore` is needed by rules that read score copies.
/// `progress` is called per forward.
pub fn loss_curves<B: Backend>(
    model: &Model<B>,
    windows: &[Vec<u32>],
    rule: impl Fn(usize, usize) -> MlpRule,
    qscore: Option<&QScorer<B>>,
    keeps: &[usize],
    mut progress: impl FnMut(),
) -> Result<Vec<Vec<f64>>> {
    let c = &model.cfg;
    for w in windows {
        check_rows(c, 0, std::slice::from_ref(w))?;
    }
    // Log-probabilities of every position, `[tokens, vocab]` per window.
    let log_probs = |plan: Option<&Plan>| -> Result<Vec<Vec<f32>>> {
        let sparse = plan.map(|p| Sparse::with_qscore(p, None, qscore)).transpose()?;
        let mut out = Vec::with_capacity(windows.len());
        for w in windows {
            let mut cache = model.new_cache();
            let h = model.forward_with(model.tokens(std::slice::from_ref(w)), &mut cache, Forward { sparse, ..Default::default() });
            let lp = burn::tensor::activation::log_softmax(model.logits(h), 2);
            out.push(to_host(lp));
        }
        Ok(out)
    };
    let dense = log_probs(None)?;
    progress();
    let v = c.vocab_size;
    let mut curves = Vec::with_capacity(c.layers);
    for l in 0..c.layers {
        let mut points = Vec::with_capacity(keeps.len());
        for &k in keeps {
            let mut plan = Plan::dense(c.layers);
            plan.layers[l].mlp = rule(l, k);
            let sparse = log_probs(Some(&plan))?;
            let (mut kl, mut n) = (0.0f64, 0usize);
            for (d, s) in dense.iter().zip(&sparse) {
                for (pd, ps) in d.chunks(v).zip(s.chunks(v)) {
                    kl += pd.iter().zip(ps).map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64)).sum::<f64>();
                    n += 1;
                }
            }
            points.push((k, kl / n.max(1) as f64));
            progress();
        }
        curves.push(interpolate_curve(&points, c.ffn));
    }
    Ok(curves)
}

/// Low-bit score copies of every layer's gate and up (rows = neurons, groups along the input).
pub fn quantize_model<B: Backend>(model: &Model<B>, opts: QuantOptions, header: ArtifactHeader) -> Result<QScoreCopies> {
    opts.check()?;
    let host = model.host_mlps();
    if host.len() != model.cfg.layers {
        return Err(Error::option("rule", "qscore needs a Llama-family (SwiGLU) model"));
    }
    let layers = host
        .iter()
        .map(|h| (QMatrix::quantize(h.gate_rows(), h.f, h.d, opts), QMatrix::quantize(h.up_rows(), h.f, h.d, opts)))
        .collect();
    Ok(QScoreCopies { header, opts, layers })
}

/// The CATS plan for per-layer `thresholds`.
pub fn threshold_plan(thresholds: &[f32]) -> Plan {
    Plan { layers: thresholds.iter().map(|&t| LayerPlan { mlp: MlpRule::Threshold { t }, heads: HeadRule::Dense }).collect() }
}

/// The thresholds file `calibrate` writes and `eval --mode cats` reads.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Thresholds {
    /// Format `dejavu.thresholds`, the model, and the calibration options.
    pub header: ArtifactHeader,
    /// What is thresholded, in words.
    pub criterion: String,
    pub tokens: u64,
    pub text: Vec<String>,
    pub levels: Vec<ThresholdLevel>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ThresholdLevel {
    /// Requested MLP sparsity (fraction of neurons zeroed).
    pub sparsity: f64,
    /// One threshold per layer: keep a neuron when its gate magnitude is >= the threshold.
    pub thresholds: Vec<f32>,
    /// Sparsity each threshold realises on the calibration tokens (histogram estimate).
    pub realised: Vec<f64>,
}

impl Thresholds {
    pub fn level(&self, sparsity: f64) -> Option<&ThresholdLevel> {
        self.levels.iter().find(|l| (l.sparsity - sparsity).abs() < 1e-9)
    }

    /// The header a thresholds file for `model` calibrated with `options` carries.
    pub fn header(model: ModelIdentity, options: &impl serde::Serialize) -> ArtifactHeader {
        ArtifactHeader::new(THRESHOLDS_FORMAT, THRESHOLDS_VERSION, model, options)
    }

    /// Write the thresholds file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        store::write_json(path, self)
    }

    /// Read a thresholds file, refusing another format or version, another model, or a layer count that does not
    /// fit `model`.
    pub fn load(path: &Path, model: &ModelIdentity) -> Result<Self> {
        let t: Thresholds = store::read_artifact(path, THRESHOLDS_FORMAT, THRESHOLDS_VERSION, Some(model))?;
        for l in &t.levels {
            if l.thresholds.len() != model.layers {
                return Err(Error::field(
                    path,
                    format!("levels[sparsity={}].thresholds", l.sparsity),
                    format!(
                        "has {} entries, the model has {} layers",
                        l.thresholds.len(),
                        model.layers
                    ),
                ));
            }
        }
        Ok(t)
    }
}

pub fn criterion(family: crate::config::Family) -> &'static str {
    match family {
        crate::config::Family::Llama => "|SiLU(gate_proj x)| per neuron (CATS)",
        crate::config::Family::Opt => "post-ReLU fc1 output per neuron",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        // 100k evenly spaced magnitudes in (0, 10]: the q-quantile is 10q.
        let v: Vec<f32> = (1..=100_000).map(|i| i as f32 * 1e-4).collect();
        let mut h = MagnitudeHistogram::default();
        h.add_all(&v);
        for q in [0.1, 0.5, 0.7, 0.9] {
            let t = h.quantile(q) as f64;
            assert!((t - 10.0 * q).abs() / (10.0 * q) < 0.01, "q={q}: {t}");
            let below = v.iter().filter(|&&x| (x as f64) < t).count() as f64 / v.len() as f64;
            assert!((below - q).abs() < 0.005, "q={q}: {below}");
        }
    }

    #[test]
    fn zeros_give_a_zero_threshold() {
        let mut h = MagnitudeHistogram::default();
        h.add_all(&[0.0; 80]);
        h.add_all(&[1.0; 20]);
        assert_eq!(h.quantile(0.5), 0.0);
        assert!(h.quantile(0.9) >= 1.0);
        assert!((h.fraction_below(1.0) - 0.8).abs() < 1e-12);
    }
}
