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
    /// Seconds a client may take to send a request's headers or its body (408), or to start
    /// its next request on a kept-alive connection; then its connection is closed.
    #[arg(long, env = "GROK_CLIENT_TIMEOUT", default_value_t = 30.0)]
    pub client_timeout: f64,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "GROK_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Seconds between health checks of an idle cluster (a busy one is checked by its steps).
    #[arg(long, env = "GROK_HEALTH_INTERVAL", default_value_t = 1.0)]
    pub health_interval: f64,
    /// On Ctrl-C or SIGTERM, seconds the requests in flight get to finish while new ones are
    /// refused (503) and /ready says no; 0 stops at once. A second signal stops at once.
    /// Under the 30 s that Kubernetes and Slurm wait before SIGKILL by default.
    #[arg(long, env = "GROK_SHUTDOWN_GRACE", default_value_t = 20.0)]
    pub shutdown_grace: f64,
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
        self.grace()?;
        Ok(SchedulerConfig {
            max_running: self.max_running,
            max_step_tokens: self.max_step_tokens,
            max_queued: self.max_queued,
            health_interval: Duration::from_secs_f64(self.health_interval),
        })
    }

    fn grace(&self) -> Result<Duration> {
        let g = self.shutdown_grace;
        if !(g.is_finite() && (0.0..=86_400.0).contains(&g)) {
            bail!("--shutdown-grace must be a number of seconds from 0 (stop at once) to 86400");
        }
        Ok(Duration::from_secs_f64(g))
    }

    fn api_config(&self) -> Result<ApiConfig> {
        if self.api_key.as_deref() == Some("") {
            bail!("--api-key is empty: give a key, or leave the flag out to serve without one");
        }
        if self.max_body_bytes < 1024 {
            bail!("--max-body-bytes must be at least 1024");
        }
        let t = self.client_timeout;
        if !(t.is_finite() && (0.1..=3600.0).contains(&t)) {
            bail!("--client-timeout must be a number of seconds from 0.1 to 3600");
        }
        let name = served_name(self.served_model_name.as_deref(), &self.model)?;
        Ok(ApiConfig {
            model_name: name,
            api_key: self.api_key.clone(),
            max_body_bytes: self.max_body_bytes,
            client_timeout: Duration::from_secs_f64(t),
        })
    }
}

