//! The control plane's first part against a real Postgres: migrations (from the CLI, and from
//! several instances at once) and the shared grant store with optimistic concurrency.
//!
//! The control-plane database is a database of its own on the test cluster.

mod common;

use std::sync::Arc;
use std::time::Duration;

use pglease::config::Role;
use pglease::control_plane::watch::{self, WatchOptions};
use pglease::control_plane::{connect, migrations, store::PgGrantStore};
use pglease::grants::{GrantError, GrantRequest, GrantService, GrantStatus, GrantStore, StoreError};
use pglease::people::Principal;

/// A fresh, empty control-plane database; its libpq connection string.
async fn control_plane_db() -> String {
    let h = common::harness().await;
    let db = common::fresh_database().await;
    let c = &h.cluster;
    format!("host=127.0.0.1 port={} user={} password={} dbname={db} sslmode=verify-full sslrootcert={}", c.port, c.superuser, c.password, c.ca_file.display())
}

fn person(name: &str, roles: &[Role]) -> Principal {
    Principal { person: name.into(), roles: roles.iter().copied().collect(), groups: Default::default() }
}

#[tokio::test]
async fn migrate_reports_applies_and_then_finds_nothing_to_do() {
    let dsn = control_plane_db().await;
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pglease"));
        c.args(["control-plane", "migrate"]).args(args).env("PGLEASE_CONTROL_PLANE", &dsn);
        c.output().unwrap()
    };
    let check = run(&["--check"]);
    assert_eq!(check.status.code(), Some(1), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains("would apply V1 grants"));
    assert!(String::from_utf8_lossy(&check.stdout).contains("would apply V2 fleet"));
    let applied = run(&[]);
    assert!(applied.status.success() && String::from_utf8_lossy(&applied.stdout).contains("applied V1 grants"), "{}", String::from_utf8_lossy(&applied.stderr));
    for again in [run(&[]), run(&["--check"])] {
        assert!(again.status.success() && String::from_utf8_lossy(&again.stdout).contains("up to date"));
    }
    // A wrong password is Postgres's own error, with its SQLSTATE.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_pglease"))
        .args(["control-plane", "migrate", "--dsn", &dsn.replace("password=", "password=wrong")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("28P01"), "{err}");
}

#[tokio::test]
async fn instances_migrating_at_once_take_turns() {
    let dsn = control_plane_db().await;
    let runs = (0..4).map(|_| {
        let dsn = dsn.clone();
        tokio::spawn(async move {
            let mut client = connect(&dsn).await.unwrap();
            migrations::migrate(&mut client).await.unwrap().len()
        })
    });
    let applied: Vec<usize> = futures_util::future::join_all(runs).await.into_iter().map(Result::unwrap).collect();
    // Exactly one run applied the migrations (each of them once); the others found none to do.
    let known = migrations::known();
    assert!(known >= 3, "grants, fleet, logins: {known}");
    assert_eq!(applied.iter().filter(|&&n| n > 0).count(), 1, "one run applied: {applied:?}");
    assert_eq!(applied.iter().sum::<usize>(), known, "each migration applied once: {applied:?}");
    let mut client = connect(&dsn).await.unwrap();
    assert!(migrations::pending(&mut client).await.unwrap().is_empty());
}

#[tokio::test]
async fn two_approvers_on_two_instances_cannot_both_decide_a_grant() {
    let dsn = control_plane_db().await;
    migrations::migrate(&mut connect(&dsn).await.unwrap()).await.unwrap();
    let scopes = Arc::new(pglease::scopes::Scopes::from_config(&pglease::demo::demo_scopes()));
    let open = || {
        let (dsn, scopes) = (dsn.clone(), scopes.clone());
        async move {
            let store: Arc<dyn GrantStore> = Arc::new(PgGrantStore::new(&dsn));
            GrantService::open(store, scopes, pglease::events::Events::new(), pglease::session::SessionRegistry::new()).await.unwrap()
        }
    };
    let a = open().await;
    let alice = person("alice", &[Role::Engineer]);
    let request = GrantRequest { scope: "orders-read".into(), duration: Duration::from_secs(600), reason: "ticket 9".into(), user: None, break_glass: false };
    let id = a.request(&alice, request).await.unwrap().grant.id;
    // A second instance starts and sees the pending grant in the shared store.
    let b = open().await;
    assert!(b.list(&person("bob", &[Role::Approver]), false).iter().any(|g| g.id == id));
    let (bob, dave) = (person("bob", &[Role::Approver]), person("dave", &[Role::Approver]));
    let (first, second) = tokio::join!(a.approve(&bob, &id), b.approve(&dave, &id));
    let (won, lost) = match (first, second) {
        (Ok(g), Err(e)) | (Err(e), Ok(g)) => (g, e),
        other => panic!("exactly one approval must win: {other:?}"),
    };
    assert_eq!(won.status, GrantStatus::Active);
    // The loser read the winner's decision and was refused on its merits.
    assert!(matches!(&lost, GrantError::Conflict(m) if m.contains("is active, not pending")), "{lost:?}");
    // The store holds the winner's decision, once.
    let stored = PgGrantStore::new(&dsn).load().await.unwrap();
    let g = stored.iter().find(|g| g.id == id).unwrap();
    assert_eq!((g.status, g.version, g.decided_by.as_deref()), (GrantStatus::Active, 2, won.decided_by.as_deref()));
}

