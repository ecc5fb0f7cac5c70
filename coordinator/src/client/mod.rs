//! A client of any OpenAI-compatible server (ours, vLLM, OpenAI itself): what `grok bench
//! serve` and `grok batch` send their requests through. Every request has a deadline; errors
//! say what went wrong in words a user can act on, and sort into [`ErrorKind`]s for reports.

pub mod sse;

use futures_util::StreamExt;
use serde_json::Value;
use std::time::Duration;

pub use sse::SseParser;

/// Why a request did not produce a normal answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad server URL '{url}': {why}")]
    BadUrl { url: String, why: String },
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{url}: no answer within {secs:.0} s")]
    Timeout { url: String, secs: f64 },
    /// The server answered with a non-success status; `message` is its error message when
    /// the body was OpenAI-shaped, else the body's start.
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
        /// Seconds from a `Retry-After` header.
        retry_after: Option<f64>,
    },
    /// The stream broke off, carried an error event, or was not valid SSE/JSON.
    #[error("{url}: {message}")]
    Stream { url: String, message: String },
    #[error("{url}: the response is not JSON: {message}")]
    BadBody { url: String, message: String },
}

/// The sort of a failure, for counting errors in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Connect,
    Timeout,
    /// HTTP 429: the server refused for load.
    RateLimited,
    /// Another 4xx: the request itself was refused.
    ClientError,
    /// A 5xx.
    ServerError,
    /// A broken or malformed stream or body.
    Stream,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::ClientError => "client_error",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Stream => "stream",
        }
    }
}

impl ClientError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::BadUrl { .. } | ClientError::Connect { .. } => ErrorKind::Connect,
            ClientError::Timeout { .. } => ErrorKind::Timeout,
            ClientError::Status { status: 429, .. } => ErrorKind::RateLimited,
            ClientError::Status { status, .. } if *status < 500 => ErrorKind::ClientError,
            ClientError::Status { .. } => ErrorKind::ServerError,
            ClientError::Stream { .. } | ClientError::BadBody { .. } => ErrorKind::Stream,
        }
    }

    /// Worth retrying later: the server was busy, unavailable or unreachable.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Timeout { .. } => true,
            ClientError::Status { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            _ => false,
        }
    }
}

/// A JSON answer with its status (any status: a 400's body is an answer too).
#[derive(Debug, Clone)]
pub struct JsonAnswer {
    pub status: u16,
    /// `x-request-id` when the server sent one.
    pub request_id: Option<String>,
    pub retry_after: Option<f64>,
    pub body: Value,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Scheme, host and port, without a trailing `/` or `/v1`.
    base: String,
    api_key: Option<String>,
    timeout: Duration,
}

