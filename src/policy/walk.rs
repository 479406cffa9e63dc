//! The parse-tree walk behind a decision.
//!
//! The tree is pg_query's protobuf tree as JSON, walked generically: every object and array is
//! visited, so no node is skipped because its type was not foreseen. Node types that matter
//! (statements, relations, function calls, column references) get their own handling; nodes
//! that protobuf embeds without a type tag (a `RangeVar` as `InsertStmt.relation`, the arms of a
//! `UNION`) are recognised by their fields.

use std::collections::HashSet;

use pg_query::protobuf::CmdType;
use serde_json::{Map, Value};

use super::{Effect, ScopePolicy};
use crate::config::{Action, StatementClass};

/// One relation the statement touches.
#[derive(Debug, Clone)]
struct Use {
    schema: Option<String>,
    name: String,
    alias: Option<String>,
    action: Action,
}

#[derive(Default)]
struct Walker {
    /// The search_paths the session may be under (see `ScopePolicy::candidates`).
    paths: Vec<Vec<String>>,
    /// Visible CTE names, innermost last.
    ctes: Vec<HashSet<String>>,
    uses: Vec<Use>,
    /// Identifiers seen (column names, USING lists…), for column rules.
    idents: HashSet<String>,
    /// Single-name column references: a column, or a whole-row reference to a table or alias.
    single_refs: HashSet<String>,
    /// `*` or `t.*` somewhere.
    star: bool,
    /// The names of the tables some `*` may expand over (see `expand::stars_reach`).
    star_reach: HashSet<String>,
    /// What the statement's join aliases and column alias lists cover (see `expand::joins`).
    joins: super::expand::Joins,
    natural_join: bool,
    locking: bool,
    /// Inside a DDL statement: every relation is a DDL target.
    ddl: bool,
    /// (use index, column) written by INSERT/UPDATE/COPY FROM.
    written: Vec<(usize, String)>,
    /// Uses whose every column is written or copied (INSERT without a column list, COPY without one).
    all_columns: Vec<usize>,
    problem: Option<String>,
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Read => "SELECT",
        Action::Insert => "INSERT",
        Action::Update => "UPDATE",
        Action::Delete => "DELETE",
        Action::Truncate => "TRUNCATE",
        Action::CopyIn => "COPY FROM",
        Action::CopyOut => "COPY TO",
        Action::Ddl => "DDL",
        Action::Maintenance => "maintenance (VACUUM, ANALYZE, REINDEX, CLUSTER, REFRESH)",
        Action::All => "everything",
    }
}

fn s<'v>(body: &'v Value, key: &str) -> &'v str {
    body.get(key).and_then(Value::as_str).unwrap_or("")
}

fn b(body: &Value, key: &str) -> bool {
    body.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn i(body: &Value, key: &str) -> i64 {
    body.get(key).and_then(Value::as_i64).unwrap_or(0)
}

fn present(body: &Value, key: &str) -> bool {
    match body.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

/// The (type, body) of a tagged node `{"node": {"Type": {...}}}`.
fn tagged(v: &Value) -> Option<(&str, &Value)> {
    let inner = v.as_object()?.get("node")?.as_object()?;
    if inner.len() != 1 {
        return None;
    }
    inner.iter().next().map(|(k, v)| (k.as_str(), v))
}

/// The strings of a list of `String` nodes (qualified names, column lists).
fn names(list: Option<&Value>) -> Vec<String> {
    list.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|n| tagged(n).filter(|(t, _)| *t == "String").map(|(_, b)| s(b, "sval").to_owned())).collect())
        .unwrap_or_default()
}

fn is_range_var(m: &Map<String, Value>) -> bool {
    m.contains_key("relname") && m.contains_key("relpersistence")
}

fn is_select(m: &Map<String, Value>) -> bool {
    m.contains_key("target_list") && m.contains_key("from_clause") && m.contains_key("values_lists")
}

