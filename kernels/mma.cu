// Tensor-core gathers for decode at several rows (batch > 2): the products of gemv_gather_* (kernels/gemv.cu),
//   out[b, s] = epi(W[idx[s]] . x_b)   for s < cnt, b < B,
// on mma.sync m16n8k16 (16-bit inputs, f32 accumulation) instead of CUDA-core FMAs. The CUDA-core gather converts
// every weight once per input row and reads every input element from shared memory once per weight, so past ~4
// rows it is bound by shared-memory bandwidth and FMAs rather than by the weight bytes; here one instruction
// multiplies a 16 x 16 weight tile by 8 input rows.
//
// Work: a tile is 16 consecutive slots of the kept set (the last one clamped to the set and not written). A block
// of MMA_WARPS warps takes one tile at a time, each warp one slice of K (multiples of 32 columns), and the slices
// meet in shared memory, where one thread per (slot, input row) adds them and applies the epilogue. Blocks loop
// over the tiles (the grid is sized to what the GPU holds at once; the kept count is read on the device).
//
// Fragments: in each 32-column chunk of its slice, lane (g = lane / 4, q = lane % 4) loads 16 bytes of weight row
// slot g and of slot g + 8 at columns 8q .. 8q + 7, and 16 bytes of input row g (and g + 8) at the same columns.
// The chunk is two k16 steps whose k order is permuted the same way for both operands (a dot product does not
// depend on the order of its terms): step s, logical k = 2q, 2q + 1 -> physical 8q + 4s + 0, 1 and logical
// k = 2q + 8, 2q + 9 -> physical 8q + 4s + 2, 3. So every operand register is one 32-bit word of those loads, and
// each 32 bytes of a weight row are read by 4 lanes of one warp, whole sectors.
//
// With no index list the same kernel is a dense product over every row (the predictors' layers at several rows).
//
// Same function as the CUDA-core gathers up to the order of the f32 additions (products of two 16-bit values are
// exact in f32 either way). K must be a multiple of 32; the input is 16-bit rows (not the normalised-on-the-fly
// residual); the host falls back to gemv_gather_* otherwise.

#define MMA_WARPS 8

