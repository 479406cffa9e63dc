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
    /// Durations are shown as written (`8h`), in the API and the CLI alike.
    #[serde(serialize_with = "human")]
    pub max_duration: Duration,
    /// Groups whose members may approve; empty: any approver.
    pub approvers: Vec<String>,
    /// Longest break-glass grant, when break-glass is allowed.
    #[serde(serialize_with = "opt_human")]
    pub break_glass: Option<Duration>,
    /// What a session of the scope may do, as configured.
    pub rules: Rules,
    /// The scope as configured, for deciding statements offline (the console's check box)
    /// and for its role's SQL.
    #[serde(skip)]
    pub config: ScopeConfig,
}

/// A scope's statement rules as configured (for `scope show`); the policy compiles them.
#[derive(Debug, Clone, Serialize)]
pub struct Rules {
    pub tables: Vec<crate::config::TableRuleConfig>,
    pub search_path: Vec<String>,
    pub row_limit: Option<u64>,
    /// Read budget per grant (`max_rows_read`, `max_bytes_read` in bytes).
    pub max_rows_read: Option<u64>,
    pub max_bytes_read: Option<u64>,
    #[serde(serialize_with = "opt_human")]
    pub statement_timeout: Option<Duration>,
    pub require_where: bool,
    pub settings: Vec<String>,
    pub functions_allow: Vec<String>,
    pub functions_deny: Vec<String>,
    pub statements: Vec<crate::config::StatementClass>,
    pub catalog: bool,
}

fn human<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::time::human_duration(*d))
}

fn opt_human<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => human(d, s),
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
            rules: Rules {
                tables: c.tables.clone(),
                search_path: c.search_path.clone(),
                row_limit: c.row_limit,
                max_rows_read: c.max_rows_read,
                max_bytes_read: c.max_bytes_read.map(|b| b.as_u64()),
                statement_timeout: c.statement_timeout,
                require_where: c.require_where,
                settings: c.settings.clone(),
                functions_allow: c.functions.allow.clone(),
                functions_deny: c.functions.deny.clone(),
                statements: c.statements.clone(),
                catalog: c.catalog,
            },
            config: c.clone(),
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
