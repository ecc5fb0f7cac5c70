// Runs kernels of kernels.cu on the CPU through emu.h and checks them against plain
// double-precision references: the decode attention (every head size and tile size, key
// splits including empty ones, paged slots in random order), the prefill attention (f32, and
// on the tensor cores to bf16 precision), the decode matmul and the device-routed experts,
// the tensor-core int8 matmul and experts (the same bf16 operands), the residual kernel (with the
// experts' slot combine and the fused router) and the row kernels that move float4s (both
// paths). Built and run by cuda_emulated.rs; exits non-zero if any check fails.
#include "emu.h"
#include "kernels_emu.cu"

#include <cstdio>
#include <cstdlib>
#include <numeric>

struct Rng {
    uint64_t s;
    float uni() {  // in [-1, 1)
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        return (float)((s >> 40) / 16777216.0 * 2.0 - 1.0);
    }
    uint64_t next() {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        return s >> 33;
    }
};

static int failures = 0;
// |got - want|, or 1e9 where got is not finite (std::max keeps its first operand against a
// NaN, so a plain maximum would pass outputs the emulator left as NaN).
static double off(double got, double want) { return std::isfinite(got) ? std::abs(got - want) : 1e9; }
static void expect(bool ok, const char *what, double got, double limit) {
    std::printf("%-72s %s (%.2e, limit %.0e)\n", what, ok ? "ok" : "FAILED", got, limit);
    if (!ok) failures++;
}

// Attention of one query row (q, head_dim values) over the keys at pool rows slots[0..=p] of
// kv head kvh, in double: the largest |got - reference| over its head_dim outputs (1e9 for a
// value that is not finite).
static double attention_row_error(const float *q, const float *got, const std::vector<float> &kc,
                                  const std::vector<float> &vc, const unsigned *slots, int p,
                                  int kvd, int kvh, int hd, float mult, float cap) {
    std::vector<double> sc(p + 1);
    double mx = -1e300, sum = 0, worst = 0;
    for (int j = 0; j <= p; j++) {
        const float *kr = kc.data() + (size_t)slots[j] * kvd + kvh * hd;
        double a = 0;
        for (int c = 0; c < hd; c++) a += (double)q[c] * kr[c];
        sc[j] = cap * std::tanh(a * mult / cap);
        mx = std::max(mx, sc[j]);
    }
    for (auto &v : sc) sum += (v = std::exp(v - mx));
    for (int c = 0; c < hd; c++) {
        double o = 0;
        for (int j = 0; j <= p; j++) o += sc[j] * vc[(size_t)slots[j] * kvd + kvh * hd + c];
        worst = std::max(worst, off(got[c], o / sum));
    }
    return worst;
}

// A KV pool of `pool` rows (uniform in [-1, 1)) handed out in random order (`perm`), and `n`
// query rows.
static void random_attention_inputs(Rng &rng, int pool, int kvd, int n, int qd,
                                    std::vector<unsigned> &perm, std::vector<float> &kc,
                                    std::vector<float> &vc, std::vector<float> &q) {
    perm.resize(pool);
    std::iota(perm.begin(), perm.end(), 0u);
    for (int i = pool - 1; i > 0; i--) std::swap(perm[i], perm[rng.next() % (i + 1)]);
    for (auto *v : {&kc, &vc}) v->resize((size_t)pool * kvd);
    q.resize((size_t)n * qd);
    for (auto *v : {&kc, &vc, &q})
        for (auto &x : *v) x = rng.uni();
}

using AttKernel = void (*)(const float *, const float *, const float *, float *, const int *,
                           const unsigned *, int, int, int, float, float, int, float *, float *,
                           unsigned *);

