//! Notifications: approvers are told of requests, people of decisions, by webhook or Slack.
//!
//! Each `[[notify]]` target has an [`outbox`]: the event sink puts a message there (on disk)
//! when the event happens, and a delivery thread of the target's own POSTs the messages in
//! order, one at a time, retrying with backoff and jitter until the receiver answers 2xx. A
//! slow or dead receiver delays nothing but its own messages; a message refused for good (a
//! 4xx other than 408/429, or still failing after [`GIVE_UP_AFTER`]) is set aside in
//! `OUTBOX.dead` and counted in `pglease_notify_dead_letters_total`.
//!
//! A webhook body is signed: `Pglease-Signature: sha256=HEX` is HMAC-SHA256 of
//! `TIMESTAMP.BODY` with the target's secret, `Pglease-Timestamp` the Unix time of that
//! attempt; `Pglease-Delivery` is the message's id, the same on every attempt, so that a
//! receiver drops repeats (delivery is at least once) and refuses stale timestamps (replays).

pub mod outbox;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{NOTIFY_EVENTS, NotifyConfig, NotifyKind};
use crate::events::{Event, EventRecord, EventSink};
use outbox::Outbox;

/// A message still failing after this long is given up on (set aside, counted).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// One target, ready to deliver.
pub struct Target {
    pub name: String,
    kind: NotifyKind,
    url: String,
    secret: Option<String>,
    events: Vec<String>,
    links: String,
    outbox: Outbox,
    wake: SyncSender<()>,
    woken: std::sync::Mutex<Option<Receiver<()>>>,
    agent: ureq::Agent,
}

/// The name a target's `events` list uses for an event, if it is one targets may ask for.
fn kind_of(event: &Event) -> Option<&'static str> {
    Some(match event {
        Event::GrantRequested { .. } => "requested",
        Event::GrantApproved { .. } => "approved",
        Event::GrantDenied { .. } => "denied",
        Event::GrantActivated { break_glass: true, .. } => "break_glass",
        Event::GrantRevoked { .. } => "revoked",
        Event::GrantExpiring { .. } => "expiring",
        Event::GrantExpired { .. } => "expired",
        Event::SessionKilled { .. } => "session_killed",
        Event::ReadBudgetSpent { .. } => "read_budget",
        Event::AuditFailing { .. } | Event::AuditRecovered => "audit_failing",
        _ => return None,
    })
}

impl Target {
    /// The `index`-th target of the config; `default_links` is the admin API's URL.
    pub fn open(config: &NotifyConfig, index: usize, default_links: &str) -> anyhow::Result<Self> {
        let url = config.url(index)?;
        // Checked here for a URL read from the environment or a file; the message does not
        // repeat it (a Slack webhook URL is a secret).
        let scheme_ok = url::Url::parse(&url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        anyhow::ensure!(scheme_ok, "notify[{index}].url: not an http or https URL");
        let secret = config.secret(index)?;
        let outbox = Outbox::open(&config.outbox()).map_err(|e| anyhow::anyhow!("notify[{index}].outbox: cannot open {}: {e}", config.outbox().display()))?;
        let agent = crate::outbound::agent(config.ca_file.as_deref(), &format!("notify[{index}].ca_file")).map_err(|e| anyhow::anyhow!(e))?;
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let events = if config.events.is_empty() { NOTIFY_EVENTS.iter().map(|e| e.to_string()).collect() } else { config.events.clone() };
        Ok(Self {
            name: config.name.clone(),
            kind: config.kind,
            url,
            secret,
            events,
            links: config.links.clone().unwrap_or_else(|| default_links.to_owned()).trim_end_matches('/').to_owned(),
            outbox,
            wake,
            woken: std::sync::Mutex::new(Some(woken)),
            agent,
        })
    }

    /// The body this target sends for an event.
    fn body(&self, id: &str, kind: &str, record: &EventRecord) -> Value {
        let mut fields = serde_json::to_value(record).unwrap_or_default();
        let grant = fields["grant"].as_str().map(str::to_owned);
        // The grant's page in the console: an approver decides from there.
        let link = grant.as_ref().map(|g| format!("{}/grants/{g}", self.links));
        match self.kind {
            NotifyKind::Webhook => {
                fields["id"] = json!(id);
                fields["kind"] = json!(kind);
                fields["links"] = json!({ "grant": link });
                fields
            }
            NotifyKind::Slack => {
                let text = summary(kind, &fields);
                let context = [
                    grant.map(|g| format!("grant `{}`", slack_escape(&g))),
                    fields["scope"].as_str().map(|s| format!("scope `{}`", slack_escape(s))),
                    link.map(|l| format!("<{}|details>", slack_escape(&l))),
                ];
                let context: Vec<String> = context.into_iter().flatten().collect();
                json!({
                    "text": text,
                    "blocks": [
                        { "type": "section", "text": { "type": "mrkdwn", "text": text } },
                        { "type": "context", "elements": [ { "type": "mrkdwn", "text": context.join(" · ") } ] }
                    ]
                })
            }
        }
    }

    /// Puts the event in the outbox if this target wants it.
    fn offer(&self, record: &EventRecord) {
        let Some(kind) = kind_of(&record.event) else { return };
        if !self.events.iter().any(|e| e == kind) {
            return;
        }
        let mut raw = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
        let id = crate::people::hex(&raw);
        let message = json!({ "id": id, "kind": kind, "at": crate::time::rfc3339(record.at), "body": self.body(&id, kind, record) });
        match self.outbox.push(&message.to_string()) {
            Ok(()) => match self.wake.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
            },
            Err(e) => {
                tracing::error!(target = %self.name, error = %e, "cannot write to the notification outbox; this message is lost");
                metrics::counter!("pglease_notify_dead_letters_total", "target" => self.name.clone()).increment(1);
            }
        }
    }

