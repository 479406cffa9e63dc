//! `pglease init`: a working production setup for one upstream, in one directory.
//!
//! It writes `pglease.toml` (with absolute paths, so `serve` works from any directory), a
//! certificate for the client-facing listener, the upstream password and one starter scope's
//! role password as 0600 files, `scopes.sql` (the role and GRANTs that back the scope, to run
//! once on the upstream as a role that may create roles) and an admin token, shown once.
//! It first logs in to the upstream with the connection string it is given, so a wrong host,
//! password or CA is reported now rather than at the first `serve`.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::conninfo::{ConnInfo, SslMode};

/// What `init` is asked to set up.
pub struct InitOptions {
    pub dir: PathBuf,
    /// libpq connection string of the upstream, as the role pglease will log in as.
    pub upstream: String,
    pub listen: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    /// Names (DNS or IP) the client-facing certificate is valid for.
    pub names: Vec<String>,
    /// Overwrite an existing setup in `dir`.
    pub force: bool,
    /// The first engineer's name (a person who requests grants).
    pub engineer: String,
    /// Where the grant store, events and audit log go (default: `dir/state`); the packaged
    /// service may write only /var/lib/pglease.
    pub state_dir: Option<PathBuf>,
}

/// What `init` wrote, for the caller to print.
pub struct Initialized {
    pub config: PathBuf,
    pub scopes_sql: PathBuf,
    pub ca_cert: PathBuf,
    pub admin_token: String,
    pub engineer_token: String,
    pub server_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("--upstream: {0}")]
    Upstream(String),
    #[error("{0} already exists (pass --force to overwrite the setup in that directory)")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot make the certificate: {0}")]
    Certificate(String),
}

/// The starter scope `init` writes: read-only on the upstream database's `public` schema.
const STARTER_SCOPE: &str = "read";
const STARTER_ROLE: &str = "pglease_read";

pub async fn init(o: &InitOptions) -> Result<Initialized, InitError> {
    let info = crate::conninfo::parse(&o.upstream).map_err(|e| InitError::Upstream(e.to_string()))?;
    let user = info.user.clone().ok_or_else(|| InitError::Upstream("name the role pglease logs in as (user=… or postgresql://USER@…)".into()))?;
    let password = info.password_or_env().ok_or_else(|| InitError::Upstream("no password: set PGPASSWORD, or password=… in the connection string".into()))?;
    let database = info.database().unwrap_or(&user).to_owned();
    // Names go into TOML comments and SQL; a control character has no business in them.
    for (key, value) in [("user", &user), ("dbname", &database), ("host", &info.host)] {
        if value.chars().any(char::is_control) {
            return Err(InitError::Upstream(format!("{key} holds a control character")));
        }
    }
    // A verifying connection needs its CA in the config too; libpq's default file will do.
    let upstream_ca = match info.verify() {
        Some(crate::tls::UpstreamVerify::Full) => match info.root_cert().filter(|p| p.exists()) {
            Some(ca) => Some(absolute(&ca)),
            None => return Err(InitError::Upstream(format!("sslmode={} needs sslrootcert=<the CA of the upstream's certificate>", info.sslmode.as_str()))),
        },
        _ => None,
    };
    let dir = absolute(&o.dir);
    let config_path = dir.join("pglease.toml");
    if config_path.exists() && !o.force {
        return Err(InitError::Exists(config_path));
    }
    // Fail now, with Postgres's own words, rather than at the first serve.
    let client = info.connect().await.map_err(|e| InitError::Upstream(format!("cannot log in to {}: {e}", describe(&info))))?;
    let server_version = client
        .query_one("SHOW server_version", &[])
        .await
        .map_err(|e| InitError::Upstream(crate::conninfo::describe_error(&e)))?
        .get::<_, String>(0);
    drop(client);

    // Everything is created with its final mode (no window in which a secret is readable),
    // in directories only the owner may enter, and never through a symlink someone left.
    let write = |path: &Path, text: &str, secret: bool| -> Result<(), InitError> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let err = |source| InitError::Write { path: path.to_owned(), source };
        if let Some(parent) = path.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent).map_err(err)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(err)?;
        if secret {
            // An existing file keeps its old mode through open(2): set it.
            f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)
    };
    let state = absolute(&o.state_dir.clone().unwrap_or_else(|| dir.join("state")));
    let names: Vec<&str> = o.names.iter().map(String::as_str).collect();
    let certs = crate::tls::generate_dev_certificates(&names).map_err(|e| InitError::Certificate(e.to_string()))?;
    let (ca, cert, key) = (dir.join("certs/ca.crt"), dir.join("certs/server.crt"), dir.join("certs/server.key"));
    write(&ca, &certs.ca_pem, false)?;
    write(&cert, &certs.cert_pem, false)?;
    write(&key, &certs.key_pem, true)?;
    let upstream_password = dir.join("secrets/upstream.password");
    write(&upstream_password, &format!("{password}\n"), true)?;
    let role_password = crate::people::hex(&random::<18>());
    let role_password_file = dir.join(format!("secrets/{STARTER_SCOPE}.password"));
    write(&role_password_file, &format!("{role_password}\n"), true)?;
    let (admin_token, admin_hash) = crate::people::new_token();
    let (engineer_token, engineer_hash) = crate::people::new_token();
    if !crate::config::valid_name(&o.engineer) || o.engineer == "admin" {
        return Err(InitError::Upstream(format!("--engineer: {:?} is not a usable name (letters, digits, '-' and '_'; not admin)", o.engineer)));
    }

    let text = config_text(&ConfigParts {
        listen: o.listen,
        admin: o.admin,
        cert: &cert,
        key: &key,
        info: &info,
        user: &user,
        database: &database,
        upstream_password: &upstream_password,
        role_password_file: &role_password_file,
        state: &state,
        admin_hash: &admin_hash,
        engineer: &o.engineer,
        engineer_hash: &engineer_hash,
        upstream_ca: upstream_ca.as_deref(),
    });
    // What was written must load: the same checks as `serve --check`.
    let config = crate::config::Config::parse(&text).map_err(|e| InitError::Upstream(format!("the generated configuration does not load: {e}")))?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&state).map_err(|source| InitError::Write { path: state.clone(), source })?;
    }
    write(&config_path, &text, true)?;

    let scope = &config.scopes[STARTER_SCOPE];
    let mut sql = crate::policy::sql::scope_sql(STARTER_SCOPE, scope);
    let _ = writeln!(sql, "ALTER ROLE {} PASSWORD '{role_password}';", quote_ident(STARTER_ROLE));
    let _ = writeln!(sql, "-- This file holds the role's password: delete it once it has run.");
    let scopes_sql = dir.join("scopes.sql");
    write(&scopes_sql, &sql, true)?;
    Ok(Initialized { config: config_path, scopes_sql, ca_cert: ca, admin_token, engineer_token, server_version })
}

