//! dejavu: contextual sparsity for LLM inference.
//!
//! This crate holds the library side of the `dejavu` binary: model sources and checkpoint readers, the burn
//! reference forward for OPT and Llama (with per-layer taps for later collection), generation and perplexity.
//! The CLI in `src/cli` only parses flags and calls in here.

pub mod backend;
pub mod bench;
pub mod calibrate;
pub mod collect;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decode;
pub mod error;
pub mod eval;
pub mod fixture;
pub mod launch;
pub mod model;
pub mod ppl;
pub mod predictor;
pub mod recipe;
pub mod report;
pub mod source;
pub mod sparse;
pub mod store;
pub mod text;

pub use config::{Family, ModelConfig};
pub use error::{Error, OptionError, Result};
pub use model::Model;
pub use source::ModelFiles;
