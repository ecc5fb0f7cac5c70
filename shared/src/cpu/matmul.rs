//! Matrix products on the CPU. Int8 weights are dequantised on the fly, per tile, inside the
//! product: a few activation rows (decode) stream the int8 bytes once through a SIMD kernel;
//! many rows (prefill) dequantise a cache-sized tile and hand it to the `gemm` crate.

use crate::model::QMatrix;
use gemm::Parallelism;
use rayon::prelude::*;

/// Up to this many activation rows take the streaming kernel (bound by weight bytes);
/// above it the tile + gemm path (bound by arithmetic) wins.
pub const STREAM_MAX_ROWS: usize = 8;
/// Tile of the prefill path: `TILE_K × TILE_N` f32 (256 KiB) stays in L2.
const TILE_K: usize = 256;
const TILE_N: usize = 256;

/// `out[m, n] = Σ_k x[m, k] · w[k, n]`; `x` is `[m, w.k]`, `out` is `[m, w.n]` (overwritten).
pub fn qmatmul(x: &[f32], m: usize, w: &QMatrix, out: &mut [f32]) {
    assert_eq!(x.len(), m * w.k, "qmatmul: activation shape");
    assert_eq!(out.len(), m * w.n, "qmatmul: output shape");
    if m == 0 || w.n == 0 {
        return;
    }
    if m <= STREAM_MAX_ROWS {
        qmatmul_stream(x, m, w, out)
    } else {
        qmatmul_tiled(x, m, w, out)
    }
}

fn qmatmul_stream(x: &[f32], m: usize, w: &QMatrix, out: &mut [f32]) {
    // Each task takes a contiguous range of weight rows, so every thread reads one sequential
    // stream of int8 bytes; the tasks' partial sums are added at the end.
    let tasks = rayon::current_num_threads().max(1);
    let k = w.k;
    let partials: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let (ka, kb) = (t * k / tasks, (t + 1) * k / tasks);
            let mut acc = vec![0f32; m * w.n];
            stream_rows_dispatch(x, m, w, ka, kb, &mut acc);
            acc
        })
        .collect();
    out.fill(0.0);
    for p in partials {
        for (o, v) in out.iter_mut().zip(&p) {
            *o += v;
        }
    }
}

