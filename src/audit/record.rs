//! Audit records and the hash chain that links them.
//!
//! A record is one JSON object per line. Its `hash` is the SHA-256 of its canonical encoding
//! (the record as a JSON object with sorted keys, without `hash`, serialised compactly); its
//! `prev` is the previous record's `hash`; `seq` counts up by one from 1. Changing, inserting,
//! deleting or reordering a record breaks one of the three, and the first record that does not
//! check out is named. Floats are never used, so the encoding is exact.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A bound parameter as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Param {
    /// Type OID from the Parse (0 when the server inferred it).
    pub oid: u32,
    /// "text" or "binary".
    pub format: String,
    /// The value: text as text, binary as base64. `None` is SQL NULL; omitted when parameters
    /// are not logged.
    pub value: Option<String>,
}

/// What a statement record says about the statement, before it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StatementRecord {
    /// Per-session number of this statement (1, 2, …); results refer to it.
    pub stmt: u64,
    /// "simple" (Query), "extended" (Parse/Bind/Execute).
    pub protocol: String,
    /// The SQL as the client sent it.
    pub sql: String,
    /// The SQL that ran, when pglease rewrote it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sql_ran: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub params: Vec<Param>,
    /// "allow", "rewrite" or "deny".
    pub decision: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

/// How a statement ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ResultRecord {
    pub stmt: u64,
    /// Command tags, in order (a simple query may run several statements).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Rows returned or affected (from the tags).
    pub rows: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    pub duration_us: u64,
    /// True when Postgres skipped it after an earlier error in the same batch.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub skipped: bool,
    /// True when the scope's row cap cut the result (the client got a NOTICE saying so).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub capped: bool,
}

/// Who and where, on every session-related record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SessionInfo {
    pub session: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grant: Option<String>,
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scope: Option<String>,
    pub login: String,
    pub client: String,
    pub database: String,
}

/// The body of a record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    Statement {
        /// Shared by every record of the session: a clone per record was six allocations.
        #[serde(flatten)]
        session: std::sync::Arc<SessionInfo>,
        #[serde(flatten)]
        statement: StatementRecord,
    },
    Result {
        session: u64,
        #[serde(flatten)]
        result: ResultRecord,
    },
    /// A lifecycle event (grant or session change, failed login, cancel request).
    Event {
        #[serde(flatten)]
        event: Value,
    },
}

/// Canonical encoding of a record value without its `hash`.
pub fn canonical(value: &Value) -> Vec<u8> {
    let mut v = value.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("hash");
    }
    // serde_json's default Map is a BTreeMap: keys come out sorted at every level.
    serde_json::to_vec(&v).expect("JSON values serialise")
}

/// SHA-256 with ring's assembly implementation (SHA-NI where the CPU has it): the software
/// one was the largest single cost of the proxy under load.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::people::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// What is wrong with one record of a chain, as [`Chain::follow`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The records `from..=to` are missing before it: deleted, or not (yet) copied here.
    Missing { from: u64, to: u64 },
    /// It stands where `seq = expected` should: a record was inserted, repeated or moved back.
    Misplaced { expected: u64 },
    /// Its contents do not match its hash.
    Modified,
    /// Its `prev` is not the hash of the record before it.
    Unlinked,
}

impl Fault {
    /// What the fault means, for the record `seq` that shows it.
    pub fn problem(&self, seq: u64) -> String {
        match self {
            Fault::Missing { from: expected, .. } | Fault::Misplaced { expected } => format!("expected seq={expected}: a record was deleted, inserted or moved"),
            Fault::Modified => "its contents do not match its hash: it was modified".to_owned(),
            Fault::Unlinked => format!("it does not follow record seq={}: the chain is broken here", seq.saturating_sub(1)),
        }
    }
}

/// One hash chain, followed record by record in the order read (a file log, or one instance's
/// rows of the control plane's table): `seq` counts up by one from 1, each `hash` covers its
/// record, each `prev` is the hash before it.
#[derive(Debug, Clone)]
pub struct Chain {
    next_seq: u64,
    head: String,
    records: u64,
    first_seq: Option<u64>,
}

