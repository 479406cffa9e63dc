//! Row filters: a table rule's `row_filter` is added to every read, UPDATE, DELETE and COPY of
//! the table, in the statement's text, before the statement is decided.
//!
//! - A table read anywhere (FROM, joins, subqueries, CTEs, UPDATE … FROM, DELETE … USING) becomes
//!   `(SELECT * FROM t WHERE filter) AS t`.
//! - The target of UPDATE and DELETE gets `WHERE (its condition) AND (filter)`.
//! - `COPY t TO` becomes `COPY (SELECT * FROM t WHERE filter) TO`.
//! - Any other statement naming a filtered table (TRUNCATE, MERGE, LOCK, DDL, `ONLY t`,
//!   `TABLESAMPLE`, `WHERE CURRENT OF`) is refused. INSERT is not filtered (the role's
//!   row-level security policy, which `scope sql` writes, checks new rows).
//!
//! The session's values (`{{person}}`, `{{grant}}`, `{{scope}}`) are read from settings pglease
//! pins for the session (`pglease.person`…), never spliced into the text, so decisions stay the
//! same for every session and the database's policy reads the very same settings.

use std::collections::HashSet;

use pg_query::protobuf::{ScanToken, Token};
use serde_json::Value;

use super::tree::{cte_names, name_end, s, tagged, token_at};
use super::{ScopePolicy, quote_ident};

/// The templates a filter may use, and the session settings they read.
pub const TEMPLATES: &[(&str, &str)] = &[("{{person}}", "pglease.person"), ("{{grant}}", "pglease.grant"), ("{{scope}}", "pglease.scope")];

/// A filter as SQL: templates read their settings. Refuses what is not one condition.
pub fn condition_sql(filter: &str) -> Result<String, String> {
    let mut sql = filter.trim().to_owned();
    for (template, setting) in TEMPLATES {
        sql = sql.replace(template, &format!("current_setting('{setting}')"));
    }
    if sql.contains('$') {
        return Err(format!("{filter:?} must not use $ (parameters or dollar quoting)"));
    }
    if sql.contains("{{") {
        return Err(format!("unknown template in {filter:?} (there are {{{{person}}}}, {{{{grant}}}} and {{{{scope}}}})"));
    }
    // One balanced condition: it is pasted between parentheses and ANDed with others.
    let tokens = super::scan_tokens(&sql).map_err(|e| format!("{filter:?} is not a SQL condition: {e}"))?;
    let mut depth = 0i32;
    for t in &tokens {
        match Token::try_from(t.token) {
            Ok(Token::Ascii40) => depth += 1,
            Ok(Token::Ascii41) => depth -= 1,
            Ok(Token::Ascii59) => return Err(format!("{filter:?} must be one condition, without ';'")),
            Ok(Token::SqlComment | Token::CComment) => return Err(format!("{filter:?} must not hold comments")),
            _ => {}
        }
        if depth < 0 {
            return Err(format!("{filter:?} has unbalanced parentheses"));
        }
    }
    if depth != 0 || tokens.is_empty() {
        return Err(format!("{filter:?} has unbalanced parentheses or is empty"));
    }
    pg_query::parse(&format!("SELECT 1 WHERE ({sql})"), 0).map_err(|e| format!("{filter:?} is not a SQL condition: {e}"))?;
    Ok(sql)
}

/// A statement with its row filters added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    pub sql: String,
    /// `schema.table` of each table filtered.
    pub tables: Vec<String>,
}




/// Statements in which a filtered table may appear (each place is then filtered).
const FILTERABLE: &[&str] = &["SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "CopyStmt", "ExplainStmt", "PrepareStmt", "DeclareCursorStmt"];

struct Filterer<'a> {
    policy: &'a ScopePolicy,
    paths: &'a [Vec<String>],
    sql: &'a str,
    tokens: Vec<ScanToken>,
    ctes: HashSet<String>,
    edits: Vec<(usize, usize, String)>,
    tables: Vec<String>,
}

