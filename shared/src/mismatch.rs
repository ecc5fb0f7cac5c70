//! Where two row-major matrices differ, in one line: which rows and columns (ranges, or the
//! residues of a period when the pattern repeats), whether the wrong values are zeros, not
//! finite or a constant multiple of the right ones, and whether they are right values from a
//! fixed offset away. Kernels first run on GPUs that sessions rarely reach: a layout error
//! (a swapped fragment, a missed tile, a wrong swizzle) must be fixable from the log alone.

/// Periods tried for a repeating pattern of wrong rows or columns: fragment, warp, tile sizes.
const PERIODS: [usize; 9] = [2, 4, 8, 16, 32, 64, 128, 256, 512];
/// Wrong outputs checked for a right value nearby, and how far away they look.
const SAMPLES: usize = 48;
const REACH_COLS: usize = 256;
const REACH_ROWS: usize = 128;
/// Ranges of wrong rows or columns listed before the rest are counted.
const MAX_RANGES: usize = 6;

/// `None` when every `got` is finite and within `tol` (absolute) of `want`, both
/// `[rows, cols]` row-major (a `want` that is not finite matches nothing); else what is
/// wrong and where, in one line.
pub fn describe(got: &[f32], want: &[f32], rows: usize, cols: usize, tol: f32) -> Option<String> {
    let n = rows.checked_mul(cols);
    if n != Some(got.len()) || n != Some(want.len()) {
        return Some(format!(
            "sizes differ: got {} values, want {}, for [{rows} x {cols}]",
            got.len(),
            want.len()
        ));
    }
    let bad: Vec<bool> = got
        .iter()
        .zip(want)
        .map(|(g, w)| !g.is_finite() || !w.is_finite() || (g - w).abs() > tol)
        .collect();
    let count = bad.iter().filter(|&&b| b).count();
    if count == 0 {
        return None;
    }
    let wrong = || (0..got.len()).filter(|&i| bad[i]);
    let not_finite = wrong().filter(|&i| !got[i].is_finite()).count();
    let zeros = wrong().filter(|&i| got[i] == 0.0).count();
    let mut row_bad = vec![false; rows];
    let mut col_bad = vec![false; cols];
    for i in wrong() {
        row_bad[i / cols] = true;
        col_bad[i % cols] = true;
    }
    let worst = wrong()
        .max_by(|&a, &b| {
            let d = |i: usize| (got[i] - want[i]).abs();
            d(a).total_cmp(&d(b))
        })
        .unwrap_or(0);
    let mut parts = vec![format!(
        "{count} of {} outputs off by more than {tol:.1e} ({not_finite} not finite, {zeros} zero)",
        got.len()
    )];
    parts.push(format!("rows: {}", pattern(&row_bad)));
    parts.push(format!("cols: {}", pattern(&col_bad)));
    parts.push(format!(
        "worst ({}, {}): {} for {}",
        worst / cols,
        worst % cols,
        got[worst],
        want[worst]
    ));
    if let Some(r) = common_ratio(got, want, &bad, tol) {
        parts.push(format!("wrong values ≈ {r:.4} × the right ones"));
    }
    parts.extend(offsets(got, want, &bad, rows, cols, tol));
    Some(parts.join("; "))
}

/// "k of n: " then the smallest period whose residues say exactly which are wrong, else the
/// ranges of wrong indices.
fn pattern(bad: &[bool]) -> String {
    let n = bad.len();
    let k = bad.iter().filter(|&&b| b).count();
    if k == n {
        return format!("all {n}");
    }
    for p in PERIODS.into_iter().filter(|&p| 2 * p <= n) {
        if (p..n).all(|i| bad[i] == bad[i % p]) {
            return format!("{k} of {n}: ≡ {} (mod {p})", ranges(&bad[..p]));
        }
    }
    format!("{k} of {n}: {}", ranges(bad))
}

