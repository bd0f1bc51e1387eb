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

// One warp's C fragments of a tile (NT tiles of 8 input rows) into its slice of `red` [MMA_WARPS][16][8 NT]:
// acc[t][0, 1] = (slot g, input rows 8t + 2q, + 1), acc[t][2, 3] = (slot g + 8, the same rows).
template <int NT>
__device__ __forceinline__ void frag_to_red(float (*red)[8 * NT], const float (*acc)[4], int g, int q) {
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const int b = 8 * t + 2 * q;
        red[g][b] = acc[t][0];
        red[g][b + 1] = acc[t][1];
        red[g + 8][b] = acc[t][2];
        red[g + 8][b + 1] = acc[t][3];
    }
}

// The block's sums of slot `sl`, input row `b`: the MMA_WARPS slices added in warp order.
template <int NB>
__device__ __forceinline__ float red_sum(const float (*red)[16][NB], int sl, int b) {
    float v = 0.0f;
#pragma unroll
    for (int k = 0; k < MMA_WARPS; k++) v += red[k][sl][b];
    return v;
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
        constexpr int U = 4; // chunks in flight
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
        frag_to_red<NT>(red[warp], acc, g, q);
        if constexpr (glu) frag_to_red<NT>(red2[warp], acc2, g, q);
        __syncthreads();
        for (int e = threadIdx.x; e < 16 * NB; e += blockDim.x) {
            const int sl = e / NB, b = e % NB;
            const int s = 16 * tile + sl;
            if (s < nrows && b < B) {
                float v = red_sum<NB>(red, sl, b), u = 0.0f;
                if constexpr (glu) u = red_sum<NB>(red2, sl, b);
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

// The down projection over the kept neurons (down_t_*, kernels/sparse.cu, same arguments and semantics) on the
// tensor cores, for 3-16 rows:
//   out[b, :] += bias + sum_{s < cnt} act[b, s] * wt[idx[s], :]     (BY_ID: act[b, idx[s]])
// as C[b, col] = A[b, s] B[s, col] with m16 = the (up to 16) input rows, k16 = 16 kept neurons, n8 = 8 columns.
// The weights' rows are the k dimension, so a step's 16 rows x 64 columns go to the warp's ring in shared memory
// (cp.async, DM_STAGES steps in flight, 16-byte chunks XOR-swizzled by row against bank conflicts) and
// ldmatrix.trans makes the B fragments. Grid: (D / 64 column tiles, splits of the kept set); DM_WARPS warps a
// block take the split's steps in turn; their sums meet in shared memory and go into `out` with vector atomics
// (one a block per 8 columns and row), so the order of addition is not fixed. D must be a multiple of 64.
#define DM_WARPS 4
#define DM_STAGES 4

__device__ __forceinline__ void cp_async16z(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

template <typename T, bool BY_ID>
__device__ __forceinline__ void down_mma_impl(
    const u16* __restrict__ wt,   // [F, D] transposed down / fc2 weights
    const u16* __restrict__ bias, // [D] or null
    const u16* __restrict__ act,  // [B, lda] compact activations of the kept neurons (BY_ID: by neuron id)
    int lda,
    const int* __restrict__ idx,  // [kcap] kept neuron ids, or null (row s is neuron s)
    const int* __restrict__ cnt,  // [1] valid entries of idx (<= kcap), or null (kcap)
    int kcap,
    float* __restrict__ out,      // [B, D] f32, accumulated into
    int D, int B,                 // B <= 16
    int early) {                  // idx / cnt complete before the previous kernel began: read before the wait
    __shared__ __align__(128) u16 ring[DM_WARPS][DM_STAGES][16][64];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    if (!early) pdl_wait();
    const int n = cnt ? min(cnt[0], kcap) : kcap;
    // This block's split of the kept set, in whole steps of 16.
    const int steps_all = (n + 15) >> 4;
    const int per = (steps_all + gridDim.y - 1) / gridDim.y;
    const int st0 = blockIdx.y * per, st1 = min(steps_all, st0 + per);
    const int col0 = blockIdx.x * 64;
    // The warp's steps: st0 + warp, + DM_WARPS, ...
    const int mine = st1 > st0 + warp ? (st1 - st0 - warp + DM_WARPS - 1) / DM_WARPS : 0;
    const unsigned rbase = smem_addr(&ring[warp][0][0][0]);
    auto issue = [&](int i) { // step i of this warp into stage i % DM_STAGES
        if (i < mine) {
            const int k0 = 16 * (st0 + warp + i * DM_WARPS);
            const int stg = i % DM_STAGES;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int c = lane + 32 * j, r = c >> 3, p = c & 7;
                const int s = k0 + r;
                const bool ok = s < n;
                const int row = ok ? (idx ? idx[s] : s) : 0;
                const u16* src = wt + (size_t)row * D + col0 + 8 * p;
                cp_async16z(rbase + (unsigned)(((stg * 16 + r) * 64 + 8 * (p ^ (r & 7))) * 2), src, ok ? 16 : 0);
            }
        }
        cp_async_commit(); // empty groups keep the wait count uniform
    };
#pragma unroll
    for (int i = 0; i < DM_STAGES - 1; i++) issue(i);
    pdl_wait();
    pdl_launch();
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
    const bool hi = g + 8 < B, lo = g < B;
    const u16* arow_lo = act + (size_t)(lo ? g : 0) * lda;
    const u16* arow_hi = act + (size_t)(hi ? g + 8 : 0) * lda;
    for (int i = 0; i < mine; i++) {
        issue(i + DM_STAGES - 1);
        // A fragment: rows g, g + 8 (input rows), k = 2q, 2q + 1, 2q + 8, 2q + 9 of this step (zero past n).
        const int k0 = 16 * (st0 + warp + i * DM_WARPS);
        u32 a[4];
#pragma unroll
        for (int h = 0; h < 2; h++) { // h: k + 8h
            const int s = k0 + 2 * q + 8 * h;
            const bool ok0 = s < n, ok1 = s + 1 < n;
            const int c0 = BY_ID ? (ok0 ? idx[s] : 0) : s, c1 = BY_ID ? (ok1 ? idx[s + 1] : 0) : s + 1;
            const u32 l0 = lo && ok0 ? arow_lo[c0] : 0u, l1 = lo && ok1 ? arow_lo[c1] : 0u;
            const u32 h0 = hi && ok0 ? arow_hi[c0] : 0u, h1 = hi && ok1 ? arow_hi[c1] : 0u;
            a[2 * h] = l0 | (l1 << 16);
            a[2 * h + 1] = h0 | (h1 << 16);
        }
        asm volatile("cp.async.wait_group %0;" ::"n"(DM_STAGES - 1) : "memory");
        __syncwarp();
        const int stg = i % DM_STAGES;
#pragma unroll
        for (int jj = 0; jj < 4; jj++) { // n-tiles 2jj, 2jj + 1
            const int mat = lane >> 3, r = (mat & 1) * 8 + (lane & 7), ch = 2 * jj + (mat >> 1);
            const unsigned addr = rbase + (unsigned)(((stg * 16 + r) * 64 + 8 * (ch ^ (r & 7))) * 2);
            u32 b0, b1, b2, b3;
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                         : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                         : "r"(addr));
            mma16816<T>(acc[2 * jj], a[0], a[1], a[2], a[3], b0, b1);
            mma16816<T>(acc[2 * jj + 1], a[0], a[1], a[2], a[3], b2, b3);
        }
        __syncwarp(); // every lane has read this stage before it is refilled
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    // The warps' sums meet in shared memory (the ring, no longer needed): red[w][b][col].
    float* red = (float*)&ring[0][0][0][0];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int c = 8 * j + 2 * q;
        red[(warp * 16 + g) * 64 + c] = acc[j][0];
        red[(warp * 16 + g) * 64 + c + 1] = acc[j][1];
        red[(warp * 16 + g + 8) * 64 + c] = acc[j][2];
        red[(warp * 16 + g + 8) * 64 + c + 1] = acc[j][3];
    }
    __syncthreads();
    // 128 threads: input row b = t / 8, columns 8 (t % 8) .. + 7.
    const int b = threadIdx.x >> 3, c8 = threadIdx.x & 7;
    if (b < B && (st1 > st0 || (bias && blockIdx.y == 0))) { // blocks with no rows add only the bias
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float sum = 0.0f;
#pragma unroll
            for (int w = 0; w < DM_WARPS; w++) sum += red[(w * 16 + b) * 64 + 8 * c8 + e];
            v[e] = sum;
        }
        if (bias && blockIdx.y == 0) {
            float bf[8];
            unpack8<T>(__ldg((const uint4*)(bias + col0) + c8), bf);
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] += bf[e];
        }
        red_add8(out + (size_t)b * D + col0 + 8 * c8, v);
    }
}

