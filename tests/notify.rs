//! Notifications against a real HTTP receiver on loopback: signed webhook bodies in order,
//! Slack-shaped bodies, a retry after a 500, and a receiver that is down for 30 s (with a
//! restart of pglease in between) missing nothing.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use common::grants::{ALICE, BOB, EnvOptions, GrantsEnv};
use pglease::config::{NotifyConfig, NotifyKind};
use serde_json::{Value, json};

const SECRET: &str = "webhook-signing-secret";

/// One POST the receiver got: its path, headers, body, and what it answered.
#[derive(Clone, Debug)]
struct Hit {
    path: String,
    headers: HeaderMap,
    body: String,
    status: u16,
}

#[derive(Default)]
struct Receiver {
    hits: Mutex<Vec<Hit>>,
    /// Answer 500 to this many requests first.
    fail_first: AtomicUsize,
}

impl Receiver {
    /// Serves on `addr` (port 0: any) until the test ends; returns the bound address.
    async fn serve(self: &Arc<Self>, addr: SocketAddr) -> SocketAddr {
        let me = self.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: String| {
            let me = me.clone();
            async move {
                let fail = me.fail_first.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
                let status = if fail { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
                me.hits.lock().unwrap().push(Hit { path: uri.path().to_owned(), headers, body, status: status.as_u16() });
                status
            }
        });
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let bound = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        bound
    }

    /// The bodies delivered (2xx) to `path`, in arrival order.
    fn delivered(&self, path: &str) -> Vec<(HeaderMap, Value)> {
        self.hits.lock().unwrap().iter().filter(|h| h.path == path && h.status == 200).map(|h| (h.headers.clone(), serde_json::from_str(&h.body).unwrap())).collect()
    }
}

