//! The policy in a session: every Query, Parse and Bind is decided before it reaches Postgres,
//! prepared-statement names are tracked so that only vetted statements can be bound, the
//! session's `search_path` is tracked so that names resolve as Postgres will resolve them,
//! and pinned settings are watched in `ParameterStatus`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::{Decision, Effect, ScopePolicy};
use crate::codec::messages::{Bind, Execute, Parse, TxStatus};
use crate::error::{ClientError, sqlstate};
use crate::session::{BackendAction, BackendEvent, SessionContext, SessionHooks, Verdict};

pub struct PolicyHooks {
    policy: Arc<ScopePolicy>,
    state: Mutex<State>,
    /// ParameterStatus values that must not change.
    watched: Vec<(&'static str, String)>,
}

#[derive(Default)]
struct State {
    /// Statements this session may bind or EXECUTE, by name ("" is the unnamed statement):
    /// every text vetted under that name by Parse or SQL PREPARE. A named statement keeps all
    /// of them: a second Parse of a name that exists fails in Postgres and leaves the first,
    /// and pglease cannot see whether a DEALLOCATE or Close ran.
    vetted: HashMap<String, Vec<Vetted>>,
    /// What each bound portal does when it runs.
    portals: HashMap<String, Portal>,
    paths: PathTracker,
    /// Forwarded messages whose results have not all come back, oldest first: to tell which
    /// statement a `CommandComplete` belongs to.
    results: VecDeque<Awaiting>,
}

/// A bound portal.
#[derive(Clone, Default)]
struct Portal {
    /// The `search_path` changes its statement makes.
    changes: Vec<PathChange>,
    /// Whether its result is capped by the scope's row limit.
    capped: bool,
    /// The prepared statement it runs.
    statement: String,
}

/// A forwarded message, as its results come back.
enum Awaiting {
    /// A simple Query: results until its ReadyForQuery; `capped` if the row cap was applied.
    Query { capped: bool },
    /// An Execute: one CommandComplete, EmptyQuery, PortalSuspended or error.
    Execute { capped: bool },
    /// A Sync (or a refused FunctionCall): its ReadyForQuery.
    Sync,
}

struct Vetted {
    sql: String,
    /// The scope's row cap was applied to it.
    capped: bool,
    /// The statement's own `SET search_path` (a SET can be prepared and run many times).
    changes: Vec<PathChange>,
    /// Prepared statements it runs (`EXPLAIN EXECUTE p`), checked again with it.
    executes: Vec<String>,
    generation: u64,
}

/// A `search_path` change a statement makes when it runs (None: the scope's pinned path).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PathChange {
    path: Option<Vec<String>>,
    local: bool,
}

/// The `search_path`s a session may be under.
///
/// A change is registered when the statement making it is forwarded (a Query, or the Execute
/// of a portal whose statement makes it), before it runs; a statement is decided under every
/// path registered or settled. Whether a change took effect is known only once everything
/// forwarded has been answered: an error, a `ROLLBACK` (to a savepoint too) or a `PREPARE
/// TRANSACTION` may have undone it, and `SET LOCAL` ends with its transaction. So the
/// candidates collapse only at a `ReadyForQuery` outside a transaction with nothing else in
/// flight: to the last session-level change if everything since the previous such point ran
/// clean, to all of them (and what was settled) otherwise.
#[derive(Default)]
struct PathTracker {
    /// Candidates at the last quiet point; empty means the scope's pinned path.
    settled: Vec<Vec<String>>,
    /// Changes forwarded since the last quiet point, in the order they run.
    registered: Vec<PathChange>,
    /// An error or a rollback since the last quiet point.
    undone: bool,
    /// Messages forwarded that end with one `ReadyForQuery` (Query, Sync, FunctionCall) and
    /// whose `ReadyForQuery` has not come back.
    outstanding: u64,
    /// Changes whenever the candidates may have changed: statements vetted under another
    /// generation are decided again before they run.
    generation: u64,
}

