//! `grok bench serve`: load-test an OpenAI-compatible server (ours or any other).

use crate::cluster_args;
use crate::model_args::TokenizerArgs;
use anyhow::{bail, Context, Result};
use grok_coordinator::client::Client;
use grok_coordinator::loadgen::{
    self, Endpoint, LengthDist, Load, LoadConfig, Record, Slo, Summary,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Send streaming requests to a server and report throughput and latency percentiles.
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("load").required(true).args(["rate", "concurrency"])))]
// `--rate -1` reaches our own check, which says what to give instead.
#[command(allow_negative_numbers = true)]
pub struct ServeArgs {
    /// The server's address (with or without a trailing /v1).
    #[arg(long, env = "GROK_BENCH_URL")]
    pub url: String,
    /// Send `Authorization: Bearer KEY`.
    #[arg(long, env = "GROK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Open loop: Poisson arrivals at this many requests per second (`inf`: all at once).
    #[arg(long, env = "GROK_BENCH_RATE")]
    pub rate: Option<f64>,
    /// Closed loop: this many clients, each sending its next request when one finishes.
    #[arg(long, env = "GROK_BENCH_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Requests to send.
    #[arg(long, env = "GROK_BENCH_NUM_REQUESTS", default_value_t = 100)]
    pub num_requests: usize,
    /// Prompt length in tokens: N, uniform:LO:HI or normal:MEAN:STD.
    #[arg(long, env = "GROK_BENCH_INPUT_LEN", default_value = "128")]
    pub input_len: String,
    /// Output length in tokens (sent as max_tokens): N, uniform:LO:HI or normal:MEAN:STD.
    #[arg(long, env = "GROK_BENCH_OUTPUT_LEN", default_value = "128")]
    pub output_len: String,
    /// Seed of the prompts, lengths and arrival times (same seed, same requests).
    #[arg(long, env = "GROK_BENCH_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Goodput counts requests whose time to first token is at most this.
    #[arg(long, env = "GROK_BENCH_SLO_TTFT_MS")]
    pub slo_ttft_ms: Option<f64>,
    /// Goodput counts requests whose time per output token is at most this.
    #[arg(long, env = "GROK_BENCH_SLO_TPOT_MS")]
    pub slo_tpot_ms: Option<f64>,
    /// Also write the results (settings, summary, every request) as JSON here.
    #[arg(long, env = "GROK_BENCH_OUTPUT")]
    pub output: Option<PathBuf>,
    /// Which API to call.
    #[arg(long, env = "GROK_BENCH_ENDPOINT", value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,
    /// The model id to send (default: the first one the server's /v1/models lists).
    #[arg(long, env = "GROK_BENCH_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Sampling temperature of every request (0: greedy).
    #[arg(long, env = "GROK_BENCH_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f64,
    /// Send `ignore_eos: true` (a vLLM extension) so that every request generates its full
    /// output length. Servers without it refuse the requests.
    #[arg(long, env = "GROK_BENCH_IGNORE_EOS")]
    pub ignore_eos: bool,
    /// Seconds a request may take in all before it counts as a timeout.
    #[arg(long, env = "GROK_BENCH_REQUEST_TIMEOUT", default_value_t = 600.0)]
    pub request_timeout: f64,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
}

impl ServeArgs {
    fn load(&self) -> Result<Load> {
        match (self.rate, self.concurrency) {
            (Some(r), None) if r > 0.0 && !r.is_nan() => Ok(Load::Rate(r)),
            (Some(r), None) => {
                bail!("--rate {r}: give a positive number of requests per second (or inf)")
            }
            (None, Some(c)) if c > 0 => Ok(Load::Concurrency(c)),
            (None, Some(_)) => bail!("--concurrency must be at least 1"),
            _ => bail!("give exactly one of --rate R or --concurrency C"),
        }
    }

