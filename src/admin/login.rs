//! Sign-in with the identity provider, for `pglease login` (`/api/login…`, no bearer token).
//!
//! The code flow: `pglease login` makes the PKCE verifier, state and nonce, listens on a
//! loopback port, and asks `start` for the provider's authorization URL; the browser comes
//! back to the loopback port with a code, which `finish` trades (with the client secret, which
//! only the server has) for a verified ID token and a pglease session token. The device flow:
//! `device` starts it, `device/poll` asks once whether the person has approved. Nothing is
//! kept between the calls, so any instance of a fleet can answer any of them.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::api::{ApiError, ApiState};
use crate::identity::{AuthError, Identity, NewLogin};
use crate::identity::oidc::{DevicePoll, DeviceStart};

pub fn router() -> Router<Arc<ApiState>> {
    // Answers carry tokens or codes: never cached (RFC 6749 §5.1).
    let no_store = axum::middleware::map_response(|mut r: axum::response::Response| async move {
        r.headers_mut().insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
        r
    });
    Router::new()
        .route("/login", get(describe))
        .route("/login/start", post(start))
        .route("/login/finish", post(finish))
        .route("/login/device", post(device))
        .route("/login/device/poll", post(device_poll))
        .route("/logout", post(logout))
        .layer(no_store)
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized(m) => ApiError::new(StatusCode::UNAUTHORIZED, m),
            AuthError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
        }
    }
}

fn identity(state: &ApiState) -> Result<&Arc<Identity>, ApiError> {
    state.identity.oidc().map(|_| &state.identity).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "this pglease has no identity provider ([identity.oidc]); use a token from an admin (PGLEASE_ADMIN_TOKEN)")
    })
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// A session token and who it stands for; the token is shown this once.
#[derive(Serialize, Deserialize)]
pub struct LoginView {
    pub token: String,
    pub person: String,
    pub roles: Vec<crate::config::Role>,
    pub groups: Vec<String>,
    #[serde(with = "crate::time::serde_rfc3339")]
    pub expires_at: SystemTime,
}

impl From<NewLogin> for LoginView {
    fn from(n: NewLogin) -> Self {
        let l = n.login;
        LoginView { token: n.token, person: l.person, roles: l.roles.into_iter().collect(), groups: l.groups.into_iter().collect(), expires_at: l.expires_at }
    }
}

async fn describe(State(state): State<Arc<ApiState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let id = identity(&state)?;
    let issuer = id.oidc().map(|o| o.config().issuer.clone());
    Ok(Json(serde_json::json!({ "issuer": issuer })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    pub redirect_uri: String,
    pub state: String,
    pub nonce: String,
    pub code_challenge: String,
}

/// RFC 7636's unreserved characters, `min..=max` of them.
fn unreserved(text: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Only a loopback redirect (RFC 8252 §7.3): the browser hands the code to a program on the
/// person's own machine, never to a host a caller names.
fn loopback_redirect(uri: &str) -> Result<(), ApiError> {
    let url = url::Url::parse(uri).map_err(|e| bad(format!("redirect_uri: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        _ => false,
    };
    if url.scheme() != "http" || !loopback || url.port().is_none() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad("redirect_uri must be http://127.0.0.1:PORT/… or http://[::1]:PORT/… (a loopback redirect)"));
    }
    Ok(())
}

async fn start(State(state): State<Arc<ApiState>>, Json(body): Json<StartBody>) -> Result<Json<serde_json::Value>, ApiError> {
    let id = identity(&state)?;
    loopback_redirect(&body.redirect_uri)?;
    if !unreserved(&body.state, 16, 128) || !unreserved(&body.nonce, 16, 128) {
        return Err(bad("state and nonce must be 16 to 128 unreserved characters"));
    }
    if !unreserved(&body.code_challenge, 43, 43) {
        return Err(bad("code_challenge must be an S256 PKCE challenge (43 characters)"));
    }
    let url = id.call_anonymous(move |o| o.authorize_url(&body.redirect_uri, &body.state, &body.nonce, &body.code_challenge)).await?;
    Ok(Json(serde_json::json!({ "authorize_url": url })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishBody {
    pub code: String,
    pub code_verifier: String,
    pub redirect_uri: String,
    pub nonce: String,
}

async fn finish(State(state): State<Arc<ApiState>>, Json(body): Json<FinishBody>) -> Result<Json<LoginView>, ApiError> {
    let id = identity(&state)?;
    loopback_redirect(&body.redirect_uri)?;
    if !unreserved(&body.code_verifier, 43, 128) {
        return Err(bad("code_verifier must be 43 to 128 unreserved characters"));
    }
    if body.code.is_empty() || body.code.len() > 2048 {
        return Err(bad("code is missing or too long"));
    }
    let signed = id.call_anonymous(move |o| o.finish_code(&body.code, &body.code_verifier, &body.redirect_uri, &body.nonce)).await?;
    Ok(Json(id.sign_in(signed, &state.people.load()).await?.into()))
}

async fn device(State(state): State<Arc<ApiState>>) -> Result<Json<DeviceStart>, ApiError> {
    let id = identity(&state)?;
    if id.oidc().is_some_and(|o| !o.config().device_flow) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "the device flow is turned off here (identity.oidc.device_flow); sign in on a machine with a browser"));
    }
    Ok(Json(id.call_anonymous(|o| o.start_device()).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollBody {
    pub device_code: String,
}

async fn device_poll(State(state): State<Arc<ApiState>>, Json(body): Json<PollBody>) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let id = identity(&state)?;
    if id.oidc().is_some_and(|o| !o.config().device_flow) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "the device flow is turned off here (identity.oidc.device_flow)"));
    }
    if body.device_code.is_empty() || body.device_code.len() > 2048 {
        return Err(bad("device_code is missing or too long"));
    }
    match id.call_anonymous(move |o| o.poll_device(&body.device_code)).await? {
        DevicePoll::Pending { slow_down } => Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "pending": true, "slow_down": slow_down })))),
        DevicePoll::Done(signed) => {
            let view = LoginView::from(id.sign_in(signed, &state.people.load()).await?);
            Ok((StatusCode::OK, Json(serde_json::to_value(view).expect("serializes"))))
        }
    }
}

/// Ends the session the bearer token stands for (`pglease logout`): by its hash, without
/// authenticating it first (so a sign-out works while the identity provider is away). A token
/// that is not a session token has nothing to end.
async fn logout(State(state): State<Arc<ApiState>>, headers: axum::http::HeaderMap) -> Result<Json<serde_json::Value>, ApiError> {
    let token = super::api::bearer(&headers).ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
    if !token.starts_with(crate::identity::logins::TOKEN_PREFIX) {
        return Err(bad("only a session token (from pglease login) can be signed out; static tokens are removed from [people]"));
    }
    state.identity.sign_out(token).await?;
    Ok(Json(serde_json::json!({ "signed_out": true })))
}
