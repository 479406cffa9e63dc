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
        #[serde(flatten)]
        session: SessionInfo,
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

/// Builds the line for a record: fills in `seq`, `prev`, `at`, `hash`. Returns (line, hash).
pub fn seal(body: &Body, seq: u64, prev: &str, at: &str) -> (Vec<u8>, String) {
    let mut v = serde_json::to_value(body).expect("records serialise");
    let m = v.as_object_mut().expect("records are objects");
    m.insert("seq".into(), Value::from(seq));
    m.insert("prev".into(), Value::from(prev));
    m.insert("at".into(), Value::from(at));
    // The canonical encoding (sorted keys, no hash) is serialised once; the stored line is that
    // encoding with the hash added at the end: readers parse the line and drop `hash` again,
    // so where it stands in the line does not matter.
    let mut line = serde_json::to_vec(&v).expect("records serialise");
    let hash = sha256_hex(&line);
    debug_assert_eq!(line.last(), Some(&b'}'));
    line.pop();
    line.extend_from_slice(b",\"hash\":\"");
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}\n");
    (line, hash)
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
}
