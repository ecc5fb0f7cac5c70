//! The deploy files run as they are. The Slurm script runs here with stand-ins for `srun`
//! and `scontrol` (no Slurm on this machine) that start its tasks as local processes: the
//! script's own logic (worker addresses, token, waiting for the workers, the command it runs,
//! shutting the workers down) and the real `grok` and `grok-worker` do the rest.

use grok_shared::test_support::tiny_a_dir;
use serde_json::{json, Value};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_grok"))
        .parent()
        .expect("the binaries' folder")
        .to_path_buf()
}

/// `srun` on one node: runs the command as `SLURM_NTASKS` tasks here, each with its
/// `SLURM_PROCID` and `SLURM_LOCALID`, and passes SIGTERM on to them.
const SRUN: &str = r#"#!/usr/bin/env bash
while [[ "${1:-}" == -* ]]; do shift; done
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((t = 0; t < SLURM_NTASKS; t++)); do
    SLURM_PROCID=$t SLURM_LOCALID=$t SLURM_NODEID=0 "$@" &
    pids+=($!)
done
wait
wait
"#;

/// `scontrol show hostnames A,B`: one name a line (no bracket ranges).
const SCONTROL: &str = r#"#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
tr ',' '\n' <<<"$3"
"#;

/// A folder holding the stand-ins, to go first on PATH.
fn slurm_stand_ins(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("slurm-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, text) in [("srun", SRUN), ("scontrol", SCONTROL)] {
        let p = bin.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// A port `p` with `p + 1` free too (the script's two workers on this "node").
fn two_free_ports() -> u16 {
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < 65535 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two free ports in a row")
}

/// The Slurm script as a job of one node with two tasks; `env` adds or overrides.
fn sbatch_command(dir: &Path, env: &[(&str, String)], args: &[&str]) -> Command {
    let path = format!(
        "{}:{}",
        slurm_stand_ins(dir).display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("deploy/slurm/grok.sbatch"))
        .args(args)
        .env("PATH", path)
        .env("SLURM_JOB_NODELIST", "127.0.0.1")
        .env("SLURM_NTASKS", "2")
        .env("SLURM_NTASKS_PER_NODE", "2")
        .env("GROK_BIN_DIR", bin_dir())
        .env("GROK_WORKER_DEVICE", "cpu")
        .env("GROK_WORKER_WAIT", "60")
        .env_remove("GROK_CLUSTER_TOKEN")
        .env_remove("GROK_WORKER_ADDRS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the Slurm script to its end (as [`sbatch_command`]).
fn sbatch(dir: &Path, env: &[(&str, String)], args: &[&str]) -> Output {
    let mut child = sbatch_command(dir, env, args)
        .spawn()
        .expect("running bash");
    let deadline = Instant::now() + Duration::from_secs(240);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("grok.sbatch ran past 240 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_slurm_script_runs_a_batch_job_on_its_workers_and_stops_them() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let lines: Vec<String> = (0..3)
        .map(|i| {
            json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/completions",
                "body": {"model": "tiny-a", "prompt": [5 + i, 6, 7], "max_tokens": 4, "temperature": 0}})
            .to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let port = two_free_ports();
    let env = [
        ("GROK_MODEL", tiny_a_dir().display().to_string()),
        ("GROK_EP", "2".to_string()),
        ("GROK_WORKER_PORT", port.to_string()),
    ];
    let (i, o) = (input.display().to_string(), output.display().to_string());
    let args = [
        "batch",
        "--input",
        &i,
        "--output",
        &o,
        "--served-model-name",
        "tiny-a",
    ];
    let out = sbatch(dir.path(), &env, &args);
    assert!(out.status.success(), "{}", text(&out));
    let want = format!("2 workers: 127.0.0.1:{port},127.0.0.1:{}", port + 1);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&want),
        "{}",
        text(&out)
    );
    let results: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 3, "{results:?}");
    for r in &results {
        assert_eq!(r["response"]["status_code"], 200, "{r}");
        let usage = &r["response"]["body"]["usage"];
        assert_eq!(usage["completion_tokens"], 4, "{r}");
    }
    // The job's end stopped its workers.
    for p in [port, port + 1] {
        assert!(
            TcpStream::connect(("127.0.0.1", p)).is_err(),
            "a worker still listens on {p}: {}",
            text(&out)
        );
    }
}

#[test]
fn a_served_job_stops_its_workers_when_slurm_ends_it() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let port = two_free_ports();
    let env = [
        ("GROK_MODEL", tiny_a_dir().display().to_string()),
        ("GROK_TP", "2".to_string()),
        ("GROK_WORKER_PORT", port.to_string()),
    ];
    let mut child = sbatch_command(dir.path(), &env, &["serve", "--port", "0"])
        .spawn()
        .expect("running bash");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut log = String::new();
    while !log.contains("ready: 2 worker(s), tp=2") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => log += &(line + "\n"),
            Err(_) => {
                let _ = child.kill();
                panic!("the served job did not get ready: {log}");
            }
        }
    }
    // What scancel and the time limit send first.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the job did not end within 20 s of SIGTERM: {log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(143), "{log}");
    for p in [port, port + 1] {
        assert!(
            TcpStream::connect(("127.0.0.1", p)).is_err(),
            "a worker still listens on {p}: {log}"
        );
    }
}

#[test]
fn the_slurm_script_refuses_what_it_cannot_run_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = two_free_ports().to_string();
    type Env<'a> = Vec<(&'a str, String)>;
    let cases: [(&str, Env, &str); 5] = [
        (
            "no tasks per node",
            vec![("SLURM_NTASKS_PER_NODE", "2(x3)".into())],
            "--ntasks-per-node",
        ),
        (
            "no binaries",
            vec![("GROK_BIN_DIR", dir.path().display().to_string())],
            "set GROK_BIN_DIR",
        ),
        (
            "ports past 65535",
            vec![("GROK_WORKER_PORT", "65535".into())],
            "GROK_WORKER_PORT",
        ),
        (
            "workers that cannot start",
            vec![
                ("GROK_WORKER_DEVICE", "tpu".into()),
                ("GROK_WORKER_PORT", port.clone()),
            ],
            "the workers exited",
        ),
        (
            "outside a job",
            vec![("SLURM_JOB_NODELIST", String::new())],
            "not inside a Slurm job",
        ),
    ];
    for (what, env, says) in cases {
        let started = Instant::now();
        let out = sbatch(dir.path(), &env, &["generate", "--prompt-ids", "1"]);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{what}: {}",
            text(&out)
        );
        assert!(started.elapsed() < Duration::from_secs(30), "{what}");
    }
}
