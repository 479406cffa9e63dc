//! `pglease connect`, end to end: the real binary requests a grant, waits while another person
//! approves it, then runs the real psql through the real proxy with `sslmode=verify-full`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::grants::{ALICE, BOB, CAROL, EnvOptions, GrantsEnv};
use serde_json::json;

/// `pglease connect ARGS` as the holder of `token`, psql on its PATH; not yet waited for.
fn connect(env: &GrantsEnv, token: &str, args: &[&str]) -> tokio::process::Child {
    let psql_dir = common::pg_bin("psql").parent().unwrap().to_owned();
    let path = format!("{}:{}", psql_dir.display(), std::env::var("PATH").unwrap_or_default());
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pglease"))
        .arg("connect")
        .args(args)
        .env("PGLEASE_ADMIN_URL", &env.admin_url)
        .env("PGLEASE_ADMIN_TOKEN", token)
        .env("PATH", path)
        // Nothing of the test's own environment may point psql elsewhere.
        .env_remove("PGPASSWORD")
        .env_remove("PGHOST")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn finish(child: tokio::process::Child) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.expect("connect finished").unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The pending grant alice asked for, once it exists.
async fn pending(env: &GrantsEnv, scope: &str) -> serde_json::Value {
    common::eventually(Duration::from_secs(20), || async {
        let all = env.api(Some(BOB), "GET", "/grants", json!({})).await.unwrap();
        all.as_array().unwrap().iter().find(|g| g["user"] == "alice" && g["scope"] == scope && g["status"] == "pending").cloned()
    })
    .await
    .expect("the request arrived")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_requests_waits_for_approval_and_runs_psql() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let child = connect(&env, ALICE, &["read", "--reason", "ticket 7: count t", "--for", "10m", "--", "-At", "-c", "SELECT count(*) FROM t", "-c", "SHOW ssl"]);
    // Bob approves while it waits.
    let g = pending(&env, "read").await;
    assert_eq!(g["reason"], "ticket 7: count t");
    assert_eq!(g["duration_secs"], 600);
    let id = g["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.api(Some(BOB), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap();
    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.lines().collect::<Vec<_>>(), ["2", "on"], "psql ran through the proxy over TLS: {stderr}");
    assert!(stderr.contains(&format!("requested grant {id}")) && stderr.contains("waiting for any approver"), "{stderr}");
    assert!(stderr.contains("approved by bob"), "{stderr}");

    // Again: the active grant is reused (no second request), with a fresh secret.
    let child = connect(&env, ALICE, &["read", "--", "-At", "-c", "SELECT current_user = session_user"]);
    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "t");
    assert!(stderr.contains(&format!("using your active grant {id}")), "{stderr}");
    let all = env.api(Some(CAROL), "GET", "/grants", json!({})).await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "no second grant: {all}");

    // Another client, the same way; the secret is in its environment, never on its command
    // line, and the admin token is not passed on.
    let child = connect(&env, ALICE, &["read", "--exec", "sh", "--", "-c", r#"test -n "$PGPASSWORD" && test -z "$PGLEASE_ADMIN_TOKEN" && echo "$PGSSLMODE $PGUSER $PGDATABASE" && test -f "$PGSSLROOTCERT""#]);
    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "{stderr}");
    let login = all[0]["login"].as_str().unwrap();
    assert_eq!(stdout.trim(), format!("verify-full {login} {}", env.database));

    // --print-env writes the secret, so only to a terminal: not to this pipe.
    let (code, stdout, stderr) = finish(connect(&env, ALICE, &["read", "--print-env"])).await;
    assert_eq!((code, stdout.as_str()), (Some(1), ""), "{stderr}");
    assert!(stderr.contains("only to a terminal"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_withdraws_the_request_and_a_denial_is_an_error() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let child = connect(&env, ALICE, &["write", "--reason", "fix order 12"]);
    let g = pending(&env, "write").await;
    // SAFETY: kill with a valid pid and signal has no memory-safety preconditions.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
    let (code, _, stderr) = finish(child).await;
    assert_eq!(code, Some(130), "{stderr}");
    let id = g["id"].as_str().unwrap();
    let after = env.api(Some(BOB), "GET", &format!("/grants/{id}"), json!({})).await.unwrap();
    assert_eq!(after["status"], "revoked", "{after}");
    assert!(after["end_reason"].as_str().unwrap().contains("withdrawn by alice"), "{after}");

    let child = connect(&env, ALICE, &["write", "--reason", "fix order 13"]);
    let g = pending(&env, "write").await;
    env.api(Some(BOB), "POST", &format!("/grants/{}/deny", g["id"].as_str().unwrap()), json!({"reason": "use the runbook"})).await.unwrap();
    let (code, _, stderr) = finish(child).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("was denied by bob: use the runbook"), "{stderr}");

    // Without a reason nothing is requested; an unknown scope and a database the scope does
    // not reach are refused before anything is requested.
    for (args, says) in [
        (vec!["write"], "--reason"),
        (vec!["nope", "--reason", "x"], "no scope"),
        (vec!["write", "--reason", "x", "--database", "postgres"], "does not reach database"),
        (vec!["write", "--reason", "x", "--ca", "/nonexistent/ca.crt"], "no such file"),
    ] {
        let (code, _, stderr) = finish(connect(&env, ALICE, &args)).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let all = env.api(Some(CAROL), "GET", "/grants", json!({})).await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2, "only the two requests above: {all}");
}

/// Behind a load balancer the proxy is reached by a name of its own (`listen.public_host`):
/// connect hands that name out, and verify-full checks the proxy's certificate against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_uses_the_proxys_public_name() {
    let env = GrantsEnv::start(EnvOptions { public_host: Some("localhost".into()), ..EnvOptions::default() }).await;
    let who = env.api(Some(ALICE), "GET", "/whoami", json!({})).await.unwrap();
    assert_eq!((who["person"].as_str(), who["proxy"]["host"].as_str()), (Some("alice"), Some("localhost")));
    let child = connect(&env, ALICE, &["read", "--reason", "by name", "--", "-At", "-c", "SHOW ssl"]);
    let g = pending(&env, "read").await;
    env.api(Some(BOB), "POST", &format!("/grants/{}/approve", g["id"].as_str().unwrap()), json!({})).await.unwrap();
    let (code, stdout, stderr) = finish(child).await;
    assert_eq!((code, stdout.trim()), (Some(0), "on"), "{stderr}");
}
