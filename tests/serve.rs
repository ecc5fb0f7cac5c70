//! `grok serve` end to end: a real cluster of worker processes behind the OpenAI-compatible
//! HTTP API, driven over loopback HTTP like any client would.

mod common;

use common::{metric, Server};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

/// `grok serve` on the fixture with 2 workers (ep 2) and `extra` flags; returns once ready.
fn start_server(extra: &[&str]) -> Server {
    let model = grok_shared::test_support::tiny_a_dir();
    let mut args = vec!["--model", model.to_str().unwrap()];
    args.extend([
        "--workers",
        "2",
        "--ep",
        "2",
        "--served-model-name",
        "tiny-a",
    ]);
    args.extend(extra);
    Server::start(&args)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Prompts of different lengths, as token ids (the fixture's vocabulary is 1024 ids).
fn prompt(i: usize) -> Vec<u32> {
    (0..(4 + 29 * i))
        .map(|j| ((j * 41 + i * 7) % 1000 + 3) as u32)
        .collect()
}

async fn complete(c: &reqwest::Client, s: &Server, body: Value) -> (u16, Value) {
    let r = c
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A streamed completion's text, finish reason and usage, read from its SSE events.
/// Sends a completion with `stream: true`; the answer must be a 200.
async fn open_stream(c: &reqwest::Client, s: &Server, mut body: Value) -> reqwest::Response {
    body["stream"] = json!(true);
    let r = c
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r
}

async fn stream_text(c: &reqwest::Client, s: &Server, body: Value) -> (String, String, Value) {
    let raw = open_stream(c, s, body).await.text().await.unwrap();
    let (mut text, mut finish, mut usage) = (String::new(), String::new(), Value::Null);
    let mut done = false;
    for ev in raw.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = ev
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not SSE: {ev:?}"));
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(ch) = v["choices"].as_array().and_then(|c| c.first()) {
            text.push_str(ch["text"].as_str().unwrap_or(""));
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    assert!(done, "stream did not end with [DONE]: {raw}");
    (text, finish, usage)
}

#[test]
fn concurrent_streams_give_each_request_its_own_tokens() {
    let s = start_server(&["--max-step-tokens", "32"]);
    rt().block_on(async {
        let c = client();
        let bodies: Vec<Value> = (0..5)
            .map(|i| {
                let mut b =
                    json!({"model": "tiny-a", "prompt": prompt(i), "max_tokens": 10 + 3 * i});
                if i % 2 == 1 {
                    b["temperature"] = json!(0.8);
                    b["seed"] = json!(100 + i);
                } else {
                    b["temperature"] = json!(0.0);
                }
                b
            })
            .collect();
        let mut alone = Vec::new();
        for b in &bodies {
            alone.push(stream_text(&c, &s, b.clone()).await);
        }
        let together =
            futures_util::future::join_all(bodies.iter().map(|b| stream_text(&c, &s, b.clone())))
                .await;
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a, t, "request {i}");
            assert_eq!(a.2["completion_tokens"], json!(10 + 3 * i), "request {i}");
        }
        // Non-streaming gives the same text as streaming.
        let (status, v) = complete(&c, &s, bodies[0].clone()).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), alone[0].0);
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["usage"]["total_tokens"], json!(prompt(0).len() + 10));
    });
}