/// Statements that only read or change harmless session state.
const SESSION_STATEMENTS: &[&str] = &["FetchStmt", "ClosePortalStmt", "ListenStmt", "UnlistenStmt", "ConstraintsSetStmt"];

/// Statements that define or change schema objects: need `ddl` on what they touch.
const DDL_STATEMENTS: &[&str] = &[
    "CreateStmt", "CreateTableAsStmt", "AlterTableStmt", "DropStmt", "IndexStmt", "ViewStmt", "CreateSeqStmt", "AlterSeqStmt",
    "RenameStmt", "CommentStmt", "CreateSchemaStmt", "CreateFunctionStmt", "AlterFunctionStmt", "CreateTrigStmt", "RuleStmt",
    "CompositeTypeStmt", "CreateEnumStmt", "AlterEnumStmt", "CreateDomainStmt", "AlterDomainStmt", "DefineStmt",
    "AlterObjectSchemaStmt", "AlterOwnerStmt", "CreatePolicyStmt", "AlterPolicyStmt", "CreateStatsStmt", "AlterStatsStmt",
    "CreateRangeStmt", "AlterTypeStmt", "AlterCollationStmt", "AlterTSDictionaryStmt", "AlterTSConfigurationStmt",
    "AlterTableMoveAllStmt", "AlterOperatorStmt",
];

/// Statements never allowed through pglease, with the reason.
fn forbidden(ty: &str) -> Option<&'static str> {
    Some(match ty {
        "DoStmt" => "does not allow DO blocks: they run code pglease cannot see",
        "CallStmt" => "does not allow CALL: procedures run code pglease cannot see",
        "AlterSystemStmt" | "LoadStmt" | "CheckPointStmt" => "does not allow server administration",
        "CreateRoleStmt" | "AlterRoleStmt" | "AlterRoleSetStmt" | "DropRoleStmt" | "GrantRoleStmt" | "GrantStmt" | "AlterDefaultPrivilegesStmt"
        | "ReassignOwnedStmt" | "DropOwnedStmt" | "SecLabelStmt" => "does not allow changing roles or privileges",
        "CreateExtensionStmt" | "AlterExtensionStmt" | "AlterExtensionContentsStmt" | "CreatePLangStmt" | "CreateFdwStmt" | "AlterFdwStmt"
        | "CreateForeignServerStmt" | "AlterForeignServerStmt" | "CreateUserMappingStmt" | "AlterUserMappingStmt" | "DropUserMappingStmt"
        | "ImportForeignSchemaStmt" | "CreateForeignTableStmt" | "CreateCastStmt" | "CreateTransformStmt" | "CreateConversionStmt"
        | "CreateOpClassStmt" | "CreateOpFamilyStmt" | "AlterOpFamilyStmt" | "CreateAmStmt" | "CreateEventTrigStmt" | "AlterEventTrigStmt" => {
            "does not allow extensions, foreign servers or other server-level objects"
        }
        "CreatedbStmt" | "AlterDatabaseStmt" | "AlterDatabaseSetStmt" | "AlterDatabaseRefreshCollStmt" | "DropdbStmt"
        | "CreateTableSpaceStmt" | "DropTableSpaceStmt" | "AlterTableSpaceOptionsStmt" => "does not allow database or tablespace changes",
        "CreateSubscriptionStmt" | "AlterSubscriptionStmt" | "DropSubscriptionStmt" | "CreatePublicationStmt" | "AlterPublicationStmt" => {
            "does not allow replication objects"
        }
        _ => return None,
    })
}

impl Walker {
    fn fail(&mut self, message: impl Into<String>) {
        if self.problem.is_none() {
            self.problem = Some(message.into());
        }
    }

    fn cte_visible(&self, name: &str) -> bool {
        self.ctes.iter().any(|f| f.contains(name))
    }

