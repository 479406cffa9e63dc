//! `pglease connect SCOPE`: from "I need orders-read" to a psql prompt in one command.
//!
//! It reuses the caller's active grant for the scope (taking a fresh secret for it: secrets are
//! shown once and never kept on disk) or requests one and waits for its approval, showing who
//! may approve and for how long it has waited; Ctrl-C withdraws the request. Then it runs
//! `psql` (or `--exec PROGRAM`) with the connection in `PG*` variables of that program's
//! environment only: the secret is never printed and never on a command line, and the proxy's
//! certificate is always verified (`sslmode=verify-full`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cli::{ApiClient, CliError};

/// What `pglease connect` was asked to do.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub scope: String,
    /// Required when a grant must be requested.
    pub reason: Option<String>,
    /// The grant's length when one is requested (`1h`, or the scope's limit if shorter).
    pub duration: Option<String>,
    /// The database to connect to (one of the scope's); the grant's default otherwise.
    pub database: Option<String>,
    /// The CA the proxy's certificate is verified with.
    pub ca: Option<PathBuf>,
    /// Run this program instead of psql.
    pub exec: Option<String>,
    /// Print the variables instead of running anything.
    pub print_env: bool,
    /// Passed on to psql (or the program).
    pub args: Vec<String>,
    /// How often a pending request is looked at again.
    pub poll_every: Duration,
}

/// The default grant length when none is asked for.
const DEFAULT_DURATION: Duration = Duration::from_secs(3600);

