//! Communicator between processes over gRPC: every rank serves `grok.peer.v1.PeerExchange` and
//! opens one long-lived `Exchange` stream to each peer, so messages from one rank to another
//! travel on one HTTP/2 stream, in order.
//!
//! The [`Communicator`] methods block (they are called from compute threads) while the network
//! runs as tasks on a tokio runtime; the two sides meet only through channels, so no task ever
//! blocks and no lock is held across an `.await`.
//!
//! - `send` queues the tensor on an unbounded channel; the stream (`client`) cuts it into chunks
//!   of at most [`CHUNK_BYTES`] (f32 little-endian) as HTTP/2 flow control lets it, each chunk's
//!   payload a slice of the tensor itself.
//! - The server (`server`) reassembles each peer's chunks, copying each payload byte once, and
//!   queues whole messages per source rank, where `recv` waits for them with the
//!   communicator's deadline.
//! - The bytes on the wire are plain gRPC and protobuf, written and parsed in `wire` rather
//!   than by tonic's codec, which would copy every payload twice more; tonic still runs the
//!   HTTP/2 connections, and decodes the replies.
//! - A broken stream in either direction marks the peer failed: pending and later `recv`/`send`
//!   for it return [`CommError::PeerFailed`] at once (messages that arrived before still come
//!   first).
//! - Callers carry the cluster token as metadata ([`TOKEN_METADATA`]); the server compares it in
//!   constant time and answers `UNAUTHENTICATED` otherwise.
//! - [`GrpcComm::shutdown`] (also on drop) first flushes what was sent, waiting until each peer
//!   acknowledges the end of the stream, then stops serving.
//!
//! A failed peer stays failed for the life of the communicator (its stream cannot resume
//! mid-sequence); bringing a rank back means starting new communicators.

mod client;
mod server;
mod wire;

use super::{CommError, Communicator, Result};
use http::HeaderValue;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::Status;
use tracing::{debug, warn};

/// gRPC metadata entry carrying the cluster token on every `Exchange` call.
pub const TOKEN_METADATA: &str = "x-grok-cluster-token";

/// Most payload bytes in one `TensorChunk` (a whole number of f32 values).
pub const CHUNK_BYTES: usize = 1 << 20;

/// HTTP/2 flow-control windows (per stream and per connection; one stream per connection):
/// many chunks in flight keep a fast link busy, and a receiver that stops reading holds at
/// most this much per peer.
const WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame we accept: one frame per chunk instead of 64 of 16 KiB.
const MAX_FRAME: u32 = (CHUNK_BYTES as u32) + 1024;
/// HTTP/2 pings find a peer whose machine vanished without closing its sockets.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts to reach a peer that is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);
/// Ends the failure reason of a peer that closed its streams in order.
const CLEAN_CLOSE: &str = "(it shut down)";

/// Where a rank listens for its peers: an address to bind, or a listener already bound (so a
/// caller can bind port 0 and tell the peers the port before starting).
pub enum Listen {
    Addr(SocketAddr),
    Std(std::net::TcpListener),
    Tokio(tokio::net::TcpListener),
}

impl From<SocketAddr> for Listen {
    fn from(a: SocketAddr) -> Self {
        Listen::Addr(a)
    }
}

impl From<std::net::TcpListener> for Listen {
    fn from(l: std::net::TcpListener) -> Self {
        Listen::Std(l)
    }
}

impl From<tokio::net::TcpListener> for Listen {
    fn from(l: tokio::net::TcpListener) -> Self {
        Listen::Tokio(l)
    }
}

/// One whole message from a peer, or why the peer is gone (queued behind what it sent).
type Inbound = std::result::Result<Vec<f32>, String>;

/// What the outbound stream task takes from `send`.
enum Out {
    Data(Vec<f32>),
    /// End the stream after everything queued before it.
    Close,
}

/// Progress reported to `start` while it waits for the mesh.
enum StartEvent {
    OutboundUp(usize),
    InboundUp(usize),
    Failed(CommError),
}

