//! The sparse plan: plain data saying, per layer, how MLP neurons and attention heads are chosen. Built and
//! validated once by [`resolve`] from a [`Mode`], the model config and the run's artifacts; every engine reads
//! the same plan (the burn reference now, the CUDA engine later), so it holds no backend types.

use std::path::Path;

use crate::calibrate::Thresholds;
use crate::config::ModelConfig;
use crate::error::OptionError;

use super::calib::{BudgetLevel, Ranking, RuleCalibration};
use super::mode::{Budget, CASCADE_FACTOR};
use super::Mode;

/// How one layer's MLP neurons are chosen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum MlpRule {
    Dense,
    /// CATS: keep a neuron when its gate magnitude is `>= t` (Llama |SiLU(gate)|, OPT post-ReLU fc1).
    Threshold { t: f32 },
    /// Keep the k neurons with the largest true |hidden value| (Llama |SiLU(gate)·up|, OPT post-ReLU).
    OracleTopK { k: usize },
    /// Keep the k neurons a predictor ranks highest from the MLP input.
    PredictedTopK { k: usize },
    /// SwiGLU: dense gate/up; down reads only the k rows of the largest exact |hidden value|.
    ExactDownTopK { k: usize },
    /// SwiGLU: score |SiLU(ĝ)·û| with the low-bit copies of gate/up; exact gate/up/down for the top k only.
    QScoreTopK { k: usize },
    /// SwiGLU: the low-bit score picks `candidates`; their exact hidden values pick the top `k` for down.
    Cascade { candidates: usize, k: usize },
    /// SwiGLU, TEAL: gate/up read the input channels with `|x_i| >= t_in`; down reads the neurons with
    /// `|h_j| >= t_hidden`.
    Teal { t_in: f32, t_hidden: f32 },
    /// SwiGLU, WINA: gate/up read the top `k_in` input channels by `|x_i|·‖[W_gate; W_up][:, i]‖`; down reads
    /// the top `k_hidden` neurons by `|h_j|·‖W_down[:, j]‖`.
    Wina { k_in: usize, k_hidden: usize },
}

impl MlpRule {
    /// Whether the rule runs on the host sparse MLP (gathered rows, no dense pass where it skips work).
    pub fn is_gathered(&self) -> bool {
        matches!(
            self,
            MlpRule::ExactDownTopK { .. } | MlpRule::QScoreTopK { .. } | MlpRule::Cascade { .. } | MlpRule::Teal { .. } | MlpRule::Wina { .. }
        )
    }

    /// Whether the rule reads the low-bit score copies of gate/up.
    pub fn needs_qscore(&self) -> bool {
        matches!(self, MlpRule::QScoreTopK { .. } | MlpRule::Cascade { .. })
    }
}

/// How one layer's attention heads are chosen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum HeadRule {
    Dense,
    /// Keep the k heads whose output has the largest L2 norm.
    OracleTopK { k: usize },
    /// Keep the k heads a predictor ranks highest from the previous layer's block input (look-ahead); `kv` says
    /// whether the key/value heads no kept head reads are still computed and cached.
    PredictedTopK {
        k: usize,
        #[serde(default)]
        kv: HeadKv,
    },
}

/// What a token writes into the key/value cache for a key/value head none of whose query heads it keeps (a GQA
/// group, or a single head without GQA). The semantics are the same in the CPU reference and on the GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HeadKv {
    /// Every key/value head is computed and cached at every position, as in dense decoding; head sparsity skips
    /// the dropped heads' queries, their attention and their columns of the out-projection.
    #[default]
    All,
    /// A key/value head is computed only where one of its query heads is kept. Where it is not, the position is
    /// absent for that key/value head: later queries of its heads do not attend to it (a query always sees its
    /// own position). This saves the k/v rows as well, at the cost of the missing entries.
    Kept,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerPlan {
    pub mlp: MlpRule,
    pub heads: HeadRule,
}

impl LayerPlan {
    pub const DENSE: LayerPlan = LayerPlan { mlp: MlpRule::Dense, heads: HeadRule::Dense };

    /// Whether either rule needs trained predictors.
    pub fn predicted(&self) -> bool {
        matches!(self.mlp, MlpRule::PredictedTopK { .. }) || matches!(self.heads, HeadRule::PredictedTopK { .. })
    }
}

/// One rule pair per layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub layers: Vec<LayerPlan>,
}

impl Plan {
    pub fn dense(layers: usize) -> Self {
        Plan { layers: vec![LayerPlan::DENSE; layers] }
    }

    pub fn uniform(layers: usize, plan: LayerPlan) -> Self {
        Plan { layers: vec![plan; layers] }
    }

    pub fn is_dense(&self) -> bool {
        self.layers.iter().all(|l| *l == LayerPlan::DENSE)
    }

