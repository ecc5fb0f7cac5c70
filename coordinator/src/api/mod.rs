//! The OpenAI-compatible HTTP API of `grok serve` (axum): it parses and checks requests,
//! hands them to the [scheduler](crate::scheduler) as
//! [`GenerationRequest`]s, and turns the [`Event`](crate::request::Event)s it gets back into
//! OpenAI-shaped JSON bodies or server-sent-event streams.
//!
//! # Endpoints
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/completions` | text completion (primary: Grok-1 is a base model) |
//! | `POST /v1/chat/completions` | chat, through the template below |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the one served model |
//! | `GET /health` | 200 while the process is alive |
//! | `GET /ready` | 200 once every rank is loaded and healthy, else 503 |
//! | `GET /metrics` | Prometheus text exposition (`text/plain; version=0.0.4`) |
//!
//! With [`ApiConfig::api_key`] set, every `/v1/*` request needs `Authorization: Bearer KEY`
//! (else 401, code `invalid_api_key`); `/health`, `/ready` and `/metrics` stay open.
//!
//! # Requests
//!
//! `prompt` is a string, `[string]`, `[id, ...]` or `[[id, ...]]`; more than one prompt is
//! refused (send one request per prompt). Text is encoded with the tokenizer without a BOS,
//! as `grok generate` does and as the release did. Supported parameters: `model` (must be
//! the served name, else 404 `model_not_found`), `max_tokens` (completions: default 16; chat:
//! `max_completion_tokens` or `max_tokens`, default the rest of the context), `temperature`
//! (0..=2, default 1), `top_p` (0 < p <= 1), `top_k` (>= 0, 0 or -1: off), `seed` (absent: a
//! fresh random one), `stop` (a string or up to 4 non-empty strings), completions
//! `logprobs` (0..=20) and `echo`, chat `logprobs` (bool) and `top_logprobs` (0..=20, needs
//! `logprobs: true`), `stream`, `stream_options.include_usage` (default true: streams end with
//! a usage chunk; only with `stream: true`), `presence_penalty` and `frequency_penalty`
//! (-2..=2, on the tokens generated so far) and `logit_bias` (`{"token id": -100..=100}`, at
//! most 1024; log-probabilities stay the model's). Accepted only at their neutral value: `n`
//! and `best_of` (1), `suffix` (null or ""). `user` is ignored. Any other field is refused,
//! naming it.
//!
//! Every error is `{"error":{"message","type","param","code"}}` with `param` naming the field
//! at fault: 400 for bad JSON, invalid UTF-8, wrong types, bad values and prompts that do not
//! fit the context (code `context_length_exceeded`); 404 for an unknown model or route; 413
//! for a body over [`ApiConfig::max_body_bytes`]; 429 with `Retry-After: 1` when the queue is
//! full; 503 while not ready or shutting down; 500 when an accepted request fails (a stream
//! then ends with a `data: {"error":...}` event and no `[DONE]`).
//!
//! # Chat template
//!
//! Grok-1 has no chat format of its own, so chat messages are laid out as a plain
//! transcript and the model continues it:
//!
//! ```text
//! System: {content}\n\n        (role "system" or "developer")
//! User: {content}\n\n          (role "user")
//! Assistant: {content}\n\n     (role "assistant")
//! ...
//! Assistant:
//! ```
//!
//! Each message becomes `"{Role}: {content}\n\n"`, in order, then `"Assistant:"` follows.
//! The stop string `"\nUser:"` is added to the request's own stops, so the reply ends where
//! the model starts writing the user's next turn. The single space the model writes after
//! `Assistant:` is removed from the start of the reply. A content array is joined from its
//! `{"type":"text","text":...}` parts; other part types are refused.
//!
//! # Status accounting
//!
//! Every response's status is counted in `grok_requests_total{endpoint, status}` (routes by
//! their pattern; unknown paths as `unmatched`). A stream counts when it ends: 200, or 500
//! if it ended with an error event. A client that leaves before its answer is complete
//! counts as 499, and its event receiver is dropped at that moment, which is what tells the
//! scheduler to free the request's KV blocks.

mod chat;
mod completions;
mod error;
mod params;
mod respond;
#[cfg(test)]
mod tests;

pub use error::ApiError;

use crate::request::GenerationRequest;
use crate::scheduler::SchedulerHandle;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::{json_response, to_json};
use grok_shared::tokenizer::Tokenizer;
use params::Common;
use respond::{BodyRecords, Choice, Outcome, RecordOnDrop};
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How the API presents itself.
#[derive(Clone)]
pub struct ApiConfig {
    /// The model id clients must name in `model` and that `/v1/models` lists.
    pub model_name: String,
    /// When set, `/v1/*` requests need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Longest a client may take to send a request's headers, or its body (408), or to start
    /// its next request on a kept-alive connection: a client that stalls holds a connection
    /// and a task until then, never longer.
    pub client_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            model_name: "grok-1".into(),
            api_key: None,
            max_body_bytes: 8 << 20,
            client_timeout: Duration::from_secs(30),
        }
    }
}

// Hand-written so that logs never show the key.
impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("model_name", &self.model_name)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("client_timeout", &self.client_timeout)
            .finish()
    }
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    scheduler: SchedulerHandle,
    tokenizer: Arc<Tokenizer>,
    config: ApiConfig,
    /// Unix time the server started (the model's `created`).
    started: u64,
}

/// Prompts longer than this many bytes are tokenized on the blocking pool, so a large one
/// does not stall the other connections served by the same runtime thread.
const INLINE_ENCODE_BYTES: usize = 4096;

impl AppState {
    pub fn new(scheduler: SchedulerHandle, tokenizer: Arc<Tokenizer>, config: ApiConfig) -> Self {
        AppState {
            inner: Arc::new(Inner {
                scheduler,
                tokenizer,
                config,
                started: unix_now(),
            }),
        }
    }

    pub fn scheduler(&self) -> &SchedulerHandle {
        &self.inner.scheduler
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.inner.tokenizer
    }

    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    async fn encode(&self, text: String) -> Result<Vec<u32>, ApiError> {
        if text.len() <= INLINE_ENCODE_BYTES {
            return Ok(self.inner.tokenizer.encode(&text));
        }
        let tokenizer = self.inner.tokenizer.clone();
        tokio::task::spawn_blocking(move || tokenizer.encode(&text))
            .await
            .map_err(|e| {
                ApiError::server(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("tokenizing the prompt failed: {e}"),
                )
            })
    }

    /// The key check for `/v1/*`: `None` when the request may pass.
    fn unauthorized(&self, req: &Request) -> Option<ApiError> {
        let key = self.inner.config.api_key.as_deref()?;
        let path = req.uri().path();
        if !(path == "/v1" || path.starts_with("/v1/")) {
            return None;
        }
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match given {
            None => Some(ApiError::unauthorized(
                "no API key given: send the header `Authorization: Bearer YOUR_KEY`",
            )),
            Some(k) if constant_time_eq(k.as_bytes(), key.as_bytes()) => None,
            Some(_) => Some(ApiError::unauthorized("incorrect API key provided")),
        }
    }
}

/// Compares without an early exit on the first differing byte, so response timing does not
/// reveal how much of a guessed key was right (only its length).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The API's routes, with auth and status accounting on every one of them.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes, then lets open requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    client_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    // Also runs while a kept-alive connection waits for its next request (hyper >= 1.6).
    http.timer(TokioTimer::new())
        .header_read_timeout(client_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: the connections open now end in time
                    // (every wait of theirs has a deadline), so wait and go on.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Tokens go out as small SSE writes: no Nagle delay.
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    // Requests in flight finish; a client that stopped reading its stream is not waited for.
    if tokio::time::timeout(client_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open {client_timeout:?} after the shutdown: dropped");
    }
    Ok(())
}

/// Middleware around every route: checks the API key, and records the response's status
/// (or 499 when the client leaves first; a streamed body records its own end).
async fn track(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let outcome = Outcome::new(state.scheduler().metrics().clone(), endpoint);
    // Dropped without being disarmed = this future was dropped = the client went away.
    let mut guard = RecordOnDrop::new(outcome.clone());
    let response = match state.unauthorized(&req) {
        Some(e) => e.into_response(),
        None => {
            req.extensions_mut().insert(outcome.clone());
            next.run(req).await
        }
    };
    guard.disarm();
    if response.extensions().get::<BodyRecords>().is_none() {
        outcome.record(response.status().as_u16());
    }
    response
}

/// The tail every generation shares: readiness, submission, then a stream or a whole body.
async fn generate<C: Choice>(
    state: &AppState,
    request: GenerationRequest,
    fields: error::Fields,
    common: &Common,
    choice: C,
    outcome: Option<Outcome>,
) -> Result<Response, ApiError> {
    if !state.scheduler().ready() {
        return Err(ApiError::not_ready());
    }
    let rx = state
        .scheduler()
        .submit(request)
        .map_err(|e| ApiError::from_submit(&e, fields))?;
    if common.stream {
        Ok(respond::stream(rx, choice, common.include_usage, outcome))
    } else {
        respond::collect(rx, choice).await
    }
}

#[derive(Serialize)]
struct ModelJson<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: [ModelJson<'a>; 1],
}

fn model_json(state: &AppState) -> ModelJson<'_> {
    ModelJson {
        id: &state.inner.config.model_name,
        object: "model",
        created: state.inner.started,
        owned_by: "xai",
    }
}

async fn models(State(state): State<AppState>) -> Response {
    let list = ModelList {
        object: "list",
        data: [model_json(&state)],
    };
    json_response(StatusCode::OK, to_json(&list))
}

async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if id == state.inner.config.model_name {
        json_response(StatusCode::OK, to_json(&model_json(&state)))
    } else {
        ApiError::field("model", format!("the model `{id}` does not exist"))
            .with_status(StatusCode::NOT_FOUND)
            .with_code("model_not_found")
            .into_response()
    }
}

async fn health() -> Response {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.into())
}

async fn ready(State(state): State<AppState>) -> Response {
    if state.scheduler().ready() {
        json_response(StatusCode::OK, r#"{"status":"ready"}"#.into())
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"not ready"}"#.into(),
        )
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.scheduler().metrics().encode(),
    )
        .into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::invalid(None, format!("unknown route: {method} {}", uri.path()))
        .with_status(StatusCode::NOT_FOUND)
        .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::invalid(
        None,
        format!("method {method} is not allowed on {}", uri.path()),
    )
    .with_status(StatusCode::METHOD_NOT_ALLOWED)
    .into_response()
}
