//! What one benchmark request measured, and the summary of a run: throughput, latency
//! percentiles, errors by kind, goodput. Definitions in the [module docs](super).

use crate::client::ErrorKind;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Timings of one request that completed, seconds from the moment it was sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timing {
    /// First chunk carrying generated text.
    pub ttft: f64,
    /// Last chunk carrying generated text.
    pub last_token: f64,
    /// The end of the stream (`[DONE]`).
    pub e2e: f64,
    /// Gaps between consecutive chunks carrying generated text.
    pub itl: Vec<f64>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
}

impl Timing {
    /// Time per output token: `None` with fewer than 2 output tokens.
    pub fn tpot(&self) -> Option<f64> {
        (self.output_tokens >= 2)
            .then(|| (self.last_token - self.ttft) / (self.output_tokens - 1) as f64)
    }
}

#[derive(Debug, Clone)]
pub struct Record {
    /// Seconds from the start of the run to sending the request.
    pub sent: f64,
    pub result: Result<Timing, (ErrorKind, String)>,
}

/// Latency statistics in milliseconds (percentiles interpolate linearly between ranks).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Dist {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    /// `xs` in seconds.
    pub fn of(mut xs: Vec<f64>) -> Dist {
        if xs.is_empty() {
            return Dist::default();
        }
        xs.sort_by(f64::total_cmp);
        let ms = |s: f64| s * 1e3;
        Dist {
            count: xs.len(),
            mean: ms(xs.iter().sum::<f64>() / xs.len() as f64),
            p50: ms(percentile(&xs, 50.0)),
            p90: ms(percentile(&xs, 90.0)),
            p99: ms(percentile(&xs, 99.0)),
            max: ms(xs[xs.len() - 1]),
        }
    }
}

/// `p`-th percentile of sorted `xs`, interpolating between the two nearest ranks.
fn percentile(xs: &[f64], p: f64) -> f64 {
    let pos = p / 100.0 * (xs.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
}

/// Service-level objectives a request must meet to count towards goodput.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
}

impl Slo {
    fn met(&self, t: &Timing) -> bool {
        let ttft_ok = self.ttft_ms.is_none_or(|x| t.ttft * 1e3 <= x);
        // A request with one output token has no TPOT: nothing to miss.
        let tpot_ok = self
            .tpot_ms
            .is_none_or(|x| t.tpot().is_none_or(|tp| tp * 1e3 <= x));
        ttft_ok && tpot_ok
    }

