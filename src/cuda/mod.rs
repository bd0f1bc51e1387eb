//! The CUDA decode engine (feature `cuda`): our kernels (`kernels/*.cu`, compiled by NVRTC and cached on disk),
//! cuBLAS for prefill projections, CUDA graphs for the decode step, behind the [`crate::decode::Decoder`]
//! interface. The sparse plans run in the same forward: the MLP rules (`sparse`, `select`, `predict`) and predicted
//! heads (`heads`).

pub mod bench;
pub mod check;
pub mod decoder;
pub mod engine;
pub mod gather;
pub mod gemm;
pub mod gpu;
pub mod heads;
pub mod kernels;
pub mod launch_bench;
pub mod launcher;
pub mod mlp_bench;
pub mod predict;
pub mod select;
pub mod sparse;
pub mod step_profile;
pub mod weights;

pub use decoder::{CudaDecoder, StartInfo};
pub use engine::Engine;
pub use gpu::{probe, Gpu, GpuError};
pub use crate::source::weights::Half;
pub use weights::Weights;
