// Grok-1 layer kernels, compiled at run time by NVRTC (see cuda/device.rs), in f32 unless a
// name says otherwise. Activations are row-major [rows, width]; int8 matrices are the
// checkpoint's [K, N] with scales [G, N] (row k uses scale row k / (K / G)).
//
// Every reduction runs in a fixed order, so a step gives the same bits every time it runs.

typedef unsigned int u32;
typedef unsigned short bf16;  // raw bits: NVRTC then needs no CUDA headers
typedef unsigned long long u64;

#define WARP 32
#define NEG_INF __int_as_float(0xff800000)

// f32 to bf16, rounding to nearest even (NaN stays NaN).
__device__ __forceinline__ bf16 f2bf(float f) {
    u32 b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (bf16)((b >> 16) | 0x40);
    return (bf16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the total.
__device__ float block_sum(float v, float *scratch) {
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < nw; i++) t += scratch[i];
    return t;
}

// h[r] = emb[tokens[r]] * scale.
extern "C" __global__ void embed(float *h, const float *emb, const u32 *tokens, int d, float scale) {
    const float *src = emb + (u64)tokens[blockIdx.x] * d;
    float *dst = h + (u64)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i] * scale;
}

// out[r] = w * x[r] / sqrt(mean(x[r]^2) + eps) * post (post folds a constant scale in).
extern "C" __global__ void rmsnorm(const float *x, const float *w, float *out, int d, float eps,
                                   float post) {
    __shared__ float scratch[32];
    const float *xr = x + (u64)blockIdx.x * d;
    float *o = out + (u64)blockIdx.x * d;
    float s = 0.f;
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i] * xr[i];
    float inv = 1.f / sqrtf(block_sum(s, scratch) / d + eps);
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = w[i] * (xr[i] * inv) * post;
}

// Row t of a residual update: y[t], or with gates given, the experts' per-slot outputs
// y[t * k + j] summed with gates[t * k + j] in choice order (the CPU backend's combine).
__device__ __forceinline__ float update_at(const float *y, const float *gates, int k, int t,
                                           int d, int i) {
    if (!gates) return y[(u64)t * d + i];
    float a = 0.f;
    for (int j = 0; j < k; j++) a += gates[t * k + j] * y[(u64)(t * k + j) * d + i];
    return a;
}

// Softmax and top-k of one row's router logits (ties to the lower index, as jax.lax.top_k);
// the gates are the probabilities, not renormalised.
__device__ void route_top_k(float *logits, int experts, int k, int *picks, float *gates) {
    float m = NEG_INF, sum = 0.f;
    for (int e = 0; e < experts; e++) m = fmaxf(m, logits[e]);
    for (int e = 0; e < experts; e++) {
        logits[e] = expf(logits[e] - m);
        sum += logits[e];
    }
    for (int e = 0; e < experts; e++) logits[e] /= sum;
    u64 taken = 0;
    for (int i = 0; i < k; i++) {
        int best = -1;
        for (int e = 0; e < experts; e++)
            if (!((taken >> e) & 1) && (best < 0 || logits[e] > logits[best])) best = e;
        taken |= 1ull << best;
        picks[i] = best;
        gates[i] = logits[best];
    }
}

// One row per block, the release's post-norm residual update and what follows it:
//   h[t] += rmsnorm(update_at(t)) * w;
//   with w2:     out[t] = rmsnorm(h[t]) * w2 * post (the next norm, in the same pass);
//   with router: the router's top-k of out[t] (router [d, E], E <= 64) at picks[t * k..],
//                gates at pgates[t * k..] (the MoE's routing, no launch of its own).
extern "C" __global__ void residual_norm(float *h, const float *y, const float *gates, int k,
                                         const float *w, const float *w2, float *out, int d,
                                         float eps, float post, const float *router,
                                         int experts, int *picks, float *pgates) {
    __shared__ float scratch[32 * 8];
    __shared__ float logits[64];
    int t = blockIdx.x, tid = threadIdx.x;
    float *hr = h + (u64)t * d;
    float s = 0.f;
#pragma unroll 4
    for (int i = tid; i < d; i += blockDim.x) {
        float v = update_at(y, gates, k, t, d, i);
        s += v * v;
    }
    float inv = 1.f / sqrtf(block_sum(s, scratch) / d + eps);
    float s2 = 0.f;
#pragma unroll 4
    for (int i = tid; i < d; i += blockDim.x) {
        float v = hr[i] + w[i] * (update_at(y, gates, k, t, d, i) * inv);
        hr[i] = v;
        s2 += v * v;
    }
    if (!w2) return;
    float inv2 = 1.f / sqrtf(block_sum(s2, scratch) / d + eps);
    float *o = out + (u64)t * d;
    // With 8 experts the router's logits come from the values as they are written.
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    bool eight = router && experts == 8;
#pragma unroll 4
    for (int i = tid; i < d; i += blockDim.x) {
        float v = w2[i] * (hr[i] * inv2) * post;
        o[i] = v;
        if (eight) {
            const float4 *r4 = (const float4 *)(router + (u64)i * 8);
            float4 w0 = __ldg(r4), w1 = __ldg(r4 + 1);
            a[0] += v * w0.x; a[1] += v * w0.y; a[2] += v * w0.z; a[3] += v * w0.w;
            a[4] += v * w1.x; a[5] += v * w1.y; a[6] += v * w1.z; a[7] += v * w1.w;
        }
    }
    if (!router) return;
    int lane = tid % WARP, wi = tid / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    if (eight) {
        // The eight sums at once: a shuffle tree per warp, then the warps in order.
#pragma unroll
        for (int e = 0; e < 8; e++) a[e] = warp_sum(a[e]);
        __syncthreads();
        if (lane == 0)
#pragma unroll
            for (int e = 0; e < 8; e++) scratch[wi * 8 + e] = a[e];
        __syncthreads();
        if (tid < 8) {
            float v = 0.f;
            for (int i = 0; i < nw; i++) v += scratch[i * 8 + tid];
            logits[tid] = v;
        }
    } else {
        // Any other expert count: a block sum per expert over the row just written.
        for (int e = 0; e < experts; e++) {
            float v = 0.f;
            for (int i = tid; i < d; i += blockDim.x) v += o[i] * router[(u64)i * experts + e];
            v = block_sum(v, scratch);
            if (tid == 0) logits[e] = v;
        }
    }
    __syncthreads();
    if (tid == 0) route_top_k(logits, experts, k, picks + t * k, pgates + t * k);
}

// Rotate-half RoPE of row r's q heads (in place) and k heads to positions[r]; the rotated k
// row and the v row go to pool row slots[r] of this layer's caches.
extern "C" __global__ void rope_kv(float *q, const float *k, const float *v, float *kc,
                                   float *vc, const u32 *positions, const u32 *slots,
                                   const float *inv_freq, int q_heads, int kv_heads,
                                   int head_dim) {
    int half = head_dim / 2, kvd = kv_heads * head_dim;
    float p = (float)positions[blockIdx.x];
    float *qr = q + (u64)blockIdx.x * q_heads * head_dim;
    for (int i = threadIdx.x; i < q_heads * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        float s, c;
        sincosf(p * inv_freq[j], &s, &c);
        float *a = qr + h * head_dim;
        float x1 = a[j], x2 = a[j + half];
        a[j] = x1 * c - x2 * s;
        a[j + half] = x2 * c + x1 * s;
    }
    const float *kr = k + (u64)blockIdx.x * kvd;
    u64 dst = (u64)slots[blockIdx.x] * kvd;
    for (int i = threadIdx.x; i < kv_heads * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        float s, c;
        sincosf(p * inv_freq[j], &s, &c);
        const float *a = kr + h * head_dim;
        float x1 = a[j], x2 = a[j + half];
        kc[dst + h * head_dim + j] = x1 * c - x2 * s;
        kc[dst + h * head_dim + j + half] = x2 * c + x1 * s;
    }
    const float *vr = v + (u64)blockIdx.x * kvd;
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) vc[dst + i] = vr[i];
}

// The keys [kbeg, kend) of key split `split` of `splits`: the first `visible` keys in chunks
// of whole multiples of `granule` (a split past the end is empty).
__device__ __forceinline__ void key_range(int visible, int splits, int split, int granule,
                                          int *kbeg, int *kend) {
    int chunk = ((visible + splits - 1) / splits + granule - 1) / granule * granule;
    *kbeg = split * chunk;
    *kend = min(visible, *kbeg + chunk);
}

// Causal grouped-query attention with the soft cap, over the paged cache, flash style: one
// block per (tile of a sequence's new tokens, kv head, key split); the tile's rows are its
// tokens times the q heads sharing the kv head, so decode reads each cached key once per kv
// head. R (rows per tile) is 16 for decode steps and 64 for prefill.
//   tiles: [num_tiles, 4] = (first q row, tokens, position of the first token, offset of the
//   sequence's slot list in `slots`); slots[off + j] is the pool row of position j.
//   blockIdx.y = kv head * splits + split. With splits > 1 each block takes one chunk of the
//   keys and writes its unnormalised output, max and sum for attention_combine.
// Dynamic shared memory: see attention_smem_bytes in device.rs.
#define ATT_KEYS 32
template <int R>
__device__ void attention(const float *q, const float *kc, const float *vc, float *out,
                          const int *tiles, const u32 *slots, int q_heads, int kv_heads,
                          int head_dim, float mult, float cap, int splits, float *part_o,
                          float *part_ml) {
    extern __shared__ float sm[];
    int hd = head_dim, group = q_heads / kv_heads;
    int kvh = blockIdx.y / splits, split = blockIdx.y % splits;
    const int *t = tiles + 4 * blockIdx.x;
    int row0 = t[0], ntok = t[1], pos0 = t[2], off = t[3];
    int rows = ntok * group;
    float *sq = sm;                        // [R][hd]
    float *sk = sq + R * hd;               // [ATT_KEYS][hd + 1]
    float *sv = sk + ATT_KEYS * (hd + 1);  // [ATT_KEYS][hd]
    float *sp = sv + ATT_KEYS * hd;        // [R][ATT_KEYS]
    float *sm_max = sp + R * ATT_KEYS;     // [R]
    float *sm_sum = sm_max + R;            // [R]
    float *sm_corr = sm_sum + R;           // [R]
    int qd = q_heads * hd, kvd = kv_heads * hd;
    for (int i = threadIdx.x; i < rows * hd; i += blockDim.x) {
        int r = i / hd, c = i % hd;
        int tok = r / group, h = kvh * group + r % group;
        sq[r * hd + c] = q[(u64)(row0 + tok) * qd + h * hd + c];
    }
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
        sm_max[r] = NEG_INF;
        sm_sum[r] = 0.f;
    }
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    int visible = pos0 + ntok;  // keys the last token of the tile sees
    // This split's keys: chunks of whole key tiles.
    int kbeg, kend;
    key_range(visible, splits, split, ATT_KEYS, &kbeg, &kend);
    for (int j0 = kbeg; j0 < kend; j0 += ATT_KEYS) {
        int nk = min(ATT_KEYS, kend - j0);
        __syncthreads();
        // Eight loads in flight per thread and array, not one at a time.
        for (int base = threadIdx.x; base < nk * hd; base += 8 * blockDim.x) {
            float kr[8], vr[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                int i = base + u * blockDim.x;
                if (i < nk * hd) {
                    int j = i / hd, c = i - j * hd;
                    u64 src = (u64)slots[off + j0 + j] * kvd + kvh * hd + c;
                    kr[u] = kc[src];
                    vr[u] = vc[src];
                }
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                int i = base + u * blockDim.x;
                if (i < nk * hd) {
                    int j = i / hd, c = i - j * hd;
                    sk[j * (hd + 1) + c] = kr[u];
                    sv[j * hd + c] = vr[u];
                }
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < rows * ATT_KEYS; i += blockDim.x) {
            int r = i / ATT_KEYS, j = i % ATT_KEYS;
            float s = NEG_INF;
            if (j < nk && j0 + j <= pos0 + r / group) {
                const float *qr = sq + r * hd, *kr = sk + j * (hd + 1);
                float a = 0.f;
                for (int c = 0; c < hd; c++) a += qr[c] * kr[c];
                a *= mult;
                s = cap * tanhf(a / cap);
            }
            sp[r * ATT_KEYS + j] = s;
        }
        __syncthreads();
        for (int r = threadIdx.x; r < rows; r += blockDim.x) {
            float m_old = sm_max[r], m = m_old;
            for (int j = 0; j < nk; j++) m = fmaxf(m, sp[r * ATT_KEYS + j]);
            // A row may see no key of this chunk yet (m stays -inf, everything is 0).
            float corr = (m_old == NEG_INF) ? 0.f : expf(m_old - m);
            float l = 0.f;
            for (int j = 0; j < ATT_KEYS; j++) {
                float s = sp[r * ATT_KEYS + j];
                float e = (s == NEG_INF) ? 0.f : expf(s - m);
                sp[r * ATT_KEYS + j] = e;
                l += e;
            }
            sm_sum[r] = sm_sum[r] * corr + l;
            sm_max[r] = m;
            sm_corr[r] = corr;
        }
        __syncthreads();
        // One thread per column (the launch has blockDim.x >= hd); constant trip counts keep
        // acc in registers.
        int c = threadIdx.x;
        if (c < hd) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (r < rows) {
                    float a = acc[r] * sm_corr[r];
                    for (int j = 0; j < nk; j++) a += sp[r * ATT_KEYS + j] * sv[j * hd + c];
                    acc[r] = a;
                }
            }
        }
    }
    __syncthreads();
    int c = threadIdx.x;
    if (c < hd) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (r < rows) {
                int tok = r / group, h = kvh * group + r % group;
                if (splits == 1) {
                    out[(u64)(row0 + tok) * qd + h * hd + c] = acc[r] / sm_sum[r];
                } else {
                    u64 part = ((u64)blockIdx.x * gridDim.y + blockIdx.y) * R + r;
                    part_o[part * hd + c] = acc[r];
                    if (c == 0) {
                        part_ml[2 * part] = sm_max[r];
                        part_ml[2 * part + 1] = sm_sum[r];
                    }
                }
            }
        }
    }
}

