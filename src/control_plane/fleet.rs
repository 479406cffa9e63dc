//! The fleet: every instance announces itself in `pglease.instances` (a heartbeat) and keeps
//! its live sessions in `pglease.sessions`, so `session list` on any instance shows them all.
//!
//! Ending a session, or cancelling its statement, may be asked of any instance (a load balancer
//! sends a `CancelRequest` wherever it likes). The instance that has the session is found in
//! `pglease.sessions`, and the request is written to `pglease.requests`, a table only pglease's
//! role can read or write. A `NOTIFY` (payload: the instance's id) only says "look": anyone who
//! may connect to the database can LISTEN and NOTIFY, so a notification carries no request and
//! no secret. Each instance also looks every [`HEARTBEAT`], so a lost notification delays a
//! request by at most that. The instance that acts checks the request itself (a cancel key is
//! compared in constant time there), so a forged or stale key is still dropped silently.
//!
//! An instance takes no logins until its first heartbeat is written, and none while another
//! live process holds its id: two processes with one id would take each other's requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use crate::cancel::CancelRegistry;
use crate::error::{ClientError, sqlstate};
use crate::session::{SessionRegistry, SessionView};

/// "There are requests for you in `pglease.requests`"; the payload is the instance's id.
pub const REQUESTS_CHANNEL: &str = "pglease_requests";

/// How often an instance refreshes its row and its sessions' (and at once after a session
/// starts or ends).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// An instance silent this long is gone: its sessions are no longer shown or routed to, and
/// its id may be taken by a new process (an instance restarted after a crash waits this long).
pub const GONE_AFTER: Duration = Duration::from_secs(10);
/// A request not acted on within this long is dropped (a cancel that late cancels the wrong
/// statement; a kill that late may find a new session under the number).
const REQUEST_TTL: Duration = Duration::from_secs(30);
/// The rows of an instance silent this long are removed.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error("no live session {0}")]
    NotFound(u64),
    #[error("session {id} exists on several instances ({}): name one", instances.join(", "))]
    Ambiguous { id: u64, instances: Vec<String> },
    #[error("control plane: {0}")]
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("control plane: {0}")]
    Unavailable(String),
    #[error("another live pglease uses this instance_id ({0}): every instance needs an id of its own (control_plane.instance_id)")]
    Taken(String),
}

/// This instance's place in the fleet.
pub struct Fleet {
    pub instance: String,
    /// Where clients and operators reach this instance (shown in `pglease.instances`).
    proxy: String,
    admin: String,
    started_at: SystemTime,
    /// Random per process: tells this process's row from another's with the same id.
    process: String,
    /// Set once this process's heartbeat is written, cleared while another live process
    /// holds the id. Until then it takes no logins and acts on no request.
    joined: AtomicBool,
    /// For the heartbeat, on its own so that a slow one never holds up kills and cancels.
    beat: Conn,
    /// For session lists, kills, cancels and requests.
    conn: Conn,
    /// Woken by a notification that there are requests for this instance.
    requests: tokio::sync::Notify,
    events: crate::events::Events,
    sessions: Arc<SessionRegistry>,
    cancels: Arc<CancelRegistry>,
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

impl Fleet {
    pub fn new(
        conninfo: &str,
        instance: String,
        proxy: String,
        admin: String,
        sessions: Arc<SessionRegistry>,
        cancels: Arc<CancelRegistry>,
        events: crate::events::Events,
    ) -> Self {
        let mut nonce = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let process = crate::people::hex(&nonce);
        Self {
            instance,
            proxy,
            admin,
            started_at: SystemTime::now(),
            process,
            joined: AtomicBool::new(false),
            beat: Conn::new(conninfo),
            conn: Conn::new(conninfo),
            requests: tokio::sync::Notify::new(),
            events,
            sessions,
            cancels,
        }
    }

