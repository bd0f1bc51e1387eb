// Sparse MLP, second half: the down projection (OPT fc2, Llama down) over the kept neurons only, from its transposed
// copy so that each kept neuron's weights are one contiguous row:
//   out[b, :] += bias + sum_{s < cnt} act[b, s] * wt[idx[s], :]     (`down_t_id_*`: act[b, idx[s]])
// `act` is the gather GEMV's compact output (kernels/gemv.cu, gemv_gather_*); with `idx` null the rows are taken in
// order (s itself), which is the dense product from the transposed copy. Partial sums of row chunks meet in the f32
// residual stream through vector atomic adds (sm_90; scalar adds below), so their order of addition is not fixed.
//
// Grid: (ceil(D / (8 * tc)), chunks of R <= DOWN_T_MAXR kept rows); block: tc * rg threads, tc across groups of 8
// output columns (16-byte loads), rg row groups taking every rg-th row of the chunk. D must be a multiple of 8.

__device__ __forceinline__ void red_add8(float* p, const float* v) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
                 : "memory");
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p + 4), "f"(v[4]), "f"(v[5]), "f"(v[6]),
                 "f"(v[7])
                 : "memory");
#else
#pragma unroll
    for (int e = 0; e < 8; e++) atomicAdd(p + e, v[e]);
#endif
}

// Kept rows a block takes at most (the host's `R`): their ids and activations are staged in shared memory first.
#define DOWN_T_MAXR 64

template <typename T, int NB, bool BY_ID>
__device__ __forceinline__ void down_t_impl(
    const u16* __restrict__ wt,   // [F, D] transposed down / fc2 weights
    const u16* __restrict__ bias, // [D] or null
    const u16* __restrict__ act,  // [B, lda] compact activations of the kept neurons
    int lda,
    const int* __restrict__ idx,  // [kcap] kept neuron ids, or null (row s is neuron s)
    const int* __restrict__ cnt,  // [1] valid entries of idx (<= kcap), or null (kcap)
    int kcap,
    float* __restrict__ out,      // [B, D] f32, accumulated into
    int D, int B, int R, int tc) { // BY_ID: act[b, idx[s]] (act laid out by unit id) instead of the compact act[b, s]
    __shared__ int sidx[DOWN_T_MAXR];
    __shared__ float sact[NB][DOWN_T_MAXR];
    pdl_wait();
    pdl_launch();
    const int n = cnt ? min(cnt[0], kcap) : kcap;
    const int r0 = blockIdx.y * R, nr = max(0, min(n, r0 + R) - r0);
    if (nr == 0 && !(blockIdx.y == 0 && bias)) return; // uniform across the block
    // The block's kept ids and their activations, one round trip for all (the weight loads below need the ids).
    for (int i = threadIdx.x; i < nr; i += blockDim.x) {
        const int j = idx ? idx[r0 + i] : r0 + i;
        sidx[i] = j;
#pragma unroll
        for (int b = 0; b < NB; b++)
            if (b < B) sact[b][i] = T::load(act[(size_t)b * lda + (BY_ID ? j : r0 + i)]);
    }
    __syncthreads();
    const int tx = threadIdx.x % tc, ty = threadIdx.x / tc, rg = blockDim.x / tc;
    const int c8 = blockIdx.x * tc + tx;
    if (c8 * 8 >= D || ty >= rg) return;
    float acc[NB][8];
#pragma unroll
    for (int b = 0; b < NB; b++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[b][e] = 0.0f;
    const int ld8 = D >> 3;
    const uint4* base = (const uint4*)wt + c8;
    constexpr int U = NB <= 4 ? 8 : 4; // rows in flight per thread (all of a block's rows at most R / rg)
    for (int s0 = ty; s0 < nr; s0 += U * rg) {
        uint4 wv[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int s = s0 + u * rg;
            if (s < nr) wv[u] = ld_stream(base + (size_t)sidx[s] * ld8);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int s = s0 + u * rg;
            if (s < nr) {
                float wf[8];
                unpack8<T>(wv[u], wf);
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    if (b < B) {
                        const float a = sact[b][s];
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[b][e] = fmaf(a, wf[e], acc[b][e]);
                    }
                }
            }
        }
    }
    if (bias && blockIdx.y == 0 && ty == 0) {
        float bf[8];
        unpack8<T>(__ldg((const uint4*)bias + c8), bf);
#pragma unroll
        for (int b = 0; b < NB; b++)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[b][e] += bf[e];
    }
    if (ty >= nr && ty != 0) return; // a row group without rows adds nothing (ty 0 may carry the bias)
#pragma unroll
    for (int b = 0; b < NB; b++)
        if (b < B) red_add8(out + (size_t)b * D + c8 * 8, acc[b]);
}

#define DOWN_T(TN, T, NB)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) down_t_##TN##_b##NB(                                         \
        const u16* wt, const u16* bias, const u16* act, int lda, const int* idx, const int* cnt, int kcap,         \
        float* out, int D, int B, int R, int tc) {                                                                 \
        down_t_impl<T, NB, false>(wt, bias, act, lda, idx, cnt, kcap, out, D, B, R, tc);                           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) down_t_id_##TN##_b##NB(                                      \
        const u16* wt, const u16* bias, const u16* act, int lda, const int* idx, const int* cnt, int kcap,         \
        float* out, int D, int B, int R, int tc) {                                                                 \
        down_t_impl<T, NB, true>(wt, bias, act, lda, idx, cnt, kcap, out, D, B, R, tc);                            \
    }
#define DOWN_T_ALL(TN, T) DOWN_T(TN, T, 1) DOWN_T(TN, T, 2) DOWN_T(TN, T, 4) DOWN_T(TN, T, 8) DOWN_T(TN, T, 16)

DOWN_T_ALL(f16, F16)
DOWN_T_ALL(bf16, BF16)

// out [C, R] = in [R, C] transposed (16-bit): the down / fc2 weights' transposed copy for down_t, made once at load.
// Grid (ceil(C / 32), ceil(R / 32)); block 256 threads (a 32 x 8 sweep of a 32 x 32 tile).
extern "C" __global__ void transpose16(const u16* __restrict__ in, // [R, C]
                                       u16* __restrict__ out,      // [C, R]
                                       int R, int C) {
    PDL_ENTER
    __shared__ u16 tile[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    int x = blockIdx.x * 32 + tx, y = blockIdx.y * 32 + ty;
    for (int j = 0; j < 32; j += 8)
        if (x < C && y + j < R) tile[ty + j][tx] = in[(size_t)(y + j) * C + x];
    __syncthreads();
    x = blockIdx.y * 32 + tx;
    y = blockIdx.x * 32 + ty;
    for (int j = 0; j < 32; j += 8)
        if (x < R && y + j < C) out[(size_t)(y + j) * R + x] = tile[tx][ty + j];
}
