//! `grok batch`: runs an OpenAI Batch input file against a server with bounded concurrency,
//! writing one result line per input line. Resumable: results are appended and synced one
//! by one ([`journal`]), and a rerun skips every line whose result is already there.
//!
//! What becomes a result: an answer of any status (a 400 is recorded with its body, as the
//! Batch API does) and an input line that is not a valid request (an `error` line). What does
//! not: a request the server could not take (busy, unavailable, unreachable) after its
//! retries. Such a request stops the run, which reports it; the next run sends it again.

pub mod format;
pub mod journal;

use crate::client::{Client, ClientError};
use format::{BatchRequest, LineError};
use futures_util::StreamExt;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: line {line} is not a batch result line; give a new --output file (or the one an earlier run of this batch wrote)", path.display())]
    NotAResultsFile { path: PathBuf, line: usize },
}

#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Retries of a request the server could not take (429, 502-504, no connection).
    pub max_retries: u32,
    /// First retry delay when the server gives no `Retry-After`; doubled each time.
    pub backoff: Duration,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Request lines in the input (blank lines are not counted).
    pub lines: usize,
    /// Lines whose result an earlier run wrote.
    pub skipped: usize,
    /// Results written with a 2xx answer.
    pub succeeded: usize,
    /// Results written with another answer, or for an invalid line.
    pub errored: usize,
    /// Requests left for a rerun: the server could not take them (see `stop_reason`).
    pub unsent: usize,
    pub stop_reason: Option<String>,
}

/// Progress after each result: (results written this run, results to write this run).
pub type Progress = dyn Fn(usize, usize) + Send + Sync;

enum Item {
    Send(BatchRequest),
    Invalid(LineError),
}

/// One input line's place: its number and the `id` its result carries.
struct Line {
    no: usize,
    id: String,
    item: Item,
}

/// Reads the input: every non-blank line becomes a request or an invalid line. A repeated
/// `custom_id` is invalid (results are keyed by it), as is a line that is not UTF-8.
fn read_input(path: &Path) -> Result<Vec<Line>, BatchError> {
    let bytes = std::fs::read(path).map_err(|source| BatchError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let no = i + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let mut item = match std::str::from_utf8(raw) {
            Err(_) => Item::Invalid(LineError {
                custom_id: None,
                message: format!("line {no}: not UTF-8 text"),
            }),
            Ok(text) => match format::parse_line(text, no) {
                Ok(r) => Item::Send(r),
                Err(e) => Item::Invalid(e),
            },
        };
        let custom_id = match &item {
            Item::Send(r) => Some(&r.custom_id),
            Item::Invalid(e) => e.custom_id.as_ref(),
        }
        .cloned();
        if let Some(c) = custom_id.filter(|c| !seen.insert(c.clone())) {
            item = Item::Invalid(LineError {
                custom_id: None,
                message: format!("line {no}: custom_id '{c}' repeats an earlier line's"),
            });
        }
        out.push(Line {
            no,
            id: format!("batch_req_{no}"),
            item,
        });
    }
    Ok(out)
}

impl Line {
    /// The key its result is found by (see [`journal::result_key`]).
    fn key(&self) -> &str {
        match &self.item {
            Item::Send(r) => &r.custom_id,
            Item::Invalid(LineError {
                custom_id: Some(c), ..
            }) => c,
            Item::Invalid(_) => &self.id,
        }
    }
}

