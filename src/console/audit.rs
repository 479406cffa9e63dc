//! Auditors' pages over this instance's audit log: the sessions (the filters of
//! `pglease audit sessions`, paged on the server), one session as a timeline (each statement
//! with its decision and why, the SQL as sent and as run, parameters as the audit policy kept
//! them, rows, time, error), the chain's verification, and the overview's charts.
//!
//! The log is read by [`crate::audit::reader`] (the same code as the CLI), off the async
//! threads, two reads at a time. Without a control plane the pages read this instance's file;
//! with one, any instance's chain in `pglease.audit` (`?instance=`, this one by default), so a
//! link works whichever instance of the fleet opens it.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Seek};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::auth::Viewer;
use super::charts;
use super::page::{self, ago, page};
use crate::admin::api::ApiState;
use crate::audit::reader::{self, SessionFilter, SessionSummary, ShownStatement, Source};

/// Sessions per page of the list.
const PER_PAGE: usize = 50;
/// The overview's charts read at most this much of the end of the current log file.
const CHART_TAIL_BYTES: u64 = 16 << 20;

fn forbidden(viewer: &Viewer) -> Response {
    page::error_page(Some(viewer), StatusCode::FORBIDDEN, &format!("{} may not read the audit log (auditors and approvers may)", viewer.who.person))
}

/// The chain a page reads.
#[derive(Clone)]
enum Chain {
    File(std::path::PathBuf),
    Table { conninfo: String, instance: String },
}

impl Chain {
    /// This instance's file, or with a control plane the chain of `instance` (default: this one).
    fn of(state: &ApiState, instance: Option<&str>) -> Chain {
        match (&state.control_plane, state.fleet.get()) {
            (Some(conninfo), Some(fleet)) => Chain::Table { conninfo: conninfo.clone(), instance: instance.filter(|i| !i.is_empty()).unwrap_or(&fleet.instance).to_owned() },
            _ => Chain::File(state.audit_log.clone()),
        }
    }

    fn instance(&self) -> Option<&str> {
        match self {
            Chain::File(_) => None,
            Chain::Table { instance, .. } => Some(instance),
        }
    }

    /// Runs `f` over the chain (blocking: call it from [`blocking`]); with a control plane, also
    /// gives the instances that have chains there.
    fn read<T>(&self, f: impl FnOnce(Source<'_>) -> Result<T, String>) -> Result<(T, Vec<String>), String> {
        match self {
            Chain::File(path) => Ok((f(Source::File(path))?, Vec::new())),
            Chain::Table { conninfo, instance } => {
                let table = crate::audit::table::AuditTable::connect(conninfo)?;
                let instances = table.instances()?;
                Ok((f(Source::Table(&table, instance))?, instances))
            }
        }
    }
}

/// Reads the log off the async threads, a few at a time.
async fn blocking<T: Send + 'static>(state: &ApiState, f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    let _permit = state.console.audit_reads.acquire().await.map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())?
}

fn chain_status(report: Option<&Result<reader::VerifyReport, String>>, f: &Filter) -> Markup {
    let Some(report) = report else {
        return html! { p.chain #chain { a #verify href={ "/audit?verify=1&" (f.query(f.page.unwrap_or(1))) } { "Verify the audit chain" } " (reads the whole log)" } };
    };
    html! {
        @match report {
            Ok(r) => p.chain.ok #chain role="status" { span.badge.status-active { "chain intact" } " " (r.records) " records, head " code { (r.head.get(..16).unwrap_or(&r.head)) "…" }
                @if r.anchors_checked > 0 { ", " (r.anchors_checked) " anchored heads found" } },
            Err(e) => p.chain.broken.alert #chain role="alert" { span.badge.alert { "chain broken" } " " (e) },
        }
    }
}

#[derive(Deserialize, Default, Clone)]
pub struct Filter {
    pub user: Option<String>,
    pub grant: Option<String>,
    pub scope: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub decision: Option<String>,
    pub page: Option<usize>,
    /// Verify the chain too (it reads the whole log: not on every page).
    #[serde(default)]
    pub verify: Option<u8>,
    /// With a control plane: whose chain (default: this instance's).
    pub instance: Option<String>,
}