impl Default for Chain {
    fn default() -> Self {
        Self { next_seq: 1, head: GENESIS.to_owned(), records: 0, first_seq: None }
    }
}

impl Chain {
    /// Checks the next record; returns its `seq` and its faults (none when it continues the
    /// chain). An error means it is not a record at all (no `seq` or no `hash`).
    pub fn follow(&mut self, record: &Value) -> Result<(u64, Vec<Fault>), &'static str> {
        let seq = record["seq"].as_u64().ok_or("has no seq")?;
        let hash = record["hash"].as_str().ok_or("has no hash")?;
        let mut faults = Vec::new();
        if seq > self.next_seq {
            faults.push(Fault::Missing { from: self.next_seq, to: seq - 1 });
        } else if seq < self.next_seq {
            faults.push(Fault::Misplaced { expected: self.next_seq });
        }
        if sha256_hex(&canonical(record)) != hash {
            faults.push(Fault::Modified);
        }
        // NOTE: after a gap the record before this one is unknown: its link cannot be checked
        // (the gap is the fault). A modified record still passes its stored hash on, so one
        // change is reported once, not again at the next record.
        if seq == self.next_seq && record["prev"].as_str() != Some(self.head.as_str()) {
            faults.push(Fault::Unlinked);
        }
        self.next_seq = seq.saturating_add(1);
        self.head = hash.to_owned();
        self.records += 1;
        self.first_seq.get_or_insert(seq);
        Ok((seq, faults))
    }

    /// The hash of the last record followed ([`GENESIS`] before the first).
    pub fn head(&self) -> &str {
        &self.head
    }

    /// How many records were followed.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The `seq` of the first and of the last record followed.
    pub fn seq_range(&self) -> Option<(u64, u64)> {
        self.first_seq.map(|first| (first, self.next_seq - 1))
    }
}

/// Builds the line for a record: fills in `seq`, `prev`, `at`, `hash`. Returns (line, hash).
pub fn seal(body: &Body, seq: u64, prev: &str, at: &str) -> (Vec<u8>, String) {
    // The canonical encoding (sorted keys, no hash) is serialised once; the stored line is that
    // encoding with the hash added at the end: readers parse the line and drop `hash` again,
    // so where it stands in the line does not matter.
    let mut line = match body {
        Body::Statement { .. } | Body::Result { .. } => canonical_direct(body, seq, prev, at),
        Body::Event { .. } => canonical_via_value(body, seq, prev, at),
    };
    let hash = sha256_hex(&line);
    debug_assert_eq!(line.last(), Some(&b'}'));
    line.pop();
    line.extend_from_slice(b",\"hash\":\"");
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}\n");
    (line, hash)
}

/// The canonical encoding through a `serde_json::Value` tree (whose maps sort their keys).
fn canonical_via_value(body: &Body, seq: u64, prev: &str, at: &str) -> Vec<u8> {
    let mut v = serde_json::to_value(body).expect("records serialise");
    let m = v.as_object_mut().expect("records are objects");
    m.insert("seq".into(), Value::from(seq));
    m.insert("prev".into(), Value::from(prev));
    m.insert("at".into(), Value::from(at));
    serde_json::to_vec(&v).expect("records serialise")
}

