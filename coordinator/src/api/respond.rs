//! Turning a request's [`Event`]s into an answer: a whole JSON body, or an SSE stream that
//! sends each event as it comes. Also the per-request status recording, which must survive
//! the client leaving halfway (status 499).

use super::error::{json_response, ApiError};
use crate::metrics::{Metrics, RequestLabels};
use crate::request::{Event, FinishReason, TokenLogprob, Usage};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Serialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// Status recorded for a request whose client went away before its answer was complete
/// (nginx's convention).
pub const CLIENT_CLOSED: u16 = 499;

/// Where one request's status goes; recorded at most once, whoever gets there first.
#[derive(Clone)]
pub struct Outcome(Arc<OutcomeInner>);

struct OutcomeInner {
    metrics: Metrics,
    endpoint: String,
    recorded: AtomicBool,
}

impl Outcome {
    pub fn new(metrics: Metrics, endpoint: String) -> Self {
        Outcome(Arc::new(OutcomeInner {
            metrics,
            endpoint,
            recorded: AtomicBool::new(false),
        }))
    }

    pub fn record(&self, status: u16) {
        if !self.0.recorded.swap(true, Ordering::AcqRel) {
            self.0
                .metrics
                .requests
                .get_or_create(&RequestLabels {
                    endpoint: self.0.endpoint.clone(),
                    status,
                })
                .inc();
        }
    }
}

/// Records [`CLIENT_CLOSED`] when dropped while armed: dropping is how axum tells us the
/// client left (the handler future or the response body is dropped mid-way).
pub struct RecordOnDrop {
    outcome: Outcome,
    armed: bool,
}

impl RecordOnDrop {
    pub fn new(outcome: Outcome) -> Self {
        RecordOnDrop {
            outcome,
            armed: true,
        }
    }

    pub fn disarm(&mut self) {
        self.armed = false;
    }

    pub fn finish(mut self, status: u16) {
        self.outcome.record(status);
        self.armed = false;
    }
}

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.outcome.record(CLIENT_CLOSED);
        }
    }
}

/// Response extension: the body records the request's status itself (a stream knows how
/// it ended only when it ends), so the middleware must not.
#[derive(Clone, Copy)]
pub struct BodyRecords;

/// The shape of one endpoint's answer, fed the events of its single choice. Chunks and
/// bodies are serialized JSON text (serde structs keep the OpenAI field order).
pub trait Choice: Send + 'static {
    /// The chunk a stream starts with, before any event (chat: the assistant role).
    fn opening(&mut self) -> Option<String>;
    /// A piece of output (`prompt`: the echoed prompt). Streaming: returns its chunk, or
    /// `None` when it carries nothing to send. Otherwise: accumulates it, returns `None`.
    fn piece(&mut self, text: &str, tokens: &[TokenLogprob], prompt: bool) -> Option<String>;
    /// The stream's last choice chunk, carrying the finish reason.
    fn finish_chunk(&mut self, finish: FinishReason) -> String;
    /// The stream's usage chunk (empty `choices`).
    fn usage_chunk(&mut self, usage: Usage) -> String;
    /// The whole (non-streamed) response body.
    fn response(self, finish: FinishReason, usage: Usage) -> String;
}

/// `usage` as OpenAI shapes it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct UsageJson {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl From<Usage> for UsageJson {
    fn from(u: Usage) -> Self {
        UsageJson {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

fn failed(message: String) -> ApiError {
    ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, message)
}

fn ended_early() -> ApiError {
    failed("the request ended without a result (the scheduler stopped)".into())
}

/// Waits for the whole generation. Dropping this future (the client left) drops `rx`, which
/// cancels the request in the scheduler.
pub async fn collect<C: Choice>(
    mut rx: UnboundedReceiver<Event>,
    mut choice: C,
) -> Result<Response, ApiError> {
    loop {
        match rx.recv().await {
            Some(Event::Prompt { text, tokens }) => {
                choice.piece(&text, &tokens, true);
            }
            Some(Event::Text { text, tokens }) => {
                choice.piece(&text, &tokens, false);
            }
            Some(Event::Done { finish, usage }) => {
                return Ok(json_response(
                    StatusCode::OK,
                    choice.response(finish, usage),
                ))
            }
            Some(Event::Error(message)) => return Err(failed(message)),
            None => return Err(ended_early()),
        }
    }
}

struct StreamState<C> {
    /// `None` once the last event arrived: the receiver is dropped at once.
    rx: Option<UnboundedReceiver<Event>>,
    choice: C,
    /// SSE `data` payloads ready to go out.
    pending: VecDeque<String>,
    include_usage: bool,
    /// Recorded when the last payload has been handed to the server; dropped before that
    /// (client gone), it records 499.
    record: Option<RecordOnDrop>,
    status: u16,
}

impl<C: Choice> StreamState<C> {
    fn push(&mut self, chunk: String) {
        self.pending.push_back(chunk);
    }

    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Prompt { text, tokens }) => {
                if let Some(c) = self.choice.piece(&text, &tokens, true) {
                    self.push(c);
                }
            }
            Some(Event::Text { text, tokens }) => {
                if let Some(c) = self.choice.piece(&text, &tokens, false) {
                    self.push(c);
                }
            }
            Some(Event::Done { finish, usage }) => {
                let c = self.choice.finish_chunk(finish);
                self.push(c);
                if self.include_usage {
                    let c = self.choice.usage_chunk(usage);
                    self.push(c);
                }
                self.pending.push_back("[DONE]".into());
                self.rx = None;
                self.status = 200;
            }
            // A failure ends the stream with an error object and no [DONE], as OpenAI does.
            Some(Event::Error(message)) => self.fail(failed(message)),
            None => self.fail(ended_early()),
        }
    }

    fn fail(&mut self, e: ApiError) {
        self.push(e.json());
        self.rx = None;
        self.status = e.status.as_u16();
    }
}

/// The SSE response: each event becomes its chunk as soon as it arrives (no buffering),
/// then the usage chunk (unless turned off) and `data: [DONE]`.
pub fn stream<C: Choice>(
    rx: UnboundedReceiver<Event>,
    mut choice: C,
    include_usage: bool,
    outcome: Option<Outcome>,
) -> Response {
    let mut pending = VecDeque::new();
    if let Some(c) = choice.opening() {
        pending.push_back(c);
    }
    let state = StreamState {
        rx: Some(rx),
        choice,
        pending,
        include_usage,
        record: outcome.map(RecordOnDrop::new),
        status: 200,
    };
    let mut response = Sse::new(events(state)).into_response();
    response.extensions_mut().insert(BodyRecords);
    response
}

fn events<C: Choice>(state: StreamState<C>) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), st));
            }
            match st.rx.as_mut() {
                Some(rx) => {
                    let event = rx.recv().await;
                    st.on_event(event);
                }
                None => {
                    if let Some(r) = st.record.take() {
                        r.finish(st.status);
                    }
                    return None;
                }
            }
        }
    })
}
