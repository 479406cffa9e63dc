//! Live sessions: who is connected through pglease now, kept current in the page by
//! server-sent events (the table's rows are sent again whenever they change), and ended with
//! the same call as `pglease session kill`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::auth::Viewer;
use super::grants::Done;
use super::page::{self, notice, page};
use crate::admin::api::{self, ApiState, SessionView};

/// How often the live table is looked at for changes.
const LIVE_EVERY: Duration = Duration::from_secs(1);
/// A stream ends after this long; the browser opens a new one (and is authenticated again).
const LIVE_FOR: Duration = Duration::from_secs(300);

/// A time the browser shows as "3 min ago" (so the rows do not change every second).
fn since(rfc3339: &str) -> Markup {
    html! { time datetime=(rfc3339) title=(rfc3339) data-ago=(rfc3339) { (rfc3339.get(11..19).unwrap_or(rfc3339)) } }
}

fn rows(viewer: &Viewer, sessions: &[SessionView], fleet: bool) -> Markup {
    let kill = viewer.who.can_approve();
    html! {
        @if sessions.is_empty() {
            tr.empty { td colspan="9" { "No live sessions." } }
        }
        @for s in sessions {
            tr id={ "session-" @if let Some(i) = &s.instance { (i) "-" } (s.id) } {
                td { (s.id) }
                @if fleet { td { (s.instance.as_deref().unwrap_or("")) } }
                td.person { (s.user) }
                td { @if let Some(g) = &s.grant { code { (g) } } }
                td { (s.scope.as_deref().unwrap_or("—")) }
                td { (s.database) }
                td { (s.client) }
                td { (since(&s.since)) }
                td { (s.statements) @if let Some(at) = &s.last_statement { span.muted { ", last " (since(at)) } } }
                td {
                    @if kill {
                        form.inline.kill method="post" action={ "/sessions/" (s.id) "/kill" } {
                            input type="hidden" name="csrf" value=(viewer.csrf);
                            @if let Some(i) = &s.instance { input type="hidden" name="instance" value=(i); }
                            button.danger type="submit" aria-label={ "End session " (s.id) " of " (s.user) } { "Kill" }
                        }
                    }
                }
            }
        }
    }
}

async fn render(state: &ApiState, viewer: &Viewer, done: &Done) -> Response {
    let sessions = match api::sessions_of(state, &viewer.who, false).await {
        Ok(s) => s,
        Err(e) => return page::error_page(Some(viewer), e.status(), e.message()),
    };
    let fleet = state.fleet.get().is_some();
    let body = html! {
        (notice(done.ok.as_deref(), done.id.as_deref()))
        p.muted #live-status role="status" { "This list updates by itself." }
        div.table-wrap {
            table #sessions {
                caption.visually-hidden { "Live sessions" }
                thead { tr {
                    th scope="col" { "Session" }
                    @if fleet { th scope="col" { "Instance" } }
                    th scope="col" { "Person" } th scope="col" { "Grant" } th scope="col" { "Scope" } th scope="col" { "Database" }
                    th scope="col" { "Client" } th scope="col" { "Started" } th scope="col" { "Statements" }
                    th scope="col" { span.visually-hidden { "Actions" } }
                } }
                tbody #sessions-body data-live="/sessions/live" { (rows(viewer, &sessions, fleet)) }
            }
        }
    };
    page(viewer, "/sessions", "Live sessions", body).into_response()
}

pub async fn list(State(state): State<Arc<ApiState>>, viewer: Viewer, Query(done): Query<Done>) -> Response {
    render(&state, &viewer, &done).await
}

/// The table's rows as server-sent events (`sessions`), sent when they change. The viewer
/// is authenticated again at every look (a sign-out or a lost role ends the stream), and the
/// stream ends when pglease stops or after [`LIVE_FOR`].
pub async fn live(State(state): State<Arc<ApiState>>, viewer: Viewer, headers: axum::http::HeaderMap) -> Result<impl IntoResponse, Response> {
    if let Err(e) = api::sessions_of(&state, &viewer.who, true).await {
        return Err(page::error_page(Some(&viewer), e.status(), e.message()));
    }
    let Ok(permit) = state.live_streams.clone().try_acquire_owned() else {
        return Err(page::error_page(Some(&viewer), axum::http::StatusCode::SERVICE_UNAVAILABLE, "Too many live views are open; reload later."));
    };
    let token = super::auth::session_token(&headers).unwrap_or_default();
    let until = tokio::time::Instant::now() + LIVE_FOR;
    let shutdown = state.shutdown.clone();
    let stream = futures_util::stream::unfold((state, viewer, token, String::new(), permit), move |(state, viewer, token, last, permit)| async move {
        loop {
            if tokio::time::Instant::now() >= until || state.shutdown.is_cancelled() {
                return None;
            }
            let people = state.people.load_full();
            let who = match state.identity.authenticate(&token, &people).await {
                Some(Ok(who)) if who.can_read_all() => who,
                _ => return None,
            };
            let fleet = state.fleet.get().is_some();
            // A control plane that cannot be read now: show this instance's sessions.
            let sessions = match api::sessions_of(&state, &who, false).await {
                Ok(s) => s,
                Err(_) => api::sessions_of(&state, &who, true).await.unwrap_or_default(),
            };
            let html = rows(&viewer, &sessions, fleet).into_string();
            if html != last {
                let event = Event::default().event("sessions").data(html.clone());
                return Some((Ok::<_, Infallible>(event), (state, viewer, token, html, permit)));
            }
            tokio::select! {
                _ = tokio::time::sleep(LIVE_EVERY) => {}
                _ = state.shutdown.cancelled() => return None,
            }
        }
    });
    let stream = futures_util::StreamExt::take_until(stream, async move { shutdown.cancelled().await });
    // Proxies in front (nginx) must pass events on as they come.
    Ok(([("x-accel-buffering", "no")], Sse::new(stream).keep_alive(KeepAlive::default())))
}

#[derive(Deserialize)]
pub struct KillForm {
    #[serde(default)]
    pub csrf: String,
    pub instance: Option<String>,
}

pub async fn kill(State(state): State<Arc<ApiState>>, viewer: Viewer, Path(id): Path<u64>, Form(form): Form<KillForm>) -> Response {
    if let Err(r) = viewer.check_csrf(&form.csrf) {
        return r;
    }
    match api::kill(&state, &viewer.who, id, form.instance.as_deref().filter(|i| !i.is_empty())).await {
        Ok(_) => Redirect::to(&format!("/sessions?ok=killed&id={id}")).into_response(),
        Err(e) => page::error_page(Some(&viewer), e.status(), e.message()),
    }
}
