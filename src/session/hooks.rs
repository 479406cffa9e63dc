//! Where policy and audit plug into a session.
//!
//! The relay calls [`SessionHooks`] at two points: every statement a client sends is shown to a
//! hook *before* any byte of it reaches Postgres (and the hook may rewrite or refuse it), and
//! every result event is shown on its way back. The hooks are async so that an audit record
//! can be written durably before the statement is forwarded.

use std::net::SocketAddr;

use crate::auth::Identity;
use crate::codec::messages::{Bind, ErrorFields, Execute, Parse, TxStatus};
use crate::error::ClientError;

/// Facts about the session, for hooks.
#[derive(Debug, Clone)]
pub struct SessionContext {
    /// Proxy-wide session number, as shown by `session list`.
    pub id: u64,
    pub identity: Identity,
    pub client_addr: SocketAddr,
    pub database: String,
    /// Settings pinned for the session upstream (search_path, statement_timeout…), so that
    /// a replay can run under the same ones.
    pub settings: Vec<(String, String)>,
    /// The grant's read budget, when its scope sets one: the relay counts every row sent
    /// against it and cuts a result off where it would cross.
    pub reads: Option<std::sync::Arc<crate::grants::reads::ReadMeter>>,
}

/// A hook's answer about a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it unchanged.
    Forward,
    /// Forward this SQL instead, first telling the client `notice` (what the rewrite left
    /// out), if any.
    Rewrite { sql: String, notice: Option<String> },
    /// Do not run it; the client gets this error exactly where Postgres would have raised one:
    /// the rest of an extended-protocol batch is skipped until `Sync`, and an open transaction
    /// is left failed.
    Refuse(ClientError),
}

/// A result event coming back from Postgres.
#[derive(Debug)]
pub enum BackendEvent<'a> {
    CommandComplete(&'a str),
    /// The statement was empty.
    EmptyQuery,
    /// An `Execute` with a row limit stopped before the end.
    PortalSuspended,
    Error(&'a ErrorFields),
    /// `ReadyForQuery`: the end of a simple query or of an extended-protocol `Sync`.
    Ready(TxStatus),
    ParameterStatus { name: &'a str, value: &'a str },
}

#[async_trait::async_trait]
pub trait SessionHooks: Send + Sync + 'static {
    /// A simple-protocol `Query` (one or more statements). Default: forward.
    async fn on_query(&self, _ctx: &SessionContext, _sql: &str) -> Verdict {
        Verdict::Forward
    }

    /// An extended-protocol `Parse`. Default: forward.
    async fn on_parse(&self, _ctx: &SessionContext, _parse: &Parse) -> Verdict {
        Verdict::Forward
    }

    /// An extended-protocol `Bind`; a rewrite is not possible here, only forward or refuse.
    async fn on_bind(&self, _ctx: &SessionContext, _bind: &Bind) -> Verdict {
        Verdict::Forward
    }

    /// An extended-protocol `Execute`: the moment a bound statement runs. Default: forward.
    async fn on_execute(&self, _ctx: &SessionContext, _execute: &Execute) -> Verdict {
        Verdict::Forward
    }

    /// A `Sync` was forwarded: the end of an extended-protocol batch. Also called for a
    /// refused `FunctionCall`, which like a `Sync` (and a `Query`) ends with one `ReadyForQuery`.
    fn on_sync(&self, _ctx: &SessionContext) {}

    /// A result event. Must not block: it runs on the relay's path back to the client.
    fn on_backend(&self, _ctx: &SessionContext, _event: BackendEvent<'_>) -> BackendAction {
        BackendAction::Continue
    }
}

/// What the relay does after a result event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAction {
    Continue,
    /// End the session with this `FATAL` (e.g. a pinned setting changed).
    End(ClientError),
    /// For a `ParameterStatus`: show the client this value instead of Postgres's.
    ShowValue(String),
    /// Send the client this `NOTICE` text first, then the message (e.g. a row cap was reached).
    Notice(String),
}

/// Forwards everything: the proxy core on its own.
pub struct PassThrough;

impl SessionHooks for PassThrough {}
