//! `pglease demo`: a throwaway Postgres with TLS and SCRAM, the sample `shop` database, and the
//! proxy in front of it. Runs until SIGINT/SIGTERM, then stops Postgres and cleans up.
//!
//! NOTE: until temporary grants land, the demo issues one login that lives exactly as long as the
//! demo process; the proxy logs in upstream as a role holding the sample schema's privileges.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::StaticCredentials;
use crate::cluster::{Cluster, ClusterOptions};
use crate::config::{ListenConfig, UpstreamConfig, UpstreamTls};
use crate::server::Proxy;
use crate::tls::{ServerTls, generate_dev_certificates};
use crate::upstream::Upstream;

pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub json: bool,
}

/// The sample schema of `PRODUCT.md`, seeded with generated rows.
pub const SHOP_SCHEMA: &str = r#"
CREATE SCHEMA orders;
CREATE TABLE public.customers (id bigint PRIMARY KEY, name text, email text, ssn text);
CREATE TABLE orders.orders (id bigint PRIMARY KEY, customer_id bigint, amount_cents bigint, status text, created_at timestamptz);
CREATE TABLE orders.items (order_id bigint, sku text, qty int);
INSERT INTO public.customers
  SELECT i, 'Customer ' || i, 'customer' || i || '@example.com',
         lpad((i * 7919 % 1000)::text, 3, '0') || '-' || lpad((i % 100)::text, 2, '0') || '-' || lpad((i * 31 % 10000)::text, 4, '0')
  FROM generate_series(1, 2000) i;
INSERT INTO orders.orders
  SELECT i, 1 + (i * 37) % 2000, 100 + (i * 7919) % 100000,
         (ARRAY['new','paid','shipped','delivered','cancelled'])[1 + i % 5],
         timestamptz '2026-01-01 00:00:00+00' + (i || ' minutes')::interval
  FROM generate_series(1, 5000) i;
INSERT INTO orders.items
  SELECT 1 + (i % 5000), 'SKU-' || lpad((i % 500)::text, 4, '0'), 1 + i % 5
  FROM generate_series(1, 10000) i;
ANALYZE;
"#;

const UPSTREAM_ROLE: &str = "pglease_demo";

fn random_secret() -> String {
    use rand::RngCore;
    let mut raw = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let keep = options.dir.is_some();
    let dir = options.dir.clone();
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(ClusterOptions { dir, keep_dir: keep, extra_conf: vec![] }))
        .await?
        .context("start the throwaway PostgreSQL")?;
    let result = serve(&cluster, &options).await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    result
}