#[tokio::test]
async fn an_unreachable_control_plane_changes_nothing_and_says_so() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = PgGrantStore::new(&format!("host=127.0.0.1 port={port} user=x dbname=x sslmode=disable connect_timeout=2"));
    assert!(matches!(store.load().await, Err(StoreError::Unavailable(_))));
    let scopes = Arc::new(pglease::scopes::Scopes::from_config(&pglease::demo::demo_scopes()));
    let opened = GrantService::open(Arc::new(store), scopes, pglease::events::Events::new(), pglease::session::SessionRegistry::new()).await;
    assert!(matches!(opened, Err(StoreError::Unavailable(_))), "an instance does not start without its grants");
}

/// Two instances on one control plane, each with its own session registry and watcher.
struct Instance {
    grants: Arc<GrantService>,
    sessions: Arc<pglease::session::SessionRegistry>,
}

async fn instance(dsn: &str, options: WatchOptions, shutdown: &tokio_util::sync::CancellationToken) -> Instance {
    let scopes = Arc::new(pglease::scopes::Scopes::from_config(&pglease::demo::demo_scopes()));
    let sessions = pglease::session::SessionRegistry::new();
    let store: Arc<dyn GrantStore> = Arc::new(PgGrantStore::new(dsn));
    let grants = GrantService::open(store, scopes, pglease::events::Events::new(), sessions.clone()).await.unwrap();
    grants.set_fresh_until(std::time::Instant::now() + options.stale_after);
    tokio::spawn(watch::run(dsn.to_owned(), grants.clone(), None, options, shutdown.clone()));
    Instance { grants, sessions }
}

#[tokio::test]
async fn a_revoke_on_one_instance_ends_sessions_on_the_other_within_a_second() {
    let dsn = control_plane_db().await;
    migrations::migrate(&mut connect(&dsn).await.unwrap()).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    // The periodic read is slow on purpose: only the notification can be this fast.
    let options = WatchOptions { reconcile_every: Duration::from_secs(60), stale_after: Duration::from_secs(120) };
    let (a, b) = (instance(&dsn, options, &shutdown).await, instance(&dsn, options, &shutdown).await);
    let alice = person("alice", &[Role::Engineer]);
    let bob = person("bob", &[Role::Approver]);
    let request = GrantRequest { scope: "orders-read".into(), duration: Duration::from_secs(600), reason: "ticket 11".into(), user: None, break_glass: false };
    let new = a.grants.request(&alice, request).await.unwrap();
    let login = new.grant.login.clone();
    // Approved on B: A learns of it from the notification.
    b.grants.approve(&bob, &new.grant.id).await.unwrap();
    let usable = common::eventually(Duration::from_secs(1), || async { a.grants.credential(&login, "shop").map(|_| ()) }).await;
    assert!(usable.is_some(), "A sees B's approval within a second");
    // A session of the grant on B; the grant is revoked on A.
    let identity = a.grants.credential(&login, "shop").unwrap().identity;
    let registered = b.sessions.register(identity, "127.0.0.1:5".parse().unwrap(), "shop".into(), 1);
    let revoked_at = std::time::Instant::now();
    a.grants.revoke(&bob, &new.grant.id, "incident over").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(1), registered.handle.killed()).await.expect("B ended the session within a second");
    assert!(ended.message.contains("incident over"), "{}", ended.message);
    assert!(b.grants.credential(&login, "shop").is_none());
    eprintln!("revoke on A ended the session on B after {:?}", revoked_at.elapsed());
    shutdown.cancel();
}

