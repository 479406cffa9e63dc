//! Who is looking at the console.
//!
//! A signed-in browser holds one cookie, `pglease_session`: a pglease session token (the same
//! kind `pglease login` gets; stored by hash, see [`crate::identity::logins`]), `HttpOnly`,
//! `Secure`, `SameSite=Strict`. Every form that changes something carries a CSRF token derived
//! from the session token (HMAC-SHA256), checked in constant time, and a POST whose `Origin`
//! is not the console's is refused before that.
//!
//! Sign-in: with the identity provider when `[identity.oidc]` is set (authorization code with
//! PKCE; the state, nonce and verifier wait in a short-lived `SameSite=Lax` cookie scoped to
//! `/auth`, so they come back with the provider's redirect), or with a static token of
//! `[people]` (for break-glass admins and setups without an identity provider).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cookie::{Cookie, SameSite};
use hmac::{Hmac, Mac};
use maud::html;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::page;
use crate::admin::api::ApiState;
use crate::identity::logins::TOKEN_PREFIX;
use crate::identity::{AuthError, NewLogin};
use crate::people::Principal;

/// `__Host-`: only ever set by this origin over https (or loopback), for path `/`, so a
/// sibling host cannot plant or shadow it.
pub const SESSION_COOKIE: &str = "__Host-pglease_session";
const OIDC_COOKIE: &str = "pglease_oidc";
const LOGIN_CSRF_COOKIE: &str = "pglease_login";
/// A console session opened with a static token lasts this long.
const TOKEN_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The identity provider has this long to send the browser back.
const OIDC_WAIT: Duration = Duration::from_secs(600);

/// The signed-in person looking at a page, with the CSRF token their forms carry.
pub struct Viewer {
    pub who: Principal,
    pub csrf: String,
}

impl Viewer {
    /// Checks a form's CSRF token.
    pub fn check_csrf(&self, sent: &str) -> Result<(), Response> {
        if bool::from(self.csrf.as_bytes().ct_eq(sent.as_bytes())) {
            Ok(())
        } else {
            Err(page::error_page(Some(self), StatusCode::FORBIDDEN, "This form has expired or did not come from this console. Reload the page and try again."))
        }
    }
}

/// The CSRF token of a session: HMAC-SHA256 keyed by the session token, so it needs no
/// storage, differs per session, and cannot be made without the cookie.
fn csrf_token(session_token: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(session_token.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"pglease console csrf");
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

/// The session token a request carries in its cookie, if any.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    cookie(headers, SESSION_COOKIE).filter(|t| t.starts_with(TOKEN_PREFIX))
}

/// The console's own origin (`scheme://host:port` of `console_url`).
fn origin_of(state: &ApiState) -> String {
    url::Url::parse(&state.console_url).map(|u| u.origin().ascii_serialization()).unwrap_or_default()
}

/// A state-changing request from another site (or a page without our origin) is refused,
/// whatever it carries: the browser says where a request comes from.
fn same_origin(state: &ApiState, parts: &HeaderMap) -> bool {
    if parts.get("sec-fetch-site").and_then(|v| v.to_str().ok()).is_some_and(|s| s == "cross-site" || s == "same-site") {
        return false;
    }
    match parts.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        // "null" (a sandboxed or privacy-sensitive context) is not us either.
        Some(origin) => origin == origin_of(state),
        None => true,
    }
}

/// Not signed in: a page asks to sign in (and comes back after), an action is refused.
pub struct SignIn(Response);

impl IntoResponse for SignIn {
    fn into_response(self) -> Response {
        self.0
    }
}

