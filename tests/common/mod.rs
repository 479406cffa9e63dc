//! Test harness: one throwaway Postgres cluster per test binary (TLS and SCRAM on), a fresh
//! database per test, and a real pglease proxy in front of it on a free port.
#![allow(dead_code)]

pub mod browser;
pub mod grants;
pub mod idp;
pub mod raw;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pglease::auth::StaticCredentials;
use pglease::cluster::{Cluster, ClusterOptions};
use pglease::config::{ListenConfig, UpstreamConfig, UpstreamTls};
use pglease::server::Proxy;
use pglease::tls::{ServerTls, generate_dev_certificates};
use pglease::upstream::Upstream;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// The role the proxy logs in as upstream in tests.
pub const UPSTREAM_ROLE: &str = "pglease_test";
pub const UPSTREAM_PASSWORD: &str = "upstream-test-secret";
/// The client login every test proxy knows.
pub const LOGIN: &str = "tester";
pub const LOGIN_PASSWORD: &str = "tester-secret";

pub struct Harness {
    pub cluster: Cluster,
    /// TLS material for the proxy's client side.
    pub certs_dir: PathBuf,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

static HARNESS: OnceCell<Harness> = OnceCell::const_new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

pub async fn harness() -> &'static Harness {
    HARNESS
        .get_or_init(|| async {
            // Every statement Postgres receives is logged, so tests can prove refused ones never arrive.
            let options = ClusterOptions { extra_conf: vec!["log_statement = 'all'".into()], ..ClusterOptions::default() };
            let cluster = tokio::task::spawn_blocking(move || Cluster::start(options))
                .await
                .unwrap()
                .expect("start throwaway Postgres");
            cluster
                .execute("postgres", &format!("CREATE ROLE {UPSTREAM_ROLE} LOGIN CREATEDB PASSWORD '{UPSTREAM_PASSWORD}'"))
                .await
                .unwrap();
            let certs = generate_dev_certificates(&["localhost", "127.0.0.1"]).unwrap();
            let certs_dir = cluster.dir.join("proxy-certs");
            std::fs::create_dir_all(&certs_dir).unwrap();
            let (ca_file, cert_file, key_file) = (certs_dir.join("ca.crt"), certs_dir.join("server.crt"), certs_dir.join("server.key"));
            std::fs::write(&ca_file, certs.ca_pem).unwrap();
            std::fs::write(&cert_file, certs.cert_pem).unwrap();
            std::fs::write(&key_file, certs.key_pem).unwrap();
            // `pglease serve` refuses a key others can read.
            std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            Harness { cluster, certs_dir, ca_file, cert_file, key_file }
        })
        .await
}

/// How a test proxy is set up.
#[derive(Clone)]
pub struct ProxyOptions {
    pub allow_plaintext: bool,
    pub max_connections: usize,
    pub idle_timeout: Option<Duration>,
    pub client_stall_timeout: Duration,
    pub shutdown_grace: Duration,
    pub upstream_tls: UpstreamTls,
    /// Connect upstream over the unix socket instead of TCP.
    pub upstream_unix: bool,
    /// Override the CA used for `verify-full`.
    pub upstream_ca: Option<PathBuf>,
    /// Override the upstream port (another cluster, or nothing listening).
    pub upstream_port: Option<u16>,
    pub handshake_timeout: Duration,
    /// Policy/audit hooks to install (pass-through when None).
    pub hooks: Option<Arc<dyn pglease::session::SessionHooks>>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            allow_plaintext: false,
            max_connections: 100,
            idle_timeout: None,
            client_stall_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(5),
            upstream_tls: UpstreamTls::VerifyFull,
            upstream_unix: false,
            upstream_ca: None,
            upstream_port: None,
            handshake_timeout: Duration::from_secs(10),
            hooks: None,
        }
    }
}

/// A running proxy in front of a fresh database.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub database: String,
    pub proxy: Arc<Proxy>,
    pub shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A fresh database owned by the upstream role.
pub async fn fresh_database() -> String {
    let h = harness().await;
    let name = format!("t{}_{}", std::process::id(), DB_COUNTER.fetch_add(1, Ordering::Relaxed));
    h.cluster.execute("postgres", &format!("CREATE DATABASE {name} OWNER {UPSTREAM_ROLE}")).await.unwrap();
    name
}

impl TestProxy {
    pub async fn start() -> Self {
        Self::start_with(ProxyOptions::default()).await
    }

    pub async fn start_with(options: ProxyOptions) -> Self {
        let database = fresh_database().await;
        Self::start_for(database, options).await
    }

