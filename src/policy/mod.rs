//! Scoped statement policy: every statement is parsed with the real Postgres grammar
//! (`pg_query`) and checked against the scope before any byte of it reaches Postgres.
//!
//! [`ScopePolicy::decide`] is pure (no IO): statement text in, [`Decision`] out. The proxy and
//! `pglease scope check` call the same function. It fails closed: SQL that does not parse,
//! statement kinds it does not know, functions it does not know — all are refused.

pub mod functions;
pub mod hooks;
pub mod rolecheck;
mod rewrite;
pub mod shape;
pub mod sql;
mod walk;

use std::collections::HashSet;
use std::time::Duration;

use dashmap::DashMap;
use serde_json::Value;

use serde::Serialize;

use crate::config::{Action, ScopeConfig};

/// What the proxy does with a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "lowercase")]
pub enum Decision {
    Allow,
    /// Run `sql` instead (row cap applied).
    Rewrite { sql: String, reason: String },
    /// Refuse, with this SQLSTATE and message.
    Deny { code: String, message: String },
}

impl Decision {
    pub fn is_deny(&self) -> bool {
        matches!(self, Decision::Deny { .. })
    }
}

/// Side effects on session state the proxy tracks (prepared statement names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Prepared(String),
    Deallocated(Option<String>),
    /// `SET [LOCAL] application_name` (or RESET: empty): the session runs it with pglease's
    /// stamp in front of the client's name.
    ApplicationName { value: String, local: bool },
}

/// A decision with the session effects of the statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub effects: Vec<Effect>,
}

/// One table rule, compiled.
#[derive(Debug, Clone)]
struct TableRule {
    schema: String,
    table: String,
    actions: HashSet<Action>,
    deny_columns: Vec<String>,
}

fn glob(pattern: &str, name: &str) -> bool {
    // `*` matches any run of characters; everything else literally.
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            if !rest.starts_with(part) {
                return false;
            }
            rest = &rest[part.len()..];
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else if let Some(pos) = rest.find(part) {
            rest = &rest[pos + part.len()..];
        } else {
            return false;
        }
    }
    true
}

/// Settings anyone may change: they only shape how values are shown.
const HARMLESS_SETTINGS: &[&str] = &["datestyle", "timezone", "intervalstyle", "extra_float_digits", "client_min_messages", "bytea_output"];

/// Settings pglease pins for every session, whatever the scope says: they change privilege,
/// name resolution, how SQL is parsed, or what the audit trail shows.
pub const PINNED_SETTINGS: &[&str] = &[
    "role", "session_authorization", "search_path", "standard_conforming_strings", "client_encoding", "default_transaction_read_only",
    "transaction_read_only", "application_name", "session_replication_role", "backslash_quote", "escape_string_warning",
    "default_tablespace", "temp_tablespaces", "log_statement", "log_min_duration_statement", "row_security",
];

/// A scope's statement rules, ready to decide. Decisions are cached by statement text, and
/// where provably the same for every literal value, by statement shape (see [`shape`]).
pub struct ScopePolicy {
    pub name: String,
    rules: Vec<TableRule>,
    catalog: bool,
    pub search_path: Vec<String>,
    pub row_limit: Option<u64>,
    pub statement_timeout: Option<Duration>,
    require_where: bool,
    settings: HashSet<String>,
    any_setting: bool,
    functions_allow: HashSet<String>,
    any_function: bool,
    functions_deny: HashSet<String>,
    /// True when no rule allows anything but reading: sessions run read-only transactions.
    pub read_only: bool,
    /// Decisions by exact statement text. Sharded: sessions of a scope do not queue on one lock.
    exact: DashMap<String, Verdict>,
    /// Decisions by statement shape, for the statements where that is sound.
    shapes: DashMap<String, Verdict>,
}

/// Decisions kept per scope and cache; a cache is emptied when full (statement texts repeat,
/// so it refills with the hot ones at once).
const CACHE_ENTRIES: usize = 10_000;