    fn slo(&self) -> Result<Slo> {
        for (flag, v) in [
            ("--slo-ttft-ms", self.slo_ttft_ms),
            ("--slo-tpot-ms", self.slo_tpot_ms),
        ] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v > 0.0)) {
                bail!("{flag} {v}: give a positive number of milliseconds");
            }
        }
        Ok(Slo {
            ttft_ms: self.slo_ttft_ms,
            tpot_ms: self.slo_tpot_ms,
        })
    }
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        BenchCommand::Serve(a) => serve(a),
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let load = a.load()?;
    let slo = a.slo()?;
    let input: LengthDist = a
        .input_len
        .parse()
        .map_err(|e| anyhow::anyhow!("--input-len: {e}"))?;
    let output: LengthDist = a
        .output_len
        .parse()
        .map_err(|e| anyhow::anyhow!("--output-len: {e}"))?;
    if a.num_requests == 0 {
        bail!("--num-requests must be at least 1");
    }
    if !(a.temperature.is_finite() && (0.0..=2.0).contains(&a.temperature)) {
        bail!("--temperature {}: give a number from 0 to 2", a.temperature);
    }
    if !(a.request_timeout.is_finite() && a.request_timeout > 0.0) {
        bail!("--request-timeout must be a positive number of seconds");
    }
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key is empty: give a key, or leave the flag out");
    }
    let client = Client::new(
        &a.url,
        a.api_key.clone(),
        Duration::from_secs_f64(a.request_timeout),
    )?;
    let tokenizer = a.tokenizer.load()?;
    cluster_args::runtime()?.block_on(async {
        let model = match &a.model_name {
            Some(m) => m.clone(),
            None => client
                .models()
                .await
                .with_context(|| format!("asking {} for its models (is the server up?)", a.url))?
                .into_iter()
                .next()
                .context("the server lists no models; give --model-name")?,
        };
        let cfg = LoadConfig {
            model,
            endpoint: a.endpoint,
            load,
            num_requests: a.num_requests,
            input_len: input.to_string(),
            output_len: output.to_string(),
            seed: a.seed,
            temperature: a.temperature,
            ignore_eos: a.ignore_eos,
            slo,
        };
        let planned = loadgen::plan(&cfg, input, output, &tokenizer).map_err(anyhow::Error::msg)?;
        let off = planned
            .iter()
            .filter(|p| p.prompt_tokens != p.asked_prompt_tokens)
            .count();
        if off > 0 {
            eprintln!("warning: {off} prompt(s) could not be built to their exact length");
        }
        let bar = progress_bar(a.num_requests as u64);
        let (done, errors, tokens) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let started = Instant::now();
        let on_record = {
            let (bar, done, errors, tokens) =
                (bar.clone(), done.clone(), errors.clone(), tokens.clone());
            move |r: &Record| {
                done.fetch_add(1, Ordering::Relaxed);
                match &r.result {
                    Ok(t) => {
                        tokens.fetch_add(t.output_tokens, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "{} errors, {:.1} output tokens/s",
                    errors.load(Ordering::Relaxed),
                    tokens.load(Ordering::Relaxed) as f64 / secs
                ));
                bar.inc(1);
            }
        };
        let records = loadgen::run(&client, &cfg, planned, on_record).await;
        bar.finish_and_clear();
        let summary = Summary::of(&records, &cfg.slo);
        println!("{}", summary.table().trim_end());
        if let Some(path) = &a.output {
            let report = json!({
                "config": cfg,
                "url": a.url,
                "summary": summary,
                "requests": records.iter().map(record_json).collect::<Vec<_>>(),
            });
            let text = serde_json::to_string_pretty(&report)?;
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        if summary.completed == 0 {
            bail!("no request completed");
        }
        Ok(())
    })
}

fn progress_bar(n: u64) -> ProgressBar {
    let bar = ProgressBar::new(n);
    bar.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} {pos}/{len} requests, {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn record_json(r: &Record) -> serde_json::Value {
    match &r.result {
        Ok(t) => json!({
            "sent_s": r.sent,
            "ttft_ms": t.ttft * 1e3,
            "tpot_ms": t.tpot().map(|x| x * 1e3),
            "e2e_ms": t.e2e * 1e3,
            "prompt_tokens": t.prompt_tokens,
            "output_tokens": t.output_tokens,
        }),
        Err((kind, message)) => json!({
            "sent_s": r.sent,
            "error": kind.as_str(),
            "message": message,
        }),
    }
}
