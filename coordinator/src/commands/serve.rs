use crate::cluster_args::{self, ClusterArgs};
use crate::model_args::{ModelArgs, TokenizerArgs};
use anyhow::{bail, Context, Result};
use grok_coordinator::api::{self, ApiConfig, AppState};
use grok_coordinator::metrics::Metrics;
use grok_coordinator::scheduler::{self, SchedulerConfig};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address the HTTP API listens on.
    #[arg(long, env = "GROK_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port of the HTTP API (0: any free port; the address is printed).
    #[arg(long, env = "GROK_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* requests.
    #[arg(long, env = "GROK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model id clients send as `model` (default: the preset's name, or the model
    /// directory's name).
    #[arg(long, env = "GROK_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Sequences decoded together at most.
    #[arg(long, env = "GROK_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// New tokens per step at most: long prompts are prefilled in chunks of what is left
    /// after the decodes, so they never stall them.
    #[arg(long, env = "GROK_MAX_STEP_TOKENS", default_value_t = 512)]
    pub max_step_tokens: usize,
    /// Requests waiting for admission at most; beyond, new ones get 429 with Retry-After.
    #[arg(long, env = "GROK_MAX_QUEUED", default_value_t = 256)]
    pub max_queued: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "GROK_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Seconds between health checks of an idle cluster (a busy one is checked by its steps).
    #[arg(long, env = "GROK_HEALTH_INTERVAL", default_value_t = 1.0)]
    pub health_interval: f64,
}

impl Args {
    fn scheduler_config(&self) -> Result<SchedulerConfig> {
        if self.max_running == 0 {
            bail!("--max-running must be at least 1");
        }
        if self.max_step_tokens == 0 {
            bail!("--max-step-tokens must be at least 1");
        }
        if self.max_queued == 0 {
            bail!("--max-queued must be at least 1 (it bounds the waiting line)");
        }
        if !(self.health_interval.is_finite() && self.health_interval > 0.0) {
            bail!("--health-interval must be a positive number of seconds");
        }
        Ok(SchedulerConfig {
            max_running: self.max_running,
            max_step_tokens: self.max_step_tokens,
            max_queued: self.max_queued,
            health_interval: Duration::from_secs_f64(self.health_interval),
        })
    }

    fn api_config(&self) -> Result<ApiConfig> {
        if self.api_key.as_deref() == Some("") {
            bail!("--api-key is empty: give a key, or leave the flag out to serve without one");
        }
        if self.max_body_bytes < 1024 {
            bail!("--max-body-bytes must be at least 1024");
        }
        let name = match (
            &self.served_model_name,
            &self.model.preset,
            &self.model.model,
        ) {
            (Some(n), _, _) => n.clone(),
            (None, Some(p), _) => p.clone(),
            (None, None, Some(dir)) => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "grok-1".into()),
            (None, None, None) => "grok-1".into(),
        };
        if name.trim().is_empty() {
            bail!("--served-model-name is empty");
        }
        Ok(ApiConfig {
            model_name: name,
            api_key: self.api_key.clone(),
            max_body_bytes: self.max_body_bytes,
        })
    }
}

/// Starts the cluster, then serves the OpenAI-compatible API until Ctrl-C: requests are
/// batched continuously over the cluster; a failed rank is restarted and in-flight
/// sequences are recomputed.
pub fn run(args: Args) -> Result<()> {
    if !args.cluster.enabled() {
        bail!("grok serve needs workers: give --workers N (local) or --worker-addrs a:p,b:p,...");
    }
    let sched_cfg = args.scheduler_config()?;
    let api_cfg = args.api_config()?;
    let dir = args.model.dir()?;
    let tokenizer = Arc::new(args.tokenizer.load()?);
    cluster_args::runtime()?.block_on(async {
        // Bind first: a taken port is reported before minutes of loading.
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (pick another --port or --host)"))?;
        let local = listener.local_addr()?;
        let cluster = args.cluster.start(&dir).await?;
        let p = *cluster.plan();
        for (r, bytes) in cluster.weight_bytes().iter().enumerate() {
            eprintln!("rank {r}: {:.1} MB of weights", *bytes as f64 / 1e6);
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics = Metrics::new();
        let (handle, task) =
            scheduler::start(cluster, sched_cfg, tokenizer.clone(), metrics, stop_rx);
        let state = AppState::new(handle, tokenizer, api_cfg.clone());
        eprintln!(
            "ready: {} worker(s), tp={} ep={} (dp={}, etp={}); serving model '{}' at http://{local}/v1",
            p.world,
            p.tp,
            p.ep,
            p.dp(),
            p.etp(),
            api_cfg.model_name,
        );
        // Ctrl-C stops the scheduler first: it ends every open stream (with an error event),
        // so the HTTP server's graceful shutdown does not wait on them.
        let shutdown = async move {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("shutting down");
            let _ = stop_tx.send(true);
        };
        let served = api::serve(listener, api::router(state), shutdown).await;
        let _ = task.await;
        served.context("the HTTP server failed")
    })
}