impl FromRequestParts<Arc<ApiState>> for Viewer {
    type Rejection = SignIn;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<ApiState>) -> Result<Self, Self::Rejection> {
        let reading = parts.method == axum::http::Method::GET || parts.method == axum::http::Method::HEAD;
        if !reading && !same_origin(state, &parts.headers) {
            return Err(SignIn(page::error_page(None, StatusCode::FORBIDDEN, "This request came from another site and was refused.")));
        }
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
        let cross_site = parts.headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) == Some("cross-site");
        let sent = cookie(&parts.headers, SESSION_COOKIE);
        let refuse = |why: &str, clear: bool| {
            if reading {
                let target = format!("/login?next={}", url::form_urlencoded::byte_serialize(path.as_bytes()).collect::<String>());
                let mut response = Redirect::to(&target).into_response();
                if clear {
                    response.headers_mut().append(header::SET_COOKIE, removal(SESSION_COOKIE, "/", SameSite::Strict));
                }
                SignIn(response)
            } else {
                SignIn(page::error_page(None, StatusCode::UNAUTHORIZED, why))
            }
        };
        let Some(token) = sent.filter(|t| t.starts_with(TOKEN_PREFIX)) else {
            // A link from another site arrives without the Strict cookie: go round once.
            if reading && cross_site {
                return Err(SignIn(bounce(&path)));
            }
            return Err(refuse("Sign in first.", false));
        };
        let people = state.people.load_full();
        match state.identity.authenticate(&token, &people).await {
            Some(Ok(who)) => Ok(Viewer { csrf: csrf_token(&token), who }),
            Some(Err(AuthError::Unavailable(why))) => Err(SignIn(page::error_page(None, StatusCode::SERVICE_UNAVAILABLE, &why))),
            Some(Err(AuthError::Unauthorized(why))) => Err(refuse(&why, true)),
            None => Err(refuse("Sign in first.", true)),
        }
    }
}

fn session_cookie(token: &str, expires_at: SystemTime) -> HeaderValue {
    let max_age = expires_at.duration_since(SystemTime::now()).unwrap_or_default();
    let c = Cookie::build((SESSION_COOKIE, token.to_owned()))
        .path("/")
        .http_only(true)
        .secure(true)
        .same_site(SameSite::Strict)
        .max_age(cookie::time::Duration::seconds(max_age.as_secs() as i64));
    HeaderValue::from_str(&c.to_string()).expect("a cookie of token characters is a valid header")
}

fn removal(name: &'static str, path: &'static str, same_site: SameSite) -> HeaderValue {
    let c = Cookie::build((name, "")).path(path).http_only(true).secure(true).same_site(same_site).max_age(cookie::time::Duration::ZERO);
    HeaderValue::from_str(&c.to_string()).expect("valid header")
}

fn clear_session() -> [(header::HeaderName, HeaderValue); 1] {
    [(header::SET_COOKIE, removal(SESSION_COOKIE, "/", SameSite::Strict))]
}

/// Only a path on this console: never another site (an open redirect). Browsers drop tabs and
/// newlines from URLs and read `\` as `/`, so any control character or backslash is refused,
/// as is a path that names a host (`//…`) or the live stream (not a page).
fn local_path(next: Option<&str>) -> String {
    match next {
        Some(p) if p.starts_with('/')
            && !p.starts_with("//")
            && !p.chars().any(|c| c.is_control() || c == '\\')
            && !p.starts_with("/sessions/live")
            && p.len() <= 2048 =>
        {
            p.to_owned()
        }
        _ => "/".to_owned(),
    }
}

/// A page that sends the browser on to `path` itself. A `SameSite=Strict` cookie is not sent
/// on a navigation that another site started (a link in a mail, the identity provider's
/// redirect); one this page starts is the console's own, so it is.
fn bounce(path: &str) -> Response {
    let path = local_path(Some(path));
    let body = html! {
        (maud::DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content={ "0;url=" (path) };
                title { "pglease" }
            }
            body { p { a href=(path) { "Continue to the pglease console" } } }
        }
    };
    body.into_response()
}

fn random_text(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    URL_SAFE_NO_PAD.encode(raw)
}

#[derive(Deserialize, Default)]
pub struct NextQuery {
    pub next: Option<String>,
    pub error: Option<String>,
}

