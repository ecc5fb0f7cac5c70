//! The HTTP layer alone: a real server on a loopback port, a raw HTTP/1.1 client, and the
//! test playing the scheduler (reading submissions from the inbox, sending events back).

use super::*;
use crate::metrics::Metrics;
use crate::request::{Event, FinishReason, TokenLogprob, Usage};
use crate::scheduler::{Inbox, Submission};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);
const CONTEXT: usize = 64;

fn tokenizer() -> Arc<Tokenizer> {
    static TOK: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| Arc::new(Tokenizer::builtin().expect("the built-in tokenizer loads")))
        .clone()
}

struct Server {
    addr: SocketAddr,
    inbox: Inbox,
    metrics: Metrics,
}

struct Options {
    config: ApiConfig,
    max_queued: usize,
    ready: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config: ApiConfig::default(),
            max_queued: 16,
            ready: true,
        }
    }
}

async fn start(opts: Options) -> Server {
    let metrics = Metrics::new();
    let tok = tokenizer();
    let (handle, inbox) =
        SchedulerHandle::channel(opts.max_queued, CONTEXT, tok.vocab_size(), metrics.clone());
    inbox.ready.store(opts.ready, Ordering::Release);
    let client_timeout = opts.config.client_timeout;
    let app = router(AppState::new(handle, tok, opts.config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(serve(listener, app, client_timeout, std::future::pending()));
    Server {
        addr,
        inbox,
        metrics,
    }
}

impl Server {
    async fn submission(&mut self) -> Submission {
        tokio::time::timeout(WAIT, self.inbox.rx.recv())
            .await
            .expect("a submission in time")
            .expect("the inbox is open")
    }

    fn count(&self, endpoint: &str, status: u16) -> u64 {
        self.metrics
            .requests
            .get_or_create(&crate::metrics::RequestLabels {
                endpoint: endpoint.into(),
                status,
            })
            .get()
    }

    /// Waits for a status to be counted (a stream counts when the server drops its body).
    async fn wait_count(&self, endpoint: &str, status: u16, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.count(endpoint, status) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{endpoint} {status} not counted {n} time(s)"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("a UTF-8 body")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `data:` payloads of an SSE body, in order.
    fn sse(&self) -> Vec<String> {
        sse_payloads(self.text())
    }
}

fn sse_payloads(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

fn raw_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&raw_request(method, path, headers, body))
        .await
        .expect("write the request");
    s
}

/// POSTs `body` and returns the connection, for a test to answer the submission first.
async fn send_json(addr: SocketAddr, path: &str, body: &Value) -> TcpStream {
    send(addr, "POST", path, &[], body.to_string().as_bytes()).await
}

async fn read_reply(mut s: TcpStream) -> Reply {
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("the reply in time")
        .expect("read the reply");
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = std::str::from_utf8(&raw[..split]).expect("ASCII headers");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..eol]).expect("hex").trim(), 16)
                .expect("a hex chunk size");
        rest = &rest[eol + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    read_reply(send(addr, method, path, headers, body).await).await
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    call(addr, "POST", path, &[], body.to_string().as_bytes()).await
}

fn tok(id: u32, text: &str, logprob: Option<f32>, top: &[(u32, &str, f32)]) -> TokenLogprob {
    TokenLogprob {
        id,
        text: text.into(),
        logprob,
        top: top.iter().map(|&(i, t, l)| (i, t.to_owned(), l)).collect(),
    }
}

fn text(s: &str) -> Event {
    Event::Text {
        text: s.into(),
        tokens: Vec::new(),
    }
}

fn done(finish: FinishReason, prompt: usize, completion: usize) -> Event {
    Event::Done {
        finish,
        usage: Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
        },
    }
}

/// Checks the fields every response object has, then removes the ones that vary.
fn strip_ids(mut v: Value, id_prefix: &str, object: &str) -> Value {
    let obj = v.as_object_mut().expect("an object");
    let id = obj.remove("id").expect("an id");
    assert!(
        id.as_str()
            .is_some_and(|s| s.starts_with(id_prefix) && s.len() > id_prefix.len()),
        "id {id}"
    );
    assert!(obj
        .remove("created")
        .is_some_and(|c| c.as_u64().is_some_and(|c| c > 1_600_000_000)));
    assert_eq!(obj.remove("object"), Some(json!(object)));
    assert_eq!(obj.remove("model"), Some(json!("grok-1")));
    v
}

/// (what, path, body, status, `param`, `code`)
type Case<B> = (
    &'static str,
    &'static str,
    B,
    u16,
    Option<&'static str>,
    Option<&'static str>,
);