async fn serve(cluster: &Cluster, options: &DemoOptions) -> anyhow::Result<()> {
    let upstream_password = random_secret();
    cluster.execute("postgres", "CREATE DATABASE shop").await?;
    cluster.execute("shop", SHOP_SCHEMA).await?;
    let pgbench = std::process::Command::new(cluster.bin("pgbench"))
        .args(["-i", "-q", "-s", "1", "-h"])
        .arg(cluster.socket_dir())
        .args(["-p", &cluster.port.to_string(), "-U", &cluster.superuser, "shop"])
        .env("PGPASSWORD", &cluster.password)
        .output()
        .context("run pgbench -i")?;
    if !pgbench.status.success() {
        anyhow::bail!("pgbench -i failed: {}", String::from_utf8_lossy(&pgbench.stderr));
    }
    cluster
        .execute(
            "shop",
            &format!(
                "CREATE ROLE {UPSTREAM_ROLE} LOGIN PASSWORD '{upstream_password}';
                 GRANT CONNECT ON DATABASE shop TO {UPSTREAM_ROLE};
                 GRANT USAGE ON SCHEMA orders, public TO {UPSTREAM_ROLE};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA orders, public TO {UPSTREAM_ROLE};"
            ),
        )
        .await?;

    // The proxy's own certificate, signed by a CA whose certificate clients may verify against.
    let certs = generate_dev_certificates(&["localhost", "127.0.0.1"])?;
    let cert_dir = cluster.dir.join("proxy-tls");
    std::fs::create_dir_all(&cert_dir)?;
    let (ca_cert, cert, key) = (cert_dir.join("ca.crt"), cert_dir.join("server.crt"), cert_dir.join("server.key"));
    std::fs::write(&ca_cert, &certs.ca_pem)?;
    std::fs::write(&cert, &certs.cert_pem)?;
    std::fs::write(&key, &certs.key_pem)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        // Readable by whoever runs psql with sslrootcert=… (the cluster dir may belong to postgres).
        std::fs::set_permissions(&cluster.dir, std::fs::Permissions::from_mode(0o755))?;
    }

    let listen = ListenConfig {
        addr: options.listen,
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        allow_plaintext: false,
        max_connections: 200,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: None,
        max_message_bytes: 64 << 20,
        shutdown_grace: Duration::from_secs(5),
    };
    let upstream = UpstreamConfig {
        host: "127.0.0.1".into(),
        port: cluster.port,
        user: UPSTREAM_ROLE.into(),
        password_env: None,
        password_file: None,
        tls: UpstreamTls::VerifyFull,
        ca_file: Some(cluster.ca_file.clone()),
        server_name: Some("localhost".into()),
        allow_md5: false,
        allow_cleartext: false,
        connect_timeout: Duration::from_secs(10),
    };
    let login = "demo";
    let login_password = random_secret();
    let credentials = Arc::new(StaticCredentials::new().with_login(login, &login_password));
    let proxy = Arc::new(Proxy::new(
        listen.clone(),
        Some(ServerTls::from_files(&cert, &key)?),
        Upstream::new(upstream, upstream_password.clone(), listen.max_message_bytes)?,
        credentials,
    ));

    let listener = TcpListener::bind(options.listen).await.with_context(|| format!("listen on {}", options.listen))?;
    let admin_listener = TcpListener::bind(options.admin).await.with_context(|| format!("listen on {}", options.admin))?;
    let proxy_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let admin_state = crate::admin::AdminState { metrics: crate::admin::metrics_handle(), sessions: proxy.sessions.clone() };
    let admin = tokio::spawn(crate::admin::serve(admin_listener, admin_state, shutdown.clone()));
    let server = tokio::spawn(proxy.clone().run(listener, shutdown.clone()));

    let psql = format!(
        "psql \"host={} port={} user={login} dbname=shop sslmode=verify-full sslrootcert={}\"",
        proxy_addr.ip(),
        proxy_addr.port(),
        ca_cert.display()
    );
    if options.json {
        let line = serde_json::json!({
            "proxy": proxy_addr.to_string(),
            "admin_url": format!("http://{admin_addr}"),
            "upstream": format!("postgresql://{}:{}@127.0.0.1:{}/shop?sslmode=require", cluster.superuser, cluster.password, cluster.port),
            "database": "shop",
            "ca_cert": ca_cert.display().to_string(),
            "login": login,
            "password": login_password,
            "psql": psql,
        });
        println!("{line}");
    } else {
        println!("pglease demo is up.");
        println!("  proxy:     {proxy_addr} (TLS required; CA certificate {})", ca_cert.display());
        println!("  admin:     http://{admin_addr}/metrics  http://{admin_addr}/healthz");
        println!("  login:     {login}   password: {login_password}   (valid while this demo runs)");
        println!("  connect:   PGPASSWORD={login_password} {psql}");
        println!("  upstream:  postgresql://{}:<superuser password>@127.0.0.1:{}/shop (direct, for comparison)", cluster.superuser, cluster.port);
        println!("Press Ctrl-C to stop; Postgres and its files are removed on exit.");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();

    crate::signals::wait_for_shutdown().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    let _ = server.await;
    let _ = admin.await;
    Ok(())
}