/// The sign-in page: the identity provider's button when there is one, and the token form.
pub async fn login_page(State(state): State<Arc<ApiState>>, Query(q): Query<NextQuery>) -> Response {
    let next = local_path(q.next.as_deref());
    // Double-submit token for the token form: there is no session yet to tie it to.
    let login_csrf = random_text(24);
    let set = Cookie::build((LOGIN_CSRF_COOKIE, login_csrf.clone())).path("/login").http_only(true).secure(true).same_site(SameSite::Strict);
    let message = match q.error.as_deref() {
        Some("token") => Some("That token is not known here."),
        Some("expired") => Some("The sign-in form expired; try again."),
        Some("provider") => Some("The identity provider did not complete the sign-in; try again."),
        _ => None,
    };
    let oidc = state.identity.oidc().map(|o| o.config().issuer.clone());
    let body = html! {
        section.signin {
            h1 { "Sign in to pglease" }
            @if let Some(m) = message { p.alert role="alert" { (m) } }
            @if let Some(issuer) = &oidc {
                p { a.button.primary #signin-oidc href={ "/auth/start?next=" (url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()) } { "Sign in with your identity provider" } }
                p.muted { "Issuer: " (issuer) }
                details { summary { "Sign in with a token instead" } (token_form(&login_csrf, &next)) }
            } @else {
                (token_form(&login_csrf, &next))
            }
        }
    };
    ([(header::SET_COOKIE, HeaderValue::from_str(&set.to_string()).expect("valid"))], page::bare("Sign in", body)).into_response()
}

fn token_form(csrf: &str, next: &str) -> maud::Markup {
    html! {
        form method="post" action="/login" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="next" value=(next);
            label for="token" { "Admin token (" code { "pglease token new" } ")" }
            input #token type="password" name="token" autocomplete="off" required;
            button.primary #signin-token type="submit" { "Sign in" }
        }
    }
}

#[derive(Deserialize)]
pub struct TokenForm {
    pub token: String,
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub next: String,
}

