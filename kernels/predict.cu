// The trained predictors' first layer (src/cuda/predict.rs): the hidden rows of a low-rank predictor,
//   h[b, n] = T( sum_k W1[n, k] * xn[b, k] + b1[n] ),   xn[b, :] = x[b, :] / sqrt(mean(x[b, :]^2) + eps)
// (RMS normalisation with a unit weight; T the engine's 16-bit type, the rounding the second layer reads). The
// rank is small (N = 128-1024) and K the model's width, so one warp a row would leave most of the GPU idle and each
// warp a long serial walk along its row: here S warps share a row, each over one contiguous slice of K, with all
// its weights requested before waiting on the previous kernel, and the slices' partial sums are added in slice
// order.
// Grid: ceil(N / RPB) blocks; block: RPB * S warps (warp w: row blockIdx.x * RPB + w / S, slice w % S); dynamic
// shared memory B * K * 4 bytes. K % 8 == 0, K / 8 / S <= 32 * PL (the weights a lane holds), B <= NB.
#define PRED_PL 8

template <typename T, int NB>
__device__ __forceinline__ void pred_hidden_impl(const u16* __restrict__ w,    // [N, K]
                                                 const u16* __restrict__ bias, // [N] or null
                                                 const float* __restrict__ x,  // [B, K] f32 residual rows
                                                 u16* __restrict__ out,        // [B, N] out
                                                 int N, int K, int B, int S, float eps) {
    extern __shared__ float4 dyn_smem[];
    float* xs = (float*)dyn_smem; // [B, K], normalised
    __shared__ float red[32], rstd_s[NB];
    __shared__ float partial[32][NB]; // [warp][row b]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = warp / S, s = warp % S;
    const int n = blockIdx.x * (int)((blockDim.x >> 5) / S) + r;
    const int K8 = K >> 3;
    const int i0 = (int)((long)K8 * s / S), i1 = (int)((long)K8 * (s + 1) / S);
    uint4 wv[PRED_PL];
#pragma unroll
    for (int u = 0; u < PRED_PL; u++) {
        const int i = i0 + lane + 32 * u;
        wv[u] = (n < N && i < i1) ? ld_stream_first((const uint4*)(w + (size_t)n * K) + i) : make_uint4(0, 0, 0, 0);
    }
    pdl_wait();
    pdl_launch();
    const int K4 = K >> 2;
    for (int b = 0; b < NB && b < B; b++) {
        const float4* s4 = (const float4*)(x + (size_t)b * K);
        float4* d4 = (float4*)(xs + b * K);
        float ss = 0.0f;
#pragma unroll 4
        for (int i = threadIdx.x; i < K4; i += blockDim.x) {
            const float4 v = s4[i];
            d4[i] = v;
            ss += (v.x * v.x + v.y * v.y) + (v.z * v.z + v.w * v.w);
        }
        const float rstd = rsqrtf(block_sum(ss, red) / K + eps);
        if (threadIdx.x == 0) rstd_s[b] = rstd;
    }
    __syncthreads();
    float acc[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) acc[b] = 0.0f;
#pragma unroll
    for (int u = 0; u < PRED_PL; u++) {
        const int i = i0 + lane + 32 * u;
        if (i < i1) {
            float wf[8];
            unpack8<T>(wv[u], wf);
#pragma unroll
            for (int b = 0; b < NB; b++) {
                if (b < B) {
                    const float4 a = ((const float4*)(xs + b * K))[2 * i], c = ((const float4*)(xs + b * K))[2 * i + 1];
                    const float rs = rstd_s[b];
                    acc[b] = fmaf(wf[0], a.x * rs, acc[b]);
                    acc[b] = fmaf(wf[1], a.y * rs, acc[b]);
                    acc[b] = fmaf(wf[2], a.z * rs, acc[b]);
                    acc[b] = fmaf(wf[3], a.w * rs, acc[b]);
                    acc[b] = fmaf(wf[4], c.x * rs, acc[b]);
                    acc[b] = fmaf(wf[5], c.y * rs, acc[b]);
                    acc[b] = fmaf(wf[6], c.z * rs, acc[b]);
                    acc[b] = fmaf(wf[7], c.w * rs, acc[b]);
                }
            }
        }
    }
#pragma unroll
    for (int b = 0; b < NB; b++) {
        const float v = warp_sum(acc[b]);
        if (lane == 0) partial[warp][b] = v;
    }
    __syncthreads();
    if (s == 0 && lane < NB && lane < B && n < N) {
        float v = 0.0f;
        for (int j = 0; j < S; j++) v += partial[warp + j][lane];
        if (bias) v += T::load(bias[n]);
        out[(size_t)lane * N + n] = T::store(v);
    }
}

#define PRED_HIDDEN(TN, T, NB)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) pred_hidden_##TN##_b##NB(                                     \
        const u16* w, const u16* bias, const float* x, u16* out, int N, int K, int B, int S, float eps) {           \
        pred_hidden_impl<T, NB>(w, bias, x, out, N, K, B, S, eps);                                                  \
    }
PRED_HIDDEN(f16, F16, 1)
PRED_HIDDEN(f16, F16, 2)
PRED_HIDDEN(f16, F16, 4)
PRED_HIDDEN(bf16, BF16, 1)
PRED_HIDDEN(bf16, BF16, 2)
PRED_HIDDEN(bf16, BF16, 4)
