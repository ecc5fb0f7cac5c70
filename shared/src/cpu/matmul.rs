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
/// [`dot`] does, so a sequence's logits do not depend on what else is in its batch; above it
/// the `gemm` crate is twice as fast (measured at 32 rows, tiny preset head).
pub const BT_DOT_MAX_ROWS: usize = 16;

/// `out[m, n] = x[m, k] · bᵀ` where `b` is `[n, k]` row-major (the tied output head).
pub fn matmul_bt(x: &[f32], m: usize, k: usize, b: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "matmul_bt: lhs shape");
    assert_eq!(b.len(), n * k, "matmul_bt: rhs shape");
    assert_eq!(out.len(), m * n, "matmul_bt: output shape");
    if m == 0 || n == 0 {
        return;
    }
    if m <= BT_DOT_MAX_ROWS {
        // Few rows (decode batches): each row of b is read once and dotted with every row of
        // x. Every output is the same `dot` as a batch of one computes, so a sequence's logits
        // do not depend on what else is in its batch.
        let mut cols = vec![0f32; n * m];
        cols.par_chunks_mut(1024 * m)
            .enumerate()
            .for_each(|(c, o)| {
                for (j, vals) in o.chunks_exact_mut(m).enumerate() {
                    let row = &b[(c * 1024 + j) * k..(c * 1024 + j + 1) * k];
                    dot_rows(x, k, row, vals);
                }
            });
        for (j, vals) in cols.chunks_exact(m).enumerate() {
            for (i, &v) in vals.iter().enumerate() {
                out[i * n + j] = v;
            }
        }
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

/// Dot product, vectorised for the CPU it runs on.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        return unsafe { dot_avx2(a, b) };
    }
    dot_body(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

/// `out[i] = dot(x row i, b)` for every row of `x` (`[out.len(), k]`), bitwise equal to
/// [`dot`], but reading `b` once per four rows.
fn dot_rows(x: &[f32], k: usize, b: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        return unsafe { dot_rows_avx2(x, k, b, out) };
    }
    dot_rows_body(x, k, b, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_avx2(x: &[f32], k: usize, b: &[f32], out: &mut [f32]) {
    dot_rows_body(x, k, b, out)
}

#[inline(always)]
fn dot_rows_body(x: &[f32], k: usize, b: &[f32], out: &mut [f32]) {
    let mut i = 0;
    while i + 4 <= out.len() {
        let r = dot4_body(
            [
                &x[i * k..(i + 1) * k],
                &x[(i + 1) * k..(i + 2) * k],
                &x[(i + 2) * k..(i + 3) * k],
                &x[(i + 3) * k..(i + 4) * k],
            ],
            b,
        );
        out[i..i + 4].copy_from_slice(&r);
        i += 4;
    }
    for (j, o) in out.iter_mut().enumerate().skip(i) {
        *o = dot_body(&x[j * k..(j + 1) * k], b);
    }
}

/// Four [`dot_body`]s sharing the loads of `b`: each row keeps its own sixteen accumulators
/// and the same order of operations, so every result is bitwise that of `dot_body`.
#[inline(always)]
fn dot4_body(a: [&[f32]; 4], b: &[f32]) -> [f32; 4] {
    const W: usize = 16;
    let (mut s0, mut s1, mut s2, mut s3) = ([0f32; W], [0f32; W], [0f32; W], [0f32; W]);
    let cb = b.chunks_exact(W);
    let (c0, c1, c2, c3) = (
        a[0].chunks_exact(W),
        a[1].chunks_exact(W),
        a[2].chunks_exact(W),
        a[3].chunks_exact(W),
    );
    let tails = [
        c0.remainder(),
        c1.remainder(),
        c2.remainder(),
        c3.remainder(),
    ];
    let bt = cb.remainder();
    for ((((y, x0), x1), x2), x3) in cb.zip(c0).zip(c1).zip(c2).zip(c3) {
        for l in 0..W {
            s0[l] += x0[l] * y[l];
            s1[l] += x1[l] * y[l];
            s2[l] += x2[l] * y[l];
            s3[l] += x3[l] * y[l];
        }
    }
    let mut out = [0f32; 4];
    for (r, acc) in [s0, s1, s2, s3].iter().enumerate() {
        let tail: f32 = tails[r].iter().zip(bt).map(|(p, q)| p * q).sum();
        out[r] = acc.iter().sum::<f32>() + tail;
    }
    out
}

/// Sixteen independent accumulators so the loop vectorises without `-ffast-math`.
/// (No `mul_add`: without hardware FMA it becomes a slow library call.)
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    const W: usize = 16;
    let mut acc = [0f32; W];
    let ca = a.chunks_exact(W);
    let cb = b.chunks_exact(W);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..W {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::ByteView;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    pub(crate) fn random_qmatrix(k: usize, n: usize, groups: usize, seed: u64) -> QMatrix {
        let mut s = seed;
        let w: Vec<u8> = (0..k * n).map(|_| (lcg(&mut s) % 255) as u8).collect();
        let scales = (0..groups * n)
            .map(|_| 0.001 + (lcg(&mut s) % 1000) as f32 * 1e-5)
            .collect();
        QMatrix {
            k,
            n,
            group_rows: k / groups,
            weight: ByteView::from_vec(w),
            scales,
        }
    }

    fn reference(x: &[f32], m: usize, w: &QMatrix) -> Vec<f32> {
        let d = w.dequantize();
        let mut out = vec![0f64; m * w.n];
        for r in 0..m {
            for kk in 0..w.k {
                for j in 0..w.n {
                    out[r * w.n + j] += x[r * w.k + kk] as f64 * d[kk * w.n + j] as f64;
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

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
            let want = reference(&x, m, &w);
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "m={m} k={k} n={n} at {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn matmul_bt_matches_naive() {
        let (k, n) = (37, 2100);
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        for m in [1, 5, 70] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let mut out = vec![0f32; m * n];
            matmul_bt(&x, m, k, &b, n, &mut out);
            for r in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|kk| x[r * k + kk] * b[j * k + kk]).sum();
                    assert!((out[r * n + j] - want).abs() < 1e-4, "{r},{j}");
                }
            }
        }
    }

    #[test]
    fn matmul_bt_rows_do_not_depend_on_the_batch() {
        let (k, n) = (64, 3000);
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 101) as f32 / 37.0 - 1.3)
            .collect();
        let m = BT_DOT_MAX_ROWS;
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31) % 23) as f32 / 9.0 - 1.1)
            .collect();
        let mut all = vec![0f32; m * n];
        matmul_bt(&x, m, k, &b, n, &mut all);
        for r in [0, 7, m - 1] {
            let mut one = vec![0f32; n];
            matmul_bt(&x[r * k..(r + 1) * k], 1, k, &b, n, &mut one);
            assert_eq!(one, all[r * n..(r + 1) * n], "row {r}");
        }
    }
}
