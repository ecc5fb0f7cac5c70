//! The scheduler: one tokio task (an actor) that owns the cluster and every sequence's state.
//! Requests arrive through a [`SchedulerHandle`]; each step it admits waiting requests while
//! KV blocks allow, runs decodes and budget-sized prefill chunks together, samples, releases
//! text, and frees the blocks of finished or abandoned requests.

use crate::metrics::Metrics;
use crate::request::{Event, GenerationRequest, SubmitError};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A request on its way into the scheduler, with where its events go.
pub struct Submission {
    pub request: GenerationRequest,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What the API holds: submits requests, answers readiness. Cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Submission>,
    /// Requests accepted but not yet admitted to the running batch (the bounded queue).
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    ready: Arc<AtomicBool>,
    context: usize,
    vocab: usize,
    metrics: Metrics,
}

/// The scheduler's side of a handle: where submissions arrive, and the shared counters.
pub struct Inbox {
    pub rx: mpsc::UnboundedReceiver<Submission>,
    pub queued: Arc<AtomicUsize>,
    pub ready: Arc<AtomicBool>,
}

impl SchedulerHandle {
    /// A handle and the inbox a scheduler task reads; `context` and `vocab` are the model's.
    pub fn channel(max_queued: usize, context: usize, vocab: usize, metrics: Metrics) -> (Self, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let handle = SchedulerHandle {
            tx,
            queued: queued.clone(),
            max_queued,
            ready: ready.clone(),
            context,
            vocab,
            metrics,
        };
        (handle, Inbox { rx, queued, ready })
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request and frees its KV blocks at the next step.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let p = request.prompt.len();
        if p == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        if let Some(&id) = request.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(SubmitError::BadToken {
                id,
                vocab: self.vocab,
            });
        }
        if p + request.max_tokens > self.context {
            return Err(SubmitError::TooLong {
                prompt: p,
                max_tokens: request.max_tokens,
                context: self.context,
            });
        }
        // Reserve a queue slot first, so a flood cannot grow the queue past its bound.
        let reserved = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queued).then_some(n + 1)
            });
        if let Err(waiting) = reserved {
            return Err(SubmitError::QueueFull { waiting });
        }
        let (events, rx) = mpsc::unbounded_channel();
        if self.tx.send(Submission { request, events }).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(rx)
    }

    /// Whether every rank is loaded and healthy.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The model's context length in tokens.
    pub fn context_len(&self) -> usize {
        self.context
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