#define DOWN_MMA(TN, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * DM_WARPS) down_mma_##TN(                                  \
        const u16* wt, const u16* bias, const u16* act, int lda, const int* idx, const int* cnt, int kcap,         \
        float* out, int D, int B, int early) {                                                                    \
        down_mma_impl<T, false>(wt, bias, act, lda, idx, cnt, kcap, out, D, B, early);                           \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * DM_WARPS) down_mma_id_##TN(                               \
        const u16* wt, const u16* bias, const u16* act, int lda, const int* idx, const int* cnt, int kcap,         \
        float* out, int D, int B, int early) {                                                                    \
        down_mma_impl<T, true>(wt, bias, act, lda, idx, cnt, kcap, out, D, B, early);                            \
    }
DOWN_MMA(f16, F16)
DOWN_MMA(bf16, BF16)

// The `qscore` rule's score pass (qscore_*, kernels/qscore.cu, same copies and result) on the tensor cores for 3-16
// rows: s[b, n] = |silu(gate_n . x_b) * (up_n . x_b)|, each group of 32 inputs a sum of (code - 7) x scaled by its
// f16 scale. A warp takes 16 neurons and a slice of the groups; per group, lane (g, q) holds word q of the group's
// codes (elements 8q .. 8q + 7) for neurons g and g + 8 of both matrices, decoded exactly into 16-bit pairs
// (code - 7 is an integer in [-7, 8]: the 16-bit float with the code in its low mantissa bits, minus 1031 (f16) or
// 135 (bf16)), and the group's two k16 steps use the gathers' permuted k order against 16 bytes of each input row.
// The group's sums are scaled per neuron and added into f32 accumulators; the block's slices meet in shared memory.
// K must be a multiple of 32; 16-bit input rows only.
template <typename T>
__device__ __forceinline__ u32 code_pair(u32 byte2); // nibbles n0 (bits 0-3), n1 (bits 4-7) -> (n0 - 7, n1 - 7)
template <>
__device__ __forceinline__ u32 code_pair<F16>(u32 t) {
    const u32 v = 0x64006400u | (t & 0xFu) | ((t & 0xF0u) << 12); // 1024 + n in each half, exact
    u32 r;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(v), "r"(0x64076407u)); // - 1031
    return r;
}
template <>
__device__ __forceinline__ u32 code_pair<BF16>(u32 t) {
    const u32 v = 0x43004300u | (t & 0xFu) | ((t & 0xF0u) << 12); // 128 + n in each half, exact
    u32 r;
    asm("sub.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(v), "r"(0x43074307u)); // - 135
    return r;
}

// tmp (+)= one group's 16 x 32 codes (lane's words wlo: neuron g, whi: neuron g + 8) times input chunk xv.
template <typename T>
__device__ __forceinline__ void mma_codes(float* tmp, u32 wlo, u32 whi, uint4 xv) {
    // Step s takes the lane's elements 4s .. 4s + 3: pairs (4s, 4s + 1) -> k = 2q, 2q + 1; (4s + 2, 4s + 3) -> 2q + 8, 9.
    mma16816<T>(tmp, code_pair<T>(wlo), code_pair<T>(whi), code_pair<T>(wlo >> 8), code_pair<T>(whi >> 8), xv.x, xv.y);
    mma16816<T>(tmp, code_pair<T>(wlo >> 16), code_pair<T>(whi >> 16), code_pair<T>(wlo >> 24), code_pair<T>(whi >> 24), xv.z, xv.w);
}

template <typename T, int NT>
__device__ __forceinline__ void qscore_mma_impl(
    const u32* __restrict__ gq,   // [N, K / 32, 4] gate codes (one 16-byte word a group, read as 4 words)
    const u32* __restrict__ uq,   // [N, K / 32, 4] up codes
    const u16* __restrict__ gs,   // [N, K / 32] gate scales, f16
    const u16* __restrict__ us,   // [N, K / 32] up scales, f16
    const u16* __restrict__ x,    // [B, K] 16-bit input rows
    float* __restrict__ out,      // [B, N] scores
    int N, int K, int B) {
    constexpr int NB = 8 * NT;
    __shared__ float red[MMA_WARPS][16][NB], red2[MMA_WARPS][16][NB];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    pdl_wait();
    pdl_launch();
    const int G = K >> 5, tiles = (N + 15) >> 4;
    const int c0 = warp * G / MMA_WARPS, c1 = (warp + 1) * G / MMA_WARPS;
    const uint4* xr[NT];
    bool xok[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) {
        xok[t] = 8 * t + g < B;
        xr[t] = (const uint4*)(x + (size_t)(xok[t] ? 8 * t + g : 0) * K) + q;
    }
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int na = min(16 * tile + g, N - 1), nb = min(16 * tile + g + 8, N - 1);
        const u32* ga = gq + (size_t)na * G * 4 + q;
        const u32* gb = gq + (size_t)nb * G * 4 + q;
        const u32* ua = uq + (size_t)na * G * 4 + q;
        const u32* ub = uq + (size_t)nb * G * 4 + q;
        float ag[NT][4], au[NT][4];
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
            for (int j = 0; j < 4; j++) { ag[t][j] = 0.0f; au[t][j] = 0.0f; }
        constexpr int U = 4; // groups in flight
        for (int c = c0; c < c1; c += U) {
            u32 wga[U], wgb[U], wua[U], wub[U];
            float sga[U], sgb[U], sua[U], sub_[U];
            uint4 xv[U][NT];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int j = c + u;
                const bool ok = j < c1;
                wga[u] = ok ? __ldg(ga + 4 * j) : 0u;
                wgb[u] = ok ? __ldg(gb + 4 * j) : 0u;
                wua[u] = ok ? __ldg(ua + 4 * j) : 0u;
                wub[u] = ok ? __ldg(ub + 4 * j) : 0u;
                sga[u] = ok ? F16::load(gs[(size_t)na * G + j]) : 0.0f;
                sgb[u] = ok ? F16::load(gs[(size_t)nb * G + j]) : 0.0f;
                sua[u] = ok ? F16::load(us[(size_t)na * G + j]) : 0.0f;
                sub_[u] = ok ? F16::load(us[(size_t)nb * G + j]) : 0.0f;
#pragma unroll
                for (int t = 0; t < NT; t++) xv[u][t] = ok && xok[t] ? __ldg(xr[t] + 4 * j) : zero;
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    float tg[4] = {0.0f, 0.0f, 0.0f, 0.0f}, tu[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    mma_codes<T>(tg, wga[u], wgb[u], xv[u][t]);
                    mma_codes<T>(tu, wua[u], wub[u], xv[u][t]);
                    // C rows: 0, 1 -> neuron g; 2, 3 -> neuron g + 8.
                    ag[t][0] = fmaf(sga[u], tg[0], ag[t][0]);
                    ag[t][1] = fmaf(sga[u], tg[1], ag[t][1]);
                    ag[t][2] = fmaf(sgb[u], tg[2], ag[t][2]);
                    ag[t][3] = fmaf(sgb[u], tg[3], ag[t][3]);
                    au[t][0] = fmaf(sua[u], tu[0], au[t][0]);
                    au[t][1] = fmaf(sua[u], tu[1], au[t][1]);
                    au[t][2] = fmaf(sub_[u], tu[2], au[t][2]);
                    au[t][3] = fmaf(sub_[u], tu[3], au[t][3]);
                }
            }
        }
        frag_to_red<NT>(red[warp], ag, g, q);
        frag_to_red<NT>(red2[warp], au, g, q);
        __syncthreads();
        for (int e = threadIdx.x; e < 16 * NB; e += blockDim.x) {
            const int sl = e / NB, b = e % NB;
            const int n = 16 * tile + sl;
            if (n < N && b < B) {
                const float v = red_sum<NB>(red, sl, b), u = red_sum<NB>(red2, sl, b);
                out[(size_t)b * N + n] = fabsf(v / (1.0f + expf(-v)) * u);
            }
        }
        __syncthreads();
    }
}

#define QSCORE_MMA(TN, T, NT)                                                                                    \
    extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS) qscore_mma_##TN##_n##NT(                        \
        const u32* gq, const u32* uq, const u16* gs, const u16* us, const u16* x, float* out, int N, int K, int B) { \
        qscore_mma_impl<T, NT>(gq, uq, gs, us, x, out, N, K, B);                                                 \
    }
QSCORE_MMA(f16, F16, 1)
QSCORE_MMA(f16, F16, 2)
QSCORE_MMA(bf16, BF16, 1)
QSCORE_MMA(bf16, BF16, 2)
