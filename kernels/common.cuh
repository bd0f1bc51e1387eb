// Shared by every kernel file: NVRTC compiles kernels/*.cu as one program with this prelude first.
// Storage types are raw 16-bit words (f16 or bf16); all arithmetic is f32. No CUDA headers are needed.
typedef unsigned short u16;
typedef unsigned int u32;
#define NEG_INF __int_as_float(0xff800000)

// Element i of one head's attention output merged from its S key-split partials `pp` ([S, hd + 2]: running max,
// sum of weights, unnormalised output; kernels/attention.cu): attn_combine and the out-projection that merges
// them itself (gemv_comb, kernels/gemv.cu) share it, so both compute the same values.
__device__ __forceinline__ float attn_merge(const float* __restrict__ pp, int S, int hd, int i) {
    float M = NEG_INF;
    for (int s = 0; s < S; s++) M = fmaxf(M, pp[s * (hd + 2)]);
    float num = 0.0f, den = 0.0f;
    for (int s = 0; s < S; s++) {
        const float ms = pp[s * (hd + 2)];
        if (ms == NEG_INF) continue; // an empty split
        const float wgt = expf(ms - M);
        den += wgt * pp[s * (hd + 2) + 1];
        num += wgt * pp[s * (hd + 2) + 2 + i];
    }
    return den > 0.0f ? num / den : 0.0f;
}

struct F16 {
    static __device__ __forceinline__ float load(u16 h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ u16 store(float f) {
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
    // Two packed elements of one 32-bit word, element 0 in the low half.
    static __device__ __forceinline__ void unpack2(u32 v, float& a, float& b) {
        a = load((u16)(v & 0xffffu));
        b = load((u16)(v >> 16));
    }
};

struct BF16 {
    static __device__ __forceinline__ float load(u16 h) { return __uint_as_float(((u32)h) << 16); }
    static __device__ __forceinline__ u16 store(float f) {
        u16 h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
    static __device__ __forceinline__ void unpack2(u32 v, float& a, float& b) {
        a = __uint_as_float(v << 16);
        b = __uint_as_float(v & 0xffff0000u);
    }
};

// Programmatic dependent launch (sm_90+). The engine may launch a kernel while the previous one in the stream still
// runs; such a kernel reads only immutable weights before `pdl_wait()`, which returns once the previous kernel has
// finished and its writes are visible. `pdl_launch()` lets the next kernel start launching; every kernel calls it
// after its own wait, so at most two kernels are in flight. Both are no-ops for a plain launch.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// A barrier over the whole grid, for a kernel whose blocks are all resident at once (the host sizes its grid by
// the occupancy calculator and it calls `pdl_launch` only after its last barrier, so no later kernel can take the
// slots of its blocks not yet resident). bar [2] u32, zero before the first launch: arrivals, then a generation
// the last block to arrive advances (after resetting the arrivals), so the barrier is reusable within a launch and
// across replays. Every thread's writes before it are visible to every thread after it (the block barriers on
// either side and thread 0's device-scope fences, as a cooperative grid sync).
__device__ __forceinline__ void grid_barrier(unsigned* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        volatile unsigned* gen = bar + 1;
        const unsigned g0 = *gen; // read before arriving: the generation cannot advance without this block
        __threadfence();
        if (atomicAdd(bar, 1u) == gridDim.x - 1) {
            atomicExch(bar, 0u);
            __threadfence();
            atomicAdd(bar + 1, 1u);
        } else {
            while (*gen == g0) {
            }
        }
        __threadfence();
    }
    __syncthreads();
}
// Both, for kernels with nothing to do before their inputs are ready.
#define PDL_ENTER \
    pdl_wait();   \
    pdl_launch();

// 16-byte load that bypasses L1 (weights are streamed once per step).
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// The same, kept in program order before what follows (issued ahead of `pdl_wait`).
__device__ __forceinline__ uint4 ld_stream_first(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

template <typename T>
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
    T::unpack2(v.x, f[0], f[1]);
    T::unpack2(v.y, f[2], f[3]);
    T::unpack2(v.z, f[4], f[5]);
    T::unpack2(v.w, f[6], f[7]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; `red` holds at least 32 floats; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.0f;
    return warp_sum(t);
}

// Mean (0 when `rms`) and 1 / sqrt(variance + eps) of the row `xr` of `n` values, over the block: two passes (sum,
// then squared deviations), thread t summing elements t, t + blockDim.x, ... (so every caller rounds alike).
__device__ __forceinline__ void row_stats(const float* xr, int n, bool rms, float eps, float* red, float& mean,
                                          float& rstd) {
    mean = 0.0f;
    if (!rms) {
        float s = 0.0f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
        mean = block_sum(s, red) / n;
    }
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = xr[i] - mean;
        ss += v * v;
    }
    rstd = rsqrtf(block_sum(ss, red) / n + eps);
}

__device__ __forceinline__ float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : NEG_INF;
    return warp_max(t);
}

// out[0..8) += v[0..8) with vector atomic adds (sm_90; scalar adds below): the sparse down projections'
// partial sums meeting in the f32 residual stream.
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