impl Filter {
    fn reader(&self) -> SessionFilter {
        let f = |o: &Option<String>| o.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
        SessionFilter { user: f(&self.user), grant: f(&self.grant), scope: f(&self.scope), since: f(&self.since), until: f(&self.until), decision: f(&self.decision) }
    }

    fn query(&self, page: usize) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [("user", &self.user), ("grant", &self.grant), ("scope", &self.scope), ("since", &self.since), ("until", &self.until), ("decision", &self.decision), ("instance", &self.instance)] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                q.append_pair(k, v);
            }
        }
        q.append_pair("page", &page.to_string());
        q.finish()
    }
}

/// The sessions in the log, newest first, filtered and paged.
pub async fn sessions(State(state): State<Arc<ApiState>>, viewer: Viewer, Query(f): Query<Filter>) -> Response {
    if !viewer.who.can_read_all() {
        return forbidden(&viewer);
    }
    let chain = Chain::of(&state, f.instance.as_deref());
    let (log, anchor, filter, verify) = (state.audit_log.clone(), state.audit_anchor.clone(), f.reader(), f.verify == Some(1));
    let reading = chain.clone();
    let read = blocking(&state, move || {
        let (mut all, instances) = reading.read(|source| reader::sessions(source, &filter))?;
        all.reverse();
        // The verification is of this instance's own file (`audit verify --control-plane`
        // checks every instance's chain in the table).
        Ok((all, instances, verify.then(|| reader::verify(&log, anchor.as_deref()))))
    })
    .await;
    let (all, instances, verification) = match read {
        Ok(r) => r,
        Err(e) => return page::error_page(Some(&viewer), StatusCode::SERVICE_UNAVAILABLE, &format!("The audit log cannot be read: {e}")),
    };
    let chain_name = chain.instance().map(str::to_owned);
    let pages = all.len().div_ceil(PER_PAGE).max(1);
    let current = f.page.unwrap_or(1).clamp(1, pages);
    let shown: Vec<&SessionSummary> = all.iter().skip((current - 1) * PER_PAGE).take(PER_PAGE).collect();
    let text = |o: &Option<String>| o.clone().unwrap_or_default();
    let body = html! {
        @if let Some(name) = &chain_name { p.lead { "The audit chain of instance " strong #audit-instance { (name) } ", from the control plane." } }
        (chain_status(verification.as_ref(), &f))
        form.filters method="get" action="/audit" {
            @if !instances.is_empty() {
                label { "Instance "
                    select name="instance" {
                        @for i in &instances { option value=(i) selected[chain_name.as_deref() == Some(i.as_str())] { (i) } }
                    }
                }
            }
            label { "Person " input type="text" name="user" value=(text(&f.user)); }
            label { "Grant " input type="text" name="grant" value=(text(&f.grant)); }
            label { "Scope " input type="text" name="scope" value=(text(&f.scope)); }
            label { "Since " input type="text" name="since" placeholder="2026-12-01T00:00:00Z" value=(text(&f.since)); }
            label { "Until " input type="text" name="until" value=(text(&f.until)); }
            label { "With a statement "
                select name="decision" {
                    option value="" { "any" }
                    @for d in ["allow", "rewrite", "deny"] { option value=(d) selected[f.decision.as_deref() == Some(d)] { (d) } }
                }
            }
            button type="submit" { "Search" }
        }
        p.muted { (all.len()) " sessions" @if pages > 1 { ", page " (current) " of " (pages) } }
        div.table-wrap {
            table #audit-sessions {
                caption.visually-hidden { "Audited sessions" }
                thead { tr { th scope="col" { "Session" } th scope="col" { "Person" } th scope="col" { "Scope" } th scope="col" { "Grant" } th scope="col" { "Client" } th scope="col" { "Started" } th scope="col" { "Ended" } th scope="col" { "Statements" } th scope="col" { "Refused" } th scope="col" { "Errors" } } }
                tbody {
                    @for s in &shown {
                        tr id={ "audit-session-" (s.session) } {
                            td { a href={ "/audit/sessions/" (s.session) @if let Some(i) = &chain_name { "?instance=" (url::form_urlencoded::byte_serialize(i.as_bytes()).collect::<String>()) } } { (s.session) } }
                            td { (s.user) }
                            td { (s.scope.as_deref().unwrap_or("—")) }
                            td { @if let Some(g) = &s.grant { code { (g) } } }
                            td { (s.client) }
                            td { @if let Some(t) = &s.started_at { (ago(t)) } }
                            td { @if let Some(t) = &s.ended_at { (ago(t)) } @else { span.badge.status-active { "live" } } }
                            td { (s.statements) }
                            td { @if s.denied > 0 { span.badge.alert { (s.denied) } } @else { "0" } }
                            td { (s.errors) }
                        }
                    }
                    @if shown.is_empty() { tr.empty { td colspan="10" { "No sessions match." } } }
                }
            }
        }
        @if pages > 1 {
            nav.pager aria-label="Pages" {
                @if current > 1 { a rel="prev" href={ "/audit?" (f.query(current - 1)) } { "← Newer" } }
                @if current < pages { a rel="next" href={ "/audit?" (f.query(current + 1)) } { "Older →" } }
            }
        }
    };
    page(&viewer, "/audit", "Audit", body).into_response()
}

/// One session's statements, in order, as a timeline.
#[derive(Deserialize, Default)]
pub struct TimelinePage {
    pub page: Option<usize>,
    /// With a control plane: the instance the session ran on (default: this one).
    pub instance: Option<String>,
}

/// Statements per page of a timeline.
const STATEMENTS_PER_PAGE: usize = 500;

pub async fn timeline(State(state): State<Arc<ApiState>>, viewer: Viewer, UrlPath(id): UrlPath<u64>, Query(tp): Query<TimelinePage>) -> Response {
    if !viewer.who.can_read_all() {
        return forbidden(&viewer);
    }
    let chain = Chain::of(&state, tp.instance.as_deref());
    let reading = chain.clone();
    let read = blocking(&state, move || {
        let filter = SessionFilter::default();
        let (summary, _) = reading.read(|source| Ok(reader::sessions(source, &filter)?.into_iter().find(|s| s.session == id)))?;
        let (statements, _) = reading.read(|source| reader::show_session(source, id))?;
        Ok((summary, statements))
    })
    .await;
    let (summary, statements) = match read {
        Ok(r) => r,
        Err(e) => return page::error_page(Some(&viewer), StatusCode::SERVICE_UNAVAILABLE, &format!("The audit log cannot be read: {e}")),
    };
    let Some(s) = summary else {
        let whose = chain.instance().map(|i| format!("instance {i}'s")).unwrap_or_else(|| "this instance's".into());
        return page::error_page(Some(&viewer), StatusCode::NOT_FOUND, &format!("No session {id} in {whose} audit log."));
    };
    let pages = statements.len().div_ceil(STATEMENTS_PER_PAGE).max(1);
    let current = tp.page.unwrap_or(1).clamp(1, pages);
    let first = (current - 1) * STATEMENTS_PER_PAGE;
    let shown = statements.iter().skip(first).take(STATEMENTS_PER_PAGE);
    let body = html! {
        p.lead {
            strong { (s.user) } " as " code { (s.login) } " under scope " (s.scope.as_deref().unwrap_or("—"))
            @if let Some(g) = &s.grant { ", grant " code { (g) } }
            ", from " (s.client)
            @if let Some(t) = &s.started_at { ", started " (ago(t)) }
            @if let Some(t) = &s.ended_at { ", ended " (ago(t)) }
            "."
        }
        p.muted { (s.statements) " statements, " (s.denied) " refused, " (s.errors) " errors. Replay them against another database with "
            code { "pglease audit replay LOG --session " (s.session) " --target DSN" } "." }
        @if pages > 1 { p.muted { "Statements " (first + 1) "–" (first + shown.len()) " of " (statements.len()) "." } }
        ol.timeline #timeline start=(first + 1) {
            @for st in shown { (statement(st)) }
        }
        @if pages > 1 {
            nav.pager aria-label="Pages" {
                @if current > 1 { a rel="prev" href={ "/audit/sessions/" (id) "?page=" (current - 1) (instance_query(&chain)) } { "← Earlier" } }
                @if current < pages { a rel="next" href={ "/audit/sessions/" (id) "?page=" (current + 1) (instance_query(&chain)) } { "Later →" } }
            }
        }
    };
    let title = match chain.instance() {
        Some(i) => format!("Session {id} on {i}"),
        None => format!("Session {id}"),
    };
    page(&viewer, "/audit", &title, body).into_response()
}