    /// Writes this instance's heartbeat and replaces its published sessions with the live ones.
    pub async fn publish(&self) -> Result<(), PublishError> {
        let live: Vec<serde_json::Value> = self
            .sessions
            .list()
            .iter()
            .map(|h| {
                serde_json::json!({
                    "id": h.id, "person": h.identity.person, "login": h.identity.login, "grant_id": h.identity.grant_id,
                    "scope": h.identity.scope, "database": h.database, "client": h.client_addr.to_string(),
                    "started_at": crate::time::rfc3339(h.started_at), "statements": h.statements(), "backend_pid": h.backend_pid,
                })
            })
            .collect();
        let ids: Vec<i64> = live.iter().map(|s| s["id"].as_i64().unwrap_or_default()).collect();
        let live = serde_json::Value::Array(live).to_string();
        let started = crate::time::rfc3339(self.started_at);
        let version = env!("CARGO_PKG_VERSION");
        let gone = interval(GONE_AFTER);
        let row = self
            .beat
            .with(async |c| {
                // One statement, one round trip. The row is this process's, or free (new, or
                // its holder silent for GONE_AFTER); otherwise nothing is written. The
                // sessions' foreign key is checked at the statement's end, after the row.
                c.query_one(
                    "WITH i AS (
                         INSERT INTO pglease.instances AS i (id, process, proxy, admin, version, started_at, heartbeat_at)
                         VALUES ($1, $8, $2, $3, $4, $5::text::timestamptz, now())
                         ON CONFLICT (id) DO UPDATE SET process = excluded.process, proxy = excluded.proxy, admin = excluded.admin,
                             version = excluded.version, started_at = excluded.started_at, heartbeat_at = now()
                         WHERE i.process = excluded.process OR i.heartbeat_at < now() - $9::text::interval
                         RETURNING id),
                     gone AS (DELETE FROM pglease.sessions WHERE instance = $1 AND id <> ALL($6::bigint[]) AND EXISTS (SELECT FROM i)),
                     live AS (
                         INSERT INTO pglease.sessions AS s (instance, id, person, login, grant_id, scope, database, client, started_at, statements, backend_pid)
                         SELECT $1, r.id, r.person, r.login, r.grant_id, r.scope, r.database, r.client, r.started_at, r.statements, r.backend_pid
                         FROM jsonb_to_recordset($7::text::jsonb) AS r(id bigint, person text, login text, grant_id text, scope text, database text,
                              client text, started_at timestamptz, statements bigint, backend_pid integer)
                         WHERE EXISTS (SELECT FROM i)
                         ON CONFLICT (instance, id) DO UPDATE SET person = excluded.person, login = excluded.login, grant_id = excluded.grant_id,
                             scope = excluded.scope, database = excluded.database, client = excluded.client, started_at = excluded.started_at,
                             statements = excluded.statements, backend_pid = excluded.backend_pid)
                     SELECT EXISTS (SELECT FROM i), (SELECT proxy || ' (started ' || started_at || ')' FROM pglease.instances WHERE id = $1)",
                    &[&self.instance, &self.proxy, &self.admin, &version, &started, &ids, &live, &self.process, &gone],
                )
                .await
            })
            .await
            .map_err(PublishError::Unavailable)?;
        let joined = row.get::<_, bool>(0);
        self.joined.store(joined, Ordering::Relaxed);
        if joined { Ok(()) } else { Err(PublishError::Taken(row.get::<_, Option<String>>(1).unwrap_or_default())) }
    }

    /// Why this instance takes no logins now, if it does not: its heartbeat is not written yet,
    /// or another live process holds its id (two processes with one id would take each
    /// other's kills and cancels).
    pub fn not_serving(&self) -> Option<String> {
        (!self.joined.load(Ordering::Relaxed))
            .then(|| format!("pglease: this instance ({}) is not part of its fleet now (starting, or another live process uses its id)", self.instance))
    }

    /// Removes instances silent for an hour (their sessions go with them), and requests nobody
    /// took.
    async fn forget_the_gone(&self) -> Result<(), String> {
        let (forget, ttl) = (interval(FORGET_AFTER), interval(REQUEST_TTL));
        self.beat
            .with(async |c| {
                c.execute("DELETE FROM pglease.instances WHERE heartbeat_at < now() - $1::text::interval", &[&forget]).await?;
                c.execute("DELETE FROM pglease.requests WHERE made_at < now() - 2 * $1::text::interval", &[&ttl]).await
            })
            .await
            .map(|_| ())
    }

    /// Takes this instance out of the fleet (on a clean stop).
    async fn leave(&self) -> Result<u64, String> {
        self.beat.with(async |c| c.execute("DELETE FROM pglease.instances WHERE id = $1 AND process = $2", &[&self.instance, &self.process]).await).await
    }