template <typename T>
__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1);
template <>
__device__ __forceinline__ void mma16816<F16>(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<BF16>(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// acc (+)= the 16 x 32 weight chunk (rows g in wa, g + 8 in wb) times the 32 x 8 input chunk xv (rows g of the tile).
template <typename T>
__device__ __forceinline__ void mma_chunk(float* acc, uint4 wa, uint4 wb, uint4 xv) {
    mma16816<T>(acc, wa.x, wb.x, wa.y, wb.y, xv.x, xv.y);
    mma16816<T>(acc, wa.z, wb.z, wa.w, wb.w, xv.z, xv.w);
}

// NT: input-row tiles of 8 (1: B <= 8, 2: B <= 16).
template <typename T, int NT, int EPI>
__device__ __forceinline__ void gemv_mma_impl(
    const u16* __restrict__ w,     // [rows of W, K]
    const u16* __restrict__ w2,    // [rows of W, K] up rows (GLU only), else unused
    const u16* __restrict__ bias,  // [rows of W] or null
    const u16* __restrict__ bias2, // [rows of W] or null (GLU only)
    const u16* __restrict__ x,     // [B, K] 16-bit input rows
    void* __restrict__ out,        // [B, N]: 16-bit (RELU, GLU, MUL; column = slot) or f32 (STORE; column = row)
    int N, int K, int B,           // N: capacity of idx and the output's row stride; B <= 8 * NT
    const int* __restrict__ idx,   // [N] weight rows to compute (written by an earlier kernel); null: every row
                                   // of W (N of them) in order, a dense product (STORE only)
    const int* __restrict__ cnt,   // [1] how many of idx are valid; output columns past it untouched
    const float* __restrict__ pre, // MUL: [B, N] f32 factors; RELU / GLU: optional 0/1 row flags [B, N]
    int early) {                   // idx / cnt complete before the previous kernel began: read before the wait
    constexpr bool glu = EPI == EPI_GLU;
    constexpr int NB = 8 * NT;
    __shared__ float red[MMA_WARPS][16][NB];
    __shared__ float red2[glu ? MMA_WARPS : 1][16][glu ? NB : 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    if (!early) pdl_wait();
    const int nrows = idx ? min(cnt[0], N) : N;
    pdl_wait();
    pdl_launch();
    const int tiles = (nrows + 15) >> 4;
    const int C = K >> 5; // 32-column chunks
    const int c0 = warp * C / MMA_WARPS, c1 = (warp + 1) * C / MMA_WARPS;
    // Input rows g and g + 8 of this lane (zeros past B).
    const uint4* xr[NT];
    bool xok[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) {
        xok[t] = 8 * t + g < B;
        xr[t] = (const uint4*)(x + (size_t)(xok[t] ? 8 * t + g : 0) * K) + q;
    }
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int sa = min(16 * tile + g, nrows - 1), sb = min(16 * tile + g + 8, nrows - 1);
        const int ra = idx ? idx[sa] : sa, rb = idx ? idx[sb] : sb;
        const uint4* wa4 = (const uint4*)(w + (size_t)ra * K) + q;
        const uint4* wb4 = (const uint4*)(w + (size_t)rb * K) + q;
        const uint4* ga4 = (const uint4*)((glu ? w2 : w) + (size_t)ra * K) + q;
        const uint4* gb4 = (const uint4*)((glu ? w2 : w) + (size_t)rb * K) + q;
        float acc[NT][4], acc2[NT][4];
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
            for (int j = 0; j < 4; j++) { acc[t][j] = 0.0f; acc2[t][j] = 0.0f; }
        constexpr int U = glu ? 2 : 4; // chunks in flight
        for (int c = c0; c < c1; c += U) {
            uint4 wa[U], wb[U], ua[U], ub[U], xv[U][NT];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const bool ok = c + u < c1;
                const int o = 4 * (c + u); // uint4s per chunk: 4
                wa[u] = ok ? ld_stream(wa4 + o) : zero;
                wb[u] = ok ? ld_stream(wb4 + o) : zero;
                if (glu) {
                    ua[u] = ok ? ld_stream(ga4 + o) : zero;
                    ub[u] = ok ? ld_stream(gb4 + o) : zero;
                }
#pragma unroll
                for (int t = 0; t < NT; t++) xv[u][t] = ok && xok[t] ? __ldg(xr[t] + o) : zero;
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    mma_chunk<T>(acc[t], wa[u], wb[u], xv[u][t]);
                    if (glu) mma_chunk<T>(acc2[t], ua[u], ub[u], xv[u][t]);
                }
            }
        }
        // C fragment: acc[t][0, 1] = (slot g, input rows 8t + 2q, + 1), acc[t][2, 3] = (slot g + 8, the same rows).
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const int b = 8 * t + 2 * q;
            red[warp][g][b] = acc[t][0];
            red[warp][g][b + 1] = acc[t][1];
            red[warp][g + 8][b] = acc[t][2];
            red[warp][g + 8][b + 1] = acc[t][3];
            if (glu) {
                red2[warp][g][b] = acc2[t][0];
                red2[warp][g][b + 1] = acc2[t][1];
                red2[warp][g + 8][b] = acc2[t][2];
                red2[warp][g + 8][b + 1] = acc2[t][3];
            }
        }
        __syncthreads();
        for (int e = threadIdx.x; e < 16 * NB; e += blockDim.x) {
            const int sl = e / NB, b = e % NB;
            const int s = 16 * tile + sl;
            if (s < nrows && b < B) {
                float v = 0.0f, u = 0.0f;
#pragma unroll
                for (int k = 0; k < MMA_WARPS; k++) {
                    v += red[k][sl][b];
                    if (glu) u += red2[k][sl][b];
                }
                const int row = idx ? idx[s] : s;
                v += bias ? T::load(bias[row]) : 0.0f;
                const size_t o = (size_t)b * N + s;
                if (EPI == EPI_STORE) ((float*)out)[(size_t)b * N + row] = v;
                if (EPI == EPI_RELU) ((u16*)out)[o] = T::store(fmaxf(v, 0.0f) * (pre ? pre[o] : 1.0f));
                if (EPI == EPI_MUL) ((u16*)out)[o] = T::store(pre[o] * v);
                if (EPI == EPI_GLU) {
                    u += bias2 ? T::load(bias2[row]) : 0.0f;
                    ((u16*)out)[o] = T::store(v / (1.0f + expf(-v)) * u * (pre ? pre[o] : 1.0f));
                }
            }
        }
        __syncthreads(); // red is rewritten by the next tile
    }
}

#define GEMV_MMA(TN, T, EN, EPI, NT)                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS) gemv_mma_##TN##_##EN##_n##NT(                   \
        const u16* w, const u16* w2, const u16* bias, const u16* bias2, const u16* x, void* out, int N, int K,    \
        int B, const int* idx, const int* cnt, const float* pre, int early) {                                     \
        gemv_mma_impl<T, NT, EPI>(w, w2, bias, bias2, x, out, N, K, B, idx, cnt, pre, early);                    \
    }
#define GEMV_MMA_EPIS(TN, T, NT)                                                                                 \
    GEMV_MMA(TN, T, relu, EPI_RELU, NT) GEMV_MMA(TN, T, glu, EPI_GLU, NT) GEMV_MMA(TN, T, store, EPI_STORE, NT)  \
    GEMV_MMA(TN, T, mul, EPI_MUL, NT)
GEMV_MMA_EPIS(f16, F16, 1)
GEMV_MMA_EPIS(f16, F16, 2)
GEMV_MMA_EPIS(bf16, BF16, 1)
GEMV_MMA_EPIS(bf16, BF16, 2)