#[tokio::test]
async fn an_instance_that_cannot_read_the_control_plane_refuses_logins() {
    let dsn = control_plane_db().await;
    migrations::migrate(&mut connect(&dsn).await.unwrap()).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let options = WatchOptions { reconcile_every: Duration::from_millis(100), stale_after: Duration::from_millis(500) };
    let a = instance(&dsn, options, &shutdown).await;
    let alice = person("alice", &[Role::Engineer]);
    let request = GrantRequest { scope: "orders-read".into(), duration: Duration::from_secs(600), reason: "x".into(), user: None, break_glass: false };
    let new = a.grants.request(&alice, request).await.unwrap();
    a.grants.approve(&person("bob", &[Role::Approver]), &new.grant.id).await.unwrap();
    assert!(a.grants.credential(&new.grant.login, "shop").is_some());
    // The control plane goes away (its database is dropped under the watcher).
    let h = common::harness().await;
    let db = dsn.split("dbname=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    h.cluster.execute("postgres", &format!("DROP DATABASE {db} WITH (FORCE)")).await.unwrap();
    let refused = common::eventually(Duration::from_secs(5), || async { a.grants.credential(&new.grant.login, "shop").is_none().then_some(()) }).await;
    assert!(refused.is_some(), "logins fail closed once the grants may be stale");
    shutdown.cancel();
}

/// Two whole pglease instances (proxy and admin API) on one control plane, as behind a load
/// balancer: a grant issued on one is taken and used on the other, and revoked on the first,
/// which ends the session on the second at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_grants_and_a_revoke_reaches_both() {
    use common::grants::{ALICE, BOB, EnvOptions, GrantsEnv};
    let env = GrantsEnv::start(EnvOptions { control_plane: true, ..EnvOptions::default() }).await;
    let (b_proxy, b_admin, b_running) = env.another_instance().await;
    let api = |url: String, token: &'static str, path: String| {
        let client = pglease::cli::ApiClient::new(&url, Some(token.to_owned()));
        tokio::task::spawn_blocking(move || client.post(&path, serde_json::json!({})))
    };
    // Issued on A…
    let g = env.api(Some(BOB), "POST", "/grants/issue", serde_json::json!({"user": "alice", "scope": "read", "duration": "30m", "reason": "two instances"})).await.unwrap();
    let id = g["id"].as_str().unwrap().to_owned();
    // …its secret taken on B, and used through B's proxy.
    let taken = api(b_admin.clone(), ALICE, format!("/grants/{id}/secret")).await.unwrap().unwrap();
    let (login, password) = (taken["login"].as_str().unwrap().to_owned(), taken["password"].as_str().unwrap().to_owned());
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(b_proxy.port()).user(&login).password(&password).dbname(&env.database).ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config.connect(common::tls_connector()).await.expect("login through B");
    let ended = tokio::spawn(connection);
    assert_eq!(client.query("SELECT id FROM t", &[]).await.unwrap().len(), 2);
    // Revoked on A: the session on B ends.
    let revoked_at = std::time::Instant::now();
    env.api(Some(BOB), "POST", &format!("/grants/{id}/revoke"), serde_json::json!({"reason": "done"})).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(1), ended).await.expect("B ended the session within a second").unwrap();
    let e = end.expect_err("the session ended with an error");
    assert_eq!(common::sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    eprintln!("revoke on A ended the session on B after {:?}", revoked_at.elapsed());
    // And B refuses the login from now on, as A does.
    let refused = config.connect(common::tls_connector()).await.err().expect("login refused");
    assert_eq!(common::sqlstate(&refused).as_deref(), Some("28P01"), "{refused:?}");
    b_running.stop().await;
}

/// Two instances' reapers find the same grant past its end at once: one records the expiry,
/// the other takes that version without an error, and the expiry is announced once.
#[tokio::test]
async fn two_reapers_record_one_expiry() {
    let dsn = control_plane_db().await;
    migrations::migrate(&mut connect(&dsn).await.unwrap()).await.unwrap();
    let scopes = Arc::new(pglease::scopes::Scopes::from_config(&pglease::demo::demo_scopes()));
    let mut instances = Vec::new();
    for _ in 0..2 {
        let events = Arc::new(pglease::events::MemorySink::default());
        let store: Arc<dyn GrantStore> = Arc::new(PgGrantStore::new(&dsn));
        let grants = GrantService::open(store, scopes.clone(), pglease::events::Events::new().with_sink(events.clone()), pglease::session::SessionRegistry::new()).await.unwrap();
        instances.push((grants, events));
    }
    let (a, b) = (&instances[0].0, &instances[1].0);
    let request = GrantRequest { scope: "orders-read".into(), duration: Duration::from_secs(1), reason: "x".into(), user: None, break_glass: false };
    let new = a.request(&person("alice", &[Role::Engineer]), request).await.unwrap();
    a.approve(&person("bob", &[Role::Approver]), &new.grant.id).await.unwrap();
    b.refresh().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (ra, rb) = tokio::join!(a.expire_due(), b.expire_due());
    ra.unwrap();
    rb.unwrap();
    let expired = |events: &pglease::events::MemorySink| events.events().iter().filter(|e| matches!(e, pglease::events::Event::GrantExpired { .. })).count();
    assert_eq!(expired(&instances[0].1) + expired(&instances[1].1), 1, "announced once");
    let stored = PgGrantStore::new(&dsn).load().await.unwrap();
    assert_eq!((stored[0].status, stored[0].version), (GrantStatus::Expired, 3), "requested, approved, expired: one write each");
    for (g, _) in &instances {
        assert_eq!(g.show(&person("bob", &[Role::Approver]), &new.grant.id).unwrap().status, GrantStatus::Expired);
    }
}
