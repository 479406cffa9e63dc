//! Grant and session events of every instance in one table, `pglease.events`, for whoever
//! watches the fleet as a whole (notifications, a console).
//!
//! A copy, not the record: every event is also in the instance's audit chain (fail-closed
//! there). Here events queue in memory (up to [`QUEUE`]) while the control plane is away and
//! are written in batches when it is back; past that, the newest are dropped and counted
//! (`pglease_control_plane_events_dropped_total`).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use crate::events::{EventRecord, EventSink};

/// Events held while the control plane cannot take them.
pub const QUEUE: usize = 10_000;
const BATCH: usize = 500;

/// The sink side: cheap and never blocks the caller.
pub struct ControlPlaneEvents {
    tx: mpsc::Sender<String>,
}

/// The writer side, started once the instance knows its id.
pub struct EventWriter {
    rx: mpsc::Receiver<String>,
}

pub fn channel() -> (ControlPlaneEvents, EventWriter) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (ControlPlaneEvents { tx }, EventWriter { rx })
}

impl EventSink for ControlPlaneEvents {
    fn emit(&self, record: &EventRecord) {
        let Ok(json) = serde_json::to_string(record) else { return };
        if self.tx.try_send(json).is_err() {
            metrics::counter!("pglease_control_plane_events_dropped_total").increment(1);
        }
    }
}

impl EventWriter {
    /// Writes queued events as `instance`'s until `shutdown` (then what is queued, briefly).
    pub async fn run(mut self, conninfo: String, instance: String, shutdown: CancellationToken) {
        let conn = Conn::new(&conninfo);
        let mut batch: Vec<String> = Vec::new();
        loop {
            if batch.is_empty() {
                tokio::select! {
                    got = self.rx.recv() => match got {
                        Some(e) => batch.push(e),
                        None => return,
                    },
                    _ = shutdown.cancelled() => {
                        while let Ok(e) = self.rx.try_recv() {
                            batch.push(e);
                        }
                        if !batch.is_empty() {
                            let _ = tokio::time::timeout(Duration::from_secs(2), write(&conn, &instance, &batch)).await;
                        }
                        return;
                    }
                }
            }
            while batch.len() < BATCH
                && let Ok(e) = self.rx.try_recv()
            {
                batch.push(e);
            }
            match write(&conn, &instance, &batch).await {
                Ok(()) => batch.clear(),
                Err(e) => {
                    tracing::warn!(error = %e, queued = batch.len() + self.rx.len(), "control plane: cannot write events; retrying");
                    metrics::counter!("pglease_control_plane_failures_total", "what" => "events").increment(1);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

async fn write(conn: &Conn, instance: &str, batch: &[String]) -> Result<(), String> {
    let array = format!("[{}]", batch.join(","));
    conn.with(async |c| {
        c.execute(
            "INSERT INTO pglease.events (instance, at, kind, body)
             SELECT $1, (e->>'at')::timestamptz, e->>'event', e FROM jsonb_array_elements($2::text::jsonb) e",
            &[&instance, &array],
        )
        .await
    })
    .await
    .map(|_| ())
}
