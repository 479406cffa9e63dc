//! Lifecycle events: every grant and session state change, and every failed login, as a
//! structured record. Sinks decide where they go (tracing, a JSON Lines file; the audit log
//! will be one more).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    GrantRequested { grant: String, user: String, scope: String, by: String, reason: String, duration_secs: u64, break_glass: bool },
    GrantApproved { grant: String, user: String, scope: String, by: String },
    /// The grant's user took a (new) secret for it.
    GrantSecretTaken { grant: String, user: String },
    GrantDenied { grant: String, user: String, scope: String, by: String, reason: String },
    GrantActivated { grant: String, user: String, scope: String, #[serde(with = "crate::time::serde_rfc3339")] expires_at: SystemTime, break_glass: bool },
    /// The grant ends soon (`grants::EXPIRY_NOTICE` before, once).
    GrantExpiring { grant: String, user: String, scope: String, #[serde(with = "crate::time::serde_rfc3339")] expires_at: SystemTime },
    GrantExpired { grant: String, user: String, scope: String },
    GrantRevoked { grant: String, user: String, scope: String, by: String, reason: String },
    SessionOpened {
        session: u64,
        grant: Option<String>,
        login: String,
        user: String,
        scope: Option<String>,
        client: String,
        database: String,
        /// Settings pinned upstream for the session.
        settings: std::collections::BTreeMap<String, String>,
    },
    SessionClosed { session: u64, grant: Option<String>, reason: String, statements: u64 },
    SessionKilled { session: u64, by: String },
    LoginFailed { login: String, client: String },
    /// A cancel request; `forwarded` when it matched a live session.
    CancelRequest { pid: i32, client: String, forwarded: bool },
    /// A grant read as much as its scope's read budget allows: the statement crossing it was cut
    /// off, and further statements that return rows are refused.
    ReadBudgetSpent { grant: String, user: String, scope: String, rows_read: u64, bytes_read: u64, max_rows_read: Option<u64>, max_bytes_read: Option<u64> },
    /// The audit log cannot be written (statements are refused meanwhile), and since when.
    AuditFailing { error: String },
    /// The audit log is written again.
    AuditRecovered,
    /// A configuration reload took effect (`pglease serve` on SIGHUP).
    ConfigReloaded { scopes_changed: Vec<String>, sessions_ended: u64, restart_needed: Vec<String> },
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    #[serde(with = "crate::time::serde_rfc3339")]
    pub at: SystemTime,
    #[serde(flatten)]
    pub event: Event,
}

pub trait EventSink: Send + Sync {
    fn emit(&self, record: &EventRecord);
}

/// Fans events out to every sink.
#[derive(Clone, Default)]
pub struct Events {
    sinks: Vec<Arc<dyn EventSink>>,
}

impl Events {
    pub fn new() -> Self {
        Self { sinks: vec![Arc::new(TracingSink)] }
    }

    pub fn with_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sinks.push(sink);
        self
    }

    pub fn emit(&self, event: Event) {
        if matches!(event, Event::GrantActivated { break_glass: true, .. }) {
            metrics::counter!("pglease_break_glass_total").increment(1);
            tracing::warn!(?event, "BREAK-GLASS grant activated without approval");
        }
        let record = EventRecord { at: SystemTime::now(), event };
        for sink in &self.sinks {
            sink.emit(&record);
        }
    }
}

/// Events as structured log lines (`target = "pglease::event"`).
pub struct TracingSink;

impl EventSink for TracingSink {
    fn emit(&self, record: &EventRecord) {
        if let Ok(json) = serde_json::to_string(record) {
            tracing::info!(target: "pglease::event", "{json}");
        }
    }
}

/// Events appended to a JSON Lines file.
pub struct JsonlSink {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl JsonlSink {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { path: path.to_owned(), file: Mutex::new(file) })
    }
}

impl EventSink for JsonlSink {
    fn emit(&self, record: &EventRecord) {
        let Ok(mut line) = serde_json::to_vec(record) else { return };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(&line).and_then(|_| file.flush()) {
            tracing::error!(error = %e, path = %self.path.display(), "cannot write event");
        }
    }
}

/// Keeps events in memory, for tests.
#[derive(Default)]
pub struct MemorySink {
    pub records: Mutex<Vec<EventRecord>>,
}

impl EventSink for MemorySink {
    fn emit(&self, record: &EventRecord) {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).push(record.clone());
    }
}

impl MemorySink {
    pub fn events(&self) -> Vec<Event> {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|r| r.event.clone()).collect()
    }
}
