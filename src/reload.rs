//! Config reload: what `pglease serve` does on SIGHUP.

use std::collections::HashMap;
use std::sync::Arc;

use crate::admin::api::ApiState;
use crate::app::{Secrets, client_tls, grant_settings, serve_scopes};
use crate::config::{Config, ScopeConfig};
use crate::error::{ClientError, sqlstate};
use crate::events::{Event, Events};
use crate::grants::GrantService;
use crate::handshake::ClientTlsPolicy;
use crate::people::People;
use crate::scopes::Scopes;
use crate::server::{Proxy, ProxyState};

/// What a reload did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    /// Scopes added, changed or removed.
    pub scopes_changed: Vec<String>,
    /// Sessions ended because their scope changed, was removed or is no longer served.
    pub sessions_ended: usize,
    /// Scopes not served after the reload (backing role check), with why.
    pub scopes_disabled: Vec<String>,
    /// Keys that changed but only take effect at restart (their old values stay in force).
    pub restart_needed: Vec<&'static str>,
}

/// Applies a new config to a running proxy: on SIGHUP, `pglease serve` reads its file again.
///
/// All or nothing: the new config is checked and everything it needs (TLS certificate and key,
/// scope passwords, backing-role checks) is built before anything is swapped in; any error leaves
/// the old config in force. What a reload changes: the client TLS certificate and key (new
/// handshakes use them; sessions keep theirs), `allow_plaintext` and the listener's timeouts,
/// scopes, people (admin tokens), grant settings. Sessions of a scope whose rules changed, or
/// that was removed, are ended with `FATAL 57P01`: nobody keeps working under rules the DBA
/// has just withdrawn. The rest (`listen.addr`, `listen.max_connections`, `listen.workers`, `admin`, `upstream`,
/// `audit`, `grants.store`, `grants.events_log`, `log`, `control_plane`, `notify`, `identity`) takes effect at restart; a change to
/// those is reported and otherwise ignored.
pub struct Reloader {
    proxy: Arc<Proxy>,
    grants: Arc<GrantService>,
    api: Option<Arc<ApiState>>,
    events: Events,
    skip_role_check: bool,
    /// The config in force; the lock also serialises reloads.
    current: tokio::sync::Mutex<Config>,
}

impl Reloader {
    /// `current`: the config the running proxy was built from.
    pub(crate) fn new(proxy: Arc<Proxy>, grants: Arc<GrantService>, api: Option<Arc<ApiState>>, events: Events, skip_role_check: bool, current: Config) -> Self {
        Self { proxy, grants, api, events, skip_role_check, current: tokio::sync::Mutex::new(current) }
    }

    /// Reads `path` and applies it (what SIGHUP does). Errors name the config key at fault.
    pub async fn reload_file(&self, path: &std::path::Path) -> anyhow::Result<ReloadReport> {
        counted(async {
            let config = Config::load(path)?;
            let passwords = Secrets::scope_passwords(&config)?;
            let people = People::from_config(&config.people);
            self.try_reload(config, passwords, people).await
        })
        .await
    }

    /// Applies `next` (already validated, as [`Config::load`] does), with the scopes' role
    /// passwords and the admin API's people.
    pub async fn reload(&self, next: Config, scope_passwords: HashMap<String, String>, people: People) -> anyhow::Result<ReloadReport> {
        counted(self.try_reload(next, scope_passwords, people)).await
    }

    async fn try_reload(&self, next: Config, passwords: HashMap<String, String>, people: People) -> anyhow::Result<ReloadReport> {
        let mut current = self.current.lock().await;
        let tls = client_tls(&next)?.map(Arc::new);
        let mut served = serve_scopes(&next, &passwords, self.proxy.upstream(), self.skip_role_check).await?;
        let old_state = self.proxy.state();
        // A scope whose session rules did not change keeps its policy object: its decision
        // caches stay warm, and sessions that started under it are still under the rules in force.
        for (name, policy) in served.policies.iter_mut() {
            if let (Some(old), Some(new), Some(kept)) = (current.scopes.get(name), next.scopes.get(name), old_state.policies.get(name))
                && !governs_differently(old, new)
            {
                *policy = kept.clone();
            }
        }

        let mut report = ReloadReport { restart_needed: restart_only_changes(&current, &next), ..Default::default() };
        // What stays fixed until restart keeps its old value, also in the new state.
        let mut listen = next.listen.clone();
        listen.addr = current.listen.addr;
        listen.max_connections = current.listen.max_connections;
        listen.workers = current.listen.workers;

        // Sessions that must end: their scope was removed, its rules changed, or it is no longer served.
        let mut ending: HashMap<String, String> = HashMap::new();
        for (name, old) in &current.scopes {
            match next.scopes.get(name) {
                None => {
                    ending.insert(name.clone(), format!("pglease: scope \"{name}\" was removed by a configuration reload"));
                }
                Some(new) if governs_differently(old, new) => {
                    ending.insert(name.clone(), format!("pglease: the rules of scope \"{name}\" were changed by a configuration reload; reconnect to continue under the new rules"));
                }
                Some(_) => {}
            }
            if let Some(why) = served.disabled.get(name)
                && !old_state.disabled_scopes.contains_key(name)
            {
                ending.entry(name.clone()).or_insert_with(|| format!("pglease: scope \"{name}\" is disabled: {why}"));
            }
        }
        report.scopes_changed = current
            .scopes
            .keys()
            .chain(next.scopes.keys())
            .filter(|n| current.scopes.get(*n) != next.scopes.get(*n))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        report.scopes_disabled = served.disabled.iter().map(|(n, why)| format!("{n}: {why}")).collect();
        report.scopes_disabled.sort();

        // Swap everything in, then end what the new rules no longer allow.
        self.proxy.reload(ProxyState {
            tls: ClientTlsPolicy { tls, allow_plaintext: listen.allow_plaintext },
            listen,
            scope_logins: served.logins,
            policies: served.policies,
            disabled_scopes: served.disabled,
            grant_settings: grant_settings(&next),
        });
        self.proxy.keep_schemas_fresh().await;
        self.grants.set_scopes(Scopes::from_config(&next.scopes));
        if let Some(api) = &self.api {
            api.people.store(Arc::new(people));
        }
        for (scope, why) in &ending {
            let error = ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, why.clone());
            report.sessions_ended += self.proxy.sessions.kill_where(|s| s.identity.scope.as_deref() == Some(scope.as_str()), &error);
        }
        self.events.emit(Event::ConfigReloaded {
            scopes_changed: report.scopes_changed.clone(),
            sessions_ended: report.sessions_ended as u64,
            restart_needed: report.restart_needed.iter().map(|k| k.to_string()).collect(),
        });
        *current = next;
        Ok(report)
    }
}

