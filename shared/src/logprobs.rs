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