/// State shared by the communicator and its tasks.
struct Shared {
    rank: usize,
    world: usize,
    token: Vec<u8>,
    timeout: Duration,
    /// Why each peer is gone; set once.
    failed: Vec<OnceLock<String>>,
    /// Sender side of each peer's inbound queue, taken by the server when that peer's stream is
    /// accepted, so a second stream claiming the same rank is refused.
    inbound_slots: Vec<Mutex<Option<std_mpsc::Sender<Inbound>>>>,
    /// Set by `shutdown`: failures seen from then on are our own doing, not the peers'.
    closing: AtomicBool,
    /// Reports to `start`; `None` once it returned.
    startup: Mutex<Option<std_mpsc::Sender<StartEvent>>>,
}

impl Shared {
    fn event(&self, e: StartEvent) {
        if let Ok(guard) = self.startup.lock() {
            if let Some(tx) = guard.as_ref() {
                let _ = tx.send(e);
            }
        }
    }

    /// Marks `peer` failed (first reason wins) and wakes a `recv` waiting on it.
    fn fail(&self, peer: usize, reason: String, inbound: &std_mpsc::Sender<Inbound>) {
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        if self.failed[peer].set(reason.clone()).is_ok() {
            // A peer that closed its stream in order is leaving, not failing: worth a note,
            // not a warning (clusters shut down rank by rank).
            if reason.ends_with(CLEAN_CLOSE) {
                tracing::info!(rank = self.rank, peer, %reason, "peer left");
            } else {
                warn!(rank = self.rank, peer, %reason, "peer failed");
            }
            let _ = inbound.send(Err(reason.clone()));
            self.event(StartEvent::Failed(CommError::PeerFailed {
                rank: self.rank,
                peer,
                reason,
            }));
        }
    }
}

/// [`Communicator`] over gRPC streams between processes (or threads) on TCP.
pub struct GrpcComm {
    shared: Arc<Shared>,
    /// `outbound[p]` feeds the stream to rank p (`None` for this rank).
    outbound: Vec<Option<mpsc::UnboundedSender<Out>>>,
    /// `inbound[p]`: whole messages from rank p.
    inbound: Vec<Mutex<std_mpsc::Receiver<Inbound>>>,
    /// Messages to this rank itself skip the network.
    to_self: std_mpsc::Sender<Inbound>,
    local_addr: SocketAddr,
    /// Second step of `shutdown`, after the flush: ends the server, the inbound readers and any
    /// outbound task left.
    stop: watch::Sender<bool>,
    /// Disconnects when every outbound task has ended (their clones are dropped).
    outbound_done: Mutex<std_mpsc::Receiver<()>>,
    /// Disconnects when every task (server, connections, readers, outbound) has ended.
    all_done: Mutex<std_mpsc::Receiver<()>>,
}

