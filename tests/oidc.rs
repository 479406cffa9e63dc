//! Sign-in with a real OpenID provider (`oidc-provider`, tests/common/idp.rs): the real
//! `pglease login` through the code flow (a browser driven over HTTP) and the device flow,
//! roles from groups, the approver who is removed from the group at the provider, ID tokens
//! that are forged, expired or for another application, and keys the provider rotates.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::grants::{EnvOptions, GrantsEnv};
use common::idp::{Browser, CLIENT_ID, CLIENT_SECRET, Idp, OTHER_CLIENT_ID, OTHER_CLIENT_SECRET};
use pglease::config::{IdentityConfig, OidcConfig};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

async fn env_with(idp: &Idp, control_plane: bool, edit: impl FnOnce(&mut OidcConfig)) -> GrantsEnv {
    let mut oidc = idp.config();
    edit(&mut oidc);
    let logins_file = idp.dir.path().join("logins.json");
    GrantsEnv::start(EnvOptions { control_plane, identity: IdentityConfig { oidc: Some(oidc), logins_file }, ..EnvOptions::default() }).await
}

/// The real `pglease ARGS`, its sign-in kept under `home` (XDG_CONFIG_HOME), no browser to
/// open and no token from the test's environment.
fn pglease(env: &GrantsEnv, home: &Path, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglease"));
    command
        .args(args)
        .env("PGLEASE_ADMIN_URL", &env.admin_url)
        .env("XDG_CONFIG_HOME", home)
        .env_remove("PGLEASE_ADMIN_TOKEN")
        .env_remove("BROWSER")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `pglease ARGS` to its end: (exit code, stdout, stderr).
async fn run(env: &GrantsEnv, home: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), pglease(env, home, args).output()).await.expect("pglease finished").unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Starts `pglease login ARGS` and returns it with the first stderr line that `pick` takes,
/// and the rest of its stderr (read on, so that the process can keep writing).
async fn login_until(env: &GrantsEnv, home: &Path, args: &[&str], pick: impl Fn(&str) -> Option<String>) -> (tokio::process::Child, String, tokio::task::JoinHandle<Vec<String>>) {
    let mut child = pglease(env, home, args).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line.clone());
            if let Some(found) = pick(&line) {
                return Some(found);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| panic!("pglease login never said what was expected: {seen:?}"));
    let rest = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line);
        }
        seen
    });
    (child, found, rest)
}

/// Calls the admin API at `admin_url` as the holder of `token`.
async fn api_at(admin_url: &str, token: Option<&str>, path: &str, body: Value) -> Result<Value, String> {
    let client = pglease::cli::ApiClient::new(admin_url, token.map(str::to_owned));
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || if body.is_null() { client.get(&path) } else { client.post(&path, body) }).await.unwrap().map_err(|e| e.to_string())
}

async fn sign_in(env: &GrantsEnv, person: &str) -> String {
    sign_in_at(&env.admin_url, person).await
}

async fn try_sign_in(env: &GrantsEnv, person: &str) -> Result<String, String> {
    try_sign_in_at(&env.admin_url, person).await
}

/// Signs `person` in through the admin API's code flow (what `pglease login` does, without
/// the loopback listener); returns the session token.
async fn sign_in_at(admin_url: &str, person: &str) -> String {
    try_sign_in_at(admin_url, person).await.unwrap()
}

async fn try_sign_in_at(admin_url: &str, person: &str) -> Result<String, String> {
    let redirect = "http://127.0.0.1:9/callback";
    let verifier = "verifier-".repeat(6);
    let challenge = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, <sha2::Sha256 as sha2::Digest>::digest(verifier.as_bytes()));
    let (state, nonce) = ("state-0123456789abcdef", "nonce-0123456789abcdef");
    let start = api_at(admin_url, None, "/login/start", json!({ "redirect_uri": redirect, "state": state, "nonce": nonce, "code_challenge": challenge })).await.unwrap();
    let url = start["authorize_url"].as_str().unwrap().to_owned();
    let person = person.to_owned();
    let back = tokio::task::spawn_blocking(move || Browser::new().sign_in(&url, &person)).await.unwrap();
    let back = url::Url::parse(&back).unwrap();
    assert!(back.as_str().starts_with(redirect), "{back}");
    assert_eq!(back.query_pairs().find(|(k, _)| k == "state").unwrap().1, state);
    let code = back.query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();
    let done = api_at(admin_url, None, "/login/finish", json!({ "code": code, "code_verifier": verifier, "redirect_uri": redirect, "nonce": nonce })).await?;
    Ok(done["token"].as_str().unwrap().to_owned())
}

