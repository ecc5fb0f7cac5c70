//! The scheduler: one tokio task (an actor) that owns the cluster and every sequence's state.
//! Requests arrive through a [`SchedulerHandle`]; each step it admits waiting requests while
//! KV blocks allow, runs decodes and budget-sized prefill chunks together, samples, releases
//! text, and frees the blocks of finished or abandoned requests.

pub mod backend;
mod sequence;

pub use backend::{LocalBackend, StepBackend};

use crate::cluster::{SeqWork, StepOutput};
use crate::metrics::{ExpertLabels, Metrics, RankLabels};
use crate::request::{Event, FinishReason, GenerationRequest, SubmitError};
use grok_shared::model::{blocks_for, BlockAllocator, LogitsMode};
use grok_shared::tokenizer::Tokenizer;
use sequence::{Progress, Sequence};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// A request on its way into the scheduler, with where its events go.
pub struct Submission {
    pub request: GenerationRequest,
    pub events: mpsc::UnboundedSender<Event>,
    /// Counts the request as live until the scheduler drops it (ended, however it ends).
    pub live: Live,
}

/// One live request in a shared count: counted while this exists.
pub struct Live(Arc<AtomicUsize>);

impl Live {
    pub fn new(count: &Arc<AtomicUsize>) -> Live {
        count.fetch_add(1, Ordering::AcqRel);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the API holds: submits requests, answers readiness. Cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Submission>,
    /// Requests accepted but not yet admitted to the running batch (the bounded queue).
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    ready: Arc<AtomicBool>,
    /// Set by [`Self::drain`]: new requests are refused, running ones go on.
    draining: Arc<AtomicBool>,
    /// Requests submitted and not yet ended.
    live: Arc<AtomicUsize>,
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
    pub fn channel(
        max_queued: usize,
        context: usize,
        vocab: usize,
        metrics: Metrics,
    ) -> (Self, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let handle = SchedulerHandle {
            tx,
            queued: queued.clone(),
            max_queued,
            ready: ready.clone(),
            draining: Arc::new(AtomicBool::new(false)),
            live: Arc::new(AtomicUsize::new(0)),
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
        if self.draining.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
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
        request
            .adjust
            .validate(self.vocab)
            .map_err(SubmitError::BadAdjust)?;
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
        let live = Live::new(&self.live);
        if self
            .tx
            .send(Submission {
                request,
                events,
                live,
            })
            .is_err()
        {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(rx)
    }

    /// Whether every rank is loaded and healthy, and the server is not draining.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    /// Refuses new requests from now on (503, `shutting_down`; not ready), while those
    /// already submitted run to their end: the first step of a graceful stop.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Requests submitted and not yet ended (their last event sent, or abandoned).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// The model's context length in tokens.
    pub fn context_len(&self) -> usize {
        self.context
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Batching limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// New tokens per step at most (decodes count one each; prefill chunks fill the rest),
    /// so a long prompt is spread over steps instead of stalling every decode.
    pub max_step_tokens: usize,
    /// Requests waiting for admission at most; beyond, submissions are refused (429).
    pub max_queued: usize,
    /// How often an idle scheduler checks the ranks' health.
    pub health_interval: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_running: 64,
            max_step_tokens: 512,
            max_queued: 256,
            health_interval: Duration::from_secs(1),
        }
    }
}

/// Starts the scheduler task on the current runtime. It runs until `shutdown` turns true
/// (or every handle is dropped), then fails what is still in flight and shuts the backend down.
pub fn start<B: StepBackend>(
    backend: B,
    cfg: SchedulerConfig,
    tokenizer: Arc<Tokenizer>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
) -> (SchedulerHandle, tokio::task::JoinHandle<()>) {
    let c = backend.config();
    let (handle, inbox) =
        SchedulerHandle::channel(cfg.max_queued, c.max_seq_len, c.vocab_size, metrics.clone());
    inbox.ready.store(true, Ordering::Release);
    let scheduler = Scheduler::new(backend, cfg, tokenizer, metrics, inbox);
    let task = tokio::spawn(scheduler.run(shutdown));
    (handle, task)
}

struct Scheduler<B> {
    backend: B,
    cfg: SchedulerConfig,
    tokenizer: Arc<Tokenizer>,
    metrics: Metrics,
    inbox: Inbox,
    /// One block pool per data-parallel group.
    pools: Vec<BlockAllocator>,
    block_size: usize,
    context: usize,
    vocab: usize,
    eos: Option<u32>,
    /// Admitted sequences, oldest first (the youngest are preempted first).
    running: Vec<Sequence>,
    /// Preempted sequences first, then new arrivals, in order.
    waiting: VecDeque<Sequence>,
    next_id: u64,
    /// Steps that failed in a row (until one succeeds, whatever ended in between).
    failures: u32,
    /// The sequence that was alone in the last step, if that step failed: when the next lone
    /// sequence fails too, the cluster is at fault, not the requests.
    last_lone_failure: Option<u64>,
}

/// Steps a request may fail alone before it fails.
const MAX_FAILED_ALONE: u32 = 3;
/// Failed steps a request may be part of before it fails, even if it never fails alone (a
/// failure that only batches show must not loop forever).
const MAX_FAILED_STEPS: u32 = 6;
/// Failed steps in a row after which every running request fails, whatever the cause: one
/// request failing alone accounts for its batch's failure plus `MAX_FAILED_ALONE`.
const MAX_FAILURES_IN_A_ROW: u32 = MAX_FAILED_ALONE + 2;

impl<B: StepBackend> Scheduler<B> {
    fn new(
        backend: B,
        cfg: SchedulerConfig,
        tokenizer: Arc<Tokenizer>,
        metrics: Metrics,
        inbox: Inbox,
    ) -> Self {
        let c = backend.config();
        let (context, vocab) = (c.max_seq_len, c.vocab_size);
        let pools = (0..backend.groups())
            .map(|_| BlockAllocator::new(backend.blocks_per_group()))
            .collect();
        metrics
            .kv_blocks_total
            .set((backend.groups() * backend.blocks_per_group()) as i64);
        Scheduler {
            block_size: backend.block_size(),
            eos: tokenizer.eos_id(),
            backend,
            cfg,
            tokenizer,
            metrics,
            inbox,
            pools,
            context,
            vocab,
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_id: 0,
            failures: 0,
            last_lone_failure: None,
        }
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut health = tokio::time::interval(self.cfg.health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        while open && !*shutdown.borrow() {
            if self.running.is_empty() && self.waiting.is_empty() {
                // Idle: wait for work, a health check, or the end.
                tokio::select! {
                    sub = self.inbox.rx.recv() => match sub {
                        Some(sub) => self.accept(sub),
                        None => open = false,
                    },
                    _ = health.tick() => self.check_health().await,
                    // A dropped sender means the server is gone: stop too.
                    changed = shutdown.changed() => if changed.is_err() { open = false },
                }
            }
            loop {
                match self.inbox.rx.try_recv() {
                    Ok(sub) => self.accept(sub),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            if !self.running.is_empty() || !self.waiting.is_empty() {
                self.step().await;
            }
            self.update_gauges();
        }
        for s in self.running.drain(..).chain(self.waiting.drain(..)) {
            s.fail("the server is shutting down".into());
        }
        self.inbox.ready.store(false, Ordering::Release);
        self.backend.shutdown().await;
    }

    fn accept(&mut self, sub: Submission) {
        self.next_id += 1;
        // The API validates sampling parameters; this is a second line of defence.
        if let Err(e) = sub.request.sampling.validate() {
            self.inbox.queued.fetch_sub(1, Ordering::AcqRel);
            let _ = sub.events.send(Event::Error(e.to_string()));
            return;
        }
        self.waiting
            .push_back(Sequence::new(self.next_id, sub, self.tokenizer.clone()));
    }

    fn release(&mut self, seq: &mut Sequence) {
        self.pools[seq.group].release(&seq.blocks);
        seq.blocks.clear();
        seq.computed = 0;
    }

    fn unqueue(&self, seq: &mut Sequence) {
        if seq.queued {
            seq.queued = false;
            self.inbox.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Ends the running sequences `ends` picks: frees their blocks and, with `error`, fails
    /// them with it.
    fn end_running(&mut self, ends: impl Fn(&Sequence) -> bool, error: Option<&str>) {
        let mut i = 0;
        while i < self.running.len() {
            if ends(&self.running[i]) {
                let mut s = self.running.remove(i);
                self.release(&mut s);
                if let Some(msg) = error {
                    s.fail(msg.to_string());
                }
                self.observe_end(&s);
            } else {
                i += 1;
            }
        }
    }

    /// A client that went away frees its blocks now.
    fn drop_cancelled(&mut self) {
        self.end_running(Sequence::cancelled, None);
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        while let Some(mut s) = self.waiting.pop_front() {
            if s.cancelled() {
                self.unqueue(&mut s);
                self.observe_end(&s);
            } else {
                kept.push_back(s);
            }
        }
        self.waiting = kept;
    }

    async fn check_health(&mut self) {
        if let Err(e) = self.backend.check_health().await {
            tracing::warn!("unhealthy: {e}");
            self.recover().await;
        }
    }

    /// After a failure: restart what failed, then recompute every running sequence (their
    /// KV contents are gone; their blocks are kept and refilled).
    async fn recover(&mut self) -> bool {
        self.inbox.ready.store(false, Ordering::Release);
        match self.backend.recover().await {
            Ok(()) => {
                self.inbox.ready.store(true, Ordering::Release);
                for s in &mut self.running {
                    s.computed = 0;
                }
                tracing::info!("recovered; recomputing {} sequence(s)", self.running.len());
                true
            }
            Err(e) => {
                tracing::error!("recovery failed: {e}");
                false
            }
        }
    }

    /// Moves `running[i]` back to the waiting line (ahead of new arrivals), freeing its blocks.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.release(&mut s);
        self.metrics.preemptions.inc();
        let at = self.waiting.iter().take_while(|w| !w.queued).count();
        self.waiting.insert(at, s);
    }

    /// Chooses this step's work: a suspect alone if there is one ([`Self::plan_probe`]), else
    /// a batch ([`Self::plan_batch`]).
    fn plan_step(&mut self) -> Vec<(usize, SeqWork)> {
        let chosen = match self.probe() {
            Some(p) => self.plan_probe(p),
            None => self.plan_batch(),
        };
        chosen
            .into_iter()
            .map(|(i, n)| {
                let s = &self.running[i];
                let from = s.computed;
                // The step that completes the sequence's tokens chooses the next one, unless
                // no more are wanted (`max_tokens` 0 with `echo`).
                let sample = from + n == s.len() && s.generated.len() < s.req.max_tokens;
                let logits = if s.wants_prompt_logprobs() && from < s.req.prompt.len() {
                    LogitsMode::All
                } else if sample {
                    LogitsMode::Last
                } else {
                    LogitsMode::None
                };
                let work = SeqWork {
                    seq_id: s.id,
                    group: s.group,
                    start: from,
                    tokens: (from..from + n).map(|p| s.token(p)).collect(),
                    blocks: s.blocks.clone(),
                    logits,
                    sample: sample.then(|| s.sample_spec()),
                };
                (i, work)
            })
            .collect()
    }

    /// The suspect to run alone next: the one that failed alone the fewest times, oldest
    /// first, so that two lone failures in a row come from two sequences where there are two.
    fn probe(&self) -> Option<usize> {
        (0..self.running.len())
            .filter(|&i| self.running[i].suspect_until.is_some())
            .min_by_key(|&i| (self.running[i].failed_alone, i))
    }

    /// `running[p]` alone (a chunk within the budget), preempting the youngest other
    /// sequences of its group for blocks, or `p` itself when it has no one else to take from.
    fn plan_probe(&mut self, mut p: usize) -> Vec<(usize, usize)> {
        loop {
            let s = &self.running[p];
            let n = s.pending().min(self.cfg.max_step_tokens);
            let need = blocks_for(s.computed + n, self.block_size).saturating_sub(s.blocks.len());
            let g = s.group;
            if let Some(b) = self.pools[g].alloc(need) {
                self.running[p].blocks.extend(b);
                return vec![(p, n)];
            }
            match (0..self.running.len())
                .rev()
                .find(|&j| j != p && self.running[j].group == g)
            {
                Some(j) => {
                    self.preempt(j);
                    if j < p {
                        p -= 1;
                    }
                }
                None => {
                    self.preempt(p);
                    return Vec::new();
                }
            }
        }
    }

    /// Running sequences first (oldest first; a decode is one token, a prefill a chunk within
    /// the budget), preempting the youngest when a group runs out of blocks; then admits
    /// waiting sequences while blocks and budget allow.
    fn plan_batch(&mut self) -> Vec<(usize, usize)> {
        let bs = self.block_size;
        let mut budget = self.cfg.max_step_tokens;
        let mut chosen: Vec<(usize, usize)> = Vec::new(); // (index in running, tokens)
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let n = s.pending().min(budget);
            let need = blocks_for(s.computed + n, bs).saturating_sub(s.blocks.len());
            let g = s.group;
            if self.pools[g].free() < need {
                // The youngest sequence of this group after `i` makes room; else `i` itself.
                match (i + 1..self.running.len())
                    .rev()
                    .find(|&j| self.running[j].group == g)
                {
                    Some(j) => self.preempt(j),
                    None => self.preempt(i),
                }
                continue;
            }
            if let Some(b) = self.pools[g].alloc(need) {
                self.running[i].blocks.extend(b);
            }
            chosen.push((i, n));
            budget -= n;
            i += 1;
        }
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(s) = self.waiting.front() else { break };
            // Admission: blocks for everything it holds now must be free in some group.
            let need = blocks_for(s.len(), bs);
            let g = (0..self.pools.len())
                .max_by_key(|&g| (self.pools[g].free(), std::cmp::Reverse(g)))
                .unwrap_or(0);
            if need > self.pools[g].total() {
                // Only possible with a pool smaller than one context: fail, never wait forever.
                if let Some(mut s) = self.waiting.pop_front() {
                    self.unqueue(&mut s);
                    s.fail(format!(
                        "the sequence needs {need} KV blocks but a group has {}; raise --kv-cache-mb",
                        self.pools[g].total()
                    ));
                    self.observe_end(&s);
                }
                continue;
            }
            let Some(blocks) = self.pools[g].alloc(need) else {
                break;
            };
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            self.unqueue(&mut s);
            s.group = g;
            s.blocks = blocks;
            s.computed = 0;
            if s.suspect_until.is_some() {
                // Preempted while it was to run alone: it runs alone next step.
                self.running.push(s);
                break;
            }
            let n = s.pending().min(budget);
            self.running.push(s);
            chosen.push((self.running.len() - 1, n));
            budget -= n;
        }
        chosen
    }

    async fn step(&mut self) {
        let plan = self.plan_step();
        if plan.is_empty() {
            return;
        }
        let work: Vec<SeqWork> = plan.iter().map(|(_, w)| w.clone()).collect();
        let started = Instant::now();
        let result = self.backend.step(&work).await;
        self.metrics
            .step_seconds
            .observe(started.elapsed().as_secs_f64());
        let out = match result {
            Ok(out) => {
                self.failures = 0;
                self.last_lone_failure = None;
                for (i, w) in &plan {
                    let s = &mut self.running[*i];
                    if s.suspect_until
                        .is_some_and(|u| u <= w.start + w.tokens.len())
                    {
                        s.suspect_until = None;
                    }
                }
                out
            }
            Err(e) => {
                tracing::warn!("step failed: {e}");
                self.metrics.failed_steps.inc();
                self.failures += 1;
                // A failed batch does not say which request broke it (a worker that crashes
                // on one request's input takes the whole step down): its sequences then run
                // one per step, up to where the batch failed, so that the others go on and
                // the cause fails alone.
                for (i, w) in &plan {
                    let s = &mut self.running[*i];
                    s.failed_steps += 1;
                    s.suspect_until = s.suspect_until.max(Some(w.start + w.tokens.len()));
                }
                let mut cluster_at_fault = false;
                if let [(i, _)] = plan[..] {
                    let s = &mut self.running[i];
                    s.failed_alone += 1;
                    cluster_at_fault = self.last_lone_failure.is_some_and(|id| id != s.id);
                    // One that fails for good below says nothing about the next one.
                    self.last_lone_failure = (s.failed_alone < MAX_FAILED_ALONE).then_some(s.id);
                }
                let recovered = self.recover().await;
                // A request that keeps failing fails, even when the steps in between succeed:
                // recovery must not turn a step that cannot run into a loop.
                let alone = format!(
                    "the cluster failed on {MAX_FAILED_ALONE} steps with this request alone: {e}"
                );
                self.end_running(|s| s.failed_alone >= MAX_FAILED_ALONE, Some(&alone));
                let batched = format!(
                    "the cluster failed on {MAX_FAILED_STEPS} steps with this request, fewer \
                     than {MAX_FAILED_ALONE} of them with it alone: {e}"
                );
                self.end_running(|s| s.failed_steps >= MAX_FAILED_STEPS, Some(&batched));
                if !recovered || cluster_at_fault || self.failures >= MAX_FAILURES_IN_A_ROW {
                    // The counts stay: until a step succeeds, a request that arrives next
                    // fails on its first failed step instead of starting them over.
                    let msg = format!("the cluster failed: {e}");
                    self.end_running(|_| true, Some(&msg));
                }
                return;
            }
        };
        self.record_step(&out);
        let now = Instant::now();
        let mut finished: Vec<(usize, Option<FinishReason>)> = Vec::new();
        let mut out = out;
        for (i, w) in plan {
            let s = &mut self.running[i];
            s.computed = w.start + w.tokens.len();
            if w.logits == LogitsMode::All {
                match out.logits.remove(&w.seq_id) {
                    Some(rows) => {
                        s.take_prompt_logprobs(&self.tokenizer, &rows, w.start, self.vocab)
                    }
                    None => {
                        s.fail("internal error: the cluster returned no logits".into());
                        finished.push((i, None));
                        continue;
                    }
                }
            }
            if s.computed < s.len() {
                continue;
            }
            if s.generated.len() >= s.req.max_tokens {
                s.send_prompt(&self.tokenizer);
                finished.push((i, Some(FinishReason::Length)));
                continue;
            }
            let Some(x) = out.sampled.remove(&w.seq_id) else {
                s.fail("internal error: the cluster returned no token".into());
                finished.push((i, None));
                continue;
            };
            s.send_prompt(&self.tokenizer);
            let progress = s.advance(&self.tokenizer, x, self.eos, self.context, now);
            match s.last_token_before_this() {
                None => self
                    .metrics
                    .ttft
                    .observe((now - s.req.arrived).as_secs_f64()),
                Some(prev) => self.metrics.itl.observe((now - prev).as_secs_f64()),
            }
            if let Progress::Finished(f) = progress {
                finished.push((i, Some(f)));
            }
        }
        // Remove from the back so earlier indices stay valid.
        finished.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, f) in finished {
            let mut s = self.running.remove(i);
            // `None`: the request already failed with an error event.
            if let Some(f) = f {
                s.finish(f);
            }
            self.release(&mut s);
            self.observe_end(&s);
        }
    }

    fn record_step(&self, out: &StepOutput) {
        let experts = self.backend.config().num_local_experts.max(1);
        for (k, &n) in out.expert_tokens.iter().enumerate() {
            if n > 0 {
                self.metrics
                    .expert_tokens
                    .get_or_create(&ExpertLabels {
                        layer: (k / experts) as u32,
                        expert: (k % experts) as u32,
                    })
                    .inc_by(n);
            }
        }
        for (rank, &secs) in out.comm_seconds.iter().enumerate() {
            self.metrics
                .collective_seconds
                .get_or_create(&RankLabels { rank: rank as u32 })
                .inc_by(secs);
        }
    }

    /// Latency and token metrics of a request that ended (finished, failed or abandoned).
    fn observe_end(&self, s: &Sequence) {
        let m = &self.metrics;
        let arrived = s.req.arrived;
        m.e2e.observe(arrived.elapsed().as_secs_f64());
        m.prompt_tokens.inc_by(s.req.prompt.len() as u64);
        m.generation_tokens.inc_by(s.generated.len() as u64);
        m.request_prompt_tokens.observe(s.req.prompt.len() as f64);
        m.request_generation_tokens
            .observe(s.generated.len() as f64);
        if let (Some(first), Some(last)) = (s.first_token, s.last_token) {
            if s.generated.len() > 1 {
                let per = (last - first).as_secs_f64() / (s.generated.len() - 1) as f64;
                m.tpot.observe(per);
            }
        }
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.queue_depth
            .set(self.inbox.queued.load(Ordering::Acquire) as i64);
        m.running.set(self.running.len() as i64);
        m.waiting.set(self.waiting.len() as i64);
        m.kv_blocks_used
            .set(self.pools.iter().map(BlockAllocator::used).sum::<usize>() as i64);
    }
}

#[cfg(test)]
mod tests;
