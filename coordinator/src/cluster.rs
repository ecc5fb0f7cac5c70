//! The coordinator's view of a cluster: worker processes it spawned on loopback (or remote
//! ones it joined), each given a rank, the plan, its peers and the token; every step sent to
//! every rank in lockstep with a deadline; a failed rank named, and restartable alone.
//!
//! Each rank holds a paged KV pool of `kv_blocks` blocks and no per-sequence state: the caller
//! owns the block accounting (one [`BlockAllocator`](grok_shared::model::BlockAllocator) per
//! data-parallel group, whose ranks all hold the same block ids) and says in every
//! [`SeqWork`] where a sequence's keys and values live.

use grok_proto::worker::v1 as pb;
use grok_proto::worker::v1::worker_client::WorkerClient;
use grok_shared::checkpoint::model_config;
use grok_shared::config::ModelConfig;
use grok_shared::cpu::CpuShard;
use grok_shared::model::{blocks_for, check_steps, LogitsMode, SeqStep};
use grok_shared::parallel::Plan;
use grok_shared::sampling::{SampleSpec, Sampled};
use grok_worker::auth::AddToken;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("rank {rank}: {msg}")]
    Rank { rank: usize, msg: String },
    #[error("{0}")]
    Setup(String),
    #[error("the cluster is unhealthy after a failure of rank {0}: restart that rank first")]
    Unhealthy(usize),
    /// The step's work is inconsistent (refused before any rank saw it; the cluster stays
    /// healthy).
    #[error("invalid step: {0}")]
    InvalidWork(String),
}

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct SeqWork {
    pub seq_id: u64,
    /// Data-parallel group that holds the sequence's KV blocks (0..plan.dp()).
    pub group: usize,
    /// Positions already in the KV cache; the new tokens take positions start.. .
    pub start: usize,
    pub tokens: Vec<u32>,
    /// Block table covering start + tokens.len() positions (ids within the group's pool).
    pub blocks: Vec<u32>,
    pub logits: grok_shared::model::LogitsMode,
    /// Choose the next token on the worker from the last row (needs `Last` or `All`): a
    /// decode step then returns a token, not a vocabulary of logits.
    pub sample: Option<SampleSpec>,
}

impl SeqWork {
    /// The borrowed form the model's checks and forward pass take.
    pub fn as_step(&self) -> SeqStep<'_> {
        SeqStep {
            tokens: &self.tokens,
            start: self.start,
            blocks: &self.blocks,
            logits: self.logits,
        }
    }
}

/// What one step returns.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// rows × vocab per sequence that asked for logits (not for a sampled `Last` step).
    pub logits: std::collections::HashMap<u64, Vec<f32>>,
    /// The token chosen for each sequence that asked for sampling.
    pub sampled: std::collections::HashMap<u64, Sampled>,
    /// Tokens routed to each expert this step, [layers * experts], summed over ranks.
    pub expert_tokens: Vec<u64>,
    /// Seconds each rank spent in collectives this step (index = rank).
    pub comm_seconds: Vec<f64>,
}

/// Bytes one KV block of `block_size` positions takes on the rank of `plan` that needs the
/// most (the one with the most kv heads): every rank of a group gets the same block count, so
/// this sizes the pools.
pub fn kv_block_bytes(config: &ModelConfig, plan: &Plan, block_size: usize) -> usize {
    (0..plan.world)
        .map(|r| CpuShard::kv_block_bytes(config, plan, r, block_size))
        .max()
        .unwrap_or(0)
}

/// Blocks of `block_size` positions that fit in `bytes_per_rank` on every rank of `plan`.
pub fn kv_blocks_within(
    config: &ModelConfig,
    plan: &Plan,
    block_size: usize,
    bytes_per_rank: usize,
) -> usize {
    bytes_per_rank / kv_block_bytes(config, plan, block_size).max(1)
}

fn to_pb_logits(mode: LogitsMode) -> pb::LogitsMode {
    match mode {
        LogitsMode::None => pb::LogitsMode::None,
        LogitsMode::Last => pb::LogitsMode::Last,
        LogitsMode::All => pb::LogitsMode::All,
    }
}

