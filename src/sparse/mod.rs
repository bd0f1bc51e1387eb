//! Contextual sparsity as plain data, shared by every engine: the [`Mode`] a user names, the per-layer [`Plan`]
//! it resolves to, the host reference for selecting units ([`select`]), and realised-sparsity counts ([`stats`]).

pub mod mode;
pub mod plan;
pub mod select;
pub mod stats;

pub use mode::Mode;
pub use plan::{keep_count, resolve, Artifacts, HeadRule, LayerPlan, MlpRule, Plan, PlanOptions, PredictorBudget};
pub use stats::{LayerStats, SparsityStats};
