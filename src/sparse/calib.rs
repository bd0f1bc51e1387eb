//! What `calibrate --rule R` writes for the SwiGLU rules into `RUN/rules.json` (TEAL's per-layer thresholds,
//! per-layer budgets), and the greedy allocation that spreads a global sparsity over layers.

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::source::ModelIdentity;
use crate::store::{self, ArtifactHeader, RULES_FORMAT, RULES_VERSION};

/// Which score ranks the neurons a budget was allocated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ranking {
    /// Exact |SiLU(gate)·up| (exactdown, cascade, the oracle).
    Exact,
    /// |SiLU(ĝ)·û| from the low-bit copies (qscore).
    #[serde(rename = "qscore")]
    QScore,
    /// TEAL's magnitude thresholds on |x| and |hidden|: a layer keeping `k` of `ffn` neurons drops the fraction
    /// `1 − k/ffn` of both, its thresholds that quantile of the calibration magnitudes (in [`BudgetLevel`]).
    Teal,
    /// WINA's weighted top-k: a layer keeping `k` of `ffn` neurons keeps `round(k·hidden/ffn)` input channels.
    Wina,
}

impl fmt::Display for Ranking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ranking::Exact => "exact",
            Ranking::QScore => "qscore",
            Ranking::Teal => "teal",
            Ranking::Wina => "wina",
        })
    }
}

/// TEAL's thresholds at one sparsity: keep input channel `i` when `|x_i| >= t_in[l]`, hidden neuron `j` when
/// `|h_j| >= t_hidden[l]`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TealLevel {
    pub sparsity: f64,
    pub t_in: Vec<f32>,
    pub t_hidden: Vec<f32>,
    /// Calibration tokens the histograms saw.
    pub tokens: u64,
}

/// Per-layer k at one global sparsity, from [`greedy_budgets`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BudgetLevel {
    pub ranking: Ranking,
    pub sparsity: f64,
    /// Neurons kept per layer; their mean is `(1 − sparsity)·ffn` up to rounding of the total.
    pub k: Vec<usize>,
    /// The error per layer at its k, in the unit of `objective`.
    pub error: Vec<f64>,
    pub tokens: u64,
    /// What the allocation minimised: [`ERROR_PROXY`] or [`ERROR_LOSS`].
    #[serde(default)]
    pub objective: String,
    /// [`Ranking::Teal`] only: each layer's thresholds on |x| and |hidden| at its own sparsity `1 − k/ffn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub t_in: Vec<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub t_hidden: Vec<f32>,
}

/// The end-to-end objective of `--budget-error loss`.
pub const ERROR_LOSS: &str = "mean KL(dense || sparse) of the next-token distributions on the calibration windows \
when the layer alone runs the rule at k (the others dense), measured at a grid of k and interpolated linearly; \
layers assumed additive";

/// Per-layer curves `err[k]`, `k = 0..=n`, from losses measured at a few keeps: `points` are `(k, Δloss)` pairs
/// with `k` ascending and `n` implied as loss 0. Linear between points; below the smallest measured k the curve
/// keeps that point's slope. Made non-increasing in k (a measured gain from dropping units is read as noise).
pub fn interpolate_curve(points: &[(usize, f64)], n: usize) -> Vec<f64> {
    let mut pts: Vec<(usize, f64)> = points.iter().copied().filter(|&(k, _)| k < n).collect();
    pts.push((n, 0.0));
    pts.sort_by_key(|p| p.0);
    let mut err = vec![0.0; n + 1];
    for (k, e) in err.iter_mut().enumerate() {
        let i = pts.iter().position(|p| p.0 >= k).unwrap_or(pts.len() - 1);
        let (a, b) = if i == 0 { (pts[0], pts[1.min(pts.len() - 1)]) } else { (pts[i - 1], pts[i]) };
        *e = if b.0 == a.0 { a.1 } else { a.1 + (b.1 - a.1) * (k as f64 - a.0 as f64) / (b.0 as f64 - a.0 as f64) };
    }
    for k in (0..n).rev() {
        err[k] = err[k].max(err[k + 1]);
    }
    err
}

/// A [`BudgetLevel`] from per-layer error curves (`curves[l][k]`, `k = 0..=n`).
pub fn budget_from_curves(
    curves: &[Vec<f64>],
    ranking: Ranking,
    sparsity: f64,
    step: usize,
    min_keep: usize,
    tokens: u64,
    objective: &str,
) -> BudgetLevel {
    let n = curves.first().map_or(0, |c| c.len() - 1);
    let k = greedy_budgets(curves, n, sparsity, step, min_keep);
    let error = curves.iter().zip(&k).map(|(c, &k)| c[k]).collect();
    BudgetLevel { ranking, sparsity, k, error, tokens, objective: objective.to_string(), t_in: Vec::new(), t_hidden: Vec::new() }
}

