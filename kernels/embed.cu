// Embeddings, positions, conversions and fills. Token rows are laid out n = b * T + t (batch row b, position t
// of this forward); `state[0]` is the number of positions already cached, so token n sits at state[0] + t.

template <typename T>
__device__ __forceinline__ void embed_impl(
    const int* __restrict__ tok,  // [N] token ids
    const u16* __restrict__ emb,  // [vocab, d]
    const u16* __restrict__ pos,  // [max_positions + offset, d] learned positions, or null
    float* __restrict__ xf,       // [N, d] f32 out, or null
    u16* __restrict__ xd,         // [N, d] 16-bit out, or null
    const int* __restrict__ state, int seq, int d, int pos_offset) {
    const int n = blockIdx.x;
    const size_t id = (size_t)tok[n];
    const size_t p = (size_t)(state[0] + n % seq + pos_offset);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = T::load(emb[id * d + i]);
        if (pos) v += T::load(pos[p * d + i]);
        if (xf) xf[(size_t)n * d + i] = v;
        if (xd) xd[(size_t)n * d + i] = T::store(v);
    }
}

// x[n, :] += pos[state[0] + n % seq + offset, :] (OPT with project_in adds positions after the projection).
template <typename T>
__device__ __forceinline__ void add_positions_impl(float* __restrict__ x,        // [N, d]
                                                   const u16* __restrict__ pos,  // [positions, d]
                                                   const int* __restrict__ state, int seq, int d, int pos_offset) {
    const int n = blockIdx.x;
    const size_t p = (size_t)(state[0] + n % seq + pos_offset);
    for (int i = threadIdx.x; i < d; i += blockDim.x) x[(size_t)n * d + i] += T::load(pos[p * d + i]);
}

// out[i] = x[i] in the 16-bit type.
template <typename T>
__device__ __forceinline__ void to_half_impl(const float* __restrict__ x, u16* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = T::store(x[i]);
}

// dst[r, :] = src[idx[r], :] for r < M (rows of width d, 16-bit).
__device__ __forceinline__ void gather_rows_impl(const u16* __restrict__ src,  // [rows, d]
                                                 const int* __restrict__ idx,  // [M]
                                                 u16* __restrict__ dst,        // [M, d]
                                                 int d) {
    const size_t r = blockIdx.x, s = (size_t)idx[r];
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[r * d + i] = src[s * d + i];
}

// Uniform values in [-scale, scale) from a counter hash: random weights at real shapes, for latency only.
template <typename T>
__device__ __forceinline__ void fill_random_impl(u16* __restrict__ p, long long n, unsigned long long seed,
                                                 float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (unsigned long long)(i + 1);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        p[i] = T::store((2.0f * u - 1.0f) * scale);
    }
}

#define EMBED_KERNELS(TN, T)                                                                                     \
    extern "C" __global__ void embed_##TN(const int* tok, const u16* emb, const u16* pos, float* xf, u16* xd,    \
                                          const int* state, int T_, int d, int pos_offset) { PDL_ENTER                      \
        embed_impl<T>(tok, emb, pos, xf, xd, state, T_, d, pos_offset);                                           \
    }                                                                                                            \
    extern "C" __global__ void add_positions_##TN(float* x, const u16* pos, const int* state, int T_, int d,      \
                                                  int pos_offset) { PDL_ENTER                                               \
        add_positions_impl<T>(x, pos, state, T_, d, pos_offset);                                                  \
    }                                                                                                            \
    extern "C" __global__ void to_half_##TN(const float* x, u16* out, long long n) { PDL_ENTER to_half_impl<T>(x, out, n); } \
    extern "C" __global__ void fill_random_##TN(u16* p, long long n, unsigned long long seed, float scale) { PDL_ENTER     \
        fill_random_impl<T>(p, n, seed, scale);                                                                   \
    }

EMBED_KERNELS(f16, F16)
EMBED_KERNELS(bf16, BF16)

extern "C" __global__ void gather_rows(const u16* src, const int* idx, u16* dst, int d) { PDL_ENTER
    gather_rows_impl(src, idx, dst, d);
}
