//! The policy in a session: every Query, Parse and Bind is decided before it reaches Postgres,
//! prepared-statement names are tracked so that only vetted statements can be bound, the
//! session's `search_path` is tracked so that names resolve as Postgres will resolve them,
//! and pinned settings are watched in `ParameterStatus`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Decision, Effect, ScopePolicy};
use crate::codec::messages::{Bind, Parse, TxStatus};
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
    /// vetted by Parse or SQL PREPARE, with the text that was decided and under which paths.
    vetted: HashMap<String, Vetted>,
    paths: PathTracker,
}

struct Vetted {
    sql: String,
    generation: u64,
}

/// The `search_path`s a session may be under.
///
/// A `SET search_path` is decided before it runs, and whether it took effect is only known at
/// the end of its transaction: an error or a `ROLLBACK` (to a savepoint too) may undo it, and
/// `SET LOCAL` ends with the transaction. Until then, and whenever pglease cannot tell, every
/// path the session may be under is a candidate and a statement must be allowed under all of
/// them. At a `ReadyForQuery` outside a transaction with no error and no rollback since the
/// last one, the last session-level `SET` is in force: the candidates collapse to it.
#[derive(Default)]
struct PathTracker {
    /// Candidates outside the current transaction; empty means the scope's pinned path.
    settled: Vec<Vec<String>>,
    /// `SET search_path` since the last idle `ReadyForQuery`, in order (None: the pinned path).
    session: Vec<Option<Vec<String>>>,
    /// `SET LOCAL search_path` in the current transaction.
    local: Vec<Vec<String>>,
    /// An error or a rollback since the last idle `ReadyForQuery`.
    undone: bool,
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
        self.session.iter().for_each(|p| add(p.as_deref().unwrap_or(pinned)));
        self.local.iter().for_each(|p| add(p));
        if out.len() == 1 && out[0] == pinned { Vec::new() } else { out }
    }

    fn set(&mut self, path: Option<Vec<String>>, local: bool) {
        match (path, local) {
            (Some(p), true) => self.local.push(p),
            // SET LOCAL … TO DEFAULT: the path the transaction started with, among the settled.
            (None, true) => {}
            (p, false) => self.session.push(p),
        }
        self.generation += 1;
    }

    fn ready(&mut self, status: TxStatus, pinned: &[String]) {
        if status != TxStatus::Idle {
            return;
        }
        if !self.session.is_empty() || !self.local.is_empty() {
            if !self.undone {
                if let Some(last) = self.session.last() {
                    self.settled = vec![last.clone().unwrap_or_else(|| pinned.to_vec())];
                }
            } else {
                let undone: Vec<Vec<String>> = self.session.iter().map(|p| p.clone().unwrap_or_else(|| pinned.to_vec())).collect();
                if self.settled.is_empty() {
                    self.settled.push(pinned.to_vec());
                }
                for p in undone {
                    if !self.settled.contains(&p) {
                        self.settled.push(p);
                    }
                }
            }
            if self.settled.len() == 1 && self.settled[0] == pinned {
                self.settled.clear();
            }
            self.session.clear();
            self.local.clear();
            self.generation += 1;
        }
        self.undone = false;
    }
}