/// Runs `input` into `output` (see the module docs).
pub async fn run(
    client: &Client,
    input: &Path,
    output: &Path,
    cfg: &BatchConfig,
    progress: &Progress,
) -> Result<BatchReport, BatchError> {
    let lines = read_input(input)?;
    let (mut journal, done) = journal::Journal::open(output)?;
    let mut report = BatchReport {
        lines: lines.len(),
        ..Default::default()
    };
    let todo: Vec<Line> = lines
        .into_iter()
        .filter(|l| !done.contains(l.key()))
        .collect();
    report.skipped = report.lines - todo.len();
    let total = todo.len();
    let mut written = 0;
    let mut requests = Vec::new();
    for line in todo {
        match line.item {
            Item::Invalid(e) => {
                let v = format::error_line(
                    &line.id,
                    e.custom_id.as_deref(),
                    "invalid_request",
                    &e.message,
                );
                journal.append(&v)?;
                report.errored += 1;
                written += 1;
                progress(written, total);
            }
            Item::Send(r) => requests.push((line.id, line.no, r)),
        }
    }
    // Set when a request could not be sent even with retries: nothing more is started.
    let stop = Arc::new(AtomicBool::new(false));
    let mut results = futures_util::stream::iter(requests)
        .map(|(id, _no, r)| {
            let stop = stop.clone();
            async move {
                if stop.load(Ordering::Relaxed) {
                    return (id, r, None);
                }
                let answer = send_with_retries(client, &r, cfg).await;
                if answer.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                (id, r, Some(answer))
            }
        })
        .buffer_unordered(cfg.concurrency.max(1));
    while let Some((id, r, answer)) = results.next().await {
        let v = match answer {
            None => {
                report.unsent += 1;
                continue;
            }
            Some(Err(e)) => {
                report.unsent += 1;
                report.stop_reason.get_or_insert_with(|| e.to_string());
                continue;
            }
            Some(Ok(a)) => {
                if (200..300).contains(&a.status) {
                    report.succeeded += 1;
                } else {
                    report.errored += 1;
                }
                format::response_line(&id, &r.custom_id, a.status, a.request_id.as_deref(), a.body)
            }
        };
        journal.append(&v)?;
        written += 1;
        progress(written, total);
    }
    Ok(report)
}

/// Sends one request; retries what the server could not take, waiting as it asks
/// (`Retry-After`) or with doubling backoff. `Err` only for a request never answered.
async fn send_with_retries(
    client: &Client,
    r: &BatchRequest,
    cfg: &BatchConfig,
) -> Result<crate::client::JsonAnswer, ClientError> {
    let mut delay = cfg.backoff;
    let mut attempt = 0;
    loop {
        let result = client.post_json(r.url, &r.body).await;
        let retry_after = match &result {
            Ok(a) if matches!(a.status, 429 | 502 | 503 | 504) => Some(a.retry_after),
            Err(e) if e.is_transient() => Some(None),
            _ => None,
        };
        let Some(retry_after) = retry_after else {
            return result;
        };
        if attempt >= cfg.max_retries {
            return match result {
                Ok(a) => Err(ClientError::Status {
                    url: client.url(r.url),
                    status: a.status,
                    message: a.body["error"]["message"]
                        .as_str()
                        .unwrap_or("the server could not take the request")
                        .to_string(),
                    retry_after: a.retry_after,
                }),
                Err(e) => Err(e),
            };
        }
        attempt += 1;
        let wait = retry_after
            .map(|s| Duration::from_secs_f64(s.min(60.0)))
            .unwrap_or(delay);
        tokio::time::sleep(wait).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_lines_become_requests_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let good = |id: &str| {
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/completions","body":{{"prompt":"x"}}}}"#
            )
        };
        let mut text = format!("{}\n\n   \n{}\n", good("a"), good("b")).into_bytes();
        text.extend_from_slice(b"{oops\n\xff\xfe\n");
        text.extend_from_slice(good("a").as_bytes());
        std::fs::write(&path, &text).unwrap();
        let lines = read_input(&path).unwrap();
        let keys: Vec<(usize, &str)> = lines.iter().map(|l| (l.no, l.key())).collect();
        assert_eq!(
            keys,
            [
                (1, "a"),
                (4, "b"),
                (5, "batch_req_5"),
                (6, "batch_req_6"),
                (7, "batch_req_7")
            ]
        );
        assert!(matches!(&lines[4].item, Item::Invalid(e) if e.message.contains("repeats")));
        assert!(matches!(&lines[3].item, Item::Invalid(e) if e.message.contains("UTF-8")));
    }
}
