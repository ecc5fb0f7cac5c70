//! Elementwise and row-wise operations of the Grok-1 layer, all in f32.

/// `s · x / sqrt(mean(x²) + eps)` over each row of `x` (`[rows, s.len()]`), into `out`.
pub fn rmsnorm(x: &[f32], scale: &[f32], eps: f32, out: &mut [f32]) {
    let d = scale.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &s) in or.iter_mut().zip(xr).zip(scale) {
            *o = s * (v * inv);
        }
    }
}

/// `h += rmsnorm(y, scale)` row by row: the release's post-norm residual update.
pub fn add_rmsnorm(h: &mut [f32], y: &[f32], scale: &[f32], eps: f32) {
    let d = scale.len();
    for (hr, yr) in h.chunks_exact_mut(d).zip(y.chunks_exact(d)) {
        let ms = yr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &s) in hr.iter_mut().zip(yr).zip(scale) {
            *o += s * (v * inv);
        }
    }
}

/// RoPE inverse frequencies: `1 / theta^(2j / head_dim)`, j < head_dim / 2.
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
        .collect()
}

/// Rotates every head of one token's `x` (`[heads, head_dim]`) to `position`, rotate-half form:
/// `x' = x cos φ + [-x2, x1] sin φ` with `φ = position · inv_freq` tiled twice.
pub fn rope(x: &mut [f32], head_dim: usize, position: usize, inv_freq: &[f32]) {
    let half = head_dim / 2;
    let p = position as f32;
    let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq.iter().map(|f| (p * f).sin_cos()).unzip();
    for head in x.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for j in 0..half {
            let (x1, x2) = (a[j], b[j]);
            a[j] = x1 * cos[j] - x2 * sin[j];
            b[j] = x2 * cos[j] + x1 * sin[j];
        }
    }
}

/// JAX's default GELU (tanh approximation).
///
/// Computed as `x · σ(2u)` (`1 + tanh(u) = 2σ(2u)`) with the branch-free
/// [`exp_nonpositive`](crate::sampling::exp_nonpositive): libm's `tanhf` per element kept the
/// expert FFN's loop scalar and cost more than its matmuls at decode batch sizes. The
/// sigmoid form has no cancellation near 0; it is within a few ulp of the tanh form.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = C * (x + 0.044_715 * x * x * x);
    // e = e^(-2|u|) <= 1; σ(2u) = 1 / (1 + e) for u >= 0, e / (1 + e) below.
    let e = crate::sampling::exp_nonpositive(-2.0 * u.abs());
    let num = if u >= 0.0 { 1.0 } else { e };
    x * num / (1.0 + e)
}

/// In-place softmax of one row.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// The `k` largest entries of `p` as (index, value), largest first; ties go to the lower
/// index, as `jax.lax.top_k` does.
pub fn top_k(p: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i, p[i])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_halves() {
        let inv = rope_inv_freq(4, 10000.0);
        assert_eq!(inv[0], 1.0);
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        rope(&mut x, 4, 1, &inv);
        // first pair (x[0], x[2]) rotated by 1 radian
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        let mut y = vec![0.3, -0.2, 0.5, 0.9];
        let y0 = y.clone();
        rope(&mut y, 4, 0, &inv);
        assert_eq!(y, y0);
    }

    #[test]
    fn top_k_breaks_ties_low_index_first() {
        assert_eq!(top_k(&[0.1, 0.4, 0.4, 0.1], 2), vec![(1, 0.4), (2, 0.4)]);
    }

    #[test]
    fn gelu_matches_the_tanh_form_everywhere() {
        let mut worst = 0f32;
        for i in -40_000..=40_000 {
            let x = i as f32 * 2.5e-4; // -10..10
                                       // In f64: the f32 tanh form itself loses digits where tanh nears -1.
            let x64 = f64::from(x);
            let u = 0.797_884_560_802_865_4 * (x64 + 0.044_715 * x64 * x64 * x64);
            let want = 0.5 * x64 * (1.0 + u.tanh());
            let err = ((f64::from(gelu_tanh(x)) - want).abs() / want.abs().max(1e-3)) as f32;
            worst = worst.max(err);
            assert!(err.is_finite(), "gelu_tanh({x}) = {}", gelu_tanh(x));
        }
        assert!(worst < 2e-6, "worst relative error {worst}");
        assert_eq!(gelu_tanh(0.0), 0.0);
        assert!(gelu_tanh(-100.0).abs() < 1e-30 && gelu_tanh(100.0) == 100.0);
        assert!(gelu_tanh(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_is_tanh_form() {
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_tanh(-3.0) - (-0.003_637_4)).abs() < 1e-5);
    }
}
