//! The approvals inbox (the console's front page) and the grants list, with the actions on
//! them: approve, deny (with a reason), revoke or withdraw. Each action is the grant
//! service's own call, so the console allows exactly what the API allows.

use std::sync::Arc;
use std::time::Duration;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::auth::Viewer;
use super::page::{self, ago, countdown, notice, page};
use crate::admin::api::ApiState;
use crate::grants::{GrantError, GrantStatus, GrantView};

#[derive(Deserialize, Default)]
pub struct Done {
    pub ok: Option<String>,
    pub id: Option<String>,
}

/// A refused action as a page: the status and message the JSON API gives (a store failure is
/// logged there and shown without its internals).
fn grant_error(viewer: &Viewer, e: GrantError) -> Response {
    let e = crate::admin::api::ApiError::from(e);
    page::error_page(Some(viewer), e.status(), e.message())
}

fn duration_text(secs: u64) -> String {
    crate::time::human_duration(Duration::from_secs(secs))
}

/// The front page: what waits for the viewer's decision (for an engineer, their own requests),
/// and a summary of what is live.
pub async fn inbox(State(state): State<Arc<ApiState>>, viewer: Viewer, Query(done): Query<Done>) -> Markup {
    let who = &viewer.who;
    let all = state.grants.list(who, false);
    let pending: Vec<&GrantView> = all.iter().filter(|g| g.status == GrantStatus::Pending).collect();
    let (mine, others): (Vec<&GrantView>, Vec<&GrantView>) = pending.iter().partition(|g| g.user == who.person || g.requested_by == who.person);
    let decidable: Vec<&GrantView> = others.iter().copied().filter(|g| state.grants.may_decide(who, g)).collect();
    let active = all.iter().filter(|g| g.status == GrantStatus::Active).count();
    let sessions = if who.can_read_all() { Some(state.sessions.len()) } else { None };
    let body = html! {
        (notice(done.ok.as_deref(), done.id.as_deref()))
        ul.stats aria-label="Summary" {
            li { strong #stat-pending { (decidable.len()) } " waiting for you" }
            li { strong { (active) } " active grants" }
            @if let Some(n) = sessions { li { strong { (n) } " live sessions on this instance" } }
        }
        @if who.can_approve() {
            section aria-labelledby="inbox-h" {
                h2 #inbox-h { "Waiting for your decision" }
                @if decidable.is_empty() {
                    p.empty #inbox-empty { "Nothing to decide." }
                } @else {
                    ul.cards #inbox {
                        @for g in &decidable { (request_card(&state, &viewer, g)) }
                    }
                }
                @if others.len() > decidable.len() {
                    p.muted { (others.len() - decidable.len()) " other pending requests need approvers of other groups." }
                }
            }
        }
        section aria-labelledby="mine-h" {
            h2 #mine-h { "Your requests" }
            @if mine.is_empty() {
                p.empty { "You have no pending requests. Ask for one with " code { "pglease connect SCOPE --reason \"…\"" } "." }
            } @else {
                ul.cards #my-requests {
                    @for g in &mine { (request_card(&state, &viewer, g)) }
                }
            }
        }
        (super::audit::overview_charts(&state, &viewer).await)
    };
    page(&viewer, "/", "Inbox", body)
}