/// What the budgets minimise, in words.
pub const ERROR_PROXY: &str = "sum over calibration tokens and dropped neurons j of h_j^2 * |W_down[:, j]|^2 / |x|^2 \
(x the residual entering the MLP): the squared error of the MLP output relative to the residual stream, cross terms \
between dropped neurons neglected";

/// `RUN/rules.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RuleCalibration {
    /// Format `dejavu.rules`, the model, and the options of the last `calibrate --rule` that wrote it.
    pub header: ArtifactHeader,
    #[serde(default)]
    pub teal: Vec<TealLevel>,
    #[serde(default)]
    pub budgets: Vec<BudgetLevel>,
    pub error_proxy: String,
}

impl RuleCalibration {
    pub fn new(header: ArtifactHeader) -> Self {
        RuleCalibration { header, teal: Vec::new(), budgets: Vec::new(), error_proxy: ERROR_PROXY.to_string() }
    }

    pub fn teal_level(&self, sparsity: f64) -> Option<&TealLevel> {
        self.teal.iter().find(|l| (l.sparsity - sparsity).abs() < 1e-9)
    }
    pub fn teal_levels(&self) -> String {
        list(self.teal.iter().map(|l| l.sparsity))
    }
    pub fn budget(&self, ranking: Ranking, sparsity: f64) -> Option<&BudgetLevel> {
        self.budgets.iter().find(|b| b.ranking == ranking && (b.sparsity - sparsity).abs() < 1e-9)
    }
    pub fn budget_levels(&self, ranking: Ranking) -> String {
        list(self.budgets.iter().filter(|b| b.ranking == ranking).map(|b| b.sparsity))
    }

    /// Add or replace the TEAL level of the same sparsity.
    pub fn put_teal(&mut self, level: TealLevel) {
        self.teal.retain(|l| (l.sparsity - level.sparsity).abs() >= 1e-9);
        self.teal.push(level);
        self.teal.sort_by(|a, b| a.sparsity.total_cmp(&b.sparsity));
    }
    /// Add or replace the budget of the same ranking and sparsity.
    pub fn put_budget(&mut self, level: BudgetLevel) {
        self.budgets.retain(|b| !(b.ranking == level.ranking && (b.sparsity - level.sparsity).abs() < 1e-9));
        self.budgets.push(level);
        self.budgets.sort_by(|a, b| (a.ranking as u8, a.sparsity).partial_cmp(&(b.ranking as u8, b.sparsity)).unwrap_or(std::cmp::Ordering::Equal));
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        store::write_json(path, self)
    }

    /// Read `RUN/rules.json`, refusing another format, version or model, or per-layer lists that do not fit it.
    pub fn load(path: &Path, model: &ModelIdentity) -> Result<Self> {
        let c: RuleCalibration = store::read_artifact(path, RULES_FORMAT, RULES_VERSION, Some(model))?;
        for l in &c.teal {
            if l.t_in.len() != model.layers || l.t_hidden.len() != model.layers {
                return Err(Error::field(path, format!("teal[sparsity={}]", l.sparsity), format!("needs {} layers", model.layers)));
            }
        }
        for b in &c.budgets {
            if b.k.len() != model.layers || b.k.iter().any(|&k| k > model.ffn) {
                return Err(Error::field(
                    path,
                    format!("budgets[{} sparsity={}].k", b.ranking, b.sparsity),
                    format!("needs {} entries of at most {}", model.layers, model.ffn),
                ));
            }
            let teal = b.ranking == Ranking::Teal;
            for (field, t) in [("t_in", &b.t_in), ("t_hidden", &b.t_hidden)] {
                if (teal && t.len() != model.layers) || (!teal && !t.is_empty()) || t.iter().any(|v| v.is_nan()) {
                    let want = if teal { format!("needs {} thresholds, none NaN", model.layers) } else { "belongs to teal budgets only".into() };
                    return Err(Error::field(path, format!("budgets[{} sparsity={}].{field}", b.ranking, b.sparsity), want));
                }
            }
        }
        Ok(c)
    }
}

fn list(it: impl Iterator<Item = f64>) -> String {
    let v: Vec<String> = it.map(|s| s.to_string()).collect();
    if v.is_empty() { "none".into() } else { v.join(", ") }
}

