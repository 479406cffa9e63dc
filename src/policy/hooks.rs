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
            }
        }
    }

    fn verdict(decision: Decision) -> Verdict {
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
    async fn on_query(&self, _ctx: &SessionContext, sql: &str) -> Verdict {
        let v = self.policy.decide(sql);
        if !v.decision.is_deny() {
            self.apply(&v.effects);
        }
        Self::verdict(v.decision)
    }

    async fn on_parse(&self, _ctx: &SessionContext, parse: &Parse) -> Verdict {
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
        Self::verdict(v.decision)
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
