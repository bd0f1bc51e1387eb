// Matrix-vector products for decode: y[b, n] = sum_k W[n, k] * x[b, k] (+ bias[n]), for up to NB rows of x at
// once, each weight row read from memory once for all of them. One warp per output row; 16-byte loads, four in
// flight per lane. Weights `W` are row-major [N, K] (the checkpoint's [out, in]); activations `x` are [B, K] in
// the same 16-bit type; accumulation is f32. The epilogue picks what is written:
//   STORE  out f32 [B, N] = acc + bias
//   ACC    out f32 [B, N] += acc + bias            (the residual stream)
//   RELU   out 16-bit [B, N] = max(acc + bias, 0)  (OPT fc1)
//   GLU    out 16-bit [B, N] = silu(acc_gate + bias[n]) * (acc_up + bias2[n]), gate rows in W, up rows in W2 (SwiGLU)
//   RELU32, GLU32  the same in f32 (the dense decode step's MLP hidden, read back unrounded by the down projection)
// With `xf` given, the input is normalised on the fly instead of read from `x`: x_b = norm(xf[b, :]) * g (+ gb),
// RMSNorm (`rms` 1) or LayerNorm (0), statistics computed by each block (the norm kernel and its launch disappear);
// `rms` 2 (staged only): RMSNorm with x * g staged and the sums scaled by the row's 1 / rms before the epilogue.
// `rms` 3 with `g` null: `xf` is the input itself, f32, not normalised (the MLP hidden or attention output of a
// decode step kept in f32).
// With `stage` set (and B * K * 4 bytes of dynamic shared memory), each block first writes its input rows to shared
// memory in f32 (normalised when `xf` is given), so the inner loop converts only the weights.

#define EPI_STORE 0
#define EPI_ACC 1
#define EPI_RELU 2
#define EPI_GLU 3
// Sparse MLP epilogues (kernels/sparse.cu has the rest of the block):
//   MUL        out 16-bit [B, N] = pre[b, slot] * (acc + bias)   (SwiGLU up rows of the kept neurons, times SiLU(gate))
//   CATS_SILU  a = silu(acc + bias) over every row (the gate); a row kept when |a_b| >= t for some b is appended to
//              idx (slot s = atomicAdd(cnt, 1)) with out f32 [B, N] at s = a_b, or 0 where |a_b| < t
//   CATS_RELU  the same with a = max(acc + bias, 0) (OPT fc1), out 16-bit: the hidden values of the kept neurons
#define EPI_MUL 4
#define EPI_CATS_SILU 5
#define EPI_CATS_RELU 6
#define EPI_RELU32 7
#define EPI_GLU32 8
#define EPI_IS_GLU(EPI) ((EPI) == EPI_GLU || (EPI) == EPI_GLU32)

// The position of staged float4 `f` in a swizzled staging buffer (kernels/qscore.cu says why): f ^ ((f >> 3) & 7),
// its own inverse, within each aligned block of 8 float4s.
__device__ __forceinline__ int stage_swz(int f) { return f ^ ((f >> 3) & 7); }

// x_b's elements 8i..8i+7 in f32: from shared memory (staged; with SWZ, in the swizzled layout), normalised on the
// fly from `xf`, or read from `x`.
template <typename T, bool SWZ = false>
__device__ __forceinline__ void gemv_x8(int b, int i, int K, const u16* __restrict__ x, const float* xs,
                                        const float* __restrict__ xf, const u16* __restrict__ g,
                                        const u16* __restrict__ gb, const float* mean_s, const float* rstd_s,
                                        int stage, float* xv8) {
    if (stage) {
        const float4* r4 = (const float4*)(xs + b * K);
        const int f = b * (K >> 2) + 2 * i; // the row's float4 2i in the whole buffer (the swizzle is over it)
        const float4 a0 = SWZ ? ((const float4*)xs)[stage_swz(f)] : r4[2 * i];
        const float4 a1 = SWZ ? ((const float4*)xs)[stage_swz(f + 1)] : r4[2 * i + 1];
        xv8[0] = a0.x; xv8[1] = a0.y; xv8[2] = a0.z; xv8[3] = a0.w;
        xv8[4] = a1.x; xv8[5] = a1.y; xv8[6] = a1.z; xv8[7] = a1.w;
    } else if (xf) {
        const float4* xr = (const float4*)(xf + (size_t)b * K) + 2 * i;
        const float4 a0 = __ldg(xr), a1 = __ldg(xr + 1);
        if (!g) { // a raw f32 input (`rms` 3)
            xv8[0] = a0.x; xv8[1] = a0.y; xv8[2] = a0.z; xv8[3] = a0.w;
            xv8[4] = a1.x; xv8[5] = a1.y; xv8[6] = a1.z; xv8[7] = a1.w;
            return;
        }
        float gf[8], bf[8];
        unpack8<T>(__ldg((const uint4*)g + i), gf);
        if (gb) unpack8<T>(__ldg((const uint4*)gb + i), bf);
        const float raw[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
        for (int e = 0; e < 8; e++) xv8[e] = (raw[e] - mean_s[b]) * rstd_s[b] * gf[e] + (gb ? bf[e] : 0.0f);
    } else {
        unpack8<T>(__ldg((const uint4*)(x + (size_t)b * K) + i), xv8);
    }
}

// acc[b] (+)= the 8 weights in `a` times x_b's elements 8i..8i+7 (acc2 with `a2`, GLU).
template <typename T, int NB, int EPI>
__device__ __forceinline__ void gemv_fma8(uint4 a, uint4 a2, int i, int K, int B, const u16* __restrict__ x,
                                          const float* xs, const float* __restrict__ xf, const u16* __restrict__ g,
                                          const u16* __restrict__ gb, const float* mean_s, const float* rstd_s,
                                          int stage, float* acc, float* acc2) {
    const bool glu = EPI_IS_GLU(EPI);
    float wf[8], wf2[8];
    unpack8<T>(a, wf);
    if (glu) unpack8<T>(a2, wf2);
#pragma unroll
    for (int b = 0; b < NB; b++) {
        if (b < B) {
            float xv8[8];
            gemv_x8<T>(b, i, K, x, xs, xf, g, gb, mean_s, rstd_s, stage, xv8);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                acc[b] = fmaf(wf[e], xv8[e], acc[b]);
                if (glu) acc2[b] = fmaf(wf2[e], xv8[e], acc2[b]);
            }
        }
    }
}

