//! The control plane: state several pglease instances share in one PostgreSQL database that
//! the team already runs highly available (streaming replication, Patroni, a managed service).
//! No consensus of pglease's own: the database decides, with optimistic concurrency.
//!
//! This first part holds the schema and its migrations ([`migrations`]) and the shared grant
//! store ([`store::PgGrantStore`]). Instances do not yet use it from `serve`: change
//! notification and reconciliation come next, and until then a second instance would act on
//! stale grants.

pub mod migrations;
pub mod store;

/// Connects to the control-plane database named by a libpq connection string.
pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, String> {
    let info = crate::conninfo::parse(conninfo).map_err(|e| e.to_string())?;
    info.connect().await
}