fn instance_query(chain: &Chain) -> String {
    chain.instance().map(|i| format!("&instance={}", url::form_urlencoded::byte_serialize(i.as_bytes()).collect::<String>())).unwrap_or_default()
}

fn statement(st: &ShownStatement) -> Markup {
    let class = match st.decision.as_str() {
        "deny" => "deny",
        "rewrite" => "rewrite",
        _ => "allow",
    };
    let params = match &st.params {
        serde_json::Value::Array(a) if a.is_empty() => None,
        serde_json::Value::Null => None,
        other => Some(serde_json::to_string(other).unwrap_or_default()),
    };
    html! {
        li class={ "statement " (class) } id={ "stmt-" (st.stmt) } {
            div.statement-head {
                span class={ "badge decision-" (class) } { (match class { "deny" => "refused", "rewrite" => "rewritten", _ => "allowed" }) }
                " " time datetime=(st.at) title=(st.at) { (st.at.get(11..23).unwrap_or(&st.at)) }
                " · " (st.protocol)
                @if let Some(rows) = st.rows { " · " (rows) " rows" }
                @if let Some(us) = st.duration_us { " · " (format_duration(us)) }
                @if st.skipped { " · " span.muted { "not run (an earlier error in the pipeline)" } }
            }
            @if let Some(reason) = &st.reason { p.why { (reason) } }
            pre.sql { code { (st.sql) } }
            @if let Some(ran) = st.sql_ran.as_ref().filter(|r| **r != st.sql) {
                p.muted { "As run:" }
                pre.sql.ran { code { (ran) } }
            }
            @if let Some(p) = params { p.params { "Parameters: " code { (p) } } }
            // A refusal's error repeats its reason: shown once.
            @if let Some(e) = st.error.as_ref().filter(|e| Some(*e) != st.reason.as_ref()) { p.error { code { (st.error_code.as_deref().unwrap_or("")) } " " (e) } }
        }
    }
}

