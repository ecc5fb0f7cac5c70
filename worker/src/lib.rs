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

/// Serves until Shutdown is called. `listener` takes the coordinator; `peer_listener` the
/// peers, who are told to dial `advertised` if given, else the address it is bound to.
pub async fn serve(
    listener: tokio::net::TcpListener,
    peer_listener: std::net::TcpListener,
    advertised: Option<String>,
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
        peer_addr: advertised.unwrap_or_else(|| peer_addr.to_string()),
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

/// `--advertise-peer`: `HOST:PORT` with a port above 0 and a host that is an IP (IPv6 in
/// brackets) or a DNS name.
pub fn parse_advertised(s: &str) -> Result<String, String> {
    let usage =
        "give HOST:PORT, e.g. 203.0.113.7:50052, [2001:db8::7]:50052 or node7.example:50052";
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 || a.ip().is_unspecified() {
            return Err(format!("'{s}' is not an address a peer can dial: {usage}"));
        }
        return Ok(a.to_string());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("'{s}' has no port: {usage}"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("'{port}' is not a port from 1 to 65535: {usage}")),
    }
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !name_ok {
        return Err(format!(
            "'{host}' is neither an IP address nor a host name: {usage}"
        ));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_advertised;

    #[test]
    fn advertised_addresses_are_dialable_host_ports() {
        for ok in [
            "203.0.113.7:50052",
            "[2001:db8::7]:50052",
            "node7.example:50052",
            "grok-worker-0.grok-worker:1",
        ] {
            assert_eq!(parse_advertised(ok).as_deref(), Ok(ok), "{ok}");
        }
        for (bad, says) in [
            ("node7", "has no port"),
            ("node7:0", "not a port"),
            ("node7:65536", "not a port"),
            ("node7:", "not a port"),
            (":50052", "neither"),
            ("0.0.0.0:50052", "a peer can dial"),
            ("[::]:50052", "a peer can dial"),
            ("10.0.0.1:0", "a peer can dial"),
            ("no_underscores:1", "neither"),
            ("-dash.example:1", "neither"),
            ("a..b:1", "neither"),
            ("2001:db8::7:50052", "neither"),
        ] {
            let e = parse_advertised(bad).expect_err(bad);
            assert!(e.contains(says) && e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }
}
