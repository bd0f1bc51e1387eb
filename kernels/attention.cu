// Attention over the KV cache, for prefill (T > 1) and decode (T = 1) alike.
// Token n = b * T + t sits at position p = state[0] + t and attends causally to cache positions [0, p].
// The cache of each layer is [rows, kv_heads, max_len, head_dim] in the 16-bit type; query head h reads kv head
// h / (heads / kv_heads) (grouped-query attention).

// The rotation of the pair (x1, x2) = (v[i], v[i + hd / 2]) at position p (rotate-half layout, as transformers'
// Llama): one formula for rope_kv and the fused decode attention, so both give the same bits.
__device__ __forceinline__ void rope_pair(float& x1, float& x2, int i, int hd, int p, float l2t) {
    const float inv = exp2f(-2.0f * (float)i / (float)hd * l2t);
    float s, c;
    sincosf((float)p * inv, &s, &c);
    const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
    x1 = y1;
    x2 = y2;
}

// RoPE on q and k (rotate-half layout, as transformers' Llama), then k and v written into the cache. `qkv` is the
// fused projection output [N, (H + 2 KV) * hd] in f32: q is rotated in place, k and v are stored in the cache.
template <typename T>
__device__ __forceinline__ void rope_kv_impl(
    float* __restrict__ qkv,       // [N, (H + 2 KV) * hd]
    u16* __restrict__ kc,          // [rows, KV, max_len, hd]
    u16* __restrict__ vc,          // [rows, KV, max_len, hd]
    const int* __restrict__ state, // [1]: positions cached before this forward
    int seq, int H, int KV, int hd, int max_len, float theta, int rope,
    const unsigned char* __restrict__ hkeep, // [N, H] each token's kept heads (`--head-kv kept`), or null: all
    unsigned char* __restrict__ pres) {      // [rows, KV, max_len] out, or null: 1 where the k/v head was computed
    // Block (n, h): token n, head h < H (a query head) or h - H (a key head, which also stores its value head).
    const int n = blockIdx.x, h = blockIdx.y, b = n / seq, t = n % seq;
    const int p = state[0] + t;
    const int half = hd >> 1;
    float* q = qkv + (size_t)n * (H + 2 * KV) * hd;
    float* base = q + h * hd; // k heads follow the q heads
    const float l2t = __log2f(theta);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float x1 = base[i], x2 = base[i + half];
        if (rope) rope_pair(x1, x2, i, hd, p, l2t);
        if (h < H) {
            base[i] = x1;
            base[i + half] = x2;
        } else {
            u16* dst = kc + (((size_t)b * KV + (h - H)) * max_len + p) * hd;
            dst[i] = T::store(x1);
            dst[i + half] = T::store(x2);
        }
    }
    if (h >= H) {
        const int j = h - H;
        if (pres && threadIdx.x == 0) { // present where one of the key/value head's query heads is kept
            const int G = H / KV;
            unsigned char any = hkeep ? 0 : 1;
            if (hkeep)
                for (int m = 0; m < G; m++) any |= hkeep[(size_t)n * H + j * G + m];
            pres[((size_t)b * KV + j) * max_len + p] = any ? 1 : 0;
        }
        const float* v = q + (H + KV + j) * hd;
        u16* dst = vc + (((size_t)b * KV + j) * max_len + p) * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = T::store(v[i]);
    }
}

