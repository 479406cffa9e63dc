//! The admin JSON API: grants, sessions, scopes. Every call carries
//! `Authorization: Bearer <token>`; the token maps to a person and their roles. A missing or
//! unknown token is `401`, a known person without the right role `403`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::config::Role;
use crate::control_plane::fleet::{Fleet, KillError};
use crate::events::{Event, Events};
use crate::error::{ClientError, sqlstate};
use crate::grants::{GrantError, GrantRequest, GrantService, GrantView, NewGrant, StoreError};
use crate::people::{People, Principal};
use crate::session::SessionRegistry;

pub struct ApiState {
    pub grants: Arc<GrantService>,
    /// Swapped whole by a config reload.
    pub people: arc_swap::ArcSwap<People>,
    pub sessions: Arc<SessionRegistry>,
    pub events: Events,
    /// `host` and `port` clients use to reach the proxy, for the ready-made psql line.
    pub proxy_host: String,
    pub proxy_port: u16,
    /// The CA clients verify the proxy's certificate with (`listen.tls_ca`), if known: the psql
    /// line then says `sslmode=verify-full sslrootcert=…`.
    pub client_ca: Option<std::path::PathBuf>,
    /// The fleet this instance is part of, with a control plane (set once it listens).
    pub fleet: std::sync::OnceLock<Arc<Fleet>>,
    /// Sign-ins: the identity provider's (`[identity.oidc]`) and the console's.
    pub identity: Arc<crate::identity::Identity>,
    /// The console's address as browsers reach it (`admin.public_url`, else the bound address).
    pub console_url: String,
    /// Fires when the instance stops: long-lived answers (the console's live streams) end.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// At most this many live streams at once (each reads the sessions every second).
    pub live_streams: Arc<tokio::sync::Semaphore>,
    /// The console's caches and limits.
    pub console: crate::console::ConsoleState,
    /// The control plane's connection string (with its password: never shown), for the
    /// console's audit pages to read every instance's chain from `pglease.audit`.
    pub control_plane: Option<String>,
    /// This instance's audit log and anchor, for the console's audit pages.
    pub audit_log: std::path::PathBuf,
    pub audit_anchor: Option<std::path::PathBuf>,
    /// The proxy's policies in force, for the console's scope check to decide with what the
    /// proxy knows of the tables.
    pub proxy: Arc<crate::server::Proxy>,
}

impl ApiState {
    pub fn set_fleet(&self, fleet: Arc<Fleet>) {
        let _ = self.fleet.set(fleet);
    }
}

pub fn router(state: Arc<ApiState>) -> Router<super::AdminState> {
    Router::new()
        .route("/grants", get(list_grants).post(request_grant))
        .route("/grants/issue", post(issue_grant))
        .route("/grants/{id}", get(show_grant))
        .route("/grants/{id}/approve", post(approve_grant))
        .route("/grants/{id}/deny", post(deny_grant))
        .route("/grants/{id}/revoke", post(revoke_grant))
        .route("/grants/{id}/secret", post(take_secret))
        .route("/sessions", get(list_sessions))
        .route("/sessions/{id}/kill", post(kill_session))
        .route("/whoami", get(whoami))
        .route("/scopes", get(list_scopes))
        .route("/scopes/{name}", get(show_scope))
        .merge(super::login::router())
        .with_state(state)
}

/// An API error: a status and a message.
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into())
    }

    pub fn status(&self) -> StatusCode {
        self.0
    }

    pub fn message(&self) -> &str {
        &self.1
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<GrantError> for ApiError {
    fn from(e: GrantError) -> Self {
        let status = match &e {
            GrantError::Invalid(_) => StatusCode::BAD_REQUEST,
            GrantError::Forbidden(_) => StatusCode::FORBIDDEN,
            GrantError::NotFound(_) => StatusCode::NOT_FOUND,
            GrantError::Conflict(_) | GrantError::Store(StoreError::Conflict(_)) => StatusCode::CONFLICT,
            GrantError::Store(inner) => {
                tracing::error!(error = %inner, "grant store failure");
                return ApiError(StatusCode::SERVICE_UNAVAILABLE, "the grant store cannot be reached; the change may not have been recorded (read the grant again)".into());
            }
        };
        ApiError(status, e.to_string())
    }
}

/// The authenticated caller.
pub struct Caller(pub Principal);

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<ApiState>) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or_else(|| {
            let how = if state.identity.oidc().is_some() { "run pglease login, or set PGLEASE_ADMIN_TOKEN" } else { "set PGLEASE_ADMIN_TOKEN" };
            ApiError(StatusCode::UNAUTHORIZED, format!("missing bearer token ({how})"))
        })?;
        let people = state.people.load_full();
        if let Some(who) = people.authenticate(token) {
            return Ok(Caller(who));
        }
        if let Some(result) = state.identity.authenticate(token, &people).await {
            return result.map(Caller).map_err(ApiError::from);
        }
        Err(ApiError(StatusCode::UNAUTHORIZED, "unknown token".into()))
    }
}

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
    (!token.is_empty()).then_some(token)
}

