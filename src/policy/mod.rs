//! Scoped statement policy: every statement is parsed with the real Postgres grammar
//! (`pg_query`) and checked against the scope before any byte of it reaches Postgres.
//!
//! [`ScopePolicy::decide`] is pure (no IO): statement text in, [`Decision`] out. The proxy and
//! `pglease scope check` call the same function. It fails closed: SQL that does not parse,
//! statement kinds it does not know, functions it does not know — all are refused.

mod builtins_pg15;
pub mod expand;
pub mod functions;
pub mod hooks;
pub mod masks;
pub mod rolecheck;
mod rewrite;
pub mod rowfilter;
pub mod schema;
pub mod shape;
pub mod sql;
mod tree;
mod walk;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
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
    /// Run `sql` instead (`*` expanded, row cap applied), telling the client `notice` if any.
    Rewrite {
        sql: String,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        notice: Option<String>,
    },
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
    /// `SET [LOCAL] search_path` (`path: None`: back to the scope's pinned path, as `RESET`,
    /// `SET … TO DEFAULT`, `RESET ALL` and `DISCARD ALL` do). The session tracks the path and
    /// decides later statements under it.
    SearchPath { path: Option<Vec<String>>, local: bool },
    /// A statement that may change tables' columns ran: the scope's schema is loaded again.
    SchemaChanged,
    /// `SHOW application_name`: the session answers with the client's own name, not the
    /// stamped one Postgres holds.
    ShowApplicationName,
    /// SQL `EXECUTE name`: the session checks the prepared statement is still allowed under
    /// the current search_path (Postgres re-resolves its names when the path changed).
    Executed(String),
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
    masks: std::collections::BTreeMap<String, masks::Mask>,
    row_filter: Option<String>,
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
    "role", "session_authorization", "standard_conforming_strings", "client_encoding", "default_transaction_read_only",
    "transaction_read_only", "application_name", "session_replication_role", "backslash_quote", "escape_string_warning",
    "default_tablespace", "temp_tablespaces", "log_statement", "log_min_duration_statement", "row_security",
];

/// A scope's statement rules, ready to decide. Decisions are cached by statement text, and
/// where provably the same for every literal value, by statement shape (see [`shape`]).
pub struct ScopePolicy {
    pub name: String,
    /// The backing role: what `$user` in a search_path names.
    role: String,
    rules: Vec<TableRule>,
    catalog: bool,
    pub search_path: Vec<String>,
    pub row_limit: Option<u64>,
    /// What each grant of the scope may read over its life (counted by the relay).
    pub read_budget: Option<crate::grants::reads::ReadBudget>,
    pub statement_timeout: Option<Duration>,
    require_where: bool,
    settings: HashSet<String>,
    any_setting: bool,
    functions_allow: HashSet<String>,
    any_function: bool,
    functions_deny: HashSet<String>,
    /// Statement classes the scope opted into (DO, two-phase commit).
    pub statements: HashSet<crate::config::StatementClass>,
    /// True when no rule allows anything but reading: sessions run read-only transactions.
    pub read_only: bool,
    /// Per database of the scope: its schema (columns of the tables column rules cover) and
    /// its decisions, which may depend on that schema.
    databases: HashMap<String, DatabaseState>,
    /// The scope's first database: what [`ScopePolicy::decide`] decides for.
    default_database: String,
    /// Whether a task keeps this policy's schemas fresh.
    pub(crate) refresher_started: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct DatabaseState {
    schema: RwLock<Option<Arc<schema::Schema>>>,
    /// Decisions by exact statement text. Sharded: sessions of a scope do not queue on one lock.
    exact: DashMap<String, Verdict>,
    /// Decisions by statement shape, for the statements where that is sound.
    shapes: DashMap<String, Verdict>,
}

/// How a row-cap rewrite's reason starts (the session tells capped results by it).
pub const ROW_CAP_REASON: &str = "results are capped at";

/// The reason of a rewrite that expanded `*` to the permitted columns.
pub const EXPANDED_REASON: &str = "* expanded to the columns the scope may read";

/// How the reason of a rewrite that added row filters starts.
pub const FILTERED_REASON: &str = "rows filtered on";

/// The reason of a rewrite that applied masks.
pub const MASKED_REASON: &str = "masked columns read through their masks";

/// Statements after which the tables' columns may differ.
const CHANGES_COLUMNS: &[&str] =
    &["CreateStmt", "CreateTableAsStmt", "AlterTableStmt", "DropStmt", "RenameStmt", "ViewStmt", "CreateForeignTableStmt", "AlterObjectSchemaStmt"];

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

/// The tokens of `sql`. (`pg_query::scan_tokens` reads a null pointer when there are none.)
pub(crate) fn scan_tokens(sql: &str) -> Result<Vec<pg_query::protobuf::ScanToken>, String> {
    if sql.trim_matches([' ', '\t', '\n', '\r', '\x0c', '\x0b']).is_empty() {
        return Ok(Vec::new());
    }
    pg_query::scan_tokens(sql).map_err(|e| e.to_string())
}

/// Whether every statement of `sql` only opens or ends a transaction, or changes a setting, a
/// prepared statement or a cursor: what a session may still run once its grant's read budget
/// is spent (so that it can roll back and leave cleanly). Fails closed on SQL that does not parse.
pub fn returns_no_rows(sql: &str) -> bool {
    use pg_query::NodeEnum as N;
    let Ok(parsed) = pg_query::parse(sql, 0) else { return false };
    parsed.protobuf.stmts.iter().all(|s| {
        matches!(
            s.stmt.as_ref().and_then(|n| n.node.as_ref()),
            Some(N::TransactionStmt(_) | N::VariableSetStmt(_) | N::DiscardStmt(_) | N::DeallocateStmt(_) | N::ClosePortalStmt(_))
        )
    })
}

/// A rewritten statement parsed again: its tree as JSON (what the walk reads) and as pg_query's.
fn reparse(sql: &str) -> Result<(Value, pg_query::ParseResult), String> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| e.to_string())?;
    Ok((serde_json::to_value(&parsed.protobuf).map_err(|e| e.to_string())?, parsed))
}