/// The canonical encoding of the per-statement records, written straight from the structs with
/// the keys in sorted order: the same bytes as [`canonical_via_value`] (a test holds them equal)
/// at a third of the cost, on the path every statement takes.
fn canonical_direct(body: &Body, seq: u64, prev: &str, at: &str) -> Vec<u8> {
    let mut o = Obj::open(Vec::with_capacity(512));
    match body {
        Body::Statement { session: si, statement: st } => {
            o.str("at", at);
            o.str("client", &si.client);
            o.str("database", &si.database);
            o.str("decision", &st.decision);
            o.opt_str("grant", si.grant.as_deref());
            o.str("kind", "statement");
            o.str("login", &si.login);
            if !st.params.is_empty() {
                o.key("params");
                o.buf.push(b'[');
                for (i, p) in st.params.iter().enumerate() {
                    if i > 0 {
                        o.buf.push(b',');
                    }
                    let mut po = Obj::open(std::mem::take(&mut o.buf));
                    po.str("format", &p.format);
                    po.num("oid", p.oid.into());
                    po.key("value");
                    match &p.value {
                        Some(v) => po.string(v),
                        None => po.buf.extend_from_slice(b"null"),
                    }
                    o.buf = po.finish();
                }
                o.buf.push(b']');
            }
            o.str("prev", prev);
            o.str("protocol", &st.protocol);
            o.opt_str("reason", st.reason.as_deref());
            o.opt_str("scope", si.scope.as_deref());
            o.num("seq", seq);
            o.num("session", si.session);
            o.str("sql", &st.sql);
            o.opt_str("sql_ran", st.sql_ran.as_deref());
            o.num("stmt", st.stmt);
            o.str("user", &si.user);
        }
        Body::Result { session, result: r } => {
            o.str("at", at);
            if r.capped {
                o.key("capped");
                o.buf.extend_from_slice(b"true");
            }
            o.num("duration_us", r.duration_us);
            o.opt_str("error", r.error.as_deref());
            o.opt_str("error_code", r.error_code.as_deref());
            o.str("kind", "result");
            o.str("prev", prev);
            o.num("rows", r.rows);
            o.num("seq", seq);
            o.num("session", *session);
            if r.skipped {
                o.key("skipped");
                o.buf.extend_from_slice(b"true");
            }
            o.num("stmt", r.stmt);
            o.key("tags");
            o.buf.push(b'[');
            for (i, t) in r.tags.iter().enumerate() {
                if i > 0 {
                    o.buf.push(b',');
                }
                o.string(t);
            }
            o.buf.push(b']');
        }
        Body::Event { .. } => unreachable!("events go through canonical_via_value"),
    }
    o.finish()
}

/// A JSON object being written; the caller adds keys in sorted order.
struct Obj {
    buf: Vec<u8>,
    first: bool,
}

impl Obj {
    /// Starts an object at the end of `buf`.
    fn open(mut buf: Vec<u8>) -> Self {
        buf.push(b'{');
        Self { buf, first: true }
    }

    fn key(&mut self, key: &str) {
        if !std::mem::take(&mut self.first) {
            self.buf.push(b',');
        }
        self.string(key);
        self.buf.push(b':');
    }

