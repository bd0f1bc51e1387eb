//! The sparse plan: plain data saying, per layer, how MLP neurons and attention heads are chosen. Built and
//! validated once by [`resolve`] from a [`Mode`], the model config and the run's artifacts; every engine reads
//! the same plan (the burn reference now, the CUDA engine later), so it holds no backend types.

use std::path::Path;

use crate::calibrate::Thresholds;
use crate::config::ModelConfig;
use crate::error::OptionError;

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
}

/// How one layer's attention heads are chosen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum HeadRule {
    Dense,
    /// Keep the k heads whose output has the largest L2 norm.
    OracleTopK { k: usize },
    /// Keep the k heads a predictor ranks highest from the previous layer's block input (look-ahead).
    PredictedTopK { k: usize },
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
                MlpRule::OracleTopK { k } | MlpRule::PredictedTopK { k } if k > cfg.ffn => {
                    return Err(OptionError::new("plan", format!("layer {i} keeps {k} neurons of {}", cfg.ffn)));
                }
                MlpRule::Threshold { t } if t.is_nan() => {
                    return Err(OptionError::new("thresholds", format!("layer {i}: threshold is NaN")));
                }
                _ => {}
            }
            if let HeadRule::OracleTopK { k } | HeadRule::PredictedTopK { k } = l.heads {
                if k > cfg.heads {
                    return Err(OptionError::new("plan", format!("layer {i} keeps {k} heads of {}", cfg.heads)));
                }
            }
        }
        Ok(())
    }
}

/// Units kept out of `n` at `sparsity` (the fraction dropped): `round((1 − s)·n)`.
pub fn keep_count(sparsity: f64, n: usize) -> usize {
    (((1.0 - sparsity) * n as f64).round() as usize).min(n)
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
}

/// Options that shape a plan beyond its mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanOptions {
    /// Fraction of attention heads dropped per token (oracle: by output norm; dejavu: overrides the predictors' k).
    pub head_sparsity: Option<f64>,
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
                        heads: HeadRule::PredictedTopK { k: head_k.unwrap_or(p.k_heads[l]) },
                    })
                    .collect(),
            }
        }
    };
    plan.validate(cfg)?;
    Ok(plan)
}
