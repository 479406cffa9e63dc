//! Cost of auditing: pgbench through pglease with no audit (the bare relay), with the audit log
//! in `write` mode, and in `fsync` mode, in the same run, reported as tps and ratios.
//!
//! `cargo bench --bench audit` (needs pgbench; starts its own throwaway cluster).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use pglease::app::{App, BuildOptions, Secrets};
use pglease::audit::Durability;
use pglease::cluster::{Cluster, ClusterOptions};
use pglease::config::*;
use pglease::people::People;
use pglease::tls::generate_dev_certificates;
use tokio::net::TcpListener;

fn pgbench(cluster: &Cluster, args: &[&str], conn: &str, password: &str) -> f64 {
    let out = std::process::Command::new(cluster.bin("pgbench")).args(args).arg(conn).env("PGPASSWORD", password).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{}", text, String::from_utf8_lossy(&out.stderr));
    text.lines().find(|l| l.starts_with("tps")).and_then(|l| l.split_whitespace().nth(2)).and_then(|t| t.parse().ok()).unwrap()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = generate_dev_certificates(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(dir.path().join("c.pem"), &certs.cert_pem).unwrap();
    std::fs::write(dir.path().join("k.pem"), &certs.key_pem).unwrap();
    rt.block_on(cluster.execute("postgres", "CREATE DATABASE bench")).unwrap();
    let socket = cluster.socket_dir().display().to_string();
    let port = cluster.port.to_string();
    let ok = std::process::Command::new(cluster.bin("pgbench"))
        .args(["-i", "-q", "-s", "10", "-h", &socket, "-p", &port, "-U", &cluster.superuser, "bench"])
        .env("PGPASSWORD", &cluster.password)
        .status()
        .unwrap();
    assert!(ok.success());
    let scopes = common::bench_scopes("bench_role");
    let sql = pglease::policy::sql::scope_sql("bench", &scopes["bench"]) + "ALTER ROLE bench_role PASSWORD 'pw';";
    rt.block_on(cluster.execute("bench", &sql)).unwrap();

    let workloads: [(&str, &[&str]); 2] = [("-S -M prepared -c 4", &["-n", "-S", "-M", "prepared", "-c", "4", "-j", "2", "-T", "8"]), ("tpcb -M prepared -c 4", &["-n", "-M", "prepared", "-c", "4", "-j", "2", "-T", "8"])];
    let direct = format!("host={socket} port={port} user={} dbname=bench", cluster.superuser);
    let mut results: Vec<(String, String, f64)> = Vec::new();
    let direct_tls = format!("host=127.0.0.1 port={port} user={} dbname=bench sslmode=require", cluster.superuser);
    for (name, args) in workloads {
        results.push((name.into(), "direct (unix socket, superuser)".into(), pgbench(&cluster, args, &direct, &cluster.password)));
        results.push((name.into(), "direct (TCP + TLS, superuser)".into(), pgbench(&cluster, args, &direct_tls, &cluster.password)));
    }
    for (label, durability) in [("pglease, audit write", Durability::Write), ("pglease, audit fsync", Durability::Fsync)] {
        let config = Config {
            listen: ListenConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
                public_host: None,
                tls_ca: None,
                tls_cert: Some(dir.path().join("c.pem")),
                tls_key: Some(dir.path().join("k.pem")),
                allow_plaintext: false,
                max_connections: 100,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: None,
                max_message_bytes: 64 << 20,
                client_stall_timeout: Duration::from_secs(300),
                shutdown_grace: Duration::from_secs(1),
                workers: None,
            },
            upstream: UpstreamConfig {
                host: "127.0.0.1".into(),
                port: cluster.port,
                user: "bench_role".into(),
                password_env: None,
                password_file: None,
                tls: UpstreamTls::Require,
                ca_file: None,
                server_name: Some("localhost".into()),
                allow_md5: false,
                allow_cleartext: false,
                connect_timeout: Duration::from_secs(5),
            },
            admin: AdminConfig { addr: "127.0.0.1:0".parse().unwrap(), public_url: None },
            log: LogConfig::default(),
            grants: GrantsConfig { store: dir.path().join(format!("grants-{label}.jsonl")), ..GrantsConfig::default() },
            audit: AuditConfig { path: dir.path().join(format!("audit-{:?}.jsonl", durability)), durability, ..AuditConfig::default() },
            scopes: scopes.clone(),
            people: BTreeMap::new(),
            control_plane: None,
            notify: Vec::new(),
            identity: Default::default(),
        };
        let (login, secret, running) = rt.block_on(async {
            let mut people = People::default();
            people.add("bob", &[Role::Approver], &[], "t");
            let secrets = Secrets { upstream: "pw".into(), scopes: [("bench".to_owned(), "pw".to_owned())].into() };
            let app = App::build(&config, secrets, people, BuildOptions::default()).await.unwrap();
            let grants = app.grants.clone();
            let running = app.start(TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap();
            let bob = pglease::people::Principal { person: "bob".into(), roles: [Role::Approver].into(), groups: Default::default() };
            let g = grants.issue(&bob, "alice", "bench", Duration::from_secs(3600), "bench").await.unwrap();
            let alice = pglease::people::Principal { person: "alice".into(), roles: [Role::Engineer].into(), groups: Default::default() };
            let g = grants.take_secret(&alice, &g.grant.id).await.unwrap();
            (g.grant.login, g.secret.unwrap(), running)
        });
        let conn = format!("host=127.0.0.1 port={} user={login} dbname=bench sslmode=require", running.proxy_addr.port());
        for (name, args) in workloads {
            results.push((name.into(), label.into(), pgbench(&cluster, args, &conn, &secret)));
        }
        rt.block_on(running.stop());
    }
    println!("\n{:<24} {:<34} {:>10} {:>12}", "workload", "path", "tps", "vs TLS direct");
    for (w, path, tps) in &results {
        let base = results.iter().find(|(w2, p, _)| w2 == w && p.starts_with("direct (TCP")).map(|r| r.2).unwrap();
        println!("{w:<24} {path:<34} {tps:>10.0} {:>12.2}", tps / base);
    }
    rt.block_on(rotation_stall(dir.path()));
}

/// The slowest append across a rotation of the log (`write` mode, 64 MiB files), against the
/// median append: a rotation must not stall the sessions appending meanwhile.
async fn rotation_stall(dir: &std::path::Path) {
    use pglease::audit::record::Body;
    use pglease::audit::{AuditLog, AuditOptions, ParamLogging};
    let path = dir.join("rotation").join("audit.jsonl");
    let options = AuditOptions { path: path.clone(), durability: Durability::Write, rotate_bytes: 64 << 20, anchor: None, params: ParamLogging::Log, writer: Default::default() };
    let (log, writer) = AuditLog::open(options).unwrap();
    let event = serde_json::json!({"event": "bench", "pad": "x".repeat(300)});
    let mut took = Vec::new();
    while pglease::audit::log::log_files(&path).len() < 2 {
        let started = std::time::Instant::now();
        log.append(Body::Event { event: event.clone() }).await.unwrap();
        took.push(started.elapsed());
    }
    drop(log);
    writer.join().unwrap();
    let worst = took.iter().max().copied().unwrap_or_default();
    took.sort();
    let median = took[took.len() / 2];
    println!("\naudit append across a 64 MiB rotation: {} appends, median {median:?}, worst {worst:?}", took.len());
}