impl Client {
    /// `url` is the server's address, with or without a trailing `/v1`. `timeout` bounds each
    /// request from sending to its last byte.
    pub fn new(url: &str, api_key: Option<String>, timeout: Duration) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad("the scheme must be http or https"));
        }
        if parsed.host_str().is_none() {
            return Err(bad("no host"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("give the server's address without a query or fragment"));
        }
        let trimmed = url.trim_end_matches('/');
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10).min(timeout))
            .timeout(timeout)
            .build()
            .map_err(|e| bad(&format!("cannot build an HTTP client: {e}")))?;
        Ok(Client {
            http,
            base,
            api_key,
            timeout,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a GET (no body) or a POST of `body`, with the key.
    async fn send(
        &self,
        path: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut r = match body {
            Some(b) => self.http.post(self.url(path)).json(b),
            None => self.http.get(self.url(path)),
        };
        if let Some(k) = &self.api_key {
            r = r.bearer_auth(k);
        }
        r.send().await.map_err(|e| self.send_error(path, e))
    }

    fn send_error(&self, path: &str, e: reqwest::Error) -> ClientError {
        let url = self.url(path);
        if e.is_timeout() {
            ClientError::Timeout {
                url,
                secs: self.timeout.as_secs_f64(),
            }
        } else if e.is_connect() || e.is_request() {
            ClientError::Connect {
                url,
                message: error_chain(&e),
            }
        } else {
            ClientError::Stream {
                url,
                message: error_chain(&e),
            }
        }
    }

    /// The ids `GET /v1/models` lists.
    pub async fn models(&self) -> Result<Vec<String>, ClientError> {
        let path = "/v1/models";
        let r = self.send(path, None).await?;
        let a = self.answer(path, r).await?;
        if a.status != 200 {
            return Err(status_error(self.url(path), &a));
        }
        let ids = a.body["data"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|m| m["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        Ok(ids)
    }

    /// POSTs `body` and returns the JSON answer whatever its status.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<JsonAnswer, ClientError> {
        let r = self.send(path, Some(body)).await?;
        self.answer(path, r).await
    }

    async fn answer(&self, path: &str, r: reqwest::Response) -> Result<JsonAnswer, ClientError> {
        let status = r.status().as_u16();
        let request_id = header(&r, "x-request-id");
        let retry_after = retry_after(&r);
        let bytes = r.bytes().await.map_err(|e| self.send_error(path, e))?;
        let body = serde_json::from_slice(&bytes).map_err(|e| ClientError::BadBody {
            url: self.url(path),
            message: format!("{e} (body starts {:?})", snippet(&bytes)),
        })?;
        Ok(JsonAnswer {
            status,
            request_id,
            retry_after,
            body,
        })
    }

    /// POSTs a streaming request and hands each SSE `data` payload to `on_data` as it
    /// arrives (`[DONE]` included). A non-200 answer is an error carrying the server's message.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &Value,
        mut on_data: impl FnMut(&str) -> Result<(), String>,
    ) -> Result<(), ClientError> {
        let r = self.send(path, Some(body)).await?;
        if r.status().as_u16() != 200 {
            let a = self.answer(path, r).await;
            return Err(match a {
                Ok(a) => status_error(self.url(path), &a),
                Err(e) => e,
            });
        }
        let stream_err = |message: String| ClientError::Stream {
            url: self.url(path),
            message,
        };
        let mut parser = SseParser::default();
        let mut chunks = r.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| self.send_error(path, e))?;
            for data in parser.push(&chunk).map_err(stream_err)? {
                on_data(&data).map_err(stream_err)?;
            }
        }
        parser.finish().map_err(stream_err)
    }
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

fn retry_after(r: &reqwest::Response) -> Option<f64> {
    header(r, "retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
}

fn status_error(url: String, a: &JsonAnswer) -> ClientError {
    let message = a.body["error"]["message"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| snippet(a.body.to_string().as_bytes()));
    ClientError::Status {
        url,
        status: a.status,
        message,
        retry_after: a.retry_after,
    }
}

/// The start of a body, for error messages.
fn snippet(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]);
    s.into_owned()
}

/// An error's causes ("tcp connect error: Connection refused"), or the error itself when it
/// has none (reqwest's own message just repeats the URL).
fn error_chain(e: &dyn std::error::Error) -> String {
    let Some(first) = e.source() else {
        return e.to_string();
    };
    let mut s = first.to_string();
    let mut cause = first.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_normalised() {
        let t = Duration::from_secs(5);
        for (given, base) in [
            ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
            ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
            ("http://h:1/v1", "http://h:1"),
            ("https://api.example.com/v1/", "https://api.example.com"),
            ("http://h/proxy/v1", "http://h/proxy"),
        ] {
            let c = Client::new(given, None, t).unwrap();
            assert_eq!(c.url("/v1/models"), format!("{base}/v1/models"), "{given}");
        }
        for bad in [
            "",
            "localhost:8000",
            "ftp://h/",
            "http://h/?a=1",
            "not a url",
        ] {
            let e = Client::new(bad, None, t).err().expect(bad);
            assert!(matches!(e, ClientError::BadUrl { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_sort_into_kinds() {
        let status = |status| ClientError::Status {
            url: "u".into(),
            status,
            message: "m".into(),
            retry_after: None,
        };
        assert_eq!(status(429).kind(), ErrorKind::RateLimited);
        assert_eq!(status(400).kind(), ErrorKind::ClientError);
        assert_eq!(status(503).kind(), ErrorKind::ServerError);
        assert!(status(429).is_transient() && status(503).is_transient());
        assert!(!status(400).is_transient() && !status(500).is_transient());
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        // Bind then drop: the port is (almost certainly) closed afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Client::new(
            &format!("http://127.0.0.1:{port}"),
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        let e = c.models().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Connect, "{e}");
        assert!(e.is_transient());
    }
}
