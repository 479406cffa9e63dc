//! Rewrites applied on the parse tree, then deparsed: the row cap.

use pg_query::NodeEnum;
use pg_query::protobuf::{self, AConst, Integer, LimitOption, MinMaxExpr, MinMaxOp, Node, SelectStmt, a_const};
use serde_json::Value;

fn int_const(n: i64) -> Node {
    Node {
        node: Some(NodeEnum::AConst(AConst { isnull: false, location: -1, val: Some(a_const::Val::Ival(Integer { ival: n as i32 })) })),
    }
}

/// `n::bigint`, built by the parser itself.
fn bigint_const(n: i64) -> Option<Node> {
    let parsed = pg_query::parse(&format!("SELECT {n}::bigint"), 0).ok()?;
    let stmt = parsed.protobuf.stmts.into_iter().next()?.stmt?;
    match stmt.node? {
        NodeEnum::SelectStmt(s) => match s.target_list.into_iter().next()?.node? {
            NodeEnum::ResTarget(r) => r.val.map(|v| *v),
            _ => None,
        },
        _ => None,
    }
}

/// Lowers or adds the LIMIT of a SELECT so it returns at most `limit` rows. Returns whether it
/// changed anything.
fn cap(select: &mut SelectStmt, limit: u64) -> bool {
    let limit = limit.min(i32::MAX as u64) as i64;
    let with_ties = select.limit_option == LimitOption::WithTies as i32;
    let current = select.limit_count.as_deref().and_then(|n| match &n.node {
        Some(NodeEnum::AConst(c)) if c.isnull => Some(None),
        Some(NodeEnum::AConst(AConst { val: Some(a_const::Val::Ival(Integer { ival })), .. })) => Some(Some(*ival as i64)),
        _ => None,
    });
    match (&select.limit_count, current) {
        // Already within the cap (WITH TIES may return more, so it is replaced).
        (Some(_), Some(Some(n))) if n <= limit && !with_ties => false,
        // No LIMIT, LIMIT ALL/NULL, a larger constant, or WITH TIES: a plain LIMIT of the cap.
        (None, _) | (Some(_), Some(_)) => {
            select.limit_count = Some(Box::new(int_const(limit)));
            select.limit_option = LimitOption::Count as i32;
            true
        }
        // An expression or parameter: LEAST(expr, cap::bigint). The cast keeps a parameter's
        // inferred type bigint, as it is for a bare LIMIT $1.
        (Some(expr), None) => {
            let expr = (**expr).clone();
            let Some(bigint) = bigint_const(limit) else { return false };
            select.limit_count = Some(Box::new(Node {
                node: Some(NodeEnum::MinMaxExpr(Box::new(MinMaxExpr {
                    op: MinMaxOp::IsLeast as i32,
                    args: vec![expr, bigint],
                    location: -1,
                    ..Default::default()
                }))),
            }));
            select.limit_option = LimitOption::Count as i32;
            true
        }
    }
}

fn cap_node(node: &mut Option<Box<Node>>, limit: u64) -> bool {
    match node.as_deref_mut().and_then(|n| n.node.as_mut()) {
        Some(NodeEnum::SelectStmt(s)) => cap(s, limit),
        _ => false,
    }
}

/// `COPY table [(cols)] TO STDOUT` as `COPY (SELECT cols FROM table LIMIT n) TO STDOUT`.
fn copy_as_query(copy: &mut protobuf::CopyStmt, limit: u64) -> Result<bool, String> {
    let Some(rel) = copy.relation.take() else { return Ok(false) };
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let table = if rel.schemaname.is_empty() { quote(&rel.relname) } else { format!("{}.{}", quote(&rel.schemaname), quote(&rel.relname)) };
    let cols: Vec<String> = copy
        .attlist
        .iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(quote(&s.sval)),
            _ => None,
        })
        .collect();
    let list = if cols.is_empty() { "*".to_owned() } else { cols.join(", ") };
    let parsed = pg_query::parse(&format!("SELECT {list} FROM {table} LIMIT {limit}"), 0).map_err(|e| e.to_string())?;
    let stmt = parsed.protobuf.stmts.into_iter().next().and_then(|s| s.stmt).ok_or("empty rewrite")?;
    copy.query = Some(Box::new(*stmt));
    copy.attlist.clear();
    Ok(true)
}

/// Refuses a COPY format Postgres does not know, as Postgres would, before the deparser sees it:
/// it cannot print one (a build with assertions aborts on it).
fn copy_format_known(copy: &protobuf::CopyStmt) -> Result<(), String> {
    for option in &copy.options {
        let Some(NodeEnum::DefElem(d)) = &option.node else { continue };
        if d.defname != "format" {
            continue;
        }
        match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
            Some(NodeEnum::String(f)) if matches!(f.sval.as_str(), "text" | "csv" | "binary") => {}
            Some(NodeEnum::String(f)) => return Err(format!("COPY format \"{}\" not recognized", f.sval)),
            _ => return Err("COPY format must be text, csv or binary".into()),
        }
    }
    Ok(())
}

/// Applies the row cap to every statement that returns rows; `Some(sql)` if anything changed.
pub(super) fn apply_row_limit(mut tree: protobuf::ParseResult, limit: u64) -> Result<Option<String>, String> {
    let mut changed = false;
    for raw in &mut tree.stmts {
        let Some(node) = raw.stmt.as_mut().and_then(|s| s.node.as_mut()) else { continue };
        changed |= match node {
            NodeEnum::SelectStmt(s) => cap(s, limit),
            NodeEnum::DeclareCursorStmt(d) => cap_node(&mut d.query, limit),
            NodeEnum::PrepareStmt(p) => cap_node(&mut p.query, limit),
            NodeEnum::CopyStmt(c) if !c.is_from => {
                copy_format_known(c)?;
                if c.query.is_some() {
                    cap_node(&mut c.query, limit)
                } else {
                    copy_as_query(c, limit)?
                }
            }
            _ => false,
        };
    }
    if !changed {
        return Ok(None);
    }
    let sql = pg_query::deparse(&tree, Default::default()).map_err(|e| e.to_string())?;
    round_trips(&tree, &sql)?;
    Ok(Some(sql))
}

/// Fields that say where in the text a node was, not what it is (the `ParseLoc` fields of the
/// Postgres node types).
const POSITION_FIELDS: &[&str] =
    &["location", "arg_location", "conninfo_location", "name_location", "payload_location", "list_start", "list_end", "rexpr_list_start", "rexpr_list_end", "stmt_location", "stmt_len"];

fn without_positions(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|k, _| !POSITION_FIELDS.contains(&k.as_str()));
            map.values_mut().for_each(without_positions);
        }
        Value::Array(items) => items.iter_mut().for_each(without_positions),
        _ => {}
    }
}

/// The rewritten text must parse back to the very tree it was printed from, positions aside:
/// what runs is then exactly what was checked and capped. The deparser does not always print a
/// tree the grammar reads back the same (it prints the parameter `$0` as `?`, for one); such a
/// statement is refused rather than sent in a form nobody checked.
fn round_trips(tree: &protobuf::ParseResult, sql: &str) -> Result<(), String> {
    let reparsed = pg_query::parse(sql, 0).map_err(|e| format!("the rewritten statement does not parse ({e})"))?;
    let as_value = |t: &protobuf::ParseResult| {
        let mut v = serde_json::to_value(t).map_err(|e| e.to_string())?;
        without_positions(&mut v);
        Ok::<_, String>(v)
    };
    if as_value(tree)? != as_value(&reparsed.protobuf)? {
        return Err("the rewritten statement does not read back as the statement that was checked".into());
    }
    Ok(())
}
