//! Wiring: from a config (and its secrets) to a running proxy, grant service and admin API.
//! Shared by `pglease serve` and `pglease demo`.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminState, api::ApiState};
use crate::config::Config;
use crate::events::{Events, JsonlSink};
use crate::control_plane::fleet::Fleet;
use crate::control_plane::watch::WatchOptions;
use crate::grants::{FileStore, GrantService, GrantStore};
use crate::people::People;
use crate::policy::ScopePolicy;
use crate::scopes::Scopes;
use crate::server::{GrantSettings, Proxy};
use crate::session::SessionRegistry;
use crate::tls::ServerTls;
use crate::upstream::{Upstream, UpstreamLogin};

/// Passwords the proxy logs in upstream with. Never logged.
pub struct Secrets {
    pub upstream: String,
    /// Scope name → password of its backing role.
    pub scopes: HashMap<String, String>,
}

impl Secrets {
    /// Reads every password from where the config says (environment or files).
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        Ok(Self { upstream: config.upstream.password()?, scopes: Self::scope_passwords(config)? })
    }

    /// The password of each scope's backing role.
    pub fn scope_passwords(config: &Config) -> anyhow::Result<HashMap<String, String>> {
        let mut scopes = HashMap::new();
        for (name, scope) in &config.scopes {
            scopes.insert(name.clone(), scope.password(name)?);
        }
        Ok(scopes)
    }
}

/// What tests and the demo change about a build.
#[derive(Default)]
pub struct BuildOptions {
    /// Overrides `grants.store`.
    pub store: Option<Arc<dyn GrantStore>>,
    /// Extra event sinks.
    pub event_sinks: Vec<Arc<dyn crate::events::EventSink>>,
    /// Skip the startup check of each scope's backing role (tests of other parts only).
    pub skip_role_check: bool,
    /// Connection string of the audit database, instead of `audit.postgres.dsn_env`.
    pub audit_pg_dsn: Option<String>,
}

/// A proxy ready to run.
pub struct App {
    pub proxy: Arc<Proxy>,
    pub grants: Arc<GrantService>,
    pub admin: AdminState,
    pub events: Events,
    pub audit: crate::audit::AuditLog,
    /// The Postgres audit sink, when configured: (connection string, table).
    audit_pg: Option<(String, String)>,
    /// The config built from, which a reload compares against.
    config: Config,
    skip_role_check: bool,
    /// The control plane's connection string (with its password) and how to watch it.
    control_plane: Option<(String, WatchOptions)>,
    /// Writes events into the control plane, once started.
    event_writer: Option<crate::control_plane::events::EventWriter>,
    /// Notification targets, delivered from once started.
    notify: Vec<Arc<crate::notify::Target>>,
}

pub struct RunningApp {
    pub proxy_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    pub reloader: crate::reload::Reloader,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    reads: Arc<crate::grants::reads::ReadLedger>,
}

impl RunningApp {
    /// Stops accepting, drains sessions, stops the admin API and the reaper.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        // What the drained sessions read last is stored too.
        if let Err(e) = self.reads.flush().await {
            tracing::error!(error = %e, "read budgets: the last counts could not be stored");
        }
    }
}

