//! All-to-all between 4 ranks (threads of this process, on loopback) over `GrpcComm`, against
//! plain TCP moving the same bytes between the same 4 ranks in the same run.
//!
//! `cargo bench -p grok-shared --bench collectives [-- MAX_MB]` prints, per message size (bytes
//! each rank sends to each peer), the time of one all-to-all round and each rank's send rate
//! (3 × size / round time), and gRPC as a fraction of the faster of two plain TCP meshes:
//! - `tcp thr`: one socket per ordered pair (TCP_NODELAY), a length prefix, a writer thread per
//!   outgoing socket, the rank's thread reading its peers in turn with blocking reads;
//! - `tcp rt`: the same sockets driven by a writer and a reader task each on the tokio runtime
//!   `GrpcComm` uses, meeting the rank's thread through channels (what `GrpcComm` does, less
//!   HTTP/2 and gRPC).
//!
//! Both take ownership of what they send and hand the caller a new buffer per message, as a
//! communicator must (the bytes go out as they are: no conversion, no copy before the
//! kernel's; they come in straight into that buffer). Each round sends on what the previous
//! one received, so buffers are allocated and freed as in a real exchange.

/// The binaries' allocator (see the workspace Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use grok_shared::comm::grpc::GrpcComm;
use grok_shared::comm::Communicator;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

const WORLD: usize = 4;

fn main() {
    let max_mb: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(64);
    let mut sizes = vec![1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10];
    sizes.extend(
        (0..)
            .map(|i| (1 << 20) << (2 * i))
            .take_while(|&s| s <= max_mb << 20),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let grpc = grpc_mesh(rt.handle());
    let tcp = thread_mesh();
    let tcp_async = task_mesh(rt.handle());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("all-to-all, {WORLD} ranks on loopback, {cores} cores; GB/s = bytes each rank sends / round time");
    println!(
        "{:>9} {:>7} | {:>10} {:>7} | {:>10} {:>10} {:>7} | {:>6}",
        "size", "rounds", "grpc µs", "GB/s", "tcp thr µs", "tcp rt µs", "GB/s", "ratio"
    );
    for &size in &sizes {
        let rounds = (256usize << 20).div_ceil(size * (WORLD - 1)).clamp(5, 2000);
        let g = time_rounds(&grpc, vec![1.0f32; size / 4], rounds, |c, bufs| {
            let group: Vec<usize> = (0..WORLD).collect();
            c.all_to_all_v(&group, bufs).expect("grpc all_to_all")
        });
        let t = time_rounds(&tcp, vec![1u8; size], rounds, |c, bufs| c.exchange(bufs));
        let ta = time_rounds(&tcp_async, vec![1u8; size], rounds, |c, bufs| {
            c.exchange(bufs)
        });
        // Against whichever plain TCP was faster at this size.
        let best = t.min(ta);
        let gbps = |secs: f64| (size * (WORLD - 1)) as f64 / secs / 1e9;
        println!(
            "{:>9} {:>7} | {:>10.1} {:>7.3} | {:>10.1} {:>10.1} {:>7.3} | {:>5.0}%",
            human(size),
            rounds,
            g * 1e6,
            gbps(g),
            t * 1e6,
            ta * 1e6,
            gbps(best),
            100.0 * best / g
        );
    }
    for c in &grpc {
        c.shutdown();
    }
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MB", bytes >> 20)
    } else {
        format!("{} KB", bytes >> 10)
    }
}

/// Seconds per round (the slowest rank), after two warm-up rounds. Each round sends on what
/// the previous one received, so no time goes to copying the inputs.
fn time_rounds<C: Sync, T: Clone + Send + Sync>(
    comms: &[C],
    first: Vec<T>,
    rounds: usize,
    round: impl Fn(&C, Vec<Vec<T>>) -> Vec<Vec<T>> + Sync,
) -> f64 {
    let barrier = Barrier::new(comms.len());
    let times: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| {
                let (barrier, round, first) = (&barrier, &round, &first);
                s.spawn(move || {
                    let mut bufs = vec![first.clone(); WORLD];
                    for _ in 0..2 {
                        bufs = round(c, bufs);
                    }
                    barrier.wait();
                    let t = Instant::now();
                    for _ in 0..rounds {
                        bufs = round(c, bufs);
                    }
                    t.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    times.into_iter().max().unwrap_or_default().as_secs_f64() / rounds as f64
}

fn grpc_mesh(rt: &tokio::runtime::Handle) -> Vec<GrpcComm> {
    let listeners: Vec<_> = (0..WORLD)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let addrs = addrs.clone();
                s.spawn(move || {
                    GrpcComm::start(rank, addrs, l, "bench-token", Duration::from_secs(60), rt)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread").expect("grpc start"))
            .collect()
    })
}

/// One rank of a plain TCP mesh: per peer, what feeds the writer of the socket to it and
/// what reads the socket from it.
struct TcpRank<S, R> {
    to: Vec<Option<S>>,
    from: Vec<Option<R>>,
}

impl<S, R> TcpRank<S, R> {
    /// Hands each buffer to its peer's writer (which writes it as it is, then frees it) and
    /// takes what each peer sent as a new buffer owned by the caller: what a communicator
    /// must do, so both sides allocate and free alike.
    fn all_to_all(
        &self,
        bufs: Vec<Vec<u8>>,
        send: impl Fn(&S, Vec<u8>),
        recv: impl Fn(&R) -> Vec<u8>,
    ) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); bufs.len()];
        for (p, buf) in bufs.into_iter().enumerate() {
            match &self.to[p] {
                Some(to) => send(to, buf),
                None => out[p] = buf,
            }
        }
        for (p, from) in self.from.iter().enumerate() {
            if let Some(from) = from {
                out[p] = recv(from);
            }
        }
        out
    }
}

