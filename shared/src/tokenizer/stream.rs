//! Incremental decoding, and the byte-run → text rule it shares with [`Tokenizer::decode`].

use std::ops::Deref;
use std::sync::Arc;

use super::{Tokenizer, TokenizerError};

const REPLACEMENT: char = '\u{FFFD}';

/// Bytes a UTF-8 sequence starting with `lead` claims; 1 for ASCII and for bytes that cannot
/// start a sequence (those decode to U+FFFD on their own).
#[inline]
fn claimed_len(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

/// SentencePiece's `IsValidDecodeUTF8` on a non-empty byte slice: the length of the valid
/// character at the front, or `None` when the front byte must become one U+FFFD.
///
/// `bytes` must hold at least [`claimed_len`] bytes for the verdict to be final; with fewer,
/// the character is reported invalid, which is what SentencePiece does at the end of a run.
#[inline]
fn front_char(bytes: &[u8]) -> Option<(&str, usize)> {
    let n = claimed_len(*bytes.first()?);
    // Rust's UTF-8 validation rejects exactly what SentencePiece's DecodeUTF8 rejects:
    // bad continuation bytes, overlong forms, surrogates and code points past U+10FFFF.
    let s = std::str::from_utf8(bytes.get(..n)?).ok()?;
    Some((s, n))
}

/// Appends a complete run of byte-fallback bytes the way SentencePiece's decoder does: each
/// valid character as is, each byte that does not start a valid character as one U+FFFD
/// (unlike `String::from_utf8_lossy`, which folds a truncated sequence into one U+FFFD).
pub(super) fn push_byte_run(bytes: &[u8], out: &mut String) {
    let mut rest = bytes;
    while !rest.is_empty() {
        match front_char(rest) {
            Some((s, n)) => {
                out.push_str(s);
                rest = &rest[n..];
            }
            None => {
                out.push(REPLACEMENT);
                rest = &rest[1..];
            }
        }
    }
}

/// Like [`push_byte_run`] for a run that may continue: stops before a trailing incomplete
/// character that may still turn out valid, and returns how many bytes were consumed.
fn push_byte_prefix(bytes: &[u8], out: &mut String) -> usize {
    let mut pos = 0;
    while let Some(&lead) = bytes.get(pos) {
        let rest = &bytes[pos..];
        if rest.len() < claimed_len(lead) {
            // Hold the bytes only while they can still become a valid character; an already
            // broken prefix gives U+FFFD for its lead byte now, as it will at any length.
            let could_complete =
                matches!(std::str::from_utf8(rest), Err(e) if e.error_len().is_none());
            if could_complete {
                break;
            }
            out.push(REPLACEMENT);
            pos += 1;
            continue;
        }
        match front_char(rest) {
            Some((s, n)) => {
                out.push_str(s);
                pos += n;
            }
            None => {
                out.push(REPLACEMENT);
                pos += 1;
            }
        }
    }
    pos
}

/// Whether-to-strip state for the dummy-prefix space, shared by batch and stream decoding.
///
/// SentencePiece strips one leading `▁` from the first non-byte piece, until a piece had its
/// `▁` stripped or any text was produced.
#[derive(Debug, Clone, Copy)]
pub(super) struct BosSpace {
    pub(super) is_bos_ws: bool,
    pub(super) bos_ws_seen: bool,
}

impl BosSpace {
    pub(super) fn new() -> Self {
        Self {
            is_bos_ws: true,
            bos_ws_seen: false,
        }
    }

    /// Appends the surface of non-byte piece `id`; `text_empty` tells whether any text was
    /// produced so far (including byte runs flushed just before this piece).
    pub(super) fn push_piece(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        text_empty: bool,
        out: &mut String,
    ) {
        if self.bos_ws_seen || !text_empty {
            self.is_bos_ws = false;
        }
        self.bos_ws_seen = tok.push_piece_surface(id, self.is_bos_ws, out);
    }
}

/// Incremental decoder: feed ids one at a time, get text as soon as it is final.
///
/// Byte-fallback pieces that form an incomplete UTF-8 character are held back until the
/// character is complete (or proven invalid), so every chunk is whole characters; the
/// concatenation of all chunks plus [`DecodeStream::finish`] equals [`Tokenizer::decode`] of
/// all ids.
///
/// ```
/// # use grok_shared::tokenizer::Tokenizer;
/// let tok = Tokenizer::builtin()?;
/// let ids = tok.encode("naïve 🚀");
/// let mut stream = tok.decode_stream();
/// let mut text = String::new();
/// for &id in &ids {
///     if let Some(chunk) = stream.step(id)? {
///         text.push_str(&chunk);
///     }
/// }
/// text.push_str(&stream.finish());
/// assert_eq!(text, tok.decode(&ids)?);
/// # Ok::<(), grok_shared::tokenizer::TokenizerError>(())
/// ```
#[derive(Debug, Clone)]
pub struct DecodeStream<'a> {
    tok: TokenizerRef<'a>,
    /// Held-back bytes of an unfinished, so far valid character (at most 3).
    pending: Vec<u8>,
    bos: BosSpace,
    text_empty: bool,
}

