// Top-k selection on the device, with the host reference's rules (src/sparse/select.rs): the k largest scores of a
// row are kept, ties broken by the lower index, NaN ranked below every number, -0 equal to +0; k >= N keeps every
// unit, k = 0 none. Two kernels:
//   topk_mark_*    one block per row: an exact radix select of the k-th largest key, then the keep flags in index
//                  order (so the ties kept are the lowest indices); rows of at most TOPK_SHORT units count each
//                  unit's rank directly;
//   topk_compact*  one block: the union of the rows' flags as an ascending id list (the kept set the gather kernels
//                  read), each row's own flags per kept id (a 0/1 factor, so a row uses only its own neurons), and
//                  optionally a 16-bit source gathered onto the kept ids with the rows' flags applied.
// For one row, topk_mark_* can also do topk_compact's work in the same launch (its `idx` argument).

// Order-preserving key of a score: larger float, larger key. NaN gets 0 (below -inf's key), -0 the key of +0.
__device__ __forceinline__ u32 score_key(float x) {
    if (x != x) return 0u;
    u32 u = x == 0.0f ? 0u : __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct ScoreF32 {
    static __device__ __forceinline__ float at(const void* s, size_t i) { return ((const float*)s)[i]; }
};
// |v| of a 16-bit hidden value (the exact-down rule ranks the hidden values by magnitude).
template <typename T>
struct ScoreAbs {
    static __device__ __forceinline__ float at(const void* s, size_t i) { return fabsf(T::load(((const u16*)s)[i])); }
};

// Exclusive prefix sum over the block (every thread passes one value); `red` holds at least 33 ints. Also returns
// the block's total in `total`.
__device__ __forceinline__ int block_excl_scan(int v, int* red, int& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    int inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += n;
    }
    __syncthreads();
    if (lane == 31) red[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        int w = lane < nw ? red[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int n = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += n;
        }
        if (lane < nw) red[lane] = w; // inclusive prefix of the warps' sums
        if (lane == nw - 1) red[32] = w;
    }
    __syncthreads();
    total = red[32];
    return inc - v + (warp > 0 ? red[warp - 1] : 0);
}

// Rows of at most this many units take the one-pass rank count instead of the radix select.
#define TOPK_SHORT 256

