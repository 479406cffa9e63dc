//! Keeps an instance's grants current with the shared store: a change on any instance is
//! announced with `NOTIFY` (in the same statement as the write, see `store`), and every
//! instance also reads the whole store again periodically, so a missed notification, a dropped
//! connection or a restart never leaves a revoked or expired grant usable here for long.
//!
//! Fail closed: each successful read moves the instance's "fresh until" mark `stale_after`
//! ahead, and losing the change feed sets it to now: an instance that would not hear of a
//! revoke refuses new logins until it hears again. Sessions already running keep their own
//! deadline (expiry does not need the control plane).
//!
//! The same connection carries the fleet's requests to end a session or cancel a statement
//! here ([`super::fleet`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::fleet::{Fleet, REQUESTS_CHANNEL};
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
pub async fn run(conninfo: String, grants: Arc<GrantService>, fleet: Option<Arc<Fleet>>, options: WatchOptions, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut heard = false;
        match watch_once(&conninfo, &grants, fleet.as_deref(), options, &shutdown, &mut heard).await {
            Ok(()) => return,
            Err(e) => {
                // Without the feed a revoke elsewhere would go unheard: no new logins until
                // the feed is back and the store read again.
                grants.set_fresh_until(Instant::now());
                metrics::gauge!("pglease_control_plane_up").set(0.0);
                tracing::warn!(error = %e, "control plane: lost the change feed; new logins are refused until it is back");
                metrics::counter!("pglease_control_plane_reconnects_total").increment(1);
            }
        }
        if heard {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One connection's worth of watching; `Ok` only on shutdown.
async fn watch_once(conninfo: &str, grants: &GrantService, fleet: Option<&Fleet>, options: WatchOptions, shutdown: &CancellationToken, heard: &mut bool) -> Result<(), String> {
    let info = crate::conninfo::parse(conninfo).map_err(|e| e.to_string())?;
    let (client, mut notifications) = tokio::time::timeout(super::conn::QUERY_TIMEOUT, info.connect_listening()).await.map_err(|_| "no connection within 10s".to_owned())??;
    let listen = format!("SET application_name = 'pglease watch'; LISTEN {CHANNEL}; LISTEN {REQUESTS_CHANNEL}");
    client.batch_execute(&listen).await.map_err(|e| crate::conninfo::describe_error(&e))?;
    // Anything that changed before LISTEN took effect is in this read.
    reconcile(grants, options).await?;
    *heard = true;
    // The first read was just made: the next one is a period away.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + options.reconcile_every, options.reconcile_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            note = notifications.recv() => {
                let Some(first) = note else {
                    return Err("the control plane closed the connection".into());
                };
                // Several grant changes at once are one read. Bounded: a flood of notifications
                // never keeps this loop from reading the grants.
                let mut grants_changed = false;
                let mut next = Some(first);
                let mut taken = 0;
                while let Some(n) = next {
                    match (n.channel(), fleet) {
                        (CHANNEL, _) => grants_changed = true,
                        (REQUESTS_CHANNEL, Some(fleet)) => fleet.on_notification(n.payload()),
                        _ => {}
                    }
                    taken += 1;
                    next = if taken < 1000 { notifications.try_recv().ok() } else { None };
                }
                if grants_changed {
                    reconcile(grants, options).await?;
                }
            }
            _ = tick.tick() => {
                // A connection a firewall dropped without a word still looks open: ask it.
                match tokio::time::timeout(super::conn::QUERY_TIMEOUT, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(format!("the change feed's connection failed: {}", crate::conninfo::describe_error(&e))),
                    Err(_) => return Err("the change feed's connection stopped answering".into()),
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
    metrics::gauge!("pglease_control_plane_up").set(1.0);
    if changed > 0 {
        tracing::debug!(changed, "control plane: grants changed elsewhere");
    }
    Ok(())
}