// One split of the keys of one (token, head): a block of 128 threads walks keys [start, end) of split s in tiles
// of 128 with an online softmax and writes the unnormalised partial (max m, sum l, acc[hd]) to `part`
// [(N * H) * S, hd + 2]. head_dim must be a power of two from 8 to 256.
// With ROPE (decode, one token per row: `attn_split_rope_*`), the RoPE launch is folded in: the block rotates its
// query from `qkv` itself, takes this token's key and value from `qkv` (rotated, rounded to the cache's type, as the
// cache would hold them), and the block of the split holding the position whose head is the first of its kv group
// writes them (and the presence flag, as rope_kv does) into the cache; no block reads the cache at that position.
// The same bits as rope_kv + attn_split (engine-check compares them).
#define ATT_THREADS 128
template <typename T, int HD, bool ROPE = false>
__device__ __forceinline__ void attn_split_impl(
    const float* __restrict__ qkv, // [N, (H + 2 KV) * hd], q first
    const u16* __restrict__ kc,    // [rows, KV, max_len, hd]
    const u16* __restrict__ vc,    // [rows, KV, max_len, hd]
    float* __restrict__ part,      // [N * H * S, hd + 2]
    const int* __restrict__ state, int seq, int H, int KV, int hd_, int max_len, int S, float scale,
    u16* __restrict__ direct,      // [N, H * hd]: with S == 1, the normalised output goes straight here
    const unsigned char* __restrict__ hkeep, // [N, H] or null: 0 = head dropped by its token (output 0)
    const unsigned char* __restrict__ pres, // [rows, KV, max_len] or null: an earlier key whose flag is 0 is skipped
    float theta = 0.0f, int rope = 0,       // ROPE: as rope_kv's
    const unsigned char* __restrict__ rk_hkeep = 0, // ROPE: rope_kv's `hkeep`
    unsigned char* __restrict__ pres_out = 0) {     // ROPE: rope_kv's `pres`

    const int hd = HD;
    __shared__ float kps[ROPE ? HD : 1], vps[ROPE ? HD : 1]; // ROPE: this token's key and value as cached
    __shared__ float qs[256];
    __shared__ float ps[ATT_THREADS];
    __shared__ float red[32];
    __shared__ float accs[8 * ATT_THREADS];
    const int nh = blockIdx.x, n = nh / H, h = nh % H, s = blockIdx.y;
    if (ROPE) { // seq == 1: row b = n, position p = state[0]
        const int p = state[0], G = H / KV, j = h / G;
        const int chunk = (p + S) / S, start = s * chunk, end = min(p + 1, start + chunk);
        const bool writer = h % G == 0 && start <= p && p < end;
        const float* kq = qkv + (size_t)n * (H + 2 * KV) * HD + (H + j) * HD;
        const float l2t = __log2f(theta);
        for (int i = threadIdx.x; i < HD / 2; i += blockDim.x) {
            float x1 = kq[i], x2 = kq[i + HD / 2];
            if (rope) rope_pair(x1, x2, i, HD, p, l2t);
            const u16 c1 = T::store(x1), c2 = T::store(x2);
            kps[i] = T::load(c1);
            kps[i + HD / 2] = T::load(c2);
            if (writer) {
                u16* dst = (u16*)kc + (((size_t)n * KV + j) * max_len + p) * HD;
                dst[i] = c1;
                dst[i + HD / 2] = c2;
            }
        }
        for (int i = threadIdx.x; i < HD; i += blockDim.x) {
            const u16 c = T::store(kq[KV * HD + i]); // the value head follows the key heads
            vps[i] = T::load(c);
            if (writer) ((u16*)vc)[(((size_t)n * KV + j) * max_len + p) * HD + i] = c;
        }
        if (writer && pres_out && threadIdx.x == 0) {
            unsigned char any = rk_hkeep ? 0 : 1;
            if (rk_hkeep)
                for (int g = 0; g < G; g++) any |= rk_hkeep[(size_t)n * H + j * G + g];
            pres_out[((size_t)n * KV + j) * max_len + p] = any ? 1 : 0;
        }
        __syncthreads();
    }
    if (hkeep && !hkeep[nh]) { // a dropped head reads nothing: a zero output (an empty partial for the combine)
        if (direct) {
            for (int i = threadIdx.x; i < HD; i += blockDim.x) direct[(size_t)nh * HD + i] = (u16)0;
        } else {
            float* out = part + ((size_t)nh * S + s) * (HD + 2);
            for (int i = threadIdx.x; i < HD + 2; i += blockDim.x) out[i] = i == 0 ? NEG_INF : 0.0f;
        }
        return;
    }
    const int b = n / seq, t = n % seq;
    const int len = state[0] + t + 1;
    const int chunk = (len + S - 1) / S;
    const int start = s * chunk;
    const int end = min(len, start + chunk);
    const int j = h / (H / KV);
    const size_t kvbase = ((size_t)b * KV + j) * max_len * hd;
    const unsigned char* pr = pres ? pres + ((size_t)b * KV + j) * max_len : 0;
    const float* q = qkv + (size_t)n * (H + 2 * KV) * hd + h * hd;
    if (ROPE) {
        const float l2t = __log2f(theta);
        for (int i = threadIdx.x; i < HD / 2; i += blockDim.x) {
            float x1 = q[i], x2 = q[i + HD / 2];
            if (rope) rope_pair(x1, x2, i, HD, len - 1, l2t);
            qs[i] = x1 * scale;
            qs[i + HD / 2] = x2 * scale;
        }
    } else {
        for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = q[i] * scale;
    }
    __syncthreads();
    // hd = 256: two value dims per thread, read key by key.
    float acc0 = 0.0f, acc1 = 0.0f;
    float m = NEG_INF, l = 0.0f;
    // Values (hd <= 128): thread t holds the 16-byte chunk t % C of the value rows of keys tile + t / C + KG * u,
    // u < KPT, loaded with the keys, before the softmax needs them, so a tile costs one round trip to memory.
    constexpr int C = HD <= ATT_THREADS ? HD / 8 : 1;
    constexpr int KG = ATT_THREADS / C;
    constexpr int KPT = HD <= ATT_THREADS ? ATT_THREADS / KG : 1;
    const int ch = threadIdx.x % C, kg = threadIdx.x / C;
    float av[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int tile = start; tile < end; tile += ATT_THREADS) {
        const int key = tile + threadIdx.x;
        const int nk = min(ATT_THREADS, end - tile);
        const u16* vt = vc + kvbase + (size_t)tile * hd;
        // A key skipped by its token (absent) is not attended to; the query's own position always is.
        const bool live = key < end && (!pr || key == len - 1 || pr[key]);
        uint4 kv[HD / 8];
        const bool own = ROPE && key == len - 1; // this token's key: from kps, not the cache
        if (live && !own) {
            const uint4* kr = (const uint4*)(kc + kvbase + (size_t)key * hd);
#pragma unroll
            for (int c = 0; c < HD / 8; c++) kv[c] = kr[c];
        }
        uint4 vv[KPT];
        if (HD <= ATT_THREADS) {
#pragma unroll
            for (int u = 0; u < KPT; u++) {
                const int kk = kg + KG * u;
                vv[u] = kk < nk ? ((const uint4*)(vt + (size_t)kk * hd))[ch] : make_uint4(0, 0, 0, 0);
            }
        }
        float sc = NEG_INF;
        if (live) {
            float dot = 0.0f;
#pragma unroll
            for (int c = 0; c < HD / 8; c++) {
                float kf[8];
                if (own) {
#pragma unroll
                    for (int e = 0; e < 8; e++) kf[e] = kps[c * 8 + e];
                } else {
                    unpack8<T>(kv[c], kf);
                }
#pragma unroll
                for (int e = 0; e < 8; e++) dot = fmaf(qs[c * 8 + e], kf[e], dot);
            }
            sc = dot;
        }
        const float mt = block_max(sc, red);
        const float mnew = fmaxf(m, mt);
        // Absent keys (and keys past the end) weigh 0; a tile with none present leaves the state as it was.
        const float pv = sc != NEG_INF ? expf(sc - mnew) : 0.0f;
        ps[threadIdx.x] = pv;
        const float lt = block_sum(pv, red); // its barriers also publish ps
        const float corr = m != NEG_INF ? expf(m - mnew) : 0.0f;
        l = l * corr + lt;
        m = mnew;
        if (HD <= ATT_THREADS) {
#pragma unroll
            for (int e = 0; e < 8; e++) av[e] *= corr;
#pragma unroll
            for (int u = 0; u < KPT; u++) {
                const int kk = kg + KG * u;
                if (kk < nk) {
                    float vf[8];
                    if (ROPE && tile + kk == len - 1) {
#pragma unroll
                        for (int e = 0; e < 8; e++) vf[e] = vps[ch * 8 + e];
                    } else {
                        unpack8<T>(vv[u], vf);
                    }
                    const float p = ps[kk];
#pragma unroll
                    for (int e = 0; e < 8; e++) av[e] = fmaf(p, vf[e], av[e]);
                }
            }
        } else {
            acc0 *= corr;
            acc1 *= corr;
            for (int kk = 0; kk < nk; kk++) {
                const bool ownv = ROPE && tile + kk == len - 1;
                acc0 = fmaf(ps[kk], ownv ? vps[threadIdx.x] : T::load(vt[(size_t)kk * hd + threadIdx.x]), acc0);
                acc1 = fmaf(ps[kk], ownv ? vps[threadIdx.x + ATT_THREADS] : T::load(vt[(size_t)kk * hd + threadIdx.x + ATT_THREADS]), acc1);
            }
        }
        __syncthreads(); // ps is rewritten by the next tile
    }
    float* out = part + ((size_t)nh * S + s) * (hd + 2);
    u16* dout = direct ? direct + (size_t)nh * hd : 0;
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
    if (hd <= ATT_THREADS) {
        // Sum the key groups: accs[kg][dim].
#pragma unroll
        for (int e = 0; e < 8; e++) accs[kg * HD + ch * 8 + e] = av[e];
        __syncthreads();
        if (threadIdx.x < hd) {
            float a = 0.0f;
            for (int g = 0; g < KG; g++) a += accs[g * HD + threadIdx.x];
            if (dout) dout[threadIdx.x] = T::store(a * inv_l);
            else out[2 + threadIdx.x] = a;
        }
    } else if (dout) {
        dout[threadIdx.x] = T::store(acc0 * inv_l);
        dout[threadIdx.x + ATT_THREADS] = T::store(acc1 * inv_l);
    } else {
        out[2 + threadIdx.x] = acc0;
        out[2 + threadIdx.x + ATT_THREADS] = acc1;
    }
    if (threadIdx.x == 0 && !dout) {
        out[0] = m;
        out[1] = l;
    }
}

