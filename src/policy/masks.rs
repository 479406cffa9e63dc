//! Masked columns: read only through their mask, never used to filter, join, sort or group.
//!
//! A rule's `mask_columns` names a mask per column. Wherever a masked column's value flows to
//! the output (a select list, at any depth of its expression, of any query level) the column
//! reference is replaced in the statement's text by the mask applied to it, so every format,
//! `COPY` and cursor gets the masked value. Anywhere else (WHERE, JOIN … ON, GROUP BY, ORDER BY,
//! HAVING, DISTINCT ON, window clauses, aggregate arguments, RETURNING, UPDATE … SET) the
//! statement is refused: comparing or ordering by the real value would reveal it.
//!
//! The rewritten text is parsed again and decided like any statement; then every reference to a
//! masked column in it must lie inside a mask this pass wrote, or the statement is refused.

use std::collections::{BTreeMap, HashSet};

use pg_query::protobuf::ScanToken;
use serde_json::Value;

use super::tree::{list, name_end, s, tagged, token_at};
use super::{ScopePolicy, functions, quote_ident};

/// How a masked column's value is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mask {
    /// The first `start` and last `end` characters, the others `*`; all `*` when the value is
    /// no longer than `start + end`.
    Partial { start: u32, end: u32 },
    /// `j***@example.com`: the first character and the domain.
    Email,
    /// `[redacted]` (NULL stays NULL).
    Redact,
    /// NULL, of the column's own type.
    Null,
    /// HMAC-SHA256 of the value (as text), hex, under a key of the scope's role kept in the
    /// database where that role cannot read it (`pglease scope sql` creates both): equal values
    /// hash equal within a scope, so masked columns still join in the client, and cannot be
    /// reversed by hashing guesses.
    Hash,
    /// A SQL expression, `{value}` standing for the column.
    Sql(String),
}

impl Mask {
    /// A mask as a scope's config writes it.
    pub fn parse(text: &str) -> Result<Mask, String> {
        let t = text.trim();
        if let Some(expr) = t.strip_prefix("sql:") {
            let expr = expr.trim();
            if !expr.contains("{value}") {
                return Err("a sql: mask must use {value}, the column's value".into());
            }
            pg_query::parse(&format!("SELECT {}", expr.replace("{value}", "x")), 0).map_err(|e| format!("a sql: mask must be one SQL expression: {e}"))?;
            return Ok(Mask::Sql(expr.to_owned()));
        }
        match t {
            "email" => return Ok(Mask::Email),
            "redact" => return Ok(Mask::Redact),
            "null" => return Ok(Mask::Null),
            "hash" => return Ok(Mask::Hash),
            _ => {}
        }
        if let Some(args) = t.strip_prefix("partial(").and_then(|r| r.strip_suffix(')')) {
            let parts: Vec<&str> = args.split(',').map(str::trim).collect();
            if let [start, end] = parts.as_slice()
                && let (Ok(start), Ok(end)) = (start.parse::<u32>(), end.parse::<u32>())
                && start <= 64
                && end <= 64
            {
                return Ok(Mask::Partial { start, end });
            }
            return Err(format!("{t:?}: partial takes two counts of characters kept, at the start and the end (e.g. partial(0, 4))"));
        }
        Err(format!("unknown mask {t:?} (partial(START, END), email, hash, redact, null, or sql:EXPR with {{value}})"))
    }

    /// The SQL of the masked value of `value` (a column reference's text).
    pub fn sql(&self, value: &str) -> String {
        let v = format!("({value})::text");
        match self {
            Mask::Partial { start, end } => {
                let kept = start + end;
                format!(
                    "(CASE WHEN length({v}) > {kept} THEN left({v}, {start}) || repeat('*', length({v}) - {kept}) || right({v}, {end}) ELSE repeat('*', length({v})) END)"
                )
            }
            Mask::Email => {
                format!("(CASE WHEN strpos({v}, '@') > 1 THEN left({v}, 1) || '***@' || split_part({v}, '@', 2) ELSE repeat('*', length({v})) END)")
            }
            Mask::Redact => format!("(CASE WHEN ({value}) IS NULL THEN NULL ELSE '[redacted]' END)"),
            Mask::Null => format!("(CASE WHEN false THEN ({value}) END)"),
            Mask::Hash => format!("(CASE WHEN ({value}) IS NULL THEN NULL ELSE {HASH_FUNCTION}({v}) END)"),
            Mask::Sql(expr) => format!("({})", expr.replace("{value}", &format!("({value})"))),
        }
    }
}

