//! The web console in a real browser (headless Chromium over WebDriver, tests/common/browser.rs)
//! against a real pglease in front of a real Postgres, with real psql: an approver signs in,
//! approves a request, watches the engineer's session appear live, kills it (psql gets the
//! FATAL), reads its audit timeline with the refused statement and why, and checks a statement
//! in the scope box; forms without the CSRF token, from another origin, or without a session
//! are refused. Signing in through a real OpenID provider in the browser too. Screenshots of
//! each page are written to target/console-screenshots/ (and to $PGLEASE_SCREENSHOTS).

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::browser::Browser;
use common::grants::{ALICE, BOB, CAROL, EnvOptions, GrantsEnv};
use common::idp::Idp;
use fantoccini::Locator;
use serde_json::json;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(20);

/// An HTTP client that, unlike the browser, sends what the test says (no cookies of its own).
fn raw() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).build().into()
}

/// POSTs a form as a script on another page might: (status, body).
async fn post(url: String, cookie: Option<String>, origin: Option<String>, form: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let mut req = raw().post(&url).content_type("application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            req = req.header("Cookie", format!("__Host-pglease_session={c}"));
        }
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        let mut resp = req.send(form.as_bytes()).unwrap();
        (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap_or_default())
    })
    .await
    .unwrap()
}

async fn grant_status(env: &GrantsEnv, id: &str) -> String {
    env.api(Some(BOB), "GET", &format!("/grants/{id}"), json!({})).await.unwrap()["status"].as_str().unwrap().to_owned()
}