// Sequences with `lens` cached positions each take `ntok` new ones (already in the cache), one
// tile per sequence; the kernel's output against the reference, largest |difference|. The
// generic attention_R (`smem` bytes of dynamic shared memory) leaves its key splits to
// attention_combine.
static double decode_case(AttKernel k, int hd, int R, int q_heads, int kv_heads,
                          const std::vector<int> &lens, int ntok, int splits, uint64_t seed,
                          size_t smem = 0, bool generic = false) {
    Rng rng{seed};
    int group = q_heads / kv_heads, qd = q_heads * hd, kvd = kv_heads * hd;
    int seqs = (int)lens.size(), n = seqs * ntok;
    if (ntok * group > R) std::abort();
    int pool = 0;
    for (int l : lens) pool += l + ntok;
    std::vector<unsigned> perm;
    std::vector<float> kc, vc, q;
    random_attention_inputs(rng, pool, kvd, n, qd, perm, kc, vc, q);
    std::vector<int> tiles;
    std::vector<unsigned> slots;
    for (int s = 0, used = 0; s < seqs; s++) {
        tiles.insert(tiles.end(), {s * ntok, ntok, lens[s], (int)slots.size()});
        for (int j = 0; j < lens[s] + ntok; j++) slots.push_back(perm[used++]);
    }
    int num_tiles = seqs;
    std::vector<float> out((size_t)n * qd, NAN);
    size_t parts = (size_t)num_tiles * kv_heads * splits * R;
    std::vector<float> part_o(parts * hd), part_ml(parts * 2);
    std::vector<unsigned> counters(num_tiles * kv_heads, 0);
    float mult = 0.3f, cap = 2.0f;
    emu_launch(k, dim3e{(unsigned)num_tiles, (unsigned)(kv_heads * splits), 1}, dim3e{128, 1, 1},
               smem, q.data(), kc.data(), vc.data(), out.data(), tiles.data(), slots.data(),
               q_heads, kv_heads, hd, mult, cap, splits, part_o.data(), part_ml.data(),
               counters.data());
    if (generic && splits > 1)
        emu_launch(attention_combine, dim3e{(unsigned)num_tiles, (unsigned)kv_heads, (unsigned)R},
                   dim3e{128, 1, 1}, 0, part_o.data(), part_ml.data(), out.data(), tiles.data(),
                   q_heads, kv_heads, hd, splits, R);
    for (unsigned c : counters)
        if (c != 0) return 1e9;  // the last block must leave its counter at zero
    double worst = 0;
    for (int s = 0; s < seqs; s++) {
        for (int i = 0; i < ntok; i++) {
            int p = lens[s] + i, row = s * ntok + i;
            for (int h = 0; h < q_heads; h++) {
                size_t at = (size_t)row * qd + h * hd;
                worst = std::max(worst, attention_row_error(q.data() + at, out.data() + at, kc, vc,
                                                            slots.data() + tiles[4 * s + 3], p,
                                                            kvd, h / group, hd, mult, cap));
            }
        }
    }
    return worst;
}

static void decode_tests() {
    struct K {
        AttKernel k;
        int hd, R;
        const char *name;
    } ks[] = {
        {attention_decode_16_8, 16, 8, "attention_decode_16_8"},
        {attention_decode_32_8, 32, 8, "attention_decode_32_8"},
        {attention_decode_64_8, 64, 8, "attention_decode_64_8"},
        {attention_decode_128_8, 128, 8, "attention_decode_128_8"},
        {attention_decode_16_16, 16, 16, "attention_decode_16_16"},
        {attention_decode_32_16, 32, 16, "attention_decode_32_16"},
        {attention_decode_64_16, 64, 16, "attention_decode_64_16"},
        {attention_decode_128_16, 128, 16, "attention_decode_128_16"},
    };
    uint64_t seed = 1;
    for (auto &k : ks) {
        // (q heads, kv heads, new tokens per sequence): group 6 as Grok-1, and a full tile.
        int cases[][3] = {{12, 2, 1}, {4, 4, 1}, {k.R == 16 ? 16 : 8, 2, 2}};
        for (auto &c : cases) {
            if (c[2] * (c[0] / c[1]) > k.R) continue;
            for (int splits : {1, 5}) {
                std::vector<int> lens = {0, 4, 45, 200};
                double err = decode_case(k.k, k.hd, k.R, c[0], c[1], lens, c[2], splits, seed++);
                char what[160];
                std::snprintf(what, sizeof what, "%s: group %d, %d new token(s), %d split(s)",
                              k.name, c[0] / c[1], c[2], splits);
                expect(err < 2e-5, what, err, 2e-5);
            }
        }
    }
    // The generic kernel, which decode falls back on with GROK_CUDA_DECODE_ATTENTION=0
    // (Gpu::attention_smem_bytes: q, keys, values, scores and three row arrays).
    for (int hd : {32, 128}) {
        size_t smem = (16 * hd + 32 * (hd + 1) + 32 * hd + 16 * 32 + 3 * 16) * 4;
        for (int splits : {1, 5}) {
            double err = decode_case((AttKernel)attention_16, hd, 16, 12, 2, {0, 4, 45, 200}, 2,
                                     splits, seed++, smem, true);
            char what[160];
            std::snprintf(what, sizeof what, "attention_16 (head_dim %d): group 6, 2 new tokens, %d split(s)",
                          hd, splits);
            expect(err < 2e-5, what, err, 2e-5);
        }
    }
}

