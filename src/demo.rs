//! `pglease demo`: a throwaway Postgres with TLS and SCRAM, the sample `shop` database, and the
//! proxy in front of it. Runs until SIGINT/SIGTERM, then stops Postgres and cleans up.
//!
//! With `--instances N` it starts N proxies on one control plane (a database of the same
//! throwaway cluster), on consecutive ports: grants, sessions, revokes and kills are shared.
//!
//! Identities: `alice` (engineer), `bob` (approver, group `dba`), `carol` (auditor), each with
//! a random admin token. Every scope is backed by its own login role with a random password that
//! only the proxy holds.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::app::{App, RunningApp, Secrets};
use crate::cluster::{Cluster, ClusterOptions};
use crate::config::{
    AdminConfig, Config, ControlPlaneConfig, GrantsConfig, ListenConfig, LogConfig, Role, ScopeConfig, UpstreamConfig, UpstreamTls,
};
use crate::grants::GrantService;
use crate::people::People;
use crate::tls::generate_dev_certificates;

pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub json: bool,
    /// Run the printed psql line once through the proxy, then stop (a smoke test for CI).
    pub check: bool,
    /// How many proxy instances (1 to [`MAX_INSTANCES`]); more than one share a control plane.
    pub instances: usize,
    /// Sign-in with an identity provider too (`[identity.oidc]`), next to the static tokens.
    pub identity: crate::config::IdentityConfig,
}

/// The sample schema (the README's demo section), seeded with generated rows.
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

/// The demo's scopes, as a DBA would write them in `pglease.toml` (passwords are filled in by
/// the demo: each backing role gets a random one only the proxy holds).
pub const DEMO_SCOPES: &str = r#"
[orders-read]
description = "read-only access to schema orders"
database = "shop"
role = "pglease_orders_read"
max_duration = "8h"
break_glass = { max_duration = "30m" }
search_path = ["orders"]
row_limit = 1000
statement_timeout = "30s"
tables = [{ name = "orders.*", allow = ["read", "copy-out"] }]

[support]
description = "read customers (ssn masked but its last four digits) and orders"
database = "shop"
role = "pglease_support"
max_duration = "8h"
max_rows_read = 10000
tables = [
  { name = "public.customers", allow = ["read"], mask_columns = { ssn = "partial(0, 4)" } },
  { name = "orders.orders", allow = ["read"] },
]

[orders-write]
description = "read and write schema orders"
database = "shop"
role = "pglease_orders_write"
max_duration = "4h"
search_path = ["orders"]
tables = [{ name = "orders.*", allow = ["read", "insert", "update", "delete", "copy-in", "copy-out"] }]

[bench]
description = "read and write the pgbench tables"
database = "shop"
role = "pglease_bench"
max_duration = "8h"
tables = [{ name = "public.pgbench_*", allow = ["read", "insert", "update", "delete"] }]

[dba]
description = "everything in shop, DDL included"
database = "shop"
role = "pglease_dba"
max_duration = "2h"
approvers = ["dba"]
settings = ["*"]
functions = { allow = ["*"] }
tables = [{ name = "*.*", allow = ["all"] }]
"#;

/// The demo scopes, parsed (with placeholder password sources the demo never reads).
pub fn demo_scopes() -> BTreeMap<String, ScopeConfig> {
    let mut text = String::new();
    for line in DEMO_SCOPES.lines() {
        text.push_str(line);
        text.push('\n');
        if line.starts_with("role = ") {
            text.push_str("password_env = \"PGLEASE_DEMO_UNUSED\"\n");
        }
    }
    toml::from_str(&text).expect("the embedded demo scopes parse")
}

/// How to run this very binary from a shell: `pglease` when that is what PATH finds, its full
/// path otherwise (a fresh clone runs the demo from target/release).
fn pglease_command() -> String {
    let me = std::env::current_exe().ok().and_then(|p| p.canonicalize().ok());
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join("pglease")).find(|p| p.is_file()))
        .unwrap_or_default()
        .and_then(|p| p.canonicalize().ok());
    match (me, on_path) {
        (Some(me), Some(found)) if me == found => "pglease".to_owned(),
        (Some(me), _) => me.display().to_string(),
        (None, _) => "pglease".to_owned(),
    }
}

