//! Pure-Rust tokenizer for Grok-1's SentencePiece BPE model.
//!
//! Reproduces the reference SentencePiece library's `encode` (without bos/eos) and `decode`
//! for BPE models with an identity normalizer, which is what Grok-1 ships:
//!
//! * normalizer `identity`, empty `precompiled_charsmap` (no NFKC), `add_dummy_prefix`,
//!   `escape_whitespaces` (`' '` → `▁`), no `remove_extra_whitespaces`;
//! * 131072 pieces: 3 control (`[PAD]` `[BOS]` `[EOS]`), `[UNK]`, 65 user-defined
//!   (newline/tab/space runs, the ten digits, `<|separator|>`, `<|mask|>`,
//!   `<|control1..20|>`), 256 byte pieces `<0xXX>` for byte fallback, the rest normal.
//!
//! Text that merely looks like a control token (`[BOS]`, `<s>`) is encoded as ordinary text:
//! control pieces are only ever inserted by callers, never matched in text.
//!
//! The released model is embedded ([`Tokenizer::builtin`]); its license is
//! `shared/assets/LICENSE-grok-1-tokenizer.txt` (Apache-2.0).

mod bpe;
pub mod model_proto;
mod normalizer;
mod stream;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};

use prost::Message;

use self::model_proto::{ModelProto, ModelType, PieceType};
use self::normalizer::{Normalizer, PrefixMatcher, SPACE_SYMBOL};
use self::stream::{push_byte_run, BosSpace};

pub use self::stream::DecodeStream;

/// The released Grok-1 `tokenizer.model` (Apache-2.0, see `assets/LICENSE-grok-1-tokenizer.txt`).
const BUILTIN_MODEL: &[u8] = include_bytes!("../../assets/tokenizer.model");

/// Errors from loading a model or decoding ids.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The model file could not be read.
    #[error("reading tokenizer model {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The bytes are not a SentencePiece `ModelProto`.
    #[error("tokenizer model {origin}: not a valid SentencePiece model protobuf: {source}")]
    Protobuf {
        origin: String,
        source: prost::DecodeError,
    },
    /// The protobuf parsed but describes an inconsistent model.
    #[error("tokenizer model {origin}: {reason}")]
    InvalidModel { origin: String, reason: String },
    /// A valid model using a feature this tokenizer does not implement.
    #[error("tokenizer model {origin}: unsupported: {feature}")]
    Unsupported { origin: String, feature: String },
    /// A token id past the end of the vocabulary.
    #[error("token id {id} is out of range (vocabulary has {vocab_size} pieces)")]
    IdOutOfRange { id: u32, vocab_size: usize },
}

/// The role of a vocabulary piece (SentencePiece's piece type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PieceKind {
    /// Produced by BPE merges.
    Normal,
    /// The unknown-token piece (`[UNK]`).
    Unknown,
    /// Special tokens (`[PAD]`, `[BOS]`, `[EOS]`): never produced from text, decode to "".
    Control,
    /// Matched verbatim in the input and never merged further.
    UserDefined,
    /// In the vocabulary but split back into its parts when encoding.
    Unused,
    /// Byte-fallback piece `<0xXX>`.
    Byte,
}

impl PieceKind {
    /// Whether BPE can produce the piece from text (SentencePiece's `pieces_` map).
    fn is_mergeable(self) -> bool {
        matches!(self, Self::Normal | Self::UserDefined | Self::Unused)
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone)]
pub(crate) struct Piece {
    text: Box<str>,
    score: f32,
    kind: PieceKind,
    /// The byte a BYTE piece stands for.
    byte: Option<u8>,
}

