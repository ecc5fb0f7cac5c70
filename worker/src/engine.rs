//! The engine: one thread that owns this rank's model slice, its collectives and its KV
//! caches, and runs the coordinator's commands one at a time (an actor). The gRPC handlers
//! only pass messages to it, so no lock is ever held across a wait.

use grok_proto::worker::v1 as pb;
use grok_shared::checkpoint::open_model;
use grok_shared::comm::grpc::GrpcComm;
use grok_shared::cpu::CpuShard;
use grok_shared::model::{KvCache, LogitsMode, ModelWeights, SeqStep, Slices};
use grok_shared::parallel::Plan;
use std::collections::HashMap;
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

pub enum Command {
    Load {
        req: pb::LoadRequest,
        progress: mpsc::Sender<pb::LoadProgress>,
        reply: Reply<u64>,
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
    shard: Option<CpuShard>,
    comm: Option<GrpcComm>,
    caches: HashMap<u64, KvCache>,
}

/// Starts the engine thread; commands go in through the returned sender.
pub fn spawn(
    runtime: tokio::runtime::Handle,
    token: String,
    peer_listener: std::net::TcpListener,
    status: Arc<Mutex<Status>>,
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
        shard: None,
        comm: None,
        caches: HashMap::new(),
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
                let r = self.step(req);
                let _ = reply.send(r);
            }
        }
    }

    fn load(
        &mut self,
        req: pb::LoadRequest,
        progress: &mpsc::Sender<pb::LoadProgress>,
    ) -> Result<u64, EngineError> {
        let path = req.model_path.clone();
        let fail = |msg: String| EngineError::Load {
            path: path.clone(),
            msg,
        };
        let p = req
            .plan
            .ok_or_else(|| EngineError::BadRequest("LoadRequest has no plan".into()))?;
        let rank = req.rank as usize;
        set_state(&self.status, "loading", req.rank);
        self.shard = None;
        self.caches.clear();
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
        let mut report = |done: usize| {
            let _ = progress.blocking_send(pb::LoadProgress {
                layers_done: done as u32,
                layers_total: total,
                done: false,
                weight_bytes: 0,
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
        let shard = CpuShard::new(weights, plan, rank).map_err(|e| fail(e.to_string()))?;
        self.shard = Some(shard);
        set_state(&self.status, "loaded", req.rank);
        tracing::info!(rank, bytes, "loaded");
        Ok(bytes)
    }

    fn connect(&mut self, req: pb::JoinPeersRequest) -> Result<(), EngineError> {
        let shard = self.shard.as_ref().ok_or(EngineError::NotLoaded)?;
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
        self.comm = Some(comm);
        set_state(&self.status, "ready", rank as u32);
        Ok(())
    }

    /// Drops the mesh and every KV cache (sequences cannot continue without their peers).
    fn leave(&mut self) {
        if let Some(old) = self.comm.take() {
            old.shutdown();
        }
        self.caches.clear();
        if self.shard.is_some() {
            let rank = self.shard.as_ref().map_or(0, |s| s.rank() as u32);
            set_state(&self.status, "loaded", rank);
        }
    }

    fn step(&mut self, req: pb::StepRequest) -> Result<pb::StepReply, EngineError> {
        let shard = self.shard.as_ref().ok_or(EngineError::NotLoaded)?;
        let comm = self.comm.as_ref().ok_or(EngineError::NotConnected)?;
        let rank = shard.rank();
        for id in &req.free {
            self.caches.remove(id);
        }
        let mut seen = std::collections::HashSet::new();
        for s in &req.seqs {
            if !seen.insert(s.seq_id) {
                return Err(EngineError::BadRequest(format!(
                    "sequence {} twice in one step",
                    s.seq_id
                )));
            }
            self.caches
                .entry(s.seq_id)
                .or_insert_with(|| shard.new_cache());
        }
        // Take the caches out so each batch entry can borrow its own mutably.
        let mut taken: Vec<(u64, KvCache)> = req
            .seqs
            .iter()
            .filter_map(|s| self.caches.remove(&s.seq_id).map(|c| (s.seq_id, c)))
            .collect();
        let mode = if req.all_logits {
            LogitsMode::All
        } else {
            LogitsMode::Last
        };
        let result = {
            let mut batch: Vec<SeqStep> = req
                .seqs
                .iter()
                .zip(taken.iter_mut())
                .map(|(s, (_, cache))| SeqStep {
                    tokens: &s.tokens,
                    cache,
                })
                .collect();
            shard.forward(comm, &mut batch, mode)
        };
        match result {
            Ok(out) => {
                for (id, cache) in taken {
                    self.caches.insert(id, cache);
                }
                let logits = out
                    .map(|rows| {
                        req.seqs
                            .iter()
                            .zip(rows)
                            .map(|(s, l)| pb::SeqLogits {
                                seq_id: s.seq_id,
                                logits: l,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(pb::StepReply {
                    step_id: req.step_id,
                    logits,
                })
            }
            // The step's caches may be half-updated: they are dropped, the requests fail.
            Err(e) => Err(EngineError::Step {
                rank,
                msg: e.to_string(),
            }),
        }
    }
}
