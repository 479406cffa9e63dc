//! Stock clients through the proxy (psql with its meta-commands and `\copy`, pgbench in all
//! three query modes), upstream TLS modes and transports, and the proxy's operations:
//! graceful shutdown, idle timeout, back-pressure, metrics.

mod common;

use std::time::Duration;

use common::raw::{Raw, query};
use common::{ProxyOptions, TestProxy, run_client, run_client_with_password};
use pglease::config::UpstreamTls;

#[tokio::test]
async fn psql_meta_commands_match_direct() {
    let proxy = TestProxy::start().await;
    let client = proxy.connect().await;
    client
        .batch_execute(
            "CREATE TABLE public.notes (id serial primary key, body text); CREATE SCHEMA shop; CREATE TABLE shop.orders (id bigint primary key, customer text not null, amount numeric(10,2));
             CREATE INDEX ON shop.orders (customer); CREATE VIEW shop.big AS SELECT * FROM shop.orders WHERE amount > 100;
             CREATE FUNCTION shop.double(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2';
             INSERT INTO shop.orders SELECT i, 'c' || (i % 10), i * 1.5 FROM generate_series(1, 100) i;",
        )
        .await
        .unwrap();
    let password = proxy.superuser_password();
    for meta in ["\\d", "\\dt shop.*", "\\d shop.orders", "\\di shop.*", "\\dv shop.*", "\\df shop.*", "\\dn", "\\l", "\\du", "\\dx", "SELECT customer, sum(amount) FROM shop.orders GROUP BY 1 ORDER BY 1"] {
        let (ok, via, err) = run_client("psql", &["-X", "-d", &proxy.conninfo(""), "-c", meta]).await;
        assert!(ok.success(), "{meta} through the proxy: {err}");
        let (ok, direct, err) = run_client_with_password("psql", &["-X", "-d", &proxy.direct_conninfo(), "-c", meta], &password).await;
        assert!(ok.success(), "{meta} direct: {err}");
        assert_eq!(via, direct, "{meta}");
        assert!(!via.trim().is_empty(), "{meta} printed something");
    }
}

#[tokio::test]
async fn psql_copy_to_and_from_files() {
    let proxy = TestProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    let output = dir.path().join("out.csv");
    let rows: String = (1..=500).map(|i| format!("{i},name {i},\"quoted, {i}\"\n")).collect();
    std::fs::write(&input, &rows).unwrap();
    let script = format!(
        "CREATE TABLE t (id int, name text, note text);\n\\copy t FROM '{}' WITH (FORMAT csv)\n\\copy (SELECT * FROM t ORDER BY id) TO '{}' WITH (FORMAT csv)\nSELECT count(*) FROM t;",
        input.display(),
        output.display()
    );
    let script_file = dir.path().join("s.sql");
    std::fs::write(&script_file, script).unwrap();
    let (ok, stdout, stderr) = run_client("psql", &["-X", "-v", "ON_ERROR_STOP=1", "-tA", "-d", &proxy.conninfo(""), "-f", script_file.to_str().unwrap()]).await;
    assert!(ok.success(), "{stderr}");
    assert!(stdout.contains("COPY 500"), "{stdout}");
    assert!(stdout.trim_end().ends_with("500"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), rows);
}

#[tokio::test]
async fn pgbench_runs_in_every_query_mode() {
    let proxy = TestProxy::start().await;
    let conn = proxy.conninfo("");
    let (ok, _, stderr) = run_client("pgbench", &["-i", "-q", "-s", "1", &conn]).await;
    assert!(ok.success(), "pgbench -i: {stderr}");
    for mode in ["simple", "extended", "prepared"] {
        let (ok, stdout, stderr) = run_client("pgbench", &["-n", "-M", mode, "-c", "4", "-j", "2", "-t", "100", &conn]).await;
        assert!(ok.success(), "pgbench -M {mode}: {stderr}");
        assert!(stdout.contains("number of transactions actually processed: 400/400"), "-M {mode}: {stdout}");
        assert!(stdout.contains("number of failed transactions: 0"), "-M {mode}: {stdout}");
    }
    // The writes really happened upstream.
    let direct = proxy.connect_direct().await;
    let n: i64 = direct.query_one("SELECT count(*) FROM pgbench_history", &[]).await.unwrap().get(0);
    assert_eq!(n, 1200);
}

#[tokio::test]
async fn every_upstream_tls_mode_and_the_unix_socket_work() {
    let database = common::fresh_database().await;
    for (tls, unix) in [(UpstreamTls::Disable, false), (UpstreamTls::Prefer, false), (UpstreamTls::Require, false), (UpstreamTls::VerifyFull, false), (UpstreamTls::Disable, true)] {
        let proxy = TestProxy::start_for(database.clone(), ProxyOptions { upstream_tls: tls, upstream_unix: unix, ..Default::default() }).await;
        let client = proxy.connect().await;
        let row = client.query_one("SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)", &[]).await.unwrap();
        let upstream_ssl: bool = row.get(0);
        let expect = matches!(tls, UpstreamTls::Prefer | UpstreamTls::Require | UpstreamTls::VerifyFull) && !unix;
        assert_eq!(upstream_ssl, expect, "{tls:?} unix={unix}");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn verify_full_refuses_an_upstream_signed_by_another_ca() {
    let h = common::harness().await;
    let other = pglease::tls::generate_dev_certificates(&["localhost"]).unwrap();
    let other_ca = h.certs_dir.join("other-ca.crt");
    std::fs::write(&other_ca, other.ca_pem).unwrap();
    let proxy = TestProxy::start_with(ProxyOptions { upstream_ca: Some(other_ca), ..Default::default() }).await;
    let e = proxy.try_connect(common::LOGIN, common::LOGIN_PASSWORD, |_| {}).await.expect_err("refused");
    assert_eq!(common::sqlstate(&e).as_deref(), Some("08006"), "{e:?}");
    // The client learns nothing of the proxy's upstream address or credentials.
    let message = e.as_db_error().unwrap().message().to_owned();
    assert_eq!(message, "pglease could not connect to the upstream database");
}

#[tokio::test]
async fn shutdown_ends_idle_sessions_at_once_and_busy_ones_after_the_grace_period() {
    let proxy = TestProxy::start_with(ProxyOptions { shutdown_grace: Duration::from_millis(500), ..Default::default() }).await;
    let mut idle = Raw::login(proxy.addr, &proxy.database).await;
    let mut busy = Raw::login(proxy.addr, &proxy.database).await;
    busy.send(&query("SELECT pg_sleep(60)")).await;
    let direct = proxy.connect_direct().await;
    common::eventually(Duration::from_secs(10), || async {
        let n: i64 = direct.query_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'", &[]).await.unwrap().get(0);
        (n == 1).then_some(())
    })
    .await
    .expect("sleep running");
    let addr = proxy.addr;
    let stop = tokio::spawn(proxy.stop());

    let idle_end = idle.until_closed().await;
    assert_eq!(idle_end.last().map(|m| m.code()), Some("57P01".to_owned()), "{idle_end:?}");
    let busy_end = busy.until_closed().await;
    let fatal = busy_end.iter().find(|m| m.tag == b'E' && m.field(b'S').as_deref() == Some("FATAL")).expect("a FATAL");
    assert_eq!(fatal.code(), "57P01");
    assert!(fatal.field(b'M').unwrap().contains("shutting down"));
    tokio::time::timeout(Duration::from_secs(20), stop).await.unwrap().unwrap();
    // The upstream backend is gone too: its statement was cancelled and its session closed.
    let left = common::eventually(Duration::from_secs(10), || async {
        let n: i64 = direct.query_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'", &[]).await.unwrap().get(0);
        (n == 0).then_some(())
    })
    .await;
    assert!(left.is_some(), "upstream backend ended");
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn idle_sessions_time_out() {
    let proxy = TestProxy::start_with(ProxyOptions { idle_timeout: Some(Duration::from_millis(300)), ..Default::default() }).await;
    let mut raw = Raw::login(proxy.addr, &proxy.database).await;
    // A statement longer than the idle timeout is not idleness.
    raw.send(&query("SELECT pg_sleep(1)")).await;
    let answer = raw.until_ready().await;
    assert!(answer.iter().all(|m| m.tag != b'E'), "{answer:?}");
    let end = raw.until_closed().await;
    assert_eq!(end.last().map(|m| m.code()), Some("57P05".to_owned()));
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_client_that_stops_reading_does_not_grow_proxy_memory_and_is_ended_after_the_stall_limit() {
    let stall = Duration::from_secs(5);
    let proxy = TestProxy::start_with(ProxyOptions { client_stall_timeout: stall, ..Default::default() }).await;
    let mut raw = Raw::login(proxy.addr, &proxy.database).await;
    let before = rss_kib();
    // About 2 GB of rows; the client never reads them.
    raw.send(&query("SELECT repeat('x', 1000) FROM generate_series(1, 2000000)")).await;
    let direct = proxy.connect_direct().await;
    // Back-pressure reaches Postgres: its backend waits to write to the (blocked) proxy.
    let blocked = common::eventually(Duration::from_secs(30), || async {
        let row = direct
            .query_opt("SELECT wait_event FROM pg_stat_activity WHERE query LIKE 'SELECT repeat%' AND wait_event = 'ClientWrite'", &[])
            .await
            .unwrap();
        row.map(|_| ())
    })
    .await;
    assert!(blocked.is_some(), "the upstream backend is blocked writing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "proxy memory grew by {grown} KiB");
    assert_eq!(proxy.proxy.sessions.len(), 1, "held, not dropped, before the stall limit");

    // After the stall limit the session is ended and its statement cancelled: the backend that
    // was blocked writing is gone, not left holding its snapshot.
    let stalled_at = std::time::Instant::now();
    let ended = common::eventually(Duration::from_secs(60), || async {
        let left: i64 = direct.query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT repeat%'", &[]).await.unwrap().get(0);
        (left == 0 && proxy.proxy.sessions.is_empty()).then_some(())
    })
    .await;
    assert!(ended.is_some(), "the stalled session and its backend end");
    eprintln!("stalled session ended {:?} after it was seen blocked (limit {stall:?})", stalled_at.elapsed());
    drop(raw);
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    // The recorder is process-global; `pglease serve` installs it before accepting clients.
    let handle = pglease::admin::metrics_handle();
    let proxy = TestProxy::start().await;
    let client = proxy.connect().await;
    client.simple_query("SELECT 1").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = pglease::admin::AdminState { metrics: handle, sessions: proxy.proxy.sessions.clone(), api: None };
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(pglease::admin::serve(listener, state, shutdown.clone()));
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let health = get("/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"sessions\":1"), "{health}");
    let metrics = get("/metrics").await;
    for name in ["pglease_connections_accepted_total", "pglease_sessions_active", "pglease_query_duration_seconds_bucket", "pglease_messages_total"] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn direct_tls_with_alpn_is_accepted() {
    let proxy = TestProxy::start().await;
    let h = common::harness().await;
    let mut roots = rustls::RootCertStore::empty();
    for c in pglease::tls::load_certs(&h.ca_file).unwrap() {
        roots.add(c).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(pglease::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut raw = Raw::from_io(Box::new(tls));
    raw.send(&common::raw::startup_packet(3 << 16, &[("user", common::LOGIN), ("database", &proxy.database)])).await;
    raw.scram(common::LOGIN_PASSWORD).await.unwrap();
    raw.until_ready().await;
    raw.send(&query("SELECT 1")).await;
    assert_eq!(raw.until_ready().await.len(), 4);
}