// Grid: B blocks (one per row); block: any multiple of 32 up to 1024 threads.
// With `cached` (and N * 4 bytes of dynamic shared memory) the row's keys are read from global memory once and every
// pass runs over shared memory; without, each pass reads the scores again.
template <typename S>
__device__ __forceinline__ void topk_mark_impl(const void* __restrict__ scores, // [B, N] scores, row stride N
                                               int N, int k,
                                               unsigned char* __restrict__ keep, // [B, N] out: 1 kept, 0 not
                                               int cached) {
    extern __shared__ u32 topk_keys[]; // [N] with `cached`
    const int b = blockIdx.x;
    const size_t row = (size_t)b * N;
    unsigned char* kr = keep + row;
    if (k >= N || k <= 0) {
        const unsigned char v = k > 0 ? 1 : 0;
        for (int i = threadIdx.x; i < N; i += blockDim.x) kr[i] = v;
        return;
    }
    // Short rows (heads: 9-128 units): each unit's rank counted against every other in one pass over shared
    // memory, kept when fewer than k rank above it (larger key, or an equal key at a lower index).
    if (N <= TOPK_SHORT && N <= (int)blockDim.x) {
        __shared__ u32 skey[TOPK_SHORT];
        const int i = threadIdx.x;
        u32 mine = 0;
        if (i < N) skey[i] = mine = score_key(S::at(scores, row + i));
        __syncthreads();
        if (i < N) {
            int above = 0;
            for (int j = 0; j < N; j++) {
                const u32 o = skey[j];
                above += (o > mine) || (o == mine && j < i);
            }
            kr[i] = above < k;
        }
        return;
    }
    if (cached) {
        for (int i = threadIdx.x; i < N; i += blockDim.x) topk_keys[i] = score_key(S::at(scores, row + i));
        __syncthreads();
    }
    auto key_at = [&](int i) -> u32 { return cached ? topk_keys[i] : score_key(S::at(scores, row + i)); };
    __shared__ u32 hist[256];
    __shared__ u32 s_prefix;
    __shared__ int s_need;
    __shared__ int red[33];
    const int lane = threadIdx.x & 31;
    u32 prefix = 0, himask = 0;
    int need = k; // how many of the units matching `prefix` in the bits fixed so far are still to be kept
    for (int pass = 0; pass < 4; pass++) {
        const int shift = 24 - 8 * pass;
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        // Warp-aggregated histogram: the scores of a row share a few exponent bytes, so plain shared atomics on
        // the first passes serialise on one or two bins; each warp adds its equal bins once.
        for (int base = 0; base < N; base += blockDim.x) {
            const int i = base + threadIdx.x;
            u32 bin = 0;
            bool act = false;
            if (i < N) {
                const u32 key = key_at(i);
                act = (key & himask) == prefix;
                bin = (key >> shift) & 255u;
            }
            const unsigned am = __ballot_sync(0xffffffffu, act);
            if (act) {
                const unsigned peers = __match_any_sync(am, bin);
                if (__ffs(peers) - 1 == lane) atomicAdd(&hist[bin], (u32)__popc(peers));
            }
        }
        __syncthreads();
        // The bin holding the need-th largest matching key, by warp 0: lane l sums bins 255-8l .. 248-8l, a
        // scan over the lanes finds the lane where the running count from the top reaches `need`.
        if (threadIdx.x < 32) {
            u32 c[8], sum = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                c[j] = hist[255 - (lane * 8 + j)];
                sum += c[j];
            }
            u32 inc = sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const u32 n = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += n;
            }
            const u32 excl = inc - sum;
            if (excl < (u32)need && (u32)need <= inc) {
                u32 above = excl;
                int d = 255 - lane * 8 - 7;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    if (above + c[j] >= (u32)need) {
                        d = 255 - (lane * 8 + j);
                        break;
                    }
                    above += c[j];
                }
                s_prefix = prefix | ((u32)d << shift);
                s_need = need - (int)above;
            }
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        himask |= 255u << shift;
        __syncthreads();
    }
    // `prefix` is the k-th largest key; every larger key is kept, and the first `need` equal ones in index order.
    const int seg = (N + blockDim.x - 1) / blockDim.x;
    const int i0 = min(N, (int)threadIdx.x * seg), i1 = min(N, i0 + seg);
    int eq = 0;
    for (int i = i0; i < i1; i++) eq += key_at(i) == prefix;
    int total;
    int before = block_excl_scan(eq, red, total);
    for (int i = i0; i < i1; i++) {
        const u32 key = key_at(i);
        unsigned char v = key > prefix;
        if (key == prefix) v = before++ < need;
        kr[i] = v;
    }
}

// The kept set of B rows' flags: idx[0 .. cnt) the ascending ids kept by at least one row; with `pre`, pre[b, s] =
// 1 or 0 (whether row b keeps idx[s], row stride N); with `src`/`dst`, dst[b, s] = src[b, idx[s]] where row b keeps
// it, else 0 (16-bit, row stride N). One block; every thread takes part.
__device__ __forceinline__ void topk_compact_impl(const unsigned char* keep, int N, int B, int* __restrict__ idx,
                                                  int* __restrict__ cnt, float* __restrict__ pre,
                                                  const u16* __restrict__ src, u16* __restrict__ dst) {
    __shared__ int red[33];
    const int seg = (N + blockDim.x - 1) / blockDim.x;
    const int i0 = min(N, (int)threadIdx.x * seg), i1 = min(N, i0 + seg);
    int mine = 0;
    for (int i = i0; i < i1; i++) {
        int any = 0;
        for (int b = 0; b < B; b++) any |= keep[(size_t)b * N + i];
        mine += any != 0;
    }
    int total;
    int s = block_excl_scan(mine, red, total);
    for (int i = i0; i < i1; i++) {
        int any = 0;
        for (int b = 0; b < B; b++) any |= keep[(size_t)b * N + i];
        if (!any) continue;
        idx[s] = i;
        for (int b = 0; b < B; b++) {
            const unsigned char kb = keep[(size_t)b * N + i];
            if (pre) pre[(size_t)b * N + s] = kb ? 1.0f : 0.0f;
            if (dst) dst[(size_t)b * N + s] = kb ? src[(size_t)b * N + i] : (u16)0;
        }
        s++;
    }
    if (threadIdx.x == 0) cnt[0] = total;
}