    /// One attempt; `Ok` on 2xx, `Err((permanent, why))` otherwise.
    fn send(&self, id: &str, body: &str) -> Result<(), (bool, String)> {
        let mut request = self.agent.post(&self.url).header("Content-Type", "application/json").header("User-Agent", concat!("pglease/", env!("CARGO_PKG_VERSION")));
        if self.kind == NotifyKind::Webhook {
            let timestamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs().to_string();
            request = request.header("Pglease-Delivery", id).header("Pglease-Timestamp", &timestamp);
            if let Some(secret) = &self.secret {
                request = request.header("Pglease-Signature", format!("sha256={}", sign(secret, &timestamp, body)));
            }
        }
        match request.send(body) {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => {
                let status = r.status().as_u16();
                Err(((400..500).contains(&status) && status != 408 && status != 429, format!("HTTP {status}")))
            }
            Err(e) => Err((false, e.to_string())),
        }
    }

    /// Delivers the outbox in order until `shutdown`. Runs on a thread of its own.
    pub fn deliver(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(woken) = self.woken.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let mut cursor = self.outbox.cursor();
        let mut failures: u32 = 0;
        while !shutdown.is_cancelled() {
            metrics::gauge!("pglease_notify_backlog_bytes", "target" => self.name.clone()).set(self.outbox.backlog(cursor) as f64);
            let next = match self.outbox.next(cursor) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(target = %self.name, error = %e, "cannot read the notification outbox");
                    None
                }
            };
            let Some((line, after)) = next else {
                let _ = woken.recv_timeout(Duration::from_secs(1));
                continue;
            };
            let message: Value = serde_json::from_str(&line).unwrap_or_default();
            let id = message["id"].as_str().unwrap_or_default().to_owned();
            let body = message["body"].to_string();
            let outcome = if message["body"].is_null() { Err((true, "an unreadable outbox line".to_owned())) } else { self.send(&id, &body) };
            match outcome {
                Ok(()) => {
                    metrics::counter!("pglease_notify_delivered_total", "target" => self.name.clone()).increment(1);
                    if failures > 0 {
                        tracing::info!(target = %self.name, after = failures, "notification receiver answered again");
                    }
                    failures = 0;
                    cursor = self.advance(after, cursor);
                }
                Err((permanent, why)) => {
                    metrics::counter!("pglease_notify_failures_total", "target" => self.name.clone()).increment(1);
                    // The message's own age, so that a restart does not start the count again.
                    let made = message["at"].as_str().and_then(|t| crate::time::parse_rfc3339(t).ok()).unwrap_or_else(SystemTime::now);
                    let too_old = made.elapsed().unwrap_or_default() > GIVE_UP_AFTER;
                    if permanent || too_old {
                        tracing::error!(target = %self.name, id, why, "notification given up on; set aside in the dead-letter file");
                        self.dead_letter(&line);
                        failures = 0;
                        cursor = self.advance(after, cursor);
                        continue;
                    }
                    if failures == 0 {
                        tracing::warn!(target = %self.name, why, "notification not delivered; retrying");
                    }
                    failures += 1;
                    let wait = backoff(failures);
                    // Woken early by a new message only to wait again: sleep the whole wait.
                    let until = std::time::Instant::now() + wait;
                    while std::time::Instant::now() < until && !shutdown.is_cancelled() {
                        std::thread::sleep(Duration::from_millis(100).min(until - std::time::Instant::now()));
                    }
                }
            }
        }
    }

    fn advance(&self, after: u64, cursor: u64) -> u64 {
        match self.outbox.commit(after) {
            Ok(c) => c,
            Err(e) => {
                // The message may be sent again after a restart: at least once still holds.
                tracing::error!(target = %self.name, error = %e, "cannot record a delivery in the outbox cursor");
                let _ = cursor;
                after
            }
        }
    }

    fn dead_letter(&self, line: &str) {
        metrics::counter!("pglease_notify_dead_letters_total", "target" => self.name.clone()).increment(1);
        let mut path = self.outbox_path();
        path.as_mut_os_string().push(".dead");
        let written = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path).and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()))
        };
        if let Err(e) = written {
            tracing::error!(target = %self.name, error = %e, path = %path.display(), "cannot write the dead-letter file");
        }
    }

    fn outbox_path(&self) -> PathBuf {
        self.outbox.path().to_owned()
    }
}

