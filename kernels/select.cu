// Top-k selection on the device, with the host reference's rules (src/sparse/select.rs): the k largest scores of a
// row are kept, ties broken by the lower index, NaN ranked below every number, -0 equal to +0; k >= N keeps every
// unit, k = 0 none. Two kernels:
//   topk_mark_*    one block per row: an exact select of the k-th largest key (a 12-bit histogram, then a radix
//                  select over that bin's keys; or four 8-bit radix passes over the row), then the keep flags in
//                  index order (so the ties kept are the lowest indices); rows of at most TOPK_SHORT units count
//                  each unit's rank directly;
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
    static constexpr bool f32 = true;
    static __device__ __forceinline__ float at(const void* s, size_t i) { return ((const float*)s)[i]; }
};
// |v| of a 16-bit hidden value (the exact-down rule ranks the hidden values by magnitude).
template <typename T>
struct ScoreAbs {
    static constexpr bool f32 = false;
    static __device__ __forceinline__ float at(const void* s, size_t i) { return fabsf(T::load(((const u16*)s)[i])); }
};

// Inclusive prefix sum over the 32 lanes of a warp (every lane takes part).
template <typename V>
__device__ __forceinline__ V warp_incl_scan(V v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const V n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

// Exclusive prefix sum over the block (every thread passes one value); `red` holds at least 33 ints. Also returns
// the block's total in `total`.
__device__ __forceinline__ int block_excl_scan(int v, int* red, int& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    const int inc = warp_incl_scan(v, lane);
    __syncthreads();
    if (lane == 31) red[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        const int w = warp_incl_scan(lane < nw ? red[lane] : 0, lane);
        if (lane < nw) red[lane] = w; // inclusive prefix of the warps' sums
        if (lane == nw - 1) red[32] = w;
    }
    __syncthreads();
    total = red[32];
    return inc - v + (warp > 0 ? red[warp - 1] : 0);
}

// One digit of a radix select over `n` keys (key_at(j), j < n): among the keys matching `prefix` on `himask`, the
// digit (key >> shift) & dmask (dmask + 1 <= 256 bins) holding the need-th largest is fixed into `prefix`, and
// `need` becomes the rank still to find among the keys matching the longer prefix. Every thread of the block calls
// it; the histogram is warp-aggregated (the keys of a row share a few exponent bytes, so plain shared atomics on
// the first digits serialise on one or two bins), with four keys read before the first of their atomics.
template <typename KeyAt>
__device__ __forceinline__ void radix_digit(KeyAt key_at, int n, int shift, u32 dmask, u32& prefix, u32& himask,
                                            int& need, u32* hist, u32* s_prefix, int* s_need) {
    const int lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int base = 0; base < n; base += 4 * blockDim.x) {
        u32 kk[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = base + u * blockDim.x + threadIdx.x;
            kk[u] = i < n ? key_at(i) : 0u;
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = base + u * blockDim.x + threadIdx.x;
            const bool act = i < n && (kk[u] & himask) == prefix;
            const u32 bin = (kk[u] >> shift) & dmask;
            const unsigned am = __ballot_sync(0xffffffffu, act);
            if (act) {
                const unsigned peers = __match_any_sync(am, bin);
                if (__ffs(peers) - 1 == lane) atomicAdd(&hist[bin], (u32)__popc(peers));
            }
        }
    }
    __syncthreads();
    // The bin holding the need-th largest matching key, by warp 0: lane l sums bins 255-8l .. 248-8l, a scan over
    // the lanes finds the lane where the running count from the top reaches `need`.
    if (threadIdx.x < 32) {
        u32 c[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            c[j] = hist[255 - (lane * 8 + j)];
            sum += c[j];
        }
        const u32 inc = warp_incl_scan(sum, lane);
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
            *s_prefix = prefix | ((u32)d << shift);
            *s_need = need - (int)above;
        }
    }
    __syncthreads();
    prefix = *s_prefix;
    need = *s_need;
    himask |= dmask << shift;
    __syncthreads();
}

