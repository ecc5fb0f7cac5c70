//! Flags that run a command through a cluster of worker processes instead of in-process.

use anyhow::{bail, Context, Result};
use grok_coordinator::cluster::{
    default_worker_bin, kv_block_bytes, kv_blocks_within, Cluster, ClusterOptions,
};
use grok_shared::checkpoint::model_config;
use grok_shared::config::ModelConfig;
use grok_shared::model::blocks_for;
use grok_shared::parallel::Plan;
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
    /// KV cache of each worker, in MiB: its pool of KV blocks (pages are only resident once
    /// written). Must hold at least one full context.
    #[arg(long, env = "GROK_KV_CACHE_MB", default_value_t = 512)]
    pub kv_cache_mb: usize,
    /// Compute device of spawned workers: cpu, cuda (GPU 0), cuda:N, or auto (a GPU when one
    /// exists). Several workers may share one GPU.
    #[arg(long, env = "GROK_WORKER_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub worker_device: String,
    /// Collectives between workers: grpc (any device), or nccl (GPU workers; one GPU per
    /// rank, as NCCL refuses two ranks on one GPU).
    #[arg(long, env = "GROK_COLLECTIVES", default_value = "grpc", value_parser = ["grpc", "nccl"])]
    pub collectives: String,
    /// Positions per KV cache block (page).
    #[arg(long, env = "GROK_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
}

const MIB: usize = 1 << 20;

/// Checks a `--worker-device` here, so a typo fails before any worker starts.
fn parse_device(s: &str) -> Result<String, String> {
    grok_shared::cuda::Device::parse(s).map(|_| s.to_string())
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

    /// The KV pool of every rank: (blocks, block size), from --kv-cache-mb and --block-size
    /// on the rank of `plan` whose blocks are largest (all ranks of a group hold the same ids).
    pub fn kv_pool(&self, config: &ModelConfig, plan: &Plan) -> Result<(usize, usize)> {
        let (bs, ctx) = (self.block_size, config.max_seq_len);
        if bs == 0 {
            bail!("--block-size must be at least 1 (positions per KV block; 16 is usual)");
        }
        if bs > ctx {
            bail!(
                "--block-size {bs} is larger than the model's context of {ctx} positions: \
                 give at most {ctx} (16 is usual)"
            );
        }
        if self.kv_cache_mb == 0 {
            bail!("--kv-cache-mb must be at least 1 (MiB of KV cache per worker)");
        }
        let budget = self.kv_cache_mb.saturating_mul(MIB);
        // Block ids travel as u32.
        let blocks = kv_blocks_within(config, plan, bs, budget).min(u32::MAX as usize);
        let need = blocks_for(ctx, bs);
        if blocks < need {
            let min_mb = (need * kv_block_bytes(config, plan, bs)).div_ceil(MIB);
            bail!(
                "--kv-cache-mb {} holds {blocks} KV block(s) of {bs} positions per worker, but \
                 one full context of {ctx} positions needs {need}: give --kv-cache-mb {min_mb} \
                 or more (or more --tp, which splits the KV heads)",
                self.kv_cache_mb
            );
        }
        Ok((blocks, bs))
    }

    /// Options for a cluster running `config` (the model's shape sizes the KV pools).
    pub fn options(&self, config: &ModelConfig) -> Result<ClusterOptions> {
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
        let world = self.workers.unwrap_or(self.worker_addrs.len());
        let plan = Plan::new(config, world, self.tp, self.ep)?;
        let (kv_blocks, block_size) = self.kv_pool(config, &plan)?;
        Ok(ClusterOptions {
            workers: self.workers.unwrap_or(0),
            tp: self.tp,
            ep: self.ep,
            worker_addrs: self.worker_addrs.clone(),
            token,
            worker_bin: self.worker_bin.clone().unwrap_or_else(default_worker_bin),
            worker_device: self.worker_device.clone(),
            collectives: self.collectives.clone(),
            // Within the 10 s promise: a stalled rank is named by then, its peers time out at 5 s.
            step_timeout: Duration::from_secs(8),
            comm_timeout: Duration::from_secs(5),
            kv_blocks,
            block_size,
        })
    }

    /// Starts the cluster for the model at `dir`, showing each rank's load progress.
    pub async fn start(&self, dir: &Path) -> Result<Cluster> {
        let config = model_config(dir).with_context(|| format!("reading {}", dir.display()))?;
        let opts = self.options(&config)?;
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
