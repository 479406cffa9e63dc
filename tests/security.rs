//! Security checks that cut across features: secrets never show in logs or metrics, and the
//! client listener speaks TLS 1.2 or newer only. (API tokens and roles, the login throttle and
//! readable key files are covered in grants.rs and the config unit tests.)

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::grants::{BOB, EnvOptions, GrantsEnv};

/// Everything logged in this process, at every level, in memory, once `on` (the test's own
/// setup SQL, which sets the backing roles' passwords, is not the proxy's to log).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>, Arc<AtomicBool>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.1.load(Ordering::SeqCst) {
            self.0.lock().unwrap().extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_or_metrics() {
    let captured = Captured::default();
    let writer = captured.clone();
    // The filter the pglease binary uses, turned all the way up (the admin client is in-process).
    tracing_subscriber::fmt().with_env_filter(pglease::logging::filter("trace")).with_writer(move || writer.clone()).with_ansi(false).init();

    let mut env = GrantsEnv::start(EnvOptions::default()).await;
    // Capture from a fresh start of the proxy on: role checks, upstream logins, grants.
    captured.1.store(true, Ordering::SeqCst);
    env.stop().await;
    env.boot().await;
    let (_, login, password) = env.active_grant("write", "30m").await;
    // A good login, a statement, a wrong password, an API call with a wrong token.
    let client = env.connect(&login, &password).await.unwrap();
    client.simple_query("SELECT count(*) FROM t").await.unwrap();
    let wrong = "wrong-secret-7d1f0c";
    assert!(env.connect(&login, wrong).await.is_err());
    let bad_token = "tok-not-a-real-one-93b2";
    assert!(env.api(Some(bad_token), "GET", "/grants", serde_json::json!({})).await.is_err());
    env.api(Some(BOB), "GET", "/grants", serde_json::json!({})).await.unwrap();
    let metrics = {
        let url = format!("{}/metrics", env.admin_url);
        tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().into_body().read_to_string().unwrap()).await.unwrap()
    };
    drop(client);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains(&login), "the capture works: the login is logged");
    assert!(metrics.contains("pglease_"), "the metrics endpoint answered");
    // Handles the audit writer and sessions look up once and keep are live ones.
    for name in ["pglease_audit_records_total", "pglease_audit_write_seconds", "pglease_messages_total", "pglease_query_duration_seconds"] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let mut secrets = vec![password.as_str(), wrong, bad_token, BOB];
    let backing: Vec<String> = env.backing_passwords();
    secrets.extend(backing.iter().map(String::as_str));
    for secret in secrets {
        if let Some(at) = logs.find(secret) {
            panic!("a secret appears in the logs: {secret}: …{}…", &logs[at.saturating_sub(300)..(at + 100).min(logs.len())]);
        }
        assert!(!metrics.contains(secret), "a secret appears in /metrics: {secret}");
    }
}

/// `openssl s_client -starttls postgres` with one protocol version; true if the handshake worked.
fn handshake_with(port: u16, version_flag: &str) -> bool {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-starttls", "postgres", "-connect", &format!("127.0.0.1:{port}"), version_flag])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains("Cipher is") && !text.contains("Cipher is (NONE)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_1_2_and_newer_are_accepted() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let port = env.proxy_addr.port();
    let (a, b, c, d) = tokio::task::spawn_blocking(move || {
        (handshake_with(port, "-tls1_3"), handshake_with(port, "-tls1_2"), handshake_with(port, "-tls1_1"), handshake_with(port, "-tls1"))
    })
    .await
    .unwrap();
    assert!(a && b, "TLS 1.3 and 1.2 work");
    assert!(!c && !d, "TLS 1.1 and 1.0 are refused");
}
