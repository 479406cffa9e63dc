//! A full pglease (proxy, grant service, admin API) in front of a fresh database, with scopes
//! backed by real roles and the people alice (engineer), bob (approver, dba) and carol (auditor).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pglease::app::{App, RunningApp, Secrets};
use pglease::config::*;
use pglease::events::MemorySink;
use pglease::people::People;

pub const ALICE: &str = "tok-alice";
pub const BOB: &str = "tok-bob";
pub const CAROL: &str = "tok-carol";
pub const DAVE: &str = "tok-dave";

pub struct GrantsEnv {
    pub database: String,
    pub running: Option<RunningApp>,
    pub proxy_addr: SocketAddr,
    pub admin_url: String,
    pub store: PathBuf,
    pub audit_log: PathBuf,
    pub audit_anchor: PathBuf,
    pub events: Arc<MemorySink>,
    pub grants: Option<Arc<pglease::grants::GrantService>>,
    config: Config,
    secrets: BTreeMap<String, String>,
    _dir: tempfile::TempDir,
}

#[derive(Clone)]
pub struct EnvOptions {
    pub warn_before: Vec<Duration>,
    pub failures_before_delay: u32,
    /// Also copy the audit log into a table of the database `<db>_audit`.
    pub audit_pg: bool,
    /// The `app` scope reaches a second database, `<db>_2`, with its own `public.t`.
    pub second_database: bool,
    /// Grants live in a control-plane database, `<db>_cp`, so that more instances can share them.
    pub control_plane: bool,
    /// …on this cluster instead of the test cluster (which it must not share: tests stop it).
    pub control_plane_cluster: Option<ControlPlaneAt>,
    /// `control_plane.reconcile_every` and `stale_after` (3 s and 30 s by default).
    pub control_plane_timing: Option<(Duration, Duration)>,
    /// Notification targets (their outboxes default to the env's directory).
    pub notify: Vec<NotifyConfig>,
    /// `listen.public_host`.
    pub public_host: Option<String>,
    /// `[identity]`: sign-in with an identity provider.
    pub identity: pglease::config::IdentityConfig,
}

/// Where a control-plane cluster of a test's own listens.
#[derive(Clone)]
pub struct ControlPlaneAt {
    pub port: u16,
    pub superuser: String,
    pub password: String,
    pub ca_file: PathBuf,
}

impl ControlPlaneAt {
    pub fn of(cluster: &pglease::cluster::Cluster) -> Self {
        Self { port: cluster.port, superuser: cluster.superuser.clone(), password: cluster.password.clone(), ca_file: cluster.ca_file.clone() }
    }
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            warn_before: vec![],
            failures_before_delay: 100,
            audit_pg: false,
            second_database: false,
            control_plane: false,
            control_plane_cluster: None,
            control_plane_timing: None,
            notify: Vec::new(),
            public_host: None,
            identity: Default::default(),
        }
    }
}