fn format_duration(us: u64) -> String {
    match us {
        0..1000 => format!("{us} µs"),
        1000..1_000_000 => format!("{:.1} ms", us as f64 / 1000.0),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// What the overview's charts show of the log: statements per minute over the last hour,
/// refusals per scope, sessions opened per hour over the last day.
#[derive(Clone, Default)]
pub struct ChartData {
    pub per_minute: Vec<(String, u64)>,
    pub refusals: Vec<(String, u64)>,
    pub sessions_per_hour: Vec<(String, u64)>,
}

/// The charts' data is read again at most this often.
const CHARTS_EVERY: Duration = Duration::from_secs(10);

/// Counts per time bucket for the last `n` buckets of `width`, oldest first, empty ones as 0;
/// a bucket is named by `name(rfc3339 of its time)`.
fn buckets(counts: &BTreeMap<String, u64>, now: SystemTime, width: Duration, n: u32, name: impl Fn(&str) -> Option<&str>) -> Vec<(String, u64)> {
    (0..n)
        .rev()
        .map(|i| {
            let t = crate::time::rfc3339(now - width * i);
            let key = name(&t).unwrap_or_default().to_owned();
            let count = counts.get(&key).copied().unwrap_or(0);
            (key, count)
        })
        .collect()
}

/// [`ChartData`] from the end of the current log file (at most [`CHART_TAIL_BYTES`] of it).
fn chart_data(log: &Path) -> Result<ChartData, String> {
    let mut file = match std::fs::File::open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ChartData::default()),
        Err(e) => return Err(e.to_string()),
    };
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let start = len.saturating_sub(CHART_TAIL_BYTES);
    file.seek(std::io::SeekFrom::Start(start)).map_err(|e| e.to_string())?;
    let mut lines = std::io::BufReader::new(file.take(len - start)).lines();
    if start > 0 {
        lines.next(); // a partial line
    }
    let now = SystemTime::now();
    let hour_ago = crate::time::rfc3339(now - Duration::from_secs(3600));
    let day_ago = crate::time::rfc3339(now - Duration::from_secs(86400));
    // Minutes as "HH:MM", hours as "DDTHH" (shown as "HH:00").
    let minute = |at: &str| at.get(11..16).map(str::to_owned);
    let hour = |at: &str| at.get(8..13).map(str::to_owned);
    let (mut per_minute, mut refusals, mut opened) = (BTreeMap::new(), BTreeMap::<String, u64>::new(), BTreeMap::new());
    for line in lines {
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let at = v["at"].as_str().unwrap_or_default();
        match v["kind"].as_str() {
            Some("statement") => {
                if let Some(m) = minute(at).filter(|_| at >= hour_ago.as_str()) {
                    *per_minute.entry(m).or_insert(0u64) += 1;
                }
                if v["decision"] == "deny" {
                    *refusals.entry(v["scope"].as_str().unwrap_or("(none)").to_owned()).or_default() += 1;
                }
            }
            Some("event") if v["event"] == "session_opened" => {
                if let Some(h) = hour(at).filter(|_| at >= day_ago.as_str()) {
                    *opened.entry(h).or_insert(0u64) += 1;
                }
            }
            _ => {}
        }
    }
    let mut refusals: Vec<(String, u64)> = refusals.into_iter().collect();
    refusals.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let sessions_per_hour = buckets(&opened, now, Duration::from_secs(3600), 24, |t| t.get(8..13)).into_iter().map(|(k, n)| (format!("{}:00", k.get(3..5).unwrap_or("")), n)).collect();
    Ok(ChartData { per_minute: buckets(&per_minute, now, Duration::from_secs(60), 60, |t| t.get(11..16)), refusals, sessions_per_hour })
}

