//! Prompts of an exact token length, built from the tokenizer: random whole words of its
//! vocabulary, re-encoded and trimmed until the text encodes to the length asked for.

use grok_shared::sampling::Rng;
use grok_shared::tokenizer::{PieceKind, Tokenizer};

pub struct PromptBuilder<'t> {
    tokenizer: &'t Tokenizer,
    /// Ids of pieces that are a space and 2+ ASCII letters: they re-encode to themselves in
    /// almost any neighbourhood, so few rounds of trimming are needed.
    words: Vec<u32>,
}

impl<'t> PromptBuilder<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Result<Self, String> {
        let words: Vec<u32> = (0..tokenizer.vocab_size() as u32)
            .filter(|&id| {
                tokenizer.piece_kind(id) == Some(PieceKind::Normal)
                    && tokenizer.id_to_piece(id).is_some_and(|p| {
                        p.strip_prefix('\u{2581}').is_some_and(|w| {
                            w.len() >= 2 && w.bytes().all(|b| b.is_ascii_alphabetic())
                        })
                    })
            })
            .collect();
        if words.is_empty() {
            return Err("the tokenizer has no whole-word pieces to build prompts from".into());
        }
        Ok(PromptBuilder { tokenizer, words })
    }

    fn words(&self, n: usize, rng: &mut Rng) -> impl Iterator<Item = u32> + '_ {
        let mut rng = Rng::new(rng.next_u64());
        (0..n).map(move |_| self.words[(rng.next_u64() % self.words.len() as u64) as usize])
    }

    /// Text that encodes to exactly `len` tokens (a few tries; the last try's text and its
    /// real length if they never meet, which the caller reports).
    pub fn build(&self, len: usize, rng: &mut Rng) -> (String, usize) {
        let mut ids: Vec<u32> = self.words(len, rng).collect();
        let mut best = (String::new(), 0);
        for _ in 0..8 {
            // Ids come from the vocabulary, so decoding cannot fail.
            let text = self.tokenizer.decode(&ids).unwrap_or_default();
            let enc = self.tokenizer.encode(&text);
            if enc.len() == len {
                return (text, len);
            }
            best = (text, enc.len());
            ids = enc;
            if ids.len() > len {
                ids.truncate(len);
            } else {
                let more: Vec<u32> = self.words(len - ids.len(), rng).collect();
                ids.extend(more);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_have_the_length_asked_for() {
        let tok = Tokenizer::builtin().unwrap();
        let b = PromptBuilder::new(&tok).unwrap();
        let mut rng = Rng::new(1);
        for len in [1, 2, 7, 32, 100, 513] {
            let (text, n) = b.build(len, &mut rng);
            assert_eq!(n, len);
            assert_eq!(tok.encode(&text).len(), len, "{text:?}");
        }
        // Same seed, same prompts.
        let (a, _) = b.build(20, &mut Rng::new(5));
        let (c, _) = b.build(20, &mut Rng::new(5));
        assert_eq!(a, c);
    }
}