/// An interactive psql through the proxy, reading statements from its stdin.
fn psql(env: &GrantsEnv, login: &str, password: &str) -> tokio::process::Child {
    tokio::process::Command::new(common::pg_bin("psql"))
        .arg(format!("host=127.0.0.1 port={} user={login} dbname={} sslmode=require", env.proxy_addr.port(), env.database))
        .args(["-X", "-v", "ON_ERROR_STOP=0"])
        .env("PGPASSWORD", password)
        .env_remove("PGHOST")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_works_the_console_in_a_real_browser() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let admin = env.admin_url.clone();
    let b = Browser::start().await;

    // Not signed in: a page leads to the sign-in page, and back after it.
    b.goto(&format!("{admin}/sessions")).await;
    b.find("#token").await;
    assert!(b.current_url().await.contains("/login?next=%2Fsessions"), "{}", b.current_url().await);
    b.screenshot("signin").await;
    b.fill("#token", "plt_not-a-token").await;
    b.click("#signin-token").await;
    b.wait_for_text("p.alert", "not known", T).await;
    b.fill("#token", BOB).await;
    b.click("#signin-token").await;
    b.wait_for_text("h1", "Live sessions", T).await;
    assert_eq!(b.text("#whoami").await, "bob");
    let cookies = b.cookies().await;
    let session = cookies.iter().find(|c| c.0 == "__Host-pglease_session").expect("a session cookie");
    assert!(session.1.starts_with("pls_") && session.2 && session.3, "HttpOnly and Secure: {session:?}");
    assert_eq!(session.4.as_deref(), Some("Strict"));
    let cookie = session.1.clone();

    // A link on another site (here a data: page) arrives without the Strict cookie; the console
    // goes round once through its own page and bob stays signed in.
    b.goto(&format!("data:text/html,<a id=go href='{admin}/grants?status=all'>grants</a>")).await;
    b.click("#go").await;
    b.wait_for_text("h1", "Grants", T).await;
    assert_eq!(b.text("#whoami").await, "bob");

    // alice asks; bob's inbox shows the request with its scope's rules; he approves.
    let g = env.api(Some(ALICE), "POST", "/grants", json!({ "scope": "read", "duration": "30m", "reason": "INC-7: count the rows of t" })).await.unwrap();
    let id = g["id"].as_str().unwrap().to_owned();
    let other = env.api(Some(ALICE), "POST", "/grants", json!({ "scope": "read", "duration": "10m", "reason": "a second request" })).await.unwrap();
    let other_id = other["id"].as_str().unwrap().to_owned();
    b.goto(&format!("{admin}/")).await;
    let card = b.wait_for_text(&format!("#request-{id}"), "INC-7", T).await;
    assert!(card.contains("alice") && card.contains("read") && card.contains("30m"), "{card}");
    b.screenshot("inbox").await;
    b.click(&format!("#request-{id} button.approve")).await;
    b.wait_for_text("#notice", &format!("Grant {id} approved"), T).await;
    assert_eq!(grant_status(&env, &id).await, "active");

    // The sessions page is open when alice connects: her session appears without a reload.
    b.goto(&format!("{admin}/sessions")).await;
    b.wait_for_text("#sessions-body", "No live sessions", T).await;
    let mut client = psql(&env, g["login"].as_str().unwrap(), g["password"].as_str().unwrap());
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"SELECT count(*) FROM t;\nDELETE FROM t;\n").await.unwrap();
    stdin.flush().await.unwrap();
    let row = b.wait_for_text("#sessions-body", "alice", T).await;
    assert!(row.contains(&id), "{row}");
    b.wait_for_text("#sessions-body", "2", T).await;
    b.screenshot("sessions").await;

    // bob kills it; psql is told why.
    b.click("#sessions-body form.kill button").await;
    b.wait_for_text("#notice", "ended", T).await;
    let _ = stdin.write_all(b"SELECT 1;\n").await;
    drop(stdin);
    let out = tokio::time::timeout(T, client.wait_with_output()).await.expect("psql ended").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FATAL") && stderr.contains("was ended by bob"), "{stderr}");
    assert!(stderr.contains("does not allow DELETE"), "the refusal reached psql: {stderr}");
    b.wait_for_text("#sessions-body", "No live sessions", T).await;

    // The audit timeline has the refused statement with its reason.
    b.goto(&format!("{admin}/audit")).await;
    b.click("#verify").await;
    b.wait_for_text("#chain", "chain intact", T).await;
    b.click("#audit-sessions tbody tr a").await;
    let timeline = b.wait_for_text("#timeline", "refused", T).await;
    assert!(timeline.contains("DELETE FROM t") && timeline.contains("does not allow DELETE"), "{timeline}");
    // The read scope caps rows: the SELECT was rewritten, and both forms are shown.
    assert!(timeline.contains("rewritten") && timeline.contains("As run:") && timeline.contains("LIMIT"), "{timeline}");
    b.screenshot("audit-timeline").await;

    // The overview's charts count the statements and the refusal.
    // (The charts' data is read again at most every 10 s.)
    let mut counted = false;
    for _ in 0..30 {
        b.goto(&format!("{admin}/")).await;
        if b.page_source().await.contains("read: 1") {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(counted, "the refusal is counted in the chart");
    b.find("#chart-refusals-title").await;
    let overview = b.page_source().await;
    assert!(overview.contains("up to 30 min: 2"), "both grants were asked for 30 min or less");
    assert!(overview.contains("Sessions opened per hour, last day"));
    b.client.execute("document.getElementById('activity-h').scrollIntoView()", vec![]).await.unwrap();
    b.screenshot("activity").await;

    // The scope box decides as the proxy does.
    b.goto(&format!("{admin}/scopes/read")).await;
    b.fill("#sql", "DELETE FROM t WHERE true").await;
    b.click("#check button").await;
    let verdict = b.wait_for_text("#verdict", "deny", T).await;
    assert!(verdict.contains("does not allow DELETE"), "{verdict}");
    b.fill("#sql", "SELECT * FROM t").await;
    b.click("#check button").await;
    let verdict = b.wait_for_text("#verdict", "rewrite", T).await;
    assert!(verdict.contains("capped at 3 rows") && verdict.contains("LIMIT 3"), "{verdict}");
    b.screenshot("scope-check").await;

    // The link a notification carries opens the request, ready to decide.
    b.goto(&format!("{admin}/grants/{other_id}")).await;
    b.wait_for_text(&format!("#request-{other_id}"), "a second request", T).await;
    b.find(&format!("#request-{other_id} button.approve")).await;

    // Forms that are not the console's own are refused, and change nothing.
    let csrf = b.client.find(Locator::Css("input[name=csrf]")).await.unwrap().attr("value").await.unwrap().unwrap();
    let approve = format!("{admin}/grants/{other_id}/approve");
    let (status, body) = post(approve.clone(), Some(cookie.clone()), Some(admin.clone()), String::new()).await;
    assert_eq!(status, 403, "no CSRF token: {body}");
    let (status, _) = post(approve.clone(), Some(cookie.clone()), Some(admin.clone()), "csrf=forged".into()).await;
    assert_eq!(status, 403, "a wrong CSRF token");
    let (status, _) = post(approve.clone(), Some(cookie.clone()), Some("http://evil.example".into()), format!("csrf={csrf}")).await;
    assert_eq!(status, 403, "another origin, even with the token");
    let (status, _) = post(approve.clone(), None, None, format!("csrf={csrf}")).await;
    assert_eq!(status, 401, "no session");
    assert_eq!(grant_status(&env, &other_id).await, "pending");
    let page = tokio::task::spawn_blocking({
        let url = format!("{admin}/grants");
        move || raw().get(&url).call().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(page.status().as_u16(), 303, "a page without a session sends to sign-in");
    let csp = page.headers().get("content-security-policy").unwrap().to_str().unwrap().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");

    // On a phone's screen the inbox fits its width (tables scroll inside their own box).
    b.client.set_window_size(390, 844).await.unwrap();
    b.goto(&format!("{admin}/")).await;
    b.find("#inbox").await;
    let fits = b.client.execute("return document.documentElement.scrollWidth <= window.innerWidth", vec![]).await.unwrap();
    assert_eq!(fits, json!(true), "no sideways scrolling on a phone");
    b.screenshot("inbox-phone").await;
    b.client.set_window_size(1280, 900).await.unwrap();

    // An engineer sees their own requests, not the sessions; signing out ends the session.
    b.click("#signout").await;
    b.find("#token").await;
    let (status, _) = post(approve, Some(cookie), Some(admin.clone()), format!("csrf={csrf}")).await;
    assert_eq!(status, 401, "the signed-out session is gone");
    b.fill("#token", ALICE).await;
    b.click("#signin-token").await;
    let mine = b.wait_for_text("#my-requests", "a second request", T).await;
    assert!(mine.contains("Withdraw"), "{mine}");
    assert!(b.client.find(Locator::Css("nav a[href='/sessions']")).await.is_err(), "engineers do not get the sessions page");
    b.click(&format!("#request-{other_id} button.withdraw")).await;
    b.wait_for_text("#notice", "ended", T).await;
    assert_eq!(grant_status(&env, &other_id).await, "revoked");
    b.goto(&format!("{admin}/audit")).await;
    b.wait_for_text("#error", "may not read the audit log", T).await;
    b.close().await;
    let _ = CAROL;
}

/// Signing in through the identity provider's own pages in the browser: the console sends
/// the browser there and back (code flow with PKCE), and bob lands where he was going as the
/// provider names him. The provider is another site (`localhost`, the console `127.0.0.1`), as
/// a real one is: the Strict session cookie still reaches the first page after the redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_sign_in_to_the_console_with_the_identity_provider() {
    let idp = Idp::start_as("localhost", true).await;
    let oidc = idp.config();
    let env = GrantsEnv::start(EnvOptions {
        identity: pglease::config::IdentityConfig { oidc: Some(oidc), logins_file: idp.dir.path().join("logins.json") },
        ..EnvOptions::default()
    })
    .await;
    let b = Browser::start().await;
    b.goto(&format!("{}/grants", env.admin_url)).await;
    b.click("#signin-oidc").await;
    // The provider's development sign-in page, then its consent page.
    b.fill("input[name=login]", "bob").await;
    b.fill("input[name=password]", "any").await;
    b.click("button[type=submit]").await;
    b.click("button[type=submit]").await;
    b.wait_for_text("#whoami", "bob@example.com", T).await;
    assert!(b.current_url().await.ends_with("/grants"), "back where bob was going: {}", b.current_url().await);
    b.wait_for_text("h1", "Grants", T).await;
    let session = b.cookies().await.into_iter().find(|c| c.0 == "__Host-pglease_session").expect("a session cookie");
    assert!(session.1.starts_with("pls_"));
    let logins = std::fs::read_to_string(idp.dir.path().join("logins.json")).unwrap();
    assert!(logins.contains("bob@example.com") && !logins.contains(&session.1));
    b.close().await;
}

/// With a control plane, the audit pages read every instance's chain from `pglease.audit`: an
/// auditor on one instance finds a session that ran on another, and its timeline, by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_pages_read_any_instance_of_the_fleet() {
    let env = GrantsEnv::start(EnvOptions { control_plane: true, ..EnvOptions::default() }).await;
    let second_dir = tempfile::tempdir().unwrap();
    let second_log = second_dir.path().join("audit.jsonl");
    let (_, other_admin, other) = env
        .another_instance_with(|c| {
            c.control_plane.as_mut().unwrap().instance_id = Some("second".into());
            c.audit.path = second_log.clone();
            c.audit.anchor = None;
        })
        .await;
    // A session on the first instance, with a refused statement.
    let (_, login, password) = env.active_grant("read", "10m").await;
    let client = env.connect(&login, &password).await.unwrap();
    client.simple_query("SELECT count(*) FROM t").await.unwrap();
    let refused = client.simple_query("DELETE FROM t").await.unwrap_err();
    assert_eq!(common::sqlstate(&refused).as_deref(), Some("42501"));
    drop(client);

    let b = Browser::start().await;
    b.goto(&format!("{other_admin}/login?next=%2Faudit")).await;
    b.fill("#token", CAROL).await;
    b.click("#signin-token").await;
    assert_eq!(b.text("#audit-instance").await, "second", "its own chain first");
    let first = b.text("#audit-sessions tbody").await;
    assert!(first.contains("No sessions match"), "nothing ran on the second instance: {first}");
    // The first instance's chain, once its records are copied (batched, within a second or two).
    let mut found = false;
    for _ in 0..40 {
        b.goto(&format!("{other_admin}/audit?instance=")).await;
        let select = b.find("select[name=instance]").await;
        let options = select.html(false).await.unwrap();
        if let Some(name) = options.split("value=\"").skip(1).map(|v| v.split('"').next().unwrap().to_owned()).find(|v| v != "second") {
            b.goto(&format!("{other_admin}/audit?instance={}", url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>())).await;
            if b.text("#audit-sessions tbody").await.contains("alice") {
                found = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(found, "the first instance's session is listed on the second");
    b.click("#audit-sessions tbody tr a").await;
    let timeline = b.wait_for_text("#timeline", "refused", T).await;
    assert!(timeline.contains("DELETE FROM t") && timeline.contains("does not allow DELETE"), "{timeline}");
    assert!(b.text("h1").await.contains(" on "), "the title names the instance");
    b.close().await;
    other.stop().await;
}