// Rows of at most this many units take the one-pass rank count instead of the radix select.
#define TOPK_SHORT 256
// Candidates the binned select holds (keys of the k-th key's 12-bit bin); more take the radix path.
#define TOPK_CAP 4096

// Grid: B blocks (one per row); block: any multiple of 32 up to 1024 threads.
// With `cached` (and N * 4 bytes of dynamic shared memory) the row's keys are read from global memory once and every
// pass runs over shared memory; without, each pass reads the scores again. `algo` 1 (with `cached` and (N + 4096 +
// 2 TOPK_CAP) * 4 bytes of dynamic shared memory): the binned select; 0: the radix passes over the whole row.
// With `idx` (one row), the kept ids also go out in ascending order (idx, cnt) and, with `src`/`dst`, the 16-bit
// source gathered onto them (dst[s] = src[idx[s]]): topk_compact's work for B = 1, done from the keys in this block
// instead of re-reading the flags from global memory.
// A row's N keys into shared memory `keys`, eight loads in flight per thread before the stores; with `h12`, each
// key's top 12 bits counted there too (the binned select's histogram).
template <typename S>
__device__ __forceinline__ void load_keys(const void* __restrict__ scores, size_t row, int N, u32* keys, u32* h12) {
    for (int i0 = threadIdx.x; i0 < N; i0 += 8 * blockDim.x) {
        u32 kk[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = i0 + u * blockDim.x;
            kk[u] = i < N ? score_key(S::at(scores, row + i)) : 0u;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = i0 + u * blockDim.x;
            if (i < N) {
                keys[i] = kk[u];
                if (h12) atomicAdd(&h12[kk[u] >> 20], 1u);
            }
        }
    }
}