    pub async fn start_for(database: String, options: ProxyOptions) -> Self {
        let h = harness().await;
        let listen = ListenConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            public_host: None,
            tls_ca: None,
            tls_cert: Some(h.cert_file.clone()),
            tls_key: Some(h.key_file.clone()),
            allow_plaintext: options.allow_plaintext,
            max_connections: options.max_connections,
            handshake_timeout: options.handshake_timeout,
            idle_timeout: options.idle_timeout,
            max_message_bytes: 64 << 20,
            client_stall_timeout: options.client_stall_timeout,
            shutdown_grace: options.shutdown_grace,
            workers: None,
        };
        let upstream = UpstreamConfig {
            host: if options.upstream_unix { h.cluster.socket_dir().display().to_string() } else { "127.0.0.1".into() },
            port: options.upstream_port.unwrap_or(h.cluster.port),
            user: UPSTREAM_ROLE.into(),
            password_env: Some("UNUSED_IN_TESTS".into()),
            password_file: None,
            tls: options.upstream_tls,
            ca_file: Some(options.upstream_ca.clone().unwrap_or_else(|| h.cluster.ca_file.clone())),
            server_name: Some("localhost".into()),
            allow_md5: false,
            allow_cleartext: false,
            connect_timeout: Duration::from_secs(5),
        };
        let tls = ServerTls::from_files(&h.cert_file, &h.key_file).unwrap();
        let upstream = Upstream::new(upstream, UPSTREAM_PASSWORD.into(), listen.max_message_bytes).unwrap();
        let credentials = Arc::new(StaticCredentials::new().with_login(LOGIN, LOGIN_PASSWORD));
        let mut proxy = Proxy::new(listen, Some(tls), upstream, credentials);
        if let Some(hooks) = options.hooks.clone() {
            proxy = proxy.with_hooks(hooks);
        }
        let proxy = Arc::new(proxy);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(proxy.clone().run(listener, shutdown.clone()));
        TestProxy { addr, database, proxy, shutdown, task: Some(task) }
    }

    /// libpq-style connection string through the proxy (password not included).
    pub fn conninfo(&self, extra: &str) -> String {
        let h = HARNESS.get().unwrap();
        format!(
            "host=127.0.0.1 port={} user={LOGIN} dbname={} sslmode=verify-full sslrootcert={} {extra}",
            self.addr.port(),
            self.database,
            h.ca_file.display()
        )
    }

    /// A tokio-postgres client through the proxy over TLS (verify-full).
    pub async fn connect(&self) -> tokio_postgres::Client {
        self.try_connect(LOGIN, LOGIN_PASSWORD, |_| {}).await.expect("connect through the proxy")
    }

    /// The tokio-postgres config of a TLS connection through the proxy as the test login.
    pub fn client_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.addr.port())
            .user(LOGIN)
            .password(LOGIN_PASSWORD)
            .dbname(&self.database)
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        config
    }

    pub async fn try_connect(
        &self,
        user: &str,
        password: &str,
        tweak: impl FnOnce(&mut tokio_postgres::Config),
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut config = self.client_config();
        config.user(user).password(password);
        tweak(&mut config);
        let (client, connection) = config.connect(tls_connector()).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A direct superuser connection to the same database, for comparisons.
    pub async fn connect_direct(&self) -> tokio_postgres::Client {
        let h = HARNESS.get().unwrap();
        let (client, connection) = h.cluster.superuser_config(&self.database).connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// libpq connection string straight to Postgres as the superuser (unix socket).
    pub fn direct_conninfo(&self) -> String {
        let h = HARNESS.get().unwrap();
        format!("host={} port={} user={} dbname={}", h.cluster.socket_dir().display(), h.cluster.port, h.cluster.superuser, self.database)
    }

    pub fn superuser_password(&self) -> String {
        HARNESS.get().unwrap().cluster.password.clone()
    }

    /// Stops accepting and drains, like SIGTERM does.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// TLS for tokio-postgres clients, trusting the test CA (and binding the channel).
pub fn tls_connector() -> tokio_postgres_rustls::MakeRustlsConnect {
    tls_connector_trusting(&HARNESS.get().expect("harness started").ca_file)
}

/// TLS for tokio-postgres clients, trusting only the CA certificate(s) in `ca_file`.
pub fn tls_connector_trusting(ca_file: &std::path::Path) -> tokio_postgres_rustls::MakeRustlsConnect {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pglease::tls::load_certs(ca_file).unwrap() {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(pglease::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

/// Path of a PostgreSQL client binary (psql, pgbench).
pub fn pg_bin(name: &str) -> PathBuf {
    HARNESS.get().expect("harness started").cluster.bin(name)
}

/// Runs a client program with the proxy's login in its environment; returns (status, stdout, stderr).
pub async fn run_client(program: &str, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    run_client_with_password(program, args, LOGIN_PASSWORD).await
}

/// Like [`run_client`] with another password (e.g. the superuser's, for direct comparisons).
pub async fn run_client_with_password(program: &str, args: &[&str], password: &str) -> (std::process::ExitStatus, String, String) {
    let out = tokio::process::Command::new(pg_bin(program))
        .args(args)
        .env("PGPASSWORD", password)
        .env("PGCLIENTENCODING", "UTF8")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .env("PSQLRC", "/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The SQLSTATE of a tokio-postgres error, if it came from the server (or the proxy).
/// The whole records of an audit log file, live or not: the live file ends in reserved zeros.
pub fn audit_lines(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines().map(str::to_owned).collect()
}

pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

/// Polls `check` until it returns Some, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether Postgres's own log shows it received a statement containing `marker`.
pub async fn postgres_saw(marker: &str) -> bool {
    let h = harness().await;
    std::fs::read_to_string(h.cluster.dir.join("postgres.log")).unwrap_or_default().contains(marker)
}
