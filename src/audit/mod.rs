//! The audit log: every statement (allowed, rewritten or refused) and every grant and session
//! event, hash-chained, durable before the statement runs, and the auditors' tools over it.

pub mod hooks;
pub mod log;
pub mod pgsink;
pub mod reader;
pub mod record;
pub mod segment;
pub mod replay;
pub mod table;

use std::sync::Arc;

pub use log::{AuditError, AuditLog, AuditOptions, Durability, ParamLogging, WriterKind};

use crate::events::{EventRecord, EventSink};

/// Lifecycle events into the audit log.
pub struct AuditEvents(pub AuditLog);

impl EventSink for AuditEvents {
    fn emit(&self, record: &EventRecord) {
        if let Ok(serde_json::Value::Object(mut event)) = serde_json::to_value(record) {
            // The record's own `at` (when it is written) is kept; the event's time goes along.
            if let Some(at) = event.remove("at") {
                event.insert("event_at".into(), at);
            }
            self.0.append_nowait(record::Body::Event { event: serde_json::Value::Object(event) });
        }
    }
}

/// Wraps a session's hooks so that everything is recorded.
pub fn audited(inner: Arc<dyn crate::session::SessionHooks>, log: &AuditLog, ctx: &crate::session::SessionContext) -> Arc<dyn crate::session::SessionHooks> {
    Arc::new(hooks::AuditHooks::new(inner, log.clone(), ctx))
}
