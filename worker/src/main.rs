//! `grok-worker --listen ADDR --cluster-token TOKEN [--device cpu]`

use anyhow::{bail, Context, Result};
use clap::Parser;
use grok_shared::cuda::{cuda_available, gpu_count as cudarc_device_count, Device};
use std::io::Write;
use std::net::SocketAddr;

#[derive(Parser, Debug)]
#[command(name = "grok-worker", version, about = "One rank of a Grok-1 cluster")]
struct Args {
    /// Address for the coordinator (port 0 picks a free one; the address is printed on stdout).
    #[arg(long, env = "GROK_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address for the peers' collectives (default: the --listen host, a free port).
    #[arg(long, env = "GROK_WORKER_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// The address the peers dial for this worker's collectives, where it is not the one
    /// --peer-listen binds (NAT, port forwarding): HOST:PORT, HOST an IP or a name the
    /// coordinator resolves. Default: the address bound, or for 0.0.0.0 / [::] the IP the
    /// coordinator reached this worker at.
    #[arg(long, env = "GROK_WORKER_ADVERTISE_PEER", value_parser = grok_worker::parse_advertised)]
    advertise_peer: Option<String>,
    /// Shared secret: callers without it are refused.
    #[arg(long, env = "GROK_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: String,
    /// Compute device: cpu, cuda (GPU 0), cuda:N, or auto (a GPU when CUDA loads and one
    /// exists, else cpu).
    #[arg(long, env = "GROK_WORKER_DEVICE", default_value = "cpu", value_parser = Device::parse)]
    device: Device,
    /// Exit when stdin reaches its end. A coordinator that spawns workers sets this and holds
    /// their stdin open: when it dies, however it dies, its workers go too.
    #[arg(long, env = "GROK_WORKER_EXIT_WITH_STDIN")]
    exit_with_stdin: bool,
}

/// See the workspace Cargo.toml: tensor-sized buffers are reused instead of refaulted.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if args.cluster_token.trim().is_empty() {
        bail!("--cluster-token is empty: give the cluster's shared token (or GROK_CLUSTER_TOKEN)");
    }
    if !args
        .cluster_token
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b))
    {
        bail!("--cluster-token must be printable ASCII");
    }
    if let Device::Cuda(n) = args.device {
        // Checked before listening, so a coordinator sees the reason at once.
        if !cuda_available() {
            bail!(
                "--device cuda:{n}: {}",
                grok_shared::cuda::CudaError::NoCuda
            );
        }
        let count = cudarc_device_count();
        if n >= count {
            bail!(
                "--device cuda:{n}: this machine has {count} GPU(s) (use cuda:0..cuda:{})",
                count.saturating_sub(1)
            );
        }
    }
    if args.exit_with_stdin {
        std::thread::spawn(|| {
            // Nothing is ever written: this returns when the other end closes.
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            eprintln!("grok-worker: the coordinator that started this worker is gone; exiting");
            std::process::exit(0);
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding --listen {}", args.listen))?;
        let addr = listener.local_addr()?;
        let peer = args.peer_listen.unwrap_or(SocketAddr::new(addr.ip(), 0));
        let peer_listener = std::net::TcpListener::bind(peer)
            .with_context(|| format!("binding --peer-listen {peer}"))?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", grok_worker::ready_line(addr))?;
        out.flush()?;
        drop(out);
        grok_worker::serve(
            listener,
            peer_listener,
            args.advertise_peer,
            args.cluster_token,
            args.device,
        )
        .await
    })
}