// The input side of every GEMV block: norm statistics of `xf`'s rows (when given) and, with `stage`, the input rows
// in f32 in shared memory `xs`. Every thread of the block takes part (before any early exit).
// Staged, the rows are read from global memory once, with 16-byte (f32) or 8-byte (16-bit) loads, and the
// statistics and the normalisation are computed from shared memory: one round trip to L2 per block instead of
// three, with the same partition of the sums over threads (so the same rounding) as the unstaged path.
template <typename T, int NB, bool COMB = false>
__device__ __forceinline__ void gemv_prepare(const u16* __restrict__ x, float* xs, int K, int B,
                                             const float* __restrict__ xf, const u16* __restrict__ g,
                                             const u16* __restrict__ gb, float eps, int rms, int stage,
                                             float* mean_s, float* rstd_s, float* red,
                                             const float* __restrict__ part = 0, int S = 0, int hd = 0) {
    if (stage) { // K % 4 == 0 (the host stages only then)
        const int K4 = K >> 2;
        for (int b = 0; b < NB && b < B; b++) {
            float4* d4 = (float4*)(xs + b * K);
            if (COMB) {
                // The input is the attention output, merged here from its S key-split partials [B * H * S, hd + 2]
                // by attn_combine's own function and, with `rms` 1, rounded to T as it stores it (0: kept in f32,
                // as attn_combine's f32 output): the same values the out-projection would read from attn_combine's
                // output (hd % 4 == 0).
                const int H = K / hd;
                for (int f = threadIdx.x; f < K4; f += blockDim.x) {
                    const int h = (4 * f) / hd, e0 = 4 * f - h * hd;
                    const float* pp = part + (size_t)(b * H + h) * S * (hd + 2);
                    float v[4];
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        const float m = attn_merge(pp, S, hd, e0 + j);
                        v[j] = rms ? T::load(T::store(m)) : m; // COMB: `rms` 1 rounds the input as attn_combine stores it
                    }
                    d4[f] = make_float4(v[0], v[1], v[2], v[3]);
                }
            } else if (xf && rms == 2) {
                // RMSNorm scaled at the epilogue (the host's default; `DEJAVU_NORM_EPI=0` passes 1): the staged
                // input is x * g, the row's 1 / rms goes to rstd_s and multiplies the sums in gemv_finish.
                const float4* s4 = (const float4*)(xf + (size_t)b * K);
                float ss = 0.0f;
#pragma unroll 4
                for (int i = threadIdx.x; i < K4; i += blockDim.x) {
                    const float4 a = __ldg(s4 + i);
                    const uint2 gv = __ldg((const uint2*)g + i);
                    float g0, g1, g2, g3;
                    T::unpack2(gv.x, g0, g1);
                    T::unpack2(gv.y, g2, g3);
                    ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
                    d4[i] = make_float4(a.x * g0, a.y * g1, a.z * g2, a.w * g3);
                }
                ss = block_sum(ss, red);
                if (threadIdx.x == 0) {
                    mean_s[b] = 0.0f;
                    rstd_s[b] = rsqrtf(ss / (float)K + eps);
                }
            } else if (xf) {
                const float4* s4 = (const float4*)(xf + (size_t)b * K);
#pragma unroll 4
                for (int i = threadIdx.x; i < K4; i += blockDim.x) d4[i] = __ldg(s4 + i);
            } else {
                const uint2* s2 = (const uint2*)(x + (size_t)b * K);
#pragma unroll 4
                for (int i = threadIdx.x; i < K4; i += blockDim.x) {
                    const uint2 v = __ldg(s2 + i);
                    float4 f;
                    T::unpack2(v.x, f.x, f.y);
                    T::unpack2(v.y, f.z, f.w);
                    d4[i] = f;
                }
            }
        }
        __syncthreads();
        if (xf && rms < 2) {
            for (int b = 0; b < NB && b < B; b++) {
                float* xr = xs + b * K;
                float mean, rstd;
                row_stats(xr, K, rms, eps, red, mean, rstd);
                if (threadIdx.x == 0) {
                    mean_s[b] = mean;
                    rstd_s[b] = rstd;
                }
                // Each thread rewrites only the elements it summed: no other thread's reads to wait for.
                for (int i = threadIdx.x; i < K; i += blockDim.x) {
                    float v = (xr[i] - mean) * rstd * T::load(g[i]);
                    if (gb) v += T::load(gb[i]);
                    xr[i] = v;
                }
            }
            __syncthreads();
        }
        return;
    }
    if (xf && rms < 2) {
        for (int b = 0; b < NB && b < B; b++) {
            float mean, rstd;
            row_stats(xf + (size_t)b * K, K, rms, eps, red, mean, rstd);
            if (threadIdx.x == 0) {
                mean_s[b] = mean;
                rstd_s[b] = rstd;
            }
        }
        __syncthreads();
    }
}