/// The function the `hash` mask calls (see [`hash_setup_sql`]). Only masks pglease writes may
/// call it: a statement that calls it itself is refused (hashing guesses would reverse a mask).
pub const HASH_FUNCTION: &str = "pglease_masks.hash";

/// SQL that sets up the `hash` mask for `role` in the database it runs in: a role that owns a
/// schema `pglease_masks` no one else reads, with a random key per backing role and a
/// `SECURITY DEFINER` function computing HMAC-SHA256 (from the built-in `sha256`, no extension)
/// under the calling session's key. Running it again keeps existing keys.
pub fn hash_setup_sql(role: &str) -> String {
    let quoted = format!("\"{}\"", role.replace('"', "\"\""));
    let literal = role.replace('\'', "''");
    format!(
        "-- The hash mask: HMAC-SHA256 under a key of this role, which the role itself cannot read.\n\
         DO $$ BEGIN CREATE ROLE pglease_masks NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;\n\
         CREATE SCHEMA IF NOT EXISTS pglease_masks AUTHORIZATION pglease_masks;\n\
         REVOKE ALL ON SCHEMA pglease_masks FROM PUBLIC;\n\
         CREATE TABLE IF NOT EXISTS pglease_masks.keys (role name PRIMARY KEY, inner_pad bytea NOT NULL, outer_pad bytea NOT NULL);\n\
         ALTER TABLE pglease_masks.keys OWNER TO pglease_masks;\n\
         REVOKE ALL ON pglease_masks.keys FROM PUBLIC;\n\
         INSERT INTO pglease_masks.keys\n\
         SELECT '{literal}', decode(string_agg(lpad(to_hex(get_byte(k, i) # 54), 2, '0'), '' ORDER BY i), 'hex'),\n\
                decode(string_agg(lpad(to_hex(get_byte(k, i) # 92), 2, '0'), '' ORDER BY i), 'hex')\n\
         FROM (SELECT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex') AS k) r,\n\
              generate_series(0, 63) i\n\
         GROUP BY k ON CONFLICT (role) DO NOTHING;\n\
         CREATE OR REPLACE FUNCTION pglease_masks.hash(value text) RETURNS text\n\
           LANGUAGE sql STABLE STRICT SECURITY DEFINER SET search_path = pg_catalog\n\
           AS $f$ SELECT encode(sha256(k.outer_pad || sha256(k.inner_pad || convert_to(value, 'UTF8'))), 'hex') FROM pglease_masks.keys k WHERE k.role = session_user $f$;\n\
         ALTER FUNCTION pglease_masks.hash(text) OWNER TO pglease_masks;\n\
         REVOKE ALL ON FUNCTION pglease_masks.hash(text) FROM PUBLIC;\n\
         GRANT USAGE ON SCHEMA pglease_masks TO {quoted};\n\
         GRANT EXECUTE ON FUNCTION pglease_masks.hash(text) TO {quoted};\n"
    )
}

/// A statement with its masks applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masked {
    pub sql: String,
    /// Where the masks are in `sql` (byte ranges).
    pub ranges: Vec<(usize, usize)>,
    /// `(schema.table, column)` of each column masked, in the order met.
    pub masked: Vec<(String, String)>,
}

/// A table of the statement with masked columns.
struct MaskedTable {
    /// How the statement may name it: its name and its alias.
    names: HashSet<String>,
    qualified: String,
    masks: BTreeMap<String, Mask>,
}




/// Every node of `v` (depth first), with the wrapper objects `{"node": …}` themselves.
fn each_node<'v>(v: &'v Value, f: &mut impl FnMut(&'v Value)) {
    match v {
        Value::Object(m) => {
            if m.contains_key("node") {
                f(v);
            }
            m.values().for_each(|x| each_node(x, f));
        }
        Value::Array(a) => a.iter().for_each(|x| each_node(x, f)),
        _ => {}
    }
}

