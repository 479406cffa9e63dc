//! Scopes as loaded: what a grant is for. The statement rules join them in the policy work.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::ScopeConfig;

#[derive(Debug, Clone, Serialize)]
pub struct Scope {
    pub name: String,
    pub description: String,
    /// The database grants connect to by default.
    pub database: String,
    /// Every database a grant of the scope may connect to (the default first).
    pub databases: Vec<String>,
    /// The Postgres login role that backs the scope.
    pub role: String,
    #[serde(serialize_with = "secs")]
    pub max_duration: Duration,
    /// Groups whose members may approve; empty: any approver.
    pub approvers: Vec<String>,
    /// Longest break-glass grant, when break-glass is allowed.
    #[serde(serialize_with = "opt_secs")]
    pub break_glass: Option<Duration>,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(d.as_secs()),
        None => s.serialize_none(),
    }
}

impl Scope {
    pub fn from_config(name: &str, c: &ScopeConfig) -> Self {
        Self {
            name: name.to_owned(),
            description: c.description.clone(),
            database: c.default_database(),
            databases: c.databases(),
            role: c.role.clone(),
            max_duration: c.max_duration,
            approvers: c.approvers.clone(),
            break_glass: c.break_glass.as_ref().map(|b| b.max_duration),
        }
    }
}

/// All scopes, by name.
#[derive(Debug, Clone, Default)]
pub struct Scopes {
    by_name: BTreeMap<String, Scope>,
}

impl Scopes {
    pub fn from_config(scopes: &BTreeMap<String, ScopeConfig>) -> Self {
        Self { by_name: scopes.iter().map(|(n, c)| (n.clone(), Scope::from_config(n, c))).collect() }
    }

    pub fn new(scopes: impl IntoIterator<Item = Scope>) -> Self {
        Self { by_name: scopes.into_iter().map(|s| (s.name.clone(), s)).collect() }
    }

    pub fn get(&self, name: &str) -> Option<&Scope> {
        self.by_name.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &Scope> {
        self.by_name.values()
    }
}