/// `FIRST_BACKOFF` doubling per failure, at most `MAX_BACKOFF`, with ±20% jitter so that many
/// instances do not retry in step.
fn backoff(failures: u32) -> Duration {
    let base = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF);
    let jitter = 0.8 + 0.4 * (rand::random::<u32>() as f64 / u32::MAX as f64);
    base.mul_f64(jitter)
}

/// HMAC-SHA256 of `TIMESTAMP.BODY`, hex.
pub fn sign(secret: &str, timestamp: &str, body: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    crate::people::hex(&mac.finalize().into_bytes())
}

/// Text as Slack shows it literally: `&`, `<` and `>` escaped, so that a reason cannot ping a
/// channel (`<!channel>`) or show a link of its own.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One line for people (Slack's mrkdwn; every value from a request escaped).
fn summary(kind: &str, f: &Value) -> String {
    let s = |k: &str| slack_escape(f[k].as_str().unwrap_or("?"));
    let duration = f["duration_secs"].as_u64().map(|d| crate::time::human_duration(Duration::from_secs(d))).unwrap_or_default();
    match kind {
        "requested" => format!("{} requests *{}* for {duration}: {} — approve with `pglease grant approve {}`", s("user"), s("scope"), s("reason"), s("grant")),
        "approved" => format!("{} approved {}'s grant for *{}*", s("by"), s("user"), s("scope")),
        "denied" => format!("{} denied {}'s request for *{}*: {}", s("by"), s("user"), s("scope"), s("reason")),
        "break_glass" => format!(":rotating_light: {} used break-glass for *{}* (until {})", s("user"), s("scope"), s("expires_at")),
        "revoked" => format!("{} revoked {}'s grant for *{}*: {}", s("by"), s("user"), s("scope"), s("reason")),
        "expiring" => format!("{}'s grant for *{}* ends at {}", s("user"), s("scope"), s("expires_at")),
        "expired" => format!("{}'s grant for *{}* expired", s("user"), s("scope")),
        "audit_failing" if f["event"] == "audit_recovered" => ":white_check_mark: the audit log is written again; statements run again".to_owned(),
        "audit_failing" => format!(":rotating_light: the audit log cannot be written, so every statement is refused: {}", s("error")),
        "read_budget" => format!(
            ":rotating_light: {}'s grant for *{}* used its read budget ({} rows, {} bytes read); its further statements are refused",
            s("user"),
            s("scope"),
            f["rows_read"],
            f["bytes_read"]
        ),
        "session_killed" => format!("{} ended session {}", s("by"), f["session"]),
        other => other.to_owned(),
    }
}

/// The event sink that fills the targets' outboxes.
pub struct NotifySink {
    targets: Vec<Arc<Target>>,
}

impl NotifySink {
    pub fn new(targets: Vec<Arc<Target>>) -> Self {
        Self { targets }
    }
}

impl EventSink for NotifySink {
    fn emit(&self, record: &EventRecord) {
        for t in &self.targets {
            t.offer(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_cannot_ping_or_link_in_slack() {
        let f = json!({"user": "mallory", "scope": "read", "grant": "g1", "duration_secs": 600, "reason": "<!channel> <https://evil.example|Approve here> & more"});
        let text = summary("requested", &f);
        assert!(!text.contains("<!channel>") && !text.contains("<https://evil"), "{text}");
        assert!(text.contains("&lt;!channel&gt;") && text.contains("&amp; more"), "{text}");
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        for (n, base) in [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (40, 30.0)] {
            let d = backoff(n).as_secs_f64();
            assert!(d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9, "{n}: {d}");
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231-style check against an independent computation with ring.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k");
        let expected = crate::people::hex(ring::hmac::sign(&key, b"1700000000.{\"a\":1}").as_ref());
        assert_eq!(sign("k", "1700000000", "{\"a\":1}"), expected);
    }
}