// With `idx` given (one row: a grid of one block), the same launch also compacts the row's flags into the kept set
// (as topk_compact with B = 1 and `src`/`dst`), saving the second launch on the batch-1 path. The flags are this
// block's own global writes, visible to its threads after the barrier.
#define TOPK_MARK(NAME, S)                                                                                          \
    extern "C" __global__ void NAME(const void* scores, int N, int k, unsigned char* keep, int cached, int* idx,    \
                                    int* cnt, const u16* src, u16* dst) {                                           \
        PDL_ENTER                                                                                                   \
        topk_mark_impl<S>(scores, N, k, keep, cached);                                                              \
        if (idx) {                                                                                                  \
            __syncthreads();                                                                                        \
            topk_compact_impl(keep, N, 1, idx, cnt, nullptr, src, dst);                                             \
        }                                                                                                           \
    }
TOPK_MARK(topk_mark_f32, ScoreF32)
TOPK_MARK(topk_mark_absf16, ScoreAbs<F16>)
TOPK_MARK(topk_mark_absbf16, ScoreAbs<BF16>)

// One block (1024 threads): topk_compact_impl over B rows of flags.
extern "C" __global__ void topk_compact(const unsigned char* __restrict__ keep, // [B, N]
                                        int N, int B,
                                        int* __restrict__ idx,   // [N] out
                                        int* __restrict__ cnt,   // [1] out
                                        float* __restrict__ pre, // [B, N] out, or null
                                        const u16* __restrict__ src, // [B, N] or null
                                        u16* __restrict__ dst) {     // [B, N] out, or null
    PDL_ENTER
    topk_compact_impl(keep, N, B, idx, cnt, pre, src, dst);
}

// The head-sparse attention's row lists from a kept head set (one block): `qkv_rows` the q rows of the kept heads
// (head h: rows h*hd .. h*hd + hd) followed by every k and v row (H*hd .. (H + 2 KV)*hd), and `o_rows` the kept
// heads' columns of the out-projection (the rows of its transposed copy), both ascending.
extern "C" __global__ void expand_heads(const int* __restrict__ heads, // [H] kept head ids, ascending
                                        const int* __restrict__ hcnt,  // [1]
                                        int H, int KV, int hd,
                                        int kv_kept, // 1: only the k/v rows of key/value heads with a kept query head
                                        int* __restrict__ qkv_rows,    // [(H + 2 KV) * hd] out
                                        int* __restrict__ qkv_cnt,     // [1] out
                                        int* __restrict__ o_rows,      // [H * hd] out
                                        int* __restrict__ o_cnt) {     // [1] out
    PDL_ENTER
    __shared__ int groups[256];
    __shared__ int ng;
    const int n = min(hcnt[0], H);
    for (int i = threadIdx.x; i < n * hd; i += blockDim.x) {
        const int r = heads[i / hd] * hd + i % hd;
        qkv_rows[i] = r;
        o_rows[i] = r;
    }
    // The key/value heads computed: every one, or (kv_kept) those of the kept heads, ascending (heads ascend).
    if (threadIdx.x == 0) {
        const int G = H / KV;
        ng = 0;
        for (int j = 0; j < KV && j < 256; j++) {
            bool any = !kv_kept;
            for (int i = 0; i < n && !any; i++) any = heads[i] / G == j;
            if (any) groups[ng++] = j;
        }
    }
    __syncthreads();
    const int m = ng;
    for (int i = threadIdx.x; i < m * hd; i += blockDim.x) {
        const int g = groups[i / hd], c = i % hd;
        qkv_rows[n * hd + i] = H * hd + g * hd + c;          // k rows of the group
        qkv_rows[n * hd + m * hd + i] = (H + KV) * hd + g * hd + c; // its v rows
    }
    if (threadIdx.x == 0) {
        qkv_cnt[0] = n * hd + 2 * m * hd;
        o_cnt[0] = n * hd;
    }
}
