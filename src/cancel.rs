//! Cancel keys. Each client gets a `BackendKeyData` made by pglease from the OS's CSPRNG; the
//! registry maps it to the upstream backend's real key, which never leaves the proxy. A
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
    entries: DashMap<i32, Entry>,
}

/// Removes the session's key from the registry when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub key: BackendKeyData,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.entries.remove(&self.key.pid);
    }
}

impl CancelRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Issues a fresh client-facing key for an upstream session.
    pub fn register(self: &Arc<Self>, upstream: Arc<Upstream>, upstream_key: BackendKeyData) -> Registration {
        let mut rng = rand::rngs::OsRng;
        loop {
            // A positive pid, as clients may treat it as a process id; 4-byte secret (protocol 3.0).
            let pid = (rng.next_u32() >> 1) as i32;
            if pid == 0 {
                continue;
            }
            let mut secret = [0u8; 4];
            rng.fill_bytes(&mut secret);
            let secret = Bytes::copy_from_slice(&secret);
            match self.entries.entry(pid) {
                dashmap::Entry::Occupied(_) => continue,
                dashmap::Entry::Vacant(v) => {
                    v.insert(Entry { secret: secret.clone(), upstream_key, upstream });
                }
            }
            return Registration { registry: self.clone(), key: BackendKeyData { pid, secret } };
        }
    }

    /// The upstream to cancel on, if `pid`/`secret` name a live session.
    pub fn resolve(&self, pid: i32, secret: &[u8]) -> Option<(Arc<Upstream>, BackendKeyData)> {
        let entry = self.entries.get(&pid)?;
        if entry.secret.len() != secret.len() || !bool::from(entry.secret.as_ref().ct_eq(secret)) {
            return None;
        }
        Some((entry.upstream.clone(), entry.upstream_key.clone()))
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
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
