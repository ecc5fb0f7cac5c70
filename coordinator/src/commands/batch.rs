//! `grok batch`: run an OpenAI Batch file against a server, or against a cluster started
//! here for the run.

use crate::cluster_args::{self, ClusterArgs};
use crate::commands::serve::{served_name, Server};
use crate::model_args::{ModelArgs, TokenizerArgs};
use anyhow::{bail, Context, Result};
use grok_coordinator::api::ApiConfig;
use grok_coordinator::batch::{self, BatchConfig};
use grok_coordinator::client::Client;
use grok_coordinator::scheduler::SchedulerConfig;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("server").required(true).args(["url", "model", "preset"])))]
pub struct Args {
    /// Requests, one per line: `{"custom_id", "method": "POST", "url", "body"}`.
    #[arg(long, env = "GROK_BATCH_INPUT")]
    pub input: PathBuf,
    /// Results, one per line (appended: a rerun skips every custom_id already there).
    #[arg(long, env = "GROK_BATCH_OUTPUT")]
    pub output: PathBuf,
    /// Send the requests to this server (with or without a trailing /v1).
    #[arg(long, env = "GROK_BATCH_URL", conflicts_with_all = ["model", "preset"])]
    pub url: Option<String>,
    /// Send `Authorization: Bearer KEY` (with --url).
    #[arg(long, env = "GROK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Or serve this model directory here for the run (needs --workers).
    #[arg(long, env = "GROK_MODEL", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// Or serve a built-in preset here for the run (needs --workers).
    #[arg(long, env = "GROK_PRESET", value_parser = ["tiny"])]
    pub preset: Option<String>,
    /// The model id the local server answers to (default: the preset's or directory's name).
    #[arg(long, env = "GROK_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Requests in flight at most.
    #[arg(long, env = "GROK_BATCH_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// Retries of a request the server could not take (429, 502-504, no connection) before
    /// the run stops (a rerun picks it up).
    #[arg(long, env = "GROK_BATCH_MAX_RETRIES", default_value_t = 5)]
    pub max_retries: u32,
    /// Seconds a request may take before it is retried.
    #[arg(long, env = "GROK_BATCH_REQUEST_TIMEOUT", default_value_t = 600.0)]
    pub request_timeout: f64,
}

pub fn run(a: Args) -> Result<()> {
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if !(a.request_timeout.is_finite() && a.request_timeout > 0.0) {
        bail!("--request-timeout must be a positive number of seconds");
    }
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key is empty: give a key, or leave the flag out");
    }
    if !a.input.is_file() {
        bail!("--input {}: no such file", a.input.display());
    }
    // Appending results to the requests would corrupt both.
    if let (Ok(i), Ok(o)) = (a.input.canonicalize(), a.output.canonicalize()) {
        if i == o {
            bail!("--output must be another file than --input");
        }
    }
    let cfg = BatchConfig {
        concurrency: a.concurrency,
        max_retries: a.max_retries,
        backoff: Duration::from_millis(500),
    };
    let timeout = Duration::from_secs_f64(a.request_timeout);
    cluster_args::runtime()?.block_on(async {
        let (client, server) = match &a.url {
            Some(url) => (Client::new(url, a.api_key.clone(), timeout)?, None),
            None => {
                let server = start_local(&a).await?;
                let url = format!("http://{}", server.addr);
                (Client::new(&url, None, timeout)?, Some(server))
            }
        };
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} {pos}/{len} results {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let progress = {
            let bar = bar.clone();
            move |done: usize, total: usize| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
        };
        let report = batch::run(&client, &a.input, &a.output, &cfg, &progress).await;
        bar.finish_and_clear();
        if let Some(s) = server {
            s.stop().await?;
        }
        let r = report?;
        println!(
            "{} request lines: {} done earlier, {} succeeded, {} answered with an error or invalid, {} left for a rerun",
            r.lines, r.skipped, r.succeeded, r.errored, r.unsent
        );
        if let Some(why) = r.stop_reason {
            bail!(
                "stopped: {why}; {} request(s) have no result yet: run the same command again to send them",
                r.unsent
            );
        }
        Ok(())
    })
}

async fn start_local(a: &Args) -> Result<Server> {
    if !a.cluster.enabled() {
        bail!("serving --model/--preset here needs workers: give --workers N");
    }
    let model = ModelArgs {
        model: a.model.clone(),
        preset: a.preset.clone(),
    };
    let api = ApiConfig {
        model_name: served_name(a.served_model_name.as_deref(), &model)?,
        api_key: None,
        ..ApiConfig::default()
    };
    let dir = model.dir()?;
    let tokenizer = Arc::new(a.tokenizer.load()?);
    Server::start(
        "127.0.0.1:0",
        &a.cluster,
        &dir,
        tokenizer,
        SchedulerConfig::default(),
        api,
    )
    .await
    .context("starting the local server")
}