impl PathTracker {
    /// Every candidate path; empty when the pinned path is the only one (the cached case).
    fn candidates(&self, pinned: &[String]) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = Vec::new();
        let mut add = |p: &[String]| {
            if !out.iter().any(|o| o == p) {
                out.push(p.to_vec());
            }
        };
        if self.settled.is_empty() {
            add(pinned);
        }
        self.settled.iter().for_each(|p| add(p));
        self.registered.iter().for_each(|c| add(c.path.as_deref().unwrap_or(pinned)));
        if out.len() == 1 && out[0] == pinned { Vec::new() } else { out }
    }

    fn register(&mut self, changes: &[PathChange]) {
        if !changes.is_empty() {
            self.registered.extend_from_slice(changes);
            self.generation += 1;
        }
    }

    fn ready(&mut self, status: TxStatus, pinned: &[String]) {
        self.outstanding = self.outstanding.saturating_sub(1);
        if status != TxStatus::Idle || self.outstanding > 0 {
            return;
        }
        let resolve = |c: &PathChange| c.path.clone().unwrap_or_else(|| pinned.to_vec());
        let session: Vec<Vec<String>> = self.registered.iter().filter(|c| !c.local).map(resolve).collect();
        let had_changes = !self.registered.is_empty();
        if !self.undone {
            if let Some(last) = session.last() {
                self.settled = vec![last.clone()];
            }
        } else if !session.is_empty() {
            if self.settled.is_empty() {
                self.settled.push(pinned.to_vec());
            }
            for p in session {
                if !self.settled.contains(&p) {
                    self.settled.push(p);
                }
            }
        }
        if self.settled.len() == 1 && self.settled[0] == pinned {
            self.settled.clear();
        }
        self.registered.clear();
        self.undone = false;
        if had_changes {
            self.generation += 1;
        }
    }
}

/// Whether the decision applied the scope's row cap (the only rewrite that trims results).
fn is_capped(decision: &Decision) -> bool {
    matches!(decision, Decision::Rewrite { reason, .. } if reason.starts_with(super::ROW_CAP_REASON))
}

/// The row count of a `SELECT n` / `COPY n` command tag.
fn tag_rows(tag: &str) -> Option<u64> {
    let (verb, n) = tag.rsplit_once(' ')?;
    matches!(verb, "SELECT" | "COPY" | "FETCH").then(|| n.parse().ok()).flatten()
}

fn path_changes(effects: &[Effect]) -> Vec<PathChange> {
    effects.iter().filter_map(|e| if let Effect::SearchPath { path, local } = e { Some(PathChange { path: path.clone(), local: *local }) } else { None }).collect()
}

fn executes(effects: &[Effect]) -> Vec<String> {
    effects.iter().filter_map(|e| if let Effect::Executed(n) = e { Some(n.clone()) } else { None }).collect()
}