impl App {
    /// Builds everything from the config.
    pub async fn build(config: &Config, secrets: Secrets, people: People, options: BuildOptions) -> anyhow::Result<Self> {
        let store = options.store;
        // The recorder goes in first: the audit writer and sessions look their metrics up once
        // and keep them, and a handle taken before the recorder exists would count nothing.
        let metrics = crate::admin::metrics_handle();
        let tls = client_tls(config)?;
        let upstream = Upstream::new(config.upstream.clone(), secrets.upstream, config.listen.max_message_bytes).context("upstream TLS")?;
        let audit_options = crate::audit::AuditOptions {
            path: config.audit.path.clone(),
            durability: config.audit.durability,
            rotate_bytes: config.audit.rotate_bytes,
            anchor: config.audit.anchor.clone(),
            params: config.audit.params,
            writer: config.audit.writer,
        };
        // Off the runtime: opening may wait for a previous writer of the log to let go (an app
        // restarted in this process, whose last sessions end on this runtime meanwhile).
        let (audit, audit_thread) = tokio::task::spawn_blocking(move || crate::audit::AuditLog::open(audit_options))
            .await
            .map_err(|e| anyhow::anyhow!("audit.path: {e}"))?
            .map_err(|e| anyhow::anyhow!("audit.path: {e}"))?;
        drop(audit_thread); // ends when the last handle to the log is dropped
        let mut events = Events::new().with_sink(Arc::new(crate::audit::AuditEvents(audit.clone())));
        for sink in options.event_sinks.iter().cloned() {
            events = events.with_sink(sink);
        }
        // With a control plane, events go there too (written once the instance knows its id).
        let event_writer = config.control_plane.as_ref().map(|_| {
            let (sink, writer) = crate::control_plane::events::channel();
            events = events.clone().with_sink(Arc::new(sink));
            writer
        });
        // Notification targets: each event they want is in their outbox before it returns.
        let mut notify_targets = Vec::new();
        for (i, target) in config.notify.iter().enumerate() {
            let console = config.admin.public_url.clone().unwrap_or_else(|| format!("http://{}", config.admin.addr));
            notify_targets.push(Arc::new(crate::notify::Target::open(target, i, console.trim_end_matches('/'))?));
        }
        if !notify_targets.is_empty() {
            events = events.with_sink(Arc::new(crate::notify::NotifySink::new(notify_targets.clone())));
        }
        if let Some(path) = &config.grants.events_log {
            events = events.with_sink(Arc::new(JsonlSink::open(path).with_context(|| format!("grants.events_log: cannot open {}", path.display()))?));
        }
        let scopes = Arc::new(Scopes::from_config(&config.scopes));
        let sessions = SessionRegistry::new();
        // With a control plane, grants live there: its schema first (every instance may run
        // this at once), then the shared store.
        let control_plane = match &config.control_plane {
            Some(cp) => {
                let conninfo = cp.conninfo()?;
                let mut client = crate::control_plane::connect(&conninfo).await.map_err(|e| anyhow::anyhow!("control_plane.dsn: {e}"))?;
                for m in crate::control_plane::migrations::migrate(&mut client).await? {
                    tracing::info!(version = m.version, name = %m.name, "control plane: migration applied");
                }
                let options = WatchOptions { reconcile_every: cp.reconcile_every, stale_after: cp.stale_after };
                Some((conninfo, options))
            }
            None => None,
        };
        let store = match (store, &control_plane) {
            (Some(store), _) => store,
            (None, Some((conninfo, _))) => Arc::new(crate::control_plane::store::PgGrantStore::new(conninfo)) as Arc<dyn GrantStore>,
            (None, None) => Arc::new(FileStore::new(&config.grants.store)),
        };
        let grants = GrantService::open(store, scopes.clone(), events.clone(), sessions.clone())
            .await
            .context(if control_plane.is_some() { "control_plane" } else { "grants.store" })?;
        if let Some((_, options)) = &control_plane {
            grants.set_fresh_until(std::time::Instant::now() + options.stale_after);
        }

        let served = serve_scopes(config, &secrets.scopes, &upstream, options.skip_role_check).await?;
        let proxy = Proxy::new(config.listen.clone(), tls, upstream, grants.clone())
            .with_policies(served.policies)
            .with_disabled_scopes(served.disabled)
            .with_audit(audit.clone())
            .with_sessions(sessions.clone())
            .with_scope_logins(served.logins)
            .with_events(events.clone())
            .with_reads(grants.reads())
            .with_grant_settings(grant_settings(config));
        let proxy = Arc::new(proxy);
        proxy.keep_schemas_fresh().await;
        let logins: Arc<dyn crate::identity::LoginStore> = match &control_plane {
            Some((conninfo, _)) => Arc::new(crate::identity::logins::PgLoginStore::new(conninfo)),
            None => Arc::new(crate::identity::logins::FileLoginStore::open(config.identity.logins_file.clone()).map_err(anyhow::Error::msg).context("identity.logins_file")?),
        };
        let provider = config.identity.oidc.clone().map(crate::identity::Oidc::new).transpose().map_err(anyhow::Error::msg)?;
        let identity = Arc::new(crate::identity::Identity::new(provider, logins));
        if let Some(oidc) = identity.oidc() {
            // Read the provider's discovery document now, so a wrong issuer shows in the log at
            // start rather than at the first sign-in.
            let (warm, issuer) = (identity.clone(), oidc.config().issuer.clone());
            tokio::spawn(async move {
                match warm.call(|o| o.discover()).await {
                    Ok(()) => tracing::info!(%issuer, "identity provider discovered"),
                    Err(e) => tracing::warn!(error = %e, "identity provider not reachable yet; sign-ins fail until it is"),
                }
            });
        }
        let api = Arc::new(ApiState {
            identity,
            console_url: config.admin.public_url.clone().unwrap_or_else(|| format!("http://{}", config.admin.addr)),
            shutdown: CancellationToken::new(),
            live_streams: Arc::new(tokio::sync::Semaphore::new(crate::console::MAX_LIVE_STREAMS)),
            console: Default::default(),
            control_plane: control_plane.as_ref().map(|(conninfo, _)| conninfo.clone()),
            audit_log: config.audit.path.clone(),
            audit_anchor: config.audit.anchor.clone(),
            grants: grants.clone(),
            people: arc_swap::ArcSwap::from_pointee(people),
            sessions: sessions.clone(),
            events: events.clone(),
            proxy_host: config.listen.addr.ip().to_string(),
            proxy_port: config.listen.addr.port(),
            client_ca: config.listen.tls_ca.clone(),
            fleet: std::sync::OnceLock::new(),
            proxy: proxy.clone(),
        });
        let admin = AdminState { metrics, sessions, api: Some(api) };
        let audit_pg = match &config.audit.postgres {
            Some(pg) => {
                let dsn = match options.audit_pg_dsn.clone() {
                    Some(d) => d,
                    None => std::env::var(&pg.dsn_env).with_context(|| format!("audit.postgres.dsn_env: {} is not set", pg.dsn_env))?,
                };
                Some((dsn, pg.table.clone()))
            }
            None => None,
        };
        Ok(Self { proxy, grants, admin, events, audit, audit_pg, config: config.clone(), skip_role_check: options.skip_role_check, control_plane, event_writer, notify: notify_targets })
    }

