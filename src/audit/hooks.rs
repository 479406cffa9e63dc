//! Auditing as a session hook around the policy: every statement is decided, then recorded,
//! and only then forwarded. If its record cannot be written, the statement is refused (fail
//! closed) and the session goes on. Results are recorded as they come back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine;

use super::log::{AuditLog, ParamLogging};
use super::record::{Body, Param, ResultRecord, SessionInfo, StatementRecord};
use crate::codec::messages::{Bind, Execute, Parse};
use crate::error::ClientError;
use crate::session::{BackendAction, BackendEvent, SessionContext, SessionHooks, Verdict};

/// A prepared statement as the client named it.
#[derive(Clone)]
struct Prepared {
    sql: String,
    ran: Option<String>,
    types: Vec<u32>,
}

/// A bound portal, ready to run.
#[derive(Clone)]
struct Portal {
    /// Shared with the statement it binds (and cloned per Execute as a pointer, not the SQL).
    prepared: Arc<Prepared>,
    params: Vec<Param>,
}

/// A statement sent upstream whose result has not come back yet.
enum InFlight {
    /// A simple Query (ends at ReadyForQuery).
    Simple { stmt: u64, started: Instant, tags: Vec<String>, error: Option<(String, String)>, capped: bool },
    /// An Execute (ends at its CommandComplete, PortalSuspended or error).
    Execute { stmt: u64, started: Instant },
    /// A refused extended message: its error comes back in the batch.
    Refused { stmt: u64, started: Instant },
    /// The end of an extended batch.
    Sync,
}

#[derive(Default)]
struct State {
    next_stmt: u64,
    statements: HashMap<String, Arc<Prepared>>,
    portals: HashMap<String, Portal>,
    in_flight: VecDeque<InFlight>,
}

pub struct AuditHooks {
    inner: Arc<dyn SessionHooks>,
    log: AuditLog,
    info: Arc<SessionInfo>,
    state: Mutex<State>,
}

fn rows_of(tag: &str) -> u64 {
    // "SELECT 5", "INSERT 0 1", "UPDATE 3", "COPY 10", "FETCH 2", "MOVE 1": the count is last.
    tag.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

impl AuditHooks {
    pub fn new(inner: Arc<dyn SessionHooks>, log: AuditLog, ctx: &SessionContext) -> Self {
        let info = Arc::new(SessionInfo {
            session: ctx.id,
            grant: ctx.identity.grant_id.clone(),
            user: ctx.identity.person.clone(),
            scope: ctx.identity.scope.clone(),
            login: ctx.identity.login.clone(),
            client: ctx.client_addr.to_string(),
            database: ctx.database.clone(),
        });
        Self { inner, log, info, state: Mutex::new(State::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_stmt(&self) -> u64 {
        let mut st = self.state();
        st.next_stmt += 1;
        st.next_stmt
    }

    /// Writes a statement record; a failure turns the verdict into a refusal.
    async fn record(&self, protocol: &str, sql: &str, verdict: &Verdict, params: Vec<Param>, stmt: u64) -> Result<(), Verdict> {
        let (decision, ran, reason) = match verdict {
            Verdict::Forward => ("allow", None, None),
            Verdict::Rewrite { sql: new, .. } => ("rewrite", Some(new.clone()), None),
            Verdict::Refuse(e) => ("deny", None, Some(e.message.clone())),
        };
        self.record_with(protocol, sql, decision, ran, reason, params, stmt).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_with(&self, protocol: &str, sql: &str, decision: &str, ran: Option<String>, reason: Option<String>, params: Vec<Param>, stmt: u64) -> Result<(), Verdict> {
        let body = Body::Statement {
            session: self.info.clone(),
            statement: StatementRecord { stmt, protocol: protocol.into(), sql: sql.into(), sql_ran: ran, params, decision: decision.into(), reason },
        };
        match self.log.append(body).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, session = self.info.session, "statement refused: its audit record could not be written");
                Err(Verdict::Refuse(ClientError::error("58030", format!("pglease: {e}; the statement was not run"))))
            }
        }
    }

    fn params(&self, bind: &Bind, types: &[u32]) -> Vec<Param> {
        if self.log.params == ParamLogging::Omit {
            return Vec::new();
        }
        bind.params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let binary = bind.param_format(i) == 1;
                // A text value that is not UTF-8 without NULs (Postgres refuses it, but it was
                // sent) is kept exactly, in base64: `text-base64`. As text it would be altered,
                // and a NUL cannot be stored in the control plane's jsonb at all.
                let plain = p.as_deref().and_then(|b| std::str::from_utf8(b).ok()).filter(|t| !t.contains('\0'));
                let (format, value) = match (p, self.log.params) {
                    (None, _) => (if binary { "binary" } else { "text" }, None),
                    (Some(_), ParamLogging::Redact) => (if binary { "binary" } else { "text" }, Some("<redacted>".to_owned())),
                    (Some(b), _) if binary => ("binary", Some(base64::engine::general_purpose::STANDARD.encode(b))),
                    (Some(b), _) => match plain {
                        Some(text) => ("text", Some(text.to_owned())),
                        None => ("text-base64", Some(base64::engine::general_purpose::STANDARD.encode(b))),
                    },
                };
                Param { oid: types.get(i).copied().unwrap_or(0), format: format.into(), value }
            })
            .collect()
    }

    fn finish(&self, stmt: u64, started: Instant, tags: Vec<String>, error: Option<(String, String)>, skipped: bool, capped: bool) {
        let rows = tags.iter().map(|t| rows_of(t)).sum();
        let (error_code, error) = match error {
            Some((c, m)) => (Some(c), Some(m)),
            None => (None, None),
        };
        self.log.append_nowait(Body::Result {
            session: self.info.session,
            result: ResultRecord { stmt, tags, rows, error_code, error, duration_us: started.elapsed().as_micros() as u64, skipped, capped },
        });
    }
}

