//! Temporary grants end to end: the admin API and CLI, logging in with a grant through the real
//! proxy, and access ending — including for connections already open — at expiry, revocation
//! and session kill.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::grants::{ALICE, BOB, CAROL, DAVE, EnvOptions, GrantsEnv};
use common::raw::{Raw, query, startup_packet};
use common::sqlstate;
use pglease::events::Event;
use serde_json::json;

async fn env() -> GrantsEnv {
    GrantsEnv::start(EnvOptions::default()).await
}

/// Logs in with the raw client as a grant's login.
async fn raw_login(env: &GrantsEnv, login: &str, password: &str) -> Raw {
    let mut raw = Raw::tls(env.proxy_addr).await;
    raw.send(&startup_packet(3 << 16, &[("user", login), ("database", &env.database)])).await;
    raw.scram(password).await.unwrap_or_else(|e| panic!("login refused: {e:?}"));
    raw.until_ready().await;
    raw
}

#[tokio::test]
async fn a_grant_works_only_once_approved_and_never_with_a_wrong_secret() {
    let env = env().await;
    let g = env.api(Some(ALICE), "POST", "/grants", json!({"scope": "read", "duration": "30m", "reason": "look at t"})).await.unwrap();
    for key in ["id", "user", "scope", "login", "password", "status", "expires_at", "psql"] {
        assert!(g.get(key).is_some(), "{key} in {g}");
    }
    assert_eq!(g["status"], "pending");
    assert!(g["psql"].as_str().unwrap().contains(&format!("user={}", g["login"].as_str().unwrap())));
    assert!(!g["psql"].as_str().unwrap().contains(g["password"].as_str().unwrap()), "psql line has no password");
    let (id, login, password) = (g["id"].as_str().unwrap(), g["login"].as_str().unwrap(), g["password"].as_str().unwrap());

    // Pending: refused exactly like a wrong password or an unknown login.
    let e = env.connect(login, password).await.err().unwrap();
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
    let pending_message = e.as_db_error().unwrap().message().replace(login, "<login>");
    let unknown = env.connect("nobody.g00000000", password).await.err().unwrap();
    assert_eq!(unknown.as_db_error().unwrap().message().replace("nobody.g00000000", "<login>"), pending_message);

    // Nobody approves their own request; an auditor cannot approve; the dba group is not needed here.
    assert!(env.api(Some(ALICE), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap_err().contains("403"));
    assert!(env.api(Some(CAROL), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap_err().contains("403"));
    let approved = env.api(Some(BOB), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap();
    assert_eq!(approved["status"], "active");
    assert_eq!(approved["decided_by"], "bob");

    let client = env.connect(login, password).await.unwrap();
    let n: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    // The upstream session is stamped with the person and grant, and runs as the scope's role.
    let row = client.query_one("SELECT application_name, current_user::text FROM pg_stat_activity WHERE pid = pg_backend_pid()", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), format!("pglease alice {id}"));
    assert_eq!(row.get::<_, String>(1), format!("{}_read", env.database));

    // A wrong secret for an active login, and another database, are refused the same way.
    assert_eq!(sqlstate(&env.connect(login, "wrong").await.err().unwrap()).as_deref(), Some("28P01"));
    assert_eq!(sqlstate(&env.connect_db(login, password, "postgres").await.err().unwrap()).as_deref(), Some("28P01"));
    // Approving twice is a conflict.
    assert!(env.api(Some(BOB), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap_err().contains("409"));
}

#[tokio::test]
async fn denied_grants_never_work_and_scope_rules_are_enforced() {
    let env = env().await;
    let g = env.api(Some(ALICE), "POST", "/grants", json!({"scope": "read", "duration": "10m", "reason": "x"})).await.unwrap();
    let id = g["id"].as_str().unwrap();
    let denied = env.api(Some(BOB), "POST", &format!("/grants/{id}/deny"), json!({"reason": "not now"})).await.unwrap();
    assert_eq!(denied["status"], "denied");
    assert_eq!(sqlstate(&env.connect(g["login"].as_str().unwrap(), g["password"].as_str().unwrap()).await.err().unwrap()).as_deref(), Some("28P01"));

    // Longer than the scope's max_duration.
    let e = env.api(Some(ALICE), "POST", "/grants", json!({"scope": "read", "duration": "2h", "reason": "x"})).await.unwrap_err();
    assert!(e.contains("at most 1h") && e.contains("400"), "{e}");
    // A reason is mandatory; unknown scopes are refused.
    assert!(env.api(Some(ALICE), "POST", "/grants", json!({"scope": "read", "duration": "1m", "reason": " "})).await.unwrap_err().contains("400"));
    assert!(env.api(Some(ALICE), "POST", "/grants", json!({"scope": "nope", "duration": "1m", "reason": "x"})).await.unwrap_err().contains("400"));
    // The dba scope needs an approver from group dba: dave is an approver but not in it.
    let g = env.api(Some(ALICE), "POST", "/grants", json!({"scope": "dba", "duration": "10m", "reason": "x"})).await.unwrap();
    let id = g["id"].as_str().unwrap();
    let e = env.api(Some(DAVE), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap_err();
    assert!(e.contains("403") && e.contains("dba"), "{e}");
    env.api(Some(BOB), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap();
    // An approver cannot issue a grant to themself.
    let e = env.api(Some(BOB), "POST", "/grants/issue", json!({"user": "bob", "scope": "read", "duration": "10m", "reason": "x"})).await.unwrap_err();
    assert!(e.contains("403"), "{e}");
    // An engineer cannot request for someone else.
    let e = env.api(Some(ALICE), "POST", "/grants", json!({"scope": "read", "duration": "10m", "reason": "x", "user": "carol"})).await.unwrap_err();
    assert!(e.contains("403"), "{e}");
}

#[tokio::test]
async fn api_calls_need_a_valid_token_and_the_right_role() {
    let env = env().await;
    for token in [None, Some("wrong-token")] {
        let e = env.api(token, "GET", "/grants", json!({})).await.unwrap_err();
        assert!(e.contains("401"), "{e}");
    }
    assert!(env.api(Some(ALICE), "GET", "/sessions", json!({})).await.unwrap_err().contains("403"));
    assert!(env.api(Some(CAROL), "POST", "/sessions/1/kill", json!({})).await.unwrap_err().contains("403"));
    assert!(env.api(Some(CAROL), "POST", "/grants", json!({"scope": "read", "duration": "1m", "reason": "x"})).await.unwrap_err().contains("403"));
    assert!(env.api(Some(CAROL), "GET", "/sessions", json!({})).await.is_ok());
    assert_eq!(env.api(Some(ALICE), "GET", "/scopes", json!({})).await.unwrap().as_array().unwrap().len(), 7);
    // Engineers see only their own grants.
    env.active_grant("read", "10m").await; // alice's
    env.api(Some(BOB), "POST", "/grants/issue", json!({"user": "carol", "scope": "read", "duration": "10m", "reason": "x"})).await.unwrap();
    assert_eq!(env.api(Some(ALICE), "GET", "/grants", json!({})).await.unwrap().as_array().unwrap().len(), 1);
    assert_eq!(env.api(Some(CAROL), "GET", "/grants", json!({})).await.unwrap().as_array().unwrap().len(), 2);
}

/// Opens a busy, an idle and an idle-in-transaction session on a grant.
async fn three_sessions(env: &GrantsEnv, login: &str, password: &str) -> [Raw; 3] {
    let mut busy = raw_login(env, login, password).await;
    busy.send(&query("SELECT pg_sleep(3600)")).await;
    let idle = raw_login(env, login, password).await;
    let mut in_tx = raw_login(env, login, password).await;
    in_tx.send(&query("BEGIN; INSERT INTO t VALUES (99)")).await;
    let answer = in_tx.until_ready().await;
    assert_eq!(answer.last().unwrap().body, b"T", "in a transaction");
    let direct = env.direct().await;
    common::eventually(Duration::from_secs(10), || async {
        let n: i64 = direct.query_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(3600)' AND state = 'active'", &[]).await.unwrap().get(0);
        (n == 1).then_some(())
    })
    .await
    .expect("sleep running");
    [busy, idle, in_tx]
}

/// Reads until the connection closes; returns the FATAL and when it arrived.
async fn fatal_of(mut raw: Raw) -> (common::raw::Msg, Instant) {
    let messages = raw.until_closed().await;
    let at = Instant::now();
    let fatal = messages.into_iter().rev().find(|m| m.tag == b'E' && m.field(b'S').as_deref() == Some("FATAL")).expect("a FATAL before close");
    (fatal, at)
}

async fn upstream_backends_of(env: &GrantsEnv, grant: &str) -> i64 {
    let direct = env.direct().await;
    direct.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%' || $1 || '%'", &[&grant]).await.unwrap().get(0)
}

#[tokio::test]
async fn expiry_drops_busy_idle_and_idle_in_transaction_sessions_within_a_second() {
    let env = GrantsEnv::start(EnvOptions { warn_before: vec![Duration::from_millis(1500)], ..Default::default() }).await;
    let (id, login, password) = env.active_grant("write", "4s").await;
    let expires_at = {
        let g = env.api(Some(BOB), "GET", &format!("/grants/{id}"), json!({})).await.unwrap();
        pglease::time::parse_rfc3339(g["expires_at"].as_str().unwrap()).unwrap()
    };
    let sessions = three_sessions(&env, &login, &password).await;
    let [busy, mut idle, in_tx] = sessions;
    // The idle session is warned ahead of the end.
    let warning = idle.recv().await.expect("a notice");
    assert_eq!(warning.tag, b'N');
    assert!(warning.field(b'M').unwrap().contains(&format!("grant {id}")), "{warning:?}");
    assert_eq!(warning.field(b'S').as_deref(), Some("WARNING"));

    // Instants for the deadline: the grant's end in wall-clock time, mapped to now.
    let deadline = Instant::now() + expires_at.duration_since(SystemTime::now()).unwrap_or_default();
    let results = futures_util::future::join_all([busy, idle, in_tx].map(fatal_of)).await;
    let mut lags = Vec::new();
    for (fatal, at) in &results {
        assert_eq!(fatal.code(), "57P01");
        let m = fatal.field(b'M').unwrap();
        assert!(m.contains(&id) && m.contains("expired"), "{m}");
        lags.push(at.saturating_duration_since(deadline));
    }
    eprintln!("expiry-to-disconnect lags (busy, idle, idle-in-transaction): {lags:?}");
    for lag in &lags {
        assert!(*lag < Duration::from_secs(1), "dropped {lag:?} after the deadline");
    }
    // Upstream backends are gone, and the open transaction rolled back.
    let gone = common::eventually(Duration::from_secs(5), || async { (upstream_backends_of(&env, &id).await == 0).then_some(()) }).await;
    assert!(gone.is_some(), "upstream backends still in pg_stat_activity");
    let direct = env.direct().await;
    let n: i64 = direct.query_one("SELECT count(*) FROM t WHERE id = 99", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "the idle-in-transaction insert was rolled back");
    // The grant shows as expired, and its login no longer works.
    let g = env.api(Some(BOB), "GET", &format!("/grants/{id}"), json!({})).await.unwrap();
    assert_eq!(g["status"], "expired");
    assert_eq!(sqlstate(&env.connect(&login, &password).await.err().unwrap()).as_deref(), Some("28P01"));
    let recorded = common::eventually(Duration::from_secs(5), || async {
        env.events.events().iter().any(|e| matches!(e, Event::GrantExpired { grant, .. } if *grant == id)).then_some(())
    })
    .await;
    assert!(recorded.is_some(), "grant_expired event");
}

#[tokio::test]
async fn revocation_drops_every_session_of_the_grant_at_once() {
    let env = env().await;
    let (id, login, password) = env.active_grant("write", "30m").await;
    let (other_id, other_login, other_password) = env.active_grant("read", "30m").await;
    let bystander = env.connect(&other_login, &other_password).await.unwrap();
    let sessions = three_sessions(&env, &login, &password).await;
    let listed = env.api(Some(CAROL), "GET", "/sessions", json!({})).await.unwrap();
    assert_eq!(listed.as_array().unwrap().iter().filter(|s| s["grant"] == id.as_str()).count(), 3);

    let revoked_at = Instant::now();
    let g = env.api(Some(BOB), "POST", &format!("/grants/{id}/revoke"), json!({"reason": "incident over"})).await.unwrap();
    assert_eq!(g["status"], "revoked");
    let results = futures_util::future::join_all(sessions.map(fatal_of)).await;
    let mut lags = Vec::new();
    for (fatal, at) in &results {
        assert_eq!(fatal.code(), "57P01");
        let m = fatal.field(b'M').unwrap();
        assert!(m.contains(&id) && m.contains("revoked by bob") && m.contains("incident over"), "{m}");
        lags.push(at.duration_since(revoked_at));
    }
    eprintln!("revoke-to-disconnect lags: {lags:?}");
    assert!(lags.iter().all(|l| *l < Duration::from_secs(1)), "{lags:?}");
    assert!(common::eventually(Duration::from_secs(5), || async { (upstream_backends_of(&env, &id).await == 0).then_some(()) }).await.is_some());
    // Other grants' sessions are untouched; the revoked login is refused.
    assert_eq!(bystander.query_one("SELECT 1::int4", &[]).await.unwrap().get::<_, i32>(0), 1);
    assert_eq!(sqlstate(&env.connect(&login, &password).await.err().unwrap()).as_deref(), Some("28P01"));
    assert!(env.api(Some(BOB), "POST", &format!("/grants/{id}/revoke"), json!({"reason": "again"})).await.unwrap_err().contains("409"));
    let _ = other_id;
}

#[tokio::test]
async fn session_kill_ends_one_session() {
    let env = env().await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    let mut victim = raw_login(&env, &login, &password).await;
    let survivor = env.connect(&login, &password).await.unwrap();
    let sessions = env.api(Some(BOB), "GET", "/sessions", json!({})).await.unwrap();
    let ids: Vec<u64> = sessions.as_array().unwrap().iter().map(|s| s["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    // The raw session logged in first, so it has the lower id.
    let victim_id = *ids.iter().min().unwrap();
    env.api(Some(BOB), "POST", &format!("/sessions/{victim_id}/kill"), json!({})).await.unwrap();
    let end = victim.until_closed().await;
    let fatal = end.last().unwrap();
    assert_eq!(fatal.code(), "57P01");
    assert!(fatal.field(b'M').unwrap().contains("ended by bob"));
    assert_eq!(survivor.query_one("SELECT 1::int4", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn the_store_survives_a_restart_without_losing_or_resurrecting_grants() {
    let mut env = env().await;
    let (active_id, login, password) = env.active_grant("read", "30m").await;
    let (revoked_id, revoked_login, revoked_password) = env.active_grant("read", "30m").await;
    env.api(Some(BOB), "POST", &format!("/grants/{revoked_id}/revoke"), json!({"reason": "done"})).await.unwrap();
    let pending = env.api(Some(ALICE), "POST", "/grants", json!({"scope": "read", "duration": "5m", "reason": "later"})).await.unwrap();

    env.stop().await;
    env.boot().await;

    let all = env.api(Some(CAROL), "GET", "/grants", json!({})).await.unwrap();
    let status = |id: &str| all.as_array().unwrap().iter().find(|g| g["id"] == id).map(|g| g["status"].as_str().unwrap().to_owned());
    assert_eq!(status(&active_id).as_deref(), Some("active"));
    assert_eq!(status(&revoked_id).as_deref(), Some("revoked"));
    assert_eq!(status(pending["id"].as_str().unwrap()).as_deref(), Some("pending"));
    // The secret still works after the restart (only its verifier was stored), the revoked one does not.
    env.connect(&login, &password).await.unwrap();
    assert!(env.connect(&revoked_login, &revoked_password).await.is_err());
    let text = std::fs::read_to_string(&env.store).unwrap();
    assert!(!text.contains(&password), "the secret is not stored");

    // A corrupt store is a clear startup error, not a silent reset.
    env.stop().await;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[0] = "{not json".into();
    std::fs::write(&env.store, lines.join("\n") + "\n").unwrap();
    let e = env.build().await.err().expect("corrupt store refused");
    let message = format!("{e:#}");
    assert!(message.contains("corrupt at line 1"), "{message}");
}

#[tokio::test]
async fn break_glass_activates_at_once_within_its_limits_and_is_flagged() {
    let env = env().await;
    let e = env.api(Some(ALICE), "POST", "/grants", json!({"scope": "read", "duration": "20m", "reason": "pager", "break_glass": true})).await.unwrap_err();
    assert!(e.contains("at most 10m"), "{e}");
    let e = env.api(Some(ALICE), "POST", "/grants", json!({"scope": "write", "duration": "5m", "reason": "pager", "break_glass": true})).await.unwrap_err();
    assert!(e.contains("403"), "{e}");
    let g = env.api(Some(ALICE), "POST", "/grants", json!({"scope": "read", "duration": "5m", "reason": "pager: orders stuck", "break_glass": true})).await.unwrap();
    assert_eq!(g["status"], "active");
    assert_eq!(g["break_glass"], true);
    env.connect(g["login"].as_str().unwrap(), g["password"].as_str().unwrap()).await.unwrap();
    assert!(env.events.events().iter().any(|e| matches!(e, Event::GrantActivated { break_glass: true, .. })));
}

#[tokio::test]
async fn the_cli_drives_the_lifecycle() {
    let env = env().await;
    let bin = env!("CARGO_BIN_EXE_pglease");
    let run = |token: &'static str, args: Vec<String>| {
        let url = env.admin_url.clone();
        async move {
            let out = tokio::process::Command::new(bin).args(&args).env("PGLEASE_ADMIN_URL", url).env("PGLEASE_ADMIN_TOKEN", token).output().await.unwrap();
            (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let (code, out, err) = run(ALICE, [args("grant request --scope read --for 15m --json --reason"), vec!["check t rows".into()]].concat()).await;
    assert_eq!(code, 0, "{err}");
    let g: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let id = g["id"].as_str().unwrap().to_owned();
    let (code, _, err) = run(ALICE, args(&format!("grant approve {id}"))).await;
    assert_eq!(code, 1, "self-approval refused");
    assert!(err.contains("403"), "{err}");
    let (code, out, err) = run(BOB, args(&format!("grant approve {id}"))).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("active"), "{out}");
    // psql connects with the grant's login and secret.
    let h = common::harness().await;
    let conn = format!(
        "host=127.0.0.1 port={} user={} dbname={} sslmode=verify-full sslrootcert={}",
        env.proxy_addr.port(),
        g["login"].as_str().unwrap(),
        env.database,
        h.ca_file.display()
    );
    let (status, stdout, stderr) = common::run_client_with_password("psql", &["-X", "-tA", "-d", &conn, "-c", "select count(*) from t"], g["password"].as_str().unwrap()).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "2");
    let (code, out, _) = run(CAROL, args("grant list --active")).await;
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("STATUS"), "{out}");
    let (code, out, _) = run(ALICE, args("scope list")).await;
    assert_eq!(code, 0);
    assert!(out.contains("dba") && out.contains("write"), "{out}");
    let (code, _, err) = run("bad", args("session list")).await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    let (code, out, err) = run(BOB, [args(&format!("grant revoke {id} --reason")), vec!["done".into()]].concat()).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"));
}

#[tokio::test]
async fn failed_logins_are_recorded_and_slowed_down() {
    let env = GrantsEnv::start(EnvOptions { failures_before_delay: 2, ..Default::default() }).await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    for _ in 0..2 {
        assert!(env.connect(&login, "wrong").await.is_err());
    }
    let started = Instant::now();
    assert!(env.connect(&login, "wrong").await.is_err());
    let third = started.elapsed();
    eprintln!("third failed login took {third:?}");
    assert!(third >= Duration::from_millis(250), "the third attempt was delayed");
    let failures = env.events.events().iter().filter(|e| matches!(e, Event::LoginFailed { .. })).count();
    assert_eq!(failures, 3);
    // The right secret still works (after its delay), and a success clears the count.
    env.connect(&login, &password).await.unwrap();
}

/// Whoever issues a grant (or requests one for someone else) never sees its secret: the
/// grant's user takes one, shown to them once; taking another ends the first.
#[tokio::test]
async fn only_the_grants_user_ever_sees_its_secret() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let g = env.api(Some(BOB), "POST", "/grants/issue", json!({"user": "alice", "scope": "read", "duration": "30m", "reason": "ticket 7"})).await.unwrap();
    assert!(g.get("password").is_none(), "{g}");
    let id = g["id"].as_str().unwrap().to_owned();
    let path = format!("/grants/{id}/secret");
    // Not the issuer, not anyone else.
    assert!(env.api(Some(BOB), "POST", &path, json!({})).await.unwrap_err().contains("403"));
    assert!(env.api(Some(CAROL), "POST", &path, json!({})).await.unwrap_err().contains("40"));
    let first = env.api(Some(ALICE), "POST", &path, json!({})).await.unwrap();
    let (login, pw1) = (first["login"].as_str().unwrap(), first["password"].as_str().unwrap().to_owned());
    assert!(first["psql"].as_str().unwrap().contains(login));
    env.connect(login, &pw1).await.expect("the secret works");
    let second = env.api(Some(ALICE), "POST", &path, json!({})).await.unwrap();
    let pw2 = second["password"].as_str().unwrap().to_owned();
    assert_ne!(pw1, pw2);
    assert_eq!(sqlstate(&env.connect(login, &pw1).await.err().expect("the first secret stopped working")).as_deref(), Some("28P01"));
    env.connect(login, &pw2).await.expect("the new secret works");
    assert!(env.events.events().iter().any(|e| matches!(e, Event::GrantSecretTaken { user, .. } if user == "alice")));
    // An ended grant gives no secret.
    env.api(Some(BOB), "POST", &format!("/grants/{id}/revoke"), json!({"reason": "done"})).await.unwrap();
    assert!(env.api(Some(ALICE), "POST", &path, json!({})).await.unwrap_err().contains("ended"));
}

/// The reaper's "expiring soon" write works on the grant as it is under the write lock: a
/// secret taken between its look at the grants and its write stays in force (found by review:
/// it used to write back the copy it had read, with the old secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_expiring_soon_write_never_undoes_a_secret_taken_meanwhile() {
    use pglease::config::Role;
    use pglease::grants::{FileStore, GrantRequest, GrantService, GrantStore};
    use std::sync::Arc;
    let person = |name: &str, roles: &[Role]| pglease::people::Principal { person: name.into(), roles: roles.iter().copied().collect(), groups: Default::default() };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.jsonl");
    let scopes = Arc::new(pglease::scopes::Scopes::from_config(&pglease::demo::demo_scopes()));
    let store: Arc<dyn GrantStore> = Arc::new(FileStore::new(&path));
    let grants = GrantService::open(store, scopes, pglease::events::Events::new(), pglease::session::SessionRegistry::new()).await.unwrap();
    let (alice, bob) = (person("alice", &[Role::Engineer]), person("bob", &[Role::Approver]));
    let mut ids = Vec::new();
    for _ in 0..40 {
        let req = GrantRequest { scope: "orders-read".into(), duration: Duration::from_secs(4), reason: "t".into(), user: None, break_glass: false };
        let id = grants.request(&alice, req).await.unwrap().grant.id;
        grants.approve(&bob, &id).await.unwrap();
        ids.push(id);
    }
    // Notice due at 2 s.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let g2 = grants.clone();
    let reaper = tokio::spawn(async move { g2.expire_due().await });
    tokio::task::yield_now().await;
    let mut taken = Vec::new();
    for id in ids.iter().skip(1) {
        let (g, a, id) = (grants.clone(), alice.clone(), id.clone());
        taken.push(tokio::spawn(async move { g.take_secret(&a, &id).await.unwrap().grant }));
    }
    reaper.await.unwrap().unwrap();
    let mut fresh_grants = Vec::new();
    for t in taken {
        fresh_grants.push(t.await.unwrap());
    }
    let mut reverted = 0;
    let stored = FileStore::new(&path).load().await.unwrap();
    for fresh in fresh_grants {
        let now = stored.iter().find(|g| g.id == fresh.id).unwrap();
        let mem = grants.credential(&fresh.login, &fresh.database).map(|c| c.verifier.to_text());
        assert_eq!(mem.as_deref(), Some(fresh.verifier.as_str()), "the fresh secret is the one in force");
        if now.verifier != fresh.verifier {
            reverted += 1;
            eprintln!("grant {}: the secret taken is no longer the stored one (noticed={} stored v{} fresh v{} fresh noticed={})", fresh.id, now.expiry_noticed, now.version, fresh.version, fresh.expiry_noticed);
        }
    }
    assert_eq!(reverted, 0);
}

