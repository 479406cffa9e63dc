//! Reading the log, for auditors: verification of the chain, the session list, and one
//! session's statements. Records come from a file log or from one instance's chain in the
//! control plane's table ([`Source`]); both stream record by record, so chains of millions of
//! records are read in constant memory (per session summaries aside).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::log::log_files;
use super::record::{Chain, Fault};
use super::table::AuditTable;

/// Where records are read from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// A file log, its rotated files (`LOG.000001`, …) first.
    File(&'a Path),
    /// One instance's chain in the control plane's `pglease.audit`.
    Table(&'a AuditTable, &'a str),
}

impl Source<'_> {
    /// Calls `f` for every record in chain order. `session` lets the table read only that
    /// session's rows; callers filter anyway (a file is read whole). A line that is not JSON is
    /// an error naming it.
    pub fn for_each(&self, session: Option<u64>, mut f: impl FnMut(Line<'_>) -> Result<(), String>) -> Result<(), String> {
        match *self {
            Source::File(path) => {
                let files = log_files(path);
                if files.is_empty() {
                    return Err(format!("no audit log at {}", path.display()));
                }
                for file in &files {
                    let mut reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?);
                    let mut line = Vec::new();
                    for i in 0.. {
                        // The live file's reserved zeros (see `segment`) start where records end.
                        if std::io::BufRead::fill_buf(&mut reader).map_err(|e| format!("cannot read {}: {e}", file.display()))?.first() == Some(&0) {
                            break;
                        }
                        line.clear();
                        std::io::BufRead::read_until(&mut reader, b'\n', &mut line).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                        // The end, or a tail that is not a whole record: one being written, a
                        // crash mid-write, or the live file's reserved zeros (see `segment`).
                        if line.pop() != Some(b'\n') {
                            break;
                        }
                        if line.is_empty() {
                            continue;
                        }
                        let value: Value = serde_json::from_slice(&line).map_err(|e| format!("{} line {}: not a record: {e}", file.display(), i + 1))?;
                        f(Line { place: Place::File { file, line: i + 1 }, value })?;
                    }
                }
                Ok(())
            }
            Source::Table(table, instance) => table.for_each(instance, session, |seq, value| f(Line { place: Place::Table { instance, seq }, value })),
        }
    }
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Table(_, instance) => write!(f, "instance {instance}'s chain in the control plane"),
        }
    }
}

/// One record, with where it came from.
pub struct Line<'a> {
    pub place: Place<'a>,
    pub value: Value,
}

/// Where a record was read.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    File { file: &'a Path, line: usize },
    Table { instance: &'a str, seq: i64 },
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::File { file, line } => write!(f, "{} line {line}", file.display()),
            Place::Table { instance, seq } => write!(f, "instance {instance}, row seq={seq}"),
        }
    }
}

/// Follows the chain of `source` in order: `check` sees each record with what [`Chain::follow`]
/// found (its `seq` and faults, or why it is not a record) and decides whether to go on.
fn follow_chain(source: Source<'_>, mut check: impl FnMut(&Line<'_>, Result<(u64, Vec<Fault>), &'static str>) -> Result<(), String>) -> Result<Chain, String> {
    let mut chain = Chain::default();
    source.for_each(None, |line| {
        let followed = chain.follow(&line.value);
        check(&line, followed)
    })?;
    Ok(chain)
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub head: String,
    pub anchors_checked: u64,
}

