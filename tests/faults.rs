//! Failing neighbours: an upstream that restarts, is unreachable or refuses TLS, and a client
//! that vanishes mid-query. Each is answered with a clear error, never a hang, and leaves
//! nothing running upstream.

mod common;

use std::time::{Duration, Instant};

use common::{ProxyOptions, TestProxy, UPSTREAM_PASSWORD, UPSTREAM_ROLE, sqlstate};
use pglease::cluster::{Cluster, ClusterOptions};
use pglease::config::UpstreamTls;

/// A second cluster of our own (the shared one must not restart under other tests), with the
/// upstream role the test proxy logs in as, and a database.
async fn own_cluster(extra_conf: &[&str]) -> (Cluster, String) {
    let cluster = tokio::task::spawn_blocking({
        let extra_conf = extra_conf.iter().map(|s| s.to_string()).collect();
        move || Cluster::start(ClusterOptions { extra_conf, ..ClusterOptions::default() }).unwrap()
    })
    .await
    .unwrap();
    cluster.execute("postgres", &format!("CREATE ROLE {UPSTREAM_ROLE} LOGIN PASSWORD '{UPSTREAM_PASSWORD}'")).await.unwrap();
    cluster.execute("postgres", &format!("CREATE DATABASE faults OWNER {UPSTREAM_ROLE}")).await.unwrap();
    (cluster, "faults".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_restart_ends_sessions_cleanly_and_new_ones_work_at_once() {
    let (mut cluster, database) = own_cluster(&[]).await;
    let options = ProxyOptions { upstream_port: Some(cluster.port), upstream_ca: Some(cluster.ca_file.clone()), ..ProxyOptions::default() };
    let proxy = TestProxy::start_for(database, options).await;
    let client = proxy.connect().await;
    client.simple_query("SELECT 1").await.unwrap();

    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().unwrap();
        cluster
    })
    .await
    .unwrap();

    // The old session: an error (Postgres's own 57P01, relayed, or the closed connection), not a hang.
    let old = tokio::time::timeout(Duration::from_secs(10), client.simple_query("SELECT 1")).await.expect("no hang");
    let e = old.expect_err("the session did not survive the restart");
    assert!(e.is_closed() || sqlstate(&e).as_deref() == Some("57P01"), "{e:?}");
    // A new session works at once.
    let fresh = proxy.connect().await;
    let rows = fresh.simple_query("SELECT 1").await.unwrap();
    assert!(rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("1"))));
    drop(fresh);
    tokio::task::spawn_blocking(move || cluster.stop()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_a_prompt_fatal() {
    let nothing = pglease::cluster::free_port().unwrap();
    let proxy = TestProxy::start_with(ProxyOptions { upstream_port: Some(nothing), ..ProxyOptions::default() }).await;
    let started = Instant::now();
    let e = match tokio::time::timeout(Duration::from_secs(10), proxy.try_connect(common::LOGIN, common::LOGIN_PASSWORD, |_| {})).await.expect("no hang") {
        Ok(_) => panic!("logged in without an upstream"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!e.to_string().contains(UPSTREAM_PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_without_tls_is_refused_when_tls_is_required() {
    let (cluster, database) = own_cluster(&["ssl = off"]).await;
    let options = ProxyOptions { upstream_port: Some(cluster.port), upstream_tls: UpstreamTls::Require, ..ProxyOptions::default() };
    let proxy = TestProxy::start_for(database, options).await;
    let e = match tokio::time::timeout(Duration::from_secs(10), proxy.try_connect(common::LOGIN, common::LOGIN_PASSWORD, |_| {})).await.expect("no hang") {
        Ok(_) => panic!("logged in over a plaintext upstream"),
        Err(e) => e,
    };
    // The client learns the upstream is unusable; why (no TLS) is the operator's to read in
    // the proxy's log, not the client's.
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_query_leaves_nothing_running_upstream() {
    let proxy = TestProxy::start().await;
    let config = proxy.client_config();
    let (client, connection) = config.connect(common::tls_connector()).await.unwrap();
    let connection = tokio::spawn(connection);
    let marker = format!("vanishing_{}", std::process::id());
    let sql = format!("SELECT pg_sleep(60) /* {marker} */");
    let query = tokio::spawn(async move { client.simple_query(&sql).await });
    let direct = proxy.connect_direct().await;
    let count = |marker: &str| {
        let direct = &direct;
        let marker = marker.to_owned();
        async move {
            let n: i64 = direct
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()", &[&marker])
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&marker).await == 0 {
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client vanishes: its socket closes with the query in flight.
    connection.abort();
    query.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&marker).await > 0 {
        assert!(Instant::now() < deadline, "the statement kept running upstream after its client left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