template <typename S>
__device__ __forceinline__ void topk_mark_impl(const void* __restrict__ scores, // [B, N] scores, row stride N
                                               int N, int k,
                                               unsigned char* __restrict__ keep, // [B, N] out: 1 kept, 0 not
                                               int cached, int* __restrict__ idx, int* __restrict__ cnt,
                                               const u16* __restrict__ src, u16* __restrict__ dst, int algo) {
    extern __shared__ u32 topk_keys[]; // [N] with `cached`
    __shared__ int red[33];
    const int b = blockIdx.x;
    const size_t row = (size_t)b * N;
    unsigned char* kr = keep + row;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const unsigned lt = (1u << lane) - 1u;
    if (k >= N || k <= 0) {
        const unsigned char v = k > 0 ? 1 : 0;
        for (int i = threadIdx.x; i < N; i += blockDim.x) {
            kr[i] = v;
            if (idx && v) {
                idx[i] = i;
                if (dst) dst[i] = src[i];
            }
        }
        if (idx && threadIdx.x == 0) cnt[0] = v ? N : 0;
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
        int v = 0;
        if (i < N) {
            int above = 0;
            for (int j = 0; j < N; j++) {
                const u32 o = skey[j];
                above += (o > mine) || (o == mine && j < i);
            }
            v = above < k;
            kr[i] = v;
        }
        if (idx) {
            int total;
            const int pos = block_excl_scan(v, red, total);
            if (v) {
                idx[pos] = i;
                if (dst) dst[pos] = src[i];
            }
            if (threadIdx.x == 0) cnt[0] = total;
        }
        return;
    }
    // Per-warp counts of the keys above the k-th (s_gt) and equal to it (s_eq), over each warp's contiguous run of
    // the row (a multiple of 32 units), for the index-order marking at the end.
    __shared__ int s_gt[32], s_eq[32], s_eqoff[32], s_koff[32];
    __shared__ u32 hist[256];
    __shared__ u32 s_prefix;
    __shared__ int s_need, s_bin, s_m, s_fill;
    const int per = ((N + nw - 1) / nw + 31) & ~31;
    const int w0 = min(N, warp * per), w1 = min(N, w0 + per);
    u32 prefix = 0, himask = 0;
    int need = k; // how many of the units matching `prefix` in the bits fixed so far are still to be kept
    bool counted = false;
    if (algo == 1 && cached) {
        // Binned select: the keys go to shared memory while a 4,096-bin histogram of their top 12 bits (sign, 8
        // exponent bits, 3 mantissa bits) is built; the bin holding the k-th largest key is found; one pass over
        // the row counts each warp's keys in higher bins and copies the keys of that bin (with their indices) to a
        // candidate list; the rest of the select (20 bits, three passes) runs over the candidates only, and they
        // also give each warp's count of keys above and equal to the k-th. The row is read three times (load,
        // candidates, marking) instead of six as in the radix path below, which runs when the bin holds more
        // than TOPK_CAP keys.
        u32* h12 = topk_keys + N;                 // [4096]
        u32* ckey = h12 + 4096;                   // [TOPK_CAP]
        int* cidx = (int*)(ckey + TOPK_CAP);      // [TOPK_CAP]
        for (int i = threadIdx.x; i < 4096; i += blockDim.x) h12[i] = 0;
        if (threadIdx.x == 0) s_fill = 0;
        __syncthreads();
        const float* rowf = S::f32 ? (const float*)scores + row : nullptr;
        if (S::f32 && (N & 3) == 0 && ((size_t)rowf & 15) == 0) {
            // f32 scores four to a 16-byte load, up to 8 loads in flight a thread (20,480 scores: one round trip).
            const float4* s4 = (const float4*)rowf;
            uint4* k4 = (uint4*)topk_keys;
            const int N4 = N >> 2;
            for (int j0 = threadIdx.x; j0 < N4; j0 += 8 * blockDim.x) {
                float4 v[8];
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const int j = j0 + u * blockDim.x;
                    if (j < N4) v[u] = s4[j];
                }
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const int j = j0 + u * blockDim.x;
                    if (j < N4) {
                        const uint4 q = make_uint4(score_key(v[u].x), score_key(v[u].y), score_key(v[u].z), score_key(v[u].w));
                        k4[j] = q;
                        atomicAdd(&h12[q.x >> 20], 1u);
                        atomicAdd(&h12[q.y >> 20], 1u);
                        atomicAdd(&h12[q.z >> 20], 1u);
                        atomicAdd(&h12[q.w >> 20], 1u);
                    }
                }
            }
        } else {
            load_keys<S>(scores, row, N, topk_keys, h12);
        }
        __syncthreads();
        // Thread t sums a run of bins from the top; a block scan finds the thread whose run reaches the k-th key.
        const int bpt = (4096 + blockDim.x - 1) / blockDim.x;
        const int p0 = min(4096, (int)threadIdx.x * bpt), p1 = min(4096, p0 + bpt);
        int sum = 0;
        for (int p = p0; p < p1; p++) sum += (int)h12[4095 - p];
        int total;
        const int excl = block_excl_scan(sum, red, total);
        if (excl < need && need <= excl + sum) {
            int above = excl;
            for (int p = p0; p < p1; p++) {
                const int c = (int)h12[4095 - p];
                if (above + c >= need) {
                    s_bin = 4095 - p;
                    s_need = need - above;
                    s_m = c;
                    break;
                }
                above += c;
            }
        }
        __syncthreads();
        const int bin = s_bin, m = s_m;
        if (m <= TOPK_CAP) {
            need = s_need;
            int gt = 0;
            for (int base = w0; base < w1; base += 32) {
                const int i = base + lane;
                const u32 key = i < w1 ? topk_keys[i] : 0u;
                const int b = (int)(key >> 20);
                gt += __popc(__ballot_sync(0xffffffffu, i < w1 && b > bin));
                const bool in = i < w1 && b == bin;
                const unsigned ib = __ballot_sync(0xffffffffu, in);
                if (ib) {
                    int at = 0;
                    if (lane == 0) at = atomicAdd(&s_fill, __popc(ib));
                    at = __shfl_sync(0xffffffffu, at, 0);
                    if (in) {
                        const int pos = at + __popc(ib & lt);
                        ckey[pos] = key;
                        cidx[pos] = i;
                    }
                }
            }
            if (lane == 0) {
                s_gt[warp] = gt;
                s_eq[warp] = 0;
            }
            __syncthreads();
            prefix = (u32)bin << 20;
            himask = 0xfff00000u;
            auto cand = [&](int j) -> u32 { return ckey[j]; };
            radix_digit(cand, m, 12, 255u, prefix, himask, need, hist, &s_prefix, &s_need);
            radix_digit(cand, m, 4, 255u, prefix, himask, need, hist, &s_prefix, &s_need);
            radix_digit(cand, m, 0, 15u, prefix, himask, need, hist, &s_prefix, &s_need);
            for (int j = threadIdx.x; j < m; j += blockDim.x) {
                const u32 key = ckey[j];
                const int w = cidx[j] / per;
                if (key > prefix) atomicAdd(&s_gt[w], 1);
                else if (key == prefix) atomicAdd(&s_eq[w], 1);
            }
            counted = true;
        }
    } else if (cached) {
        load_keys<S>(scores, row, N, topk_keys, nullptr);
        __syncthreads();
    }
    auto key_at = [&](int i) -> u32 { return cached ? topk_keys[i] : score_key(S::at(scores, row + i)); };
    if (!counted) {
        // Radix select: four 8-bit passes over the row.
        for (int pass = 0; pass < 4; pass++)
            radix_digit(key_at, N, 24 - 8 * pass, 255u, prefix, himask, need, hist, &s_prefix, &s_need);
        // `prefix` is the k-th largest key. Each warp counts its larger and equal keys.
        int gt = 0, eq = 0;
        for (int base = w0; base < w1; base += 32) {
            const int i = base + lane;
            const u32 key = i < w1 ? key_at(i) : 0u;
            gt += __popc(__ballot_sync(0xffffffffu, i < w1 && key > prefix));
            eq += __popc(__ballot_sync(0xffffffffu, i < w1 && key == prefix));
        }
        if (lane == 0) {
            s_gt[warp] = gt;
            s_eq[warp] = eq;
        }
    }
    // `prefix` is the k-th largest key; every larger key is kept, and the first `need` equal ones in index order.
    // Warp 0 turns the warps' counts into each warp's offsets (equal keys before it, kept units before it); then
    // each warp writes its flags and, with `idx`, its kept ids at their ranks.
    __syncthreads();
    if (warp == 0) {
        const int g = lane < nw ? s_gt[lane] : 0, q = lane < nw ? s_eq[lane] : 0;
        const int qi = warp_incl_scan(q, lane);
        const int qoff = qi - q;
        const int kq = min(max(need - qoff, 0), q);
        const int kept = g + kq;
        const int ki = warp_incl_scan(kept, lane);
        s_eqoff[lane] = qoff;
        s_koff[lane] = ki - kept;
        if (lane == 31 && idx) cnt[0] = ki;
    }
    __syncthreads();
    int eqrun = s_eqoff[warp], krun = s_koff[warp];
    if (cached && (N & 3) == 0 && (((size_t)kr) & 3) == 0) {
        // Four consecutive units a lane (one 16-byte key load, one 4-byte flag store): a quarter of the steps.
        // Every run [w0, w1) starts at a multiple of 32 and N is a multiple of 4, so a lane's four units are all in
        // the run or all past it. Ranks in index order: lanes before this one, then units before it in the lane.
        for (int base = w0; base < w1; base += 128) {
            const int i0 = base + 4 * lane;
            const bool in = i0 < w1;
            u32 k4[4] = {0u, 0u, 0u, 0u};
            if (in) {
                const uint4 v = *(const uint4*)(topk_keys + i0);
                k4[0] = v.x; k4[1] = v.y; k4[2] = v.z; k4[3] = v.w;
            }
            unsigned gm = 0u, qm = 0u;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                gm |= (unsigned)(in && k4[e] > prefix) << e;
                qm |= (unsigned)(in && k4[e] == prefix) << e;
            }
            const int qc = __popc(qm);
            const int qin = warp_incl_scan(qc, lane);
            const int qbefore = eqrun + qin - qc;
            unsigned vm = gm;
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (((qm >> e) & 1u) && qbefore + __popc(qm & ((1u << e) - 1u)) < need) vm |= 1u << e;
            const int vc = __popc(vm);
            const int vin = warp_incl_scan(vc, lane);
            if (in) {
                *(u32*)(kr + i0) = (vm & 1u) | ((vm >> 1) & 1u) << 8 | ((vm >> 2) & 1u) << 16 | ((vm >> 3) & 1u) << 24;
                if (idx) {
                    int pos = krun + vin - vc;
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        if ((vm >> e) & 1u) {
                            idx[pos] = i0 + e;
                            if (dst) dst[pos] = src[i0 + e];
                            pos++;
                        }
                    }
                }
            }
            eqrun += __shfl_sync(0xffffffffu, qin, 31);
            krun += __shfl_sync(0xffffffffu, vin, 31);
        }
        return;
    }
    for (int base = w0; base < w1; base += 32) {
        const int i = base + lane;
        const u32 key = i < w1 ? key_at(i) : 0u;
        const bool q = i < w1 && key == prefix;
        const unsigned qb = __ballot_sync(0xffffffffu, q);
        const bool v = i < w1 && (key > prefix || (q && eqrun + __popc(qb & lt) < need));
        const unsigned vb = __ballot_sync(0xffffffffu, v);
        if (i < w1) {
            kr[i] = v;
            if (idx && v) {
                const int pos = krun + __popc(vb & lt);
                idx[pos] = i;
                if (dst) dst[pos] = src[i];
            }
        }
        eqrun += __popc(qb);
        krun += __popc(vb);
    }
}

