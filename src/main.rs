//! The `pglease` binary: argument parsing and process setup. `anyhow` lives only here and in
//! the top-level commands; modules have their own error types.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use pglease::config::{Config, LogFormat};

#[derive(Parser)]
#[command(name = "pglease", version, about = "Least-privilege, time-leased access to production PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How admin commands reach the API (the bearer token comes from PGLEASE_ADMIN_TOKEN, else
/// from `pglease login`).
#[derive(clap::Args, Clone)]
struct ApiArgs {
    /// Admin API of a running pglease.
    #[arg(long, env = "PGLEASE_ADMIN_URL", default_value = "http://127.0.0.1:9187", global = true)]
    admin_url: String,
    /// Print JSON instead of a table (a list is one JSON array).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum GrantCommand {
    /// Ask for a grant; prints its login and one-time secret.
    Request {
        /// The scope to be granted (pglease scope list shows them).
        #[arg(long)]
        scope: String,
        /// How long, e.g. 30m, 2h; at most the scope's max_duration.
        #[arg(long = "for")]
        duration: String,
        /// Why, for the approver and the audit log.
        #[arg(long)]
        reason: String,
        /// Whom the grant is for (approvers only); yourself by default.
        #[arg(long)]
        user: Option<String>,
        /// Activate at once without approval, where the scope allows break-glass.
        #[arg(long)]
        break_glass: bool,
    },
    /// Approve a pending grant (not your own).
    Approve {
        /// The grant's id (e.g. g1a2b3c4d).
        id: String,
    },
    /// Deny a pending grant.
    Deny {
        /// The grant's id.
        id: String,
        /// Why, for the requester and the audit log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Request and approve in one step, for someone else, who then takes the secret with
    /// `pglease grant secret ID` (the issuer never sees it).
    Issue {
        /// Whom the grant is for.
        #[arg(long)]
        user: String,
        /// The scope to be granted.
        #[arg(long)]
        scope: String,
        /// How long, e.g. 30m, 2h.
        #[arg(long = "for")]
        duration: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: String,
    },
    /// End a grant now; its open connections are dropped.
    Revoke {
        /// The grant's id.
        id: String,
        /// Why, for the grant's user and the audit log.
        #[arg(long)]
        reason: String,
    },
    /// Grants you may see.
    List {
        /// Only grants usable now.
        #[arg(long)]
        active: bool,
    },
    /// One grant.
    Show {
        /// The grant's id (e.g. g1a2b3c4d).
        id: String,
    },
    /// Take a (new) secret for your own grant, shown once; any earlier one stops working. How
    /// the user of a grant issued or requested by someone else gets to log in.
    Secret {
        /// The grant's id.
        id: String,
    },
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Live client sessions (with a control plane, every instance's).
    List {
        /// Only the sessions of the instance this API belongs to (works while the control
        /// plane is away).
        #[arg(long)]
        local: bool,
    },
    /// End a session now.
    Kill {
        /// The session's number (pglease session list shows them).
        id: u64,
        /// The instance the session is on (the INSTANCE column of session list), needed only
        /// when several instances have a session with this number.
        #[arg(long)]
        instance: Option<String>,
    },
}

#[derive(Subcommand)]
enum ScopeCommand {
    /// Scopes as the running proxy has them (admin API).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One scope's whole rule set, as the running proxy has it (admin API).
    Show {
        /// The scope's name.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The decision the proxy would take for SQL under a scope, offline from a config file.
    /// Exit 0 allowed or rewritten, 1 refused.
    Check {
        /// The scope's name.
        scope: String,
        /// The statement(s), as a client would send them.
        sql: String,
        #[command(flatten)]
        source: ScopeSource,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
        /// A table's columns in order, as `schema.table=col,col,…` (repeatable), so that `*` over
        /// a table with denied columns shows as the proxy rewrites it (it reads them from the
        /// catalog). With --demo, the demo's tables are known.
        #[arg(long = "columns", value_name = "TABLE=COLUMNS")]
        columns: Vec<String>,
    },
    /// The CREATE ROLE / GRANT statements of the Postgres role that backs a scope, offline
    /// from a config file.
    Sql {
        /// The scope's name.
        scope: String,
        #[command(flatten)]
        source: ScopeSource,
    },
}

/// Where offline scope commands read scopes from.
#[derive(clap::Args)]
struct ScopeSource {
    /// Configuration file with the scopes (the default is the path `pglease serve` reads).
    #[arg(long, default_value = "config/pglease.toml")]
    config: PathBuf,
    /// Use the demo's built-in scopes instead of a config file.
    #[arg(long, conflicts_with = "config")]
    demo: bool,
}

/// The scope named `name` from `source`, or an error naming the scopes there are.
fn load_scope(source: &ScopeSource, name: &str) -> Result<pglease::config::ScopeConfig, pglease::cli::CliError> {
    use pglease::cli::CliError;
    let (mut scopes, from) = if source.demo {
        (pglease::demo::demo_scopes(), "the demo's scopes".to_owned())
    } else {
        let text = std::fs::read_to_string(&source.config).map_err(|e| CliError::Unreachable(format!("cannot read {}: {e}", source.config.display())))?;
        let config = Config::parse(&text).map_err(|e| CliError::Unreachable(format!("{}: {e}", source.config.display())))?;
        (config.scopes, source.config.display().to_string())
    };
    match scopes.remove(name) {
        Some(scope) => Ok(scope),
        None if scopes.is_empty() => Err(CliError::Refused(format!("no scope named {name:?}: {from} defines none"))),
        None => Err(CliError::Refused(format!("no scope named {name:?} in {from}; it defines: {}", scopes.keys().cloned().collect::<Vec<_>>().join(", ")))),
    }
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check hash chains: exit 0 intact, 1 broken. A log file: the first bad record is named.
    /// The control plane: every instance's chain, each with its gaps and breaks.
    Verify {
        #[command(flatten)]
        source: AuditSource,
        /// Anchor file with chain heads written by the proxy; detects a cut-off tail (log files only).
        #[arg(long)]
        anchor: Option<PathBuf>,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Sessions in the log: who, grant, scope, from, to, statements, denials, errors.
    Sessions {
        #[command(flatten)]
        source: AuditSource,
        /// Only sessions of this person.
        #[arg(long)]
        user: Option<String>,
        /// Only sessions of this grant id.
        #[arg(long)]
        grant: Option<String>,
        /// Only sessions under this scope.
        #[arg(long)]
        scope: Option<String>,
        /// Sessions started at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Sessions started at or before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Only sessions with a statement of this decision: allow, rewrite, deny.
        #[arg(long)]
        decision: Option<String>,
        /// One JSON object per line (streamed: logs of any size).
        #[arg(long)]
        json: bool,
    },
    /// One session's statements in order, with decision, timing, rows and errors.
    Show {
        #[command(flatten)]
        source: AuditSource,
        /// The session's number (pglease audit sessions shows them).
        #[arg(long)]
        session: u64,
        /// Keep printing new statements as they are logged (or copied to the control plane).
        #[arg(long)]
        follow: bool,
        /// One JSON object per line (streamed: logs of any size).
        #[arg(long)]
        json: bool,
    },
    /// Re-run a session's allowed statements against another database and report differences.
    Replay {
        #[command(flatten)]
        source: AuditSource,
        /// The session's number.
        #[arg(long)]
        session: u64,
        /// The target database: a libpq connection string, URL or key=value (sslmode and
        /// sslrootcert as libpq reads them; password from it or PGPASSWORD).
        #[arg(long)]
        target: Option<String>,
        /// Print the statements as SQL instead of running them.
        #[arg(long)]
        dry_run: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// Where the audit commands read records: a log file, or the control plane's `pglease.audit`.
#[derive(clap::Args)]
struct AuditSource {
    /// The audit log (its rotated files LOG.000001… are read too).
    #[arg(required_unless_present = "control_plane")]
    log: Option<PathBuf>,
    /// Read the records every instance copied to the control plane, when no LOG is named: its
    /// libpq connection string (password from it or PGPASSWORD).
    #[arg(long, env = "PGLEASE_CONTROL_PLANE", value_name = "DSN", hide_env_values = true)]
    control_plane: Option<String>,
    /// With --control-plane: the instance whose chain to read (needed when several have
    /// records; `audit verify` checks every instance's chain when it is left out).
    #[arg(long, requires = "control_plane")]
    instance: Option<String>,
}

#[derive(Subcommand)]
enum ControlPlaneCommand {
    /// Create or upgrade the control plane's schema (safe from several instances at once).
    Migrate {
        /// The control-plane database: a libpq connection string (password from it or PGPASSWORD).
        #[arg(long, env = "PGLEASE_CONTROL_PLANE")]
        dsn: String,
        /// Only report the migrations that would run; exit 1 if there are any.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a new admin API token; prints it and the hash for `people.<name>.token_sha256`.
    New,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and its admin API.
    Serve {
        /// Path of the TOML configuration.
        #[arg(long, default_value = "config/pglease.toml")]
        config: PathBuf,
        /// Only check the configuration (and the files it names), then exit.
        #[arg(long)]
        check: bool,
    },
    /// Temporary grants (admin API).
    Grant {
        #[command(subcommand)]
        command: GrantCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Connect to a scope in one command: reuse your active grant or request one and wait for
    /// its approval, then run psql through the proxy (the secret only in psql's environment).
    Connect {
        /// The scope to connect with (pglease scope list shows them).
        scope: String,
        /// Why you need access (required when a grant must be requested).
        #[arg(long)]
        reason: Option<String>,
        /// How long a requested grant lasts, e.g. 30m, 2h (default 1h, or the scope's limit).
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        /// The database to connect to (one of the scope's; default: the scope's first).
        #[arg(long)]
        database: Option<String>,
        /// The CA file the proxy's certificate is verified with (default: PGLEASE_CA, or the
        /// proxy's listen.tls_ca when pglease runs on this machine).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Run this program instead of psql, the same way (PG* variables in its environment).
        #[arg(long, value_name = "PROGRAM", conflicts_with = "print_env")]
        exec: Option<String>,
        /// Print the PG* variables (the secret among them) instead of running a client; to a
        /// terminal only.
        #[arg(long)]
        print_env: bool,
        /// Admin API of a running pglease.
        #[arg(long, env = "PGLEASE_ADMIN_URL", default_value = "http://127.0.0.1:9187")]
        admin_url: String,
        /// Arguments for psql (or the program), after `--`.
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Live sessions (admin API).
    Session {
        #[command(subcommand)]
        command: SessionCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Scopes: list and show (admin API); check a statement and print the role's SQL (offline).
    Scope {
        #[command(subcommand)]
        command: ScopeCommand,
    },
    /// Auditors' tools over the audit log (offline).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The shared control-plane database of several instances (schema and migrations).
    ControlPlane {
        #[command(subcommand)]
        command: ControlPlaneCommand,
    },
    /// Sign in with the identity provider (OpenID Connect): a browser on this machine, or
    /// the device flow on a machine without one. Admin commands then use the session.
    Login {
        /// Use the device flow (enter a code on another device) even where a browser could open.
        #[arg(long)]
        device: bool,
        /// Print the sign-in URL instead of opening a browser (then open it on this machine).
        #[arg(long, conflicts_with = "device")]
        no_browser: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// End the sign-in `pglease login` made, here and on the server.
    Logout {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Admin API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Set up pglease for one upstream in a directory: config, certificate, secrets, a starter
    /// scope and the SQL of its role, an admin token. Then: run scopes.sql, serve.
    Init {
        /// Directory to write into (created if missing), e.g. /etc/pglease.
        #[arg(long)]
        dir: PathBuf,
        /// libpq connection string (key=value or URL) of the upstream, as the role pglease logs
        /// in as; its password from password=… or PGPASSWORD (better: out of the command line).
        #[arg(long, env = "PGLEASE_UPSTREAM")]
        upstream: String,
        /// Where clients will connect.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: SocketAddr,
        /// Admin API listen address.
        #[arg(long, default_value = "127.0.0.1:9187")]
        admin: SocketAddr,
        /// Names (DNS or IP) the client-facing certificate is valid for (default: localhost,
        /// 127.0.0.1 and this host's name).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Overwrite an existing setup in the directory.
        #[arg(long)]
        force: bool,
        /// Name of the first engineer (who requests grants; the admin approves them).
        #[arg(long, default_value = "engineer")]
        engineer: String,
        /// Directory for the grant store, events and audit log (default: DIR/state; the
        /// packaged service writes only /var/lib/pglease).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Write a throwaway CA and a server certificate signed by it, for development.
    DevCerts {
        /// Output directory (created if missing).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Names (DNS or IP) the certificate is valid for.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell, e.g. bash.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (pglease.1 and one per subcommand) into a directory.
    Man {
        /// Output directory (created if missing).
        #[arg(long, default_value = "man")]
        out: PathBuf,
    },
    /// Run a throwaway Postgres with the sample `shop` database and the proxy in front of it.
    Demo {
        /// Directory for the throwaway cluster (kept on exit); a temporary one if omitted.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Proxy listen address.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: SocketAddr,
        /// Admin API listen address.
        #[arg(long, default_value = "127.0.0.1:9187")]
        admin: SocketAddr,
        /// Print one JSON line with the connection details instead of text.
        #[arg(long)]
        json: bool,
        /// Run the printed psql line once through the proxy, then stop and clean up.
        #[arg(long)]
        check: bool,
        /// Proxy instances on one control plane (1 to 9), on consecutive ports from --listen and --admin.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=9))]
        instances: u8,
        /// A TOML file with an [identity.oidc] table (as in pglease.toml): people may also
        /// sign in with that identity provider (pglease login).
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
}

fn init_tracing(level: &str, format: LogFormat) {
    let filter = pglease::logging::filter(level);
    // Logs go to stderr: stdout is for command output (`demo --json`).
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Commands that only print (to a terminal or a pipe), not the ones that talk to Postgres
    // over sockets, where SIGPIPE must stay ignored.
    let prints_only = matches!(
        cli.command,
        Command::Grant { .. } | Command::Session { .. } | Command::Login { .. } | Command::Logout { .. } | Command::Scope { .. } | Command::Token { .. } | Command::Completions { .. } | Command::Man { .. }
    ) || matches!(&cli.command, Command::Audit { command } if !matches!(command, AuditCommand::Replay { target: Some(_), dry_run: false, .. }));
    if prints_only {
        // A command whose output goes to `| head` ends quietly when the reader leaves, as
        // cat does; Rust ignores SIGPIPE, and println! would panic on the closed pipe. The
        // server commands keep ignoring it: their sockets report EPIPE as an error.
        // SAFETY: restoring a signal's default disposition before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // Admin commands are plain HTTP clients: no runtime needed.
    let admin = match cli.command {
        Command::Grant { command, api } => Some(grant(command, &api)),
        Command::Session { command, api } => Some(session(command, &api)),
        Command::Connect { scope, reason, duration, database, ca, exec, print_env, admin_url, args } => {
            let api = pglease::cli::ApiClient::new(&admin_url, pglease::login::admin_token(&admin_url));
            let options = pglease::connect::ConnectOptions { scope, reason, duration, database, ca, exec, print_env, args, poll_every: std::time::Duration::from_secs(1) };
            match pglease::connect::run(&api, &options) {
                Ok(pglease::connect::Ended::Printed) => return std::process::ExitCode::SUCCESS,
                // As a shell reports a command ended by SIGINT.
                Ok(pglease::connect::Ended::Withdrawn(_)) => return std::process::ExitCode::from(130),
                Err(e) => Some(Err(e)),
            }
        }
        Command::Login { device, no_browser, api } => {
            use pglease::login::Flow;
            let flow = if device || (!no_browser && !pglease::login::has_browser()) { Flow::Device } else { Flow::Browser { open: !no_browser } };
            Some(pglease::login::login(&client(&api), &api.admin_url, flow, api.json))
        }
        Command::Logout { api } => Some(pglease::login::logout(&api.admin_url)),
        Command::Scope { command } => Some(scope(command)),
        Command::Audit { command } => return audit(command),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "pglease", &mut std::io::stdout());
            return std::process::ExitCode::SUCCESS;
        }
        Command::Man { out } => {
            let written = std::fs::create_dir_all(&out).and_then(|()| clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &out));
            return match written {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pglease: cannot write man pages to {}: {e}", out.display());
                    std::process::ExitCode::from(2)
                }
            };
        }
        Command::Token { command: TokenCommand::New } => {
            let (token, hash) = pglease::people::new_token();
            println!("token:        {token}");
            println!("token_sha256: {hash}");
            return std::process::ExitCode::SUCCESS;
        }
        other => {
            return run_server_command(other);
        }
    };
    match admin {
        Some(Ok(())) | None => std::process::ExitCode::SUCCESS,
        Some(Err(pglease::cli::CliError::Denied)) => std::process::ExitCode::from(1),
        Some(Err(e)) => {
            eprintln!("pglease: {e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

fn client(api: &ApiArgs) -> pglease::cli::ApiClient {
    pglease::cli::ApiClient::new(&api.admin_url, pglease::login::admin_token(&api.admin_url))
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}

fn grant(command: GrantCommand, api: &ApiArgs) -> Result<(), pglease::cli::CliError> {
    use pglease::cli::{GRANT_HEADERS, grant_row, print_grant, print_table};
    use serde_json::json;
    let c = client(api);
    let (value, new) = match command {
        GrantCommand::Request { scope, duration, reason, user, break_glass } => {
            (c.post("/grants", json!({ "scope": scope, "duration": duration, "reason": reason, "user": user, "break_glass": break_glass }))?, true)
        }
        GrantCommand::Issue { user, scope, duration, reason } => (c.post("/grants/issue", json!({ "user": user, "scope": scope, "duration": duration, "reason": reason }))?, true),
        GrantCommand::Approve { id } => (c.post(&format!("/grants/{id}/approve"), json!({}))?, false),
        GrantCommand::Deny { id, reason } => (c.post(&format!("/grants/{id}/deny"), json!({ "reason": reason }))?, false),
        GrantCommand::Revoke { id, reason } => (c.post(&format!("/grants/{id}/revoke"), json!({ "reason": reason }))?, false),
        GrantCommand::Show { id } => (c.get(&format!("/grants/{id}"))?, false),
        GrantCommand::Secret { id } => (c.post(&format!("/grants/{id}/secret"), json!({}))?, true),
        GrantCommand::List { active } => {
            let v = c.get(if active { "/grants?active=true" } else { "/grants" })?;
            if api.json {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v.as_array().into_iter().flatten().map(grant_row).collect();
                print_table(GRANT_HEADERS, &rows);
            }
            return Ok(());
        }
    };
    if api.json {
        print_json(&value);
    } else {
        print_grant(&value);
        if new {
            let id = value["id"].as_str().unwrap_or("");
            let psql = value["psql"].as_str().unwrap_or("");
            println!();
            match value["password"].as_str() {
                Some(password) => {
                    println!("Connect with (the secret is shown this once):");
                    println!();
                    println!("  PGPASSWORD={password} {psql}");
                }
                None => println!("{} takes the grant's secret, shown to them only, with: pglease grant secret {id}", value["user"].as_str().unwrap_or("its user")),
            }
            if value["status"] == "pending" {
                println!();
                println!("usable once approved: pglease grant approve {id}");
            }
        }
    }
    Ok(())
}

fn session(command: SessionCommand, api: &ApiArgs) -> Result<(), pglease::cli::CliError> {
    let c = client(api);
    match command {
        SessionCommand::List { local } => {
            let v = c.get(if local { "/sessions?local=true" } else { "/sessions" })?;
            if api.json {
                print_json(&v);
            } else {
                let (headers, rows) = pglease::cli::session_table(&v);
                pglease::cli::print_table(&headers, &rows);
            }
        }
        SessionCommand::Kill { id, instance } => {
            let path = match &instance {
                Some(i) => format!("/sessions/{id}/kill?instance={}", pglease::cli::query_escape(i)),
                None => format!("/sessions/{id}/kill"),
            };
            let v = c.post(&path, serde_json::json!({}))?;
            match (api.json, v.get("instance").and_then(|i| i.as_str())) {
                (true, _) => print_json(&v),
                (false, Some(on)) => println!("session {id} on {on} ended"),
                (false, None) => println!("session {id} ended"),
            }
        }
    }
    Ok(())
}

fn scope(command: ScopeCommand) -> Result<(), pglease::cli::CliError> {
    use pglease::cli::CliError;
    use pglease::policy::{Decision, ScopePolicy};
    match command {
        ScopeCommand::Check { scope, sql, source, json, columns } => {
            let config = load_scope(&source, &scope)?;
            let mut tables = Vec::new();
            for spec in &columns {
                tables.push(pglease::policy::schema::Schema::parse_table(spec).map_err(|e| CliError::Refused(format!("--columns {e}")))?);
            }
            let schema = match (source.demo, tables.is_empty()) {
                (true, true) => Some(pglease::policy::schema::Schema::from_ddl(pglease::demo::SHOP_SCHEMA).map_err(CliError::Unreachable)?),
                (_, false) => Some(pglease::policy::schema::Schema::of(tables)),
                (false, true) => None,
            };
            let verdict = ScopePolicy::from_config(&scope, &config).decide_with_schema(&sql, schema.as_ref());
            if json {
                print_json(&serde_json::to_value(&verdict.decision).unwrap_or_default());
            } else {
                match &verdict.decision {
                    Decision::Allow => println!("allow"),
                    Decision::Rewrite { sql, reason, notice } => {
                        println!("rewrite ({reason}):\n{sql}");
                        if let Some(notice) = notice {
                            println!("NOTICE: {notice}");
                        }
                    }
                    Decision::Deny { code, message } => println!("deny ({code}): {message}"),
                }
            }
            // Exit 1 for a refusal, so scripts can test statements.
            if verdict.decision.is_deny() { Err(CliError::Denied) } else { Ok(()) }
        }
        ScopeCommand::Sql { scope, source } => {
            let config = load_scope(&source, &scope)?;
            print!("{}", pglease::policy::sql::scope_sql(&scope, &config));
            Ok(())
        }
        ScopeCommand::List { api } => {
            let v = client(&api).get("/scopes")?;
            if api.json {
                print_json(&v);
            } else {
                pglease::cli::print_table(pglease::cli::SCOPE_HEADERS, &pglease::cli::scope_rows(&v));
            }
            Ok(())
        }
        ScopeCommand::Show { name, api } => {
            let v = client(&api).get(&format!("/scopes/{name}"))?;
            if api.json {
                print_json(&v);
            } else {
                pglease::cli::print_scope(&v);
            }
            Ok(())
        }
    }
}

/// An audit command's records, opened: a log file, or one instance's chain in the control plane.
enum AuditRecords {
    File(PathBuf),
    Table(Box<pglease::audit::table::AuditTable>, String),
}

impl AuditRecords {
    /// Opens the source; for the control plane, the named instance or the only one there is.
    fn open(source: AuditSource) -> Result<Self, String> {
        match (source.log, source.control_plane) {
            // A log named on the command line wins over PGLEASE_CONTROL_PLANE in the environment.
            (Some(log), _) => Ok(Self::File(log)),
            (None, Some(dsn)) => {
                let table = connect_audit_table(&dsn)?;
                let instance = table.instance(source.instance.as_deref())?;
                Ok(Self::Table(Box::new(table), instance))
            }
            (None, None) => Err("name the audit LOG or --control-plane DSN".into()),
        }
    }

    fn source(&self) -> pglease::audit::reader::Source<'_> {
        use pglease::audit::reader::Source;
        match self {
            Self::File(log) => Source::File(log),
            Self::Table(table, instance) => Source::Table(table, instance),
        }
    }
}

/// Connects to the control plane for reading its audit table.
fn connect_audit_table(dsn: &str) -> Result<pglease::audit::table::AuditTable, String> {
    // Commands that talk to Postgres keep SIGPIPE ignored (main restored it for printing): a
    // unix-socket write to a server that went away must be an error, not a silent death.
    // SAFETY: setting a signal's disposition before any thread is started (the table's runtime
    // starts below).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    pglease::audit::table::AuditTable::connect(dsn)
}

fn audit(command: AuditCommand) -> std::process::ExitCode {
    use pglease::audit::reader;
    use std::process::ExitCode;
    let fail = |code: u8, e: String| {
        eprintln!("pglease: {e}");
        ExitCode::from(code)
    };
    match command {
        AuditCommand::Verify { source: AuditSource { log: None, control_plane: Some(dsn), instance }, anchor, json } => {
            if anchor.is_some() {
                return fail(2, "--anchor checks a log file; the control plane's chains have no anchor file".into());
            }
            let reports = match connect_audit_table(&dsn).and_then(|table| reader::verify_instances(&table, instance.as_deref())) {
                Ok(r) => r,
                Err(e) => return fail(2, e),
            };
            // No chain at all is not "intact", as a missing log file is not.
            let intact = !reports.is_empty() && reports.iter().all(|r| r.intact);
            if json {
                print_json(&serde_json::json!({"intact": intact, "instances": reports}));
            } else if reports.is_empty() {
                println!("BROKEN: no instance has audit records in the control plane");
            } else {
                for r in &reports {
                    let range = match (r.first_seq, r.last_seq) {
                        (Some(first), Some(last)) => format!("seq {first}..{last}"),
                        _ => "no seq".into(),
                    };
                    println!("{}: {}: {} records, {range}, head {}", r.instance, if r.intact { "intact" } else { "BROKEN" }, r.records, r.head);
                    for g in &r.gaps {
                        println!("    gap: seq {}..{} missing", g.from, g.to);
                    }
                    for b in &r.breaks {
                        println!("    record seq={}: {}", b.seq, b.problem);
                    }
                    if r.not_listed > 0 {
                        println!("    and {} more gaps or breaks", r.not_listed);
                    }
                }
            }
            if intact { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        AuditCommand::Verify { source, anchor, json } => {
            let Some(log) = source.log else { return fail(2, "name the audit LOG or --control-plane DSN".into()) };
            match reader::verify(&log, anchor.as_deref()) {
                Ok(r) => {
                    if json {
                        print_json(&serde_json::json!({"intact": true, "records": r.records, "head": r.head, "anchors_checked": r.anchors_checked}));
                    } else {
                        println!("intact: {} records, head {}{}", r.records, r.head, if r.anchors_checked > 0 { format!(", {} anchors checked", r.anchors_checked) } else { String::new() });
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    if json {
                        print_json(&serde_json::json!({"intact": false, "error": e}));
                    } else {
                        println!("BROKEN: {e}");
                    }
                    ExitCode::from(1)
                }
            }
        }
        AuditCommand::Sessions { source, user, grant, scope, since, until, decision, json } => {
            let records = match AuditRecords::open(source) {
                Ok(r) => r,
                Err(e) => return fail(2, e),
            };
            let filter = reader::SessionFilter { user, grant, scope, since, until, decision };
            match reader::sessions(records.source(), &filter) {
                Ok(list) => {
                    if json {
                        for s in &list {
                            print_json(&serde_json::to_value(s).unwrap_or_default());
                        }
                    } else {
                        let o = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                        let rows: Vec<Vec<String>> = list
                            .iter()
                            .map(|s| vec![s.session.to_string(), s.user.clone(), o(&s.grant), o(&s.scope), s.client.clone(), o(&s.started_at), o(&s.ended_at), s.statements.to_string(), s.denied.to_string(), s.errors.to_string()])
                            .collect();
                        pglease::cli::print_table(&["SESSION", "USER", "GRANT", "SCOPE", "CLIENT", "STARTED", "ENDED", "STATEMENTS", "DENIED", "ERRORS"], &rows);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(2, e),
            }
        }
        AuditCommand::Show { source, session, follow, json } => {
            let records = match AuditRecords::open(source) {
                Ok(r) => r,
                Err(e) => return fail(2, e),
            };
            let source = records.source();
            if !follow {
                match reader::sessions(source, &reader::SessionFilter::default()) {
                    Ok(list) if !list.iter().any(|s| s.session == session) => return fail(1, format!("session {session} is not in {source}")),
                    Ok(_) => {}
                    Err(e) => return fail(2, e),
                }
            }
            let mut printed = 0usize;
            loop {
                let list = match reader::show_session(source, session) {
                    Ok(l) => l,
                    Err(e) => return fail(2, e),
                };
                // Only statements whose result is in (or that were refused) are final.
                for s in list.iter().skip(printed) {
                    if follow && s.rows.is_none() && s.error_code.is_none() && s.decision != "deny" && !s.skipped {
                        break;
                    }
                    if json {
                        print_json(&serde_json::to_value(s).unwrap_or_default());
                    } else {
                        let outcome = match (&s.error_code, s.skipped, s.decision.as_str()) {
                            (_, true, _) => "skipped after an earlier error".to_owned(),
                            (Some(c), _, _) => format!("ERROR {c} {}", s.error.clone().unwrap_or_default()),
                            (None, _, _) => format!("{} ({} rows)", s.tags.join(", "), s.rows.unwrap_or(0)),
                        };
                        let ms = s.duration_us.map(|d| format!("{:.3} ms", d as f64 / 1000.0)).unwrap_or_else(|| "-".into());
                        println!("#{} {} [{}] {} {}", s.stmt, s.at, s.protocol, s.decision.to_uppercase(), ms);
                        println!("    {}", s.sql.replace('\n', "\n    "));
                        if let Some(ran) = &s.sql_ran {
                            println!("    ran: {ran}");
                        }
                        if s.params.as_array().is_some_and(|a| !a.is_empty()) {
                            println!("    params: {}", s.params);
                        }
                        if let Some(r) = &s.reason {
                            println!("    reason: {r}");
                        }
                        println!("    -> {outcome}");
                    }
                    printed += 1;
                }
                if !follow {
                    return ExitCode::SUCCESS;
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        AuditCommand::Replay { source, session, target, dry_run, json } => {
            let records = match AuditRecords::open(source) {
                Ok(r) => r,
                Err(e) => return fail(2, e),
            };
            let statements = match pglease::audit::replay::replayable(records.source(), session) {
                Ok(s) => s,
                Err(e) => return fail(2, e),
            };
            if dry_run {
                for s in &statements {
                    let sql = s.sql_ran.clone().unwrap_or_else(|| s.sql.clone());
                    if json {
                        print_json(&serde_json::json!({"stmt": s.stmt, "sql": sql, "params": s.params}));
                    } else {
                        // One statement per line, ended by exactly one semicolon.
                        let sql = sql.trim_end().trim_end_matches(';').trim_end();
                        println!("{sql};{}", if s.params.as_array().is_some_and(|a| !a.is_empty()) { format!("  -- params: {}", s.params) } else { String::new() });
                    }
                }
                return ExitCode::SUCCESS;
            }
            let Some(target) = target else { return fail(2, "--target is required (or --dry-run)".into()) };
            // Read before the replay's runtime starts: the control plane's reader blocks.
            let settings = match pglease::audit::replay::session_settings(records.source(), session) {
                Ok(s) => s,
                Err(e) => return fail(2, e),
            };
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return fail(2, e.to_string()),
            };
            runtime.block_on(async {
                let client = match connect_target(&target).await {
                    Ok(c) => c,
                    Err(e) => return fail(2, format!("cannot connect to the target: {e}")),
                };
                if let Err(e) = pglease::audit::replay::apply_settings(&client, &settings).await {
                    return fail(2, e);
                }
                let results = pglease::audit::replay::replay(&client, &statements).await;
                let differing = results.iter().filter(|r| !r.matches).count();
                for r in &results {
                    if json {
                        print_json(&serde_json::to_value(r).unwrap_or_default());
                    } else if !r.matches {
                        println!(
                            "DIFFERS #{}: {}\n    recorded: rows {:?} error {:?}\n    replayed: rows {:?} error {:?}",
                            r.stmt, r.sql, r.recorded_rows, r.recorded_error, r.replayed_rows, r.replayed_error
                        );
                    }
                }
                if !json {
                    println!("{} statements replayed, {} differ", results.len(), differing);
                }
                if differing > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
            })
        }
    }
}

/// Connects to a replay target named by a libpq connection string (either form).
async fn connect_target(target: &str) -> Result<tokio_postgres::Client, String> {
    let info = pglease::conninfo::parse(target).map_err(|e| e.to_string())?;
    info.connect().await
}

fn run_server_command(command: Command) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pglease: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Serve { config, check: true } => {
                Config::load(&config)?;
                println!("{}: ok", config.display());
                Ok(())
            }
            Command::Serve { config, check: false } => serve(config).await,
            Command::DevCerts { out, names } => dev_certs(&out, &names),
            Command::ControlPlane { command: ControlPlaneCommand::Migrate { dsn, check } } => {
                use pglease::control_plane::{connect, migrations};
                let mut client = connect(&dsn).await.map_err(|e| anyhow::anyhow!("control plane: {e}"))?;
                let shown = |m: &migrations::Migration| format!("V{} {}", m.version, m.name);
                if check {
                    let pending = migrations::pending(&mut client).await?;
                    if pending.is_empty() {
                        println!("control plane schema is up to date");
                        return Ok(());
                    }
                    for m in &pending {
                        println!("would apply {}", shown(m));
                    }
                    std::process::exit(1);
                }
                let applied = migrations::migrate(&mut client).await?;
                if applied.is_empty() {
                    println!("control plane schema is up to date");
                }
                for m in &applied {
                    println!("applied {}", shown(m));
                }
                Ok(())
            }
            Command::Init { dir, upstream, listen, admin, names, force, engineer, state_dir } => {
                let names = if names.is_empty() { default_cert_names() } else { names };
                let options = pglease::init::InitOptions { dir: dir.clone(), upstream: upstream.clone(), listen, admin, names, force, engineer: engineer.clone(), state_dir };
                let done = pglease::init::init(&options).await?;
                let shown = |p: &std::path::Path| p.display().to_string();
                println!("pglease init: wrote {} (upstream: PostgreSQL {})", shown(&std::path::absolute(&dir).unwrap_or(dir)), done.server_version);
                println!("  config:    {}", shown(&done.config));
                println!("  role SQL:  {}   (run once on the upstream as a role that may create roles)", shown(&done.scopes_sql));
                println!("  client CA: {}   (clients: sslmode=verify-full sslrootcert=<this file>)", shown(&done.ca_cert));
                println!("Tokens for the grant commands (PGLEASE_ADMIN_TOKEN), shown once:");
                println!("  admin:    {}", done.admin_token);
                println!("  {engineer}: {}", done.engineer_token);
                println!();
                println!("Next:");
                println!("  psql \"$PGLEASE_UPSTREAM\" -f {}   (the connection string above, as a role that may create roles)", shown(&done.scopes_sql));
                println!("  pglease serve --config {} --check", shown(&done.config));
                println!("  pglease serve --config {}", shown(&done.config));
                Ok(())
            }
            Command::Grant { .. }
            | Command::Session { .. }
            | Command::Connect { .. }
            | Command::Login { .. }
            | Command::Logout { .. }
            | Command::Scope { .. }
            | Command::Token { .. }
            | Command::Audit { .. }
            | Command::Completions { .. }
            | Command::Man { .. } => {
                unreachable!("handled in main")
            }
            Command::Demo { dir, listen, admin, json, check, instances, identity } => {
                init_tracing("warn,pglease=info", LogFormat::Text);
                let identity = match identity {
                    Some(path) => pglease::config::IdentityConfig::load(&path)?,
                    None => Default::default(),
                };
                pglease::demo::run(pglease::demo::DemoOptions { dir, listen, admin, json, check, instances: instances.into(), identity }).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pglease: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// localhost, 127.0.0.1 and this host's name.
fn default_cert_names() -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != "localhost" {
            names.push(host.to_owned());
        }
    }
    names
}

fn dev_certs(out: &std::path::Path, names: &[String]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let certs = pglease::tls::generate_dev_certificates(&names)?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    std::fs::write(out.join("ca.crt"), &certs.ca_pem)?;
    std::fs::write(out.join("server.crt"), &certs.cert_pem)?;
    let key = out.join("server.key");
    std::fs::write(&key, &certs.key_pem)?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let shown = |f: &str| out.join(f).display().to_string();
    println!("wrote {}, {}, {} for {}", shown("ca.crt"), shown("server.crt"), shown("server.key"), names.join(", "));
    Ok(())
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    init_tracing(&config.log.level, config.log.format);
    let secrets = pglease::app::Secrets::from_config(&config)?;
    let people = pglease::people::People::from_config(&config.people);
    let app = pglease::app::App::build(&config, secrets, people, Default::default()).await?;
    let listener = TcpListener::bind(config.listen.addr).await.with_context(|| format!("listen.addr: cannot listen on {}", config.listen.addr))?;
    let admin_listener = TcpListener::bind(config.admin.addr).await.with_context(|| format!("admin.addr: cannot listen on {}", config.admin.addr))?;
    let running = app.start(listener, admin_listener)?;
    tracing::info!(proxy = %running.proxy_addr, admin = %running.admin_addr, "pglease serving");
    let mut signals = pglease::signals::Signals::new().context("installing signal handlers")?;
    while signals.next().await == pglease::signals::Signal::Reload {
        tracing::info!(config = %path.display(), "SIGHUP received; reloading the configuration");
        match running.reloader.reload_file(&path).await {
            Ok(report) => {
                tracing::info!(
                    scopes_changed = ?report.scopes_changed,
                    sessions_ended = report.sessions_ended,
                    scopes_disabled = ?report.scopes_disabled,
                    "configuration reloaded"
                );
                if !report.restart_needed.is_empty() {
                    tracing::warn!(keys = ?report.restart_needed, "these settings changed but take effect only at restart; their old values stay in force");
                }
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "configuration reload failed; the previous configuration stays in force"),
        }
    }
    tracing::info!("signal received; shutting down");
    running.stop().await;
    Ok(())
}