/// Checks a file log's chain: each record's hash, its link to the previous one, consecutive
/// `seq` from 1, and (with an anchor file) that every anchored head is still in the log. The
/// first record that does not check out is the error.
pub fn verify(path: &Path, anchor: Option<&Path>) -> Result<VerifyReport, String> {
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
    let chain = follow_chain(Source::File(path), |line, followed| {
        let (seq, faults) = followed.map_err(|e| format!("record at {} {e}", line.place))?;
        if let Some(fault) = faults.first() {
            return Err(format!("record seq={seq} ({}): {}", line.place, fault.problem(seq)));
        }
        if let Some(h) = heads.get_mut(&seq) {
            *h = line.value["hash"].as_str().unwrap_or_default().to_owned();
        }
        Ok(())
    })?;
    let records = chain.records();
    for (seq, hash) in &anchors {
        if *seq > records {
            return Err(format!("the log ends at seq={records}, but seq={seq} was anchored: its tail was cut off"));
        }
        if heads.get(seq).map(String::as_str) != Some(hash.as_str()) {
            return Err(format!("record seq={seq} differs from the anchored head: the log was rewritten"));
        }
    }
    Ok(VerifyReport { records, head: chain.head().to_owned(), anchors_checked: anchors.len() as u64 })
}

/// Gaps and breaks listed per chain; more are counted only.
const LISTED: usize = 100;

/// One instance's chain in the control plane, verified.
#[derive(Debug, Serialize)]
pub struct ChainReport {
    pub instance: String,
    /// No gap and no break.
    pub intact: bool,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The hash of the last record.
    pub head: String,
    /// Ranges of `seq` missing between (or before) records that are there. The records after
    /// the last one are no gap: the instance may not have copied them yet.
    pub gaps: Vec<Gap>,
    /// Records that do not check out: modified, or not linked to the record before them.
    pub breaks: Vec<Break>,
    /// Gaps and breaks beyond the first hundred of each, not listed.
    pub not_listed: u64,
}

/// Records `from..=to` are missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Break {
    pub seq: i64,
    pub problem: String,
}

/// Verifies the chain of each instance in the control plane (or only `only`'s), each exactly
/// as a file log is verified, and reports every gap and break rather than the first.
pub fn verify_instances(table: &AuditTable, only: Option<&str>) -> Result<Vec<ChainReport>, String> {
    let instances = match only {
        Some(name) => vec![table.instance(Some(name))?],
        None => table.instances()?,
    };
    let mut reports = Vec::new();
    for instance in instances {
        let (mut gaps, mut breaks, mut not_listed) = (Vec::new(), Vec::new(), 0u64);
        let mut listed = |list_len: usize| {
            let room = list_len < LISTED;
            if !room {
                not_listed += 1;
            }
            room
        };
        let chain = follow_chain(Source::Table(table, &instance), |line, followed| {
            let seq_of_row = match line.place {
                Place::Table { seq, .. } => seq,
                Place::File { .. } => unreachable!("a table's records"),
            };
            match followed {
                Err(e) => {
                    if listed(breaks.len()) {
                        breaks.push(Break { seq: seq_of_row, problem: format!("not a record: it {e}") });
                    }
                }
                Ok((seq, faults)) => {
                    for fault in faults {
                        match fault {
                            Fault::Missing { from, to } => {
                                if listed(gaps.len()) {
                                    gaps.push(Gap { from, to });
                                }
                            }
                            other => {
                                if listed(breaks.len()) {
                                    breaks.push(Break { seq: seq as i64, problem: other.problem(seq) });
                                }
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
        let range = chain.seq_range();
        reports.push(ChainReport {
            intact: gaps.is_empty() && breaks.is_empty(),
            records: chain.records(),
            first_seq: range.map(|r| r.0),
            last_seq: range.map(|r| r.1),
            head: chain.head().to_owned(),
            gaps,
            breaks,
            not_listed,
            instance,
        });
    }
    Ok(reports)
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

pub fn sessions(source: Source<'_>, filter: &SessionFilter) -> Result<Vec<SessionSummary>, String> {
    let mut all: BTreeMap<u64, SessionSummary> = BTreeMap::new();
    let mut decisions: BTreeMap<u64, std::collections::HashSet<String>> = BTreeMap::new();
    source.for_each(None, |line| {
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

pub fn show_session(source: Source<'_>, session: u64) -> Result<Vec<ShownStatement>, String> {
    let mut out: Vec<ShownStatement> = Vec::new();
    let mut index: BTreeMap<u64, usize> = BTreeMap::new();
    source.for_each(Some(session), |line| {
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
