//! Reading the log, for auditors: verification of the chain, the session list, and one
//! session's statements. Everything streams line by line, so logs of millions of records are
//! read in constant memory (per session summaries aside).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::log::log_files;
use super::record::{GENESIS, canonical, sha256_hex};

/// One line of the log, with where it came from.
pub struct Line {
    pub file: PathBuf,
    pub number: usize,
    pub value: Value,
    pub raw_len: usize,
}

/// Calls `f` for every record in chain order. A line that is not JSON is an error naming it.
pub fn for_each(path: &Path, mut f: impl FnMut(Line) -> Result<(), String>) -> Result<(), String> {
    let files = log_files(path);
    if files.is_empty() {
        return Err(format!("no audit log at {}", path.display()));
    }
    for file in files {
        let reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?);
        for (i, line) in reader.split(b'\n').enumerate() {
            let line = line.map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            if line.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_slice(&line).map_err(|e| format!("{} line {}: not a record: {e}", file.display(), i + 1))?;
            f(Line { file: file.clone(), number: i + 1, value, raw_len: line.len() })?;
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub head: String,
    pub anchors_checked: u64,
}

/// Checks the chain: each record's hash, its link to the previous one, consecutive `seq`, and
/// (with an anchor file) that every anchored head is still in the log.
pub fn verify(path: &Path, anchor: Option<&Path>) -> Result<VerifyReport, String> {
    let mut expected_seq = 1u64;
    let mut prev = GENESIS.to_owned();
    let mut heads: BTreeMap<u64, String> = BTreeMap::new();
    let anchors: Vec<(u64, String)> = match anchor {
        Some(a) => std::fs::read_to_string(a)
            .map_err(|e| format!("cannot read anchor file {}: {e}", a.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).map_err(|e| format!("anchor file: {e}"))?;
                Ok((v["seq"].as_u64().unwrap_or(0), v["hash"].as_str().unwrap_or("").to_owned()))
            })
            .collect::<Result<_, String>>()?,
        None => Vec::new(),
    };
    for (seq, _) in &anchors {
        heads.insert(*seq, String::new());
    }
    for_each(path, |line| {
        let where_ = format!("{} line {}", line.file.display(), line.number);
        let seq = line.value["seq"].as_u64().ok_or(format!("record at {where_} has no seq"))?;
        let name = format!("record seq={seq} ({where_})");
        if seq != expected_seq {
            return Err(format!("{name}: expected seq={expected_seq}: a record was deleted, inserted or moved"));
        }
        let hash = line.value["hash"].as_str().ok_or(format!("{name} has no hash"))?.to_owned();
        if sha256_hex(&canonical(&line.value)) != hash {
            return Err(format!("{name}: its contents do not match its hash: it was modified"));
        }
        if line.value["prev"].as_str() != Some(prev.as_str()) {
            return Err(format!("{name}: it does not follow record seq={}: the chain is broken here", seq - 1));
        }
        if let Some(h) = heads.get_mut(&seq) {
            *h = hash.clone();
        }
        prev = hash;
        expected_seq += 1;
        Ok(())
    })?;
    let records = expected_seq - 1;
    for (seq, hash) in &anchors {
        if *seq > records {
            return Err(format!("the log ends at seq={records}, but seq={seq} was anchored: its tail was cut off"));
        }
        if heads.get(seq).map(String::as_str) != Some(hash.as_str()) {
            return Err(format!("record seq={seq} differs from the anchored head: the log was rewritten"));
        }
    }
    Ok(VerifyReport { records, head: prev, anchors_checked: anchors.len() as u64 })
}

/// One session, as `audit sessions` shows it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SessionSummary {
    pub session: u64,
    pub grant: Option<String>,
    pub user: String,
    pub scope: Option<String>,
    pub login: String,
    pub client: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub statements: u64,
    pub denied: u64,
    pub errors: u64,
}

/// Filters for `audit sessions`.
#[derive(Debug, Default, Clone)]
pub struct SessionFilter {
    pub user: Option<String>,
    pub grant: Option<String>,
    pub scope: Option<String>,
    /// RFC 3339 bounds on the session's start.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Only sessions with at least one statement with this decision (allow/rewrite/deny).
    pub decision: Option<String>,
}

