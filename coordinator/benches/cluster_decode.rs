//! Decode tokens/s of the `tiny` preset at batch 1: in this process, and through clusters of
//! worker processes on loopback (W = 1 and W = 4), with ratios against the W = 1 cluster.
//!
//! `cargo build --release -p grok-worker && cargo bench -p grok-coordinator --bench cluster_decode`

use grok_coordinator::cluster::{Cluster, ClusterOptions, SeqWork};
use grok_shared::checkpoint::{init, open_model};
use grok_shared::config::ModelConfig;
use grok_shared::cpu::CpuModel;
use grok_shared::model::{blocks_for, LogitsMode, ModelWeights, SeqKv};
use grok_shared::sampling::argmax;
use std::path::Path;
use std::time::{Duration, Instant};

const PROMPT: usize = 16;
const STEPS: usize = 32;
const BLOCK: usize = 16;

fn prompt() -> Vec<u32> {
    (0..PROMPT as u32)
        .map(|i| (i * 7919 + 13) % 131072)
        .collect()
}

/// Tokens/s of `STEPS` greedy decode steps after the prompt, and the tokens.
fn in_process(dir: &Path) -> (f64, Vec<u32>) {
    let m = open_model(dir).expect("open");
    let model = CpuModel::new(ModelWeights::load(m.source.as_ref(), &m.config).expect("load"))
        .expect("model");
    let mut cache = SeqKv::new(&model);
    let mut out = cache
        .step(&model, &prompt(), LogitsMode::Last)
        .expect("prefill");
    let mut toks = Vec::new();
    let t = Instant::now();
    for _ in 0..STEPS {
        let next = argmax(&out).unwrap_or(0) as u32;
        toks.push(next);
        out = cache
            .step(&model, &[next], LogitsMode::Last)
            .expect("decode");
    }
    (STEPS as f64 / t.elapsed().as_secs_f64(), toks)
}

async fn on_cluster(dir: &Path, workers: usize, tp: usize, ep: usize) -> (f64, Vec<u32>) {
    let bin = Path::new(env!("CARGO_BIN_EXE_grok")).with_file_name("grok-worker");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --release -p grok-worker` first",
        bin.display()
    );
    let opts = ClusterOptions {
        workers,
        tp,
        ep,
        worker_addrs: Vec::new(),
        token: "bench".into(),
        worker_bin: bin,
        worker_device: std::env::var("GROK_WORKER_DEVICE").unwrap_or_else(|_| "cpu".into()),
        collectives: "grpc".into(),
        step_timeout: Duration::from_secs(30),
        comm_timeout: Duration::from_secs(10),
        // One sequence of the prompt and its decoded tokens: blocks 0.. of one small pool.
        kv_blocks: blocks_for(ModelConfig::tiny().max_seq_len, BLOCK),
        block_size: BLOCK,
    };
    let mut cluster = Cluster::start(dir, opts, &mut |_, _, _| {})
        .await
        .expect("cluster");
    let blocks: Vec<u32> = (0..blocks_for(PROMPT + STEPS, BLOCK) as u32).collect();
    let step = |start: usize, tokens: Vec<u32>| SeqWork {
        seq_id: 0,
        group: 0,
        start,
        tokens,
        blocks: blocks.clone(),
        logits: LogitsMode::Last,
        sample: None,
    };
    let mut out = cluster.step(&[step(0, prompt())]).await.expect("prefill");
    let mut toks = Vec::new();
    let t = Instant::now();
    for i in 0..STEPS {
        let next = argmax(&out.logits[&0]).unwrap_or(0) as u32;
        toks.push(next);
        out = cluster
            .step(&[step(PROMPT + i, vec![next])])
            .await
            .expect("decode");
    }
    let rate = STEPS as f64 / t.elapsed().as_secs_f64();
    cluster.shutdown().await;
    (rate, toks)
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    init::init_random(&ModelConfig::tiny(), 0, dir.path(), &mut |_| {}).expect("init");
    let (local, want) = in_process(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (w1, t1) = rt.block_on(on_cluster(dir.path(), 1, 1, 1));
    let (w4, t4) = rt.block_on(on_cluster(dir.path(), 4, 4, 4));
    let (w4b, t4b) = rt.block_on(on_cluster(dir.path(), 4, 1, 4));
    assert_eq!(t1, want, "W=1 tokens differ");
    assert_eq!(t4, want, "W=4 tokens differ");
    assert_eq!(t4b, want, "W=4 (tp=1) tokens differ");
    println!(
        "tiny preset, greedy decode at batch 1 ({STEPS} tokens after {PROMPT}), {} CPU core(s):",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("  in this process:           {local:7.1} tokens/s");
    println!(
        "  cluster W=1:               {w1:7.1} tokens/s (ratio to in-process {:.2})",
        w1 / local
    );
    println!(
        "  cluster W=4 tp=4 ep=4:     {w4:7.1} tokens/s (ratio to W=1 {:.2})",
        w4 / w1
    );
    println!(
        "  cluster W=4 tp=1 ep=4:     {w4b:7.1} tokens/s (ratio to W=1 {:.2})",
        w4b / w1
    );
}
