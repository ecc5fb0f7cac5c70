//! The OpenAI Batch file format: one request per input line
//! (`{"custom_id", "method", "url", "body"}`) and one result per output line
//! (`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`).

use serde_json::{json, Value};

/// Endpoints a batch line may name.
pub const URLS: [&str; 2] = ["/v1/completions", "/v1/chat/completions"];

/// A line that can be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRequest {
    pub custom_id: String,
    pub url: &'static str,
    pub body: Value,
}

/// A line that cannot: why, and its `custom_id` when it had a readable one.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub custom_id: Option<String>,
    pub message: String,
}

/// Reads input line `line` (numbered from 1, for messages).
pub fn parse_line(text: &str, line: usize) -> Result<BatchRequest, LineError> {
    let err = |custom_id: Option<String>, message: String| LineError {
        custom_id,
        message: format!("line {line}: {message}"),
    };
    let v: Value =
        serde_json::from_str(text).map_err(|e| err(None, format!("not a JSON object: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(err(None, "not a JSON object".into()));
    };
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(err(None, "custom_id is empty".into())),
        Some(_) => return Err(err(None, "custom_id must be a string".into())),
        None => return Err(err(None, "custom_id is missing".into())),
    };
    let id = Some(custom_id.clone());
    if let Some(k) = obj
        .keys()
        .find(|k| !["custom_id", "method", "url", "body"].contains(&k.as_str()))
    {
        return Err(err(id, format!("unknown field '{k}'")));
    }
    match obj.get("method").and_then(Value::as_str) {
        Some("POST") => {}
        Some(m) => return Err(err(id, format!("method '{m}' is not supported (use POST)"))),
        None => return Err(err(id, "method is missing or not a string".into())),
    }
    let url = match obj.get("url").and_then(Value::as_str) {
        Some(u) => match URLS.iter().find(|x| **x == u) {
            Some(x) => *x,
            None => {
                return Err(err(
                    id,
                    format!("url '{u}' is not supported (use {})", URLS.join(" or ")),
                ))
            }
        },
        None => return Err(err(id, "url is missing or not a string".into())),
    };
    let body = match obj.get("body") {
        Some(b @ Value::Object(_)) => b.clone(),
        Some(_) => return Err(err(id, "body must be a JSON object".into())),
        None => return Err(err(id, "body is missing".into())),
    };
    if body.get("stream").is_some_and(|s| s != &Value::Bool(false)) {
        return Err(err(id, "body.stream: a batch request cannot stream".into()));
    }
    Ok(BatchRequest {
        custom_id,
        url,
        body,
    })
}

/// The result line of a request the server answered (any status, as the Batch API does).
pub fn response_line(
    id: &str,
    custom_id: &str,
    status: u16,
    request_id: Option<&str>,
    body: Value,
) -> Value {
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id.unwrap_or(id), "body": body},
        "error": null,
    })
}

/// The result line of a request that got no answer, or of a line that was not a request.
pub fn error_line(id: &str, custom_id: Option<&str>, code: &str, message: &str) -> Value {
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_lines_parse() {
        let r = parse_line(
            r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#,
            1,
        )
        .unwrap();
        assert_eq!(r.custom_id, "a");
        assert_eq!(r.url, "/v1/completions");
        assert_eq!(r.body["prompt"], "x");
        let r = parse_line(
            r#"{"custom_id":"b","method":"POST","url":"/v1/chat/completions","body":{"stream":false}}"#,
            2,
        )
        .unwrap();
        assert_eq!(r.url, "/v1/chat/completions");
    }

    #[test]
    fn bad_lines_say_why_and_keep_their_custom_id() {
        let cases = [
            ("", None, "not a JSON object"),
            ("{\"custom_id\":", None, "not a JSON object"),
            ("[1]", None, "not a JSON object"),
            ("{}", None, "custom_id is missing"),
            (r#"{"custom_id":7}"#, None, "must be a string"),
            (r#"{"custom_id":""}"#, None, "empty"),
            (
                r#"{"custom_id":"c","method":"GET","url":"/v1/completions","body":{}}"#,
                Some("c"),
                "method 'GET'",
            ),
            (
                r#"{"custom_id":"c","url":"/v1/completions","body":{}}"#,
                Some("c"),
                "method is missing",
            ),
            (
                r#"{"custom_id":"c","method":"POST","url":"/v1/embeddings","body":{}}"#,
                Some("c"),
                "url '/v1/embeddings'",
            ),
            (
                r#"{"custom_id":"c","method":"POST","url":"/v1/completions"}"#,
                Some("c"),
                "body is missing",
            ),
            (
                r#"{"custom_id":"c","method":"POST","url":"/v1/completions","body":"x"}"#,
                Some("c"),
                "body must be",
            ),
            (
                r#"{"custom_id":"c","method":"POST","url":"/v1/completions","body":{"stream":true}}"#,
                Some("c"),
                "cannot stream",
            ),
            (
                r#"{"custom_id":"c","method":"POST","url":"/v1/completions","body":{},"x":1}"#,
                Some("c"),
                "unknown field 'x'",
            ),
        ];
        for (line, id, why) in cases {
            let e = parse_line(line, 9).unwrap_err();
            assert_eq!(e.custom_id.as_deref(), id, "{line}");
            assert!(
                e.message.starts_with("line 9: ") && e.message.contains(why),
                "{line}: {}",
                e.message
            );
        }
    }

    #[test]
    fn result_lines_have_the_batch_shape() {
        let r = response_line("batch_req_1", "a", 200, None, json!({"x": 1}));
        assert_eq!(r["response"]["status_code"], 200);
        assert_eq!(r["response"]["request_id"], "batch_req_1");
        assert!(r["error"].is_null());
        let e = error_line("batch_req_2", None, "invalid_request", "why");
        assert!(e["custom_id"].is_null() && e["response"].is_null());
        assert_eq!(e["error"]["code"], "invalid_request");
    }
}