// The kept set of B rows' flags: idx[0 .. cnt) the ascending ids kept by at least one row; with `pre`, pre[b, s] =
// 1 or 0 (whether row b keeps idx[s], row stride N); with `src`/`dst`, dst[b, s] = src[b, idx[s]] where row b keeps
// it, else 0 (16-bit, row stride N). One block; every thread takes part.
// The union flags of units i .. i + 3 (i = c0 + 4 * threadIdx.x) over the B rows, one byte a unit.
__device__ __forceinline__ u32 union4(const unsigned char* __restrict__ keep, int N, int B, int i, u32* wv) {
    u32 any = 0;
#pragma unroll
    for (int b = 0; b < 16; b++) {
        wv[b] = b < B && i < N ? *(const u32*)(keep + (size_t)b * N + i) : 0u;
        any |= wv[b];
    }
    return any;
}

__device__ __forceinline__ int kept4(u32 any) {
    int m = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) m += ((any >> (8 * j)) & 0xffu) != 0u;
    return m;
}

// topk_compact's work for the units c0 .. c0 + 4 * blockDim.x (N % 4 == 0, B <= 16, `keep` 4-byte aligned), four
// consecutive units a thread, their first slot `base`: each row's flags read with one coalesced 4-byte load a
// thread (all rows' loads in flight together), the ids and flags written in runs. Returns the units kept here.
__device__ __forceinline__ int compact_chunk4(const unsigned char* __restrict__ keep, int N, int B, int c0, int base,
                                              int* __restrict__ idx, float* __restrict__ pre,
                                              const u16* __restrict__ src, u16* __restrict__ dst, int* red) {
    const int i = c0 + 4 * threadIdx.x;
    u32 wv[16];
    const u32 any = union4(keep, N, B, i, wv);
    int total;
    int s = base + block_excl_scan(kept4(any), red, total);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        if (((any >> (8 * j)) & 0xffu) == 0u) continue;
        idx[s] = i + j;
#pragma unroll
        for (int b = 0; b < 16; b++) {
            if (b >= B) break;
            const bool kb = ((wv[b] >> (8 * j)) & 0xffu) != 0u;
            if (pre) pre[(size_t)b * N + s] = kb ? 1.0f : 0.0f;
            if (dst) dst[(size_t)b * N + s] = kb ? src[(size_t)b * N + i + j] : (u16)0;
        }
        s++;
    }
    return total;
}

