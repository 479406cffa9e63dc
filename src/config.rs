//! `pglease.toml`: the proxy's configuration.
//!
//! Unknown keys are rejected (`deny_unknown_fields`), defaults are named functions, and every error
//! names the key it is about (`serde_path_to_error` for type errors, [`Config::validate`] for the
//! rest). `config/pglease.toml` documents every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // Not a `source`: the message says it already, and `{:#}` would print it twice.
    #[error("cannot read config file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("config: {0}")]
    Syntax(String),
}

impl ConfigError {
    fn invalid(key: &str, message: impl Into<String>) -> Self {
        Self::Invalid { key: key.to_owned(), message: message.into() }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub grants: GrantsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    /// Named scopes: what a grant lets its holder do, and the Postgres role that backs it.
    #[serde(default)]
    pub scopes: BTreeMap<String, ScopeConfig>,
    /// People who use the admin API, with their roles and the hash of their bearer token.
    #[serde(default)]
    pub people: BTreeMap<String, PersonConfig>,
    /// A control-plane database shared with other instances; without it grants live in
    /// `grants.store`, this instance's own file.
    #[serde(default)]
    pub control_plane: Option<ControlPlaneConfig>,
    /// Where grant events are sent (approvers told of requests, and so on).
    #[serde(default)]
    pub notify: Vec<NotifyConfig>,
    /// Sign-in with the company's identity provider, next to `people`' static tokens.
    #[serde(default)]
    pub identity: IdentityConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// OpenID Connect: `pglease login` and the console sign people in with the identity provider.
    pub oidc: Option<OidcConfig>,
    /// Where sign-ins (the console's, and `pglease login`'s) are kept without a control plane:
    /// the SHA-256 of each session token, who it is, until when. With a control plane: the
    /// `pglease.logins` table.
    #[serde(default = "default_logins_file")]
    pub logins_file: PathBuf,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self { oidc: None, logins_file: default_logins_file() }
    }
}

/// `[identity.oidc]`: pglease is a confidential client of the identity provider.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer URL; its `/.well-known/openid-configuration` is read. https, or http on a
    /// loopback address only.
    pub issuer: String,
    pub client_id: String,
    /// The client secret (environment variable or file).
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    /// Scopes asked for, besides `openid`. Add `offline_access` where the identity provider
    /// issues refresh tokens only with it, and `groups` where it sends groups only with it.
    #[serde(default = "default_oidc_scopes")]
    pub scopes: Vec<String>,
    /// The ID token claim that names the person: "email" (default), "preferred_username",
    /// "sub", or another string claim.
    #[serde(default = "default_person_claim")]
    pub person_claim: String,
    /// The ID token claim that lists the person's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Which groups give which role: `approver = ["dba"]`. A person in none of them cannot
    /// sign in. Scopes' `approvers` name groups too.
    #[serde(default)]
    pub roles: OidcRoles,
    /// A signed-in session lasts at most this long; then `pglease login` again.
    #[serde(default = "default_session_ttl", with = "humantime_serde")]
    pub session_ttl: Duration,
    /// A session's roles and groups are read from the identity provider again (refresh
    /// token) when it is used this long after the last time: someone removed from a group
    /// there loses its rights here within this bound. Without a refresh token from the
    /// provider, the bound is `session_ttl`.
    #[serde(default = "default_refresh_every", with = "humantime_serde")]
    pub refresh_every: Duration,
    /// Clock difference allowed when checking ID tokens' times.
    #[serde(default = "default_clock_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Also accept the identity provider's own ID tokens (audience `client_id`, issued less
    /// than `refresh_every` ago) as bearer tokens on the admin API, as Kubernetes does: for
    /// automation that has them.
    #[serde(default)]
    pub bearer_id_tokens: bool,
    /// Offer the device flow (`pglease login` on a machine without a browser). Anyone can
    /// start one and send the code to someone else to approve ("device code phishing"); turn
    /// it off where nobody signs in from headless machines.
    #[serde(default = "default_true")]
    pub device_flow: bool,
    /// CA file for an identity provider with a private CA (default: the public web roots).
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OidcRoles {
    #[serde(default)]
    pub engineer: Vec<String>,
    #[serde(default)]
    pub approver: Vec<String>,
    #[serde(default)]
    pub auditor: Vec<String>,
    #[serde(default)]
    pub admin: Vec<String>,
}

impl OidcRoles {
    /// The roles that `groups` give.
    pub fn of(&self, groups: &std::collections::BTreeSet<String>) -> std::collections::BTreeSet<Role> {
        [(Role::Engineer, &self.engineer), (Role::Approver, &self.approver), (Role::Auditor, &self.auditor), (Role::Admin, &self.admin)]
            .into_iter()
            .filter(|(_, names)| names.iter().any(|n| groups.contains(n)))
            .map(|(role, _)| role)
            .collect()
    }
}

fn default_oidc_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into(), "profile".into()]
}
fn default_true() -> bool {
    true
}
fn default_person_claim() -> String {
    "email".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_session_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_refresh_every() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_clock_skew() -> Duration {
    Duration::from_secs(30)
}
fn default_logins_file() -> PathBuf {
    PathBuf::from("pglease-logins.json")
}

impl IdentityConfig {
    /// A file holding just an `[identity.oidc]` table (`pglease demo --identity FILE`), checked
    /// as in a whole config; errors name the key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            identity: IdentityConfig,
        }
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
        let deserializer = toml::Deserializer::parse(&text).map_err(|e| ConfigError::Syntax(e.to_string().trim_end().to_owned()))?;
        let file: File = serde_path_to_error::deserialize(deserializer).map_err(|e| ConfigError::Invalid { key: e.path().to_string(), message: e.into_inner().message().to_owned() })?;
        match &file.identity.oidc {
            Some(oidc) => oidc.validate()?,
            None => return Err(ConfigError::invalid("identity.oidc", format!("{} has no [identity.oidc] table", path.display()))),
        }
        Ok(file.identity)
    }
}