/// Signs in with a static token: a console session with that person's roles.
pub async fn login_with_token(State(state): State<Arc<ApiState>>, headers: HeaderMap, Form(form): Form<TokenForm>) -> Response {
    let expected = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    let again = |error: &str| {
        let next = url::form_urlencoded::byte_serialize(local_path(Some(&form.next)).as_bytes()).collect::<String>();
        Redirect::to(&format!("/login?error={error}&next={next}")).into_response()
    };
    if !same_origin(&state, &headers) || expected.is_empty() || !bool::from(expected.as_bytes().ct_eq(form.csrf.as_bytes())) {
        return again("expired");
    }
    let Some(who) = state.people.load().authenticate(form.token.trim()) else {
        tracing::info!("console sign-in with an unknown token");
        return again("token");
    };
    match state.identity.sign_in_with_token(&who, TOKEN_SESSION_TTL).await {
        Ok(new) => signed_in(new, &form.next),
        Err(e) => page::error_page(None, StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

fn signed_in(new: NewLogin, next: &str) -> Response {
    tracing::info!(person = %new.login.person, "signed in to the console");
    // Not a redirect: after the identity provider's, the chain of redirects counts as started
    // by the provider's site, and the new Strict cookie would not be sent with it.
    let mut response = bounce(next);
    let h = response.headers_mut();
    h.append(header::SET_COOKIE, session_cookie(&new.token, new.login.expires_at));
    h.append(header::SET_COOKIE, removal(LOGIN_CSRF_COOKIE, "/login", SameSite::Strict));
    h.append(header::SET_COOKIE, removal(OIDC_COOKIE, "/auth", SameSite::Lax));
    response
}

/// What waits in the browser while it is at the identity provider.
#[derive(Serialize, Deserialize)]
struct Pending {
    state: String,
    nonce: String,
    verifier: String,
    next: String,
}

fn callback_url(state: &ApiState) -> String {
    format!("{}/auth/callback", state.console_url.trim_end_matches('/'))
}

/// Sends the browser to the identity provider.
pub async fn oidc_start(State(state): State<Arc<ApiState>>, Query(q): Query<NextQuery>) -> Response {
    if state.identity.oidc().is_none() {
        return page::error_page(None, StatusCode::NOT_FOUND, "This pglease has no identity provider.");
    }
    let pending = Pending { state: random_text(24), nonce: random_text(24), verifier: random_text(32), next: local_path(q.next.as_deref()) };
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(pending.verifier.as_bytes()));
    let (s, n, redirect) = (pending.state.clone(), pending.nonce.clone(), callback_url(&state));
    let url = match state.identity.call_anonymous(move |o| o.authorize_url(&redirect, &s, &n, &challenge)).await {
        Ok(url) => url,
        Err(e) => return page::error_page(None, StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let value = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&pending).expect("serializes"));
    // Lax: it must come back with the provider's redirect, a top-level navigation from there.
    let c = Cookie::build((OIDC_COOKIE, value))
        .path("/auth")
        .http_only(true)
        .secure(true)
        .same_site(SameSite::Lax)
        .max_age(cookie::time::Duration::seconds(OIDC_WAIT.as_secs() as i64));
    ([(header::SET_COOKIE, HeaderValue::from_str(&c.to_string()).expect("valid"))], Redirect::to(&url)).into_response()
}

#[derive(Deserialize)]
pub struct Callback {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
}

/// The identity provider sends the browser back here with a code.
pub async fn oidc_callback(State(state): State<Arc<ApiState>>, headers: HeaderMap, Query(q): Query<Callback>) -> Response {
    let pending: Option<Pending> = cookie(&headers, OIDC_COOKIE).and_then(|v| URL_SAFE_NO_PAD.decode(v).ok()).and_then(|b| serde_json::from_slice(&b).ok());
    let Some(pending) = pending else {
        return Redirect::to("/login?error=expired").into_response();
    };
    // A code for a sign-in this browser did not start is not used (login CSRF).
    let state_ok = q.state.as_deref().is_some_and(|s| bool::from(s.as_bytes().ct_eq(pending.state.as_bytes())));
    let (Some(code), true, None) = (q.code, state_ok, q.error.as_ref()) else {
        if let Some(e) = &q.error {
            tracing::info!(error = %e, "the identity provider did not complete a console sign-in");
        }
        return Redirect::to("/login?error=provider").into_response();
    };
    let redirect = callback_url(&state);
    let (verifier, nonce) = (pending.verifier.clone(), pending.nonce.clone());
    let signed = match state.identity.call_anonymous(move |o| o.finish_code(&code, &verifier, &redirect, &nonce)).await {
        Ok(signed) => signed,
        Err(AuthError::Unauthorized(why)) => return page::error_page(None, StatusCode::UNAUTHORIZED, &why),
        Err(AuthError::Unavailable(why)) => return page::error_page(None, StatusCode::SERVICE_UNAVAILABLE, &why),
    };
    match state.identity.sign_in(signed, &state.people.load()).await {
        Ok(new) => signed_in(new, &pending.next),
        Err(AuthError::Unauthorized(why)) => page::error_page(None, StatusCode::FORBIDDEN, &why),
        Err(AuthError::Unavailable(why)) => page::error_page(None, StatusCode::SERVICE_UNAVAILABLE, &why),
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// Ends the session, here and in the store. A session that has already ended is cleared all
/// the same; the CSRF token is checked only for a live one (it is derived from it).
pub async fn logout(State(state): State<Arc<ApiState>>, headers: HeaderMap, Form(form): Form<CsrfForm>) -> Response {
    if !same_origin(&state, &headers) {
        return page::error_page(None, StatusCode::FORBIDDEN, "This request came from another site and was refused.");
    }
    if let Some(token) = cookie(&headers, SESSION_COOKIE).filter(|t| t.starts_with(TOKEN_PREFIX)) {
        if !bool::from(csrf_token(&token).as_bytes().ct_eq(form.csrf.as_bytes())) {
            return page::error_page(None, StatusCode::FORBIDDEN, "This form has expired or did not come from this console. Reload the page and try again.");
        }
        if let Err(e) = state.identity.sign_out(&token).await {
            return page::error_page(None, StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
        }
    }
    (clear_session(), Redirect::to("/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed_after_sign_in() {
        assert_eq!(local_path(Some("/grants?status=active")), "/grants?status=active");
        for bad in ["//evil.example/x", "/\\evil.example", "https://evil.example/", "evil", "/x\r\nSet-Cookie: a=b", "/\t/evil.example", "/a\\b", "/sessions/live"] {
            assert_eq!(local_path(Some(bad)), "/", "{bad}");
        }
        assert_eq!(local_path(None), "/");
    }

    #[test]
    fn csrf_tokens_differ_per_session_and_are_stable_within_one() {
        assert_eq!(csrf_token("pls_a"), csrf_token("pls_a"));
        assert_ne!(csrf_token("pls_a"), csrf_token("pls_b"));
        assert!(!csrf_token("pls_a").contains("pls_a"));
    }
}
