//! Flags that run a command through a cluster of worker processes instead of in-process.

use anyhow::{bail, Context, Result};
use grok_coordinator::cluster::{default_worker_bin, Cluster, ClusterOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Run through N worker processes spawned on loopback (instead of in this process).
    #[arg(long, env = "GROK_WORKERS")]
    pub workers: Option<usize>,
    /// Attention tensor parallelism: ranks per attention group (must divide --workers).
    #[arg(long, env = "GROK_TP", default_value_t = 1)]
    pub tp: usize,
    /// Expert parallelism: groups the experts are spread over (must divide --workers).
    #[arg(long, env = "GROK_EP", default_value_t = 1)]
    pub ep: usize,
    /// Join running workers at these host:port addresses (rank order) instead of spawning.
    #[arg(long, env = "GROK_WORKER_ADDRS", value_delimiter = ',')]
    pub worker_addrs: Vec<String>,
    /// Shared secret of the cluster (default for spawned workers: a fresh random one).
    #[arg(long, env = "GROK_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// The worker executable (default: `grok-worker` beside this one).
    #[arg(long, env = "GROK_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
}

/// 128 random bits as hex, from the standard library's randomly seeded hasher.
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let word = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.finish()
    };
    format!("{:016x}{:016x}", word(), word())
}

impl ClusterArgs {
    pub fn enabled(&self) -> bool {
        self.workers.is_some() || !self.worker_addrs.is_empty()
    }

    pub fn options(&self) -> Result<ClusterOptions> {
        if self.workers.is_some() && !self.worker_addrs.is_empty() {
            bail!("give either --workers N (spawn local workers) or --worker-addrs (join running ones), not both");
        }
        if self.workers == Some(0) {
            bail!("--workers must be at least 1");
        }
        let token = match (&self.cluster_token, self.worker_addrs.is_empty()) {
            (Some(t), _) => t.clone(),
            (None, true) => random_token(),
            (None, false) => {
                bail!("--worker-addrs needs the workers' --cluster-token (or GROK_CLUSTER_TOKEN)")
            }
        };
        Ok(ClusterOptions {
            workers: self.workers.unwrap_or(0),
            tp: self.tp,
            ep: self.ep,
            worker_addrs: self.worker_addrs.clone(),
            token,
            worker_bin: self.worker_bin.clone().unwrap_or_else(default_worker_bin),
            // Within the 10 s promise: a stalled rank is named by then, its peers time out at 5 s.
            step_timeout: Duration::from_secs(8),
            comm_timeout: Duration::from_secs(5),
        })
    }

    /// Starts the cluster for the model at `dir`, showing each rank's load progress.
    pub async fn start(&self, dir: &Path) -> Result<Cluster> {
        let opts = self.options()?;
        let bars = indicatif::MultiProgress::new();
        let mut per_rank: Vec<indicatif::ProgressBar> = Vec::new();
        let style = indicatif::ProgressStyle::with_template(
            "rank {prefix}: loading [{bar:30}] {pos}/{len} layers",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let mut progress = |rank: usize, done: u32, total: u32| {
            while per_rank.len() <= rank {
                let b = bars.add(indicatif::ProgressBar::new(0));
                b.set_style(style.clone());
                b.set_prefix(per_rank.len().to_string());
                per_rank.push(b);
            }
            per_rank[rank].set_length(u64::from(total));
            per_rank[rank].set_position(u64::from(done));
        };
        let cluster = Cluster::start(dir, opts, &mut progress)
            .await
            .with_context(|| format!("starting the cluster for {}", dir.display()))?;
        let _ = bars.clear();
        Ok(cluster)
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}