#[tokio::test]
async fn malformed_bodies_get_their_status_and_param() {
    let server = start(Options {
        config: ApiConfig {
            max_body_bytes: 4096,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let c = "/v1/completions";
    let chat = "/v1/chat/completions";
    let long_prompt: Vec<u32> = (100..100 + CONTEXT as u32).collect();
    let big = format!(r#"{{"model":"grok-1","prompt":"{}"}}"#, "a".repeat(5000));
    let table: Vec<Case<Vec<u8>>> = vec![
        (
            "bad JSON",
            c,
            br#"{"model":"grok-1","prompt":"#.to_vec(),
            400,
            None,
            None,
        ),
        (
            "trailing garbage",
            c,
            br#"{"model":"grok-1","prompt":"a"} x"#.to_vec(),
            400,
            None,
            None,
        ),
        ("empty body", c, Vec::new(), 400, None, None),
        ("not an object", c, b"[1,2]".to_vec(), 400, None, None),
        (
            "invalid UTF-8",
            c,
            b"{\"model\":\"grok-1\",\"prompt\":\"\xff\xfe\"}".to_vec(),
            400,
            None,
            None,
        ),
        ("body too large", c, big.into_bytes(), 413, None, None),
    ];
    let json_table: Vec<Case<Value>> = vec![
        (
            "max_tokens a string",
            c,
            json!({"model":"grok-1","prompt":"a","max_tokens":"ten"}),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "temperature a string",
            c,
            json!({"model":"grok-1","prompt":"a","temperature":"hot"}),
            400,
            Some("temperature"),
            None,
        ),
        (
            "stream a number",
            c,
            json!({"model":"grok-1","prompt":"a","stream":1}),
            400,
            Some("stream"),
            None,
        ),
        (
            "negative max_tokens",
            c,
            json!({"model":"grok-1","prompt":"a","max_tokens":-1}),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "empty prompt",
            c,
            json!({"model":"grok-1","prompt":""}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "empty prompt array",
            c,
            json!({"model":"grok-1","prompt":[]}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "empty token array",
            c,
            json!({"model":"grok-1","prompt":[[]]}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "missing prompt",
            c,
            json!({"model":"grok-1"}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "two prompts",
            c,
            json!({"model":"grok-1","prompt":["a","b"]}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "two token prompts",
            c,
            json!({"model":"grok-1","prompt":[[1],[2]]}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "negative token id",
            c,
            json!({"model":"grok-1","prompt":[5,-2]}),
            400,
            Some("prompt[1]"),
            None,
        ),
        (
            "prompt an object",
            c,
            json!({"model":"grok-1","prompt":{"a":1}}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "token outside the vocabulary",
            c,
            json!({"model":"grok-1","prompt":[4_000_000_000u32]}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "prompt too long",
            c,
            json!({"model":"grok-1","prompt":long_prompt,"max_tokens":1}),
            400,
            Some("prompt"),
            Some("context_length_exceeded"),
        ),
        (
            "prompt + max_tokens too long",
            c,
            json!({"model":"grok-1","prompt":[100,101],"max_tokens":CONTEXT}),
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            "unknown model",
            c,
            json!({"model":"gpt-4","prompt":"a"}),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            "missing model",
            c,
            json!({"prompt":"a"}),
            400,
            Some("model"),
            None,
        ),
        (
            "unknown field",
            c,
            json!({"model":"grok-1","prompt":"a","frobnicate":true}),
            400,
            Some("frobnicate"),
            None,
        ),
        (
            "n = 2",
            c,
            json!({"model":"grok-1","prompt":"a","n":2}),
            400,
            Some("n"),
            None,
        ),
        (
            "best_of = 2",
            c,
            json!({"model":"grok-1","prompt":"a","best_of":2}),
            400,
            Some("best_of"),
            None,
        ),
        (
            "top_p = 0",
            c,
            json!({"model":"grok-1","prompt":"a","top_p":0}),
            400,
            Some("top_p"),
            None,
        ),
        (
            "temperature = 2.5",
            c,
            json!({"model":"grok-1","prompt":"a","temperature":2.5}),
            400,
            Some("temperature"),
            None,
        ),
        (
            "top_k = -2",
            c,
            json!({"model":"grok-1","prompt":"a","top_k":-2}),
            400,
            Some("top_k"),
            None,
        ),
        (
            "logprobs = 21",
            c,
            json!({"model":"grok-1","prompt":"a","logprobs":21}),
            400,
            Some("logprobs"),
            None,
        ),
        (
            "logprobs = true",
            c,
            json!({"model":"grok-1","prompt":"a","logprobs":true}),
            400,
            Some("logprobs"),
            None,
        ),
        (
            "five stops",
            c,
            json!({"model":"grok-1","prompt":"a","stop":["a","b","c","d","e"]}),
            400,
            Some("stop"),
            None,
        ),
        (
            "empty stop",
            c,
            json!({"model":"grok-1","prompt":"a","stop":""}),
            400,
            Some("stop"),
            None,
        ),
        (
            "stop a number",
            c,
            json!({"model":"grok-1","prompt":"a","stop":3}),
            400,
            Some("stop"),
            None,
        ),
        (
            "presence_penalty above 2",
            c,
            json!({"model":"grok-1","prompt":"a","presence_penalty":2.5}),
            400,
            Some("presence_penalty"),
            None,
        ),
        (
            "chat: frequency_penalty below -2",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"hi"}],
                   "frequency_penalty":-3}),
            400,
            Some("frequency_penalty"),
            None,
        ),
        (
            "logit_bias key not a token id",
            c,
            json!({"model":"grok-1","prompt":"a","logit_bias":{"x":1}}),
            400,
            Some("logit_bias.x"),
            None,
        ),
        (
            "logit_bias beyond 100",
            c,
            json!({"model":"grok-1","prompt":"a","logit_bias":{"5":101}}),
            400,
            Some("logit_bias.5"),
            None,
        ),
        (
            "logit_bias not a number",
            c,
            json!({"model":"grok-1","prompt":"a","logit_bias":{"5":"up"}}),
            400,
            Some("logit_bias.5"),
            None,
        ),
        (
            "logit_bias token given twice",
            c,
            json!({"model":"grok-1","prompt":"a","logit_bias":{"5":1,"05":2}}),
            400,
            Some("logit_bias.5"),
            None,
        ),
        (
            "logit_bias token outside the vocabulary",
            c,
            json!({"model":"grok-1","prompt":"a","logit_bias":{"999999999":1}}),
            400,
            Some("logit_bias.999999999"),
            None,
        ),
        (
            "logit_bias not an object",
            c,
            json!({"model":"grok-1","prompt":"a","logit_bias":[1]}),
            400,
            Some("logit_bias"),
            None,
        ),
        (
            "suffix",
            c,
            json!({"model":"grok-1","prompt":"a","suffix":"end"}),
            400,
            Some("suffix"),
            None,
        ),
        (
            "seed negative",
            c,
            json!({"model":"grok-1","prompt":"a","seed":-1}),
            400,
            Some("seed"),
            None,
        ),
        (
            "ignore_eos not a boolean",
            c,
            json!({"model":"grok-1","prompt":"a","ignore_eos":"yes"}),
            400,
            Some("ignore_eos"),
            None,
        ),
        (
            "unknown stream option",
            c,
            json!({"model":"grok-1","prompt":"a","stream":true,"stream_options":{"x":1}}),
            400,
            Some("stream_options.x"),
            None,
        ),
        (
            "stream options without streaming",
            c,
            json!({"model":"grok-1","prompt":"a","stream_options":{"include_usage":true}}),
            400,
            Some("stream_options"),
            None,
        ),
        (
            "chat: stream options with stream false",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"hi"}],
                   "stream":false,"stream_options":{"include_usage":false}}),
            400,
            Some("stream_options"),
            None,
        ),
        (
            "chat: top_logprobs without logprobs",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"hi"}],"top_logprobs":2}),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            "chat: top_logprobs = 21",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":21}),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            "chat: missing messages",
            chat,
            json!({"model":"grok-1"}),
            400,
            Some("messages"),
            None,
        ),
        (
            "chat: empty messages",
            chat,
            json!({"model":"grok-1","messages":[]}),
            400,
            Some("messages"),
            None,
        ),
        (
            "chat: content a number",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":5}]}),
            400,
            Some("messages[0].content"),
            None,
        ),
        (
            "chat: missing content",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user"}]}),
            400,
            Some("messages[0].content"),
            None,
        ),
        (
            "chat: role tool",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"a"},{"role":"tool","content":"b"}]}),
            400,
            Some("messages[1].role"),
            None,
        ),
        (
            "chat: role a number",
            chat,
            json!({"model":"grok-1","messages":[{"role":1,"content":"a"}]}),
            400,
            Some("messages[0].role"),
            None,
        ),
        (
            "chat: unknown message field",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"a","tool_calls":[]}]}),
            400,
            Some("messages[0].tool_calls"),
            None,
        ),
        (
            "chat: image part",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}),
            400,
            Some("messages[0].content[0].type"),
            None,
        ),
        (
            "chat: audio part",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":[{"type":"input_audio"}]}]}),
            400,
            Some("messages[0].content[0].type"),
            None,
        ),
        (
            "chat: max_tokens = 0",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"a"}],"max_tokens":0}),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "chat: negative max_completion_tokens",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"a"}],"max_completion_tokens":-3}),
            400,
            Some("max_completion_tokens"),
            None,
        ),
        (
            "chat: n = 2",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"a"}],"n":2}),
            400,
            Some("n"),
            None,
        ),
        (
            "chat: unknown model",
            chat,
            json!({"model":"grok-2","messages":[{"role":"user","content":"a"}]}),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            "chat: max_completion_tokens past the context",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"a"}],"max_completion_tokens":CONTEXT}),
            400,
            Some("max_completion_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            "chat: conversation fills the context",
            chat,
            json!({"model":"grok-1","messages":[{"role":"user","content":"word ".repeat(CONTEXT)}]}),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
    ];
    let all = table.into_iter().chain(
        json_table
            .into_iter()
            .map(|(n, p, b, s, param, code)| (n, p, b.to_string().into_bytes(), s, param, code)),
    );
    let mut expected_counts: std::collections::HashMap<(&str, u16), u64> = Default::default();
    for (name, path, body, status, param, code) in all {
        let reply = call(server.addr, "POST", path, &[], &body).await;
        assert_eq!(reply.status, status, "{name}: {}", reply.text());
        let v = reply.json();
        let err = &v["error"];
        assert_eq!(err["param"], json!(param), "{name}: {err}");
        assert_eq!(err["code"], json!(code), "{name}: {err}");
        assert_eq!(err["type"], "invalid_request_error", "{name}");
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: no message"
        );
        assert_eq!(reply.header("content-type"), Some("application/json"));
        *expected_counts.entry((path, status)).or_default() += 1;
    }
    for ((path, status), n) in expected_counts {
        assert_eq!(server.count(path, status), n, "{path} {status}");
    }
}