#[test]
fn stop_strings_logprobs_and_echo() {
    let s = start_server(&[]);
    rt().block_on(async {
        let c = client();
        let body =
            json!({"model": "tiny-a", "prompt": prompt(1), "max_tokens": 16, "temperature": 0});
        let (_, v) = complete(&c, &s, body.clone()).await;
        let text = v["choices"][0]["text"].as_str().unwrap().to_string();
        let chars: Vec<char> = text.chars().collect();
        assert!(chars.len() > 8, "{text:?}");
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
        let cut = text.find(&stop).unwrap();

        let mut b = body.clone();
        b["stop"] = json!([stop.clone(), "never appears"]);
        let (_, v) = complete(&c, &s, b.clone()).await;
        assert_eq!(v["choices"][0]["text"], text[..cut], "stop {stop:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let (streamed, finish, _) = stream_text(&c, &s, b).await;
        assert_eq!(streamed, text[..cut]);
        assert_eq!(finish, "stop");

        let mut b = body.clone();
        b["logprobs"] = json!(3);
        b["max_tokens"] = json!(4);
        let (status, v) = complete(&c, &s, b).await;
        assert_eq!(status, 200, "{v}");
        let lp = &v["choices"][0]["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), 4, "{lp}");
        for (x, top) in lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(lp["top_logprobs"].as_array().unwrap())
        {
            let x = x.as_f64().unwrap();
            assert!(x <= 0.0);
            let top = top.as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 3);
            // Greedy: the chosen token is the most likely one.
            let best = top
                .values()
                .map(|v| v.as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            assert!((best - x).abs() < 1e-4, "{best} vs {x}");
        }

        let mut b = body.clone();
        b["echo"] = json!(true);
        b["logprobs"] = json!(1);
        b["max_tokens"] = json!(2);
        let (status, v) = complete(&c, &s, b).await;
        assert_eq!(status, 200, "{v}");
        let lp = &v["choices"][0]["logprobs"];
        let n = prompt(1).len() + 2;
        assert_eq!(lp["tokens"].as_array().unwrap().len(), n, "{lp}");
        assert!(lp["token_logprobs"][0].is_null());
        assert!(lp["token_logprobs"][1].as_f64().unwrap() <= 0.0);
        let prompt_and_two = v["choices"][0]["text"].as_str().unwrap().to_string();

        // No new tokens: the prompt's pass ends the request (it used to loop on failing steps
        // while the client waited). With `echo`, the text is the prompt.
        let mut b = body.clone();
        b["max_tokens"] = json!(0);
        let (status, v) = complete(&c, &s, b.clone()).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], "", "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 0, "{v}");
        assert_eq!(v["usage"]["prompt_tokens"], prompt(1).len(), "{v}");
        let (streamed, finish, usage) = stream_text(&c, &s, b.clone()).await;
        assert_eq!((streamed.as_str(), finish.as_str()), ("", "length"));
        assert_eq!(usage["completion_tokens"], 0, "{usage}");
        b["echo"] = json!(true);
        let (status, echoed) = complete(&c, &s, b).await;
        assert_eq!(status, 200, "{echoed}");
        let echoed = echoed["choices"][0]["text"].as_str().unwrap_or_default();
        // The prompt alone: what the echo of 2 more tokens starts with.
        assert!(
            !echoed.is_empty()
                && prompt_and_two.starts_with(echoed)
                && echoed.len() < prompt_and_two.len(),
            "{echoed:?} vs {prompt_and_two:?}"
        );
    });
}

#[test]
fn a_client_that_disconnects_frees_its_blocks() {
    let s = start_server(&[]);
    rt().block_on(async {
        let c = client();
        let body = json!({"model": "tiny-a", "prompt": prompt(2), "max_tokens": 180, "stream": true, "temperature": 0});
        let mut r = c.post(s.url("/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        // Read until generation is under way, then hang up.
        let mut seen = String::new();
        while !seen.contains("\"text\"") {
            let chunk = r.chunk().await.unwrap().expect("stream ended early");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        let m = c.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(metric(&m, "grok_kv_blocks_used") > 0.0, "{m}");
        drop(r);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = c.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
            if metric(&m, "grok_kv_blocks_used") == 0.0 && metric(&m, "grok_running_sequences") == 0.0 {
                assert!(m.contains("status=\"499\""), "{m}");
                break;
            }
            assert!(Instant::now() < deadline, "blocks not freed: {m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn a_flood_gets_429s_and_the_server_stays_healthy() {
    let s = start_server(&["--max-queued", "2", "--max-running", "1"]);
    rt().block_on(async {
        let c = client();
        let body = json!({"model": "tiny-a", "prompt": prompt(1), "max_tokens": 20});
        let replies = futures_util::future::join_all((0..24).map(|_| {
            let c = c.clone();
            let url = s.url("/v1/completions");
            let body = body.clone();
            async move { c.post(url).json(&body).send().await.unwrap() }
        }))
        .await;
        let mut ok = 0;
        let mut limited = 0;
        for r in replies {
            match r.status().as_u16() {
                200 => ok += 1,
                429 => {
                    assert!(r.headers().contains_key("retry-after"));
                    let v: Value = r.json().await.unwrap();
                    assert!(v["error"]["message"].is_string(), "{v}");
                    limited += 1;
                }
                other => panic!("unexpected status {other}"),
            }
        }
        assert!(ok >= 1 && limited >= 1, "ok {ok}, 429 {limited}");
        for path in ["/health", "/ready"] {
            assert_eq!(
                c.get(s.url(path)).send().await.unwrap().status(),
                200,
                "{path}"
            );
        }
        let (status, _) = complete(&c, &s, body).await;
        assert_eq!(status, 200);
    });
}

#[test]
fn malformed_requests_get_the_right_4xx() {
    let s = start_server(&["--api-key", "sekrit"]);
    rt().block_on(async {
        let c = client();
        let post = |path: &'static str, body: Vec<u8>| {
            let c = c.clone();
            let url = s.url(path);
            async move {
                let r = c
                    .post(url)
                    .header("authorization", "Bearer sekrit")
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            }
        };
        let long: Vec<u32> = vec![5; 300];
        let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
            ("bad json", b"{\"model\": ".to_vec(), 400, None),
            (
                "wrong type",
                br#"{"model":"tiny-a","prompt":[5],"max_tokens":"ten"}"#.to_vec(),
                400,
                Some("max_tokens"),
            ),
            (
                "negative max_tokens",
                br#"{"model":"tiny-a","prompt":[5],"max_tokens":-1}"#.to_vec(),
                400,
                Some("max_tokens"),
            ),
            (
                "empty prompt",
                br#"{"model":"tiny-a","prompt":""}"#.to_vec(),
                400,
                Some("prompt"),
            ),
            (
                "prompt too long",
                json!({"model":"tiny-a","prompt":long})
                    .to_string()
                    .into_bytes(),
                400,
                Some("prompt"),
            ),
            (
                "invalid utf-8",
                b"{\"model\":\"tiny-a\",\"prompt\":\"\xff\xfe\"}".to_vec(),
                400,
                None,
            ),
            (
                "unknown model",
                br#"{"model":"gpt-4","prompt":[5]}"#.to_vec(),
                404,
                Some("model"),
            ),
            (
                "unknown field",
                br#"{"model":"tiny-a","prompt":[5],"frobnicate":1}"#.to_vec(),
                400,
                Some("frobnicate"),
            ),
            (
                "token outside the vocabulary",
                br#"{"model":"tiny-a","prompt":[999999]}"#.to_vec(),
                400,
                Some("prompt"),
            ),
            (
                "temperature out of range",
                br#"{"model":"tiny-a","prompt":[5],"temperature":9}"#.to_vec(),
                400,
                Some("temperature"),
            ),
        ];
        for (what, body, status, param) in cases {
            let (got, v) = post("/v1/completions", body).await;
            assert_eq!(got, status, "{what}: {v}");
            assert!(v["error"]["message"].is_string(), "{what}: {v}");
            if let Some(p) = param {
                assert_eq!(v["error"]["param"], p, "{what}: {v}");
            }
        }
        let (got, v) = post(
            "/v1/chat/completions",
            br#"{"model":"tiny-a","messages":[]}"#.to_vec(),
        )
        .await;
        assert_eq!(got, 400, "{v}");
        // No key, or a wrong one: 401.
        let r = c
            .post(s.url("/v1/completions"))
            .json(&json!({"model":"tiny-a","prompt":[5]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(c.get(s.url("/health")).send().await.unwrap().status(), 200);
        // Every refusal was counted; the server still serves.
        let m = c
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(m.contains("status=\"400\""), "{m}");
        let (got, v) = post(
            "/v1/completions",
            br#"{"model":"tiny-a","prompt":[5,6],"max_tokens":2}"#.to_vec(),
        )
        .await;
        assert_eq!(got, 200, "{v}");
        let _ = &s.log;
    });
}

/// The `grok-worker` processes whose parent is `parent` (from /proc).
fn workers_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
        let Some((comm, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) && comm.ends_with("(grok-worker") {
            out.push(pid);
        }
    }
    out
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn workers_never_outlive_the_server() {
    for signal in ["-TERM", "-KILL"] {
        let mut s = start_server(&[]);
        let pid = s.child.id();
        let workers = workers_of(pid);
        assert_eq!(workers.len(), 2, "{signal}: {workers:?}");
        let killed = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let mut status = None;
        wait_until("the server exits", 15, || {
            status = s.child.try_wait().unwrap();
            status.is_some()
        });
        if signal == "-TERM" {
            // SIGTERM is a clean stop, like Ctrl-C.
            assert!(status.unwrap().success(), "{}", s.log.lock().unwrap());
        }
        // SIGKILL leaves no chance to clean up: the workers see their stdin close.
        wait_until("every worker exits", 10, || {
            workers.iter().all(|&w| exited(w))
        });
    }
}

#[test]
fn a_stop_signal_at_any_moment_of_the_start_is_a_clean_stop() {
    // Signals used to be caught only once serving began: one during loading, or just after
    // "ready", killed the server by the default action. Each signal is sent the moment the
    // server prints the line (its first, after it catches them; the weights, once the
    // workers are up; ready).
    let model = grok_shared::test_support::tiny_a_dir();
    for (at, signal) in [
        ("starting", "-TERM"),
        ("rank 1:", "-INT"),
        ("ready:", "-TERM"),
    ] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_grok"))
            .args(["serve", "--port", "0", "--workers", "2", "--ep", "2"])
            .args(["--model", model.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting grok serve");
        let pid = child.id();
        let _done = common::watchdog(pid, 60);
        let mut log = String::new();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            log += &format!("{line}\n");
            if line.starts_with(at) {
                let sent = std::process::Command::new("kill")
                    .args([signal, &pid.to_string()])
                    .status()
                    .unwrap();
                assert!(sent.success());
                break;
            }
        }
        let workers = workers_of(pid);
        for line in lines.map_while(Result::ok) {
            log += &format!("{line}\n");
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "{signal} at '{at}': {status:?}\n{log}");
        assert!(!log.contains("panicked"), "{log}");
        wait_until("its workers exit", 10, || {
            workers.iter().all(|&w| exited(w))
        });
    }
}

#[test]
fn a_stop_signal_lets_the_requests_in_flight_finish() {
    let mut s = start_server(&[]);
    let pid = s.child.id();
    let raws = rt().block_on(async {
        let c = client();
        let mut streams = Vec::new();
        for i in 0..3 {
            let body = json!({"model": "tiny-a", "prompt": prompt(i), "max_tokens": 180,
                              "ignore_eos": true});
            let mut r = open_stream(&c, &s, body).await;
            // Its first token is out: the request is in flight when the signal comes.
            let first = r.chunk().await.unwrap().expect("a first chunk");
            streams.push((r, String::from_utf8_lossy(&first).into_owned()));
        }
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let mut raws = Vec::new();
        for (mut r, mut raw) in streams {
            while let Some(chunk) = r.chunk().await.unwrap() {
                raw.push_str(&String::from_utf8_lossy(&chunk));
            }
            raws.push(raw);
        }
        raws
    });
    for (i, raw) in raws.iter().enumerate() {
        assert!(
            raw.contains("\"finish_reason\":\"length\"")
                && raw.contains("\"completion_tokens\":180")
                && raw.trim_end().ends_with("data: [DONE]"),
            "request {i} was cut short: {raw}"
        );
    }
    let mut status = None;
    wait_until("the server exits", 15, || {
        status = s.child.try_wait().unwrap();
        status.is_some()
    });
    let log = s.log.lock().unwrap().clone();
    assert!(status.unwrap().success(), "{log}");
    // The last stream had just begun (179 of its tokens to go): at least it was in flight.
    let draining = log
        .split("draining: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok());
    assert!(draining.is_some_and(|n| n >= 1), "{log}");
}

#[test]
fn penalties_and_logit_bias_through_the_workers_give_the_reference_tokens() {
    // The cluster path: the API's fields, the counts the scheduler keeps, the step's proto
    // and the worker's sampling, against the CPU model step by step.
    let s = start_server(&[]);
    let adjust = grok_shared::sampling::LogitAdjust {
        presence_penalty: 0.7,
        frequency_penalty: 0.9,
        counts: Vec::new(),
        bias: vec![(9, 1.5), (40, -3.0)],
    };
    let p = prompt(1);
    let want = grok_shared::test_support::tiny_a_greedy_adjusted(&p, 20, &adjust);
    let tok = grok_shared::tokenizer::Tokenizer::builtin().unwrap();
    rt().block_on(async {
        let c = client();
        let body = json!({"model": "tiny-a", "prompt": p, "max_tokens": 20, "temperature": 0,
                          "ignore_eos": true, "presence_penalty": 0.7, "frequency_penalty": 0.9,
                          "logit_bias": {"9": 1.5, "40": -3.0}});
        let (status, v) = complete(&c, &s, body).await;
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(text, tok.decode(&want).unwrap());
        // A bias of 100 on one token makes it every choice.
        let body = json!({"model": "tiny-a", "prompt": p, "max_tokens": 5, "temperature": 0.9,
                          "seed": 3, "ignore_eos": true, "logit_bias": {"300": 100}});
        let (status, v) = complete(&c, &s, body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], tok.decode(&[300; 5]).unwrap());
    });
}
