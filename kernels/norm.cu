// Normalisation of the f32 residual stream, one block per row.
//   rmsnorm:   y = x / sqrt(mean(x^2) + eps) * w                 (Llama)
//   layernorm: y = (x - mean) / sqrt(var + eps) * w + b          (OPT; two passes for the variance)
// y goes out in the 16-bit type (the next projection's input) and, when `xout` is given, also in f32 (OPT's
// post-LayerNorm layers replace the residual stream with it; `xout` may equal `x`). When `xraw` is given, x itself
// is copied there (the block input the head-sparse look-ahead selects from later in the layer).

template <typename T, bool RMS>
__device__ __forceinline__ void norm_impl(
    const float* x,               // [rows, d]
    const u16* __restrict__ w,    // [d]
    const u16* __restrict__ bias, // [d] or null
    u16* __restrict__ out,        // [rows, d]
    float* xout,                  // [rows, d] or null
    float* __restrict__ xraw,     // [rows, d] or null: x copied (not with xout == x)
    int d, float eps) {
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    float mean, inv;
    row_stats(xr, d, RMS, eps, red, mean, inv);
    u16* o = out + (size_t)blockIdx.x * d;
    float* xo = xout ? xout + (size_t)blockIdx.x * d : 0;
    float* xc = xraw ? xraw + (size_t)blockIdx.x * d : 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float xi = xr[i];
        float y = (xi - mean) * inv * T::load(w[i]);
        if (bias) y += T::load(bias[i]);
        o[i] = T::store(y);
        if (xc) xc[i] = xi;
        if (xo) xo[i] = y;
    }
}

#define NORM_KERNELS(TN, T)                                                                                    \
    extern "C" __global__ void rmsnorm_##TN(const float* x, const u16* w, const u16* bias, u16* out,            \
                                            float* xout, float* xraw, int d, float eps) { PDL_ENTER                      \
        norm_impl<T, true>(x, w, bias, out, xout, xraw, d, eps);                                                \
    }                                                                                                          \
    extern "C" __global__ void layernorm_##TN(const float* x, const u16* w, const u16* bias, u16* out,          \
                                              float* xout, float* xraw, int d, float eps) { PDL_ENTER                    \
        norm_impl<T, false>(x, w, bias, out, xout, xraw, d, eps);                                               \
    }

NORM_KERNELS(f16, F16)
NORM_KERNELS(bf16, BF16)

// The same function with the row held in registers: thread t takes the 4-value groups t, t + blockDim.x, ... (NV of
// them, float4 loads), reads x once, and sums from registers; the norm's weight and bias (immutable) are read before
// waiting on the previous kernel. d must be a multiple of 4 and at most 4 * NV * blockDim.x. Block: ceil(d / 4 / NV)
// threads rounded up to 32 (at most 1024).
template <typename T>
__device__ __forceinline__ void unpack4h(uint2 v, float* f) {
    const u16 h[4] = {(u16)(v.x & 0xffffu), (u16)(v.x >> 16), (u16)(v.y & 0xffffu), (u16)(v.y >> 16)};
#pragma unroll
    for (int e = 0; e < 4; e++) f[e] = T::load(h[e]);
}

template <typename T, bool RMS, int NV>
__device__ __forceinline__ void norm4_impl(const float* x, const u16* __restrict__ w, const u16* __restrict__ bias,
                                           u16* __restrict__ out, float* xout, float* __restrict__ xraw, int d,
                                           float eps) {
    __shared__ float red[32];
    const int d4 = d >> 2;
    float wv[NV][4], bv[NV][4];
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int i4 = threadIdx.x + j * blockDim.x;
#pragma unroll
        for (int e = 0; e < 4; e++) wv[j][e] = bv[j][e] = 0.0f;
        if (i4 < d4) {
            unpack4h<T>(__ldg((const uint2*)w + i4), wv[j]);
            if (bias) unpack4h<T>(__ldg((const uint2*)bias + i4), bv[j]);
        }
    }
    pdl_wait();
    pdl_launch();
    const float4* xr = (const float4*)(x + (size_t)blockIdx.x * d);
    float4 v[NV];
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int i4 = threadIdx.x + j * blockDim.x;
        v[j] = i4 < d4 ? xr[i4] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    if (xraw) {
        float4* xc = (float4*)(xraw + (size_t)blockIdx.x * d);
#pragma unroll
        for (int j = 0; j < NV; j++) {
            const int i4 = threadIdx.x + j * blockDim.x;
            if (i4 < d4) xc[i4] = v[j];
        }
    }
    float mean = 0.0f;
    if (!RMS) {
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < NV; j++) s += (v[j].x + v[j].y) + (v[j].z + v[j].w);
        mean = block_sum(s, red) / d;
    }
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int i4 = threadIdx.x + j * blockDim.x;
        if (i4 < d4) {
            const float a = v[j].x - mean, b = v[j].y - mean, c = v[j].z - mean, e = v[j].w - mean;
            ss += (a * a + b * b) + (c * c + e * e);
        }
    }
    const float inv = rsqrtf(block_sum(ss, red) / d + eps);
    u16* o = out + (size_t)blockIdx.x * d;
    float4* xo = xout ? (float4*)(xout + (size_t)blockIdx.x * d) : 0;
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int i4 = threadIdx.x + j * blockDim.x;
        if (i4 < d4) {
            const float y0 = (v[j].x - mean) * inv * wv[j][0] + bv[j][0];
            const float y1 = (v[j].y - mean) * inv * wv[j][1] + bv[j][1];
            const float y2 = (v[j].z - mean) * inv * wv[j][2] + bv[j][2];
            const float y3 = (v[j].w - mean) * inv * wv[j][3] + bv[j][3];
            uint2 p;
            p.x = (u32)T::store(y0) | ((u32)T::store(y1) << 16);
            p.y = (u32)T::store(y2) | ((u32)T::store(y3) << 16);
            ((uint2*)o)[i4] = p;
            if (xo) xo[i4] = make_float4(y0, y1, y2, y3);
        }
    }
}

#define NORM4_KERNEL(TN, T, NV)                                                                                 \
    extern "C" __global__ void rmsnorm4_##TN##_v##NV(const float* x, const u16* w, const u16* bias, u16* out,  \
                                                     float* xout, float* xraw, int d, float eps) {             \
        norm4_impl<T, true, NV>(x, w, bias, out, xout, xraw, d, eps);                                           \
    }                                                                                                          \
    extern "C" __global__ void layernorm4_##TN##_v##NV(const float* x, const u16* w, const u16* bias, u16* out,\
                                                       float* xout, float* xraw, int d, float eps) {           \
        norm4_impl<T, false, NV>(x, w, bias, out, xout, xraw, d, eps);                                          \
    }
#define NORM4_ALL(TN, T) NORM4_KERNEL(TN, T, 1) NORM4_KERNEL(TN, T, 2) NORM4_KERNEL(TN, T, 4) NORM4_KERNEL(TN, T, 8)
NORM4_ALL(f16, F16)
NORM4_ALL(bf16, BF16)
