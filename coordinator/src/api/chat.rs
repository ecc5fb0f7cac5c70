//! `POST /v1/chat/completions`: chat over a base model, through the plain transcript
//! template documented in the [module docs](super).

use super::error::{to_json, ApiError, Fields};
use super::params::{fresh_u64, parse_json, read_body, ChatBody, Role};
use super::respond::{Choice, Outcome, UsageJson};
use super::{generate, unix_now, AppState};
use crate::request::{FinishReason, GenerationRequest, SubmitError, TokenLogprob, Usage};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use grok_shared::tokenizer::{PieceKind, Tokenizer};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// Ends the reply where the model starts writing the user's next turn.
pub const TURN_STOP: &str = "\nUser:";

/// The transcript the model continues: `"{Role}: {content}\n\n"` per message, then
/// `"Assistant:"`.
pub fn render(messages: &[(Role, String)]) -> String {
    let mut out = String::new();
    for (role, content) in messages {
        let label = match role {
            Role::System => "System",
            Role::User => "User",
            Role::Assistant => "Assistant",
        };
        out.push_str(label);
        out.push_str(": ");
        out.push_str(content);
        out.push_str("\n\n");
    }
    out.push_str("Assistant:");
    out
}

pub(super) async fn handle(State(state): State<AppState>, req: Request) -> Response {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let outcome = parts.extensions.get::<Outcome>().cloned();
    run(&state, &parts.headers, body, arrived, outcome)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn run(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    arrived: Instant,
    outcome: Option<Outcome>,
) -> Result<Response, ApiError> {
    let bytes = read_body(headers, body, state.config()).await?;
    let p = parse_json::<ChatBody>(&bytes)?.validate(&state.config().model_name)?;
    let prompt = state.encode(render(&p.messages)).await?;
    let context = state.scheduler().context_len();
    let fields = Fields {
        prompt: "messages",
        max_tokens: p.max_tokens_param,
    };
    let max_tokens = match p.max_tokens {
        Some(n) => n,
        // The rest of the context; a prompt that leaves no room is refused here, as the
        // scheduler would refuse one that does not fit.
        None => match context.checked_sub(prompt.len()) {
            Some(rest) if rest > 0 => rest,
            _ => {
                let e = SubmitError::TooLong {
                    prompt: prompt.len(),
                    max_tokens: 1,
                    context,
                };
                return Err(ApiError::from_submit(&e, fields));
            }
        },
    };
    let mut stop = p.common.stop.clone();
    if !stop.iter().any(|s| s == TURN_STOP) {
        stop.push(TURN_STOP.to_owned());
    }
    let request = GenerationRequest {
        prompt,
        max_tokens,
        sampling: p.common.sampling,
        adjust: p.common.adjust.clone(),
        stop,
        logprobs: p.logprobs,
        ignore_eos: p.common.ignore_eos,
        echo: false,
        arrived,
    };
    let choice = ChatChoice::new(
        state.config().model_name.clone(),
        state.tokenizer().clone(),
        p.logprobs.is_some(),
        p.common.stream,
    );
    generate(state, request, fields, &p.common, choice, outcome).await
}

pub(super) struct ChatChoice {
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<Tokenizer>,
    logprobs: bool,
    streaming: bool,
    /// Whole-response mode: the reply and its logprobs so far.
    content: String,
    lp: Vec<TokenJson>,
    /// Until the first text arrives: drop the space the model writes after `Assistant:`.
    strip_space: bool,
}

impl ChatChoice {
    pub(super) fn new(
        model: String,
        tokenizer: Arc<Tokenizer>,
        logprobs: bool,
        streaming: bool,
    ) -> Self {
        ChatChoice {
            id: format!("chatcmpl-{:016x}{:016x}", fresh_u64(), fresh_u64()),
            created: unix_now(),
            model,
            tokenizer,
            logprobs,
            streaming,
            content: String::new(),
            lp: Vec::new(),
            strip_space: true,
        }
    }

    fn chunk(&self, choices: &[ChunkChoice<'_>], usage: Option<UsageJson>) -> String {
        to_json(&ChatJson {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        })
    }

    fn token(&self, t: &TokenLogprob) -> TokenJson {
        TokenJson {
            token: t.text.clone(),
            logprob: t.logprob,
            bytes: token_bytes(&self.tokenizer, t.id, &t.text),
            top_logprobs: t
                .top
                .iter()
                .map(|(id, text, lp)| TopJson {
                    token: text.clone(),
                    logprob: *lp,
                    bytes: token_bytes(&self.tokenizer, *id, text),
                })
                .collect(),
        }
    }
}

impl Choice for ChatChoice {
    fn opening(&mut self) -> Option<String> {
        Some(self.chunk(
            &[ChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(""),
                },
                logprobs: None,
                finish_reason: None,
            }],
            None,
        ))
    }

    fn piece(&mut self, text: &str, tokens: &[TokenLogprob], prompt: bool) -> Option<String> {
        if prompt {
            // Chat never echoes; a prompt event would be a scheduler bug, and is not shown.
            return None;
        }
        let mut text = text;
        if self.strip_space && !text.is_empty() {
            self.strip_space = false;
            text = text.strip_prefix(' ').unwrap_or(text);
        }
        let lp: Vec<TokenJson> = if self.logprobs {
            tokens.iter().map(|t| self.token(t)).collect()
        } else {
            Vec::new()
        };
        if !self.streaming {
            self.content.push_str(text);
            self.lp.extend(lp);
            return None;
        }
        if text.is_empty() && lp.is_empty() {
            return None;
        }
        Some(self.chunk(
            &[ChunkChoice {
                index: 0,
                delta: Delta {
                    role: None,
                    content: Some(text),
                },
                logprobs: self.logprobs.then_some(LogprobsJson { content: &lp }),
                finish_reason: None,
            }],
            None,
        ))
    }

    fn finish_chunk(&mut self, finish: FinishReason) -> String {
        self.chunk(
            &[ChunkChoice {
                index: 0,
                delta: Delta {
                    role: None,
                    content: None,
                },
                logprobs: None,
                finish_reason: Some(finish.as_str()),
            }],
            None,
        )
    }

    fn usage_chunk(&mut self, usage: Usage) -> String {
        self.chunk(&[], Some(usage.into()))
    }

    fn response(self, finish: FinishReason, usage: Usage) -> String {
        to_json(&ChatJson {
            id: &self.id,
            object: "chat.completion",
            created: self.created,
            model: &self.model,
            choices: &[MessageChoice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: &self.content,
                },
                logprobs: self.logprobs.then_some(LogprobsJson { content: &self.lp }),
                finish_reason: finish.as_str(),
            }],
            usage: Some(usage.into()),
        })
    }
}