fn stream_rows_dispatch(x: &[f32], m: usize, w: &QMatrix, ka: usize, kb: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { stream_rows_avx512(x, m, w, ka, kb, acc) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { stream_rows_avx2(x, m, w, ka, kb, acc) };
        }
    }
    stream_rows(x, m, w, ka, kb, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn stream_rows_avx512(
    x: &[f32],
    m: usize,
    w: &QMatrix,
    ka: usize,
    kb: usize,
    acc: &mut [f32],
) {
    stream_rows(x, m, w, ka, kb, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_rows_avx2(
    x: &[f32],
    m: usize,
    w: &QMatrix,
    ka: usize,
    kb: usize,
    acc: &mut [f32],
) {
    stream_rows(x, m, w, ka, kb, acc)
}

/// Columns per tile of the streaming kernel: the per-row partial sums (`m × STREAM_TILE` f32)
/// stay in L1 while each weight row is read in long contiguous runs.
const STREAM_TILE: usize = 2048;
/// Offset (in f32) of the partial sums inside their buffer; see `stream_rows`.
const PART_SKEW: usize = 40;

/// `acc[m, n] += x[:, ka..kb] · w[ka..kb, :]`. Inlined into each `target_feature` wrapper so
/// the loops are vectorised for that instruction set.
#[inline(always)]
fn stream_rows(x: &[f32], m: usize, w: &QMatrix, ka: usize, kb: usize, acc: &mut [f32]) {
    let (k, n, gr) = (w.k, w.n, w.group_rows);
    let wq = w.weight_i8();
    let tile = STREAM_TILE.min(n);
    // Partial sums start off a 4 KiB boundary: when weight rows are a multiple of 2 KiB long,
    // stores to the sums would otherwise alias the row loads (4K aliasing stalls).
    let mut part_buf = vec![0f32; m * tile + PART_SKEW];
    let part = &mut part_buf[PART_SKEW..];
    let mut c0 = 0;
    while c0 < n {
        let tw = tile.min(n - c0);
        let mut g0 = ka;
        while g0 < kb {
            // rows g0..g1 share one scale row
            let g1 = kb.min((g0 / gr + 1) * gr);
            part.fill(0.0);
            let mut kk = g0;
            while kk + 4 <= g1 {
                let r0 = &wq[kk * n + c0..][..tw];
                let r1 = &wq[(kk + 1) * n + c0..][..tw];
                let r2 = &wq[(kk + 2) * n + c0..][..tw];
                let r3 = &wq[(kk + 3) * n + c0..][..tw];
                for r in 0..m {
                    let xr = &x[r * k + kk..][..4];
                    let (x0, x1, x2, x3) = (xr[0], xr[1], xr[2], xr[3]);
                    let p = &mut part[r * tw..(r + 1) * tw];
                    for j in 0..tw {
                        p[j] += x0 * r0[j] as f32
                            + x1 * r1[j] as f32
                            + x2 * r2[j] as f32
                            + x3 * r3[j] as f32;
                    }
                }
                kk += 4;
            }
            while kk < g1 {
                let r0 = &wq[kk * n + c0..][..tw];
                for r in 0..m {
                    let x0 = x[r * k + kk];
                    let p = &mut part[r * tw..(r + 1) * tw];
                    for j in 0..tw {
                        p[j] += x0 * r0[j] as f32;
                    }
                }
                kk += 1;
            }
            let scale = &w.scales[(g0 / gr) * n + c0..][..tw];
            for r in 0..m {
                let a = &mut acc[r * n + c0..][..tw];
                for ((av, &pv), &sv) in a.iter_mut().zip(&part[r * tw..(r + 1) * tw]).zip(scale) {
                    *av += pv * sv;
                }
            }
            g0 = g1;
        }
        c0 += tw;
    }
}

/// Raw output pointer shared by tasks that write disjoint column ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column blocks of the output, and the caller's `&mut` outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw field.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

fn qmatmul_tiled(x: &[f32], m: usize, w: &QMatrix, out: &mut [f32]) {
    let (k, n, gr) = (w.k, w.n, w.group_rows);
    let wq = w.weight_i8();
    let dst = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(TILE_N)).into_par_iter().for_each(|b| {
        let n0 = b * TILE_N;
        let nb = TILE_N.min(n - n0);
        let mut tile = vec![0f32; TILE_K * nb];
        let mut k0 = 0;
        while k0 < k {
            // Tiles never straddle a scale group, so each tile row has one scale row.
            let kt = TILE_K.min(k - k0).min(gr - k0 % gr);
            dequant_tile_dispatch(wq, &w.scales, n, gr, k0, kt, n0, nb, &mut tile);
            // SAFETY: all pointers and strides describe in-bounds row-major matrices:
            // dst `[m, n]` at column n0 (width nb), lhs `x[:, k0..k0+kt]`, rhs the tile
            // `[kt, nb]`; this task alone writes columns n0..n0+nb.
            unsafe {
                gemm::gemm(
                    m,
                    nb,
                    kt,
                    dst.at(n0),
                    1,
                    n as isize,
                    k0 > 0,
                    x.as_ptr().add(k0),
                    1,
                    k as isize,
                    tile.as_ptr(),
                    1,
                    nb as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            k0 += kt;
        }
    });
}

#[allow(clippy::too_many_arguments)]
fn dequant_tile_dispatch(
    wq: &[i8],
    scales: &[f32],
    n: usize,
    gr: usize,
    k0: usize,
    kt: usize,
    n0: usize,
    nb: usize,
    tile: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        return unsafe { dequant_tile_avx2(wq, scales, n, gr, k0, kt, n0, nb, tile) };
    }
    dequant_tile(wq, scales, n, gr, k0, kt, n0, nb, tile)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn dequant_tile_avx2(
    wq: &[i8],
    scales: &[f32],
    n: usize,
    gr: usize,
    k0: usize,
    kt: usize,
    n0: usize,
    nb: usize,
    tile: &mut [f32],
) {
    dequant_tile(wq, scales, n, gr, k0, kt, n0, nb, tile)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dequant_tile(
    wq: &[i8],
    scales: &[f32],
    n: usize,
    gr: usize,
    k0: usize,
    kt: usize,
    n0: usize,
    nb: usize,
    tile: &mut [f32],
) {
    let s = &scales[(k0 / gr) * n + n0..(k0 / gr) * n + n0 + nb];
    for r in 0..kt {
        let src = &wq[(k0 + r) * n + n0..(k0 + r) * n + n0 + nb];
        for ((d, &q), &sc) in tile[r * nb..(r + 1) * nb].iter_mut().zip(src).zip(s) {
            *d = q as f32 * sc;
        }
    }
}

/// Up to this many rows (decode batches), [`matmul_bt`] computes every output bitwise as
/// [`dot`] does, so a sequence's logits do not depend on what else is in its batch. Batch
/// invariance costs nothing up to here: on the tiny preset head the dot kernel beats the
/// `gemm` crate at 24 rows (24 vs 35 ms) and ties it at 32; `gemm` wins at 48.
pub const BT_DOT_MAX_ROWS: usize = 32;

/// `out[m, n] = x[m, k] · bᵀ` where `b` is `[n, k]` row-major (the tied output head).
pub fn matmul_bt(x: &[f32], m: usize, k: usize, b: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "matmul_bt: lhs shape");
    assert_eq!(b.len(), n * k, "matmul_bt: rhs shape");
    assert_eq!(out.len(), m * n, "matmul_bt: output shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    if m <= BT_DOT_MAX_ROWS {
        // Few rows (decode batches): each task streams a contiguous run of b's rows once and
        // dots each with every row of x. Every output is the same `dot` as a batch of one
        // computes, so a sequence's logits do not depend on what else is in its batch.
        let rows = (BT_TASK_FLOATS / k).max(16);
        let dst = OutPtr(out.as_mut_ptr());
        b.par_chunks(rows * k).enumerate().for_each(|(t, bc)| {
            let (j0, nb) = (t * rows, bc.len() / k);
            let mp = m.div_ceil(GROUP) * GROUP;
            let mut block = vec![0f32; nb * mp];
            bt_block(x, m, k, bc, &mut block);
            for r in 0..m {
                // SAFETY: row r of `out` holds n values and j0 + nb <= n; this task alone
                // writes columns j0..j0 + nb, and `out` is borrowed mutably for the whole call.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * n + j0), nb) };
                for (o, &v) in o.iter_mut().zip(block[r..].iter().step_by(mp)) {
                    *o = v;
                }
            }
        });
        return;
    }
    // SAFETY: shapes checked above; b viewed as `[k, n]` with row stride 1, column stride k.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// Floats of b per task of [`matmul_bt`] (1 MiB): few enough tasks that scheduling is
/// negligible, enough that both cores stay busy to the end.
const BT_TASK_FLOATS: usize = 1 << 18;

/// Width of the dot-product accumulators (one AVX register).
///
/// Every dot product in this module — [`dot`], each output of [`matmul_bt`] up to
/// [`BT_DOT_MAX_ROWS`] rows, on the AVX2 or the portable path — is computed in one order:
/// element `i` goes to lane `i % LANES` as a separate multiply then add (no FMA: the portable
/// path could not match it bitwise without slow software FMA, and FMA measured no faster
/// here, the floating-point ports being the limit either way), the last partial block is
/// zero-padded, and the lanes are summed by [`reduce_lanes`]'s fixed tree. So a result never
/// depends on which kernel, batch size or batch position computed it.
const LANES: usize = 8;

/// Rows of x dotted with each row of b at once: eight accumulators hide the add latency, and
/// eight rows plus one row of b per step stay within the 16 AVX registers.
const GROUP: usize = 8;

/// Dot product, vectorised for the CPU it runs on (over the common length of `a` and `b`).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2; both slices hold at least k values.
        return unsafe { Avx2::dots::<1>(a.as_ptr(), 0, b.as_ptr(), k) }[0];
    }
    // SAFETY: as above; the portable kernel needs no CPU feature.
    let v = unsafe { Portable::dots::<1>(a.as_ptr(), 0, b.as_ptr(), k) };
    v[0]
}

/// A kernel computing dot products in the order [`LANES`] describes.
trait Dots {
    /// `out[i] = dot(x[i * stride..][..k], b[..k])` for `i < R` (`R <= GROUP`); the other
    /// lanes of `out` are unspecified.
    ///
    /// # Safety
    /// The CPU supports the implementation's instructions; `b` is valid for `k` reads and each
    /// `x + i * stride` (`i < R`) for `k` reads.
    unsafe fn dots<const R: usize>(
        x: *const f32,
        stride: usize,
        b: *const f32,
        k: usize,
    ) -> [f32; GROUP];
}

struct Portable;

impl Dots for Portable {
    #[inline(always)]
    unsafe fn dots<const R: usize>(
        x: *const f32,
        stride: usize,
        b: *const f32,
        k: usize,
    ) -> [f32; GROUP] {
        // SAFETY: the caller guarantees these ranges are readable.
        let b = unsafe { std::slice::from_raw_parts(b, k) };
        let mut out = [0f32; GROUP];
        for (i, o) in out.iter_mut().enumerate().take(R) {
            // SAFETY: as above.
            let x = unsafe { std::slice::from_raw_parts(x.add(i * stride), k) };
            let mut acc = [0f32; LANES];
            for (xc, bc) in x.chunks(LANES).zip(b.chunks(LANES)) {
                // A short last block counts as zero-padded, as the AVX2 kernel loads it.
                let (mut xv, mut bv) = ([0f32; LANES], [0f32; LANES]);
                xv[..xc.len()].copy_from_slice(xc);
                bv[..bc.len()].copy_from_slice(bc);
                for l in 0..LANES {
                    acc[l] += xv[l] * bv[l];
                }
            }
            *o = reduce_lanes(acc);
        }
        out
    }
}

/// The lanes' sum in the tree `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`: the order
/// of the AVX2 kernel's reductions (halves added, twice, then the last pair).
#[inline(always)]
fn reduce_lanes(v: [f32; LANES]) -> f32 {
    let s = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Dots for Avx2 {
    #[inline(always)]
    unsafe fn dots<const R: usize>(
        x: *const f32,
        stride: usize,
        b: *const f32,
        k: usize,
    ) -> [f32; GROUP] {
        // SAFETY: forwarded from the caller.
        unsafe { avx2::dots::<R>(x, stride, b, k) }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{GROUP, LANES};
    use std::arch::x86_64::*;

    /// [`super::Dots::dots`] with AVX2: one multiply and one add per row per step, `R`
    /// accumulators plus the loaded block of b in registers (x is read from L1 each step).
    ///
    /// # Safety
    /// As [`super::Dots::dots`].
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn dots<const R: usize>(
        x: *const f32,
        stride: usize,
        b: *const f32,
        k: usize,
    ) -> [f32; GROUP] {
        let mut acc = [_mm256_setzero_ps(); R];
        let full = k - k % LANES;
        let mut i = 0;
        while i < full {
            // SAFETY: i + LANES <= k: every load stays within the caller's ranges.
            unsafe {
                let bv = _mm256_loadu_ps(b.add(i));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(r * stride + i));
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(xv, bv));
                }
            }
            i += LANES;
        }
        if full < k {
            // The last partial block, zero-padded (rare: the model's widths are multiples of 8).
            let mask = tail_mask(k - full);
            // SAFETY: masked lanes are not read; the others lie below k.
            unsafe {
                let bv = _mm256_maskload_ps(b.add(full), mask);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_maskload_ps(x.add(r * stride + full), mask);
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(xv, bv));
                }
            }
        }
        let mut out = [0f32; GROUP];
        if R == 1 {
            out[0] = reduce(acc[0]);
        } else {
            let mut v = [_mm256_setzero_ps(); GROUP];
            v[..R].copy_from_slice(&acc);
            // SAFETY: `out` holds GROUP = 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), reduce8(v)) };
        }
        out
    }

    /// Mask of the first `len` (< 8) lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn tail_mask(len: usize) -> __m256i {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), lane)
    }

    /// [`super::reduce_lanes`] of one register.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn reduce(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<1>(t, t)))
    }

    /// [`super::reduce_lanes`] of eight registers at once, lane `i` of the result from `v[i]`:
    /// the same additions as [`reduce`], with shuffles that pack eight reductions per add.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn reduce8(v: [__m256; 8]) -> __m256 {
        // s_i = lanes 0..4 + lanes 4..8 of v[i]; s04 = [s_0 | s_4], and so on.
        let s = |a: __m256, b: __m256| {
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(a, b),
                _mm256_permute2f128_ps::<0x31>(a, b),
            )
        };
        let (s04, s15, s26, s37) = (s(v[0], v[4]), s(v[1], v[5]), s(v[2], v[6]), s(v[3], v[7]));
        // t_i = [s_i0 + s_i2, s_i1 + s_i3]; t0145 = [t_0, t_1 | t_4, t_5].
        let t = |a: __m256, b: __m256| {
            _mm256_add_ps(
                _mm256_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm256_shuffle_ps::<0b11_10_11_10>(a, b),
            )
        };
        let (t0145, t2367) = (t(s04, s15), t(s26, s37));
        // r_i = t_i0 + t_i1, in lane i.
        _mm256_add_ps(
            _mm256_shuffle_ps::<0b10_00_10_00>(t0145, t2367),
            _mm256_shuffle_ps::<0b11_01_11_01>(t0145, t2367),
        )
    }
}