    fn walk(&mut self, p: &ScopePolicy, v: &Value) {
        if self.problem.is_some() {
            return;
        }
        match v {
            Value::Object(m) => {
                if let Some((ty, body)) = tagged(v) {
                    self.node(p, ty, body);
                } else if is_range_var(m) {
                    let action = if self.ddl { Action::Ddl } else { Action::Read };
                    self.range_var(v, action);
                } else if is_select(m) {
                    self.select(p, v);
                } else {
                    for val in m.values() {
                        self.walk(p, val);
                    }
                }
            }
            Value::Array(a) => {
                for val in a {
                    self.walk(p, val);
                }
            }
            _ => {}
        }
    }

    /// Walks every field of `body` except `skip`.
    fn walk_except(&mut self, p: &ScopePolicy, body: &Value, skip: &[&str]) {
        if let Some(m) = body.as_object() {
            for (k, val) in m {
                if !skip.contains(&k.as_str()) {
                    self.walk(p, val);
                }
            }
        }
    }

    fn range_var(&mut self, rv: &Value, action: Action) -> Option<usize> {
        let name = s(rv, "relname").to_owned();
        let schema = Some(s(rv, "schemaname")).filter(|s| !s.is_empty()).map(str::to_owned);
        if !s(rv, "catalogname").is_empty() {
            self.fail("does not allow references to other databases");
            return None;
        }
        if schema.is_none() && action == Action::Read && self.cte_visible(&name) {
            return None;
        }
        let alias = rv.get("alias").filter(|a| !a.is_null()).map(|a| s(a, "aliasname").to_owned());
        self.uses.push(Use { schema, name, alias, action });
        Some(self.uses.len() - 1)
    }

    /// Walks `body` with its WITH clause's CTE names in scope, as Postgres scopes them: each
    /// CTE sees the ones before it (and itself, if RECURSIVE); the statement sees all.
    fn with_ctes(&mut self, p: &ScopePolicy, body: &Value, rest: impl FnOnce(&mut Self, &ScopePolicy)) {
        let wc = body.get("with_clause").filter(|w| !w.is_null());
        let Some(wc) = wc else {
            rest(self, p);
            return;
        };
        let recursive = b(wc, "recursive");
        self.ctes.push(HashSet::new());
        for cte in wc.get("ctes").and_then(Value::as_array).into_iter().flatten() {
            let Some((_, c)) = tagged(cte) else { continue };
            let name = s(c, "ctename").to_owned();
            if recursive {
                self.ctes.last_mut().expect("pushed").insert(name.clone());
            }
            if let Some(q) = c.get("ctequery") {
                self.walk(p, q);
            }
            self.ctes.last_mut().expect("pushed").insert(name);
        }
        rest(self, p);
        self.ctes.pop();
    }

    fn select(&mut self, p: &ScopePolicy, body: &Value) {
        self.with_ctes(p, body, |w, p| {
            if let Some(into) = body.get("into_clause").filter(|x| !x.is_null()) {
                // SELECT … INTO creates a table.
                if let Some(rel) = into.get("rel") {
                    w.range_var(rel, Action::Ddl);
                }
            }
            if present(body, "locking_clause") {
                w.locking = true;
            }
            w.walk_except(p, body, &["with_clause", "into_clause"]);
        });
    }

