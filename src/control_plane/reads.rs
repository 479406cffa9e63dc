//! Read budgets in the control plane: one row per grant, every instance's counts added into it.
//! An addition is one statement for all of an instance's grants, and returns their totals.

use super::conn::Conn;
use crate::grants::StoreError;
use crate::grants::reads::{ReadStore, ReadUsage};

pub struct PgReads {
    conn: Conn,
}

impl PgReads {
    pub fn new(conninfo: &str) -> Self {
        Self { conn: Conn::new(conninfo) }
    }
}

fn unavailable(why: String) -> StoreError {
    StoreError::Unavailable(format!("control plane: {why}"))
}

fn usage(rows: i64, bytes: i64) -> ReadUsage {
    ReadUsage { rows: rows.max(0) as u64, bytes: bytes.max(0) as u64 }
}

#[async_trait::async_trait]
impl ReadStore for PgReads {
    async fn load(&self, grant: &str) -> Result<ReadUsage, StoreError> {
        let row = self
            .conn
            .with(async |c| c.query_opt("SELECT rows_read, bytes_read FROM pglease.grant_reads WHERE grant_id = $1", &[&grant]).await)
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| usage(r.get(0), r.get(1))).unwrap_or_default())
    }

    async fn add(&self, deltas: &[(String, ReadUsage)]) -> Result<Vec<(String, ReadUsage)>, StoreError> {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (read, idle): (Vec<_>, Vec<_>) = deltas.iter().partition(|(_, d)| d.rows > 0 || d.bytes > 0);
        let grants: Vec<&str> = read.iter().map(|(g, _)| g.as_str()).collect();
        let rows: Vec<i64> = read.iter().map(|(_, d)| clamp(d.rows)).collect();
        let bytes: Vec<i64> = read.iter().map(|(_, d)| clamp(d.bytes)).collect();
        let idle: Vec<&str> = idle.iter().map(|(g, _)| g.as_str()).collect();
        // One round trip: grants that read something are added to, the others only read back
        // (other instances' reads), without rewriting their rows every second.
        let totals = self
            .conn
            .with(async |c| {
                c.query(
                    "WITH added AS (
                        INSERT INTO pglease.grant_reads AS r (grant_id, rows_read, bytes_read)
                        SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
                        ON CONFLICT (grant_id) DO UPDATE
                           SET rows_read = r.rows_read + excluded.rows_read,
                               bytes_read = r.bytes_read + excluded.bytes_read,
                               updated_at = now()
                        RETURNING grant_id, rows_read, bytes_read)
                     SELECT grant_id, rows_read, bytes_read FROM added
                     UNION ALL
                     SELECT grant_id, rows_read, bytes_read FROM pglease.grant_reads WHERE grant_id = ANY($4::text[])",
                    &[&grants, &rows, &bytes, &idle],
                )
                .await
            })
            .await
            .map_err(unavailable)?;
        Ok(totals.iter().map(|r| (r.get::<_, String>(0), usage(r.get(1), r.get(2)))).collect())
    }
}
