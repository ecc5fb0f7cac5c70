//! What the scheduler runs steps on: the seam between batching and execution. The cluster of
//! worker processes is the real one; [`LocalBackend`] runs the same shard code in this process
//! (a world of one), so the scheduler is testable without spawning workers.

use crate::cluster::{Cluster, ClusterError, SeqWork, StepOutput};
use grok_shared::comm::local::LocalComm;
use grok_shared::config::ModelConfig;
use grok_shared::cpu::CpuShard;
use grok_shared::model::{LogitsMode, ModelWeights, PagedKv, SeqStep};
use grok_shared::parallel::Plan;
use grok_shared::sampling::sample_last_rows;
use std::future::Future;
use std::time::Duration;

/// A place to run batch steps over a paged KV cache split into data-parallel groups, each
/// group with its own pool of `blocks_per_group` blocks of `block_size` positions.
pub trait StepBackend: Send + 'static {
    fn config(&self) -> &ModelConfig;
    fn groups(&self) -> usize;
    fn blocks_per_group(&self) -> usize;
    fn block_size(&self) -> usize;
    /// Runs one step. On error, the KV contents of every sequence must be assumed lost.
    fn step(
        &mut self,
        work: &[SeqWork],
    ) -> impl Future<Output = Result<StepOutput, ClusterError>> + Send;
    /// Checks every rank is alive and ready.
    fn check_health(&mut self) -> impl Future<Output = Result<(), ClusterError>> + Send;
    /// Brings a failed backend back (restarts the failed rank); KV contents are lost.
    fn recover(&mut self) -> impl Future<Output = Result<(), ClusterError>> + Send;
    fn shutdown(self) -> impl Future<Output = ()> + Send;
}

impl StepBackend for Cluster {
    fn config(&self) -> &ModelConfig {
        Cluster::config(self)
    }
    fn groups(&self) -> usize {
        self.plan().dp()
    }
    fn blocks_per_group(&self) -> usize {
        self.kv_blocks()
    }
    fn block_size(&self) -> usize {
        Cluster::block_size(self)
    }
    fn step(
        &mut self,
        work: &[SeqWork],
    ) -> impl Future<Output = Result<StepOutput, ClusterError>> + Send {
        Cluster::step(self, work)
    }
    async fn check_health(&mut self) -> Result<(), ClusterError> {
        self.health().await
    }
    async fn recover(&mut self) -> Result<(), ClusterError> {
        match self.failed_rank() {
            Some(r) => self.restart(r).await,
            None => self.health().await,
        }
    }
    async fn shutdown(self) {
        Cluster::shutdown(self).await
    }
}

/// The whole model in this process (one rank, one group), stepping on a blocking thread.
pub struct LocalBackend {
    config: ModelConfig,
    block_size: usize,
    num_blocks: usize,
    /// Taken while a step runs on the blocking pool; `None` afterwards only if that panicked.
    state: Option<(CpuShard, LocalComm, PagedKv)>,
}

impl LocalBackend {
    pub fn new(
        weights: ModelWeights,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ClusterError> {
        let config = weights.config.clone();
        let plan = Plan {
            world: 1,
            tp: 1,
            ep: 1,
        };
        let shard =
            CpuShard::new(weights, plan, 0).map_err(|e| ClusterError::Setup(e.to_string()))?;
        let kv = shard.new_kv(num_blocks, block_size);
        // A world of one never waits on a peer.
        let comm = LocalComm::group(1, Duration::from_secs(1)).remove(0);
        Ok(LocalBackend {
            config,
            block_size,
            num_blocks,
            state: Some((shard, comm, kv)),
        })
    }
}

fn lost() -> ClusterError {
    ClusterError::Rank {
        rank: 0,
        msg: "the in-process model was lost when a step panicked".into(),
    }
}

impl StepBackend for LocalBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn groups(&self) -> usize {
        1
    }
    fn blocks_per_group(&self) -> usize {
        self.num_blocks
    }
    fn block_size(&self) -> usize {
        self.block_size
    }
    async fn step(&mut self, work: &[SeqWork]) -> Result<StepOutput, ClusterError> {
        if let Some(w) = work.iter().find(|w| w.group != 0) {
            return Err(ClusterError::Setup(format!(
                "sequence {} is in group {}, but there is one group",
                w.seq_id, w.group
            )));
        }
        let vocab = self.config.vocab_size;
        let (shard, comm, mut kv) = self.state.take().ok_or_else(lost)?;
        let work = work.to_vec();
        let joined = tokio::task::spawn_blocking(move || {
            let batch: Vec<SeqStep> = work.iter().map(SeqWork::as_step).collect();
            let result = shard.forward(&comm, &mut kv, &batch);
            drop(batch);
            let out = result.map_err(|e| e.to_string()).and_then(|o| {
                let rows = o.logits.unwrap_or_default();
                let specs: Vec<_> = work.iter().map(|w| w.sample.clone()).collect();
                let sampled = sample_last_rows(&rows, &specs, vocab)
                    .map_err(|(i, e)| format!("sequence {}: {e}", work[i].seq_id))?;
                let mut out = StepOutput {
                    expert_tokens: o.expert_tokens,
                    comm_seconds: vec![o.comm_time.as_secs_f64()],
                    ..StepOutput::default()
                };
                for ((w, l), x) in work.iter().zip(rows).zip(sampled) {
                    if let Some(x) = x {
                        out.sampled.insert(w.seq_id, x);
                        if w.logits == LogitsMode::Last {
                            continue;
                        }
                    }
                    if !l.is_empty() {
                        out.logits.insert(w.seq_id, l);
                    }
                }
                Ok(out)
            });
            (shard, comm, kv, out)
        })
        .await;
        let (shard, comm, kv, out) = joined.map_err(|_| lost())?;
        self.state = Some((shard, comm, kv));
        out.map_err(|msg| ClusterError::Rank { rank: 0, msg })
    }
    async fn check_health(&mut self) -> Result<(), ClusterError> {
        self.state.as_ref().map(|_| ()).ok_or_else(lost)
    }
    async fn recover(&mut self) -> Result<(), ClusterError> {
        self.check_health().await
    }
    async fn shutdown(self) {}
}