#define ATTENTION(R)                                                                          \
    extern "C" __global__ void attention_##R(                                                 \
        const float *q, const float *kc, const float *vc, float *out, const int *tiles,       \
        const u32 *slots, int q_heads, int kv_heads, int head_dim, float mult, float cap,     \
        int splits, float *part_o, float *part_ml) {                                          \
        attention<R>(q, kc, vc, out, tiles, slots, q_heads, kv_heads, head_dim, mult, cap,    \
                     splits, part_o, part_ml);                                                \
    }
ATTENTION(16)
ATTENTION(64)

// The prefill attention: the same contract as attention_64 (tiles, splits, partial outputs),
// register-tiled for long prompts, where attention_64's score loop waits on shared memory.
// A block of 128 threads takes 64 rows (tokens × the q heads of one kv head) against 64 keys
// at a time; thread (rg = tid / 8, kg = tid % 8) owns rows rg + 16i (i < 4), keys kg + 8j
// (j < 8) of the score tile, and HD / 8 columns of the output (pf_col). The 8 threads of
// a row are adjacent lanes: row maxima and sums go through shuffles. Rows and keys are
// interleaved that way, and shared rows padded by 4 floats, so that no two lanes of a load hit
// the same bank. Scores are summed over the head dimension in order, as attention_R does.
//   Dynamic shared memory: (2 * 64 * (HD + 4) + 64 * 68) floats (q, keys or values, p).
#define PF_R 64
#define PF_KEYS 64
#define PF_PS 68
// Output column e of thread kg: float4 runs of 4 (8 threads cover 32 adjacent columns), or
// pairs when the head is narrower than 32.
template <int HD>
__device__ __forceinline__ int pf_col(int kg, int e) {
    return HD >= 32 ? (e / 4) * 32 + kg * 4 + e % 4 : kg * (HD / 8) + e;
}

// The prefill kernels' threads (ATT_THREADS in device.rs; a test there checks the two agree).
#define ATT_CHUNK_THREADS 128
// A chunk of KEYS pool rows (HD floats of each, at `col0` of the row that `slots` names; zeros
// from row nk on), handed to store(row, column, value) a float4 at a time, rows across
// HD / 4 threads. A thread's loads go out 8 at a time before their stores: the rows are
// gathered by slot, and a loop of load-then-store would wait on memory once per row.
template <int HD, int KEYS, typename Store>
__device__ __forceinline__ void gather_chunk(const float *pool, const u32 *slots, int nk, int kvd,
                                             int col0, int tid, Store store) {
    constexpr int LOADS = KEYS * (HD / 4) / ATT_CHUNK_THREADS, BATCH = LOADS < 8 ? LOADS : 8;
    static_assert(LOADS % BATCH == 0, "whole batches");
#pragma unroll
    for (int b = 0; b < LOADS; b += BATCH) {
        float4 v[BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; u++) {
            int i = tid + ATT_CHUNK_THREADS * (b + u), j = i / (HD / 4), c = (i % (HD / 4)) * 4;
            v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (j < nk) v[u] = *(const float4 *)(pool + (u64)slots[j] * kvd + col0 + c);
        }
#pragma unroll
        for (int u = 0; u < BATCH; u++) {
            int i = tid + ATT_CHUNK_THREADS * (b + u);
            store(i / (HD / 4), (i % (HD / 4)) * 4, v[u]);
        }
    }
}

template <int HD>
__device__ void attention_prefill(const float *q, const float *kc, const float *vc, float *out,
                                  const int *tiles, const u32 *slots, int q_heads, int kv_heads,
                                  float mult, float cap, int splits, float *part_o,
                                  float *part_ml) {
    extern __shared__ float sm[];
    const int S = HD + 4, CPT = HD / 8;
    float *sq = sm;                  // [64][S]
    float *skv = sq + PF_R * S;      // [64][S]: keys, then values
    float *sp = skv + PF_KEYS * S;   // [64 keys][PF_PS]
    int tid = threadIdx.x, rg = tid / 8, kg = tid % 8;
    int group = q_heads / kv_heads;
    int kvh = blockIdx.y / splits, split = blockIdx.y % splits;
    // Tiles in reverse: a prompt's last tiles see the most keys, and started first they leave
    // the short ones for the grid's tail.
    int tile = gridDim.x - 1 - blockIdx.x;
    const int *t = tiles + 4 * tile;
    int row0 = t[0], ntok = t[1], pos0 = t[2], off = t[3];
    int rows = ntok * group;
    int qd = q_heads * HD, kvd = kv_heads * HD;
    for (int i = tid; i < PF_R * (HD / 4); i += blockDim.x) {
        int r = i / (HD / 4), c = (i % (HD / 4)) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < rows) {
            int tok = r / group, h = kvh * group + r % group;
            v = *(const float4 *)(q + (u64)(row0 + tok) * qd + h * HD + c);
        }
        *(float4 *)(sq + r * S + c) = v;
    }
    // The last key each of my rows sees (-1: a padding row sees none).
    int lastkey[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = rg + 16 * i;
        lastkey[i] = r < rows ? pos0 + r / group : -1;
    }
    float m_run[4], l_run[4], acc[4][CPT];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m_run[i] = NEG_INF;
        l_run[i] = 0.f;
#pragma unroll
        for (int e = 0; e < CPT; e++) acc[i][e] = 0.f;
    }
    int visible = pos0 + ntok;
    int kbeg, kend;
    key_range(visible, splits, split, PF_KEYS, &kbeg, &kend);
    for (int j0 = kbeg; j0 < kend; j0 += PF_KEYS) {
        int nk = min(PF_KEYS, kend - j0);
        __syncthreads();  // the previous tile's values and p are no longer read
        gather_chunk<HD, PF_KEYS>(kc, slots + off + j0, nk, kvd, kvh * HD, tid,
                                  [&](int j, int c, float4 v) { *(float4 *)(skv + j * S + c) = v; });
        __syncthreads();
        float s[4][8];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 8; j++) s[i][j] = 0.f;
#pragma unroll 2
        for (int c = 0; c < HD; c += 4) {
            float4 qv[4], kv[8];
#pragma unroll
            for (int i = 0; i < 4; i++) qv[i] = *(const float4 *)(sq + (rg + 16 * i) * S + c);
#pragma unroll
            for (int j = 0; j < 8; j++) kv[j] = *(const float4 *)(skv + (kg + 8 * j) * S + c);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    float a = s[i][j];
                    a += qv[i].x * kv[j].x;
                    a += qv[i].y * kv[j].y;
                    a += qv[i].z * kv[j].z;
                    a += qv[i].w * kv[j].w;
                    s[i][j] = a;
                }
        }
        // Soft cap, causal mask, online softmax; p goes to shared memory for the values.
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float mx = NEG_INF;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int key = j0 + kg + 8 * j;
                float v = NEG_INF;
                if (kg + 8 * j < nk && key <= lastkey[i]) {
                    float a = s[i][j] * mult;
                    v = cap * tanhf(a / cap);
                }
                s[i][j] = v;
                mx = fmaxf(mx, v);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            float m_new = fmaxf(m_run[i], mx);
            float corr = (m_run[i] == NEG_INF) ? 0.f : expf(m_run[i] - m_new);
            float l = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float e = (s[i][j] == NEG_INF) ? 0.f : expf(s[i][j] - m_new);
                sp[(kg + 8 * j) * PF_PS + rg + 16 * i] = e;
                l += e;
            }
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            l += __shfl_xor_sync(0xffffffffu, l, 4);
            l_run[i] = l_run[i] * corr + l;
            m_run[i] = m_new;
#pragma unroll
            for (int e = 0; e < CPT; e++) acc[i][e] *= corr;
        }
        __syncthreads();  // scores done with the keys; p written
        gather_chunk<HD, PF_KEYS>(vc, slots + off + j0, nk, kvd, kvh * HD, tid,
                                  [&](int j, int c, float4 v) { *(float4 *)(skv + j * S + c) = v; });
        __syncthreads();
        for (int j = 0; j < nk; j++) {
            float p[4], v[CPT];
#pragma unroll
            for (int i = 0; i < 4; i++) p[i] = sp[j * PF_PS + rg + 16 * i];
            if (HD >= 32) {
#pragma unroll
                for (int e = 0; e < CPT; e += 4) {
                    float4 t4 = *(const float4 *)(skv + j * S + pf_col<HD>(kg, e));
                    v[e] = t4.x;
                    v[(e + 1) % CPT] = t4.y;
                    v[(e + 2) % CPT] = t4.z;
                    v[(e + 3) % CPT] = t4.w;
                }
            } else {
#pragma unroll
                for (int e = 0; e < CPT; e++) v[e] = skv[j * S + pf_col<HD>(kg, e)];
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int e = 0; e < CPT; e++) acc[i][e] += p[i] * v[e];
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = rg + 16 * i;
        if (r >= rows) continue;
        int tok = r / group, h = kvh * group + r % group;
        if (splits == 1) {
#pragma unroll
            for (int e = 0; e < CPT; e++)
                out[(u64)(row0 + tok) * qd + h * HD + pf_col<HD>(kg, e)] = acc[i][e] / l_run[i];
        } else {
            u64 part = ((u64)tile * gridDim.y + blockIdx.y) * PF_R + r;
#pragma unroll
            for (int e = 0; e < CPT; e++) part_o[part * HD + pf_col<HD>(kg, e)] = acc[i][e];
            if (kg == 0) {
                part_ml[2 * part] = m_run[i];
                part_ml[2 * part + 1] = l_run[i];
            }
        }
    }
}