    /// Every live session in the fleet: this instance's as they are now, the others' as last
    /// published (at most [`HEARTBEAT`] old).
    pub async fn list(&self) -> Result<Vec<SessionView>, String> {
        let gone = interval(GONE_AFTER);
        let rows = self
            .conn
            .with(async |c| {
                c.query(
                    "SELECT s.instance, s.id, s.person, s.login, s.grant_id, s.scope, s.database, s.client,
                            to_char(s.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), s.statements
                     FROM pglease.sessions s JOIN pglease.instances i ON i.id = s.instance
                     WHERE s.instance <> $1 AND i.heartbeat_at > now() - $2::text::interval",
                    &[&self.instance, &gone],
                )
                .await
            })
            .await?;
        let mut all: Vec<SessionView> = self.local();
        all.extend(rows.iter().map(|r| SessionView {
            instance: Some(r.get(0)),
            id: r.get::<_, i64>(1) as u64,
            user: r.get(2),
            login: r.get(3),
            grant: r.get(4),
            scope: r.get(5),
            database: r.get(6),
            client: r.get(7),
            since: r.get(8),
            statements: r.get::<_, i64>(9) as u64,
            last_statement: None,
        }));
        all.sort_by(|a, b| (&a.since, &a.instance, a.id).cmp(&(&b.since, &b.instance, b.id)));
        Ok(all)
    }

    /// This instance's sessions, as the fleet shows them.
    pub fn local(&self) -> Vec<SessionView> {
        self.sessions.list().iter().map(|h| SessionView::of(h, Some(&self.instance))).collect()
    }