impl Filterer<'_> {
    /// The filter of the table `rv` names, as SQL, and its `schema.table`.
    fn filter_of(&self, rv: &Value) -> Result<Option<(String, String)>, String> {
        // A name that is also a CTE's is filtered too: the CTE's own body, and other parts of the
        // statement, may read the table by it.
        let (schema, name) = (s(rv, "schemaname"), s(rv, "relname"));
        let candidates = self.policy.candidates(self.paths, Some(schema).filter(|s| !s.is_empty()), name);
        let filters: Vec<(String, &str)> = candidates
            .iter()
            .filter_map(|(s, t)| self.policy.rule_of(s, t).and_then(|r| r.row_filter.as_deref()).map(|f| (format!("{s}.{t}"), f)))
            .collect();
        match filters.as_slice() {
            [] => Ok(None),
            [(table, filter)] if candidates.len() == 1 => Ok(Some((condition_sql(filter)?, table.clone()))),
            _ => Err(format!("does not allow {name} unqualified here: it may name a table with a row filter; qualify it")),
        }
    }

    fn token_at(&self, at: i64) -> Option<usize> {
        token_at(&self.tokens, usize::try_from(at).ok()?)
    }

    fn name_end(&self, i: usize) -> Option<usize> {
        name_end(&self.tokens, i)
    }

    /// The byte range of the table name of `rv` in the text.
    fn name_range(&self, rv: &Value) -> Result<(usize, usize, usize), String> {
        let first = self.token_at(rv.get("location").and_then(Value::as_i64).unwrap_or(-1)).ok_or("could not find a filtered table in the statement")?;
        let last = self.name_end(first).ok_or("could not find a filtered table in the statement")?;
        Ok((self.tokens[first].start as usize, self.tokens[last].end as usize, last))
    }

    /// A table read: `(SELECT * FROM t WHERE filter) AS t`.
    fn read(&mut self, rv: &Value, sampled: bool) -> Result<(), String> {
        let Some((cond, table)) = self.filter_of(rv)? else { return Ok(()) };
        if sampled || !rv.get("inh").and_then(Value::as_bool).unwrap_or(true) {
            return Err(format!("does not allow ONLY or TABLESAMPLE on {table}: it has a row filter"));
        }
        let (start, end, _) = self.name_range(rv)?;
        let aliased = rv.get("alias").is_some_and(|a| !a.is_null());
        let alias = if aliased { String::new() } else { format!(" AS {}", quote_ident(s(rv, "relname"))) };
        self.edits.push((start, end, format!("(SELECT * FROM {} WHERE ({cond})){alias}", &self.sql[start..end])));
        self.tables.push(table);
        Ok(())
    }

    /// The target of UPDATE or DELETE: its condition ANDed with the filter.
    fn target(&mut self, body: &Value) -> Result<(), String> {
        let Some(rv) = body.get("relation").filter(|r| !r.is_null()) else { return Ok(()) };
        let Some((cond, table)) = self.filter_of(rv)? else { return Ok(()) };
        if matches!(body.get("where_clause").and_then(tagged), Some(("CurrentOfExpr", _))) {
            return Err(format!("does not allow WHERE CURRENT OF on {table}: it has a row filter"));
        }
        if !rv.get("inh").and_then(Value::as_bool).unwrap_or(true) {
            return Err(format!("does not allow ONLY on {table}: it has a row filter"));
        }
        let (_, _, last) = self.name_range(rv)?;
        // After the table, at its own depth: WHERE, then the end (RETURNING, a closing
        // parenthesis of an enclosing CTE, `;` or the end of the text).
        let (mut depth, mut at_where, mut end) = (0i32, None, self.sql.len());
        for (k, t) in self.tokens.iter().enumerate().skip(last + 1) {
            match Token::try_from(t.token) {
                Ok(Token::Ascii40) => depth += 1,
                Ok(Token::Ascii41) if depth == 0 => {
                    end = t.start as usize;
                    break;
                }
                Ok(Token::Ascii41) => depth -= 1,
                Ok(Token::Ascii59) if depth == 0 => {
                    end = t.start as usize;
                    break;
                }
                Ok(Token::Where) if depth == 0 && at_where.is_none() => at_where = Some(k),
                Ok(Token::Returning) if depth == 0 => {
                    end = t.start as usize;
                    break;
                }
                _ => {}
            }
        }
        let end = self.sql[..end].trim_end().len();
        match at_where {
            Some(k) => {
                let first = self.tokens.get(k + 1).map_or(end, |t| t.start as usize);
                self.edits.push((first, first, "(".into()));
                self.edits.push((end, end, format!(") AND ({cond})")));
            }
            None => self.edits.push((end, end, format!(" WHERE ({cond})"))),
        }
        self.tables.push(table);
        Ok(())
    }

    /// `COPY t [(cols)] TO`: `COPY (SELECT cols FROM t WHERE filter) TO`.
    fn copy(&mut self, body: &Value) -> Result<(), String> {
        let Some(rv) = body.get("relation").filter(|r| !r.is_null()) else { return Ok(()) };
        if body.get("is_from").and_then(Value::as_bool).unwrap_or(false) {
            return Ok(());
        }
        let Some((cond, table)) = self.filter_of(rv)? else { return Ok(()) };
        let (start, name_end, last) = self.name_range(rv)?;
        let columns: Vec<String> = body
            .get("attlist")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(tagged)
            .map(|(_, f)| quote_ident(s(f, "sval")))
            .collect();
        let mut end = name_end;
        if !columns.is_empty() {
            let close = self.tokens[last..].iter().position(|t| t.token == Token::Ascii41 as i32).ok_or("could not find the column list")?;
            end = self.tokens[last + close].end as usize;
        }
        let list = if columns.is_empty() { "*".to_owned() } else { columns.join(", ") };
        self.edits.push((start, end, format!("(SELECT {list} FROM {} WHERE ({cond}))", &self.sql[start..name_end])));
        self.tables.push(table);
        Ok(())
    }

    fn visit(&mut self, v: &Value, sampled: bool) -> Result<(), String> {
        match v {
            Value::Object(m) => {
                if let Some(body) = m.get("UpdateStmt").or_else(|| m.get("DeleteStmt")) {
                    self.target(body)?;
                    for (k, x) in body.as_object().into_iter().flatten() {
                        if k != "relation" {
                            self.visit(x, false)?;
                        }
                    }
                    return Ok(());
                }
                if let Some(body) = m.get("InsertStmt") {
                    for (k, x) in body.as_object().into_iter().flatten() {
                        if k != "relation" {
                            self.visit(x, false)?;
                        }
                    }
                    return Ok(());
                }
                if let Some(body) = m.get("CopyStmt") {
                    self.copy(body)?;
                    for (k, x) in body.as_object().into_iter().flatten() {
                        if k != "relation" {
                            self.visit(x, false)?;
                        }
                    }
                    return Ok(());
                }
                if let Some(rv) = m.get("RangeVar") {
                    return self.read(rv, sampled);
                }
                if m.contains_key("LockingClause") {
                    // `FOR UPDATE OF t` names a FROM item, not a table to read.
                    return Ok(());
                }
                if let Some(ts) = m.get("RangeTableSample") {
                    for (k, x) in ts.as_object().into_iter().flatten() {
                        self.visit(x, k == "relation")?;
                    }
                    return Ok(());
                }
                for x in m.values() {
                    self.visit(x, false)?;
                }
            }
            Value::Array(a) => {
                for x in a {
                    self.visit(x, false)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}


/// Whether any rule of `policy` filters rows.
pub fn any(policy: &ScopePolicy) -> bool {
    policy.rules.iter().any(|r| r.row_filter.is_some())
}

/// Adds the row filters to `sql` (parsed as `tree`); None when it names no filtered table.
/// `Err` is a refusal ("does not allow …").
pub fn apply(policy: &ScopePolicy, paths: &[Vec<String>], sql: &str, tree: &Value) -> Result<Option<Filtered>, String> {
    let tokens = super::scan_tokens(sql).map_err(|e| format!("could not apply its row filters: {e}"))?;
    let ctes = cte_names(tree);
    let mut f = Filterer { policy, paths, sql, tokens, ctes, edits: Vec::new(), tables: Vec::new() };
    for stmt in tree.get("stmts").and_then(Value::as_array).into_iter().flatten() {
        let Some(node) = stmt.get("stmt") else { continue };
        let kind = tagged(node).map(|(k, _)| k).unwrap_or("");
        if FILTERABLE.contains(&kind) {
            f.visit(node, false)?;
        } else {
            // Anything else may not name a filtered table at all.
            let probe = Filterer { policy, paths, sql, tokens: Vec::new(), ctes: f.ctes.clone(), edits: Vec::new(), tables: Vec::new() };
            let mut named = None;
            each_range_var(node, &mut |rv| {
                if named.is_none() {
                    named = match probe.filter_of(rv) {
                        Ok(Some((_, table))) => Some(table),
                        Ok(None) => None,
                        Err(_) => Some(s(rv, "relname").to_owned()),
                    };
                }
            });
            if let Some(table) = named {
                return Err(format!("does not allow {} on {table}: it has a row filter", kind.trim_end_matches("Stmt").to_uppercase()));
            }
        }
    }
    if f.edits.is_empty() {
        return Ok(None);
    }
    let mut edits = f.edits;
    // Insertions at one place keep their order (" (" before the table's own text ends).
    edits.sort_by_key(|(start, end, _)| (*start, *end));
    let mut out = String::with_capacity(sql.len() + edits.len() * 64);
    let mut at = 0;
    for (start, end, text) in edits {
        if start < at {
            return Err("could not apply its row filters: overlapping tables".into());
        }
        out.push_str(&sql[at..start]);
        out.push_str(&text);
        at = end;
    }
    out.push_str(&sql[at..]);
    let mut tables = f.tables;
    tables.dedup();
    Ok(Some(Filtered { sql: out, tables }))
}

/// Every table a statement names: `RangeVar` nodes, and the bare relation fields of
/// statements (`ALTER TABLE t …`).
fn each_range_var<'v>(v: &'v Value, f: &mut impl FnMut(&'v Value)) {
    match v {
        Value::Object(m) => {
            if let Some(rv) = m.get("RangeVar") {
                f(rv);
            } else if m.contains_key("relname") && m.contains_key("inh") {
                f(v);
            }
            m.values().for_each(|x| each_range_var(x, f));
        }
        Value::Array(a) => a.iter().for_each(|x| each_range_var(x, f)),
        _ => {}
    }
}
