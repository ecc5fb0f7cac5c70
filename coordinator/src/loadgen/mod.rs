//! `grok bench serve`: load-tests any OpenAI-compatible server with streaming requests, sent
//! open-loop (Poisson arrivals at a rate) or closed-loop (a fixed number of clients).
//!
//! Definitions (client side; each matches the server histogram of the same name, see the
//! README, except that the client's clock also counts the network and HTTP handling):
//! - **TTFT**: from sending the request to the first streamed chunk carrying generated text
//!   (server: arrival to the first token sampled).
//! - **TPOT**: per request with 2+ output tokens, (time of the last chunk carrying text −
//!   time of the first) / (output tokens − 1).
//! - **ITL**: the gap between consecutive chunks carrying text, every gap of every request.
//!   A server that sends several tokens in one chunk shows one gap where it counted several.
//! - **E2E**: from sending the request to the end of its stream.
//! - Tokens: `usage` of the stream's last chunk (asked for with
//!   `stream_options.include_usage`); a server without it has its text chunks counted instead.
//! - Throughput: completed requests and their tokens over the run's duration, from the first
//!   request sent to the last one finished. Goodput: completed requests meeting every SLO
//!   given (TTFT and TPOT, a request without a TPOT cannot miss that one), per second.

pub mod dist;
pub mod prompts;
pub mod stats;

use crate::client::{Client, ClientError, ErrorKind};
use grok_shared::sampling::Rng;
use grok_shared::tokenizer::Tokenizer;
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use dist::LengthDist;
pub use stats::{Record, Slo, Summary, Timing};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `/v1/completions` with a text prompt.
    Completions,
    /// `/v1/chat/completions` with one user message.
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// How requests are sent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// Open loop: Poisson arrivals at this many requests per second (`inf`: all at once),
    /// whatever the server's answers.
    Rate(f64),
    /// Closed loop: this many clients, each sending its next request when one finishes.
    Concurrency(usize),
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadConfig {
    pub model: String,
    pub endpoint: Endpoint,
    pub load: Load,
    pub num_requests: usize,
    pub input_len: String,
    pub output_len: String,
    pub seed: u64,
    pub temperature: f64,
    /// Send vLLM's `ignore_eos` so every request generates its full output length.
    pub ignore_eos: bool,
    pub slo: Slo,
}

/// One prepared request: built before the run so that building costs no time during it.
#[derive(Debug, Clone)]
pub struct Planned {
    pub body: Value,
    /// The prompt's length in tokens, and the length drawn for it (they differ only when the
    /// prompt builder could not meet it).
    pub prompt_tokens: usize,
    pub asked_prompt_tokens: usize,
    /// Seconds after the start at which an open-loop run sends it.
    pub at: f64,
}