fn random_secret() -> String {
    use rand::RngCore;
    let mut raw = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    crate::people::hex(&raw)
}

pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    anyhow::ensure!((1..=MAX_INSTANCES).contains(&options.instances), "--instances: {} is not between 1 and {MAX_INSTANCES}", options.instances);
    check_ports(&options)?;
    if let Some(dir) = &options.dir
        && dir.exists()
        && std::fs::read_dir(dir)?.next().is_some()
    {
        anyhow::bail!("--dir {} is not empty; the demo needs an empty or new directory (it removes it on exit)", dir.display());
    }
    let dir = options.dir.clone();
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(ClusterOptions { dir, keep_dir: false, extra_conf: vec![] }))
        .await?
        .context("start the throwaway PostgreSQL")?;
    let result = serve(&cluster, &options).await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    result
}

/// Creates `shop`, its schema and data, the pgbench tables, and one role per scope.
async fn prepare_database(cluster: &Cluster) -> anyhow::Result<HashMap<String, String>> {
    cluster.execute("postgres", "CREATE DATABASE shop").await?;
    cluster.execute("shop", SHOP_SCHEMA).await?;
    let pgbench = tokio::process::Command::new(cluster.bin("pgbench"))
        .args(["-i", "-q", "-s", "1", "-h"])
        .arg(cluster.socket_dir())
        .args(["-p", &cluster.port.to_string(), "-U", &cluster.superuser, "shop"])
        .env("PGPASSWORD", &cluster.password)
        .output()
        .await
        .context("run pgbench -i")?;
    if !pgbench.status.success() {
        anyhow::bail!("pgbench -i failed: {}", String::from_utf8_lossy(&pgbench.stderr));
    }
    let mut passwords = HashMap::new();
    // The database-wide part: nobody but the scope roles' own grants reaches shop.
    let mut sql = String::from("REVOKE ALL ON DATABASE shop FROM PUBLIC; REVOKE CREATE ON SCHEMA public FROM PUBLIC;");
    for (name, scope) in demo_scopes() {
        let password = random_secret();
        // Exactly what `pglease scope sql` prints, then the secret only the proxy will hold.
        sql.push_str(&crate::policy::sql::scope_sql(&name, &scope));
        sql.push_str(&format!("ALTER ROLE {} PASSWORD '{password}';\n", scope.role));
        passwords.insert(name, password);
    }
    cluster.execute("shop", &sql).await?;
    Ok(passwords)
}

/// The database, in the demo's own cluster, that several instances share as their control plane.
pub const CONTROL_PLANE_DB: &str = "pglease_control_plane";

/// The most instances `--instances` starts (each takes two ports and a few connections).
pub const MAX_INSTANCES: usize = 9;

/// One running instance of the demo.
struct Instance {
    /// `demo-1`, `demo-2`, …: its `control_plane.instance_id`.
    id: String,
    grants: Arc<GrantService>,
    running: RunningApp,
    audit_log: PathBuf,
}

impl Instance {
    fn admin_url(&self) -> String {
        format!("http://{}", self.running.admin_addr)
    }
}

fn instance_id(n: usize) -> String {
    format!("demo-{n}")
}

/// The address instance `n` (from 1) listens on: the next ports after the given one, or again
/// port 0 (a free port each) when that is what was asked for.
fn nth_addr(base: SocketAddr, n: usize, flag: &str) -> anyhow::Result<SocketAddr> {
    if base.port() == 0 {
        return Ok(base);
    }
    let wanted = usize::from(base.port()) + n - 1;
    let port = u16::try_from(wanted).ok().with_context(|| format!("{flag} {base}: instance {} would need port {wanted}", instance_id(n)))?;
    Ok(SocketAddr::new(base.ip(), port))
}

/// Before anything starts: every instance's two ports exist and no two instances' collide.
fn check_ports(options: &DemoOptions) -> anyhow::Result<()> {
    let mut taken = std::collections::HashSet::new();
    for n in 1..=options.instances {
        for addr in [nth_addr(options.listen, n, "--listen")?, nth_addr(options.admin, n, "--admin")?] {
            anyhow::ensure!(
                options.instances == 1 || addr.port() == 0 || taken.insert(addr.port()),
                "--listen {} and --admin {}: with --instances {} the proxies take the ports from {} on and the admin APIs those from {} on, and port {} would be taken twice",
                options.listen,
                options.admin,
                options.instances,
                options.listen.port(),
                options.admin.port(),
                addr.port()
            );
        }
    }
    Ok(())
}

