//! Request bodies: reading them (size limit, UTF-8, JSON), and checking every field before a
//! [`GenerationRequest`](crate::request::GenerationRequest) is built. Every failure names
//! the field at fault in the error's `param`.

use super::error::ApiError;
use super::ApiConfig;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use futures_util::StreamExt;
use grok_shared::sampling::{LogitAdjust, SamplingParams};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Most `stop` strings a request may give (as in the OpenAI API).
pub const MAX_STOP: usize = 4;
/// Most alternatives per token for `logprobs` / `top_logprobs` (as in the OpenAI API).
pub const MAX_LOGPROBS: i64 = 20;
/// `max_tokens` of a completion that does not say.
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// Reads the whole body within the client timeout (408 after: a client trickling bytes must
/// not hold a connection forever), refusing (413) more than `max_body_bytes`: early from
/// `Content-Length`, else as soon as the received chunks pass it, so an over-long body is
/// never held whole.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    cfg: &ApiConfig,
) -> Result<Bytes, ApiError> {
    let deadline = cfg.client_timeout;
    tokio::time::timeout(deadline, read_body_to(headers, body, cfg.max_body_bytes))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::invalid(
                None,
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs_f64()
                ),
            )
            .with_status(StatusCode::REQUEST_TIMEOUT))
        })
}

async fn read_body_to(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::invalid(
            None,
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::invalid(None, format!("could not read the request body: {e}"))
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Parses a JSON body into `T`: invalid UTF-8 and malformed JSON are errors about the whole
/// body (`param` null); a field of the wrong type or an unknown field names its path.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::invalid(None, format!("the request body is not valid UTF-8: {e}"))
    })?;
    // A struct also deserializes from an array (by position); a request body is an object.
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<Value>(text) {
            Err(e) => ApiError::invalid(None, format!("the request body is not valid JSON: {e}")),
            Ok(_) => ApiError::invalid(None, "the request body must be a JSON object"),
        });
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data if path != "." => {
                ApiError::field(&path, format!("invalid `{path}`: {inner}"))
            }
            serde_json::error::Category::Data => ApiError::invalid(
                None,
                format!("the request body must be a JSON object: {inner}"),
            ),
            _ => ApiError::invalid(None, format!("the request body is not valid JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    Ok(value)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `POST /v1/completions` as sent. Every field is optional at this stage so that a missing
/// one gets a message naming it; `prompt` and `stop` take several shapes, checked by hand.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionBody {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    pub suffix: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub stop: Option<Value>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Map<String, Value>>,
    /// Accepted (type-checked) and ignored.
    #[allow(dead_code)]
    pub user: Option<String>,
    pub seed: Option<u64>,
    /// vLLM's extension: keep generating past the end-of-sequence token (load tests use it
    /// to get exact output lengths).
    pub ignore_eos: Option<bool>,
}

/// `POST /v1/chat/completions` as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatBody {
    pub model: Option<String>,
    pub messages: Option<Vec<MessageBody>>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub stop: Option<Value>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Map<String, Value>>,
    /// Accepted (type-checked) and ignored.
    #[allow(dead_code)]
    pub user: Option<String>,
    pub seed: Option<u64>,
    /// vLLM's extension: keep generating past the end-of-sequence token (load tests use it
    /// to get exact output lengths).
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageBody {
    pub role: Option<String>,
    pub content: Option<Value>,
    /// Accepted (type-checked) and ignored: the template has no place for it.
    #[allow(dead_code)]
    pub name: Option<String>,
}

/// What both endpoints check the same way.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    pub stream: bool,
    /// Send a usage chunk before `[DONE]` (default yes; `stream_options.include_usage: false`
    /// turns it off).
    pub include_usage: bool,
    pub sampling: SamplingParams,
    pub adjust: LogitAdjust,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// A completion prompt: text to encode, or token ids as given.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionParams {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub logprobs: Option<usize>,
    pub echo: bool,
    pub common: Common,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatParams {
    pub messages: Vec<(Role, String)>,
    /// `None`: the rest of the context.
    pub max_tokens: Option<usize>,
    /// The field `max_tokens` came from (`max_completion_tokens` or `max_tokens`).
    pub max_tokens_param: &'static str,
    pub logprobs: Option<usize>,
    pub common: Common,
}

/// The model must be named and be the one served (404 `model_not_found` otherwise).
fn check_model(model: Option<&str>, served: &str) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError::field(
            "model",
            "you must provide a model parameter",
        )),
        Some(m) if m == served => Ok(()),
        Some(m) => Err(ApiError::field(
            "model",
            format!("the model `{m}` does not exist; this server serves `{served}`"),
        )
        .with_status(StatusCode::NOT_FOUND)
        .with_code("model_not_found")),
    }
}