// Prefill tiles (as CudaShard::step_meta makes them: 64 rows, tokens × group) of a fresh
// prompt and of a continued one through a prefill kernel (attention_tc_HD or
// attention_prefill_HD, with `smem` bytes of dynamic shared memory; attention_combine with key
// splits), against the reference in double on the unrounded inputs: the largest |difference|.
static double prefill_case(AttKernel k, size_t smem, int hd, int q_heads, int kv_heads,
                           int splits, uint64_t seed) {
    Rng rng{seed};
    int group = q_heads / kv_heads, qd = q_heads * hd, kvd = kv_heads * hd;
    int per_tile = std::max(1, 64 / group);
    // (cached, new) positions per sequence.
    int seqs[2][2] = {{0, 150}, {70, 40}};
    int pool = 0, n = 0;
    for (auto &s : seqs) pool += s[0] + s[1], n += s[1];
    std::vector<unsigned> perm;
    std::vector<float> kc, vc, q;
    random_attention_inputs(rng, pool, kvd, n, qd, perm, kc, vc, q);
    std::vector<int> tiles, seq_of_row, pos_of_row, off_of_seq;
    std::vector<unsigned> slots;
    for (int s = 0, used = 0, row = 0; s < 2; s++) {
        int off = (int)slots.size();
        off_of_seq.push_back(off);
        for (int j = 0; j < seqs[s][0] + seqs[s][1]; j++) slots.push_back(perm[used++]);
        for (int t = 0; t < seqs[s][1]; t += per_tile)
            tiles.insert(tiles.end(), {row + t, std::min(per_tile, seqs[s][1] - t), seqs[s][0] + t, off});
        for (int t = 0; t < seqs[s][1]; t++) {
            seq_of_row.push_back(s);
            pos_of_row.push_back(seqs[s][0] + t);
        }
        row += seqs[s][1];
    }
    int num_tiles = (int)tiles.size() / 4;
    std::vector<float> out((size_t)n * qd, NAN);
    size_t parts = (size_t)num_tiles * kv_heads * splits * 64;
    std::vector<float> part_o(parts * hd), part_ml(parts * 2);
    float mult = 0.3f, cap = 2.0f;
    emu_launch(k, dim3e{(unsigned)num_tiles, (unsigned)(kv_heads * splits), 1}, dim3e{128, 1, 1},
               smem, q.data(), kc.data(), vc.data(), out.data(), tiles.data(), slots.data(),
               q_heads, kv_heads, hd, mult, cap, splits, part_o.data(), part_ml.data(),
               (unsigned *)nullptr);
    if (splits > 1)
        emu_launch(attention_combine, dim3e{(unsigned)num_tiles, (unsigned)kv_heads, 64},
                   dim3e{128, 1, 1}, 0, part_o.data(), part_ml.data(), out.data(), tiles.data(),
                   q_heads, kv_heads, hd, splits, 64);
    double worst = 0;
    for (int row = 0; row < n; row++) {
        int s = seq_of_row[row], p = pos_of_row[row];
        for (int h = 0; h < q_heads; h++) {
            size_t at = (size_t)row * qd + h * hd;
            worst = std::max(worst, attention_row_error(q.data() + at, out.data() + at, kc, vc,
                                                        slots.data() + off_of_seq[s], p, kvd,
                                                        h / group, hd, mult, cap));
        }
    }
    return worst;
}

static void prefill_tests() {
    struct K {
        AttKernel k;
        int hd;
        bool tc;
        const char *name;
    } ks[] = {
        {(AttKernel)attention_tc_16, 16, true, "attention_tc_16"},
        {(AttKernel)attention_tc_32, 32, true, "attention_tc_32"},
        {(AttKernel)attention_tc_64, 64, true, "attention_tc_64"},
        {(AttKernel)attention_tc_128, 128, true, "attention_tc_128"},
        {(AttKernel)attention_prefill_32, 32, false, "attention_prefill_32"},
        {(AttKernel)attention_prefill_128, 128, false, "attention_prefill_128"},
    };
    uint64_t seed = 100;
    for (auto &k : ks) {
        // The f32 kernel's dynamic shared memory (Gpu::prefill_smem_bytes).
        size_t smem = k.tc ? 0 : (2 * 64 * (k.hd + 4) + 64 * 68) * 4;
        double limit = k.tc ? 1.5e-2 : 2e-5;  // bf16 operands, or f32 throughout
        int cases[][3] = {{12, 2, 1}, {4, 4, 3}};  // (q heads, kv heads, splits)
        for (auto &c : cases) {
            double err = prefill_case(k.k, smem, k.hd, c[0], c[1], c[2], seed++);
            char what[160];
            std::snprintf(what, sizeof what, "%s: group %d, %d split(s)", k.name, c[0] / c[1],
                          c[2]);
            expect(err < limit, what, err, limit);
        }
    }
}

// The bf16 path's operands: a random int8 [k, n] matrix (w, and wt in the tiled layout: column
// tiles of 512, each tile's rows back to back), scales for `groups` row groups, m random bf16
// rows; and the double-sum reference of row r, column c (with the sum of its terms' |.|).
struct QOperands {
    int m, k, n, gr, tiles;
    std::vector<signed char> w, wt;
    std::vector<float> scales;
    std::vector<bf16> xb;
    QOperands(Rng &rng, int m_, int k_, int n_, int groups)
        : m(m_), k(k_), n(n_), gr(k_ / groups), tiles((n_ + 511) / 512),
          w((size_t)k_ * n_), wt((size_t)k_ * n_), scales((size_t)groups * n_),
          xb((size_t)m_ * k_) {
        for (auto &v : w) v = (signed char)(rng.next() % 256 - 128);
        for (int t = 0, at = 0; t < tiles; t++) {
            int c0 = t * 512, width = std::min(512, n - c0);
            for (int r = 0; r < k; r++)
                for (int c = 0; c < width; c++) wt[at++] = w[(size_t)r * n + c0 + c];
        }
        for (auto &v : scales) v = 0.001f + 0.01f * (rng.uni() + 1.f);
        for (auto &v : xb) v = f2bf(rng.uni());
    }
    static double bf(bf16 b) { return (double)__int_as_float((unsigned)b << 16); }
    double reference(int r, int c, double &scale) const {
        double want = 0;
        scale = 0;
        for (int i = 0; i < k; i++) {
            double p = bf(xb[(size_t)r * k + i]) *
                       bf(f2bf((float)w[(size_t)i * n + c] * scales[(size_t)(i / gr) * n + c]));
            want += p;
            scale += std::abs(p);
        }
        return want;
    }
};