/// Builds the run's requests: prompt and output lengths drawn from the distributions,
/// arrival times from the rate; everything from `cfg.seed`.
pub fn plan(
    cfg: &LoadConfig,
    input: LengthDist,
    output: LengthDist,
    tokenizer: &Tokenizer,
) -> Result<Vec<Planned>, String> {
    let builder = prompts::PromptBuilder::new(tokenizer)?;
    let mut rng = Rng::new(cfg.seed);
    let mut at = 0.0;
    let mut out = Vec::with_capacity(cfg.num_requests);
    for _ in 0..cfg.num_requests {
        let asked_prompt_tokens = input.sample(&mut rng);
        let (text, prompt_tokens) = builder.build(asked_prompt_tokens, &mut rng);
        let max_tokens = output.sample(&mut rng);
        let mut body = json!({
            "model": cfg.model,
            "max_tokens": max_tokens,
            "temperature": cfg.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match cfg.endpoint {
            Endpoint::Completions => body["prompt"] = json!(text),
            Endpoint::Chat => body["messages"] = json!([{"role": "user", "content": text}]),
        }
        if cfg.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        out.push(Planned {
            body,
            prompt_tokens,
            asked_prompt_tokens,
            at,
        });
        if let Load::Rate(r) = cfg.load {
            if r.is_finite() {
                // Exponential gaps; 1 - u keeps the logarithm finite.
                at += -(1.0 - rng.next_f64()).ln() / r;
            }
        }
    }
    Ok(out)
}

/// Sends every planned request as `cfg.load` says, calling `on_record` as each finishes;
/// returns the records in plan order.
pub async fn run(
    client: &Client,
    cfg: &LoadConfig,
    planned: Vec<Planned>,
    on_record: impl Fn(&Record) + Send + Sync + 'static,
) -> Vec<Record> {
    let n = planned.len();
    let planned = Arc::new(planned);
    let on_record = Arc::new(on_record);
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Record)>();
    let send = {
        let (client, endpoint) = (client.clone(), cfg.endpoint);
        move |i: usize, planned: Arc<Vec<Planned>>| {
            let (client, tx, on_record) = (client.clone(), tx.clone(), on_record.clone());
            async move {
                let p = &planned[i];
                let sent = start.elapsed().as_secs_f64();
                let result = stream_one(&client, endpoint, &p.body, p.prompt_tokens)
                    .await
                    .map_err(|e| (e.kind(), e.to_string()));
                let r = Record { sent, result };
                on_record(&r);
                let _ = tx.send((i, r));
            }
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    match cfg.load {
        Load::Rate(_) => {
            for i in 0..n {
                let due = start + std::time::Duration::from_secs_f64(planned[i].at);
                tokio::time::sleep_until(due.into()).await;
                tasks.spawn(send(i, planned.clone()));
            }
        }
        Load::Concurrency(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..c.min(n) {
                let (next, send, planned) = (next.clone(), send.clone(), planned.clone());
                tasks.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        send(i, planned.clone()).await;
                    }
                });
            }
        }
    }
    drop(send);
    // Each request ends within the client's timeout, so this ends.
    while tasks.join_next().await.is_some() {}
    let mut records: Vec<Option<Record>> = vec![None; n];
    while let Ok((i, r)) = rx.try_recv() {
        records[i] = Some(r);
    }
    records
        .into_iter()
        .map(|r| {
            r.unwrap_or(Record {
                sent: 0.0,
                result: Err((ErrorKind::Stream, "the request's task failed".into())),
            })
        })
        .collect()
}

/// Streams one request, timing each chunk that carries generated text.
async fn stream_one(
    client: &Client,
    endpoint: Endpoint,
    body: &Value,
    planned_prompt_tokens: usize,
) -> Result<Timing, ClientError> {
    let t0 = Instant::now();
    let mut t = Timing::default();
    let (mut first, mut last) = (None::<f64>, 0.0f64);
    let (mut chunks, mut usage, mut done) = (0usize, None::<(usize, usize)>, false);
    client
        .post_stream(endpoint.path(), body, |data| {
            if data == "[DONE]" {
                done = true;
                return Ok(());
            }
            if done {
                return Err("data after [DONE]".into());
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| format!("a chunk is not JSON ({e}): {data:.200}"))?;
            if let Some(err) = v.get("error") {
                let msg = err["message"].as_str().unwrap_or("no message");
                return Err(format!("the server ended the stream with an error: {msg}"));
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                let n = |k: &str| u[k].as_u64().unwrap_or(0) as usize;
                usage = Some((n("prompt_tokens"), n("completion_tokens")));
            }
            let choice = &v["choices"][0];
            let text = match endpoint {
                Endpoint::Completions => choice["text"].as_str(),
                Endpoint::Chat => choice["delta"]["content"].as_str(),
            };
            if text.is_some_and(|s| !s.is_empty()) {
                let now = t0.elapsed().as_secs_f64();
                match first {
                    None => first = Some(now),
                    Some(_) => t.itl.push(now - last),
                }
                last = now;
                chunks += 1;
            }
            Ok(())
        })
        .await?;
    let stream_err = |message: &str| ClientError::Stream {
        url: client.url(endpoint.path()),
        message: message.into(),
    };
    if !done {
        return Err(stream_err("the stream ended without [DONE]"));
    }
    t.e2e = t0.elapsed().as_secs_f64();
    let (prompt, output) = usage.unwrap_or((planned_prompt_tokens, chunks));
    t.prompt_tokens = prompt;
    t.output_tokens = output;
    match first {
        Some(f) => {
            t.ttft = f;
            t.last_token = last;
        }
        // Nothing generated (or only text-less tokens): the first token is the end.
        None => {
            t.ttft = t.e2e;
            t.last_token = t.e2e;
        }
    }
    Ok(t)
}
