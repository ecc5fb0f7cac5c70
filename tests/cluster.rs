//! The cluster with real worker processes on loopback: every plan of the issue equals the
//! one-process engine; a wrong token is refused; a killed worker fails the step within the
//! deadline naming its rank, is restarted alone, and the cluster serves again.

use grok_coordinator::cluster::{Cluster, ClusterError, ClusterOptions, SeqWork};
use grok_shared::model::{blocks_for, BlockAllocator, LogitsMode};
use grok_shared::test_support::{max_abs_diff, read_logits_file, write_token_rows, TinyAExpected};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn fixture() -> PathBuf {
    grok_shared::test_support::tiny_a_dir()
}

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn grok(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_grok"))
        .args(args)
        .output()
        .expect("running grok");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "grok {args:?} failed: {err}");
    String::from_utf8(o.stdout).expect("utf-8")
}

fn read_logits(path: &Path) -> Vec<f32> {
    read_logits_file(path).1
}

/// The fixture's greedy rows as a `tokens` file (one per test: tests run in parallel).
fn tokens_file(tag: &str) -> (PathBuf, Vec<Vec<u32>>) {
    let e = TinyAExpected::load();
    let t = e.greedy_len();
    let path = tmp(&format!("cluster-tokens-{tag}.safetensors"));
    write_token_rows(&path, e.b, t, &e.greedy);
    (path, e.greedy.chunks(t).map(<[u32]>::to_vec).collect())
}

#[test]
fn every_issue_plan_through_worker_processes_equals_one_process() {
    let (input, rows) = tokens_file("plans");
    let m = fixture();
    let m = m.to_str().unwrap();
    let want_path = tmp("cluster-want.safetensors");
    grok(&[
        "logits",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--output",
        want_path.to_str().unwrap(),
    ]);
    let want = read_logits(&want_path);
    let prompt: Vec<String> = rows[1][..12].iter().map(u32::to_string).collect();
    let prompt = prompt.join(",");
    let greedy_one = grok(&[
        "generate",
        "--model",
        m,
        "--prompt-ids",
        &prompt,
        "--max-tokens",
        "6",
        "--print-ids",
    ]);
    for (w, tp, ep) in grok_shared::test_support::TINY_A_PLANS {
        let (w, tp, ep) = (w.to_string(), tp.to_string(), ep.to_string());
        let flags = [
            "--workers",
            w.as_str(),
            "--tp",
            tp.as_str(),
            "--ep",
            ep.as_str(),
        ];
        let out = tmp(&format!("cluster-{w}-{tp}-{ep}.safetensors"));
        grok(
            &[
                &[
                    "logits",
                    "--model",
                    m,
                    "--input",
                    input.to_str().unwrap(),
                    "--output",
                    out.to_str().unwrap(),
                ][..],
                &flags,
            ]
            .concat(),
        );
        let got = read_logits(&out);
        let worst = max_abs_diff(&got, &want);
        assert!(worst <= 1e-4, "W={w} tp={tp} ep={ep}: max diff {worst}");
        let greedy = grok(
            &[
                &[
                    "generate",
                    "--model",
                    m,
                    "--prompt-ids",
                    &prompt,
                    "--max-tokens",
                    "6",
                    "--print-ids",
                ][..],
                &flags,
            ]
            .concat(),
        );
        assert_eq!(greedy, greedy_one, "W={w} tp={tp} ep={ep}: greedy tokens");
    }
}

fn options(workers: usize, tp: usize, ep: usize, token: &str) -> ClusterOptions {
    ClusterOptions {
        workers,
        tp,
        ep,
        worker_addrs: Vec::new(),
        token: token.to_string(),
        worker_bin: Path::new(env!("CARGO_BIN_EXE_grok")).with_file_name("grok-worker"),
        worker_device: "cpu".into(),
        collectives: "grpc".into(),
        step_timeout: Duration::from_secs(10),
        comm_timeout: Duration::from_secs(5),
        kv_blocks: 64,
        block_size: 16,
    }
}

