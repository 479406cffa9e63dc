//! The control plane: state several pglease instances share in one PostgreSQL database that
//! the team already runs highly available (streaming replication, Patroni, a managed service).
//! No consensus of pglease's own: the database decides, with optimistic concurrency.
//!
//! - [`migrations`]: the schema, created and upgraded by pglease under an advisory lock.
//! - [`store::PgGrantStore`]: the shared grant store; a write names the version it read.
//! - [`watch`]: each instance hears of every change (`LISTEN/NOTIFY`), reads the store again
//!   periodically, and refuses logins once it could not read it for too long.

pub mod migrations;
pub mod store;
pub mod watch;

/// Connects to the control-plane database named by a libpq connection string.
pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, String> {
    let info = crate::conninfo::parse(conninfo).map_err(|e| e.to_string())?;
    info.connect().await
}