/// One pending request, with the actions the viewer may take on it.
fn request_card(state: &ApiState, viewer: &Viewer, g: &GrantView) -> Markup {
    let scope = state.grants.scopes().get(&g.scope).cloned();
    let may_decide = state.grants.may_decide(&viewer.who, g);
    html! {
        li.card.request id={ "request-" (g.id) } .break-glass[g.break_glass] {
            div.card-head {
                strong.person { (g.user) } " asks for "
                a.scope href={ "/scopes/" (g.scope) } { (g.scope) }
                " for " (duration_text(g.duration_secs))
                @if g.break_glass { " " span.badge.alert { "break-glass" } }
            }
            blockquote.reason { (g.reason) }
            p.muted {
                "Requested " (ago(&g.requested_at))
                @if g.requested_by != g.user { " by " (g.requested_by) }
                " · grant " code { (g.id) }
                @if let Some(s) = &scope { " · database " (s.database) " · role " code { (s.role) } }
            }
            @if let Some(s) = &scope {
                details.rules {
                    summary { "What " (s.name) " allows" }
                    (super::scopes::rules_table(s))
                }
            }
            div.actions {
                @if may_decide {
                    form.inline method="post" action={ "/grants/" (g.id) "/approve" } {
                        input type="hidden" name="csrf" value=(viewer.csrf);
                        button.primary.approve type="submit" { "Approve" }
                    }
                    form.inline.deny method="post" action={ "/grants/" (g.id) "/deny" } {
                        input type="hidden" name="csrf" value=(viewer.csrf);
                        label.visually-hidden for={ "deny-reason-" (g.id) } { "Reason for denying" }
                        input id={ "deny-reason-" (g.id) } type="text" name="reason" placeholder="Reason (optional)";
                        button.danger.deny type="submit" { "Deny" }
                    }
                }
                @if g.user == viewer.who.person {
                    form.inline method="post" action={ "/grants/" (g.id) "/revoke" } {
                        input type="hidden" name="csrf" value=(viewer.csrf);
                        input type="hidden" name="reason" value="withdrawn by the requester";
                        button.withdraw type="submit" { "Withdraw" }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize, Default)]
pub struct Filter {
    /// pending, active, past, or all (default: active and pending).
    pub status: Option<String>,
    pub scope: Option<String>,
    pub person: Option<String>,
    pub ok: Option<String>,
    pub id: Option<String>,
}

/// Grants: current ones by default, past ones on request, filtered by scope and person.
pub async fn list(State(state): State<Arc<ApiState>>, viewer: Viewer, Query(f): Query<Filter>) -> Markup {
    let status = f.status.clone().unwrap_or_else(|| "current".into());
    let empty = |o: &Option<String>| o.as_deref().filter(|s| !s.is_empty()).map(str::to_owned);
    let (scope, person) = (empty(&f.scope), empty(&f.person));
    let mut grants: Vec<GrantView> = state
        .grants
        .list(&viewer.who, false)
        .into_iter()
        .filter(|g| match status.as_str() {
            "pending" => g.status == GrantStatus::Pending,
            "active" => g.status == GrantStatus::Active,
            "past" => !matches!(g.status, GrantStatus::Pending | GrantStatus::Active),
            "all" => true,
            _ => matches!(g.status, GrantStatus::Pending | GrantStatus::Active),
        })
        .filter(|g| scope.as_ref().is_none_or(|s| &g.scope == s))
        .filter(|g| person.as_ref().is_none_or(|p| &g.user == p))
        .collect();
    grants.reverse();
    let scopes: Vec<String> = state.grants.scopes().all().map(|s| s.name.clone()).collect();
    let body = html! {
        (notice(f.ok.as_deref(), f.id.as_deref()))
        form.filters method="get" action="/grants" {
            label { "Status "
                select name="status" {
                    @for (value, label) in [("current", "pending and active"), ("pending", "pending"), ("active", "active"), ("past", "ended"), ("all", "all")] {
                        option value=(value) selected[status == value] { (label) }
                    }
                }
            }
            label { "Scope "
                select name="scope" {
                    option value="" { "any" }
                    @for s in &scopes { option value=(s) selected[scope.as_deref() == Some(s)] { (s) } }
                }
            }
            label { "Person " input type="text" name="person" value=[person.as_deref()]; }
            button type="submit" { "Show" }
        }
        @if grants.is_empty() {
            p.empty { "No grants match." }
        } @else {
            div.table-wrap {
                table #grants {
                    caption.visually-hidden { "Grants" }
                    thead { tr { th scope="col" { "Grant" } th scope="col" { "Person" } th scope="col" { "Scope" } th scope="col" { "Status" } th scope="col" { "Time left" } th scope="col" { "Reason" } th scope="col" { "Decided by" } th scope="col" { span.visually-hidden { "Actions" } } } }
                    tbody {
                        @for g in &grants { (grant_row(&state, &viewer, g)) }
                    }
                }
            }
        }
    };
    page(&viewer, "/grants", "Grants", body)
}

fn grant_row(state: &ApiState, viewer: &Viewer, g: &GrantView) -> Markup {
    let live = matches!(g.status, GrantStatus::Active | GrantStatus::Pending);
    html! {
        tr id={ "grant-" (g.id) } {
            td { code { (g.id) } }
            td { (g.user) }
            td { a href={ "/scopes/" (g.scope) } { (g.scope) } }
            td { span class={ "badge status-" (g.status.as_str()) } { (g.status.as_str()) } @if g.break_glass { " " span.badge.alert { "break-glass" } } }
            td {
                @match (&g.status, &g.expires_at) {
                    (GrantStatus::Active, Some(until)) => (countdown(until)),
                    (GrantStatus::Pending, _) => { (duration_text(g.duration_secs)) " once approved" },
                    _ => { @if let Some(at) = &g.ended_at { "ended " (ago(at)) } },
                }
            }
            td.reason { (g.reason) @if let Some(r) = &g.end_reason { br; span.muted { "ended: " (r) } } }
            td { (g.decided_by.as_deref().unwrap_or("—")) }
            td {
                @if live && state.grants.may_revoke(&viewer.who, g) {
                    form.inline.revoke method="post" action={ "/grants/" (g.id) "/revoke" } {
                        input type="hidden" name="csrf" value=(viewer.csrf);
                        label.visually-hidden for={ "revoke-reason-" (g.id) } { "Reason for ending grant " (g.id) }
                        input id={ "revoke-reason-" (g.id) } type="text" name="reason" required placeholder="Reason";
                        button.danger type="submit" { @if g.status == GrantStatus::Pending { "Withdraw" } @else { "Revoke" } }
                    }
                }
            }
        }
    }
}

/// One grant, as a link in a notification opens it: a pending request with the actions the
/// viewer may take on it, or the grant's state.
pub async fn show(State(state): State<Arc<ApiState>>, viewer: Viewer, Path(id): Path<String>, Query(done): Query<Done>) -> Response {
    let g = match state.grants.show_with_reads(&viewer.who, &id).await {
        Ok(g) => g,
        Err(e) => return grant_error(&viewer, e),
    };
    let body = html! {
        (notice(done.ok.as_deref(), done.id.as_deref()))
        @if g.status == GrantStatus::Pending {
            ul.cards { (request_card(&state, &viewer, &g)) }
        } @else {
            div.table-wrap {
                table #grants {
                    caption.visually-hidden { "Grant " (g.id) }
                    thead { tr { th scope="col" { "Grant" } th scope="col" { "Person" } th scope="col" { "Scope" } th scope="col" { "Status" } th scope="col" { "Time left" } th scope="col" { "Reason" } th scope="col" { "Decided by" } th scope="col" { span.visually-hidden { "Actions" } } } }
                    tbody { (grant_row(&state, &viewer, &g)) }
                }
            }
        }
        @if let Some(read) = &g.read {
            p #read-budget { "Read so far: " (read.describe()) " (the scope's read budget per grant)" }
        }
    };
    page(&viewer, "/grants", &format!("Grant {}", g.id), body).into_response()
}

#[derive(Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub reason: String,
}

fn after(code: &str, id: &str, back: &str) -> Response {
    Redirect::to(&format!("{back}?ok={code}&id={}", url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>())).into_response()
}

pub async fn approve(State(state): State<Arc<ApiState>>, viewer: Viewer, Path(id): Path<String>, Form(form): Form<ActionForm>) -> Response {
    if let Err(r) = viewer.check_csrf(&form.csrf) {
        return r;
    }
    match state.grants.approve(&viewer.who, &id).await {
        Ok(_) => after("approved", &id, "/"),
        Err(e) => grant_error(&viewer, e),
    }
}

pub async fn deny(State(state): State<Arc<ApiState>>, viewer: Viewer, Path(id): Path<String>, Form(form): Form<ActionForm>) -> Response {
    if let Err(r) = viewer.check_csrf(&form.csrf) {
        return r;
    }
    match state.grants.deny(&viewer.who, &id, form.reason.trim()).await {
        Ok(_) => after("denied", &id, "/"),
        Err(e) => grant_error(&viewer, e),
    }
}

pub async fn revoke(State(state): State<Arc<ApiState>>, viewer: Viewer, Path(id): Path<String>, Form(form): Form<ActionForm>) -> Response {
    if let Err(r) = viewer.check_csrf(&form.csrf) {
        return r;
    }
    match state.grants.revoke(&viewer.who, &id, form.reason.trim()).await {
        Ok(_) => after("revoked", &id, "/grants"),
        Err(e) => grant_error(&viewer, e),
    }
}