type Client = WorkerClient<InterceptedService<Channel, AddToken>>;

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub workers: usize,
    pub tp: usize,
    pub ep: usize,
    /// Join these already-running workers instead of spawning local ones.
    pub worker_addrs: Vec<String>,
    pub token: String,
    pub worker_bin: PathBuf,
    /// `--device` of spawned workers (cpu, cuda:N, auto).
    pub worker_device: String,
    /// Collectives between the ranks: "grpc" or "nccl" (GPU workers).
    pub collectives: String,
    /// Deadline of one step on every rank.
    pub step_timeout: Duration,
    /// Deadline of each collective wait between workers.
    pub comm_timeout: Duration,
    /// Blocks of each rank's KV pool (per data-parallel group: every rank of a group holds the
    /// same ids). At least one full context, `blocks_for(max_seq_len, block_size)`.
    pub kv_blocks: usize,
    /// Positions per KV block.
    pub block_size: usize,
}

struct Rank {
    addr: String,
    client: Client,
    child: Option<Child>,
    peer_addr: String,
    /// Weight bytes the rank holds, as it reported when its load finished.
    weight_bytes: u64,
    /// Bytes of its KV pool, as it reported.
    kv_bytes: u64,
    /// Its open step stream; opened by the first step, dropped after any failed step (so
    /// that a late reply can never be read as the answer to a later step).
    steps: Option<StepStream>,
}

/// One rank's step stream: requests in, replies back in the same order.
struct StepStream {
    tx: tokio::sync::mpsc::Sender<pb::StepRequest>,
    replies: tonic::Streaming<pb::StepReply>,
}

/// A failed step on one rank: whether its process looks gone (the likeliest culprit when
/// several ranks fail together), and what happened.
type StepFailure = (bool, String);

fn step_status(s: tonic::Status) -> StepFailure {
    // Transport errors mean the process is gone.
    (
        s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown,
        s.message().to_string(),
    )
}

impl Rank {
    /// Runs one step on this rank within `deadline`, over its step stream.
    async fn step(
        &mut self,
        req: pb::StepRequest,
        deadline: Duration,
    ) -> Result<pb::StepReply, StepFailure> {
        let out = match tokio::time::timeout(deadline, self.step_on_stream(req)).await {
            Err(_) => Err((true, format!("no answer to the step within {deadline:?}"))),
            Ok(r) => r,
        };
        if out.is_err() {
            self.steps = None;
        }
        out
    }

    async fn step_on_stream(&mut self, req: pb::StepRequest) -> Result<pb::StepReply, StepFailure> {
        let id = req.step_id;
        let s = match &mut self.steps {
            Some(s) => s,
            None => {
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                let replies = self
                    .client
                    .steps(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map_err(step_status)?
                    .into_inner();
                self.steps.insert(StepStream { tx, replies })
            }
        };
        s.tx.send(req)
            .await
            .map_err(|_| (true, "its step stream closed".to_string()))?;
        match s.replies.message().await {
            Ok(Some(reply)) if reply.step_id == id => Ok(reply),
            Ok(Some(reply)) => Err((
                false,
                format!("it answered step {} to step {id}", reply.step_id),
            )),
            Ok(None) => Err((true, "its step stream ended".to_string())),
            Err(status) => Err(step_status(status)),
        }
    }
}

pub struct Cluster {
    model_path: PathBuf,
    config: ModelConfig,
    plan: Plan,
    opts: ClusterOptions,
    ranks: Vec<Rank>,
    next_step: u64,
    failed: Option<usize>,
}

/// `grok-worker` beside the running executable (where cargo builds both).
pub fn default_worker_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("grok-worker")))
        .unwrap_or_else(|| PathBuf::from("grok-worker"))
}

fn rank_err(rank: usize) -> impl Fn(String) -> ClusterError {
    move |msg| ClusterError::Rank { rank, msg }
}