// qmma_MT (the tensor-core int8 matmul) on an int8 [k, n] matrix in the tiled layout (a
// narrow last tile), with scale groups and a K split of ky blocks, against the double sum of
// the same bf16 operands; also that the counters are back at zero.
using MmaKernel = void (*)(const bf16 *, int, const signed char *, const float *, int, int, int,
                           float *, float *, u32 *, int);
static void qmma_case(MmaKernel kern, const char *name, int m, int k, int n, int groups, int ky,
                      uint64_t seed) {
    Rng rng{seed};
    QOperands q(rng, m, k, n, groups);
    int gr = q.gr, tiles = q.tiles;
    std::vector<float> out((size_t)m * n, NAN);
    int per_block = ((k + ky - 1) / ky + 15) / 16 * 16;
    int blocks_y = (k + per_block - 1) / per_block;
    std::vector<float> parts((size_t)blocks_y * m * n);
    std::vector<u32> counters(2 * tiles, 0);
    emu_launch(kern, dim3e{(unsigned)(2 * tiles), (unsigned)blocks_y, 1}, dim3e{32, 8, 1}, 0,
               q.xb.data(), m, q.wt.data(), q.scales.data(), k, n, gr, out.data(), parts.data(),
               counters.data(), per_block);
    double worst = 0;
    for (int r = 0; r < m; r++)
        for (int c = 0; c < n; c++) {
            double scale, want = q.reference(r, c, scale);
            double got = out[(size_t)r * n + c];
            worst = std::max(worst, off(got, want) / scale);
        }
    for (u32 c : counters)
        if (c != 0) worst = 1e9;
    char what[160];
    std::snprintf(what, sizeof what, "%s: %d rows, [%d x %d], %d scale group(s), %d K blocks",
                  name, m, k, n, groups, blocks_y);
    expect(worst < 1e-6, what, worst, 1e-6);
}

// qgemm_wgmma (the prefill matmul on Hopper's warpgroup tensor cores) on m tokens of an int8
// [k, n] matrix in the tiled layout, scale groups of gr rows, K split in blocks of per_block
// rows (a partial last chunk when k is no multiple of 64), against the double sum of the same
// bf16 operands. With `split`, the tiles go to three outputs as a fused q, k, v projection's
// (tile 0, tile 1, the rest). With `gelu`, the up projection's epilogue: bf16(gelu_tanh(gate)
// * y) for a random f32 gate, to bf16 precision. Also that the split's counters are back at
// zero.
static void wgmma_case(int m, int k, int n, int groups, int per_block, bool split, bool gelu,
                       uint64_t seed) {
    Rng rng{seed};
    QOperands q(rng, m, k, n, groups);
    int gr = q.gr, tiles = q.tiles;
    int t1 = split ? 1 : tiles, t2 = split ? 2 : tiles;
    int w0 = std::min(n, t1 * 512), w1 = (t2 - t1) * 512, w2 = n - w0 - w1;
    std::vector<float> o0((size_t)m * w0, NAN), o1((size_t)m * w1, NAN), o2((size_t)m * w2, NAN);
    std::vector<float> gate(gelu ? (size_t)m * n : 0);
    for (auto &v : gate) v = 3.f * rng.uni();
    // The token tile the host picks: the fewest tiles of 128, each a multiple of 16, >= 80.
    int tiles128 = (m + 127) / 128;
    int ntok = std::max(80, ((m + tiles128 - 1) / tiles128 + 15) / 16 * 16);
    auto kern = ntok == 80    ? qgemm_wgmma_80
                : ntok == 96  ? qgemm_wgmma_96
                : ntok == 112 ? qgemm_wgmma_112
                              : qgemm_wgmma_128;
    int ky = (k + per_block - 1) / per_block, ttiles = (m + ntok - 1) / ntok;
    std::vector<float> parts((size_t)ky * m * n);
    std::vector<u32> counters((size_t)ttiles * 2 * tiles, 0);
    emu_launch(kern, dim3e{(unsigned)ttiles, (unsigned)(2 * tiles), (unsigned)ky},
               dim3e{256, 1, 1}, WG_SMEM, q.xb.data(), m, q.wt.data(), q.scales.data(), k, n, gr,
               o0.data(), o1.data(), o2.data(), t1, t2, parts.data(), counters.data(), per_block,
               gelu ? gate.data() : nullptr);
    auto gelu_d = [](double x) {
        return 0.5 * x * (1.0 + std::tanh(0.7978845608 * (x + 0.044715 * x * x * x)));
    };
    const bf16 *ob = (const bf16 *)o0.data();
    double worst = 0;
    for (int r = 0; r < m; r++)
        for (int c = 0; c < n; c++) {
            double scale, want = q.reference(r, c, scale);
            double got = c < w0        ? o0[(size_t)r * w0 + c]
                         : c < w0 + w1 ? o1[(size_t)r * w1 + c - w0]
                                       : o2[(size_t)r * w2 + c - w0 - w1];
            if (gelu) {
                double gg = gelu_d(gate[(size_t)r * n + c]);
                got = QOperands::bf(ob[(size_t)r * n + c]);
                want *= gg;
                scale = scale * std::abs(gg) + 1e-30;
            }
            worst = std::max(worst, off(got, want) / scale);
        }
    for (u32 c : counters)
        if (c != 0) worst = 1e9;
    char what[160];
    std::snprintf(what, sizeof what,
                  "qgemm_wgmma_%d: %d rows, [%d x %d], %d group(s), %d K block(s)%s%s", ntok, m, k,
                  n, groups, ky, split ? ", 3 outputs" : gelu ? ", GELU epilogue" : "",
                  emu_cp_eager ? " (copies at once)" : "");
    double limit = gelu ? 4e-3 : 1e-6;  // a bf16 output
    expect(worst < limit, what, worst, limit);
}

