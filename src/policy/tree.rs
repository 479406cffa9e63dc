//! Reading pg_query's parse tree as JSON: the helpers the rewrites share.

use std::collections::HashSet;

use pg_query::protobuf::{ScanToken, Token};
use serde_json::Value;

/// The node type and body of a `{"node": {"Type": body}}` wrapper.
pub(super) fn tagged(v: &Value) -> Option<(&str, &Value)> {
    let inner = v.as_object()?.get("node")?.as_object()?;
    if inner.len() != 1 {
        return None;
    }
    inner.iter().next().map(|(k, v)| (k.as_str(), v))
}

/// A string field ("" when absent).
pub(super) fn s<'v>(v: &'v Value, key: &str) -> &'v str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A list field (empty when absent).
pub(super) fn list<'v>(v: &'v Value, key: &str) -> &'v [Value] {
    v.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
}

/// A node's `location` (-1 when it has none).
pub(super) fn location(v: &Value) -> i64 {
    v.get("location").and_then(Value::as_i64).unwrap_or(-1)
}

/// Calls `f` with the body of every `{"key": body}` in `v`, depth first.
pub(super) fn each<'v>(v: &'v Value, key: &str, f: &mut impl FnMut(&'v Value)) {
    match v {
        Value::Object(m) => {
            if let Some(body) = m.get(key) {
                f(body);
            }
            m.values().for_each(|x| each(x, key, f));
        }
        Value::Array(a) => a.iter().for_each(|x| each(x, key, f)),
        _ => {}
    }
}

/// The names every `WITH` of the statement defines.
pub(super) fn cte_names(v: &Value) -> HashSet<String> {
    let mut out = HashSet::new();
    each(v, "CommonTableExpr", &mut |c| {
        out.insert(s(c, "ctename").to_owned());
    });
    out
}

/// Whether a token can be (part of) a name: an identifier or a keyword.
pub(super) fn is_name(t: &ScanToken) -> bool {
    t.token == Token::Ident as i32 || t.token == Token::Uident as i32 || t.keyword_kind != 0
}

/// The index of the token that starts at byte `at`.
pub(super) fn token_at(tokens: &[ScanToken], at: usize) -> Option<usize> {
    tokens.binary_search_by_key(&at, |t| t.start as usize).ok()
}

/// The index of the last token of the dotted name starting at token `i` (`a`, `a.b`,
/// `"a"."b"`); None when no name starts there.
pub(super) fn name_end(tokens: &[ScanToken], mut i: usize) -> Option<usize> {
    if !is_name(tokens.get(i)?) {
        return None;
    }
    while let (Some(dot), Some(next)) = (tokens.get(i + 1), tokens.get(i + 2)) {
        if dot.token == Token::Ascii46 as i32 && is_name(next) {
            i += 2;
        } else {
            break;
        }
    }
    Some(i)
}