    /// Whether some layer needs trained predictors to score its units.
    pub fn needs_predictors(&self) -> bool {
        self.layers.iter().any(LayerPlan::predicted)
    }

    /// Whether some layer reads the low-bit score copies of gate/up.
    pub fn needs_qscore(&self) -> bool {
        self.layers.iter().any(|l| l.mlp.needs_qscore())
    }

    /// The rules of layer `i` (dense past the end, which [`Plan::validate`] rules out).
    pub fn layer(&self, i: usize) -> LayerPlan {
        self.layers.get(i).copied().unwrap_or(LayerPlan::DENSE)
    }

    /// Check the plan fits `cfg`: one entry per layer, every k within its layer's width, thresholds finite.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), OptionError> {
        if self.layers.len() != cfg.layers {
            return Err(OptionError::new("plan", format!("has {} layers, the model has {}", self.layers.len(), cfg.layers)));
        }
        for (i, l) in self.layers.iter().enumerate() {
            match l.mlp {
                MlpRule::OracleTopK { k }
                | MlpRule::PredictedTopK { k }
                | MlpRule::ExactDownTopK { k }
                | MlpRule::QScoreTopK { k }
                | MlpRule::Wina { k_hidden: k, .. }
                    if k > cfg.ffn =>
                {
                    return Err(OptionError::new("plan", format!("layer {i} keeps {k} neurons of {}", cfg.ffn)));
                }
                MlpRule::Cascade { candidates, k } if candidates > cfg.ffn || k > candidates => {
                    return Err(OptionError::new("plan", format!("layer {i}: cascade keeps {k} of {candidates} candidates of {}", cfg.ffn)));
                }
                MlpRule::Wina { k_in, .. } if k_in > cfg.hidden => {
                    return Err(OptionError::new("plan", format!("layer {i} keeps {k_in} input channels of {}", cfg.hidden)));
                }
                MlpRule::Threshold { t } if t.is_nan() => {
                    return Err(OptionError::new("thresholds", format!("layer {i}: threshold is NaN")));
                }
                MlpRule::Teal { t_in, t_hidden } if t_in.is_nan() || t_hidden.is_nan() => {
                    return Err(OptionError::new("calibration", format!("layer {i}: TEAL threshold is NaN")));
                }
                _ => {}
            }
            if l.mlp.is_gathered() && cfg.family != crate::config::Family::Llama {
                return Err(OptionError::new("mode", format!("layer {i}: {:?} applies to SwiGLU MLPs (the Llama family)", l.mlp)));
            }
            if let HeadRule::OracleTopK { k } | HeadRule::PredictedTopK { k, .. } = l.heads {
                if k > cfg.heads {
                    return Err(OptionError::new("plan", format!("layer {i} keeps {k} heads of {}", cfg.heads)));
                }
            }
        }
        Ok(())
    }
}

/// The `calibrate --rule` that writes what `mode` reads.
fn rule_name(mode: Mode) -> &'static str {
    match mode {
        Mode::ExactDown(..) | Mode::Cascade(..) => "exactdown",
        Mode::QScore(..) => "qscore",
        Mode::Teal(..) => "teal",
        Mode::Wina(..) => "wina",
        _ => "cats",
    }
}

/// Candidates a cascade that keeps `k` computes exactly: `round(CASCADE_FACTOR·k)`, at most `ffn`.
pub fn cascade_candidates(k: usize, ffn: usize) -> usize {
    ((k as f64 * CASCADE_FACTOR).round() as usize).clamp(k, ffn)
}

/// Units kept out of `n` at `sparsity` (the fraction dropped): `round((1 − s)·n)`.
pub fn keep_count(sparsity: f64, n: usize) -> usize {
    (((1.0 - sparsity) * n as f64).round() as usize).min(n)
}

/// Input channels an input-sparse layer (WINA with per-layer budgets) keeps when it keeps `k` of `ffn` hidden
/// neurons: the same fraction of `hidden`, `round(k·hidden/ffn)`, at least 1.
pub fn input_keep(k: usize, ffn: usize, hidden: usize) -> usize {
    ((k as f64 * hidden as f64 / ffn.max(1) as f64).round() as usize).clamp(1, hidden.max(1))
}

/// Per-layer budgets of trained predictors (from their manifest) and where they were read.
#[derive(Debug, Clone)]
pub struct PredictorBudget<'a> {
    pub dir: &'a Path,
    pub k_neurons: Vec<usize>,
    pub k_heads: Vec<usize>,
}

