//! The stream from this rank to one peer: an `Exchange` call whose request body is written by
//! [`OutboundBody`] (hello, then each queued tensor as chunk heads and payload slices, see
//! `wire`) and whose replies (the welcome, then the final status) are decoded by tonic.

use super::wire::{self, ChunkHead};
use super::{describe, Inbound, Out, Shared, StartEvent, CHUNK_BYTES, CLEAN_CLOSE};
use super::{CONNECT_RETRY, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_FRAME, WINDOW};
use crate::comm::CommError;
use bytes::Bytes;
use grok_proto::peer::v1::{peer_reply, Hello, PeerFrame, PeerReply};
use http::HeaderValue;
use http_body::Frame;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, watch};
use tonic::body::Body;
use tonic::codec::{Codec, Streaming};
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use tower_service::Service;

/// The task owning the stream from this rank to one peer.
pub(super) struct OutboundTask {
    pub(super) shared: Arc<Shared>,
    pub(super) peer: usize,
    pub(super) addr: SocketAddr,
    pub(super) token: HeaderValue,
    pub(super) deadline: tokio::time::Instant,
    pub(super) inbound: std_mpsc::Sender<Inbound>,
    pub(super) stop: watch::Receiver<bool>,
    /// Held so that `shutdown` can tell when this task has ended.
    pub(super) _done: (std_mpsc::Sender<()>, std_mpsc::Sender<()>),
}

impl OutboundTask {
    pub(super) async fn run(mut self, rx: mpsc::UnboundedReceiver<Out>) {
        let (rank, peer) = (self.shared.rank, self.peer);
        let mut replies = match self.open(rx).await {
            Ok(Some(r)) => r,
            Ok(None) => return, // shut down while starting
            Err(reason) => {
                let e = CommError::PeerFailed { rank, peer, reason };
                return self.shared.event(StartEvent::Failed(e));
            }
        };
        self.shared.event(StartEvent::OutboundUp(peer));
        // The peer stays silent; its reply stream ends once it has read everything we sent
        // after `shutdown` closed our side, or when the peer (or the link) goes away.
        let reason = tokio::select! {
            m = replies.message() => match m {
                Ok(Some(_)) => format!("unexpected reply from rank {peer}"),
                Ok(None) => format!("rank {peer} ended the stream {CLEAN_CLOSE}"),
                Err(status) => format!("stream to rank {peer} broke: {}", describe(&status)),
            },
            _ = self.stop.wait_for(|s| *s) => return,
        };
        self.shared.fail(peer, reason, &self.inbound);
    }

    /// Connects (retrying until the start deadline: the peer may not listen yet), opens the
    /// stream and checks the welcome.
    async fn open(
        &mut self,
        rx: mpsc::UnboundedReceiver<Out>,
    ) -> Result<Option<Streaming<PeerReply>>, String> {
        let (rank, peer, addr, world) = (self.shared.rank, self.peer, self.addr, self.shared.world);
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad address {addr}: {e}"))?
            .tcp_nodelay(true)
            .initial_stream_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .max_frame_size(MAX_FRAME)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .connect_timeout(self.shared.timeout);
        let mut channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() + CONNECT_RETRY >= self.deadline => {
                    return Err(format!("cannot connect to {addr}: {e}"));
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(CONNECT_RETRY) => {}
                        _ = self.stop.wait_for(|s| *s) => return Ok(None),
                    }
                }
            }
        };
        let hello = wire::encode_hello(Hello {
            src_rank: rank as u32,
            dst_rank: peer as u32,
            world: world as u32,
        });
        let request = http::Request::builder()
            .method(http::Method::POST)
            .version(http::Version::HTTP_2)
            .uri(wire::EXCHANGE_PATH)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(super::TOKEN_METADATA, self.token.clone())
            .body(Body::new(OutboundBody {
                hello: Some(hello),
                rx,
                current: None,
                seq: 0,
            }))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let call = async {
            std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
            channel.call(request).await
        };
        let response = match tokio::time::timeout_at(self.deadline, call).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(format!("it refused the stream ({addr}: {e})")),
            Err(_) => return Err(format!("no answer from {addr} before the deadline")),
        };
        // A refusal comes as a status in the headers, with no body.
        match Status::from_header_map(response.headers()) {
            Some(s) if s.code() == Code::Unauthenticated => {
                return Err(format!(
                    "it refused our cluster token ({addr}: {})",
                    s.message()
                ));
            }
            Some(s) if s.code() != Code::Ok => {
                return Err(format!("it refused the stream ({addr}: {})", describe(&s)))
            }
            _ => {}
        }
        let (parts, body) = response.into_parts();
        let decoder = tonic_prost::ProstCodec::<PeerFrame, PeerReply>::default().decoder();
        let mut replies = Streaming::new_response(decoder, body, parts.status, None, None);
        let welcome = match tokio::time::timeout_at(self.deadline, replies.message()).await {
            Ok(Ok(Some(PeerReply {
                body: Some(peer_reply::Body::Welcome(w)),
            }))) => w,
            Ok(Ok(_)) => return Err(format!("{addr} did not welcome us")),
            Ok(Err(status)) => return Err(format!("{addr}: {}", describe(&status))),
            Err(_) => return Err(format!("no welcome from {addr} before the deadline")),
        };
        if welcome.rank as usize != peer || welcome.world as usize != world {
            return Err(format!(
                "{addr} is rank {} of {}, not rank {peer} of {world}",
                welcome.rank, welcome.world
            ));
        }
        Ok(Some(replies))
    }
}