/// `out[j * mp + r] = dot(x row r, b row j)` for `x` `[m, k]` and `b` `[nb, k]` (`k > 0`),
/// where `mp` is `m` rounded up to a multiple of [`GROUP`]: `out` holds `nb * mp` values, and
/// those at `r >= m` are scratch.
fn bt_block(x: &[f32], m: usize, k: usize, b: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        return unsafe { bt_block_avx2(x, m, k, b, out) };
    }
    // SAFETY: the portable kernel needs no CPU feature.
    unsafe { bt_block_body::<Portable>(x, m, k, b, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bt_block_avx2(x: &[f32], m: usize, k: usize, b: &[f32], out: &mut [f32]) {
    // SAFETY: forwarded from the caller.
    unsafe { bt_block_body::<Avx2>(x, m, k, b, out) }
}

/// One row of b at a time against groups of up to [`GROUP`] rows of x, so b is read strictly
/// in order: tiles over two rows of b (fewer loads of x per multiply) interleave two streams
/// 1 KiB apart and ran slower at every batch size, even with prefetching.
///
/// # Safety
/// The CPU supports `T`'s instructions.
#[inline(always)]
unsafe fn bt_block_body<T: Dots>(x: &[f32], m: usize, k: usize, b: &[f32], out: &mut [f32]) {
    let mp = m.div_ceil(GROUP) * GROUP;
    assert!(k > 0 && x.len() >= m * k && out.len() >= b.len() / k * mp);
    for (j, row) in b.chunks_exact(k).enumerate() {
        prefetch(b, (j * k + BT_PREFETCH)..((j + 1) * k + BT_PREFETCH));
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(GROUP);
            let xp = x[r * k..].as_ptr();
            // SAFETY: the CPU supports T's instructions (caller); rows r..r + rows <= m of x
            // (stride k) and `row` each hold k values (asserted above).
            let v = unsafe {
                match rows {
                    8 => T::dots::<8>(xp, k, row.as_ptr(), k),
                    7 => T::dots::<7>(xp, k, row.as_ptr(), k),
                    6 => T::dots::<6>(xp, k, row.as_ptr(), k),
                    5 => T::dots::<5>(xp, k, row.as_ptr(), k),
                    4 => T::dots::<4>(xp, k, row.as_ptr(), k),
                    3 => T::dots::<3>(xp, k, row.as_ptr(), k),
                    2 => T::dots::<2>(xp, k, row.as_ptr(), k),
                    _ => T::dots::<1>(xp, k, row.as_ptr(), k),
                }
            };
            // One vector store: r + GROUP <= mp, and lanes past `rows` land in row j's
            // scratch.
            out[j * mp + r..][..GROUP].copy_from_slice(&v);
            r += rows;
        }
    }
}

/// How far ahead of the row being dotted [`bt_block_body`] prefetches b, in floats (8 KiB):
/// hardware prefetchers stop at 4 KiB pages and fall behind while the cores compute (batches
/// of several rows). Measured about 5% faster at batch 1 to 8 (noisy; 4 to 16 KiB alike).
const BT_PREFETCH: usize = 2048;

/// Asks for the cache lines of `s[range]` (the part within `s`) to be loaded.
#[inline(always)]
fn prefetch(s: &[f32], range: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let end = range.end.min(s.len());
        let mut i = range.start;
        while i < end {
            // SAFETY: a prefetch is only a hint and never faults; the address is inside `s`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().add(i).cast()) };
            i += 16;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, range);
}

/// `out[m, n] = x[m, k] · b[k, n]`, all f32 row-major (the gemm crate, all threads).
pub fn matmul_f32(x: &[f32], m: usize, k: usize, b: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "matmul_f32: lhs shape");
    assert_eq!(b.len(), k * n, "matmul_f32: rhs shape");
    assert_eq!(out.len(), m * n, "matmul_f32: output shape");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: shapes checked above; all three are row-major.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{lcg, qmatmul_reference, random_qmatrix};

    #[test]
    fn both_paths_match_dequantised_reference() {
        let mut s = 7u64;
        for &(m, k, n, g) in &[
            (1, 64, 40, 1),
            (3, 344, 256, 8),
            (8, 256, 1000, 1),
            (9, 344, 130, 8),
            (40, 520, 300, 8),
        ] {
            let w = random_qmatrix(k, n, g, m as u64);
            let x: Vec<f32> = (0..m * k)
                .map(|_| (lcg(&mut s) % 2000) as f32 / 1000.0 - 1.0)
                .collect();
            let mut out = vec![f32::NAN; m * n];
            qmatmul(&x, m, &w, &mut out);
            let want: Vec<f32> = qmatmul_reference(&x, m, &w)
                .into_iter()
                .map(|v| v as f32)
                .collect();
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "m={m} k={k} n={n} at {i}: {a} vs {b}"
                );
            }
        }
    }

    /// Deterministic values in [-1.3, 1.3) with plenty of mantissa bits, so a different
    /// order of additions shows in the last bits.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| (lcg(&mut s) % 1_000_003) as f32 / 384_617.0 - 1.3)
            .collect()
    }

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum()
    }

    #[test]
    fn dot_matches_naive() {
        for k in [0, 1, 7, 8, 9, 16, 37, 64, 127, 128, 130, 256] {
            let (a, b) = (values(k, 1 + k as u64), values(k, 1000 + k as u64));
            let want = naive_dot(&a, &b);
            let got = dot(&a, &b);
            assert!(
                (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                "k={k}"
            );
            // Over the common length when the lengths differ.
            assert_eq!(
                dot(&a, &b[..k / 2]).to_bits(),
                dot(&a[..k / 2], &b).to_bits()
            );
        }
    }

    #[test]
    fn dot_is_bitwise_the_portable_kernel() {
        for k in [1, 5, 8, 37, 128, 130, 256] {
            let (a, b) = (values(k, 7 + k as u64), values(k, 70 + k as u64));
            // SAFETY: both slices hold k values; the portable kernel needs no CPU feature.
            let [p, ..] = unsafe { Portable::dots::<1>(a.as_ptr(), 0, b.as_ptr(), k) };
            assert_eq!(dot(&a, &b).to_bits(), p.to_bits(), "k={k}");
        }
    }

    #[test]
    fn matmul_bt_matches_naive() {
        let (k, n) = (37, 2100);
        let b = values(n * k, 3);
        for m in [1, 5, 8, 9, 16, 70] {
            let x = values(m * k, 4 + m as u64);
            let mut out = vec![f32::NAN; m * n];
            matmul_bt(&x, m, k, &b, n, &mut out);
            for r in 0..m {
                for j in 0..n {
                    let want = naive_dot(&x[r * k..(r + 1) * k], &b[j * k..(j + 1) * k]);
                    let got = out[r * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "m={m} {r},{j}"
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_bt_handles_empty_shapes() {
        let mut out = vec![f32::NAN; 6];
        matmul_bt(&[], 2, 0, &[], 3, &mut out);
        assert_eq!(out, [0.0; 6]);
        matmul_bt(&[1.0; 4], 2, 2, &[], 0, &mut []);
        matmul_bt(&[], 0, 2, &[1.0; 4], 2, &mut []);
    }

    /// Every output of the batched kernel is bitwise `dot` of its two rows, whatever the batch
    /// size, the row's position in it, k (multiples of 8 or not) and the task split of b, and
    /// the portable kernel (the path without AVX2) gives the same bits.
    #[test]
    fn matmul_bt_rows_do_not_depend_on_the_batch() {
        // n spans several tasks (BT_TASK_FLOATS / k rows each) with a short last one.
        for k in [37, 64, 130, 256] {
            let n = 3 * (BT_TASK_FLOATS / k).max(16) + 5;
            let b = values(n * k, k as u64);
            let pool = values(BT_DOT_MAX_ROWS * k, 100 + k as u64);
            let want: Vec<Vec<u32>> = pool
                .chunks_exact(k)
                .map(|row| {
                    b.chunks_exact(k)
                        .map(|col| dot(row, col).to_bits())
                        .collect()
                })
                .collect();
            for m in 1..=BT_DOT_MAX_ROWS {
                // Rows of the pool in a batch-dependent order, so each row takes several
                // positions across batch sizes.
                let order: Vec<usize> = (0..m).map(|i| (i * 5 + m) % BT_DOT_MAX_ROWS).collect();
                let x: Vec<f32> = order
                    .iter()
                    .flat_map(|&p| pool[p * k..(p + 1) * k].iter().copied())
                    .collect();
                let mut out = vec![f32::NAN; m * n];
                matmul_bt(&x, m, k, &b, n, &mut out);
                for (i, &p) in order.iter().enumerate() {
                    let got: Vec<u32> = out[i * n..(i + 1) * n]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    assert!(got == want[p], "k={k} m={m} position {i}");
                }
                let mut portable = vec![0f32; n * m.div_ceil(GROUP) * GROUP];
                // SAFETY: the portable kernel needs no CPU feature.
                unsafe { bt_block_body::<Portable>(&x, m, k, &b, &mut portable) };
                let mp = m.div_ceil(GROUP) * GROUP;
                for (i, &p) in order.iter().enumerate() {
                    for j in 0..n {
                        assert_eq!(portable[j * mp + i].to_bits(), want[p][j], "k={k} m={m}");
                    }
                }
            }
        }
    }
}
