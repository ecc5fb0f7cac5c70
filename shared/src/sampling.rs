//! Choosing the next token from logits: greedy, or temperature with top-k and top-p
//! (nucleus), driven by a per-request seeded generator so the same seed gives the same tokens.

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("logits are empty")]
    Empty,
}

/// Why a [`LogitAdjust`] cannot be applied, and the request field at fault as the OpenAI API
/// names it (`logit_bias.<id>` for one entry; `counts` is a peer's, never a request's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AdjustError {
    pub param: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }
}

/// The largest logit, NaNs ignored (`-inf` when there is none); 8 lanes so it vectorises.
fn max_ignoring_nan(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            // A comparison with NaN is false: NaNs never win.
            if c[l] > lanes[l] {
                lanes[l] = c[l];
            }
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Logits per block of [`draw_full`]: the block sums are few enough to scan, a block is
/// cheap to recompute.
const DRAW_BLOCK: usize = 256;

/// `e^((v - max) · inv_t)` (0 for NaN): a logit's unnormalised weight.
#[inline(always)]
fn weight_of(v: f32, max: f32, inv_t: f32) -> f32 {
    let w = exp_nonpositive((v - max) * inv_t);
    if v.is_nan() {
        0.0
    } else {
        w
    }
}

/// Sum of the weights of one block, in a fixed order (8 lanes, then the lanes and the tail).
#[inline(always)]
fn block_weight(block: &[f32], max: f32, inv_t: f32) -> f64 {
    let mut lanes = [0f32; 8];
    let chunks = block.chunks_exact(8);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&v| weight_of(v, max, inv_t))
        .sum();
    for c in chunks {
        for l in 0..8 {
            lanes[l] += weight_of(c[l], max, inv_t);
        }
    }
    lanes.iter().map(|&x| f64::from(x)).sum::<f64>() + f64::from(tail)
}