impl OidcConfig {
    pub fn client_secret(&self) -> Result<String, ConfigError> {
        read_named_secret("identity.oidc.client_secret", self.client_secret_env.as_deref(), self.client_secret_file.as_deref())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let issuer = url::Url::parse(&self.issuer).map_err(|e| ConfigError::invalid("identity.oidc.issuer", format!("not a URL: {e}")))?;
        let loopback = match issuer.host() {
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
        if issuer.scheme() != "https" && !(issuer.scheme() == "http" && loopback) {
            return Err(ConfigError::invalid("identity.oidc.issuer", "must be https (http only on a loopback address, for tests)"));
        }
        if self.client_id.is_empty() {
            return Err(ConfigError::invalid("identity.oidc.client_id", "must not be empty"));
        }
        if self.client_secret_env.is_some() == self.client_secret_file.is_some() {
            return Err(ConfigError::invalid("identity.oidc.client_secret_env", "set exactly one of client_secret_env and client_secret_file"));
        }
        if self.person_claim.is_empty() {
            return Err(ConfigError::invalid("identity.oidc.person_claim", "must not be empty"));
        }
        let r = &self.roles;
        if r.engineer.is_empty() && r.approver.is_empty() && r.auditor.is_empty() && r.admin.is_empty() {
            return Err(ConfigError::invalid("identity.oidc.roles", "must map at least one group to a role, or nobody can sign in"));
        }
        if self.session_ttl.is_zero() {
            return Err(ConfigError::invalid("identity.oidc.session_ttl", "must be more than 0s"));
        }
        if self.clock_skew > Duration::from_secs(300) {
            return Err(ConfigError::invalid("identity.oidc.clock_skew", "at most 5m"));
        }
        if self.refresh_every.is_zero() || self.refresh_every > self.session_ttl {
            return Err(ConfigError::invalid("identity.oidc.refresh_every", "must be more than 0s and at most session_ttl"));
        }
        Ok(())
    }
}

/// One notification target (`[[notify]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Names the target in logs, metrics and its outbox file; unique.
    pub name: String,
    /// "webhook": a signed JSON body; "slack": a Slack-compatible incoming-webhook body.
    pub kind: NotifyKind,
    /// Where to POST. A Slack webhook URL is itself the secret: give it with `url_env` or
    /// `url_file` instead.
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub url_file: Option<PathBuf>,
    /// The webhook's HMAC-SHA256 key (environment variable or file); required for "webhook".
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
    /// Which events: requested, approved, denied, break_glass, revoked, expiring, expired,
    /// session_killed, audit_failing (also when it recovers). Default: all of them.
    #[serde(default)]
    pub events: Vec<String>,
    /// The undelivered messages, in order (JSON Lines, and a `.cursor` file next to it).
    /// Default: `pglease-notify-NAME.jsonl`.
    pub outbox: Option<PathBuf>,
    /// Base of the links in messages (the console as people reach it). Default:
    /// `admin.public_url`, else `admin.addr`.
    pub links: Option<String>,
    /// CA file for an https receiver with a private CA (default: the public web roots).
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyKind {
    Webhook,
    Slack,
}

/// The events a notification target may ask for.
pub const NOTIFY_EVENTS: &[&str] = &["requested", "approved", "denied", "break_glass", "revoked", "expiring", "expired", "session_killed", "read_budget", "audit_failing"];

impl NotifyConfig {
    /// The receiver's URL (read from where the config says).
    pub fn url(&self, index: usize) -> Result<String, ConfigError> {
        match &self.url {
            Some(url) => Ok(url.clone()),
            None => read_named_secret(&format!("notify[{index}].url"), self.url_env.as_deref(), self.url_file.as_deref()),
        }
    }

    /// The webhook's signing key, if it has one.
    pub fn secret(&self, index: usize) -> Result<Option<String>, ConfigError> {
        match (&self.secret_env, &self.secret_file) {
            (None, None) => Ok(None),
            (env, file) => read_named_secret(&format!("notify[{index}].secret"), env.as_deref(), file.as_deref()).map(Some),
        }
    }

    pub fn outbox(&self) -> PathBuf {
        self.outbox.clone().unwrap_or_else(|| PathBuf::from(format!("pglease-notify-{}.jsonl", self.name)))
    }
}

/// Where several instances keep their shared state (see `control_plane`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// libpq connection string of the control-plane database, without its password.
    pub dsn: String,
    /// This instance's name in the fleet (sessions, audit chains, events); unique per instance.
    /// Default: this host's name and the proxy's port, `db-proxy-1:6432`.
    pub instance_id: Option<String>,
    /// Where the password comes from (at most one of the two; neither for peer or cert login).
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// How often each instance reads every grant again, notifications or not.
    #[serde(default = "default_reconcile_every", with = "humantime_serde")]
    pub reconcile_every: Duration,
    /// Logins are refused once this instance could not read the control plane for this long.
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
}

pub(crate) fn default_reconcile_every() -> Duration {
    Duration::from_secs(3)
}

pub(crate) fn default_stale_after() -> Duration {
    Duration::from_secs(30)
}

impl ControlPlaneConfig {
    /// The connection string with the password added (never logged).
    pub fn conninfo(&self) -> Result<String, ConfigError> {
        let password = match (&self.password_env, &self.password_file) {
            (None, None) => return Ok(self.dsn.clone()),
            (env, file) => read_secret("control_plane", env.as_deref(), file.as_deref())?,
        };
        Ok(format!("{} password='{}'", self.dsn, password.replace('\\', "\\\\").replace('\'', "\\'")))
    }
}

/// Temporary grants.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsConfig {
    /// The grant store: an append-only JSON Lines file, fsynced on every change.
    #[serde(default = "default_grant_store")]
    pub store: PathBuf,
    /// Sessions get a WARNING notice this long before their grant ends.
    #[serde(default = "default_warn_before", with = "humantime_vec")]
    pub warn_before: Vec<Duration>,
    /// Lifecycle events (requested, approved, session opened…) as JSON Lines. Absent: logs only.
    pub events_log: Option<PathBuf>,
    /// After this many failed logins from one address, each further attempt waits longer.
    #[serde(default = "default_failures_before_delay")]
    pub failures_before_delay: u32,
}