impl GrantsEnv {
    pub async fn start(options: EnvOptions) -> GrantsEnv {
        let h = super::harness().await;
        let database = super::fresh_database().await;
        let dir = tempfile::tempdir().unwrap();
        // Roles are cluster-wide: name them after the database.
        let role = |scope: &str| format!("{database}_{scope}");
        let db = &database;
        let scopes: BTreeMap<String, ScopeConfig> = toml::from_str(&format!(
            r#"
            [read]
            database = "{db}"
            role = "{read}"
            password_env = "UNUSED"
            max_duration = "1h"
            break_glass = {{ max_duration = "10m" }}
            row_limit = 3
            statement_timeout = "20s"
            tables = [{{ name = "public.t", allow = ["read", "copy-out"] }}]
            [write]
            database = "{db}"
            role = "{write}"
            password_env = "UNUSED"
            max_duration = "1h"
            tables = [{{ name = "public.t", allow = ["read", "insert", "update", "delete", "copy-in"] }}]
            [dba]
            database = "{db}"
            role = "{dba}"
            password_env = "UNUSED"
            max_duration = "1h"
            approvers = ["dba"]
            settings = ["*"]
            functions = {{ allow = ["*"] }}
            tables = [{{ name = "*.*", allow = ["all"] }}]
            [support]
            database = "{db}"
            role = "{support}"
            password_env = "UNUSED"
            max_duration = "1h"
            tables = [{{ name = "public.people", allow = ["read"], deny_columns = ["ssn"] }}]
            [app]
            {app_databases}
            role = "{app}"
            password_env = "UNUSED"
            max_duration = "1h"
            settings = ["jit", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout", "search_path"]
            tables = [{{ name = "public.t", allow = ["read", "insert", "update", "delete", "copy-in", "copy-out"] }}, {{ name = "app.items", allow = ["read"] }}]
            [masked]
            database = "{db}"
            role = "{masked}"
            password_env = "UNUSED"
            max_duration = "1h"
            tables = [
              {{ name = "public.people", allow = ["read", "copy-out"], mask_columns = {{ ssn = "partial(0, 4)", name = "redact" }} }},
              {{ name = "public.cards", allow = ["read"], mask_columns = {{ number = "hash" }} }},
              {{ name = "public.tickets", allow = ["read", "update", "delete", "copy-out"], row_filter = "region = 'eu' OR owner = {{{{person}}}}" }},
            ]
            [leaky]
            database = "{db}"
            role = "{leaky}"
            password_env = "UNUSED"
            max_duration = "1h"
            tables = [{{ name = "public.t", allow = ["read"] }}]
            "#,
            read = role("read"),
            write = role("write"),
            dba = role("dba"),
            support = role("support"),
            leaky = role("leaky"),
            masked = role("masked"),
            app = role("app"),
            app_databases = if options.second_database { format!("databases = [\"{db}\", \"{db}_2\"]") } else { format!("database = \"{db}\"") },
        ))
        .unwrap();
        if options.second_database {
            h.cluster.execute("postgres", &format!("CREATE DATABASE {database}_2")).await.unwrap();
            h.cluster.execute(&format!("{database}_2"), "CREATE TABLE public.t (id int); INSERT INTO t VALUES (2002); CREATE SCHEMA app; CREATE TABLE app.items (id int, name text);").await.unwrap();
        }
        h.cluster
            .execute(
                &database,
                "CREATE TABLE public.t (id int); INSERT INTO t VALUES (1), (2);
                 CREATE TABLE public.people (id int, name text, ssn text); INSERT INTO people VALUES (1, 'ann', '111-11-1111'), (2, 'bo', '222-22-2222');
                 CREATE TABLE public.tickets (id int, region text, owner text);
                 INSERT INTO tickets VALUES (1, 'eu', 'x'), (2, 'us', 'alice'), (3, 'us', 'bob'), (4, 'eu', 'y');
                 CREATE TABLE public.cards (id int, person int, number text);
                 INSERT INTO cards VALUES (1, 1, '4111111111111111'), (2, 2, '5500000000000004'), (3, 2, '4111111111111111');
                 CREATE TYPE public.mood AS ENUM ('sad', 'happy');
                 CREATE SCHEMA app; CREATE TABLE app.items (id int, name text); INSERT INTO app.items VALUES (1, 'widget');",
            )
            .await
            .unwrap();
        // Each role exactly as `pglease scope sql` describes it, plus its password.
        let mut secrets = BTreeMap::new();
        let mut sql = String::new();
        for (name, scope) in &scopes {
            sql.push_str(&pglease::policy::sql::scope_sql(name, scope));
            let password = format!("pw-{}", scope.role);
            sql.push_str(&format!("ALTER ROLE \"{}\" PASSWORD '{password}';\n\\connect \"{database}\"\n", scope.role));
            secrets.insert(name.clone(), password);
        }
        // …except the leaky one, which can read more than its scope says.
        sql.push_str(&format!("GRANT SELECT ON public.people TO \"{}\";", role("leaky")));
        // A scope with several databases has a section per database after psql's \connect.
        let mut target = database.clone();
        let mut section = String::new();
        for line in sql.lines().chain(std::iter::once("\\connect \"\"")) {
            if let Some(next) = line.strip_prefix("\\connect ") {
                h.cluster.execute(&target, &section).await.unwrap_or_else(|e| panic!("{e:#}"));
                section.clear();
                target = next.trim_matches('"').to_owned();
            } else {
                section.push_str(line);
                section.push('\n');
            }
        }

        let cp = options.control_plane_cluster.clone().unwrap_or_else(|| ControlPlaneAt::of(&h.cluster));
        let config = Config {
            listen: ListenConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
                public_host: options.public_host.clone(),
                tls_ca: Some(h.ca_file.clone()),
                tls_cert: Some(h.cert_file.clone()),
                tls_key: Some(h.key_file.clone()),
                allow_plaintext: false,
                max_connections: 100,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: None,
                max_message_bytes: 64 << 20,
                client_stall_timeout: Duration::from_secs(300),
                shutdown_grace: Duration::from_secs(2),
                workers: None,
            },
            upstream: UpstreamConfig {
                host: "127.0.0.1".into(),
                port: h.cluster.port,
                user: super::UPSTREAM_ROLE.into(),
                password_env: None,
                password_file: None,
                tls: UpstreamTls::VerifyFull,
                ca_file: Some(h.cluster.ca_file.clone()),
                server_name: Some("localhost".into()),
                allow_md5: false,
                allow_cleartext: false,
                connect_timeout: Duration::from_secs(5),
            },
            admin: AdminConfig { addr: "127.0.0.1:0".parse().unwrap(), public_url: None },
            log: LogConfig::default(),
            grants: GrantsConfig {
                store: dir.path().join("grants.jsonl"),
                warn_before: options.warn_before.clone(),
                events_log: None,
                failures_before_delay: options.failures_before_delay,
            },
            scopes,
            people: BTreeMap::new(),
            control_plane: options.control_plane.then(|| ControlPlaneConfig {
                dsn: format!(
                    "host=127.0.0.1 port={} user={} dbname={database}_cp sslmode=verify-full sslrootcert={} connect_timeout=2",
                    cp.port,
                    cp.superuser,
                    cp.ca_file.display()
                ),
                password_env: None,
                password_file: Some(dir.path().join("control-plane.password")),
                instance_id: None,
                reconcile_every: options.control_plane_timing.map_or(Duration::from_secs(3), |t| t.0),
                stale_after: options.control_plane_timing.map_or(Duration::from_secs(30), |t| t.1),
            }),
            notify: options.notify.clone(),
            identity: {
                let mut identity = options.identity.clone();
                if identity.logins_file == pglease::config::IdentityConfig::default().logins_file {
                    identity.logins_file = dir.path().join("logins.json");
                }
                identity
            },
            audit: AuditConfig {
                path: dir.path().join("audit.jsonl"),
                anchor: Some(dir.path().join("audit.anchor")),
                postgres: options.audit_pg.then(|| AuditPostgresConfig { dsn_env: "UNUSED".into(), table: "audit.records".into() }),
                ..AuditConfig::default()
            },
        };
        if options.control_plane {
            let password = cp.password.clone();
            let mut admin = tokio_postgres::Config::new();
            admin.host("127.0.0.1").port(cp.port).user(&cp.superuser).password(&password).dbname("postgres");
            let (client, conn) = admin.connect(super::tls_connector_trusting(&cp.ca_file)).await.unwrap();
            tokio::spawn(conn);
            client.batch_execute(&format!("CREATE DATABASE {database}_cp")).await.unwrap();
            let pw = dir.path().join("control-plane.password");
            std::fs::write(&pw, format!("{password}\n")).unwrap();
            std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        }
        if options.audit_pg {
            h.cluster.execute("postgres", &format!("CREATE DATABASE {database}_audit")).await.unwrap();
            h.cluster.execute(&format!("{database}_audit"), "CREATE SCHEMA audit").await.unwrap();
        }
        let store = config.grants.store.clone();
        let events = Arc::new(MemorySink::default());
        let mut env = GrantsEnv {
            database,
            running: None,
            proxy_addr: "127.0.0.1:0".parse().unwrap(),
            admin_url: String::new(),
            store,
            audit_log: config.audit.path.clone(),
            audit_anchor: config.audit.anchor.clone().unwrap(),
            events,
            grants: None,
            config,
            secrets,
            _dir: dir,
        };
        env.boot().await;
        env
    }