#[tokio::test]
async fn streamed_completion_sends_each_event_at_once_then_usage_and_done() {
    let mut server = start(Options::default()).await;
    let body = json!({"model":"grok-1","prompt":"The answer","max_tokens":5,"stream":true,
                      "temperature":0.5,"top_p":0.9,"top_k":-1,"seed":7,"stop":"\n",
                      "ignore_eos":true});
    let mut s = send_json(server.addr, "/v1/completions", &body).await;
    let sub = server.submission().await;
    let r = &sub.request;
    assert_eq!(r.prompt, tokenizer().encode("The answer"));
    assert_eq!(r.max_tokens, 5);
    assert_eq!(r.sampling.temperature, 0.5);
    assert_eq!(r.sampling.top_p, 0.9);
    assert_eq!(r.sampling.top_k, 0);
    assert_eq!(r.sampling.seed, 7);
    assert_eq!(r.stop, vec!["\n".to_owned()]);
    assert_eq!(r.logprobs, None);
    assert!(!r.echo);
    assert!(r.ignore_eos);

    // No buffering: the first text reaches the client before the next event exists.
    sub.events.send(text(" is")).expect("send");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains(r#""text":" is""#) {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the first chunk before any other event")
            .expect("read");
        assert!(n > 0, "closed early");
        raw.extend_from_slice(&buf[..n]);
    }
    sub.events.send(text("")).expect("send"); // held-back text: no chunk
    sub.events.send(text(" 42")).expect("send");
    sub.events
        .send(done(FinishReason::Stop, 2, 3))
        .expect("send");
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("the end in time")
        .expect("read");
    let reply = parse_reply(&raw);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let events = reply.sse();
    assert_eq!(events.len(), 5, "{events:?}");
    let chunk = |i: usize| {
        strip_ids(
            serde_json::from_str(&events[i]).expect("JSON"),
            "cmpl-",
            "text_completion",
        )
    };
    let piece =
        |t: &str| json!({"choices":[{"text":t,"index":0,"logprobs":null,"finish_reason":null}]});
    assert_eq!(chunk(0), piece(" is"));
    assert_eq!(chunk(1), piece(" 42"));
    assert_eq!(
        chunk(2),
        json!({"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}]})
    );
    assert_eq!(
        chunk(3),
        json!({"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}})
    );
    assert_eq!(events[4], "[DONE]");
    // One id for the whole stream, and the fields in OpenAI's order.
    let ids: Vec<Value> = events[..4]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("JSON")["id"].clone())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]));
    assert!(events[0].starts_with(r#"{"id":"cmpl-"#), "{}", events[0]);
    assert!(events[0]
        .contains(r#""choices":[{"text":" is","index":0,"logprobs":null,"finish_reason":null}]}"#));
    server.wait_count("/v1/completions", 200, 1).await;
}

#[tokio::test]
async fn include_usage_false_omits_the_usage_chunk() {
    let mut server = start(Options::default()).await;
    let body = json!({"model":"grok-1","prompt":[5,6,7],"stream":true,
                      "stream_options":{"include_usage":false}});
    let s = send_json(server.addr, "/v1/completions", &body).await;
    let sub = server.submission().await;
    assert_eq!(sub.request.prompt, vec![5, 6, 7]);
    assert_eq!(sub.request.max_tokens, 16);
    sub.events.send(text("x")).expect("send");
    sub.events
        .send(done(FinishReason::Length, 3, 1))
        .expect("send");
    let events = read_reply(s).await.sse();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events[1].contains(r#""finish_reason":"length""#));
    assert_eq!(events[2], "[DONE]");
}

#[tokio::test]
async fn completion_collects_text_finish_and_usage() {
    let mut server = start(Options::default()).await;
    let body = json!({"model":"grok-1","prompt":["Hi"],"max_tokens":null,"user":"u1",
                      "n":1,"best_of":1,"presence_penalty":0,"logit_bias":{},"suffix":null});
    let s = send_json(server.addr, "/v1/completions", &body).await;
    let sub = server.submission().await;
    assert_eq!(sub.request.prompt, tokenizer().encode("Hi"));
    assert_eq!(sub.request.sampling.temperature, 1.0);
    assert!(sub.request.adjust.is_neutral());
    sub.events.send(text(" there")).expect("send");
    sub.events.send(text(",")).expect("send");
    sub.events
        .send(done(FinishReason::Length, 1, 2))
        .expect("send");
    let reply = read_reply(s).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert!(reply.text().starts_with(r#"{"id":"cmpl-"#));
    assert_eq!(
        strip_ids(reply.json(), "cmpl-", "text_completion"),
        json!({
            "choices":[{"text":" there,","index":0,"logprobs":null,"finish_reason":"length"}],
            "usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}
        })
    );
    assert_eq!(server.count("/v1/completions", 200), 1);
}

#[tokio::test]
async fn unseeded_requests_get_different_seeds() {
    let mut server = start(Options::default()).await;
    let mut seeds = Vec::new();
    for _ in 0..2 {
        let body = json!({"model":"grok-1","prompt":"a"});
        let _s = send_json(server.addr, "/v1/completions", &body).await;
        seeds.push(server.submission().await.request.sampling.seed);
    }
    assert_ne!(seeds[0], seeds[1]);
}

#[tokio::test]
async fn echo_with_logprobs_has_prompt_and_completion_tokens() {
    let mut server = start(Options::default()).await;
    let body = json!({"model":"grok-1","prompt":"Hi you","echo":true,"logprobs":1,"max_tokens":1});
    let s = send_json(server.addr, "/v1/completions", &body).await;
    let sub = server.submission().await;
    assert!(sub.request.echo);
    assert_eq!(sub.request.logprobs, Some(1));
    sub.events
        .send(Event::Prompt {
            text: "Hi you".into(),
            tokens: vec![
                tok(10, "Hi", None, &[]),
                tok(11, " you", Some(-1.5), &[(11, " you", -1.5)]),
            ],
        })
        .expect("send");
    sub.events
        .send(Event::Text {
            text: "!".into(),
            tokens: vec![tok(12, "!", Some(-0.25), &[(13, ".", -0.125)])],
        })
        .expect("send");
    sub.events
        .send(done(FinishReason::Length, 2, 1))
        .expect("send");
    let reply = read_reply(s).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        strip_ids(reply.json(), "cmpl-", "text_completion"),
        json!({
            "choices":[{
                "text":"Hi you!",
                "index":0,
                "logprobs":{
                    "tokens":["Hi"," you","!"],
                    "token_logprobs":[null,-1.5,-0.25],
                    "top_logprobs":[null,{" you":-1.5},{".":-0.125}],
                    "text_offset":[0,2,6]
                },
                "finish_reason":"length"
            }],
            "usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}
        })
    );
}

#[tokio::test]
async fn streamed_echo_with_logprobs_continues_text_offsets() {
    let mut server = start(Options::default()).await;
    let body = json!({"model":"grok-1","prompt":"Hi","echo":true,"logprobs":0,"stream":true});
    let s = send_json(server.addr, "/v1/completions", &body).await;
    let sub = server.submission().await;
    sub.events
        .send(Event::Prompt {
            text: "Hi".into(),
            tokens: vec![tok(10, "Hi", None, &[])],
        })
        .expect("send");
    sub.events
        .send(Event::Text {
            text: " é".into(),
            tokens: vec![tok(12, " é", Some(-0.5), &[])],
        })
        .expect("send");
    sub.events
        .send(Event::Text {
            text: "x".into(),
            tokens: vec![tok(13, "x", Some(-0.75), &[])],
        })
        .expect("send");
    sub.events
        .send(done(FinishReason::Stop, 1, 2))
        .expect("send");
    let events = read_reply(s).await.sse();
    let lp =
        |i: usize| serde_json::from_str::<Value>(&events[i]).expect("JSON")["choices"][0].clone();
    assert_eq!(
        lp(0),
        json!({"text":"Hi","index":0,"logprobs":{"tokens":["Hi"],"token_logprobs":[null],"top_logprobs":[null],"text_offset":[0]},"finish_reason":null})
    );
    assert_eq!(
        lp(1)["logprobs"],
        json!({"tokens":[" é"],"token_logprobs":[-0.5],"top_logprobs":[{}],"text_offset":[2]})
    );
    // Offsets count characters, not bytes.
    assert_eq!(lp(2)["logprobs"]["text_offset"], json!([4]));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn chat_stream_has_role_then_deltas_then_finish_usage_done() {
    let mut server = start(Options::default()).await;
    let body = json!({"model":"grok-1","stream":true,"stop":["END"],"messages":[
        {"role":"system","content":"Be brief."},
        {"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":" there"}]},
        {"role":"assistant","content":"Hello."},
        {"role":"user","content":"Bye"}
    ]});
    let s = send_json(server.addr, "/v1/chat/completions", &body).await;
    let sub = server.submission().await;
    let template =
        "System: Be brief.\n\nUser: Hi there\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:";
    assert_eq!(
        chat::render(&[
            (params::Role::System, "Be brief.".into()),
            (params::Role::User, "Hi there".into()),
            (params::Role::Assistant, "Hello.".into()),
            (params::Role::User, "Bye".into()),
        ]),
        template
    );
    let prompt = tokenizer().encode(template);
    assert_eq!(sub.request.prompt, prompt);
    assert_eq!(sub.request.max_tokens, CONTEXT - prompt.len());
    assert_eq!(
        sub.request.stop,
        vec!["END".to_owned(), "\nUser:".to_owned()]
    );
    assert_eq!(sub.request.logprobs, None);
    sub.events.send(text(" Good")).expect("send");
    sub.events.send(text("bye!")).expect("send");
    sub.events
        .send(done(FinishReason::Stop, prompt.len(), 2))
        .expect("send");
    let reply = read_reply(s).await;
    assert_eq!(reply.status, 200);
    let events = reply.sse();
    assert_eq!(events.len(), 6, "{events:?}");
    let chunk = |i: usize| {
        strip_ids(
            serde_json::from_str(&events[i]).expect("JSON"),
            "chatcmpl-",
            "chat.completion.chunk",
        )
    };
    let delta = |d: Value, finish: Value| json!({"choices":[{"index":0,"delta":d,"logprobs":null,"finish_reason":finish}]});
    assert_eq!(
        chunk(0),
        delta(json!({"role":"assistant","content":""}), Value::Null)
    );
    // The space the model writes after "Assistant:" is not part of the reply.
    assert_eq!(chunk(1), delta(json!({"content":"Good"}), Value::Null));
    assert_eq!(chunk(2), delta(json!({"content":"bye!"}), Value::Null));
    assert_eq!(chunk(3), delta(json!({}), json!("stop")));
    assert_eq!(
        chunk(4),
        json!({"choices":[],"usage":{"prompt_tokens":prompt.len(),"completion_tokens":2,"total_tokens":prompt.len()+2}})
    );
    assert_eq!(events[5], "[DONE]");
}

#[tokio::test]
async fn chat_response_with_logprobs() {
    let mut server = start(Options::default()).await;
    let body = json!({"model":"grok-1","logprobs":true,"top_logprobs":1,"max_completion_tokens":4,
                      "messages":[{"role":"user","content":"Hi"}]});
    let s = send_json(server.addr, "/v1/chat/completions", &body).await;
    let sub = server.submission().await;
    assert_eq!(sub.request.max_tokens, 4);
    assert_eq!(sub.request.logprobs, Some(1));
    let tk = tokenizer();
    let hello = [tk
        .piece_to_id("\u{2581}Hello")
        .expect("a piece for \" Hello\"")];
    let byte = tk.piece_to_id("<0xE2>").expect("byte pieces");
    sub.events
        .send(Event::Text {
            text: " Hello".into(),
            tokens: vec![tok(
                hello[0],
                " Hello",
                Some(-0.5),
                &[(byte, "\u{fffd}", -2.0)],
            )],
        })
        .expect("send");
    sub.events
        .send(done(FinishReason::Length, 5, 1))
        .expect("send");
    let reply = read_reply(s).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        strip_ids(reply.json(), "chatcmpl-", "chat.completion"),
        json!({
            "choices":[{
                "index":0,
                "message":{"role":"assistant","content":"Hello"},
                "logprobs":{"content":[{
                    "token":" Hello","logprob":-0.5,"bytes":[32,72,101,108,108,111],
                    "top_logprobs":[{"token":"\u{fffd}","logprob":-2.0,"bytes":[0xE2]}]
                }]},
                "finish_reason":"length"
            }],
            "usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}
        })
    );
}

#[tokio::test]
async fn an_error_event_fails_the_request() {
    let mut server = start(Options::default()).await;
    // Whole response: 500, OpenAI-shaped.
    let s = send(
        server.addr,
        "POST",
        "/v1/completions",
        &[],
        br#"{"model":"grok-1","prompt":"a"}"#,
    )
    .await;
    let sub = server.submission().await;
    sub.events.send(text("partial")).expect("send");
    sub.events
        .send(Event::Error("rank 2 died".into()))
        .expect("send");
    let reply = read_reply(s).await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.json(),
        json!({"error":{"message":"rank 2 died","type":"server_error","param":null,"code":null}})
    );
    assert_eq!(server.count("/v1/completions", 500), 1);

    // Stream: the error object as the last event, no [DONE].
    let body = json!({"model":"grok-1","messages":[{"role":"user","content":"a"}],"stream":true});
    let s = send_json(server.addr, "/v1/chat/completions", &body).await;
    let sub = server.submission().await;
    sub.events.send(text("x")).expect("send");
    sub.events
        .send(Event::Error("rank 2 died".into()))
        .expect("send");
    let reply = read_reply(s).await;
    assert_eq!(reply.status, 200);
    let events = reply.sse();
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&events[2]).expect("JSON"),
        json!({"error":{"message":"rank 2 died","type":"server_error","param":null,"code":null}})
    );
    server.wait_count("/v1/chat/completions", 500, 1).await;

    // A scheduler that drops the request without a last event is a failure too.
    let s = send(
        server.addr,
        "POST",
        "/v1/completions",
        &[],
        br#"{"model":"grok-1","prompt":"a"}"#,
    )
    .await;
    drop(server.submission().await);
    assert_eq!(read_reply(s).await.status, 500);
}

#[tokio::test]
async fn api_key_guards_v1_only() {
    let server = start(Options {
        config: ApiConfig {
            api_key: Some("sekret".into()),
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let body = br#"{"model":"grok-1","prompt":"a"}"#;
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "Bearer sekre")],
        vec![("Authorization", "sekret")],
    ] {
        let reply = call(server.addr, "POST", "/v1/completions", &headers, body).await;
        assert_eq!(reply.status, 401, "{headers:?}");
        let err = &reply.json()["error"];
        assert_eq!(err["code"], "invalid_api_key");
        assert_eq!(err["type"], "invalid_request_error");
        assert_eq!(err["param"], Value::Null);
    }
    assert_eq!(
        call(server.addr, "GET", "/v1/models", &[], b"")
            .await
            .status,
        401
    );
    assert_eq!(
        call(server.addr, "GET", "/v1/nothing", &[], b"")
            .await
            .status,
        401
    );
    assert_eq!(server.count("/v1/completions", 401), 4);
    let ok = call(
        server.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer sekret")],
        b"",
    )
    .await;
    assert_eq!(ok.status, 200);
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(
            call(server.addr, "GET", open, &[], b"").await.status,
            200,
            "{open}"
        );
    }
}