/// The runs of set flags as "a-b, c, ..." (the first few, then how many more).
fn ranges(flags: &[bool]) -> String {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        if !flags[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < flags.len() && flags[i] {
            i += 1;
        }
        runs.push(if i - 1 == start {
            start.to_string()
        } else {
            format!("{start}-{}", i - 1)
        });
    }
    let more = runs.len().saturating_sub(MAX_RANGES);
    runs.truncate(MAX_RANGES);
    let mut s = runs.join(", ");
    if more > 0 {
        s.push_str(&format!(" and {more} more runs"));
    }
    s
}

/// got / want over the wrong outputs when nine in ten lie within 1% of their median (a scale
/// applied twice or not at all).
fn common_ratio(got: &[f32], want: &[f32], bad: &[bool], tol: f32) -> Option<f32> {
    let mut r: Vec<f32> = (0..got.len())
        .filter(|&i| bad[i] && got[i].is_finite() && want[i].abs() > tol)
        .map(|i| got[i] / want[i])
        .collect();
    if r.len() < 4 {
        return None;
    }
    r.sort_by(f32::total_cmp);
    let median = r[r.len() / 2];
    let near = r
        .iter()
        .filter(|&&v| (v - median).abs() <= 0.01 * median.abs())
        .count();
    (median != 0.0 && near * 10 >= r.len() * 9).then_some(median)
}

