//! The console tests' browser harness (tests/common/browser.rs) against real headless Chromium:
//! a page from a local axum server, a form filled and submitted, the cookies as the browser
//! holds them, a screenshot.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, State};
use axum::http::HeaderMap;
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::response::{AppendHeaders, Html, IntoResponse};
use axum::routing::{get, post};
use common::browser::Browser;

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Harness page</title></head>
<body>
<h1>Browser harness</h1>
<p id="loading">Loading…</p>
<script>setTimeout(() => document.getElementById("loading").remove(), 300);</script>
<form method="post" action="/submit">
  <label>Name <input id="name" name="name" value="placeholder"></label>
  <button id="send" type="submit">Send</button>
</form>
</body></html>"#;

/// What the server saw of the form's POST: its fields and the Cookie header.
#[derive(Default)]
struct Seen {
    form: HashMap<String, String>,
    cookie: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drives_real_chromium() {
    let seen = Arc::new(Mutex::new(None::<Seen>));
    let app = axum::Router::new()
        .route(
            "/",
            get(|| async {
                let cookies = AppendHeaders([
                    (SET_COOKIE, "t=1; HttpOnly; SameSite=Strict; Path=/"),
                    // As the console's cookies are: Secure, though this is plain http.
                    (SET_COOKIE, "s=1; Secure; HttpOnly; SameSite=Strict; Path=/"),
                ]);
                (cookies, Html(PAGE))
            }),
        )
        .route(
            "/submit",
            post(|State(seen): State<Arc<Mutex<Option<Seen>>>>, headers: HeaderMap, Form(form): Form<HashMap<String, String>>| async move {
                let cookie = headers.get(COOKIE).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
                let name = form.get("name").cloned().unwrap_or_default();
                *seen.lock().unwrap() = Some(Seen { form, cookie });
                Html(format!("<!doctype html><title>Sent</title><p id=\"done\">Thanks, {name}</p>")).into_response()
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let started = Instant::now();
    let browser = Browser::start().await;
    eprintln!("browser started in {:?}", started.elapsed());

    browser.goto(&format!("{base}/")).await;
    assert_eq!(browser.text("h1").await, "Browser harness");
    browser.wait_gone("#loading", Duration::from_secs(10)).await;

    let cookies = browser.cookies().await;
    eprintln!("cookies at {base}: {cookies:?}");
    let cookie = |name: &str| cookies.iter().find(|c| c.0 == name).unwrap_or_else(|| panic!("no cookie {name} in {cookies:?}"));
    assert_eq!(cookie("t"), &("t".to_owned(), "1".to_owned(), true, false, Some("Strict".to_owned())));
    // Chromium counts http://127.0.0.1 (and http://localhost) as a secure context: it keeps a
    // Secure cookie from it, as the console's session cookie is. From a plain-http host that
    // is not loopback it would drop it.
    assert_eq!(cookie("s"), &("s".to_owned(), "1".to_owned(), true, true, Some("Strict".to_owned())));

    browser.fill("#name", "Ada Lovelace").await;
    browser.click("#send").await;
    assert_eq!(browser.wait_for_text("#done", "Ada Lovelace", Duration::from_secs(10)).await, "Thanks, Ada Lovelace");
    assert_eq!(browser.current_url().await, format!("{base}/submit"));
    assert!(browser.page_source().await.contains("id=\"done\""));
    let seen = seen.lock().unwrap().take().expect("the server got the form");
    // `fill` cleared the placeholder before typing.
    assert_eq!(seen.form.get("name").map(String::as_str), Some("Ada Lovelace"));
    // Both HttpOnly cookies, the Secure one too, go back with the same-site POST over http.
    let mut sent: Vec<&str> = seen.cookie.split("; ").collect();
    sent.sort();
    assert_eq!(sent, ["s=1", "t=1"], "cookie header: {:?}", seen.cookie);

    let shot = browser.screenshot("browser-harness").await;
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000, "{} is not a PNG", shot.display());

    browser.close().await;
    eprintln!("whole test {:?}", started.elapsed());
}
