//! `*` over a table with denied columns, rewritten to the columns the scope may read.
//!
//! `SELECT *`, `SELECT t.*`, `TABLE t` and `COPY t TO …` over a table whose rule denies
//! columns are rewritten in the statement's text: the `*` becomes the permitted columns,
//! qualified by the table's name in the query (`c."id", c."name"`), and the other `FROM` items
//! keep theirs (`o.*`). The new text is then parsed and decided like any statement, so what runs
//! is exactly what was checked. The result has the columns `*` would have had, without the
//! denied ones, in the same order and with the same names.
//!
//! Left as `*` (and so refused, naming the column, as before pglease knew columns): a `*` over
//! a join with `USING` or `NATURAL` (its merged columns have no qualified form), a table with
//! column aliases (`FROM customers c(a, b)`), a name that may resolve to more than one table, a
//! table whose columns are not known yet, `RETURNING *`, and whole-row references
//! (`row_to_json(c)`, `c::text`): a row of the permitted columns would lose their names.

use std::collections::HashSet;

use pg_query::protobuf::{ScanToken, Token};
use serde_json::Value;

use super::schema::Schema;
use super::tree::{cte_names, each, list, location, name_end, s, tagged, token_at};
use super::{ScopePolicy, quote_ident};

/// A rewritten statement and what it left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    pub sql: String,
    /// `(schema.table, column)` of each column left out, in the order met.
    pub omitted: Vec<(String, String)>,
}

/// What a `FROM` item is, for expanding a `*` over it.
enum Item {
    /// A table with denied columns: `refname` is how the query names it.
    /// `masked`: some of its columns are masked (they are listed, and masked by `masks`).
    Table { refname: String, qualified: String, columns: Vec<String>, denied: Vec<String>, masked: bool },
    /// Anything with a name and no denied columns (another table, a CTE, an aliased subquery).
    Other { refname: String },
    /// A join without USING, NATURAL or an alias: its sides' columns, in order.
    Join(Vec<Item>),
    /// No exact qualified form: a join with USING or NATURAL, an unaliased subquery, column
    /// aliases over a table with denied columns, a name that may resolve to several tables.
    Unsupported { refname: Option<String> },
}

impl Item {
    fn needs_expansion(&self) -> bool {
        match self {
            Item::Table { .. } => true,
            Item::Join(items) => items.iter().any(Item::needs_expansion),
            _ => false,
        }
    }

    /// The select-list entries standing for this item's columns.
    fn pieces(&self, out: &mut Vec<String>, omitted: &mut Vec<(String, String)>) -> bool {
        match self {
            Item::Table { refname, qualified, columns, denied, .. } => {
                for c in columns {
                    if denied.contains(c) {
                        omitted.push((qualified.clone(), c.clone()));
                    } else {
                        out.push(format!("{}.{}", quote_ident(refname), quote_ident(c)));
                    }
                }
                true
            }
            Item::Other { refname } => {
                out.push(format!("{}.*", quote_ident(refname)));
                true
            }
            Item::Join(items) => items.iter().all(|i| i.pieces(out, omitted)),
            Item::Unsupported { .. } => false,
        }
    }

    /// The item (or join member) the query names `name`.
    fn find(&self, name: &str) -> Option<&Item> {
        match self {
            Item::Table { refname, .. } | Item::Other { refname } if refname == name => Some(self),
            Item::Unsupported { refname: Some(r) } if r == name => Some(self),
            Item::Join(items) => items.iter().find_map(|i| i.find(name)),
            _ => None,
        }
    }
}






struct Expander<'a> {
    policy: &'a ScopePolicy,
    paths: &'a [Vec<String>],
    schema: &'a Schema,
    sql: &'a str,
    tokens: Vec<ScanToken>,
    ctes: HashSet<String>,
    /// Text replacements: (start, end, new text).
    edits: Vec<(usize, usize, String)>,
    omitted: Vec<(String, String)>,
}