// qgemv_tiled_4 (the decode matmul) on 3 rows of a [200 x 1040] int8 matrix (K no multiple
// of 8, two scale groups, tiles of 512, 512 and 16 columns), its K split over two blocks, the
// tiles going to three outputs as a fused q, k, v projection's do; against the double product.
static void tiled_case(uint64_t seed) {
    Rng rng{seed};
    const int m = 3, k = 200, n = 1040, gr = 100, per_warp = 16, t1 = 1, t2 = 2;
    const int tiles = (n + 511) / 512, ky = (k + per_warp * 8 - 1) / (per_warp * 8);
    std::vector<signed char> w((size_t)k * n), wt((size_t)k * n);
    for (auto &v : w) v = (signed char)(rng.next() % 256 - 128);
    for (int t = 0, at = 0; t < tiles; t++) {
        int c0 = t * 512, width = std::min(512, n - c0);
        for (int r = 0; r < k; r++)
            for (int c = 0; c < width; c++) wt[at++] = w[(size_t)r * n + c0 + c];
    }
    std::vector<float> sc((size_t)(k / gr) * n), x((size_t)m * k);
    for (auto &v : sc) v = 0.001f + 0.01f * (rng.uni() + 1.f);
    for (auto &v : x) v = rng.uni();
    int widths[3] = {t1 * 512, (t2 - t1) * 512, n - t2 * 512};
    std::vector<float> outs[3];
    for (int i = 0; i < 3; i++) outs[i].assign((size_t)m * widths[i], NAN);
    std::vector<float> parts((size_t)ky * m * n);
    std::vector<u32> counters(tiles, 0);
    emu_launch(qgemv_tiled_4, dim3e{(unsigned)tiles, (unsigned)ky, 1}, dim3e{32, 8, 1},
               8 * 4 * 512 * 4, x.data(), m, wt.data(), sc.data(), k, n, gr, outs[0].data(),
               outs[1].data(), outs[2].data(), t1, t2, parts.data(), counters.data(), per_warp);
    double worst = 0;
    for (int r = 0; r < m; r++)
        for (int c = 0; c < n; c++) {
            double want = 0, scale = 0;
            for (int i = 0; i < k; i++) {
                double p = (double)x[(size_t)r * k + i] * w[(size_t)i * n + c] * sc[(size_t)(i / gr) * n + c];
                want += p;
                scale += std::abs(p);
            }
            int o = c < widths[0] ? 0 : c < widths[0] + widths[1] ? 1 : 2;
            int oc = c - (o > 0 ? widths[0] : 0) - (o > 1 ? widths[1] : 0);
            double got = outs[o][(size_t)r * widths[o] + oc];
            worst = std::max(worst, off(got, want) / scale);
        }
    for (u32 c : counters)
        if (c != 0) worst = 1e9;
    expect(worst < 1e-6, "qgemv_tiled_4: 3 rows, K split, three outputs (fused q, k, v)", worst,
           1e-6);
}

// Random int8 expert matrices [k, n] (one tile each, so the tiled layout is row-major) with
// scale groups of gr rows, and the tables of their addresses the expert kernels take.
struct Experts {
    std::vector<std::vector<signed char>> w;
    std::vector<std::vector<float>> sc;
    std::vector<u64> wtab, stab;
};
static Experts random_experts(Rng &rng, int mats, int k, int n, int gr) {
    Experts ex;
    for (int z = 0; z < mats; z++) {
        ex.w.emplace_back((size_t)k * n);
        ex.sc.emplace_back((size_t)(k / gr) * n);
        for (auto &v : ex.w[z]) v = (signed char)(rng.next() % 256 - 128);
        for (auto &v : ex.sc[z]) v = 0.001f + 0.01f * (rng.uni() + 1.f);
    }
    for (int z = 0; z < mats; z++) {
        ex.wtab.push_back((u64)(uintptr_t)ex.w[z].data());
        ex.stab.push_back((u64)(uintptr_t)ex.sc[z].data());
    }
    return ex;
}

