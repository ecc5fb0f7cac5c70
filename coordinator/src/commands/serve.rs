use crate::cluster_args::{self, ClusterArgs};
use crate::model_args::ModelArgs;
use anyhow::{bail, Result};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Seconds between health checks of every rank.
    #[arg(long, env = "GROK_HEALTH_INTERVAL", default_value_t = 1.0)]
    pub health_interval: f64,
}

/// Starts the cluster, reports ready, then supervises it: a rank that fails its health check
/// marks the cluster unhealthy and is restarted alone (it reloads only its own slice).
/// The HTTP API comes on top of this loop.
pub fn run(args: Args) -> Result<()> {
    if !args.cluster.enabled() {
        bail!("grok serve needs workers: give --workers N (local) or --worker-addrs a:p,b:p,...");
    }
    if !(args.health_interval.is_finite() && args.health_interval > 0.0) {
        bail!("--health-interval must be a positive number of seconds");
    }
    let dir = args.model.dir()?;
    cluster_args::runtime()?.block_on(async {
        let mut cluster = args.cluster.start(&dir).await?;
        let p = *cluster.plan();
        for (r, bytes) in cluster.weight_bytes().iter().enumerate() {
            eprintln!("rank {r}: {:.1} MB of weights", *bytes as f64 / 1e6);
        }
        eprintln!(
            "ready: {} worker(s), tp={} ep={} (dp={}, etp={}) at {}",
            p.world,
            p.tp,
            p.ep,
            p.dp(),
            p.etp(),
            cluster.addrs().join(",")
        );
        let mut tick = tokio::time::interval(Duration::from_secs_f64(args.health_interval));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = cluster.health().await {
                eprintln!("unhealthy: {e}");
                if let Some(r) = cluster.failed_rank() {
                    match cluster.restart(r).await {
                        Ok(()) => eprintln!("ready: rank {r} restarted"),
                        Err(e) => eprintln!("restarting rank {r} failed: {e}; retrying"),
                    }
                }
            }
        }
        eprintln!("shutting down");
        cluster.shutdown().await;
        Ok(())
    })
}