#[tokio::test]
async fn full_queue_is_429_with_retry_after() {
    let server = start(Options {
        max_queued: 0,
        ..Options::default()
    })
    .await;
    let reply = post(
        server.addr,
        "/v1/completions",
        &json!({"model":"grok-1","prompt":"a"}),
    )
    .await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.json()["error"]["code"], "queue_full");
    assert_eq!(server.count("/v1/completions", 429), 1);
}

#[tokio::test]
async fn not_ready_is_503_until_ready() {
    let server = start(Options {
        ready: false,
        ..Options::default()
    })
    .await;
    assert_eq!(
        call(server.addr, "GET", "/health", &[], b"").await.status,
        200
    );
    assert_eq!(
        call(server.addr, "GET", "/ready", &[], b"").await.status,
        503
    );
    let reply = post(
        server.addr,
        "/v1/completions",
        &json!({"model":"grok-1","prompt":"a"}),
    )
    .await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "not_ready");
    server.inbox.ready.store(true, Ordering::Release);
    assert_eq!(
        call(server.addr, "GET", "/ready", &[], b"").await.status,
        200
    );
    assert_eq!(server.count("/ready", 503), 1);
    assert_eq!(server.count("/ready", 200), 1);
}

#[tokio::test]
async fn shutting_down_scheduler_is_503() {
    let Server { addr, inbox, .. } = start(Options::default()).await;
    drop(inbox);
    let reply = post(
        addr,
        "/v1/completions",
        &json!({"model":"grok-1","prompt":"a"}),
    )
    .await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "shutting_down");
}