impl Default for GrantsConfig {
    fn default() -> Self {
        Self { store: default_grant_store(), warn_before: default_warn_before(), events_log: None, failures_before_delay: default_failures_before_delay() }
    }
}

/// The audit log.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON Lines file; rotated files are `PATH.000001`, `PATH.000002`, …
    #[serde(default = "default_audit_path")]
    pub path: PathBuf,
    /// "write": each record is written before its statement runs (survives the proxy being
    /// killed). "fsync": it is on disk first (group commit).
    #[serde(default)]
    pub durability: crate::audit::Durability,
    /// Start a new file past this size (bytes); the hash chain continues across files.
    #[serde(default = "default_rotate_bytes")]
    pub rotate_bytes: u64,
    /// "mapped" (default): records are copied into a shared mapping of the live file, no system
    /// call each; the live file must not be truncated from outside while pglease runs. "append":
    /// `write(2)`, for file systems without `fallocate` or an outside `copytruncate`.
    #[serde(default)]
    pub writer: crate::audit::log::WriterKind,
    /// A second file (ideally elsewhere) that receives the chain head about once a second, so
    /// that cutting off the log's tail is detectable by `audit verify --anchor`.
    pub anchor: Option<PathBuf>,
    /// Bound parameters: "log" (what replay needs), "redact" or "omit".
    #[serde(default)]
    pub params: crate::audit::ParamLogging,
    /// Also copy every record, batched, into a table of a separate Postgres database.
    pub postgres: Option<AuditPostgresConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditPostgresConfig {
    /// Environment variable holding the connection string (it carries a password).
    pub dsn_env: String,
    #[serde(default = "default_audit_table")]
    pub table: String,
}

fn default_audit_table() -> String {
    "pglease_audit".to_owned()
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { path: default_audit_path(), durability: Default::default(), rotate_bytes: default_rotate_bytes(), writer: Default::default(), anchor: None, params: Default::default(), postgres: None }
    }
}

fn default_audit_path() -> PathBuf {
    PathBuf::from("pglease-audit.jsonl")
}

fn default_rotate_bytes() -> u64 {
    256 << 20
}

/// One scope. The policy rules join it in the policy work.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    #[serde(default)]
    pub description: String,
    /// The database a grant of this scope connects to (`database`), or several (`databases`,
    /// the first one the default): set exactly one of the two.
    #[serde(default)]
    pub database: String,
    #[serde(default)]
    pub databases: Vec<String>,
    /// The Postgres login role that backs the scope; the proxy logs in upstream as it.
    pub role: String,
    /// Where that role's password comes from (exactly one of the two).
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Longest grant that may be requested.
    #[serde(default = "default_max_duration", with = "humantime_serde")]
    pub max_duration: Duration,
    /// Groups whose members may approve; empty: any approver.
    #[serde(default)]
    pub approvers: Vec<String>,
    /// Lets a requester activate a short grant without approval, with a mandatory reason.
    pub break_glass: Option<BreakGlassConfig>,
    /// Tables (patterns `schema.table`, `*` wildcards) and what may be done to them. First match
    /// wins; a table no rule matches may not be touched. `pg_catalog` and `information_schema`
    /// are readable unless `catalog = false` (psql's `\d` family needs them).
    #[serde(default)]
    pub tables: Vec<TableRuleConfig>,
    /// The session's `search_path`, pinned upstream; unqualified names resolve against it.
    #[serde(default = "default_search_path")]
    pub search_path: Vec<String>,
    /// Results are cut to this many rows (a `LIMIT` added or lowered).
    pub row_limit: Option<u64>,
    /// Over its whole life, across all its sessions, a grant of this scope may read at most
    /// this many rows (rows of results and of `COPY … TO STDOUT`). The session whose next row
    /// would cross it is ended (`FATAL 53400`), and further statements are refused.
    pub max_rows_read: Option<u64>,
    /// The same in bytes sent to the client (those rows, and errors, notices and notifications):
    /// `"500MB"`, `"2GiB"`, or a number. One row can hold a whole table (`json_agg`): a rows
    /// budget alone does not bound what leaves.
    pub max_bytes_read: Option<bytesize::ByteSize>,
    /// `statement_timeout` pinned for the scope's sessions.
    #[serde(default, with = "humantime_serde")]
    pub statement_timeout: Option<Duration>,
    /// UPDATE and DELETE must have a WHERE clause.
    #[serde(default = "yes")]
    pub require_where: bool,
    /// Settings (GUCs) a session may change with SET, beyond the harmless display ones. `"*"`:
    /// any setting pglease does not pin.
    #[serde(default)]
    pub settings: Vec<String>,
    #[serde(default)]
    pub functions: FunctionsConfig,
    /// Statement classes pglease refuses unless a scope names them: `"do"` (DO blocks) and
    /// `"two-phase-commit"` (PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED). pglease cannot see
    /// inside a DO block; the backing role's privileges still bound it.
    #[serde(default)]
    pub statements: Vec<StatementClass>,
    /// Allow reading `pg_catalog` and `information_schema`.
    #[serde(default = "yes")]
    pub catalog: bool,
}

/// One table rule of a scope.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableRuleConfig {
    /// `schema.table`, either part may use `*` (e.g. `orders.*`, `public.pgbench_*`).
    pub name: String,
    /// What may be done: read, insert, update, delete, truncate, copy-in, copy-out, ddl,
    /// maintenance, or all.
    pub allow: Vec<Action>,
    /// Columns that may not be read or written.
    #[serde(default)]
    pub deny_columns: Vec<String>,
    /// Columns read only through a mask, by column: `partial(P, S)` (the first P and last S
    /// characters, the rest `*`), `email` (first letter and domain), `redact`, `null`, or
    /// `sql:EXPR` with `{value}` for the column. A masked column may be selected, never used to
    /// filter, join, sort, group or aggregate.
    #[serde(default)]
    pub mask_columns: std::collections::BTreeMap<String, String>,
    /// Rows the scope may see and change: a SQL condition on the table's columns, with
    /// `{{person}}`, `{{grant}}` and `{{scope}}` for the session's (read from settings pglease
    /// pins, never spliced into the text). Added to every read, UPDATE, DELETE and COPY of the
    /// table; `pglease scope sql` makes the same a row-level security policy of the role.
    #[serde(default)]
    pub row_filter: Option<String>,
}