impl PolicyHooks {
    pub fn new(policy: Arc<ScopePolicy>, upstream_role: &str) -> Self {
        let watched = policy.watched_parameters(upstream_role);
        Self { policy, state: Mutex::new(State::default()), watched }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides `sql` under the session's current paths, and carries out its effects when it
    /// is allowed. `parse` names the protocol-level statement being prepared, if any.
    fn decide(&self, ctx: &SessionContext, sql: &str, parse: Option<&str>) -> Verdict {
        let mut st = self.state();
        let paths = st.paths.candidates(&self.policy.search_path);
        let v = self.policy.decide_in(sql, &paths);
        if let Some(name) = parse {
            if v.decision.is_deny() {
                // A refused statement replaces nothing the client may bind.
                st.vetted.remove(name);
            } else {
                let generation = st.paths.generation;
                st.vetted.insert(name.to_owned(), Vetted { sql: sql.to_owned(), generation });
            }
        }
        if v.decision.is_deny() {
            return self.verdict(ctx, v.decision, &v.effects);
        }
        // A prepared statement runs with its names resolved again when the path changed since
        // it was prepared (Postgres's plan cache does so): decide it again under the new paths.
        for e in &v.effects {
            if let Effect::Executed(name) = e
                && let Some(refusal) = self.recheck(&mut st, name)
            {
                return Verdict::Refuse(refusal);
            }
        }
        for e in &v.effects {
            match e {
                Effect::Prepared(name) => {
                    let generation = st.paths.generation;
                    st.vetted.insert(name.clone(), Vetted { sql: sql.to_owned(), generation });
                }
                Effect::Deallocated(Some(name)) => {
                    st.vetted.remove(name);
                }
                Effect::Deallocated(None) => {
                    // DEALLOCATE ALL drops SQL-level and protocol-level named statements alike.
                    st.vetted.retain(|n, _| n.is_empty());
                }
                Effect::SearchPath { path, local } => st.paths.set(path.clone(), *local),
                Effect::ApplicationName { .. } | Effect::ShowApplicationName | Effect::Executed(_) => {}
            }
        }
        self.verdict(ctx, v.decision, &v.effects)
    }

    /// `Some(refusal)` if the statement vetted as `name` is not allowed under the current paths.
    fn recheck(&self, st: &mut State, name: &str) -> Option<ClientError> {
        let generation = st.paths.generation;
        let vetted = st.vetted.get(name)?;
        if vetted.generation == generation {
            return None;
        }
        let paths = st.paths.candidates(&self.policy.search_path);
        match self.policy.decide_in(&vetted.sql, &paths).decision {
            Decision::Deny { message, .. } => Some(ClientError::error(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!("{message} (statement \"{name}\" was checked again under the session's new search_path)"),
            )),
            _ => {
                if let Some(v) = st.vetted.get_mut(name) {
                    v.generation = generation;
                }
                None
            }
        }
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
                        return Verdict::Rewrite(format!("SET {scope}application_name = '{}'", stamped.replace('\'', "''")));
                    }
                    Effect::ShowApplicationName => return Verdict::Rewrite(show_application_name(&ctx.identity)),
                    _ => {}
                }
            }
        }
        match decision {
            Decision::Allow => Verdict::Forward,
            Decision::Rewrite { sql, .. } => Verdict::Rewrite(sql),
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
        self.decide(ctx, sql, None)
    }

    async fn on_parse(&self, ctx: &SessionContext, parse: &Parse) -> Verdict {
        self.decide(ctx, &parse.sql, Some(&parse.name))
    }

    async fn on_bind(&self, _ctx: &SessionContext, bind: &Bind) -> Verdict {
        let mut st = self.state();
        if st.vetted.contains_key(&bind.statement) {
            return match self.recheck(&mut st, &bind.statement) {
                Some(refusal) => Verdict::Refuse(refusal),
                None => Verdict::Forward,
            };
        }
        let shown = if bind.statement.is_empty() { "the unnamed statement".to_owned() } else { format!("statement \"{}\"", bind.statement) };
        Verdict::Refuse(ClientError::error(sqlstate::INSUFFICIENT_PRIVILEGE, format!("pglease: scope \"{}\" cannot bind {shown}: pglease has not checked it", self.policy.name)))
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
                    return BackendAction::ShowValue(client_application_name(&ctx.identity, value));
                }
            }
            BackendEvent::Error(_) => self.state().paths.undone = true,
            // A rollback (to a savepoint too) may undo a SET; so, to be safe, may PREPARE TRANSACTION.
            BackendEvent::CommandComplete("ROLLBACK" | "PREPARE TRANSACTION") => self.state().paths.undone = true,
            BackendEvent::Ready(status) => self.state().paths.ready(status, &self.policy.search_path),
            _ => {}
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
        for (upstream, shown) in [("pglease a g1 / psql", "psql"), ("pglease a g1", ""), ("pglease a g1 / a / b", "a / b"), ("other", "other")] {
            assert_eq!(h.on_backend(&ctx(), status("application_name", upstream)), BackendAction::ShowValue(shown.into()), "{upstream}");
        }
    }

    #[tokio::test]
    async fn only_vetted_statements_can_be_bound() {
        let h = hooks();
        let bind = |name: &str| Bind { portal: String::new(), statement: name.into(), param_formats: vec![], params: vec![], result_formats: vec![] };
        assert!(matches!(h.on_bind(&ctx(), &bind("s1")).await, Verdict::Refuse(_)));
        let parse = Parse { name: "s1".into(), sql: "SELECT id FROM orders.orders WHERE id = $1".into(), param_types: vec![] };
        assert!(matches!(h.on_parse(&ctx(), &parse).await, Verdict::Rewrite(_)));
        assert_eq!(h.on_bind(&ctx(), &bind("s1")).await, Verdict::Forward);
        // A refused unnamed Parse leaves nothing bindable under "".
        let ok = Parse { name: String::new(), sql: "SELECT 1".into(), param_types: vec![] };
        h.on_parse(&ctx(), &ok).await;
        assert_eq!(h.on_bind(&ctx(), &bind("")).await, Verdict::Forward);
        let bad = Parse { name: String::new(), sql: "DELETE FROM orders.orders WHERE id = 1".into(), param_types: vec![] };
        assert!(matches!(h.on_parse(&ctx(), &bad).await, Verdict::Refuse(_)));
        assert!(matches!(h.on_bind(&ctx(), &bind("")).await, Verdict::Refuse(_)));
        // SQL PREPARE and DEALLOCATE are tracked too.
        h.on_query(&ctx(), "PREPARE p2 AS SELECT 1").await;
        assert_eq!(h.on_bind(&ctx(), &bind("p2")).await, Verdict::Forward);
        h.on_query(&ctx(), "DEALLOCATE p2").await;
        assert!(matches!(h.on_bind(&ctx(), &bind("p2")).await, Verdict::Refuse(_)));
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
        !matches!(h.on_query(&ctx(), sql).await, Verdict::Refuse(_))
    }

    #[tokio::test]
    async fn the_search_path_is_tracked_through_transactions() {
        let h = path_hooks();
        let c = ctx();
        assert!(!allows(&h, "SELECT * FROM orders").await, "public.orders");
        // A SET that completes outside a transaction is in force.
        assert!(allows(&h, "SET search_path TO app").await);
        // Until its outcome is known, both paths are candidates.
        assert!(!allows(&h, "SELECT * FROM orders").await);
        h.on_backend(&c, BackendEvent::CommandComplete("SET"));
        h.on_backend(&c, BackendEvent::Ready(TxStatus::Idle));
        assert!(allows(&h, "SELECT * FROM orders").await, "app.orders");
        // A SET undone by a rollback: pglease cannot tell which path holds, so both count.
        assert!(allows(&h, "RESET search_path").await);
        h.on_backend(&c, BackendEvent::Ready(TxStatus::InTransaction));
        h.on_backend(&c, BackendEvent::CommandComplete("ROLLBACK"));
        h.on_backend(&c, BackendEvent::Ready(TxStatus::Idle));
        assert!(!allows(&h, "SELECT * FROM orders").await, "public may be in force");
        // A clean SET settles it again; SET LOCAL lasts until the transaction ends.
        assert!(allows(&h, "SET search_path = public").await);
        h.on_backend(&c, BackendEvent::Ready(TxStatus::Idle));
        assert!(allows(&h, "SELECT * FROM t").await);
        assert!(allows(&h, "SET LOCAL search_path = app").await);
        assert!(!allows(&h, "SELECT * FROM orders").await, "the transaction may not have started");
        h.on_backend(&c, BackendEvent::Ready(TxStatus::Idle));
        assert!(!allows(&h, "SELECT * FROM orders").await);
    }

    #[tokio::test]
    async fn a_prepared_statement_is_checked_again_after_the_path_changes() {
        let h = path_hooks();
        let c = ctx();
        let bind = |name: &str| Bind { portal: String::new(), statement: name.into(), param_formats: vec![], params: vec![], result_formats: vec![] };
        assert!(allows(&h, "SET search_path TO app").await);
        h.on_backend(&c, BackendEvent::Ready(TxStatus::Idle));
        let parse = Parse { name: "s1".into(), sql: "SELECT * FROM orders".into(), param_types: vec![] };
        assert_eq!(h.on_parse(&c, &parse).await, Verdict::Forward);
        assert!(allows(&h, "PREPARE p AS SELECT * FROM orders").await);
        assert_eq!(h.on_bind(&c, &bind("s1")).await, Verdict::Forward);
        // Postgres re-resolves a prepared statement's names under the new path: so does pglease.
        assert!(allows(&h, "RESET search_path").await);
        h.on_backend(&c, BackendEvent::Ready(TxStatus::Idle));
        assert!(matches!(h.on_bind(&c, &bind("s1")).await, Verdict::Refuse(e) if e.message.contains("checked again")));
        assert!(!allows(&h, "EXECUTE p").await);
        assert!(!allows(&h, "EXPLAIN EXECUTE p").await);
    }
}
