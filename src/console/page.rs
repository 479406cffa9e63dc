//! The page shell (header, navigation, sign-out) and the pieces pages share.

use std::time::SystemTime;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::auth::Viewer;
use crate::config::Role;

/// The sections of the console, and who sees them in the navigation.
const NAV: &[(&str, &str)] = &[("/", "Inbox"), ("/grants", "Grants"), ("/sessions", "Sessions"), ("/audit", "Audit"), ("/scopes", "Scopes")];

fn visible(viewer: &Viewer, href: &str) -> bool {
    match href {
        "/sessions" | "/audit" => viewer.who.can_read_all(),
        _ => true,
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · pglease" }
            link rel="stylesheet" href="/static/console.css";
            script src="/static/console.js" defer {}
        }
    }
}

/// A page for a signed-in viewer: `current` is the navigation entry it belongs to.
pub fn page(viewer: &Viewer, current: &str, title: &str, body: Markup) -> Markup {
    let roles: Vec<&str> = viewer.who.roles.iter().map(role_name).collect();
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "pglease" }
                    nav aria-label="Sections" {
                        ul {
                            @for (href, label) in NAV {
                                @if visible(viewer, href) {
                                    li { a href=(href) aria-current=[(current == *href).then_some("page")] { (label) } }
                                }
                            }
                        }
                    }
                    div.who {
                        span #whoami { (viewer.who.person) } " "
                        span.muted { "(" (roles.join(", ")) ")" }
                        form.inline method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(viewer.csrf);
                            button.link #signout type="submit" { "Sign out" }
                        }
                    }
                }
                main #main { h1 { (title) } (body) }
            }
        }
    }
}

/// A page without navigation (sign-in, errors before sign-in).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.bare { main #main { (body) } }
        }
    }
}

/// An error as a page, with its status.
pub fn error_page(viewer: Option<&Viewer>, status: StatusCode, message: &str) -> Response {
    let body = html! {
        p.alert role="alert" #error { (message) }
        p { a href="/" { "Back to the console" } }
    };
    let title = status.canonical_reason().unwrap_or("Error");
    let markup = match viewer {
        Some(v) => page(v, "", title, body),
        None => bare(title, body),
    };
    (status, markup).into_response()
}

pub fn role_name(role: &Role) -> &'static str {
    match role {
        Role::Engineer => "engineer",
        Role::Approver => "approver",
        Role::Auditor => "auditor",
        Role::Admin => "admin",
    }
}

/// "3 min ago" for an RFC 3339 time, with the exact time in a tooltip.
pub fn ago(rfc3339: &str) -> Markup {
    let text = crate::time::parse_rfc3339(rfc3339)
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| format!("{} ago", short(d)))
        .unwrap_or_else(|| rfc3339.to_owned());
    html! { time datetime=(rfc3339) title=(rfc3339) { (text) } }
}

/// A duration as people say it: 45 s, 12 min, 3 h 5 min, 2 d.
pub fn short(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => match (s % 3600) / 60 {
            0 => format!("{} h", s / 3600),
            m => format!("{} h {m} min", s / 3600),
        },
        _ => format!("{} d", s / 86400),
    }
}

/// Time left until an RFC 3339 instant, counting down live in the browser.
pub fn countdown(until: &str) -> Markup {
    let left = crate::time::parse_rfc3339(until).ok().map(|t| t.duration_since(SystemTime::now()).unwrap_or_default());
    html! {
        time.countdown datetime=(until) title=(until) data-countdown=(until) { (left.map(short).unwrap_or_default()) }
    }
}

/// A message after an action, chosen by a code (never text from the URL).
pub fn notice(code: Option<&str>, id: Option<&str>) -> Markup {
    let id = id.filter(|i| i.len() <= 40 && i.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b':' || b == b'.')).unwrap_or("");
    let text = match code {
        Some("approved") => format!("Grant {id} approved."),
        Some("denied") => format!("Grant {id} denied."),
        Some("revoked") => format!("Grant {id} ended."),
        Some("killed") => format!("Session {id} ended."),
        _ => return html! {},
    };
    html! { p.notice role="status" #notice { (text) } }
}