// Reduce the lanes' partial sums and write output column `slot` of every input row with the epilogue; `row` is the
// weight row (the bias entry), equal to `slot` except in the gather kernels.
template <typename T, int NB, int EPI>
__device__ __forceinline__ void gemv_finish(float* acc, float* acc2, int lane, int slot, int row, int N, int B,
                                            const u16* __restrict__ bias, const u16* __restrict__ bias2,
                                            void* __restrict__ out, int* idx, int* cnt, const float* pre, float t,
                                            int* tally, const float* rs = 0) {
    const bool glu = EPI_IS_GLU(EPI);
#pragma unroll
    for (int b = 0; b < NB; b++) {
        acc[b] = warp_sum(acc[b]);
        if (glu) acc2[b] = warp_sum(acc2[b]);
    }
    if (lane != 0) return;
    if (rs) { // the input's 1 / rms, applied to the sums (gemv_prepare's epilogue-scaled RMSNorm)
#pragma unroll
        for (int b = 0; b < NB; b++) {
            acc[b] *= rs[b];
            if (glu) acc2[b] *= rs[b];
        }
    }
    const float bv = bias ? T::load(bias[row]) : 0.0f;
    const float bv2 = (glu && bias2) ? T::load(bias2[row]) : 0.0f;
#pragma unroll
    if (EPI == EPI_CATS_SILU || EPI == EPI_CATS_RELU) {
        float a[NB];
        bool keep = false;
#pragma unroll
        for (int b = 0; b < NB; b++) {
            const float v = acc[b] + bv;
            a[b] = EPI == EPI_CATS_SILU ? v / (1.0f + expf(-v)) : fmaxf(v, 0.0f);
            if (b < B && fabsf(a[b]) >= t) keep = true;
        }
        if (!keep) return;
        const int s = atomicAdd(cnt, 1);
        idx[s] = row;
        if (tally) { // per-row kept counts for the statistics, spread over 8 counters against contention
#pragma unroll
            for (int b = 0; b < NB; b++)
                if (b < B && fabsf(a[b]) >= t) atomicAdd(tally + b * 8 + (row & 7), 1);
        }
#pragma unroll
        for (int b = 0; b < NB; b++) {
            if (b >= B) break;
            const float v = fabsf(a[b]) >= t ? a[b] : 0.0f;
            if (EPI == EPI_CATS_SILU) ((float*)out)[(size_t)b * N + s] = v;
            else ((u16*)out)[(size_t)b * N + s] = T::store(v);
        }
        return;
    }
#pragma unroll
    for (int b = 0; b < NB; b++) {
        if (b >= B) break;
        size_t o = (size_t)b * N + slot;
        float v = acc[b] + bv;
        if (EPI == EPI_STORE) ((float*)out)[o] = v;
        if (EPI == EPI_ACC) ((float*)out)[o] += v;
        // With `pre` (gather kernels at B > 1), the row's own 0/1 flag of the kept unit: a row uses only its own.
        if (EPI == EPI_RELU) ((u16*)out)[o] = T::store(fmaxf(v, 0.0f) * (pre ? pre[o] : 1.0f));
        if (EPI == EPI_MUL) ((u16*)out)[o] = T::store(pre[o] * v);
        if (EPI == EPI_GLU) {
            float u = acc2[b] + bv2;
            ((u16*)out)[o] = T::store(v / (1.0f + expf(-v)) * u * (pre ? pre[o] : 1.0f));
        }
        if (EPI == EPI_RELU32) ((float*)out)[o] = fmaxf(v, 0.0f);
        if (EPI == EPI_GLU32) ((float*)out)[o] = v / (1.0f + expf(-v)) * (acc2[b] + bv2);
    }
}