// Merge the S partials of each (token, head) into the attention output [N, H * hd] (16-bit, or f32 with `o32`: the
// dense decode step's, read unrounded by the out-projection). Block: hd threads.
template <typename T>
__device__ __forceinline__ void attn_combine_impl(const float* __restrict__ part, // [N * H * S, hd + 2]
                                                  void* __restrict__ out,         // [N, H * hd]
                                                  int hd, int S, int o32) {
    const int nh = blockIdx.x, i = threadIdx.x;
    if (i >= hd) return;
    const float v = attn_merge(part + (size_t)nh * S * (hd + 2), S, hd, i);
    if (o32) ((float*)out)[(size_t)nh * hd + i] = v;
    else ((u16*)out)[(size_t)nh * hd + i] = T::store(v);
}

#define ATTN_SPLIT_ROPE(TN, T, HD)                                                                             \
    extern "C" __global__ void attn_split_rope_##TN##_h##HD(                                                     \
        const float* qkv, u16* kc, u16* vc, float* part, const int* state, int T_, int H, int KV, int hd,         \
        int max_len, int S, float scale, u16* direct, const unsigned char* hkeep, const unsigned char* pres,      \
        float theta, int rope, const unsigned char* rk_hkeep, unsigned char* pres_out) { PDL_ENTER               \
        attn_split_impl<T, HD, true>(qkv, kc, vc, part, state, T_, H, KV, hd, max_len, S, scale, direct, hkeep,   \
                                     pres, theta, rope, rk_hkeep, pres_out);                                     \
    }