pub fn require(who: &Principal, ok: bool, what: &str) -> Result<(), ApiError> {
    if ok { Ok(()) } else { Err(ApiError(StatusCode::FORBIDDEN, format!("{} may not {what}", who.person))) }
}

fn parse_duration(text: &str) -> Result<Duration, ApiError> {
    humantime::parse_duration(text).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid duration {text:?}: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestBody {
    pub scope: String,
    /// e.g. "30m", "2h".
    pub duration: String,
    pub reason: String,
    pub user: Option<String>,
    #[serde(default)]
    pub break_glass: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    pub user: String,
    pub scope: String,
    pub duration: String,
    pub reason: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    #[serde(default)]
    pub reason: String,
}

/// A new grant, with its one-time secret when the caller is its user.
#[derive(Serialize, Deserialize)]
pub struct NewGrantView {
    #[serde(flatten)]
    pub grant: GrantView,
    /// The secret, shown this once; only its SCRAM verifier is stored. Absent for a grant made
    /// for someone else: its user takes one with `POST /grants/{id}/secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A ready-to-run psql command line (without the password).
    pub psql: String,
    /// The same, as parts: where clients reach the proxy, and the CA its certificate is
    /// verified with (a path on the proxy's host; absent when the config names none).
    pub host: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<String>,
}

fn new_grant_view(state: &ApiState, new: NewGrant) -> NewGrantView {
    let g = &new.grant;
    let tls = match &state.client_ca {
        Some(ca) => format!("sslmode=verify-full sslrootcert={}", ca.display()),
        None => "sslmode=require".to_owned(),
    };
    let psql = format!("psql \"host={} port={} user={} dbname={} {tls}\"", state.proxy_host, state.proxy_port, g.login, g.database);
    NewGrantView {
        grant: GrantView::of(g, SystemTime::now()),
        password: new.secret,
        psql,
        host: state.proxy_host.clone(),
        port: state.proxy_port,
        sslrootcert: state.client_ca.as_ref().map(|p| p.display().to_string()),
    }
}

async fn take_secret(State(state): State<Arc<ApiState>>, Caller(who): Caller, Path(id): Path<String>) -> Result<Json<NewGrantView>, ApiError> {
    let new = state.grants.take_secret(&who, &id).await?;
    Ok(Json(new_grant_view(&state, new)))
}

async fn request_grant(State(state): State<Arc<ApiState>>, Caller(who): Caller, Json(body): Json<RequestBody>) -> Result<(StatusCode, Json<NewGrantView>), ApiError> {
    let duration = parse_duration(&body.duration)?;
    let new = state
        .grants
        .request(&who, GrantRequest { scope: body.scope, duration, reason: body.reason, user: body.user, break_glass: body.break_glass })
        .await?;
    Ok((StatusCode::CREATED, Json(new_grant_view(&state, new))))
}

async fn issue_grant(State(state): State<Arc<ApiState>>, Caller(who): Caller, Json(body): Json<IssueBody>) -> Result<(StatusCode, Json<NewGrantView>), ApiError> {
    let duration = parse_duration(&body.duration)?;
    let new = state.grants.issue(&who, &body.user, &body.scope, duration, &body.reason).await?;
    Ok((StatusCode::CREATED, Json(new_grant_view(&state, new))))
}

async fn approve_grant(State(state): State<Arc<ApiState>>, Caller(who): Caller, Path(id): Path<String>) -> Result<Json<GrantView>, ApiError> {
    let g = state.grants.approve(&who, &id).await?;
    Ok(Json(GrantView::of(&g, SystemTime::now())))
}

async fn deny_grant(State(state): State<Arc<ApiState>>, Caller(who): Caller, Path(id): Path<String>, body: Option<Json<ReasonBody>>) -> Result<Json<GrantView>, ApiError> {
    let reason = body.map(|b| b.0.reason).unwrap_or_default();
    let g = state.grants.deny(&who, &id, &reason).await?;
    Ok(Json(GrantView::of(&g, SystemTime::now())))
}

async fn revoke_grant(State(state): State<Arc<ApiState>>, Caller(who): Caller, Path(id): Path<String>, Json(body): Json<ReasonBody>) -> Result<Json<GrantView>, ApiError> {
    let g = state.grants.revoke(&who, &id, &body.reason).await?;
    Ok(Json(GrantView::of(&g, SystemTime::now())))
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub active: bool,
}

async fn list_grants(State(state): State<Arc<ApiState>>, Caller(who): Caller, Query(q): Query<ListQuery>) -> Json<Vec<GrantView>> {
    Json(state.grants.list(&who, q.active))
}

async fn show_grant(State(state): State<Arc<ApiState>>, Caller(who): Caller, Path(id): Path<String>) -> Result<Json<GrantView>, ApiError> {
    Ok(Json(state.grants.show_with_reads(&who, &id).await?))
}

pub use crate::session::SessionView;

fn control_plane_down(e: String) -> ApiError {
    tracing::error!(error = %e, "control plane failure");
    ApiError(StatusCode::SERVICE_UNAVAILABLE, "the control plane cannot be reached, so the fleet's sessions are not known here now (session list --local shows this instance's; session kill --instance ID ends one of them)".into())
}

/// Every live session: this instance's, and with a control plane the whole fleet's.
#[derive(Deserialize, Default)]
pub struct SessionsQuery {
    /// Only this instance's sessions (they need no control plane).
    #[serde(default)]
    pub local: bool,
}

async fn list_sessions(State(state): State<Arc<ApiState>>, Caller(who): Caller, Query(q): Query<SessionsQuery>) -> Result<Json<Vec<SessionView>>, ApiError> {
    sessions_of(&state, &who, q.local).await.map(Json)
}

/// The live sessions `who` may see: this instance's, and with a control plane (unless
/// `local`) the whole fleet's. The JSON API and the console both answer with this.
pub async fn sessions_of(state: &ApiState, who: &Principal, local: bool) -> Result<Vec<SessionView>, ApiError> {
    require(who, who.can_read_all(), "list sessions")?;
    if let Some(fleet) = state.fleet.get() {
        return if local { Ok(fleet.local()) } else { fleet.list().await.map_err(control_plane_down) };
    }
    Ok(state.sessions.list().iter().map(|h| SessionView::of(h, None)).collect())
}

#[derive(Deserialize)]
pub struct KillQuery {
    /// The instance the session is on, when its number alone is ambiguous in the fleet.
    pub instance: Option<String>,
}

async fn kill_session(State(state): State<Arc<ApiState>>, Caller(who): Caller, Path(id): Path<u64>, Query(q): Query<KillQuery>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(match kill(&state, &who, id, q.instance.as_deref()).await? {
        Some(instance) => serde_json::json!({ "killed": id, "instance": instance }),
        None => serde_json::json!({ "killed": id }),
    }))
}