template <typename T, int NB, int EPI, bool GATHER = false, bool COMB = false, bool CHAIN = false, int GROUP = 1,
          bool PF = false>
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
    float eps, int rms, int stage,
    int* __restrict__ idx,         // GATHER: [N] weight rows to compute (written by an earlier kernel); CATS: appended to
    int* __restrict__ cnt,         // GATHER: [1] how many of idx are valid (<= N), output columns past it untouched;
                                   // CATS: [1] the append counter (zero before the launch)
    const float* __restrict__ pre, // MUL: [B, N] f32 factors per output; RELU/GLU: optional 0/1 row flags [B, N]
    float t,                       // CATS: the threshold
    int* __restrict__ tally,       // CATS: [16, 8] per-row kept counts (row b: the sum of tally[b, 0..8)), or null
    const float* __restrict__ part = 0, // COMB: [B * (K / hd) * S, hd + 2] attention partials, the input (staged)
    int S = 0, int hd = 0,         // COMB: key splits and head size
    int early = 0,                 // GATHER: idx / cnt were complete before the previous kernel in the stream began
                                   // (written earlier than by it), so they and the first weights load before the wait
    unsigned* bar = 0,             // CHAIN: a grid barrier ([2], grid_barrier) to wait at instead of the previous
                                   // kernel (null: wait for it); the caller releases the next kernel at its end
    int pf = 0) {                  // PF: batches of the warp's first row after the first asked of the L2 before the
                                   // wait (the memory keeps streaming while the block stages its input)
    extern __shared__ float4 dyn_smem[];
    float* xs = (float*)dyn_smem; // [B, K] when staged
    const int lane = threadIdx.x & 31;
    // Each warp computes the output slots gw, gw + W, gw + 2W, ... (W warps in the grid): the host sizes the grid
    // to what the multiprocessors hold at once, so a block stages its input once for several rows and the next
    // row's first loads are in flight while the current row is reduced.
    // Warps are numbered block-minor, so a kept set shorter than the grid still spreads over every block.
    // GROUP > 1 (NB == 1, K % 8 == 0, not GATHER; dividing the block's warps): the unit is a group of GROUP
    // consecutive warps of a block, warp p of a group summing the contiguous part p / GROUP of each row's columns,
    // so rows balance over the resident warps where N is just above a multiple of them (N = 5,120 on 4,224 warps:
    // 2 rows' time at one warp a row, 1.25 at four); the parts meet in shared memory, not global.
    const int S_ = GROUP;
    const int wib = threadIdx.x >> 5;
    const int W = gridDim.x * (blockDim.x >> 5) / S_;
    int slot = (wib / S_) * gridDim.x + blockIdx.x;
    int nrows = N;
    if (GATHER) { // the kept rows are an earlier kernel's output: unless `early`, nothing loads before the wait
        if (!early) pdl_wait();
        nrows = min(cnt[0], N);
    }
    int row = GATHER ? (slot < nrows ? idx[slot] : 0) : slot;
    __shared__ float mean_s[NB], rstd_s[NB], red[32];
    const bool glu = EPI_IS_GLU(EPI);
    const int U = 4; // 16-byte loads in flight per lane and matrix (8 measured slower: the one-row gathers 1.7-2.8x,
                     // the one-row dense products +0.5-4% at 7-13B; kernels/NOTES.md)
    const int K8 = K >> 3;
    const bool vec = (K & 7) == 0;
    // The 16-byte columns [k0, k1) of each row that this warp sums (all of them unless GROUP).
    const int k0 = GROUP > 1 ? (int)((long long)K8 * (wib % S_) / S_) : 0;
    const int k1 = GROUP > 1 ? (int)((long long)K8 * (wib % S_ + 1) / S_) : K8;
    // Weights never change: the first loads of this warp's row are issued before waiting for the previous kernel
    // (under programmatic dependent launch they overlap its tail and this kernel's prologue).
    uint4 wv[U], wv2[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int i = k0 + lane + 32 * u;
        const bool ok = vec && slot < nrows && i < k1;
        wv[u] = ok ? ld_stream_first((const uint4*)(w + (size_t)row * K) + i) : make_uint4(0, 0, 0, 0);
        wv2[u] = (glu && ok) ? ld_stream_first((const uint4*)(w2 + (size_t)row * K) + i) : make_uint4(0, 0, 0, 0);
    }
    if constexpr (PF) {
        for (int j = 1; j <= pf; j++) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = k0 + lane + 32 * (U * j + u);
                if (vec && slot < nrows && i < k1) {
                    asm volatile("prefetch.global.L2 [%0];" ::"l"((const uint4*)(w + (size_t)row * K) + i));
                    if (glu) asm volatile("prefetch.global.L2 [%0];" ::"l"((const uint4*)(w2 + (size_t)row * K) + i));
                }
            }
        }
    }
    if (CHAIN && bar) {
        grid_barrier(bar);
    } else {
        pdl_wait();
        if (!CHAIN) pdl_launch();
    }
    gemv_prepare<T, NB, COMB>(x, xs, K, B, xf, g, gb, eps, rms, stage, mean_s, rstd_s, red, part, S, hd);
    int grp_par = 0; // GROUP: the parity of the rows this warp has done
    while (slot < nrows) {
        const u16* wr = w + (size_t)row * K;
        const u16* wr2 = glu ? w2 + (size_t)row * K : wr;
        const uint4* w4 = (const uint4*)wr;
        const uint4* w24 = (const uint4*)wr2;
        float acc[NB], acc2[NB];
#pragma unroll
        for (int b = 0; b < NB; b++) { acc[b] = 0.0f; acc2[b] = 0.0f; }
        if (vec) {
            for (int base = k0 + lane; base < k1; base += 32 * U) {
                if (base != k0 + lane) { // the first batch is already in registers
#pragma unroll
                    for (int u = 0; u < U; u++) {
                        const int i = base + 32 * u;
                        wv[u] = i < k1 ? ld_stream(w4 + i) : make_uint4(0, 0, 0, 0);
                        if (glu) wv2[u] = i < k1 ? ld_stream(w24 + i) : make_uint4(0, 0, 0, 0);
                    }
                }
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int i = base + 32 * u;
                    if (i >= k1) break;
                    gemv_fma8<T, NB, EPI>(wv[u], wv2[u], i, K, B, x, xs, xf, g, gb, mean_s, rstd_s, stage, acc, acc2);
                }
            }
        } else {
            for (int k = lane; k < K; k += 32) {
                float ws = T::load(wr[k]);
                float ws2 = glu ? T::load(wr2[k]) : 0.0f;
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    if (b < B) {
                        float xv = stage ? xs[b * K + k]
                                   : xf ? (g ? (xf[(size_t)b * K + k] - mean_s[b]) * rstd_s[b] * T::load(g[k]) + (gb ? T::load(gb[k]) : 0.0f)
                                             : xf[(size_t)b * K + k])
                                        : T::load(x[(size_t)b * K + k]);
                        acc[b] = fmaf(ws, xv, acc[b]);
                        if (glu) acc2[b] = fmaf(ws2, xv, acc2[b]);
                    }
                }
            }
        }
        // The next row's first batch goes out before this row's reduction.
        const int slot2 = slot + W;
        const int row2 = slot2 < nrows ? (GATHER ? idx[slot2] : slot2) : 0;
        if (vec && slot2 < nrows) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = k0 + lane + 32 * u;
                wv[u] = i < k1 ? ld_stream((const uint4*)(w + (size_t)row2 * K) + i) : make_uint4(0, 0, 0, 0);
                if (glu) wv2[u] = i < k1 ? ld_stream((const uint4*)(w2 + (size_t)row2 * K) + i) : make_uint4(0, 0, 0, 0);
            }
        }
        if constexpr (GROUP > 1) {
            // The group's partial sums meet in shared memory (two buffers by row parity: a buffer is written again
            // only after the group's next barrier, which its first warp reaches after reading it); that warp adds
            // them in part order (the same sum whichever warp is slower) and runs the epilogue.
            __shared__ float grp_s[2][32][2];
            acc[0] = warp_sum(acc[0]);
            if (glu) acc2[0] = warp_sum(acc2[0]);
            const int par = grp_par;
            grp_par ^= 1;
            if (lane == 0) {
                grp_s[par][wib][0] = acc[0];
                grp_s[par][wib][1] = acc2[0];
            }
            asm volatile("bar.sync %0, %1;" ::"r"(1 + wib / S_), "r"(32 * S_) : "memory");
            if (wib % S_ != 0) {
                slot = slot2;
                row = row2;
                continue;
            }
            float s1 = 0.0f, s2 = 0.0f;
            if (lane == 0) {
                for (int q = 0; q < S_; q++) {
                    s1 += grp_s[par][wib + q][0];
                    s2 += grp_s[par][wib + q][1];
                }
            }
            acc[0] = s1;
            acc2[0] = s2;
        }
        // A gathered STORE scatters: the output column is the weight row itself (the head-sparse q/k/v projection).
        gemv_finish<T, NB, EPI>(acc, acc2, lane, (GATHER && EPI == EPI_STORE) ? row : slot, row, N, B, bias, bias2, out, idx, cnt, pre, t, tally,
                                (xf && stage && rms == 2) ? rstd_s : 0);
        slot = slot2;
        row = row2;
    }
}