    /// Column names of a list of `ResTarget` nodes (INSERT column lists, UPDATE SET targets).
    fn target_names(list: Option<&Value>) -> Vec<String> {
        list.and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|n| tagged(n).filter(|(t, _)| *t == "ResTarget").map(|(_, b)| s(b, "name").to_owned())).collect())
            .unwrap_or_default()
    }

    fn node(&mut self, p: &ScopePolicy, ty: &str, body: &Value) {
        match ty {
            "SelectStmt" => self.select(p, body),
            "InsertStmt" => self.with_ctes(p, body, |w, p| {
                let Some(idx) = body.get("relation").and_then(|r| w.range_var(r, Action::Insert)) else { return };
                let cols = Self::target_names(body.get("cols"));
                if cols.is_empty() {
                    w.all_columns.push(idx);
                }
                w.written.extend(cols.into_iter().map(|c| (idx, c)));
                if let Some(oc) = body.get("on_conflict_clause").filter(|x| !x.is_null())
                    && i(oc, "action") == pg_query::protobuf::OnConflictAction::OnconflictUpdate as i64
                {
                    w.range_var(&body["relation"], Action::Update);
                    let set = Self::target_names(oc.get("target_list"));
                    w.written.extend(set.into_iter().map(|c| (idx, c)));
                }
                w.walk_except(p, body, &["with_clause", "relation", "cols"]);
            }),
            "UpdateStmt" => self.with_ctes(p, body, |w, p| {
                if p.require_where && !present(body, "where_clause") {
                    w.fail("does not allow UPDATE without WHERE");
                    return;
                }
                let Some(idx) = body.get("relation").and_then(|r| w.range_var(r, Action::Update)) else { return };
                w.range_var(&body["relation"], Action::Read);
                let set = Self::target_names(body.get("target_list"));
                w.written.extend(set.into_iter().map(|c| (idx, c)));
                w.walk_except(p, body, &["with_clause", "relation"]);
            }),
            "DeleteStmt" => self.with_ctes(p, body, |w, p| {
                if p.require_where && !present(body, "where_clause") {
                    w.fail("does not allow DELETE without WHERE");
                    return;
                }
                if let Some(r) = body.get("relation") {
                    w.range_var(r, Action::Delete);
                    w.range_var(r, Action::Read);
                }
                w.walk_except(p, body, &["with_clause", "relation"]);
            }),
            "MergeStmt" => self.with_ctes(p, body, |w, p| {
                if let Some(r) = body.get("relation") {
                    // What its WHEN clauses do, as Postgres checks privileges: `DO NOTHING` needs
                    // none beyond reading. A clause of a kind not known here needs every action.
                    let mut actions = vec![Action::Read];
                    for clause in body.get("merge_when_clauses").and_then(Value::as_array).into_iter().flatten() {
                        let command = match tagged(clause) {
                            Some(("MergeWhenClause", c)) => c.get("command_type").and_then(Value::as_i64),
                            _ => None,
                        };
                        let needs: &[Action] = match command {
                            Some(c) if c == CmdType::CmdInsert as i64 => &[Action::Insert],
                            Some(c) if c == CmdType::CmdUpdate as i64 => &[Action::Update],
                            Some(c) if c == CmdType::CmdDelete as i64 => &[Action::Delete],
                            Some(c) if c == CmdType::CmdNothing as i64 => &[],
                            _ => &[Action::Insert, Action::Update, Action::Delete],
                        };
                        actions.extend(needs.iter().copied().filter(|a| !actions.contains(a)).collect::<Vec<_>>());
                    }
                    for a in actions {
                        if let Some(idx) = w.range_var(r, a)
                            && matches!(a, Action::Insert | Action::Update)
                        {
                            // MERGE may write any column.
                            w.all_columns.push(idx);
                        }
                    }
                }
                w.walk_except(p, body, &["with_clause", "relation"]);
            }),
            "RangeVar" => {
                let action = if self.ddl { Action::Ddl } else { Action::Read };
                self.range_var(body, action);
            }
            "FuncCall" => {
                let parts = names(body.get("funcname"));
                let (schema, name) = match parts.as_slice() {
                    [n] => (None, n.as_str()),
                    [sch, n] => (Some(sch.as_str()), n.as_str()),
                    _ => {
                        self.fail("does not allow cross-database function references");
                        return;
                    }
                };
                if matches!(schema, None | Some("pg_catalog")) {
                    match name {
                        "set_config" => {
                            if let Err(why) = set_config_allowed(p, body) {
                                self.fail(why);
                                return;
                            }
                            self.walk_except(p, body, &["funcname"]);
                            return;
                        }
                        "pg_notify" if p.read_only => {
                            self.fail("does not allow NOTIFY (pg_notify): its sessions are read-only");
                            return;
                        }
                        "pg_notify" => {
                            self.walk_except(p, body, &["funcname"]);
                            return;
                        }
                        _ => {}
                    }
                }
                if !p.function_allowed(schema, name) {
                    let shown = parts.join(".");
                    self.fail(format!("does not allow calling function {shown}"));
                    return;
                }
                self.walk_except(p, body, &["funcname"]);
            }
            "AExpr" => {
                let op = names(body.get("name"));
                if op.len() > 1 && op[0] != "pg_catalog" {
                    self.fail(format!("does not allow operator {}", op.join(".")));
                    return;
                }
                self.walk_except(p, body, &["name"]);
            }
            "ColumnRef" => {
                let fields = body.get("fields").and_then(Value::as_array).cloned().unwrap_or_default();
                let mut strings = Vec::new();
                for f in &fields {
                    match tagged(f) {
                        Some(("AStar", _)) => self.star = true,
                        Some(("String", sb)) => strings.push(s(sb, "sval").to_owned()),
                        _ => {}
                    }
                }
                if fields.len() == 1 && strings.len() == 1 {
                    self.single_refs.insert(strings[0].clone());
                }
                self.idents.extend(strings);
            }
            "String" => {
                self.idents.insert(s(body, "sval").to_owned());
            }
            "JoinExpr" => {
                if b(body, "is_natural") {
                    self.natural_join = true;
                }
                self.walk_except(p, body, &[]);
            }
            "CopyStmt" => {
                if b(body, "is_program") {
                    self.fail("does not allow COPY … PROGRAM: it runs a program on the database server");
                    return;
                }
                if !s(body, "filename").is_empty() {
                    self.fail("does not allow COPY to or from a file on the database server");
                    return;
                }
                let from = b(body, "is_from");
                if let Some(rel) = body.get("relation").filter(|r| !r.is_null()) {
                    let idx = self.range_var(rel, if from { Action::CopyIn } else { Action::CopyOut });
                    let cols = names(body.get("attlist"));
                    if let Some(idx) = idx {
                        if cols.is_empty() {
                            self.all_columns.push(idx);
                        } else if from {
                            self.written.extend(cols.iter().map(|c| (idx, c.clone())));
                        }
                    }
                    self.idents.extend(cols);
                }
                self.walk_except(p, body, &["relation", "attlist"]);
            }
            "TruncateStmt" => {
                for r in body.get("relations").and_then(Value::as_array).into_iter().flatten() {
                    if let Some((_, rv)) = tagged(r) {
                        self.range_var(rv, Action::Truncate);
                    }
                }
            }
            "LockStmt" => {
                // Explicit table locks block writers: only for scopes that may write the table.
                for r in body.get("relations").and_then(Value::as_array).into_iter().flatten() {
                    if let Some((_, rv)) = tagged(r) {
                        self.range_var(rv, Action::Update);
                    }
                }
            }
            "VacuumStmt" => {
                let rels = body.get("rels").and_then(Value::as_array).cloned().unwrap_or_default();
                if rels.is_empty() {
                    self.fail("does not allow VACUUM or ANALYZE of the whole database");
                    return;
                }
                for r in &rels {
                    if let Some((_, vr)) = tagged(r)
                        && let Some(rel) = vr.get("relation").filter(|x| !x.is_null())
                    {
                        self.range_var(rel, Action::Maintenance);
                    }
                }
            }
            "ReindexStmt" | "ClusterStmt" | "RefreshMatViewStmt" => match body.get("relation").filter(|x| !x.is_null()) {
                Some(rel) => {
                    self.range_var(rel, Action::Maintenance);
                    if ty == "RefreshMatViewStmt" {
                        self.walk_except(p, body, &["relation"]);
                    }
                }
                None => self.fail("does not allow database-wide maintenance"),
            },
            _ => self.walk_except(p, body, &[]),
        }
    }

    /// Checks the collected uses and column rules.
    fn finish(&mut self, p: &ScopePolicy) {
        if self.problem.is_some() {
            return;
        }
        if self.locking {
            // FOR UPDATE/SHARE locks rows: a write in all but name.
            let reads: Vec<Use> = self.uses.iter().filter(|u| u.action == Action::Read).cloned().collect();
            for mut u in reads {
                u.action = Action::Update;
                self.uses.push(u);
            }
        }
        for u in &self.uses {
            for (schema, table) in p.candidates(&self.paths, u.schema.as_deref(), &u.name) {
                if !p.allows(&schema, &table, u.action) {
                    let locking = if self.locking && u.action == Action::Update { " (row locks count as UPDATE)" } else { "" };
                    self.problem = Some(format!("does not allow {} on {schema}.{table}{locking}", action_name(u.action)));
                    return;
                }
            }
        }
        // Column rules: a denied column may not be named, and may not be reached through `*`,
        // a whole-row reference, NATURAL JOIN, or a statement that covers every column.
        for (idx, u) in self.uses.iter().enumerate() {
            let named = p.denied_columns(&self.paths, u.schema.as_deref(), &u.name);
            // Masked columns may be named (`masks` decides where); any other way of reaching
            // them (`*`, a whole row, NATURAL JOIN, every column) is refused like a denied one.
            let mut denied = named.clone();
            denied.extend(p.masked_columns(&self.paths, u.schema.as_deref(), &u.name));
            if denied.is_empty() {
                continue;
            }
            let table = match &u.schema {
                Some(s) => format!("{s}.{}", u.name),
                None => u.name.clone(),
            };
            let col = &denied[0];
            let problem = if let Some(c) = named.iter().find(|c| self.idents.contains(*c)) {
                Some(format!("does not allow column {c} of {table}"))
            } else if self.star && (self.star_reach.contains(&u.name) || u.alias.as_ref().is_some_and(|a| self.star_reach.contains(a))) {
                Some(format!("does not allow * on {table}: it includes column {col}; name the columns"))
            } else if self.joins.renamed.contains(&u.name) || u.alias.as_ref().is_some_and(|a| self.joins.renamed.contains(a)) {
                Some(format!("does not allow column aliases over {table}: they would rename column {col}"))
            } else if self.single_refs.iter().any(|r| {
                *r == u.name || u.alias.as_ref() == Some(r) || self.joins.beneath.get(r).is_some_and(|b| b.contains(&u.name) || u.alias.as_ref().is_some_and(|a| b.contains(a)))
            }) {
                Some(format!("does not allow whole-row references to {table}: they include column {col}"))
            } else if self.natural_join {
                Some(format!("does not allow NATURAL JOIN with {table}: it may join on column {col}"))
            } else if self.all_columns.contains(&idx) {
                Some(format!("does not allow statements on every column of {table}: it includes column {col}; list the columns"))
            } else {
                self.written.iter().find(|(i, c)| *i == idx && named.contains(c)).map(|(_, c)| format!("does not allow column {c} of {table}"))
            };
            if let Some(problem) = problem {
                self.problem = Some(problem);
                return;
            }
        }
    }
}

