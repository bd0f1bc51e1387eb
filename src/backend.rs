//! Choosing the burn backend at run time: `--device cpu|ndarray|wgpu|cuda|burn-cuda`. Model code is generic;
//! this module picks the concrete backend once and calls back into generic code.

use burn::tensor::backend::Backend;

/// Where the reference forward runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// burn Flex on the CPU (always available; gemm-based, multithreaded).
    Cpu,
    /// burn NdArray on the CPU (the older CPU backend, kept for comparison).
    Ndarray,
    /// burn Wgpu (needs a build with `--features wgpu`).
    Wgpu,
    /// `generate`, `ppl`, `eval`: dejavu's CUDA engine; `collect`, `train-predictors`, `calibrate`: burn CUDA
    /// (needs a build with `--features cuda` and an NVIDIA driver).
    Cuda,
    /// burn CUDA for every command: the reference forward on the GPU, with every mode (those the engine refuses
    /// too); for sweeps of the reference path on a GPU box (needs `--features cuda` and an NVIDIA driver).
    #[value(name = "burn-cuda")]
    #[serde(rename = "burn-cuda")]
    BurnCuda,
}

/// Generic code to run on whichever backend was chosen.
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<Self::Output>;
}

/// The default CPU backend. burn-flex's gemm ran decode-shaped matmuls (1×576×1536) 47× faster than
/// NdArray's matrixmultiply path on the 2-core dev box, and 512-row scoring matmuls 1.6× faster.
pub type CpuBackend = burn::backend::Flex;

impl DeviceKind {
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Ndarray => "ndarray",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::BurnCuda => "burn-cuda",
        }
    }
}

/// Whether this binary and machine can run `kind`; the error says what is missing.
pub fn check(kind: DeviceKind) -> anyhow::Result<()> {
    match kind {
        DeviceKind::Cpu | DeviceKind::Ndarray => Ok(()),
        DeviceKind::Wgpu if cfg!(feature = "wgpu") => Ok(()),
        DeviceKind::Wgpu => anyhow::bail!("this binary was built without the `wgpu` feature (rebuild with `cargo build --release --features wgpu`)"),
        DeviceKind::Cuda | DeviceKind::BurnCuda => cuda_available(),
    }
}

/// Run `task` on the backend `kind` names, or explain why that backend is not available.
pub fn dispatch<T: BackendTask>(kind: DeviceKind, task: T) -> anyhow::Result<T::Output> {
    check(kind).map_err(|e| anyhow::anyhow!("device `{}`: {e:#}", kind.name()))?;
    match kind {
        DeviceKind::Cpu => task.run::<CpuBackend>(Default::default()),
        DeviceKind::Ndarray => task.run::<burn::backend::NdArray<f32>>(Default::default()),
        DeviceKind::Wgpu => run_wgpu(task),
        DeviceKind::Cuda | DeviceKind::BurnCuda => run_cuda(task),
    }
}

#[cfg(feature = "wgpu")]
fn run_wgpu<T: BackendTask>(task: T) -> anyhow::Result<T::Output> {
    task.run::<burn::backend::Wgpu>(Default::default())
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu<T: BackendTask>(_task: T) -> anyhow::Result<T::Output> {
    unreachable!("`check` refuses wgpu in a build without the feature")
}

#[cfg(feature = "cuda")]
fn run_cuda<T: BackendTask>(task: T) -> anyhow::Result<T::Output> {
    task.run::<burn::backend::Cuda>(Default::default())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<T: BackendTask>(_task: T) -> anyhow::Result<T::Output> {
    unreachable!("`check` refuses cuda in a build without the feature")
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_available() -> anyhow::Result<()> {
    anyhow::bail!("this binary was built without the `cuda` feature (rebuild with `cargo build --release --features cuda`)")
}

/// burn-cuda panics inside its device thread when the driver is missing, so check for the libraries first.
#[cfg(feature = "cuda")]
pub fn cuda_available() -> anyhow::Result<()> {
    // SAFETY: these only try to dlopen the libraries and report whether that worked.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver {
        anyhow::bail!("the CUDA driver library (libcuda.so) was not found on this machine");
    }
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if !nvrtc {
        anyhow::bail!("the NVRTC library (libnvrtc.so) was not found on this machine");
    }
    Ok(())
}