/// Statement kinds whose checks read names, never literal values (see [`shape`]).
const SHAPE_SAFE_STATEMENTS: &[&str] = &["SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt"];

/// Every string in a parse tree but the literal values themselves (the `Sval`, `Fval` and
/// `Bsval` of an `A_Const`): names, aliases, and anything else the grammar made of a token.
fn tree_strings<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
    match v {
        Value::String(x) => out.push(x),
        Value::Object(m) => m.iter().filter(|(k, _)| !matches!(k.as_str(), "Sval" | "Fval" | "Bsval")).for_each(|(_, x)| tree_strings(x, out)),
        Value::Array(a) => a.iter().for_each(|x| tree_strings(x, out)),
        _ => {}
    }
}

/// An identifier as Postgres would print it: bare when it needs no quotes.
fn quote_ident(s: &str) -> String {
    let plain = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain { s.to_owned() } else { format!("\"{}\"", s.replace('"', "\"\"")) }
}

/// Postgres truncates identifiers to NAMEDATALEN - 1 bytes.
fn truncate_ident(s: &str) -> &str {
    if s.len() <= 63 {
        return s;
    }
    let mut end = 63;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl ScopePolicy {
    pub fn from_config(name: &str, c: &ScopeConfig) -> Self {
        let rules: Vec<TableRule> = c
            .tables
            .iter()
            .map(|r| {
                let (schema, table) = r.name.split_once('.').unwrap_or(("*", "*"));
                let mut actions: HashSet<Action> = r.allow.iter().copied().collect();
                if actions.contains(&Action::All) {
                    actions.extend([
                        Action::Read,
                        Action::Insert,
                        Action::Update,
                        Action::Delete,
                        Action::Truncate,
                        Action::CopyIn,
                        Action::CopyOut,
                        Action::Ddl,
                        Action::Maintenance,
                    ]);
                }
                TableRule { schema: schema.to_owned(), table: table.to_owned(), actions, deny_columns: r.deny_columns.clone() }
            })
            .collect();
        let read_only = rules.iter().all(|r| r.actions.iter().all(|a| matches!(a, Action::Read | Action::CopyOut)));
        Self {
            name: name.to_owned(),
            rules,
            catalog: c.catalog,
            search_path: c.search_path.clone(),
            row_limit: c.row_limit,
            statement_timeout: c.statement_timeout,
            require_where: c.require_where,
            settings: c.settings.iter().map(|s| s.to_ascii_lowercase()).collect(),
            any_setting: c.settings.iter().any(|s| s == "*"),
            functions_allow: c.functions.allow.iter().cloned().collect(),
            any_function: c.functions.allow.iter().any(|f| f == "*"),
            functions_deny: c.functions.deny.iter().cloned().collect(),
            read_only,
            exact: DashMap::new(),
            shapes: DashMap::new(),
        }
    }

    /// The actions allowed on `schema.table`, and its denied columns.
    fn rule_for(&self, schema: &str, table: &str) -> Option<(&HashSet<Action>, &[String])> {
        let (schema, table) = (truncate_ident(schema), truncate_ident(table));
        if let Some(r) = self.rules.iter().find(|r| glob(&r.schema, schema) && glob(&r.table, table)) {
            return Some((&r.actions, &r.deny_columns));
        }
        None
    }

    fn is_catalog(schema: &str) -> bool {
        schema == "pg_catalog" || schema == "information_schema"
    }

    /// Whether `action` is allowed on `schema.table`.
    pub fn allows(&self, schema: &str, table: &str, action: Action) -> bool {
        if let Some((actions, _)) = self.rule_for(schema, table) {
            return actions.contains(&action);
        }
        self.catalog && action == Action::Read && Self::is_catalog(schema)
    }

    /// Denied columns of the table(s) a possibly unqualified name can resolve to.
    pub fn denied_columns(&self, schema: Option<&str>, table: &str) -> Vec<String> {
        self.candidates(schema, table).iter().filter_map(|(s, t)| self.rule_for(s, t)).flat_map(|(_, cols)| cols.iter().cloned()).collect()
    }

    /// Where a relation name can resolve. An unqualified name may resolve in any schema of the
    /// pinned `search_path` (which one depends on what exists), so it must be allowed in all of
    /// them; a one-schema search_path makes this exact. `pg_*` names resolve to `pg_catalog`,
    /// which Postgres searches first.
    /// NOTE: a user relation named `pg_*` in a search_path schema, with no catalog relation of
    /// that name, would be checked as a catalog read; the role's GRANTs still apply to it.
    fn candidates(&self, schema: Option<&str>, table: &str) -> Vec<(String, String)> {
        match schema {
            Some(s) => vec![(s.to_owned(), table.to_owned())],
            None if table.starts_with("pg_") => vec![("pg_catalog".into(), table.to_owned())],
            None => self.search_path.iter().map(|s| (s.clone(), table.to_owned())).collect(),
        }
    }

    fn setting_allowed(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        if PINNED_SETTINGS.contains(&name.as_str()) {
            return false;
        }
        if name == "statement_timeout" && self.statement_timeout.is_some() {
            return false;
        }
        HARMLESS_SETTINGS.contains(&name.as_str()) || self.any_setting || self.settings.contains(&name)
    }

    /// Whether a function may be called. `schema` is the qualifier as written, if any.
    fn function_allowed(&self, schema: Option<&str>, name: &str) -> bool {
        let qualified = schema.map(|s| format!("{s}.{name}"));
        if functions::NEVER.contains(&name) {
            return false;
        }
        if let Some(q) = &qualified
            && (self.functions_allow.contains(q) || self.any_function)
        {
            return true;
        }
        if schema.is_none() && (self.functions_allow.contains(name) || self.any_function) {
            return true;
        }
        let builtin_schema = matches!(schema, None | Some("pg_catalog"));
        builtin_schema && functions::BUILTIN.contains(&name) && !self.functions_deny.contains(name) && qualified.as_ref().is_none_or(|q| !self.functions_deny.contains(q))
    }

    fn deny(&self, message: impl Into<String>) -> Decision {
        Decision::Deny { code: crate::error::sqlstate::INSUFFICIENT_PRIVILEGE.to_owned(), message: format!("pglease: scope \"{}\" {}", self.name, message.into()) }
    }

    /// The decision for `sql`: from the cache when this text, or a statement of the same
    /// shape where that is sound, was seen before.
    pub fn decide(&self, sql: &str) -> Verdict {
        if let Some(v) = self.exact.get(sql) {
            metrics::counter!("pglease_policy_cache_total", "result" => "hit").increment(1);
            return v.clone();
        }
        // The row cap compares the statement's own LIMIT value: no shape sharing then.
        let shape = if self.row_limit.is_none() { shape::of(sql) } else { None };
        if let Some(v) = shape.as_ref().and_then(|s| self.shapes.get(&s.key)) {
            metrics::counter!("pglease_policy_cache_total", "result" => "shape_hit").increment(1);
            return v.clone();
        }
        metrics::counter!("pglease_policy_cache_total", "result" => "miss").increment(1);
        let (verdict, tree) = self.decide_with_tree(sql);
        if let Some(shape) = shape
            && tree.as_ref().is_some_and(|t| Self::shape_safe(t, &verdict, &shape.literals))
        {
            if self.shapes.len() >= CACHE_ENTRIES {
                self.shapes.clear();
            }
            self.shapes.insert(shape.key, verdict.clone());
        }
        if self.exact.len() >= CACHE_ENTRIES {
            self.exact.clear();
        }
        self.exact.insert(sql.to_owned(), verdict.clone());
        verdict
    }

    /// Whether `verdict`, reached on `tree`, holds for every statement of the same shape.
    fn shape_safe(tree: &Value, verdict: &Verdict, literals: &[String]) -> bool {
        if !verdict.effects.is_empty() || matches!(verdict.decision, Decision::Rewrite { .. }) {
            return false;
        }
        let statements = tree.get("stmts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let all_safe = !statements.is_empty()
            && statements.iter().all(|s| {
                s.get("stmt").and_then(|n| n.get("node")).and_then(Value::as_object).is_some_and(|n| n.keys().all(|k| SHAPE_SAFE_STATEMENTS.contains(&k.as_str())))
            });
        if !all_safe {
            return false;
        }
        let mut strings = Vec::new();
        tree_strings(tree, &mut strings);
        !strings.iter().any(|n| literals.iter().any(|l| l == n))
    }

    /// The decision, computed from scratch.
    pub fn decide_uncached(&self, sql: &str) -> Verdict {
        self.decide_with_tree(sql).0
    }

    /// The decision, and the parse tree it was reached on (None if the statement did not parse).
    fn decide_with_tree(&self, sql: &str) -> (Verdict, Option<Value>) {
        let parsed = match pg_query::parse(sql, 0) {
            Ok(p) => p,
            Err(e) => {
                let message = e.to_string();
                let decision = Decision::Deny { code: "42601".into(), message: format!("pglease: cannot parse the statement: {message}") };
                return (Verdict { decision, effects: vec![] }, None);
            }
        };
        let tree = match serde_json::to_value(&parsed.protobuf) {
            Ok(t) => t,
            Err(_) => return (Verdict { decision: self.deny("could not inspect the statement"), effects: vec![] }, None),
        };
        let mut effects = Vec::new();
        let statements = tree.get("stmts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for stmt in statements {
            let Some(node) = stmt.get("stmt") else { continue };
            if let Err(message) = walk::check_statement(self, node, &mut effects) {
                return (Verdict { decision: self.deny(message), effects: vec![] }, Some(tree));
            }
        }
        if statements.len() > 1 && effects.iter().any(|e| matches!(e, Effect::ApplicationName { .. })) {
            return (Verdict { decision: self.deny("allows SET application_name only as a statement of its own"), effects: vec![] }, Some(tree));
        }
        let decision = match self.row_limit {
            Some(limit) => match rewrite::apply_row_limit(parsed.protobuf, limit) {
                Ok(Some(sql)) => Decision::Rewrite { sql, reason: format!("results are capped at {limit} rows") },
                Ok(None) => Decision::Allow,
                Err(e) => self.deny(format!("could not apply its row limit: {e}")),
            },
            None => Decision::Allow,
        };
        (Verdict { decision, effects }, Some(tree))
    }

    /// Startup parameters that pin this scope's session state upstream.
    pub fn pinned_startup_params(&self) -> Vec<(String, String)> {
        let mut p = vec![
            ("search_path".to_owned(), self.search_path.iter().map(|s| quote_ident(s)).collect::<Vec<_>>().join(", ")),
            ("standard_conforming_strings".to_owned(), "on".to_owned()),
        ];
        if self.read_only {
            p.push(("default_transaction_read_only".to_owned(), "on".to_owned()));
        }
        if let Some(t) = self.statement_timeout {
            p.push(("statement_timeout".to_owned(), format!("{}ms", t.as_millis())));
        }
        p
    }

    /// `ParameterStatus` values that must not change during the session (name, value).
    pub fn watched_parameters(&self, role: &str) -> Vec<(&'static str, String)> {
        let mut w = vec![
            ("client_encoding", "UTF8".to_owned()),
            ("standard_conforming_strings", "on".to_owned()),
            ("session_authorization", role.to_owned()),
            ("is_superuser", "off".to_owned()),
        ];
        if self.read_only {
            w.push(("default_transaction_read_only", "on".to_owned()));
        }
        w
    }

    /// The rules, for `scope show` and `scope sql`.
    pub fn table_rules(&self) -> Vec<(String, String, Vec<Action>, Vec<String>)> {
        self.rules
            .iter()
            .map(|r| {
                let mut a: Vec<Action> = r.actions.iter().copied().filter(|a| *a != Action::All).collect();
                a.sort();
                (r.schema.clone(), r.table.clone(), a, r.deny_columns.clone())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