// The 64-row prefill kernels' entry points (attention_prefill and attention_tc), one per
// head size: attention_R's arguments (head_dim is the template's).
#define ATTENTION_TILED(KERNEL, HD)                                                           \
    extern "C" __global__ void __launch_bounds__(128) KERNEL##_##HD(                          \
        const float *q, const float *kc, const float *vc, float *out, const int *tiles,       \
        const u32 *slots, int q_heads, int kv_heads, int head_dim, float mult, float cap,     \
        int splits, float *part_o, float *part_ml) {                                          \
        KERNEL<HD>(q, kc, vc, out, tiles, slots, q_heads, kv_heads, mult, cap, splits, part_o, \
                   part_ml);                                                                  \
    }
ATTENTION_TILED(attention_prefill, 16)
ATTENTION_TILED(attention_prefill, 32)
ATTENTION_TILED(attention_prefill, 64)
ATTENTION_TILED(attention_prefill, 128)

// The decode attention: a tile of up to R rows (a token or two of one sequence × the q heads
// sharing a kv head) against the cached keys, for head sizes HD in {16, 32, 64, 128}. A key's
// row is HD / 4 lanes holding a float4 each, so a warp-wide load covers KPW = 128 / HD keys
// and a lane keeps DEC_U keys' k and v loads in flight at once (decode attention is bound by
// load latency: 8 MB of keys and values per layer of Grok-1 at 1024 tokens). A block of
// DEC_WARPS warps takes one key split of one (tile, kv head), each warp rounds of
// DEC_U * KPW keys. Scores are summed across a key's lanes by shuffles; every lane holds the
// same running max and sum of each row. The warps' states merge in warp order in shared
// memory. With key splits, each block writes its partial (as attention_R does) and the last
// block of a (tile, kv head) to finish merges them in split order (a counter per (tile, kv
// head), reset by that block): no second launch. Splits: at most DEC_MAX_SPLITS, each a
// whole multiple of DEC_WARPS * DEC_U * KPW keys (decode_key_granule in device.rs).
#define DEC_WARPS 4
#define DEC_U 8
#define DEC_MAX_SPLITS 64
template <int HD, int R>
__device__ void attention_decode(const float *q, const float *kc, const float *vc, float *out,
                                 const int *tiles, const u32 *slots, int q_heads, int kv_heads,
                                 float mult, float cap, int splits, float *part_o,
                                 float *part_ml, u32 *counters) {
    constexpr int L = HD / 4, KPW = WARP / L, ROUND = DEC_U * KPW;
    __shared__ __align__(16) float sq[R * HD];
    __shared__ __align__(16) float so[DEC_WARPS * R * HD];
    __shared__ float sml[DEC_WARPS * R * 2];
    __shared__ float sw[DEC_MAX_SPLITS * R], sls[R];
    __shared__ int last;
    int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    int sub = lane / L, cl = (lane % L) * 4;
    int group = q_heads / kv_heads;
    int kvh = blockIdx.y / splits, split = blockIdx.y % splits;
    const int *t = tiles + 4 * blockIdx.x;
    int row0 = t[0], ntok = t[1], pos0 = t[2], off = t[3];
    int rows = min(ntok * group, R);
    int qd = q_heads * HD, kvd = kv_heads * HD;
    for (int i = tid; i < rows * L; i += blockDim.x) {
        int r = i / L, c = (i % L) * 4;
        int tok = r / group, h = kvh * group + r % group;
        *(float4 *)(sq + r * HD + c) = *(const float4 *)(q + (u64)(row0 + tok) * qd + h * HD + c);
    }
    __syncthreads();
    float m[R], l[R];
    float4 acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        m[r] = NEG_INF;
        l[r] = 0.f;
        acc[r] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    int visible = pos0 + ntok;
    const int granule = DEC_WARPS * ROUND;
    int kbeg, kend;
    key_range(visible, splits, split, granule, &kbeg, &kend);
    const float *kb = kc + kvh * HD + cl, *vb = vc + kvh * HD + cl;
    for (int j0 = kbeg + warp * ROUND; j0 < kend; j0 += DEC_WARPS * ROUND) {
        float4 kr[DEC_U], vr[DEC_U];
#pragma unroll
        for (int u = 0; u < DEC_U; u++) {
            int j = j0 + u * KPW + sub;
            kr[u] = vr[u] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (j < kend) {
                u64 at = (u64)slots[off + j] * kvd;
                kr[u] = __ldg((const float4 *)(kb + at));
                vr[u] = __ldg((const float4 *)(vb + at));
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (r >= rows) continue;
            float4 qv = *(const float4 *)(sq + r * HD + cl);
            int lastkey = pos0 + r / group;  // the last key row r sees
            float s[DEC_U], mx = NEG_INF;
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                float a = qv.x * kr[u].x;
                a += qv.y * kr[u].y;
                a += qv.z * kr[u].z;
                a += qv.w * kr[u].w;
#pragma unroll
                for (int o = L / 2; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
                int j = j0 + u * KPW + sub;
                a *= mult;
                s[u] = (j < kend && j <= lastkey) ? cap * tanhf(a / cap) : NEG_INF;
                mx = fmaxf(mx, s[u]);
            }
#pragma unroll
            for (int o = L; o < WARP; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float mn = fmaxf(m[r], mx);
            // A row may see no key yet (mn stays -inf, everything is 0).
            float corr = m[r] == NEG_INF ? 0.f : expf(m[r] - mn);
            float4 a4 = acc[r];
            a4.x *= corr;
            a4.y *= corr;
            a4.z *= corr;
            a4.w *= corr;
            float ps = 0.f;
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                float p = s[u] == NEG_INF ? 0.f : expf(s[u] - mn);
                ps += p;
                a4.x += p * vr[u].x;
                a4.y += p * vr[u].y;
                a4.z += p * vr[u].z;
                a4.w += p * vr[u].w;
            }
#pragma unroll
            for (int o = L; o < WARP; o <<= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
            l[r] = l[r] * corr + ps;
            m[r] = mn;
            acc[r] = a4;
        }
    }
    // The lanes of different keys hold parts of the same columns: add them up.
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int o = L; o < WARP; o <<= 1) {
            acc[r].x += __shfl_xor_sync(0xffffffffu, acc[r].x, o);
            acc[r].y += __shfl_xor_sync(0xffffffffu, acc[r].y, o);
            acc[r].z += __shfl_xor_sync(0xffffffffu, acc[r].z, o);
            acc[r].w += __shfl_xor_sync(0xffffffffu, acc[r].w, o);
        }
        if (r < rows && sub == 0) *(float4 *)(so + (warp * R + r) * HD + cl) = acc[r];
        if (r < rows && lane == 0) {
            sml[(warp * R + r) * 2] = m[r];
            sml[(warp * R + r) * 2 + 1] = l[r];
        }
    }
    __syncthreads();
    // The warps' states merged in warp order, a float4 of one row per thread and pass.
    for (int i = tid; i < rows * L; i += blockDim.x) {
        int r = i / L, c = (i % L) * 4;
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) mx = fmaxf(mx, sml[(w * R + r) * 2]);
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        float ls = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) {
            float mw = sml[(w * R + r) * 2];
            if (mw != NEG_INF) {
                float e = expf(mw - mx);
                float4 v = *(const float4 *)(so + (w * R + r) * HD + c);
                o.x += v.x * e;
                o.y += v.y * e;
                o.z += v.z * e;
                o.w += v.w * e;
                ls += sml[(w * R + r) * 2 + 1] * e;
            }
        }
        int tok = r / group, h = kvh * group + r % group;
        if (splits == 1) {
            *(float4 *)(out + (u64)(row0 + tok) * qd + h * HD + c) =
                make_float4(o.x / ls, o.y / ls, o.z / ls, o.w / ls);
        } else {
            u64 part = ((u64)blockIdx.x * gridDim.y + blockIdx.y) * R + r;
            *(float4 *)(part_o + part * HD + c) = o;
            if (c == 0) {
                part_ml[2 * part] = mx;
                part_ml[2 * part + 1] = ls;
            }
        }
    }
    if (splits == 1) return;
    __threadfence();
    __syncthreads();
    u32 *counter = counters + (u64)blockIdx.x * kv_heads + kvh;
    if (tid == 0) last = atomicAdd(counter, 1u) == (u32)(splits - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    // The last block merges the splits: a warp per row finds the row's max and each split's
    // weight (sw), then every thread adds a float4 of one row over the splits in order.
    u64 first = ((u64)blockIdx.x * gridDim.y + (u64)kvh * splits) * R;
    for (int r = warp; r < rows; r += DEC_WARPS) {
        float mx = NEG_INF;
        for (int sp = lane; sp < splits; sp += WARP)
            mx = fmaxf(mx, __ldcg(part_ml + 2 * (first + (u64)sp * R + r)));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float ls = 0.f;
        for (int sp = lane; sp < splits; sp += WARP) {
            u64 part = first + (u64)sp * R + r;
            float ms = __ldcg(part_ml + 2 * part);
            float e = ms == NEG_INF ? 0.f : expf(ms - mx);
            sw[sp * R + r] = e;
            ls += __ldcg(part_ml + 2 * part + 1) * e;
        }
        ls = warp_sum(ls);
        if (lane == 0) sls[r] = ls;
    }
    __syncthreads();
    for (int i = tid; i < rows * L; i += blockDim.x) {
        int r = i / L, c = (i % L) * 4;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int sp = 0; sp < splits; sp++) {
            float e = sw[sp * R + r];
            float4 v = __ldcg((const float4 *)(part_o + (first + (u64)sp * R + r) * HD + c));
            o.x += v.x * e;
            o.y += v.y * e;
            o.z += v.z * e;
            o.w += v.w * e;
        }
        float ls = sls[r];
        int tok = r / group, h = kvh * group + r % group;
        *(float4 *)(out + (u64)(row0 + tok) * qd + h * HD + c) =
            make_float4(o.x / ls, o.y / ls, o.z / ls, o.w / ls);
    }
    if (tid == 0) *counter = 0;
}

#define ATTENTION_DECODE(HD, R)                                                               \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * WARP) attention_decode_##HD##_##R( \
        const float *q, const float *kc, const float *vc, float *out, const int *tiles,       \
        const u32 *slots, int q_heads, int kv_heads, int head_dim, float mult, float cap,     \
        int splits, float *part_o, float *part_ml, u32 *counters) {                           \
        attention_decode<HD, R>(q, kc, vc, out, tiles, slots, q_heads, kv_heads, mult, cap,   \
                                splits, part_o, part_ml, counters);                           \
    }
ATTENTION_DECODE(16, 8)
ATTENTION_DECODE(32, 8)
ATTENTION_DECODE(64, 8)
ATTENTION_DECODE(128, 8)
ATTENTION_DECODE(16, 16)
ATTENTION_DECODE(32, 16)
ATTENTION_DECODE(64, 16)
ATTENTION_DECODE(128, 16)

