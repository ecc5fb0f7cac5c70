//! SentencePiece BPE segmentation (`bpe_model.cc`) over normalized text.
//!
//! The text is split into characters (user-defined symbols stay whole and frozen), then the
//! adjacent pair whose concatenation is a vocabulary piece with the highest score is merged
//! repeatedly, leftmost first on ties. Candidates live in a binary heap with lazy deletion
//! and the symbols in a doubly linked list, so a merge costs O(log n), not a rescan.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::normalizer::PrefixMatcher;
use super::{FastMap, Piece, PieceKind};

const NONE: usize = usize::MAX;
const NO_ID: u32 = u32::MAX;

/// Key of the pair (left, right) in `BpeVocab::merges`.
#[inline]
pub(super) fn merge_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

/// What the merge loop needs to know about the vocabulary.
pub(super) struct BpeVocab<'a> {
    /// Mergeable pieces (NORMAL, USER_DEFINED, UNUSED) → id.
    pub(super) piece_ids: &'a FastMap<Box<str>, u32>,
    /// The vocabulary by id (scores, and which pieces are UNUSED: merged, then split back).
    pub(super) pieces: &'a [Piece],
    /// Whether any piece is UNUSED, so the bookkeeping for re-splitting can be skipped.
    pub(super) has_unused: bool,
    /// `merge_key(left id, right id)` → id of the concatenation, for every mergeable piece
    /// that splits into two mergeable pieces; saves hashing strings in the merge loop.
    pub(super) merges: &'a FastMap<u64, u32>,
    /// Single-character mergeable pieces → id.
    pub(super) char_ids: &'a FastMap<char, u32>,
    /// Longest piece in bytes: longer concatenations need no lookup.
    pub(super) max_piece_bytes: usize,
    pub(super) matcher: &'a PrefixMatcher,
    /// The space symbol before which the text may be cut into independent words: set when
    /// no piece contains a non-space character followed by it (true for Grok-1), so no merge
    /// can cross such a cut and each word can be merged alone with the same result.
    pub(super) word_start: Option<char>,
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
    /// Vocabulary id of the symbol's text, `NO_ID` if it has none (or is frozen).
    id: u32,
    /// User-defined symbols never take part in merges.
    frozen: bool,
}

/// A merge candidate; may be stale by the time it is popped.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged piece, used to detect staleness.
    size: usize,
    /// Id of the merged piece.
    id: u32,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap: higher score first, then the leftmost pair.
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// A segment of the final segmentation: its text and, if it is in the vocabulary, its id.
pub(super) type Segment<'t> = (&'t str, Option<u32>);

/// Segments `normalized` into pieces. Ids are `None` for text that is not a vocabulary
/// piece (a lone unknown character); the caller applies byte fallback / `<unk>`.
pub(super) fn segment<'t>(vocab: &BpeVocab<'_>, normalized: &'t str) -> Vec<Segment<'t>> {
    let mut out = Vec::with_capacity(normalized.len() / 3);
    let mut scratch = Scratch::default();
    // UNUSED pieces are re-split with a table SentencePiece keeps for the whole text, so
    // only cut the text into words when there are none.
    match vocab.word_start.filter(|_| !vocab.has_unused) {
        Some(space) => {
            // Words are short, so the merge heaps stay small and cache-resident; one heap
            // over a long text spends most of its time on cache misses.
            let mut start = 0;
            for (i, _) in normalized.match_indices(space) {
                if i > start && !normalized[..i].ends_with(space) {
                    segment_word(vocab, &normalized[start..i], &mut scratch, &mut out);
                    start = i;
                }
            }
            segment_word(vocab, &normalized[start..], &mut scratch, &mut out);
        }
        None => segment_word(vocab, normalized, &mut scratch, &mut out),
    }
    out
}

/// Buffers reused across words.
#[derive(Default)]
struct Scratch {
    symbols: Vec<Symbol>,
    agenda: BinaryHeap<Candidate>,
}

