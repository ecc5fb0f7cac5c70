//! SentencePiece's text normalization for models whose `precompiled_charsmap` is empty
//! (identity normalization), plus the longest-prefix matcher for user-defined symbols.
//!
//! Mirrors `normalizer.cc`: optional removal of leading/trailing/repeated spaces, a dummy
//! `▁` prefix, and escaping `' '` as U+2581. Character-map rules (NFKC etc.) are not
//! implemented; models that carry them are rejected at load time.

/// The visible space symbol SentencePiece substitutes for `' '` (U+2581).
pub(super) const SPACE_SYMBOL: &str = "\u{2581}";

/// Longest-prefix matcher over the user-defined symbols (SentencePiece's `PrefixMatcher`).
///
/// Candidates are bucketed by first byte and sorted longest first, so a lookup costs one
/// table probe for the common case of a byte no symbol starts with.
#[derive(Debug, Clone)]
pub(super) struct PrefixMatcher {
    by_first_byte: Vec<Vec<Box<str>>>,
    empty: bool,
}

impl PrefixMatcher {
    pub(super) fn new<'a>(symbols: impl IntoIterator<Item = &'a str>) -> Self {
        let mut by_first_byte: Vec<Vec<Box<str>>> = vec![Vec::new(); 256];
        let mut empty = true;
        for s in symbols {
            if let Some(&b) = s.as_bytes().first() {
                by_first_byte[usize::from(b)].push(s.into());
                empty = false;
            }
        }
        for bucket in &mut by_first_byte {
            // Longest first: the first hit is the longest match, as in SentencePiece.
            bucket.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
            bucket.dedup();
        }
        Self {
            by_first_byte,
            empty,
        }
    }

    /// Byte length of the longest user-defined symbol that `text` starts with, if any.
    #[inline]
    pub(super) fn longest_match(&self, text: &str) -> Option<usize> {
        if self.empty {
            return None;
        }
        let first = *text.as_bytes().first()?;
        self.by_first_byte[usize::from(first)]
            .iter()
            .find(|s| text.starts_with(&***s))
            .map(|s| s.len())
    }
}

/// Runtime settings of `NormalizerSpec` (identity character map only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Normalizer {
    pub(super) add_dummy_prefix: bool,
    pub(super) remove_extra_whitespaces: bool,
    pub(super) escape_whitespaces: bool,
}

/// Byte length of the first character of a non-empty `s`.
#[inline]
pub(super) fn first_char_len(s: &str) -> usize {
    s.chars().next().map_or(0, char::len_utf8)
}

impl Normalizer {
    /// What a space becomes in normalized text.
    pub(super) fn space(&self) -> &'static str {
        if self.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            " "
        }
    }

    /// [`Normalizer::space`] as a `char`.
    pub(super) fn space_char(&self) -> char {
        if self.escape_whitespaces {
            '\u{2581}'
        } else {
            ' '
        }
    }

    /// Normalizes `text` the way `Normalizer::Normalize` does with an empty charsmap.
    pub(super) fn normalize(&self, text: &str, matcher: &PrefixMatcher) -> String {
        let space = self.space();
        // The normalizer consumes a user-defined symbol or else one character at a time.
        let next_unit = |s: &str| {
            matcher
                .longest_match(s)
                .unwrap_or_else(|| first_char_len(s))
        };

        let mut input = text;
        if self.remove_extra_whitespaces {
            while !input.is_empty() {
                let n = next_unit(input);
                if &input[..n] != " " {
                    break;
                }
                input = &input[n..];
            }
        }
        // Empty (or all-space) input gets no dummy prefix.
        if input.is_empty() {
            return String::new();
        }

        let mut out = String::with_capacity(input.len() + input.len() / 2 + space.len());
        if self.add_dummy_prefix {
            out.push_str(space);
        }

        if !self.remove_extra_whitespaces {
            // With an identity map every unit is copied verbatim, so unit boundaries (and
            // hence the matcher) do not matter: escape spaces in one pass.
            if self.escape_whitespaces {
                for (i, chunk) in input.split(' ').enumerate() {
                    if i > 0 {
                        out.push_str(SPACE_SYMBOL);
                    }
                    out.push_str(chunk);
                }
            } else {
                out.push_str(input);
            }
            return out;
        }

        let mut is_prev_space = true;
        while !input.is_empty() {
            let n = next_unit(input);
            let mut unit = &input[..n];
            input = &input[n..];
            // Drop spaces that follow a space (a unit may itself be several spaces).
            if is_prev_space {
                unit = unit.trim_start_matches(' ');
            }
            if !unit.is_empty() {
                for c in unit.chars() {
                    if c == ' ' {
                        out.push_str(space);
                    } else {
                        out.push(c);
                    }
                }
                is_prev_space = unit.ends_with(' ');
            }
        }
        while out.ends_with(space) {
            out.truncate(out.len() - space.len());
        }
        out
    }
}
