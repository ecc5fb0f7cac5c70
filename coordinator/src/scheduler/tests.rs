//! The scheduler on the in-process backend with the `grok1-tiny-a` fixture: batching,
//! chunked prefill and preemption never change a request's tokens; cancelled requests free
//! their blocks; the queue is bounded.

use super::*;
use crate::cluster::ClusterError;
use crate::request::TokenLogprob;
use grok_shared::checkpoint::open_model;
use grok_shared::model::ModelWeights;
use grok_shared::sampling::SamplingParams;

fn backend(blocks: usize, block_size: usize) -> LocalBackend {
    let dir = open_model(&grok_shared::test_support::tiny_a_dir()).expect("fixture");
    let w = ModelWeights::load(dir.source.as_ref(), &dir.config).expect("weights");
    LocalBackend::new(w, blocks, block_size).expect("backend")
}

fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(Tokenizer::builtin().expect("builtin tokenizer"))
}

fn request(prompt: Vec<u32>, max_tokens: usize, temperature: f32, seed: u64) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            seed,
        },
        adjust: Default::default(),
        stop: Vec::new(),
        logprobs: None,
        ignore_eos: false,
        echo: false,
        arrived: Instant::now(),
    }
}

struct Run {
    handle: SchedulerHandle,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start_with(blocks: usize, block_size: usize, cfg: SchedulerConfig) -> Run {
    let (stop, rx) = watch::channel(false);
    let (handle, task) = start(
        backend(blocks, block_size),
        cfg,
        tokenizer(),
        Metrics::new(),
        rx,
    );
    Run { handle, stop, task }
}

impl Run {
    async fn end(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Collects a request's events: generated token ids, text, and how it ended.
async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, String, Event) {
    let mut ids = Vec::new();
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text { text: t, tokens } => {
                text.push_str(&t);
                ids.extend(tokens.iter().map(|t: &TokenLogprob| t.id));
            }
            Event::Prompt { .. } => {}
            end @ (Event::Done { .. } | Event::Error(_)) => return (ids, text, end),
        }
    }
    panic!("events ended without Done");
}

fn prompts() -> Vec<Vec<u32>> {
    // Different lengths, so prefills and decodes mix in the same steps.
    (0..6)
        .map(|i| {
            (0..(5 + 23 * i))
                .map(|j| ((j * 37 + i * 11) % 1000 + 3) as u32)
                .collect()
        })
        .collect()
}