/// The model id clients send: the one given, else the preset's name or the model
/// directory's name.
pub fn served_name(given: Option<&str>, model: &ModelArgs) -> Result<String> {
    let name = match (given, &model.preset, &model.model) {
        (Some(n), _, _) => n.to_string(),
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
    Ok(name)
}

/// Starts the cluster, then serves the OpenAI-compatible API until Ctrl-C or SIGTERM: requests are
/// batched continuously over the cluster; a failed rank is restarted and in-flight
/// sequences are recomputed.
pub fn run(args: Args) -> Result<()> {
    if !args.cluster.enabled() {
        bail!("grok serve needs workers: give --workers N (local) or --worker-addrs a:p,b:p,...");
    }
    let sched_cfg = args.scheduler_config()?;
    let api_cfg = args.api_config()?;
    let grace = args.grace()?;
    cluster_args::runtime()?.block_on(async {
        // First of all: from here on, a stop signal stops the server cleanly.
        let mut stop = StopSignal::new()?;
        let c = &args.cluster;
        match c.workers {
            Some(n) => eprintln!("starting {n} worker process(es)"),
            None => eprintln!("joining {} worker(s)", c.worker_addrs.len()),
        }
        let dir = args.model.dir()?;
        let tokenizer = Arc::new(args.tokenizer.load()?);
        let addr = format!("{}:{}", args.host, args.port);
        let start = Server::start(&addr, &args.cluster, &dir, tokenizer, sched_cfg, api_cfg);
        let server = tokio::select! {
            server = start => server?,
            _ = stop.recv() => {
                // Dropping the start drops its worker processes' stdin: they exit too.
                eprintln!("stopped while starting");
                return Ok(());
            }
        };
        server.serve_until(stop, grace).await
    })
}

/// Ctrl-C, or SIGTERM (what service managers and container runtimes send), caught from the
/// moment this is made: a signal before anything waits on it is kept for the next wait
/// instead of killing the process by the default action (one right after "ready" did).
pub struct StopSignal {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignal {
    /// Must be called inside the tokio runtime.
    pub fn new() -> Result<StopSignal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignal {
                interrupt: signal(SignalKind::interrupt()).context("catching SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignal {})
    }

    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The cluster, its scheduler and the HTTP API, running in this process.
pub struct Server {
    pub addr: std::net::SocketAddr,
    handle: scheduler::SchedulerHandle,
    stop_tx: tokio::sync::watch::Sender<bool>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    scheduler: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds `addr`, starts the cluster, and serves; returns once the API is ready.
    pub async fn start(
        addr: &str,
        cluster: &ClusterArgs,
        dir: &std::path::Path,
        tokenizer: Arc<grok_shared::tokenizer::Tokenizer>,
        sched_cfg: SchedulerConfig,
        api_cfg: ApiConfig,
    ) -> Result<Server> {
        // Bind first: a taken port is reported before minutes of loading.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (pick another --port or --host)"))?;
        let local = listener.local_addr()?;
        let cluster = cluster.start(dir).await?;
        let p = *cluster.plan();
        for (r, bytes) in cluster.weight_bytes().iter().enumerate() {
            eprintln!("rank {r}: {:.1} MB of weights", *bytes as f64 / 1e6);
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics = Metrics::new();
        let (handle, scheduler) = scheduler::start(
            cluster,
            sched_cfg,
            tokenizer.clone(),
            metrics,
            stop_rx.clone(),
        );
        let state = AppState::new(handle.clone(), tokenizer, api_cfg.clone());
        eprintln!(
            "ready: {} worker(s), tp={} ep={} (dp={}, etp={}); serving model '{}' at http://{local}/v1",
            p.world,
            p.tp,
            p.ep,
            p.dp(),
            p.etp(),
            api_cfg.model_name,
        );
        // Stopping ends the scheduler first: it ends every open stream (with an error event),
        // so the HTTP server's graceful shutdown does not wait on them.
        let mut stopped = stop_rx;
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let client_timeout = api_cfg.client_timeout;
        let served = tokio::spawn(api::serve(
            listener,
            api::router(state),
            client_timeout,
            shutdown,
        ));
        Ok(Server {
            addr: local,
            handle,
            stop_tx,
            served,
            scheduler,
        })
    }

    /// Stops serving and takes the cluster down.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop_tx.send(true);
        let _ = self.scheduler.await;
        Self::served(self.served.await)
    }

    /// Serves until `stop` (then drains for up to `grace` and stops) or until the HTTP
    /// server fails.
    pub async fn serve_until(mut self, mut stop: StopSignal, grace: Duration) -> Result<()> {
        tokio::select! {
            _ = stop.recv() => {
                self.drain(&mut stop, grace).await;
                eprintln!("shutting down");
                self.stop().await
            }
            r = &mut self.served => {
                let _ = self.stop_tx.send(true);
                let _ = self.scheduler.await;
                Self::served(r)
            }
        }
    }

    /// Refuses new requests and waits until those in flight end, `grace` passes, or `stop`
    /// comes again: a rolling update must not cut the generations it can let finish.
    async fn drain(&self, stop: &mut StopSignal, grace: Duration) {
        self.handle.drain();
        let n = self.handle.live();
        if n == 0 || grace.is_zero() {
            return;
        }
        eprintln!(
            "draining: {n} request(s) in flight, refusing new ones; stopping when they end or \
             in {:.0} s (a second signal stops now)",
            grace.as_secs_f64()
        );
        let ended = async {
            while self.handle.live() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            _ = ended => {}
            _ = tokio::time::sleep(grace) => {
                eprintln!("grace over: {} request(s) cut short", self.handle.live());
            }
            _ = stop.recv() => eprintln!("second signal: {} request(s) cut short", self.handle.live()),
        }
    }

    fn served(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<()> {
        r.context("the HTTP server task failed")?
            .context("the HTTP server failed")
    }
}