// 7 tokens' top-2 picks of 3 experts: expert 1 takes 6 slots (more than the int8 kernel's 4
// rows), expert 0 five, expert 2 three; each token two distinct ones.
static const int EXPERT_PICKS[14] = {1, 0, 1, 0, 1, 2, 0, 1, 1, 2, 0, 1, 2, 0};

// qgemv_experts_4 (device-routed experts, f32 int8 path) with an expert picked by more
// tokens than the kernel's 4 rows (its rows in two chunks) and a K split over blocks, against
// the double product of each slot's token and its expert's matrix of each kind.
static void experts_case(uint64_t seed) {
    Rng rng{seed};
    const int E = 3, kinds = 2, k = 96, n = 48, gr = 32, tokens = 7, top = 2, slots = tokens * top;
    const int per_warp = 8, ky = (k + per_warp * 8 - 1) / (per_warp * 8);
    const int *picks = EXPERT_PICKS;
    Experts ex = random_experts(rng, kinds * E, k, n, gr);
    auto &w = ex.w;
    auto &sc = ex.sc;
    std::vector<float> x((size_t)tokens * k), out((size_t)kinds * slots * n, NAN);
    for (auto &v : x) v = rng.uni();
    std::vector<float> parts((size_t)ky * kinds * slots * n);
    std::vector<u32> counters(2 * kinds * E, 0);
    emu_launch(qgemv_experts_4, dim3e{1, (unsigned)ky, (unsigned)(kinds * E)}, dim3e{32, 8, 1},
               8 * 4 * 512 * 4, x.data(), picks, slots, top, ex.wtab.data(), ex.stab.data(), E, k, n,
               gr, out.data(), parts.data(), counters.data(), per_warp);
    double worst = 0;
    for (int kind = 0; kind < kinds; kind++)
        for (int s = 0; s < slots; s++) {
            int z = kind * E + picks[s];
            for (int c = 0; c < n; c++) {
                double want = 0, scale = 0;
                for (int i = 0; i < k; i++) {
                    double p = (double)x[(size_t)(s / top) * k + i] * w[z][(size_t)i * n + c] *
                               sc[z][(size_t)(i / gr) * n + c];
                    want += p;
                    scale += std::abs(p);
                }
                double got = out[(size_t)(kind * slots + s) * n + c];
                worst = std::max(worst, off(got, want) / scale);
            }
        }
    for (u32 c : counters)
        if (c != 0) worst = 1e9;
    expect(worst < 1e-6, "qgemv_experts_4: 6 slots on one expert (two chunks), K split", worst,
           1e-6);
}

// qmma_experts_4 (device-routed experts on the bf16 path): the picks of experts_case, bf16
// token rows, a K split of three blocks and a tile narrower than a column half; against the
// double sum of the same bf16 operands.
static void mma_experts_case(uint64_t seed) {
    Rng rng{seed};
    const int E = 3, kinds = 2, k = 96, n = 48, gr = 32, tokens = 7, top = 2, slots = tokens * top;
    const int per_block = 32, ky = k / per_block, halves = 2;
    const int *picks = EXPERT_PICKS;
    Experts ex = random_experts(rng, kinds * E, k, n, gr);
    auto &w = ex.w;
    auto &sc = ex.sc;
    std::vector<bf16> xb((size_t)tokens * k);
    for (auto &v : xb) v = f2bf(rng.uni());
    std::vector<float> out((size_t)kinds * slots * n, NAN), parts((size_t)ky * kinds * slots * n);
    std::vector<u32> counters(halves * kinds * E, 0);
    emu_launch(qmma_experts_4, dim3e{halves, (unsigned)ky, (unsigned)(kinds * E)},
               dim3e{32, 8, 1}, 0, xb.data(), picks, slots, top, ex.wtab.data(), ex.stab.data(), E, k,
               n, gr, out.data(), parts.data(), counters.data(), per_block);
    auto bf = [](bf16 b) { return (double)__int_as_float((unsigned)b << 16); };
    double worst = 0;
    for (int kind = 0; kind < kinds; kind++)
        for (int s = 0; s < slots; s++) {
            int z = kind * E + picks[s];
            for (int c = 0; c < n; c++) {
                double want = 0, scale = 0;
                for (int i = 0; i < k; i++) {
                    double p = bf(xb[(size_t)(s / top) * k + i]) *
                               bf(f2bf((float)w[z][(size_t)i * n + c] * sc[z][(size_t)(i / gr) * n + c]));
                    want += p;
                    scale += std::abs(p);
                }
                double got = out[(size_t)(kind * slots + s) * n + c];
                worst = std::max(worst, off(got, want) / scale);
            }
        }
    for (u32 c : counters)
        if (c != 0) worst = 1e9;
    expect(worst < 1e-6, "qmma_experts_4: 7 tokens, top-2, K split over 3 blocks", worst, 1e-6);
}

