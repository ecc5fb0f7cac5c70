//! The engine: one thread that owns this rank's model slice, its collectives and its paged KV
//! pool, and runs the coordinator's commands one at a time (an actor). The gRPC handlers
//! only pass messages to it, so no lock is ever held across a wait.
//!
//! The engine keeps no per-sequence state: each step names, for every sequence, the positions
//! it already holds and its block table in the pool. The coordinator does the accounting.

use grok_proto::worker::v1 as pb;
use grok_shared::checkpoint::open_model;
use grok_shared::comm::grpc::GrpcComm;
use grok_shared::comm::nccl::NcclComm;
use grok_shared::comm::Communicator;
use grok_shared::cpu::{CpuRank, CpuShard};
use grok_shared::cuda::{CudaShard, Device};
use grok_shared::model::{
    LogitsMode, ModelError, ModelWeights, PagedKv, RankBackend, SeqStep, Slices,
};
use grok_shared::parallel::Plan;
use grok_shared::sampling::{sample_last_rows, LogitAdjust, SampleSpec, SamplingParams};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no model loaded: call Load first")]
    NotLoaded,
    #[error("not connected to the peers: call JoinPeers first")]
    NotConnected,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("loading {path}: {msg}")]
    Load { path: String, msg: String },
    #[error("rank {rank}: {msg}")]
    Step { rank: usize, msg: String },
    #[error("connecting to peers: {0}")]
    Connect(String),
    #[error("the engine thread has stopped")]
    Gone,
}

pub type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// What a finished load reports.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub weight_bytes: u64,
    /// The KV pool's size (address space: pages become resident as blocks are written).
    pub kv_bytes: u64,
}

pub enum Command {
    Load {
        req: pb::LoadRequest,
        progress: mpsc::Sender<pb::LoadProgress>,
        reply: Reply<Loaded>,
    },
    Connect {
        req: pb::JoinPeersRequest,
        reply: Reply<()>,
    },
    Leave {
        reply: Reply<()>,
    },
    Step {
        req: pb::StepRequest,
        reply: Reply<pb::StepReply>,
    },
}

/// What Health reports, updated by the engine.
#[derive(Clone, Default)]
pub struct Status {
    pub state: String,
    pub rank: u32,
}

struct Engine {
    runtime: tokio::runtime::Handle,
    token: String,
    /// Where peers reach this rank: the listener is bound at start so Describe can report it.
    peer_addr: SocketAddr,
    peer_listener: Option<std::net::TcpListener>,
    status: Arc<Mutex<Status>>,
    device: Device,
    /// The rank's slice of the model and its KV pool, on `device`.
    backend: Option<Box<dyn RankBackend>>,
    comm: Option<GrpcComm>,
    /// NCCL between the ranks' GPUs, when JoinPeers asked for it (bootstrapped over `comm`).
    nccl: Option<NcclComm>,
}

/// Starts the engine thread; commands go in through the returned sender.
pub fn spawn(
    runtime: tokio::runtime::Handle,
    token: String,
    peer_listener: std::net::TcpListener,
    status: Arc<Mutex<Status>>,
    device: Device,
) -> std::io::Result<(mpsc::Sender<Command>, SocketAddr)> {
    let peer_addr = peer_listener.local_addr()?;
    let (tx, mut rx) = mpsc::channel::<Command>(16);
    set_state(&status, "idle", 0);
    let mut engine = Engine {
        runtime,
        token,
        peer_addr,
        peer_listener: Some(peer_listener),
        status,
        device,
        backend: None,
        comm: None,
        nccl: None,
    };
    std::thread::Builder::new()
        .name("grok-engine".into())
        .spawn(move || {
            while let Some(cmd) = rx.blocking_recv() {
                engine.handle(cmd);
            }
        })?;
    Ok((tx, peer_addr))
}

fn set_state(status: &Mutex<Status>, state: &str, rank: u32) {
    if let Ok(mut s) = status.lock() {
        s.state = state.to_string();
        s.rank = rank;
    }
}