// D += A B on the tensor cores, one m16n8k16 step of a warp (bf16 in, f32 out). Fragments as
// the PTX ISA lays them out, with g = lane / 4 and t = lane % 4: a[0] holds A[g][2t, 2t+1],
// a[1] A[g+8][2t, 2t+1], a[2] A[g][2t+8, 2t+9], a[3] A[g+8][2t+8, 2t+9]; b[0] holds
// B[2t, 2t+1][g], b[1] B[2t+8, 2t+9][g]; d[0], d[1] are D[g][2t, 2t+1], d[2], d[3]
// D[g+8][2t, 2t+1] (the lower half of each register is the first element).
__device__ __forceinline__ void mma_bf16(float *d, const u32 *a, const u32 *b) {
#if defined(GROK_CUDA_EMU)
    emu_mma_bf16(d, a, b);
#elif __CUDA_ARCH__ < 800
    __trap();  // the host runs attention_tc only from compute capability 8.0 (Ampere) on
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Two f32 rounded to a bf16 pair (lo in the lower half), as f2bf rounds them: one instruction
// from Ampere on.
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
#if defined(GROK_CUDA_EMU) || __CUDA_ARCH__ < 800
    return (u32)f2bf(lo) | ((u32)f2bf(hi) << 16);
#else
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

// The prefill attention of the bf16 path (steps whose matmuls run in bf16 on cuBLAS) on the
// tensor cores, with the contract of attention_prefill (tiles of 64 rows, key splits, the
// same partial outputs). As the release computes attention: q, k, v and the softmax weights
// in bf16, the scores, soft cap, softmax and sums in f32. Each of the 4 warps takes 16 rows;
// keys come 64 at a time into shared memory as bf16 (k row-major, v transposed so that both
// matmuls read their B fragments as pairs). The score fragments become the weights' A
// fragments in registers (flash-attention 2's layout trick).
#define TC_KEYS 64
template <int HD>
__device__ void attention_tc(const float *q, const float *kc, const float *vc, float *out,
                             const int *tiles, const u32 *slots, int q_heads, int kv_heads,
                             float mult, float cap, int splits, float *part_o, float *part_ml) {
    constexpr int KS = HD + 8, VS = TC_KEYS + 8;  // padded rows: fragment reads spread over banks
    // float4s per thread per chunk of values, loaded TC_BATCH at a time (as gather_chunk).
    constexpr int TC_LOADS = TC_KEYS * (HD / 4) / ATT_CHUNK_THREADS;
    constexpr int TC_BATCH = TC_LOADS < 8 ? TC_LOADS : 8;
    __shared__ __align__(16) bf16 sk[TC_KEYS * KS];
    __shared__ __align__(16) bf16 svt[HD * VS];
    int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    int g = lane / 4, t = lane % 4;
    int group = q_heads / kv_heads;
    int kvh = blockIdx.y / splits, split = blockIdx.y % splits;
    int tile = gridDim.x - 1 - blockIdx.x;  // in reverse, as attention_prefill's
    const int *tl = tiles + 4 * tile;
    int row0 = tl[0], ntok = tl[1], pos0 = tl[2], off = tl[3];
    int rows = ntok * group;
    int qd = q_heads * HD, kvd = kv_heads * HD;
    // This lane's two rows (g and g + 8 of the warp's 16), the last key each sees (-1: a
    // padding row sees none), and their q as A fragments.
    int r2[2] = {warp * 16 + g, warp * 16 + g + 8};
    int lastkey[2];
    const float *qrow[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int r = r2[i];
        lastkey[i] = r < rows ? pos0 + r / group : -1;
        int tok = r / group, h = kvh * group + r % group;
        qrow[i] = r < rows ? q + (u64)(row0 + tok) * qd + h * HD : nullptr;
    }
    u32 qa[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float *src = qrow[j & 1];
            int c = kk * 16 + 2 * t + (j >= 2 ? 8 : 0);
            float2 v = src ? *(const float2 *)(src + c) : make_float2(0.f, 0.f);
            qa[kk][j] = pack_bf16(v.x, v.y);
        }
    }
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};
    float oacc[HD / 8][4];
#pragma unroll
    for (int nt = 0; nt < HD / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) oacc[nt][e] = 0.f;
    int visible = pos0 + ntok;
    int kbeg, kend;
    key_range(visible, splits, split, TC_KEYS, &kbeg, &kend);
    for (int j0 = kbeg; j0 < kend; j0 += TC_KEYS) {
        int nk = min(TC_KEYS, kend - j0);
        __syncthreads();  // the previous chunk's keys and values are no longer read
        // Keys with a row's columns across lanes; values with keys across lanes, so that
        // the transposed stores of a warp fall in different banks (loads in batches, as
        // gather_chunk's).
        gather_chunk<HD, TC_KEYS>(kc, slots + off + j0, nk, kvd, kvh * HD, tid,
                                  [&](int j, int c, float4 v) {
                                      *(uint2 *)(sk + j * KS + c) =
                                          make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
                                  });
        // The same key in every value load of this thread: one slot lookup (gather_chunk's
        // lookup per load, with keys across lanes, spills at head size 128).
        int vj = tid % TC_KEYS;
        const float *vrow = vj < nk ? vc + (u64)slots[off + j0 + vj] * kvd + kvh * HD : nullptr;
#pragma unroll
        for (int b = 0; b < TC_LOADS; b += TC_BATCH) {
            float4 vv[TC_BATCH];
#pragma unroll
            for (int u = 0; u < TC_BATCH; u++) {
                int c = ((tid + ATT_CHUNK_THREADS * (b + u)) / TC_KEYS) * 4;
                vv[u] = vrow ? *(const float4 *)(vrow + c) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < TC_BATCH; u++) {
                int c = ((tid + ATT_CHUNK_THREADS * (b + u)) / TC_KEYS) * 4;
                svt[(c + 0) * VS + vj] = f2bf(vv[u].x);
                svt[(c + 1) * VS + vj] = f2bf(vv[u].y);
                svt[(c + 2) * VS + vj] = f2bf(vv[u].z);
                svt[(c + 3) * VS + vj] = f2bf(vv[u].w);
            }
        }
        __syncthreads();
        // Scores of my 16 rows against the 64 keys: 8 tiles of 8 keys.
        float sacc[TC_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < TC_KEYS / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) sacc[nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int nt = 0; nt < TC_KEYS / 8; nt++) {
                const bf16 *kr = sk + (nt * 8 + g) * KS + kk * 16 + 2 * t;
                u32 b[2] = {*(const u32 *)kr, *(const u32 *)(kr + 8)};
                mma_bf16(sacc[nt], qa[kk], b);
            }
        }
        // Soft cap, causal mask, online softmax (a row's 4 lanes agree on its max).
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < TC_KEYS / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int i = e / 2, key = j0 + nt * 8 + 2 * t + (e & 1);
                float sc = NEG_INF;
                if (key < kend && key <= lastkey[i]) sc = cap * tanhf(sacc[nt][e] * mult / cap);
                sacc[nt][e] = sc;
                mx[i] = fmaxf(mx[i], sc);
            }
        }
        float corr[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            float mn = fmaxf(m_run[i], mx[i]);
            corr[i] = m_run[i] == NEG_INF ? 0.f : expf(m_run[i] - mn);
            m_run[i] = mn;
            l_run[i] *= corr[i];
        }
#pragma unroll
        for (int nt = 0; nt < TC_KEYS / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int i = e / 2;
                float p = sacc[nt][e] == NEG_INF ? 0.f : expf(sacc[nt][e] - m_run[i]);
                sacc[nt][e] = p;
                l_run[i] += p;  // this lane's part of the row sum; the 4 lanes add at the end
            }
        }
#pragma unroll
        for (int nt = 0; nt < HD / 8; nt++) {
            oacc[nt][0] *= corr[0];
            oacc[nt][1] *= corr[0];
            oacc[nt][2] *= corr[1];
            oacc[nt][3] *= corr[1];
        }
        // o += p v: the weights of keys 16j.. are the score tiles 2j and 2j + 1.
#pragma unroll
        for (int j = 0; j < TC_KEYS / 16; j++) {
            u32 pa[4] = {pack_bf16(sacc[2 * j][0], sacc[2 * j][1]),
                         pack_bf16(sacc[2 * j][2], sacc[2 * j][3]),
                         pack_bf16(sacc[2 * j + 1][0], sacc[2 * j + 1][1]),
                         pack_bf16(sacc[2 * j + 1][2], sacc[2 * j + 1][3])};
#pragma unroll
            for (int nt = 0; nt < HD / 8; nt++) {
                const bf16 *vr = svt + (nt * 8 + g) * VS + j * 16 + 2 * t;
                u32 b[2] = {*(const u32 *)vr, *(const u32 *)(vr + 8)};
                mma_bf16(oacc[nt], pa, b);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
        l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int r = r2[i];
        if (r >= rows) continue;
        int tok = r / group, h = kvh * group + r % group;
        u64 part = ((u64)tile * gridDim.y + blockIdx.y) * 64 + r;
#pragma unroll
        for (int nt = 0; nt < HD / 8; nt++) {
            int c = nt * 8 + 2 * t;
            float o0 = oacc[nt][2 * i], o1 = oacc[nt][2 * i + 1];
            if (splits == 1)
                *(float2 *)(out + (u64)(row0 + tok) * qd + h * HD + c) =
                    make_float2(o0 / l_run[i], o1 / l_run[i]);
            else
                *(float2 *)(part_o + part * HD + c) = make_float2(o0, o1);
        }
        if (splits > 1 && t == 0) {
            part_ml[2 * part] = m_run[i];
            part_ml[2 * part + 1] = l_run[i];
        }
    }
}

ATTENTION_TILED(attention_tc, 16)
ATTENTION_TILED(attention_tc, 32)
ATTENTION_TILED(attention_tc, 64)
ATTENTION_TILED(attention_tc, 128)

// Merges the key splits of attention_R, attention_prefill_HD and attention_tc_HD:
// out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M), splits in order. grid (tiles, kv heads, R): one row of a tile per block (rows past the
// tile's return); blockDim.x >= head_dim.
extern "C" __global__ void attention_combine(const float *part_o, const float *part_ml,
                                             float *out, const int *tiles, int q_heads,
                                             int kv_heads, int head_dim, int splits, int R) {
    int hd = head_dim, group = q_heads / kv_heads, kvh = blockIdx.y, c = threadIdx.x;
    int r = blockIdx.z;
    const int *t = tiles + 4 * blockIdx.x;
    int row0 = t[0], rows = t[1] * group;
    if (c >= hd || r >= rows) return;
    u64 first = ((u64)blockIdx.x * kv_heads * splits + kvh * splits) * R + r;
    float m = NEG_INF;
#pragma unroll 8
    for (int s = 0; s < splits; s++) m = fmaxf(m, part_ml[2 * (first + (u64)s * R)]);
    float o = 0.f, l = 0.f;
#pragma unroll 4
    for (int s = 0; s < splits; s++) {
        u64 part = first + (u64)s * R;
        float ms = part_ml[2 * part];
        float w = ms == NEG_INF ? 0.f : expf(ms - m);
        float po = part_o[part * hd + c], pl = part_ml[2 * part + 1];
        if (ms != NEG_INF) {
            o += po * w;
            l += pl * w;
        }
    }
    int tok = r / group, h = kvh * group + r % group;
    out[(u64)(row0 + tok) * q_heads * hd + h * hd + c] = o / l;
}

// Whether rows at a and b of n floats go a float4 at a time: a 4-byte float per thread keeps
// too few bytes in flight to reach the memory's bandwidth (a row copy ran at about a third of
// it), and the pointers decide it, so a row at any offset takes whichever path it can.
__device__ __forceinline__ bool in_float4s(const void *a, const void *b, int n) {
    return (n & 3) == 0 && (((u64)a | (u64)b) & 15) == 0;
}

// o[0..n) = s[0..n) by the block's threads.
__device__ __forceinline__ void copy_row(float *o, const float *s, int n) {
    if (in_float4s(o, s, n)) {
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x)
            ((float4 *)o)[i] = ((const float4 *)s)[i];
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = s[i];
    }
}

// dst[r] = columns [c0, c0 + width) of src row r (rows of width n): one part of a product
// whose columns are several outputs (a fused q, k, v projection).
extern "C" __global__ void split_cols(const float *src, int n, int c0, float *dst, int width) {
    copy_row(dst + (u64)blockIdx.x * width, src + (u64)blockIdx.x * n + c0, width);
}

// dst[r] = src[idx[r]] (rows of width d): permutes tokens into expert order.
extern "C" __global__ void gather_rows(const float *src, const u32 *idx, float *dst, int d) {
    copy_row(dst + (u64)blockIdx.x * d, src + (u64)idx[blockIdx.x] * d, d);
}

// dst[idx[r]] = src[r]: the inverse permutation.
extern "C" __global__ void scatter_rows(const float *src, const u32 *idx, float *dst, int d) {
    copy_row(dst + (u64)idx[blockIdx.x] * d, src + (u64)blockIdx.x * d, d);
}