/// Every block's weight (see [`block_weight`]), compiled for AVX2 where the CPU has it.
fn block_weights(logits: &[f32], max: f32, inv_t: f32, out: &mut Vec<f64>) {
    #[inline(always)]
    fn body(logits: &[f32], max: f32, inv_t: f32, out: &mut Vec<f64>) {
        out.clear();
        for b in logits.chunks(DRAW_BLOCK) {
            out.push(block_weight(b, max, inv_t));
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(logits: &[f32], max: f32, inv_t: f32, out: &mut Vec<f64>) {
        body(logits, max, inv_t, out)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        return unsafe { avx2(logits, max, inv_t, out) };
    }
    body(logits, max, inv_t, out)
}

/// Draws an index with probability proportional to its weight (`u` uniform in [0, 1)), for
/// a finite `max`: the block by the block sums, then the index within the block. One pass of
/// `exp` over the logits and no per-logit buffer. `None` when every weight is 0.
fn draw_full(logits: &[f32], max: f32, inv_t: f32, u: f64) -> Option<usize> {
    let mut sums = Vec::with_capacity(logits.len().div_ceil(DRAW_BLOCK));
    block_weights(logits, max, inv_t, &mut sums);
    let total: f64 = sums.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let mut r = u * total;
    // Rounding can leave `r` past the last sum: then the last block with weight takes it.
    let mut pick = None;
    for (b, &s) in sums.iter().enumerate() {
        if s > 0.0 {
            pick = Some(b);
            if r < s {
                break;
            }
            r -= s;
        }
    }
    let b = pick?;
    let start = b * DRAW_BLOCK;
    let block = &logits[start..(start + DRAW_BLOCK).min(logits.len())];
    let mut last = None;
    for (i, &v) in block.iter().enumerate() {
        let w = f64::from(weight_of(v, max, inv_t));
        if w > 0.0 {
            if r < w {
                return Some(start + i);
            }
            r -= w;
            last = Some(start + i);
        }
    }
    last
}

/// `e^x` for `x <= 0` (larger `x` is clamped to 0), within 2 ulp of `f32::exp`, branch-free
/// so a loop over a vocabulary vectorises (libm's `expf` per logit dominated sampling time).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    // e^x = 2^n · e^r with n = round(x / ln 2), |r| <= ln 2 / 2; e^r by its Taylor series to
    // degree 7 (error < 1e-8 on that interval). Below -87.3 the result underflows to 0.
    let x = x.clamp(-87.3, 0.0);
    // Round to nearest by the 1.5·2^23 trick: `f32::round` is a libm call without SSE4.1
    // and would keep the loop scalar.
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    // ln 2 split in two so n · ln 2 is exact in f32 for the n that occur here.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    // 2^n by building the float's exponent: n is in [-126, 0] after the clamp.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// SplitMix64: tiny, fast and fully specified, so a seed means the same stream forever.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest logit (lowest index on ties).
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// A sampler for one request: its params and its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: Rng::new(params.seed),
        })
    }

    /// A sampler whose random stream continues from `rng_state` (see [`Sampler::rng_state`]):
    /// how a sequence's sampling moves between machines without changing its tokens.
    pub fn resume(params: SamplingParams, rng_state: u64) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: Rng(rng_state),
        })
    }

    /// Where the random stream stands (a fresh sampler's is its seed).
    pub fn rng_state(&self) -> u64 {
        self.rng.0
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Draws the next token. Costs O(V) (one `exp` per logit) unless a top-k or top-p cut
    /// needs the best candidates in order: then only those are selected and sorted.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SamplingError> {
        let p = self.params;
        if p.temperature == 0.0 {
            return argmax(logits).map(|i| i as u32).ok_or(SamplingError::Empty);
        }
        let max = max_ignoring_nan(logits);
        if max == f32::NEG_INFINITY && !logits.contains(&f32::NEG_INFINITY) {
            return Err(SamplingError::Empty);
        }
        let inv_t = 1.0 / p.temperature;
        let weight = |v: f32| {
            if v.is_nan() {
                0.0
            } else if max == f32::NEG_INFINITY {
                // Every logit is -inf: all equally likely.
                1.0
            } else if max == f32::INFINITY {
                // Only the +inf logits share the mass.
                if v == f32::INFINITY {
                    1.0
                } else {
                    0.0
                }
            } else {
                f64::from(exp_nonpositive((v - max) * inv_t))
            }
        };
        let count_valid = || logits.iter().filter(|v| !v.is_nan()).count();
        // (Counting is a pass of its own: only a top-k needs it.)
        if p.top_p >= 1.0 && (p.top_k == 0 || p.top_k >= count_valid()) {
            // No cut: in id order, the same distribution as over sorted candidates.
            if max.is_finite() {
                let u = self.rng.next_f64();
                return match draw_full(logits, max, inv_t, u) {
                    Some(i) => Ok(i as u32),
                    None => argmax(logits).map(|i| i as u32).ok_or(SamplingError::Empty),
                };
            }
            let weights: Vec<f64> = logits.iter().map(|&v| weight(v)).collect();
            let total: f64 = weights.iter().sum();
            if total <= 0.0 {
                return argmax(logits).map(|i| i as u32).ok_or(SamplingError::Empty);
            }
            let mut r = self.rng.next_f64() * total;
            let mut last = 0;
            for (i, &w) in weights.iter().enumerate() {
                if w > 0.0 {
                    if r < w {
                        return Ok(i as u32);
                    }
                    r -= w;
                    last = i;
                }
            }
            return Ok(last as u32);
        }
        let valid = count_valid();
        let k = if p.top_k == 0 {
            valid
        } else {
            p.top_k.min(valid)
        };
        // Candidates by logit, best first (ties: lower id first).
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .map(|(i, &v)| (i as u32, v))
            .collect();
        if cand.is_empty() {
            return Err(SamplingError::Empty);
        }
        // The mass the nucleus is measured against: all of the top-k candidates.
        let total: f64 = if k == cand.len() && max.is_finite() {
            let mut sums = Vec::new();
            block_weights(logits, max, inv_t, &mut sums);
            sums.iter().sum()
        } else if k == cand.len() {
            logits.iter().map(|&v| weight(v)).sum()
        } else {
            cand.select_nth_unstable_by(k - 1, order);
            cand.truncate(k);
            cand.iter().map(|&(_, v)| weight(v)).sum()
        };
        // Sort only as many of the best as the nucleus needs: grow the sorted prefix until
        // its mass reaches top_p of the total.
        let mut sorted = k.min(64);
        loop {
            if sorted < cand.len() {
                cand.select_nth_unstable_by(sorted - 1, order);
            }
            cand[..sorted].sort_unstable_by(order);
            let mass: f64 = cand[..sorted].iter().map(|&(_, v)| weight(v)).sum();
            if sorted == cand.len() || p.top_p < 1.0 && mass >= p.top_p as f64 * total {
                break;
            }
            sorted = (sorted * 4).min(cand.len());
        }
        let probs: Vec<f64> = cand[..sorted]
            .iter()
            .map(|&(_, v)| weight(v) / total)
            .collect();
        // Nucleus: the smallest prefix whose mass reaches top_p.
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let mass: f64 = probs[..keep].iter().sum();
        if mass <= 0.0 {
            return Ok(cand[0].0);
        }
        let mut r = self.rng.next_f64() * mass;
        for (i, q) in probs[..keep].iter().enumerate() {
            if r < *q {
                return Ok(cand[i].0);
            }
            r -= q;
        }
        Ok(cand[keep - 1].0)
    }
}