// The same product with the weights streamed through shared memory: each lane keeps ASYNC_STAGES chunks of
// ASYNC_U 16-byte loads per matrix in flight with cp.async (sm_80+), landing in its own slots of a ring, so the
// bytes in flight are bounded by shared memory rather than registers. Dynamic shared memory: the staged inputs
// (B * K * 4 bytes when `stage`) followed by the ring (gemv_ring_bytes). K must be a multiple of 8.
#define ASYNC_U 2
#define ASYNC_STAGES 4

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_ring() {
    asm volatile("cp.async.wait_group %0;" ::"n"(ASYNC_STAGES - 1) : "memory");
}
__device__ __forceinline__ uint4 ld_shared16(unsigned a) {
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a));
    return r;
}

template <typename T, int NB, int EPI>
__device__ __forceinline__ void gemv_async_impl(
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
    const bool glu = EPI == EPI_GLU;
    const int M = glu ? 2 : 1;
    const int K8 = K >> 3;
    const int chunks = (K8 + 32 * ASYNC_U - 1) / (32 * ASYNC_U);
    // This thread's slot for (stage st, load u, matrix m): consecutive threads hold consecutive 16-byte words.
    const unsigned ring = smem_addr(xs + (stage ? B * K : 0));
    const int bd = blockDim.x;
    const uint4* w4 = (const uint4*)(w + (size_t)row * K);
    const uint4* w24 = (const uint4*)((glu ? w2 : w) + (size_t)row * K);
    auto issue = [&](int c) {
        if (row < N && c < chunks) {
            const int st = c % ASYNC_STAGES;
#pragma unroll
            for (int u = 0; u < ASYNC_U; u++) {
                const int i = lane + 32 * (c * ASYNC_U + u);
                if (i < K8) {
                    cp_async16(ring + (unsigned)((((st * ASYNC_U + u) * M) * bd + threadIdx.x) * 16), w4 + i);
                    if (glu) cp_async16(ring + (unsigned)((((st * ASYNC_U + u) * M + 1) * bd + threadIdx.x) * 16), w24 + i);
                }
            }
        }
        cp_async_commit(); // an empty group past the end keeps the wait count uniform
    };
    // Weights never change: the first chunks are requested before waiting for the previous kernel.
#pragma unroll
    for (int c = 0; c < ASYNC_STAGES - 1; c++) issue(c);
    pdl_wait();
    pdl_launch();
    gemv_prepare<T, NB>(x, xs, K, B, xf, g, gb, eps, rms, stage, mean_s, rstd_s, red);
    if (row >= N) return;
    float acc[NB], acc2[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) { acc[b] = 0.0f; acc2[b] = 0.0f; }
    for (int c = 0; c < chunks; c++) {
        issue(c + ASYNC_STAGES - 1);
        cp_async_wait_ring(); // chunk c has landed (in this thread's own slots)
        const int st = c % ASYNC_STAGES;
#pragma unroll
        for (int u = 0; u < ASYNC_U; u++) {
            const int i = lane + 32 * (c * ASYNC_U + u);
            if (i < K8) {
                const uint4 a = ld_shared16(ring + (unsigned)((((st * ASYNC_U + u) * M) * bd + threadIdx.x) * 16));
                const uint4 a2 = glu ? ld_shared16(ring + (unsigned)((((st * ASYNC_U + u) * M + 1) * bd + threadIdx.x) * 16))
                                     : make_uint4(0, 0, 0, 0);
                gemv_fma8<T, NB, EPI>(a, a2, i, K, B, x, xs, xf, g, gb, mean_s, rstd_s, stage, acc, acc2);
            }
        }
    }
    gemv_finish<T, NB, EPI>(acc, acc2, lane, row, row, N, B, bias, bias2, out, 0, 0, 0, 0.0f, 0);
}