/// Checks one top-level statement. `Err` is the reason to refuse, as "does not allow …".
pub(super) fn check_statement(p: &ScopePolicy, paths: &[Vec<String>], stmt: &Value, effects: &mut Vec<Effect>) -> Result<(), String> {
    let Some((ty, body)) = tagged(stmt) else {
        return Err("could not inspect the statement".into());
    };
    let mut w = Walker { paths: paths.to_vec(), ..Walker::default() };
    if ty == "DoStmt" && p.statements.contains(&StatementClass::Do) {
        // Named by the scope: the block runs as the backing role, unseen by pglease.
        return Ok(());
    }
    if let Some(reason) = forbidden(ty) {
        return Err(reason.into());
    }
    match ty {
        "SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" | "CopyStmt" | "TruncateStmt" | "LockStmt" | "VacuumStmt"
        | "ReindexStmt" | "ClusterStmt" | "RefreshMatViewStmt" => w.node(p, ty, body),
        "ExplainStmt" => {
            // Checked as if it ran: EXPLAIN ANALYZE does run it.
            if let Some(q) = body.get("query") {
                return check_statement(p, paths, q, effects);
            }
        }
        "PrepareStmt" => {
            if let Some(q) = body.get("query") {
                check_statement(p, paths, q, effects)?;
            }
            effects.push(Effect::Prepared(s(body, "name").to_owned()));
            return Ok(());
        }
        "DeclareCursorStmt" => {
            if let Some(q) = body.get("query") {
                return check_statement(p, paths, q, effects);
            }
        }
        "ExecuteStmt" => w.walk_except(p, body, &["name"]),
        "DeallocateStmt" => {
            let name = s(body, "name");
            effects.push(Effect::Deallocated(if b(body, "isall") || name.is_empty() { None } else { Some(name.to_owned()) }));
        }
        "TransactionStmt" => {
            use pg_query::protobuf::TransactionStmtKind as K;
            let kind = i(body, "kind");
            if [K::TransStmtPrepare as i64, K::TransStmtCommitPrepared as i64, K::TransStmtRollbackPrepared as i64].contains(&kind)
                && !p.statements.contains(&StatementClass::TwoPhaseCommit)
            {
                return Err("does not allow two-phase commit".into());
            }
            if p.read_only && asks_read_write(body.get("options")) {
                return Err("does not allow READ WRITE transactions: its sessions are read-only".into());
            }
        }
        "VariableSetStmt" => {
            use pg_query::protobuf::VariableSetKind as K;
            let kind = i(body, "kind");
            let name = s(body, "name");
            if kind == K::VarSetMulti as i64 {
                // SET TRANSACTION … / SET SESSION CHARACTERISTICS AS TRANSACTION …
                if p.read_only && asks_read_write(body.get("args")) {
                    return Err("does not allow READ WRITE transactions: its sessions are read-only".into());
                }
            } else if name == "application_name" && [K::VarSetValue as i64, K::VarSetDefault as i64, K::VarReset as i64].contains(&kind) {
                // The upstream application_name carries pglease's stamp (who, which grant);
                // the client's own name is kept after it (the session hooks rewrite the SET).
                let value = if kind == K::VarSetValue as i64 {
                    let args = body.get("args").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                    match args {
                        [arg] => match tagged(arg).and_then(|(_, c)| c.pointer("/sval/sval").or_else(|| c.pointer("/val/Sval/sval"))).and_then(Value::as_str) {
                            Some(v) => v.to_owned(),
                            None => return Err("allows SET application_name only to a string".into()),
                        },
                        _ => return Err("allows SET application_name only to a string".into()),
                    }
                } else {
                    String::new()
                };
                effects.push(Effect::ApplicationName { value, local: b(body, "is_local") });
            } else if kind == K::VarResetAll as i64 {
                // RESET ALL returns to the session's startup values, which are the pinned ones.
                effects.push(Effect::SearchPath { path: None, local: false });
            } else if !p.setting_allowed(name) {
                return Err(format!("does not allow changing setting {name}"));
            } else if name == "search_path" {
                let path = if kind == K::VarSetValue as i64 {
                    let args = body.get("args").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                    let schemas: Option<Vec<String>> = args.iter().map(literal_string).collect();
                    match schemas {
                        Some(schemas) => Some(schemas),
                        None => return Err("allows SET search_path only to a list of schema names".into()),
                    }
                } else if [K::VarSetDefault as i64, K::VarReset as i64].contains(&kind) {
                    None
                } else {
                    return Err("allows SET search_path only to a list of schema names".into());
                };
                effects.push(Effect::SearchPath { path, local: b(body, "is_local") });
            }
        }
        "DiscardStmt" => {
            use pg_query::protobuf::DiscardMode as M;
            if i(body, "target") == M::DiscardAll as i64 {
                effects.push(Effect::SearchPath { path: None, local: false });
            }
        }
        "VariableShowStmt" => {
            if s(body, "name") == "application_name" {
                effects.push(Effect::ShowApplicationName);
            }
        }
        "NotifyStmt" => {
            if p.read_only {
                return Err("does not allow NOTIFY: its sessions are read-only".into());
            }
        }
        t if SESSION_STATEMENTS.contains(&t) => {}
        t if DDL_STATEMENTS.contains(&t) => {
            w.ddl = true;
            // Objects DDL names without a relation (schemas, functions, types) need DDL rights
            // on the whole schema; the schema they are created in stands for unqualified ones.
            let creation = p.creation_schemas(paths);
            let schema_ddl = creation.iter().all(|schema| p.allows(schema, "*", Action::Ddl));
            if !schema_ddl && !matches!(t, "CreateStmt" | "AlterTableStmt" | "IndexStmt" | "CreateTableAsStmt" | "ViewStmt" | "DropStmt") {
                return Err(format!("does not allow DDL ({})", t.trim_end_matches("Stmt")));
            }
            if t == "DropStmt" {
                for obj in body.get("objects").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(("List", l)) = tagged(obj) {
                        let parts = names(l.get("items"));
                        let (schema, name) = match parts.as_slice() {
                            [n] => (None, n.clone()),
                            [s, n] => (Some(s.clone()), n.clone()),
                            _ => return Err("does not allow cross-database references".into()),
                        };
                        w.uses.push(Use { schema, name, alias: None, action: Action::Ddl });
                    } else {
                        w.walk(p, obj);
                    }
                }
            }
            w.walk_except(p, body, &["objects"]);
            if !w.uses.iter().any(|u| u.action == Action::Ddl) && !schema_ddl {
                return Err(format!("does not allow DDL ({})", t.trim_end_matches("Stmt")));
            }
        }
        other => return Err(format!("does not allow {other} statements")),
    }
    if w.star {
        w.star_reach = super::expand::stars_reach(stmt);
    }
    w.joins = super::expand::joins(stmt);
    w.finish(p);
    match w.problem {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

/// `set_config(name, value, is_local)` is a `SET`: the same settings rule decides it. The name
/// must be written as a literal, so the decision is made on what will run.
fn set_config_allowed(p: &ScopePolicy, call: &Value) -> Result<(), String> {
    let args = call.get("args").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let name = args.first().and_then(literal_string);
    let Some(name) = name.filter(|_| args.len() == 3) else {
        return Err("allows set_config only with the setting's name written as a string literal".into());
    };
    let name = name.to_ascii_lowercase();
    match name.as_str() {
        // Both are tracked from SET statements (search_path resolves names; application_name
        // carries pglease's stamp): a function call would change them unseen.
        "application_name" => Err("allows changing application_name only with SET application_name, not set_config()".into()),
        "search_path" if p.setting_allowed(&name) => Err("allows changing search_path only with SET search_path, not set_config()".into()),
        _ if p.setting_allowed(&name) => Ok(()),
        _ => Err(format!("does not allow changing setting {name}")),
    }
}

/// A string literal, possibly cast (`'jit'`, `'jit'::text`).
fn literal_string(v: &Value) -> Option<String> {
    match tagged(v)? {
        ("AConst", c) => c.pointer("/sval/sval").or_else(|| c.pointer("/val/Sval/sval")).and_then(Value::as_str).map(str::to_owned),
        ("TypeCast", c) => c.get("arg").and_then(literal_string),
        _ => None,
    }
}

/// Whether transaction options ask for READ WRITE (`transaction_read_only` = false).
fn asks_read_write(options: Option<&Value>) -> bool {
    options.and_then(Value::as_array).into_iter().flatten().any(|o| {
        tagged(o).is_some_and(|(t, d)| {
            t == "DefElem" && s(d, "defname") == "transaction_read_only" && d.get("arg").and_then(tagged).is_some_and(|(_, c)| {
                c.pointer("/val/Ival/ival").and_then(Value::as_i64).unwrap_or(0) == 0 && c.pointer("/val/Boolval/boolval").and_then(Value::as_bool) != Some(true)
            })
        })
    })
}
