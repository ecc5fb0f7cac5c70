//! The `PeerExchange` server of one rank: checks the caller's token and hello, welcomes it,
//! then reads its stream into that peer's inbound queue. Served by tonic's server as a plain
//! HTTP service so that request bodies are read by `wire::FrameParser` instead of tonic's
//! buffering decoder (see `wire` for why).

use super::wire::{self, Assembler, Event, FrameParser};
use super::{describe, same_token, Inbound, Shared, StartEvent, CLEAN_CLOSE, TOKEN_METADATA};
use bytes::Bytes;
use grok_proto::peer::v1::{peer_reply, PeerReply, Welcome};
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, watch};
use tonic::body::Body;
use tonic::transport::server::TcpConnectInfo;
use tonic::{Code, Status};
use tracing::warn;

#[derive(Clone)]
pub(super) struct ExchangeService {
    pub(super) shared: Arc<Shared>,
    pub(super) stop: watch::Receiver<bool>,
    /// Held (and given to each reader) so that `shutdown` can tell when all have ended.
    pub(super) done: std_mpsc::Sender<()>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl tower_service::Service<http::Request<Body>> for ExchangeService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> ResponseFuture {
        let this = self.clone();
        Box::pin(async move {
            Ok(this
                .exchange(request)
                .await
                .unwrap_or_else(Status::into_http))
        })
    }
}

impl ExchangeService {
    async fn exchange(self, request: http::Request<Body>) -> Result<http::Response<Body>, Status> {
        let shared = &self.shared;
        let (rank, world) = (shared.rank, shared.world);
        if request.uri().path() != wire::EXCHANGE_PATH {
            return Err(Status::unimplemented(format!(
                "no method {}",
                request.uri().path()
            )));
        }
        let authorised = request
            .headers()
            .get(TOKEN_METADATA)
            .is_some_and(|v| same_token(v.as_bytes(), &shared.token));
        if !authorised {
            let remote = request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr);
            warn!(rank, ?remote, "refused a peer without the cluster token");
            return Err(Status::unauthenticated("missing or wrong cluster token"));
        }
        let mut frames = Frames::new(request.into_body());
        // Bounded so a silent caller cannot hold a handler forever.
        let hello = match tokio::time::timeout(shared.timeout, frames.next()).await {
            Ok(Ok(Some(Event::Hello(h)))) => h,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first frame must be a hello")),
            Ok(Err(ReadError::Protocol(e))) => return Err(Status::invalid_argument(e)),
            Ok(Err(ReadError::Broken(status))) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no hello before the deadline")),
        };
        let src = hello.src_rank as usize;
        if hello.world as usize != world
            || hello.dst_rank as usize != rank
            || src >= world
            || src == rank
        {
            return Err(Status::failed_precondition(format!(
                "hello from rank {src} of {} for rank {}, but this is rank {rank} of {world}",
                hello.world, hello.dst_rank
            )));
        }
        if shared.closing.load(Ordering::Acquire) {
            return Err(Status::unavailable(format!("rank {rank} is shutting down")));
        }
        let inbound = shared.inbound_slots[src]
            .lock()
            .map_err(|_| Status::internal("inbound slot lock poisoned"))?
            .take()
            .ok_or_else(|| {
                Status::already_exists(format!("rank {src} already has a stream to rank {rank}"))
            })?;
        shared.event(StartEvent::InboundUp(src));

        // The reader keeps the sender; dropping it ends the replies with OK, a status ends
        // them with that status.
        let (end_tx, end_rx) = mpsc::channel(1);
        let reader = Reader {
            shared: shared.clone(),
            src,
            inbound,
            end: end_tx,
            stop: self.stop.clone(),
            _done: self.done.clone(),
        };
        tokio::spawn(reader.run(frames));
        let welcome = wire::encode_message(&PeerReply {
            body: Some(peer_reply::Body::Welcome(Welcome {
                rank: rank as u32,
                world: world as u32,
            })),
        });
        let mut response = http::Response::new(Body::new(Replies {
            welcome: Some(welcome),
            end: end_rx,
            ended: false,
        }));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        Ok(response)
    }
}

enum ReadError {
    /// The peer broke the protocol.
    Protocol(String),
    /// The stream itself failed (reset, connection lost).
    Broken(Status),
}