    /// A string with serde_json's escaping (the canonical form depends on it).
    fn string(&mut self, s: &str) {
        serde_json::to_writer(&mut self.buf, s).expect("writing to a Vec cannot fail");
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        self.string(value);
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.str(key, v);
        }
    }

    fn num(&mut self, key: &str, n: u64) {
        self.key(key);
        use std::io::Write;
        let _ = write!(self.buf, "{n}");
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf.push(b'}');
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_records_verify_and_any_change_breaks_the_hash() {
        let body = Body::Event { event: serde_json::json!({"event": "grant_approved", "grant": "g1", "by": "bob"}) };
        let (line, hash) = seal(&body, 1, GENESIS, "2026-01-01T00:00:00.000Z");
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(sha256_hex(&canonical(&v)), hash);
        let tampered = String::from_utf8(line).unwrap().replace("bob", "eve");
        let v: Value = serde_json::from_str(&tampered).unwrap();
        assert_ne!(sha256_hex(&canonical(&v)), hash);
    }

    /// A chain of `n` sealed event records, as parsed values.
    fn chain_of(n: u64) -> Vec<Value> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let (line, hash) = seal(&Body::Event { event: serde_json::json!({"event": "e", "n": seq}) }, seq, &prev, "t");
                prev = hash;
                serde_json::from_slice(&line).unwrap()
            })
            .collect()
    }

    fn faults_of(records: &[Value]) -> Vec<(u64, Fault)> {
        let mut chain = Chain::default();
        records.iter().flat_map(|r| {
            let (seq, faults) = chain.follow(r).unwrap();
            faults.into_iter().map(move |f| (seq, f))
        }).collect()
    }

    #[test]
    fn a_chain_follows_and_reports_each_fault_once() {
        let all = chain_of(6);
        let mut chain = Chain::default();
        for r in &all {
            assert_eq!(chain.follow(r).unwrap().1, vec![]);
        }
        assert_eq!((chain.records(), chain.seq_range(), chain.head()), (6, Some((1, 6)), all[5]["hash"].as_str().unwrap()));
        // A tail cut off (or not yet copied) is no fault: nothing says where the chain ends.
        assert_eq!(faults_of(&all[..4]), vec![]);
        // Deleted records: one gap, named by its range; the record after it is not blamed.
        let gap: Vec<Value> = [&all[..2], &all[4..]].concat();
        assert_eq!(faults_of(&gap), vec![(5, Fault::Missing { from: 3, to: 4 })]);
        // The first records missing are a gap too.
        assert_eq!(faults_of(&all[2..]), vec![(3, Fault::Missing { from: 1, to: 2 })]);
        // A modified record: once, at that record.
        let mut modified = all.clone();
        modified[2]["n"] = Value::from(99);
        assert_eq!(faults_of(&modified), vec![(3, Fault::Modified)]);
        // A record re-sealed after a change: its own hash fits, the next record's link does not.
        let mut resealed = all.clone();
        let (line, _) = seal(&Body::Event { event: serde_json::json!({"event": "forged"}) }, 3, resealed[1]["hash"].as_str().unwrap(), "t");
        resealed[2] = serde_json::from_slice(&line).unwrap();
        assert_eq!(faults_of(&resealed), vec![(4, Fault::Unlinked)]);
        // Moved back: the record is out of place.
        let mut swapped = all.clone();
        swapped.swap(1, 2);
        assert_eq!(faults_of(&swapped)[0], (3, Fault::Missing { from: 2, to: 2 }));
        assert!(faults_of(&swapped).contains(&(2, Fault::Misplaced { expected: 4 })));
        assert_eq!(Chain::default().follow(&serde_json::json!({"hash": "x"})).unwrap_err(), "has no seq");
    }

    /// Strings that exercise JSON escaping: quotes, backslashes, control characters, non-ASCII.
    const NASTY: [&str; 6] = ["", "plain", "quote \" and \\ backslash", "tab\tnewline\n\u{1}\u{1f}\u{7f}", "ünïcödé ✓ 😀", "</script>\u{2028}"];

    #[test]
    fn direct_encoding_equals_the_value_tree_encoding() {
        let mut bodies = Vec::new();
        for (i, s) in NASTY.iter().enumerate() {
            let some = |x: &str| if i % 2 == 0 { Some(format!("{x}{s}")) } else { None };
            bodies.push(Body::Statement {
                session: SessionInfo { session: i as u64, grant: some("g"), user: s.to_string(), scope: some("sc"), login: format!("l{s}"), client: "127.0.0.1:5".into(), database: s.to_string() }.into(),
                statement: StatementRecord {
                    stmt: u64::MAX - i as u64,
                    protocol: "extended".into(),
                    sql: format!("select '{s}'"),
                    sql_ran: some("ran"),
                    params: (0..i).map(|k| Param { oid: k as u32 * 1000, format: "text".into(), value: if k % 2 == 0 { Some(s.to_string()) } else { None } }).collect(),
                    decision: "allow".into(),
                    reason: some("because"),
                },
            });
            bodies.push(Body::Result {
                session: i as u64,
                result: ResultRecord {
                    stmt: i as u64,
                    tags: (0..i).map(|k| format!("SELECT {k}{s}")).collect(),
                    rows: 42,
                    error_code: some("42501"),
                    error: some("denied"),
                    duration_us: 7,
                    skipped: i % 3 == 0,
                    capped: i % 2 == 0,
                },
            });
        }
        for body in &bodies {
            for (seq, prev, at) in [(1, GENESIS, "2026-01-01T00:00:00.000Z"), (u64::MAX, "ab\"c", "")] {
                let direct = canonical_direct(body, seq, prev, at);
                let via_value = canonical_via_value(body, seq, prev, at);
                assert_eq!(String::from_utf8_lossy(&direct), String::from_utf8_lossy(&via_value));
            }
            // And the sealed line verifies the way `audit verify` checks it.
            let (line, hash) = seal(body, 3, GENESIS, "t");
            let v: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(sha256_hex(&canonical(&v)), hash);
        }
    }
}