// y[t] = sum over entries e in [offsets[t], offsets[t+1]) of gates[e] * parts[rows[e]], in
// entry order (the CPU backend's order), unpermuting the experts' outputs.
extern "C" __global__ void combine(const float *parts, const u32 *offsets, const u32 *rows,
                                   const float *gates, float *y, int d) {
    u32 b = offsets[blockIdx.x], e = offsets[blockIdx.x + 1];
    float *o = y + (u64)blockIdx.x * d;
    if (in_float4s(o, parts, d)) {
        for (int i = threadIdx.x; i < d / 4; i += blockDim.x) {
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
            for (u32 j = b; j < e; j++) {
                float g = gates[j];
                float4 p = ((const float4 *)(parts + (u64)rows[j] * d))[i];
                a.x += g * p.x;
                a.y += g * p.y;
                a.z += g * p.z;
                a.w += g * p.w;
            }
            ((float4 *)o)[i] = a;
        }
        return;
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.f;
        for (u32 j = b; j < e; j++) a += gates[j] * parts[(u64)rows[j] * d + i];
        o[i] = a;
    }
}

// JAX's default GELU (the tanh approximation).
__device__ __forceinline__ float gelu_tanh(float x) {
    float u = 0.7978845608f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + tanhf(u));
}

// a = gelu_tanh(a) * b: 4 elements per thread (ceil(n / 4) threads), a float4 of each where
// the pointers allow.
extern "C" __global__ void gelu_mul(float *a, const float *b, u64 n) {
    u64 i = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i >= n) return;
    if (i + 4 <= n && in_float4s(a, b, 4)) {
        float4 x = *(const float4 *)(a + i), y = *(const float4 *)(b + i);
        *(float4 *)(a + i) = make_float4(gelu_tanh(x.x) * y.x, gelu_tanh(x.y) * y.y,
                                         gelu_tanh(x.z) * y.z, gelu_tanh(x.w) * y.w);
        return;
    }
    for (u64 j = i; j < n && j < i + 4; j++) a[j] = gelu_tanh(a[j]) * b[j];
}

// The decode matmul: y[m, n] = sum_k x[m, k] * w[k, n] * scales[k / gr, n] for up to MR rows,
// reading the int8 weights once (the step is bound by weight bytes). Each lane owns VEC
// adjacent columns (one 4-byte load per row of K when VEC = 4); the block's warps split its K
// range; blocks along y split K further, writing partial sums that qgemv_reduce adds up in
// order. Scales are applied once per scale group, not per element.
//   grid (ceil(N / (32 * VEC)), ky), block (32, warps); smem: warps * MR * 32 * VEC floats.
template <int MR, int VEC>
__device__ void qgemv(const float *x, int m, const signed char *w, const float *scales, int k,
                      int n, int gr, float *out, int ky) {
    extern __shared__ float red[];
    int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
    int col = (blockIdx.x * WARP + lane) * VEC;
    int per_block = (k + ky - 1) / ky;
    int kb0 = blockIdx.y * per_block, kb1 = min(k, kb0 + per_block);
    int per_warp = (kb1 - kb0 + warps - 1) / warps;
    int k0 = min(kb1, kb0 + warp * per_warp), k1 = min(kb1, k0 + per_warp);
    float total[MR][VEC];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < VEC; v++) total[r][v] = 0.f;
    bool live = col < n;
    if (live && k0 < k1) {
        for (int g = k0 / gr; g * gr < k1; g++) {
            int a = max(k0, g * gr), b = min(k1, (g + 1) * gr);
            float acc[MR][VEC];
            for (int r = 0; r < MR; r++)
                for (int v = 0; v < VEC; v++) acc[r][v] = 0.f;
#pragma unroll 8
            for (int kk = a; kk < b; kk++) {
                float wf[VEC];
                if (VEC == 4) {
                    // int8 -> f32 without the (quarter-rate) conversion unit: byte b + 128
                    // under the exponent of 2^23, minus 2^23 + 128, is exactly b.
                    u32 q = __ldg((const u32 *)(w + (u64)kk * n + col)) ^ 0x80808080u;
                    wf[0] = __int_as_float(__byte_perm(q, 0x4B000000u, 0x7540)) - 8388736.f;
                    wf[1 % VEC] = __int_as_float(__byte_perm(q, 0x4B000000u, 0x7541)) - 8388736.f;
                    wf[2 % VEC] = __int_as_float(__byte_perm(q, 0x4B000000u, 0x7542)) - 8388736.f;
                    wf[3 % VEC] = __int_as_float(__byte_perm(q, 0x4B000000u, 0x7543)) - 8388736.f;
                } else {
                    wf[0] = __ldg(w + (u64)kk * n + col);
                }
                for (int r = 0; r < MR; r++) {
                    if (r < m) {
                        float xv = __ldg(x + (u64)r * k + kk);
                        for (int v = 0; v < VEC; v++) acc[r][v] += xv * wf[v];
                    }
                }
            }
            for (int v = 0; v < VEC; v++) {
                float s = scales[(u64)g * n + col + v];
                for (int r = 0; r < MR; r++) total[r][v] += acc[r][v] * s;
            }
        }
    }
    // Warp w's partials at red[((w * MR + r) * 32 + lane) * VEC + v]; warp 0 adds them in order.
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < VEC; v++) red[((warp * MR + r) * WARP + lane) * VEC + v] = total[r][v];
    __syncthreads();
    if (warp != 0 || !live) return;
    for (int r = 0; r < m && r < MR; r++) {
        for (int v = 0; v < VEC; v++) {
            float s = 0.f;
            for (int i = 0; i < warps; i++) s += red[((i * MR + r) * WARP + lane) * VEC + v];
            // ky == 1: the result; otherwise partial blockIdx.y of [ky, m, n].
            out[((u64)blockIdx.y * m + r) * n + col + v] = s;
        }
    }
}

#define QGEMV(MR, VEC)                                                                       \
    extern "C" __global__ void qgemv_##MR##_##VEC(const float *x, int m, const signed char *w, \
                                                  const float *s, int k, int n, int gr,      \
                                                  float *out, int ky) {                      \
        qgemv<MR, VEC>(x, m, w, s, k, n, gr, out, ky);                                       \
    }
QGEMV(1, 4)
QGEMV(2, 4)
QGEMV(4, 4)
QGEMV(8, 4)
QGEMV(16, 4)
QGEMV(1, 1)
QGEMV(2, 1)
QGEMV(4, 1)
QGEMV(8, 1)
QGEMV(16, 1)

// acc[r][v] += xv[r] * w[v] for the 16 int8 weights of one 16-byte load (one row of K, 16
// adjacent columns), converted without the (quarter-rate) conversion unit: byte b + 128
// under the exponent of 2^23, minus 2^23 + 128, is exactly b.
__device__ __forceinline__ void acc16(float (*acc)[16], const float *xv, int mr, uint4 q) {
    u32 words[4] = {q.x ^ 0x80808080u, q.y ^ 0x80808080u, q.z ^ 0x80808080u, q.w ^ 0x80808080u};
#pragma unroll
    for (int wi = 0; wi < 4; wi++) {
#pragma unroll
        for (int bi = 0; bi < 4; bi++) {
            float wf = __int_as_float(__byte_perm(words[wi], 0x4B000000u, 0x7540 + bi)) - 8388736.f;
            for (int r = 0; r < mr; r++) acc[r][wi * 4 + bi] += xv[r] * wf;
        }
    }
}


// The decode matmul on the tiled layout (see DevQ in device.rs): column tiles of 512 (the last
// one narrower), each holding its K rows back to back, so a warp streams one contiguous run
// of weights (U rows of 512 bytes per round, 16 bytes per lane) instead of 512-byte pieces
// a whole row apart. Up to MR rows of x: row r reads x row xrow[r] and writes row orow[r]
// of `out` (rows ostride apart; this tile's first column at oc0) and of the nrows-row
// partial sums. The K split is per_warp rows per warp, consecutive warps of
// consecutive blocks along y, chosen by the host from the matrix and the GPU only (a row's
// result does not depend on the batch). Blocks of one tile add their partial sums in y order:
// each writes its partial to `parts`, and the last to finish a tile (a counter per tile,
// reset by it) adds them up, so no second launch is needed and the sum is the same every run.
// Each warp's running totals live in shared memory (they change once per scale group), which
// leaves the registers to the per-group sums and the loads in flight.
//   block (32, warps); smem: warps * MR * 512 floats.
#define QT 512
template <int MR, int U>
__device__ void qgemv_core(const float *x, const int *xrow, int m, const signed char *wt,
                           const float *scales, int k, int n, int gr, float *out,
                           int ostride, int oc0, const int *orow, int nrows, float *parts,
                           u32 *counter, int per_warp, int tile, int by, int ky) {
    extern __shared__ float red[];
    __shared__ int last;
    int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
    int tid = warp * WARP + lane, nthreads = warps * WARP;
    int width = min(QT, n - tile * QT);
    int c0 = tile * QT, col = c0 + lane * 16;
    bool live = lane * 16 < width;
    int k0 = min(k, (by * warps + warp) * per_warp), k1 = min(k, k0 + per_warp);
    const signed char *wp = wt + (u64)tile * QT * k + lane * 16;
    const float *xr[MR];
#pragma unroll
    for (int r = 0; r < MR; r++) xr[r] = x + (u64)xrow[r < m ? r : 0] * k;
    float *tot = red + warp * MR * QT + lane * 16;  // [MR][QT], this lane's 16 columns
#pragma unroll
    for (int r = 0; r < MR; r++)
#pragma unroll
        for (int v4 = 0; v4 < 4; v4++)
            *(float4 *)(tot + r * QT + v4 * 4) = make_float4(0.f, 0.f, 0.f, 0.f);
    if (live && k0 < k1) {
        for (int g = k0 / gr; g * gr < k1; g++) {
            int a = max(k0, g * gr), b = min(k1, (g + 1) * gr);
            float acc[MR][16];
#pragma unroll
            for (int r = 0; r < MR; r++)
#pragma unroll
                for (int v = 0; v < 16; v++) acc[r][v] = 0.f;
            int kk = a;
            for (; kk + U <= b; kk += U) {
                uint4 q[U];
#pragma unroll
                for (int u = 0; u < U; u++)
                    q[u] = __ldg((const uint4 *)(wp + (u64)(kk + u) * width));
#pragma unroll
                for (int u = 0; u < U; u++) {
                    float xv[MR];
#pragma unroll
                    for (int r = 0; r < MR; r++) xv[r] = (r < m) ? __ldg(xr[r] + kk + u) : 0.f;
                    acc16(acc, xv, MR, q[u]);
                }
            }
            for (; kk < b; kk++) {
                uint4 q = __ldg((const uint4 *)(wp + (u64)kk * width));
                float xv[MR];
#pragma unroll
                for (int r = 0; r < MR; r++) xv[r] = (r < m) ? __ldg(xr[r] + kk) : 0.f;
                acc16(acc, xv, MR, q);
            }
            const float4 *sp = (const float4 *)(scales + (u64)g * n + col);
#pragma unroll
            for (int v4 = 0; v4 < 4; v4++) {
                float4 s = __ldg(sp + v4);
#pragma unroll
                for (int r = 0; r < MR; r++) {
                    float4 t = *(float4 *)(tot + r * QT + v4 * 4);
                    t.x += acc[r][v4 * 4] * s.x;
                    t.y += acc[r][v4 * 4 + 1] * s.y;
                    t.z += acc[r][v4 * 4 + 2] * s.z;
                    t.w += acc[r][v4 * 4 + 3] * s.w;
                    *(float4 *)(tot + r * QT + v4 * 4) = t;
                }
            }
        }
    }
    // The warps' totals added in warp order (all threads share the adding).
    __syncthreads();
    int rows = min(m, MR);
    for (int i = tid; i < rows * QT; i += nthreads) {
        int r = i / QT, c = i % QT;
        if (c >= width) continue;
        float s = 0.f;
        for (int w = 0; w < warps; w++) s += red[(w * MR + r) * QT + c];
        if (ky == 1)
            out[(u64)orow[r] * ostride + oc0 + c] = s;
        else
            parts[((u64)by * nrows + orow[r]) * n + c0 + c] = s;
    }
    if (ky == 1) return;
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counter, 1u) == (u32)(ky - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int i = tid; i < rows * QT; i += nthreads) {
        int r = i / QT, c = i % QT;
        if (c >= width) continue;
        u64 o = (u64)orow[r] * n + c0 + c;
        float s = 0.f;
        // All of a column's partials in flight at once (ky is about 32 for the attention
        // matrices), added in y order.
#pragma unroll 32
        for (int y = 0; y < ky; y++) s += __ldcg(parts + (u64)y * nrows * n + o);
        out[(u64)orow[r] * ostride + oc0 + c] = s;
    }
    if (tid == 0) *counter = 0;
}