/// A request body read as [`Event`]s.
struct Frames {
    body: Body,
    parser: FrameParser,
    /// What is left of the last data frame.
    data: Bytes,
}

impl Frames {
    fn new(body: Body) -> Frames {
        Frames {
            body,
            parser: FrameParser::default(),
            data: Bytes::new(),
        }
    }

    /// The next event; `None` when the stream ends between messages.
    async fn next(&mut self) -> Result<Option<Event>, ReadError> {
        loop {
            if let Some(e) = self
                .parser
                .next(&mut self.data)
                .map_err(ReadError::Protocol)?
            {
                return Ok(Some(e));
            }
            let frame = std::future::poll_fn(|cx| {
                http_body::Body::poll_frame(Pin::new(&mut self.body), cx)
            })
            .await;
            match frame {
                None if self.parser.at_boundary() => return Ok(None),
                None => {
                    return Err(ReadError::Protocol(
                        "its stream ended inside a message".into(),
                    ))
                }
                // Trailers carry nothing for us.
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.data = data;
                    }
                }
                Some(Err(status)) => return Err(ReadError::Broken(status)),
            }
        }
    }
}

/// Reads one peer's stream, reassembling its messages into the inbound queue.
struct Reader {
    shared: Arc<Shared>,
    src: usize,
    inbound: std_mpsc::Sender<Inbound>,
    end: mpsc::Sender<Status>,
    stop: watch::Receiver<bool>,
    _done: std_mpsc::Sender<()>,
}

impl Reader {
    async fn run(mut self, mut frames: Frames) {
        let (rank, src) = (self.shared.rank, self.src);
        let mut assembler = Assembler::default();
        let outcome = loop {
            let event = tokio::select! {
                e = frames.next() => e,
                _ = self.stop.wait_for(|s| *s) => {
                    let going = format!("rank {rank} is shutting down");
                    let _ = self.end.try_send(Status::unavailable(going.clone()));
                    // Wakes a `recv` another thread may still be waiting in.
                    let _ = self.inbound.send(Err(going));
                    return;
                }
            };
            let step = match event {
                Ok(Some(Event::Hello(_))) => Err("a second hello".to_string()),
                Ok(Some(Event::ChunkStart(head))) => assembler.start(head).map(|()| None),
                Ok(Some(Event::Payload(bytes))) => assembler.payload(&bytes).map(|()| None),
                Ok(Some(Event::ChunkEnd)) => assembler.end(),
                Ok(None) if !assembler.at_boundary() => {
                    Err("its stream ended inside a message".to_string())
                }
                Ok(None) => break Ok(format!("rank {src} closed its stream {CLEAN_CLOSE}")),
                Err(ReadError::Protocol(violation)) => Err(violation),
                Err(ReadError::Broken(status)) => {
                    break Ok(format!(
                        "stream from rank {src} broke: {}",
                        describe(&status)
                    ))
                }
            };
            match step {
                Ok(Some(message)) => {
                    if self.inbound.send(Ok(message)).is_err() {
                        return; // the communicator is gone
                    }
                }
                Ok(None) => {}
                Err(violation) => break Err(violation),
            }
        };
        match outcome {
            Ok(reason) => self.shared.fail(src, reason, &self.inbound),
            Err(violation) => {
                let reason = format!("rank {src} broke the protocol: {violation}");
                let _ = self.end.try_send(Status::invalid_argument(reason.clone()));
                self.shared.fail(src, reason, &self.inbound);
            }
        }
    }
}

/// The reply stream of an `Exchange` call: the welcome, then silence until the reader ends
/// it, then the status as trailers.
struct Replies {
    welcome: Option<Bytes>,
    end: mpsc::Receiver<Status>,
    ended: bool,
}

impl http_body::Body for Replies {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(w) = this.welcome.take() {
            return Poll::Ready(Some(Ok(Frame::data(w))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let status =
            std::task::ready!(this.end.poll_recv(cx)).unwrap_or_else(|| Status::new(Code::Ok, ""));
        this.ended = true;
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            // Only a message that cannot be a header value gets here; the code still goes.
            let _ = Status::new(status.code(), "").add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}
