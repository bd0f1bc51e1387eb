// Per-row reductions over the logits and the epilogues of the GEMM (prefill) path.

// One block per row of `logits` [N, V] (f32): the argmax (first index on ties; NaN never wins) into `am` [N],
// and when `targets` [N] is given, log_softmax(row)[targets[r]] into `lp` [N].
extern "C" __global__ void row_argmax_logprob(const float* __restrict__ logits, int V, const int* __restrict__ targets,
                                              float* __restrict__ lp, int* __restrict__ am) { PDL_ENTER
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float red[32];
    const float* row = logits + (size_t)blockIdx.x * V;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    // Four logits a load where the rows are 16-byte aligned (V % 4 == 0): a quarter of the dependent L2 rounds.
    const int V4 = (V & 3) == 0 ? V >> 2 : 0;
    for (int i4 = threadIdx.x; i4 < V4; i4 += blockDim.x) {
        const float4 q = ((const float4*)row)[i4];
        const float vv[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int i = 4 * i4 + j;
            if (vv[j] > best || (vv[j] == best && i < bi)) { best = vv[j]; bi = i; }
        }
    }
    for (int i = 4 * V4 + threadIdx.x; i < V; i += blockDim.x) {
        const float v = row[i];
        if (v > best || (v == best && i < bi)) { best = v; bi = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        best = lane < nw ? sv[lane] : NEG_INF;
        bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        if (lane == 0) { sv[0] = best; si[0] = bi; }
    }
    __syncthreads();
    const float mx = sv[0];
    const int amax = si[0] == 0x7fffffff ? 0 : si[0];
    if (targets) {
        float s = 0.0f;
        for (int i4 = threadIdx.x; i4 < V4; i4 += blockDim.x) {
            const float4 q = ((const float4*)row)[i4];
            s += expf(q.x - mx) + expf(q.y - mx) + expf(q.z - mx) + expf(q.w - mx);
        }
        for (int i = 4 * V4 + threadIdx.x; i < V; i += blockDim.x) s += expf(row[i] - mx);
        s = block_sum(s, red);
        if (threadIdx.x == 0) lp[blockIdx.x] = row[targets[blockIdx.x]] - mx - logf(s);
    }
    if (threadIdx.x == 0) am[blockIdx.x] = amax;
}

// Epilogues after a library GEMM y = x W^T (f32 [N, M]):
//   bias:  y[n, m] += bias[m]                                      (in place)
//   relu:  out[n, m] = max(y[n, m] + bias[m], 0)                   (16-bit out [N, M])
//   glu:   out[n, f] = silu(y[n, f] + bias[f]) * (y[n, F + f] + bias[F + f]), M = 2F   (16-bit out [N, F])
template <typename T>
__device__ __forceinline__ void epilogue_impl(float* __restrict__ y, const u16* __restrict__ bias,
                                              u16* __restrict__ out, long long N, int M, int mode) {
    const long long cols = mode == 2 ? M / 2 : M;
    const long long total = N * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long n = i / cols;
        const int c = (int)(i % cols);
        if (mode == 0) {
            y[n * M + c] += bias ? T::load(bias[c]) : 0.0f;
        } else if (mode == 1) {
            const float v = y[n * M + c] + (bias ? T::load(bias[c]) : 0.0f);
            out[i] = T::store(fmaxf(v, 0.0f));
        } else {
            const int F = M / 2;
            const float g = y[n * M + c] + (bias ? T::load(bias[c]) : 0.0f);
            const float u = y[n * M + F + c] + (bias ? T::load(bias[F + c]) : 0.0f);
            out[i] = T::store(g / (1.0f + expf(-g)) * u);
        }
    }
}

#define EPILOGUE_KERNELS(TN, T)                                                                       \
    extern "C" __global__ void epilogue_##TN(float* y, const u16* bias, u16* out, long long N, int M,  \
                                             int mode) { PDL_ENTER                                               \
        epilogue_impl<T>(y, bias, out, N, M, mode);                                                    \
    }

EPILOGUE_KERNELS(f16, F16)
EPILOGUE_KERNELS(bf16, BF16)
