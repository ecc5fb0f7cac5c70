//! A Grok-1 worker: one rank of the cluster. It serves the `Worker` gRPC service to the
//! coordinator (load its slice, connect to peers, run steps in lockstep) and exchanges
//! activations with its peers through the collectives.

pub mod auth;
pub mod engine;
pub mod service;

use grok_proto::worker::v1::worker_server::WorkerServer;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

/// Serves until Shutdown is called. `listener` takes the coordinator; `peer_listener` the peers.
pub async fn serve(
    listener: tokio::net::TcpListener,
    peer_listener: std::net::TcpListener,
    token: String,
    device: grok_shared::cuda::Device,
) -> anyhow::Result<()> {
    let status = Arc::new(Mutex::new(engine::Status::default()));
    let (engine_tx, peer_addr) = engine::spawn(
        tokio::runtime::Handle::current(),
        token.clone(),
        peer_listener,
        status.clone(),
        device,
    )?;
    let shutdown = Arc::new(Notify::new());
    let svc = service::WorkerService {
        engine: engine_tx,
        peer_addr,
        device: device.to_string(),
        status,
        shutdown: shutdown.clone(),
    };
    let check = auth::CheckToken::new(token);
    let server = WorkerServer::new(svc)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30);
    let server = InterceptedService::new(server, move |r| check.check(r));
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(server, incoming, async move { shutdown.notified().await })
        .await?;
    Ok(())
}

/// Where the coordinator reads a spawned worker's address: the first line it prints.
pub fn ready_line(addr: SocketAddr) -> String {
    format!("grok-worker listening on {addr}")
}
