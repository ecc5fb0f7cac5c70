//! The deploy files run as they are. The Slurm script runs here with stand-ins for `srun`
//! and `scontrol` (no Slurm on this machine) that start its tasks as local processes: the
//! script's own logic (worker addresses, token, waiting for the workers, the command it runs,
//! shutting the workers down) and the real `grok` and `grok-worker` do the rest. The
//! Kubernetes manifest is checked for what must agree across its documents (names, ports,
//! addresses, the secret, a plan and KV cache that suit Grok-1), and its containers' commands
//! and settings are run as processes that must make a serving cluster.

mod common;

use common::{text, watchdog};
use grok_shared::test_support::tiny_a_dir;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use yaml_rust2::{Yaml, YamlLoader};

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
        .env("SLURM_CPUS_PER_TASK", "1")
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

/// Runs the Slurm script to its end (as [`sbatch_command`]), within 240 s.
fn sbatch(dir: &Path, env: &[(&str, String)], args: &[&str]) -> Output {
    let child = sbatch_command(dir, env, args)
        .spawn()
        .expect("running bash");
    let _done = watchdog(child.id(), 240);
    // Read while it runs: a full pipe would stop it.
    child.wait_with_output().unwrap()
}

/// The first line of `out` that contains `want` (`None` if it ends first), each line read
/// added to `log`; the rest is read on another thread, so that the writer never meets a
/// closed pipe.
fn first_line(out: std::process::ChildStderr, log: &mut String, want: &str) -> Option<String> {
    let mut lines = BufReader::new(out).lines();
    let found = lines.by_ref().map_while(Result::ok).find(|l| {
        *log += &(l.clone() + "\n");
        l.contains(want)
    });
    std::thread::spawn(move || lines.for_each(drop));
    found
}

