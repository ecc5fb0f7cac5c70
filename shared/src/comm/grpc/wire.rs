//! The bytes of the `PeerExchange` call, written and read here instead of by tonic's codec.
//!
//! The format is unchanged gRPC: length-prefixed protobuf messages of `grok.peer.v1` (any gRPC
//! client or server can talk to ours; tests check it against the generated code). What differs
//! is who copies: tonic's codec copies every message into its encode buffer on the way out and
//! every HTTP/2 frame into its decode buffer on the way in, then decodes from there. Tensor
//! payloads are the whole cost of the exchange, so here
//! - a chunk goes out as two pieces, a small head (gRPC prefix, the `PeerFrame` and
//!   `TensorChunk` fields up to the payload's length) and the payload itself, a slice of the
//!   sender's tensor: no copy before the kernel's;
//! - a chunk comes in through [`FrameParser`], which hands out the payload as slices of the
//!   received frames, and [`Assembler`] writes them into the message: one copy.
//!
//! Protobuf encoders write fields in field-number order, so the payload (field 5) is the last
//! field of a chunk; the parser relies on that for chunks it streams and says so when a peer
//! breaks it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use grok_proto::peer::v1::{peer_frame, Hello, PeerFrame, TensorChunk};
use prost::encoding::{encode_varint, encoded_len_varint};
use prost::Message;
use std::collections::VecDeque;

/// The gRPC method, as routed on the HTTP/2 path.
pub const EXCHANGE_PATH: &str = "/grok.peer.v1.PeerExchange/Exchange";

/// gRPC message prefix: a compressed flag and a big-endian length.
const PREFIX: usize = 5;
/// Messages up to this size are buffered whole and decoded by prost (hellos, tiny chunks);
/// larger ones must be tensor chunks and are streamed.
const SMALL: usize = 256;
/// The fields of a `PeerFrame` holding a chunk, up to and including the payload's length,
/// take at most 42 bytes (keys, two 10-byte and two 5-byte varints, a bool); a streamed
/// message whose payload does not start within this many bytes is refused.
const HEAD_MAX: usize = 64;
/// Largest message accepted from a peer (ours carry at most `CHUNK_BYTES` of payload).
pub const MAX_MESSAGE: usize = 16 << 20;

/// `PeerFrame.chunk` and `TensorChunk.payload` keys (field << 3 | length-delimited).
const KEY_FRAME_CHUNK: u8 = (2 << 3) | 2;
const KEY_PAYLOAD: u8 = (5 << 3) | 2;

/// One whole gRPC message holding `msg`.
pub fn encode_message(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Cannot fail: the buffer has room for `encoded_len` bytes.
    let _ = msg.encode(&mut buf);
    buf.freeze()
}

/// The hello that opens every `Exchange` call.
pub fn encode_hello(hello: Hello) -> Bytes {
    encode_message(&PeerFrame {
        body: Some(peer_frame::Body::Hello(hello)),
    })
}

/// The fields of one chunk other than its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHead {
    pub seq: u64,
    pub chunk_index: u32,
    pub last: bool,
    pub total_bytes: u64,
}

/// Everything of a chunk's gRPC message before its payload: sent followed by exactly
/// `payload_len` payload bytes, the two make one `PeerFrame` message.
pub fn encode_chunk_head(head: ChunkHead, payload_len: usize) -> Bytes {
    let fields = TensorChunk {
        seq: head.seq,
        chunk_index: head.chunk_index,
        last: head.last,
        total_bytes: head.total_bytes,
        payload: Bytes::new(),
    };
    // proto3 leaves an empty payload out, as prost would.
    let payload_field = if payload_len > 0 {
        1 + encoded_len_varint(payload_len as u64) + payload_len
    } else {
        0
    };
    let chunk_len = fields.encoded_len() + payload_field;
    let message_len = 1 + encoded_len_varint(chunk_len as u64) + chunk_len;
    let mut buf = BytesMut::with_capacity(PREFIX + HEAD_MAX);
    buf.put_u8(0);
    buf.put_u32(message_len as u32);
    buf.put_u8(KEY_FRAME_CHUNK);
    encode_varint(chunk_len as u64, &mut buf);
    let _ = fields.encode(&mut buf);
    if payload_len > 0 {
        buf.put_u8(KEY_PAYLOAD);
        encode_varint(payload_len as u64, &mut buf);
    }
    buf.freeze()
}