    /// (Re)starts the proxy from the same config and store.
    pub async fn boot(&mut self) {
        let app = self.build().await.expect("app builds");
        self.grants = Some(app.grants.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = app.start(listener, admin).unwrap();
        self.proxy_addr = running.proxy_addr;
        self.admin_url = format!("http://{}", running.admin_addr);
        self.running = Some(running);
    }

    /// One more instance on the same config (and control plane), on ports of its own:
    /// (proxy address, admin URL, the running app).
    pub async fn another_instance(&self) -> (SocketAddr, String, RunningApp) {
        self.another_instance_with(|_| {}).await
    }

    /// One more instance, on a copy of the config edited by `edit`.
    pub async fn another_instance_with(&self, edit: impl FnOnce(&mut Config)) -> (SocketAddr, String, RunningApp) {
        static INSTANCES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(2);
        let mut config = self.config.clone();
        // An audit log of its own: one writer per log (pglease locks it).
        let n = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        config.audit.path = self._dir.path().join(format!("audit-{n}.jsonl"));
        config.audit.anchor = Some(self._dir.path().join(format!("audit-{n}.anchor")));
        edit(&mut config);
        let app = self.build_from(&config).await.expect("another instance builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = app.start(listener, admin).unwrap();
        (running.proxy_addr, format!("http://{}", running.admin_addr), running)
    }

    pub async fn build(&self) -> anyhow::Result<App> {
        self.build_from(&self.config).await
    }

    async fn build_from(&self, config: &Config) -> anyhow::Result<App> {
        let secrets = Secrets { upstream: super::UPSTREAM_PASSWORD.into(), scopes: self.secrets.clone().into_iter().collect() };
        let people = Self::people();
        let h = super::harness().await;
        let audit_pg_dsn = self.config.audit.postgres.as_ref().map(|_| {
            format!("host={} port={} user={} password={} dbname={}_audit sslmode=disable", h.cluster.socket_dir().display(), h.cluster.port, h.cluster.superuser, h.cluster.password, self.database)
        });
        let options = pglease::app::BuildOptions { store: None, event_sinks: vec![self.events.clone()], skip_role_check: false, audit_pg_dsn };
        App::build(config, secrets, people, options).await
    }

    /// Applies an edited copy of the config to the running proxy, as SIGHUP does.
    pub async fn reload(&mut self, edit: impl FnOnce(&mut Config)) -> anyhow::Result<pglease::reload::ReloadReport> {
        let mut next = self.config.clone();
        edit(&mut next);
        let running = self.running.as_ref().expect("running");
        let report = running.reloader.reload(next.clone(), self.secrets.clone().into_iter().collect(), Self::people()).await?;
        self.config = next;
        Ok(report)
    }

    fn people() -> People {
        let mut people = People::default();
        people.add("alice", &[Role::Engineer], &[], ALICE);
        people.add("bob", &[Role::Approver], &["dba"], BOB);
        people.add("carol", &[Role::Auditor], &[], CAROL);
        people.add("dave", &[Role::Approver], &[], DAVE);
        people
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        // Nothing of the stopped instance stays alive here (its outboxes are locked while it is).
        self.grants = None;
    }

    /// Calls the admin API as the holder of `token`; returns (HTTP-ish status, JSON).
    pub async fn api(&self, token: Option<&str>, method: &str, path: &str, body: serde_json::Value) -> Result<serde_json::Value, String> {
        let client = pglease::cli::ApiClient::new(&self.admin_url, token.map(str::to_owned));
        let (method, path) = (method.to_owned(), path.to_owned());
        tokio::task::spawn_blocking(move || if method == "GET" { client.get(&path) } else { client.post(&path, body) })
            .await
            .unwrap()
            .map_err(|e| e.to_string())
    }

    /// Has bob issue a grant for alice, who then takes its secret; returns (id, login, password).
    pub async fn active_grant(&self, scope: &str, duration: &str) -> (String, String, String) {
        let g = self.api(Some(BOB), "POST", "/grants/issue", serde_json::json!({"user": "alice", "scope": scope, "duration": duration, "reason": "test"})).await.unwrap();
        assert!(g.get("password").is_none(), "the issuer never sees the secret: {g}");
        let id = g["id"].as_str().unwrap().to_owned();
        let g = self.api(Some(ALICE), "POST", &format!("/grants/{id}/secret"), serde_json::json!({})).await.unwrap();
        (id, g["login"].as_str().unwrap().to_owned(), g["password"].as_str().unwrap().to_owned())
    }

    /// A tokio-postgres connection through the proxy with a grant's login.
    pub async fn connect(&self, login: &str, password: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.connect_db(login, password, &self.database).await
    }

    pub async fn connect_db(&self, login: &str, password: &str, database: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.connect_at(self.proxy_addr, login, password, database).await
    }

    /// …through the instance listening at `proxy` (one of [`GrantsEnv::another_instance`]'s).
    pub async fn connect_at(&self, proxy: SocketAddr, login: &str, password: &str, database: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(proxy.port()).user(login).password(password).dbname(database).ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, connection) = config.connect(super::tls_connector()).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// The backing roles' passwords (for checks that they never leak).
    pub fn backing_passwords(&self) -> Vec<String> {
        self.secrets.values().cloned().collect()
    }

    /// Direct superuser connection to the same database.
    pub async fn direct(&self) -> tokio_postgres::Client {
        let h = super::harness().await;
        let (client, connection) = h.cluster.superuser_config(&self.database).connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }
}

impl Drop for GrantsEnv {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.shutdown.cancel();
        }
    }
}