    /// Ends session `id` wherever it is (on `instance`, when given); returns the instance it
    /// was on. A session on another instance is ended there when it takes the request (at
    /// once on its notification, at the latest after a [`HEARTBEAT`]).
    pub async fn kill(&self, id: u64, instance: Option<&str>, by: &str) -> Result<String, KillError> {
        let gone = interval(GONE_AFTER);
        let local = instance.is_none_or(|i| i == self.instance) && self.sessions.get(id).is_some();
        let elsewhere: Vec<String> = if instance == Some(self.instance.as_str()) {
            Vec::new()
        } else {
            let found = self
                .conn
                .with(async |c| {
                    c.query(
                        "SELECT s.instance FROM pglease.sessions s JOIN pglease.instances i ON i.id = s.instance
                         WHERE s.id = $1 AND s.instance <> $2 AND ($3::text IS NULL OR s.instance = $3) AND i.heartbeat_at > now() - $4::text::interval
                         ORDER BY 1",
                        &[&(id as i64), &self.instance, &instance, &gone],
                    )
                    .await
                })
                .await;
            match found {
                Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
                // The control plane is away: a session here can still be ended (the operator
                // is told which instance it was on).
                Err(e) if local => {
                    tracing::warn!(error = %e, session = id, "control plane unreachable: ending this instance's session {id} without checking the others");
                    Vec::new()
                }
                Err(e) => return Err(KillError::Unavailable(e)),
            }
        };
        match (local, elsewhere.as_slice()) {
            (false, []) => Err(KillError::NotFound(id)),
            (true, []) => {
                self.kill_local(id, by);
                Ok(self.instance.clone())
            }
            (false, [there]) => {
                let sent = self
                    .conn
                    .with(async |c| {
                        c.query(
                            "WITH r AS (INSERT INTO pglease.requests (instance, process, kind, session, by_person)
                                        SELECT id, process, 'kill', $2, $3 FROM pglease.instances WHERE id = $1 RETURNING instance)
                             SELECT pg_notify($4, instance) FROM r",
                            &[there, &(id as i64), &by, &REQUESTS_CHANNEL],
                        )
                        .await
                    })
                    .await
                    .map_err(KillError::Unavailable)?;
                if sent.is_empty() {
                    return Err(KillError::NotFound(id));
                }
                Ok(there.clone())
            }
            (_, many) => {
                let mut instances: Vec<String> = many.to_vec();
                if local {
                    instances.insert(0, self.instance.clone());
                }
                Err(KillError::Ambiguous { id, instances })
            }
        }
    }

    /// Ends one of this instance's sessions; the event goes to this instance's audit chain,
    /// next to the session's own records.
    fn kill_local(&self, id: u64, by: &str) -> bool {
        match self.sessions.get(id) {
            Some(handle) => {
                handle.kill(ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, format!("pglease: session {id} was ended by {by}")));
                self.events.emit(crate::events::Event::SessionKilled { session: id, by: by.to_owned() });
                true
            }
            None => false,
        }
    }

    /// Passes a cancel request this instance has no session for to the instance whose session
    /// has that backend pid, if there is one; reports whether it did.
    pub async fn forward_cancel(&self, pid: i32, secret: &[u8]) -> Result<bool, String> {
        let gone = interval(GONE_AFTER);
        let sent = self
            .conn
            .with(async |c| {
                c.query(
                    "WITH r AS (INSERT INTO pglease.requests (instance, process, kind, pid, secret)
                                SELECT s.instance, i.process, 'cancel', s.backend_pid, $2
                                FROM pglease.sessions s JOIN pglease.instances i ON i.id = s.instance
                                WHERE s.backend_pid = $1 AND s.instance <> $3 AND i.heartbeat_at > now() - $4::text::interval
                                RETURNING instance)
                     SELECT pg_notify($5, instance) FROM r",
                    &[&pid, &secret, &self.instance, &gone, &REQUESTS_CHANNEL],
                )
                .await
            })
            .await?;
        Ok(!sent.is_empty())
    }

    /// A notification on [`REQUESTS_CHANNEL`]: wakes [`run_requests`](Self::run_requests) if
    /// it names this instance. Never blocks the caller.
    pub fn on_notification(&self, payload: &str) {
        if payload == self.instance {
            self.requests.notify_one();
        }
    }

    /// Takes this instance's requests from the table and acts on those meant for this process
    /// and recent enough; the others are dropped.
    async fn take_requests(&self) -> Result<(), String> {
        let ttl = interval(REQUEST_TTL);
        let rows = self
            .conn
            .with(async |c| {
                c.query(
                    "DELETE FROM pglease.requests WHERE instance = $1
                     RETURNING process = $2 AND made_at > now() - $3::text::interval, kind, session, by_person, pid, secret",
                    &[&self.instance, &self.process, &ttl],
                )
                .await
            })
            .await?;
        for r in rows {
            let (meant, kind): (bool, String) = (r.get(0), r.get(1));
            if !meant || self.not_serving().is_some() {
                tracing::info!(kind, "control plane: a request for an earlier process of this instance, or too old; dropped");
                continue;
            }
            match kind.as_str() {
                "kill" => {
                    let (session, by): (Option<i64>, Option<String>) = (r.get(2), r.get(3));
                    if !self.kill_local(session.unwrap_or_default() as u64, by.as_deref().unwrap_or("an operator")) {
                        tracing::info!(session, "control plane: asked to end a session that has already ended");
                    }
                }
                "cancel" => {
                    let (pid, secret): (Option<i32>, Option<Vec<u8>>) = (r.get(4), r.get(5));
                    let cancels = self.cancels.clone();
                    // On a task of its own: reaching Postgres may take a while.
                    tokio::spawn(async move { cancels.cancel(pid.unwrap_or_default(), &secret.unwrap_or_default()).await });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Acts on requests from other instances until `shutdown`: at once on a notification, and
    /// every [`HEARTBEAT`] in case one was lost.
    pub async fn run_requests(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.take_requests().await {
                tracing::warn!(error = %e, "control plane: cannot read requests for this instance; retrying");
                metrics::counter!("pglease_control_plane_failures_total", "what" => "requests").increment(1);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.requests.notified() => {}
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }

    /// Keeps this instance's row and sessions current until `shutdown`, then leaves the fleet.
    /// `joined` is sent after the first heartbeat was tried (the proxy starts accepting then).
    pub async fn run_publisher(self: Arc<Self>, shutdown: CancellationToken, joined: tokio::sync::oneshot::Sender<()>) {
        let mut joined = Some(joined);
        let mut last_forget = std::time::Instant::now() - FORGET_AFTER;
        let mut failing = false;
        loop {
            match self.publish().await {
                Ok(()) => {
                    if failing {
                        tracing::info!("control plane: sessions published again");
                    }
                    failing = false;
                }
                Err(e @ PublishError::Taken(_)) => {
                    tracing::error!(instance = %self.instance, "{e}; this instance takes no logins until the id is free");
                    failing = true;
                    metrics::counter!("pglease_control_plane_failures_total", "what" => "instance_id_taken").increment(1);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "control plane: cannot publish this instance's sessions; retrying");
                    }
                    failing = true;
                    metrics::counter!("pglease_control_plane_failures_total", "what" => "publish").increment(1);
                }
            }
            if let Some(tx) = joined.take() {
                let _ = tx.send(());
            }
            if last_forget.elapsed() > Duration::from_secs(60) {
                last_forget = std::time::Instant::now();
                let _ = self.forget_the_gone().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(HEARTBEAT) => {}
                _ = self.sessions.changed() => {
                    // Sessions that start or end together are one write.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), self.leave()).await.unwrap_or_else(|_| Err("timed out".into())) {
            tracing::warn!(error = %e, "control plane: could not take this instance out of the fleet; it drops out in {GONE_AFTER:?}");
        }
    }
}
