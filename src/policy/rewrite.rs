//! Rewrites applied on the parse tree, then deparsed: the row cap.

use pg_query::NodeEnum;
use pg_query::protobuf::{self, AConst, Integer, LimitOption, MinMaxExpr, MinMaxOp, Node, SelectStmt, a_const};

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
    pg_query::deparse(&tree, Default::default()).map(Some).map_err(|e| e.to_string())
}