__device__ __forceinline__ void topk_compact_impl(const unsigned char* keep, int N, int B, int* __restrict__ idx,
                                                  int* __restrict__ cnt, float* __restrict__ pre,
                                                  const u16* __restrict__ src, u16* __restrict__ dst) {
    __shared__ int red[33];
    if ((N & 3) == 0 && B <= 16 && ((size_t)keep & 3) == 0) {
        int base = 0;
        for (int c0 = 0; c0 < N; c0 += 4 * blockDim.x) base += compact_chunk4(keep, N, B, c0, base, idx, pre, src, dst, red);
        if (threadIdx.x == 0) cnt[0] = base;
        return;
    }
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

// With `idx` given (one row: a grid of one block), the same launch also writes the row's kept set (as topk_compact
// with B = 1 and `src`/`dst`), saving the second launch on the batch-1 path.
#define TOPK_MARK(NAME, S)                                                                                          \
    extern "C" __global__ void NAME(const void* scores, int N, int k, unsigned char* keep, int cached, int* idx,    \
                                    int* cnt, const u16* src, u16* dst, int algo) {                                 \
        PDL_ENTER                                                                                                   \
        topk_mark_impl<S>(scores, N, k, keep, cached, idx, cnt, src, dst, algo);                                    \
    }
TOPK_MARK(topk_mark_f32, ScoreF32)
TOPK_MARK(topk_mark_absf16, ScoreAbs<F16>)
TOPK_MARK(topk_mark_absbf16, ScoreAbs<BF16>)

// topk_compact_impl over B rows of flags: one block (1,024 threads), or, launched with more than one block (N % 4
// == 0, B <= 16, `keep` 4-byte aligned; the host checks), block c takes the units 4 c blockDim.x .. + 4 blockDim.x:
// its first slot is the union count of the units before it, which it counts itself from the flags (no second
// launch, no scratch; the last block's recount is the longest), and the last block writes the count.
extern "C" __global__ void topk_compact(const unsigned char* __restrict__ keep, // [B, N]
                                        int N, int B,
                                        int* __restrict__ idx,   // [N] out
                                        int* __restrict__ cnt,   // [1] out
                                        float* __restrict__ pre, // [B, N] out, or null
                                        const u16* __restrict__ src, // [B, N] or null
                                        u16* __restrict__ dst) {     // [B, N] out, or null
    PDL_ENTER
    if (gridDim.x == 1) {
        topk_compact_impl(keep, N, B, idx, cnt, pre, src, dst);
        return;
    }
    __shared__ int red[33];
    const int c0 = blockIdx.x * 4 * blockDim.x;
    int before = 0;
#pragma unroll 2
    for (int i = 4 * threadIdx.x; i < c0; i += 4 * blockDim.x) {
        u32 wv[16];
        before += kept4(union4(keep, N, B, i, wv));
    }
    int base;
    block_excl_scan(before, red, base);
    const int total = compact_chunk4(keep, N, B, c0, base, idx, pre, src, dst, red);
    if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) cnt[0] = base + total;
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
    __shared__ int groups[256], sheads[256], used[256];
    __shared__ int ng;
    const int n = min(hcnt[0], H);
    for (int i = threadIdx.x; i < n && i < 256; i += blockDim.x) sheads[i] = heads[i];
    for (int j = threadIdx.x; j < KV && j < 256; j += blockDim.x) used[j] = !kv_kept;
    __syncthreads();
    for (int i = threadIdx.x; i < n * hd; i += blockDim.x) {
        const int r = sheads[i / hd] * hd + i % hd;
        qkv_rows[i] = r;
        o_rows[i] = r;
    }
    // The key/value heads computed: every one, or (kv_kept) those of the kept heads, ascending (heads ascend).
    const int G = H / KV;
    if (kv_kept)
        for (int i = threadIdx.x; i < n && i < 256; i += blockDim.x) used[sheads[i] / G] = 1; // every writer stores 1
    __syncthreads();
    if (threadIdx.x == 0) {
        int c = 0;
        for (int j = 0; j < KV && j < 256; j++)
            if (used[j]) groups[c++] = j;
        ng = c;
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