/// The request body of one `Exchange` call: the hello, then each queued tensor cut into
/// chunks lazily (as HTTP/2 flow control asks for more).
struct OutboundBody {
    hello: Option<Bytes>,
    rx: mpsc::UnboundedReceiver<Out>,
    current: Option<Chunks>,
    seq: u64,
}

impl http_body::Body for OutboundBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(h) = this.hello.take() {
            return Poll::Ready(Some(Ok(Frame::data(h))));
        }
        loop {
            if let Some(piece) = this.current.as_mut().and_then(Iterator::next) {
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            this.current = None;
            match std::task::ready!(this.rx.poll_recv(cx)) {
                Some(Out::Data(data)) => {
                    this.current = Some(Chunks::new(this.seq, data));
                    this.seq += 1;
                }
                Some(Out::Close) | None => return Poll::Ready(None),
            }
        }
    }
}

/// The pieces of one message's chunks (at least one chunk, even for an empty tensor): for
/// each chunk its head, then its payload as a slice of the message's bytes.
struct Chunks {
    seq: u64,
    bytes: Bytes,
    pos: usize,
    index: u32,
    /// The payload of the chunk whose head went out last.
    payload: Option<Bytes>,
    done: bool,
}

impl Chunks {
    fn new(seq: u64, data: Vec<f32>) -> Chunks {
        Chunks {
            seq,
            bytes: crate::bytes::f32_le_bytes(data),
            pos: 0,
            index: 0,
            payload: None,
            done: false,
        }
    }
}

impl Iterator for Chunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if let Some(p) = self.payload.take() {
            return Some(p);
        }
        if self.done {
            return None;
        }
        let end = (self.pos + CHUNK_BYTES).min(self.bytes.len());
        let head = ChunkHead {
            seq: self.seq,
            chunk_index: self.index,
            last: end == self.bytes.len(),
            total_bytes: if self.index == 0 {
                self.bytes.len() as u64
            } else {
                0
            },
        };
        let payload = self.bytes.slice(self.pos..end);
        self.pos = end;
        self.index += 1;
        self.done = head.last;
        let head = wire::encode_chunk_head(head, payload.len());
        self.payload = (!payload.is_empty()).then_some(payload);
        Some(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_message_in_order() {
        let n = CHUNK_BYTES / 4 * 2 + 3;
        let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let pieces: Vec<Bytes> = Chunks::new(0, data.clone()).collect();
        // Three chunks, each a head and a payload.
        assert_eq!(pieces.len(), 6);
        let mut parser = wire::FrameParser::default();
        let mut assembler = wire::Assembler::default();
        let mut got = None;
        for mut piece in pieces {
            while let Some(e) = parser.next(&mut piece).unwrap() {
                match e {
                    wire::Event::ChunkStart(h) => assembler.start(h).unwrap(),
                    wire::Event::Payload(b) => assembler.payload(&b).unwrap(),
                    wire::Event::ChunkEnd => got = assembler.end().unwrap().or(got),
                    wire::Event::Hello(_) => unreachable!(),
                }
            }
        }
        assert!(got == Some(data));
        // An empty tensor is one chunk head and no payload.
        assert_eq!(Chunks::new(0, Vec::new()).count(), 1);
    }
}
