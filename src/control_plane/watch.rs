//! Keeps an instance's grants current with the shared store: a change on any instance is
//! announced with `NOTIFY` (in the same statement as the write, see `store`), and every
//! instance also reads the whole store again periodically, so a missed notification, a dropped
//! connection or a restart never leaves a revoked or expired grant usable here for long.
//!
//! Fail closed: each successful read moves the instance's "fresh until" mark `stale_after`
//! ahead. While the control plane cannot be read, the mark passes and new logins are refused;
//! sessions already running keep their own deadline (expiry does not need the control plane).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::store::CHANNEL;
use crate::grants::GrantService;

/// How the watcher paces itself.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// A full read of the store at least this often.
    pub reconcile_every: Duration,
    /// Logins are refused once the last successful read is this old.
    pub stale_after: Duration,
}

/// Runs until `shutdown`: LISTEN for changes, read the store on each, and on a timer.
pub async fn run(conninfo: String, grants: Arc<GrantService>, options: WatchOptions, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match watch_once(&conninfo, &grants, options, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "control plane: lost the change feed; reconnecting");
                metrics::counter!("pglease_control_plane_reconnects_total").increment(1);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection's worth of watching; `Ok` only on shutdown.
async fn watch_once(conninfo: &str, grants: &GrantService, options: WatchOptions, shutdown: &CancellationToken) -> Result<(), String> {
    let info = crate::conninfo::parse(conninfo).map_err(|e| e.to_string())?;
    let (client, mut notifications) = info.connect_listening().await?;
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(|e| crate::conninfo::describe_error(&e))?;
    // Anything that changed before LISTEN took effect is in this read.
    reconcile(grants, options).await?;
    let mut tick = tokio::time::interval(options.reconcile_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            note = notifications.recv() => {
                if note.is_none() {
                    return Err("the control plane closed the connection".into());
                }
                // Several changes at once are one read.
                while notifications.try_recv().is_ok() {}
                reconcile(grants, options).await?;
            }
            _ = tick.tick() => {
                if client.is_closed() {
                    return Err("the control plane closed the connection".into());
                }
                reconcile(grants, options).await?;
            }
        }
    }
}

async fn reconcile(grants: &GrantService, options: WatchOptions) -> Result<(), String> {
    let read_at = Instant::now();
    let changed = grants.refresh().await.map_err(|e| e.to_string())?;
    grants.set_fresh_until(read_at + options.stale_after);
    if changed > 0 {
        tracing::debug!(changed, "control plane: grants changed elsewhere");
    }
    Ok(())
}
