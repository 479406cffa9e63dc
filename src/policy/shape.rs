//! Statement shapes: the token sequence of a statement with its literal values masked, from the
//! real Postgres scanner (`pg_query::scan_tokens`, no protobuf round trip).
//!
//! Statements sent with literals inlined (`… WHERE aid = 4711`) differ in text every time, so
//! the exact-text decision cache never hits; parsing each from scratch is the largest cost of a
//! simple query. Two texts with the same shape are the same token sequence but for literal
//! values, and the grammar builds the same tree from them but for those values. A decision
//! that never looks at a literal's value is therefore the same for both, and may be reused.
//! [`super::ScopePolicy`] only does so when that holds by construction:
//! - the scope has no row cap (the cap compares the statement's own `LIMIT` value);
//! - every statement is a plain SELECT / INSERT / UPDATE / DELETE, whose checks read relation,
//!   column and function names and never a literal's value;
//! - the decision is allow or deny, with no rewrite and no session effect;
//! - no string in the tree (names, aliases, …) is spelled like one of the statement's literals,
//!   so a literal that some corner of the grammar turns into a name cannot be masked, and no Unicode-escaped
//!   identifier or string is present (`UESCAPE` makes an identifier depend on a literal).

use pg_query::protobuf::Token;

/// A statement's shape and the values it masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Tokens separated by NUL; masked literals as `\u{1}` and their token kind.
    pub key: String,
    /// The masked literals' values (plain string literals unquoted).
    pub literals: Vec<String>,
}

/// The shape of `sql`, or None when it has none we can trust (scanner error, Unicode escapes,
/// string literals other than plain `'…'`, or no literal at all — exact text then suffices).
pub fn of(sql: &str) -> Option<Shape> {
    // pg_query 18.1's scan_tokens builds a slice from a null pointer when there is no token at
    // all (undefined behaviour; an abort in debug builds): never hand it a blank statement.
    if sql.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')) {
        return None;
    }
    let tokens = super::scan_tokens(sql).ok()?;
    let mut key = String::with_capacity(sql.len() + tokens.len());
    let mut literals = Vec::new();
    for t in &tokens {
        let text = sql.get(t.start as usize..t.end as usize)?;
        let kind = Token::try_from(t.token).ok()?;
        match kind {
            Token::SqlComment | Token::CComment => continue,
            Token::Uident | Token::Usconst | Token::Uescape => return None,
            Token::Sconst => {
                // With standard_conforming_strings pinned on, '…' has only '' as an escape.
                let inner = text.strip_prefix('\'')?.strip_suffix('\'')?;
                literals.push(inner.replace("''", "'"));
            }
            Token::Iconst | Token::Fconst | Token::Bconst | Token::Xconst => literals.push(text.to_owned()),
            _ => {
                key.push_str(text);
                key.push('\0');
                continue;
            }
        }
        key.push('\u{1}');
        key.push_str(&t.token.to_string());
        key.push('\0');
    }
    if literals.is_empty() {
        return None;
    }
    Some(Shape { key, literals })
}

#[cfg(test)]
mod tests {
    use super::of;

    #[test]
    fn literals_are_masked_and_names_are_not() {
        let a = of("SELECT abalance FROM pgbench_accounts WHERE aid = 4711;").unwrap();
        let b = of("select abalance from pgbench_accounts where aid=12 ;").unwrap();
        assert_ne!(a.key, b.key, "keywords keep their spelling: different text, different key");
        let c = of("SELECT abalance FROM pgbench_accounts WHERE aid = 12;").unwrap();
        assert_eq!(a.key, c.key);
        assert_eq!(c.literals, vec!["12"]);
        assert_ne!(a.key, of("SELECT abalance FROM pgbench_branches WHERE aid = 12;").unwrap().key);
        assert_ne!(a.key, of("SELECT abalance FROM pgbench_accounts WHERE aid = 1.5;").unwrap().key, "integer and float literals differ");
        assert_ne!(of("SELECT 'x'").unwrap().key, of("SELECT 1").unwrap().key);
    }

    #[test]
    fn comments_and_whitespace_do_not_matter() {
        assert_eq!(of("SELECT a FROM t WHERE b = 'x'").unwrap().key, of("SELECT /* hi */ a\n FROM t -- c\n WHERE b = 'y'").unwrap().key);
    }

    #[test]
    fn plain_strings_are_unquoted_and_other_forms_have_no_shape() {
        assert_eq!(of("SELECT 'it''s'").unwrap().literals, vec!["it's"]);
        assert_eq!(of("SELECT E'\\x41'"), None);
        assert_eq!(of("SELECT $$x$$"), None);
        assert_eq!(of("SELECT U&'\\0041'"), None);
        assert_eq!(of("SELECT U&\"!0061\" UESCAPE '!' FROM t"), None);
        assert_eq!(of("SELECT a FROM t"), None, "nothing to mask");
        assert_eq!(of("SELECT 'unterminated"), None);
        for blank in ["", " ", "\n\t\r\x0b\x0c"] {
            assert_eq!(of(blank), None);
        }
        assert_eq!(of("-- only a comment"), None);
    }
}