impl Expander<'_> {
    fn item(&self, node: &Value) -> Item {
        let Some((ty, body)) = tagged(node) else { return Item::Unsupported { refname: None } };
        match ty {
            "RangeVar" => self.range_var(body),
            "RangeTableSample" => body.get("relation").map_or(Item::Unsupported { refname: None }, |r| self.item(r)),
            "RangeSubselect" | "RangeFunction" | "RangeTableFunc" | "JsonTable" => {
                let alias = body.get("alias").filter(|a| !a.is_null()).map(|a| s(a, "aliasname").to_owned());
                match alias {
                    Some(refname) => Item::Other { refname },
                    None => Item::Unsupported { refname: None },
                }
            }
            "JoinExpr" => {
                let sides: Vec<Item> = ["larg", "rarg"].iter().filter_map(|k| body.get(*k)).map(|n| self.item(n)).collect();
                let merged = !list(body, "using_clause").is_empty() || body.get("is_natural").and_then(Value::as_bool).unwrap_or(false);
                let aliased = body.get("alias").is_some_and(|a| !a.is_null());
                if merged || aliased {
                    // Members stay findable for `t.*`, but `*` over the join is not exact; nor
                    // is `j.*` over the join's alias.
                    let alias = body.get("alias").filter(|a| !a.is_null()).map(|a| s(a, "aliasname").to_owned());
                    return Item::Join(vec![Item::Unsupported { refname: alias }].into_iter().chain(sides).collect());
                }
                Item::Join(sides)
            }
            _ => Item::Unsupported { refname: None },
        }
    }

    fn range_var(&self, rv: &Value) -> Item {
        let (schema, name) = (s(rv, "schemaname"), s(rv, "relname"));
        let alias = rv.get("alias").filter(|a| !a.is_null());
        let refname = alias.map_or(name, |a| s(a, "aliasname")).to_owned();
        if !s(rv, "catalogname").is_empty() {
            return Item::Unsupported { refname: Some(refname) };
        }
        if schema.is_empty() && self.ctes.contains(name) {
            return Item::Other { refname };
        }
        let candidates = self.policy.candidates(self.paths, Some(schema).filter(|s| !s.is_empty()), name);
        let denied: Vec<String> = candidates.iter().filter_map(|(s, t)| self.policy.rule_for(s, t)).flat_map(|(_, cols)| cols.iter().cloned()).collect();
        let masked = self.policy.masked_columns(self.paths, Some(schema).filter(|s| !s.is_empty()), name);
        if denied.is_empty() && masked.is_empty() {
            return Item::Other { refname };
        }
        let column_aliases = alias.is_some_and(|a| !list(a, "colnames").is_empty());
        let known: Vec<(&String, &String, &[String])> =
            candidates.iter().filter_map(|(s, t)| self.schema.columns(s, t).map(|c| (s, t, c))).collect();
        // The one table of those the name may resolve to that has columns with rules. (Another
        // one earlier in the path, without column rules, would be read instead: the rewritten
        // statement is checked against every candidate, so it cannot reach a denied column.)
        match (column_aliases, known.as_slice()) {
            (false, [(s, t, columns)]) => {
                Item::Table { refname, qualified: format!("{s}.{t}"), columns: columns.to_vec(), denied, masked: !masked.is_empty() }
            }
            _ => Item::Unsupported { refname: Some(refname) },
        }
    }

    fn token_at(&self, at: usize) -> Option<usize> {
        token_at(&self.tokens, at)
    }

    fn name_end(&self, i: usize) -> Option<usize> {
        name_end(&self.tokens, i)
    }

    fn select(&mut self, body: &Value) -> Result<(), String> {
        for side in ["larg", "rarg"] {
            if let Some(b) = body.get(side).filter(|b| !b.is_null()) {
                self.select(b)?;
            }
        }
        let from = list(body, "from_clause");
        let mut items: Option<Vec<Item>> = None;
        for target in list(body, "target_list") {
            let Some(("ResTarget", rt)) = tagged(target) else { continue };
            let Some(("ColumnRef", cr)) = rt.get("val").and_then(tagged) else { continue };
            let fields = list(cr, "fields");
            if !fields.last().and_then(tagged).is_some_and(|(t, _)| t == "AStar") {
                continue;
            }
            let items: &Vec<Item> = items.get_or_insert_with(|| from.iter().map(|n| self.item(n)).collect());
            let names: Vec<&str> = fields[..fields.len() - 1].iter().filter_map(tagged).map(|(_, f)| s(f, "sval")).collect();
            let target_item: Option<&Item> = match names.as_slice() {
                [] => None,
                [.., q] => items.iter().find_map(|i| i.find(q)),
            };
            let (expanding, plain): (Vec<&Item>, bool) = match (names.is_empty(), target_item) {
                (true, _) => (items.iter().collect(), true),
                (false, Some(item)) => (vec![item], false),
                (false, None) => continue,
            };
            if !expanding.iter().any(|i| i.needs_expansion()) {
                continue;
            }
            let mut pieces = Vec::new();
            let mut omitted = Vec::new();
            if !expanding.iter().all(|i| i.pieces(&mut pieces, &mut omitted)) || pieces.is_empty() {
                continue;
            }
            let at = location(cr);
            let edit = if at < 0 {
                // `TABLE t`: a `*` the grammar made, over the one relation.
                self.table_statement(from, &pieces)?
            } else {
                let first = self.token_at(at as usize).ok_or("could not find `*` in the statement")?;
                let star = if plain { Some(first) } else { self.tokens[first..].iter().position(|t| t.token == Token::Ascii42 as i32).map(|k| first + k) };
                let star = star.filter(|k| self.tokens[*k].token == Token::Ascii42 as i32).ok_or("could not find `*` in the statement")?;
                (at as usize, self.tokens[star].end as usize, pieces.join(", "))
            };
            self.edits.push(edit);
            self.omitted.extend(omitted);
        }
        Ok(())
    }

    /// `TABLE [ONLY] t` as `SELECT cols FROM [ONLY] t`.
    fn table_statement(&self, from: &[Value], pieces: &[String]) -> Result<(usize, usize, String), String> {
        let rv = match from {
            [one] => match tagged(one) {
                Some(("RangeVar", rv)) => rv,
                _ => return Err("unexpected TABLE statement".into()),
            },
            _ => return Err("unexpected TABLE statement".into()),
        };
        let name = self.token_at(location(rv).max(0) as usize).ok_or("could not find the table in the statement")?;
        let end = self.name_end(name).ok_or("could not find the table in the statement")?;
        let keyword = (0..name).rev().find(|k| self.tokens[*k].token == Token::Table as i32).ok_or("could not find TABLE in the statement")?;
        let (start, after) = (self.tokens[keyword].start as usize, self.tokens[keyword].end as usize);
        let end = self.tokens[end].end as usize;
        Ok((start, end, format!("SELECT {} FROM{}", pieces.join(", "), &self.sql[after..end])))
    }

    /// `COPY t TO …` as `COPY t (cols) TO …`; with masked columns, `COPY (SELECT cols FROM t)
    /// TO …` (a query's select list is where masks apply).
    fn copy(&mut self, body: &Value) -> Result<(), String> {
        let is_from = body.get("is_from").and_then(Value::as_bool).unwrap_or(false);
        let Some(rv) = body.get("relation").filter(|r| !r.is_null()) else { return Ok(()) };
        if is_from {
            return Ok(());
        }
        let Item::Table { refname, columns, denied, qualified, masked } = self.range_var(rv) else { return Ok(()) };
        let named: Vec<String> = list(body, "attlist").iter().filter_map(tagged).map(|(_, f)| s(f, "sval").to_owned()).collect();
        if !named.is_empty() && !masked {
            // Explicit columns: checked as named.
            return Ok(());
        }
        let chosen: Vec<&String> = if named.is_empty() { columns.iter().filter(|c| !denied.contains(c)).collect() } else { named.iter().collect() };
        if chosen.is_empty() {
            return Ok(());
        }
        let name = self.token_at(location(rv).max(0) as usize).ok_or("could not find the table in the statement")?;
        let start = self.tokens[name].start as usize;
        let name_end = self.name_end(name).ok_or("could not find the table in the statement")?;
        let mut end = self.tokens[name_end].end as usize;
        if !named.is_empty() {
            // Through the column list's closing parenthesis.
            let close = self.tokens[name_end..].iter().position(|t| t.token == Token::Ascii41 as i32).ok_or("could not find the column list")?;
            end = self.tokens[name_end + close].end as usize;
        }
        let text = if masked {
            let cols: Vec<String> = chosen.iter().map(|c| format!("{}.{}", quote_ident(&refname), quote_ident(c))).collect();
            (start, end, format!("(SELECT {} FROM {})", cols.join(", "), &self.sql[start..self.tokens[name_end].end as usize]))
        } else {
            let cols: Vec<String> = chosen.iter().map(|c| quote_ident(c)).collect();
            (end, end, format!(" ({})", cols.join(", ")))
        };
        self.edits.push(text);
        if named.is_empty() {
            self.omitted.extend(columns.iter().filter(|c| denied.contains(c)).map(|c| (qualified.clone(), c.clone())));
        }
        Ok(())
    }

    fn visit(&mut self, v: &Value) -> Result<(), String> {
        match v {
            Value::Object(m) => {
                if let Some(body) = m.get("SelectStmt") {
                    self.select(body)?;
                }
                if let Some(body) = m.get("CopyStmt") {
                    self.copy(body)?;
                }
                for x in m.values() {
                    self.visit(x)?;
                }
            }
            Value::Array(a) => {
                for x in a {
                    self.visit(x)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Rewrites every `*` over a table with denied columns in `sql` (parsed as `tree`) that has an
/// exact form; None when there is none. An error when the text does not match its tree.
pub fn expand(policy: &ScopePolicy, paths: &[Vec<String>], sql: &str, tree: &Value, schema: &Schema) -> Result<Option<Expanded>, String> {
    let tokens = super::scan_tokens(sql)?;
    let ctes = cte_names(tree);
    let mut x = Expander { policy, paths, schema, sql, tokens, ctes, edits: Vec::new(), omitted: Vec::new() };
    x.visit(tree)?;
    if x.edits.is_empty() {
        return Ok(None);
    }
    let mut edits = x.edits;
    edits.sort_by_key(|(start, _, _)| std::cmp::Reverse(*start));
    edits.dedup_by_key(|(start, _, _)| *start);
    let mut out = sql.to_owned();
    let mut limit = usize::MAX;
    for (start, end, text) in edits {
        if end > limit || start > end || !sql.is_char_boundary(start) || !sql.is_char_boundary(end) {
            return Err("overlapping rewrites".into());
        }
        out.replace_range(start..end, &text);
        limit = start;
    }
    let mut omitted = Vec::new();
    for o in x.omitted {
        if !omitted.contains(&o) {
            omitted.push(o);
        }
    }
    Ok(Some(Expanded { sql: out, omitted }))
}

/// What `*` left out, for the client's NOTICE.
pub fn left_out(omitted: &[(String, String)]) -> String {
    let mut by_table: Vec<(String, Vec<String>)> = Vec::new();
    for (table, column) in omitted {
        match by_table.iter_mut().find(|(t, _)| t == table) {
            Some((_, cols)) => cols.push(column.clone()),
            None => by_table.push((table.clone(), vec![column.clone()])),
        }
    }
    let parts: Vec<String> = by_table
        .iter()
        .map(|(table, cols)| format!("{} {} of {table}", if cols.len() == 1 { "column" } else { "columns" }, cols.join(", ")))
        .collect();
    format!("left out {} from *", parts.join("; "))
}

/// The tables' names (as written, or their aliases) that some `*` in `stmt` may expand over:
/// a `*` of a select list reaches the tables of its own `FROM` (through joins); `q.*` anywhere
/// reaches whatever the statement calls `q`; any other `*` reaches every table.
pub fn stars_reach(stmt: &Value) -> HashSet<String> {
    let mut reach = HashSet::new();
    let mut direct: HashSet<*const Value> = HashSet::new();
    direct_stars(stmt, &mut reach, &mut direct);
    let mut all = HashSet::new();
    every_table(stmt, &mut all);
    let joins = joins(stmt);
    other_stars(stmt, &direct, &all, &joins, &mut reach);
    reach
}

/// What a statement's joins hide: the tables under each join alias (`(a JOIN b) AS j`: `j.*`
/// and a whole-row `j` reach both), and the tables whose columns an alias list renames
/// (`customers c(a, b)`, `(a JOIN b) AS j(x, y)`).
#[derive(Debug, Default)]
pub struct Joins {
    pub beneath: std::collections::HashMap<String, HashSet<String>>,
    pub renamed: HashSet<String>,
}

pub fn joins(stmt: &Value) -> Joins {
    let mut out = Joins::default();
    fn walk(v: &Value, out: &mut Joins) {
        match v {
            Value::Object(m) => {
                if let Some(j) = m.get("JoinExpr")
                    && let Some(alias) = j.get("alias").filter(|a| !a.is_null())
                {
                    let mut names = HashSet::new();
                    ["larg", "rarg"].iter().filter_map(|k| j.get(*k)).for_each(|n| from_names_deep(n, &mut names));
                    if !list(alias, "colnames").is_empty() {
                        out.renamed.extend(names.iter().cloned());
                    }
                    out.beneath.entry(s(alias, "aliasname").to_owned()).or_default().extend(names);
                }
                if let Some(rv) = m.get("RangeVar")
                    && let Some(alias) = rv.get("alias").filter(|a| !a.is_null())
                    && !list(alias, "colnames").is_empty()
                {
                    out.renamed.insert(s(rv, "relname").to_owned());
                    out.renamed.insert(s(alias, "aliasname").to_owned());
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(stmt, &mut out);
    out
}

/// The names of the tables under a `FROM` item, through nested joins of any kind.
fn from_names_deep(node: &Value, out: &mut HashSet<String>) {
    let Some((ty, body)) = tagged(node) else { return };
    match ty {
        "RangeVar" | "RangeTableSample" => from_names(node, out),
        "JoinExpr" => ["larg", "rarg"].iter().filter_map(|k| body.get(*k)).for_each(|n| from_names_deep(n, out)),
        _ => {}
    }
}

/// The names a `FROM` item gives its tables (not those inside subqueries: their own level).
fn from_names(node: &Value, out: &mut HashSet<String>) {
    let Some((ty, body)) = tagged(node) else { return };
    match ty {
        "RangeVar" => {
            out.insert(s(body, "relname").to_owned());
            if let Some(a) = body.get("alias").filter(|a| !a.is_null()) {
                out.insert(s(a, "aliasname").to_owned());
            }
        }
        "RangeTableSample" => body.get("relation").into_iter().for_each(|r| from_names(r, out)),
        "JoinExpr" => ["larg", "rarg"].iter().filter_map(|k| body.get(*k)).for_each(|n| from_names(n, out)),
        _ => {}
    }
}

fn select_level(body: &Value, reach: &mut HashSet<String>, direct: &mut HashSet<*const Value>) {
    for side in ["larg", "rarg"] {
        if let Some(b) = body.get(side).filter(|b| !b.is_null()) {
            select_level(b, reach, direct);
        }
    }
    for target in list(body, "target_list") {
        let Some(("ResTarget", rt)) = tagged(target) else { continue };
        let Some(val) = rt.get("val") else { continue };
        let Some(("ColumnRef", cr)) = tagged(val) else { continue };
        let fields = list(cr, "fields");
        if fields.len() == 1 && tagged(&fields[0]).is_some_and(|(t, _)| t == "AStar") {
            direct.insert(val as *const Value);
            list(body, "from_clause").iter().for_each(|n| from_names(n, reach));
        }
    }
}

fn direct_stars(v: &Value, reach: &mut HashSet<String>, direct: &mut HashSet<*const Value>) {
    match v {
        Value::Object(m) => {
            if let Some(body) = m.get("SelectStmt") {
                select_level(body, reach, direct);
            }
            m.values().for_each(|x| direct_stars(x, reach, direct));
        }
        Value::Array(a) => a.iter().for_each(|x| direct_stars(x, reach, direct)),
        _ => {}
    }
}

fn every_table(v: &Value, out: &mut HashSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(rv) = m.get("RangeVar") {
                out.insert(s(rv, "relname").to_owned());
                if let Some(a) = rv.get("alias").filter(|a| !a.is_null()) {
                    out.insert(s(a, "aliasname").to_owned());
                }
            }
            m.values().for_each(|x| every_table(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| every_table(x, out)),
        _ => {}
    }
}

fn other_stars(v: &Value, direct: &HashSet<*const Value>, all: &HashSet<String>, joins: &Joins, reach: &mut HashSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(cr) = m.get("node").and_then(|n| n.get("ColumnRef")) {
                let fields = list(cr, "fields");
                if fields.last().and_then(tagged).is_some_and(|(t, _)| t == "AStar") && !direct.contains(&(v as *const Value)) {
                    match fields[..fields.len() - 1].last().and_then(tagged) {
                        Some((_, q)) => {
                            let q = s(q, "sval");
                            reach.insert(q.to_owned());
                            reach.extend(joins.beneath.get(q).into_iter().flatten().cloned());
                        }
                        None => reach.extend(all.iter().cloned()),
                    }
                }
            }
            m.values().for_each(|x| other_stars(x, direct, all, joins, reach));
        }
        Value::Array(a) => a.iter().for_each(|x| other_stars(x, direct, all, joins, reach)),
        _ => {}
    }
}

/// `q.f` where `f` is not a column of `q` is Postgres's attribute notation for the call `f(q)`
/// (`t.row_to_json`, `t.ts_stat`): it must pass the function rules, and over a table with
/// denied or masked columns it is a whole-row reference. A `q.f` is taken as a column only
/// where `q` is a table whose columns pglease knows to include `f`. (Only names of built-in
/// functions are checked: a user-defined function of one argument called this way is not.)
pub fn attribute_calls(policy: &ScopePolicy, paths: &[Vec<String>], tree: &Value, schema: Option<&Schema>) -> Result<(), String> {
    // The tables each name may stand for.
    let mut tables: std::collections::HashMap<String, Vec<(String, String)>> = std::collections::HashMap::new();
    each(tree, "RangeVar", &mut |rv| {
        let (sch, name) = (s(rv, "schemaname"), s(rv, "relname"));
        let candidates = policy.candidates(paths, Some(sch).filter(|s| !s.is_empty()), name);
        tables.entry(name.to_owned()).or_default().extend(candidates.iter().cloned());
        if let Some(a) = rv.get("alias").filter(|a| !a.is_null()) {
            tables.entry(s(a, "aliasname").to_owned()).or_default().extend(candidates.iter().cloned());
        }
    });
    let joins = joins(tree);
    let restricted = |(sch, t): &(String, String)| {
        policy.rule_for(sch, t).is_some_and(|(_, denied)| !denied.is_empty()) || !policy.masked_columns(&[], Some(sch), t).is_empty()
    };
    let mut problem = None;
    each(tree, "ColumnRef", &mut |cr| {
        if problem.is_some() {
            return;
        }
        let names: Vec<&str> = list(cr, "fields").iter().filter_map(tagged).map(|(t, f)| if t == "String" { s(f, "sval") } else { "*" }).collect();
        let [.., q, f] = names.as_slice() else { return };
        if *f == "*" || super::functions::builtin(f).is_none() {
            return;
        }
        let under: Vec<(String, String)> = tables
            .get(*q)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .chain(joins.beneath.get(*q).into_iter().flatten().filter_map(|n| tables.get(n)).flatten().cloned())
            .collect();
        let is_column = !under.is_empty() && !joins.beneath.contains_key(*q) && under.iter().all(|(sch, t)| schema.and_then(|k| k.columns(sch, t)).is_some_and(|c| c.iter().any(|c| c == f)));
        if is_column {
            return;
        }
        // Over a table (not a join's alias), only a function taking a whole row can be meant.
        let over_table = !under.is_empty() && !joins.beneath.contains_key(*q);
        if over_table && !super::functions::takes_a_row(f) {
            return;
        }
        if !policy.function_allowed(None, f) {
            problem = Some(format!("does not allow {q}.{f}: it calls function {f}"));
        } else if let Some((sch, t)) = under.iter().find(|x| restricted(x)) {
            problem = Some(format!("does not allow {q}.{f}: it may be {f}({q}), a whole-row reference to {sch}.{t}"));
        }
    });
    problem.map_or(Ok(()), Err)
}