impl PolicyHooks {
    pub fn new(policy: Arc<ScopePolicy>, upstream_role: &str) -> Self {
        let watched = policy.watched_parameters(upstream_role);
        Self { policy, state: Mutex::new(State::default()), watched }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides `sql` under the session's current paths. `parse` names the protocol-level
    /// statement being prepared, if any: its effects wait for the Execute that runs it. A
    /// simple Query's effects are carried out now, as it is forwarded.
    fn decide(&self, ctx: &SessionContext, sql: &str, parse: Option<&str>) -> (Verdict, bool) {
        let mut st = self.state();
        let paths = st.paths.candidates(&self.policy.search_path);
        let v = self.policy.decide_in(sql, &paths, &ctx.database);
        if v.decision.is_deny() {
            if parse == Some("") {
                // A refused unnamed statement leaves nothing the client may bind under "".
                st.vetted.remove("");
            }
            return (self.verdict(ctx, v.decision, &v.effects), false);
        }
        if v.effects.contains(&Effect::SchemaChanged) {
            super::schema::changed();
        }
        // A prepared statement runs with its names resolved again when the path changed since
        // it was prepared (Postgres's plan cache does so): decide it again under the new paths.
        for name in executes(&v.effects) {
            if let Err(refusal) = self.recheck(&mut st, &name, &ctx.database, 0) {
                return (Verdict::Refuse(refusal), false);
            }
        }
        let generation = st.paths.generation;
        if let Some(name) = parse {
            let capped = is_capped(&v.decision);
            let vetted = Vetted { sql: sql.to_owned(), capped, changes: path_changes(&v.effects), executes: executes(&v.effects), generation };
            Self::remember(&mut st, name, vetted);
        } else {
            for e in &v.effects {
                if let Effect::Prepared(name) = e {
                    // The PREPARE's query is re-decided as part of this text.
                    let vetted = Vetted { sql: sql.to_owned(), capped: false, changes: Vec::new(), executes: Vec::new(), generation };
                    Self::remember(&mut st, name, vetted);
                }
            }
            st.paths.register(&path_changes(&v.effects));
        }
        let capped = is_capped(&v.decision);
        (self.verdict(ctx, v.decision, &v.effects), capped)
    }

    fn remember(st: &mut State, name: &str, vetted: Vetted) {
        let texts = st.vetted.entry(name.to_owned()).or_default();
        if name.is_empty() {
            // Postgres replaces the unnamed statement at every Parse.
            texts.clear();
        }
        texts.retain(|v| v.sql != vetted.sql);
        texts.push(vetted);
    }

    /// Checks that every statement vetted as `name` is still allowed under the current paths
    /// (with the prepared statements it executes in turn). Fails closed on a name pglease is
    /// not tracking.
    fn recheck(&self, st: &mut State, name: &str, database: &str, depth: usize) -> Result<(), ClientError> {
        let refused = |why: String| ClientError::error(sqlstate::INSUFFICIENT_PRIVILEGE, format!("pglease: scope \"{}\" {why}", self.policy.name));
        let Some(texts) = st.vetted.get(name) else {
            let shown = if name.is_empty() { "the unnamed statement".to_owned() } else { format!("statement \"{name}\"") };
            return Err(refused(format!("cannot run {shown}: pglease has not checked it")));
        };
        let generation = st.paths.generation;
        let stale: Vec<(usize, String)> = texts.iter().enumerate().filter(|(_, v)| v.generation != generation).map(|(i, v)| (i, v.sql.clone())).collect();
        let nested: Vec<String> = texts.iter().flat_map(|v| v.executes.clone()).collect();
        if !stale.is_empty() {
            let paths = st.paths.candidates(&self.policy.search_path);
            for (_, sql) in &stale {
                if let Decision::Deny { message, .. } = self.policy.decide_in(sql, &paths, database).decision {
                    return Err(ClientError::error(
                        sqlstate::INSUFFICIENT_PRIVILEGE,
                        format!("{message} (statement \"{name}\" was checked again under the session's new search_path)"),
                    ));
                }
            }
            if let Some(texts) = st.vetted.get_mut(name) {
                texts.iter_mut().for_each(|v| v.generation = generation);
            }
        }
        // EXPLAIN EXECUTE p inside a prepared statement: p's own texts too (one level deep is
        // all PREPARE allows).
        if depth == 0 {
            for inner in nested {
                self.recheck(st, &inner, database, depth + 1)?;
            }
        }
        Ok(())
    }

    /// The decision as the session carries it out: a client's `SET application_name` runs with
    /// pglease's stamp in front of the client's name, and `SHOW application_name` shows the
    /// client's name without it.
    fn verdict(&self, ctx: &SessionContext, decision: Decision, effects: &[Effect]) -> Verdict {
        if let Decision::Allow = decision {
            for e in effects {
                match e {
                    Effect::ApplicationName { value, local } => {
                        let stamped = crate::server::stamp(&ctx.identity, value);
                        let scope = if *local { "LOCAL " } else { "" };
                        return Verdict::Rewrite { sql: format!("SET {scope}application_name = '{}'", stamped.replace('\'', "''")), notice: None };
                    }
                    Effect::ShowApplicationName => return Verdict::Rewrite { sql: show_application_name(&ctx.identity), notice: None },
                    _ => {}
                }
            }
        }
        match decision {
            Decision::Allow => Verdict::Forward,
            Decision::Rewrite { sql, notice, .. } => Verdict::Rewrite { sql, notice },
            Decision::Deny { code, message } => Verdict::Refuse(ClientError::error(code_str(&code), message)),
        }
    }
}

/// The application_name the client set, from the stamped one Postgres holds
/// (`pglease <person> <grant> / <client's name>`).
pub fn client_application_name(identity: &crate::auth::Identity, upstream: &str) -> String {
    let stamp = crate::server::stamp(identity, "");
    if upstream == stamp {
        return String::new();
    }
    match upstream.strip_prefix(&stamp).and_then(|rest| rest.strip_prefix(" / ")) {
        Some(client) => client.to_owned(),
        None => upstream.to_owned(),
    }
}

/// `SHOW application_name` as a query that strips the stamp from the value in force (which
/// follows SET LOCAL and rollbacks as Postgres applies them). Its command tag is `SELECT 1`.
fn show_application_name(identity: &crate::auth::Identity) -> String {
    let stamp = crate::server::stamp(identity, "");
    let quoted = stamp.replace('\'', "''");
    let from = stamp.chars().count() + 4;
    format!(
        "SELECT CASE WHEN s = '{quoted}' THEN '' WHEN starts_with(s, '{quoted} / ') THEN substr(s, {from}) ELSE s END AS application_name \
         FROM current_setting('application_name') AS s"
    )
}

/// SQLSTATEs the policy emits, as the `&'static str` [`ClientError`] wants.
fn code_str(code: &str) -> &'static str {
    match code {
        "42601" => "42601",
        _ => sqlstate::INSUFFICIENT_PRIVILEGE,
    }
}

