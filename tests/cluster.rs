//! The cluster with real worker processes on loopback: every plan of the issue equals the
//! one-process engine; a wrong token is refused; a killed worker fails the step within the
//! deadline naming its rank, is restarted alone, and the cluster serves again.

use grok_coordinator::cluster::{Cluster, ClusterError, ClusterOptions};
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
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The fixture's greedy rows as a `tokens` file (one per test: tests run in parallel).
fn tokens_file(tag: &str) -> (PathBuf, Vec<Vec<u32>>) {
    let bytes = std::fs::read(fixture().join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let g = st.tensor("greedy_tokens").unwrap();
    let (b, t) = (g.shape()[0], g.shape()[1]);
    let ids: Vec<u32> = g
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let path = tmp(&format!("cluster-tokens-{tag}.safetensors"));
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![b, t], g.data())
        .unwrap();
    safetensors::serialize_to_file([("tokens", view)], None, &path).unwrap();
    (path, ids.chunks(t).map(<[u32]>::to_vec).collect())
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
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
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
        step_timeout: Duration::from_secs(10),
        comm_timeout: Duration::from_secs(5),
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
        let first = cluster
            .step(&[(7, prompt.clone())], &[], false)
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
        let err = cluster.step(&[(7, vec![3])], &[], false).await.unwrap_err();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
        assert!(matches!(err, ClusterError::Rank { rank: 1, .. }), "{err}");
        assert_eq!(cluster.failed_rank(), Some(1));
        // Unhealthy until restarted.
        assert!(matches!(
            cluster.step(&[(8, vec![3])], &[], false).await,
            Err(ClusterError::Unhealthy(1))
        ));
        cluster.restart(1).await.unwrap();
        assert_eq!(
            cluster.pid(0),
            Some(survivor),
            "the healthy rank keeps running"
        );
        assert_ne!(cluster.pid(1), Some(victim));
        let again = cluster.step(&[(9, prompt)], &[7], false).await.unwrap();
        assert_eq!(
            again[&9], first[&7],
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
        cluster
            .step(&[(1, prompt.clone()), (2, prompt.clone())], &[], false)
            .await
            .unwrap();
        let pid = cluster.pid(0).unwrap().to_string();
        assert!(Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success());
        let t = Instant::now();
        let err = cluster
            .step(&[(1, vec![3]), (2, vec![4])], &[], false)
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
        cluster.step(&[(3, prompt)], &[], false).await.unwrap();
        cluster.shutdown().await;
    });
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
