//! Load and leaks: many concurrent sessions held through one proxy, and many connect / query /
//! disconnect cycles after which file descriptors and memory are back where they started.
//! Sizes can be raised with PGLEASE_LOAD_SESSIONS and PGLEASE_LOAD_CYCLES; figures are printed.

mod common;

use std::time::{Duration, Instant};

use common::{LOGIN, LOGIN_PASSWORD, ProxyOptions, TestProxy, UPSTREAM_PASSWORD, UPSTREAM_ROLE};
use pglease::cluster::{Cluster, ClusterOptions};

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.clamp(16_384, 1 << 20);
        limit.rlim_max = limit.rlim_max.max(limit.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// A cluster of our own, sized for `sessions` upstream connections.
async fn big_cluster(sessions: usize) -> (Cluster, String) {
    let conf = vec![format!("max_connections = {}", sessions + 50), "shared_buffers = 64MB".into()];
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(ClusterOptions { extra_conf: conf, ..ClusterOptions::default() }).unwrap()).await.unwrap();
    cluster.execute("postgres", &format!("CREATE ROLE {UPSTREAM_ROLE} LOGIN PASSWORD '{UPSTREAM_PASSWORD}'")).await.unwrap();
    cluster.execute("postgres", &format!("CREATE DATABASE load OWNER {UPSTREAM_ROLE}")).await.unwrap();
    (cluster, "load".to_owned())
}

async fn session(proxy: &TestProxy) -> tokio_postgres::Client {
    // Plaintext on loopback: the TLS handshake is covered elsewhere and would only slow the
    // unoptimised test build down.
    proxy.try_connect(LOGIN, LOGIN_PASSWORD, |c| {
        c.ssl_mode(tokio_postgres::config::SslMode::Disable);
    })
    .await
    .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_sessions_are_held_and_cycles_leak_nothing() {
    raise_fd_limit();
    let sessions = env_or("PGLEASE_LOAD_SESSIONS", 2000);
    let cycles = env_or("PGLEASE_LOAD_CYCLES", 20_000);
    let (cluster, database) = big_cluster(sessions).await;
    let options = ProxyOptions {
        allow_plaintext: true,
        max_connections: sessions + 10,
        upstream_port: Some(cluster.port),
        upstream_ca: Some(cluster.ca_file.clone()),
        ..ProxyOptions::default()
    };
    let proxy = TestProxy::start_for(database, options).await;

    // Warm up (allocator arenas, caches), then take the baseline.
    for _ in 0..50 {
        session(&proxy).await.simple_query("SELECT 1").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fds_before, rss_before) = (open_fds(), rss_kib());

    // Connect / query / disconnect cycles, a few at a time.
    let started = Instant::now();
    let mut done = 0;
    while done < cycles {
        let batch = (cycles - done).min(8);
        let mut tasks = Vec::new();
        for _ in 0..batch {
            let proxy_addr = proxy.addr;
            let db = proxy.database.clone();
            tasks.push(tokio::spawn(async move {
                let mut config = tokio_postgres::Config::new();
                config.host("127.0.0.1").port(proxy_addr.port()).user(LOGIN).password(LOGIN_PASSWORD).dbname(&db);
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.expect("cycle connect");
                let conn = tokio::spawn(conn);
                client.simple_query("SELECT 1").await.expect("cycle query");
                drop(client);
                let _ = conn.await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        done += batch;
    }
    let cycle_time = started.elapsed();
    // Sessions end asynchronously after their clients leave; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds() > fds_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (fds_after, rss_after) = (open_fds(), rss_kib());
    println!(
        "{cycles} connect/query/disconnect cycles in {:.1}s: fds {fds_before} -> {fds_after}, RSS {rss_before} -> {rss_after} KiB",
        cycle_time.as_secs_f64()
    );
    assert!(fds_after <= fds_before, "file descriptors leaked: {fds_before} -> {fds_after}");
    assert!(rss_after < rss_before + 32 * 1024, "memory grew by more than 32 MiB: {rss_before} -> {rss_after} KiB");

    // Thousands of concurrent sessions, all usable at once.
    let started = Instant::now();
    let mut held = Vec::with_capacity(sessions);
    let rss_empty = rss_kib();
    while held.len() < sessions {
        let batch = (sessions - held.len()).min(50);
        let opened = futures_util::future::join_all((0..batch).map(|_| session(&proxy))).await;
        held.extend(opened);
    }
    let open_time = started.elapsed();
    let answers = futures_util::future::join_all(held.iter().map(|c| c.simple_query("SELECT 1"))).await;
    assert!(answers.iter().all(Result::is_ok), "every held session answers");
    let live = proxy.proxy.sessions.len();
    assert_eq!(live, sessions, "the proxy holds every session");
    println!(
        "{sessions} concurrent sessions opened in {:.1}s; this process (client and proxy) grew {} KiB ({:.1} KiB per session)",
        open_time.as_secs_f64(),
        rss_kib().saturating_sub(rss_empty),
        rss_kib().saturating_sub(rss_empty) as f64 / sessions as f64
    );
    drop(held);
    drop(proxy);
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}