#[async_trait::async_trait]
impl SessionHooks for PolicyHooks {
    async fn on_query(&self, ctx: &SessionContext, sql: &str) -> Verdict {
        // Every Query gets one ReadyForQuery back, refused or not (see `session`).
        self.state().paths.outstanding += 1;
        // A grant whose read budget is spent may still end its transaction and leave.
        let spent = ctx.reads.as_ref().and_then(|m| m.refusal()).filter(|_| !super::returns_no_rows(sql));
        let (verdict, capped) = match spent {
            Some(refusal) => (Verdict::Refuse(refusal), false),
            None => self.decide(ctx, sql, None),
        };
        self.state().results.push_back(Awaiting::Query { capped });
        verdict
    }

    async fn on_parse(&self, ctx: &SessionContext, parse: &Parse) -> Verdict {
        self.decide(ctx, &parse.sql, Some(&parse.name)).0
    }

    async fn on_bind(&self, ctx: &SessionContext, bind: &Bind) -> Verdict {
        let mut st = self.state();
        if let Err(refusal) = self.recheck(&mut st, &bind.statement, &ctx.database, 0) {
            st.portals.remove(&bind.portal);
            return Verdict::Refuse(refusal);
        }
        let texts = st.vetted.get(&bind.statement).map(Vec::as_slice).unwrap_or_default();
        let changes: Vec<PathChange> = texts.iter().flat_map(|v| v.changes.clone()).collect();
        // The statement Postgres has is one of these texts: the last, unless a duplicate Parse failed.
        let capped = texts.last().is_some_and(|v| v.capped);
        st.portals.insert(bind.portal.clone(), Portal { changes, capped, statement: bind.statement.clone() });
        Verdict::Forward
    }

    async fn on_execute(&self, ctx: &SessionContext, execute: &Execute) -> Verdict {
        let mut st = self.state();
        let known = st.portals.get(&execute.portal).cloned();
        if let Some(refusal) = ctx.reads.as_ref().and_then(|m| m.refusal()) {
            // A portal pglease did not see bound (a SQL cursor) may return anything.
            let texts = known.as_ref().and_then(|p| st.vetted.get(&p.statement)).map(Vec::as_slice).unwrap_or_default();
            if texts.is_empty() || !texts.iter().all(|v| super::returns_no_rows(&v.sql)) {
                return Verdict::Refuse(refusal);
            }
        }
        let portal = known.unwrap_or_default();
        // The portal's SET search_path takes effect now, before Postgres runs it.
        st.paths.register(&portal.changes);
        st.results.push_back(Awaiting::Execute { capped: portal.capped });
        Verdict::Forward
    }

    fn on_sync(&self, _ctx: &SessionContext) {
        let mut st = self.state();
        st.paths.outstanding += 1;
        st.results.push_back(Awaiting::Sync);
    }

