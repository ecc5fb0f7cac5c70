//! Output tokens/s of `grok serve` on the `tiny` preset at 1, 8 and 32 concurrent streaming
//! clients, over real HTTP to a real cluster of worker processes, with the ratio to one
//! stream measured in the same run. Batching pays off when 8 streams give well over 1×.
//!
//! `cargo build --release -p grok-worker && cargo bench -p grok-coordinator --bench serve_throughput`
//! Env: `BENCH_WORKERS` (default 1), `BENCH_MAX_TOKENS` (default 48), `BENCH_TEMPERATURE`
//! (default 0.7; 0 is greedy), `BENCH_REPEAT` (default 3: each row is the median of that many
//! runs, its spread printed beside it, since one run of a few seconds is noisy on a shared VM).

use grok_coordinator::api::{self, ApiConfig, AppState};
use grok_coordinator::cluster::{Cluster, ClusterOptions};
use grok_coordinator::metrics::Metrics;
use grok_coordinator::scheduler::{self, SchedulerConfig};
use grok_shared::checkpoint::init;
use grok_shared::config::ModelConfig;
use grok_shared::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROMPT: usize = 32;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Streams one completion and returns its completion tokens (from the usage chunk).
async fn one_stream(c: &reqwest::Client, url: &str, seed: usize, max_tokens: usize) -> usize {
    let prompt: Vec<u32> = (0..PROMPT)
        .map(|i| ((i * 7919 + seed * 104729) % 131000 + 10) as u32)
        .collect();
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
        "temperature": std::env::var("BENCH_TEMPERATURE").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.7), "seed": seed, "stream": true});
    let mut r = c.post(url).json(&body).send().await.expect("request");
    assert_eq!(r.status(), 200, "server refused a request");
    let mut buf = String::new();
    while let Some(chunk) = r.chunk().await.expect("stream") {
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    buf.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["usage"]["completion_tokens"].as_u64())
        .last()
        .expect("usage chunk") as usize
}

/// `clients` concurrent clients, each streaming `per_client` completions back to back;
/// returns output tokens/s over the whole run.
async fn run(url: &str, clients: usize, per_client: usize, max_tokens: usize) -> (f64, usize) {
    let c = reqwest::Client::new();
    let t = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|k| {
            let (c, url) = (c.clone(), url.to_string());
            tokio::spawn(async move {
                let mut n = 0;
                for j in 0..per_client {
                    n += one_stream(&c, &url, k * 1000 + j, max_tokens).await;
                }
                n
            })
        })
        .collect();
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await.expect("client task");
    }
    (tokens as f64 / t.elapsed().as_secs_f64(), tokens)
}

/// (sum, count) of the server's step-time histogram.
fn step_totals(m: &Metrics) -> (f64, f64) {
    let text = m.encode();
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        get("grok_step_seconds_sum "),
        get("grok_step_seconds_count "),
    )
}

fn main() {
    let workers = env_usize("BENCH_WORKERS", 1);
    let max_tokens = env_usize("BENCH_MAX_TOKENS", 48);
    let dir = tempfile::tempdir().expect("temp dir");
    init::init_random(&ModelConfig::tiny(), 0, dir.path(), &mut |_| {}).expect("init");
    let bin = Path::new(env!("CARGO_BIN_EXE_grok")).with_file_name("grok-worker");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --release -p grok-worker` first",
        bin.display()
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let opts = ClusterOptions {
            workers,
            tp: 1,
            ep: workers,
            worker_addrs: Vec::new(),
            token: "bench".into(),
            worker_bin: bin,
            worker_device: std::env::var("GROK_WORKER_DEVICE").unwrap_or_else(|_| "cpu".into()),
            collectives: "grpc".into(),
            step_timeout: Duration::from_secs(60),
            comm_timeout: Duration::from_secs(30),
            kv_blocks: 4096,
            block_size: 16,
        };
        let cluster = Cluster::start(dir.path(), opts, &mut |_, _, _| {})
            .await
            .expect("cluster");
        let tokenizer = Arc::new(Tokenizer::builtin().expect("tokenizer"));
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let cfg = SchedulerConfig::default();
        let metrics = Metrics::new();
        let (handle, _task) =
            scheduler::start(cluster, cfg, tokenizer.clone(), metrics.clone(), stop_rx);
        let config = ApiConfig {
            model_name: "tiny".into(),
            api_key: None,
            max_body_bytes: 1 << 20,
            ..ApiConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let url = format!("http://{}/v1/completions", listener.local_addr().expect("addr"));
        let client_timeout = config.client_timeout;
        let router = api::router(AppState::new(handle, tokenizer, config));
        tokio::spawn(api::serve(
            listener,
            router,
            client_timeout,
            std::future::pending(),
        ));

        run(&url, 1, 1, 8).await; // warm-up
        println!(
            "grok serve, tiny preset, {workers} worker(s), {PROMPT}-token prompts, {max_tokens} output tokens each, {} CPU core(s):",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        println!(
            "{:>8} {:>10} {:>12} {:>8} {:>14} {:>20}",
            "streams", "tokens", "tokens/s", "ratio", "ms/step (srv)", "runs (tokens/s)"
        );
        let repeat = env_usize("BENCH_REPEAT", 3).max(1);
        let mut base = None;
        for (clients, per) in [(1, 4), (8, 4), (32, 2)] {
            let before = step_totals(&metrics);
            let mut runs = Vec::new();
            let mut tokens = 0;
            for _ in 0..repeat {
                let (tps, n) = run(&url, clients, per, max_tokens).await;
                runs.push(tps);
                tokens += n;
            }
            let after = step_totals(&metrics);
            let step_ms = (after.0 - before.0) / (after.1 - before.1).max(1.0) * 1e3;
            runs.sort_by(f64::total_cmp);
            let median = runs[runs.len() / 2];
            let b = *base.get_or_insert(median);
            let spread: Vec<String> = runs.iter().map(|r| format!("{r:.0}")).collect();
            println!(
                "{clients:>8} {tokens:>10} {median:>12.1} {:>7.2}x {step_ms:>14.1} {:>20}",
                median / b,
                spread.join(" ")
            );
        }
    });
}