/// Most entries of a `logit_bias` (OpenAI caps it lower; this bounds what a step carries).
pub const MAX_LOGIT_BIAS: usize = 1024;

/// OpenAI's `presence_penalty` and `frequency_penalty` (on the tokens generated so far, as
/// vLLM applies them) and `logit_bias`: before a token is chosen, each logit becomes
/// `logit[t] + bias[t] - frequency · count[t] - presence · (count[t] > 0)`. Log-probabilities
/// are still reported from the model's own logits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogitAdjust {
    /// In [-2, 2], as in the OpenAI API.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// (token, times generated so far), each token once; empty without penalties.
    pub counts: Vec<(u32, u32)>,
    /// (token, bias in [-100, 100]), each token once.
    pub bias: Vec<(u32, f32)>,
}

impl LogitAdjust {
    /// No change to any logit.
    pub fn is_neutral(&self) -> bool {
        let no_penalty = self.presence_penalty == 0.0 && self.frequency_penalty == 0.0;
        (no_penalty || self.counts.is_empty()) && self.bias.is_empty()
    }

    /// Checks everything a request or a peer could get wrong, for a vocabulary of `vocab`:
    /// the one check of both (the API only parses the fields).
    pub fn validate(&self, vocab: usize) -> Result<(), AdjustError> {
        let bad = |param: &str, message: String| {
            Err(AdjustError {
                param: param.to_string(),
                message,
            })
        };
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if self.bias.len() > MAX_LOGIT_BIAS {
            return bad(
                "logit_bias",
                format!(
                    "logit_bias has {} entries, at most {MAX_LOGIT_BIAS} are accepted",
                    self.bias.len()
                ),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for &(t, b) in &self.bias {
            let param = format!("logit_bias.{t}");
            if t as usize >= vocab {
                return bad(
                    &param,
                    format!("logit_bias: token {t} is not in the vocabulary of {vocab}"),
                );
            }
            if !(-100.0..=100.0).contains(&b) {
                return bad(
                    &param,
                    format!(
                        "logit_bias: the bias of token {t} must be between -100 and 100, got {b}"
                    ),
                );
            }
            if !seen.insert(t) {
                return bad(&param, format!("logit_bias: token {t} given twice"));
            }
        }
        seen.clear();
        for &(t, _) in &self.counts {
            if t as usize >= vocab || !seen.insert(t) {
                return bad(
                    "counts",
                    format!("penalty counts: token {t} out of the vocabulary or given twice"),
                );
            }
        }
        Ok(())
    }

    /// Applies the penalties and the bias to `row` (the logits of one position).
    pub fn apply(&self, row: &mut [f32]) {
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            for &(t, n) in &self.counts {
                if let Some(x) = row.get_mut(t as usize) {
                    if n > 0 {
                        *x -= self.frequency_penalty * n as f32 + self.presence_penalty;
                    }
                }
            }
        }
        for &(t, b) in &self.bias {
            if let Some(x) = row.get_mut(t as usize) {
                *x += b;
            }
        }
    }
}

/// What a worker needs to choose one sequence's next token: the request's parameters, where
/// its random stream stands, how many alternatives' log-probabilities to report (`None`: no
/// log-probabilities at all), and the changes to the logits before the choice.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSpec {
    pub params: SamplingParams,
    pub rng_state: u64,
    pub logprobs: Option<usize>,
    pub adjust: LogitAdjust,
}