/// A kind of statement on a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Read,
    Insert,
    Update,
    Delete,
    Truncate,
    CopyIn,
    CopyOut,
    Ddl,
    Maintenance,
    All,
}

/// A statement class a scope may opt into (see `ScopeConfig::statements`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StatementClass {
    Do,
    TwoPhaseCommit,
}

/// Functions beyond (or removed from) the built-in read-only allowlist.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionsConfig {
    /// Extra functions, by name or `schema.name`; `"*"` allows any function not in pglease's
    /// never-list (files, programs, signals, settings, SQL from strings).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Built-in functions to refuse after all.
    #[serde(default)]
    pub deny: Vec<String>,
}

fn yes() -> bool {
    true
}

fn default_search_path() -> Vec<String> {
    vec!["public".to_owned()]
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassConfig {
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
}

/// What a person may do through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Requests grants for themself.
    Engineer,
    /// Approves, denies, issues and revokes grants; kills sessions.
    Approver,
    /// Reads grants, sessions and the audit log.
    Auditor,
    /// Everything.
    Admin,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonConfig {
    pub roles: Vec<Role>,
    /// Groups, for scopes that name their approvers (e.g. `dba`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Hex SHA-256 of the person's admin API bearer token (`pglease token new` makes one).
    pub token_sha256: String,
}

mod humantime_vec {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let items = Vec::<String>::deserialize(d)?;
        items.iter().map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom)).collect()
    }
}

/// The client-facing side: where engineers' clients connect.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Address of the Postgres-protocol listener.
    pub addr: SocketAddr,
    /// The host name clients reach the proxy by (behind a load balancer: its name), for
    /// connection lines and `pglease connect`; it must be in `tls_cert`. Default: `addr`'s
    /// address (127.0.0.1 when `addr` listens on every address).
    #[serde(default)]
    pub public_host: Option<String>,
    /// PEM certificate chain presented to clients.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The CA clients verify `tls_cert` with, when it is not a public one: ready-to-paste
    /// connection lines then say `sslmode=verify-full sslrootcert=<this>`. Not read otherwise.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Accept clients that do not ask for TLS. Off by default: grant secrets must not cross the
    /// network in a form an eavesdropper can replay or crack offline.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Client connections served at once; further ones get `FATAL 53300`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time from accept to the end of authentication.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A session idle (outside a running statement) for this long is closed. Absent: no limit.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Largest protocol message the proxy will buffer to inspect (queries, Parse, Bind…).
    /// Row data and COPY data pass through in chunks whatever their size.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// A client that accepts no bytes of what it is sent (a result it stopped reading) for this
    /// long is disconnected and its statement cancelled.
    #[serde(default = "default_client_stall_timeout", with = "humantime_serde")]
    pub client_stall_timeout: Duration,
    /// On SIGTERM/SIGINT, how long idle-in-flight sessions may finish before they are ended.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Threads that run sessions, each with its own event loop; a connection stays on one for
    /// its whole life. Absent: one per core.
    #[serde(default)]
    pub workers: Option<usize>,
}

/// Upstream TLS modes, named as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