/// Instance `n`'s config: the base one with its own ports, audit log and instance id.
fn instance_config(base: &Config, options: &DemoOptions, n: usize, work: &Path) -> anyhow::Result<Config> {
    let mut config = base.clone();
    config.listen.addr = nth_addr(options.listen, n, "--listen")?;
    config.admin.addr = nth_addr(options.admin, n, "--admin")?;
    if n > 1 {
        config.audit.path = work.join(format!("audit-{}.jsonl", instance_id(n)));
        config.audit.anchor = Some(work.join(format!("audit-{}.anchor", instance_id(n))));
    }
    if let Some(cp) = config.control_plane.as_mut() {
        cp.instance_id = Some(instance_id(n));
    }
    Ok(config)
}

/// The control-plane database in the demo's cluster, and how the instances reach it (as the
/// cluster's superuser, its password in a file only this user may read).
async fn prepare_control_plane(cluster: &Cluster, work: &Path) -> anyhow::Result<ControlPlaneConfig> {
    cluster.execute("postgres", &format!("CREATE DATABASE {CONTROL_PLANE_DB}")).await?;
    let password_file = work.join("control-plane.password");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&password_file)?;
        f.write_all(cluster.password.as_bytes())?;
    }
    let quoted = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    // Over the cluster's unix socket, as Postgres's own local tools connect: TLS would add
    // nothing on the same host, and the socket still asks for the password (SCRAM).
    Ok(ControlPlaneConfig {
        dsn: format!(
            "host={} port={} user={} dbname={CONTROL_PLANE_DB} sslmode=disable",
            quoted(&cluster.socket_dir().display().to_string()),
            cluster.port,
            quoted(&cluster.superuser),
        ),
        instance_id: None,
        password_env: None,
        password_file: Some(password_file),
        // The defaults of `[control_plane]`.
        reconcile_every: crate::config::default_reconcile_every(),
        stale_after: crate::config::default_stale_after(),
    })
}

/// The demo's identities, the same on every instance (each instance holds its own copy).
fn demo_people(tokens: &BTreeMap<&str, String>) -> People {
    let mut people = People::default();
    people.add("alice", &[Role::Engineer], &[], &tokens["alice"]);
    people.add("bob", &[Role::Approver], &["dba"], &tokens["bob"]);
    people.add("carol", &[Role::Auditor], &[], &tokens["carol"]);
    people
}

async fn start_instance(config: &Config, n: usize, count: usize, secrets: Secrets, people: People) -> anyhow::Result<Instance> {
    // With one instance, errors read as they always have; with several, they name the instance.
    let which = if count > 1 { format!(" (instance {})", instance_id(n)) } else { String::new() };
    let app = App::build(config, secrets, people, Default::default()).await?;
    let grants = app.grants.clone();
    let (listen, admin) = (config.listen.addr, config.admin.addr);
    let listener = TcpListener::bind(listen).await.with_context(|| format!("--listen: cannot listen on {listen}{which}"))?;
    let admin_listener = TcpListener::bind(admin).await.with_context(|| format!("--admin: cannot listen on {admin}{which}"))?;
    let running = app.start(listener, admin_listener)?;
    Ok(Instance { id: instance_id(n), grants, running, audit_log: config.audit.path.clone() })
}