/// A token's UTF-8 bytes: a byte-fallback piece is its one byte (its text alone would be a
/// lossy U+FFFD), a normal piece its text with `▁` as a space, a control piece nothing.
fn token_bytes(tokenizer: &Tokenizer, id: u32, text: &str) -> Vec<u8> {
    let piece = tokenizer.id_to_piece(id);
    match (tokenizer.piece_kind(id), piece) {
        (Some(PieceKind::Byte), Some(p)) => p
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .map_or_else(|| text.as_bytes().to_vec(), |b| vec![b]),
        (Some(PieceKind::Normal | PieceKind::UserDefined | PieceKind::Unused), Some(p)) => {
            p.replace('\u{2581}', " ").into_bytes()
        }
        (Some(PieceKind::Control), _) => Vec::new(),
        _ => text.as_bytes().to_vec(),
    }
}

#[derive(Serialize)]
struct ChatJson<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [C],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageJson>,
}

#[derive(Serialize)]
struct MessageChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<LogprobsJson<'a>>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<LogprobsJson<'a>>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct LogprobsJson<'a> {
    content: &'a [TokenJson],
}

#[derive(Debug, Serialize)]
struct TokenJson {
    token: String,
    logprob: Option<f32>,
    bytes: Vec<u8>,
    top_logprobs: Vec<TopJson>,
}

#[derive(Debug, Serialize)]
struct TopJson {
    token: String,
    logprob: f32,
    bytes: Vec<u8>,
}