// Where column tile `tile` of an [*, n] product goes when its tiles feed three outputs (a
// fused q, k, v projection): tiles [0, t1) to out0, [t1, t2) to out1, the rest to out2, each
// row-major at its own width (t2 = t1 = tiles: all to out0). Sets the output, its row stride
// and the tile's first column in it.
__device__ __forceinline__ void tile_output(float *out0, float *out1, float *out2, int t1, int t2,
                                            int n, int tile, float *&out, int &ostride,
                                            int &oc0) {
    out = out0;
    ostride = min(n, t1 * QT);
    oc0 = tile * QT;
    if (tile >= t2) {
        out = out2;
        ostride = n - t2 * QT;
        oc0 -= t2 * QT;
    } else if (tile >= t1) {
        out = out1;
        ostride = (t2 - t1) * QT;
        oc0 -= t1 * QT;
    }
}

// y[0..m) = x[0..m) · w: grid (tiles, ky). The output's columns may go to three matrices
// (tile_output).
template <int MR>
__device__ void qgemv_tiled(const float *x, int m, const signed char *wt, const float *scales,
                            int k, int n, int gr, float *out0, float *out1, float *out2,
                            int t1, int t2, float *parts, u32 *counters, int per_warp) {
    int rows[MR];
#pragma unroll
    for (int r = 0; r < MR; r++) rows[r] = r;
    int tile = blockIdx.x;
    float *out;
    int ostride, oc0;
    tile_output(out0, out1, out2, t1, t2, n, tile, out, ostride, oc0);
    qgemv_core<MR, 8>(x, rows, m, wt, scales, k, n, gr, out, ostride, oc0, rows, m, parts,
                      counters + blockIdx.x, per_warp, blockIdx.x, blockIdx.y, gridDim.y);
}

// The experts of a MoE layer for a few tokens, with the routing left on the device (no wait
// for the host between the router and the experts). The tables hold E experts per kind
// (`kinds` kinds of the same shape: gate and up, or down). Along z, each kind has
// gridDim.z / kinds slices: slice i serves the i-th smallest expert the slots picked (none
// left: the blocks return at once), on every slot (token, choice) that picked it: slot s
// reads x row s / in_div (in_div = k to read the tokens, 1 to read per-slot rows) and writes
// output row kind * slots + s. An expert's rows go MR at a time, in slot order, each chunk one
// batch of the kernel above (its own counters: chunk c of slice z, tile t at
// (c * gridDim.z + z) * gridDim.x + t), so a slot's result is the same as through the host's
// grouping.
//   grid (tiles, ky, kinds * min(E, slots)).
template <int MR>
__device__ void qgemv_experts(const float *x, const int *picks, int slots, int in_div,
                              const u64 *wtab, const u64 *stab, int experts, int k, int n,
                              int gr, float *out, float *parts, u32 *counters, int per_warp) {
    int per_kind = min(experts, slots), kind = blockIdx.z / per_kind, want = blockIdx.z % per_kind;
    // The want-th smallest picked expert.
    int e = -1;
    for (int c = 0, seen = 0; c < experts && e < 0; c++) {
        bool picked = false;
        for (int s = 0; s < slots; s++) picked |= picks[s] == c;
        if (picked) {
            if (seen == want) e = c;
            seen++;
        }
    }
    if (e < 0) return;
    int z = kind * experts + e;
    int nrows = (gridDim.z / per_kind) * slots;
    for (int s0 = 0, chunk = 0; s0 < slots; chunk++) {
        // The next MR slots that picked e (from slot s0 on).
        int xrow[MR], orow[MR], m = 0;
#pragma unroll
        for (int r = 0; r < MR; r++) xrow[r] = orow[r] = 0;
        for (; s0 < slots && m < MR; s0++) {
            if (picks[s0] != e) continue;
#pragma unroll
            for (int r = 0; r < MR; r++) {
                if (r == m) {
                    xrow[r] = s0 / in_div;
                    orow[r] = kind * slots + s0;
                }
            }
            m++;
        }
        if (m == 0) break;
        if (chunk > 0) __syncthreads();  // the previous chunk's shared totals are read
        qgemv_core<MR, 8>(x, xrow, m, (const signed char *)wtab[z], (const float *)stab[z], k,
                          n, gr, out, n, blockIdx.x * QT, orow, nrows, parts,
                          counters + ((u64)chunk * gridDim.z + blockIdx.z) * gridDim.x +
                              blockIdx.x,
                          per_warp, blockIdx.x, blockIdx.y, gridDim.y);
    }
}
#define QGEMV_TILED(MR, MINB)                                                                \
    extern "C" __global__ void __launch_bounds__(256, MINB) qgemv_tiled_##MR(                \
        const float *x, int m, const signed char *wt, const float *s, int k, int n, int gr,  \
        float *out0, float *out1, float *out2, int t1, int t2, float *parts, u32 *counters,  \
        int per_warp) {                                                                      \
        qgemv_tiled<MR>(x, m, wt, s, k, n, gr, out0, out1, out2, t1, t2, parts, counters,    \
                        per_warp);                                                           \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(256, MINB) qgemv_experts_##MR(              \
        const float *x, const int *picks, int slots, int in_div, const u64 *wtab,            \
        const u64 *stab, int experts, int k, int n, int gr, float *out, float *parts,        \
        u32 *counters, int per_warp) {                                                       \
        qgemv_experts<MR>(x, picks, slots, in_div, wtab, stab, experts, k, n, gr, out, parts, \
                          counters, per_warp);                                               \
    }
// Blocks per SM the register budget is held to: 4 (64 registers) for one row, 2 (128) for
// four (ptxas 12.9: no spills; at 1 block per SM the 4-row kernel streamed 1.8 TB/s).
QGEMV_TILED(1, 4)
QGEMV_TILED(2, 2)
QGEMV_TILED(4, 2)

// The matmul of mid-sized batches (the bf16 path's 9 to 64 rows: decode at batch 9+) on the
// tensor cores, reading the int8 tiled weights once instead of dequantising them to bf16
// first (which cost more than the GEMM). The same numbers as dequantisation + cuBLAS: x in
// bf16, each weight bf16(q * scale), f32 sums. A warp takes 32 columns of a tile (a block of
// 8 warps takes 256: grid.x = 2 per tile) and the block's K rows (per_block of them: blocks
// along y split K), 16 rows of K per mma step: per step each lane loads 16 bytes (one row of
// K, half the warp's columns) into the warp's shared staging, from which every lane gathers
// its B fragments (4 tiles of 8 columns); MT tiles of 16 rows of x reuse them (U steps are
// loaded at once, to keep loads in flight). Partial sums of
// the K split are added in y order by the last block of a column half, as in qgemv_core.
//   xb: [m, k] bf16; k and the scale group rows multiples of 16. block (32, 8).
//   Row r < m of the batch reads x row xrow[r] and writes row orow[r] of `out` and of the
//   nrows-row partial sums (null lists: row r itself); `counter` is this column half's.
template <int MT, int U>
__device__ void qmma_core(const bf16 *xb, const int *xrow, const int *orow, int m, int nrows,
                          const signed char *wt, const float *scales, int k, int n, int gr,
                          float *out, float *parts, u32 *counter, int per_block) {
    __shared__ __align__(16) unsigned char stage[8][U][16 * 32];
    __shared__ int last;
    int lane = threadIdx.x, warp = threadIdx.y, tid = warp * WARP + lane;
    int g = lane / 4, t = lane % 4;
    int tile = blockIdx.x / 2, by = blockIdx.y, ky = gridDim.y;
    int width = min(QT, n - tile * QT);
    int cw = (blockIdx.x % 2) * 256 + warp * 32;  // the warp's first column in the tile
    bool live = cw < width;
    int k0 = min(k, by * per_block), k1 = min(k, k0 + per_block);
    const signed char *wp = wt + (u64)tile * QT * k;
    // My load: row lane / 2 of a step, 16 columns at cw + 16 * (lane % 2).
    int lc = cw + 16 * (lane % 2);
    bool lload = lc < width;
    float acc[MT][4][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[mt][j][e] = 0.f;
    // x rows of my A fragments (rows past m read as zero).
    const bf16 *xr[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int r = mt * 16 + g + 8 * h;
            xr[mt][h] = r < m ? xb + (u64)(xrow ? xrow[r] : r) * k : nullptr;
        }
    float sc[4];
    int group = -1, group_end = 0;  // the scale row in use, and the first K row past it
    if (live) {
        for (int kk = k0; kk < k1; kk += 16 * U) {
            int steps = min(U, (k1 - kk) / 16);
            uint4 q[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                q[u] = make_uint4(0u, 0u, 0u, 0u);
                if (u < steps && lload)
                    q[u] = __ldg((const uint4 *)(wp + (u64)(kk + 16 * u + lane / 2) * width + lc));
            }
#pragma unroll
            for (int u = 0; u < U; u++)
                *(uint4 *)(&stage[warp][u][(lane / 2) * 32 + 16 * (lane % 2)]) = q[u];
            __syncwarp();
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (u >= steps) break;
                int ks = kk + 16 * u;
                if (ks >= group_end) {  // no division on the steps between
                    group = ks / gr;
                    group_end = (group + 1) * gr;
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        int c = cw + 8 * j + g;
                        sc[j] = c < width ? scales[(u64)group * n + tile * QT + c] : 0.f;
                    }
                }
                const unsigned char *st = stage[warp][u];
                u32 b[4][2];
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    int c = 8 * j + g;
                    float w[4];
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int row = 2 * t + (e & 1) + 8 * (e >> 1);
                        u32 byte = st[row * 32 + c] ^ 0x80u;
                        w[e] = (__int_as_float(0x4B000000u | byte) - 8388736.f) * sc[j];
                    }
                    b[j][0] = pack_bf16(w[0], w[1]);
                    b[j][1] = pack_bf16(w[2], w[3]);
                }
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    u32 a[4];
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const bf16 *src = xr[mt][e & 1];
                        a[e] = src ? *(const u32 *)(src + ks + 2 * t + 8 * (e >> 1)) : 0u;
                    }
#pragma unroll
                    for (int j = 0; j < 4; j++) mma_bf16(acc[mt][j], a, b[j]);
                }
            }
            __syncwarp();
        }
    }
    // My outputs: row mt * 16 + g (+ 8), columns cw + 8j + 2t (+ 1).
    float *dst = ky == 1 ? out : parts + (u64)by * nrows * n;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = mt * 16 + g + 8 * (e >> 1), c = cw + 8 * j + 2 * t + (e & 1);
                if (r < m && c < width)
                    dst[(u64)(orow ? orow[r] : r) * n + tile * QT + c] = acc[mt][j][e];
            }
    if (ky == 1) return;
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counter, 1u) == (u32)(ky - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    int c0 = (blockIdx.x % 2) * 256;
    for (int i = tid; i < m * 256; i += 256) {
        int r = i / 256, c = c0 + i % 256;
        if (c >= width) continue;
        u64 o = (u64)(orow ? orow[r] : r) * n + tile * QT + c;
        float sum = 0.f;
#pragma unroll 8
        for (int y = 0; y < ky; y++) sum += __ldcg(parts + (u64)y * nrows * n + o);
        out[o] = sum;
    }
    if (tid == 0) *counter = 0;
}