impl GrpcComm {
    /// Starts rank `rank` of a world of `peers.len()` ranks: serves on `listen`, connects to
    /// every other `peers[p]` (this rank's own entry is not used) and returns once a stream to
    /// and from every peer is up, or fails after `timeout` naming a peer that did not connect.
    /// `timeout` is also the deadline of every `recv` and of the flush in `shutdown`.
    ///
    /// The network runs as tasks on `runtime`; call this (and the [`Communicator`] methods)
    /// from ordinary threads, not from inside that runtime's tasks, since they block.
    pub fn start(
        rank: usize,
        peers: Vec<SocketAddr>,
        listen: impl Into<Listen>,
        token: &str,
        timeout: Duration,
        runtime: &Handle,
    ) -> Result<GrpcComm> {
        let world = peers.len();
        let setup = |msg: String| CommError::Protocol { rank, msg };
        if rank >= world {
            return Err(setup(format!("rank {rank} is outside a world of {world}")));
        }
        if world > u32::MAX as usize {
            return Err(setup(format!("a world of {world} ranks is too large")));
        }
        if token.is_empty() {
            return Err(setup("the cluster token is empty".into()));
        }
        let token_value = HeaderValue::from_str(token)
            .map_err(|_| setup("the cluster token must be printable ASCII".into()))?;

        let listener = {
            // Converting a std listener registers it with the runtime's reactor.
            let _entered = runtime.enter();
            let bound = match listen.into() {
                Listen::Tokio(l) => Ok(l),
                Listen::Addr(a) => std::net::TcpListener::bind(a).and_then(tokio_listener),
                Listen::Std(l) => tokio_listener(l),
            };
            bound.map_err(|e| setup(format!("cannot listen: {e}")))?
        };
        let local_addr = listener
            .local_addr()
            .map_err(|e| setup(format!("cannot read the listen address: {e}")))?;

        let (events_tx, events_rx) = std_mpsc::channel();
        let mut inbound = Vec::with_capacity(world);
        let mut inbound_slots = Vec::with_capacity(world);
        let mut inbound_txs = Vec::with_capacity(world);
        for p in 0..world {
            let (tx, rx) = std_mpsc::channel();
            inbound.push(Mutex::new(rx));
            inbound_txs.push(tx.clone());
            // No stream may claim to come from this rank itself.
            inbound_slots.push(Mutex::new((p != rank).then_some(tx)));
        }
        let to_self = inbound_txs[rank].clone();
        let shared = Arc::new(Shared {
            rank,
            world,
            token: token.as_bytes().to_vec(),
            timeout,
            failed: (0..world).map(|_| OnceLock::new()).collect(),
            inbound_slots,
            closing: AtomicBool::new(false),
            startup: Mutex::new(Some(events_tx)),
        });
        let (stop, stop_rx) = watch::channel(false);
        let (outbound_done_tx, outbound_done) = std_mpsc::channel::<()>();
        let (all_done_tx, all_done) = std_mpsc::channel::<()>();

        let service = server::ExchangeService {
            shared: shared.clone(),
            stop: stop_rx.clone(),
            done: all_done_tx.clone(),
        };
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut server_stop = stop_rx.clone();
        let server_done = all_done_tx.clone();
        runtime.spawn(async move {
            let _done = server_done;
            let served = Server::builder()
                .initial_stream_window_size(WINDOW)
                .initial_connection_window_size(WINDOW)
                .max_frame_size(MAX_FRAME)
                .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
                .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                .serve_with_incoming_shutdown(service, incoming, async move {
                    let _ = server_stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                warn!(rank, "peer server stopped: {e}");
            }
        });

        let deadline = Instant::now() + timeout;
        let mut outbound = Vec::with_capacity(world);
        for (peer, &addr) in peers.iter().enumerate() {
            if peer == rank {
                outbound.push(None);
                continue;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            outbound.push(Some(tx));
            let task = client::OutboundTask {
                shared: shared.clone(),
                peer,
                addr,
                token: token_value.clone(),
                deadline: tokio::time::Instant::from_std(deadline),
                inbound: inbound_txs[peer].clone(),
                stop: stop_rx.clone(),
                _done: (outbound_done_tx.clone(), all_done_tx.clone()),
            };
            runtime.spawn(task.run(rx));
        }
        drop((outbound_done_tx, all_done_tx, inbound_txs));

        let comm = GrpcComm {
            shared: shared.clone(),
            outbound,
            to_self,
            inbound,
            local_addr,
            stop,
            outbound_done: Mutex::new(outbound_done),
            all_done: Mutex::new(all_done),
        };

        // Wait for the whole mesh around this rank (dropping `comm` on error shuts it down).
        let mut out_up = vec![false; world];
        let mut in_up = vec![false; world];
        out_up[rank] = true;
        in_up[rank] = true;
        while let Some(missing) = (0..world).find(|&p| !out_up[p] || !in_up[p]) {
            let left = deadline.saturating_duration_since(Instant::now());
            match events_rx.recv_timeout(left) {
                Ok(StartEvent::OutboundUp(p)) => out_up[p] = true,
                Ok(StartEvent::InboundUp(p)) => in_up[p] = true,
                Ok(StartEvent::Failed(e)) => return Err(e),
                Err(_) => {
                    return Err(CommError::Timeout {
                        rank,
                        peer: missing,
                        timeout,
                    })
                }
            }
        }
        if let Ok(mut s) = shared.startup.lock() {
            *s = None;
        }
        debug!(rank, world, %local_addr, "peer mesh up");
        Ok(comm)
    }

    /// The address this rank serves on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Flushes what was sent (each peer acknowledges the end of its stream, or the deadline
    /// passes), then stops serving and closes every stream. Later calls fail; idempotent.
    pub fn shutdown(&self) {
        if self.shared.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        for tx in self.outbound.iter().flatten() {
            let _ = tx.send(Out::Close);
        }
        let deadline = Instant::now() + self.shared.timeout;
        wait_disconnected(&self.outbound_done, deadline);
        let _ = self.stop.send(true);
        // Inbound streams end at once; the wait is for the server to release the port.
        wait_disconnected(
            &self.all_done,
            deadline.max(Instant::now() + Duration::from_secs(1)),
        );
        debug!(rank = self.shared.rank, "communicator shut down");
    }

    fn check(&self, peer: usize) -> Result<()> {
        if peer >= self.shared.world {
            return Err(CommError::Protocol {
                rank: self.shared.rank,
                msg: format!("no rank {peer} in a world of {}", self.shared.world),
            });
        }
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(CommError::Protocol {
                rank: self.shared.rank,
                msg: "the communicator is shut down".into(),
            });
        }
        Ok(())
    }

    fn peer_failed(&self, peer: usize, reason: &str) -> CommError {
        CommError::PeerFailed {
            rank: self.shared.rank,
            peer,
            reason: reason.to_string(),
        }
    }
}

impl Drop for GrpcComm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Communicator for GrpcComm {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn send(&self, peer: usize, data: Vec<f32>) -> Result<()> {
        self.check(peer)?;
        let Some(tx) = &self.outbound[peer] else {
            return self
                .to_self
                .send(Ok(data))
                .map_err(|_| self.peer_failed(peer, "its own queue is closed"));
        };
        if let Some(reason) = self.shared.failed[peer].get() {
            return Err(self.peer_failed(peer, reason));
        }
        tx.send(Out::Data(data))
            .map_err(|_| self.peer_failed(peer, "the stream to it is closed"))
    }