/// What the request stream of an `Exchange` call carries, in order.
#[derive(Debug, PartialEq)]
pub enum Event {
    Hello(Hello),
    /// A chunk begins; its payload follows as zero or more `Payload` pieces, then `ChunkEnd`.
    ChunkStart(ChunkHead),
    Payload(Bytes),
    ChunkEnd,
}

enum State {
    /// Collecting a message's prefix into `scratch`.
    Prefix,
    /// Collecting a whole small message of `len` bytes into `scratch`.
    Small { len: usize },
    /// Collecting the first `HEAD_MAX` bytes of a large message of `len` bytes.
    Head { len: usize },
    /// Passing on the `left` payload bytes that end the current message.
    Payload { left: usize },
}

/// Turns the bytes of a request stream (in pieces of any size, split anywhere) into
/// [`Event`]s, copying only prefixes, chunk heads and small messages.
pub struct FrameParser {
    state: State,
    scratch: Vec<u8>,
    ready: VecDeque<Event>,
}

impl Default for FrameParser {
    fn default() -> Self {
        FrameParser {
            state: State::Prefix,
            scratch: Vec::with_capacity(SMALL),
            ready: VecDeque::new(),
        }
    }
}

impl FrameParser {
    /// The next event, consuming from `data` as needed; `None` once `data` is used up without
    /// completing one (feed the next piece then). Errors describe the peer's mistake; the
    /// stream cannot continue after one.
    pub fn next(&mut self, data: &mut Bytes) -> Result<Option<Event>, String> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Ok(Some(e));
            }
            match self.state {
                State::Prefix => {
                    if !self.fill(data, PREFIX) {
                        return Ok(None);
                    }
                    let (flag, len) = (self.scratch[0], read_u32_be(&self.scratch[1..5]));
                    self.scratch.clear();
                    if flag != 0 {
                        return Err(format!(
                            "a message with compressed flag {flag} (no compression was agreed)"
                        ));
                    }
                    if len > MAX_MESSAGE {
                        return Err(format!(
                            "a message of {len} bytes (the limit is {MAX_MESSAGE})"
                        ));
                    }
                    self.state = if len <= SMALL {
                        State::Small { len }
                    } else {
                        State::Head { len }
                    };
                }
                State::Small { len } => {
                    if !self.fill(data, len) {
                        return Ok(None);
                    }
                    let frame = PeerFrame::decode(&self.scratch[..])
                        .map_err(|e| format!("an undecodable message: {e}"))?;
                    self.scratch.clear();
                    self.state = State::Prefix;
                    match frame.body {
                        Some(peer_frame::Body::Hello(h)) => self.ready.push_back(Event::Hello(h)),
                        Some(peer_frame::Body::Chunk(c)) => {
                            self.ready.push_back(Event::ChunkStart(ChunkHead {
                                seq: c.seq,
                                chunk_index: c.chunk_index,
                                last: c.last,
                                total_bytes: c.total_bytes,
                            }));
                            if !c.payload.is_empty() {
                                self.ready.push_back(Event::Payload(c.payload));
                            }
                            self.ready.push_back(Event::ChunkEnd);
                        }
                        None => return Err("an empty message".into()),
                    }
                }
                State::Head { len } => {
                    if !self.fill(data, HEAD_MAX) {
                        return Ok(None);
                    }
                    let (head, at, payload_len) = parse_chunk_head(&self.scratch, len)?;
                    self.ready.push_back(Event::ChunkStart(head));
                    // Payload bytes already collected with the head (at most HEAD_MAX).
                    self.ready
                        .push_back(Event::Payload(Bytes::copy_from_slice(&self.scratch[at..])));
                    self.scratch.clear();
                    self.state = State::Payload {
                        left: payload_len - (HEAD_MAX - at),
                    };
                }
                State::Payload { left } => {
                    if left == 0 {
                        self.state = State::Prefix;
                        self.ready.push_back(Event::ChunkEnd);
                        continue;
                    }
                    if data.is_empty() {
                        return Ok(None);
                    }
                    let piece = data.split_to(left.min(data.len()));
                    self.state = State::Payload {
                        left: left - piece.len(),
                    };
                    return Ok(Some(Event::Payload(piece)));
                }
            }
        }
    }

    /// Whether the stream may end here (not inside a message).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Prefix) && self.scratch.is_empty() && self.ready.is_empty()
    }

    /// Moves bytes from `data` into `scratch` until it holds `n`; whether it does.
    fn fill(&mut self, data: &mut Bytes, n: usize) -> bool {
        let take = (n - self.scratch.len()).min(data.len());
        self.scratch.extend_from_slice(&data[..take]);
        data.advance(take);
        self.scratch.len() == n
    }
}

