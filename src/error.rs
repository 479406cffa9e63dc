//! Errors that may reach a client, and how they are put on the wire.
//!
//! Every module keeps its own `thiserror` enum for what goes wrong inside it. When one of those
//! errors has to be shown to a Postgres client it is turned into a [`ClientError`]: a severity, a
//! SQLSTATE and a message that is safe to show. Internal detail (addresses, upstream errors, file
//! paths) stays in the tracing logs; it never reaches the client unless a module decides so.

use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::response::{ErrorResponse, NoticeResponse};

/// SQLSTATE codes pglease itself emits. Names follow `src/backend/utils/errcodes.txt` in Postgres.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    pub const INTERNAL_ERROR: &str = "XX000";
}

/// How bad an error is, in Postgres terms: `Error` ends the statement, `Fatal` the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error as the client will see it. Construct it only with text that is safe to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ClientError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self { severity: Severity::Fatal, code, message: message.into(), detail: None, hint: None }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self { severity: Severity::Error, code, message: message.into(), detail: None, hint: None }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The `ErrorResponse` fields, as Postgres sends them (`S`, `V`, `C`, `M`, then optional ones).
    pub fn to_message(&self) -> ErrorResponse {
        let mut fields = vec![
            (b'S', self.severity.as_str().to_owned()),
            (b'V', self.severity.as_str().to_owned()),
            (b'C', self.code.to_owned()),
            (b'M', self.message.clone()),
        ];
        if let Some(detail) = &self.detail {
            fields.push((b'D', detail.clone()));
        }
        if let Some(hint) = &self.hint {
            fields.push((b'H', hint.clone()));
        }
        ErrorResponse::new(fields)
    }

    /// Appends the encoded `ErrorResponse` to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        // Encoding only fails for messages over pgwire's size limit; ours are a few hundred bytes.
        self.to_message().encode(buf).expect("error response fits its size limit");
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity.as_str(), self.code, self.message)
    }
}

impl std::error::Error for ClientError {}

/// Implemented by module errors that can be shown to a client: each decides what text is safe.
pub trait UserFacingError: std::error::Error {
    fn to_client_error(&self) -> ClientError;
}

/// Builds a `NoticeResponse` (severity `WARNING` or `NOTICE`) with pglease's text.
pub fn notice(severity: &str, code: &str, message: &str) -> NoticeResponse {
    NoticeResponse::new(vec![
        (b'S', severity.to_owned()),
        (b'V', severity.to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
    ])
}
