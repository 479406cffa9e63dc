//! Scopes: each one's rules as loaded, the SQL of its backing role (`pglease scope sql`), and
//! a box that decides a statement as the proxy would (`pglease scope check`).

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::auth::Viewer;
use super::page::{self, page};
use crate::admin::api::ApiState;
use crate::policy::{Decision, ScopePolicy};
use crate::scopes::Scope;

/// The longest statement the check box takes.
pub const MAX_CHECK_BYTES: usize = 100_000;

pub async fn list(State(state): State<Arc<ApiState>>, viewer: Viewer) -> Markup {
    let scopes = state.grants.scopes();
    let body = html! {
        div.table-wrap {
            table #scopes {
                caption.visually-hidden { "Scopes" }
                thead { tr { th scope="col" { "Scope" } th scope="col" { "Databases" } th scope="col" { "Longest grant" } th scope="col" { "Approvers" } th scope="col" { "Description" } } }
                tbody {
                    @for s in scopes.all() {
                        tr {
                            td { a href={ "/scopes/" (s.name) } { (s.name) } }
                            td { (s.databases.join(", ")) }
                            td { (crate::time::human_duration(s.max_duration)) }
                            td { @if s.approvers.is_empty() { "any approver" } @else { (s.approvers.join(", ")) } }
                            td { (s.description) }
                        }
                    }
                }
            }
        }
    };
    page(&viewer, "/scopes", "Scopes", body)
}

/// A scope's rules as a table (the inbox shows it under a request too).
pub fn rules_table(s: &Scope) -> Markup {
    let r = &s.rules;
    let list = |items: &[String], none: &str| if items.is_empty() { none.to_owned() } else { items.join(", ") };
    html! {
        table.rules {
            tbody {
                tr { th scope="row" { "Tables" } td {
                    ul.plain { @for t in &r.tables {
                        li { code { (t.name) } ": " (t.allow.iter().map(|a| format!("{a:?}").to_lowercase()).collect::<Vec<_>>().join(", "))
                            @if !t.deny_columns.is_empty() { " (not columns " (t.deny_columns.join(", ")) ")" } }
                    } }
                } }
                tr { th scope="row" { "search_path" } td { (r.search_path.join(", ")) } }
                tr { th scope="row" { "Row limit" } td { (r.row_limit.map(|n| n.to_string()).unwrap_or_else(|| "none".into())) } }
                tr { th scope="row" { "Read budget" } td { (match crate::grants::reads::ReadBudget::of(&s.config) { Some(b) => format!("{} per grant", b.describe()), None => "none".into() }) } }
                tr { th scope="row" { "statement_timeout" } td { (r.statement_timeout.map(crate::time::human_duration).unwrap_or_else(|| "not pinned".into())) } }
                tr { th scope="row" { "WHERE required" } td { @if r.require_where { "on UPDATE and DELETE" } @else { "no" } } }
                tr { th scope="row" { "Settings" } td { (list(&r.settings, "display settings only")) } }
                tr { th scope="row" { "Functions" } td { (list(&r.functions_allow, "built-in read-only ones")) @if !r.functions_deny.is_empty() { "; refused: " (r.functions_deny.join(", ")) } } }
                tr { th scope="row" { "Catalog reads" } td { @if r.catalog { "pg_catalog, information_schema" } @else { "no" } } }
                tr { th scope="row" { "Break-glass" } td { (s.break_glass.map(|d| format!("up to {}", crate::time::human_duration(d))).unwrap_or_else(|| "no".into())) } }
            }
        }
    }
}

fn scope_page(viewer: &Viewer, s: &Scope, check: Option<(&str, Markup)>) -> Markup {
    let sql = crate::policy::sql::scope_sql(&s.name, &s.config);
    let body = html! {
        @if !s.description.is_empty() { p.lead { (s.description) } }
        p { "Databases: " (s.databases.join(", ")) " · role " code { (s.role) } " · grants of up to " (crate::time::human_duration(s.max_duration))
            " · approved by " @if s.approvers.is_empty() { "any approver" } @else { "a member of " (s.approvers.join(" or ")) } }
        section aria-labelledby="rules-h" { h2 #rules-h { "Rules" } (rules_table(s)) }
        section aria-labelledby="check-h" {
            h2 #check-h { "Check a statement" }
            form #check method="post" action={ "/scopes/" (s.name) "/check" } {
                input type="hidden" name="csrf" value=(viewer.csrf);
                label for="sql" { "SQL, as a client would send it" }
                textarea #sql name="sql" rows="4" required spellcheck="false" { (check.as_ref().map(|c| c.0).unwrap_or("")) }
                button.primary type="submit" { "Check" }
            }
            @if let Some((_, verdict)) = check { (verdict) }
        }
        section aria-labelledby="sql-h" {
            h2 #sql-h { "The role behind it" }
            p.muted { "What " code { "pglease scope sql " (s.name) } " prints: the role's GRANTs, no more than the rules need." }
            pre.sql { code { (sql) } }
        }
    };
    page(viewer, "/scopes", &format!("Scope {}", s.name), body)
}

fn find(state: &ApiState, viewer: &Viewer, name: &str) -> Result<Scope, Response> {
    state.grants.scopes().get(name).cloned().ok_or_else(|| page::error_page(Some(viewer), StatusCode::NOT_FOUND, &format!("No scope named {name:?}.")))
}

pub async fn show(State(state): State<Arc<ApiState>>, viewer: Viewer, Path(name): Path<String>) -> Response {
    match find(&state, &viewer, &name) {
        Ok(s) => scope_page(&viewer, &s, None).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
pub struct CheckForm {
    #[serde(default)]
    pub csrf: String,
    pub sql: String,
}

/// The decision the proxy would take, decided by the same code (`pglease scope check`).
pub async fn check(State(state): State<Arc<ApiState>>, viewer: Viewer, Path(name): Path<String>, Form(form): Form<CheckForm>) -> Response {
    if let Err(r) = viewer.check_csrf(&form.csrf) {
        return r;
    }
    let s = match find(&state, &viewer, &name) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if form.sql.len() > MAX_CHECK_BYTES {
        return page::error_page(Some(&viewer), StatusCode::PAYLOAD_TOO_LARGE, "That statement is too long to check here.");
    }
    // The parser runs off the async threads (a long statement takes a while).
    // With the columns the proxy knows of the scope's first database, so `*` shows as it
    // would be rewritten there.
    let (config, name, sql) = (s.config.clone(), s.name.clone(), form.sql.clone());
    let schema = state.proxy.state().policies.get(&name).and_then(|p| p.schema(p.default_database()));
    let verdict = match tokio::task::spawn_blocking(move || ScopePolicy::from_config(&name, &config).decide_with_schema(&sql, schema.as_deref())).await {
        Ok(v) => v,
        Err(e) => return page::error_page(Some(&viewer), StatusCode::INTERNAL_SERVER_ERROR, &format!("The check failed: {e}")),
    };
    let shown = html! {
        div #verdict role="status" {
            @match &verdict.decision {
                Decision::Allow => { p { span.badge.status-active { "allow" } " The statement runs as sent." } },
                Decision::Rewrite { sql, reason, notice } => {
                    p { span.badge.status-pending { "rewrite" } " " (reason) }
                    @if let Some(notice) = notice { p.notice { "NOTICE: " (notice) } }
                    pre.sql { code { (sql) } }
                },
                Decision::Deny { code, message } => { p { span.badge.alert { "deny" } " " code { (code) } " " (message) } },
            }
        }
    };
    scope_page(&viewer, &s, Some((&form.sql, shown))).into_response()
}