/// Ends a session; with a control plane, on whichever instance has it (returned).
pub async fn kill(state: &ApiState, who: &Principal, id: u64, instance: Option<&str>) -> Result<Option<String>, ApiError> {
    require(who, who.has(Role::Approver), "kill sessions")?;
    // With a control plane the instance that has the session ends it and records the event.
    match state.fleet.get() {
        Some(fleet) => Ok(Some(fleet.kill(id, instance, &who.person).await.map_err(|e| match e {
            KillError::NotFound(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            KillError::Ambiguous { .. } => ApiError(StatusCode::CONFLICT, e.to_string()),
            KillError::Unavailable(why) => control_plane_down(why),
        })?)),
        None => {
            let handle = state.sessions.get(id).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no live session {id}")))?;
            handle.kill(ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, format!("pglease: session {id} was ended by {}", who.person)));
            state.events.emit(Event::SessionKilled { session: id, by: who.person.clone() });
            Ok(None)
        }
    }
}

/// The caller as the API knows them (person, roles, groups), and where clients reach the
/// proxy (`pglease connect` reads it).
async fn whoami(State(state): State<Arc<ApiState>>, Caller(who): Caller) -> Json<serde_json::Value> {
    let proxy = serde_json::json!({ "host": state.proxy_host, "port": state.proxy_port, "sslrootcert": state.client_ca.as_ref().map(|p| p.display().to_string()) });
    Json(serde_json::json!({ "person": who.person, "roles": who.roles, "groups": who.groups, "proxy": proxy }))
}

async fn list_scopes(State(state): State<Arc<ApiState>>, Caller(_who): Caller) -> Json<Vec<crate::scopes::Scope>> {
    Json(state.grants.scopes().all().cloned().collect())
}

async fn show_scope(State(state): State<Arc<ApiState>>, Caller(_who): Caller, Path(name): Path<String>) -> Result<Json<crate::scopes::Scope>, ApiError> {
    state.grants.scopes().get(&name).cloned().map(Json).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no scope named {name:?}")))
}
