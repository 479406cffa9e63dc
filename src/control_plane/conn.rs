//! One connection to the control plane, made on first use and again after it broke, each
//! query bounded in time. Fails closed: no connection, no answer.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

/// The longest a read or write of the control plane may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Conn {
    conninfo: String,
    /// Grants, sessions and kills change a few times a second at most: no pool needed.
    client: Mutex<Option<Client>>,
}

impl Conn {
    pub fn new(conninfo: &str) -> Self {
        Self { conninfo: conninfo.to_owned(), client: Mutex::new(None) }
    }

    pub fn conninfo(&self) -> &str {
        &self.conninfo
    }

    /// Runs `f` on the connection, connecting first if there is none; a connection that broke
    /// or stalled is dropped, so the next call connects again.
    pub async fn with<T>(&self, f: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>) -> Result<T, String> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            let connected = tokio::time::timeout(QUERY_TIMEOUT, super::connect(&self.conninfo)).await;
            *slot = Some(connected.map_err(|_| format!("no connection within {QUERY_TIMEOUT:?}"))??);
        }
        let client = slot.as_ref().expect("connected above");
        // Bounded: a stalled control plane must not hold its caller (and the grant service's
        // write lock) forever. The connection is dropped then; its statement may still commit,
        // which the next read shows.
        let result = match tokio::time::timeout(QUERY_TIMEOUT, f(client)).await {
            Ok(r) => r,
            Err(_) => {
                *slot = None;
                return Err(format!("no answer within {QUERY_TIMEOUT:?}"));
            }
        };
        if client.is_closed() {
            *slot = None;
        }
        result.map_err(|e| crate::conninfo::describe_error(&e))
    }
}