#[tokio::test]
async fn metrics_expose_the_request_counter() {
    let server = start(Options::default()).await;
    assert_eq!(
        call(server.addr, "GET", "/health", &[], b"").await.status,
        200
    );
    assert_eq!(
        call(server.addr, "GET", "/no/such/route", &[], b"")
            .await
            .status,
        404
    );
    assert_eq!(
        call(server.addr, "GET", "/v1/completions", &[], b"")
            .await
            .status,
        405
    );
    let reply = call(server.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(reply.status, 200);
    assert!(reply
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    let text = reply.text();
    for line in [
        r#"grok_requests_total{endpoint="/health",status="200"} 1"#,
        r#"grok_requests_total{endpoint="unmatched",status="404"} 1"#,
        r#"grok_requests_total{endpoint="/v1/completions",status="405"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

#[tokio::test]
async fn models_list_the_served_model() {
    let server = start(Options {
        config: ApiConfig {
            model_name: "grok-1-tiny".into(),
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let v = call(server.addr, "GET", "/v1/models", &[], b"")
        .await
        .json();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], "grok-1-tiny");
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["owned_by"], "xai");
    assert!(data[0]["created"].as_u64().is_some());
    assert_eq!(
        call(server.addr, "GET", "/v1/models/grok-1-tiny", &[], b"")
            .await
            .json()["id"],
        "grok-1-tiny"
    );
    assert_eq!(
        call(server.addr, "GET", "/v1/models/other", &[], b"")
            .await
            .status,
        404
    );
}

async fn closes_in_time(sub: &Submission) {
    tokio::time::timeout(WAIT, sub.events.closed())
        .await
        .expect("the receiver is dropped when the client leaves");
    assert!(sub.events.is_closed());
}

#[tokio::test]
async fn a_dropped_stream_drops_the_receiver_and_counts_499() {
    let mut server = start(Options::default()).await;
    let body = json!({"model":"grok-1","prompt":"a","stream":true});
    let mut s = send_json(server.addr, "/v1/completions", &body).await;
    let sub = server.submission().await;
    sub.events.send(text("x")).expect("send");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("headers in time")
        .expect("read");
    assert!(n > 0);
    assert!(!sub.events.is_closed());
    drop(s);
    closes_in_time(&sub).await;
    server
        .wait_count("/v1/completions", CLIENT_CLOSED_STATUS, 1)
        .await;
    assert_eq!(server.count("/v1/completions", 200), 0);
}

#[tokio::test]
async fn a_client_leaving_a_whole_response_drops_the_receiver_and_counts_499() {
    let mut server = start(Options::default()).await;
    let body = json!({"model":"grok-1","messages":[{"role":"user","content":"a"}]});
    let s = send_json(server.addr, "/v1/chat/completions", &body).await;
    let sub = server.submission().await;
    drop(s);
    closes_in_time(&sub).await;
    server
        .wait_count("/v1/chat/completions", CLIENT_CLOSED_STATUS, 1)
        .await;
}

const CLIENT_CLOSED_STATUS: u16 = respond::CLIENT_CLOSED;

#[test]
fn prompt_shapes() {
    use params::{CompletionBody, Prompt};
    let parse = |prompt: Value| {
        params::parse_json::<CompletionBody>(
            json!({"model":"m","prompt":prompt}).to_string().as_bytes(),
        )
        .and_then(|b| b.validate("m"))
        .map(|p| p.prompt)
    };
    assert_eq!(parse(json!("hi")), Ok(Prompt::Text("hi".into())));
    assert_eq!(parse(json!(["hi"])), Ok(Prompt::Text("hi".into())));
    assert_eq!(parse(json!([1, 2])), Ok(Prompt::Tokens(vec![1, 2])));
    assert_eq!(parse(json!([[1, 2]])), Ok(Prompt::Tokens(vec![1, 2])));
    assert!(parse(json!([1, "a"])).is_err());
    assert!(parse(json!(["a", 1])).is_err());
    assert!(parse(json!([1.5])).is_err());
}

#[test]
fn api_key_comparison() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"ab"));
    assert!(!constant_time_eq(b"", b"a"));
}

#[test]
fn config_debug_hides_the_key() {
    let c = ApiConfig {
        api_key: Some("sekret".into()),
        ..ApiConfig::default()
    };
    assert!(!format!("{c:?}").contains("sekret"));
}

#[tokio::test]
async fn a_client_that_stalls_is_cut_off_at_the_client_timeout() {
    let timeout = Duration::from_millis(300);
    let s = start(Options {
        config: ApiConfig {
            client_timeout: timeout,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    // The connection ends (the server closes it) within a bound of the timeout.
    async fn closed(mut c: TcpStream) -> Vec<u8> {
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut raw))
            .await
            .expect("the server closes a stalled connection")
            .expect("read");
        raw
    }
    // A body that never completes: 408 with an OpenAI-shaped error.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"model\"",
    )
    .await
    .unwrap();
    let t = std::time::Instant::now();
    let r = parse_reply(&closed(c).await);
    assert!(t.elapsed() >= timeout, "{:?}", t.elapsed());
    assert_eq!(r.status, 408);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not arrive")),
        "{v}"
    );
    // Headers that never end, and a connection that never sends anything.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    closed(c).await;
    closed(TcpStream::connect(s.addr).await.unwrap()).await;
    // A kept-alive connection that sends no next request.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let raw = closed(c).await;
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // None of this kept the server from answering.
    assert_eq!(call(s.addr, "GET", "/health", &[], b"").await.status, 200);
}

#[tokio::test]
async fn penalties_and_logit_bias_reach_the_scheduler() {
    let mut server = start(Options::default()).await;
    let body = json!({"model":"grok-1","messages":[{"role":"user","content":"hi"}],
                      "presence_penalty":0.5,"frequency_penalty":-1.25,
                      "logit_bias":{"17":-100,"4":2.5}});
    let s = send_json(server.addr, "/v1/chat/completions", &body).await;
    let sub = server.submission().await;
    let a = &sub.request.adjust;
    assert_eq!((a.presence_penalty, a.frequency_penalty), (0.5, -1.25));
    let mut bias = a.bias.clone();
    bias.sort_by_key(|b| b.0);
    assert_eq!(bias, vec![(4, 2.5), (17, -100.0)]);
    assert!(
        a.counts.is_empty(),
        "the scheduler counts the generated tokens"
    );
    sub.events
        .send(done(FinishReason::Length, 1, 0))
        .expect("send");
    assert_eq!(read_reply(s).await.status, 200);
}
