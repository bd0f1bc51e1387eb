// Sparse MLP, second half: the down projection (OPT fc2, Llama down) over the kept neurons only, from its transposed
// copy so that each kept neuron's weights are one contiguous row:
//   out[b, :] += bias + sum_{s < cnt} act[b, s] * wt[idx[s], :]     (`down_t_id_*`: act[b, idx[s]])
// `act` is the gather GEMV's compact output (kernels/gemv.cu, gemv_gather_*); with `idx` null the rows are taken in
// order (s itself), which is the dense product from the transposed copy. Partial sums of row chunks meet in the f32
// residual stream through vector atomic adds (sm_90; scalar adds below), so their order of addition is not fixed.
//
// Grid: (ceil(D / (8 * tc)), chunks of R <= DOWN_T_MAXR kept rows); block: tc * rg = 256 threads, tc across groups
// of 8 output columns (16-byte loads), rg row groups taking every rg-th row of the chunk. The row groups' partial sums
// meet in shared memory first, so a block issues one vector atomic per 8 columns (a chunk of R rows costs D atomic
// adds into the residual, against the 2 R D bytes of weights it reads). D must be a multiple of 8.

// Kept rows a block takes at most (the host's `R`): their ids and activations are staged in shared memory first.
#define DOWN_T_MAXR 128

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
    int D, int B, int R, int tc,  // BY_ID: act[b, idx[s]] (act laid out by unit id) instead of the compact act[b, s]
    int early) {                  // idx / cnt were complete before the previous kernel began: they and the first
                                  // weights load before the wait (act, the previous kernel's output, after it)
    __shared__ int sidx[DOWN_T_MAXR];
    __shared__ float sact[NB][DOWN_T_MAXR];
    __shared__ float4 sred[256 * 2]; // row groups 1.. park their 8 partial sums here for row group 0
    if (!early) pdl_wait();
    pdl_launch();
    const int n = cnt ? min(cnt[0], kcap) : kcap;
    const int r0 = blockIdx.y * R, nr = max(0, min(n, r0 + R) - r0);
    if (nr == 0 && !(blockIdx.y == 0 && bias)) return; // uniform across the block
    for (int i = threadIdx.x; i < nr; i += blockDim.x) sidx[i] = idx ? idx[r0 + i] : r0 + i;
    __syncthreads();
    const int tx = threadIdx.x % tc, ty = threadIdx.x / tc, rg = blockDim.x / tc;
    const int c8 = blockIdx.x * tc + tx;
    const bool live = c8 * 8 < D; // no early return: the row groups meet at barriers below
    const int ld8 = D >> 3;
    const uint4* base = (const uint4*)wt + c8;
    constexpr int U = NB <= 4 ? 8 : 4; // rows in flight per thread
    // The first U rows' weights are requested before the activations (and, when `early`, before the wait).
    uint4 wv[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int s = ty + u * rg;
        wv[u] = (live && s < nr) ? ld_stream_first(base + (size_t)sidx[s] * ld8) : make_uint4(0, 0, 0, 0);
    }
    if (early) pdl_wait();
    // The block's activations, one round trip for all.
    for (int i = threadIdx.x; i < nr; i += blockDim.x) {
#pragma unroll
        for (int b = 0; b < NB; b++)
            if (b < B) sact[b][i] = T::load(act[(size_t)b * lda + (BY_ID ? sidx[i] : r0 + i)]);
    }
    __syncthreads();
    float acc[NB][8];
#pragma unroll
    for (int b = 0; b < NB; b++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[b][e] = 0.0f;
    for (int s0 = ty; live && s0 < nr; s0 += U * rg) {
        uint4 cur[U];
#pragma unroll
        for (int u = 0; u < U; u++) cur[u] = wv[u];
        // The next U rows' loads go out before this batch is reduced.
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int s = s0 + (U + u) * rg;
            if (s < nr) wv[u] = ld_stream(base + (size_t)sidx[s] * ld8);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int s = s0 + u * rg;
            if (s < nr) {
                float wf[8];
                unpack8<T>(cur[u], wf);
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
    if (live && bias && blockIdx.y == 0 && ty == 0) {
        float bf[8];
        unpack8<T>(__ldg((const uint4*)bias + c8), bf);
#pragma unroll
        for (int b = 0; b < NB; b++)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[b][e] += bf[e];
    }
    // Row groups 1.. hand their sums to row group 0 through shared memory (in row-group order: a fixed order of
    // addition inside the block), one batch row at a time; row group 0 adds them into the residual.
    const int groups = min(rg, max(nr, 1)); // row groups that took a row (or group 0 alone, for the bias)
#pragma unroll
    for (int b = 0; b < NB; b++) {
        if (b >= B) break; // uniform
        if (groups > 1) {
            if (ty > 0 && ty < groups) {
                sred[2 * threadIdx.x] = make_float4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
                sred[2 * threadIdx.x + 1] = make_float4(acc[b][4], acc[b][5], acc[b][6], acc[b][7]);
            }
            __syncthreads();
            if (ty == 0) {
                for (int g = 1; g < groups; g++) {
                    const float4 lo = sred[2 * (g * tc + tx)], hi = sred[2 * (g * tc + tx) + 1];
                    acc[b][0] += lo.x; acc[b][1] += lo.y; acc[b][2] += lo.z; acc[b][3] += lo.w;
                    acc[b][4] += hi.x; acc[b][5] += hi.y; acc[b][6] += hi.z; acc[b][7] += hi.w;
                }
            }
            __syncthreads();
        }
        if (ty == 0 && live) red_add8(out + (size_t)b * D + c8 * 8, acc[b]);
    }
}

#define DOWN_T(TN, T, NB)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) down_t_##TN##_b##NB(                                         \
        const u16* wt, const u16* bias, const u16* act, int lda, const int* idx, const int* cnt, int kcap,         \
        float* out, int D, int B, int R, int tc, int early) {                                                      \
        down_t_impl<T, NB, false>(wt, bias, act, lda, idx, cnt, kcap, out, D, B, R, tc, early);                    \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) down_t_id_##TN##_b##NB(                                      \
        const u16* wt, const u16* bias, const u16* act, int lda, const int* idx, const int* cnt, int kcap,         \
        float* out, int D, int B, int R, int tc, int early) {                                                      \
        down_t_impl<T, NB, true>(wt, bias, act, lda, idx, cnt, kcap, out, D, B, R, tc, early);                     \
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