/// Whether `tree` calls the function `qualified` (`schema.name`) anywhere.
fn calls(v: &Value, qualified: &str) -> bool {
    match v {
        Value::Object(m) => {
            if let Some(call) = m.get("FuncCall") {
                let parts: Vec<&str> = call
                    .get("funcname")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.get("node").and_then(|n| n.get("String")).and_then(|s| s.get("sval")).and_then(Value::as_str))
                    .collect();
                if parts.len() >= 2 && parts[parts.len() - 2..].join(".") == qualified {
                    return true;
                }
            }
            m.values().any(|x| calls(x, qualified))
        }
        Value::Array(a) => a.iter().any(|x| calls(x, qualified)),
        _ => false,
    }
}

/// The names of every prepared statement `tree` executes.
fn executed_statements(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(name) = m.get("ExecuteStmt").and_then(|e| e.get("name")).and_then(Value::as_str) {
                out.push(name.to_owned());
            }
            m.values().for_each(|x| executed_statements(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| executed_statements(x, out)),
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
                // Config validation names a mask that does not parse; one that slipped past shows nothing.
                let masks = r.mask_columns.iter().map(|(c, m)| (c.clone(), masks::Mask::parse(m).unwrap_or(masks::Mask::Null))).collect();
                TableRule { schema: schema.to_owned(), table: table.to_owned(), actions, deny_columns: r.deny_columns.clone(), masks, row_filter: r.row_filter.clone() }
            })
            .collect();
        let read_only = rules.iter().all(|r| r.actions.iter().all(|a| matches!(a, Action::Read | Action::CopyOut)));
        Self {
            name: name.to_owned(),
            role: c.role.clone(),
            rules,
            catalog: c.catalog,
            search_path: c.search_path.clone(),
            row_limit: c.row_limit,
            read_budget: crate::grants::reads::ReadBudget::of(c),
            statement_timeout: c.statement_timeout,
            require_where: c.require_where,
            settings: c.settings.iter().map(|s| s.to_ascii_lowercase()).collect(),
            any_setting: c.settings.iter().any(|s| s == "*"),
            functions_allow: c.functions.allow.iter().cloned().collect(),
            any_function: c.functions.allow.iter().any(|f| f == "*"),
            functions_deny: c.functions.deny.iter().cloned().collect(),
            statements: c.statements.iter().copied().collect(),
            read_only,
            databases: c.databases().into_iter().map(|d| (d, DatabaseState::default())).collect(),
            default_database: c.databases().into_iter().next().unwrap_or_default(),
            refresher_started: Default::default(),
        }
    }

    /// The scope's first database (the one a login without a database name reaches).
    pub fn default_database(&self) -> &str {
        &self.default_database
    }

    /// The databases the scope reaches.
    pub fn databases(&self) -> Vec<String> {
        let mut all: Vec<String> = self.databases.keys().cloned().collect();
        all.sort();
        all
    }

    /// Whether some rule masks a column with `hash`.
    fn hashes(&self) -> bool {
        self.rules.iter().any(|r| r.masks.values().any(|m| *m == masks::Mask::Hash))
    }

    /// The (schema, table) patterns of the rules that deny or mask columns: the tables whose
    /// columns the policy needs to expand `*`.
    pub fn column_rule_patterns(&self) -> impl Iterator<Item = (&str, &str)> {
        self.rules.iter().filter(|r| !r.deny_columns.is_empty() || !r.masks.is_empty()).map(|r| (r.schema.as_str(), r.table.as_str()))
    }

    /// The rule in force for `schema.table`.
    fn rule_of(&self, schema: &str, table: &str) -> Option<&TableRule> {
        let (schema, table) = (truncate_ident(schema), truncate_ident(table));
        self.rules.iter().find(|r| glob(&r.schema, schema) && glob(&r.table, table))
    }

    /// The schema known for `database`.
    pub fn schema(&self, database: &str) -> Option<Arc<schema::Schema>> {
        self.databases.get(database).and_then(|d| d.schema.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Installs (or, with None, forgets) the schema of `database`; decisions made under the
    /// previous one are forgotten with it.
    pub fn set_schema(&self, database: &str, schema: Option<Arc<schema::Schema>>) {
        let Some(d) = self.databases.get(database) else { return };
        let mut current = d.schema.write().unwrap_or_else(|p| p.into_inner());
        if *current == schema {
            return;
        }
        *current = schema;
        d.exact.clear();
        d.shapes.clear();
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
        schema == "pg_catalog" || schema == "information_schema" || schema == "pg_toast"
    }

    /// Whether `action` is allowed on `schema.table`.
    pub fn allows(&self, schema: &str, table: &str, action: Action) -> bool {
        // The catalogs are read, never written, whatever a pattern like `*.*` says: an UPDATE
        // of pg_settings is set_config() in disguise (its rule calls it; PUBLIC may update it).
        if Self::is_catalog(schema) && !matches!(action, Action::Read | Action::CopyOut) {
            return false;
        }
        // The planner's statistics views show sample values of every column the role may read:
        // the masked ones (the role reads them to mask them), and denied ones should a role's
        // GRANTs be wider than its scope.
        if schema == "pg_catalog" && table.starts_with("pg_stats") && self.rules.iter().any(|r| !r.masks.is_empty() || !r.deny_columns.is_empty()) {
            return false;
        }
        if let Some((actions, _)) = self.rule_for(schema, table) {
            return actions.contains(&action);
        }
        self.catalog && action == Action::Read && Self::is_catalog(schema)
    }

    /// Masked columns of the table(s) a possibly unqualified name can resolve to.
    pub fn masked_columns(&self, paths: &[Vec<String>], schema: Option<&str>, table: &str) -> Vec<String> {
        self.candidates(paths, schema, table).iter().filter_map(|(s, t)| self.rule_of(s, t)).flat_map(|r| r.masks.keys().cloned()).collect()
    }

    /// Denied columns of the table(s) a possibly unqualified name can resolve to.
    pub fn denied_columns(&self, paths: &[Vec<String>], schema: Option<&str>, table: &str) -> Vec<String> {
        self.candidates(paths, schema, table).iter().filter_map(|(s, t)| self.rule_for(s, t)).flat_map(|(_, cols)| cols.iter().cloned()).collect()
    }

    /// Where a relation name can resolve. An unqualified name may resolve in any schema of the
    /// session's `search_path` (which one depends on what exists), so it must be allowed in all
    /// of them; a one-schema search_path makes this exact. `paths` holds every path the session
    /// may be under (more than one while pglease cannot tell whether a `SET` took effect).
    /// `pg_*` names resolve to `pg_catalog`, which Postgres searches first unless the path
    /// names it later; then every schema up to it is a candidate.
    /// NOTE: a user relation named `pg_*` in a search_path schema, with no catalog relation of
    /// that name, would be checked as a catalog read; the role's GRANTs still apply to it.
    fn candidates(&self, paths: &[Vec<String>], schema: Option<&str>, table: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut add = |s: &str| {
            let s = if s == "$user" { self.role.as_str() } else { s };
            if !out.iter().any(|(o, _)| o == s) {
                out.push((s.to_owned(), table.to_owned()));
            }
        };
        match schema {
            Some(s) => add(s),
            None => {
                for path in paths {
                    if table.starts_with("pg_") {
                        match path.iter().position(|s| s == "pg_catalog") {
                            Some(k) => path[..=k].iter().for_each(|s| add(s)),
                            None => add("pg_catalog"),
                        }
                    } else {
                        path.iter().for_each(|s| add(s));
                    }
                }
            }
        }
        out
    }

    /// The schemas unqualified objects may be created in, under every path the session may be under.
    fn creation_schemas(&self, paths: &[Vec<String>]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        // Postgres creates in the first schema of the path that exists: any of them may be it.
        for path in paths {
            for s in path.iter().filter(|s| !matches!(s.as_str(), "pg_catalog" | "pg_temp")) {
                let s = if s == "$user" { self.role.clone() } else { s.clone() };
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        if out.is_empty() {
            out.push("public".into());
        }
        out
    }

    /// Whether a session may change setting `name` (SET, set_config, or at startup).
    pub fn setting_allowed(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        // pglease's own (`pglease.person`…, which row filters read) are pinned for the session.
        if PINNED_SETTINGS.contains(&name.as_str()) || name.starts_with("pglease.") {
            return false;
        }
        if name == "statement_timeout" && self.statement_timeout.is_some() {
            return false;
        }
        if name == "search_path" {
            // Tracked by the session (see `Effect::SearchPath`), so only where a scope allows it.
            return self.any_setting || self.settings.contains(&name);
        }
        HARMLESS_SETTINGS.contains(&name.as_str()) || self.any_setting || self.settings.contains(&name)
    }

    /// Whether a function may be called. `schema` is the qualifier as written, if any.
    fn function_allowed(&self, schema: Option<&str>, name: &str) -> bool {
        // The hash mask's function, in the masks pglease writes (a statement calling it itself
        // is refused before it is masked: see `decide_with_tree`).
        if schema.is_some_and(|s| format!("{s}.{name}") == masks::HASH_FUNCTION) {
            return self.hashes();
        }
        let qualified = schema.map(|s| format!("{s}.{name}"));
        if functions::NEVER.contains(&name) || functions::DECIDED_AS_STATEMENTS.contains(&name) {
            return false;
        }
        let builtin_schema = matches!(schema, None | Some("pg_catalog"));
        if builtin_schema && functions::named_only_class(name).is_some() {
            // Only by its own name: `"*"` does not reach these.
            return self.functions_allow.contains(name) || self.functions_allow.contains(&format!("pg_catalog.{name}"));
        }
        if let Some(q) = &qualified
            && (self.functions_allow.contains(q) || self.any_function)
        {
            return true;
        }
        if schema.is_none() && (self.functions_allow.contains(name) || self.any_function) {
            return true;
        }
        builtin_schema && functions::builtin_allowed_by_default(name) && !self.functions_deny.contains(name) && qualified.as_ref().is_none_or(|q| !self.functions_deny.contains(q))
    }

    fn deny(&self, message: impl Into<String>) -> Decision {
        Decision::Deny { code: crate::error::sqlstate::INSUFFICIENT_PRIVILEGE.to_owned(), message: format!("pglease: scope \"{}\" {}", self.name, message.into()) }
    }

    /// The decision for `sql` under the scope's pinned search_path, in its first database.
    pub fn decide(&self, sql: &str) -> Verdict {
        self.decide_in(sql, &[], &self.default_database)
    }

    /// The decision for `sql` in a session of `database` that may be under any of `paths`
    /// (empty: the pinned path): from the cache when this text, or a statement of the same
    /// shape where that is sound, was seen before under the same paths.
    pub fn decide_in(&self, sql: &str, paths: &[Vec<String>], database: &str) -> Verdict {
        let Some(db) = self.databases.get(database) else {
            // Not a database of the scope (its sessions cannot reach one): decided afresh.
            let paths = if paths.is_empty() { std::slice::from_ref(&self.search_path) } else { paths };
            return self.decide_with_tree(sql, paths, None).0;
        };
        let schema = db.schema.read().unwrap_or_else(|p| p.into_inner()).clone();
        if !paths.is_empty() && paths != std::slice::from_ref(&self.search_path) {
            // A session that changed its path: cached by path and text, never by shape.
            let key = format!("{}\u{0}{sql}", serde_json::to_string(paths).unwrap_or_default());
            if let Some(v) = db.exact.get(&key) {
                return v.clone();
            }
            let (verdict, _) = self.decide_with_tree(sql, paths, schema.as_deref());
            if db.exact.len() >= CACHE_ENTRIES {
                db.exact.clear();
            }
            db.exact.insert(key, verdict.clone());
            return verdict;
        }
        if let Some(v) = db.exact.get(sql) {
            metrics::counter!("pglease_policy_cache_total", "result" => "hit").increment(1);
            return v.clone();
        }
        // The row cap compares the statement's own LIMIT value: no shape sharing then.
        let shape = if self.row_limit.is_none() { shape::of(sql) } else { None };
        if let Some(v) = shape.as_ref().and_then(|s| db.shapes.get(&s.key)) {
            metrics::counter!("pglease_policy_cache_total", "result" => "shape_hit").increment(1);
            return v.clone();
        }
        metrics::counter!("pglease_policy_cache_total", "result" => "miss").increment(1);
        let (verdict, tree) = self.decide_with_tree(sql, std::slice::from_ref(&self.search_path), schema.as_deref());
        if let Some(shape) = shape
            && tree.as_ref().is_some_and(|t| Self::shape_safe(t, &verdict, &shape.literals))
        {
            if db.shapes.len() >= CACHE_ENTRIES {
                db.shapes.clear();
            }
            db.shapes.insert(shape.key, verdict.clone());
        }
        if db.exact.len() >= CACHE_ENTRIES {
            db.exact.clear();
        }
        db.exact.insert(sql.to_owned(), verdict.clone());
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
        // set_config's decision reads its first argument, a literal.
        if strings.iter().any(|n| functions::DECIDED_AS_STATEMENTS.contains(n)) {
            return false;
        }
        !strings.iter().any(|n| literals.iter().any(|l| l == n))
    }

    /// The decision, computed from scratch, with the schema known for the first database.
    pub fn decide_uncached(&self, sql: &str) -> Verdict {
        let schema = self.schema(&self.default_database);
        self.decide_with_tree(sql, std::slice::from_ref(&self.search_path), schema.as_deref()).0
    }

    /// The decision, computed from scratch with `schema` as what is known of the tables (the
    /// pure decision: `scope check`, the console, tests).
    pub fn decide_with_schema(&self, sql: &str, schema: Option<&schema::Schema>) -> Verdict {
        self.decide_with_tree(sql, std::slice::from_ref(&self.search_path), schema).0
    }

    /// The decision, and the parse tree it was reached on (None if the statement did not parse).
    fn decide_with_tree(&self, sql: &str, paths: &[Vec<String>], schema: Option<&schema::Schema>) -> (Verdict, Option<Value>) {
        let mut parsed = match pg_query::parse(sql, 0) {
            Ok(p) => p,
            Err(e) => {
                let message = e.to_string();
                let decision = Decision::Deny { code: "42601".into(), message: format!("pglease: cannot parse the statement: {message}") };
                return (Verdict { decision, effects: vec![] }, None);
            }
        };
        let mut tree = match serde_json::to_value(&parsed.protobuf) {
            Ok(t) => t,
            Err(_) => return (Verdict { decision: self.deny("could not inspect the statement"), effects: vec![] }, None),
        };
        // Only masks call the hash mask's function: hashing guesses would reverse the mask.
        if self.hashes() && calls(&tree, masks::HASH_FUNCTION) {
            return (Verdict { decision: self.deny(format!("does not allow calling function {}: only its masks may", masks::HASH_FUNCTION)), effects: vec![] }, Some(tree));
        }
        // Attribute notation (`t.f` for `f(t)`) calls functions and reads whole rows.
        if let Err(why) = expand::attribute_calls(self, paths, &tree, schema) {
            return (Verdict { decision: self.deny(why), effects: vec![] }, Some(tree));
        }
        // Row filters first: the subqueries they add are expanded and masked like any other.
        let mut filtered = None;
        if rowfilter::any(self) {
            match rowfilter::apply(self, paths, sql, &tree) {
                Ok(None) => {}
                Ok(Some(f)) => match reparse(&f.sql) {
                    Ok((t, p)) => {
                        tree = t;
                        parsed = p;
                        filtered = Some(f);
                    }
                    Err(why) => return (Verdict { decision: self.deny(format!("could not apply its row filters: {why}")), effects: vec![] }, Some(tree)),
                },
                Err(why) => return (Verdict { decision: self.deny(why), effects: vec![] }, Some(tree)),
            }
        }
        let sql = filtered.as_ref().map_or(sql, |f| f.sql.as_str());
        // `*` over tables with denied columns becomes the permitted columns; the new text is
        // what gets decided (and run).
        let mut expanded = None;
        if let Some(schema) = schema
            && self.column_rule_patterns().next().is_some()
        {
            match expand::expand(self, paths, sql, &tree, schema) {
                Ok(None) => {}
                Ok(Some(e)) => {
                    let reparsed = reparse(&e.sql);
                    match reparsed {
                        Ok((t, p)) => {
                            tree = t;
                            parsed = p;
                            expanded = Some(e);
                        }
                        Err(why) => return (Verdict { decision: self.deny(format!("could not expand *: {why}")), effects: vec![] }, Some(tree)),
                    }
                }
                Err(why) => return (Verdict { decision: self.deny(format!("could not expand *: {why}")), effects: vec![] }, Some(tree)),
            }
        }
        // Masked columns in select lists read through their masks; anywhere else they refuse.
        let mut masked = None;
        if self.rules.iter().any(|r| !r.masks.is_empty()) {
            let current = expanded.as_ref().map_or(sql, |e: &expand::Expanded| e.sql.as_str());
            match masks::apply(self, paths, current, &tree) {
                Ok(None) => {}
                Ok(Some(m)) => {
                    let reparsed = reparse(&m.sql)
                        .and_then(|(t, p)| masks::verify(self, paths, &t, &m.ranges).map(|()| (t, p)));
                    match reparsed {
                        Ok((t, p)) => {
                            tree = t;
                            parsed = p;
                            masked = Some(m);
                        }
                        Err(why) => return (Verdict { decision: self.deny(format!("could not apply its masks: {why}")), effects: vec![] }, Some(tree)),
                    }
                }
                Err(why) => return (Verdict { decision: self.deny(why), effects: vec![] }, Some(tree)),
            }
        }
        let mut effects = Vec::new();
        let statements = tree.get("stmts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for (i, stmt) in statements.iter().enumerate() {
            let Some(node) = stmt.get("stmt") else { continue };
            if let Err(message) = walk::check_statement(self, paths, node, &mut effects) {
                return (Verdict { decision: self.deny(message), effects: vec![] }, Some(tree));
            }
            // The statements after a path change would run under a path they were not decided
            // under. Last in its message it is fine (asyncpg's pool reset ends in RESET ALL).
            if i + 1 < statements.len() && effects.iter().any(|e| matches!(e, Effect::SearchPath { .. })) {
                let message = "allows SET search_path, RESET ALL and DISCARD ALL only as the last statement of a message";
                return (Verdict { decision: self.deny(message), effects: vec![] }, Some(tree));
            }
        }
        if statements.len() > 1 {
            // The session carries these out once the message is decided: later statements of
            // the same message would run under a state they were not decided under.
            for (what, found) in [
                ("SET application_name", effects.iter().any(|e| matches!(e, Effect::ApplicationName { .. }))),
            ] {
                if found {
                    return (Verdict { decision: self.deny(format!("allows {what} only as a statement of its own")), effects: vec![] }, Some(tree));
                }
            }
        }
        // EXECUTE anywhere in the tree (EXPLAIN EXECUTE, CREATE TABLE … AS EXECUTE): the
        // session checks those statements again if the search_path changed since PREPARE.
        let mut executed = Vec::new();
        executed_statements(&tree, &mut executed);
        for name in executed {
            if !effects.contains(&Effect::Executed(name.clone())) {
                effects.push(Effect::Executed(name));
            }
        }
        if statements.len() > 1 {
            // Shown as Postgres holds it (with pglease's stamp) inside a longer message.
            effects.retain(|e| *e != Effect::ShowApplicationName);
        }
        if statements.iter().any(|s| {
            s.get("stmt").and_then(|n| n.get("node")).and_then(Value::as_object).is_some_and(|n| n.keys().any(|k| CHANGES_COLUMNS.contains(&k.as_str())))
        }) {
            effects.push(Effect::SchemaChanged);
        }
        let notice = {
            let mut parts = Vec::new();
            if let Some(e) = expanded.as_ref().filter(|e| !e.omitted.is_empty()) {
                parts.push(expand::left_out(&e.omitted));
            }
            if let Some(m) = &masked {
                parts.push(masks::notice(&m.masked));
            }
            (!parts.is_empty()).then(|| format!("pglease: scope \"{}\" {}", self.name, parts.join("; ")))
        };
        let mut reasons = Vec::new();
        if let Some(f) = &filtered {
            reasons.push(format!("{FILTERED_REASON} {}", f.tables.join(", ")));
        }
        if expanded.is_some() {
            reasons.push(EXPANDED_REASON.to_owned());
        }
        if masked.is_some() {
            reasons.push(MASKED_REASON.to_owned());
        }
        let text = masked.map(|m| m.sql).or(expanded.map(|e| e.sql)).or(filtered.map(|f| f.sql));
        let rewritten = text.map(|t| (t, reasons.join("; ")));
        let capped = match self.row_limit {
            Some(limit) => match rewrite::apply_row_limit(parsed.protobuf, limit) {
                Ok(capped) => capped.map(|sql| (sql, format!("{ROW_CAP_REASON} {limit} rows"))),
                Err(e) => return (Verdict { decision: self.deny(format!("could not apply its row limit: {e}")), effects: vec![] }, Some(tree)),
            },
            None => None,
        };
        let decision = match (capped, rewritten) {
            (Some((sql, reason)), Some((_, also))) => Decision::Rewrite { sql, reason: format!("{reason}; {also}"), notice },
            (Some((sql, reason)), None) => Decision::Rewrite { sql, reason, notice },
            (None, Some((sql, reason))) => Decision::Rewrite { sql, reason, notice },
            (None, None) => Decision::Allow,
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

    /// What the scope allows beyond what `"*"` reaches, one line per dangerous class, for the
    /// warning pglease logs when it starts serving the scope.
    pub fn dangerous_allowances(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (class, names) in functions::NAMED_ONLY {
            let named: Vec<&str> = names.iter().copied().filter(|n| self.functions_allow.contains(*n) || self.functions_allow.contains(&format!("pg_catalog.{n}"))).collect();
            if !named.is_empty() {
                out.push(format!("{class} ({})", named.join(", ")));
            }
        }
        if self.statements.contains(&crate::config::StatementClass::Do) {
            out.push("DO blocks (code pglease cannot see)".to_owned());
        }
        if self.statements.contains(&crate::config::StatementClass::TwoPhaseCommit) {
            out.push("two-phase commit (prepared transactions outlive the session)".to_owned());
        }
        out
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
