// The dense one-row decode MLP in one launch (OPT fc1 -> ReLU -> fc2; Llama gate, up -> SiLU(gate) * up -> down):
//   out[:] += bd + sum_{i < F} a_i * wt[i, :],   a_i = act(w[i] . x + bias[i]  (, w2[i] . x + bias2[i]))
// A neuron's down row needs only its own activation, so the two products need not meet at a launch boundary (the
// memory pipeline's drain and ramp around a true dependency, kernels/NOTES.md): here each block streams its
// neurons' gate / up rows and their down rows back to back. The down weights come from their transposed copy
// `wt` [F, D] (one contiguous row a neuron), as in the sparse path's down_t (kernels/sparse.cu).
//
// Block: W warps (blockDim.x = 32 * W) taking chunks of W consecutive neurons: chunk blockIdx.x, then + gridDim.x, ...
// (contiguous ranges a block, equal within one neuron, measured slower on an H100: kernels/NOTES.md, twenty-sixth
// session). Warp w sums the chunk's neuron w's rows against x staged in f32 in shared memory (16-byte loads, four in
// flight per lane and matrix, each register refilled as soon as its word is summed; the lanes' partition and order of
// the GEMV's one-row kernels, kernels/gemv.cu) and parks its activation in shared memory (two buffers by chunk parity);
// after a block barrier every thread adds the chunk's down rows times their activations into its own columns' f32 sums
// (thread t: 16-byte words t, t + blockDim.x, ... of a row: MW words, MW * 8 sums). The chunk's first MLPF_HALF down
// rows and the next chunk's first gate / up loads go out before the barrier. At the end each block adds its D sums into
// `out` with vector atomic adds (red_add8), so the order of addition across blocks is not fixed. Requires K % 8 == 0,
// D % 8 == 0, D / 8 <= MW * blockDim.x, and K * 4 bytes of dynamic shared memory.
//
// W (warps a block) is 8, or 16 (`_x16`: one block of 512 threads a multiprocessor, two words of the output a
// thread up to width 8,192); the chunk's down rows are added in groups of 8, 4 of them loaded ahead.

#define MLPF_HALF 4

// One batch of a lane's gate / up loads: words base + 32 u (u < U) of neuron n's rows, zero where !ok or past the
// row. FIRST: kept in program order (issued ahead of pdl_wait).
template <bool GLU, bool FIRST, int U>
__device__ __forceinline__ void mlpf_batch(const u16* __restrict__ w, const u16* __restrict__ w2, int n, bool ok, int K,
                                           int base, uint4* wv, uint4* wv2) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int i = base + 32 * u;
        const bool l = ok && i < (K >> 3);
        const uint4* p = (const uint4*)(w + (size_t)n * K) + i;
        const uint4* p2 = (const uint4*)(w2 + (size_t)n * K) + i;
        wv[u] = l ? (FIRST ? ld_stream_first(p) : ld_stream(p)) : make_uint4(0, 0, 0, 0);
        if (GLU) wv2[u] = l ? (FIRST ? ld_stream_first(p2) : ld_stream(p2)) : make_uint4(0, 0, 0, 0);
    }
}

// dv[j][m] = word threadIdx.x + m * blockDim.x of down row r + j (j < MLPF_HALF), zero past hi or past the row.
template <int MW>
__device__ __forceinline__ void mlpf_rows(uint4 (&dv)[MLPF_HALF][MW], const u16* __restrict__ wt, int r, int hi, int D) {
#pragma unroll
    for (int j = 0; j < MLPF_HALF; j++)
#pragma unroll
        for (int m = 0; m < MW; m++) {
            const int word = threadIdx.x + m * blockDim.x;
            dv[j][m] = (r + j < hi && word < (D >> 3)) ? ld_stream((const uint4*)(wt + (size_t)(r + j) * D) + word) : make_uint4(0, 0, 0, 0);
        }
}

// acc[m][:] += a[j] * row j's word m, for the MLPF_HALF rows held in dv.
template <typename T, int MW>
__device__ __forceinline__ void mlpf_down(const uint4 (&dv)[MLPF_HALF][MW], const float* a, float (&acc)[MW][8]) {
#pragma unroll
    for (int j = 0; j < MLPF_HALF; j++) {
        const float aj = a[j];
#pragma unroll
        for (int m = 0; m < MW; m++) {
            float wf[8];
            unpack8<T>(dv[j][m], wf);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[m][e] = fmaf(aj, wf[e], acc[m][e]);
        }
    }
}

