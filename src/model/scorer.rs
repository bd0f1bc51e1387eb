//! How the reference forward gets scores for the plan's `Predicted*` rules, and the one pairing of a plan with
//! its scorer the forward accepts ([`Sparse`]): a plan with predicted rules and no scorer cannot be built.

use burn::tensor::{backend::Backend, Tensor};

use crate::error::OptionError;
use crate::predictor::NeuronInput;
use crate::sparse::Plan;

use super::QScorer;

/// Scores neurons and heads for the `Predicted*` rules (implemented by trained Deja Vu predictors).
pub trait Scorer<B: Backend> {
    /// `input: [b, s, d] -> [b, s, ffn]`, larger means more likely needed; `input` is what
    /// [`Scorer::neuron_input`] names (the MLP's input residual, the layer's block input, or the previous layer's).
    fn neuron_scores(&self, layer: usize, input: Tensor<B, 3>) -> Tensor<B, 3>;
    /// What [`Scorer::neuron_scores`] reads.
    fn neuron_input(&self) -> NeuronInput {
        NeuronInput::Mlp
    }
    /// `prev_block_input: [b, s, d] -> [b, s, heads]`
    fn head_scores(&self, layer: usize, prev_block_input: Tensor<B, 3>) -> Tensor<B, 3>;
}

/// A plan together with the scorer its predicted rules need; checked when built.
pub struct Sparse<'a, B: Backend> {
    plan: &'a Plan,
    scorer: Option<&'a dyn Scorer<B>>,
    qscore: Option<&'a QScorer<B>>,
}

// Manual impls: a derive would require `B: Copy`.
impl<B: Backend> Clone for Sparse<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Sparse<'_, B> {}

impl<'a, B: Backend> Sparse<'a, B> {
    /// Refuses a plan with predicted rules when no scorer is given (it would otherwise run dense), and a plan
    /// that reads low-bit score copies (see [`Sparse::with_qscore`]).
    pub fn new(plan: &'a Plan, scorer: Option<&'a dyn Scorer<B>>) -> Result<Self, OptionError> {
        Self::with_qscore(plan, scorer, None)
    }

    /// As [`Sparse::new`], with the low-bit score copies the `qscore` and `cascade` rules read; refuses a plan
    /// that needs them when none are given, and copies for another layer count.
    pub fn with_qscore(plan: &'a Plan, scorer: Option<&'a dyn Scorer<B>>, qscore: Option<&'a QScorer<B>>) -> Result<Self, OptionError> {
        if plan.needs_predictors() && scorer.is_none() {
            return Err(OptionError::new("predictors", "the plan has predicted rules but no predictors were loaded"));
        }
        if plan.needs_qscore() {
            match qscore {
                None => return Err(OptionError::new("qscore", "the plan scores neurons with low-bit copies of gate/up but none were loaded")),
                Some(q) if q.layers() != plan.layers.len() => {
                    return Err(OptionError::new("qscore", format!("score copies for {} layers, the plan has {}", q.layers(), plan.layers.len())));
                }
                _ => {}
            }
        }
        Ok(Sparse { plan, scorer, qscore })
    }

    /// The low-bit score copies; present whenever the plan reads them.
    pub(crate) fn qscore(&self) -> Option<&'a QScorer<B>> {
        self.qscore
    }

    /// A plan with no predicted rules (thresholds, oracle, dense).
    pub fn unscored(plan: &'a Plan) -> Result<Self, OptionError> {
        Self::new(plan, None)
    }

    pub fn plan(&self) -> &'a Plan {
        self.plan
    }

    /// The scorer; present whenever the plan has a predicted rule.
    pub(crate) fn scorer(&self) -> Option<&'a dyn Scorer<B>> {
        self.scorer
    }
}