/// The chosen token, the random stream after it, and its log-probabilities when asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub rng_state: u64,
    pub logprob: Option<f32>,
    /// The most likely tokens, best first (empty unless asked).
    pub top: Vec<(u32, f32)>,
}

/// Samples from one row of logits as [`Sampler`] would at `spec.rng_state`.
pub fn sample_row(row: &[f32], spec: &SampleSpec) -> Result<Sampled, SamplingError> {
    let mut s = Sampler::resume(spec.params, spec.rng_state)?;
    let token = if spec.adjust.is_neutral() {
        s.sample(row)?
    } else {
        let mut adjusted = row.to_vec();
        spec.adjust.apply(&mut adjusted);
        s.sample(&adjusted)?
    };
    let (logprob, top) = match spec.logprobs {
        Some(n) => {
            let (lp, top) = crate::logprobs::token_and_top(row, token, n);
            (Some(lp), top)
        }
        None => (None, Vec::new()),
    };
    Ok(Sampled {
        token,
        rng_state: s.rng_state(),
        logprob,
        top,
    })
}

/// For each sequence with a spec, samples from the last `vocab` logits of its rows, one
/// sequence per thread. An error names the index of the sequence it came from.
pub fn sample_last_rows(
    rows: &[Vec<f32>],
    specs: &[Option<SampleSpec>],
    vocab: usize,
) -> Result<Vec<Option<Sampled>>, (usize, SamplingError)> {
    use rayon::prelude::*;
    rows.par_iter()
        .zip(specs)
        .enumerate()
        .map(|(i, (r, spec))| match spec {
            Some(spec) if !r.is_empty() => {
                let last = &r[r.len().saturating_sub(vocab)..];
                sample_row(last, spec).map(Some).map_err(|e| (i, e))
            }
            _ => Ok(None),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]).unwrap(), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_seeds_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed)).unwrap();
            (0..64)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = [5.0, 4.0, 3.0, 0.0, -1.0];
        let mut s = Sampler::new(params(1.0, 2, 1.0, 1)).unwrap();
        for _ in 0..200 {
            assert!(s.sample(&logits).unwrap() < 2);
        }
        // p(0) ≈ 0.66, p(0)+p(1) ≈ 0.91: top_p 0.8 keeps exactly two.
        let mut s = Sampler::new(params(1.0, 0, 0.8, 1)).unwrap();
        let seen: std::collections::HashSet<u32> =
            (0..500).map(|_| s.sample(&logits).unwrap()).collect();
        assert_eq!(seen, [0, 1].into_iter().collect());
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut s = Sampler::new(params(1.0, 0, 1.0, 9)).unwrap();
        let ones = (0..20000)
            .filter(|_| s.sample(&logits).unwrap() == 1)
            .count();
        assert!((ones as f64 / 20000.0 - 0.75).abs() < 0.02, "{ones}");
    }

    #[test]
    fn the_blocked_draw_picks_the_index_the_uniform_points_at() {
        // 1000 equal weights (4 blocks, the last partial) with NaNs that weigh nothing: the
        // draw for u is exactly the floor(u · valid)-th valid index.
        let mut logits = vec![0.0f32; 1000];
        for i in (0..1000).step_by(37) {
            logits[i] = f32::NAN;
        }
        let valid: Vec<usize> = (0..1000).filter(|&i| !logits[i].is_nan()).collect();
        let mut rng = Rng::new(4);
        for _ in 0..5000 {
            let u = rng.next_f64();
            let want = valid[(u * valid.len() as f64) as usize];
            assert_eq!(draw_full(&logits, 0.0, 1.0, u), Some(want), "u = {u}");
        }
        assert_eq!(draw_full(&logits, 0.0, 1.0, 0.0), Some(1));
        assert_eq!(
            draw_full(&logits, 0.0, 1.0, 1.0 - 1e-16),
            valid.last().copied()
        );
        assert_eq!(draw_full(&[f32::NAN; 300], 0.0, 1.0, 0.5), None);
    }

    #[test]
    fn sampling_a_large_vocabulary_follows_the_distribution() {
        // Half the mass on one token in the last, partial block; the rest spread evenly.
        let mut logits = vec![0.0f32; 1000];
        logits[990] = (999.0f32).ln();
        let mut s = Sampler::new(params(1.0, 0, 1.0, 2)).unwrap();
        let hits = (0..20000)
            .filter(|_| s.sample(&logits).unwrap() == 990)
            .count();
        assert!((hits as f64 / 20000.0 - 0.5).abs() < 0.02, "{hits}");
    }

    #[test]
    fn infinite_and_nan_logits_never_panic() {
        let mut s = Sampler::new(params(1.0, 0, 1.0, 3)).unwrap();
        let inf = f32::INFINITY;
        assert_eq!(s.sample(&[0.0, inf, f32::NAN]).unwrap(), 1);
        let all_neg = [f32::NEG_INFINITY; 3];
        assert!(s.sample(&all_neg).unwrap() < 3);
        assert_eq!(s.sample(&[f32::NAN; 4]), Err(SamplingError::Empty));
        let mut s = Sampler::new(params(1.0, 2, 0.5, 3)).unwrap();
        assert_eq!(s.sample(&[f32::NAN, 1.0, 9.0, 2.0]).unwrap(), 2);
    }

    #[test]
    fn a_nucleus_over_a_large_vocabulary_keeps_only_the_likely_tokens() {
        // 3 tokens hold ~all the mass; the rest of 100k is negligible.
        let mut logits = vec![-20.0f32; 100_000];
        logits[70_000] = 5.0;
        logits[3] = 4.5;
        logits[99_999] = 4.0;
        let mut s = Sampler::new(params(1.0, 0, 0.9, 5)).unwrap();
        let seen: std::collections::HashSet<u32> =
            (0..300).map(|_| s.sample(&logits).unwrap()).collect();
        assert_eq!(seen, [70_000, 3, 99_999].into_iter().collect());
    }

    #[test]
    fn exp_nonpositive_matches_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (a, b) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            assert!(a.is_finite(), "exp_nonpositive({x}) = {a}");
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-200.0), 0.0f32.max(exp_nonpositive(-200.0)));
        assert!(exp_nonpositive(-200.0) < 1e-37);
    }

    #[test]
    fn a_resumed_sampler_continues_the_same_stream() {
        let logits: Vec<f32> = (0..300).map(|i| (i as f32 * 0.11).cos()).collect();
        let p = params(0.9, 0, 0.95, 77);
        let mut one = Sampler::new(p).unwrap();
        let want: Vec<u32> = (0..20).map(|_| one.sample(&logits).unwrap()).collect();
        let mut state = 77;
        let mut got = Vec::new();
        for _ in 0..20 {
            let spec = SampleSpec {
                params: p,
                rng_state: state,
                logprobs: Some(2),
                adjust: LogitAdjust::default(),
            };
            let s = sample_row(&logits, &spec).unwrap();
            assert_eq!(s.top.len(), 2);
            assert!(s.logprob.is_some_and(|l| l <= 0.0));
            state = s.rng_state;
            got.push(s.token);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn penalties_and_bias_change_the_logits_as_openai_defines_them() {
        let adjust = LogitAdjust {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            counts: vec![(1, 2), (3, 1)],
            bias: vec![(0, -100.0), (3, 1.5)],
        };
        let mut row = vec![1.0f32, 2.0, 3.0, 4.0, 5.0];
        adjust.apply(&mut row);
        // 1 - 100; 2 - 0.25·2 - 0.5; unchanged; 4 - 0.25 - 0.5 + 1.5; unchanged.
        assert_eq!(row, vec![-99.0, 1.0, 3.0, 4.75, 5.0]);
        assert!(adjust.validate(5).is_ok());
        assert!(!adjust.is_neutral());
        // Penalties without counts (nothing generated yet) change nothing.
        let idle = LogitAdjust {
            presence_penalty: 1.0,
            ..LogitAdjust::default()
        };
        assert!(idle.is_neutral());
    }

    #[test]
    fn the_choice_follows_the_adjusted_logits_and_logprobs_the_model_ones() {
        let logits = [3.0f32, 1.0, 0.0];
        let spec = |adjust| SampleSpec {
            params: SamplingParams::default(),
            rng_state: 1,
            logprobs: Some(1),
            adjust,
        };
        let plain = sample_row(&logits, &spec(LogitAdjust::default())).unwrap();
        assert_eq!(plain.token, 0);
        let biased = LogitAdjust {
            bias: vec![(2, 10.0)],
            ..LogitAdjust::default()
        };
        let s = sample_row(&logits, &spec(biased)).unwrap();
        assert_eq!(s.token, 2);
        let want = crate::logprobs::token_and_top(&logits, 2, 1);
        assert_eq!((s.logprob, s.top), (Some(want.0), want.1));
        // A repeated token loses to the runner-up once its penalty passes their gap.
        let repeated = LogitAdjust {
            frequency_penalty: 1.5,
            counts: vec![(0, 2)],
            ..LogitAdjust::default()
        };
        assert_eq!(sample_row(&logits, &spec(repeated)).unwrap().token, 1);
    }

    #[test]
    fn adjustments_a_peer_could_get_wrong_are_refused() {
        let ok = LogitAdjust::default();
        for (bad, says) in [
            (
                LogitAdjust {
                    presence_penalty: 2.5,
                    ..ok.clone()
                },
                "presence_penalty",
            ),
            (
                LogitAdjust {
                    frequency_penalty: f32::NAN,
                    ..ok.clone()
                },
                "frequency_penalty",
            ),
            (
                LogitAdjust {
                    bias: vec![(9, 1.0)],
                    ..ok.clone()
                },
                "token 9",
            ),
            (
                LogitAdjust {
                    bias: vec![(1, 101.0)],
                    ..ok.clone()
                },
                "between -100 and 100",
            ),
            (
                LogitAdjust {
                    bias: vec![(1, 1.0), (1, 2.0)],
                    ..ok.clone()
                },
                "twice",
            ),
            (
                LogitAdjust {
                    counts: vec![(7, 1)],
                    ..ok.clone()
                },
                "penalty counts",
            ),
            (
                LogitAdjust {
                    bias: (0..1025).map(|t| (t, 0.0)).collect(),
                    ..ok.clone()
                },
                "at most",
            ),
        ] {
            let e = bad.validate(5).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Sampler::new(params(-1.0, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(params(f32::NAN, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 0.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 1.5, 0)).is_err());
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[]), Err(SamplingError::Empty));
    }
}