/// How long grants were asked for, in the ranges people ask in.
fn grant_durations(grants: &[crate::grants::GrantView]) -> Vec<(String, u64)> {
    const RANGES: &[(u64, &str)] = &[(1800, "up to 30 min"), (3600, "up to 1 h"), (4 * 3600, "up to 4 h"), (8 * 3600, "up to 8 h"), (u64::MAX, "longer")];
    let mut counts = vec![0u64; RANGES.len()];
    for g in grants {
        let i = RANGES.iter().position(|(max, _)| g.duration_secs <= *max).unwrap_or(RANGES.len() - 1);
        counts[i] += 1;
    }
    RANGES.iter().zip(counts).filter(|(_, n)| *n > 0).map(|((_, label), n)| (label.to_string(), n)).collect()
}

/// The overview's charts, for those who may read the audit log.
pub async fn overview_charts(state: &ApiState, viewer: &Viewer) -> Markup {
    if !viewer.who.can_read_all() {
        return html! {};
    }
    let cached = state.console.charts.lock().unwrap_or_else(|p| p.into_inner()).as_ref().filter(|(at, _)| at.elapsed() < CHARTS_EVERY).map(|(_, d)| d.clone());
    let data = match cached {
        Some(d) => Ok(d),
        None => {
            let log = state.audit_log.clone();
            let read = blocking(state, move || chart_data(&log)).await;
            if let Ok(d) = &read {
                *state.console.charts.lock().unwrap_or_else(|p| p.into_inner()) = Some((std::time::Instant::now(), d.clone()));
            }
            read
        }
    };
    let durations = grant_durations(&state.grants.list(&viewer.who, false));
    match data {
        Ok(d) => html! {
            section.charts aria-labelledby="activity-h" {
                h2 #activity-h { "Activity on this instance" }
                div.chart-grid {
                    figure { figcaption { "Statements per minute, last hour" } (charts::series("chart-statements", "Statements per minute, last hour", &d.per_minute)) }
                    figure { figcaption { "Refused statements by scope (the end of the log)" } (charts::bars("chart-refusals", "Refused statements by scope", &d.refusals, true)) }
                    figure { figcaption { "Sessions opened per hour, last day" } (charts::series("chart-sessions", "Sessions opened per hour, last day", &d.sessions_per_hour)) }
                    figure { figcaption { "Grants by length asked for" } (charts::bars("chart-durations", "Grants by length asked for", &durations, false)) }
                }
            }
        },
        Err(e) => html! { p.alert { "The audit log cannot be read for the charts: " (e) } },
    }
}