// The experts of a MoE layer on the bf16 path with the routing left on the device, as
// qgemv_experts does it on the int8 path: z slice i of a kind serves the i-th smallest
// expert the slots picked, on all its slots (at most 64: one per token) as one batch.
//   grid (2 * tiles, ky, kinds * min(E, slots)); xb bf16 rows (slot s reads s / in_div).
template <int U>
__device__ void qmma_experts(const bf16 *xb, const int *picks, int slots, int in_div,
                             const u64 *wtab, const u64 *stab, int experts, int k, int n,
                             int gr, float *out, float *parts, u32 *counters, int per_block) {
    __shared__ int xrow[64], orow[64], count, expert;
    int per_kind = min(experts, slots), kind = blockIdx.z / per_kind, want = blockIdx.z % per_kind;
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        // The want-th smallest picked expert, and its slots in order.
        int e = -1;
        for (int c = 0, seen = 0; c < experts && e < 0; c++) {
            bool picked = false;
            for (int s = 0; s < slots; s++) picked |= picks[s] == c;
            if (picked) {
                if (seen == want) e = c;
                seen++;
            }
        }
        int m = 0;
        for (int s = 0; s < slots && e >= 0; s++) {
            if (picks[s] == e && m < 64) {
                xrow[m] = s / in_div;
                orow[m] = kind * slots + s;
                m++;
            }
        }
        expert = e;
        count = m;
    }
    __syncthreads();
    if (expert < 0) return;
    int z = kind * experts + expert;
    qmma_core<4, U>(xb, xrow, orow, count, (gridDim.z / per_kind) * slots,
                    (const signed char *)wtab[z], (const float *)stab[z], k, n, gr, out, parts,
                    counters + (u64)blockIdx.z * gridDim.x + blockIdx.x, per_block);
}

#define QMMA(MT, MINB, U)                                                                     \
    extern "C" __global__ void __launch_bounds__(256, MINB) qmma_##MT(                        \
        const bf16 *xb, int m, const signed char *wt, const float *s, int k, int n, int gr,   \
        float *out, float *parts, u32 *counters, int per_block) {                             \
        qmma_core<MT, U>(xb, nullptr, nullptr, m, m, wt, s, k, n, gr, out, parts,             \
                         counters + blockIdx.x, per_block);                                   \
    }
// (row tiles, blocks per SM, steps of 16 K rows loaded at once): about 32 KB of weights in
// flight per SM either way.
QMMA(1, 2, 4)
QMMA(2, 2, 4)
QMMA(4, 1, 8)
extern "C" __global__ void __launch_bounds__(256, 1) qmma_experts_4(
    const bf16 *xb, const int *picks, int slots, int in_div, const u64 *wtab, const u64 *stab,
    int experts, int k, int n, int gr, float *out, float *parts, u32 *counters, int per_block) {
    qmma_experts<8>(xb, picks, slots, in_div, wtab, stab, experts, k, n, gr, out, parts,
                    counters, per_block);
}

// The bf16 path's large matmuls (prefill) on Hopper's warpgroup tensor cores, reading the
// int8 tiled weights once instead of dequantising them to bf16 for cuBLAS first (which moved
// three times the weight bytes and cost a third of a 2048-token prefill). The same numbers as
// dequantisation + cuBLAS: x in bf16, each weight bf16(q * scale), f32 sums.
// wgmma takes D[64 x N] += A[64 x 16] B[16 x N] per warpgroup (4 warps). Here A is the weights
// transposed (its rows are output columns), from registers, each thread dequantising its own
// fragment (the A layout of mma_bf16, per warp of 16 rows); B is the block's tokens, K-major in
// shared memory with the 128-byte swizzle (the canonical layout that wg_desc describes).
// A block of two warpgroups takes N tokens and WG_COLS columns of a tile (grid.y = 2 per
// tile), each warpgroup 128 columns as two m64 operands. Thread (warp w, g = lane / 4,
// t = lane % 4) of warpgroup h owns the 4 adjacent columns at 128h + 4(8w + g): A row g of
// operand b is its column 2b, row g + 8 its column 2b + 1 (the order of A's rows is free as
// long as the output follows it), so that one 4-byte shared load per row of K brings a thread
// all four of its weights and its outputs go out as float4.
// The token tile N is the smallest multiple of 16 that covers the rows in as many tiles as 128
// would (an expert's 530 rows: 5 tiles of 112, not 4 of 128 and one of 18 run at full cost).
// K goes WG_KC rows per chunk through a cp.async pipeline of WG_STAGES chunks, WG_AHEAD ahead
// of the one in use (the stage a load overwrites held chunk c - 2, whose wgmmas are done); the
// dequantisation of step s + 1 overlaps step s's wgmma.
//   grid (ceil(m / N), 2 * tiles, ky): token tiles innermost, so that the blocks reading a
//   weight tile run at the same time and it comes from memory once. Blocks along z split K
//   (per_block rows each, a multiple of WG_KC); the last of a (token tile, column half) to
//   finish adds the partial sums in z order, as qmma_core does. Output columns go to out0,
//   out1, out2 by tile, as qgemv_tiled's do. With `gate` (an expert's up projection, gate
//   the f32 [m, n] product of its gate projection), out0 gets bf16(gelu_tanh(gate) * y)
//   instead of y: what gelu_mul and to_bf16 would make of the two, as the down projection's
//   operand, without the f32 round trips. 256 threads; WG_SMEM bytes of dynamic shared
//   memory. Hopper only (sm_90a): elsewhere the kernel traps and the host never launches it.
// The largest token tile (QGEMM_WGMMA below lists them all).
#define WG_TOK 128
#define WG_COLS 256
#define WG_KC 64
#define WG_STAGES 5
#define WG_AHEAD 3
#define WG_WROW 272  // a staged row of weights: 256 bytes and 16 of padding (no bank conflicts)
#define WG_XBYTES (WG_TOK * 128)
#define WG_STAGE (WG_XBYTES + WG_KC * WG_WROW)  // 33 KiB: every stage 1024-byte aligned
#define WG_SMEM (WG_STAGES * WG_STAGE + 1024)
#if defined(GROK_CUDA_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_ON 1
__device__ __forceinline__ u32 smem_addr(const void *p) {
#if defined(GROK_CUDA_EMU)
    return emu_smem_addr(p);
#else
    return (u32)__cvta_generic_to_shared(p);
#endif
}

// 16 bytes from global to shared memory without a register round trip; zeros when !ok.
__device__ __forceinline__ void cp_async16(u32 dst, const void *src, bool ok) {
#if defined(GROK_CUDA_EMU)
    emu_cp_async16(dst, src, ok);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(ok ? 16 : 0)
                 : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(GROK_CUDA_EMU)
    emu_cp_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits for all but the N most recent groups of this thread's copies.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(GROK_CUDA_EMU)
    emu_cp_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Makes this thread's shared-memory writes visible to the tensor cores' reads (wgmma reads
// its operands through the async proxy).
__device__ __forceinline__ void fence_proxy_async() {
#if !defined(GROK_CUDA_EMU)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if !defined(GROK_CUDA_EMU)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if defined(GROK_CUDA_EMU)
    emu_wgmma_commit();
#else
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most N committed groups of this warpgroup's wgmmas are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(GROK_CUDA_EMU)
    emu_wgmma_wait(N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Pins an accumulator register in place around the asm that writes it asynchronously, so
// the compiler moves no read of it to before the wait.
__device__ __forceinline__ void reg_fence(float &r) {
#if !defined(GROK_CUDA_EMU)
    asm volatile("" : "+f"(r)::"memory");
#endif
}

// The descriptor of a K-major bf16 operand at shared address `addr` with the 128-byte
// swizzle: rows of 128 bytes, 8-row groups 1024 bytes apart (SBO), LBO unused (1).
__device__ __forceinline__ u64 wg_desc(u32 addr) {
    return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) |
           ((u64)1 << 62);
}

// The 8 accumulators from d[i] on, as operands of wgmma's asm.
#define WG_D8(i)                                                                              \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]),  \
        "+f"(d[i + 6]), "+f"(d[i + 7])

// d[N / 2] += a (this thread's A fragment, 4 bf16 pairs) · B (desc: 16 x N, K-major), for the
// token tiles N of WG_TILES.
template <int N>
__device__ __forceinline__ void wgmma_m64(float *d, const u32 *a, u64 desc) {
#if defined(GROK_CUDA_EMU)
    emu_wgmma_m64(N, d, a, desc);
#else
    __trap();  // no such instance
#endif
}
#if !defined(GROK_CUDA_EMU)
// The instance for N: D's N / 2 registers, then A's 4, B's descriptor and the scale-d flag
// (1: accumulate), numbered as the asm operands after them are.
#define WGMMA_M64(N, D_REGS, A_DESC, ONE, ...)                                                \
    template <>                                                                               \
    __device__ __forceinline__ void wgmma_m64<N>(float *d, const u32 *a, u64 desc) {          \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " ONE ", 0;\n"                          \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 " D_REGS ", "  \
                     A_DESC ", p, 1, 1, 0;\n}\n"                                               \
                     : __VA_ARGS__                                                            \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));       \
    }
WGMMA_M64(80, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39}",
          "{%40, %41, %42, %43}, %44", "%45",
          WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32))
WGMMA_M64(96, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}",
          "{%48, %49, %50, %51}, %52", "%53",
          WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32), WG_D8(40))
WGMMA_M64(112, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55}",
          "{%56, %57, %58, %59}, %60", "%61",
          WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32), WG_D8(40), WG_D8(48))
WGMMA_M64(128, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}",
          "{%64, %65, %66, %67}, %68", "%69",
          WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32), WG_D8(40), WG_D8(48), WG_D8(56))
#endif

// Byte i of a word of int8 weights (stored ^ 0x80) times its scale: the qmma_core dequantisation.
// The magic number is prmt's data and i its immediate selector: the other way round, the
// compiler moved a selector into a register for every byte.
__device__ __forceinline__ float wg_deq(u32 biased, int i, float scale) {
    return (__int_as_float(__byte_perm(0x4B000000u, biased, 0x3104u + i)) - 8388736.f) * scale;
}

// Row tok's 4 outputs at column c of out (f32), or with gate, bf16(gelu_tanh(gate) * v) there.
__device__ __forceinline__ void wg_store(float *out, const float *gate, u64 at, float4 v) {
    if (!gate) {
        *(float4 *)(out + at) = v;
        return;
    }
    float4 a = __ldg((const float4 *)(gate + at));
    *(uint2 *)((bf16 *)out + at) =
        make_uint2(pack_bf16(gelu_tanh(a.x) * v.x, gelu_tanh(a.y) * v.y),
                   pack_bf16(gelu_tanh(a.z) * v.z, gelu_tanh(a.w) * v.w));
}

// Chunk (K rows [kk, kk + WG_KC) of the block) into the stage at shared address `stage`:
// the tokens' x rows (swizzled, zeros past m or k1) and the weights' rows (zeros past k1 or
// the tile's width).
template <int N>
__device__ __forceinline__ void wg_load(u32 stage, const bf16 *xb, int m, int tok0, int k, int kk,
                                        int k1, const signed char *wp, int width, int c0, int tid) {
#pragma unroll
    for (int j = 0; j < (N * 8 + 255) / 256; j++) {
        int i = tid + 256 * j, r = i / 8, c = i % 8, kc = kk + 8 * c;
        if (i >= N * 8) break;
        bool ok = tok0 + r < m && kc < k1;
        const void *src = ok ? (const void *)(xb + (u64)(tok0 + r) * k + kc) : (const void *)xb;
        cp_async16(stage + r * 128 + ((c ^ (r & 7)) << 4), src, ok);
    }
    u32 ws = stage + WG_XBYTES;
#pragma unroll
    for (int j = 0; j < WG_KC * 16 / 256; j++) {
        int i = tid + 256 * j, r = i / 16, c = i % 16, col = c0 + 16 * c;
        bool ok = kk + r < k1 && col < width;
        const void *src = ok ? (const void *)(wp + (u64)(kk + r) * width + col) : (const void *)wp;
        cp_async16(ws + r * WG_WROW + 16 * c, src, ok);
    }
}
#endif