/// Spawns `cmd` (a `grok serve`), reads its log until it reports ready, stops it with SIGINT,
/// and returns the ready line (`None` if it ended first) and the log.
fn ready_line(cmd: &mut Command) -> (Option<String>, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting grok serve");
    let _done = watchdog(child.id(), 120);
    let mut log = String::new();
    let ready = first_line(child.stderr.take().unwrap(), &mut log, "ready:");
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
    (ready, log)
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
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = format!("2 workers: 127.0.0.1:{port},127.0.0.1:{}", port + 1);
    assert!(stdout.contains(&want), "{}", text(&out));
    assert!(
        stdout.contains("running grok batch --input"),
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
    let pid = child.id().to_string();
    let getting_ready = watchdog(child.id(), 120);
    let mut log = String::new();
    let ready = first_line(
        child.stderr.take().unwrap(),
        &mut log,
        "ready: 2 worker(s), tp=2",
    );
    drop(getting_ready);
    assert!(ready.is_some(), "the served job did not get ready: {log}");
    // What scancel and the time limit send first; killed if it has not ended 20 s later.
    let _ending = watchdog(child.id(), 20);
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
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

/// The documents of the Kubernetes manifest, by `kind/name`.
fn manifest() -> std::collections::HashMap<String, Yaml> {
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/grok.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("the manifest is YAML");
    let mut out = std::collections::HashMap::new();
    for d in docs {
        let key = format!(
            "{}/{}",
            d["kind"].as_str().expect("every document has a kind"),
            d["metadata"]["name"].as_str().expect("and a name")
        );
        assert!(out.insert(key.clone(), d).is_none(), "{key} twice");
    }
    out
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .unwrap_or_else(|| panic!("not a list: {y:?}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// The value of `flag` in a command line.
fn flag<'a>(cmd: &'a [String], flag: &str) -> &'a str {
    let i = cmd
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} in {cmd:?}"));
    &cmd[i + 1]
}

/// The cluster token's secret a container's env reads.
fn token_secret(container: &Yaml) -> (String, String) {
    let env = container["env"].as_vec().expect("env");
    let e = env
        .iter()
        .find(|e| e["name"].as_str() == Some("GROK_CLUSTER_TOKEN"))
        .expect("GROK_CLUSTER_TOKEN in env");
    let r = &e["valueFrom"]["secretKeyRef"];
    (
        r["name"].as_str().unwrap().to_string(),
        r["key"].as_str().unwrap().to_string(),
    )
}

fn env_value(container: &Yaml, name: &str) -> Option<String> {
    container["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str().map(String::from))
}

#[test]
fn the_kubernetes_manifest_is_consistent_and_its_commands_make_a_cluster() {
    use grok_coordinator::cluster::{kv_block_bytes, kv_blocks_within};
    use grok_shared::config::ModelConfig;
    use grok_shared::model::blocks_for;
    use grok_shared::parallel::Plan;

    let m = manifest();
    let config = &m["ConfigMap/grok-config"]["data"];
    let sts = &m["StatefulSet/grok-worker"];
    let svc = &m["Service/grok-worker"];
    let coord = &m["Deployment/grok"]["spec"]["template"]["spec"];
    let worker = &sts["spec"]["template"]["spec"]["containers"][0];
    let server = &coord["containers"][0];

    // Workers: stable names through the headless Service, dialled at their control port.
    assert_eq!(sts["spec"]["serviceName"].as_str(), Some("grok-worker"));
    assert_eq!(svc["spec"]["clusterIP"].as_str(), Some("None"));
    let replicas = sts["spec"]["replicas"].as_i64().unwrap() as usize;
    let worker_cmd = strings(&worker["command"]);
    let listen = flag(&worker_cmd, "--listen");
    assert!(listen.starts_with("0.0.0.0:"), "{listen}");
    let port = &listen["0.0.0.0:".len()..];
    assert_eq!(
        svc["spec"]["ports"][0]["port"]
            .as_i64()
            .unwrap()
            .to_string(),
        port
    );
    let addrs: Vec<String> = config["GROK_WORKER_ADDRS"]
        .as_str()
        .unwrap()
        .split(',')
        .map(String::from)
        .collect();
    let want: Vec<String> = (0..replicas)
        .map(|i| format!("grok-worker-{i}.grok-worker:{port}"))
        .collect();
    assert_eq!(addrs, want, "GROK_WORKER_ADDRS against the StatefulSet");
    assert_eq!(token_secret(worker), token_secret(server));

    // The plan and the KV cache suit Grok-1 on that many workers.
    let (tp, ep): (usize, usize) = (
        config["GROK_TP"].as_str().unwrap().parse().unwrap(),
        config["GROK_EP"].as_str().unwrap().parse().unwrap(),
    );
    let grok1 = ModelConfig::grok1();
    let plan = Plan::new(&grok1, replicas, tp, ep).expect("a valid plan for Grok-1");
    let mb: usize = config["GROK_KV_CACHE_MB"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let blocks = kv_blocks_within(&grok1, &plan, 16, mb << 20);
    assert!(
        blocks >= blocks_for(grok1.max_seq_len, 16),
        "{mb} MiB holds {blocks} blocks of 16 ({} bytes each)",
        kv_block_bytes(&grok1, &plan, 16)
    );

    // The coordinator's probes and Service reach its port.
    let http = env_value(server, "GROK_PORT").unwrap();
    assert_eq!(
        server["ports"][0]["containerPort"]
            .as_i64()
            .unwrap()
            .to_string(),
        http
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let path = server[probe]["httpGet"]["path"].as_str().unwrap();
        assert!(["/health", "/ready"].contains(&path), "{probe} {path}");
        assert_eq!(server[probe]["httpGet"]["port"].as_str(), Some("http"));
    }
    assert_eq!(
        m["Service/grok"]["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );

    // The containers' commands, run here: the workers on free ports (the CPU for `cuda`), the
    // init container's wait, then the coordinator with the manifest's settings (the fixture's
    // model, a KV cache its size, any free HTTP port).
    let token = "k8s-test-token";
    let mut workers = Vec::new();
    let mut local = Vec::new();
    for _ in 0..replicas {
        let mut cmd = worker_cmd.clone();
        for a in cmd.iter_mut() {
            match a.as_str() {
                a_ if a_ == listen => *a = "0.0.0.0:0".into(),
                "0.0.0.0:50052" => *a = "0.0.0.0:0".into(),
                "cuda" => *a = "cpu".into(),
                _ => {}
            }
        }
        let mut child = Command::new(bin_dir().join(&cmd[0]))
            .args(&cmd[1..])
            .arg("--exit-with-stdin")
            .env("GROK_CLUSTER_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting a worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().rsplit(':').next().unwrap().to_string();
        local.push(format!("127.0.0.1:{port}"));
        workers.push(child);
    }
    let local_addrs = local.join(",");
    let init = strings(&coord["initContainers"][0]["command"]);
    let waited = Command::new(&init[0])
        .args(&init[1..])
        .env("GROK_WORKER_ADDRS", &local_addrs)
        .output()
        .unwrap();
    assert!(waited.status.success(), "{}", text(&waited));

    let server_cmd = strings(&server["command"]);
    let mut run = Command::new(bin_dir().join(&server_cmd[0]));
    run.args(&server_cmd[1..]);
    for (k, v) in config.as_hash().unwrap() {
        run.env(k.as_str().unwrap(), v.as_str().unwrap());
    }
    for e in server["env"].as_vec().unwrap() {
        if let Some(v) = e["value"].as_str() {
            run.env(e["name"].as_str().unwrap(), v);
        }
    }
    let (ready, log) = ready_line(
        run.env("GROK_CLUSTER_TOKEN", token)
            .env("GROK_WORKER_ADDRS", &local_addrs)
            .env("GROK_MODEL", tiny_a_dir())
            .env("GROK_KV_CACHE_MB", "16")
            .env("GROK_PORT", "0"),
    );
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let plan = format!("ready: {replicas} worker(s), tp={tp} ep={ep}");
    assert!(
        ready.is_some_and(|l| l.contains(&plan)),
        "the coordinator did not serve the manifest's plan: {log}"
    );
}

#[test]
fn the_images_binaries_and_command_are_the_ones_built_here() {
    let file = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let build = file
        .lines()
        .find(|l| l.starts_with("RUN cargo build"))
        .expect("a cargo build step");
    let words: Vec<&str> = build.split_whitespace().collect();
    let bins: Vec<&str> = words
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1])
        .collect();
    assert_eq!(bins, ["grok", "grok-worker"], "{build}");
    let copy = file
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("the binaries' copy");
    for b in &bins {
        assert!(
            bin_dir().join(b).is_file(),
            "{b} is not a binary of this workspace"
        );
        assert!(
            copy.contains(&format!("/src/target/release/{b} ")),
            "{copy}"
        );
    }
    // The image's default command serves (here on a free port).
    let cmd_line = file.lines().find(|l| l.starts_with("CMD ")).expect("a CMD");
    let cmd: Vec<String> = serde_json::from_str(&cmd_line["CMD ".len()..]).expect("CMD as JSON");
    let (ready, log) = ready_line(
        Command::new(bin_dir().join(&cmd[0]))
            .args(&cmd[1..])
            .env("GROK_PORT", "0"),
    );
    assert!(
        ready.is_some_and(|l| l.contains("ready: 2 worker(s)") && l.contains("at http://0.0.0.0:")),
        "{log}"
    );
}
