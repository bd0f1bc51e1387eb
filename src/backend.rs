//! Choosing the burn backend at run time: `--device cpu|wgpu|cuda`. Model code is generic; this module picks
//! the concrete backend once and calls back into generic code.

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
    /// burn CUDA (needs a build with `--features cuda` and an NVIDIA driver).
    Cuda,
}

/// Generic code to run on whichever backend was chosen.
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<Self::Output>;
}

/// The default CPU backend. burn-flex's gemm ran decode-shaped matmuls (1×576×1536) 47× faster than
/// NdArray's matrixmultiply path on the 2-core dev box, and 512-row scoring matmuls 1.6× faster.
pub type CpuBackend = burn::backend::Flex;

/// Run `task` on the backend `kind` names, or explain why that backend is not available.
pub fn dispatch<T: BackendTask>(kind: DeviceKind, task: T) -> anyhow::Result<T::Output> {
    match kind {
        DeviceKind::Cpu => task.run::<CpuBackend>(Default::default()),
        DeviceKind::Ndarray => task.run::<burn::backend::NdArray<f32>>(Default::default()),
        DeviceKind::Wgpu => run_wgpu(task),
        DeviceKind::Cuda => run_cuda(task),
    }
}

#[cfg(feature = "wgpu")]
fn run_wgpu<T: BackendTask>(task: T) -> anyhow::Result<T::Output> {
    task.run::<burn::backend::Wgpu>(Default::default())
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu<T: BackendTask>(_task: T) -> anyhow::Result<T::Output> {
    anyhow::bail!("--device wgpu: this binary was built without the `wgpu` feature (rebuild with `cargo build --release --features wgpu`)")
}

#[cfg(feature = "cuda")]
fn run_cuda<T: BackendTask>(task: T) -> anyhow::Result<T::Output> {
    cuda_available()?;
    task.run::<burn::backend::Cuda>(Default::default())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<T: BackendTask>(_task: T) -> anyhow::Result<T::Output> {
    anyhow::bail!("--device cuda: this binary was built without the `cuda` feature (rebuild with `cargo build --release --features cuda`)")
}

/// burn-cuda panics inside its device thread when the driver is missing, so check for the libraries first.
#[cfg(feature = "cuda")]
pub fn cuda_available() -> anyhow::Result<()> {
    // SAFETY: these only try to dlopen the libraries and report whether that worked.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver {
        anyhow::bail!("--device cuda: the CUDA driver library (libcuda.so) was not found on this machine");
    }
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if !nvrtc {
        anyhow::bail!("--device cuda: the NVRTC library (libnvrtc.so) was not found on this machine");
    }
    Ok(())
}