#define ATTN_SPLIT(TN, T, HD)                                                                                  \
    extern "C" __global__ void attn_split_##TN##_h##HD(const float* qkv, const u16* kc, const u16* vc, float* part, \
                                                       const int* state, int T_, int H, int KV, int hd, int max_len, \
                                                       int S, float scale, u16* direct, const unsigned char* hkeep,   \
                                                       const unsigned char* pres) { PDL_ENTER                          \
        attn_split_impl<T, HD>(qkv, kc, vc, part, state, T_, H, KV, hd, max_len, S, scale, direct, hkeep, pres);     \
    }

#define ATTN_KERNELS(TN, T)                                                                                       \
    extern "C" __global__ void rope_kv_##TN(float* qkv, u16* kc, u16* vc, const int* state, int T_, int H, int KV, \
                                            int hd, int max_len, float theta, int rope, const unsigned char* hkeep,  \
                                            unsigned char* pres) { PDL_ENTER                                          \
        rope_kv_impl<T>(qkv, kc, vc, state, T_, H, KV, hd, max_len, theta, rope, hkeep, pres);                      \
    }                                                                                                             \
    ATTN_SPLIT(TN, T, 8) ATTN_SPLIT(TN, T, 16) ATTN_SPLIT(TN, T, 32) ATTN_SPLIT(TN, T, 64) ATTN_SPLIT(TN, T, 128) \
    ATTN_SPLIT(TN, T, 256)                                                                                        \
    ATTN_SPLIT_ROPE(TN, T, 8) ATTN_SPLIT_ROPE(TN, T, 16) ATTN_SPLIT_ROPE(TN, T, 32) ATTN_SPLIT_ROPE(TN, T, 64)      \
    ATTN_SPLIT_ROPE(TN, T, 128) ATTN_SPLIT_ROPE(TN, T, 256)                                                       \
    extern "C" __global__ void attn_combine_##TN(const float* part, void* out, int hd, int S, int o32) { PDL_ENTER          \
        attn_combine_impl<T>(part, out, hd, S, o32);                                                               \
    }

ATTN_KERNELS(f16, F16)
ATTN_KERNELS(bf16, BF16)
