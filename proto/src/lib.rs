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
