//! The server's Prometheus metrics (`GET /metrics`, text exposition format). Each metric's
//! help text is its definition; the README lists them. Times are seconds, measured by the
//! scheduler with a monotonic clock from the moment the API accepted the request.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpertLabels {
    pub layer: u32,
    pub expert: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabels {
    pub rank: u32,
}

/// Every metric the server exports. Cloning shares the same underlying values.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub waiting: Gauge,
    pub kv_blocks_used: Gauge,
    pub kv_blocks_total: Gauge,
    pub preemptions: Counter,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    pub expert_tokens: Family<ExpertLabels, Counter>,
    pub collective_seconds: Family<RankLabels, Counter<f64, AtomicU64>>,
    pub step_seconds: Histogram,
    pub failed_steps: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency() -> Histogram {
    // 0.5 ms .. ~66 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

fn token_counts() -> Histogram {
    // 1 .. 32768 tokens
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            requests: Family::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            preemptions: Counter::default(),
            ttft: latency(),
            tpot: latency(),
            itl: latency(),
            e2e: latency(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            request_prompt_tokens: token_counts(),
            request_generation_tokens: token_counts(),
            expert_tokens: Family::default(),
            collective_seconds: Family::default(),
            step_seconds: latency(),
            failed_steps: Counter::default(),
        }
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("grok");
        r.register(
            "requests",
            "HTTP requests answered, by endpoint and status code (499: client went away)",
            self.requests.clone(),
        );
        r.register(
            "queue_depth",
            "Accepted requests not yet admitted to the running batch (new arrivals only)",
            self.queue_depth.clone(),
        );
        r.register(
            "running_sequences",
            "Sequences in the running batch (prefilling or decoding)",
            self.running.clone(),
        );
        r.register(
            "waiting_sequences",
            "Sequences waiting for admission: new arrivals plus preempted sequences",
            self.waiting.clone(),
        );
        r.register(
            "kv_blocks_used",
            "KV cache blocks held by sequences, over all data-parallel groups",
            self.kv_blocks_used.clone(),
        );
        r.register(
            "kv_blocks",
            "KV cache blocks in total, over all data-parallel groups",
            self.kv_blocks_total.clone(),
        );
        r.register(
            "preemptions",
            "Sequences preempted for lack of KV blocks (recomputed when readmitted)",
            self.preemptions.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From request arrival to the first generated token being sampled",
            self.ttft.clone(),
        );
        r.register(
            "time_per_output_token_seconds",
            "Per request with 2+ generated tokens: (last token time - first token time) / (generated tokens - 1)",
            self.tpot.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request (every gap observed)",
            self.itl.clone(),
        );
        r.register(
            "e2e_request_latency_seconds",
            "From request arrival to its last event (finished, stopped or failed)",
            self.e2e.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of finished requests",
            self.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Generated tokens of finished requests",
            self.generation_tokens.clone(),
        );
        r.register(
            "request_prompt_tokens",
            "Prompt tokens per finished request",
            self.request_prompt_tokens.clone(),
        );
        r.register(
            "request_generation_tokens",
            "Generated tokens per finished request",
            self.request_generation_tokens.clone(),
        );
        r.register(
            "expert_tokens",
            "Tokens routed to each expert of each layer (each token counts once per chosen expert)",
            self.expert_tokens.clone(),
        );
        r.register(
            "collective_seconds",
            "Seconds each rank spent inside collectives (including waiting for peers)",
            self.collective_seconds.clone(),
        );
        r.register(
            "step_seconds",
            "Wall time of one batch step on the cluster, as the scheduler sees it",
            self.step_seconds.clone(),
        );
        r.register(
            "failed_steps",
            "Batch steps that failed on the cluster (each followed by recovery and a recompute; \
             the failed step's sequences then run one per step until they pass where it failed)",
            self.failed_steps.clone(),
        );
        r
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_every_metric_with_its_values() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                endpoint: "/v1/completions".into(),
                status: 200,
            })
            .inc();
        m.ttft.observe(0.02);
        m.expert_tokens
            .get_or_create(&ExpertLabels {
                layer: 1,
                expert: 7,
            })
            .inc_by(3);
        m.collective_seconds
            .get_or_create(&RankLabels { rank: 2 })
            .inc_by(0.5);
        let text = m.encode();
        assert!(text.contains("grok_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1"));
        assert!(text.contains("grok_time_to_first_token_seconds_count 1"));
        assert!(text.contains("grok_expert_tokens_total{layer=\"1\",expert=\"7\"} 3"));
        assert!(text.contains("grok_collective_seconds_total{rank=\"2\"} 0.5"));
        for name in [
            "grok_queue_depth",
            "grok_running_sequences",
            "grok_waiting_sequences",
            "grok_kv_blocks_used",
            "grok_time_per_output_token_seconds",
            "grok_inter_token_latency_seconds",
            "grok_e2e_request_latency_seconds",
            "grok_prompt_tokens_total",
            "grok_generation_tokens_total",
            "grok_failed_steps_total",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