async fn spawn_worker(
    bin: &Path,
    token: &str,
    device: &str,
    rank: usize,
) -> Result<(Child, String), ClusterError> {
    let err = rank_err(rank);
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--exit-with-stdin", "--device", device])
        .env("GROK_CLUSTER_TOKEN", token)
        // Held open by `child` until it is dropped or this process dies: then the worker exits.
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(format!("cannot start {}: {e} (build it with `cargo build -p grok-worker`, or give --worker-bin)", bin.display())))?;
    let stdout = child.stdout.take().ok_or_else(|| err("no stdout".into()))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| err("did not report its address within 10 s".into()))?
        .map_err(|e| err(format!("reading its stdout: {e}")))?
        .ok_or_else(|| err("exited before reporting its address".into()))?;
    let addr = line
        .strip_prefix("grok-worker listening on ")
        .ok_or_else(|| err(format!("unexpected first line '{line}'")))?
        .to_string();
    Ok((child, addr))
}

/// A worker of another release may speak another protocol (its messages, the peers' wire
/// format, the kernels' numerics): mixed images in a rollout must fail at the start, clearly.
fn same_release(worker: &str, addr: &str) -> Result<(), String> {
    let ours = grok_proto::release();
    if worker == ours {
        Ok(())
    } else {
        Err(format!(
            "{addr} runs grok-worker {worker:?} and this coordinator is {ours}: run one release \
             on every node"
        ))
    }
}

/// Where the other ranks reach a worker's collectives: the address it reports, resolved here
/// when it is a name (`--advertise-peer node7:50052`: peers need no DNS), except that a worker
/// listening on every interface (`0.0.0.0`, `::`, as in a container or on a node of several
/// networks) reports no address a peer can dial; the port is then taken at the address this
/// coordinator reached the worker at (`control`; an IPv4 address for `0.0.0.0`, which takes no
/// IPv6 connections).
async fn peer_address(reported: &str, control: &str) -> Result<String, String> {
    let (host, port, v4_only) = match reported.parse::<SocketAddr>() {
        Ok(peer) if !peer.ip().is_unspecified() => return Ok(peer.to_string()),
        Ok(peer) => (control, peer.port(), peer.is_ipv4()),
        Err(_) => match reported.rsplit_once(':').map(|(_, p)| p.parse::<u16>()) {
            Some(Ok(port)) if port > 0 => (reported, port, false),
            _ => {
                return Err(format!(
                    "reported peer address '{reported}' is not HOST:PORT"
                ))
            }
        },
    };
    let found: Vec<SocketAddr> =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(host))
            .await
            .map_err(|_| format!("resolving {host}: no answer within 5 s"))?
            .map_err(|e| format!("resolving {host}: {e}"))?
            .filter(|a| !v4_only || a.is_ipv4())
            .collect();
    // Peers dial one address: IPv4 where the name has one (`localhost` is often ::1 first,
    // which a worker listening on 0.0.0.0 does not take).
    let ip = found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .ok_or_else(|| format!("resolving {host}: no address a peer could dial"))?
        .ip();
    Ok(SocketAddr::new(ip, port).to_string())
}

async fn connect(addr: &str, token: &str, rank: usize) -> Result<Client, ClusterError> {
    let err = rank_err(rank);
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| err(format!("bad address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Step replies carry whole logits rows (0.5 MB per sequence for Grok-1's vocabulary):
        // HTTP/2's default 64 KiB windows would make every reply wait on window updates.
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| err(format!("cannot connect to {addr}: {e}")))?;
    let add = AddToken::new(token).map_err(ClusterError::Setup)?;
    Ok(WorkerClient::with_interceptor(channel, add)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30))
}