struct ConfigParts<'a> {
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    cert: &'a Path,
    key: &'a Path,
    info: &'a ConnInfo,
    user: &'a str,
    database: &'a str,
    upstream_password: &'a Path,
    role_password_file: &'a Path,
    state: &'a Path,
    admin_hash: &'a str,
    engineer: &'a str,
    engineer_hash: &'a str,
    upstream_ca: Option<&'a Path>,
}

fn config_text(p: &ConfigParts<'_>) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let path = |p: &Path| q(&p.display().to_string());
    let tls = match (p.info.sslmode, p.upstream_ca) {
        (SslMode::Disable, _) => "disable",
        (_, Some(_)) => "verify-full",
        (SslMode::Allow | SslMode::Prefer, None) => "prefer",
        (_, None) => "require",
    };
    let ca = match p.upstream_ca {
        Some(ca) => format!("ca_file = {}\n", path(ca)),
        None => String::new(),
    };
    format!(
        r#"# Written by `pglease init`. Every key is described in the example configuration
# (config/pglease.toml in the source, /usr/share/doc/pglease/examples/ in the package).
# Check it with `pglease serve --config <this file> --check`; apply edits with SIGHUP.

[listen]
addr = {listen}
# A certificate made by `pglease init` and signed by its own CA ({ca_cert}); clients connect
# with sslmode=verify-full sslrootcert=<that file>. Replace both with your own CA's to taste.
tls_cert = {cert}
tls_key = {key}
tls_ca = {ca_path}

[upstream]
host = {host}
port = {port}
user = {user}
password_file = {upstream_password}
tls = "{tls}"
{ca}
[admin]
addr = {admin}

[grants]
store = {store}
events_log = {events}

[audit]
path = {audit}
anchor = {anchor}

# A starter scope: read-only on the public schema of the database below. Its role is created by
# scopes.sql; `pglease scope sql {scope} --config <this file>` prints that SQL again.
[scopes.{scope}]
description = "read-only access to schema public"
database = {database_q}
role = {role}
password_file = {role_password}
max_duration = "8h"
row_limit = 1000
statement_timeout = "30s"
tables = [{{ name = "public.*", allow = ["read", "copy-out"] }}]

# The people `pglease init` printed tokens for (only their SHA-256 is kept). Add people with
# `pglease token new`; roles: engineer, approver, auditor, admin. Nobody approves their own
# request: the admin approves the engineer's.
[people.admin]
roles = ["admin"]
token_sha256 = "{admin_hash}"

[people.{engineer}]
roles = ["engineer"]
token_sha256 = "{engineer_hash}"
"#,
        listen = q(&p.listen.to_string()),
        admin = q(&p.admin.to_string()),
        ca_cert = p.cert.with_file_name("ca.crt").display(),
        cert = path(p.cert),
        ca_path = path(&p.cert.with_file_name("ca.crt")),
        key = path(p.key),
        host = q(&p.info.host),
        port = p.info.port,
        user = q(p.user),
        upstream_password = path(p.upstream_password),
        store = path(&p.state.join("grants.jsonl")),
        events = path(&p.state.join("events.jsonl")),
        audit = path(&p.state.join("audit.jsonl")),
        anchor = path(&p.state.join("audit.anchor")),
        database_q = q(p.database),
        scope = STARTER_SCOPE,
        role = q(STARTER_ROLE),
        role_password = path(p.role_password_file),
        admin_hash = p.admin_hash,
        engineer = p.engineer,
        engineer_hash = p.engineer_hash,
    )
}

fn describe(info: &ConnInfo) -> String {
    format!("{}:{} as {}", info.host, info.port, info.user.as_deref().unwrap_or("?"))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

fn random<const N: usize>() -> [u8; N] {
    use rand::RngCore;
    let mut raw = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    raw
}