/// The Postgres server pglease fronts, and how it logs in there.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host name or IP; a value starting with `/` is a unix socket directory.
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Role the proxy logs in as upstream.
    pub user: String,
    /// Environment variable that holds the upstream password.
    pub password_env: Option<String>,
    /// File that holds the upstream password (first line; must not be group/world readable).
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_upstream_tls")]
    pub tls: UpstreamTls,
    /// CA certificate(s) for `tls = "verify-full"`.
    pub ca_file: Option<PathBuf>,
    /// Name checked against the server certificate; defaults to `host`.
    pub server_name: Option<String>,
    /// Allow the upstream to ask for an MD5 password hash (weak; off by default).
    #[serde(default)]
    pub allow_md5: bool,
    /// Allow the upstream to ask for the cleartext password (only sensible over TLS; off by default).
    #[serde(default)]
    pub allow_cleartext: bool,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener (`/metrics`, `/healthz`, the API, the console).
    #[serde(default = "default_admin_addr")]
    pub addr: SocketAddr,
    /// The console's address as people's browsers reach it (behind a TLS-terminating proxy:
    /// `https://pglease.example.com`); the identity provider redirects to
    /// `{public_url}/auth/callback`. Default: `http://` and `addr`.
    pub public_url: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { addr: default_admin_addr(), public_url: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `pglease=debug`. `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: default_log_level(), format: LogFormat::Text }
    }
}

fn default_grant_store() -> PathBuf {
    PathBuf::from("pglease-grants.jsonl")
}
fn default_warn_before() -> Vec<Duration> {
    vec![Duration::from_secs(300), Duration::from_secs(60)]
}
fn default_failures_before_delay() -> u32 {
    3
}
fn default_max_duration() -> Duration {
    Duration::from_secs(8 * 3600)
}

/// More session threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

fn default_max_connections() -> usize {
    1000
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_message_bytes() -> usize {
    64 << 20
}
fn default_client_stall_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_pg_port() -> u16 {
    5432
}
fn default_upstream_tls() -> UpstreamTls {
    UpstreamTls::VerifyFull
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_admin_addr() -> SocketAddr {
    "127.0.0.1:9187".parse().expect("valid literal address")
}
fn default_log_level() -> String {
    "info".to_owned()
}

/// Smallest `max_message_bytes` accepted: enough for any startup-phase message and a real query.
const MIN_MESSAGE_BYTES: usize = 64 << 10;
/// Postgres itself refuses messages of 1 GiB or more (`PQ_LARGE_MESSAGE_LIMIT`).
const MAX_MESSAGE_BYTES: usize = (1 << 30) - 1;

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), error: source })?;
        let config = Self::parse(&text)?;
        config.check_files()?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::Syntax(e.to_string().trim_end().to_owned()))?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            // toml's own message repeats the position; keep only serde's explanation.
            let message = e.into_inner().message().to_owned();
            if key == "." {
                ConfigError::Syntax(message)
            } else {
                ConfigError::Invalid { key, message }
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the files the config names exist (separate from [`validate`](Self::validate)
    /// so that a config can be checked on another machine).
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for (key, path) in [("listen.tls_cert", &self.listen.tls_cert), ("listen.tls_key", &self.listen.tls_key), ("upstream.ca_file", &self.upstream.ca_file)] {
            if let Some(path) = path
                && !path.is_file()
            {
                return Err(ConfigError::invalid(key, format!("file {} does not exist", path.display())));
            }
        }
        if let Some(path) = &self.upstream.password_file
            && !path.is_file()
        {
            return Err(ConfigError::invalid("upstream.password_file", format!("file {} does not exist", path.display())));
        }
        // The TLS private key is a secret like the password files: refuse one others can read.
        if let Some(path) = &self.listen.tls_key {
            check_secret_file_mode(path).map_err(|m| ConfigError::invalid("listen.tls_key", m))?;
        }
        Ok(())
    }

    /// Checks what types cannot: values that must agree with each other, files that must exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.listen;
        match (&l.tls_cert, &l.tls_key) {
            (Some(_), None) => return Err(ConfigError::invalid("listen.tls_key", "required when listen.tls_cert is set")),
            (None, Some(_)) => return Err(ConfigError::invalid("listen.tls_cert", "required when listen.tls_key is set")),
            (None, None) if !l.allow_plaintext => {
                return Err(ConfigError::invalid(
                    "listen.tls_cert",
                    "required: clients must use TLS unless listen.allow_plaintext = true",
                ));
            }
            _ => {}
        }
        if l.max_connections == 0 {
            return Err(ConfigError::invalid("listen.max_connections", "must be at least 1"));
        }
        if l.workers.is_some_and(|n| !(1..=MAX_WORKERS).contains(&n)) {
            return Err(ConfigError::invalid("listen.workers", format!("must be between 1 and {MAX_WORKERS}")));
        }
        if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&l.max_message_bytes) {
            return Err(ConfigError::invalid(
                "listen.max_message_bytes",
                format!("must be between {MIN_MESSAGE_BYTES} and {MAX_MESSAGE_BYTES}"),
            ));
        }
        if l.handshake_timeout.is_zero() {
            return Err(ConfigError::invalid("listen.handshake_timeout", "must be more than 0s"));
        }

        let u = &self.upstream;
        if u.host.is_empty() {
            return Err(ConfigError::invalid("upstream.host", "must not be empty"));
        }
        if u.user.is_empty() {
            return Err(ConfigError::invalid("upstream.user", "must not be empty"));
        }
        match (&u.password_env, &u.password_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid("upstream.password_file", "set either password_env or password_file, not both"));
            }
            (None, None) => {
                return Err(ConfigError::invalid("upstream.password_env", "set password_env or password_file"));
            }
            _ => {}
        }
        if u.tls == UpstreamTls::VerifyFull && u.ca_file.is_none() {
            return Err(ConfigError::invalid("upstream.ca_file", "required when upstream.tls = \"verify-full\""));
        }
        if u.host.starts_with('/') && u.tls != UpstreamTls::Disable && u.tls != UpstreamTls::Prefer {
            return Err(ConfigError::invalid("upstream.tls", "a unix socket upstream does not use TLS: set \"disable\""));
        }
        if u.connect_timeout.is_zero() {
            return Err(ConfigError::invalid("upstream.connect_timeout", "must be more than 0s"));
        }
        if let Some(host) = &self.listen.public_host
            && (host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/'))
        {
            return Err(ConfigError::invalid("listen.public_host", "a host name or address, nothing else"));
        }
        if let Some(oidc) = &self.identity.oidc {
            oidc.validate()?;
        }
        if let Some(url) = &self.admin.public_url {
            let ok = url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some() && u.path() == "/" && u.query().is_none());
            if !ok {
                return Err(ConfigError::invalid("admin.public_url", "an http(s) URL with no path, e.g. https://pglease.example.com"));
            }
        }
        if let Some(cp) = &self.control_plane {
            let info = crate::conninfo::parse(&cp.dsn).map_err(|e| ConfigError::invalid("control_plane.dsn", e.to_string()))?;
            if info.password.is_some() {
                return Err(ConfigError::invalid("control_plane.dsn", "no password here: use control_plane.password_env or password_file"));
            }
            if cp.password_env.is_some() && cp.password_file.is_some() {
                return Err(ConfigError::invalid("control_plane.password_env", "set at most one of password_env and password_file"));
            }
            if cp.reconcile_every.is_zero() {
                return Err(ConfigError::invalid("control_plane.reconcile_every", "must be more than 0s"));
            }
            if cp.stale_after <= cp.reconcile_every {
                return Err(ConfigError::invalid("control_plane.stale_after", "must be longer than reconcile_every"));
            }
            if let Some(id) = &cp.instance_id
                && (id.is_empty() || id.len() > 200 || id.chars().any(|c| c.is_control() || c.is_whitespace()))
            {
                return Err(ConfigError::invalid("control_plane.instance_id", "1 to 200 characters, no spaces or control characters"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, n) in self.notify.iter().enumerate() {
            let key = |k: &str| format!("notify[{i}].{k}");
            if !valid_name(&n.name) {
                return Err(ConfigError::invalid(&key("name"), "letters, digits, '-' and '_'"));
            }
            if !names.insert(n.name.as_str()) {
                return Err(ConfigError::invalid(&key("name"), format!("{:?} names two targets", n.name)));
            }
            if [n.url.is_some(), n.url_env.is_some(), n.url_file.is_some()].iter().filter(|x| **x).count() != 1 {
                return Err(ConfigError::invalid(&key("url"), "set exactly one of url, url_env and url_file"));
            }
            if let Some(url) = &n.url {
                let parsed = url::Url::parse(url).map_err(|e| ConfigError::invalid(&key("url"), format!("{url:?}: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(ConfigError::invalid(&key("url"), "http or https"));
                }
            }
            if n.secret_env.is_some() && n.secret_file.is_some() {
                return Err(ConfigError::invalid(&key("secret_env"), "set at most one of secret_env and secret_file"));
            }
            if n.kind == NotifyKind::Webhook && n.secret_env.is_none() && n.secret_file.is_none() {
                return Err(ConfigError::invalid(&key("secret_env"), "a webhook signs its messages: set secret_env or secret_file"));
            }
            if let Some(bad) = n.events.iter().find(|e| !NOTIFY_EVENTS.contains(&e.as_str())) {
                return Err(ConfigError::invalid(&key("events"), format!("unknown event {bad:?} (known: {})", NOTIFY_EVENTS.join(", "))));
            }
        }
        for (name, scope) in &self.scopes {
            let key = |k: &str| format!("scopes.{name}.{k}");
            if !valid_name(name) {
                return Err(ConfigError::invalid(&format!("scopes.{name}"), "scope names are letters, digits, '-' and '_'"));
            }
            match (scope.database.is_empty(), scope.databases.is_empty()) {
                (true, true) => return Err(ConfigError::invalid(&key("database"), "set database (or databases = [...])")),
                (false, false) => return Err(ConfigError::invalid(&key("databases"), "set database or databases, not both")),
                _ => {}
            }
            if scope.databases.iter().any(String::is_empty) {
                return Err(ConfigError::invalid(&key("databases"), "database names must not be empty"));
            }
            if scope.role.is_empty() {
                return Err(ConfigError::invalid(&key("role"), "must not be empty"));
            }
            if scope.password_env.is_some() == scope.password_file.is_some() {
                return Err(ConfigError::invalid(&key("password_env"), "set exactly one of password_env and password_file"));
            }
            if scope.max_duration.is_zero() {
                return Err(ConfigError::invalid(&key("max_duration"), "must be more than 0s"));
            }
            for (i, rule) in scope.tables.iter().enumerate() {
                let parts: Vec<&str> = rule.name.split('.').collect();
                if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                    return Err(ConfigError::invalid(&format!("scopes.{name}.tables[{i}].name"), "must be schema.table (either part may be *)"));
                }
                if rule.allow.is_empty() {
                    return Err(ConfigError::invalid(&format!("scopes.{name}.tables[{i}].allow"), "must name at least one action"));
                }
                if let Some(filter) = &rule.row_filter {
                    crate::policy::rowfilter::condition_sql(filter).map_err(|why| ConfigError::invalid(&format!("scopes.{name}.tables[{i}].row_filter"), why))?;
                }
                for (column, mask) in &rule.mask_columns {
                    let key = format!("scopes.{name}.tables[{i}].mask_columns.{column}");
                    if rule.deny_columns.contains(column) {
                        return Err(ConfigError::invalid(&key, "is also in deny_columns: a column is denied or masked, not both"));
                    }
                    crate::policy::masks::Mask::parse(mask).map_err(|why| ConfigError::invalid(&key, &why))?;
                }
            }
            if scope.search_path.is_empty() || scope.search_path.iter().any(|s| s.is_empty() || s.contains(['"', ','])) {
                return Err(ConfigError::invalid(&key("search_path"), "must list one or more schema names"));
            }
            if scope.row_limit == Some(0) {
                return Err(ConfigError::invalid(&key("row_limit"), "must be at least 1"));
            }
            if scope.max_rows_read == Some(0) {
                return Err(ConfigError::invalid(&key("max_rows_read"), "must be at least 1"));
            }
            if scope.max_bytes_read.is_some_and(|b| b.as_u64() == 0) {
                return Err(ConfigError::invalid(&key("max_bytes_read"), "must be more than 0 bytes"));
            }
            if let Some(bg) = &scope.break_glass
                && (bg.max_duration.is_zero() || bg.max_duration > scope.max_duration)
            {
                return Err(ConfigError::invalid(&key("break_glass.max_duration"), "must be more than 0s and at most the scope's max_duration"));
            }
        }
        for (name, person) in &self.people {
            if !valid_name(name) {
                return Err(ConfigError::invalid(&format!("people.{name}"), "person names are letters, digits, '-' and '_'"));
            }
            if person.token_sha256.len() != 64 || !person.token_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::invalid(&format!("people.{name}.token_sha256"), "must be 64 hex digits (pglease token new)"));
            }
            if person.roles.is_empty() {
                return Err(ConfigError::invalid(&format!("people.{name}.roles"), "must name at least one role"));
            }
        }
        if self.audit.rotate_bytes < 4096 {
            return Err(ConfigError::invalid("audit.rotate_bytes", "must be at least 4096"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::invalid("log.level", format!("not a valid filter: {:?}", self.log.level)));
        }
        Ok(())
    }
}

impl UpstreamConfig {
    /// Reads the upstream password from where the config says. The value is never logged.
    pub fn password(&self) -> Result<String, ConfigError> {
        read_secret("upstream", self.password_env.as_deref(), self.password_file.as_deref())
    }
}

/// Names of scopes and people: they appear in logins and logs, so keep them plain.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 40 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A person's name: a plain name, or what an identity provider calls them (an email
/// address): letters, digits and `-_.@+`, at most 64 bytes.
pub fn valid_person(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '@', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'+'))
}

impl ScopeConfig {
    /// The databases a grant of the scope may connect to; the first is the default.
    pub fn databases(&self) -> Vec<String> {
        if self.databases.is_empty() { vec![self.database.clone()] } else { self.databases.clone() }
    }

    /// The database a grant of the scope connects to unless the client names another.
    pub fn default_database(&self) -> String {
        self.databases.first().cloned().unwrap_or_else(|| self.database.clone())
    }

    /// Reads the backing role's password. Never logged.
    pub fn password(&self, scope: &str) -> Result<String, ConfigError> {
        read_secret(&format!("scopes.{scope}"), self.password_env.as_deref(), self.password_file.as_deref())
    }
}

fn read_secret(prefix: &str, env: Option<&str>, file: Option<&Path>) -> Result<String, ConfigError> {
    read_named_secret(&format!("{prefix}.password"), env, file)
}

/// A secret from the environment variable `env` or the file `file` (keys `{key}_env` and
/// `{key}_file` in errors).
fn read_named_secret(key: &str, env: Option<&str>, file: Option<&Path>) -> Result<String, ConfigError> {
    if let Some(var) = env {
        return std::env::var(var).map_err(|_| ConfigError::invalid(&format!("{key}_env"), format!("environment variable {var} is not set")));
    }
    let path = file.ok_or_else(|| ConfigError::invalid(&format!("{key}_env"), format!("set {key}_env or {key}_file")))?;
    let key = format!("{key}_file");
    check_secret_file_mode(path).map_err(|m| ConfigError::invalid(&key, m))?;
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::invalid(&key, format!("cannot read {}: {e}", path.display())))?;
    let line = text.lines().next().unwrap_or("").to_owned();
    if line.is_empty() {
        return Err(ConfigError::invalid(&key, format!("{} is empty", path.display())));
    }
    Ok(line)
}

/// Refuses secret files that others can read, as libpq does for `.pgpass`.
fn check_secret_file_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{} must not be readable by group or others (chmod 600)", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [listen]
        addr = "127.0.0.1:6432"
        allow_plaintext = true
        [upstream]
        host = "/tmp"
        user = "app"
        password_env = "X"
        tls = "disable"
    "#;

    #[test]
    fn a_bad_mask_is_refused_naming_its_key() {
        let scope = r#"
        [scopes.support]
        database = "shop"
        role = "support"
        password_env = "X"
        tables = [{ name = "public.customers", allow = ["read"], mask_columns = { ssn = "shuffle" } }]"#;
        let e = err(&format!("{MINIMAL}{scope}"));
        assert!(e.contains("scopes.support.tables[0].mask_columns.ssn") && e.contains("unknown mask"), "{e}");
        let both = scope.replace("mask_columns = { ssn = \"shuffle\" }", "deny_columns = [\"ssn\"], mask_columns = { ssn = \"redact\" }");
        assert!(err(&format!("{MINIMAL}{both}")).contains("denied or masked, not both"));
        Config::parse(&format!("{MINIMAL}{}", scope.replace("shuffle", "partial(0, 4)"))).unwrap();
    }

    #[test]
    fn read_budgets_parse_with_units_and_bad_ones_name_their_key() {
        let scope = |budget: &str| format!("{MINIMAL}\n[scopes.support]\ndatabase = \"shop\"\nrole = \"support\"\npassword_env = \"X\"\n{budget}\n");
        let c = Config::parse(&scope("max_rows_read = 5000\nmax_bytes_read = \"5MB\"")).unwrap();
        assert_eq!((c.scopes["support"].max_rows_read, c.scopes["support"].max_bytes_read.map(|b| b.as_u64())), (Some(5000), Some(5_000_000)));
        let c = Config::parse(&scope("max_bytes_read = \"2GiB\"")).unwrap();
        assert_eq!(c.scopes["support"].max_bytes_read.map(|b| b.as_u64()), Some(2 << 30));
        let c = Config::parse(&scope("max_bytes_read = 4096")).unwrap();
        assert_eq!(c.scopes["support"].max_bytes_read.map(|b| b.as_u64()), Some(4096));
        for (budget, key) in [("max_rows_read = 0", "scopes.support.max_rows_read"), ("max_bytes_read = \"0B\"", "scopes.support.max_bytes_read"), ("max_bytes_read = \"lots\"", "scopes.support.max_bytes_read"), ("max_rows_read = -1", "scopes.support.max_rows_read")] {
            let e = err(&scope(budget));
            assert!(e.contains(key), "{budget}: {e}");
        }
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.listen.max_connections, 1000);
        assert_eq!(c.listen.workers, None);
        assert_eq!(c.upstream.port, 5432);
        assert_eq!(c.listen.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.admin.addr.port(), 9187);
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&MINIMAL.replace("user = \"app\"", "user = \"app\"\nbogus = 1"));
        assert!(e.contains("upstream.bogus") || (e.contains("upstream") && e.contains("bogus")), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = err(&MINIMAL.replace("port = 5432", "").replace("tls = \"disable\"", "tls = \"disable\"\nport = \"x\""));
        assert!(e.contains("upstream.port"), "{e}");
        let e = err(&MINIMAL.replace("tls = \"disable\"", "tls = \"sometimes\""));
        assert!(e.contains("upstream.tls"), "{e}");
        let e = err(&MINIMAL.replace("allow_plaintext = true", "allow_plaintext = true\nhandshake_timeout = \"soon\""));
        assert!(e.contains("listen.handshake_timeout"), "{e}");
    }

    #[test]
    fn cross_key_rules_are_named() {
        let e = err(&MINIMAL.replace("allow_plaintext = true", ""));
        assert!(e.contains("listen.tls_cert"), "{e}");
        let e = err(&MINIMAL.replace("password_env = \"X\"", ""));
        assert!(e.contains("upstream.password_env"), "{e}");
        let e = err(&MINIMAL.replace("host = \"/tmp\"", "host = \"db\"").replace("tls = \"disable\"", "tls = \"verify-full\""));
        assert!(e.contains("upstream.ca_file"), "{e}");
        let e = err(&MINIMAL.replace("tls = \"disable\"", "tls = \"require\""));
        assert!(e.contains("upstream.tls"), "{e}");
        let e = err(&MINIMAL.replace("allow_plaintext = true", "allow_plaintext = true\nmax_message_bytes = 10"));
        assert!(e.contains("listen.max_message_bytes"), "{e}");
        for workers in ["0", "5000"] {
            let e = err(&MINIMAL.replace("allow_plaintext = true", &format!("allow_plaintext = true\nworkers = {workers}")));
            assert!(e.contains("listen.workers") && e.contains("between 1 and"), "{e}");
        }
    }

    #[test]
    fn missing_section_is_named() {
        let e = err("[listen]\naddr = \"127.0.0.1:1\"\nallow_plaintext = true\n");
        assert!(e.contains("upstream"), "{e}");
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let c = Config::parse(include_str!("../config/pglease.toml")).unwrap();
        assert_eq!(c.upstream.tls, UpstreamTls::VerifyFull);
        assert!(c.upstream.password_env.is_some());
    }

    #[test]
    fn missing_files_are_named() {
        // Paths in an empty directory: whatever lies in the working tree does not matter.
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::parse(include_str!("../config/pglease.toml")).unwrap();
        (c.listen.tls_cert, c.listen.tls_key) = (Some(dir.path().join("server.crt")), Some(dir.path().join("server.key")));
        let e = c.check_files().unwrap_err().to_string();
        assert!(e.contains("listen.tls_cert") && e.contains("server.crt"), "{e}");
    }

    #[test]
    fn readable_key_and_secret_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, pw) = (dir.path().join("c.pem"), dir.path().join("k.pem"), dir.path().join("pw"));
        for f in [&cert, &key, &pw] {
            std::fs::write(f, "x\n").unwrap();
        }
        let mut c = Config::parse(include_str!("../config/pglease.toml")).unwrap();
        (c.listen.tls_cert, c.listen.tls_key) = (Some(cert), Some(key.clone()));
        (c.upstream.ca_file, c.upstream.password_env, c.upstream.password_file) = (None, None, Some(pw.clone()));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = c.check_files().unwrap_err().to_string();
        assert!(e.contains("listen.tls_key") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        c.check_files().unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o604)).unwrap();
        let e = c.upstream.password().unwrap_err().to_string();
        assert!(e.contains("upstream.password_file") && e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn control_plane_errors_name_the_key() {
        let base = include_str!("../config/pglease.toml");
        for (section, key) in [
            ("[control_plane]\ndsn = \"host=cp password=x\"\n", "control_plane.dsn"),
            ("[control_plane]\ndsn = \"host=cp sslmode=sometimes\"\n", "control_plane.dsn"),
            ("[control_plane]\ndsn = \"host=cp\"\nreconcile_every = \"10s\"\nstale_after = \"5s\"\n", "control_plane.stale_after"),
            ("[control_plane]\ndsn = \"host=cp\"\npassword_env = \"A\"\npassword_file = \"/b\"\n", "control_plane.password_env"),
            ("[control_plane]\ndsn = \"host=cp\"\nsurprise = 1\n", "surprise"),
        ] {
            let e = Config::parse(&format!("{base}\n{section}")).unwrap_err().to_string();
            assert!(e.contains(key), "{section}: {e}");
        }
        let ok = Config::parse(&format!("{base}\n[control_plane]\ndsn = \"host=cp dbname=pglease\"\n")).unwrap();
        assert_eq!(ok.control_plane.unwrap().stale_after, std::time::Duration::from_secs(30));
    }

    #[test]
    fn identity_errors_name_the_key_and_the_documented_example_parses() {
        let base = include_str!("../config/pglease.toml");
        let oidc = "[identity.oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"pglease\"\nclient_secret_env = \"S\"\n";
        let roles = "[identity.oidc.roles]\napprover = [\"dba\"]\n";
        for (section, key) in [
            (format!("{oidc}{roles}").replace("https://idp", "http://idp"), "identity.oidc.issuer"),
            (format!("{oidc}{roles}").replace("https://idp.example.com", "not a url"), "identity.oidc.issuer"),
            (format!("{oidc}{roles}").replace("client_secret_env = \"S\"\n", ""), "identity.oidc.client_secret_env"),
            (format!("{oidc}client_secret_file = \"/x\"\n{roles}"), "identity.oidc.client_secret_env"),
            (oidc.to_owned(), "identity.oidc.roles"),
            (format!("{oidc}[identity.oidc.roles]\n"), "identity.oidc.roles"),
            (format!("{oidc}refresh_every = \"13h\"\n{roles}"), "identity.oidc.refresh_every"),
            (format!("{oidc}{roles}wizard = [\"x\"]\n"), "wizard"),
        ] {
            let e = Config::parse(&format!("{base}\n{section}")).unwrap_err().to_string();
            assert!(e.contains(key), "{section}: {e}");
        }
        // The commented example in config/pglease.toml, uncommented, is a valid config.
        let start = base.find("# [identity.oidc]\n").unwrap();
        let end = start + base[start..].find("\n\n").unwrap();
        let example: String = base[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .map(|l| format!("{}\n", l.split("   #").next().unwrap().split("  #").next().unwrap().trim_end()))
            .collect();
        let c = Config::parse(&format!("{base}\n{example}")).unwrap_or_else(|e| panic!("{e}\n{example}"));
        let o = c.identity.oidc.unwrap();
        assert_eq!((o.issuer.as_str(), o.person_claim.as_str(), o.refresh_every), ("https://login.example.com/realms/eng", "email", Duration::from_secs(300)));
        assert_eq!(o.roles.approver, ["dba"]);
        let groups: std::collections::BTreeSet<String> = ["dba".to_owned()].into();
        assert_eq!(o.roles.of(&groups), [Role::Approver].into());
    }

    #[test]
    fn person_names_from_an_identity_provider() {
        for ok in ["alice", "alice@example.com", "a.b+c@x.io", "svc_ci-1"] {
            assert!(valid_person(ok), "{ok}");
        }
        for bad in ["", ".alice", "@x", "-x", "alice smith", "a'b", "a\"b", "a;b", &"a".repeat(65)] {
            assert!(!valid_person(bad), "{bad}");
        }
    }

    #[test]
    fn syntax_error_is_reported() {
        let e = err("[listen\n");
        assert!(e.starts_with("config"), "{e}");
    }
}