/// `tokens` of sequence `id` in `group`, after `start` cached positions, last logits.
fn work(id: u64, group: usize, start: usize, tokens: &[u32], blocks: &[u32]) -> SeqWork {
    SeqWork {
        seq_id: id,
        group,
        start,
        tokens: tokens.to_vec(),
        blocks: blocks.to_vec(),
        logits: LogitsMode::Last,
        sample: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_caller_with_a_wrong_token_is_refused() {
    runtime().block_on(async {
        let good = Cluster::start(
            &fixture(),
            options(1, 1, 1, "right-token"),
            &mut |_, _, _| {},
        )
        .await
        .unwrap();
        let mut bad = options(1, 1, 1, "wrong-token");
        bad.worker_addrs = good.addrs();
        let err = Cluster::start(&fixture(), bad, &mut |_, _, _| {})
            .await
            .err()
            .expect("must be refused");
        assert!(err.to_string().contains("wrong cluster token"), "{err}");
        good.shutdown().await;
    });
}

#[test]
fn a_killed_worker_fails_the_step_in_time_and_is_restarted_alone() {
    runtime().block_on(async {
        let mut cluster = Cluster::start(&fixture(), options(2, 2, 2, "t0ken"), &mut |_, _, _| {})
            .await
            .unwrap();
        let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 1024).collect();
        // dp = 1: every sequence is in group 0, its blocks from one allocator.
        let mut pool = BlockAllocator::new(cluster.kv_blocks());
        let blocks7 = pool.alloc(blocks_for(13, cluster.block_size())).unwrap();
        let first = cluster
            .step(&[work(7, 0, 0, &prompt, &blocks7)])
            .await
            .unwrap();
        let survivor = cluster.pid(0).unwrap();
        let victim = cluster.pid(1).unwrap();
        let killed = Command::new("kill")
            .args(["-9", &victim.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let t = Instant::now();
        let err = cluster
            .step(&[work(7, 0, 12, &[3], &blocks7)])
            .await
            .unwrap_err();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
        assert!(matches!(err, ClusterError::Rank { rank: 1, .. }), "{err}");
        assert_eq!(cluster.failed_rank(), Some(1));
        // Unhealthy until restarted.
        let blocks8 = pool.alloc(1).unwrap();
        assert!(matches!(
            cluster.step(&[work(8, 0, 0, &[3], &blocks8)]).await,
            Err(ClusterError::Unhealthy(1))
        ));
        cluster.restart(1).await.unwrap();
        assert_eq!(
            cluster.pid(0),
            Some(survivor),
            "the healthy rank keeps running"
        );
        assert_ne!(cluster.pid(1), Some(victim));
        assert_eq!(cluster.kv_bytes()[1], cluster.kv_bytes()[0], "same pool");
        // Every sequence's KV is lost with the restart: the caller recomputes from scratch,
        // here into blocks whose old contents (sequence 7's) must not matter.
        pool.release(&blocks7);
        pool.release(&blocks8);
        let blocks9 = pool.alloc(blocks_for(12, cluster.block_size())).unwrap();
        let again = cluster
            .step(&[work(9, 0, 0, &prompt, &blocks9)])
            .await
            .unwrap();
        assert_eq!(
            again.logits[&9], first.logits[&7],
            "the restarted cluster computes the same logits"
        );
        cluster.shutdown().await;
    });
}

#[test]
fn a_stalled_worker_is_named_within_the_deadline() {
    runtime().block_on(async {
        let mut opts = options(2, 1, 2, "t0ken");
        opts.step_timeout = Duration::from_secs(3);
        opts.comm_timeout = Duration::from_secs(2);
        let mut cluster = Cluster::start(&fixture(), opts, &mut |_, _, _| {})
            .await
            .unwrap();
        let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 1024).collect();
        // dp = 2: one sequence in each group, with the same block ids in each group's pool.
        assert_eq!(cluster.dp(), 2);
        let blocks = [0u32];
        let first = cluster
            .step(&[
                work(1, 0, 0, &prompt, &blocks),
                work(2, 1, 0, &prompt, &blocks),
            ])
            .await
            .unwrap();
        assert_eq!(
            first.logits[&1], first.logits[&2],
            "same prompt, same logits"
        );
        assert_eq!(first.comm_seconds.len(), 2);
        // Every token is routed to top-k experts once, summed over the ranks.
        let c = cluster.config().clone();
        assert_eq!(
            first.expert_tokens.len(),
            c.num_hidden_layers * c.num_local_experts
        );
        assert_eq!(
            first.expert_tokens.iter().sum::<u64>(),
            (2 * 12 * c.num_experts_per_tok * c.num_hidden_layers) as u64
        );
        let pid = cluster.pid(0).unwrap().to_string();
        assert!(Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success());
        let t = Instant::now();
        let err = cluster
            .step(&[work(1, 0, 12, &[3], &blocks), work(2, 1, 12, &[4], &blocks)])
            .await
            .unwrap_err();
        let took = t.elapsed();
        assert!(Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success());
        assert!(took < Duration::from_secs(10), "took {took:?}");
        assert!(matches!(err, ClusterError::Rank { rank: 0, .. }), "{err}");
        cluster.restart(0).await.unwrap();
        cluster
            .step(&[work(3, 1, 0, &prompt, &blocks)])
            .await
            .unwrap();
        cluster.shutdown().await;
    });
}

#[test]
fn invalid_work_is_refused_before_any_rank_sees_it() {
    runtime().block_on(async {
        let mut cluster = Cluster::start(&fixture(), options(2, 1, 2, "t0ken"), &mut |_, _, _| {})
            .await
            .unwrap();
        let prompt: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 1024).collect();
        let cases = [
            (vec![work(1, 2, 0, &prompt, &[0, 1])], "group 2"),
            (vec![work(1, 0, 0, &prompt, &[0, 64])], "block id 64"),
            (vec![work(1, 0, 0, &prompt, &[0])], "needs 2"),
            (
                vec![
                    work(1, 0, 0, &prompt, &[0, 1]),
                    work(1, 1, 0, &prompt, &[0, 1]),
                ],
                "twice",
            ),
            (
                vec![
                    work(1, 1, 0, &prompt, &[0, 1]),
                    work(2, 1, 0, &prompt, &[1, 2]),
                ],
                "block 1 is written",
            ),
            (vec![work(1, 0, 0, &[], &[0])], "no tokens"),
            (vec![work(1, 0, 250, &prompt, &[0; 17])], "context"),
        ];
        for (w, want) in cases {
            let err = cluster.step(&w).await.unwrap_err();
            assert!(
                matches!(err, ClusterError::InvalidWork(_)) && err.to_string().contains(want),
                "{want}: {err}"
            );
        }
        // The same blocks in different groups are different blocks.
        let out = cluster
            .step(&[
                work(1, 0, 0, &prompt, &[0, 1]),
                work(2, 1, 0, &prompt[..5], &[0]),
            ])
            .await
            .unwrap();
        assert_eq!(out.logits.len(), 2);
        assert_eq!(cluster.failed_rank(), None);
        cluster.shutdown().await;
    });
}

#[test]
fn a_pool_smaller_than_one_context_is_refused() {
    let mut opts = options(1, 1, 1, "t0ken");
    // The fixture's context is 256 positions: 16 blocks of 16.
    opts.kv_blocks = 15;
    let err = runtime()
        .block_on(Cluster::start(&fixture(), opts, &mut |_, _, _| {}))
        .err()
        .expect("must be refused");
    assert!(err.to_string().contains("need between 16"), "{err}");
}

#[test]
fn plans_that_do_not_divide_the_model_are_refused_with_the_valid_ones() {
    let (input, _) = tokens_file("bad-plan");
    let out = tmp("cluster-bad.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_grok"))
        .args([
            "logits",
            "--model",
            fixture().to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ])
        .args([
            "--output",
            out.to_str().unwrap(),
            "--workers",
            "4",
            "--tp",
            "3",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("tp (3) must divide") && err.contains("(tp=2, ep=4)"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A `grok-worker` started by hand, as on another machine: collectives on `0.0.0.0:port`,
/// told to its peers as `--advertise-peer advertised`. It exits when dropped (its stdin closes).
struct HandWorker {
    child: std::process::Child,
    addr: String,
}

impl HandWorker {
    fn start(token: &str, port: u16, advertised: &str) -> HandWorker {
        use std::io::BufRead;
        let mut child =
            Command::new(Path::new(env!("CARGO_BIN_EXE_grok")).with_file_name("grok-worker"))
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--cluster-token",
                    token,
                    "--exit-with-stdin",
                ])
                .args(["--peer-listen", &format!("0.0.0.0:{port}")])
                .args(["--advertise-peer", advertised])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("starting grok-worker");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("its ready line");
        let addr = line.trim().rsplit(' ').next().unwrap().to_string();
        HandWorker { child, addr }
    }
}

impl Drop for HandWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn peers_dial_the_address_a_worker_advertises() {
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 1024).collect();
    let (p0, p1) = (free_port(), free_port());
    runtime().block_on(async {
        let one = Cluster::start(&fixture(), options(1, 1, 1, "t0ken"), &mut |_, _, _| {})
            .await
            .unwrap();
        let mut one = one;
        let want = one.step(&[work(1, 0, 0, &prompt, &[0])]).await.unwrap();
        one.shutdown().await;

        // Advertised as they are reached: the cluster runs and computes what one process does.
        let a = HandWorker::start("t0ken", p0, &format!("127.0.0.1:{p0}"));
        let b = HandWorker::start("t0ken", p1, &format!("localhost:{p1}"));
        let mut opts = options(2, 2, 2, "t0ken");
        opts.worker_addrs = vec![a.addr.clone(), b.addr.clone()];
        let mut cluster = Cluster::start(&fixture(), opts, &mut |_, _, _| {})
            .await
            .unwrap();
        let got = cluster.step(&[work(1, 0, 0, &prompt, &[0])]).await.unwrap();
        let d = max_abs_diff(&got.logits[&1], &want.logits[&1]);
        assert!(d < 1e-4, "{d}");
        cluster.shutdown().await;
        drop((a, b));

        // A worker that advertises where nothing listens cannot be reached: the start fails,
        // within the collectives' deadline, instead of hanging.
        let closed = free_port();
        let a = HandWorker::start("t0ken", p0, &format!("127.0.0.1:{p0}"));
        let b = HandWorker::start("t0ken", p1, &format!("127.0.0.1:{closed}"));
        let mut opts = options(2, 2, 2, "t0ken");
        opts.worker_addrs = vec![a.addr.clone(), b.addr.clone()];
        let t = Instant::now();
        let err = Cluster::start(&fixture(), opts, &mut |_, _, _| {})
            .await
            .err()
            .expect("an unreachable peer must fail the start");
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        assert!(err.to_string().contains(&closed.to_string()), "{err}");
    });
}
