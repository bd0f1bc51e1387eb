// Matrix-vector products for decode: y[b, n] = sum_k W[n, k] * x[b, k] (+ bias[n]), for up to NB rows of x at
// once, each weight row read from memory once for all of them. One warp per output row; 16-byte loads, four in
// flight per lane. Weights `W` are row-major [N, K] (the checkpoint's [out, in]); activations `x` are [B, K] in
// the same 16-bit type; accumulation is f32. The epilogue picks what is written:
//   STORE  out f32 [B, N] = acc + bias
//   ACC    out f32 [B, N] += acc + bias            (the residual stream)
//   RELU   out 16-bit [B, N] = max(acc + bias, 0)  (OPT fc1)
//   GLU    out 16-bit [B, N] = silu(acc_gate + bias[n]) * (acc_up + bias2[n]), gate rows in W, up rows in W2 (SwiGLU)
// With `xf` given, the input is normalised on the fly instead of read from `x`: x_b = norm(xf[b, :]) * g (+ gb),
// RMSNorm (`rms`) or LayerNorm, statistics computed by each block (the norm kernel and its launch disappear).
// With `stage` set (and B * K * 4 bytes of dynamic shared memory), each block first writes its input rows to shared
// memory in f32 (normalised when `xf` is given), so the inner loop converts only the weights.

#define EPI_STORE 0
#define EPI_ACC 1
#define EPI_RELU 2
#define EPI_GLU 3