/// TEAL's greedy allocation. `err[l][k]` is layer `l`'s calibration error when it keeps `k` of `n` units
/// (`k = 0..=n`). Every layer starts dense; while the total kept exceeds `round((1 − sparsity)·n·layers)`,
/// the layer whose next `step` units cost the least error per unit gives them up (ties: the lower layer). No
/// layer keeps fewer than `min_keep`. The kept total lands exactly on the target when the target allows it.
pub fn greedy_budgets(err: &[Vec<f64>], n: usize, sparsity: f64, step: usize, min_keep: usize) -> Vec<usize> {
    let layers = err.len();
    let min_keep = min_keep.min(n);
    let target = ((1.0 - sparsity) * (n * layers) as f64).round() as usize;
    let target = target.max(min_keep * layers);
    let mut k = vec![n; layers];
    let mut total = n * layers;
    let step = step.max(1);
    while total > target {
        let mut best: Option<(usize, usize, f64)> = None;
        for l in 0..layers {
            let room = k[l] - min_keep;
            if room == 0 {
                continue;
            }
            let d = step.min(room).min(total - target);
            let cost = (err[l][k[l] - d] - err[l][k[l]]) / d as f64;
            if best.is_none_or(|(_, _, c)| cost < c) {
                best = Some((l, d, cost));
            }
        }
        let Some((l, d, _)) = best else { break };
        k[l] -= d;
        total -= d;
    }
    k
}

/// Per-layer error curves for [`greedy_budgets`], accumulated token by token: for each token, units ranked by
/// `score` (larger first, ties by the lower index); the unit at rank `r` adds its `contribution` to position
/// `r`. `curve()` then gives `err[k]` = the summed contributions of ranks `k..n` (the units a top-k drops).
#[derive(Debug, Clone)]
pub struct RankError {
    by_rank: Vec<f64>,
    pub tokens: u64,
}

impl RankError {
    pub fn new(n: usize) -> Self {
        RankError { by_rank: vec![0.0; n], tokens: 0 }
    }

    /// One token: `score` ranks the units, `contribution[j]` is what dropping unit `j` costs.
    pub fn add(&mut self, score: &[f32], contribution: &[f64]) {
        let mut order: Vec<usize> = (0..score.len()).collect();
        let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
        order.sort_by(|&a, &b| key(score[b]).total_cmp(&key(score[a])).then(a.cmp(&b)));
        for (r, &j) in order.iter().enumerate() {
            self.by_rank[r] += contribution[j];
        }
        self.tokens += 1;
    }

    /// `err[k]` for `k = 0..=n`.
    pub fn curve(&self) -> Vec<f64> {
        let n = self.by_rank.len();
        let mut err = vec![0.0; n + 1];
        for k in (0..n).rev() {
            err[k] = err[k + 1] + self.by_rank[k];
        }
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_hits_the_target_and_spends_where_error_is_cheap() {
        // Layer 0's units cost 10 each, layer 1's cost 1 each: at 25% of 2·8 units dropped, all 4 come from
        // layer 1; at 75%, layer 1 is emptied down to min_keep first.
        let n = 8;
        let lin = |c: f64| (0..=n).map(|k| c * (n - k) as f64).collect::<Vec<f64>>();
        let err = vec![lin(10.0), lin(1.0)];
        assert_eq!(greedy_budgets(&err, n, 0.25, 1, 0), vec![8, 4]);
        assert_eq!(greedy_budgets(&err, n, 0.25, 3, 0), vec![8, 4]);
        assert_eq!(greedy_budgets(&err, n, 0.75, 2, 1), vec![3, 1]);
        for s in [0.0, 0.1, 0.3, 0.5, 0.7, 0.9] {
            let k = greedy_budgets(&err, n, s, 3, 1);
            let kept: usize = k.iter().sum();
            assert_eq!(kept, ((1.0 - s) * 16.0).round() as usize, "s={s}");
        }
    }

    #[test]
    fn interpolation_is_linear_between_points_and_monotone() {
        // Points at k = 2 (loss 4) and 6 (loss 1); k = 10 is 0 by definition.
        let e = interpolate_curve(&[(2, 4.0), (6, 1.0)], 10);
        assert_eq!(e.len(), 11);
        assert!((e[4] - 2.5).abs() < 1e-12 && (e[8] - 0.5).abs() < 1e-12 && e[10] == 0.0, "{e:?}");
        // Below the first point the first segment's slope continues: 4 + 2·0.75.
        assert!((e[0] - 5.5).abs() < 1e-12, "{e:?}");
        // A noisy negative point is lifted so that fewer kept units never look better.
        let e = interpolate_curve(&[(2, 3.0), (6, -1.0)], 10);
        assert!(e.windows(2).all(|w| w[0] >= w[1]), "{e:?}");
    }

    #[test]
    fn rank_error_sums_what_top_k_drops() {
        let mut r = RankError::new(4);
        // Ranking 2 > 0 > 3 > 1 (tie between 0 and 3 at 1.0 goes to the lower index).
        r.add(&[1.0, 0.5, 3.0, 1.0], &[10.0, 20.0, 30.0, 40.0]);
        // Dropping all: 100; keeping 1 (unit 2): 70; keeping 2 (2, 0): 60; keeping 3: 20; all: 0.
        assert_eq!(r.curve(), vec![100.0, 70.0, 60.0, 20.0, 0.0]);
    }
}
