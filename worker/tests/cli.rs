//! The `grok-worker` command refuses bad flags with clear errors. (Being an integration test
//! also makes `cargo test` build the binary, which the cluster tests spawn.)

use std::process::Command;

fn worker(args: &[&str], token: Option<&str>) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_grok-worker"));
    c.args(args).env_remove("GROK_CLUSTER_TOKEN");
    if let Some(t) = token {
        c.env("GROK_CLUSTER_TOKEN", t);
    }
    let o = c.output().expect("running grok-worker");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn bad_flags_are_refused_clearly() {
    let (ok, err) = worker(&[], None);
    assert!(!ok && err.contains("--cluster-token"), "{err}");
    let (ok, err) = worker(&["--cluster-token", " "], None);
    assert!(!ok && err.contains("empty"), "{err}");
    let (ok, err) = worker(&["--device", "cuda:0"], Some("t"));
    assert!(!ok && err.contains("cpu"), "{err}");
    let (ok, err) = worker(&["--listen", "not-an-address"], Some("t"));
    assert!(!ok && err.contains("--listen"), "{err}");
    let (ok, err) = worker(&["--advertise-peer", "0.0.0.0:50052"], Some("t"));
    assert!(
        !ok && err.contains("--advertise-peer") && err.contains("HOST:PORT"),
        "{err}"
    );
    for (ok, err) in [worker(&[], None), worker(&["--device", "x"], Some("t"))] {
        assert!(!ok && !err.contains("panicked"), "{err}");
    }
}