    fn on_backend(&self, ctx: &SessionContext, event: BackendEvent<'_>) -> BackendAction {
        match event {
            BackendEvent::ParameterStatus { name, value } => {
                if let Some((_, expected)) = self.watched.iter().find(|(n, _)| *n == name)
                    && !value.eq_ignore_ascii_case(expected)
                {
                    return BackendAction::End(ClientError::fatal(
                        sqlstate::INSUFFICIENT_PRIVILEGE,
                        format!("pglease: ending the session: pinned setting {name} changed to \"{value}\""),
                    ));
                }
                if name == "application_name" {
                    // Every way pglease lets a session change it keeps the stamp in front.
                    if !value.starts_with(&crate::server::stamp(&ctx.identity, "")) {
                        return BackendAction::End(ClientError::fatal(
                            sqlstate::INSUFFICIENT_PRIVILEGE,
                            "pglease: ending the session: application_name lost pglease's stamp",
                        ));
                    }
                    return BackendAction::ShowValue(client_application_name(&ctx.identity, value));
                }
            }
            BackendEvent::Error(_) => {
                let mut st = self.state();
                st.paths.undone = true;
                // An error ends an Execute, and Postgres skips the rest of its batch.
                if matches!(st.results.front(), Some(Awaiting::Execute { .. })) {
                    while matches!(st.results.front(), Some(Awaiting::Execute { .. })) {
                        st.results.pop_front();
                    }
                }
            }
            BackendEvent::CommandComplete(tag) => {
                let mut st = self.state();
                // A rollback (to a savepoint too) may undo a SET; so, to be safe, may PREPARE TRANSACTION.
                if matches!(tag, "ROLLBACK" | "PREPARE TRANSACTION") {
                    st.paths.undone = true;
                }
                let capped = match st.results.front() {
                    Some(Awaiting::Query { capped }) => *capped,
                    Some(Awaiting::Execute { capped }) => {
                        let capped = *capped;
                        st.results.pop_front();
                        capped
                    }
                    _ => false,
                };
                if let (true, Some(limit), Some(rows)) = (capped, self.policy.row_limit, tag_rows(tag))
                    && rows >= limit
                {
                    return BackendAction::Notice(format!(
                        "pglease: scope \"{}\" caps results at {limit} rows: this result was cut to {limit}; more rows may match",
                        self.policy.name
                    ));
                }
            }
            BackendEvent::EmptyQuery | BackendEvent::PortalSuspended => {
                let mut st = self.state();
                if matches!(st.results.front(), Some(Awaiting::Execute { .. })) {
                    st.results.pop_front();
                }
            }
            BackendEvent::Ready(status) => {
                let mut st = self.state();
                st.paths.ready(status, &self.policy.search_path);
                while let Some(done) = st.results.pop_front() {
                    if matches!(done, Awaiting::Query { .. } | Awaiting::Sync) {
                        break;
                    }
                }
            }
        }
        BackendAction::Continue
    }
}

/// A hooks object that refuses everything: for a session whose scope has no policy loaded.
pub struct RefuseAll(pub String);