/// `n`: the OpenAI API has it, this server supports only 1.
fn check_n(n: Option<i64>) -> Result<(), ApiError> {
    if n.is_some_and(|n| n != 1) {
        return Err(ApiError::field(
            "n",
            "only n = 1 is supported: send one request per choice",
        ));
    }
    Ok(())
}

/// `presence_penalty`, `frequency_penalty` and `logit_bias` (`{"token id": bias}`, as the
/// OpenAI API takes them), parsed; their ranges, and the ids against the vocabulary, are
/// checked when the request is submitted ([`LogitAdjust::validate`]).
fn adjust(f: &SamplingFields) -> Result<LogitAdjust, ApiError> {
    let mut a = LogitAdjust {
        presence_penalty: f.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0) as f32,
        ..LogitAdjust::default()
    };
    for (key, v) in f.logit_bias.into_iter().flatten() {
        let param = format!("logit_bias.{key}");
        let token: u32 = key.parse().map_err(|_| {
            ApiError::field(
                &param,
                format!("logit_bias keys must be token ids (\"1234\"), got {key:?}"),
            )
        })?;
        let bias = v.as_f64().ok_or_else(|| {
            ApiError::field(
                &param,
                format!("a logit bias must be a number between -100 and 100, got {v}"),
            )
        })?;
        a.bias.push((token, bias as f32));
    }
    Ok(a)
}

struct SamplingFields<'a> {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<u64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<&'a Map<String, Value>>,
}

fn sampling(f: &SamplingFields<'_>) -> Result<SamplingParams, ApiError> {
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::field(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::field(
            "top_p",
            format!("top_p must be greater than 0 and at most 1, got {top_p}"),
        ));
    }
    let top_k = match f.top_k {
        None | Some(-1) => 0,
        Some(k) => usize::try_from(k).map_err(|_| {
            ApiError::field(
                "top_k",
                format!("top_k must be an integer >= 0 (or -1 for no limit), got {k}"),
            )
        })?,
    };
    Ok(SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        seed: f.seed.unwrap_or_else(fresh_u64),
    })
}

/// `stop`: null, a string, or an array of up to [`MAX_STOP`] non-empty strings.
fn stops(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = |msg: String| ApiError::field("stop", msg);
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(bad(format!(
                    "stop takes at most {MAX_STOP} strings, got {}",
                    items.len()
                )));
            }
            items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(bad(format!(
                        "stop must be a string or an array of strings, found {}",
                        kind(other)
                    ))),
                })
                .collect::<Result<_, _>>()?
        }
        Some(other) => {
            return Err(bad(format!(
                "stop must be a string or an array of strings, found {}",
                kind(other)
            )))
        }
    };
    if list.iter().any(String::is_empty) {
        return Err(bad("stop strings must not be empty".into()));
    }
    Ok(list)
}