// Two 512-thread blocks per multiprocessor for the narrow variants (64 registers a thread; GLU would spill).
#define GEMV_MIN_BLOCKS(EPI, NB) ((NB) <= 2 && !EPI_IS_GLU(EPI) ? 2 : 1)
#define GEMV_KERNEL(TN, T, EN, EPI, NB)                                                                          \
    extern "C" __global__ void __launch_bounds__(512, GEMV_MIN_BLOCKS(EPI, NB)) gemv_##TN##_##EN##_b##NB(const u16* w, const u16* w2, const u16* bias,            \
                                                        const u16* bias2, const u16* x, void* out, int N, int K, \
                                                        int B, const float* xf, const u16* g, const u16* gb,      \
                                                        float eps, int rms, int stage) {                          \
        gemv_impl<T, NB, EPI>(w, w2, bias, bias2, x, out, N, K, B, xf, g, gb, eps, rms, stage, 0, 0, 0, 0.f, 0);          \
    }
// One row with SPLIT warps a row (gemv_impl's GROUP; 2 or 4; K % 8 == 0), `gemv_grp{SPLIT}_*`.
#define GEMV_GROUP_KERNEL(TN, T, EN, EPI, SPLIT)                                                                 \
    extern "C" __global__ void __launch_bounds__(512, GEMV_MIN_BLOCKS(EPI, 1)) gemv_grp##SPLIT##_##TN##_##EN##_b1( \
        const u16* w, const u16* w2, const u16* bias, const u16* bias2, const u16* x, void* out, int N, int K,    \
        int B, const float* xf, const u16* g, const u16* gb, float eps, int rms, int stage) {                     \
        gemv_impl<T, 1, EPI, false, false, false, SPLIT>(w, w2, bias, bias2, x, out, N, K, B, xf, g, gb, eps, rms, \
                                                         stage, 0, 0, 0, 0.f, 0);                                 \
    }