/// FxHash-style hasher: piece lookups hash short strings on the hot path of BPE merging,
/// where SipHash would dominate. Keys come from the model file, not from callers.
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl FastHasher {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            // Mix in the length so "a" and "a\0" differ.
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // Fold high bits down: the table indexes with low bits and tags with the top 7.
        let h = self.0;
        (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 32)
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// A SentencePiece BPE tokenizer (encode without bos/eos, decode, streaming decode).
///
/// Immutable after loading, so it is `Send + Sync`: share one (e.g. in an `Arc`) rather than
/// re-parsing the model.
#[derive(Clone)]
pub struct Tokenizer {
    pieces: Vec<Piece>,
    /// Pieces BPE may produce (NORMAL, USER_DEFINED, UNUSED) → id.
    piece_ids: FastMap<Box<str>, u32>,
    /// CONTROL, UNKNOWN and BYTE pieces → id; only for [`Tokenizer::piece_to_id`].
    reserved_ids: FastMap<Box<str>, u32>,
    /// Mergeable pieces by rolling hash (see `bpe::HashIndex`).
    hash_index: Option<bpe::HashIndex>,
    /// Id emitted for each byte under byte fallback (`unk_id` where the piece is missing).
    byte_ids: [u32; 256],
    byte_fallback: bool,
    matcher: PrefixMatcher,
    normalizer: Normalizer,
    unk_id: u32,
    unk_surface: String,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    max_piece_bytes: usize,
    has_unused: bool,
    /// Whether encoding may cut the normalized text before each word-initial space symbol
    /// (see `bpe::BpeVocab::word_start`).
    split_words: bool,
}

impl std::fmt::Debug for Tokenizer {
    // A summary: the derived form would print all 131072 pieces.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.pieces.len())
            .field("byte_fallback", &self.byte_fallback)
            .field("normalizer", &self.normalizer)
            .field("unk_id", &self.unk_id)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a SentencePiece `.model` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::load(&bytes, path.display().to_string())
    }

    /// Parses a SentencePiece model from its serialized `ModelProto` bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        Self::load(bytes, "<bytes>".to_owned())
    }

    /// The released Grok-1 tokenizer, embedded in the library (no files needed at run time).
    ///
    /// Parses the embedded model on each call (about 0.1 s); keep the result.
    pub fn builtin() -> Result<Self, TokenizerError> {
        Self::load(BUILTIN_MODEL, "<builtin grok-1 tokenizer.model>".to_owned())
    }

    fn load(bytes: &[u8], origin: String) -> Result<Self, TokenizerError> {
        match ModelProto::decode(bytes) {
            Ok(proto) => Self::from_proto(proto, origin),
            Err(source) => Err(TokenizerError::Protobuf { origin, source }),
        }
    }

    /// Builds the tokenizer from a parsed model, checking it the way SentencePiece's
    /// `ModelInterface::InitializePieces` does and rejecting settings not implemented here.
    pub(crate) fn from_proto(proto: ModelProto, origin: String) -> Result<Self, TokenizerError> {
        let invalid = |reason: String| TokenizerError::InvalidModel {
            origin: origin.clone(),
            reason,
        };
        let unsupported = |feature: String| TokenizerError::Unsupported {
            origin: origin.clone(),
            feature,
        };

        let ModelProto {
            pieces: proto_pieces,
            trainer_spec,
            normalizer_spec,
            denormalizer_spec,
        } = proto;
        let trainer = trainer_spec.unwrap_or_default();
        let norm = normalizer_spec.unwrap_or_default();

        let model_type = trainer.model_type.unwrap_or(ModelType::Unigram as i32);
        if model_type != ModelType::Bpe as i32 {
            let name = ModelType::try_from(model_type)
                .map_or_else(|_| format!("unknown ({model_type})"), |t| format!("{t:?}"));
            return Err(unsupported(format!(
                "model type {name} (only BPE is implemented)"
            )));
        }
        if trainer.treat_whitespace_as_suffix() {
            return Err(unsupported("treat_whitespace_as_suffix".to_owned()));
        }
        if !norm.precompiled_charsmap().is_empty() {
            return Err(unsupported(format!(
                "normalizer {:?} with a precompiled character map (only identity normalization is implemented)",
                norm.name()
            )));
        }
        if denormalizer_spec.is_some_and(|d| !d.precompiled_charsmap().is_empty()) {
            return Err(unsupported("denormalizer character map".to_owned()));
        }
        if proto_pieces.is_empty() {
            return Err(invalid("the vocabulary is empty".to_owned()));
        }
        let vocab_size = u32::try_from(proto_pieces.len())
            .map_err(|_| invalid(format!("{} pieces do not fit u32 ids", proto_pieces.len())))?;
        let byte_fallback = trainer.byte_fallback();

        let mut pieces = Vec::with_capacity(proto_pieces.len());
        let mut piece_ids = FastMap::default();
        piece_ids.reserve(proto_pieces.len());
        let mut reserved_ids = FastMap::default();
        // Filled with real ids below; u32::MAX marks bytes without a piece.
        let mut byte_ids = [u32::MAX; 256];
        let mut unk_id = None;
        let mut max_piece_bytes = 0;
        let mut has_unused = false;
        for (id, sp) in (0..vocab_size).zip(proto_pieces) {
            let text: Box<str> = sp.piece.unwrap_or_default().into();
            if text.is_empty() {
                return Err(invalid(format!("piece {id} is empty")));
            }
            let raw_type = sp.r#type.unwrap_or(PieceType::Normal as i32);
            let kind = match PieceType::try_from(raw_type) {
                Ok(PieceType::Normal) => PieceKind::Normal,
                Ok(PieceType::Unknown) => PieceKind::Unknown,
                Ok(PieceType::Control) => PieceKind::Control,
                Ok(PieceType::UserDefined) => PieceKind::UserDefined,
                Ok(PieceType::Unused) => PieceKind::Unused,
                Ok(PieceType::Byte) => PieceKind::Byte,
                Err(_) => {
                    return Err(invalid(format!(
                        "piece {id} {text:?} has unknown type {raw_type}"
                    )))
                }
            };
            let mut byte = None;
            match kind {
                PieceKind::Unknown => {
                    if let Some(prev) = unk_id {
                        return Err(invalid(format!(
                            "unknown piece defined twice (ids {prev} and {id})"
                        )));
                    }
                    unk_id = Some(id);
                }
                PieceKind::Byte => {
                    if !byte_fallback {
                        return Err(invalid(format!(
                            "byte piece {id} {text:?} in a model without byte_fallback"
                        )));
                    }
                    let b = parse_byte_piece(&text).ok_or_else(|| {
                        invalid(format!("byte piece {id} is {text:?}, not <0xXX>"))
                    })?;
                    byte_ids[usize::from(b)] = id;
                    byte = Some(b);
                }
                PieceKind::Unused => has_unused = true,
                _ => {}
            }
            // Unique across all kinds, so a text match can never yield a control id.
            if piece_ids.contains_key(&text) || reserved_ids.contains_key(&text) {
                return Err(invalid(format!(
                    "piece {text:?} (id {id}) is defined twice"
                )));
            }
            if kind.is_mergeable() {
                max_piece_bytes = max_piece_bytes.max(text.len());
                piece_ids.insert(text.clone(), id);
            } else {
                reserved_ids.insert(text.clone(), id);
            }
            pieces.push(Piece {
                text,
                // -0.0 → 0.0 so the merge order's total_cmp agrees with C++ float `<`.
                score: sp.score.unwrap_or(0.0) + 0.0,
                kind,
                byte,
            });
        }
        let unk_id = unk_id.ok_or_else(|| invalid("no unknown piece is defined".to_owned()))?;

        // Bytes without a piece fall back to <unk>, as SentencePiece's PieceToId does.
        for id in &mut byte_ids {
            if *id == u32::MAX {
                *id = unk_id;
            }
        }
        let matcher = PrefixMatcher::new(
            pieces
                .iter()
                .filter(|p| p.kind == PieceKind::UserDefined)
                .map(|p| &*p.text),
        );
        let hash_index = bpe::HashIndex::build(&pieces, max_piece_bytes);
        let normalizer = Normalizer {
            add_dummy_prefix: norm.add_dummy_prefix(),
            remove_extra_whitespaces: norm.remove_extra_whitespaces(),
            escape_whitespaces: norm.escape_whitespaces(),
        };
        // A merge can cross a "non-space | space" boundary only through a piece that
        // contains such a pair; without one, words can be merged independently.
        let space = normalizer.space_char();
        let split_words = !piece_ids.keys().any(|p| {
            p.match_indices(space)
                .any(|(i, _)| i > 0 && !p[..i].ends_with(space))
        });
        let special = |id: i32| u32::try_from(id).ok().filter(|&id| id < vocab_size);

        Ok(Self {
            normalizer,
            split_words,
            hash_index,
            unk_surface: trainer.unk_surface().to_owned(),
            bos_id: special(trainer.bos_id()),
            eos_id: special(trainer.eos_id()),
            pad_id: special(trainer.pad_id()),
            pieces,
            piece_ids,
            reserved_ids,
            byte_ids,
            byte_fallback,
            matcher,
            unk_id,
            max_piece_bytes,
            has_unused,
        })
    }

    /// Encodes `text` to ids exactly as SentencePiece's `encode` does, without bos/eos.
    ///
    /// Never fails: characters without a piece become byte-fallback pieces (one per UTF-8
    /// byte), or the unknown id in models without byte fallback.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let normalized = self.normalizer.normalize(text, &self.matcher);
        let vocab = bpe::BpeVocab {
            piece_ids: &self.piece_ids,
            pieces: &self.pieces,
            has_unused: self.has_unused,
            max_piece_bytes: self.max_piece_bytes,
            matcher: &self.matcher,
            hash_index: self.hash_index.as_ref(),
            word_start: self.split_words.then(|| self.normalizer.space_char()),
        };
        let segments = bpe::segment(&vocab, &normalized);
        let mut ids = Vec::with_capacity(segments.len());
        for (piece, id) in segments {
            match id {
                Some(id) => ids.push(id),
                None if self.byte_fallback => {
                    ids.extend(piece.bytes().map(|b| self.byte_ids[usize::from(b)]));
                }
                // SentencePiece folds a run of unknown pieces into one <unk>.
                None if ids.last() == Some(&self.unk_id) => {}
                None => ids.push(self.unk_id),
            }
        }
        ids
    }

    /// Decodes ids to text the way SentencePiece's `decode` does.
    ///
    /// Control pieces decode to nothing; the unknown piece to the model's `unk_surface`;
    /// runs of byte pieces are reassembled as UTF-8, each byte that does not start a valid
    /// character becoming U+FFFD; `▁` becomes a space, and the leading dummy-prefix space of
    /// the first piece is dropped. Any id `>= vocab_size()` is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        // Validate first so an error never comes with partial work, as in SentencePiece.
        for &id in ids {
            self.check_id(id)?;
        }
        let mut text = String::new();
        let mut bos = BosSpace::new();
        let mut run: Vec<u8> = Vec::new();
        for &id in ids {
            if let Some(byte) = self.byte_value(id) {
                run.push(byte);
                continue;
            }
            push_byte_run(&run, &mut text);
            run.clear();
            let text_empty = text.is_empty();
            bos.push_piece(self, id, text_empty, &mut text);
        }
        push_byte_run(&run, &mut text);
        Ok(text)
    }

    /// Starts an incremental decoder whose output, concatenated, equals [`Tokenizer::decode`].
    pub fn decode_stream(&self) -> DecodeStream<'_> {
        DecodeStream::new(self)
    }

    /// Number of pieces; valid ids are `0..vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Beginning-of-sequence id from the model's trainer spec (Grok-1: 1, `[BOS]`), if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// End-of-sequence id (Grok-1: 2, `[EOS]`), if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Padding id (Grok-1: 0, `[PAD]`), if any.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Id of the unknown piece (Grok-1: 3, `[UNK]`).
    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// The piece string of `id` (with `▁` for spaces), or `None` if out of range.
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| &*p.text)
    }

    /// The id of an exact piece string (any kind, including control and byte pieces).
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.piece_ids
            .get(piece)
            .or_else(|| self.reserved_ids.get(piece))
            .copied()
    }

    /// The kind of piece `id`, or `None` if out of range.
    pub fn piece_kind(&self, id: u32) -> Option<PieceKind> {
        self.pieces.get(id as usize).map(|p| p.kind)
    }

    pub(crate) fn check_id(&self, id: u32) -> Result<(), TokenizerError> {
        if (id as usize) < self.pieces.len() {
            Ok(())
        } else {
            Err(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.pieces.len(),
            })
        }
    }

    /// The byte a BYTE piece stands for.
    #[inline]
    pub(crate) fn byte_value(&self, id: u32) -> Option<u8> {
        self.pieces.get(id as usize).and_then(|p| p.byte)
    }

    /// Appends the surface of non-byte piece `id` (SentencePiece's `DecodeSentencePiece`);
    /// returns whether a leading dummy-prefix `▁` was consumed.
    pub(crate) fn push_piece_surface(&self, id: u32, is_bos_ws: bool, out: &mut String) -> bool {
        let Some(piece) = self.pieces.get(id as usize) else {
            return false;
        };
        match piece.kind {
            PieceKind::Control => false,
            PieceKind::Unknown => {
                out.push_str(&self.unk_surface);
                false
            }
            _ => {
                let mut text = &*piece.text;
                let mut consumed = false;
                if is_bos_ws
                    && (self.normalizer.add_dummy_prefix
                        || self.normalizer.remove_extra_whitespaces)
                {
                    if let Some(rest) = text.strip_prefix(SPACE_SYMBOL) {
                        text = rest;
                        // With remove_extra_whitespaces SentencePiece does not count this
                        // as the one stripped prefix.
                        consumed = !self.normalizer.remove_extra_whitespaces;
                    }
                }
                for (i, part) in text.split(SPACE_SYMBOL).enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    out.push_str(part);
                }
                consumed
            }
        }
    }
}

/// Parses `<0xXX>` (two upper-case hex digits, as SentencePiece writes them).
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
