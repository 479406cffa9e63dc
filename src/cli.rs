//! The admin commands (`grant`, `session`, `scope`): thin clients of the admin API that print
//! tables for people and JSON with `--json`.

use serde_json::Value;

/// Where the admin API is and who is calling.
pub struct ApiClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API answered with an error: exit 1.
    #[error("{0}")]
    Refused(String),
    /// The API could not be reached or answered nonsense: exit 2.
    #[error("{0}")]
    Unreachable(String),
    /// `scope check` refused the statement (already printed): exit 1.
    #[error("statement refused")]
    Denied,
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Refused(_) | CliError::Denied => 1,
            CliError::Unreachable(_) => 2,
        }
    }
}

impl ApiClient {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .into();
        Self { base: base.trim_end_matches('/').to_owned(), token, agent }
    }

    fn finish(&self, result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value, CliError> {
        self.answer(result).map(|(_, body)| body)
    }

    /// A response's status and JSON body; a status other than 2xx is the API's refusal.
    fn answer(&self, result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<(u16, Value), CliError> {
        let mut resp = result.map_err(|e| CliError::Unreachable(format!("cannot reach the admin API at {}: {e}", self.base)))?;
        let status = resp.status();
        let body: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        if status.is_success() {
            Ok((status.as_u16(), body))
        } else {
            let message = body.get("error").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| format!("HTTP {status}"));
            Err(CliError::Refused(format!("{message} (HTTP {})", status.as_u16())))
        }
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token.as_deref().unwrap_or(""))
    }

    pub fn get(&self, path: &str) -> Result<Value, CliError> {
        let r = self.agent.get(format!("{}/api{path}", self.base)).header("Authorization", self.auth()).call();
        self.finish(r)
    }

    /// A call that needs no token (signing in).
    pub fn post_anonymous(&self, path: &str, body: Value) -> Result<Value, CliError> {
        let r = self.agent.post(format!("{}/api{path}", self.base)).send_json(body);
        self.finish(r)
    }

    /// The same, with the HTTP status of a success (the device poll answers 202 while pending).
    pub fn post_anonymous_status(&self, path: &str, body: Value) -> Result<(u16, Value), CliError> {
        let r = self.agent.post(format!("{}/api{path}", self.base)).send_json(body);
        self.answer(r)
    }

    pub fn post(&self, path: &str, body: Value) -> Result<Value, CliError> {
        let r = self.agent.post(format!("{}/api{path}", self.base)).header("Authorization", self.auth()).send_json(body);
        self.finish(r)
    }
}

/// Prints rows as an aligned table with a header.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        line(row.clone());
    }
    if rows.is_empty() {
        println!("(none)");
    }
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

pub fn grant_row(g: &Value) -> Vec<String> {
    vec![s(g, "id"), s(g, "user"), s(g, "scope"), s(g, "status"), s(g, "login"), s(g, "expires_at"), s(g, "reason")]
}

pub const GRANT_HEADERS: &[&str] = &["ID", "USER", "SCOPE", "STATUS", "LOGIN", "EXPIRES", "REASON"];

/// Prints one grant as `key: value` lines.
pub fn print_grant(g: &Value) {
    for key in [
        "id", "user", "scope", "database", "status", "login", "reason", "requested_by", "requested_at", "break_glass", "decided_by", "decided_at",
        "expires_at", "ended_at", "ended_by", "end_reason",
    ] {
        println!("{key:>13}: {}", s(g, key));
    }
    if let Ok(read) = serde_json::from_value::<crate::grants::ReadView>(g["read"].clone()) {
        println!("{:>13}: {}", "read", read.describe());
    }
}

/// `text` as a value in a URL's query string (instance ids hold `:`).
pub fn query_escape(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The session list as a table: (headers, rows). With a control plane every session names
/// its instance, and the table gets an INSTANCE column.
pub fn session_table(sessions: &Value) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let list = sessions.as_array().cloned().unwrap_or_default();
    let fleet = list.iter().any(|x| x.get("instance").is_some());
    let mut headers = vec!["ID", "USER", "GRANT", "SCOPE", "CLIENT", "SINCE", "STATEMENTS"];
    if fleet {
        headers.insert(1, "INSTANCE");
    }
    let rows = list
        .iter()
        .map(|x| {
            let mut row = vec![s(x, "id"), s(x, "user"), s(x, "grant"), s(x, "scope"), s(x, "client"), s(x, "since"), s(x, "statements")];
            if fleet {
                row.insert(1, s(x, "instance"));
            }
            row
        })
        .collect();
    (headers, rows)
}

pub fn scope_rows(scopes: &Value) -> Vec<Vec<String>> {
    scopes
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    let max = s(x, "max_duration");
                    let approvers = x.get("approvers").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(",")).unwrap_or_default();
                    vec![s(x, "name"), s(x, "database"), s(x, "role"), max, if approvers.is_empty() { "any".into() } else { approvers }, s(x, "description")]
                })
                .collect()
        })
        .unwrap_or_default()
}

pub const SCOPE_HEADERS: &[&str] = &["SCOPE", "DATABASE", "ROLE", "MAX", "APPROVERS", "DESCRIPTION"];

/// `scope show`: the scope and its whole rule set, one line per rule, durations as written.
pub fn print_scope(v: &Value) {
    let list = |x: &Value| x.as_array().map(|a| a.iter().map(|e| e.as_str().map(str::to_owned).unwrap_or_else(|| e.to_string())).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    let or = |text: String, none: &str| if text.is_empty() { none.to_owned() } else { text };
    let r = &v["rules"];
    println!("scope:             {}", s(v, "name"));
    if !s(v, "description").is_empty() {
        println!("description:       {}", s(v, "description"));
    }
    println!("databases:         {}", list(&v["databases"]));
    println!("role:              {}", s(v, "role"));
    println!("max duration:      {}", s(v, "max_duration"));
    println!("approvers:         {}", or(list(&v["approvers"]), "any approver"));
    println!("break-glass:       {}", v["break_glass"].as_str().map(|d| format!("up to {d}")).unwrap_or_else(|| "no".into()));
    println!("search_path:       {}", list(&r["search_path"]));
    println!("tables:");
    for t in r["tables"].as_array().into_iter().flatten() {
        let denied = list(&t["deny_columns"]);
        println!("  {:<24} {}{}", s(t, "name"), list(&t["allow"]), if denied.is_empty() { String::new() } else { format!("  (not columns: {denied})") });
    }
    println!("catalog reads:     {}", if r["catalog"].as_bool() == Some(false) { "no" } else { "pg_catalog, information_schema" });
    println!("row limit:         {}", r["row_limit"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "none".into()));
    let budget = crate::grants::reads::ReadBudget { rows: r["max_rows_read"].as_u64(), bytes: r["max_bytes_read"].as_u64() };
    println!("read budget:       {}", if budget.rows.is_none() && budget.bytes.is_none() { "none".to_owned() } else { format!("{} per grant", budget.describe()) });
    println!("statement_timeout: {}", r["statement_timeout"].as_str().unwrap_or("not pinned"));
    println!("WHERE required:    {}", if r["require_where"].as_bool() == Some(false) { "no" } else { "on UPDATE and DELETE" });
    println!("settings:          {}", or(list(&r["settings"]), "display settings only"));
    println!("functions:         {}", or(list(&r["functions_allow"]), "built-in read-only ones"));
    if !list(&r["functions_deny"]).is_empty() {
        println!("functions refused: {}", list(&r["functions_deny"]));
    }
    if !list(&r["statements"]).is_empty() {
        println!("statement classes: {}", list(&r["statements"]));
    }
}