#define GEMV_GROUPS(TN, T, EN, EPI) GEMV_GROUP_KERNEL(TN, T, EN, EPI, 2) GEMV_GROUP_KERNEL(TN, T, EN, EPI, 4)
// One row, `pf` more batches of each warp's first row asked of the L2 before the wait (gemv_impl's PF; the default).
#define GEMV_PF_KERNEL(TN, T, EN, EPI)                                                                           \
    extern "C" __global__ void __launch_bounds__(512, GEMV_MIN_BLOCKS(EPI, 1)) gemv_pf_##TN##_##EN##_b1(          \
        const u16* w, const u16* w2, const u16* bias, const u16* bias2, const u16* x, void* out, int N, int K,    \
        int B, const float* xf, const u16* g, const u16* gb, float eps, int rms, int stage, int pf) {            \
        gemv_impl<T, 1, EPI, false, false, false, 1, true>(w, w2, bias, bias2, x, out, N, K, B, xf, g, gb, eps,    \
                                                           rms, stage, 0, 0, 0, 0.f, 0, 0, 0, 0, 0, 0, pf);        \
    }
#define GEMV_ASYNC_KERNEL(TN, T, EN, EPI, NB)                                                                    \
    extern "C" __global__ void __launch_bounds__(512) gemv_async_##TN##_##EN##_b##NB(                            \
        const u16* w, const u16* w2, const u16* bias, const u16* bias2, const u16* x, void* out, int N, int K,    \
        int B, const float* xf, const u16* g, const u16* gb, float eps, int rms, int stage) {                      \
        gemv_async_impl<T, NB, EPI>(w, w2, bias, bias2, x, out, N, K, B, xf, g, gb, eps, rms, stage);            \
    }
// Sparse MLP, first half. `gemv_gather_*`: only the weight rows idx[0 .. cnt) are computed (OPT fc1 + bias + ReLU,
// SwiGLU gate and up rows together, or `mul`: up rows times pre), written compactly: out[b, s] for the kept row
// idx[s], s < cnt (N = the capacity of idx and the output's row stride); `store` instead writes f32 out[b, idx[s]]
// (N the row stride, at least the weight rows). `gemv_cats_*`: every row (N of them) computed
// and thresholded, the kept ones appended to idx / cnt (see EPI_CATS_*).
#define GEMV_SPARSE(KIND, GATHER, TN, T, EN, EPI, NB)                                                             \
    extern "C" __global__ void __launch_bounds__(512, GEMV_MIN_BLOCKS(EPI, NB)) gemv_##KIND##_##TN##_##EN##_b##NB( \
        const u16* w, const u16* w2, const u16* bias, const u16* bias2, const u16* x, void* out, int N, int K,    \
        int B, const float* xf, const u16* g, const u16* gb, float eps, int rms, int stage, int* idx, int* cnt,   \
        const float* pre, float t, int* tally, int early) {                                                       \
        gemv_impl<T, NB, EPI, GATHER>(w, w2, bias, bias2, x, out, N, K, B, xf, g, gb, eps, rms, stage, idx, cnt,  \
                                      pre, t, tally, 0, 0, 0, early);                                             \
    }
#define GEMV_SPARSE_NB(KIND, GATHER, TN, T, EN, EPI)                                                             \
    GEMV_SPARSE(KIND, GATHER, TN, T, EN, EPI, 1) GEMV_SPARSE(KIND, GATHER, TN, T, EN, EPI, 2)                    \
    GEMV_SPARSE(KIND, GATHER, TN, T, EN, EPI, 4) GEMV_SPARSE(KIND, GATHER, TN, T, EN, EPI, 8)                    \
    GEMV_SPARSE(KIND, GATHER, TN, T, EN, EPI, 16)
#define GEMV_NB(K, TN, T, EN, EPI) \
    K(TN, T, EN, EPI, 1) K(TN, T, EN, EPI, 2) K(TN, T, EN, EPI, 4) K(TN, T, EN, EPI, 8) K(TN, T, EN, EPI, 16)
// The decode out-projection (one row) reading the attention's key-split partials itself, so the attn_combine launch
// goes: out f32 [N] += W [N, K] x + bias, x the merged attention output (staged; K * 4 bytes of dynamic shared
// memory), rounded to T first when `r16` (as attn_combine's 16-bit output) or not (its f32 output).
#define GEMV_COMB_KERNEL(TN, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(512, 2) gemv_comb_##TN##_acc_b1(                                 \
        const u16* w, const u16* bias, const float* part, float* out, int N, int K, int S, int hd, int r16) {     \
        gemv_impl<T, 1, EPI_ACC, false, true>(w, 0, bias, 0, 0, out, N, K, 1, 0, 0, 0, 0.0f, r16, 1, 0, 0, 0, 0.0f, 0, \
                                              part, S, hd);                                                        \
    }
