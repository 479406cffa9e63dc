//! The control plane's audit table, `pglease.audit`, read back for auditors: the instances
//! whose chains it holds, and one instance's records in chain order (what
//! [`super::pgsink`] copied there from that instance's file log).
//!
//! Blocking, as the file reader is: the auditors' tools are synchronous, so the table is read
//! through a small runtime of its own, a page of rows at a time (constant memory however long
//! the chains are).

use serde_json::Value;
use tokio_postgres::Client;

/// Rows read per query.
const PAGE: i64 = 10_000;

/// A connection to the control plane, for reading `pglease.audit`.
pub struct AuditTable {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl AuditTable {
    /// Connects to the control-plane database named by a libpq connection string.
    // NOTE: blocks; not to be called from inside an async runtime.
    pub fn connect(conninfo: &str) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let client = runtime.block_on(crate::control_plane::connect(conninfo)).map_err(|e| format!("control plane: {e}"))?;
        Ok(Self { runtime, client })
    }

    /// The instances with records, by name.
    pub fn instances(&self) -> Result<Vec<String>, String> {
        // One index probe per instance (a loose index scan), not a scan of every record.
        let rows = self.query(
            "WITH RECURSIVE i(instance) AS ( \
                 SELECT min(instance) FROM pglease.audit \
                 UNION ALL \
                 SELECT (SELECT min(a.instance) FROM pglease.audit a WHERE a.instance > i.instance) FROM i WHERE i.instance IS NOT NULL) \
             SELECT instance FROM i WHERE instance IS NOT NULL",
            &[],
        )?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The instance to read: the one named, or the only one there is. The error names them.
    pub fn instance(&self, named: Option<&str>) -> Result<String, String> {
        let all = self.instances()?;
        match (named, all.as_slice()) {
            (Some(n), all) if all.iter().any(|i| i == n) => Ok(n.to_owned()),
            (_, []) => Err("no instance has audit records in the control plane (pglease.audit is empty)".into()),
            (Some(n), all) => Err(format!("instance {n:?} has no audit records in the control plane; instances with records: {}", all.join(", "))),
            (None, [one]) => Ok(one.clone()),
            (None, all) => Err(format!("the control plane holds the audit chains of {} instances: {}; name one with --instance", all.len(), all.join(", "))),
        }
    }

    /// Calls `f` with each record of `instance` in `seq` order, with its `seq`; only the records
    /// of `session` when given. A record is the `record` column with the `seq`, `hash`, `prev`
    /// and `kind` columns written over it, so that a change to either shows when verifying.
    pub fn for_each(&self, instance: &str, session: Option<u64>, mut f: impl FnMut(i64, Value) -> Result<(), String>) -> Result<(), String> {
        let session = session.map(|s| s as i64);
        let mut after = i64::MIN;
        loop {
            // Keyset pages on the primary key: each query is short, none holds a snapshot for long.
            let rows = self.query(
                "SELECT seq, (record || jsonb_build_object('seq', seq, 'hash', hash, 'prev', prev, 'kind', kind))::text \
                 FROM pglease.audit WHERE instance = $1 AND seq > $2 AND ($3::bigint IS NULL OR session = $3) ORDER BY seq LIMIT $4",
                &[&instance, &after, &session, &PAGE],
            )?;
            for row in &rows {
                let seq: i64 = row.get(0);
                let text: &str = row.get(1);
                let value = serde_json::from_str(text).map_err(|e| format!("instance {instance} seq={seq}: not a record: {e}"))?;
                after = seq;
                f(seq, value)?;
            }
            if (rows.len() as i64) < PAGE {
                return Ok(());
            }
        }
    }

    fn query(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Result<Vec<tokio_postgres::Row>, String> {
        self.runtime.block_on(self.client.query(sql, params)).map_err(|e| format!("control plane: {}", crate::conninfo::describe_error(&e)))
    }
}
