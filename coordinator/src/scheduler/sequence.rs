//! One request's life inside the scheduler: its tokens, where its KV blocks are, how far the
//! cache has computed, its sampler and text output, and the timestamps its metrics need.

use super::{Live, Submission};
use crate::output::{token_logprob, token_text, with_texts, TextOutput};
use crate::request::{Event, FinishReason, GenerationRequest, TokenLogprob, Usage};
use grok_shared::sampling::{SampleSpec, Sampled};
use grok_shared::tokenizer::Tokenizer;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

pub(super) struct Sequence {
    pub id: u64,
    pub req: GenerationRequest,
    pub events: mpsc::UnboundedSender<Event>,
    /// Where the request's random stream stands (its seed at first): sampling runs on the
    /// workers, which hand the advanced state back with each token.
    rng_state: u64,
    output: TextOutput,
    pub generated: Vec<u32>,
    /// Data-parallel group holding the blocks (meaningful while `blocks` is non-empty).
    pub group: usize,
    pub blocks: Vec<u32>,
    /// Positions whose keys/values are in the cache.
    pub computed: usize,
    /// Still counted in the handle's bounded queue (never admitted yet).
    pub queued: bool,
    /// Prompt log-probabilities gathered so far (echo with logprobs, first pass only).
    prompt_logprobs: Vec<TokenLogprob>,
    /// The `Prompt` event went out (it is sent once, even if the sequence is recomputed).
    prompt_sent: bool,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    /// `last_token` before the latest one (inter-token latency).
    prev_token: Option<Instant>,
    /// Failed steps this sequence was part of, and those it was alone in.
    pub failed_steps: u32,
    pub failed_alone: u32,
    /// Set when a step with this sequence failed: the position that step would have computed
    /// to. Until a step reaches it, the scheduler runs the sequence alone, to learn whether
    /// it is the cause.
    pub suspect_until: Option<usize>,
    /// Times each generated token was generated, for the penalties.
    counts: std::collections::BTreeMap<u32, u32>,
    /// Counts the request as live until this sequence is dropped.
    _live: Live,
}

/// What happened to a sequence after it got its logits.
pub(super) enum Progress {
    Running,
    Finished(FinishReason),
}

impl Sequence {
    /// `sub`'s sampling parameters must be valid (checked by the caller).
    pub fn new(id: u64, sub: Submission, tokenizer: Arc<Tokenizer>) -> Self {
        let output = TextOutput::new(tokenizer, &sub.request.prompt, sub.request.stop.clone());
        Sequence {
            id,
            events: sub.events,
            rng_state: sub.request.sampling.seed,
            output,
            generated: Vec::new(),
            group: 0,
            blocks: Vec::new(),
            computed: 0,
            queued: true,
            prompt_logprobs: Vec::new(),
            prompt_sent: false,
            first_token: None,
            last_token: None,
            req: sub.request,
            prev_token: None,
            failed_steps: 0,
            failed_alone: 0,
            suspect_until: None,
            counts: Default::default(),
            _live: sub.live,
        }
    }

    /// Every token the cache must hold: the prompt, then what was generated.
    pub fn len(&self) -> usize {
        self.req.prompt.len() + self.generated.len()
    }

    pub fn token(&self, pos: usize) -> u32 {
        let p = self.req.prompt.len();
        if pos < p {
            self.req.prompt[pos]
        } else {
            self.generated[pos - p]
        }
    }

    pub fn pending(&self) -> usize {
        self.len() - self.computed
    }

    /// Whether this pass needs logits of every prompt position (echo with logprobs).
    pub fn wants_prompt_logprobs(&self) -> bool {
        self.req.echo && self.req.logprobs.is_some() && !self.prompt_sent
    }

    /// When the token before the latest was sampled (`None` for the first token).
    pub fn last_token_before_this(&self) -> Option<Instant> {
        self.prev_token
    }

    pub fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Takes the logits of positions `from..from + rows` (every row of an `All` step); the
    /// row of position `i` predicts the token at `i + 1`.
    pub fn take_prompt_logprobs(
        &mut self,
        tok: &Tokenizer,
        logits: &[f32],
        from: usize,
        vocab: usize,
    ) {
        let n = self.req.logprobs.unwrap_or(0);
        if from == 0 && self.prompt_logprobs.is_empty() {
            let id = self.req.prompt[0];
            self.prompt_logprobs.push(TokenLogprob {
                id,
                text: token_text(tok, id),
                logprob: None,
                top: Vec::new(),
            });
        }
        for (k, row) in logits.chunks_exact(vocab).enumerate() {
            let next = from + k + 1;
            if next >= self.req.prompt.len() || next != self.prompt_logprobs.len() {
                continue;
            }
            self.prompt_logprobs
                .push(token_logprob(tok, row, self.req.prompt[next], n));
        }
    }