#[async_trait::async_trait]
impl SessionHooks for AuditHooks {
    async fn on_query(&self, ctx: &SessionContext, sql: &str) -> Verdict {
        let verdict = self.inner.on_query(ctx, sql).await;
        let stmt = self.next_stmt();
        if let Err(refused) = self.record("simple", sql, &verdict, Vec::new(), stmt).await {
            return refused;
        }
        self.state().in_flight.push_back(InFlight::Simple { stmt, started: Instant::now(), tags: Vec::new(), error: None, capped: false });
        verdict
    }

    async fn on_parse(&self, ctx: &SessionContext, parse: &Parse) -> Verdict {
        let verdict = self.inner.on_parse(ctx, parse).await;
        match &verdict {
            Verdict::Refuse(_) => {
                // Refused here, so never executed: its record is written now.
                let stmt = self.next_stmt();
                if let Err(refused) = self.record("extended", &parse.sql, &verdict, Vec::new(), stmt).await {
                    return refused;
                }
                self.state().in_flight.push_back(InFlight::Refused { stmt, started: Instant::now() });
            }
            v => {
                let ran = if let Verdict::Rewrite { sql, .. } = v { Some(sql.clone()) } else { None };
                self.state().statements.insert(parse.name.clone(), Arc::new(Prepared { sql: parse.sql.clone(), ran, types: parse.param_types.clone() }));
            }
        }
        verdict
    }

    async fn on_bind(&self, ctx: &SessionContext, bind: &Bind) -> Verdict {
        let verdict = self.inner.on_bind(ctx, bind).await;
        if matches!(verdict, Verdict::Forward) {
            let prepared = self.state().statements.get(&bind.statement).cloned();
            let prepared = prepared.unwrap_or_else(|| Arc::new(Prepared { sql: format!("-- statement \"{}\" prepared with SQL PREPARE", bind.statement), ran: None, types: vec![] }));
            let params = self.params(bind, &prepared.types);
            self.state().portals.insert(bind.portal.clone(), Portal { prepared, params });
        } else {
            let stmt = self.next_stmt();
            if let Err(refused) = self.record("extended", &format!("-- Bind of statement \"{}\"", bind.statement), &verdict, Vec::new(), stmt).await {
                return refused;
            }
            self.state().in_flight.push_back(InFlight::Refused { stmt, started: Instant::now() });
        }
        verdict
    }

