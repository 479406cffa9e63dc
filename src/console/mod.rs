//! The web console on the admin listener: sign-in, the approvals inbox, grants, live sessions,
//! the audit timeline and scopes, for approvers, operators and auditors.
//!
//! Pages are rendered on the server (`maud`: HTML is escaped by construction) and work as
//! plain forms; one small script (`static/console.js`) adds what plain HTML cannot: the live
//! session table (server-sent events) and countdowns. Who may do what is decided where the
//! JSON API decides it ([`crate::grants::GrantService`], [`crate::admin::api`]): the console
//! only renders.
//!
//! - [`auth`]: the session cookie, CSRF tokens, sign-in with a token or the identity provider.
//! - [`page`]: the page shell and shared pieces.
//! - [`grants`], [`sessions`], [`audit`], [`scopes`]: the pages.
//! - [`charts`]: server-side SVG charts.

pub mod audit;
pub mod auth;
pub mod charts;
pub mod grants;
pub mod page;
pub mod scopes;
pub mod sessions;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::admin::api::ApiState;

/// Live session views open at once, over all viewers.
pub const MAX_LIVE_STREAMS: usize = 64;

/// What the console keeps between requests.
pub struct ConsoleState {
    /// Reads of the audit log at once (each may read a large file).
    pub audit_reads: tokio::sync::Semaphore,
    /// The overview's chart data, and when it was read.
    pub charts: std::sync::Mutex<Option<(std::time::Instant, audit::ChartData)>>,
}

impl Default for ConsoleState {
    fn default() -> Self {
        Self { audit_reads: tokio::sync::Semaphore::new(2), charts: std::sync::Mutex::new(None) }
    }
}

/// What every console response says about itself: no inline script or style, no framing, no
/// referrer to other sites, no caching of pages that show grants and sessions.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(response: Response) -> Response {
    let mut response = response;
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Not "no-referrer": with it, browsers send `Origin: null` on the console's own form
    // posts, which the origin check must refuse.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

pub fn router(state: Arc<ApiState>) -> Router<crate::admin::AdminState> {
    Router::new()
        .route("/", get(grants::inbox))
        .route("/grants", get(grants::list))
        .route("/grants/{id}", get(grants::show))
        .route("/grants/{id}/approve", post(grants::approve))
        .route("/grants/{id}/deny", post(grants::deny))
        .route("/grants/{id}/revoke", post(grants::revoke))
        .route("/sessions", get(sessions::list))
        .route("/sessions/live", get(sessions::live))
        .route("/sessions/{id}/kill", post(sessions::kill))
        .route("/audit", get(audit::sessions))
        .route("/audit/sessions/{id}", get(audit::timeline))
        .route("/scopes", get(scopes::list))
        .route("/scopes/{name}", get(scopes::show))
        .route("/scopes/{name}/check", post(scopes::check).layer(axum::extract::DefaultBodyLimit::max(scopes::MAX_CHECK_BYTES * 4)))
        .route("/login", get(auth::login_page).post(auth::login_with_token))
        .route("/auth/start", get(auth::oidc_start))
        .route("/auth/callback", get(auth::oidc_callback))
        .route("/logout", post(auth::logout))
        .route("/static/console.css", get(stylesheet))
        .route("/static/console.js", get(script))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::map_response_with_state(state.clone(), transport_security))
        .with_state(state)
}

/// Behind https (`admin.public_url`), browsers are told to come back only over https.
async fn transport_security(axum::extract::State(state): axum::extract::State<Arc<ApiState>>, mut response: Response) -> Response {
    if state.console_url.starts_with("https://") {
        response.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    }
    response
}

async fn stylesheet() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], include_str!("static/console.css"))
}

async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], include_str!("static/console.js"))
}