fn target(name: &str, kind: NotifyKind, url: String, dir: &Path) -> NotifyConfig {
    let secret_file = dir.join(format!("{name}.secret"));
    std::fs::write(&secret_file, SECRET).unwrap();
    std::fs::set_permissions(&secret_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    NotifyConfig {
        name: name.into(),
        kind,
        url: Some(url),
        url_env: None,
        url_file: None,
        secret_env: None,
        secret_file: (kind == NotifyKind::Webhook).then_some(secret_file),
        events: Vec::new(),
        outbox: Some(dir.join(format!("{name}.outbox.jsonl"))),
        links: Some("https://pglease.example".into()),
        ca_file: None,
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// Checks a webhook delivery's signature as a receiver would.
fn verify(headers: &HeaderMap, body: &Value, raw: &str) {
    let ts = header(headers, "pglease-timestamp");
    let expected = format!("sha256={}", pglease::notify::sign(SECRET, ts, raw));
    assert_eq!(header(headers, "pglease-signature"), expected, "signature of {body}");
    assert_eq!(header(headers, "pglease-delivery"), body["id"].as_str().unwrap());
}

/// Alice asks for `scope`; the grant's id.
async fn request(env: &GrantsEnv, scope: &str, reason: &str) -> String {
    let g = env.api(Some(ALICE), "POST", "/grants", json!({"scope": scope, "duration": "20m", "reason": reason})).await.unwrap();
    g["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_are_told_with_signed_webhooks_and_slack_messages_in_order() {
    let receiver = Arc::new(Receiver::default());
    let addr = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let notify = vec![
        target("hook", NotifyKind::Webhook, format!("http://{addr}/hook"), dir.path()),
        target("chat", NotifyKind::Slack, format!("http://{addr}/slack"), dir.path()),
    ];
    // The first two attempts fail: the first message is retried, and nothing overtakes it.
    receiver.fail_first.store(2, Ordering::SeqCst);
    let env = GrantsEnv::start(EnvOptions { notify, ..EnvOptions::default() }).await;
    let first = request(&env, "read", "ticket 1").await;
    env.api(Some(BOB), "POST", &format!("/grants/{first}/approve"), json!({})).await.unwrap();
    let second = request(&env, "write", "ticket 2").await;
    env.api(Some(BOB), "POST", &format!("/grants/{second}/deny"), json!({"reason": "use the runbook"})).await.unwrap();
    env.api(Some(BOB), "POST", &format!("/grants/{first}/revoke"), json!({"reason": "done"})).await.unwrap();

    let hooks = common::eventually(Duration::from_secs(30), || async { Some(receiver.delivered("/hook")).filter(|d| d.len() == 5) }).await.expect("five webhook deliveries");
    let raw: Vec<String> = receiver.hits.lock().unwrap().iter().filter(|h| h.path == "/hook" && h.status == 200).map(|h| h.body.clone()).collect();
    for ((headers, body), raw) in hooks.iter().zip(&raw) {
        verify(headers, body, raw);
    }
    let seen: Vec<(String, String)> = hooks.iter().map(|(_, b)| (b["grant"].as_str().unwrap().to_owned(), b["kind"].as_str().unwrap().to_owned())).collect();
    let expected: Vec<(String, String)> = [(&first, "requested"), (&first, "approved"), (&second, "requested"), (&second, "denied"), (&first, "revoked")]
        .iter()
        .map(|(g, k)| (g.to_string(), k.to_string()))
        .collect();
    assert_eq!(seen, expected, "in the order they happened");
    let requested = &hooks[0].1;
    assert_eq!((requested["user"].as_str(), requested["scope"].as_str(), requested["reason"].as_str()), (Some("alice"), Some("read"), Some("ticket 1")));
    // The grant's page in the console, where an approver decides.
    assert_eq!(requested["links"]["grant"], format!("https://pglease.example/grants/{first}"));
    // The first message failed twice and was then delivered once, with the same id each time.
    let attempts: Vec<Hit> = receiver.hits.lock().unwrap().iter().filter(|h| h.path == "/hook" && h.body.contains(&first) && h.body.contains("\"requested\"")).cloned().collect();
    let ids: std::collections::BTreeSet<&str> = attempts.iter().map(|h| header(&h.headers, "pglease-delivery")).collect();
    assert_eq!(ids.len(), 1, "one message, retried: {attempts:?}");
    assert_eq!(attempts.iter().filter(|h| h.status == 200).count(), 1);
    // No secret in any body.
    assert!(raw.iter().all(|b| !b.contains(SECRET) && !b.contains("verifier")));

    let chat = common::eventually(Duration::from_secs(30), || async { Some(receiver.delivered("/slack")).filter(|d| d.len() == 5) }).await.expect("five Slack messages");
    let text = chat[0].1["text"].as_str().unwrap();
    assert!(text.contains("alice requests *read*") && text.contains(&format!("pglease grant approve {first}")), "{text}");
    assert_eq!(chat[0].1["blocks"][0]["type"], "section");
    assert!(chat[3].1["text"].as_str().unwrap().contains("denied alice's request for *write*: use the runbook"));
    assert!(chat.iter().all(|(h, _)| h.get("pglease-signature").is_none()), "Slack bodies are not signed: the URL is the secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_30_seconds_misses_nothing_even_across_a_restart() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify = vec![target("hook", NotifyKind::Webhook, format!("http://{addr}/hook"), dir.path())];
    let mut env = GrantsEnv::start(EnvOptions { notify, ..EnvOptions::default() }).await;
    // Nothing listens: requests and decisions go through at once all the same.
    let mut ids = Vec::new();
    for n in 0..3 {
        let id = request(&env, "read", &format!("ticket {n}")).await;
        env.api(Some(BOB), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap();
        ids.push(id);
    }
    // pglease restarts meanwhile; what was not delivered is still in the outbox.
    env.stop().await;
    env.boot().await;
    env.api(Some(BOB), "POST", &format!("/grants/{}/revoke", ids[0]), json!({"reason": "after the restart"})).await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let receiver = Arc::new(Receiver::default());
    receiver.serve(addr).await;
    let got = common::eventually(Duration::from_secs(60), || async { Some(receiver.delivered("/hook")).filter(|d| d.len() >= 7) }).await.expect("everything delivered once the receiver is up");
    let seen: Vec<(String, String)> = got.iter().map(|(_, b)| (b["grant"].as_str().unwrap().to_owned(), b["kind"].as_str().unwrap().to_owned())).collect();
    let mut expected = Vec::new();
    for id in &ids {
        expected.push((id.clone(), "requested".to_owned()));
        expected.push((id.clone(), "approved".to_owned()));
    }
    expected.push((ids[0].clone(), "revoked".to_owned()));
    assert_eq!(seen, expected, "all of them, in order, once");
}

#[test]
fn notify_config_errors_name_the_key() {
    let base = include_str!("../config/pglease.toml");
    for (section, key) in [
        ("[[notify]]\nname = \"a\"\nkind = \"webhook\"\nurl = \"http://x/\"\n", "notify[0].secret_env"),
        ("[[notify]]\nname = \"a\"\nkind = \"slack\"\n", "notify[0].url"),
        ("[[notify]]\nname = \"a\"\nkind = \"slack\"\nurl = \"ftp://x/\"\n", "notify[0].url"),
        ("[[notify]]\nname = \"a\"\nkind = \"slack\"\nurl = \"http://x/\"\nevents = [\"lunch\"]\n", "notify[0].events"),
        ("[[notify]]\nname = \"a\"\nkind = \"slack\"\nurl = \"http://x/\"\n[[notify]]\nname = \"a\"\nkind = \"slack\"\nurl = \"http://y/\"\n", "notify[1].name"),
        ("[[notify]]\nname = \"a\"\nkind = \"carrier-pigeon\"\nurl = \"http://x/\"\n", "kind"),
    ] {
        let e = pglease::config::Config::parse(&format!("{base}{section}")).expect_err(section).to_string();
        assert!(e.contains(key), "{section}: {e}");
    }
}

/// "Expiring soon" comes once before a grant's end (half its length for a short grant), then
/// "expired"; a full disk under the audit log is "audit_failing", and its end too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_are_told_before_a_grant_ends_and_when_the_audit_log_fails() {
    let receiver = Arc::new(Receiver::default());
    let addr = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut hook = target("hook", NotifyKind::Webhook, format!("http://{addr}/hook"), dir.path());
    hook.events = vec!["expiring".into(), "expired".into(), "audit_failing".into()];
    let mut env = GrantsEnv::start(EnvOptions { notify: vec![hook], ..EnvOptions::default() }).await;
    let g = env.api(Some(ALICE), "POST", "/grants", json!({"scope": "read", "duration": "4s", "reason": "short"})).await.unwrap();
    let id = g["id"].as_str().unwrap().to_owned();
    env.api(Some(BOB), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap();
    let got = common::eventually(Duration::from_secs(20), || async { Some(receiver.delivered("/hook")).filter(|d| d.len() == 2) }).await.expect("expiring, then expired");
    assert_eq!(got.iter().map(|(_, b)| b["kind"].as_str().unwrap()).collect::<Vec<_>>(), ["expiring", "expired"]);
    assert_eq!(got[0].1["grant"], id.as_str());
    assert!(got[0].1["expires_at"].is_string());

    // The audit log on a full disk: statements are refused, and people are told.
    env.stop().await;
    let _ = std::fs::remove_file(&env.audit_log);
    std::os::unix::fs::symlink("/dev/full", &env.audit_log).unwrap();
    env.boot().await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    assert!(client.simple_query("SELECT 1").await.is_err(), "refused while the log cannot be written");
    let failing = common::eventually(Duration::from_secs(20), || async { receiver.delivered("/hook").into_iter().find(|(_, b)| b["event"] == "audit_failing") }).await.expect("audit_failing sent");
    assert!(failing.1["error"].as_str().unwrap().contains("No space left"), "{}", failing.1);
    std::fs::remove_file(&env.audit_log).unwrap();
    client.simple_query("SELECT 1").await.expect("written again");
    let recovered = common::eventually(Duration::from_secs(20), || async { receiver.delivered("/hook").into_iter().find(|(_, b)| b["event"] == "audit_recovered") }).await;
    assert!(recovered.is_some(), "its recovery sent too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_spends_its_read_budget_is_reported() {
    let receiver = Arc::new(Receiver::default());
    let addr = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut hook = target("hook", NotifyKind::Webhook, format!("http://{addr}/hook"), dir.path());
    hook.events = vec!["read_budget".into()];
    let chat = target("chat", NotifyKind::Slack, format!("http://{addr}/slack"), dir.path());
    let mut env = GrantsEnv::start(EnvOptions { notify: vec![hook, chat], ..EnvOptions::default() }).await;
    env.reload(|c| c.scopes.get_mut("app").unwrap().max_rows_read = Some(1)).await.unwrap();
    let (id, login, password) = env.active_grant("app", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    let e = client.simple_query("SELECT id FROM t").await.unwrap_err();
    assert_eq!(common::sqlstate(&e).as_deref(), Some("53400"), "two rows, a budget of one: {e:?}");

    let got = common::eventually(Duration::from_secs(20), || async { Some(receiver.delivered("/hook")).filter(|d| !d.is_empty()) }).await.expect("read_budget sent");
    assert_eq!(got.len(), 1, "only the event the target asked for");
    let body = &got[0].1;
    assert_eq!((body["kind"].as_str(), body["grant"].as_str(), body["user"].as_str(), body["scope"].as_str()), (Some("read_budget"), Some(id.as_str()), Some("alice"), Some("app")));
    assert_eq!((body["rows_read"].as_u64(), body["max_rows_read"].as_u64()), (Some(1), Some(1)));
    let raw = receiver.hits.lock().unwrap().iter().find(|h| h.path == "/hook" && h.status == 200).unwrap().body.clone();
    verify(&got[0].0, body, &raw);
    let text = common::eventually(Duration::from_secs(20), || async {
        receiver.delivered("/slack").into_iter().map(|(_, b)| b["text"].as_str().unwrap_or_default().to_owned()).find(|t| t.contains("read budget"))
    })
    .await
    .expect("Slack told too");
    assert!(text.contains("alice's grant for *app* used its read budget (1 rows"), "{text}");
}
