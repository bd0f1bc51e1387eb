//! Contextual sparsity as plain data, shared by every engine: the [`Mode`] a user names, the per-layer [`Plan`]
//! it resolves to, the host reference for selecting units ([`select`]), realised-sparsity counts ([`stats`]),
//! the calibration of the SwiGLU rules ([`calib`]) and their low-bit score copies ([`quant`]).

pub mod calib;
pub mod mode;
pub mod plan;
pub mod quant;
pub mod select;
pub mod stats;

pub use mode::{Budget, Mode, CASCADE_FACTOR};
pub use plan::{
    cascade_candidates, keep_count, resolve, Artifacts, HeadKv, HeadRule, LayerPlan, MlpRule, Plan, PlanOptions, PredictorBudget,
};
pub use stats::{LayerStats, SparsityStats};
