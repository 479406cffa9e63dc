//! Round-trip cost of the proxy: the same queries directly against Postgres and through
//! pglease (TLS on both client legs, SCRAM), in the same run, so the ratio is meaningful.
//!
//! `cargo bench --bench relay` — starts its own throwaway cluster.

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use pglease::auth::StaticCredentials;
use pglease::cluster::{Cluster, ClusterOptions};
use pglease::config::{ListenConfig, UpstreamConfig, UpstreamTls};
use pglease::server::Proxy;
use pglease::tls::{ServerTls, generate_dev_certificates};
use pglease::upstream::Upstream;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn relay(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = generate_dev_certificates(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(dir.path().join("c.pem"), &certs.cert_pem).unwrap();
    std::fs::write(dir.path().join("k.pem"), &certs.key_pem).unwrap();
    rt.block_on(cluster.execute("postgres", "CREATE ROLE bench LOGIN SUPERUSER PASSWORD 'bench'")).unwrap();
    rt.block_on(cluster.execute("postgres", "CREATE DATABASE bench OWNER bench")).unwrap();

    let listen = ListenConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        public_host: None,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        allow_plaintext: false,
        max_connections: 100,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: None,
        max_message_bytes: 64 << 20,
        client_stall_timeout: Duration::from_secs(300),
        shutdown_grace: Duration::from_secs(1),
        workers: None,
    };
    let upstream = UpstreamConfig {
        host: "127.0.0.1".into(),
        port: cluster.port,
        user: "bench".into(),
        password_env: None,
        password_file: None,
        tls: UpstreamTls::Require,
        ca_file: None,
        server_name: Some("localhost".into()),
        allow_md5: false,
        allow_cleartext: false,
        connect_timeout: Duration::from_secs(5),
    };
    let proxy = Arc::new(Proxy::new(
        listen,
        Some(ServerTls::from_files(&dir.path().join("c.pem"), &dir.path().join("k.pem")).unwrap()),
        Upstream::new(upstream, "bench".into(), 64 << 20).unwrap(),
        Arc::new(StaticCredentials::new().with_login("bench", "bench")),
    ));
    let shutdown = CancellationToken::new();
    let (proxy_port, direct, via) = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(proxy.clone().run(listener, shutdown.clone()));
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").user("bench").password("bench").dbname("bench").ssl_mode(tokio_postgres::config::SslMode::Require);
        let (direct, conn) = config.clone().port(cluster.port).connect(common::tls_trusting(cluster.ca_pem.as_bytes())).await.unwrap();
        tokio::spawn(conn);
        let (via, conn) = config.clone().port(port).connect(common::tls_trusting(certs.ca_pem.as_bytes())).await.unwrap();
        tokio::spawn(conn);
        (port, direct, via)
    });
    let _ = proxy_port;

    let mut group = c.benchmark_group("select_1_prepared");
    group.sample_size(30).measurement_time(Duration::from_secs(5));
    for (name, client) in [("direct", &direct), ("pglease", &via)] {
        let stmt = rt.block_on(client.prepare("SELECT $1::int4")).unwrap();
        group.bench_function(name, |b| b.to_async(&rt).iter(|| async { client.query_one(&stmt, &[&1i32]).await.unwrap() }));
    }
    group.finish();

    let mut group = c.benchmark_group("rows_10k_simple");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    for (name, client) in [("direct", &direct), ("pglease", &via)] {
        group.bench_function(name, |b| b.to_async(&rt).iter(|| async { client.simple_query("SELECT i, repeat('x', 100) FROM generate_series(1, 10000) i").await.unwrap() }));
    }
    group.finish();
    shutdown.cancel();
}

criterion_group!(benches, relay);
criterion_main!(benches);
