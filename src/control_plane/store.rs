//! Grants in the control-plane database: one row per grant, its latest version.
//!
//! `put` is optimistic: the caller names the version it read (`Grant::version`), and the row
//! is written only if that is still the stored one. Two approvers on two instances deciding
//! the same pending grant: the second write finds a newer version and gets
//! [`StoreError::Conflict`] (HTTP 409), never a silent overwrite.

use tokio_postgres::Client;

use super::conn::Conn;
use crate::grants::{Grant, GrantStore, StoreError};

/// The LISTEN/NOTIFY channel a grant change is announced on (the payload is its id).
pub const CHANNEL: &str = "pglease_grants";

pub struct PgGrantStore {
    conn: Conn,
}

impl PgGrantStore {
    pub fn new(conninfo: &str) -> Self {
        Self { conn: Conn::new(conninfo) }
    }

    async fn with_client<T>(&self, f: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>) -> Result<T, StoreError> {
        self.conn.with(f).await.map_err(Self::unavailable)
    }

    fn unavailable(why: String) -> StoreError {
        StoreError::Unavailable(format!("control plane: {why}"))
    }
}

#[async_trait::async_trait]
impl GrantStore for PgGrantStore {
    async fn load(&self) -> Result<Vec<Grant>, StoreError> {
        let rows = self.with_client(async |c| c.query("SELECT version, body::text FROM pglease.grants ORDER BY id", &[]).await).await?;
        rows.iter()
            .map(|r| {
                let version: i64 = r.get(0);
                let body: String = r.get(1);
                let mut g: Grant = serde_json::from_str(&body).map_err(|e| Self::unavailable(format!("a stored grant does not read back: {e}")))?;
                g.version = version as u64;
                Ok(g)
            })
            .collect()
    }

    fn shared(&self) -> bool {
        true
    }

    fn reads(&self) -> std::sync::Arc<dyn crate::grants::reads::ReadStore> {
        std::sync::Arc::new(super::reads::PgReads::new(self.conn.conninfo()))
    }

    async fn put(&self, grant: &Grant) -> Result<u64, StoreError> {
        let body = serde_json::to_string(grant).expect("grants serialize");
        let read = grant.version as i64;
        let written = self
            .with_client(async |c| {
                // One statement: the write and its notification commit together (NOTIFY is
                // sent at commit), so every instance hears of exactly the changes that happened.
                let sql = if read == 0 {
                    "WITH w AS (INSERT INTO pglease.grants (id, version, body) VALUES ($1, 1, $2::text::jsonb) ON CONFLICT (id) DO NOTHING RETURNING id)
                     SELECT pg_notify($3, id) FROM w"
                } else {
                    "WITH w AS (UPDATE pglease.grants SET version = version + 1, body = $2::text::jsonb, updated_at = now() WHERE id = $1 AND version = $4 RETURNING id)
                     SELECT pg_notify($3, id) FROM w"
                };
                let rows = if read == 0 {
                    c.query(sql, &[&grant.id, &body, &CHANNEL]).await?
                } else {
                    c.query(sql, &[&grant.id, &body, &CHANNEL, &read]).await?
                };
                Ok(rows.len() as u64)
            })
            .await?;
        if written == 0 {
            return Err(StoreError::Conflict(grant.id.clone()));
        }
        Ok(grant.version + 1)
    }
}