    /// Sends the echoed prompt, once, before the first generated text.
    pub fn send_prompt(&mut self, tok: &Tokenizer) {
        if self.prompt_sent || !self.req.echo {
            self.prompt_sent = true;
            return;
        }
        self.prompt_sent = true;
        let text = tok.decode(&self.req.prompt).unwrap_or_default();
        let tokens = std::mem::take(&mut self.prompt_logprobs);
        let _ = self.events.send(Event::Prompt { text, tokens });
    }

    /// How the workers should choose this sequence's next token.
    pub fn sample_spec(&self) -> SampleSpec {
        let mut adjust = self.req.adjust.clone();
        if adjust.presence_penalty != 0.0 || adjust.frequency_penalty != 0.0 {
            adjust.counts = self.counts.iter().map(|(&t, &n)| (t, n)).collect();
        }
        SampleSpec {
            params: self.req.sampling,
            rng_state: self.rng_state,
            logprobs: self.req.logprobs,
            adjust,
        }
    }

    /// Takes the token the workers chose and releases its text.
    pub fn advance(
        &mut self,
        tok: &Tokenizer,
        x: Sampled,
        eos: Option<u32>,
        context: usize,
        now: Instant,
    ) -> Progress {
        let id = x.token;
        self.rng_state = x.rng_state;
        let info = TokenLogprob {
            id,
            text: String::new(),
            logprob: x.logprob,
            top: with_texts(tok, x.top),
        };
        self.generated.push(id);
        *self.counts.entry(id).or_insert(0) += 1;
        self.first_token.get_or_insert(now);
        self.prev_token = self.last_token.replace(now);
        if Some(id) == eos && !self.req.ignore_eos {
            return Progress::Finished(FinishReason::Stop);
        }
        let released = self.output.push(info);
        let stopped = released.stopped;
        self.send_text(released.text, released.tokens);
        if stopped {
            return Progress::Finished(FinishReason::Stop);
        }
        if self.generated.len() >= self.req.max_tokens || self.len() >= context {
            return Progress::Finished(FinishReason::Length);
        }
        Progress::Running
    }

    fn send_text(&self, text: String, tokens: Vec<TokenLogprob>) {
        if !text.is_empty() || !tokens.is_empty() {
            let _ = self.events.send(Event::Text { text, tokens });
        }
    }

    /// Releases held-back text and reports the end.
    pub fn finish(&mut self, finish: FinishReason) {
        // After a stop string the output holds nothing more; after EOS or a length limit
        // this releases what was held back as a possible stop string.
        let rest = self.output.finish();
        self.send_text(rest.text, rest.tokens);
        let _ = self.events.send(Event::Done {
            finish,
            usage: self.usage(),
        });
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.req.prompt.len(),
            completion_tokens: self.generated.len(),
        }
    }

    pub fn fail(&self, msg: String) {
        let _ = self.events.send(Event::Error(msg));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grok_shared::sampling::SamplingParams;

    #[test]
    fn end_of_sequence_ends_it_unless_ignored() {
        let tok = Arc::new(Tokenizer::builtin().expect("builtin tokenizer"));
        let eos = tok.eos_id().expect("the tokenizer has an eos");
        for ignore_eos in [false, true] {
            let (events, _rx) = mpsc::unbounded_channel();
            let request = GenerationRequest {
                prompt: vec![5, 6],
                max_tokens: 2,
                sampling: SamplingParams::default(),
                adjust: Default::default(),
                stop: Vec::new(),
                logprobs: None,
                ignore_eos,
                echo: false,
                arrived: Instant::now(),
            };
            let live = Live::new(&Default::default());
            let sub = Submission {
                request,
                events,
                live,
            };
            let mut s = Sequence::new(1, sub, tok.clone());
            let mut step = || {
                let x = Sampled {
                    token: eos,
                    rng_state: 0,
                    logprob: None,
                    top: Vec::new(),
                };
                s.advance(&tok, x, Some(eos), 100, Instant::now())
            };
            let first = step();
            if ignore_eos {
                assert!(matches!(first, Progress::Running));
                assert!(matches!(step(), Progress::Finished(FinishReason::Length)));
            } else {
                assert!(matches!(first, Progress::Finished(FinishReason::Stop)));
            }
        }
    }
}