async fn whoami(env: &GrantsEnv, token: &str) -> Result<Value, String> {
    env.api(Some(token), "GET", "/whoami", json!({})).await
}

/// alice signs in with the real CLI through the code flow (the browser driven over HTTP comes
/// back to the CLI's loopback port), bob through the device flow; groups give them their
/// roles; alice's grant request is approved by bob, and its login works through the proxy;
/// `logout` ends alice's session on the server too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_sign_in_with_the_cli_and_their_groups_give_their_roles() {
    let idp = Idp::start().await;
    let env = env_with(&idp, false, |_| {}).await;
    let alice_home = tempfile::tempdir().unwrap();
    let bob_home = tempfile::tempdir().unwrap();

    // Code flow, as on a laptop whose browser the CLI cannot open itself.
    let (child, url, stderr) = login_until(&env, alice_home.path(), &["login", "--no-browser"], |l| l.trim().starts_with("http").then(|| l.trim().to_owned())).await;
    assert!(url.starts_with(&idp.issuer) && url.contains("code_challenge_method=S256") && url.contains("redirect_uri=http%3A%2F%2F127.0.0.1%3A"), "{url}");
    let page = tokio::task::spawn_blocking(move || {
        let mut browser = Browser::new();
        let back = browser.sign_in(&url, "alice");
        // The browser lands on the CLI's loopback listener.
        browser.request(&back, None)
    })
    .await
    .unwrap();
    assert_eq!(page.0, 200, "{}", page.2);
    assert!(page.2.contains("Signed in to pglease"), "{}", page.2);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {:?}", stderr.await.unwrap());
    assert!(stdout.contains("Signed in as alice@example.com (engineer)"), "{stdout}");

    // What is kept: pglease's own token, 0600, nothing of the provider's.
    let file = alice_home.path().join("pglease/session.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(file.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert!(saved["token"].as_str().unwrap().starts_with("pls_"), "{saved}");
    assert!(saved.get("refresh_token").is_none() && saved.get("id_token").is_none(), "{saved}");
    let logins = std::fs::read_to_string(idp.dir.path().join("logins.json")).unwrap();
    assert!(!logins.contains(saved["token"].as_str().unwrap()), "the server keeps the token's hash, not the token");

    // alice requests a grant with the kept sign-in; she may not approve, list sessions.
    let (code, stdout, stderr) = run(&env, alice_home.path(), &["grant", "request", "--scope", "read", "--for", "10m", "--reason", "signed in with SSO", "--json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let grant: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(grant["user"], "alice@example.com");
    assert_eq!(grant["status"], "pending");
    let id = grant["id"].as_str().unwrap();
    let (code, _, stderr) = run(&env, alice_home.path(), &["session", "list"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("may not list sessions") && stderr.contains("403"), "{stderr}");

    // Device flow, as on a server without a browser: bob enters the code elsewhere.
    let (child, user_code, stderr) = login_until(&env, bob_home.path(), &["login"], |l| l.split("enter the code ").nth(1).map(|c| c.trim().to_owned())).await;
    let issuer = idp.issuer.clone();
    tokio::task::spawn_blocking(move || Browser::new().approve_device(&issuer, &user_code, "bob")).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {:?}", stderr.await.unwrap());
    assert!(stdout.contains("Signed in as bob@example.com (engineer, approver)"), "{stdout}");

    // bob approves; alice's grant works through the proxy under her provider name.
    let (code, _, stderr) = run(&env, bob_home.path(), &["grant", "approve", id]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let client = env.connect(grant["login"].as_str().unwrap(), grant["password"].as_str().unwrap()).await.unwrap();
    let count = |c: tokio_postgres::Client| async move { c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get::<_, i64>(0) };
    assert_eq!(count(client).await, count(env.direct().await).await);

    // logout: the file is gone and the token no longer works anywhere.
    let token = saved["token"].as_str().unwrap().to_owned();
    let (code, stdout, stderr) = run(&env, alice_home.path(), &["logout"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("Signed out alice@example.com"), "{stdout}");
    assert!(!file.exists());
    let err = whoami(&env, &token).await.unwrap_err();
    assert!(err.contains("401") && err.contains("pglease login"), "{err}");
    let (code, _, stderr) = run(&env, alice_home.path(), &["grant", "list"]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("missing bearer token (run pglease login"), "{stderr}");
}

/// Roles are read from the provider again after `refresh_every`: bob, moved out of the
/// approver group at the provider, may no longer approve on his next call after that; moved
/// back, he may again; removed from the provider, his session ends. Sign-ins are in the
/// control plane, by hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_removed_from_the_group_loses_approval_at_the_next_refresh() {
    let idp = Idp::start().await;
    let env = env_with(&idp, true, |c| c.refresh_every = Duration::from_secs(1)).await;
    let alice = sign_in(&env, "alice").await;
    let bob = sign_in(&env, "bob").await;
    assert_eq!(whoami(&env, &bob).await.unwrap()["roles"], json!(["engineer", "approver"]));
    let g = env.api(Some(&alice), "POST", "/grants", json!({ "scope": "read", "duration": "10m", "reason": "r" })).await.unwrap();
    let id = g["id"].as_str().unwrap().to_owned();

    // In the control plane: two rows, keyed by the tokens' SHA-256, neither token in them.
    let h = common::harness().await;
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(h.cluster.port).user(&h.cluster.superuser).password(&h.cluster.password).dbname(format!("{}_cp", env.database));
    let (cp, connection) = config.connect(common::tls_connector_trusting(&h.cluster.ca_file)).await.unwrap();
    tokio::spawn(connection);
    let rows = cp.query("SELECT token_sha256, body::text FROM pglease.logins ORDER BY body->>'person'", &[]).await.unwrap();
    assert_eq!(rows.len(), 2);
    let hash = pglease::identity::logins::token_sha256(&alice);
    assert_eq!(rows[0].get::<_, String>(0), hash);
    for row in &rows {
        let body: String = row.get(1);
        assert!(!body.contains(&alice) && !body.contains(&bob), "{body}");
        assert!(body.contains("sealed_refresh"), "{body}");
    }

    idp.set_groups("bob", Some(&["eng"]));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = env.api(Some(&bob), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap_err();
    assert!(err.contains("403") && err.contains("bob@example.com is not an approver"), "{err}");
    assert_eq!(whoami(&env, &bob).await.unwrap()["roles"], json!(["engineer"]));

    idp.set_groups("bob", Some(&["dba"]));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let g = env.api(Some(&bob), "POST", &format!("/grants/{id}/approve"), json!({})).await.unwrap();
    assert_eq!(g["status"], "active");
    assert_eq!(g["decided_by"], "bob@example.com");

    idp.set_groups("bob", None);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = whoami(&env, &bob).await.unwrap_err();
    assert!(err.contains("401") && err.contains("the identity provider ended this sign-in"), "{err}");
    // Ended for good: it is gone from the store, and alice is untouched.
    assert_eq!(cp.query("SELECT 1 FROM pglease.logins", &[]).await.unwrap().len(), 1);
    assert_eq!(whoami(&env, &alice).await.unwrap()["person"], "alice@example.com");
}

/// With `bearer_id_tokens`, the provider's ID tokens are accepted as bearer tokens only when
/// their signature, audience and expiry hold: forged, foreign, expired and unsigned ones are
/// 401 with a message saying which. A token signed with a key the provider has just rotated in
/// is accepted once pglease has read the keys again. The sign-in endpoints refuse what is not
/// a loopback redirect or a PKCE challenge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_foreign_id_tokens_are_refused() {
    let mut idp = Idp::start().await;
    let env = env_with(&idp, false, |c| c.bearer_id_tokens = true).await;
    let good = tokio::task::block_in_place(|| idp.id_token("alice", (CLIENT_ID, CLIENT_SECRET)));
    let me = whoami(&env, &good).await.unwrap();
    assert_eq!(me["person"], "alice@example.com");
    assert_eq!(me["roles"], json!(["engineer"]));

    // Forged: alice makes herself a dba in the payload; the signature no longer matches.
    let parts: Vec<&str> = good.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = String::from_utf8(base64::Engine::decode(&b64, parts[1]).unwrap()).unwrap().replace("\"eng\"", "\"dba\"");
    let forged = format!("{}.{}.{}", parts[0], base64::Engine::encode(&b64, payload), parts[2]);
    let err = whoami(&env, &forged).await.unwrap_err();
    assert!(err.contains("401") && err.contains("signature does not verify"), "{err}");
    // Unsigned ("alg": "none").
    let none = format!("{}.{}.", base64::Engine::encode(&b64, r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let err = whoami(&env, &none).await.unwrap_err();
    assert!(err.contains("401"), "{err}");
    // For another application at the same provider.
    let foreign = tokio::task::block_in_place(|| idp.id_token("alice", (OTHER_CLIENT_ID, OTHER_CLIENT_SECRET)));
    let err = whoami(&env, &foreign).await.unwrap_err();
    assert!(err.contains("401") && err.contains("for another application"), "{err}");
    // Expired: dave's ID tokens live one second.
    let dave = tokio::task::block_in_place(|| idp.id_token("dave", (CLIENT_ID, CLIENT_SECRET)));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = whoami(&env, &dave).await.unwrap_err();
    assert!(err.contains("401") && err.contains("expired"), "{err}");
    // A session token nobody issued.
    let err = whoami(&env, "pls_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await.unwrap_err();
    assert!(err.contains("401") && err.contains("not known here"), "{err}");

    // The provider rotates its signing key: a token signed with the new key verifies once
    // pglease reads the keys again (at most every 10 s on an unknown key); the old key's
    // tokens still verify while the provider publishes it.
    idp.restart(true).await;
    let rotated = tokio::task::block_in_place(|| idp.id_token("alice", (CLIENT_ID, CLIENT_SECRET)));
    let kid = |t: &str| -> Value { serde_json::from_slice(&base64::Engine::decode(&b64, t.split('.').next().unwrap()).unwrap()).unwrap() };
    assert_ne!(kid(&rotated)["kid"], kid(&good)["kid"]);
    let accepted = common::eventually(Duration::from_secs(20), || async { whoami(&env, &rotated).await.ok() }).await;
    assert_eq!(accepted.expect("the rotated key was fetched")["person"], "alice@example.com");
    assert_eq!(whoami(&env, &good).await.unwrap()["person"], "alice@example.com");

    // The sign-in endpoints take only a loopback redirect and a real PKCE challenge.
    let start = |redirect: &str, challenge: &str| json!({ "redirect_uri": redirect, "state": "state-0123456789abcdef", "nonce": "nonce-0123456789abcdef", "code_challenge": challenge });
    let challenge = "A".repeat(43);
    for (body, want) in [
        (start("http://attacker.example:8080/callback", &challenge), "loopback redirect"),
        (start("https://127.0.0.1:8080/callback", &challenge), "loopback redirect"),
        (start("http://127.0.0.1/callback", &challenge), "loopback redirect"),
        (start("http://127.0.0.1:8080/callback", "short"), "code_challenge"),
    ] {
        let err = env.api(None, "POST", "/login/start", body).await.unwrap_err();
        assert!(err.contains("400") && err.contains(want), "{err}");
    }
    let err = env
        .api(None, "POST", "/login/finish", json!({ "code": "made-up", "code_verifier": "v".repeat(43), "redirect_uri": "http://127.0.0.1:9/callback", "nonce": "nonce-0123456789abcdef" }))
        .await
        .unwrap_err();
    assert!(err.contains("401") && err.contains("the identity provider refused"), "{err}");
}

/// Without a refresh token from the provider, a session lasts `refresh_every` (its groups
/// cannot be read again, so they may be stale no longer than that); a provider person whose
/// name is also a static `[people]` name is refused (one name, one person).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_bound_holds_without_refresh_tokens_and_names_do_not_collide() {
    let idp = Idp::start_with(false).await;
    let mut env = env_with(&idp, false, |c| c.refresh_every = Duration::from_secs(2)).await;
    let bob = sign_in(&env, "bob").await;
    assert_eq!(whoami(&env, &bob).await.unwrap()["person"], "bob@example.com");
    let logins: Value = serde_json::from_str(&std::fs::read_to_string(idp.dir.path().join("logins.json")).unwrap()).unwrap();
    let row = logins.as_object().unwrap().values().next().unwrap().clone();
    assert!(row["sealed_refresh"].is_null(), "{row}");
    let lasts = pglease::time::parse_rfc3339(row["expires_at"].as_str().unwrap()).unwrap().duration_since(pglease::time::parse_rfc3339(row["issued_at"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(lasts, Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let err = whoami(&env, &bob).await.unwrap_err();
    assert!(err.contains("401") && err.contains("has ended"), "{err}");
    env.stop().await;

    // The test env's static people are alice, bob, carol and dave: by preferred_username, the
    // provider's alice would be the static alice.
    let env = env_with(&idp, false, |c| c.person_claim = "preferred_username".into()).await;
    let err = try_sign_in(&env, "alice").await.unwrap_err();
    assert!(err.contains("401") && err.contains("also a person of [people]"), "{err}");
}

/// `pglease demo --identity FILE`: the demo's static tokens keep working, and people sign in
/// with the identity provider the file names (the same `[identity.oidc]` table as in
/// pglease.toml).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_takes_an_identity_provider_next_to_its_tokens() {
    let idp = Idp::start().await;
    let c = idp.config();
    let file = idp.dir.path().join("identity.toml");
    std::fs::write(
        &file,
        format!(
            "[identity.oidc]\nissuer = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\nscopes = [\"openid\", \"email\", \"groups\"]\n\n[identity.oidc.roles]\nengineer = [\"eng\"]\napprover = [\"dba\"]\n",
            c.issuer,
            c.client_id,
            c.client_secret_file.unwrap().display()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglease"))
        .args(["demo", "--json", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--identity"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await.expect("demo up within 120s").unwrap().expect("a JSON line");
    let info: Value = serde_json::from_str(&line).unwrap();
    let admin_url = info["admin_url"].as_str().unwrap();

    let bob = sign_in_at(admin_url, "bob").await;
    let me = api_at(admin_url, Some(&bob), "/whoami", Value::Null).await.unwrap();
    assert_eq!((&me["person"], &me["roles"]), (&json!("bob@example.com"), &json!(["approver"])));
    let alice = info["tokens"]["alice"].as_str().unwrap();
    let g = api_at(admin_url, Some(alice), "/grants", json!({ "scope": "orders-read", "duration": "10m", "reason": "r" })).await.unwrap();
    let g = api_at(admin_url, Some(&bob), &format!("/grants/{}/approve", g["id"].as_str().unwrap()), json!({})).await.unwrap();
    assert_eq!((&g["status"], &g["decided_by"]), (&json!("active"), &json!("bob@example.com")));

    // A file that is not a valid identity table is refused, naming the key.
    std::fs::write(&file, "[identity.oidc]\nissuer = \"http://idp.example.com\"\nclient_id = \"x\"\nclient_secret_env = \"X\"\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglease")).args(["demo", "--identity"]).arg(&file).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("identity.oidc.issuer"), "{stderr}");
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
}