/// Whether a call is an aggregate or window function: its value depends on other rows.
fn aggregate_call(call: &Value) -> bool {
    let flagged = call.get("over").is_some_and(|o| !o.is_null())
        || call.get("agg_filter").is_some_and(|o| !o.is_null())
        || !list(call, "agg_order").is_empty()
        || ["agg_star", "agg_distinct", "agg_within_group"].iter().any(|k| call.get(*k).and_then(Value::as_bool).unwrap_or(false));
    let names: Vec<&str> = list(call, "funcname").iter().filter_map(tagged).map(|(_, n)| s(n, "sval")).collect();
    let builtin_aggregate = match names.as_slice() {
        [name] | ["pg_catalog", name] => functions::is_aggregate(name),
        _ => false,
    };
    flagged || builtin_aggregate
}

/// The column references whose value flows to a select list's output: reachable from a
/// `SelectStmt` target list without entering a nested query or an aggregate or window call.
fn output_positions(v: &Value, out: &mut HashSet<*const Value>) {
    fn select(body: &Value, out: &mut HashSet<*const Value>) {
        for side in ["larg", "rarg"] {
            if let Some(b) = body.get(side).filter(|b| !b.is_null()) {
                select(b, out);
            }
        }
        for target in list(body, "target_list") {
            if let Some(("ResTarget", rt)) = tagged(target)
                && let Some(val) = rt.get("val")
            {
                expression(val, out);
            }
        }
    }
    fn expression(v: &Value, out: &mut HashSet<*const Value>) {
        match v {
            Value::Object(m) => {
                if m.contains_key("SelectStmt") {
                    return;
                }
                if let Some(("FuncCall", call)) = tagged(v)
                    && aggregate_call(call)
                {
                    return;
                }
                if let Some(("ColumnRef", _)) = tagged(v) {
                    out.insert(v as *const Value);
                }
                m.values().for_each(|x| expression(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| expression(x, out)),
            _ => {}
        }
    }
    match v {
        Value::Object(m) => {
            if let Some(body) = m.get("SelectStmt") {
                select(body, out);
            }
            m.values().for_each(|x| output_positions(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| output_positions(x, out)),
        _ => {}
    }
}

/// The statement's tables that have masked columns.
fn masked_tables(policy: &ScopePolicy, paths: &[Vec<String>], tree: &Value) -> Vec<MaskedTable> {
    // A name that is also a CTE's counts as the table too: a CTE shadows a table only in parts
    // of the statement, and a column it passes on may be the table's.
    let joins = super::expand::joins(tree);
    let mut tables: Vec<MaskedTable> = Vec::new();
    each_node(tree, &mut |n| {
        let Some(("RangeVar", rv)) = tagged(n) else { return };
        let (schema, name) = (s(rv, "schemaname"), s(rv, "relname"));
        let candidates = policy.candidates(paths, Some(schema).filter(|s| !s.is_empty()), name);
        let mut masks = BTreeMap::new();
        for (s, t) in &candidates {
            if let Some(rule) = policy.rule_of(s, t) {
                masks.extend(rule.masks.iter().map(|(c, m)| (c.clone(), m.clone())));
            }
        }
        if masks.is_empty() {
            return;
        }
        let mut names = HashSet::from([name.to_owned()]);
        if let Some(a) = rv.get("alias").filter(|a| !a.is_null()) {
            names.insert(s(a, "aliasname").to_owned());
        }
        // A join's alias qualifies the columns of the tables under it (`j.ssn`).
        for (alias, beneath) in &joins.beneath {
            if names.iter().any(|n| beneath.contains(n)) {
                names.insert(alias.clone());
            }
        }
        let (cs, ct) = &candidates[0];
        tables.push(MaskedTable { names, qualified: format!("{cs}.{ct}"), masks });
    });
    tables
}

/// The mask (and table) a column reference reads through, if it names a masked column. An
/// unqualified name counts for every masked table of the statement with such a column.
fn reference<'t>(tables: &'t [MaskedTable], column_ref: &Value) -> Result<Option<(&'t MaskedTable, &'t Mask, String)>, String> {
    let names: Vec<&str> = list(column_ref, "fields").iter().filter_map(tagged).filter(|(t, _)| *t == "String").map(|(_, f)| s(f, "sval")).collect();
    let Some((column, qualifiers)) = names.split_last() else { return Ok(None) };
    let matching: Vec<&MaskedTable> =
        tables.iter().filter(|t| t.masks.contains_key(*column) && qualifiers.last().is_none_or(|q| t.names.contains(*q))).collect();
    match matching.as_slice() {
        [] => Ok(None),
        [t, rest @ ..] => {
            let mask = &t.masks[*column];
            if rest.iter().any(|o| &o.masks[*column] != mask) {
                return Err(format!("does not allow column {column} unqualified here: tables of the statement mask it differently; qualify it"));
            }
            Ok(Some((t, mask, (*column).to_owned())))
        }
    }
}


/// The byte range of the dotted name starting at `at` (`a`, `a.b`, `"a"."b"`).
fn name_range(tokens: &[ScanToken], at: usize) -> Option<(usize, usize)> {
    let last = name_end(tokens, token_at(tokens, at)?)?;
    Some((at, tokens[last].end as usize))
}

/// The select-list entries that are a masked column reference alone (`SELECT ssn`): the
/// masked value keeps the column's name.
fn bare_targets(v: &Value, out: &mut HashSet<*const Value>) {
    each_node(v, &mut |n| {
        if let Some(("ResTarget", rt)) = tagged(n)
            && s(rt, "name").is_empty()
            && let Some(val) = rt.get("val")
            && let Some(("ColumnRef", cr)) = tagged(val)
            // Not `(ssn)`: the alias would land inside the parentheses.
            && rt.get("location") == cr.get("location")
        {
            out.insert(val as *const Value);
        }
    });
}

/// Applies the scope's masks to `sql` (parsed as `tree`): None when it reads no masked column.
/// `Err` is a refusal ("does not allow …").
pub fn apply(policy: &ScopePolicy, paths: &[Vec<String>], sql: &str, tree: &Value) -> Result<Option<Masked>, String> {
    let tables = masked_tables(policy, paths, tree);
    if tables.is_empty() {
        return Ok(None);
    }
    // Names that compare values without a column reference: JOIN … USING (col) and ON
    // CONFLICT (col).
    let mut compared = None;
    each_node(tree, &mut |n| {
        let names: Vec<&str> = match tagged(n) {
            Some(("JoinExpr", j)) => list(j, "using_clause").iter().filter_map(tagged).map(|(_, f)| s(f, "sval")).collect(),
            Some(("IndexElem", e)) => vec![s(e, "name")],
            _ => return,
        };
        if let Some((t, c)) = names.iter().find_map(|c| tables.iter().find(|t| t.masks.contains_key(*c)).map(|t| (t, c))) {
            compared.get_or_insert_with(|| format!("does not allow masked column {c} of {} in JOIN … USING or ON CONFLICT: only its mask may be read", t.qualified));
        }
    });
    if let Some(why) = compared {
        return Err(why);
    }
    let mut outputs = HashSet::new();
    output_positions(tree, &mut outputs);
    let mut bare = HashSet::new();
    bare_targets(tree, &mut bare);
    let tokens = super::scan_tokens(sql).map_err(|e| format!("could not apply its masks: {e}"))?;
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    let mut masked: Vec<(String, String)> = Vec::new();
    let mut refusal = None;
    each_node(tree, &mut |n| {
        if refusal.is_some() {
            return;
        }
        let Some(("ColumnRef", cr)) = tagged(n) else { return };
        let (table, mask, column) = match reference(&tables, cr) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(why) => {
                refusal = Some(why);
                return;
            }
        };
        if !outputs.contains(&(n as *const Value)) {
            refusal = Some(format!(
                "does not allow masked column {column} of {} outside a select list (in WHERE, JOIN, GROUP BY, ORDER BY, DISTINCT ON, an aggregate, a window or RETURNING): only its mask may be read",
                table.qualified
            ));
            return;
        }
        let at = cr.get("location").and_then(Value::as_i64).unwrap_or(-1);
        let Some((start, end)) = usize::try_from(at).ok().and_then(|at| name_range(&tokens, at)) else {
            refusal = Some(format!("could not apply the mask of column {column}"));
            return;
        };
        let mut text = mask.sql(&sql[start..end]);
        if bare.contains(&(n as *const Value)) {
            text.push_str(&format!(" AS {}", quote_ident(&column)));
        }
        edits.push((start, end, text));
        let entry = (table.qualified.clone(), column);
        if !masked.contains(&entry) {
            masked.push(entry);
        }
    });
    if let Some(why) = refusal {
        return Err(why);
    }
    if edits.is_empty() {
        return Ok(None);
    }
    edits.sort_by_key(|(start, _, _)| *start);
    let mut out = String::with_capacity(sql.len() + edits.len() * 128);
    let mut ranges = Vec::with_capacity(edits.len());
    let mut at = 0;
    for (start, end, text) in edits {
        if start < at {
            return Err("could not apply its masks: overlapping references".into());
        }
        out.push_str(&sql[at..start]);
        ranges.push((out.len(), out.len() + text.len()));
        out.push_str(&text);
        at = end;
    }
    out.push_str(&sql[at..]);
    Ok(Some(Masked { sql: out, ranges, masked }))
}

/// Checks a rewritten statement: every reference to a masked column must lie inside one of the
/// masks written into it (`ranges`). `Err` names the first that does not.
pub fn verify(policy: &ScopePolicy, paths: &[Vec<String>], tree: &Value, ranges: &[(usize, usize)]) -> Result<(), String> {
    let tables = masked_tables(policy, paths, tree);
    let mut unmasked = None;
    each_node(tree, &mut |n| {
        let Some(("ColumnRef", cr)) = tagged(n) else { return };
        if let Ok(Some((table, _, column))) = reference(&tables, cr) {
            let at = cr.get("location").and_then(Value::as_i64).unwrap_or(-1);
            let inside = usize::try_from(at).is_ok_and(|at| ranges.iter().any(|(s, e)| *s <= at && at < *e));
            if !inside && unmasked.is_none() {
                unmasked = Some(format!("column {column} of {}", table.qualified));
            }
        }
    });
    match unmasked {
        Some(what) => Err(format!("could not apply its masks: {what} would be read unmasked")),
        None => Ok(()),
    }
}

/// The NOTICE telling the client which columns it sees masked.
pub fn notice(masked: &[(String, String)]) -> String {
    let mut by_table: Vec<(String, Vec<String>)> = Vec::new();
    for (table, column) in masked {
        match by_table.iter_mut().find(|(t, _)| t == table) {
            Some((_, cols)) => cols.push(column.clone()),
            None => by_table.push((table.clone(), vec![column.clone()])),
        }
    }
    let parts: Vec<String> =
        by_table.iter().map(|(table, cols)| format!("{} {} of {table}", if cols.len() == 1 { "column" } else { "columns" }, cols.join(", "))).collect();
    format!("masked {}", parts.join("; "))
}

/// How many references to a masked column in `sql` (as `policy` reads them, under its pinned
/// search_path) are outside every `CASE` expression (the built-in masks are `CASE`
/// expressions): a structural check of a rewrite's output, for the fuzz target and tests,
/// independent of the byte ranges `apply` keeps.
pub fn references_outside_case(policy: &ScopePolicy, sql: &str) -> Result<usize, String> {
    fn walk(v: &Value, tables: &[MaskedTable], in_case: bool, count: &mut usize) {
        match v {
            Value::Object(m) => {
                let in_case = in_case || m.contains_key("CaseExpr");
                if let Some(cr) = m.get("ColumnRef")
                    && !in_case
                    && matches!(reference(tables, cr), Ok(Some(_)))
                {
                    *count += 1;
                }
                m.values().for_each(|x| walk(x, tables, in_case, count));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, tables, in_case, count)),
            _ => {}
        }
    }
    let parsed = pg_query::parse(sql, 0).map_err(|e| e.to_string())?;
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| e.to_string())?;
    let tables = masked_tables(policy, std::slice::from_ref(&policy.search_path), &tree);
    let mut count = 0;
    walk(&tree, &tables, false, &mut count);
    Ok(count)
}
