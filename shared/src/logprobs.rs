//! Log-probabilities of tokens under a row of logits (log-softmax accumulated in f64): the
//! chosen token's and the most likely alternatives, for `logprobs` in responses. Workers use
//! it when they sample; the coordinator when it scores prompt tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A logit as log-softmax sees it: NaN counts as -inf, and -0.0 as 0.0 (so that ties are
/// exact for [`f32::total_cmp`]).
#[inline]
fn clean(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x + 0.0
    }
}

/// The normalizer of a log-softmax over one row of logits.
#[derive(Debug, Clone, Copy)]
pub struct LogSoftmax {
    /// Largest logit (after [`clean`]).
    max: f64,
    /// `ln Σ exp(x − max)`, accumulated in f64.
    log_sum: f64,
    /// How many logits are +inf (they share all of the probability).
    infinite: usize,
}

impl LogSoftmax {
    pub fn new(logits: &[f32]) -> Self {
        let mut max = f32::NEG_INFINITY;
        let mut infinite = 0usize;
        for &x in logits {
            let x = clean(x);
            max = max.max(x);
            infinite += usize::from(x == f32::INFINITY);
        }
        let max = f64::from(max);
        let log_sum = if max.is_finite() {
            logits
                .iter()
                .map(|&x| (f64::from(clean(x)) - max).exp())
                .sum::<f64>()
                .ln()
        } else {
            0.0
        };
        LogSoftmax {
            max,
            log_sum,
            infinite,
        }
    }

    /// The log-probability of a logit of this row (always <= 0; -inf when the row has no
    /// finite or +inf logit at all).
    pub fn logprob(&self, x: f32) -> f32 {
        let x = clean(x);
        if self.infinite > 0 {
            return if x == f32::INFINITY {
                -(self.infinite as f64).ln() as f32
            } else {
                f32::NEG_INFINITY
            };
        }
        if !self.max.is_finite() {
            return f32::NEG_INFINITY;
        }
        ((f64::from(x) - self.max) - self.log_sum) as f32
    }
}

/// The logprob of `id` under `logits` (a row of f32 logits, log-softmax in f64); -inf for an
/// id outside the row. NaN logits count as -inf.
pub fn logprob_of(logits: &[f32], id: u32) -> f32 {
    match logits.get(id as usize) {
        Some(&x) => LogSoftmax::new(logits).logprob(x),
        None => f32::NEG_INFINITY,
    }
}

/// The top `n` (id, logprob) of `logits`, best first (ties: lower id first); fewer when the
/// row is shorter. NaN logits count as -inf.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 || logits.is_empty() {
        return Vec::new();
    }
    top_with(logits, n, &LogSoftmax::new(logits))
}

/// A candidate for the top-n; ordered worst first → greatest, so that a max-heap keeps the
/// worst kept candidate on top.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    logit: f32,
    id: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Greater = worse: a lower logit, or the same logit and a higher id.
        other
            .logit
            .total_cmp(&self.logit)
            .then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

fn top_with(logits: &[f32], n: usize, norm: &LogSoftmax) -> Vec<(u32, f32)> {
    let n = n.min(logits.len());
    let mut heap: BinaryHeap<Candidate> = BinaryHeap::with_capacity(n + 1);
    // Ids beyond u32 cannot name a token; such a row is not a vocabulary row.
    for (id, &x) in (0..=u32::MAX).zip(logits) {
        let cand = Candidate {
            logit: clean(x),
            id,
        };
        if heap.len() < n {
            heap.push(cand);
        } else if heap.peek().is_some_and(|worst| cand < *worst) {
            heap.pop();
            heap.push(cand);
        }
    }
    heap.into_sorted_vec()
        .into_iter()
        .map(|c| (c.id, norm.logprob(c.logit)))
        .collect()
}

/// The logprob of `id` and the top `n` alternatives, sharing one normalizer.
pub fn token_and_top(logits: &[f32], id: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let norm = LogSoftmax::new(logits);
    let logprob = logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |&x| norm.logprob(x));
    let top = if n == 0 || logits.is_empty() {
        Vec::new()
    } else {
        top_with(logits, n, &norm)
    };
    (logprob, top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Rng;

    fn random_logits(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32 * scale)
            .collect()
    }

    #[test]
    fn logprobs_sum_to_one() {
        let mut rng = Rng::new(3);
        for (n, scale) in [
            (1, 1.0),
            (10, 5.0),
            (131_072, 20.0),
            (1000, 1e4),
            (50, 1e30),
        ] {
            let logits = random_logits(&mut rng, n, scale);
            let norm = LogSoftmax::new(&logits);
            let total: f64 = logits
                .iter()
                .map(|&x| f64::from(norm.logprob(x)).exp())
                .sum();
            assert!((total - 1.0).abs() < 1e-4, "n {n} scale {scale}: {total}");
            for i in [0, n / 2, n - 1] {
                let lp = logprob_of(&logits, i as u32);
                assert!(lp <= 0.0 && !lp.is_nan());
                assert_eq!(lp, norm.logprob(logits[i]));
            }
        }
        // Uniform: each is -ln n.
        let lp = logprob_of(&[3.0; 8], 5);
        assert!((lp - -(8f32).ln()).abs() < 1e-6);
        assert_eq!(logprob_of(&[1.0, 2.0], 2), f32::NEG_INFINITY);
        assert_eq!(logprob_of(&[], 0), f32::NEG_INFINITY);
    }

    #[test]
    fn nan_and_infinite_logits_do_not_panic() {
        let logits = [f32::NAN, 0.0, f32::NAN, 0.0];
        assert_eq!(logprob_of(&logits, 0), f32::NEG_INFINITY);
        assert!((logprob_of(&logits, 1) - -(2f32).ln()).abs() < 1e-6);
        assert_eq!(
            top_logprobs(&logits, 4)
                .iter()
                .map(|p| p.0)
                .collect::<Vec<_>>(),
            [1, 3, 0, 2]
        );
        let all_nan = [f32::NAN; 3];
        assert_eq!(logprob_of(&all_nan, 1), f32::NEG_INFINITY);
        assert_eq!(top_logprobs(&all_nan, 2).len(), 2);
        let inf = [1.0, f32::INFINITY, f32::INFINITY, f32::NEG_INFINITY];
        assert_eq!(logprob_of(&inf, 0), f32::NEG_INFINITY);
        assert!((logprob_of(&inf, 2) - -(2f32).ln()).abs() < 1e-6);
        assert_eq!(top_logprobs(&inf, 1)[0].0, 1);
    }

    #[test]
    fn top_logprobs_order_and_ties() {
        let logits = [1.0, 3.0, 2.0, 3.0, -0.0, 0.0, 3.0];
        let top = top_logprobs(&logits, 5);
        let ids: Vec<u32> = top.iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 3, 6, 2, 0]);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(top[0].1, logprob_of(&logits, 1));
        // -0.0 and 0.0 tie: lower id first.
        let ids: Vec<u32> = top_logprobs(&logits, 7).iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 3, 6, 2, 0, 4, 5]);
        assert_eq!(top_logprobs(&logits, 100).len(), 7);
        assert!(top_logprobs(&logits, 0).is_empty());
        assert!(top_logprobs(&[], 3).is_empty());
        // Against a full sort, with many ties.
        let mut rng = Rng::new(11);
        let logits: Vec<f32> = (0..5000)
            .map(|_| ((rng.next_u64() % 40) as f32) - 20.0)
            .collect();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let got: Vec<u32> = top_logprobs(&logits, 25).iter().map(|p| p.0).collect();
        assert_eq!(got, order[..25]);
    }
}