async fn serve(cluster: &Cluster, options: &DemoOptions) -> anyhow::Result<()> {
    let count = options.instances;
    let scope_passwords = prepare_database(cluster).await?;

    // The proxy's own certificate, signed by a CA whose certificate clients may verify against.
    let certs = generate_dev_certificates(&["localhost", "127.0.0.1"])?;
    let work = cluster.dir.join("pglease");
    std::fs::create_dir_all(&work)?;
    let (ca_cert, cert, key) = (work.join("ca.crt"), work.join("server.crt"), work.join("server.key"));
    std::fs::write(&ca_cert, &certs.ca_pem)?;
    std::fs::write(&cert, &certs.cert_pem)?;
    std::fs::write(&key, &certs.key_pem)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        // Readable by whoever runs psql with sslrootcert=… (the cluster dir belongs to postgres).
        std::fs::set_permissions(&cluster.dir, std::fs::Permissions::from_mode(0o755))?;
    }
    // One instance keeps its grants in a file, as `serve` does by default; several share them
    // (and their sessions) in a control plane of their own in the demo's cluster.
    let control_plane = if count > 1 { Some(prepare_control_plane(cluster, &work).await?) } else { None };

    let base = Config {
        listen: ListenConfig {
            addr: options.listen,
            public_host: None,
            tls_ca: Some(ca_cert.clone()),
            tls_cert: Some(cert),
            tls_key: Some(key),
            allow_plaintext: false,
            max_connections: 200,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_message_bytes: 64 << 20,
            client_stall_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(5),
            workers: None,
        },
        upstream: UpstreamConfig {
            host: "127.0.0.1".into(),
            port: cluster.port,
            user: cluster.superuser.clone(),
            password_env: None,
            password_file: None,
            tls: UpstreamTls::VerifyFull,
            ca_file: Some(cluster.ca_file.clone()),
            server_name: Some("localhost".into()),
            allow_md5: false,
            allow_cleartext: false,
            connect_timeout: Duration::from_secs(10),
        },
        admin: AdminConfig { addr: options.admin, public_url: None },
        log: LogConfig::default(),
        grants: GrantsConfig { store: work.join("grants.jsonl"), ..GrantsConfig::default() },
        audit: crate::config::AuditConfig { path: work.join("audit.jsonl"), anchor: Some(work.join("audit.anchor")), ..Default::default() },
        scopes: demo_scopes(),
        people: BTreeMap::new(),
        control_plane,
        notify: Vec::new(),
        identity: {
            // Sign-ins are throwaway like the rest.
            crate::config::IdentityConfig { logins_file: work.join("logins.json"), ..options.identity.clone() }
        },
    };
    let tokens: BTreeMap<&str, String> = ["alice", "bob", "carol"].into_iter().map(|p| (p, format!("plt_{}", random_secret()))).collect();

    // Every instance started is stopped again, whatever happens after.
    let mut instances = Vec::with_capacity(count);
    let result = async {
        for n in 1..=count {
            let config = instance_config(&base, options, n, &work)?;
            // NOTE: the default upstream login (the superuser) is never used for client sessions:
            // every grant has a scope, and scoped sessions log in as the scope's role or not at all.
            let secrets = Secrets { upstream: cluster.password.clone(), scopes: scope_passwords.clone() };
            instances.push(start_instance(&config, n, count, secrets, demo_people(&tokens)).await?);
        }
        present(cluster, options, &instances, &tokens, &ca_cert).await
    }
    .await;
    futures_util::future::join_all(instances.into_iter().map(|i| i.running.stop())).await;
    result
}