    /// Starts serving on the given listeners.
    pub fn start(mut self, listener: TcpListener, admin_listener: TcpListener) -> anyhow::Result<RunningApp> {
        let proxy_addr = listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        // The psql line must name the port actually bound (port 0 in tests).
        if let Some(api) = self.admin.api.as_mut() {
            let api = Arc::get_mut(api).expect("not shared before start");
            api.proxy_port = proxy_addr.port();
            if self.config.admin.public_url.is_none() {
                api.console_url = format!("http://{admin_addr}");
                if !admin_addr.ip().is_loopback() {
                    tracing::warn!(%admin_addr, "the console is served on a non-loopback address without admin.public_url: browsers keep its Secure session cookie only over https (set admin.public_url to the https address people use)");
                }
            }
            let ip = proxy_addr.ip();
            api.proxy_host = match &self.config.listen.public_host {
                Some(host) => host.clone(),
                None if ip.is_unspecified() => "127.0.0.1".to_owned(),
                None => ip.to_string(),
            };
        }
        let shutdown = self.admin.api.as_ref().map(|api| api.shutdown.clone()).unwrap_or_default();
        let mut tasks = Vec::new();
        let mut listener = Some(listener);
        let admin = self.admin.clone();
        let s = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(admin_listener, admin, s).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        }));
        tasks.push(tokio::spawn(self.grants.clone().run_reaper(shutdown.clone())));
        tasks.push(tokio::spawn(self.grants.reads().run(shutdown.clone())));
        if let Some((conninfo, options)) = self.control_plane.take() {
            let instance = self.config.control_plane.as_ref().and_then(|cp| cp.instance_id.clone()).unwrap_or_else(|| crate::control_plane::default_instance_id(proxy_addr.port()));
            let fleet = Arc::new(Fleet::new(
                &conninfo,
                instance.clone(),
                proxy_addr.to_string(),
                format!("http://{admin_addr}"),
                self.proxy.sessions.clone(),
                self.proxy.cancels.clone(),
                self.events.clone(),
            ));
            self.proxy.set_fleet(fleet.clone());
            if let Some(api) = &self.admin.api {
                api.set_fleet(fleet.clone());
            }
            // The proxy accepts once the first heartbeat was tried (connections wait in the
            // listen backlog until then): a process whose id another live one holds never serves.
            let (joined, first_heartbeat) = tokio::sync::oneshot::channel();
            tasks.push(tokio::spawn(fleet.clone().run_publisher(shutdown.clone(), joined)));
            tasks.push(tokio::spawn(fleet.clone().run_requests(shutdown.clone())));
            let (proxy, s, l) = (self.proxy.clone(), shutdown.clone(), listener.take().expect("not taken yet"));
            tasks.push(tokio::spawn(async move {
                let _ = first_heartbeat.await;
                proxy.run(l, s).await
            }));
            if let Some(writer) = self.event_writer.take() {
                tasks.push(tokio::spawn(writer.run(conninfo.clone(), instance.clone(), shutdown.clone())));
            }
            tasks.push(tokio::spawn(crate::control_plane::watch::run(conninfo.clone(), self.grants.clone(), Some(fleet.clone()), options, shutdown.clone())));
            // Every instance's audit chain, next to the others in the control plane.
            let held = fleet.clone();
            let sink = crate::audit::pgsink::PgSinkOptions {
                dsn: conninfo,
                table: "pglease.audit".into(),
                log: self.audit.path.clone(),
                instance: Some(instance),
                hold: Some(Arc::new(move || held.not_serving().is_some())),
            };
            tasks.push(tokio::spawn(crate::audit::pgsink::run(sink, shutdown.clone())));
        }
        // The audit log failing (every statement refused) is an event, and so is its recovery.
        let (health, events, s) = (self.audit.health(), self.events.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            let (mut seen, mut reported) = (health.failures().0, false);
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
                // New failures since the last look, even ones that cleared meanwhile (their
                // statements were refused all the same).
                let (failures, error) = health.failures();
                if failures > seen && !reported {
                    reported = true;
                    events.emit(crate::events::Event::AuditFailing { error });
                }
                seen = failures;
                if reported && !health.is_failing() {
                    reported = false;
                    events.emit(crate::events::Event::AuditRecovered);
                }
            }
        }));
        for target in std::mem::take(&mut self.notify) {
            let s = shutdown.clone();
            tasks.push(tokio::task::spawn_blocking(move || target.deliver(s)));
        }
        if let Some(l) = listener.take() {
            tasks.push(tokio::spawn(self.proxy.clone().run(l, shutdown.clone())));
        }
        if let Some((dsn, table)) = self.audit_pg.take() {
            let options = crate::audit::pgsink::PgSinkOptions { dsn, table, log: self.audit.path.clone(), instance: None, hold: None };
            tasks.push(tokio::spawn(crate::audit::pgsink::run(options, shutdown.clone())));
        }
        let reloader = crate::reload::Reloader::new(self.proxy.clone(), self.grants.clone(), self.admin.api.clone(), self.events.clone(), self.skip_role_check, self.config);
        Ok(RunningApp { proxy_addr, admin_addr, shutdown, reloader, tasks, reads: self.grants.reads() })
    }
}