async fn alone(prompt: &[u32], max: usize, temp: f32, seed: u64) -> Vec<u32> {
    let run = start_with(64, 16, SchedulerConfig::default());
    let rx = run
        .handle
        .submit(request(prompt.to_vec(), max, temp, seed))
        .unwrap();
    let (ids, _, end) = collect(rx).await;
    assert!(matches!(end, Event::Done { .. }), "{end:?}");
    run.end().await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_give_the_tokens_each_gives_alone() {
    let ps = prompts();
    let mut want = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        let temp = if i % 2 == 0 { 0.0 } else { 0.9 };
        want.push(alone(p, 24, temp, i as u64 + 7).await);
    }
    // A small token budget chunks the long prompts; a small pool forces preemption.
    let cfg = SchedulerConfig {
        max_step_tokens: 24,
        ..SchedulerConfig::default()
    };
    let run = start_with(36, 4, cfg);
    let rxs: Vec<_> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let temp = if i % 2 == 0 { 0.0 } else { 0.9 };
            run.handle
                .submit(request(p.clone(), 24, temp, i as u64 + 7))
                .unwrap()
        })
        .collect();
    let got = futures_util::future::join_all(rxs.into_iter().map(collect)).await;
    for (i, (ids, _, end)) in got.into_iter().enumerate() {
        assert!(matches!(end, Event::Done { .. }), "request {i}: {end:?}");
        assert_eq!(ids, want[i], "request {i}");
    }
    assert!(
        run.handle.metrics().preemptions.get() > 0,
        "the small pool should have forced a preemption"
    );
    // Gauges are refreshed after each step, just after the last events went out.
    let deadline = Instant::now() + Duration::from_secs(5);
    while run.handle.metrics().kv_blocks_used.get() != 0 {
        assert!(
            Instant::now() < deadline,
            "blocks still held after every request ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    run.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_receiver_frees_its_blocks() {
    let run = start_with(64, 16, SchedulerConfig::default());
    // Hang up on a request that is generating. The event channel is unbounded and the tiny
    // model fast, so on a loaded machine a request can be done before this task sees its first
    // token (and the gauges are refreshed only after each step): a try that finds no blocks
    // in use is drained and made again.
    let mut caught = false;
    for _ in 0..20 {
        let mut rx = run
            .handle
            .submit(request(prompts()[3].clone(), 150, 0.0, 1))
            .unwrap();
        loop {
            match rx.recv().await {
                Some(Event::Text { .. }) => break,
                Some(Event::Prompt { .. }) => {}
                other => panic!("no text before {other:?}"),
            }
        }
        if run.handle.metrics().kv_blocks_used.get() > 0 {
            drop(rx);
            caught = true;
            break;
        }
        let (_, _, end) = collect(rx).await;
        assert!(matches!(end, Event::Done { .. }), "{end:?}");
    }
    assert!(caught, "no try was still generating after its first token");
    let deadline = Instant::now() + Duration::from_secs(5);
    while run.handle.metrics().kv_blocks_used.get() != 0 || run.handle.metrics().running.get() != 0
    {
        assert!(Instant::now() < deadline, "blocks not freed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    run.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_bounded() {
    let cfg = SchedulerConfig {
        max_queued: 2,
        max_running: 1,
        ..SchedulerConfig::default()
    };
    let run = start_with(64, 16, cfg);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        match run.handle.submit(request(vec![5, 6, 7], 50, 0.0, 0)) {
            Ok(rx) => held.push(rx),
            Err(SubmitError::QueueFull { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "a flood must be refused");
    for rx in held {
        let (_, _, end) = collect(rx).await;
        assert!(matches!(end, Event::Done { .. }));
    }
    // Once drained, requests are accepted again.
    let rx = run
        .handle
        .submit(request(vec![5, 6, 7], 2, 0.0, 0))
        .unwrap();
    assert!(matches!(collect(rx).await.2, Event::Done { .. }));
    run.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_what_cannot_fit_and_stops_at_max_tokens() {
    let run = start_with(64, 16, SchedulerConfig::default());
    let context = run.handle.context_len();
    let long = vec![5u32; context];
    assert!(matches!(
        run.handle.submit(request(long, 1, 0.0, 0)),
        Err(SubmitError::TooLong { .. })
    ));
    assert_eq!(
        run.handle.submit(request(vec![], 1, 0.0, 0)).unwrap_err(),
        SubmitError::EmptyPrompt
    );
    assert!(matches!(
        run.handle.submit(request(vec![5000], 1, 0.0, 0)),
        Err(SubmitError::BadToken { id: 5000, .. })
    ));
    let rx = run
        .handle
        .submit(request(vec![5, 6, 7], 3, 0.0, 0))
        .unwrap();
    let (ids, _, end) = collect(rx).await;
    assert_eq!(ids.len(), 3);
    match end {
        Event::Done { finish, usage } => {
            assert_eq!(finish, FinishReason::Length);
            assert_eq!(usage.prompt_tokens, 3);
            assert_eq!(usage.completion_tokens, 3);
        }
        e => panic!("{e:?}"),
    }
    run.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_ends_the_text_before_it() {
    let prompt = prompts()[1].clone();
    let run = start_with(64, 16, SchedulerConfig::default());
    let (_, text, _) = collect(
        run.handle
            .submit(request(prompt.clone(), 16, 0.0, 0))
            .unwrap(),
    )
    .await;
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 6, "need some text to cut: {text:?}");
    // A stop string from the middle of the text (it may span tokens).
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = text.find(&stop).unwrap();
    let mut req = request(prompt, 16, 0.0, 0);
    req.stop = vec![stop.clone()];
    let (_, got, end) = collect(run.handle.submit(req).unwrap()).await;
    assert_eq!(got, text[..cut], "stop {stop:?}");
    assert!(matches!(
        end,
        Event::Done {
            finish: FinishReason::Stop,
            ..
        }
    ));
    run.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_logprobs_scores_the_prompt_even_when_chunked() {
    let prompt = prompts()[2].clone();
    let mut events = Vec::new();
    for budget in [512, 7] {
        let cfg = SchedulerConfig {
            max_step_tokens: budget,
            ..SchedulerConfig::default()
        };
        let run = start_with(64, 4, cfg);
        let mut req = request(prompt.clone(), 2, 0.0, 0);
        req.echo = true;
        req.logprobs = Some(2);
        let mut rx = run.handle.submit(req).unwrap();
        let Some(Event::Prompt { tokens, .. }) = rx.recv().await else {
            panic!("the prompt comes first")
        };
        assert_eq!(tokens.len(), prompt.len());
        assert_eq!(tokens[0].logprob, None);
        assert!(tokens[1..]
            .iter()
            .all(|t| t.logprob.is_some_and(|l| l <= 0.0) && t.top.len() == 2));
        events.push(tokens);
        run.end().await;
    }
    for (a, b) in events[0].iter().zip(&events[1]) {
        let (x, y) = (a.logprob.unwrap_or(0.0), b.logprob.unwrap_or(0.0));
        assert!((x - y).abs() < 1e-3, "{x} vs {y}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_no_new_tokens_returns_just_the_prompt() {
    let run = start_with(64, 16, SchedulerConfig::default());
    let mut req = request(vec![5, 6, 7, 8], 0, 0.0, 0);
    req.echo = true;
    req.logprobs = Some(1);
    let mut rx = run.handle.submit(req).unwrap();
    let Some(Event::Prompt { tokens, .. }) = rx.recv().await else {
        panic!("the prompt comes first")
    };
    assert_eq!(tokens.len(), 4);
    match rx.recv().await {
        Some(Event::Done { finish, usage }) => {
            assert_eq!(finish, FinishReason::Length);
            assert_eq!(usage.completion_tokens, 0);
        }
        e => panic!("{e:?}"),
    }
    run.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_new_tokens_and_no_prompt_logprobs_ends_after_the_prompt() {
    // With nothing to sample and no logits wanted, the prompt's pass is the last one: it used
    // to leave the sequence running with no tokens to compute, a step the cluster refuses,
    // again and again.
    for echo in [false, true] {
        let run = start_with(64, 16, SchedulerConfig::default());
        let mut req = request(vec![5, 6, 7, 8], 0, 0.0, 0);
        req.echo = echo;
        let rx = run.handle.submit(req).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(30), async {
            let mut rx = rx;
            let mut prompt = None;
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Prompt { text, .. } => prompt = Some(text),
                    end => return (prompt, end),
                }
            }
            panic!("events ended without Done");
        })
        .await
        .expect("a request with max_tokens 0 ends");
        match got {
            (prompt, Event::Done { finish, usage }) => {
                assert_eq!(finish, FinishReason::Length);
                assert_eq!(usage.completion_tokens, 0);
                let want = tokenizer().decode(&[5, 6, 7, 8]).expect("decodes");
                assert_eq!(prompt, echo.then_some(want), "echo {echo}");
            }
            e => panic!("echo {echo}: {e:?}"),
        }
        run.end().await;
    }
}

/// The in-process backend, except that a step fails when `fails` says so of its work, as a
/// step that a request (or a broken cluster) makes impossible would; recovery then succeeds.
struct Failing<F> {
    inner: LocalBackend,
    fails: F,
    /// Steps failed so far.
    failed: Arc<AtomicUsize>,
}

impl<F: Fn(&[SeqWork]) -> bool + Send + 'static> StepBackend for Failing<F> {
    fn config(&self) -> &grok_shared::config::ModelConfig {
        self.inner.config()
    }
    fn groups(&self) -> usize {
        self.inner.groups()
    }
    fn blocks_per_group(&self) -> usize {
        self.inner.blocks_per_group()
    }
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    async fn step(&mut self, work: &[SeqWork]) -> Result<StepOutput, ClusterError> {
        if (self.fails)(work) {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return Err(ClusterError::InvalidWork("injected failure".into()));
        }
        self.inner.step(work).await
    }
    async fn check_health(&mut self) -> Result<(), ClusterError> {
        self.inner.check_health().await
    }
    async fn recover(&mut self) -> Result<(), ClusterError> {
        self.inner.recover().await
    }
    async fn shutdown(self) {
        self.inner.shutdown().await
    }
}

/// Runs `requests` (submitted in order: the first gets sequence id 1) on a [`Failing`]
/// backend and returns how each ended, and how many steps failed.
async fn run_failing(
    fails: impl Fn(&[SeqWork]) -> bool + Send + 'static,
    cfg: SchedulerConfig,
    requests: Vec<GenerationRequest>,
) -> (Vec<(Vec<u32>, String, Event)>, usize) {
    let failed = Arc::new(AtomicUsize::new(0));
    let backend = Failing {
        inner: backend(64, 16),
        fails,
        failed: failed.clone(),
    };
    let (stop, stop_rx) = watch::channel(false);
    let metrics = Metrics::new();
    let (handle, task) = start(backend, cfg, tokenizer(), metrics.clone(), stop_rx);
    let rxs: Vec<_> = requests
        .into_iter()
        .map(|r| handle.submit(r).expect("queued"))
        .collect();
    let ended = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(rxs.into_iter().map(collect)),
    )
    .await
    .expect("every request ends");
    let _ = stop.send(true);
    let _ = task.await;
    let failed = failed.load(Ordering::Relaxed);
    assert_eq!(
        metrics.failed_steps.get(),
        failed as u64,
        "the metric counts them"
    );
    (ended, failed)
}

fn error_of(end: &Event) -> &str {
    match end {
        Event::Error(msg) => msg,
        e => panic!("expected an error, got {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_steps_keep_failing_fails_even_between_successes() {
    // Every decode fails; recovery recomputes the sequence from position 0, which succeeds
    // (and samples a token), so failures never come twice in a row; the request must still
    // end, with the error.
    let (ended, _) = run_failing(
        |work| work.iter().any(|w| w.start > 0),
        SchedulerConfig::default(),
        vec![request(vec![5, 6, 7, 8], 50, 0.0, 0)],
    )
    .await;
    let (ids, _, end) = &ended[0];
    let msg = error_of(end);
    assert!(
        msg.contains("3 steps with this request alone") && msg.contains("injected failure"),
        "{msg}"
    );
    assert!(ids.len() < 50, "{} tokens", ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_breaks_its_batches_fails_alone_and_the_others_finish() {
    // Sequence 3 makes every step that takes it past position 32 fail: mid-generation, in a
    // batch with the others. A small token budget chunks the long prompts, so the sequences
    // recompute alone in several steps, and the first of sequence 3's succeeds: it must stay
    // alone until it has passed the position its batch failed at.
    let ps = prompts();
    let mut want = Vec::new();
    for (i, p) in ps.iter().enumerate().take(4) {
        want.push(alone(p, 16, 0.7, i as u64).await);
    }
    let cfg = SchedulerConfig {
        max_step_tokens: 24,
        ..SchedulerConfig::default()
    };
    let mut requests: Vec<_> = (0..4)
        .map(|i| request(ps[i].clone(), 16, 0.7, i as u64))
        .collect();
    let poison = (0..30).map(|j| j * 13 + 5).collect();
    requests.insert(2, request(poison, 16, 0.7, 9));
    let (mut ended, failed) = run_failing(
        |work| {
            work.iter()
                .any(|w| w.seq_id == 3 && w.start + w.tokens.len() > 32)
        },
        cfg,
        requests,
    )
    .await;
    let (ids, _, end) = ended.remove(2);
    let msg = error_of(&end);
    assert!(msg.contains("this request alone"), "{msg}");
    assert!(ids.len() <= 3, "{ids:?}");
    for (i, (ids, _, end)) in ended.into_iter().enumerate() {
        assert!(matches!(end, Event::Done { .. }), "request {i}: {end:?}");
        assert_eq!(ids, want[i], "request {i}");
    }
    // Its batch, then three times alone.
    assert!(failed >= 4, "{failed} failed steps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_that_only_batches_show_ends_the_requests_it_keeps_failing() {
    // Each request runs alone without a fault; the scheduler must not alternate between
    // failed batches and lone recomputes forever.
    let requests = (0..3)
        .map(|i| request(vec![5, 6, 7 + i], 50, 0.0, 0))
        .collect();
    let (ended, _) = run_failing(|work| work.len() > 1, SchedulerConfig::default(), requests).await;
    let mut errors = 0;
    for (i, (ids, _, end)) in ended.iter().enumerate() {
        if let Event::Error(msg) = end {
            assert!(msg.contains("fewer than 3 of them"), "request {i}: {msg}");
            errors += 1;
        }
        assert!(ids.len() < 50, "request {i}: {} tokens", ids.len());
    }
    assert!(errors >= 2, "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_fails_every_step_fails_every_request_within_a_few_steps() {
    let requests = (0..4)
        .map(|i| request(vec![5, 6, 7 + i], 20, 0.0, 0))
        .collect();
    let (ended, failed) = run_failing(|_| true, SchedulerConfig::default(), requests).await;
    for (i, (ids, _, end)) in ended.iter().enumerate() {
        let msg = error_of(end);
        assert!(msg.contains("injected failure"), "request {i}: {msg}");
        assert!(ids.is_empty(), "request {i}: {ids:?}");
    }
    // Two lone failures of two requests in a row condemn the cluster, not the requests. At
    // worst (requests picked up one at a time) the first fails alone (three steps), the
    // second alone twice (five in a row: every running request fails), and each later one
    // on its first failed step, since no step succeeded in between.
    assert!(failed <= 7, "{failed} failed steps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_requests_and_lets_the_live_ones_finish() {
    let want = alone(&[5, 6, 7], 20, 0.0, 0).await;
    let run = start_with(64, 16, SchedulerConfig::default());
    let h = &run.handle;
    assert_eq!(h.live(), 0);
    let rx = h.submit(request(vec![5, 6, 7], 20, 0.0, 0)).unwrap();
    let abandoned = h.submit(request(vec![8, 9], 20, 0.0, 0)).unwrap();
    assert_eq!(h.live(), 2);
    assert!(h.ready());
    h.drain();
    assert!(!h.ready(), "a draining server is not ready");
    let refused = h.submit(request(vec![5], 4, 0.0, 0));
    assert!(
        matches!(refused, Err(SubmitError::ShuttingDown)),
        "{refused:?}"
    );
    drop(abandoned);
    let (ids, _, end) = collect(rx).await;
    assert!(matches!(end, Event::Done { .. }), "{end:?}");
    assert_eq!(ids, want, "the request runs to its end as it would have");
    // Counted until the scheduler drops it: finished, or abandoned by its client.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.live() != 0 {
        assert!(Instant::now() < deadline, "{} still live", h.live());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    run.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn penalties_count_every_generated_token_and_bias_applies() {
    let adjust = grok_shared::sampling::LogitAdjust {
        presence_penalty: 0.7,
        frequency_penalty: 0.9,
        counts: Vec::new(),
        bias: vec![(9, 1.5), (40, -3.0)],
    };
    let prompt = vec![5, 6, 7, 8];
    let want = grok_shared::test_support::tiny_a_greedy_adjusted(&prompt, 24, &adjust);
    let plain = grok_shared::test_support::tiny_a_greedy_adjusted(&prompt, 24, &Default::default());
    assert_ne!(want, plain, "the adjustments must change this continuation");
    // Preemption on a small pool makes the scheduler recompute: the counts must survive it.
    let run = start_with(12, 4, SchedulerConfig::default());
    let mut req = request(prompt.clone(), 24, 0.0, 0);
    req.ignore_eos = true;
    req.adjust = adjust;
    let rx = run.handle.submit(req).unwrap();
    let others: Vec<_> = (0..2)
        .map(|i| {
            run.handle
                .submit(request(vec![9 + i, 10, 11], 24, 0.0, 0))
                .unwrap()
        })
        .collect();
    let (ids, _, end) = collect(rx).await;
    for rx in others {
        collect(rx).await;
    }
    assert!(matches!(end, Event::Done { .. }), "{end:?}");
    assert_eq!(ids, want);
    assert!(
        run.handle.metrics().preemptions.get() > 0,
        "no preemption happened"
    );
    run.end().await;
}