    fn recv(&self, peer: usize) -> Result<Vec<f32>> {
        self.check(peer)?;
        let rx = self.inbound[peer].lock().map_err(|_| CommError::Protocol {
            rank: self.shared.rank,
            msg: "receiver lock poisoned".into(),
        })?;
        // What arrived before a failure is still delivered; the failure is queued behind it.
        match rx.try_recv() {
            Ok(Ok(m)) => return Ok(m),
            Ok(Err(reason)) => return Err(self.peer_failed(peer, &reason)),
            Err(std_mpsc::TryRecvError::Disconnected) => {
                return Err(self.peer_failed(peer, "its inbound queue is closed"))
            }
            Err(std_mpsc::TryRecvError::Empty) => {}
        }
        if let Some(reason) = self.shared.failed[peer].get() {
            return Err(self.peer_failed(peer, reason));
        }
        match rx.recv_timeout(self.shared.timeout) {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(reason)) => Err(self.peer_failed(peer, &reason)),
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(CommError::Timeout {
                rank: self.shared.rank,
                peer,
                timeout: self.shared.timeout,
            }),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                Err(self.peer_failed(peer, "its inbound queue is closed"))
            }
        }
    }
}

fn tokio_listener(l: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// Waits until every sender of `rx` is dropped, or `deadline`.
fn wait_disconnected(rx: &Mutex<std_mpsc::Receiver<()>>, deadline: Instant) {
    let Ok(rx) = rx.lock() else { return };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(()) => continue,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                warn!("communicator tasks still running at the shutdown deadline");
                return;
            }
        }
    }
}

/// Time depends on the lengths only, not on where the first difference is.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, &e) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ e);
    }
    std::hint::black_box(diff) == 0
}