    fn any(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorCount {
    pub count: usize,
    /// The first message seen of this kind.
    pub example: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// First request sent to last request finished, seconds.
    pub duration_s: f64,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    pub request_throughput: f64,
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_ms: Dist,
    pub tpot_ms: Dist,
    pub itl_ms: Dist,
    pub e2e_ms: Dist,
    pub errors: BTreeMap<ErrorKind, ErrorCount>,
    /// Completed requests meeting every SLO given (absent without SLOs).
    pub good_requests: Option<usize>,
    /// `good_requests` per second of the run.
    pub goodput: Option<f64>,
}

impl Summary {
    pub fn of(records: &[Record], slo: &Slo) -> Summary {
        let ok: Vec<&Timing> = records
            .iter()
            .filter_map(|r| r.result.as_ref().ok())
            .collect();
        let start = records.iter().map(|r| r.sent).fold(f64::INFINITY, f64::min);
        let end = records
            .iter()
            .filter_map(|r| r.result.as_ref().ok().map(|t| r.sent + t.e2e))
            .fold(f64::NEG_INFINITY, f64::max);
        let duration = if ok.is_empty() { 0.0 } else { end - start };
        let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
        let mut errors = BTreeMap::<ErrorKind, ErrorCount>::new();
        for (kind, msg) in records.iter().filter_map(|r| r.result.as_ref().err()) {
            errors
                .entry(*kind)
                .or_insert_with(|| ErrorCount {
                    count: 0,
                    example: msg.clone(),
                })
                .count += 1;
        }
        let input: usize = ok.iter().map(|t| t.prompt_tokens).sum();
        let output: usize = ok.iter().map(|t| t.output_tokens).sum();
        let good = slo.any().then(|| ok.iter().filter(|t| slo.met(t)).count());
        Summary {
            duration_s: duration,
            requests: records.len(),
            completed: ok.len(),
            failed: records.len() - ok.len(),
            request_throughput: per_s(ok.len() as f64),
            input_tokens: input,
            output_tokens: output,
            input_tokens_per_s: per_s(input as f64),
            output_tokens_per_s: per_s(output as f64),
            ttft_ms: Dist::of(ok.iter().map(|t| t.ttft).collect()),
            tpot_ms: Dist::of(ok.iter().filter_map(|t| t.tpot()).collect()),
            itl_ms: Dist::of(ok.iter().flat_map(|t| t.itl.iter().copied()).collect()),
            e2e_ms: Dist::of(ok.iter().map(|t| t.e2e).collect()),
            errors,
            good_requests: good,
            goodput: good.map(|g| per_s(g as f64)),
        }
    }

    /// The end-of-run table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "requests: {} completed, {} failed, in {:.2} s",
            self.completed, self.failed, self.duration_s
        );
        let _ = writeln!(
            s,
            "throughput: {:.2} requests/s, {:.1} input tokens/s, {:.1} output tokens/s",
            self.request_throughput, self.input_tokens_per_s, self.output_tokens_per_s
        );
        if let (Some(g), Some(rate)) = (self.good_requests, self.goodput) {
            let _ = writeln!(
                s,
                "goodput: {g} of {} requests met the SLOs, {rate:.2} requests/s",
                self.completed
            );
        }
        let _ = writeln!(
            s,
            "{:<10} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "ms", "count", "mean", "p50", "p90", "p99", "max"
        );
        for (name, d) in [
            ("TTFT", &self.ttft_ms),
            ("TPOT", &self.tpot_ms),
            ("ITL", &self.itl_ms),
            ("E2E", &self.e2e_ms),
        ] {
            let _ = writeln!(
                s,
                "{name:<10} {:>7} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                d.count, d.mean, d.p50, d.p90, d.p99, d.max
            );
        }
        for (kind, e) in &self.errors {
            let _ = writeln!(
                s,
                "errors {}: {} (e.g. {})",
                kind.as_str(),
                e.count,
                e.example
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(sent: f64, ttft: f64, e2e: f64, out: usize) -> Record {
        let step = if out > 1 {
            (e2e - ttft) / (out - 1) as f64
        } else {
            0.0
        };
        Record {
            sent,
            result: Ok(Timing {
                ttft,
                last_token: e2e,
                e2e,
                itl: vec![step; out.saturating_sub(1)],
                prompt_tokens: 10,
                output_tokens: out,
            }),
        }
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let xs: Vec<f64> = (1..=5).map(|x| x as f64).collect();
        assert_eq!(percentile(&xs, 50.0), 3.0);
        assert_eq!(percentile(&xs, 90.0), 4.6);
        assert_eq!(percentile(&xs, 100.0), 5.0);
        assert_eq!(percentile(&[2.0], 99.0), 2.0);
        let d = Dist::of(vec![0.004, 0.001, 0.002, 0.003]);
        assert_eq!((d.count, d.max), (4, 4.0));
        assert!((d.mean - 2.5).abs() < 1e-9 && (d.p50 - 2.5).abs() < 1e-9);
        assert_eq!(Dist::of(vec![]), Dist::default());
    }

    #[test]
    fn summary_counts_throughput_errors_and_goodput() {
        let records = vec![
            ok(0.0, 0.1, 1.1, 11),  // tpot 100 ms
            ok(0.5, 0.3, 1.5, 5),   // tpot 300 ms, ends at 2.0
            ok(1.0, 0.05, 0.05, 1), // no tpot
            Record {
                sent: 1.5,
                result: Err((ErrorKind::RateLimited, "HTTP 429".into())),
            },
            Record {
                sent: 1.6,
                result: Err((ErrorKind::RateLimited, "again".into())),
            },
        ];
        let slo = Slo {
            ttft_ms: Some(200.0),
            tpot_ms: Some(150.0),
        };
        let s = Summary::of(&records, &slo);
        assert_eq!((s.requests, s.completed, s.failed), (5, 3, 2));
        assert!((s.duration_s - 2.0).abs() < 1e-9);
        assert!((s.request_throughput - 1.5).abs() < 1e-9);
        assert_eq!((s.input_tokens, s.output_tokens), (30, 17));
        assert!((s.output_tokens_per_s - 8.5).abs() < 1e-9);
        assert_eq!(s.tpot_ms.count, 2);
        assert!((s.tpot_ms.mean - 200.0).abs() < 1e-6);
        assert_eq!(s.itl_ms.count, 14);
        // Request 2 misses the TTFT SLO; request 3 has no TPOT and meets the TTFT one.
        assert_eq!(s.good_requests, Some(2));
        assert!((s.goodput.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(s.errors[&ErrorKind::RateLimited].count, 2);
        assert_eq!(s.errors[&ErrorKind::RateLimited].example, "HTTP 429");
        let table = s.table();
        assert!(
            table.contains("TTFT") && table.contains("rate_limited: 2"),
            "{table}"
        );
        assert_eq!(Summary::of(&records, &Slo::default()).goodput, None);
    }

    #[test]
    fn a_run_with_no_successes_has_zero_rates() {
        let records = vec![Record {
            sent: 0.0,
            result: Err((ErrorKind::Connect, "refused".into())),
        }];
        let s = Summary::of(&records, &Slo::default());
        assert_eq!(
            (s.completed, s.duration_s, s.request_throughput),
            (0, 0.0, 0.0)
        );
    }
}
