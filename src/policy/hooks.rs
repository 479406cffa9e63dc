//! The policy in a session: every Query, Parse and Bind is decided before it reaches Postgres,
//! prepared-statement names are tracked so that only vetted statements can be bound, and
//! pinned settings are watched in `ParameterStatus`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::{Decision, Effect, ScopePolicy};
use crate::codec::messages::{Bind, Parse};
use crate::error::{ClientError, sqlstate};
use crate::session::{BackendAction, BackendEvent, SessionContext, SessionHooks, Verdict};

pub struct PolicyHooks {
    policy: Arc<ScopePolicy>,
    /// Statement names this session may bind: vetted by Parse or SQL PREPARE. "" is the
    /// unnamed statement.
    vetted: Mutex<HashSet<String>>,
    /// ParameterStatus values that must not change.
    watched: Vec<(&'static str, String)>,
}

impl PolicyHooks {
    pub fn new(policy: Arc<ScopePolicy>, upstream_role: &str) -> Self {
        let watched = policy.watched_parameters(upstream_role);
        Self { policy, vetted: Mutex::new(HashSet::new()), watched }
    }

    fn vetted(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.vetted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, effects: &[Effect]) {
        let mut vetted = self.vetted();
        for e in effects {
            match e {
                Effect::Prepared(name) => {
                    vetted.insert(name.clone());
                }
                Effect::Deallocated(Some(name)) => {
                    vetted.remove(name);
                }
                Effect::Deallocated(None) => {
                    // DEALLOCATE ALL drops SQL-level and protocol-level named statements alike.
                    vetted.retain(|n| n.is_empty());
                }
                Effect::ApplicationName { .. } => {}
            }
        }
    }

    /// The decision as the session carries it out: a client's `SET application_name` runs with
    /// pglease's stamp in front of the client's name.
    fn verdict(ctx: &SessionContext, decision: Decision, effects: &[Effect]) -> Verdict {
        if let (Decision::Allow, Some(Effect::ApplicationName { value, local })) = (&decision, effects.iter().find(|e| matches!(e, Effect::ApplicationName { .. }))) {
            let stamped = crate::server::stamp(&ctx.identity, value);
            let scope = if *local { "LOCAL " } else { "" };
            return Verdict::Rewrite(format!("SET {scope}application_name = '{}'", stamped.replace('\'', "''")));
        }
        match decision {
            Decision::Allow => Verdict::Forward,
            Decision::Rewrite { sql, .. } => Verdict::Rewrite(sql),
            Decision::Deny { code, message } => Verdict::Refuse(ClientError::error(code_str(&code), message)),
        }
    }
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
        let v = self.policy.decide(sql);
        if !v.decision.is_deny() {
            self.apply(&v.effects);
        }
        Self::verdict(ctx, v.decision, &v.effects)
    }

    async fn on_parse(&self, ctx: &SessionContext, parse: &Parse) -> Verdict {
        let v = self.policy.decide(&parse.sql);
        if v.decision.is_deny() {
            // A refused unnamed statement replaces nothing the client may bind.
            if parse.name.is_empty() {
                self.vetted().remove("");
            }
        } else {
            self.apply(&v.effects);
            self.vetted().insert(parse.name.clone());
        }
        Self::verdict(ctx, v.decision, &v.effects)
    }

    async fn on_bind(&self, _ctx: &SessionContext, bind: &Bind) -> Verdict {
        if self.vetted().contains(&bind.statement) {
            Verdict::Forward
        } else {
            let shown = if bind.statement.is_empty() { "the unnamed statement".to_owned() } else { format!("statement \"{}\"", bind.statement) };
            Verdict::Refuse(ClientError::error(sqlstate::INSUFFICIENT_PRIVILEGE, format!("pglease: scope \"{}\" cannot bind {shown}: pglease has not checked it", self.policy.name)))
        }
    }

    fn on_backend(&self, _ctx: &SessionContext, event: BackendEvent<'_>) -> BackendAction {
        if let BackendEvent::ParameterStatus { name, value } = event
            && let Some((_, expected)) = self.watched.iter().find(|(n, _)| *n == name)
            && !value.eq_ignore_ascii_case(expected)
        {
            return BackendAction::End(ClientError::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!("pglease: ending the session: pinned setting {name} changed to \"{value}\""),
            ));
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

    #[test]
    fn a_pinned_setting_that_changes_anyway_ends_the_session() {
        let h = hooks();
        for (name, value) in [("session_authorization", "postgres"), ("is_superuser", "on"), ("standard_conforming_strings", "off"), ("client_encoding", "LATIN1"), ("default_transaction_read_only", "off")] {
            assert!(matches!(h.on_backend(&ctx(), BackendEvent::ParameterStatus { name, value }), BackendAction::End(_)), "{name}");
        }
        assert_eq!(h.on_backend(&ctx(), BackendEvent::ParameterStatus { name: "session_authorization", value: "pglease_orders_read" }), BackendAction::Continue);
        assert_eq!(h.on_backend(&ctx(), BackendEvent::ParameterStatus { name: "TimeZone", value: "UTC" }), BackendAction::Continue);
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
}