// residual_norm on `rows` rows of width d against the reference: h, out, the picks and gates.
static void residual_case(int rows, int d, int experts, int k, bool slots, bool norm, bool route,
                          uint64_t seed) {
    Rng rng{seed};
    std::vector<float> h((size_t)rows * d), y((size_t)rows * (slots ? k : 1) * d), w(d), w2(d),
        gates(rows * k), router((size_t)d * experts), out((size_t)rows * d, NAN);
    for (auto &v : h) v = rng.uni();
    for (auto &v : y) v = rng.uni();
    for (auto &v : w) v = 1.f + 0.5f * rng.uni();
    for (auto &v : w2) v = 1.f + 0.5f * rng.uni();
    for (auto &v : gates) v = 0.5f + 0.5f * rng.uni();
    for (auto &v : router) v = 0.2f * rng.uni();
    std::vector<int> picks(rows * k, -1);
    std::vector<float> pg(rows * k, NAN);
    std::vector<float> h0 = h;
    float eps = 1e-5f, post = 1.0f;
    emu_launch(residual_norm, dim3e{(unsigned)rows, 1, 1}, dim3e{1024, 1, 1}, 0, h.data(),
               y.data(), slots ? gates.data() : nullptr, k, w.data(), norm ? w2.data() : nullptr,
               norm ? out.data() : nullptr, d, eps, post, route ? router.data() : nullptr, experts,
               route ? picks.data() : nullptr, route ? pg.data() : nullptr);
    double eh = 0, eo = 0, eg = 0;
    bool picks_ok = true;
    for (int t = 0; t < rows; t++) {
        std::vector<double> u(d), hh(d), o(d);
        double ss = 0;
        for (int i = 0; i < d; i++) {
            double a = 0;
            if (slots)
                for (int j = 0; j < k; j++) a += (double)gates[t * k + j] * y[(size_t)(t * k + j) * d + i];
            else
                a = y[(size_t)t * d + i];
            u[i] = a;
            ss += a * a;
        }
        double inv = 1 / std::sqrt(ss / d + eps), ss2 = 0;
        for (int i = 0; i < d; i++) {
            hh[i] = h0[(size_t)t * d + i] + w[i] * u[i] * inv;
            ss2 += hh[i] * hh[i];
            eh = std::max(eh, off(h[(size_t)t * d + i], hh[i]));
        }
        if (!norm) continue;
        double inv2 = 1 / std::sqrt(ss2 / d + eps);
        for (int i = 0; i < d; i++) {
            o[i] = w2[i] * hh[i] * inv2 * post;
            eo = std::max(eo, off(out[(size_t)t * d + i], o[i]));
        }
        if (!route) continue;
        std::vector<double> lg(experts);
        double mx = -1e300, sum = 0;
        for (int e = 0; e < experts; e++) {
            for (int i = 0; i < d; i++) lg[e] += o[i] * router[(size_t)i * experts + e];
            mx = std::max(mx, lg[e]);
        }
        for (auto &v : lg) sum += (v = std::exp(v - mx));
        std::vector<int> order(experts);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return lg[a] > lg[b]; });
        for (int j = 0; j < k; j++) {
            picks_ok &= picks[t * k + j] == order[j];
            eg = std::max(eg, off(pg[t * k + j], lg[order[j]] / sum));
        }
    }
    char what[160];
    std::snprintf(what, sizeof what, "residual_norm d=%d, %d experts%s%s%s: h", d, experts,
                  slots ? ", slots" : "", norm ? ", norm" : "", route ? ", router" : "");
    expect(eh < 1e-5, what, eh, 1e-5);
    if (norm) {
        std::snprintf(what, sizeof what, "residual_norm d=%d, %d experts: out", d, experts);
        expect(eo < 1e-5, what, eo, 1e-5);
    }
    if (route) {
        std::snprintf(what, sizeof what, "residual_norm d=%d, %d experts: picks, gates", d, experts);
        expect(picks_ok && eg < 1e-5, what, picks_ok ? eg : 1e9, 1e-5);
    }
}