fn read_u32_be(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// Reads the head of a streamed message of `len` bytes from its first `HEAD_MAX` bytes:
/// the chunk's fields, where its payload starts in `head`, and the payload's length (which
/// must run to the end of the message).
fn parse_chunk_head(head: &[u8], len: usize) -> Result<(ChunkHead, usize, usize), String> {
    let mut at = 0;
    let truncated = || "a tensor chunk whose fields end early".to_string();
    if head[0] != KEY_FRAME_CHUNK {
        return Err(format!(
            "a message of {len} bytes that is not a tensor chunk (key {:#04x})",
            head[0]
        ));
    }
    at += 1;
    let chunk_len = read_varint(head, &mut at).ok_or_else(truncated)?;
    if chunk_len != (len - at) as u64 {
        return Err(format!(
            "a tensor chunk of {chunk_len} bytes in a message with {} bytes left",
            len - at
        ));
    }
    let mut h = ChunkHead {
        seq: 0,
        chunk_index: 0,
        last: false,
        total_bytes: 0,
    };
    loop {
        let key = read_varint(head, &mut at).ok_or_else(|| {
            format!("a tensor chunk whose payload does not start within {HEAD_MAX} bytes")
        })?;
        if key == u64::from(KEY_PAYLOAD) {
            let payload_len = read_varint(head, &mut at).ok_or_else(truncated)?;
            if payload_len != (len - at) as u64 {
                return Err(format!(
                    "a payload of {payload_len} bytes with {} bytes of message left \
                     (the payload must be the chunk's last field)",
                    len - at
                ));
            }
            return Ok((h, at, payload_len as usize));
        }
        let value = read_varint(head, &mut at).ok_or_else(truncated)?;
        match key {
            0x08 => h.seq = value,
            0x10 => {
                h.chunk_index = u32::try_from(value)
                    .map_err(|_| format!("a chunk index of {value} (not a uint32)"))?
            }
            0x18 => h.last = value != 0,
            0x20 => h.total_bytes = value,
            _ => {
                return Err(format!(
                    "field {} (wire type {}) in a tensor chunk",
                    key >> 3,
                    key & 7
                ))
            }
        }
    }
}

/// A protobuf varint from `b` at `*at`; `None` if it runs past `b` or past 10 bytes.
fn read_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let byte = *b.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// Preallocation for an incoming message is capped: the size is peer-supplied.
const MAX_PREALLOC_F32: usize = 64 << 20;

/// Rebuilds the messages of one stream from its chunk events, checking that chunks come in
/// order, that sizes add up and that payloads are whole f32 values.
#[derive(Default)]
pub struct Assembler {
    next_seq: u64,
    message: Option<Partial>,
    /// The chunk being received, if any.
    chunk: Option<ChunkHead>,
    /// Bytes of an f32 split between two payload pieces.
    carry: [u8; 4],
    carried: usize,
}

/// A message being reassembled.
struct Partial {
    seq: u64,
    next_chunk: u32,
    total_bytes: usize,
    data: Vec<f32>,
}

impl Assembler {
    pub fn start(&mut self, c: ChunkHead) -> Result<(), String> {
        if self.chunk.is_some() {
            return Err("a chunk inside a chunk".into());
        }
        match &self.message {
            Some(p) => {
                if c.seq != p.seq || c.chunk_index != p.next_chunk {
                    return Err(format!(
                        "chunk {} of message {} while expecting chunk {} of message {}",
                        c.chunk_index, c.seq, p.next_chunk, p.seq
                    ));
                }
            }
            None => {
                if c.seq != self.next_seq || c.chunk_index != 0 {
                    return Err(format!(
                        "chunk {} of message {} while expecting message {}",
                        c.chunk_index, c.seq, self.next_seq
                    ));
                }
                let total_bytes = usize::try_from(c.total_bytes)
                    .ok()
                    .filter(|t| t.is_multiple_of(4))
                    .ok_or_else(|| {
                        format!("message {} announces {} bytes", c.seq, c.total_bytes)
                    })?;
                self.message = Some(Partial {
                    seq: c.seq,
                    next_chunk: 0,
                    total_bytes,
                    data: Vec::with_capacity((total_bytes / 4).min(MAX_PREALLOC_F32)),
                });
            }
        }
        self.chunk = Some(c);
        Ok(())
    }

    pub fn payload(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        let (Some(p), Some(_)) = (&mut self.message, &self.chunk) else {
            return Err("payload outside a chunk".into());
        };
        let have = p.data.len() * 4 + self.carried;
        if have + bytes.len() > p.total_bytes {
            return Err(format!(
                "message {}: {} more payload bytes after {have} of {}",
                p.seq,
                bytes.len(),
                p.total_bytes
            ));
        }
        if self.carried > 0 {
            let take = (4 - self.carried).min(bytes.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&bytes[..take]);
            self.carried += take;
            bytes = &bytes[take..];
            if self.carried < 4 {
                return Ok(());
            }
            p.data.push(f32::from_le_bytes(self.carry));
            self.carried = 0;
        }
        let whole = bytes.len() / 4 * 4;
        // As fast as a memcpy (measured), and no zero-filling first.
        crate::bytes::extend_f32_le(&mut p.data, &bytes[..whole]);
        let rest = &bytes[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
        Ok(())
    }

    /// Ends the current chunk; the message once its last chunk ends.
    pub fn end(&mut self) -> Result<Option<Vec<f32>>, String> {
        let (Some(p), Some(c)) = (&mut self.message, self.chunk.take()) else {
            return Err("a chunk end outside a chunk".into());
        };
        if self.carried != 0 {
            return Err(format!(
                "message {}: chunk {} is not whole f32 values",
                p.seq, c.chunk_index
            ));
        }
        p.next_chunk = p.next_chunk.wrapping_add(1);
        if !c.last {
            return Ok(None);
        }
        if p.data.len() * 4 != p.total_bytes {
            return Err(format!(
                "message {} ended at {} of {} bytes",
                p.seq,
                p.data.len() * 4,
                p.total_bytes
            ));
        }
        self.next_seq += 1;
        Ok(self.message.take().map(|p| p.data))
    }

    /// Whether the stream may end here (not inside a message).
    pub fn at_boundary(&self) -> bool {
        self.message.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_bytes(head: ChunkHead, payload: &[u8]) -> Vec<u8> {
        let mut v = encode_chunk_head(head, payload.len()).to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn head(seq: u64, chunk_index: u32, last: bool, total_bytes: u64) -> ChunkHead {
        ChunkHead {
            seq,
            chunk_index,
            last,
            total_bytes,
        }
    }

    /// Runs `pieces` through a parser and an assembler: the messages, or the first error.
    fn receive(pieces: &[Bytes]) -> Result<(Vec<Hello>, Vec<Vec<f32>>), String> {
        let (mut parser, mut asm) = (FrameParser::default(), Assembler::default());
        let (mut hellos, mut messages) = (Vec::new(), Vec::new());
        for piece in pieces {
            let mut data = piece.clone();
            while let Some(e) = parser.next(&mut data)? {
                match e {
                    Event::Hello(h) => hellos.push(h),
                    Event::ChunkStart(h) => asm.start(h)?,
                    Event::Payload(b) => asm.payload(&b)?,
                    Event::ChunkEnd => messages.extend(asm.end()?),
                }
            }
            assert!(data.is_empty());
        }
        if !parser.at_boundary() || !asm.at_boundary() {
            return Err("ended inside a message".into());
        }
        Ok((hellos, messages))
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn our_chunks_are_the_protobuf_messages_prost_writes() {
        for n in [0usize, 1, 3, 200, 4096, 1 << 20] {
            let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let h = head(7, 3, n % 2 == 0, 1 << 40);
            let ours = chunk_bytes(h, &payload);
            let theirs = encode_message(&PeerFrame {
                body: Some(peer_frame::Body::Chunk(TensorChunk {
                    seq: 7,
                    chunk_index: 3,
                    last: n % 2 == 0,
                    total_bytes: 1 << 40,
                    payload: payload.into(),
                })),
            });
            assert_eq!(ours, theirs.to_vec(), "payload of {n} bytes");
        }
    }

    #[test]
    fn messages_survive_any_split_of_the_stream() {
        let a: Vec<f32> = (0..300).map(|i| i as f32 - 0.5).collect();
        let b = vec![2.5f32; 3];
        let hello = Hello {
            src_rank: 1,
            dst_rank: 0,
            world: 2,
        };
        let mut stream = encode_hello(hello).to_vec();
        // Message 0 in two chunks (the second small enough to be buffered whole), message 1
        // in one, and an empty message 2.
        let ab = f32_bytes(&a);
        stream.extend(chunk_bytes(head(0, 0, false, 1200), &ab[..1000]));
        stream.extend(chunk_bytes(head(0, 1, true, 0), &ab[1000..]));
        stream.extend(chunk_bytes(head(1, 0, true, 12), &f32_bytes(&b)));
        stream.extend(chunk_bytes(head(2, 0, true, 0), &[]));
        let expected = (vec![hello], vec![a, b, vec![]]);
        assert_eq!(receive(&[stream.clone().into()]), Ok(expected.clone()));
        for cut in 1..stream.len() {
            let pieces = [
                Bytes::copy_from_slice(&stream[..cut]),
                Bytes::copy_from_slice(&stream[cut..]),
            ];
            assert_eq!(receive(&pieces), Ok(expected.clone()), "cut at {cut}");
        }
        let bytewise: Vec<Bytes> = stream.iter().map(|&b| Bytes::from(vec![b])).collect();
        assert_eq!(receive(&bytewise), Ok(expected));
    }

    #[test]
    fn hostile_streams_are_refused_with_the_reason() {
        let big = vec![0u8; 1000];
        let expect_err = |stream: Vec<u8>, says: &str| {
            let err = receive(&[stream.into()]).expect_err(says);
            assert!(err.contains(says), "{err:?} should say {says:?}");
        };
        // Compression, an absurd length, garbage, a big message that is not a chunk.
        expect_err(vec![1, 0, 0, 0, 0], "compressed flag 1");
        expect_err(vec![0, 0xff, 0xff, 0xff, 0xff], "the limit is");
        expect_err(vec![0, 0, 0, 0, 2, 0xff, 0xff], "undecodable");
        let mut not_chunk = vec![0, 0, 0, 4, 0];
        not_chunk.extend([0x0a; 1024]);
        expect_err(not_chunk, "not a tensor chunk");
        // A payload that is not the last field: prost would accept it, the stream may not.
        let mut late_field = encode_chunk_head(head(0, 0, true, 1000), 1000).to_vec();
        late_field.extend(&big);
        late_field.extend([0x08, 0x01]);
        let n = late_field.len() - PREFIX;
        late_field[1..5].copy_from_slice(&(n as u32).to_be_bytes());
        let chunk_len_at = PREFIX + 1;
        late_field[chunk_len_at..chunk_len_at + 2]
            .copy_from_slice(&[((n - 3) as u8 & 0x7f) | 0x80, ((n - 3) >> 7) as u8]);
        expect_err(late_field, "last field");
        // Out of order, sizes that do not add up, ragged floats, a stream cut mid-message.
        expect_err(
            chunk_bytes(head(1, 0, true, 1000), &big),
            "expecting message 0",
        );
        expect_err(
            chunk_bytes(head(0, 0, true, 996), &big),
            "more payload bytes",
        );
        expect_err(
            chunk_bytes(head(0, 0, true, 1004), &big),
            "ended at 1000 of 1004",
        );
        expect_err(
            chunk_bytes(head(0, 0, true, 998), &big[..998]),
            "announces 998",
        );
        let mut ragged = chunk_bytes(head(0, 0, false, 2000), &big[..998]);
        ragged.extend(chunk_bytes(head(0, 1, true, 0), &big[..2]));
        expect_err(ragged, "not whole f32");
        expect_err(
            chunk_bytes(head(0, 0, true, 1000), &big)[..700].to_vec(),
            "ended inside",
        );
        expect_err(
            chunk_bytes(head(0, 0, true, u64::MAX - 3), &big),
            "ended at 1000 of",
        );
    }
}
