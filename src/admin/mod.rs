//! The admin HTTP listener: `/metrics` (Prometheus text format), `/healthz` (the process is
//! up; what it knows of its control plane), `/readyz` (it can take logins now: a load balancer
//! drains it while this is 503), the JSON API for grants, sessions and scopes under `/api`
//! ([`api`]), and the web console everywhere else ([`crate::console`]).

pub mod api;
pub mod login;

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::session::SessionRegistry;

/// The process-wide Prometheus recorder (the `metrics` facade has one global recorder).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
                .expect("static bucket list is valid")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe_metrics();
            handle
        })
        .clone()
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("pglease_connections_accepted_total", "TCP connections accepted on the proxy listener");
    describe_counter!("pglease_connections_rejected_total", "connections refused before a session started, by reason");
    describe_counter!("pglease_auth_failures_total", "failed client logins");
    describe_gauge!("pglease_sessions_active", "client sessions relaying now");
    describe_counter!("pglease_sessions_ended_total", "sessions ended, by reason");
    describe_counter!("pglease_bytes_total", "bytes relayed, by direction");
    describe_counter!("pglease_messages_total", "protocol messages relayed, by direction");
    describe_counter!("pglease_errors_total", "ErrorResponses sent to clients: from Postgres, or refusals by pglease");
    describe_counter!("pglease_cancel_requests_total", "cancel requests, by result");
    describe_histogram!("pglease_query_duration_seconds", "time from a query or Sync to its ReadyForQuery");
    describe_histogram!("pglease_handshake_duration_seconds", "time from accept to the session's first ReadyForQuery");
    describe_gauge!("pglease_control_plane_up", "1 while the control plane's change feed is live and its grants were read, else 0");
    describe_counter!("pglease_control_plane_reconnects_total", "times the control plane's change feed was lost");
    describe_counter!("pglease_control_plane_failures_total", "failed control-plane writes, by what was written");
    describe_counter!("pglease_logins_refused_stale_total", "logins refused because this instance could not tell whether grants are current");
}

#[derive(Clone)]
pub struct AdminState {
    pub metrics: PrometheusHandle,
    pub sessions: Arc<SessionRegistry>,
    /// Grants, people and scopes; without them only `/metrics` and `/healthz` are served.
    pub api: Option<Arc<api::ApiState>>,
}

pub fn router(state: AdminState) -> Router {
    let mut router = Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).route("/readyz", get(readyz));
    if let Some(api) = &state.api {
        router = router.nest("/api", api::router(api.clone())).merge(crate::console::router(api.clone()));
    }
    router.with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> String {
    state.metrics.render()
}

/// The control plane as this instance sees it: `None` without one, else whether its grants
/// are current.
fn control_plane(state: &AdminState) -> Option<bool> {
    let api = state.api.as_ref()?;
    api.fleet.get()?;
    Some(!api.grants.is_stale())
}

async fn healthz(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let mut body = serde_json::json!({ "status": "ok", "sessions": state.sessions.len() });
    if let Some(up) = control_plane(&state) {
        body["control_plane"] = serde_json::json!(if up { "up" } else { "unreachable" });
        if let Some(fleet) = state.api.as_ref().and_then(|a| a.fleet.get()) {
            body["instance"] = serde_json::json!(fleet.instance);
        }
    }
    Json(body)
}

/// 200 while this instance takes logins; 503 while it refuses them because it cannot tell
/// whether grants are current, so a load balancer sends clients elsewhere.
async fn readyz(State(state): State<AdminState>) -> (StatusCode, Json<serde_json::Value>) {
    let not_serving = state.api.as_ref().and_then(|a| a.fleet.get()).and_then(|f| f.not_serving());
    let why = match (control_plane(&state), not_serving) {
        (Some(false), _) => "the control plane cannot be reached; new logins are refused".to_owned(),
        (_, Some(why)) => why,
        _ => return (StatusCode::OK, Json(serde_json::json!({ "ready": true }))),
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "ready": false, "why": why })))
}

/// Serves the admin API until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}
