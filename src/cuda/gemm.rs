//! cuBLAS for the projections of a prefill (many rows at once), where a library GEMM on the tensor cores beats a
//! GEMV. 16-bit inputs, f32 output and accumulation. Optional: without libcublas the engine runs its GEMV kernels
//! over 16-row chunks instead.

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::gpu::{GpuError, GpuResult};
use crate::source::weights::Half;

pub struct Blas {
    handle: sys::cublasHandle_t,
}

fn err(what: &str, e: blas::CublasError) -> GpuError {
    GpuError(format!("cuBLAS: {what}: {:?}", e.0))
}

impl Blas {
    pub fn new(stream: CUstream) -> GpuResult<Self> {
        if !unsafe { sys::is_culib_present() } {
            return Err(GpuError::new("libcublas was not found"));
        }
        let handle = blas::create_handle().map_err(|e| err("create handle", e))?;
        unsafe { blas::set_stream(handle, stream as sys::cudaStream_t) }.map_err(|e| err("set stream", e))?;
        Ok(Blas { handle })
    }

    /// `c[rows, n] (+)= x[rows, k] · w[n, k]^T`, row-major; `c` f32, `x` and `w` 16-bit.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(&self, dt: Half, w: CUdeviceptr, x: CUdeviceptr, c: CUdeviceptr, rows: usize, n: usize, k: usize, accumulate: bool) -> GpuResult<()> {
        let ty = match dt {
            Half::F16 => sys::cudaDataType::CUDA_R_16F,
            Half::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        };
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0f32 };
        // Column-major view: C^T[n, rows] = W[n, k] · X^T[k, rows].
        unsafe {
            blas::gemm_ex(
                self.handle,
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                ty,
                k as i32,
                x as *const c_void,
                ty,
                k as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                n as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| err("GemmEx", e))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        unsafe {
            let _ = blas::destroy_handle(self.handle);
        }
    }
}
