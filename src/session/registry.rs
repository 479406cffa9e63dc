//! Live sessions: what `session list` shows and how a session is ended from outside (kill,
//! grant expiry or revocation, forced shutdown).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::error::{ClientError, sqlstate};

/// One live session, as others see it.
pub struct SessionHandle {
    pub id: u64,
    pub identity: Identity,
    pub client_addr: SocketAddr,
    pub database: String,
    /// The upstream backend's pid (where a cancel request for this session goes).
    pub backend_pid: i32,
    pub started_at: SystemTime,
    statements: AtomicU64,
    /// When the last statement came, in milliseconds since the Unix epoch (0: none yet).
    last_statement_ms: AtomicU64,
    kill: CancellationToken,
    /// The `FATAL` the client gets when the session is ended from outside.
    reason: Mutex<Option<ClientError>>,
}

impl SessionHandle {
    /// Ends the session: its running statement is cancelled, its upstream session closed, and
    /// the client gets `reason`. The first reason given wins.
    pub fn kill(&self, reason: ClientError) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.kill.cancel();
    }

    /// Resolves when [`kill`](Self::kill) is called. Cancel-safe.
    pub async fn killed(&self) -> ClientError {
        self.kill.cancelled().await;
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command"))
    }

    pub fn count_statement(&self) {
        self.statements.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        self.last_statement_ms.store(now.as_millis() as u64, Ordering::Relaxed);
    }

    /// When the last statement came, if one has.
    pub fn last_statement(&self) -> Option<SystemTime> {
        match self.last_statement_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)),
        }
    }

    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct SessionRegistry {
    sessions: DashMap<u64, Arc<SessionHandle>>,
    next_id: AtomicU64,
    /// Woken when a session starts or ends (one waiter: the fleet publisher).
    changed: tokio::sync::Notify,
}

/// A live session as `session list` shows it; `instance` with a control plane.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub id: u64,
    pub user: String,
    pub login: String,
    pub grant: Option<String>,
    pub scope: Option<String>,
    pub database: String,
    pub client: String,
    pub since: String,
    pub statements: u64,
    /// When its last statement came (known for this instance's sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_statement: Option<String>,
}

impl SessionView {
    pub fn of(h: &SessionHandle, instance: Option<&str>) -> Self {
        Self {
            instance: instance.map(str::to_owned),
            id: h.id,
            user: h.identity.person.clone(),
            login: h.identity.login.clone(),
            grant: h.identity.grant_id.clone(),
            scope: h.identity.scope.clone(),
            database: h.database.clone(),
            client: h.client_addr.to_string(),
            since: crate::time::rfc3339(h.started_at),
            statements: h.statements(),
            last_statement: h.last_statement().map(crate::time::rfc3339),
        }
    }
}

/// Removes the session from the registry when dropped.
pub struct Registered {
    registry: Arc<SessionRegistry>,
    pub handle: Arc<SessionHandle>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.sessions.remove(&self.handle.id);
        self.registry.changed.notify_one();
    }
}

impl SessionRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn register(self: &Arc<Self>, identity: Identity, client_addr: SocketAddr, database: String, backend_pid: i32) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let handle = Arc::new(SessionHandle {
            id,
            identity,
            client_addr,
            database,
            backend_pid,
            started_at: SystemTime::now(),
            statements: AtomicU64::new(0),
            last_statement_ms: AtomicU64::new(0),
            kill: CancellationToken::new(),
            reason: Mutex::new(None),
        });
        self.sessions.insert(id, handle.clone());
        self.changed.notify_one();
        Registered { registry: self.clone(), handle }
    }

    /// Resolves at the next session start or end, or at once if one happened since the last
    /// call. For one waiter.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    pub fn list(&self) -> Vec<Arc<SessionHandle>> {
        let mut all: Vec<_> = self.sessions.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|h| h.id);
        all
    }

    pub fn get(&self, id: u64) -> Option<Arc<SessionHandle>> {
        self.sessions.get(&id).map(|e| e.value().clone())
    }

    /// Kills every session for which `select` is true; returns how many.
    pub fn kill_where(&self, select: impl Fn(&SessionHandle) -> bool, reason: &ClientError) -> usize {
        let mut n = 0;
        for entry in self.sessions.iter() {
            if select(entry.value()) {
                entry.value().kill(reason.clone());
                n += 1;
            }
        }
        n
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}
