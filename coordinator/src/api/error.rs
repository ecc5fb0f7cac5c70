//! OpenAI-shaped errors: `{"error":{"message","type","param","code"}}` with the HTTP status
//! that goes with them.

use crate::request::SubmitError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Which request fields carry the prompt and the token budget (for `param` in errors).
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    pub prompt: &'static str,
    pub max_tokens: &'static str,
}

/// One error answer. `param` names the request field at fault (a path such as
/// `messages[0].content` for nested ones), `code` is a machine-readable reason.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error` about `param` (or about the whole body when `None`).
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_owned),
            code: None,
        }
    }

    /// 400 about one field.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(Some(param), message)
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn server(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::invalid(None, message)
            .with_status(StatusCode::UNAUTHORIZED)
            .with_code("invalid_api_key")
    }

    pub fn not_ready() -> Self {
        Self::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is not ready yet (the cluster is loading or recovering); retry later",
        )
        .with_code("not_ready")
    }

    /// The scheduler refused the request. `fields` names the request's fields that carried
    /// the prompt (`prompt` or `messages`) and the token budget (`max_tokens`, ...).
    pub fn from_submit(e: &SubmitError, fields: Fields) -> Self {
        let Fields {
            prompt: prompt_param,
            max_tokens: max_tokens_param,
        } = fields;
        let message = e.to_string();
        match e {
            SubmitError::QueueFull { .. } => {
                Self::server(StatusCode::TOO_MANY_REQUESTS, message).with_code("queue_full")
            }
            SubmitError::TooLong {
                prompt, context, ..
            } => {
                // Blame the prompt when it alone does not fit, else the tokens asked for.
                let param = if prompt >= context {
                    prompt_param
                } else {
                    max_tokens_param
                };
                Self::field(param, message).with_code("context_length_exceeded")
            }
            SubmitError::EmptyPrompt => Self::field(prompt_param, message),
            SubmitError::BadToken { .. } => Self::field(prompt_param, message),
            SubmitError::BadAdjust(e) => Self::field(&e.param, message),
            SubmitError::ShuttingDown => {
                Self::server(StatusCode::SERVICE_UNAVAILABLE, message).with_code("shutting_down")
            }
        }
    }

    /// The JSON text clients parse (also sent as an SSE event when a stream fails).
    pub fn json(&self) -> String {
        to_json(&ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// Serializes a response shape. Our shapes have string keys and plain values, for which
/// serde_json cannot fail; should it ever, the client still gets valid JSON.
pub fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| {
        tracing::error!("serializing a response failed: {e}");
        r#"{"error":{"message":"internal error: could not serialize the response","type":"server_error","param":null,"code":null}}"#.to_owned()
    })
}

/// A `200 OK` (or other status) JSON response from already-serialized text.
pub fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, self.json());
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