/// Writer threads, and the rank's thread reading its peers in turn.
type ThreadRank = TcpRank<Sender<Vec<u8>>, TcpStream>;
/// Writer and reader tasks on the runtime, met through channels.
type TaskRank = TcpRank<tokio::sync::mpsc::UnboundedSender<Vec<u8>>, Mutex<Receiver<Vec<u8>>>>;

impl ThreadRank {
    fn exchange(&self, bufs: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        self.all_to_all(
            bufs,
            |tx, buf| tx.send(buf).expect("writer thread"),
            |mut sock| {
                let mut len = [0u8; 8];
                sock.read_exact(&mut len).expect("read length");
                let n = u64::from_le_bytes(len);
                // Into spare capacity: no zero-filling first.
                let mut data = Vec::with_capacity(n as usize);
                sock.take(n).read_to_end(&mut data).expect("read payload");
                assert_eq!(data.len() as u64, n, "short message");
                data
            },
        )
    }
}

impl TaskRank {
    fn exchange(&self, bufs: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        self.all_to_all(
            bufs,
            |tx, buf| tx.send(buf).expect("writer task"),
            |rx| rx.lock().expect("lock").recv().expect("reader task"),
        )
    }
}

/// A mesh of `WORLD` ranks with a socket (TCP_NODELAY) per ordered pair; `pair` turns the
/// outgoing and incoming ends into the sender's and the receiver's halves.
fn mesh<S, R>(mut pair: impl FnMut(TcpStream, TcpStream) -> (S, R)) -> Vec<TcpRank<S, R>> {
    let listeners: Vec<_> = (0..WORLD)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let mut ranks: Vec<TcpRank<S, R>> = (0..WORLD)
        .map(|_| TcpRank {
            to: (0..WORLD).map(|_| None).collect(),
            from: (0..WORLD).map(|_| None).collect(),
        })
        .collect();
    for src in 0..WORLD {
        for dst in 0..WORLD {
            if src == dst {
                continue;
            }
            let out =
                TcpStream::connect(listeners[dst].local_addr().expect("addr")).expect("connect");
            let (inc, _) = listeners[dst].accept().expect("accept");
            out.set_nodelay(true).expect("nodelay");
            inc.set_nodelay(true).expect("nodelay");
            let (to, from) = pair(out, inc);
            ranks[src].to[dst] = Some(to);
            ranks[dst].from[src] = Some(from);
        }
    }
    ranks
}

fn thread_mesh() -> Vec<ThreadRank> {
    mesh(|mut out, inc| {
        let (tx, rx) = channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for msg in rx {
                out.write_all(&(msg.len() as u64).to_le_bytes())
                    .expect("write length");
                out.write_all(&msg).expect("write payload");
            }
        });
        (tx, inc)
    })
}

fn task_mesh(rt: &tokio::runtime::Handle) -> Vec<TaskRank> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _entered = rt.enter();
    let tokio_stream = |s: TcpStream| {
        s.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpStream::from_std(s).expect("tokio stream")
    };
    mesh(|out, inc| {
        let (mut out, mut inc) = (tokio_stream(out), tokio_stream(inc));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        rt.spawn(async move {
            while let Some(msg) = rx.recv().await {
                out.write_all(&(msg.len() as u64).to_le_bytes())
                    .await
                    .expect("write length");
                out.write_all(&msg).await.expect("write payload");
            }
        });
        let (in_tx, in_rx) = channel::<Vec<u8>>();
        rt.spawn(async move {
            loop {
                let Ok(n) = inc.read_u64_le().await else {
                    return; // the bench is over
                };
                // Into spare capacity: no zero-filling first.
                let mut data = Vec::with_capacity(n as usize);
                while (data.len() as u64) < n {
                    let left = n - data.len() as u64;
                    let got = (&mut inc).take(left).read_buf(&mut data).await;
                    assert!(got.expect("read payload") > 0, "short message");
                }
                if in_tx.send(data).is_err() {
                    return;
                }
            }
        });
        (tx, Mutex::new(in_rx))
    })
}
