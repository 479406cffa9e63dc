//! The control plane: state several pglease instances share in one PostgreSQL database that
//! the team already runs highly available (streaming replication, Patroni, a managed service).
//! No consensus of pglease's own: the database decides, with optimistic concurrency.
//!
//! - [`migrations`]: the schema, created and upgraded by pglease under an advisory lock.
//! - [`store::PgGrantStore`]: the shared grant store; a write names the version it read.
//! - [`watch`]: each instance hears of every change (`LISTEN/NOTIFY`), reads the store again
//!   periodically, and refuses logins once it could not read it for too long.
//! - [`reads`]: how much each grant has read, for read budgets.
//! - [`events`]: every instance's grant and session events in one table.
//! - [`fleet`]: instances announce themselves and their live sessions; a kill or a cancel
//!   request for a session on another instance reaches it through the control plane.

pub mod conn;
pub mod events;
pub mod fleet;
pub mod migrations;
pub mod reads;
pub mod store;
pub mod watch;

/// Connects to the control-plane database named by a libpq connection string.
pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, String> {
    let info = crate::conninfo::parse(conninfo).map_err(|e| e.to_string())?;
    info.connect().await
}

/// This instance's id when the config names none: the host's name and the proxy's port.
pub fn default_instance_id(proxy_port: u16) -> String {
    format!("{}:{proxy_port}", hostname())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 { String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap_or(buf.len())]).into_owned() } else { String::new() };
    if name.is_empty() { "localhost".to_owned() } else { name }
}
