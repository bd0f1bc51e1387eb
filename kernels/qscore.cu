// The score pass of the `qscore` rule: s[b, n] = |silu(gate_n . x_b) * (up_n . x_b)| from low-bit copies of the
// gate and up rows (src/sparse/quant.rs): symmetric int4, groups of 32 along the input, one f16 scale per group,
// w = (code - 7) * scale with codes 0..14. Codes are packed two per byte, element 2j in the low nibble of byte j, so
// one group is one 16-byte word. One warp per neuron; input handling (16-bit rows, staged, or the f32 residual
// normalised on the fly) as in the GEMV (kernels/gemv.cu). K must be a multiple of 32. Each warp scores rows gw, gw + W, ...

// q - 7 for a 4-bit code q, exactly: the float with bits 0x4B000000 | q is 2^23 + q, and 2^23 + 7 is exact in f32.
// An OR and an add instead of an int-to-float conversion, which runs at a quarter or less of the FMA rate and was
// the score pass's bound (2 x F x d conversions a token, against F x d bytes of codes).
__device__ __forceinline__ float code_minus7(u32 q) { return __uint_as_float(0x4B000000u | q) - 8388615.0f; }

// Staged inputs are read here a group at a time: lane j reads float4s 8j .. 8j + 7 of a row, so in the natural
// layout the 32 lanes of one shared-memory load are 128 bytes apart and all hit the same four banks (32 wavefronts
// where 4 would do; ncu measured the L1/shared pipe 92% busy and the pass at 0.86 TB/s). The staged rows are
// therefore swizzled once per block (`stage_swz`, kernels/gemv.cu, whose gemv_x8<T, true> reads them): float4 f
// lives at f ^ ((f >> 3) & 7), so the eight lanes j..j+7 of any load reach eight different 16-byte bank groups. The permutation is its own inverse and stays within each aligned
// block of 8 float4s (K % 32 == 0), so it is applied in place, one chunk of the block's threads at a time.
__device__ __forceinline__ void qscore_swizzle(float* xs, int n4) { // n4 = B * K / 4 float4s, a multiple of 8
    float4* d4 = (float4*)xs;
    for (int base = 0; base < n4; base += blockDim.x) { // blockDim.x is a multiple of 8: chunks hold whole blocks
        const int f = base + threadIdx.x;
        float4 v;
        if (f < n4) v = d4[f];
        __syncthreads();
        if (f < n4) d4[stage_swz(f)] = v;
        __syncthreads();
    }
}

template <typename T, int NB>
__device__ __forceinline__ void qscore_impl(
    const uint4* __restrict__ gq,   // [N, K / 32] gate codes, one 16-byte word per group
    const uint4* __restrict__ uq,   // [N, K / 32] up codes
    const u16* __restrict__ gs,     // [N, K / 32] gate scales, f16
    const u16* __restrict__ us,     // [N, K / 32] up scales, f16
    const u16* __restrict__ x,      // [B, K] (unused when xf is given)
    float* __restrict__ out,        // [B, N] scores
    int N, int K, int B,
    const float* __restrict__ xf,   // [B, K] f32 residual stream to normalise, or null
    const u16* __restrict__ g,      // [K] norm weight (with xf)
    const u16* __restrict__ gb,     // [K] norm bias (LayerNorm) or null
    float eps, int rms, int stage) {
    extern __shared__ float4 dyn_smem[];
    float* xs = (float*)dyn_smem; // [B, K] when staged
    const int lane = threadIdx.x & 31;
    __shared__ float mean_s[NB], rstd_s[NB], red[32];
    pdl_wait();
    pdl_launch();
    gemv_prepare<T, NB>(x, xs, K, B, xf, g, gb, eps, rms, stage, mean_s, rstd_s, red);
    if (stage) qscore_swizzle(xs, min(B, NB) * (K >> 2));
    const int G = K >> 5;
    // Rows gw, gw + W, ... (the grid is sized to what the multiprocessors hold, as for the GEMV).
    const int W = gridDim.x * (blockDim.x >> 5);
    for (int row = (threadIdx.x >> 5) * gridDim.x + blockIdx.x; row < N; row += W) {
        float ag[NB], au[NB];
#pragma unroll
        for (int b = 0; b < NB; b++) { ag[b] = 0.0f; au[b] = 0.0f; }
// Four groups' loads in flight per lane at up to 4 rows; at 8-16 rows the body is long enough (and unrolling it
// would dominate the kernels' compile time).
#pragma unroll(NB <= 4 ? 4 : 1)
        for (int j = lane; j < G; j += 32) {
            const uint4 cg = ld_stream(gq + (size_t)row * G + j);
            const uint4 cu = ld_stream(uq + (size_t)row * G + j);
            const float sg = F16::load(gs[(size_t)row * G + j]);
            const float su = F16::load(us[(size_t)row * G + j]);
            const u32 wg[4] = {cg.x, cg.y, cg.z, cg.w};
            const u32 wu[4] = {cu.x, cu.y, cu.z, cu.w};
            float pg[NB], pu[NB];
#pragma unroll
            for (int b = 0; b < NB; b++) { pg[b] = 0.0f; pu[b] = 0.0f; }
#pragma unroll
            for (int c = 0; c < 4; c++) { // 8 codes per 32-bit word: elements 32j + 8c .. + 7
                float fg[8], fu[8];
#pragma unroll
                for (int e = 0; e < 8; e++) { // code - 7, exactly, without int-to-float conversions
                    fg[e] = code_minus7((wg[c] >> (4 * e)) & 15u);
                    fu[e] = code_minus7((wu[c] >> (4 * e)) & 15u);
                }
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    if (b < B) {
                        float xv8[8];
                        gemv_x8<T, true>(b, 4 * j + c, K, x, xs, xf, g, gb, mean_s, rstd_s, stage, xv8);
#pragma unroll
                        for (int e = 0; e < 8; e++) {
                            pg[b] = fmaf(fg[e], xv8[e], pg[b]);
                            pu[b] = fmaf(fu[e], xv8[e], pu[b]);
                        }
                    }
                }
            }
#pragma unroll
            for (int b = 0; b < NB; b++) {
                ag[b] = fmaf(sg, pg[b], ag[b]);
                au[b] = fmaf(su, pu[b], au[b]);
            }
        }
#pragma unroll
        for (int b = 0; b < NB; b++) {
            ag[b] = warp_sum(ag[b]);
            au[b] = warp_sum(au[b]);
        }
        if (lane == 0) {
#pragma unroll
            for (int b = 0; b < NB; b++) {
                if (b >= B) break;
                const float v = ag[b];
                out[(size_t)b * N + row] = fabsf(v / (1.0f + expf(-v)) * au[b]);
            }
        }
    }
}

#define QSCORE(TN, T, NB)                                                                                          \
    extern "C" __global__ void __launch_bounds__(512) qscore_##TN##_b##NB(                                         \
        const uint4* gq, const uint4* uq, const u16* gs, const u16* us, const u16* x, float* out, int N, int K,    \
        int B, const float* xf, const u16* g, const u16* gb, float eps, int rms, int stage) {                      \
        qscore_impl<T, NB>(gq, uq, gs, us, x, out, N, K, B, xf, g, gb, eps, rms, stage);                           \
    }
#define QSCORE_ALL(TN, T) QSCORE(TN, T, 1) QSCORE(TN, T, 2) QSCORE(TN, T, 4) QSCORE(TN, T, 8) QSCORE(TN, T, 16)

QSCORE_ALL(f16, F16)
QSCORE_ALL(bf16, BF16)