/// Runs the merge loop on one independent span and appends its segments to `out`.
fn segment_word<'t>(
    vocab: &BpeVocab<'_>,
    normalized: &'t str,
    scratch: &mut Scratch,
    out: &mut Vec<Segment<'t>>,
) {
    let Scratch { symbols, agenda } = scratch;
    symbols.clear();
    agenda.clear();
    let mut pos = 0;
    while pos < normalized.len() {
        let rest = &normalized[pos..];
        let (len, frozen, id) = match vocab.matcher.longest_match(rest) {
            Some(n) => (n, true, NO_ID),
            None => match rest.chars().next() {
                Some(c) => (
                    c.len_utf8(),
                    false,
                    vocab.char_ids.get(&c).copied().unwrap_or(NO_ID),
                ),
                None => break,
            },
        };
        let index = symbols.len();
        symbols.push(Symbol {
            start: pos,
            len,
            prev: if index == 0 { NONE } else { index - 1 },
            next: index + 1,
            id,
            frozen,
        });
        pos += len;
    }
    let Some(last) = symbols.last_mut() else {
        return;
    };
    last.next = NONE;

    // Merged UNUSED piece → the two parts it was made of (SentencePiece's `rev_merge`).
    let mut rev_merge: HashMap<&'t str, (&'t str, &'t str)> = HashMap::new();

    let mut try_pair =
        |symbols: &[Symbol], agenda: &mut BinaryHeap<Candidate>, left: usize, right: usize| {
            if left == NONE || right == NONE {
                return;
            }
            let (l, r): (&Symbol, &Symbol) = (&symbols[left], &symbols[right]);
            if l.frozen || r.frozen || l.len + r.len > vocab.max_piece_bytes {
                return;
            }
            let merged = &normalized[l.start..r.start + r.len];
            let found = if l.id != NO_ID && r.id != NO_ID {
                vocab.merges.get(&merge_key(l.id, r.id))
            } else {
                // A character outside the vocabulary can still be part of a piece.
                vocab.piece_ids.get(merged)
            };
            let Some(&id) = found else {
                return;
            };
            let piece = vocab.pieces.get(id as usize);
            agenda.push(Candidate {
                score: piece.map_or(0.0, |p| p.score),
                left,
                right,
                size: merged.len(),
                id,
            });
            if vocab.has_unused && piece.is_some_and(|p| p.kind == PieceKind::Unused) {
                rev_merge.insert(
                    merged,
                    (
                        &normalized[l.start..l.start + l.len],
                        &normalized[r.start..r.start + r.len],
                    ),
                );
            }
        };

    for i in 1..symbols.len() {
        try_pair(symbols, agenda, i - 1, i);
    }

    while let Some(top) = agenda.pop() {
        let (l, r) = (symbols[top.left], symbols[top.right]);
        // Stale: one side was merged away or grew since the candidate was pushed.
        if l.len == 0 || r.len == 0 || l.len + r.len != top.size {
            continue;
        }
        let merged = &mut symbols[top.left];
        merged.len = top.size;
        merged.next = r.next;
        merged.id = top.id;
        if r.next != NONE {
            symbols[r.next].prev = top.left;
        }
        symbols[top.right].len = 0;

        try_pair(symbols, agenda, l.prev, top.left);
        try_pair(symbols, agenda, top.left, r.next);
    }

    let mut index = 0;
    while index != NONE {
        let s = symbols[index];
        let text = &normalized[s.start..s.start + s.len];
        if vocab.has_unused {
            resegment(vocab, &rev_merge, text, out);
        } else if s.id != NO_ID {
            out.push((text, Some(s.id)));
        } else {
            // User-defined symbols and characters outside the vocabulary.
            out.push((text, vocab.piece_ids.get(text).copied()));
        }
        index = s.next;
    }
}

/// Splits UNUSED pieces back into the parts they were merged from (recursively).
fn resegment<'t>(
    vocab: &BpeVocab<'_>,
    rev_merge: &HashMap<&'t str, (&'t str, &'t str)>,
    text: &'t str,
    out: &mut Vec<Segment<'t>>,
) {
    // Explicit stack: a hostile model could nest UNUSED pieces deeply.
    let mut stack = vec![text];
    while let Some(w) = stack.pop() {
        let id = vocab.piece_ids.get(w).copied();
        let is_unused = id
            .and_then(|id| vocab.pieces.get(id as usize))
            .is_some_and(|p| p.kind == PieceKind::Unused);
        match rev_merge.get(w) {
            Some(&(left, right)) if is_unused => {
                stack.push(right);
                stack.push(left);
            }
            _ => out.push((w, id)),
        }
    }
}