/// Counts reloads and their outcome for monitoring.
async fn counted(reload: impl std::future::Future<Output = anyhow::Result<ReloadReport>>) -> anyhow::Result<ReloadReport> {
    let result = reload.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!("pglease_config_reloads_total", "result" => outcome).increment(1);
    metrics::gauge!("pglease_config_last_reload_successful").set(if result.is_ok() { 1.0 } else { 0.0 });
    result
}

/// Whether a live session of the scope would be governed differently under `new`: anything but
/// the grant-time settings (description, longest grant, approvers, break-glass) and where the
/// role's password is read from.
fn governs_differently(old: &ScopeConfig, new: &ScopeConfig) -> bool {
    let session_rules = |c: &ScopeConfig| ScopeConfig {
        description: String::new(),
        password_env: None,
        password_file: None,
        max_duration: Default::default(),
        approvers: Vec::new(),
        break_glass: None,
        ..c.clone()
    };
    session_rules(old) != session_rules(new)
}

/// Keys changed in `next` that only take effect at restart.
fn restart_only_changes(old: &Config, next: &Config) -> Vec<&'static str> {
    let checks: [(&'static str, bool); 13] = [
        ("listen.addr", old.listen.addr != next.listen.addr),
        ("listen.public_host", old.listen.public_host != next.listen.public_host),
        ("listen.max_connections", old.listen.max_connections != next.listen.max_connections),
        ("listen.workers", old.listen.workers != next.listen.workers),
        ("admin", old.admin != next.admin),
        ("upstream", old.upstream != next.upstream),
        ("audit", old.audit != next.audit),
        ("grants.store", old.grants.store != next.grants.store),
        ("grants.events_log", old.grants.events_log != next.grants.events_log),
        ("log", old.log != next.log),
        ("control_plane", old.control_plane != next.control_plane),
        ("notify", old.notify != next.notify),
        ("identity", old.identity != next.identity),
    ];
    checks.into_iter().filter(|(_, changed)| *changed).map(|(key, _)| key).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_read: &str) -> Config {
        Config::parse(&format!(
            r#"
            [listen]
            addr = "127.0.0.1:6432"
            allow_plaintext = true
            [upstream]
            host = "/tmp"
            user = "u"
            password_env = "X"
            tls = "disable"
            [scopes.read]
            description = "reads"
            database = "d"
            role = "r"
            password_env = "Y"
            tables = [{{ name = "public.t", allow = ["read"] }}]
            {extra_read}
            "#
        ))
        .unwrap()
    }

    #[test]
    fn grant_time_settings_do_not_end_sessions_but_rules_do() {
        let old = config("");
        let scope = |c: &Config| c.scopes["read"].clone();
        for same in ["max_duration = \"2h\"", "approvers = [\"dba\"]", "break_glass = { max_duration = \"5m\" }"] {
            assert!(!governs_differently(&scope(&old), &scope(&config(same))), "{same}");
        }
        let mut moved_password = scope(&old);
        (moved_password.password_env, moved_password.description) = (Some("Z".into()), "new words".into());
        assert!(!governs_differently(&scope(&old), &moved_password));
        for different in ["row_limit = 5", "catalog = false", "settings = [\"work_mem\"]", "search_path = [\"x\"]", "require_where = false"] {
            assert!(governs_differently(&scope(&old), &scope(&config(different))), "{different}");
        }
    }

    #[test]
    fn restart_only_keys_are_named() {
        let old = config("");
        let mut new = old.clone();
        assert!(restart_only_changes(&old, &new).is_empty());
        new.listen.idle_timeout = Some(std::time::Duration::from_secs(5));
        new.listen.tls_cert = Some("/other.crt".into());
        assert!(restart_only_changes(&old, &new).is_empty(), "reloadable");
        new.listen.addr = "127.0.0.1:7000".parse().unwrap();
        new.upstream.port = 5433;
        new.audit.rotate_bytes = 1;
        assert_eq!(restart_only_changes(&old, &new), ["listen.addr", "upstream", "audit"]);
    }
}