fn describe(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grok_proto::peer::v1::peer_exchange_client::PeerExchangeClient;
    use grok_proto::peer::v1::peer_exchange_server::{PeerExchange, PeerExchangeServer};
    use grok_proto::peer::v1::{
        peer_frame, peer_reply, Hello, PeerFrame, PeerReply, TensorChunk, Welcome,
    };
    use std::net::TcpListener;
    use tokio_stream::StreamExt;

    const TOKEN: &str = "test-cluster-token";

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    }

    fn bind(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
        let listeners: Vec<_> = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let addrs = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr"))
            .collect();
        (listeners, addrs)
    }

    /// Starts `world` ranks, each in its own thread (start blocks until the mesh is up).
    fn start_each(
        world: usize,
        tokens: &[&str],
        timeout: Duration,
        rts: &[&Handle],
    ) -> Vec<Result<GrpcComm>> {
        let (listeners, addrs) = bind(world);
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = addrs.clone();
                    let token = tokens[rank % tokens.len()];
                    let rt = rts[rank % rts.len()];
                    s.spawn(move || GrpcComm::start(rank, addrs, l, token, timeout, rt))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect()
        })
    }

    fn mesh(world: usize, timeout: Duration, rt: &Handle) -> Vec<GrpcComm> {
        start_each(world, &[TOKEN], timeout, &[rt])
            .into_iter()
            .map(|c| c.expect("start"))
            .collect()
    }

    fn run<T: Send>(comms: &[GrpcComm], f: impl Fn(&GrpcComm) -> T + Sync) -> Vec<T> {
        crate::comm::on_each_rank(comms, f)
    }

    #[test]
    fn collectives_agree_with_their_definitions() {
        let rt = runtime();
        let world = 4;
        // Short, since the test ends by waiting one out.
        let comms = mesh(world, Duration::from_secs(3), rt.handle());
        let out = run(&comms, |c| {
            crate::comm::check_collectives(c, world);
            let r = c.rank() as f32;
            // A subgroup, while the others stay out of it.
            let sub = if c.rank() % 2 == 0 {
                Some(c.all_gather_v(&[0, 2], &[r]).unwrap())
            } else {
                None
            };
            c.send(c.rank(), vec![r]).unwrap();
            let to_self = c.recv(c.rank()).unwrap();
            (sub, to_self)
        });
        for (rank, (sub, to_self)) in out.into_iter().enumerate() {
            if rank % 2 == 0 {
                assert_eq!(sub, Some(vec![vec![0.0], vec![2.0]]));
            }
            assert_eq!(to_self, vec![rank as f32]);
        }
        let err = comms[0].recv(1).unwrap_err();
        assert!(
            matches!(
                err,
                CommError::Timeout {
                    rank: 0,
                    peer: 1,
                    ..
                }
            ),
            "{err}"
        );
        let err = comms[0].all_reduce(&[1, 2], &mut [0.0]).unwrap_err();
        assert!(matches!(err, CommError::Protocol { .. }), "{err}");
        assert!(comms[0].send(4, vec![]).is_err(), "no rank 4");
    }

    #[test]
    fn a_20_mb_message_round_trips_in_chunks() {
        let rt = runtime();
        let comms = mesh(2, Duration::from_secs(30), rt.handle());
        let big: Vec<f32> = (0..5_000_000).map(|i| i as f32 * 0.5 - 7.0).collect();
        // Sizes around the chunk boundary and an empty message keep their exact lengths.
        let chunk = CHUNK_BYTES / 4;
        let edges = [0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk];
        let out = run(&comms, |c| {
            if c.rank() == 0 {
                c.send(1, big.clone()).unwrap();
                for &n in &edges {
                    c.send(1, vec![n as f32; n]).unwrap();
                }
                c.recv(1).unwrap()
            } else {
                let got = c.recv(0).unwrap();
                for &n in &edges {
                    assert_eq!(c.recv(0).unwrap(), vec![n as f32; n]);
                }
                c.send(0, got.clone()).unwrap();
                got
            }
        });
        assert!(out[1] == big, "rank 1 got the message intact");
        assert!(out[0] == big, "rank 0 got it back intact");
    }

    #[test]
    fn a_wrong_token_is_refused_with_a_clear_error() {
        let rt = runtime();
        let (listeners, addrs) = bind(2);
        // The honest rank dials a listener nobody serves instead of the impostor: were it to
        // reach the impostor it would be refused too, give up at once and shut down, and the
        // impostor could then find no server to refuse it, which is not what is tested here.
        let (silent, silent_addr) = bind(1);
        let mut listeners = listeners.into_iter();
        let (l0, l1) = (listeners.next().unwrap(), listeners.next().unwrap());
        let honest_view = vec![addrs[0], silent_addr[0]];
        let timeout = Duration::from_secs(3);
        let (good, bad) = std::thread::scope(|s| {
            let good = s.spawn(|| GrpcComm::start(0, honest_view, l0, TOKEN, timeout, rt.handle()));
            let bad = s.spawn(|| {
                GrpcComm::start(1, addrs.clone(), l1, "not-the-token", timeout, rt.handle())
            });
            (good.join().unwrap(), bad.join().unwrap())
        });
        drop(silent);
        let err = bad.err().expect("the impostor is refused");
        assert!(
            matches!(&err, CommError::PeerFailed { rank: 1, peer: 0, reason } if reason.contains("cluster token")),
            "{err}"
        );
        // The honest rank never saw a stream from rank 1 and says so.
        let err = good.err().expect("no stream from the impostor");
        assert!(
            matches!(
                err,
                CommError::Timeout {
                    rank: 0,
                    peer: 1,
                    ..
                } | CommError::PeerFailed { peer: 1, .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_rank_that_shuts_down_fails_its_peers_promptly_after_its_last_messages() {
        let rt = runtime();
        let comms = mesh(4, Duration::from_secs(30), rt.handle());
        // Rank 3 sends and shuts down at once: what it sent still arrives (the flush), then
        // its peers learn it is gone instead of waiting out the 30 s deadline.
        for p in 0..3 {
            comms[3].send(p, vec![3.0; 100_000]).unwrap();
        }
        comms[3].shutdown();
        let out = run(&comms[..3], |c| {
            let first = c.recv(3);
            let t = Instant::now();
            let second = c.recv(3);
            (first, second, t.elapsed(), c.send(3, vec![1.0]))
        });
        for (rank, (first, second, waited, send)) in out.into_iter().enumerate() {
            assert_eq!(first.unwrap(), vec![3.0; 100_000], "rank {rank}");
            let err = second.unwrap_err();
            assert!(
                matches!(err, CommError::PeerFailed { peer: 3, .. }),
                "{err}"
            );
            assert!(
                waited < Duration::from_secs(2),
                "rank {rank} waited {waited:?}"
            );
            assert!(
                matches!(send, Err(CommError::PeerFailed { peer: 3, .. })),
                "{send:?}"
            );
        }
        // The survivors still talk to each other.
        let out = run(&comms[..3], |c| {
            c.all_gather_v(&[0, 1, 2], &[c.rank() as f32]).unwrap()
        });
        assert!(out
            .iter()
            .all(|g| g == &vec![vec![0.0], vec![1.0], vec![2.0]]));
        assert!(
            comms[3].recv(0).is_err(),
            "a shut-down communicator refuses work"
        );
    }

    #[test]
    fn a_crashed_rank_fails_its_peers_promptly() {
        let rt = runtime();
        let doomed = runtime();
        let mut comms = start_each(
            3,
            &[TOKEN],
            Duration::from_secs(30),
            &[rt.handle(), rt.handle(), doomed.handle()],
        )
        .into_iter()
        .map(|c| c.expect("start"))
        .collect::<Vec<_>>();
        // Killing rank 2's runtime drops its sockets without any goodbye, as a crash would.
        doomed.shutdown_background();
        let out = run(&comms[..2], |c| {
            let t = Instant::now();
            (c.recv(2), t.elapsed())
        });
        for (result, waited) in out {
            let err = result.unwrap_err();
            assert!(
                matches!(err, CommError::PeerFailed { peer: 2, .. }),
                "{err}"
            );
            assert!(waited < Duration::from_secs(2), "waited {waited:?}");
        }
        drop(comms.pop()); // its tasks are gone; dropping must not hang
    }

    #[test]
    fn token_comparison() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abd", b"abc"));
        assert!(!same_token(b"ab", b"abc"));
        assert!(!same_token(b"abcd", b"abc"));
        assert!(!same_token(b"", b"abc"));
    }

    /// Rank 1 of a world of 2 written with tonic's generated code and prost: its server
    /// welcomes rank 0 and passes on the chunks prost decoded from rank 0's stream.
    struct TonicPeer {
        chunks: std_mpsc::Sender<TensorChunk>,
    }

    type TonicReplies = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = std::result::Result<PeerReply, Status>> + Send>,
    >;

    #[tonic::async_trait]
    impl PeerExchange for TonicPeer {
        type ExchangeStream = TonicReplies;

        async fn exchange(
            &self,
            request: tonic::Request<tonic::Streaming<PeerFrame>>,
        ) -> std::result::Result<tonic::Response<TonicReplies>, Status> {
            let mut frames = request.into_inner();
            match frames.message().await? {
                Some(PeerFrame {
                    body: Some(peer_frame::Body::Hello(h)),
                }) if h.src_rank == 0 && h.dst_rank == 1 && h.world == 2 => {}
                other => return Err(Status::invalid_argument(format!("{other:?}"))),
            }
            let chunks = self.chunks.clone();
            tokio::spawn(async move {
                while let Ok(Some(frame)) = frames.message().await {
                    if let Some(peer_frame::Body::Chunk(c)) = frame.body {
                        let _ = chunks.send(c);
                    }
                }
            });
            let welcome = PeerReply {
                body: Some(peer_reply::Body::Welcome(Welcome { rank: 1, world: 2 })),
            };
            // The reply stream stays open, as ours does.
            let replies = tokio_stream::once(Ok(welcome)).chain(tokio_stream::pending());
            Ok(tonic::Response::new(Box::pin(replies)))
        }
    }

    fn tensor_chunk(seq: u64, chunk_index: u32, last: bool, total: u64, v: &[f32]) -> PeerFrame {
        PeerFrame {
            body: Some(peer_frame::Body::Chunk(TensorChunk {
                seq,
                chunk_index,
                last,
                total_bytes: total,
                payload: v
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
            })),
        }
    }

    #[test]
    fn tonic_generated_peers_read_our_streams_and_we_read_theirs() {
        let rt = runtime();
        let (listeners, addrs) = bind(2);
        let mut listeners = listeners.into_iter();
        let (l0, l1) = (listeners.next().unwrap(), listeners.next().unwrap());
        let (chunks_tx, chunks_rx) = std_mpsc::channel();
        {
            let _entered = rt.enter();
            let incoming = TcpIncoming::from(tokio_listener(l1).unwrap());
            let peer = PeerExchangeServer::new(TonicPeer { chunks: chunks_tx });
            rt.spawn(Server::builder().serve_with_incoming(peer, incoming));
        }
        let a0 = addrs[0];
        let (comm, (frames, mut replies)) = std::thread::scope(|s| {
            let rank0 = s.spawn(|| {
                GrpcComm::start(
                    0,
                    addrs.clone(),
                    l0,
                    TOKEN,
                    Duration::from_secs(10),
                    rt.handle(),
                )
            });
            let client = rt.block_on(async {
                let mut client = PeerExchangeClient::connect(format!("http://{a0}"))
                    .await
                    .unwrap();
                let (tx, rx) = mpsc::channel(16);
                let hello = Hello {
                    src_rank: 1,
                    dst_rank: 0,
                    world: 2,
                };
                tx.send(PeerFrame {
                    body: Some(peer_frame::Body::Hello(hello)),
                })
                .await
                .unwrap();
                let mut request =
                    tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                request
                    .metadata_mut()
                    .insert(TOKEN_METADATA, TOKEN.parse().unwrap());
                let replies = client.exchange(request).await.unwrap().into_inner();
                (tx, replies)
            });
            (rank0.join().unwrap().expect("rank 0 starts"), client)
        });

        // Theirs to ours: a message in two small chunks, then one big enough to be streamed.
        let big: Vec<f32> = (0..100_000).map(|i| i as f32 * 0.25).collect();
        for f in [
            tensor_chunk(0, 0, false, 12, &[1.0, 2.0]),
            tensor_chunk(0, 1, true, 0, &[3.0]),
            tensor_chunk(1, 0, true, 400_000, &big),
        ] {
            rt.block_on(frames.send(f)).unwrap();
        }
        assert_eq!(comm.recv(1).unwrap(), vec![1.0, 2.0, 3.0]);
        assert!(comm.recv(1).unwrap() == big);

        // Ours to theirs: a message of two chunks, as prost decodes it.
        let sent: Vec<f32> = (0..300_000).map(|i| i as f32 - 5.0).collect();
        comm.send(1, sent.clone()).unwrap();
        let mut got = Vec::new();
        for index in 0..2 {
            let c = chunks_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!((c.seq, c.chunk_index, c.last), (0, index, index == 1));
            assert_eq!(c.total_bytes, if index == 0 { 1_200_000 } else { 0 });
            crate::bytes::extend_f32_le(&mut got, &c.payload);
        }
        assert!(got == sent);

        // A message out of order: rank 0 drops the stream and says why, on both ends.
        rt.block_on(frames.send(tensor_chunk(5, 0, true, 4, &[1.0])))
            .unwrap();
        let err = comm.recv(1).unwrap_err();
        assert!(
            matches!(&err, CommError::PeerFailed { peer: 1, reason, .. }
                if reason.contains("broke the protocol") && reason.contains("expecting message 2")),
            "{err}"
        );
        let status = rt.block_on(async {
            assert!(
                matches!(replies.message().await, Ok(Some(_))),
                "the welcome"
            );
            replies.message().await.unwrap_err()
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
}
