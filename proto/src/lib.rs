//! gRPC services of the Grok cluster, generated at build time from `proto/` (see `build.rs`).
//!
//! - [`peer::v1`]: `PeerExchange`, the worker ↔ worker tensor stream behind
//!   `grok_shared::comm::grpc::GrpcComm`.
//! - [`worker::v1`]: `Worker`, the coordinator → worker control service (load, connect, step).

pub mod peer {
    pub mod v1 {
        tonic::include_proto!("grok.peer.v1");
    }
}

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("grok.worker.v1");
    }
}

/// This build's release and protocol, as a worker reports it (`WorkerInfo.version`) and the
/// coordinator requires it: the workspace version and a fingerprint of the `.proto` files, so
/// that two builds of one version with different messages do not meet mid-step.
pub fn release() -> String {
    format!(
        "{} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        env!("GROK_PROTO_FINGERPRINT")
    )
}