impl Engine {
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Load {
                req,
                progress,
                reply,
            } => {
                let r = self.load(req, &progress);
                let _ = reply.send(r);
            }
            Command::Connect { req, reply } => {
                let r = self.connect(req);
                let _ = reply.send(r);
            }
            Command::Leave { reply } => {
                self.leave();
                let _ = reply.send(Ok(()));
            }
            Command::Step { req, reply } => {
                // On a rayon worker thread: between the step's parallel loops the pool then
                // has one idle spinner, not two spinning beside this thread for the cores.
                let r = rayon::scope(|_| self.step(req));
                let _ = reply.send(r);
            }
        }
    }

    fn load(
        &mut self,
        req: pb::LoadRequest,
        progress: &mpsc::Sender<pb::LoadProgress>,
    ) -> Result<Loaded, EngineError> {
        let path = req.model_path.clone();
        let fail = |msg: String| EngineError::Load {
            path: path.clone(),
            msg,
        };
        let p = req
            .plan
            .ok_or_else(|| EngineError::BadRequest("LoadRequest has no plan".into()))?;
        let rank = req.rank as usize;
        // Checked before the (long) load so a bad request fails at once.
        if req.kv_blocks == 0 || req.block_size == 0 {
            return Err(EngineError::BadRequest(format!(
                "kv_blocks ({}) and block_size ({}) must both be > 0: the coordinator sizes \
                 the KV pool from --kv-cache-mb and --block-size",
                req.kv_blocks, req.block_size
            )));
        }
        set_state(&self.status, "loading", req.rank);
        // Drop the old slice and pool before loading the new ones, not after.
        self.backend = None;
        let dir = open_model(std::path::Path::new(&path)).map_err(|e| fail(e.to_string()))?;
        let plan = Plan::new(&dir.config, p.world as usize, p.tp as usize, p.ep as usize)
            .map_err(|e| EngineError::BadRequest(e.to_string()))?;
        if rank >= plan.world {
            return Err(EngineError::BadRequest(format!(
                "rank {rank} outside a world of {}",
                plan.world
            )));
        }
        let total = dir.config.num_hidden_layers as u32;
        let slices = Slices::for_rank(&plan, &dir.config, rank);
        let (blocks, bs) = (req.kv_blocks as usize, req.block_size as usize);
        let kv_dim = slices.kv_heads.len() * dir.config.head_dim;
        // The allocation itself cannot fail politely (it aborts the process), so refuse sizes
        // that overflow, and on the CPU pools larger than the memory the machine has free.
        let kv_bytes = PagedKv::bytes_for(dir.config.num_hidden_layers, kv_dim, bs, blocks)
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| {
                EngineError::BadRequest(format!(
                    "a KV pool of {blocks} blocks of {bs} positions does not fit in memory"
                ))
            })?;
        if let (Device::Cpu, Some(free)) = (self.device, available_memory()) {
            if kv_bytes as u64 > free {
                return Err(EngineError::BadRequest(format!(
                    "a KV pool of {} MiB ({blocks} blocks of {bs} positions) is more than this \
                     machine's available memory ({} MiB): lower --kv-cache-mb",
                    kv_bytes >> 20,
                    free >> 20
                )));
            }
        }
        let mut report = |done: usize| {
            let _ = progress.blocking_send(pb::LoadProgress {
                layers_done: done as u32,
                layers_total: total,
                done: false,
                weight_bytes: 0,
                kv_bytes: 0,
            });
        };
        let weights = ModelWeights::load_slices_with_progress(
            dir.source.as_ref(),
            &dir.config,
            &slices,
            &mut report,
        )
        .map_err(|e| fail(e.to_string()))?;
        let bytes = weights.stored_bytes() as u64;
        let backend: Box<dyn RankBackend> = match self.device {
            Device::Cpu => {
                let shard = CpuShard::new(weights, plan, rank).map_err(|e| fail(e.to_string()))?;
                Box::new(CpuRank::new(shard, blocks, bs))
            }
            Device::Cuda(ordinal) => Box::new(
                CudaShard::new(weights, plan, rank, ordinal, blocks, bs)
                    .map_err(|e| fail(e.to_string()))?,
            ),
        };
        tracing::info!(rank, device = %backend.device(), "slice resident");
        self.backend = Some(backend);
        set_state(&self.status, "loaded", req.rank);
        tracing::info!(rank, bytes, kv_bytes, blocks, bs, "loaded");
        Ok(Loaded {
            weight_bytes: bytes,
            kv_bytes: kv_bytes as u64,
        })
    }

    fn connect(&mut self, req: pb::JoinPeersRequest) -> Result<(), EngineError> {
        let shard = self.backend.as_ref().ok_or(EngineError::NotLoaded)?;
        let (rank, world) = (shard.rank(), shard.plan().world);
        let peers: Vec<SocketAddr> = req
            .peer_addrs
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| EngineError::BadRequest(format!("bad peer address '{a}'")))
            })
            .collect::<Result<_, _>>()?;
        if peers.len() != world {
            return Err(EngineError::BadRequest(format!(
                "{} peer addresses for a world of {world}",
                peers.len()
            )));
        }
        if req.timeout_ms == 0 {
            return Err(EngineError::BadRequest("timeout_ms must be > 0".into()));
        }
        let nccl_on = match (req.collectives.as_str(), self.device) {
            ("" | "grpc", _) => None,
            ("nccl", Device::Cuda(n)) => Some(n),
            ("nccl", Device::Cpu) => {
                return Err(EngineError::BadRequest(
                    "NCCL collectives need GPU workers: start them with --device cuda:N, or \
                     use the gRPC collectives"
                        .into(),
                ))
            }
            (other, _) => {
                return Err(EngineError::BadRequest(format!(
                    "unknown collectives '{other}': use grpc or nccl"
                )))
            }
        };
        // A reconnect (after a peer restarted) replaces the old mesh on the same address.
        self.leave();
        let listener = match self.peer_listener.take() {
            Some(l) => l,
            None => std::net::TcpListener::bind(self.peer_addr)
                .map_err(|e| EngineError::Connect(format!("binding {}: {e}", self.peer_addr)))?,
        };
        let timeout = Duration::from_millis(u64::from(req.timeout_ms));
        let comm = GrpcComm::start(rank, peers, listener, &self.token, timeout, &self.runtime)
            .map_err(|e| EngineError::Connect(e.to_string()))?;
        if let Some(ordinal) = nccl_on {
            let nccl = NcclComm::start(&comm, ordinal, timeout)
                .map_err(|e| EngineError::Connect(format!("NCCL: {e}")))?;
            self.nccl = Some(nccl);
        }
        self.comm = Some(comm);
        set_state(&self.status, "ready", rank as u32);
        Ok(())
    }

    /// Drops the mesh. The KV pool stays allocated; what it holds is the coordinator's to
    /// trust or recompute (after a peer restarted, it recomputes).
    fn leave(&mut self) {
        self.nccl = None;
        if let Some(old) = self.comm.take() {
            old.shutdown();
        }
        if self.backend.is_some() {
            let rank = self.backend.as_ref().map_or(0, |s| s.rank() as u32);
            set_state(&self.status, "loaded", rank);
        }
    }

    fn step(&mut self, req: pb::StepRequest) -> Result<pb::StepReply, EngineError> {
        let shard = self.backend.as_mut().ok_or(EngineError::NotLoaded)?;
        let grpc = self.comm.as_ref().ok_or(EngineError::NotConnected)?;
        let comm: &dyn Communicator = match &self.nccl {
            Some(n) => n,
            None => grpc,
        };
        let rank = shard.rank();
        let vocab = shard.config().vocab_size;
        let mut seen = std::collections::HashSet::new();
        let mut batch = Vec::with_capacity(req.seqs.len());
        let mut specs = Vec::with_capacity(req.seqs.len());
        for s in &req.seqs {
            if !seen.insert(s.seq_id) {
                return Err(EngineError::BadRequest(format!(
                    "sequence {} twice in one step",
                    s.seq_id
                )));
            }
            let logits = logits_mode(s)?;
            specs.push(sample_spec(s, logits, vocab)?);
            batch.push(SeqStep {
                tokens: &s.tokens,
                start: s.start as usize,
                blocks: &s.blocks,
                logits,
            });
        }
        match shard.step(comm, &batch) {
            Ok(out) => {
                // Sampling happens where the logits are: a decode step then returns a token,
                // not a vocabulary of logits.
                let rows = out.logits.unwrap_or_default();
                let sampled = sample_last_rows(&rows, &specs, vocab).map_err(|(i, e)| {
                    EngineError::BadRequest(format!("sequence {}: {e}", req.seqs[i].seq_id))
                })?;
                let logits = rows
                    .into_iter()
                    .zip(sampled)
                    .zip(req.seqs.iter().zip(&batch))
                    .filter(|((r, _), _)| !r.is_empty())
                    .map(|((r, x), (s, step))| pb::SeqLogits {
                        seq_id: s.seq_id,
                        // A sampled LAST step needs no logits back; ALL (prompt scoring) does.
                        logits_f32: if x.is_some() && step.logits == LogitsMode::Last {
                            Default::default()
                        } else {
                            grok_shared::bytes::f32_le_bytes(r)
                        },
                        sampled: x.map(|x| pb::SampledToken {
                            token: x.token,
                            rng_state: x.rng_state,
                            logprob: x.logprob,
                            top_ids: x.top.iter().map(|t| t.0).collect(),
                            top_logprobs: x.top.iter().map(|t| t.1).collect(),
                        }),
                    })
                    .collect();
                Ok(pb::StepReply {
                    step_id: req.step_id,
                    logits,
                    expert_tokens: out.expert_tokens,
                    comm_seconds: out.comm_time.as_secs_f64(),
                })
            }
            // A peer (or this rank's GPU) failed part-way: the pool may hold half-written
            // blocks of this step's positions; the coordinator recomputes them, so nothing is
            // cleaned up here.
            Err(e @ (ModelError::Comm(_) | ModelError::Peer { .. } | ModelError::Device(_))) => {
                Err(EngineError::Step {
                    rank,
                    msg: e.to_string(),
                })
            }
            // Refused before anything ran (bad block ids, tokens, ...): the request's fault.
            Err(e) => Err(EngineError::BadRequest(e.to_string())),
        }
    }
}

