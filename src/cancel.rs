//! Cancel keys. Each client gets a `BackendKeyData` whose pid is the upstream backend's own
//! (the pid `NOTIFY` messages, `pg_backend_pid()` and `pg_stat_activity` show) and whose secret
//! pglease draws from the OS's CSPRNG; the backend's real secret never leaves the proxy. A
//! `CancelRequest` is forwarded only when both the pid and the secret match a live session;
//! anything else is dropped without an answer, as Postgres does.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use rand::RngCore;
use subtle::ConstantTimeEq;

use crate::codec::messages::BackendKeyData;
use crate::upstream::Upstream;

struct Entry {
    secret: Bytes,
    upstream_key: BackendKeyData,
    upstream: Arc<Upstream>,
}

#[derive(Default)]
pub struct CancelRegistry {
    /// Live sessions by backend pid. A pid normally names one session; more than one only
    /// while a session of a restarted upstream has not noticed yet that its backend is gone.
    entries: DashMap<i32, Vec<Entry>>,
    /// Wrong secrets tried against each live pid, from anywhere (directly or routed by other
    /// instances). The pid is public; after [`MISSES_PER_PID`] a pid takes no more cancel
    /// requests, so its 4-byte secret cannot be guessed.
    misses: DashMap<i32, u32>,
}

/// Wrong secrets a live session's pid may receive before it takes no more cancel requests.
pub const MISSES_PER_PID: u32 = 32;

/// Removes the session's key from the registry when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub key: BackendKeyData,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut o) = self.registry.entries.entry(self.key.pid) {
            o.get_mut().retain(|e| e.secret != self.key.secret);
            if o.get().is_empty() {
                o.remove();
                self.registry.misses.remove(&self.key.pid);
            }
        }
    }
}

impl CancelRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Issues the client-facing key for an upstream session: the backend's pid, a fresh secret.
    pub fn register(self: &Arc<Self>, upstream: Arc<Upstream>, upstream_key: BackendKeyData) -> Registration {
        let mut rng = rand::rngs::OsRng;
        let pid = upstream_key.pid;
        let mut entries = self.entries.entry(pid).or_default();
        if entries.is_empty() {
            // A pid used again by a new backend starts with a clean slate.
            self.misses.remove(&pid);
        }
        let secret = loop {
            // 4 bytes: the secret length of protocol 3.0.
            let mut secret = [0u8; 4];
            rng.fill_bytes(&mut secret);
            if !entries.iter().any(|e| e.secret.as_ref() == secret) {
                break Bytes::copy_from_slice(&secret);
            }
        };
        entries.push(Entry { secret: secret.clone(), upstream_key, upstream });
        drop(entries);
        Registration { registry: self.clone(), key: BackendKeyData { pid, secret } }
    }

    /// The upstream to cancel on, if `pid`/`secret` name a live session.
    pub fn resolve(&self, pid: i32, secret: &[u8]) -> Option<(Arc<Upstream>, BackendKeyData)> {
        let entries = self.entries.get(&pid)?;
        if self.misses.get(&pid).is_some_and(|m| *m >= MISSES_PER_PID) {
            metrics::counter!("pglease_cancel_requests_total", "result" => "pid_locked").increment(1);
            return None;
        }
        // Every entry is compared, so the time taken does not tell which one matched.
        let mut found = None;
        for e in entries.iter() {
            if e.secret.len() == secret.len() && bool::from(e.secret.as_ref().ct_eq(secret)) {
                found = Some((e.upstream.clone(), e.upstream_key.clone()));
            }
        }
        if found.is_none() {
            drop(entries);
            // Counted only while the pid is live (the entry goes with the session).
            if self.entries.contains_key(&pid) {
                *self.misses.entry(pid).or_default() += 1;
            }
        }
        found
    }

    /// Forwards a client's cancel request if it matches a live session; reports whether it did.
    pub async fn cancel(&self, pid: i32, secret: &[u8]) -> bool {
        let Some((upstream, key)) = self.resolve(pid, secret) else {
            metrics::counter!("pglease_cancel_requests_total", "result" => "ignored").increment(1);
            return false;
        };
        match upstream.cancel(&key).await {
            Ok(()) => {
                metrics::counter!("pglease_cancel_requests_total", "result" => "forwarded").increment(1);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not forward cancel request upstream");
                metrics::counter!("pglease_cancel_requests_total", "result" => "failed").increment(1);
                false
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.iter().map(|e| e.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