/// Issues the banner's grant, prints how to connect, then runs the check or waits for a signal.
async fn present(cluster: &Cluster, options: &DemoOptions, instances: &[Instance], tokens: &BTreeMap<&str, String>, ca_cert: &Path) -> anyhow::Result<()> {
    let first = &instances[0];
    let (proxy_addr, admin_url) = (first.running.proxy_addr, first.admin_url());

    // A fresh orders-read grant for alice, issued by bob, for the banner.
    let bob = crate::people::Principal { person: "bob".into(), roles: [Role::Approver].into(), groups: ["dba".to_owned()].into() };
    let issued = first.grants.issue(&bob, "alice", "orders-read", Duration::from_secs(3600), "demo: first look at the orders").await?;
    // Bob never sees the secret: alice takes it (`pglease grant secret ID` as alice).
    let alice = crate::people::Principal { person: "alice".into(), roles: [Role::Engineer].into(), groups: Default::default() };
    let taken = first.grants.take_secret(&alice, &issued.grant.id).await?;
    let secret = taken.secret.clone().unwrap_or_default();
    // The other instances hear of it within milliseconds (NOTIFY); reading the control plane
    // now makes the banner true the moment it is printed.
    for other in &instances[1..] {
        other.grants.refresh().await.with_context(|| format!("instance {}: read the control plane", other.id))?;
    }
    let pglease = pglease_command();
    let conninfo_at = |addr: SocketAddr| {
        format!("host={} port={} user={} dbname=shop sslmode=verify-full sslrootcert={}", addr.ip(), addr.port(), taken.grant.login, ca_cert.display())
    };
    let psql_at = |addr: SocketAddr| format!("psql \"{}\"", conninfo_at(addr));
    let psql = psql_at(proxy_addr);

    if options.json {
        let listed: Vec<serde_json::Value> = instances
            .iter()
            .map(|i| {
                serde_json::json!({
                    "id": i.id,
                    "proxy": i.running.proxy_addr.to_string(),
                    "admin_url": i.admin_url(),
                    "audit_log": i.audit_log.display().to_string(),
                    "psql": psql_at(i.running.proxy_addr),
                })
            })
            .collect();
        let line = serde_json::json!({
            "proxy": proxy_addr.to_string(),
            "admin_url": admin_url,
            "tokens": tokens,
            "upstream": format!("postgresql://{}:{}@127.0.0.1:{}/shop?sslmode=require", cluster.superuser, cluster.password, cluster.port),
            "database": "shop",
            "audit_log": first.audit_log.display().to_string(),
            "ca_cert": ca_cert.display().to_string(),
            "grant": { "id": taken.grant.id, "login": taken.grant.login, "password": secret, "psql": psql },
            "instances": listed,
        });
        println!("{line}");
    } else {
        if instances.len() == 1 {
            println!("pglease demo is up: proxy {proxy_addr} (TLS required), admin API {admin_url}");
        } else {
            println!("pglease demo is up: {} instances on one control plane (database {CONTROL_PLANE_DB}), TLS required", instances.len());
            for i in instances {
                println!("  {}  proxy {}  admin API {}", i.id, i.running.proxy_addr, i.admin_url());
            }
            println!("Grants and sessions are shared: a grant, a revoke or a session kill on any instance reaches them all.");
        }
        println!();
        println!("A 1-hour orders-read grant for alice (issued by bob) is active. Connect with:");
        println!();
        println!("  PGPASSWORD={secret} {psql}");
        if instances.len() > 1 {
            let ports: Vec<String> = instances[1..].iter().map(|i| i.running.proxy_addr.port().to_string()).collect();
            println!("  (the same login works through every instance: port={} …)", ports.join(", port="));
        }
        println!();
        println!("Ask for more with the admin API (tokens below), e.g.:");
        println!("  export PGLEASE_ADMIN_URL={admin_url}");
        println!("  PGLEASE_ADMIN_TOKEN={} {pglease} grant request --scope orders-write --for 30m --reason \"fix order 42\"", tokens["alice"]);
        println!("  PGLEASE_ADMIN_TOKEN={} {pglease} grant approve <id>", tokens["bob"]);
        println!();
        println!("Tokens: alice (engineer) {}  bob (approver, dba) {}  carol (auditor) {}", tokens["alice"], tokens["bob"], tokens["carol"]);
        println!("Web console: {admin_url}/ (sign in with a token above)");
        if let Some(oidc) = &options.identity.oidc {
            println!("Or sign in with {}: {pglease} login --admin-url {admin_url}", oidc.issuer);
        }
        println!("Audit log: {}   CA certificate: {}", first.audit_log.display(), ca_cert.display());
        if instances.len() > 1 {
            println!("(each instance writes its own audit log next to it: audit-demo-2.jsonl, …)");
        }
        println!("Press Ctrl-C to stop; Postgres and every file of the demo are removed on exit.");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();

    if options.check {
        // What a newcomer does next: paste the line. Through TLS, SCRAM, the policy and the
        // audit, and with several instances through each of them with the same grant.
        for i in instances {
            let out = tokio::process::Command::new(cluster.bin("psql"))
                .args([conninfo_at(i.running.proxy_addr).as_str(), "-X", "-At", "-c", "SELECT count(*) FROM orders.orders"])
                .env("PGPASSWORD", &secret)
                .output()
                .await?;
            let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let through = if instances.len() == 1 { "pglease".to_owned() } else { format!("{} ({})", i.id, i.running.proxy_addr) };
            anyhow::ensure!(out.status.success() && !said.is_empty(), "demo check: psql through {through} failed: {}", String::from_utf8_lossy(&out.stderr));
            println!("demo check: psql through {through} counted {said} orders");
        }
        return Ok(());
    }
    crate::signals::wait_for_shutdown().await;
    tracing::info!("shutting down");
    Ok(())
}