    async fn on_execute(&self, ctx: &SessionContext, execute: &Execute) -> Verdict {
        let verdict = self.inner.on_execute(ctx, execute).await;
        let portal = self.state().portals.get(&execute.portal).cloned();
        let Some(portal) = portal else {
            // Postgres will answer "portal does not exist"; nothing runs.
            return verdict;
        };
        let stmt = self.next_stmt();
        let decision = match (&verdict, &portal.prepared.ran) {
            (Verdict::Refuse(_), _) => "deny",
            (_, Some(_)) => "rewrite",
            _ => "allow",
        };
        let reason = if let Verdict::Refuse(e) = &verdict { Some(e.message.clone()) } else { None };
        if let Err(refused) = self.record_with("extended", &portal.prepared.sql, decision, portal.prepared.ran.clone(), reason, portal.params, stmt).await {
            return refused;
        }
        let entry = if matches!(verdict, Verdict::Refuse(_)) { InFlight::Refused { stmt, started: Instant::now() } } else { InFlight::Execute { stmt, started: Instant::now() } };
        self.state().in_flight.push_back(entry);
        verdict
    }

    fn on_sync(&self, ctx: &SessionContext) {
        self.inner.on_sync(ctx);
        self.state().in_flight.push_back(InFlight::Sync);
    }

    fn on_backend(&self, ctx: &SessionContext, event: BackendEvent<'_>) -> BackendAction {
        let action = match &event {
            BackendEvent::CommandComplete(t) => self.inner.on_backend(ctx, BackendEvent::CommandComplete(t)),
            BackendEvent::EmptyQuery => self.inner.on_backend(ctx, BackendEvent::EmptyQuery),
            BackendEvent::PortalSuspended => self.inner.on_backend(ctx, BackendEvent::PortalSuspended),
            BackendEvent::Error(e) => self.inner.on_backend(ctx, BackendEvent::Error(e)),
            BackendEvent::Ready(tx) => self.inner.on_backend(ctx, BackendEvent::Ready(*tx)),
            BackendEvent::ParameterStatus { name, value } => self.inner.on_backend(ctx, BackendEvent::ParameterStatus { name, value }),
        };
        // The policy's notice on a CommandComplete: the scope's row cap cut that result.
        let notice = matches!(action, BackendAction::Notice(_));
        let mut done = Vec::new();
        {
            let mut st = self.state();
            match event {
                BackendEvent::CommandComplete(_) | BackendEvent::EmptyQuery | BackendEvent::PortalSuspended => {
                    let tag = match event {
                        BackendEvent::CommandComplete(t) => t.to_owned(),
                        BackendEvent::PortalSuspended => "(suspended)".to_owned(),
                        _ => String::new(),
                    };
                    match st.in_flight.front_mut() {
                        Some(InFlight::Simple { tags, capped, .. }) => {
                            tags.push(tag);
                            *capped |= notice;
                        }
                        Some(InFlight::Execute { .. }) => {
                            if let Some(InFlight::Execute { stmt, started }) = st.in_flight.pop_front() {
                                done.push((stmt, started, vec![tag], None, false, notice));
                            }
                        }
                        _ => {}
                    }
                }
                BackendEvent::Error(e) => {
                    let err = (e.code().unwrap_or("").to_owned(), e.message().unwrap_or("").to_owned());
                    match st.in_flight.front_mut() {
                        Some(InFlight::Simple { error, .. }) => *error = Some(err),
                        Some(InFlight::Execute { .. }) | Some(InFlight::Refused { .. }) => {
                            if let Some(InFlight::Execute { stmt, started } | InFlight::Refused { stmt, started }) = st.in_flight.pop_front() {
                                done.push((stmt, started, vec![], Some(err), false, false));
                            }
                        }
                        _ => {}
                    }
                }
                BackendEvent::Ready(_) => {
                    // Everything up to this batch's end is over; Executes still waiting were
                    // skipped by Postgres after an error.
                    while let Some(entry) = st.in_flight.pop_front() {
                        match entry {
                            InFlight::Sync => break,
                            InFlight::Simple { stmt, started, tags, error, capped } => {
                                done.push((stmt, started, tags, error, false, capped));
                                break;
                            }
                            InFlight::Execute { stmt, started } | InFlight::Refused { stmt, started } => done.push((stmt, started, vec![], None, true, false)),
                        }
                    }
                }
                BackendEvent::ParameterStatus { .. } => {}
            }
        }
        for (stmt, started, tags, error, skipped, capped) in done {
            self.finish(stmt, started, tags, error, skipped, capped);
        }
        action
    }
}