/// What a sequence asked to be sampled with, checked before the step runs.
fn sample_spec(
    s: &pb::SeqInput,
    mode: LogitsMode,
    vocab: usize,
) -> Result<Option<SampleSpec>, EngineError> {
    let Some(p) = &s.sampling else {
        return Ok(None);
    };
    if mode == LogitsMode::None {
        return Err(EngineError::BadRequest(format!(
            "sequence {}: sampling needs logits (mode LAST or ALL)",
            s.seq_id
        )));
    }
    let params = SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        seed: 0,
    };
    let bad = |e: String| EngineError::BadRequest(format!("sequence {}: {e}", s.seq_id));
    params.validate().map_err(|e| bad(e.to_string()))?;
    if p.count_tokens.len() != p.count_times.len() || p.bias_tokens.len() != p.bias_values.len() {
        return Err(bad(
            "penalty counts or logit_bias: arrays of different lengths".into(),
        ));
    }
    let adjust = LogitAdjust {
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        counts: p
            .count_tokens
            .iter()
            .copied()
            .zip(p.count_times.iter().copied())
            .collect(),
        bias: p
            .bias_tokens
            .iter()
            .copied()
            .zip(p.bias_values.iter().copied())
            .collect(),
    };
    adjust.validate(vocab).map_err(|e| bad(e.to_string()))?;
    Ok(Some(SampleSpec {
        params,
        rng_state: p.rng_state,
        logprobs: p.logprobs.then_some(p.top_logprobs as usize),
        adjust,
    }))
}

/// A sequence's logits mode; an unset mode is refused rather than read as "none".
fn logits_mode(s: &pb::SeqInput) -> Result<LogitsMode, EngineError> {
    match pb::LogitsMode::try_from(s.logits) {
        Ok(pb::LogitsMode::None) => Ok(LogitsMode::None),
        Ok(pb::LogitsMode::Last) => Ok(LogitsMode::Last),
        Ok(pb::LogitsMode::All) => Ok(LogitsMode::All),
        Ok(pb::LogitsMode::Unspecified) | Err(_) => Err(EngineError::BadRequest(format!(
            "sequence {}: logits mode {} is not NONE, LAST or ALL",
            s.seq_id, s.logits
        ))),
    }
}

/// Bytes of memory the kernel says are available for new allocations (`MemAvailable`), where
/// it says (Linux).
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