fn logprob_count(param: &str, n: i64) -> Result<usize, ApiError> {
    if (0..=MAX_LOGPROBS).contains(&n) {
        // In 0..=20, so the conversion is exact.
        Ok(n as usize)
    } else {
        Err(ApiError::field(
            param,
            format!("{param} must be between 0 and {MAX_LOGPROBS}, got {n}"),
        ))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn common(
    stream: Option<bool>,
    stream_options: Option<&StreamOptions>,
    sampling_fields: SamplingFields<'_>,
    stop: Option<&Value>,
    ignore_eos: Option<bool>,
) -> Result<Common, ApiError> {
    let stream = stream.unwrap_or(false);
    if stream_options.is_some() && !stream {
        // OpenAI refuses this too; accepting it would let a client believe it asked for a
        // usage chunk that a non-streamed answer never sends.
        return Err(ApiError::field(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    Ok(Common {
        stream,
        include_usage: stream_options.and_then(|o| o.include_usage).unwrap_or(true),
        sampling: sampling(&sampling_fields)?,
        adjust: adjust(&sampling_fields)?,
        stop: stops(stop)?,
        ignore_eos: ignore_eos.unwrap_or(false),
    })
}

impl CompletionBody {
    pub fn validate(&self, served_model: &str) -> Result<CompletionParams, ApiError> {
        check_model(self.model.as_deref(), served_model)?;
        let prompt = match &self.prompt {
            None => return Err(ApiError::field("prompt", "you must provide a prompt")),
            Some(v) => prompt(v)?,
        };
        check_n(self.n)?;
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::field("best_of", "only best_of = 1 is supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::field("suffix", "suffix is not supported"));
        }
        let max_tokens = match self.max_tokens {
            None => DEFAULT_COMPLETION_TOKENS,
            Some(n) => usize::try_from(n).map_err(|_| {
                ApiError::field(
                    "max_tokens",
                    format!("max_tokens must be an integer >= 0, got {n}"),
                )
            })?,
        };
        let logprobs = self
            .logprobs
            .map(|n| logprob_count("logprobs", n))
            .transpose()?;
        Ok(CompletionParams {
            prompt,
            max_tokens,
            logprobs,
            echo: self.echo.unwrap_or(false),
            common: common(
                self.stream,
                self.stream_options.as_ref(),
                SamplingFields {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    seed: self.seed,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    logit_bias: self.logit_bias.as_ref(),
                },
                self.stop.as_ref(),
                self.ignore_eos,
            )?,
        })
    }
}

/// `prompt`: a string, `[string]`, `[id, ...]` or `[[id, ...]]`; several prompts are refused.
fn prompt(v: &Value) -> Result<Prompt, ApiError> {
    let shape = || {
        ApiError::field(
            "prompt",
            "prompt must be a string, an array of one string, an array of token ids, \
             or an array of one array of token ids",
        )
    };
    let one_per_request = |n: usize| {
        ApiError::field(
            "prompt",
            format!(
                "got {n} prompts, but this server takes one prompt per request: \
                 send one request per prompt"
            ),
        )
    };
    let empty = || ApiError::field("prompt", "the prompt is empty");
    let ids = |items: &[Value], path: &str| -> Result<Vec<u32>, ApiError> {
        if items.is_empty() {
            return Err(empty());
        }
        items
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| {
                        ApiError::field(
                            &format!("{path}[{i}]"),
                            format!("a token id must be an integer >= 0, found {t}"),
                        )
                    })
            })
            .collect()
    };
    let text = |s: &str| {
        if s.is_empty() {
            Err(empty())
        } else {
            Ok(Prompt::Text(s.to_owned()))
        }
    };
    match v {
        Value::String(s) => text(s),
        Value::Array(items) => {
            let several = items.len() > 1
                && (items.iter().all(Value::is_string) || items.iter().all(Value::is_array));
            if several {
                return Err(one_per_request(items.len()));
            }
            match items.as_slice() {
                [] => Err(empty()),
                [Value::String(s)] => text(s),
                [Value::Array(inner)] => ids(inner, "prompt[0]").map(Prompt::Tokens),
                [Value::Number(_), ..] => ids(items, "prompt").map(Prompt::Tokens),
                _ => Err(shape()),
            }
        }
        _ => Err(shape()),
    }
}

impl ChatBody {
    pub fn validate(&self, served_model: &str) -> Result<ChatParams, ApiError> {
        check_model(self.model.as_deref(), served_model)?;
        let messages = match &self.messages {
            None => return Err(ApiError::field("messages", "you must provide messages")),
            Some(m) if m.is_empty() => {
                return Err(ApiError::field("messages", "messages must not be empty"))
            }
            Some(m) => m
                .iter()
                .enumerate()
                .map(|(i, m)| m.validate(i))
                .collect::<Result<Vec<_>, _>>()?,
        };
        check_n(self.n)?;
        // `max_completion_tokens` is the current name, `max_tokens` the deprecated one.
        let (param, asked) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => ("max_completion_tokens", Some(n)),
            (None, n) => ("max_tokens", n),
        };
        let max_tokens = asked
            .map(|n| {
                usize::try_from(n).ok().filter(|&n| n >= 1).ok_or_else(|| {
                    ApiError::field(param, format!("{param} must be an integer >= 1, got {n}"))
                })
            })
            .transpose()?;
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(ApiError::field(
                    "top_logprobs",
                    "top_logprobs requires logprobs to be true",
                ))
            }
            (true, None) => Some(0),
            (true, Some(n)) => Some(logprob_count("top_logprobs", n)?),
        };
        Ok(ChatParams {
            messages,
            max_tokens,
            max_tokens_param: param,
            logprobs,
            common: common(
                self.stream,
                self.stream_options.as_ref(),
                SamplingFields {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    seed: self.seed,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    logit_bias: self.logit_bias.as_ref(),
                },
                self.stop.as_ref(),
                self.ignore_eos,
            )?,
        })
    }
}

