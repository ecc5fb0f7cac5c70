//! `grok bench serve` and `grok batch` end to end, against a real `grok serve` cluster of the
//! built-in `tiny` preset (its vocabulary is the tokenizer's, so any text is a valid prompt).

mod common;

use common::{metric, text, Server};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn tiny_server() -> Server {
    Server::start(&["--preset", "tiny", "--workers", "1"])
}

fn grok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_grok"))
        .args(args)
        .output()
        .expect("running grok")
}

fn get_text(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

#[test]
fn bench_latencies_agree_with_the_server_histograms() {
    let s = tiny_server();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let o = grok(&[
        "bench",
        "serve",
        "--url",
        &s.url("/v1"),
        "--concurrency",
        "3",
        "--num-requests",
        "9",
        "--input-len",
        "uniform:8:40",
        "--output-len",
        "12",
        "--seed",
        "3",
        "--ignore-eos",
        "--slo-ttft-ms",
        "60000",
        "--slo-tpot-ms",
        "60000",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("TTFT") && stdout.contains("9 completed"),
        "{stdout}"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let sum = &report["summary"];
    assert_eq!(sum["completed"], 9, "{sum}");
    assert_eq!(sum["good_requests"], 9);
    assert_eq!(
        sum["output_tokens"],
        9 * 12,
        "--ignore-eos: every request runs to its length: {sum}"
    );
    assert_eq!(report["requests"].as_array().unwrap().len(), 9);

    let m = get_text(&s.url("/metrics"));
    let mean = |name: &str| {
        let count = metric(&m, &format!("{name}_count"));
        assert_eq!(count, 9.0, "{name}");
        metric(&m, &format!("{name}_sum")) / count * 1e3
    };
    let (server_ttft, server_tpot) = (
        mean("grok_time_to_first_token_seconds"),
        mean("grok_time_per_output_token_seconds"),
    );
    let (bench_ttft, bench_tpot) = (
        sum["ttft_ms"]["mean"].as_f64().unwrap(),
        sum["tpot_ms"]["mean"].as_f64().unwrap(),
    );
    // The client's clock also holds the HTTP round trip: a little more, never less.
    let close = |bench: f64, server: f64| bench >= server - 1.0 && bench <= server * 1.25 + 15.0;
    assert!(
        close(bench_ttft, server_ttft),
        "TTFT ms: bench {bench_ttft}, server {server_ttft}"
    );
    assert!(
        (bench_tpot - server_tpot).abs() <= server_tpot * 0.25 + 5.0,
        "TPOT ms: bench {bench_tpot}, server {server_tpot}"
    );
    assert_eq!(metric(&m, "grok_generation_tokens_total"), 9.0 * 12.0);
}

/// The lines of a batch file: `good` completions (ids `r0`..), and bad lines interleaved.
fn write_batch(path: &Path, good: usize, with_bad: bool) -> usize {
    let mut lines = Vec::new();
    for i in 0..good {
        let body = if i % 3 == 2 {
            json!({"model": "tiny", "messages": [{"role": "user", "content": format!("Say {i}")}], "max_tokens": 10})
        } else {
            json!({"model": "tiny", "prompt": format!("Count to {i}:"), "max_tokens": 10, "temperature": 0})
        };
        let url = if i % 3 == 2 {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        lines.push(
            json!({"custom_id": format!("r{i}"), "method": "POST", "url": url, "body": body})
                .to_string(),
        );
        if with_bad && i % 4 == 1 {
            lines.push(match i {
                1 => "{this is not json".to_string(),
                _ => json!({"custom_id": format!("bad{i}"), "method": "POST", "url": "/v1/completions",
                    "body": {"model": "tiny", "prompt": "x", "max_tokens": -1}}).to_string(),
            });
        }
    }
    if with_bad {
        lines.push(
            json!({"custom_id": "r0", "method": "POST", "url": "/v1/completions", "body": {}})
                .to_string(),
        );
        lines.push(json!({"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}}).to_string());
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    lines.len()
}

/// Every result line by its key (custom_id, or id for lines without one); panics on a repeat.
fn results(path: &Path) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let key = v["custom_id"]
            .as_str()
            .or(v["id"].as_str())
            .unwrap()
            .to_string();
        assert!(
            out.insert(key.clone(), v).is_none(),
            "{key} twice in {}",
            path.display()
        );
    }
    out
}

/// `grok batch` of `input` into `output` against the server at `url`, plus `extra` flags.
fn batch_args(input: &Path, output: &Path, url: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["batch", "--input"].map(String::from).to_vec();
    args.push(input.to_str().unwrap().into());
    args.push("--output".into());
    args.push(output.to_str().unwrap().into());
    args.extend(["--url", url].iter().chain(extra).map(|s| s.to_string()));
    args
}

#[test]
fn batch_with_good_and_bad_lines_completes_and_resumes_after_a_kill() {
    let s = tiny_server();
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let n = write_batch(&input, 12, true);
    let url = s.url("");
    let args = batch_args(&input, &output, &url, &[]);
    let o = grok(&args);
    assert!(o.status.success(), "{}", text(&o));
    let r = results(&output);
    assert_eq!(r.len(), n, "one result per line");
    for i in 0..12 {
        let v = &r[&format!("r{i}")];
        assert_eq!(v["response"]["status_code"], 200, "{v}");
        let body = &v["response"]["body"];
        let text = body["choices"][0]["text"]
            .as_str()
            .or(body["choices"][0]["message"]["content"].as_str());
        assert!(text.is_some_and(|t| !t.is_empty()), "{v}");
    }
    for bad in ["bad5", "bad9"] {
        assert_eq!(r[bad]["response"]["status_code"], 400, "{}", r[bad]);
    }
    assert!(r["wrong-url"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/embeddings"));
    let unnamed: Vec<&Value> = r.values().filter(|v| v["custom_id"].is_null()).collect();
    assert_eq!(
        unnamed.len(),
        2,
        "the unreadable line and the repeated custom_id"
    );
    // A rerun finds everything done and adds nothing.
    let o = grok(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("{n} done earlier")),
        "{}",
        text(&o)
    );
    assert_eq!(results(&output).len(), n);

    // Killed half way (SIGKILL: no chance to tidy up), then run again: every custom_id once.
    let (input, output) = (
        dir.path().join("big.jsonl"),
        dir.path().join("big-out.jsonl"),
    );
    let n = write_batch(&input, 40, false);
    let args = batch_args(&input, &output, &url, &["--concurrency", "4"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_grok"))
        .args(&args)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = std::fs::read_to_string(&output)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if done >= 6 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = results(&output).len();
    assert!(
        partial < n,
        "the kill came too late to test anything ({partial} of {n})"
    );
    let o = grok(&args);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(&format!("{partial} done earlier")),
        "{stdout}"
    );
    let r = results(&output);
    assert_eq!(r.len(), n);
    for i in 0..40 {
        assert_eq!(r[&format!("r{i}")]["response"]["status_code"], 200);
    }
}

#[test]
fn bad_flags_and_unreachable_servers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    write_batch(&input, 3, false);
    let out = dir.path().join("out.jsonl");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.1:{port}");
    let (inp, out_s) = (input.to_str().unwrap(), out.to_str().unwrap());
    let bench = format!("bench serve --url {dead}");
    let batch = format!("batch --input {inp} --output {out_s}");
    let cases = [
        (
            format!("{bench} --rate 5 --num-requests 2"),
            "is the server up?",
        ),
        (format!("{bench} --rate 0"), "--rate 0"),
        (format!("{bench} --concurrency 0"), "--concurrency must be"),
        ("bench serve --url ftp://x --rate 1".into(), "http or https"),
        (
            format!("{bench} --rate 1 --input-len uniform:9:3"),
            "--input-len",
        ),
        (
            format!("{bench} --rate 1 --slo-ttft-ms -4"),
            "--slo-ttft-ms",
        ),
        (
            format!("batch --input /nonexistent.jsonl --output {out_s} --url {dead}"),
            "no such file",
        ),
        (
            format!("batch --input {inp} --output {inp} --url {dead}"),
            "another file",
        ),
        (format!("{batch} --preset tiny"), "--workers"),
        (
            format!("{batch} --url {dead} --max-retries 0"),
            "run the same command again",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.split_whitespace().collect();
        let o = grok(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // The unreachable server left no results: a later run sends everything.
    assert_eq!(std::fs::read_to_string(&out).unwrap_or_default(), "");
}