impl<'a> DecodeStream<'a> {
    pub(super) fn new(tok: &'a Tokenizer) -> Self {
        Self {
            tok: TokenizerRef::Borrowed(tok),
            pending: Vec::with_capacity(4),
            bos: BosSpace::new(),
            text_empty: true,
        }
    }

    /// Feeds one id. Returns the text it completes, or `None` when it adds nothing yet (a
    /// control piece, or a byte held back as part of an unfinished character).
    ///
    /// An out-of-range id is an error and leaves the stream unchanged.
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.tok.check_id(id)?;
        let mut out = String::new();
        if let Some(byte) = self.tok.byte_value(id) {
            self.pending.push(byte);
            let used = push_byte_prefix(&self.pending, &mut out);
            self.pending.drain(..used);
        } else {
            push_byte_run(&self.pending, &mut out);
            self.pending.clear();
            let text_empty = self.text_empty && out.is_empty();
            self.bos.push_piece(&self.tok, id, text_empty, &mut out);
        }
        if out.is_empty() {
            return Ok(None);
        }
        self.text_empty = false;
        Ok(Some(out))
    }

    /// The held-back bytes of an unfinished character (empty when none); they come out with
    /// a later step, or from [`DecodeStream::finish`].
    pub fn pending_bytes(&self) -> &[u8] {
        &self.pending
    }

    /// Ends the stream, returning the text of any held-back bytes (an unfinished character
    /// becomes one U+FFFD per byte, as in [`Tokenizer::decode`]).
    pub fn finish(self) -> String {
        let mut out = String::new();
        push_byte_run(&self.pending, &mut out);
        out
    }
}

impl DecodeStream<'static> {
    /// A stream holding a share of its tokenizer rather than a borrow, so that it can live in
    /// long-lived, `Send + 'static` state (e.g. one per sequence in a server).
    ///
    /// ```
    /// # use grok_shared::tokenizer::{DecodeStream, Tokenizer};
    /// # use std::sync::Arc;
    /// let tok = Arc::new(Tokenizer::builtin()?);
    /// let ids = tok.encode("€ and 🚀");
    /// let mut stream = DecodeStream::shared(Arc::clone(&tok));
    /// let mut text = String::new();
    /// for &id in &ids {
    ///     text.extend(stream.step(id)?);
    /// }
    /// text.push_str(&stream.finish());
    /// assert_eq!(text, tok.decode(&ids)?);
    /// # Ok::<(), grok_shared::tokenizer::TokenizerError>(())
    /// ```
    pub fn shared(tok: Arc<Tokenizer>) -> Self {
        Self {
            tok: TokenizerRef::Shared(tok),
            pending: Vec::with_capacity(4),
            bos: BosSpace::new(),
            text_empty: true,
        }
    }
}

/// How a [`DecodeStream`] holds its tokenizer.
#[derive(Debug, Clone)]
enum TokenizerRef<'a> {
    Borrowed(&'a Tokenizer),
    Shared(Arc<Tokenizer>),
}

impl Deref for TokenizerRef<'_> {
    type Target = Tokenizer;

    #[inline]
    fn deref(&self) -> &Tokenizer {
        match self {
            Self::Borrowed(tok) => tok,
            Self::Shared(tok) => tok,
        }
    }
}
