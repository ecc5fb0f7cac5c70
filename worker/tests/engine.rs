//! The engine of a world of one, driven through its command channel: bad loads and steps are
//! errors (never panics) that leave it serving, and its steps over the paged KV pool compute
//! what the one-process model computes.

use grok_proto::worker::v1 as pb;
use grok_shared::checkpoint::open_model;
use grok_shared::cpu::CpuModel;
use grok_shared::model::{LogitsMode, ModelWeights, SeqKv};
use grok_shared::test_support::{max_abs_diff, tiny_a_dir};
use grok_worker::engine::{self, Command, EngineError, Loaded};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

struct Harness {
    rt: tokio::runtime::Runtime,
    tx: mpsc::Sender<Command>,
    peer_addr: String,
}

impl Harness {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let status = Arc::new(Mutex::new(engine::Status::default()));
        let (tx, addr) = engine::spawn(
            rt.handle().clone(),
            "tok".into(),
            listener,
            status,
            grok_shared::cuda::Device::Cpu,
        )
        .unwrap();
        Harness {
            rt,
            tx,
            peer_addr: addr.to_string(),
        }
    }

    fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Command,
    ) -> Result<T, EngineError> {
        self.rt.block_on(async {
            let (reply, rx) = oneshot::channel();
            self.tx.send(make(reply)).await.unwrap();
            rx.await.unwrap()
        })
    }

    fn load(&self, kv_blocks: u32, block_size: u32) -> Result<Loaded, EngineError> {
        let req = pb::LoadRequest {
            rank: 0,
            plan: Some(pb::Plan {
                world: 1,
                tp: 1,
                ep: 1,
            }),
            model_path: tiny_a_dir().display().to_string(),
            kv_blocks,
            block_size,
        };
        // Room for every layer's progress message, so the engine never waits on this test.
        let (progress, _keep) = mpsc::channel(64);
        self.call(|reply| Command::Load {
            req,
            progress,
            reply,
        })
    }

    fn step(&self, seqs: Vec<pb::SeqInput>) -> Result<pb::StepReply, EngineError> {
        let req = pb::StepRequest { step_id: 1, seqs };
        self.call(|reply| Command::Step { req, reply })
    }
}

fn seq(id: u64, tokens: &[u32], start: u32, blocks: &[u32], mode: pb::LogitsMode) -> pb::SeqInput {
    pb::SeqInput {
        seq_id: id,
        tokens: tokens.to_vec(),
        start,
        blocks: blocks.to_vec(),
        logits: mode as i32,
        sampling: None,
    }
}

fn bad(r: Result<impl std::fmt::Debug, EngineError>, want: &str) {
    match r {
        Err(EngineError::BadRequest(msg)) => assert!(msg.contains(want), "{want}: got {msg}"),
        other => panic!("{want}: expected a bad request, got {other:?}"),
    }
}

