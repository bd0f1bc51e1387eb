// Normalisation of the f32 residual stream, one block per row.
//   rmsnorm:   y = x / sqrt(mean(x^2) + eps) * w                 (Llama)
//   layernorm: y = (x - mean) / sqrt(var + eps) * w + b          (OPT; two passes for the variance)
// y goes out in the 16-bit type (the next projection's input) and, when `xout` is given, also in f32 (OPT's
// post-LayerNorm layers replace the residual stream with it; `xout` may equal `x`).

template <typename T, bool RMS>
__device__ __forceinline__ void norm_impl(
    const float* x,               // [rows, d]
    const u16* __restrict__ w,    // [d]
    const u16* __restrict__ bias, // [d] or null
    u16* __restrict__ out,        // [rows, d]
    float* xout,                  // [rows, d] or null
    int d, float eps) {
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    float mean, inv;
    row_stats(xr, d, RMS, eps, red, mean, inv);
    u16* o = out + (size_t)blockIdx.x * d;
    float* xo = xout ? xout + (size_t)blockIdx.x * d : 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float y = (xr[i] - mean) * inv * T::load(w[i]);
        if (bias) y += T::load(bias[i]);
        o[i] = T::store(y);
        if (xo) xo[i] = y;
    }
}

#define NORM_KERNELS(TN, T)                                                                                    \
    extern "C" __global__ void rmsnorm_##TN(const float* x, const u16* w, const u16* bias, u16* out,            \
                                            float* xout, int d, float eps) { PDL_ENTER                                   \
        norm_impl<T, true>(x, w, bias, out, xout, d, eps);                                                      \
    }                                                                                                          \
    extern "C" __global__ void layernorm_##TN(const float* x, const u16* w, const u16* bias, u16* out,          \
                                              float* xout, int d, float eps) { PDL_ENTER                                 \
        norm_impl<T, false>(x, w, bias, out, xout, d, eps);                                                     \
    }

NORM_KERNELS(f16, F16)
NORM_KERNELS(bf16, BF16)
