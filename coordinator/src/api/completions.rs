//! `POST /v1/completions`: the legacy (and, for a base model, primary) text completion.

use super::error::{to_json, ApiError, Fields};
use super::params::{fresh_u64, parse_json, read_body, CompletionBody, Prompt};
use super::respond::{Choice, Outcome, UsageJson};
use super::{generate, unix_now, AppState};
use crate::request::{FinishReason, GenerationRequest, TokenLogprob, Usage};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use std::time::Instant;

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
    let p = parse_json::<CompletionBody>(&bytes)?.validate(&state.config().model_name)?;
    let prompt = match p.prompt {
        Prompt::Text(text) => state.encode(text).await?,
        Prompt::Tokens(ids) => ids,
    };
    let request = GenerationRequest {
        prompt,
        max_tokens: p.max_tokens,
        sampling: p.common.sampling,
        adjust: p.common.adjust.clone(),
        stop: p.common.stop.clone(),
        logprobs: p.logprobs,
        ignore_eos: p.common.ignore_eos,
        echo: p.echo,
        arrived,
    };
    let choice = CompletionChoice::new(
        state.config().model_name.clone(),
        p.logprobs.is_some(),
        p.common.stream,
    );
    let fields = Fields {
        prompt: "prompt",
        max_tokens: "max_tokens",
    };
    generate(state, request, fields, &p.common, choice, outcome).await
}

/// The completion's single choice, built from its events.
pub(super) struct CompletionChoice {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    streaming: bool,
    /// Whole-response mode: the text and logprobs so far.
    text: String,
    lp: LegacyLogprobs,
    /// Characters of text produced so far (the next piece's `text_offset` base).
    chars: usize,
}

impl CompletionChoice {
    pub(super) fn new(model: String, logprobs: bool, streaming: bool) -> Self {
        CompletionChoice {
            id: format!("cmpl-{:016x}{:016x}", fresh_u64(), fresh_u64()),
            created: unix_now(),
            model,
            logprobs,
            streaming,
            text: String::new(),
            lp: LegacyLogprobs::default(),
            chars: 0,
        }
    }

    fn body(&self, choices: &[ChoiceJson<'_>], usage: Option<UsageJson>) -> String {
        to_json(&CompletionJson {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        })
    }
}

impl Choice for CompletionChoice {
    fn opening(&mut self) -> Option<String> {
        None
    }

    fn piece(&mut self, text: &str, tokens: &[TokenLogprob], _prompt: bool) -> Option<String> {
        let mut lp = LegacyLogprobs::default();
        if self.logprobs {
            lp.push_tokens(tokens, self.chars);
        }
        self.chars += text.chars().count();
        if !self.streaming {
            self.text.push_str(text);
            self.lp.append(lp);
            return None;
        }
        if text.is_empty() && lp.tokens.is_empty() {
            return None;
        }
        Some(self.body(
            &[ChoiceJson {
                text,
                index: 0,
                logprobs: self.logprobs.then_some(&lp),
                finish_reason: None,
            }],
            None,
        ))
    }

    fn finish_chunk(&mut self, finish: FinishReason) -> String {
        self.body(
            &[ChoiceJson {
                text: "",
                index: 0,
                logprobs: None,
                finish_reason: Some(finish.as_str()),
            }],
            None,
        )
    }

    fn usage_chunk(&mut self, usage: Usage) -> String {
        self.body(&[], Some(usage.into()))
    }

    fn response(self, finish: FinishReason, usage: Usage) -> String {
        self.body(
            &[ChoiceJson {
                text: &self.text,
                index: 0,
                logprobs: self.logprobs.then_some(&self.lp),
                finish_reason: Some(finish.as_str()),
            }],
            Some(usage.into()),
        )
    }
}

#[derive(Serialize)]
struct CompletionJson<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChoiceJson<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageJson>,
}

#[derive(Serialize)]
struct ChoiceJson<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<&'a LegacyLogprobs>,
    finish_reason: Option<&'static str>,
}

/// The completions API's `logprobs` object: parallel arrays, one entry per token.
/// `text_offset` counts characters (Unicode scalar values) from the start of the choice's
/// text (which includes the prompt under `echo`); each event's tokens start at the length
/// of the text released before it.
#[derive(Debug, Default, Serialize)]
pub(super) struct LegacyLogprobs {
    tokens: Vec<String>,
    /// `null` for the first prompt token (nothing predicts it).
    token_logprobs: Vec<Option<f32>>,
    /// `{token text: logprob}` of the most likely tokens, best first; `null` where
    /// `token_logprobs` is.
    top_logprobs: Vec<Option<TopMap>>,
    text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    fn push_tokens(&mut self, tokens: &[TokenLogprob], mut offset: usize) {
        for t in tokens {
            self.tokens.push(t.text.clone());
            self.token_logprobs.push(t.logprob);
            self.top_logprobs.push(
                t.logprob
                    .map(|_| TopMap(t.top.iter().map(|(_, s, l)| (s.clone(), *l)).collect())),
            );
            self.text_offset.push(offset);
            offset += t.text.chars().count();
        }
    }

    fn append(&mut self, other: LegacyLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }
}

/// A JSON object keyed by token text, in rank order. Two alternatives can share a text
/// (e.g. byte pieces shown lossily); the better one, listed first, keeps the key.
#[derive(Debug)]
struct TopMap(Vec<(String, f32)>);

impl Serialize for TopMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (i, (text, lp)) in self.0.iter().enumerate() {
            if self.0[..i].iter().all(|(t, _)| t != text) {
                map.serialize_entry(text, lp)?;
            }
        }
        map.end()
    }
}