impl MessageBody {
    fn validate(&self, i: usize) -> Result<(Role, String), ApiError> {
        let role_param = format!("messages[{i}].role");
        let role = match self.role.as_deref() {
            None => {
                return Err(ApiError::field(
                    &role_param,
                    format!("{role_param} is required"),
                ))
            }
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => {
                return Err(ApiError::field(
                    &role_param,
                    format!("unsupported role `{other}`: use system, developer, user or assistant"),
                ))
            }
        };
        let param = format!("messages[{i}].content");
        let content = match &self.content {
            // An assistant turn may come without content (OpenAI allows it with tool calls).
            None if role == Role::Assistant => String::new(),
            None => return Err(ApiError::field(&param, format!("{param} is required"))),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    text.push_str(text_part(part, &format!("{param}[{j}]"))?);
                }
                text
            }
            Some(other) => {
                return Err(ApiError::field(
                    &param,
                    format!(
                        "content must be a string or an array of text parts, found {}",
                        kind(other)
                    ),
                ))
            }
        };
        Ok((role, content))
    }
}

/// `{"type": "text", "text": "..."}`; other part types (images, audio) are refused.
fn text_part<'a>(part: &'a Value, param: &str) -> Result<&'a str, ApiError> {
    let obj = part.as_object().ok_or_else(|| {
        ApiError::field(
            param,
            format!("a content part must be an object, found {}", kind(part)),
        )
    })?;
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => {}
        Some(other) => {
            return Err(ApiError::field(
                &format!("{param}.type"),
                format!("content parts of type `{other}` are not supported (only `text`)"),
            ))
        }
        None => {
            return Err(ApiError::field(
                &format!("{param}.type"),
                "a content part needs \"type\": \"text\"",
            ))
        }
    }
    if let Some(k) = obj.keys().find(|k| *k != "type" && *k != "text") {
        return Err(ApiError::field(
            &format!("{param}.{k}"),
            format!("unknown field `{k}` in a text content part"),
        ));
    }
    obj.get("text").and_then(Value::as_str).ok_or_else(|| {
        ApiError::field(
            &format!("{param}.text"),
            "a text content part needs a string `text`",
        )
    })
}

/// A fresh 64-bit value for seeds and ids: the standard library's per-process random hash
/// keys mixed with the time and a counter (no random-number crate needed, never repeats
/// within a process).
pub fn fresh_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.finish()
}