/// What the proxy serves of each scope.
pub(crate) struct ServedScopes {
    pub logins: HashMap<String, UpstreamLogin>,
    pub policies: HashMap<String, Arc<ScopePolicy>>,
    /// Scopes not served, with why.
    pub disabled: HashMap<String, String>,
}

/// The certificate and key shown to clients, when the config names them.
pub(crate) fn client_tls(config: &Config) -> anyhow::Result<Option<ServerTls>> {
    match (&config.listen.tls_cert, &config.listen.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(ServerTls::from_files(cert, key).context("listen.tls_cert / listen.tls_key")?)),
        _ => Ok(None),
    }
}

pub(crate) fn grant_settings(config: &Config) -> GrantSettings {
    GrantSettings { warn_before: config.grants.warn_before.clone(), failures_before_delay: config.grants.failures_before_delay }
}

/// Logins and policies of every scope, each backing role checked against its scope.
pub(crate) async fn serve_scopes(config: &Config, passwords: &HashMap<String, String>, upstream: &Upstream, skip_role_check: bool) -> anyhow::Result<ServedScopes> {
    let mut logins = HashMap::new();
    for (name, scope) in &config.scopes {
        let password = passwords.get(name).cloned().with_context(|| format!("scopes.{name}: no password for its role"))?;
        logins.insert(name.clone(), UpstreamLogin { user: scope.role.clone(), password });
    }
    let policies: HashMap<String, Arc<ScopePolicy>> =
        config.scopes.iter().map(|(name, c)| (name.clone(), Arc::new(ScopePolicy::from_config(name, c)))).collect();
    for (name, policy) in &policies {
        for class in policy.dangerous_allowances() {
            tracing::warn!(scope = %name, "scope allows {class}: its sessions can change more than their own results");
        }
    }
    // Defense in depth: a scope whose backing role can do more than the scope allows is not
    // served (its users get a FATAL naming the excess), and neither is one that cannot be checked.
    let mut disabled = HashMap::new();
    if !skip_role_check {
        for (name, policy) in &policies {
            let (Some(login), Some(scope)) = (logins.get(name), config.scopes.get(name)) else { continue };
            let mut checked = Ok(Vec::new());
            for database in scope.databases() {
                checked = crate::policy::rolecheck::excess_privileges(upstream, login, &database, policy).await.map(|excess| {
                    excess.into_iter().map(|e| if scope.databases.is_empty() { e } else { format!("{e} (in {database})") }).collect::<Vec<_>>()
                });
                if !matches!(&checked, Ok(e) if e.is_empty()) {
                    break;
                }
            }
            match checked {
                Ok(excess) if excess.is_empty() => tracing::info!(scope = %name, role = %login.user, "backing role matches its scope"),
                Ok(excess) => {
                    let why = format!("its role {} can do more than the scope allows: {}", login.user, excess.join(", "));
                    tracing::error!(scope = %name, "{why}; the scope is not served");
                    disabled.insert(name.clone(), why);
                }
                Err(e) => {
                    let why = format!("its role {} could not be checked: {e}", login.user);
                    tracing::error!(scope = %name, "{why}; the scope is not served");
                    disabled.insert(name.clone(), why);
                }
            }
        }
    }
    Ok(ServedScopes { logins, policies, disabled })
}