/// Variables that could send the client elsewhere or change how it verifies the proxy: they
/// are removed from the client's environment.
const OVERRIDING: &[&str] = &["PGSERVICE", "PGSERVICEFILE", "PGHOSTADDR", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL", "PGSSLCRLDIR", "PGREQUIRESSL", "PGSSLNEGOTIATION", "PGPASSFILE", "PGCHANNELBINDING", "PGTARGETSESSIONATTRS", "PGOPTIONS"];

/// How `connect` ends without running a client.
#[derive(Debug)]
pub enum Ended {
    /// `--print-env` printed the variables.
    Printed,
    /// Ctrl-C while waiting: the request was withdrawn.
    Withdrawn(String),
}

fn refused(message: impl Into<String>) -> CliError {
    CliError::Refused(message.into())
}

/// A grant ready to connect with: the API's answer to a request or a secret taken.
struct Ready {
    grant: Value,
    password: String,
}

/// Finds or requests the grant, waits for it, and runs the client (which replaces this process,
/// so on success this returns only for `--print-env`).
pub fn run(api: &ApiClient, options: &ConnectOptions) -> Result<Ended, CliError> {
    let whoami = api.get("/whoami")?;
    let me = whoami["person"].as_str().unwrap_or_default().to_owned();
    let scope = api.get(&format!("/scopes/{}", crate::cli::query_escape(&options.scope)))?;
    if let Some(db) = &options.database
        && !scope["databases"].as_array().is_some_and(|d| d.iter().any(|x| x == db.as_str()))
    {
        return Err(refused(format!("scope {} does not reach database {db:?} (it reaches {})", options.scope, list(&scope["databases"]))));
    }
    // Settled before anything is requested: no grant is made for a client that cannot connect.
    let ca = find_ca(options, whoami["proxy"]["sslrootcert"].as_str())?;
    let ready = match reusable(api, &me, &options.scope)? {
        Some(id) => {
            let taken = api.post(&format!("/grants/{id}/secret"), json!({}))?;
            status(&format!("using your active grant {id} for {} (until {})", options.scope, taken["expires_at"].as_str().unwrap_or("?")));
            into_ready(taken)?
        }
        None => {
            let reason = options
                .reason
                .as_deref()
                .filter(|r| !r.trim().is_empty())
                .ok_or_else(|| refused(format!("you have no active grant for scope {}: --reason \"…\" is required to request one", options.scope)))?;
            let duration = match &options.duration {
                Some(d) => d.clone(),
                None => default_duration(&scope),
            };
            // Ctrl-C is watched for from before the request exists: one pressed while it is
            // being made withdraws it as soon as it does.
            let mut interrupted = crate::signals::Interrupts::new().map_err(|e| CliError::Unreachable(format!("cannot watch for Ctrl-C: {e}")))?;
            let requested = api.post("/grants", json!({ "scope": options.scope, "duration": duration, "reason": reason }))?;
            let ready = into_ready(requested)?;
            match wait_for_approval(api, &me, &scope, &ready.grant, options.poll_every, &mut interrupted)? {
                Some(active) => Ready { grant: active, password: ready.password },
                None => return Ok(Ended::Withdrawn(ready.grant["id"].as_str().unwrap_or_default().to_owned())),
            }
        }
    };
    let env = environment(&ready, &whoami["proxy"], options, &ca);
    if options.print_env {
        return print_env(&env);
    }
    Err(exec(options, &env))
}

/// The caller's active grant for `scope`, if any.
fn reusable(api: &ApiClient, me: &str, scope: &str) -> Result<Option<String>, CliError> {
    let active = api.get("/grants?active=true")?;
    let mine = active.as_array().into_iter().flatten().filter(|g| g["user"] == me && g["scope"] == scope && g["status"] == "active");
    // The one that lasts longest.
    Ok(mine.max_by_key(|g| g["expires_at"].as_str().unwrap_or_default().to_owned()).and_then(|g| g["id"].as_str().map(str::to_owned)))
}

fn into_ready(answer: Value) -> Result<Ready, CliError> {
    let password = answer["password"].as_str().ok_or_else(|| CliError::Unreachable("the API sent no secret for the grant".into()))?.to_owned();
    Ok(Ready { grant: answer, password })
}

/// `1h`, or the scope's longest grant if that is shorter.
fn default_duration(scope: &Value) -> String {
    let max = scope["max_duration"].as_str().and_then(|d| humantime::parse_duration(d).ok());
    match max {
        Some(max) if max < DEFAULT_DURATION => humantime::format_duration(max).to_string(),
        _ => humantime::format_duration(DEFAULT_DURATION).to_string(),
    }
}

fn list(v: &Value) -> String {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default()
}

/// Who may approve a grant of `scope`, in words.
fn approvers(scope: &Value) -> String {
    match list(&scope["approvers"]) {
        groups if groups.is_empty() => "any approver".to_owned(),
        groups => format!("an approver in {groups}"),
    }
}

/// A line on stderr for the person at the terminal.
fn status(line: &str) {
    eprintln!("pglease: {line}");
}

/// Polls the pending grant until it is decided; `None` when Ctrl-C withdrew it.
fn wait_for_approval(api: &ApiClient, me: &str, scope: &Value, grant: &Value, every: Duration, interrupted: &mut crate::signals::Interrupts) -> Result<Option<Value>, CliError> {
    let id = grant["id"].as_str().unwrap_or_default().to_owned();
    let path = format!("/grants/{id}");
    let started = Instant::now();
    let live = std::io::stderr().is_terminal();
    status(&format!("requested grant {id} for {} ({}); waiting for {} to approve it (Ctrl-C withdraws the request)", grant["scope"].as_str().unwrap_or(""), grant["duration_secs"].as_u64().map(|s| crate::time::human_duration(Duration::from_secs(s))).unwrap_or_default(), approvers(scope)));
    loop {
        let g = api.get(&path)?;
        match g["status"].as_str().unwrap_or_default() {
            "active" => {
                if live {
                    eprintln!();
                }
                status(&format!("grant {id} approved by {} after {}", g["decided_by"].as_str().unwrap_or("?"), clock(started.elapsed())));
                return Ok(Some(g));
            }
            "pending" => {}
            "denied" => {
                return Err(refused(format!("grant {id} was denied by {}{}", g["decided_by"].as_str().unwrap_or("?"), g["end_reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default())));
            }
            other => {
                return Err(refused(format!("grant {id} is {other}{}", g["end_reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default())));
            }
        }
        if live {
            eprint!("\r\x1b[2Kpglease: waiting for approval of {id} — {}", clock(started.elapsed()));
            let _ = std::io::stderr().flush();
        }
        if interrupted.wait(every) {
            if live {
                eprintln!();
            }
            let withdrawn = api.post(&format!("{path}/revoke"), json!({ "reason": format!("withdrawn by {me}: pglease connect was interrupted") }));
            if let Err(e) = withdrawn {
                return Err(refused(format!("could not withdraw request {id} ({e}); it may still be pending: pglease grant revoke {id} --reason \"…\"")));
            }
            status(&format!("request {id} withdrawn"));
            return Ok(None);
        }
    }
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

/// The CA file: `--ca`, `PGLEASE_CA`, or the proxy's own `listen.tls_ca` when that path exists
/// here (pglease on this machine). Without one there is no verified connection: an error.
fn find_ca(options: &ConnectOptions, advertised: Option<&str>) -> Result<PathBuf, CliError> {
    let given = options.ca.clone().or_else(|| std::env::var_os("PGLEASE_CA").map(PathBuf::from));
    match (given, advertised.map(PathBuf::from).filter(|p| p.is_file())) {
        (Some(ca), _) if ca.is_file() => Ok(ca),
        (Some(ca), _) => Err(refused(format!("--ca {}: no such file", ca.display()))),
        (None, Some(ca)) => Ok(ca),
        (None, None) => Err(refused("the proxy's certificate cannot be verified without its CA: pass --ca FILE or set PGLEASE_CA (the file the proxy's listen.tls_ca names)")),
    }
}

/// The client's connection, as libpq reads it from the environment.
fn environment(ready: &Ready, proxy: &Value, options: &ConnectOptions, ca: &std::path::Path) -> Vec<(&'static str, String)> {
    let g = &ready.grant;
    vec![
        ("PGHOST", proxy["host"].as_str().unwrap_or_default().to_owned()),
        ("PGPORT", proxy["port"].as_u64().unwrap_or(5432).to_string()),
        ("PGUSER", g["login"].as_str().unwrap_or_default().to_owned()),
        ("PGDATABASE", options.database.clone().unwrap_or_else(|| g["database"].as_str().unwrap_or_default().to_owned())),
        ("PGSSLMODE", "verify-full".to_owned()),
        ("PGSSLROOTCERT", ca.display().to_string()),
        ("PGPASSWORD", ready.password.clone()),
    ]
}

/// Prints `export NAME='value'` lines, the secret among them, to a terminal only.
fn print_env(env: &[(&'static str, String)]) -> Result<Ended, CliError> {
    if !std::io::stdout().is_terminal() {
        return Err(refused("--print-env prints the grant's secret, so only to a terminal (use --exec to hand it to a program)"));
    }
    eprintln!("pglease: the lines below hold the grant's secret (PGPASSWORD): do not paste them anywhere else");
    for (name, value) in env {
        println!("export {name}='{}'", value.replace('\'', r"'\''"));
    }
    Ok(Ended::Printed)
}

/// Replaces this process with the client; returns only if that failed.
fn exec(options: &ConnectOptions, env: &[(&'static str, String)]) -> CliError {
    use std::os::unix::process::CommandExt;
    let program = options.exec.as_deref().unwrap_or("psql");
    let mut command = std::process::Command::new(program);
    command.args(&options.args);
    for name in OVERRIDING {
        command.env_remove(name);
    }
    // The client needs the connection, not the admin API's token.
    command.env_remove("PGLEASE_ADMIN_TOKEN");
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let e = command.exec();
    let hint = if options.exec.is_none() && e.kind() == std::io::ErrorKind::NotFound { " (install the PostgreSQL client, or name another with --exec)" } else { "" };
    CliError::Unreachable(format!("cannot run {program}: {e}{hint}"))
}
