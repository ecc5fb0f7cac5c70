//! What the HTTP API hands the scheduler for one generation, and the events it gets back.
//! Both sides are validated types: the API checks every field before a request exists, the
//! scheduler only checks what depends on the model (context length).

use grok_shared::sampling::{AdjustError, LogitAdjust, SamplingParams};
use std::time::Instant;

/// One generation request, already tokenized and validated.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (the prompt plus this must fit the context).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Penalties and logit bias (its `counts` are kept by the scheduler, empty here).
    pub adjust: LogitAdjust,
    /// Strings that end the generation; matched across token boundaries, never included.
    pub stop: Vec<String>,
    /// `Some(n)`: return each generated token's log-probability and its `n` most likely
    /// alternatives (`n` may be 0).
    pub logprobs: Option<usize>,
    /// Generate past the end-of-sequence token (only `max_tokens`, the context or a stop
    /// string end the generation).
    pub ignore_eos: bool,
    /// Also return the prompt's tokens (with their log-probabilities when `logprobs` is set).
    pub echo: bool,
    /// When the request arrived (latency metrics count from here).
    pub arrived: Instant,
}

/// A token and its log-probabilities under the model (raw logits, before temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    /// The token's own text (may be a partial UTF-8 character shown lossily).
    pub text: String,
    /// `None` for the first prompt token, which has no context to be predicted from.
    pub logprob: Option<f32>,
    /// The most likely tokens at this position, best first: (id, text, logprob).
    pub top: Vec<(u32, String, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached, or the context is full.
    Length,
    /// End of sequence or a stop string.
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What the scheduler sends back for a request, in order: `Prompt` (only with `echo`), any
/// number of `Text`, then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt's text and, when logprobs were asked, its tokens' log-probabilities.
    Prompt {
        text: String,
        tokens: Vec<TokenLogprob>,
    },
    /// Newly released text and the generated tokens it came from (their logprobs are
    /// filled only when asked). Text that could still become a stop string is held back.
    Text {
        text: String,
        tokens: Vec<TokenLogprob>,
    },
    Done {
        finish: FinishReason,
        usage: Usage,
    },
    /// The request failed after it was accepted (e.g. the cluster lost a rank and could not
    /// recover); the message is safe to show the client.
    Error(String),
}

/// Why the scheduler would not take a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity ({waiting} requests waiting); retry later")]
    QueueFull { waiting: usize },
    #[error("the prompt has {prompt} tokens and asks for {max_tokens} more, but the model's context is {context} tokens")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
    /// Penalties or `logit_bias` out of range, or a biased id outside the vocabulary.
    #[error("{0}")]
    BadAdjust(AdjustError),
    #[error("the server is shutting down")]
    ShuttingDown,
}