template <int N>
__device__ void qgemm_wgmma_core(const bf16 *xb, int m, const signed char *wt, const float *scales,
                                 int k, int n, int gr, float *out0, float *out1, float *out2,
                                 int t1, int t2, float *parts, u32 *counters, int per_block,
                                 const float *gate) {
#if defined(WG_ON)
    extern __shared__ float wg_smem[];
    __shared__ int last;
    u32 base = smem_addr(wg_smem);
    u32 pad = (1024u - (base & 1023u)) & 1023u;  // the swizzle repeats from 1024-byte bounds
    const unsigned char *sm = (const unsigned char *)wg_smem + pad;
    u32 sbase = base + pad;
    int tid = threadIdx.x, h = tid / 128, w = (tid / WARP) % 4, lane = tid % WARP;
    int g = lane / 4, t = lane % 4;
    int tok0 = blockIdx.x * N, tile = blockIdx.y / 2, c0 = (blockIdx.y % 2) * WG_COLS;
    int width = min(QT, n - tile * QT);
    int by = blockIdx.z, ky = gridDim.z;
    int k0 = min(k, by * per_block), k1 = min(k, k0 + per_block);
    int chunks = (k1 - k0 + WG_KC - 1) / WG_KC;
    const signed char *wp = wt + (u64)tile * QT * k;
    int col = c0 + 128 * h + 4 * (8 * w + g);  // my first column in the tile
    bool colok = col < width;

#pragma unroll
    for (int c = 0; c < WG_AHEAD; c++) {
        if (c < chunks)
            wg_load<N>(sbase + c * WG_STAGE, xb, m, tok0, k, k0 + c * WG_KC, k1, wp, width, c0, tid);
        cp_async_commit();
    }
    float acc[2][N / 2];
#pragma unroll
    for (int b = 0; b < 2; b++)
#pragma unroll
        for (int e = 0; e < N / 2; e++) acc[b][e] = 0.f;
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
    int group = -1, group_end = 0;  // the scale row in use, and the first K row past it
    u32 a[2][2][4];  // [step parity][operand][register]: step s + 1's fills while s runs
    for (int c = 0; c < chunks; c++) {
        cp_async_wait<WG_AHEAD - 1>();  // chunk c is in
        fence_proxy_async();
        __syncthreads();
        if (c + WG_AHEAD < chunks) {
            int st = (c + WG_AHEAD) % WG_STAGES;
            wg_load<N>(sbase + st * WG_STAGE, xb, m, tok0, k, k0 + (c + WG_AHEAD) * WG_KC, k1, wp,
                    width, c0, tid);
        }
        cp_async_commit();
        int st = c % WG_STAGES, kk = k0 + c * WG_KC;
        const unsigned char *ws = sm + st * WG_STAGE + WG_XBYTES + 128 * h + 4 * (8 * w + g);
        u32 xs = sbase + st * WG_STAGE;
        int steps = min(WG_KC / 16, (k1 - kk) / 16);
#pragma unroll
        for (int s = 0; s < WG_KC / 16; s++) {
            if (s < steps) {
                int ks = kk + 16 * s;
                if (ks >= group_end) {  // no division on the steps between
                    group = ks / gr;
                    group_end = (group + 1) * gr;
                    if (colok) {
                        float4 v = __ldg((const float4 *)(scales + (u64)group * n + tile * QT + col));
                        sc[0] = v.x, sc[1] = v.y, sc[2] = v.z, sc[3] = v.w;
                    }
                }
                // Rows 2t, 2t + 1, 2t + 8, 2t + 9 of the step: my A fragments' K.
                const unsigned char *r = ws + (16 * s + 2 * t) * WG_WROW;
                u32 q0 = *(const u32 *)r ^ 0x80808080u;
                u32 q1 = *(const u32 *)(r + WG_WROW) ^ 0x80808080u;
                u32 q2 = *(const u32 *)(r + 8 * WG_WROW) ^ 0x80808080u;
                u32 q3 = *(const u32 *)(r + 9 * WG_WROW) ^ 0x80808080u;
#pragma unroll
                for (int b = 0; b < 2; b++) {
                    int lo = 2 * b, hi = 2 * b + 1;
                    a[s & 1][b][0] = pack_bf16(wg_deq(q0, lo, sc[lo]), wg_deq(q1, lo, sc[lo]));
                    a[s & 1][b][1] = pack_bf16(wg_deq(q0, hi, sc[hi]), wg_deq(q1, hi, sc[hi]));
                    a[s & 1][b][2] = pack_bf16(wg_deq(q2, lo, sc[lo]), wg_deq(q3, lo, sc[lo]));
                    a[s & 1][b][3] = pack_bf16(wg_deq(q2, hi, sc[hi]), wg_deq(q3, hi, sc[hi]));
                }
                u64 desc = wg_desc(xs + 32 * s);  // K rows 16s.. of every token row
                wgmma_fence();
                wgmma_m64<N>(acc[0], a[s & 1][0], desc);
                wgmma_m64<N>(acc[1], a[s & 1][1], desc);
                wgmma_commit();
                wgmma_wait<1>();  // step s - 1 is done: its fragments may be refilled
            }
        }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int b = 0; b < 2; b++)
#pragma unroll
        for (int e = 0; e < N / 2; e++) reg_fence(acc[b][e]);

    float *out;
    int ostride, oc0;
    tile_output(out0, out1, out2, t1, t2, n, tile, out, ostride, oc0);
    // acc[b][4j + 2v1 + v0] is D row 16w + g + 8v1 (my column 2b + v1), token 8j + 2t + v0.
    // Split: the partial sums, f32, at the columns of the whole product.
    if (colok) {
#pragma unroll
        for (int j = 0; j < N / 8; j++)
#pragma unroll
            for (int v = 0; v < 2; v++) {
                int tok = tok0 + 8 * j + 2 * t + v;
                float4 y = make_float4(acc[0][4 * j + v], acc[0][4 * j + 2 + v], acc[1][4 * j + v],
                                       acc[1][4 * j + 2 + v]);
                if (tok >= m) continue;
                if (ky == 1)
                    wg_store(out, gate, (u64)tok * ostride + oc0 + col, y);
                else
                    *(float4 *)(parts + (u64)by * m * n + (u64)tok * n + tile * QT + col) = y;
            }
    }
    if (ky == 1) return;
    __threadfence();
    __syncthreads();
    u32 *counter = counters + (u64)blockIdx.y * gridDim.x + blockIdx.x;
    if (tid == 0) last = atomicAdd(counter, 1u) == (u32)(ky - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    int rows = min(N, m - tok0);
    for (int i = tid; i < rows * (WG_COLS / 4); i += 256) {
        int r = i / (WG_COLS / 4), cc = c0 + 4 * (i % (WG_COLS / 4));
        if (cc >= width) continue;
        u64 o = (u64)(tok0 + r) * n + tile * QT + cc;
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int y = 0; y < ky; y++) {
            float4 v = __ldcg((const float4 *)(parts + (u64)y * m * n + o));
            sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
        }
        wg_store(out, gate, (u64)(tok0 + r) * ostride + oc0 + cc, sum);
    }
    if (tid == 0) *counter = 0;
#else
    __trap();
#endif
}

#define QGEMM_WGMMA(N)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 1) qgemm_wgmma_##N(                     \
        const bf16 *xb, int m, const signed char *wt, const float *scales, int k, int n,      \
        int gr, float *out0, float *out1, float *out2, int t1, int t2, float *parts,          \
        u32 *counters, int per_block, const float *gate) {                                    \
        qgemm_wgmma_core<N>(xb, m, wt, scales, k, n, gr, out0, out1, out2, t1, t2, parts,     \
                            counters, per_block, gate);                                       \
    }
// The token tiles (WG_TILES in device.rs).
QGEMM_WGMMA(80)
QGEMM_WGMMA(96)
QGEMM_WGMMA(112)
QGEMM_WGMMA(128)

// bf16 copy of a tiled int8 matrix for cuBLAS, row-major [k, n]: w * scales. grid
// (ceil(n / 4096), k), 256 threads of 16 columns each (one 16-byte load, two 16-byte stores).
extern "C" __global__ void dequant_bf16_tiled(const signed char *wt, const float *scales,
                                              bf16 *out, int k, int n, int gr) {
    int row = blockIdx.y, col = (blockIdx.x * blockDim.x + threadIdx.x) * 16;
    if (col >= n) return;
    int tile = col / QT, width = min(QT, n - tile * QT);
    uint4 q = *(const uint4 *)(wt + (u64)tile * QT * k + (u64)row * width + (col - tile * QT));
    const float4 *s4 = (const float4 *)(scales + (u64)(row / gr) * n + col);
    u32 words[4] = {q.x, q.y, q.z, q.w};
    u32 packed[8];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float4 s = __ldg(s4 + j);
        int b0 = (int)(signed char)(words[j] & 0xff);
        int b1 = (int)(signed char)((words[j] >> 8) & 0xff);
        int b2 = (int)(signed char)((words[j] >> 16) & 0xff);
        int b3 = (int)(signed char)(words[j] >> 24);
        packed[2 * j] = (u32)f2bf((float)b0 * s.x) | ((u32)f2bf((float)b1 * s.y) << 16);
        packed[2 * j + 1] = (u32)f2bf((float)b2 * s.z) | ((u32)f2bf((float)b3 * s.w) << 16);
    }
    uint4 *dst = (uint4 *)(out + (u64)row * n + col);
    dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
}

// out[i] = sum over y < ky of parts[y * len + i], in order.
extern "C" __global__ void qgemv_reduce(const float *parts, float *out, u64 len, int ky) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float s = 0.f;
    for (int y = 0; y < ky; y++) s += parts[(u64)y * len + i];
    out[i] = s;
}

// bf16 copies for cuBLAS (large batches): w[k, n] * scales[k / gr, n], and x.
// grid (ceil(n / 1024), k), 256 threads, 4 columns each (one 4-byte load, two 4-byte stores
// when n % 4 == 0).
extern "C" __global__ void dequant_bf16(const signed char *w, const float *scales, bf16 *out,
                                        int k, int n, int gr) {
    int row = blockIdx.y, col = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (col >= n) return;
    const signed char *src = w + (u64)row * n;
    const float *s = scales + (u64)(row / gr) * n;
    bf16 *dst = out + (u64)row * n;
    if ((n & 3) == 0) {
        char4 q = *(const char4 *)(src + col);
        float4 sc = *(const float4 *)(s + col);
        u32 lo = (u32)f2bf((float)q.x * sc.x) | ((u32)f2bf((float)q.y * sc.y) << 16);
        u32 hi = (u32)f2bf((float)q.z * sc.z) | ((u32)f2bf((float)q.w * sc.w) << 16);
        *(uint2 *)(dst + col) = make_uint2(lo, hi);
    } else {
        for (int j = col; j < col + 4 && j < n; j++) dst[j] = f2bf((float)src[j] * s[j]);
    }
}

// out = bf16(x): 4 elements per thread (ceil(n / 4) threads), one 16-byte load and one 8-byte
// store where the pointers allow.
extern "C" __global__ void to_bf16(const float *x, bf16 *out, u64 n) {
    u64 i = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i >= n) return;
    if (i + 4 <= n && ((u64)x & 15) == 0 && ((u64)out & 7) == 0) {
        float4 v = *(const float4 *)(x + i);
        *(uint2 *)(out + i) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
        return;
    }
    for (u64 j = i; j < n && j < i + 4; j++) out[j] = f2bf(x[j]);
}