/// What a mode may need from the run directory.
#[derive(Debug, Clone, Default)]
pub struct Artifacts<'a> {
    /// CATS thresholds (from `calibrate`) and the file they came from.
    pub thresholds: Option<(&'a Path, &'a Thresholds)>,
    pub predictors: Option<PredictorBudget<'a>>,
    /// Rule calibration (`calibrate --rule R`: TEAL thresholds, per-layer budgets) and the file it came from.
    pub calibration: Option<(&'a Path, &'a RuleCalibration)>,
    /// The low-bit score copies of gate/up (`calibrate --rule qscore`), when loaded.
    pub qscore: Option<&'a Path>,
}

/// Options that shape a plan beyond its mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanOptions {
    /// Fraction of attention heads dropped per token (oracle: by output norm; dejavu: overrides the predictors' k).
    pub head_sparsity: Option<f64>,
    /// The key/value heads of dropped heads: computed and cached (`all`) or skipped and absent (`kept`).
    #[serde(default)]
    pub head_kv: HeadKv,
}

/// Build and validate the plan for `mode`. Missing thresholds or predictors are errors naming the option.
pub fn resolve(mode: Mode, opts: &PlanOptions, cfg: &ModelConfig, art: &Artifacts<'_>) -> Result<Plan, OptionError> {
    let head_k = match opts.head_sparsity {
        Some(h) if !(0.0..1.0).contains(&h) => {
            return Err(OptionError::new("head_sparsity", format!("{h} is not in [0, 1)")));
        }
        Some(h) => Some(keep_count(h, cfg.heads).max(1)),
        None => None,
    };
    if head_k.is_some() && matches!(mode, Mode::Dense | Mode::Cats(_)) {
        return Err(OptionError::new("head_sparsity", format!("mode {mode} has no head rule (use oracle@S or dejavu)")));
    }
    // The new MLP rules take heads from the trained predictors (look-ahead, top-k) when a head sparsity is given.
    let predicted_heads = || -> Result<HeadRule, OptionError> {
        match head_k {
            None => Ok(HeadRule::Dense),
            Some(k) if art.predictors.is_some() => Ok(HeadRule::PredictedTopK { k, kv: opts.head_kv }),
            Some(_) => Err(OptionError::new("predictors", format!("mode {mode} with a head sparsity needs head predictors from `dejavu train-predictors`"))),
        }
    };
    let calib = |what: &str| -> Result<(&Path, &RuleCalibration), OptionError> {
        art.calibration.ok_or_else(|| OptionError::new("calibration", format!("mode {mode} needs {what} from `dejavu calibrate --rule {}`", rule_name(mode))))
    };
    // The greedy budget calibrated for this sparsity and ranking, checked against the model.
    let budget_level = |s: f64, ranking: Ranking| -> Result<(&Path, &BudgetLevel), OptionError> {
        let (path, c) = calib("per-layer budgets")?;
        let b = c.budget(ranking, s).ok_or_else(|| {
            OptionError::new("calibration", format!("{}: no {ranking} budgets for sparsity {s} (has {})", path.display(), c.budget_levels(ranking)))
        })?;
        if b.k.len() != cfg.layers {
            return Err(OptionError::new("calibration", format!("{}: budgets for {} layers, the model has {}", path.display(), b.k.len(), cfg.layers)));
        }
        Ok((path, b))
    };
    // Per-layer k of a neuron rule: uniform, or the greedy budget.
    let ks = |s: f64, budget: Budget, ranking: Ranking| -> Result<Vec<usize>, OptionError> {
        match budget {
            Budget::Uniform => Ok(vec![keep_count(s, cfg.ffn); cfg.layers]),
            Budget::Greedy => Ok(budget_level(s, ranking)?.1.k.clone()),
        }
    };
    if mode.sparsity().is_some() && matches!(mode, Mode::QScore(..) | Mode::Cascade(..)) && art.qscore.is_none() {
        return Err(OptionError::new("qscore", format!("mode {mode} needs the low-bit score copies from `dejavu calibrate --rule qscore`")));
    }
    let plan = match mode {
        Mode::Dense => Plan::dense(cfg.layers),
        Mode::Cats(s) => {
            let Some((path, th)) = art.thresholds else {
                return Err(OptionError::new("thresholds", format!("mode {mode} needs a thresholds file from `dejavu calibrate`")));
            };
            let level = th.level(s).ok_or_else(|| {
                let have: Vec<String> = th.levels.iter().map(|l| l.sparsity.to_string()).collect();
                OptionError::new("thresholds", format!("{}: no thresholds for sparsity {s} (has {})", path.display(), have.join(", ")))
            })?;
            Plan {
                layers: level.thresholds.iter().map(|&t| LayerPlan { mlp: MlpRule::Threshold { t }, heads: HeadRule::Dense }).collect(),
            }
        }
        Mode::Oracle(s) => {
            let heads = head_k.map_or(HeadRule::Dense, |k| HeadRule::OracleTopK { k });
            Plan::uniform(cfg.layers, LayerPlan { mlp: MlpRule::OracleTopK { k: keep_count(s, cfg.ffn) }, heads })
        }
        Mode::Dejavu(s) => {
            let Some(p) = &art.predictors else {
                return Err(OptionError::new("predictors", format!("mode {mode} needs predictors from `dejavu train-predictors`")));
            };
            if p.k_neurons.len() != cfg.layers || p.k_heads.len() != cfg.layers {
                return Err(OptionError::new(
                    "predictors",
                    format!("{}: predictors for {} layers, the model has {}", p.dir.display(), p.k_neurons.len(), cfg.layers),
                ));
            }
            Plan {
                layers: (0..cfg.layers)
                    .map(|l| LayerPlan {
                        mlp: MlpRule::PredictedTopK { k: s.map_or(p.k_neurons[l], |s| keep_count(s, cfg.ffn)) },
                        heads: HeadRule::PredictedTopK { k: head_k.unwrap_or(p.k_heads[l]), kv: opts.head_kv },
                    })
                    .collect(),
            }
        }
        Mode::ExactDown(s, b) => {
            let heads = predicted_heads()?;
            Plan { layers: ks(s, b, Ranking::Exact)?.into_iter().map(|k| LayerPlan { mlp: MlpRule::ExactDownTopK { k }, heads }).collect() }
        }
        Mode::QScore(s, b) => {
            let heads = predicted_heads()?;
            Plan { layers: ks(s, b, Ranking::QScore)?.into_iter().map(|k| LayerPlan { mlp: MlpRule::QScoreTopK { k }, heads }).collect() }
        }
        Mode::Cascade(s, b) => {
            let heads = predicted_heads()?;
            let mlp = |k: usize| MlpRule::Cascade { candidates: cascade_candidates(k, cfg.ffn), k };
            Plan { layers: ks(s, b, Ranking::Exact)?.into_iter().map(|k| LayerPlan { mlp: mlp(k), heads }).collect() }
        }
        Mode::Teal(s, Budget::Uniform) => {
            let heads = predicted_heads()?;
            let (path, c) = calib("TEAL thresholds")?;
            let level = c.teal_level(s).ok_or_else(|| {
                OptionError::new("calibration", format!("{}: no TEAL thresholds for sparsity {s} (has {})", path.display(), c.teal_levels()))
            })?;
            if level.t_in.len() != cfg.layers || level.t_hidden.len() != cfg.layers {
                return Err(OptionError::new("calibration", format!("{}: TEAL thresholds for {} layers, the model has {}", path.display(), level.t_in.len(), cfg.layers)));
            }
            Plan {
                layers: (0..cfg.layers)
                    .map(|l| LayerPlan { mlp: MlpRule::Teal { t_in: level.t_in[l], t_hidden: level.t_hidden[l] }, heads })
                    .collect(),
            }
        }
        Mode::Teal(s, Budget::Greedy) => {
            let heads = predicted_heads()?;
            // The layers run the budget's thresholds (its k is what they were calibrated to keep).
            let (path, b) = budget_level(s, Ranking::Teal)?;
            if b.t_in.len() != cfg.layers || b.t_hidden.len() != cfg.layers {
                return Err(OptionError::new("calibration", format!("{}: teal budgets with {} thresholds, the model has {} layers", path.display(), b.t_in.len(), cfg.layers)));
            }
            Plan {
                layers: (0..cfg.layers).map(|l| LayerPlan { mlp: MlpRule::Teal { t_in: b.t_in[l], t_hidden: b.t_hidden[l] }, heads }).collect(),
            }
        }
        Mode::Wina(s, Budget::Uniform) => {
            let heads = predicted_heads()?;
            let mlp = MlpRule::Wina { k_in: keep_count(s, cfg.hidden).max(1), k_hidden: keep_count(s, cfg.ffn) };
            Plan::uniform(cfg.layers, LayerPlan { mlp, heads })
        }
        Mode::Wina(s, Budget::Greedy) => {
            let heads = predicted_heads()?;
            let mlp = |k: usize| MlpRule::Wina { k_in: input_keep(k, cfg.ffn, cfg.hidden), k_hidden: k };
            Plan { layers: ks(s, Budget::Greedy, Ranking::Wina)?.into_iter().map(|k| LayerPlan { mlp: mlp(k), heads }).collect() }
        }
    };
    if opts.head_kv == HeadKv::Kept && !plan.layers.iter().any(|l| matches!(l.heads, HeadRule::PredictedTopK { .. })) {
        return Err(OptionError::new(
            "head_kv",
            format!("mode {mode}: skipping the key/value heads of dropped heads needs predicted heads (dejavu, or a SwiGLU rule with a head sparsity and head predictors)"),
        ));
    }
    plan.validate(cfg)?;
    Ok(plan)
}