template <typename T, bool GLU, int MW, int W>
__device__ __forceinline__ void mlp_fused_impl(
    const u16* __restrict__ w,     // [F, K] fc1 / gate rows
    const u16* __restrict__ w2,    // [F, K] up rows (GLU), else unused
    const u16* __restrict__ bias,  // [F] or null
    const u16* __restrict__ bias2, // [F] or null (GLU)
    const u16* __restrict__ wt,    // [F, D] fc2 / down transposed
    const u16* __restrict__ bd,    // [D] fc2 / down bias or null
    const u16* __restrict__ x,     // [K] the MLP input (already normalised), 16-bit
    float* __restrict__ out,       // [D] f32 residual stream, accumulated into
    int F, int K, int D) {
    extern __shared__ float4 dyn_smem[];
    float* xs = (float*)dyn_smem; // [K]
    __shared__ float hs[2][W];
    const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
    const int K8 = K >> 3, D8 = D >> 3;
    // This block's neurons: chunks starting at lo, lo + stride, ... below hi.
    const int lo = blockIdx.x * W, hi = F, stride = gridDim.x * W;
    constexpr int U = 4;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    // Weights never change: this warp's first gate / up loads go out before the wait.
    uint4 wv[U], wv2[U];
    mlpf_batch<GLU, true, U>(w, w2, lo + wib, lo + wib < hi, K, lane, wv, wv2);
    pdl_wait();
    pdl_launch();
    {
        const uint2* s2 = (const uint2*)x;
        float4* d4 = (float4*)xs;
        for (int i = threadIdx.x; i < (K >> 2); i += blockDim.x) {
            const uint2 v = __ldg(s2 + i);
            float4 f;
            T::unpack2(v.x, f.x, f.y);
            T::unpack2(v.y, f.z, f.w);
            d4[i] = f;
        }
    }
    __syncthreads();
    const float4* x4 = (const float4*)xs;
    float acc[MW][8];
#pragma unroll
    for (int m = 0; m < MW; m++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[m][e] = 0.0f;
    int par = 0;
    for (int n0 = lo; n0 < hi; n0 += stride) {
        const int n = n0 + wib;
        const bool ok = n < hi;
        float s = 0.0f, s2 = 0.0f;
        for (int base = lane; base < K8; base += 32 * U) {
            // The first batch is in registers, and each word's register is refilled with the next batch's word
            // as soon as it is summed, so loads stay in flight through the sums instead of going out four at a time.
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = base + 32 * u;
                if (i >= K8) break;
                const float4 a0 = x4[2 * i], a1 = x4[2 * i + 1];
                const float xv[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                float wf[8];
                unpack8<T>(wv[u], wf);
#pragma unroll
                for (int e = 0; e < 8; e++) s = fmaf(wf[e], xv[e], s);
                if (GLU) {
                    unpack8<T>(wv2[u], wf);
#pragma unroll
                    for (int e = 0; e < 8; e++) s2 = fmaf(wf[e], xv[e], s2);
                }
                const int nx = i + 32 * U;
                const bool l = ok && nx < K8;
                wv[u] = l ? ld_stream((const uint4*)(w + (size_t)n * K) + nx) : zero;
                if (GLU) wv2[u] = l ? ld_stream((const uint4*)(w2 + (size_t)n * K) + nx) : zero;
            }
        }
        // The chunk's first down rows, then the next chunk's first gate / up batch, go out before the reduction.
        uint4 dv[MLPF_HALF][MW];
        mlpf_rows<MW>(dv, wt, n0, hi, D);
        mlpf_batch<GLU, false, U>(w, w2, n0 + stride + wib, n0 + stride + wib < hi, K, lane, wv, wv2);
        s = warp_sum(s);
        if (GLU) s2 = warp_sum(s2);
        if (lane == 0) {
            float a = 0.0f;
            if (ok) {
                const float v = s + (bias ? T::load(bias[n]) : 0.0f);
                a = GLU ? v / (1.0f + expf(-v)) * (s2 + (bias2 ? T::load(bias2[n]) : 0.0f)) : fmaxf(v, 0.0f);
            }
            hs[par][wib] = a;
        }
        __syncthreads();
        // Each group of 8 down rows: its other 4 go out before its first 4 are added, and the next group's first
        // 4 before its other 4 are.
        uint4 dv2[MLPF_HALF][MW];
#pragma unroll
        for (int g = 0; g < W / 8; g++) {
            mlpf_rows<MW>(dv2, wt, n0 + 8 * g + MLPF_HALF, hi, D);
            mlpf_down<T, MW>(dv, hs[par] + 8 * g, acc);
            if (8 * (g + 1) < W) mlpf_rows<MW>(dv, wt, n0 + 8 * (g + 1), hi, D);
            mlpf_down<T, MW>(dv2, hs[par] + 8 * g + MLPF_HALF, acc);
        }
        par ^= 1; // hs[par] is written again only after the next barrier, which every thread reaches after this
    }
#pragma unroll
    for (int m = 0; m < MW; m++) {
        const int word = threadIdx.x + m * blockDim.x;
        if (word >= D8) break;
        if (bd && blockIdx.x == 0) {
            float bf[8];
            unpack8<T>(__ldg((const uint4*)bd + word), bf);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[m][e] += bf[e];
        }
        red_add8(out + (size_t)word * 8, acc[m]);
    }
}

#define MLP_FUSED(TN, T, EN, GLU, MW, W, SUF, MINB)                                                             \
    extern "C" __global__ void __launch_bounds__(32 * (W), MINB) mlp_fused_##TN##_##EN##_w##MW##SUF(            \
        const u16* w, const u16* w2, const u16* bias, const u16* bias2, const u16* wt, const u16* bd,             \
        const u16* x, float* out, int F, int K, int D) {                                                           \
        mlp_fused_impl<T, GLU, MW, W>(w, w2, bias, bias2, wt, bd, x, out, F, K, D);                                \
    }
#define MLP_FUSED_W(TN, T, EN, GLU)                                                                     \
    MLP_FUSED(TN, T, EN, GLU, 1, 8, , 2) MLP_FUSED(TN, T, EN, GLU, 2, 8, , 2)                            \
    MLP_FUSED(TN, T, EN, GLU, 3, 8, , 1) MLP_FUSED(TN, T, EN, GLU, 4, 8, , 1)                            \
    MLP_FUSED(TN, T, EN, GLU, 1, 16, _x16, 1) MLP_FUSED(TN, T, EN, GLU, 2, 16, _x16, 1)

MLP_FUSED_W(f16, F16, glu, true)
MLP_FUSED_W(f16, F16, relu, false)
MLP_FUSED_W(bf16, BF16, glu, true)
MLP_FUSED_W(bf16, BF16, relu, false)