fn opt_str(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

pub fn sessions(path: &Path, filter: &SessionFilter) -> Result<Vec<SessionSummary>, String> {
    let mut all: BTreeMap<u64, SessionSummary> = BTreeMap::new();
    let mut decisions: BTreeMap<u64, std::collections::HashSet<String>> = BTreeMap::new();
    for_each(path, |line| {
        let v = &line.value;
        let at = opt_str(v, "at");
        match v["kind"].as_str() {
            Some("statement") => {
                let id = v["session"].as_u64().unwrap_or(0);
                let s = all.entry(id).or_default();
                s.session = id;
                s.grant = opt_str(v, "grant");
                s.user = opt_str(v, "user").unwrap_or_default();
                s.scope = opt_str(v, "scope");
                s.login = opt_str(v, "login").unwrap_or_default();
                s.client = opt_str(v, "client").unwrap_or_default();
                if s.started_at.is_none() {
                    s.started_at = at.clone();
                }
                s.statements += 1;
                let decision = opt_str(v, "decision").unwrap_or_default();
                if decision == "deny" {
                    s.denied += 1;
                }
                decisions.entry(id).or_default().insert(decision);
            }
            Some("result") => {
                let id = v["session"].as_u64().unwrap_or(0);
                if v.get("error_code").is_some_and(|c| !c.is_null()) {
                    all.entry(id).or_default().errors += 1;
                }
            }
            Some("event") => {
                let id = v["session"].as_u64();
                match (v["event"].as_str(), id) {
                    (Some("session_opened"), Some(id)) => {
                        let s = all.entry(id).or_default();
                        s.session = id;
                        s.started_at = opt_str(v, "event_at").or(at);
                        s.grant = opt_str(v, "grant");
                        s.user = opt_str(v, "user").unwrap_or_default();
                        s.scope = opt_str(v, "scope");
                        s.login = opt_str(v, "login").unwrap_or_default();
                        s.client = opt_str(v, "client").unwrap_or_default();
                    }
                    (Some("session_closed"), Some(id)) => {
                        all.entry(id).or_default().ended_at = opt_str(v, "event_at").or(at);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(all
        .into_values()
        .filter(|s| s.session != 0)
        .filter(|s| filter.user.as_ref().is_none_or(|u| &s.user == u))
        .filter(|s| filter.grant.as_ref().is_none_or(|g| s.grant.as_ref() == Some(g)))
        .filter(|s| filter.scope.as_ref().is_none_or(|g| s.scope.as_ref() == Some(g)))
        .filter(|s| filter.since.as_ref().is_none_or(|t| s.started_at.as_ref().is_some_and(|a| a >= t)))
        .filter(|s| filter.until.as_ref().is_none_or(|t| s.started_at.as_ref().is_some_and(|a| a <= t)))
        .filter(|s| filter.decision.as_ref().is_none_or(|d| decisions.get(&s.session).is_some_and(|set| set.contains(d))))
        .collect())
}

/// One statement of a session with its result.
#[derive(Debug, Clone, Serialize)]
pub struct ShownStatement {
    pub stmt: u64,
    pub at: String,
    pub protocol: String,
    pub sql: String,
    pub sql_ran: Option<String>,
    pub params: Value,
    pub decision: String,
    pub reason: Option<String>,
    pub tags: Vec<String>,
    pub rows: Option<u64>,
    pub duration_us: Option<u64>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub skipped: bool,
}

pub fn show_session(path: &Path, session: u64) -> Result<Vec<ShownStatement>, String> {
    let mut out: Vec<ShownStatement> = Vec::new();
    let mut index: BTreeMap<u64, usize> = BTreeMap::new();
    for_each(path, |line| {
        let v = &line.value;
        if v["session"].as_u64() != Some(session) {
            return Ok(());
        }
        match v["kind"].as_str() {
            Some("statement") => {
                let stmt = v["stmt"].as_u64().unwrap_or(0);
                index.insert(stmt, out.len());
                out.push(ShownStatement {
                    stmt,
                    at: opt_str(v, "at").unwrap_or_default(),
                    protocol: opt_str(v, "protocol").unwrap_or_default(),
                    sql: opt_str(v, "sql").unwrap_or_default(),
                    sql_ran: opt_str(v, "sql_ran"),
                    params: v.get("params").cloned().unwrap_or(Value::Array(vec![])),
                    decision: opt_str(v, "decision").unwrap_or_default(),
                    reason: opt_str(v, "reason"),
                    tags: vec![],
                    rows: None,
                    duration_us: None,
                    error_code: None,
                    error: None,
                    skipped: false,
                });
            }
            Some("result") => {
                if let Some(&i) = v["stmt"].as_u64().and_then(|s| index.get(&s)) {
                    let s = &mut out[i];
                    s.tags = v["tags"].as_array().map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect()).unwrap_or_default();
                    s.rows = v["rows"].as_u64();
                    s.duration_us = v["duration_us"].as_u64();
                    s.error_code = opt_str(v, "error_code");
                    s.error = opt_str(v, "error");
                    s.skipped = v["skipped"].as_bool().unwrap_or(false);
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}