#[test]
fn bad_requests_are_errors_and_steps_match_one_process() {
    let h = Harness::new();
    let prompt: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 1024).collect();
    let last = pb::LogitsMode::Last;
    assert!(matches!(
        h.step(vec![seq(1, &prompt, 0, &[0, 1], last)]),
        Err(EngineError::NotLoaded)
    ));
    bad(h.load(0, 16), "kv_blocks (0)");
    bad(h.load(8, 0), "block_size (0)");
    // A pool larger than the machine's memory is refused before it is allocated (the
    // allocation would abort the worker); ~54 PB here.
    bad(h.load(u32::MAX, 4096), "lower --kv-cache-mb");
    let loaded = h.load(8, 16).unwrap();
    assert!(loaded.weight_bytes > 0);
    // 3 layers × (8 kv heads × 16) × 16 positions × keys and values × f32, 8 blocks.
    assert_eq!(loaded.kv_bytes, 3 * 128 * 16 * 2 * 4 * 8);
    assert!(matches!(
        h.step(vec![seq(1, &prompt, 0, &[0, 1], last)]),
        Err(EngineError::NotConnected)
    ));
    // NCCL needs GPU workers; unknown collectives are named.
    for (collectives, says) in [("nccl", "--device cuda"), ("mpi", "unknown collectives")] {
        let req = pb::JoinPeersRequest {
            peer_addrs: vec![h.peer_addr.clone()],
            timeout_ms: 2000,
            collectives: collectives.into(),
        };
        match h.call(|reply| Command::Connect { req, reply }) {
            Err(EngineError::BadRequest(m)) => assert!(m.contains(says), "{m}"),
            other => panic!("{collectives}: {other:?}"),
        }
    }
    let req = pb::JoinPeersRequest {
        peer_addrs: vec![h.peer_addr.clone()],
        timeout_ms: 2000,
        collectives: String::new(),
    };
    h.call(|reply| Command::Connect { req, reply }).unwrap();

    bad(
        h.step(vec![seq(
            1,
            &prompt,
            0,
            &[0, 1],
            pb::LogitsMode::Unspecified,
        )]),
        "logits mode 0",
    );
    let mut odd = seq(1, &prompt, 0, &[0, 1], last);
    odd.logits = 42;
    bad(h.step(vec![odd]), "logits mode 42");
    bad(
        h.step(vec![seq(1, &prompt, 0, &[0, 8], last)]),
        "block id 8",
    );
    bad(h.step(vec![seq(1, &prompt, 0, &[0], last)]), "needs 2");
    bad(h.step(vec![seq(1, &[], 0, &[0], last)]), "no tokens");
    bad(
        h.step(vec![seq(1, &prompt, 250, &[0; 17], last)]),
        "context",
    );
    bad(
        h.step(vec![
            seq(1, &prompt, 0, &[0, 1], last),
            seq(1, &prompt, 0, &[2, 3], last),
        ]),
        "twice",
    );
    bad(
        h.step(vec![
            seq(1, &prompt, 0, &[0, 1], last),
            seq(2, &prompt, 0, &[1, 2], last),
        ]),
        "block 1 is written",
    );

    let greedy = pb::Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        rng_state: 0,
        logprobs: true,
        top_logprobs: 3,
        ..Default::default()
    };
    let mut no_logits = seq(1, &prompt, 0, &[0, 1], pb::LogitsMode::None);
    no_logits.sampling = Some(greedy.clone());
    bad(h.step(vec![no_logits]), "sampling needs logits");
    for (sampling, says) in [
        (
            pb::Sampling {
                temperature: -1.0,
                ..greedy.clone()
            },
            "temperature",
        ),
        (
            pb::Sampling {
                presence_penalty: 3.0,
                ..greedy.clone()
            },
            "presence_penalty",
        ),
        (
            pb::Sampling {
                bias_tokens: vec![1, 2],
                bias_values: vec![1.0],
                ..greedy.clone()
            },
            "different lengths",
        ),
        (
            pb::Sampling {
                bias_tokens: vec![1 << 20],
                bias_values: vec![1.0],
                ..greedy.clone()
            },
            "not in the vocabulary",
        ),
        (
            pb::Sampling {
                count_tokens: vec![3, 3],
                count_times: vec![1, 1],
                ..greedy.clone()
            },
            "given twice",
        ),
    ] {
        let mut s = seq(1, &prompt, 0, &[0, 1], last);
        s.sampling = Some(sampling);
        bad(h.step(vec![s]), says);
    }

    // After all that, the engine still serves: a chunked prefill without logits, then a
    // decode step, over scattered blocks.
    let blocks = [5, 2];
    let r = h
        .step(vec![seq(9, &prompt[..7], 0, &blocks, pb::LogitsMode::None)])
        .unwrap();
    assert!(r.logits.is_empty(), "no logits for LOGITS_MODE_NONE");
    assert_eq!(r.expert_tokens.len(), 3 * 8);
    assert_eq!(r.expert_tokens.iter().sum::<u64>(), 3 * 7 * 2);
    assert!(r.comm_seconds >= 0.0);
    let r = h
        .step(vec![seq(9, &prompt[7..], 7, &blocks, last)])
        .unwrap();
    assert_eq!(r.logits.len(), 1);
    assert_eq!(r.logits[0].seq_id, 9);

    let dir = open_model(&tiny_a_dir()).unwrap();
    let model =
        CpuModel::new(ModelWeights::load(dir.source.as_ref(), &dir.config).unwrap()).unwrap();
    let want = SeqKv::new(&model)
        .step(&model, &prompt, LogitsMode::Last)
        .unwrap();
    let mut got = Vec::new();
    grok_shared::bytes::extend_f32_le(&mut got, &r.logits[0].logits_f32);
    let worst = max_abs_diff(&got, &want);
    assert!(worst <= 1e-4, "engine vs one process: {worst}");

    // Sampling on the worker: a greedy LAST step returns the argmax and its logprobs, no logits.
    let mut again = seq(10, &prompt, 0, &[3, 4], last);
    again.sampling = Some(greedy.clone());
    let r = h.step(vec![again]).unwrap();
    let x = r.logits[0].sampled.clone().expect("a sampled token");
    assert!(r.logits[0].logits_f32.is_empty());
    assert_eq!(Some(x.token as usize), grok_shared::sampling::argmax(&want));
    assert_eq!(x.top_ids.len(), 3);
    assert_eq!(x.top_ids[0], x.token);
    assert!(x
        .logprob
        .is_some_and(|l| l <= 0.0 && (l - x.top_logprobs[0]).abs() < 1e-6));
    // logit_bias moves the choice; the logprobs stay the model's.
    let forced = (x.token + 1) % 256;
    let mut biased = seq(11, &prompt, 0, &[5, 6], last);
    biased.sampling = Some(pb::Sampling {
        bias_tokens: vec![forced],
        bias_values: vec![100.0],
        ..greedy
    });
    let r = h.step(vec![biased]).unwrap();
    let y = r.logits[0].sampled.clone().expect("a sampled token");
    assert_eq!(y.token, forced);
    assert_eq!(y.top_ids, x.top_ids, "the alternatives are the model's");
}