#[async_trait::async_trait]
impl SessionHooks for RefuseAll {
    async fn on_query(&self, _ctx: &SessionContext, _sql: &str) -> Verdict {
        Verdict::Refuse(ClientError::error(sqlstate::INSUFFICIENT_PRIVILEGE, self.0.clone()))
    }
    async fn on_parse(&self, _ctx: &SessionContext, _parse: &Parse) -> Verdict {
        Verdict::Refuse(ClientError::error(sqlstate::INSUFFICIENT_PRIVILEGE, self.0.clone()))
    }
    async fn on_bind(&self, _ctx: &SessionContext, _bind: &Bind) -> Verdict {
        Verdict::Refuse(ClientError::error(sqlstate::INSUFFICIENT_PRIVILEGE, self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;

    fn ctx() -> SessionContext {
        SessionContext {
            id: 1,
            identity: Identity { login: "a.g1".into(), person: "a".into(), grant_id: Some("g1".into()), scope: Some("orders-read".into()), expires_at: None },
            client_addr: "127.0.0.1:1".parse().unwrap(),
            database: "shop".into(),
            settings: vec![],
            reads: None,
        }
    }

    fn hooks() -> PolicyHooks {
        let scopes = crate::demo::demo_scopes();
        PolicyHooks::new(Arc::new(ScopePolicy::from_config("orders-read", &scopes["orders-read"])), "pglease_orders_read")
    }

    fn status(name: &str, value: &str) -> BackendEvent<'static> {
        BackendEvent::ParameterStatus { name: Box::leak(name.to_owned().into_boxed_str()), value: Box::leak(value.to_owned().into_boxed_str()) }
    }

    #[test]
    fn a_pinned_setting_that_changes_anyway_ends_the_session() {
        let h = hooks();
        for (name, value) in [("session_authorization", "postgres"), ("is_superuser", "on"), ("standard_conforming_strings", "off"), ("client_encoding", "LATIN1"), ("default_transaction_read_only", "off")] {
            assert!(matches!(h.on_backend(&ctx(), BackendEvent::ParameterStatus { name, value }), BackendAction::End(_)), "{name}");
        }
        assert_eq!(h.on_backend(&ctx(), BackendEvent::ParameterStatus { name: "session_authorization", value: "pglease_orders_read" }), BackendAction::Continue);
        assert_eq!(h.on_backend(&ctx(), BackendEvent::ParameterStatus { name: "TimeZone", value: "UTC" }), BackendAction::Continue);
    }

    #[test]
    fn the_client_sees_its_own_application_name() {
        let h = hooks();
        for (upstream, shown) in [("pglease a g1 / psql", "psql"), ("pglease a g1", ""), ("pglease a g1 / a / b", "a / b")] {
            assert_eq!(h.on_backend(&ctx(), status("application_name", upstream)), BackendAction::ShowValue(shown.into()), "{upstream}");
        }
        // A value without the stamp (something pglease did not see changed it) ends the session.
        assert!(matches!(h.on_backend(&ctx(), status("application_name", "other")), BackendAction::End(_)));
    }

    #[tokio::test]
    async fn only_vetted_statements_can_be_bound() {
        let h = hooks();
        let bind = |name: &str| Bind { portal: String::new(), statement: name.into(), param_formats: vec![], params: vec![], result_formats: vec![] };
        assert!(matches!(h.on_bind(&ctx(), &bind("s1")).await, Verdict::Refuse(_)));
        let parse = Parse { name: "s1".into(), sql: "SELECT id FROM orders.orders WHERE id = $1".into(), param_types: vec![] };
        assert!(matches!(h.on_parse(&ctx(), &parse).await, Verdict::Rewrite { .. }));
        assert_eq!(h.on_bind(&ctx(), &bind("s1")).await, Verdict::Forward);
        // A refused unnamed Parse leaves nothing bindable under "".
        let ok = Parse { name: String::new(), sql: "SELECT 1".into(), param_types: vec![] };
        h.on_parse(&ctx(), &ok).await;
        assert_eq!(h.on_bind(&ctx(), &bind("")).await, Verdict::Forward);
        let bad = Parse { name: String::new(), sql: "DELETE FROM orders.orders WHERE id = 1".into(), param_types: vec![] };
        assert!(matches!(h.on_parse(&ctx(), &bad).await, Verdict::Refuse(_)));
        assert!(matches!(h.on_bind(&ctx(), &bind("")).await, Verdict::Refuse(_)));
        // SQL PREPARE is tracked too; SQL EXECUTE of a name pglease never checked is refused.
        h.on_query(&ctx(), "PREPARE p2 AS SELECT 1").await;
        assert_eq!(h.on_bind(&ctx(), &bind("p2")).await, Verdict::Forward);
        assert!(!matches!(h.on_query(&ctx(), "EXECUTE p2").await, Verdict::Refuse(_)));
        assert!(matches!(h.on_query(&ctx(), "EXECUTE p3").await, Verdict::Refuse(_)));
        // pglease cannot see whether a DEALLOCATE ran (an earlier error may skip it): the
        // statement stays known, and Postgres answers for one that is gone.
        h.on_query(&ctx(), "DEALLOCATE p2").await;
        assert_eq!(h.on_bind(&ctx(), &bind("p2")).await, Verdict::Forward);
    }

    fn path_hooks() -> PolicyHooks {
        let scopes: std::collections::BTreeMap<String, crate::config::ScopeConfig> = toml::from_str(
            r#"[app]
            database = "shop"
            role = "app"
            password_env = "X"
            settings = ["search_path"]
            tables = [{ name = "app.*", allow = ["read"] }, { name = "public.t", allow = ["read"] }]"#,
        )
        .unwrap();
        PolicyHooks::new(Arc::new(ScopePolicy::from_config("app", &scopes["app"])), "app")
    }

    async fn allows(h: &PolicyHooks, sql: &str) -> bool {
        let allowed = !matches!(h.on_query(&ctx(), sql).await, Verdict::Refuse(_));
        // Decided only: not answered yet. `answer` plays Postgres.
        h.state().paths.outstanding -= 1;
        allowed
    }

    /// A simple Query forwarded and answered: its events, then ReadyForQuery with `status`.
    async fn run(h: &PolicyHooks, sql: &str, events: &[BackendEvent<'static>], status: TxStatus) -> bool {
        let allowed = !matches!(h.on_query(&ctx(), sql).await, Verdict::Refuse(_));
        for e in events {
            h.on_backend(&ctx(), clone_event(e));
        }
        h.on_backend(&ctx(), BackendEvent::Ready(status));
        allowed
    }

    fn clone_event(e: &BackendEvent<'static>) -> BackendEvent<'static> {
        match e {
            BackendEvent::CommandComplete(t) => BackendEvent::CommandComplete(t),
            BackendEvent::Ready(s) => BackendEvent::Ready(*s),
            _ => BackendEvent::EmptyQuery,
        }
    }

    fn parse_msg(name: &str, sql: &str) -> Parse {
        Parse { name: name.into(), sql: sql.into(), param_types: vec![] }
    }

    fn bind_msg(portal: &str, statement: &str) -> Bind {
        Bind { portal: portal.into(), statement: statement.into(), param_formats: vec![], params: vec![], result_formats: vec![] }
    }

    /// Parse, Bind, Execute of one statement, then Sync and its ReadyForQuery.
    async fn extended(h: &PolicyHooks, name: &str, sql: &str, status: TxStatus) {
        let c = ctx();
        h.on_parse(&c, &parse_msg(name, sql)).await;
        h.on_bind(&c, &bind_msg("", name)).await;
        h.on_execute(&c, &Execute { portal: String::new(), max_rows: 0 }).await;
        h.on_sync(&c);
        h.on_backend(&c, BackendEvent::Ready(status));
    }

    const IDLE: TxStatus = TxStatus::Idle;
    const IN_TX: TxStatus = TxStatus::InTransaction;

    #[tokio::test]
    async fn the_search_path_is_tracked_through_transactions() {
        let h = path_hooks();
        assert!(!allows(&h, "SELECT * FROM orders").await, "public.orders");
        // A SET that completes outside a transaction, nothing else in flight: in force.
        assert!(run(&h, "SET search_path TO app", &[BackendEvent::CommandComplete("SET")], IDLE).await);
        assert!(allows(&h, "SELECT * FROM orders").await, "app.orders");
        // A SET undone by a rollback: pglease cannot tell which path holds, so both count.
        assert!(run(&h, "BEGIN", &[], IN_TX).await);
        assert!(run(&h, "RESET search_path", &[], IN_TX).await);
        assert!(run(&h, "ROLLBACK", &[BackendEvent::CommandComplete("ROLLBACK")], IDLE).await);
        assert!(!allows(&h, "SELECT * FROM orders").await, "public may be in force");
        // A clean SET settles it again, also inside a transaction that commits.
        assert!(run(&h, "BEGIN", &[], IN_TX).await);
        assert!(run(&h, "SET search_path = public", &[], IN_TX).await);
        assert!(run(&h, "COMMIT", &[BackendEvent::CommandComplete("COMMIT")], IDLE).await);
        assert!(allows(&h, "SELECT * FROM t").await);
        assert!(!allows(&h, "SELECT * FROM orders").await);
        // SET LOCAL lasts until the transaction ends; while it may be in force, it counts.
        assert!(run(&h, "SET search_path = app", &[], IDLE).await);
        assert!(run(&h, "BEGIN", &[], IN_TX).await);
        assert!(run(&h, "SET LOCAL search_path TO DEFAULT", &[], IN_TX).await);
        assert!(!allows(&h, "SELECT * FROM orders").await, "DEFAULT is the pinned path, public");
        assert!(run(&h, "COMMIT", &[BackendEvent::CommandComplete("COMMIT")], IDLE).await);
        assert!(allows(&h, "SELECT * FROM orders").await, "back to app");
    }

    /// The review's findings against the first tracker, kept as regressions.
    #[tokio::test]
    async fn path_changes_count_when_they_run_not_when_they_are_parsed() {
        let c = ctx();
        // A SET parsed but never executed changes nothing.
        let h = path_hooks();
        h.on_parse(&c, &parse_msg("s", "SET search_path TO app")).await;
        h.on_sync(&c);
        h.on_backend(&c, BackendEvent::Ready(IDLE));
        assert!(!allows(&h, "SELECT * FROM orders").await);
        // Executed through the extended protocol, it counts.
        extended(&h, "s2", "SET search_path TO app", IDLE).await;
        assert!(allows(&h, "SELECT * FROM orders").await);
        // Running an old prepared SET again counts again.
        let h = path_hooks();
        h.on_parse(&c, &parse_msg("back", "SET search_path TO public")).await;
        extended(&h, "to_app", "SET search_path TO app", IDLE).await;
        assert!(allows(&h, "SELECT * FROM orders").await);
        h.on_bind(&c, &bind_msg("", "back")).await;
        h.on_execute(&c, &Execute { portal: String::new(), max_rows: 0 }).await;
        assert!(!allows(&h, "SELECT * FROM orders").await, "public may be in force again");
    }

    #[tokio::test]
    async fn pipelined_answers_do_not_settle_later_changes() {
        let h = path_hooks();
        // Four Queries sent back to back; the first one's answer comes before the rest run.
        assert!(h.on_query(&ctx(), "SELECT 1").await == Verdict::Forward);
        assert!(!matches!(h.on_query(&ctx(), "BEGIN").await, Verdict::Refuse(_)));
        assert!(!matches!(h.on_query(&ctx(), "SET search_path TO app").await, Verdict::Refuse(_)));
        assert!(!matches!(h.on_query(&ctx(), "ROLLBACK").await, Verdict::Refuse(_)));
        h.on_backend(&ctx(), BackendEvent::Ready(IDLE));
        h.on_backend(&ctx(), BackendEvent::Ready(IN_TX));
        h.on_backend(&ctx(), BackendEvent::Ready(IN_TX));
        h.on_backend(&ctx(), BackendEvent::CommandComplete("ROLLBACK"));
        h.on_backend(&ctx(), BackendEvent::Ready(IDLE));
        assert!(!allows(&h, "SELECT * FROM orders").await, "the SET was rolled back: public");
    }

    #[tokio::test]
    async fn a_prepared_statement_is_checked_again_after_the_path_changes() {
        let h = path_hooks();
        let c = ctx();
        assert!(run(&h, "SET search_path TO app", &[], IDLE).await);
        assert_eq!(h.on_parse(&c, &parse_msg("s1", "SELECT * FROM orders")).await, Verdict::Forward);
        assert!(run(&h, "PREPARE p AS SELECT * FROM orders", &[], IDLE).await);
        assert_eq!(h.on_parse(&c, &parse_msg("s2", "EXPLAIN ANALYZE EXECUTE p")).await, Verdict::Forward);
        assert_eq!(h.on_bind(&c, &bind_msg("", "s1")).await, Verdict::Forward);
        // Postgres re-resolves a prepared statement's names under the new path: so does pglease.
        assert!(run(&h, "RESET search_path", &[], IDLE).await);
        assert!(matches!(h.on_bind(&c, &bind_msg("", "s1")).await, Verdict::Refuse(e) if e.message.contains("checked again")));
        assert!(!allows(&h, "EXECUTE p").await);
        assert!(!allows(&h, "EXPLAIN EXECUTE p").await);
        // …also through a statement that executes it.
        assert!(matches!(h.on_bind(&c, &bind_msg("", "s2")).await, Verdict::Refuse(_)));
        // A second Parse of a name that exists fails in Postgres, which keeps the first text.
        assert_eq!(h.on_parse(&c, &parse_msg("s1", "SELECT 1")).await, Verdict::Forward);
        assert!(matches!(h.on_bind(&c, &bind_msg("", "s1")).await, Verdict::Refuse(_)));
        assert!(allows(&h, "PREPARE p AS SELECT 1").await);
        assert!(!allows(&h, "EXECUTE p").await, "the first text of p may still be the one Postgres has");
    }
}