impl Cluster {
    /// Starts (or joins) the workers, has each load its slice (reporting `progress(rank,
    /// layers_done, layers_total)`), connects them to each other, and returns once all are ready.
    pub async fn start(
        model_path: &Path,
        opts: ClusterOptions,
        progress: &mut (dyn FnMut(usize, u32, u32) + Send),
    ) -> Result<Cluster, ClusterError> {
        let config = model_config(model_path).map_err(|e| ClusterError::Setup(e.to_string()))?;
        let world = if opts.worker_addrs.is_empty() {
            opts.workers
        } else {
            opts.worker_addrs.len()
        };
        if world == 0 {
            return Err(ClusterError::Setup(
                "a cluster needs at least one worker (--workers N)".into(),
            ));
        }
        let plan = Plan::new(&config, world, opts.tp, opts.ep)
            .map_err(|e| ClusterError::Setup(e.to_string()))?;
        if opts.token.is_empty() {
            return Err(ClusterError::Setup("the cluster token is empty".into()));
        }
        let need = blocks_for(config.max_seq_len, opts.block_size);
        if opts.block_size == 0 || opts.block_size > u32::MAX as usize {
            return Err(ClusterError::Setup(format!(
                "the KV block size {} must be between 1 and {}",
                opts.block_size,
                u32::MAX
            )));
        }
        if opts.kv_blocks < need || opts.kv_blocks > u32::MAX as usize {
            return Err(ClusterError::Setup(format!(
                "{} KV blocks of {} positions per rank: need between {need} (one full context \
                 of {} positions) and {}",
                opts.kv_blocks,
                opts.block_size,
                config.max_seq_len,
                u32::MAX
            )));
        }
        let mut ranks = Vec::with_capacity(world);
        for rank in 0..world {
            ranks.push(Self::open_rank(&opts, rank, opts.worker_addrs.get(rank).cloned()).await?);
        }
        let mut cluster = Cluster {
            model_path: model_path.to_path_buf(),
            config,
            plan,
            opts,
            ranks,
            next_step: 0,
            failed: None,
        };
        let all: Vec<usize> = (0..world).collect();
        cluster.load(&all, progress).await?;
        cluster.join_peers().await?;
        Ok(cluster)
    }

    /// Connects to the worker at `remote`, or spawns a local one when `None`.
    async fn open_rank(
        opts: &ClusterOptions,
        rank: usize,
        remote: Option<String>,
    ) -> Result<Rank, ClusterError> {
        let (child, addr) = match remote {
            Some(a) => (None, a),
            None => {
                let (c, a) =
                    spawn_worker(&opts.worker_bin, &opts.token, &opts.worker_device, rank).await?;
                (Some(c), a)
            }
        };
        let mut client = connect(&addr, &opts.token, rank).await?;
        let info = tokio::time::timeout(
            Duration::from_secs(10),
            client.describe(pb::DescribeRequest {}),
        )
        .await
        .map_err(|_| rank_err(rank)(format!("{addr}: no answer to Describe within 10 s")))?
        .map_err(|s| rank_err(rank)(format!("{addr}: {}", s.message())))?
        .into_inner();
        same_release(&info.version, &addr).map_err(rank_err(rank))?;
        let peer_addr = peer_address(&info.peer_addr, &addr)
            .await
            .map_err(rank_err(rank))?;
        Ok(Rank {
            addr,
            client,
            child,
            peer_addr,
            weight_bytes: 0,
            kv_bytes: 0,
            steps: None,
        })
    }