template <typename T, int NB, int EPI>
__device__ __forceinline__ void gemv_impl(
    const u16* __restrict__ w,     // [N, K]
    const u16* __restrict__ w2,    // [N, K] up rows (GLU only), else unused
    const u16* __restrict__ bias,  // [N] or null
    const u16* __restrict__ bias2, // [N] or null (GLU only)
    const u16* __restrict__ x,     // [B, K] (unused when xf is given)
    void* __restrict__ out,        // [B, N], f32 or 16-bit by EPI
    int N, int K, int B,
    const float* __restrict__ xf,  // [B, K] f32 residual stream to normalise, or null
    const u16* __restrict__ g,     // [K] norm weight (with xf)
    const u16* __restrict__ gb,    // [K] norm bias (LayerNorm) or null
    float eps, int rms, int stage) {
    extern __shared__ float4 dyn_smem[];
    float* xs = (float*)dyn_smem; // [B, K] when staged
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    __shared__ float mean_s[NB], rstd_s[NB], red[32];
    if (xf) {
        // Every thread of the block takes part (before any early exit).
        for (int b = 0; b < NB && b < B; b++) {
            const float* xr = xf + (size_t)b * K;
            float mean = 0.0f;
            if (!rms) {
                float s = 0.0f;
                for (int i = threadIdx.x; i < K; i += blockDim.x) s += xr[i];
                mean = block_sum(s, red) / K;
            }
            float ss = 0.0f;
            for (int i = threadIdx.x; i < K; i += blockDim.x) {
                const float v = xr[i] - mean;
                ss += v * v;
            }
            const float var = block_sum(ss, red) / K;
            if (threadIdx.x == 0) {
                mean_s[b] = mean;
                rstd_s[b] = rsqrtf(var + eps);
            }
        }
        __syncthreads();
    }
    if (stage) {
        for (int b = 0; b < NB && b < B; b++) {
            for (int i = threadIdx.x; i < K; i += blockDim.x) {
                float v;
                if (xf) {
                    v = (xf[(size_t)b * K + i] - mean_s[b]) * rstd_s[b] * T::load(g[i]);
                    if (gb) v += T::load(gb[i]);
                } else {
                    v = T::load(x[(size_t)b * K + i]);
                }
                xs[b * K + i] = v;
            }
        }
        __syncthreads();
    }
    if (row >= N) return;
    const bool glu = EPI == EPI_GLU;
    float acc[NB], acc2[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) { acc[b] = 0.0f; acc2[b] = 0.0f; }
    const u16* wr = w + (size_t)row * K;
    const u16* wr2 = glu ? w2 + (size_t)row * K : wr;
    if ((K & 7) == 0) {
        const int K8 = K >> 3;
        const uint4* w4 = (const uint4*)wr;
        const uint4* w24 = (const uint4*)wr2;
        const int U = 4;
        for (int base = lane; base < K8; base += 32 * U) {
            uint4 wv[U], wv2[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = base + 32 * u;
                wv[u] = i < K8 ? ld_stream(w4 + i) : make_uint4(0, 0, 0, 0);
                if (glu) wv2[u] = i < K8 ? ld_stream(w24 + i) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = base + 32 * u;
                if (i >= K8) break;
                float wf[8], wf2[8];
                unpack8<T>(wv[u], wf);
                if (glu) unpack8<T>(wv2[u], wf2);
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    if (b < B) {
                        float xv8[8];
                        if (stage) {
                            const float4 a0 = ((const float4*)(xs + b * K))[2 * i];
                            const float4 a1 = ((const float4*)(xs + b * K))[2 * i + 1];
                            xv8[0] = a0.x; xv8[1] = a0.y; xv8[2] = a0.z; xv8[3] = a0.w;
                            xv8[4] = a1.x; xv8[5] = a1.y; xv8[6] = a1.z; xv8[7] = a1.w;
                        } else if (xf) {
                            const float4* xr = (const float4*)(xf + (size_t)b * K) + 2 * i;
                            const float4 a0 = __ldg(xr), a1 = __ldg(xr + 1);
                            float gf[8], bf[8];
                            unpack8<T>(__ldg((const uint4*)g + i), gf);
                            if (gb) unpack8<T>(__ldg((const uint4*)gb + i), bf);
                            const float raw[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
                            for (int e = 0; e < 8; e++) xv8[e] = (raw[e] - mean_s[b]) * rstd_s[b] * gf[e] + (gb ? bf[e] : 0.0f);
                        } else {
                            unpack8<T>(__ldg((const uint4*)(x + (size_t)b * K) + i), xv8);
                        }
#pragma unroll
                        for (int e = 0; e < 8; e++) {
                            acc[b] = fmaf(wf[e], xv8[e], acc[b]);
                            if (glu) acc2[b] = fmaf(wf2[e], xv8[e], acc2[b]);
                        }
                    }
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            float wv = T::load(wr[k]);
            float wv2 = glu ? T::load(wr2[k]) : 0.0f;
#pragma unroll
            for (int b = 0; b < NB; b++) {
                if (b < B) {
                    float xv = stage ? xs[b * K + k] : xf ? (xf[(size_t)b * K + k] - mean_s[b]) * rstd_s[b] * T::load(g[k]) + (gb ? T::load(gb[k]) : 0.0f)
                                  : T::load(x[(size_t)b * K + k]);
                    acc[b] = fmaf(wv, xv, acc[b]);
                    if (glu) acc2[b] = fmaf(wv2, xv, acc2[b]);
                }
            }
        }
    }
#pragma unroll
    for (int b = 0; b < NB; b++) {
        acc[b] = warp_sum(acc[b]);
        if (glu) acc2[b] = warp_sum(acc2[b]);
    }
    if (lane != 0) return;
    const float bv = bias ? T::load(bias[row]) : 0.0f;
    const float bv2 = (glu && bias2) ? T::load(bias2[row]) : 0.0f;
#pragma unroll
    for (int b = 0; b < NB; b++) {
        if (b >= B) break;
        size_t o = (size_t)b * N + row;
        float v = acc[b] + bv;
        if (EPI == EPI_STORE) ((float*)out)[o] = v;
        if (EPI == EPI_ACC) ((float*)out)[o] += v;
        if (EPI == EPI_RELU) ((u16*)out)[o] = T::store(fmaxf(v, 0.0f));
        if (EPI == EPI_GLU) {
            float u = acc2[b] + bv2;
            ((u16*)out)[o] = T::store(v / (1.0f + expf(-v)) * u);
        }
    }
}

#define GEMV_KERNEL(TN, T, EN, EPI, NB)                                                                          \
    extern "C" __global__ void gemv_##TN##_##EN##_b##NB(const u16* w, const u16* w2, const u16* bias,            \
                                                        const u16* bias2, const u16* x, void* out, int N, int K, \
                                                        int B, const float* xf, const u16* g, const u16* gb,      \
                                                        float eps, int rms, int stage) {                          \
        gemv_impl<T, NB, EPI>(w, w2, bias, bias2, x, out, N, K, B, xf, g, gb, eps, rms, stage);                  \
    }
#define GEMV_NB(TN, T, EN, EPI) \
    GEMV_KERNEL(TN, T, EN, EPI, 1) GEMV_KERNEL(TN, T, EN, EPI, 2) GEMV_KERNEL(TN, T, EN, EPI, 4) \
    GEMV_KERNEL(TN, T, EN, EPI, 8) GEMV_KERNEL(TN, T, EN, EPI, 16)
#define GEMV_ALL(TN, T) \
    GEMV_NB(TN, T, store, EPI_STORE) GEMV_NB(TN, T, acc, EPI_ACC) GEMV_NB(TN, T, relu, EPI_RELU) GEMV_NB(TN, T, glu, EPI_GLU)

GEMV_ALL(f16, F16)
GEMV_ALL(bf16, BF16)
