//! All-to-all between 4 ranks (threads of this process, on loopback) over `GrpcComm`, against
//! plain TCP moving the same bytes between the same 4 ranks in the same run.
//!
//! `cargo bench -p grok-shared --bench collectives [-- MAX_MB]` prints, per message size (bytes
//! each rank sends to each peer), the time of one all-to-all round and each rank's send rate
//! (3 × size / round time), and gRPC as a fraction of plain TCP.
//!
//! The plain TCP side is the best case for the same exchange: one socket per ordered pair
//! (TCP_NODELAY), a length prefix, a writer thread per outgoing socket, the rank's thread reading
//! its peers in turn, the bytes sent straight from one buffer (no f32 conversion, no copy before
//! the kernel's).

use grok_shared::comm::grpc::GrpcComm;
use grok_shared::comm::Communicator;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Barrier, Mutex};
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
    let tcp = tcp_mesh();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("all-to-all, {WORLD} ranks on loopback, {cores} cores; GB/s = bytes each rank sends / round time");
    println!(
        "{:>9} {:>7} | {:>11} {:>8} | {:>11} {:>8} | {:>6}",
        "size", "rounds", "grpc µs", "GB/s", "tcp µs", "GB/s", "ratio"
    );
    for &size in &sizes {
        let rounds = (256usize << 20).div_ceil(size * (WORLD - 1)).clamp(5, 2000);
        let g = time_rounds(&grpc, size, rounds, |c, bufs| {
            let group: Vec<usize> = (0..WORLD).collect();
            c.all_to_all_v(&group, bufs).expect("grpc all_to_all")
        });
        let t = time_rounds(&tcp, size, rounds, |c, bufs| c.all_to_all(bufs));
        let gbps = |secs: f64| (size * (WORLD - 1)) as f64 / secs / 1e9;
        println!(
            "{:>9} {:>7} | {:>11.1} {:>8.3} | {:>11.1} {:>8.3} | {:>5.0}%",
            human(size),
            rounds,
            g * 1e6,
            gbps(g),
            t * 1e6,
            gbps(t),
            100.0 * t / g
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
fn time_rounds<C: Sync>(
    comms: &[C],
    size: usize,
    rounds: usize,
    round: impl Fn(&C, Vec<Vec<f32>>) -> Vec<Vec<f32>> + Sync,
) -> f64 {
    let barrier = Barrier::new(comms.len());
    let times: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| {
                let (barrier, round) = (&barrier, &round);
                s.spawn(move || {
                    let mut bufs = vec![vec![1.0f32; size / 4]; WORLD];
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

/// One rank of the plain TCP mesh.
struct TcpRank {
    /// The bytes sent this round (made once per size: the best case of no conversion).
    payload: Mutex<Arc<Vec<u8>>>,
    /// `to[p]` feeds the writer thread of the socket to rank p.
    to: Vec<Option<Sender<Arc<Vec<u8>>>>>,
    /// `from[p]` is the socket from rank p.
    from: Vec<Option<TcpStream>>,
}

impl TcpRank {
    /// Sends `size` bytes to every peer and reads what each sent (into a fresh buffer, as a
    /// communicator handing out owned messages must); returns `bufs` to keep the rounds alike.
    fn all_to_all(&self, bufs: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        let size = bufs[0].len() * 4;
        let payload = {
            let mut cached = self.payload.lock().expect("payload lock");
            if cached.len() != size {
                *cached = Arc::new(vec![0x5a; size]);
            }
            cached.clone()
        };
        for tx in self.to.iter().flatten() {
            tx.send(payload.clone()).expect("writer thread");
        }
        for mut sock in self.from.iter().flatten() {
            let mut len = [0u8; 8];
            sock.read_exact(&mut len).expect("read length");
            let n = u64::from_le_bytes(len);
            // Into spare capacity: no zero-filling first.
            let mut data = Vec::with_capacity(n as usize);
            sock.take(n).read_to_end(&mut data).expect("read payload");
            assert_eq!(data.len() as u64, n, "short message");
            std::hint::black_box(&data);
        }
        bufs
    }
}

fn tcp_mesh() -> Vec<TcpRank> {
    let listeners: Vec<_> = (0..WORLD)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let mut ranks: Vec<TcpRank> = (0..WORLD)
        .map(|_| TcpRank {
            payload: Mutex::new(Arc::new(Vec::new())),
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
            let (tx, rx) = channel::<Arc<Vec<u8>>>();
            std::thread::spawn(move || {
                let mut out = out;
                for msg in rx {
                    out.write_all(&(msg.len() as u64).to_le_bytes())
                        .expect("write length");
                    out.write_all(&msg).expect("write payload");
                }
            });
            ranks[src].to[dst] = Some(tx);
            ranks[dst].from[src] = Some(inc);
        }
    }
    ranks
}