// The kernels that move rows or elements a float4 at a time where the pointers allow
// (gather_rows, scatter_rows, split_cols, combine, to_bf16, gelu_mul), at widths and offsets
// that take the float4 path and the scalar one: every element against a plain loop.
static void row_kernels_case(int d, int shift, uint64_t seed) {
    Rng rng{seed};
    const int rows = 5, n = d + 8, k = 2;
    const unsigned idx[rows] = {3, 0, 4, 1, 2};
    std::vector<float> src((size_t)rows * n + 8), dst((size_t)rows * n + 8);
    for (auto &v : src) v = rng.uni();
    float *s = src.data() + shift, *o = dst.data() + shift;
    double worst = 0;
    auto differ = [&](float a, float b) { worst = std::max(worst, a == b ? 0.0 : 1e9); };
    std::fill(dst.begin(), dst.end(), NAN);
    emu_launch(gather_rows, dim3e{rows, 1, 1}, dim3e{1024, 1, 1}, 0, (const float *)s, idx, o, d);
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < d; i++) differ(o[r * d + i], s[idx[r] * d + i]);
    std::fill(dst.begin(), dst.end(), NAN);
    emu_launch(scatter_rows, dim3e{rows, 1, 1}, dim3e{1024, 1, 1}, 0, (const float *)s, idx, o, d);
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < d; i++) differ(o[idx[r] * d + i], s[r * d + i]);
    for (int c0 : {4, 3}) {
        std::fill(dst.begin(), dst.end(), NAN);
        emu_launch(split_cols, dim3e{rows, 1, 1}, dim3e{1024, 1, 1}, 0, (const float *)s, n, c0,
                   o, d);
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < d; i++) differ(o[r * d + i], s[r * n + c0 + i]);
    }
    // combine: token t takes entries [offsets[t], offsets[t + 1]) (0, 1 or 2 of them).
    const unsigned offsets[rows + 1] = {0, 2, 3, 3, 5, 7};
    const unsigned prow[7] = {4, 1, 0, 2, 3, 1, 4};
    float gates[7];
    for (auto &g : gates) g = 0.5f + 0.5f * rng.uni();
    std::fill(dst.begin(), dst.end(), NAN);
    emu_launch(combine, dim3e{rows, 1, 1}, dim3e{1024, 1, 1}, 0, (const float *)s, offsets, prow,
               (const float *)gates, o, d);
    double comb = 0;
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < d; i++) {
            double a = 0;
            for (unsigned e = offsets[t]; e < offsets[t + 1]; e++)
                a += (double)gates[e] * s[prow[e] * d + i];
            comb = std::max(comb, off(o[t * d + i], a));
        }
    // to_bf16 and gelu_mul over rows * d + 3 elements (a ragged tail of 4).
    size_t len = (size_t)rows * d + 3;
    std::vector<bf16> xb(len + 8, 0xffff);
    bf16 *xo = xb.data() + shift;
    unsigned threads = (unsigned)((len + 3) / 4);
    emu_launch(to_bf16, dim3e{(threads + 255) / 256, 1, 1}, dim3e{256, 1, 1}, 0, (const float *)s,
               xo, (u64)len);
    for (size_t i = 0; i < len; i++) worst = std::max(worst, xo[i] == f2bf(s[i]) ? 0.0 : 1e9);
    std::vector<float> a(src.begin(), src.begin() + len + shift), b(len + shift);
    for (auto &v : b) v = rng.uni();
    emu_launch(gelu_mul, dim3e{(threads + 255) / 256, 1, 1}, dim3e{256, 1, 1}, 0, a.data() + shift,
               (const float *)b.data() + shift, (u64)len);
    double gm = 0;
    for (size_t i = 0; i < len; i++) {
        double x = s[i], u = 0.7978845608 * (x + 0.044715 * x * x * x);
        double want = 0.5 * x * (1 + std::tanh(u)) * b[i + shift];
        gm = std::max(gm, off(a[i + shift], want));
    }
    char what[160];
    std::snprintf(what, sizeof what, "row kernels d=%d, offset %d: copies and to_bf16 exact", d,
                  shift);
    expect(worst == 0, what, worst, 0);
    std::snprintf(what, sizeof what, "row kernels d=%d, offset %d: combine, gelu_mul", d, shift);
    expect(comb < 1e-5 && gm < 1e-5, what, std::max(comb, gm), 1e-5);
}

int main() {
    decode_tests();
    prefill_tests();
    tiled_case(32);
    experts_case(31);
    mma_experts_case(33);
    qmma_case(qmma_1, "qmma_1", 9, 96, 560, 2, 1, 21);
    qmma_case(qmma_2, "qmma_2", 20, 160, 560, 5, 3, 22);
    qmma_case(qmma_4, "qmma_4", 64, 256, 1040, 1, 2, 23);
    qmma_case(qmma_4, "qmma_4", 37, 128, 16, 2, 1, 24);
    for (bool eager : {false, true}) {
        emu_cp_eager = eager;
        wgmma_case(150, 160, 1040, 5, 160, true, false, 41);
        wgmma_case(65, 384, 528, 2, 128, false, false, 42);
        wgmma_case(128, 64, 272, 1, 64, false, false, 43);
        wgmma_case(200, 704, 272, 11, 704, false, false, 44);  // 11 chunks: the stages wrap around
        wgmma_case(70, 256, 528, 1, 256, false, true, 45);
        wgmma_case(270, 256, 528, 1, 128, false, true, 46);  // the epilogue after a K split
    }
    emu_cp_eager = false;
    residual_case(3, 640, 8, 2, false, true, true, 11);
    residual_case(3, 640, 8, 2, true, true, false, 12);
    residual_case(2, 2048 + 96, 5, 2, true, true, true, 13);
    residual_case(4, 256, 8, 2, false, false, false, 14);
    for (int shift : {0, 1})
        for (int d : {640, 6, 643}) row_kernels_case(d, shift, 60 + d + shift);
    std::printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
