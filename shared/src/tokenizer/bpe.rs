//! SentencePiece BPE segmentation (`bpe_model.cc`) over normalized text.
//!
//! The text is split into characters (user-defined symbols stay whole and frozen), then the
//! adjacent pair whose concatenation is a vocabulary piece with the highest score is merged
//! repeatedly, leftmost first on ties. Candidates live in a binary heap with lazy deletion
//! and the symbols in a doubly linked list, so a merge costs O(log n), not a rescan.
//! Pieces are found by a rolling hash, so checking a pair costs no rehash of its text.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::normalizer::{first_char_len, PrefixMatcher};
use super::{FastMap, Piece, PieceKind};

const NONE: usize = usize::MAX;
const NO_ID: u32 = u32::MAX;

/// Multiplier of the polynomial rolling hash (odd, so its powers never vanish mod 2^64).
const HASH_BASE: u64 = 0x9E37_79B9_7F4A_7C15;

/// Polynomial hash of `bytes` mod 2^64: `hash(a + b) = hash(a) * BASE^len(b) + hash(b)`.
#[inline]
fn rolling_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |h: u64, &b| {
        h.wrapping_mul(HASH_BASE).wrapping_add(u64::from(b) + 1)
    })
}

/// Mergeable pieces keyed by their rolling hash, so the key of a concatenation comes from
/// its parts' keys in O(1). Hits are verified against the piece text, so a text whose hash
/// happens to equal a piece's is never mistaken for it.
#[derive(Debug, Clone)]
pub(super) struct HashIndex {
    entries: FastMap<u64, IndexEntry>,
    /// All indexed piece texts back to back: verifying a hit reads one place, not a
    /// separate allocation per piece.
    arena: Vec<u8>,
    /// `HASH_BASE^k` for `k` in `0..=max_piece_bytes`.
    pow: Vec<u64>,
}

/// What the merge loop needs of a piece, stored in the index to avoid another memory access.
#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    id: u32,
    score: f32,
    /// The piece text is `arena[offset..offset + len]`.
    offset: u32,
    len: u32,
}

impl HashIndex {
    /// `None` if two pieces share a hash or the texts exceed 4 GiB; callers then fall back
    /// to the string map.
    pub(super) fn build(pieces: &[Piece], max_piece_bytes: usize) -> Option<Self> {
        let mut entries = FastMap::default();
        entries.reserve(pieces.len());
        let mut arena = Vec::new();
        for (id, p) in (0u32..).zip(pieces) {
            if !p.kind.is_mergeable() {
                continue;
            }
            let text = p.text.as_bytes();
            let entry = IndexEntry {
                id,
                score: p.score,
                offset: u32::try_from(arena.len()).ok()?,
                len: u32::try_from(text.len()).ok()?,
            };
            arena.extend_from_slice(text);
            if entries.insert(rolling_hash(text), entry).is_some() {
                return None;
            }
        }
        let pow = std::iter::successors(Some(1u64), |p| Some(p.wrapping_mul(HASH_BASE)))
            .take(max_piece_bytes + 1)
            .collect();
        Some(Self {
            entries,
            arena,
            pow,
        })
    }

    /// The entry for `text`, whose rolling hash is `hash`.
    #[inline]
    fn get(&self, text: &str, hash: u64) -> Option<IndexEntry> {
        let e = *self.entries.get(&hash)?;
        let start = e.offset as usize;
        let stored = self.arena.get(start..start + e.len as usize)?;
        (stored == text.as_bytes()).then_some(e)
    }

    /// Hash of `left + right` from the parts' hashes.
    #[inline]
    fn combine(&self, left: u64, right: u64, right_len: usize) -> u64 {
        // right_len < max_piece_bytes whenever this is called (longer pairs are skipped).
        let pow = self.pow.get(right_len).copied().unwrap_or(0);
        left.wrapping_mul(pow).wrapping_add(right)
    }
}

/// What the merge loop needs to know about the vocabulary.
pub(super) struct BpeVocab<'a> {
    /// Mergeable pieces (NORMAL, USER_DEFINED, UNUSED) → id.
    pub(super) piece_ids: &'a FastMap<Box<str>, u32>,
    /// The vocabulary by id (scores, and which pieces are UNUSED: merged, then split back).
    pub(super) pieces: &'a [Piece],
    /// Whether any piece is UNUSED, so the bookkeeping for re-splitting can be skipped.
    pub(super) has_unused: bool,
    /// Fast lookup by rolling hash; `None` only for models with colliding piece hashes.
    pub(super) hash_index: Option<&'a HashIndex>,
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
    /// Vocabulary id of a merged symbol; `NO_ID` until the symbol is merged.
    id: u32,
    /// Rolling hash of the symbol's text.
    hash: u64,
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
    /// Id and rolling hash of the merged piece.
    id: u32,
    hash: u64,
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

impl BpeVocab<'_> {
    /// Id and score of mergeable piece `text`, whose rolling hash is `hash`.
    #[inline]
    fn lookup(&self, text: &str, hash: u64) -> Option<(u32, f32)> {
        match self.hash_index {
            Some(index) => index.get(text, hash).map(|e| (e.id, e.score)),
            None => {
                let id = *self.piece_ids.get(text)?;
                Some((id, self.pieces.get(id as usize)?.score))
            }
        }
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
        let (len, frozen) = match vocab.matcher.longest_match(rest) {
            Some(n) => (n, true),
            None => (first_char_len(rest), false),
        };
        if len == 0 {
            break;
        }
        let index = symbols.len();
        symbols.push(Symbol {
            start: pos,
            len,
            prev: if index == 0 { NONE } else { index - 1 },
            next: index + 1,
            id: NO_ID,
            hash: rolling_hash(&rest.as_bytes()[..len]),
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
            let hash = vocab
                .hash_index
                .map_or(0, |index| index.combine(l.hash, r.hash, r.len));
            let Some((id, score)) = vocab.lookup(merged, hash) else {
                return;
            };
            agenda.push(Candidate {
                score,
                left,
                right,
                size: merged.len(),
                id,
                hash,
            });
            let unused = || {
                vocab
                    .pieces
                    .get(id as usize)
                    .is_some_and(|p| p.kind == PieceKind::Unused)
            };
            if vocab.has_unused && unused() {
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
        merged.hash = top.hash;
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
            // Unmerged: a single character (maybe outside the vocabulary) or user symbol.
            out.push((text, vocab.lookup(text, s.hash).map(|(id, _)| id)));
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