/// For wrong outputs spread over the matrix: the (row, column) offsets at which `want` holds
/// the value they got, same row or same column, when one offset explains a quarter of them
/// (values moved by a fragment or tile mistake). Chance matches spread over many offsets.
fn offsets(
    got: &[f32],
    want: &[f32],
    bad: &[bool],
    rows: usize,
    cols: usize,
    tol: f32,
) -> Option<String> {
    let wrong: Vec<usize> = (0..got.len())
        .filter(|&i| bad[i] && got[i].is_finite())
        .collect();
    if wrong.is_empty() {
        return None;
    }
    let step = wrong.len().div_ceil(SAMPLES);
    let sampled: Vec<usize> = wrong.iter().copied().step_by(step).collect();
    let mut seen: std::collections::BTreeMap<(isize, isize), usize> = Default::default();
    for &i in &sampled {
        let (r, c) = ((i / cols) as isize, (i % cols) as isize);
        let near = |rr: isize, cc: isize| {
            let j = rr as usize * cols + cc as usize;
            (got[i] - want[j]).abs() <= tol
        };
        let reach_c = REACH_COLS.min(cols) as isize;
        let reach_r = REACH_ROWS.min(rows) as isize;
        let in_row = (-reach_c..=reach_c)
            .filter(|&d| d != 0 && (0..cols as isize).contains(&(c + d)) && near(r, c + d))
            .map(|d| (0, d));
        let in_col = (-reach_r..=reach_r)
            .filter(|&d| d != 0 && (0..rows as isize).contains(&(r + d)) && near(r + d, c))
            .map(|d| (d, 0));
        for o in in_row.chain(in_col) {
            *seen.entry(o).or_default() += 1;
        }
    }
    let mut common: Vec<((isize, isize), usize)> = seen
        .into_iter()
        .filter(|&(_, k)| k >= 3 && 4 * k >= sampled.len())
        .collect();
    if common.is_empty() {
        return None;
    }
    common.sort_by_key(|&(_, k)| std::cmp::Reverse(k));
    let listed: Vec<String> = common
        .iter()
        .take(3)
        .map(|&((dr, dc), k)| format!("{k} at ({dr:+}, {dc:+})"))
        .collect();
    Some(format!(
        "of {} sampled wrong outputs, want holds the value got at: {}",
        sampled.len(),
        listed.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::lcg;

    fn random(rows: usize, cols: usize) -> Vec<f32> {
        let mut s = 3;
        (0..rows * cols)
            .map(|_| (lcg(&mut s) % 200_001) as f32 / 100_000.0 - 1.0)
            .collect()
    }

    #[test]
    fn equal_matrices_have_nothing_to_say() {
        let want = random(130, 528);
        let mut got = want.clone();
        got[7] += 1e-5;
        assert_eq!(describe(&got, &want, 130, 528, 1e-4), None);
    }

    #[test]
    fn a_repeating_column_pattern_is_given_by_its_residues() {
        let (rows, cols) = (130, 528);
        let want = random(rows, cols);
        let mut got = want.clone();
        for (i, g) in got.iter_mut().enumerate() {
            if (8..16).contains(&(i % cols % 16)) {
                *g += 0.5;
            }
        }
        let s = describe(&got, &want, rows, cols, 1e-4).unwrap();
        assert!(s.contains("rows: all 130"), "{s}");
        assert!(s.contains("cols: 264 of 528: ≡ 8-15 (mod 16)"), "{s}");
        assert!(
            !s.contains("sampled"),
            "no offset explains added noise: {s}"
        );
    }

    #[test]
    fn a_wanted_value_that_is_not_a_number_matches_nothing() {
        let want: Vec<f32> = vec![1.0, f32::NAN, 3.0, 4.0];
        let s = describe(&want, &want, 2, 2, 1e-4).unwrap();
        assert!(s.starts_with("1 of 4 "), "{s}");
    }

    #[test]
    fn unwritten_rows_are_ranges_of_zeros() {
        let (rows, cols) = (130, 96);
        let want = random(rows, cols);
        let mut got = want.clone();
        got[64 * cols..].fill(0.0);
        got[5 * cols + 3] = f32::NAN;
        let s = describe(&got, &want, rows, cols, 1e-4).unwrap();
        // 66 rows of zeros, one of whose wanted values is itself within 1e-4 of 0.
        assert!(s.starts_with("6336 of 12480 "), "{s}");
        assert!(s.contains("(1 not finite, 6335 zero)"), "{s}");
        assert!(s.contains("rows: 67 of 130: 5, 64-129"), "{s}");
    }

    #[test]
    fn values_moved_by_a_fixed_offset_are_found() {
        let (rows, cols) = (64, 256);
        let want = random(rows, cols);
        let mut got = want.clone();
        // Columns 8-15 of every 16 swapped with 0-7 of the same 16.
        for r in 0..rows {
            for c in 0..cols {
                got[r * cols + c] = want[r * cols + (c ^ 8)];
            }
        }
        let s = describe(&got, &want, rows, cols, 1e-6).unwrap();
        assert!(s.contains("cols: all 256"), "{s}");
        assert!(
            s.contains("at (+0, +8)") && s.contains("at (+0, -8)"),
            "{s}"
        );
        // Tokens shifted down one row.
        let mut got = want.clone();
        got[cols..].copy_from_slice(&want[..(rows - 1) * cols]);
        let s = describe(&got, &want, rows, cols, 1e-6).unwrap();
        assert!(s.contains("at (-1, +0)"), "{s}");
    }

    #[test]
    fn a_common_factor_is_named() {
        let want = random(20, 40);
        let got: Vec<f32> = want.iter().map(|w| 2.0 * w).collect();
        let s = describe(&got, &want, 20, 40, 1e-3).unwrap();
        assert!(s.contains("≈ 2.0000 × the right ones"), "{s}");
    }

    #[test]
    fn wrong_sizes_are_said_not_indexed() {
        let s = describe(&[0.0; 5], &[0.0; 6], 2, 3, 1e-3).unwrap();
        assert!(s.starts_with("sizes differ"), "{s}");
        let s = describe(&[], &[], usize::MAX, 2, 1e-3).unwrap();
        assert!(s.starts_with("sizes differ"), "{s}");
    }

    #[test]
    fn long_runs_are_cut_short() {
        let flags: Vec<bool> = (0..100).map(|i| i % 3 == 0 && i < 90).collect();
        assert_eq!(ranges(&flags), "0, 3, 6, 9, 12, 15 and 24 more runs");
    }
}
