//! The `Worker` gRPC service: thin handlers that forward to the engine thread.

use crate::engine::{Command, EngineError, Loaded, Status as EngineStatus};
use grok_proto::worker::v1 as pb;
use grok_proto::worker::v1::worker_server::Worker;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct WorkerService {
    pub engine: mpsc::Sender<Command>,
    /// Where peers dial this worker's collectives (`IP:PORT` or `NAME:PORT`).
    pub peer_addr: String,
    pub device: String,
    pub status: Arc<Mutex<EngineStatus>>,
    /// Notified by Shutdown; the server stops when it fires.
    pub shutdown: Arc<Notify>,
}

fn to_status(e: EngineError) -> Status {
    match e {
        EngineError::BadRequest(_) => Status::invalid_argument(e.to_string()),
        EngineError::NotLoaded | EngineError::NotConnected => {
            Status::failed_precondition(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

/// Sends a command to the engine thread and waits for its answer.
async fn call_engine<T>(
    engine: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Command,
) -> Result<T, Status> {
    let (tx, rx) = oneshot::channel();
    engine
        .send(make(tx))
        .await
        .map_err(|_| to_status(EngineError::Gone))?;
    rx.await
        .map_err(|_| to_status(EngineError::Gone))?
        .map_err(to_status)
}

impl WorkerService {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Command,
    ) -> Result<T, Status> {
        call_engine(&self.engine, make).await
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn describe(
        &self,
        _: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        Ok(Response::new(pb::WorkerInfo {
            pid: std::process::id(),
            device: self.device.clone(),
            version: grok_proto::release(),
            peer_addr: self.peer_addr.clone(),
        }))
    }

    type LoadStream = ReceiverStream<Result<pb::LoadProgress, Status>>;

    async fn load(
        &self,
        req: Request<pb::LoadRequest>,
    ) -> Result<Response<Self::LoadStream>, Status> {
        let (out_tx, out_rx) = mpsc::channel(64);
        let (progress_tx, mut progress_rx) = mpsc::channel::<pb::LoadProgress>(64);
        let (reply_tx, reply_rx) = oneshot::channel();
        self.engine
            .send(Command::Load {
                req: req.into_inner(),
                progress: progress_tx,
                reply: reply_tx,
            })
            .await
            .map_err(|_| to_status(EngineError::Gone))?;
        // Forward progress, then the outcome, as the response stream.
        tokio::spawn(async move {
            while let Some(p) = progress_rx.recv().await {
                if out_tx.send(Ok(p)).await.is_err() {
                    break;
                }
            }
            let last = match reply_rx.await {
                Ok(Ok(Loaded {
                    weight_bytes,
                    kv_bytes,
                })) => Ok(pb::LoadProgress {
                    layers_done: 0,
                    layers_total: 0,
                    done: true,
                    weight_bytes,
                    kv_bytes,
                }),
                Ok(Err(e)) => Err(to_status(e)),
                Err(_) => Err(to_status(EngineError::Gone)),
            };
            let _ = out_tx.send(last).await;
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn join_peers(
        &self,
        req: Request<pb::JoinPeersRequest>,
    ) -> Result<Response<pb::JoinPeersReply>, Status> {
        let req = req.into_inner();
        self.call(|reply| Command::Connect { req, reply }).await?;
        Ok(Response::new(pb::JoinPeersReply {}))
    }

    async fn leave_peers(
        &self,
        _: Request<pb::LeavePeersRequest>,
    ) -> Result<Response<pb::LeavePeersReply>, Status> {
        self.call(|reply| Command::Leave { reply }).await?;
        Ok(Response::new(pb::LeavePeersReply {}))
    }

    type StepsStream = ReceiverStream<Result<pb::StepReply, Status>>;

    async fn steps(
        &self,
        req: Request<Streaming<pb::StepRequest>>,
    ) -> Result<Response<Self::StepsStream>, Status> {
        let mut incoming = req.into_inner();
        let engine = self.engine.clone();
        // One step at a time, in order: the reply to a step goes out before the next is read.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            while let Ok(Some(req)) = incoming.message().await {
                let reply = call_engine(&engine, |reply| Command::Step { req, reply }).await;
                let failed = reply.is_err();
                // A failed step ends the stream with its status; the coordinator opens another.
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        let s = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        Ok(Response::new(pb::HealthReply {
            state: s.state,
            rank: s.rank,
        }))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        self.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownReply {}))
    }
}