    async fn load(
        &mut self,
        ranks: &[usize],
        progress: &mut (dyn FnMut(usize, u32, u32) + Send),
    ) -> Result<(), ClusterError> {
        let plan = pb::Plan {
            world: self.plan.world as u32,
            tp: self.plan.tp as u32,
            ep: self.plan.ep as u32,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for &r in ranks {
            let mut client = self.ranks[r].client.clone();
            let req = pb::LoadRequest {
                rank: r as u32,
                plan: Some(plan),
                model_path: self.model_path.display().to_string(),
                // Checked against u32 in `start`.
                kv_blocks: self.opts.kv_blocks as u32,
                block_size: self.opts.block_size as u32,
            };
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let err = rank_err(r);
                let mut stream = client
                    .load(req)
                    .await
                    .map_err(|s| err(s.message().to_string()))?
                    .into_inner();
                loop {
                    // A load may take long, but each layer must show progress within the deadline.
                    let msg = tokio::time::timeout(Duration::from_secs(600), stream.message())
                        .await
                        .map_err(|_| err("no load progress for 600 s".into()))?
                        .map_err(|s| err(format!("load failed: {}", s.message())))?
                        .ok_or_else(|| err("load stream ended early".into()))?;
                    if msg.done {
                        return Ok::<(u64, u64), ClusterError>((msg.weight_bytes, msg.kv_bytes));
                    }
                    let _ = tx.send((r, msg.layers_done, msg.layers_total));
                }
            }));
        }
        drop(tx);
        while let Some((r, done, total)) = rx.recv().await {
            if total > 0 {
                progress(r, done, total);
            }
        }
        for (&r, t) in ranks.iter().zip(tasks) {
            let (weights, kv) = t
                .await
                .map_err(|e| ClusterError::Setup(format!("load task: {e}")))??;
            self.ranks[r].weight_bytes = weights;
            self.ranks[r].kv_bytes = kv;
        }
        Ok(())
    }

    /// Calls every rank at once (`call(client)`), each within `deadline`; the first failure
    /// is returned naming its rank and `what` was asked.
    async fn on_every_rank<T, F, Fut>(
        &self,
        what: &'static str,
        deadline: Duration,
        call: F,
    ) -> Result<Vec<T>, ClusterError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
        T: Send + 'static,
    {
        let tasks: Vec<_> = self
            .ranks
            .iter()
            .enumerate()
            .map(|(r, rank)| {
                let reply = call(rank.client.clone());
                tokio::spawn(async move {
                    tokio::time::timeout(deadline, reply)
                        .await
                        .map_err(|_| {
                            rank_err(r)(format!("no answer to {what} within {deadline:?}"))
                        })?
                        .map_err(|s| rank_err(r)(format!("{what}: {}", s.message())))
                })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(
                t.await
                    .map_err(|e| ClusterError::Setup(format!("{what} task: {e}")))??,
            );
        }
        Ok(out)
    }

    /// Every rank drops its mesh (waiting until all did).
    async fn leave_peers(&mut self) -> Result<(), ClusterError> {
        self.on_every_rank("LeavePeers", Duration::from_secs(10), |mut c| async move {
            c.leave_peers(pb::LeavePeersRequest {}).await
        })
        .await?;
        Ok(())
    }

    /// Connects every rank's collectives to its peers. Every rank first drops its old mesh
    /// (and all wait for that), so no new stream meets an old one being torn down.
    async fn join_peers(&mut self) -> Result<(), ClusterError> {
        self.leave_peers().await?;
        let req = pb::JoinPeersRequest {
            peer_addrs: self.ranks.iter().map(|r| r.peer_addr.clone()).collect(),
            timeout_ms: self.opts.comm_timeout.as_millis().min(u32::MAX as u128) as u32,
            collectives: self.opts.collectives.clone(),
        };
        self.on_every_rank("JoinPeers", Duration::from_secs(30), |mut c| {
            let req = req.clone();
            async move { c.join_peers(req).await }
        })
        .await?;
        self.failed = None;
        Ok(())
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn addrs(&self) -> Vec<String> {
        self.ranks.iter().map(|r| r.addr.clone()).collect()
    }

    /// The OS process id of a spawned rank (for tests and operators).
    pub fn pid(&self, rank: usize) -> Option<u32> {
        self.ranks
            .get(rank)
            .and_then(|r| r.child.as_ref())
            .and_then(Child::id)
    }

    /// Weight bytes each rank holds.
    pub fn weight_bytes(&self) -> Vec<u64> {
        self.ranks.iter().map(|r| r.weight_bytes).collect()
    }

    /// Bytes of each rank's KV pool (address space; resident as blocks are written).
    pub fn kv_bytes(&self) -> Vec<u64> {
        self.ranks.iter().map(|r| r.kv_bytes).collect()
    }

    /// Blocks in each data-parallel group's KV pool (ids `0..kv_blocks`).
    pub fn kv_blocks(&self) -> usize {
        self.opts.kv_blocks
    }

    /// Positions per KV block.
    pub fn block_size(&self) -> usize {
        self.opts.block_size
    }

    /// Data-parallel groups: each holds its own sequences' KV blocks.
    pub fn dp(&self) -> usize {
        self.plan.dp()
    }

    /// Asks every rank for its health (2 s deadline each); the first rank that does not
    /// answer "ready" marks the cluster unhealthy and is named in the error.
    pub async fn health(&mut self) -> Result<(), ClusterError> {
        for (r, rank) in self.ranks.iter_mut().enumerate() {
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                rank.client.health(pb::HealthRequest {}),
            )
            .await;
            let problem = match answer {
                Err(_) => Some("no answer to a health check within 2 s".to_string()),
                Ok(Err(s)) => Some(format!("health check failed: {}", s.message())),
                Ok(Ok(h)) if h.get_ref().state != "ready" => {
                    Some(format!("state {}", h.get_ref().state))
                }
                Ok(Ok(_)) => None,
            };
            if let Some(msg) = problem {
                self.failed = Some(r);
                return Err(ClusterError::Rank { rank: r, msg });
            }
        }
        Ok(())
    }

    /// Which rank failed, if the cluster is unhealthy.
    pub fn failed_rank(&self) -> Option<usize> {
        self.failed
    }

    /// Checks `work` as every rank would, so a bad request is refused here, before any rank
    /// runs part of a step its peers refuse (which would leave them waiting on each other).
    fn check_work(&self, work: &[SeqWork]) -> Result<(), ClusterError> {
        let dp = self.plan.dp();
        let mut ids = std::collections::HashSet::new();
        for w in work {
            if w.group >= dp {
                return Err(ClusterError::InvalidWork(format!(
                    "sequence {} is in data-parallel group {}, but the plan has {dp} group(s)",
                    w.seq_id, w.group
                )));
            }
            if !ids.insert(w.seq_id) {
                return Err(ClusterError::InvalidWork(format!(
                    "sequence {} appears twice in one step",
                    w.seq_id
                )));
            }
            if let Some(spec) = &w.sample {
                if w.logits == LogitsMode::None {
                    return Err(ClusterError::InvalidWork(format!(
                        "sequence {}: sampling needs logits (Last or All)",
                        w.seq_id
                    )));
                }
                if let Err(e) = spec.params.validate() {
                    return Err(ClusterError::InvalidWork(format!(
                        "sequence {}: {e}",
                        w.seq_id
                    )));
                }
            }
        }
        for g in 0..dp {
            let mine: Vec<&SeqWork> = work.iter().filter(|w| w.group == g).collect();
            let batch: Vec<SeqStep> = mine.iter().map(|w| w.as_step()).collect();
            if let Err(e) = check_steps(
                &self.config,
                self.opts.block_size,
                self.opts.kv_blocks,
                &batch,
            ) {
                let seqs: Vec<u64> = mine.iter().map(|w| w.seq_id).collect();
                return Err(ClusterError::InvalidWork(format!(
                    "data-parallel group {g}, whose batch entries are sequences {seqs:?}: {e}"
                )));
            }
        }
        Ok(())
    }

    /// One step: each rank runs the work of its data-parallel group (`plan.dp_index(rank)`),
    /// every group in lockstep. Returns the logits of the sequences that asked for them, the
    /// expert routing counts and each rank's time in collectives.
    ///
    /// Invalid work is refused before anything is sent ([`ClusterError::InvalidWork`]). A
    /// failed step names the rank at fault and leaves the cluster unhealthy until
    /// [`Cluster::restart`]; the blocks the step wrote may be half-written on any rank.
    pub async fn step(&mut self, work: &[SeqWork]) -> Result<StepOutput, ClusterError> {
        if let Some(r) = self.failed {
            return Err(ClusterError::Unhealthy(r));
        }
        self.check_work(work)?;
        // Starts and block ids fit u32: checked against the context and the pool above.
        let inputs: Vec<(usize, pb::SeqInput)> = work
            .iter()
            .map(|w| {
                (
                    w.group,
                    pb::SeqInput {
                        seq_id: w.seq_id,
                        tokens: w.tokens.clone(),
                        start: w.start as u32,
                        blocks: w.blocks.clone(),
                        logits: to_pb_logits(w.logits) as i32,
                        sampling: w.sample.as_ref().map(|x| {
                            let a = &x.adjust;
                            pb::Sampling {
                                temperature: x.params.temperature,
                                top_k: x.params.top_k.min(u32::MAX as usize) as u32,
                                top_p: x.params.top_p,
                                rng_state: x.rng_state,
                                logprobs: x.logprobs.is_some(),
                                top_logprobs: x.logprobs.unwrap_or(0).min(u32::MAX as usize) as u32,
                                presence_penalty: a.presence_penalty,
                                frequency_penalty: a.frequency_penalty,
                                count_tokens: a.counts.iter().map(|c| c.0).collect(),
                                count_times: a.counts.iter().map(|c| c.1).collect(),
                                bias_tokens: a.bias.iter().map(|b| b.0).collect(),
                                bias_values: a.bias.iter().map(|b| b.1).collect(),
                            }
                        }),
                    },
                )
            })
            .collect();
        self.next_step += 1;
        let (plan, step_id, deadline) = (self.plan, self.next_step, self.opts.step_timeout);
        let steps = self.ranks.iter_mut().enumerate().map(|(r, rank)| {
            let group = plan.dp_index(r);
            let req = pb::StepRequest {
                step_id,
                seqs: inputs
                    .iter()
                    .filter(|(g, _)| *g == group)
                    .map(|(_, s)| s.clone())
                    .collect(),
            };
            rank.step(req, deadline)
        });
        let replies = futures_util::future::join_all(steps).await;
        let mut out = StepOutput {
            comm_seconds: vec![0.0; self.ranks.len()],
            ..StepOutput::default()
        };
        let mut errors = Vec::new();
        for (r, reply) in replies.into_iter().enumerate() {
            match reply {
                Ok(reply) => {
                    for l in reply.logits {
                        if l.logits_f32.len() % 4 != 0 {
                            errors.push((
                                false,
                                r,
                                format!(
                                    "sequence {}: {} logits bytes, not whole f32s",
                                    l.seq_id,
                                    l.logits_f32.len()
                                ),
                            ));
                            continue;
                        }
                        if let Some(x) = l.sampled {
                            if x.token as usize >= self.config.vocab_size
                                || x.top_ids.len() != x.top_logprobs.len()
                            {
                                errors.push((
                                    false,
                                    r,
                                    format!("sequence {}: a malformed sampled token", l.seq_id),
                                ));
                                continue;
                            }
                            out.sampled.insert(
                                l.seq_id,
                                Sampled {
                                    token: x.token,
                                    rng_state: x.rng_state,
                                    logprob: x.logprob,
                                    top: x.top_ids.into_iter().zip(x.top_logprobs).collect(),
                                },
                            );
                        }
                        if !l.logits_f32.is_empty() {
                            let mut row = Vec::with_capacity(l.logits_f32.len() / 4);
                            grok_shared::bytes::extend_f32_le(&mut row, &l.logits_f32);
                            out.logits.insert(l.seq_id, row);
                        }
                    }
                    if out.expert_tokens.len() < reply.expert_tokens.len() {
                        out.expert_tokens.resize(reply.expert_tokens.len(), 0);
                    }
                    for (sum, n) in out.expert_tokens.iter_mut().zip(reply.expert_tokens) {
                        *sum += n;
                    }
                    out.comm_seconds[r] = reply.comm_seconds;
                }
                Err((gone, msg)) => errors.push((gone, r, msg)),
            }
        }
        if !errors.is_empty() {
            // Name the rank whose process failed, rather than a peer that timed out on it.
            errors.sort_by_key(|(gone, r, _)| (!*gone, *r));
            let (_, r, msg) = errors.swap_remove(0);
            self.failed = Some(r);
            return Err(ClusterError::Rank { rank: r, msg });
        }
        let vocab = self.config.vocab_size;
        for w in work {
            if w.sample.is_some() && !out.sampled.contains_key(&w.seq_id) {
                return Err(ClusterError::Setup(format!(
                    "sequence {}: no sampled token came back",
                    w.seq_id
                )));
            }
            let want = match (w.sample.is_some(), w.logits) {
                (true, LogitsMode::Last) => 0,
                _ => w.logits.rows(w.tokens.len()) * vocab,
            };
            let got = out.logits.get(&w.seq_id).map_or(0, Vec::len);
            if got != want {
                return Err(ClusterError::Setup(format!(
                    "sequence {}: {got} logits came back, expected {want}",
                    w.seq_id
                )));
            }
        }
        Ok(out)
    }

    /// Replaces `rank` with a fresh process (local clusters), which loads only its own slice
    /// and a KV pool of the same size; then every rank reconnects its collectives.
    ///
    /// The KV contents of every sequence must be considered lost: the new rank's pool is
    /// empty and the others may hold half-written blocks of the failed step. The caller
    /// recomputes each sequence from its tokens (a step with `start` 0) before continuing it.
    pub async fn restart(&mut self, rank: usize) -> Result<(), ClusterError> {
        if rank >= self.ranks.len() {
            return Err(ClusterError::Setup(format!("no rank {rank}")));
        }
        if let Some(mut c) = self.ranks[rank].child.take() {
            let _ = c.kill().await;
        }
        // A remote rank restarts on its own machine; it is rejoined at the same address.
        let remote = (!self.opts.worker_addrs.is_empty()).then(|| self.ranks[rank].addr.clone());
        self.ranks[rank] = Self::open_rank(&self.opts, rank, remote).await?;
        self.load(&[rank], &mut |_, _, _| {}).await?;
        self.join_peers().await
    }

    /// Asks every worker to stop, then makes sure spawned processes are gone.
    pub async fn shutdown(mut self) {
        // Taking the mesh down together first keeps workers from reporting each other as failed.
        let _ = self.leave_peers().await;
        for r in &mut self.ranks {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                r.client.shutdown(pb::ShutdownRequest {}),
            )
            .await;
            if let Some(mut c) = r.child.take() {
                if tokio::time::timeout(Duration::from_secs(5), c.wait())
                    .await
                    .is_err()
                {
                    let _ = c.kill().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{peer_address, same_release};

    #[test]
    fn a_worker_of_another_release_is_refused_with_both_versions() {
        let ours = grok_proto::release();
        assert_eq!(same_release(&ours, "w0:1"), Ok(()));
        assert!(ours.starts_with(env!("CARGO_PKG_VERSION")) && ours.contains("protocol"));
        let other_protocol = format!("{} (protocol 0000000000000000)", env!("CARGO_PKG_VERSION"));
        for other in ["0.0.9", "", env!("CARGO_PKG_VERSION"), &other_protocol] {
            let e = same_release(other, "w0:1").expect_err(other);
            assert!(
                e.contains("w0:1")
                    && e.contains(&format!("{other:?}"))
                    && e.contains("one release"),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn a_worker_on_every_interface_is_reached_where_the_coordinator_reached_it() {
        // A specific address is kept as reported.
        let kept = peer_address("10.0.0.7:5000", "10.0.0.9:50051").await;
        assert_eq!(kept.as_deref(), Ok("10.0.0.7:5000"));
        // 0.0.0.0 and :: take the control address's IP (resolved when it is a name).
        let by_ip = peer_address("0.0.0.0:5000", "10.1.2.3:50051").await;
        assert_eq!(by_ip.as_deref(), Ok("10.1.2.3:5000"));
        let v6 = peer_address("[::]:5000", "[fd00::2]:50051").await;
        assert_eq!(v6.as_deref(), Ok("[fd00::2]:5000"));
        let by_name = peer_address("0.0.0.0:5000", "localhost:50051").await;
        assert_eq!(by_name.as_deref(), Ok("127.0.0.1:5000"));
        // A worker on 0.0.0.0 takes no IPv6 connections.
        let v4_only = peer_address("0.0.0.0:5000", "[fd00::2]:50051").await;
        assert!(v4_only.is_err_and(|e| e.contains("no address")));
        // A name (`--advertise-peer`) is resolved, with its own port.
        let advertised = peer_address("localhost:5001", "10.1.2.3:50051").await;
        assert_eq!(advertised.as_deref(), Ok("127.0.0.1:5001"));
        // What a peer could not dial is an error naming it.
        let bad = peer_address("peer-host", "10.1.2.3:50051").await;
        assert!(bad.is_err_and(|e| e.contains("'peer-host'")));
        let no_port = peer_address("peer-host:0", "10.1.2.3:50051").await;
        assert!(no_port.is_err_and(|e| e.contains("'peer-host:0'")));
        let unresolved = peer_address("no-such-host.invalid:5000", "10.1.2.3:50051").await;
        assert!(unresolved.is_err_and(|e| e.contains("resolving no-such-host.invalid:5000")));
        let unknown = peer_address("0.0.0.0:5000", "no-such-host.invalid:50051").await;
        assert!(unknown.is_err_and(|e| e.contains("no-such-host.invalid")));
    }
}