// `bench --launch-cost`'s persistent chain: C consecutive N-row slices of w [C * N, K], each into its own outputs
// out [C, N] f32 (+=, ACC), in one launch, the slices separated by a grid barrier instead of launch boundaries
// (x [K] 16-bit, staged per slice as a phase's input would be; bar [2] u32, zero). A warp that ends a slice issues
// its first loads of the next before the barrier. The grid must be resident at once (the host caps it).
#define GEMV_CHAIN_KERNEL(TN, T)                                                                                 \
    extern "C" __global__ void __launch_bounds__(512, GEMV_MIN_BLOCKS(EPI_ACC, 1)) gemv_chain_##TN##_acc_b1(    \
        const u16* w, const u16* x, float* out, int N, int K, int C, int stage, unsigned* bar) {               \
        for (int c = 0; c < C; c++)                                                                              \
            gemv_impl<T, 1, EPI_ACC, false, false, true>(w + (size_t)c * N * K, 0, 0, 0, x, out + (size_t)c * N, \
                                                         N, K, 1, 0, 0, 0, 0.0f, 0, stage, 0, 0, 0, 0.0f, 0, 0, 0, \
                                                         0, 0, c ? bar : 0);                                      \
        pdl_launch();                                                                                            \
    }
#define GEMV_DENSE_A(TN, T) GEMV_NB(GEMV_KERNEL, TN, T, store, EPI_STORE) GEMV_NB(GEMV_KERNEL, TN, T, acc, EPI_ACC) \
    GEMV_COMB_KERNEL(TN, T) GEMV_CHAIN_KERNEL(TN, T) GEMV_GROUPS(TN, T, store, EPI_STORE)                 \
    GEMV_GROUPS(TN, T, acc, EPI_ACC) GEMV_PF_KERNEL(TN, T, store, EPI_STORE) GEMV_PF_KERNEL(TN, T, acc, EPI_ACC)
#define GEMV_DENSE_B(TN, T) GEMV_NB(GEMV_KERNEL, TN, T, relu, EPI_RELU) GEMV_NB(GEMV_KERNEL, TN, T, glu, EPI_GLU)     \
    GEMV_KERNEL(TN, T, relu32, EPI_RELU32, 1) GEMV_KERNEL(TN, T, glu32, EPI_GLU32, 1)                          \
    GEMV_GROUPS(TN, T, relu, EPI_RELU) GEMV_GROUPS(TN, T, glu, EPI_GLU) GEMV_GROUPS(TN, T, relu32, EPI_RELU32)    \
    GEMV_GROUPS(TN, T, glu32, EPI_GLU32) GEMV_PF_KERNEL(TN, T, relu, EPI_RELU) GEMV_PF_KERNEL(TN, T, glu, EPI_GLU) \
    GEMV_PF_KERNEL(TN, T, relu32, EPI_RELU32) GEMV_PF_KERNEL(TN, T, glu32, EPI_GLU32)
#define GEMV_ASYNC(TN, T)                                                                                        \
    GEMV_NB(GEMV_ASYNC_KERNEL, TN, T, store, EPI_STORE) GEMV_NB(GEMV_ASYNC_KERNEL, TN, T, acc, EPI_ACC)           \
    GEMV_NB(GEMV_ASYNC_KERNEL, TN, T, relu, EPI_RELU) GEMV_NB(GEMV_ASYNC_KERNEL, TN, T, glu, EPI_GLU)
#define GEMV_SPARSE_A(TN, T)                                                                                     \
    GEMV_SPARSE_NB(gather, true, TN, T, relu, EPI_RELU) GEMV_SPARSE_NB(gather, true, TN, T, glu, EPI_GLU)        \
    GEMV_SPARSE_NB(gather, true, TN, T, store, EPI_STORE)
#define GEMV_SPARSE_B(TN, T)                                                                                     \
    GEMV_SPARSE_NB(gather, true, TN, T, mul, EPI_MUL) GEMV_SPARSE_NB(cats, false, TN, T, silu, EPI_CATS_SILU)     \
    GEMV_SPARSE_NB(cats, false, TN, T, relu, EPI_CATS_RELU)

// The instantiations are split over several NVRTC programs that the engine compiles in parallel
// (src/cuda/kernels.rs, PARTS): `DJ_PART` selects this program's share; undefined, every kernel is compiled.
#ifndef DJ_PART
#define DJ_PART -1
#endif
#if DJ_PART < 0 || DJ_PART == 0
GEMV_DENSE_A(f16, F16)
#endif
#if DJ_PART < 0 || DJ_PART == 1
GEMV_DENSE_B(f16, F16)
#endif
#if DJ_PART < 0 || DJ_PART == 2
GEMV_SPARSE_A(f16, F16)
#endif
#if DJ_PART < 0 || DJ_PART == 3
GEMV_SPARSE_B(f16, F16)
#endif
#if DJ_PART < 0 || DJ_PART == 4
GEMV_DENSE_A(bf16, BF16)
#endif
#if DJ_PART < 0 || DJ_PART == 5
GEMV_DENSE_B(bf16, BF16)
#endif
#if DJ_PART < 0 || DJ_PART == 6
GEMV_SPARSE_A(bf16, BF16)
#endif
#if DJ_PART < 0 || DJ_PART == 7
GEMV_SPARSE_B(bf16, BF16)
#endif
#if DJ_PART < 0 || DJ_PART == 8
GEMV_ASYNC(f16, F16)
#endif
#if DJ_PART < 0 || DJ_PART == 9
GEMV_ASYNC(bf16, BF16)
#endif
