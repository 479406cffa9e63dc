//! The listener: accepts clients, caps their number, runs each connection from handshake to
//! relay, and shuts down gracefully.
//!
//! Like mini-redis's `server::run`, [`Proxy::run`] takes its listener and a shutdown token, so
//! tests bind port 0 and stop the proxy when they are done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use rand::RngCore;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Over-limit connections answered at once (the rest are closed without a word).
const OVERFLOW_HANDSHAKES: usize = 64;
use tracing::Instrument;

use crate::auth::CredentialSource;
use crate::auth::scram::Channel;
use crate::cancel::CancelRegistry;
use crate::codec::FramedReader;
use crate::codec::messages::ParameterStatus;
use crate::config::ListenConfig;
use crate::error::{ClientError, UserFacingError, sqlstate};
use crate::handshake::{self, ClientTlsPolicy, Handshake, HandshakeError};
use crate::session::{PassThrough, Session, SessionContext, SessionEnd, SessionHooks, SessionOptions, SessionParts, SessionRegistry};
use crate::stream::Stream;
use crate::tls::ServerTls;
use crate::upstream::{Upstream, UpstreamLogin};
use crate::workers::Workers;
use crate::audit::AuditLog;
use crate::auth::Identity;
use crate::policy::ScopePolicy;
use crate::policy::hooks::PolicyHooks;
use crate::events::{Event, Events};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Per-session settings that come from the grants config.
#[derive(Debug, Clone)]
pub struct GrantSettings {
    /// Sessions are warned this long before their grant ends.
    pub warn_before: Vec<Duration>,
    /// Failed logins from one address before each further attempt is delayed.
    pub failures_before_delay: u32,
}

impl Default for GrantSettings {
    fn default() -> Self {
        Self { warn_before: vec![Duration::from_secs(300), Duration::from_secs(60)], failures_before_delay: 3 }
    }
}

/// What a config reload may change. Each connection takes the state current when it arrives
/// and keeps it; [`Proxy::reload`] swaps in a new one for the connections that follow.
#[derive(Clone)]
pub struct ProxyState {
    /// Timeouts and limits; `addr` and `max_connections` are fixed at start.
    pub listen: ListenConfig,
    pub tls: ClientTlsPolicy,
    /// The upstream role of each scope; sessions with a scope log in as it, never as the default.
    pub scope_logins: HashMap<String, UpstreamLogin>,
    /// The statement policy of each scope.
    pub policies: HashMap<String, Arc<ScopePolicy>>,
    /// Scopes not served (their backing role can do more than the scope allows), with why.
    pub disabled_scopes: HashMap<String, String>,
    pub grant_settings: GrantSettings,
}

impl ProxyState {
    /// Whether `now` still serves `scope` with the very policy this state does.
    fn serves_as_now(&self, scope: &str, now: &ProxyState) -> bool {
        match (self.policies.get(scope), now.policies.get(scope)) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) && !now.disabled_scopes.contains_key(scope),
            _ => false,
        }
    }
}

/// Everything the proxy shares between connections.
pub struct Proxy {
    /// Fixed at start: the listener's address and connection limit.
    listen: ListenConfig,
    state: ArcSwap<ProxyState>,
    /// Where every statement is recorded before it runs.
    audit: Option<AuditLog>,
    events: Events,
    throttle: LoginThrottle,
    /// Cancel requests that matched no session, per address.
    cancel_misses: LoginThrottle,
    /// Cancel requests passed on to other instances, per address.
    cancels_routed: LoginThrottle,
    upstream: Arc<Upstream>,
    credentials: Arc<dyn CredentialSource>,
    hooks: Arc<dyn SessionHooks>,
    pub cancels: Arc<CancelRegistry>,
    pub sessions: Arc<SessionRegistry>,
    /// With a control plane: where a cancel request for another instance's session goes.
    fleet: std::sync::OnceLock<Arc<crate::control_plane::fleet::Fleet>>,
    /// What grants under a read budget have read.
    reads: Option<Arc<crate::grants::reads::ReadLedger>>,
    /// Keys the mock SCRAM salts of unknown logins; random per process.
    mock_secret: [u8; 32],
}

impl Proxy {
    pub fn new(listen: ListenConfig, tls: Option<ServerTls>, upstream: Upstream, credentials: Arc<dyn CredentialSource>) -> Self {
        let mut mock_secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut mock_secret);
        let state = ProxyState {
            tls: ClientTlsPolicy { tls: tls.map(Arc::new), allow_plaintext: listen.allow_plaintext },
            listen: listen.clone(),
            scope_logins: HashMap::new(),
            policies: HashMap::new(),
            disabled_scopes: HashMap::new(),
            grant_settings: GrantSettings::default(),
        };
        Self {
            listen,
            state: ArcSwap::from_pointee(state),
            audit: None,
            events: Events::new(),
            throttle: LoginThrottle::default(),
            cancel_misses: LoginThrottle::default(),
            cancels_routed: LoginThrottle::default(),
            upstream: Arc::new(upstream),
            credentials,
            hooks: Arc::new(PassThrough),
            cancels: CancelRegistry::new(),
            sessions: SessionRegistry::new(),
            fleet: std::sync::OnceLock::new(),
            reads: None,
            mock_secret,
        }
    }

    /// Joins a fleet: cancel requests for sessions of other instances are passed on to them.
    pub fn set_fleet(&self, fleet: Arc<crate::control_plane::fleet::Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    /// Cancels the statement of the session `pid`/`secret` name, on this instance or, through
    /// the control plane, on the one that has it; reports whether the request went anywhere.
    ///
    /// Pids are public (`pg_backend_pid()`), so the 4-byte secret alone guards a session: an
    /// address whose requests missed [`CANCEL_MISSES_ALLOWED`] times lately has the next ones
    /// dropped unread, with a throttle of their own so that they never slow its logins down.
    async fn cancel(&self, pid: i32, secret: &[u8], from: IpAddr) -> bool {
        if !self.cancel_misses.delay(from, CANCEL_MISSES_ALLOWED).is_zero() {
            metrics::counter!("pglease_cancel_requests_total", "result" => "throttled").increment(1);
            return false;
        }
        if self.cancels.cancel(pid, secret).await {
            return true;
        }
        let Some(fleet) = self.fleet.get() else {
            self.cancel_misses.failed(from);
            return false;
        };
        // Each routed request is a write to the control plane: an address gets a bounded number
        // of them. (The instance that has the session checks the secret and stops taking
        // requests for a pid after `cancel::MISSES_PER_PID` wrong ones, wherever they came from.)
        if !self.cancels_routed.delay(from, CANCELS_ROUTED_ALLOWED).is_zero() {
            metrics::counter!("pglease_cancel_requests_total", "result" => "throttled").increment(1);
            return false;
        }
        self.cancels_routed.failed(from);
        // A session that started a moment ago may not be published yet (the publisher writes
        // within milliseconds of a start): look a few times before giving up.
        let mut routed = fleet.forward_cancel(pid, secret).await;
        for _ in 0..4 {
            if !matches!(routed, Ok(false)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            routed = fleet.forward_cancel(pid, secret).await;
        }
        match routed {
            Ok(forwarded) => {
                metrics::counter!("pglease_cancel_requests_total", "result" => if forwarded { "routed" } else { "unknown" }).increment(1);
                if !forwarded {
                    self.cancel_misses.failed(from);
                }
                forwarded
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not pass a cancel request on through the control plane");
                metrics::counter!("pglease_cancel_requests_total", "result" => "failed").increment(1);
                false
            }
        }
    }

    /// The reloadable state in force now.
    pub fn state(&self) -> Arc<ProxyState> {
        self.state.load_full()
    }

    fn edit_state(self, edit: impl FnOnce(&mut ProxyState)) -> Self {
        let mut state = (*self.state.load_full()).clone();
        edit(&mut state);
        self.state.store(Arc::new(state));
        self
    }

    /// Puts `next` in force for connections from now on. Sessions already running keep the
    /// state they started with; the caller ends those that must not (see `reload::Reloader`).
    pub fn reload(&self, next: ProxyState) {
        self.state.store(Arc::new(next));
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Loads the schema of every served scope whose rules deny columns (as its role) and keeps
    /// it fresh from then on (see `policy::schema`). A scope kept across a reload loads its
    /// schema again.
    pub async fn keep_schemas_fresh(&self) {
        let state = self.state();
        for (name, policy) in &state.policies {
            let Some(login) = state.scope_logins.get(name).filter(|_| !state.disabled_scopes.contains_key(name)) else { continue };
            if policy.refresher_started.load(std::sync::atomic::Ordering::SeqCst) {
                crate::policy::schema::refresh(&self.upstream, login, policy).await;
                continue;
            }
            crate::policy::schema::refresh(&self.upstream, login, policy).await;
            crate::policy::schema::keep_fresh(self.upstream.clone(), policy, login.clone());
        }
    }

    /// Sets the upstream role each scope's sessions log in as.
    pub fn with_scope_logins(self, logins: HashMap<String, UpstreamLogin>) -> Self {
        self.edit_state(|s| s.scope_logins = logins)
    }

    /// Sets the statement policy of each scope. Sessions with a scope run under its policy.
    pub fn with_policies(self, policies: HashMap<String, Arc<ScopePolicy>>) -> Self {
        self.edit_state(|s| s.policies = policies)
    }

    /// Records every statement of every session in `log` before it reaches Postgres.
    pub fn with_audit(mut self, log: AuditLog) -> Self {
        self.audit = Some(log);
        self
    }

    /// Scopes that must not be served, with the reason shown to their users.
    pub fn with_disabled_scopes(self, disabled: HashMap<String, String>) -> Self {
        self.edit_state(|s| s.disabled_scopes = disabled)
    }

    pub fn with_grant_settings(self, settings: GrantSettings) -> Self {
        self.edit_state(|s| s.grant_settings = settings)
    }

    /// Shares a session registry (the grant service ends sessions through it).
    pub fn with_sessions(mut self, sessions: Arc<SessionRegistry>) -> Self {
        self.sessions = sessions;
        self
    }

    /// Counts grants' reads against their scopes' read budgets here (without a ledger, a scope
    /// with a budget serves no session: fail closed).
    pub fn with_reads(mut self, reads: Arc<crate::grants::reads::ReadLedger>) -> Self {
        self.reads = Some(reads);
        self
    }

    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// Installs the policy/audit hooks every session runs.
    pub fn with_hooks(mut self, hooks: Arc<dyn SessionHooks>) -> Self {
        self.hooks = hooks;
        self
    }

    /// Accepts clients until `shutdown` fires, then drains: sessions end as soon as nothing is
    /// in flight, and those still busy after `shutdown_grace` are ended with `FATAL 57P01`.
    pub async fn run(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let workers = match Workers::start(self.listen.workers.unwrap_or_else(Workers::default_count)) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the session threads; not accepting clients");
                return;
            }
        };
        let limit = Arc::new(Semaphore::new(self.listen.max_connections));
        // Connections over the limit still get a readable answer (and may carry a cancel
        // request), but only this many are answered at once; beyond that they are closed.
        let overflow = Arc::new(Semaphore::new(OVERFLOW_HANDSHAKES));
        loop {
            let (tcp, addr) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            metrics::counter!("pglease_connections_accepted_total").increment(1);
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                metrics::counter!("pglease_connections_rejected_total", "reason" => "limit").increment(1);
                if let Ok(slot) = overflow.clone().try_acquire_owned() {
                    let proxy = self.clone();
                    tracker.spawn(async move {
                        let _slot = slot;
                        proxy.reject_over_limit(tcp).await;
                    });
                }
                continue;
            };
            // The socket moves to a session thread's runtime: it is registered there afresh.
            let tcp = match tcp.into_std() {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hand the connection to a session thread");
                    continue;
                }
            };
            let proxy = self.clone();
            let shutdown = shutdown.clone();
            let span = tracing::info_span!("conn", client = %addr, session = tracing::field::Empty);
            workers.spawn(tracker.track_future(
                async move {
                    let _permit = permit;
                    match TcpStream::from_std(tcp) {
                        Ok(tcp) => proxy.serve_connection(tcp, addr, shutdown).await,
                        Err(e) => tracing::warn!(error = %e, "cannot register the connection on its session thread"),
                    }
                }
                .instrument(span),
            ));
        }
        drop(listener);
        tracker.close();
        tracing::info!(sessions = self.sessions.len(), "stopped accepting; draining sessions");
        let state = self.state();
        if tokio::time::timeout(state.listen.shutdown_grace, tracker.wait()).await.is_err() {
            let n = self.sessions.kill_where(|_| true, &crate::session::shutdown_error());
            tracing::info!(sessions = n, "grace period over; ending remaining sessions");
            // Handshakes are bounded by their own timeout, sessions end promptly once killed.
            let _ = tokio::time::timeout(state.listen.handshake_timeout + Duration::from_secs(5), tracker.wait()).await;
        }
    }

    async fn serve_connection(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr, shutdown: CancellationToken) {
        let _ = tcp.set_nodelay(true);
        let started = Instant::now();
        let state = self.state();
        // The handshake and the session are boxed: inline, this task would keep room for the
        // larger of the two (and for the handshake's and the session's moved-in parts twice) for
        // as long as the session lasts; an idle session's task went from 7.9 KiB to 1.8 KiB plus
        // the session's own 4.7 KiB (heaptrack, `size_of_val`).
        let setup = tokio::time::timeout(state.listen.handshake_timeout, Box::pin(self.setup(&state, tcp, addr, &shutdown))).await;
        let session = match setup {
            Ok(Ok(Some(session))) => session,
            Ok(Ok(None)) => return, // a cancel request, handled
            Ok(Err(e)) => {
                metrics::counter!("pglease_connections_rejected_total", "reason" => "handshake").increment(1);
                tracing::info!(error = %e, "connection refused during setup");
                return;
            }
            Err(_) => {
                metrics::counter!("pglease_connections_rejected_total", "reason" => "timeout").increment(1);
                tracing::info!("handshake timed out");
                return;
            }
        };
        metrics::histogram!("pglease_handshake_duration_seconds").record(started.elapsed().as_secs_f64());
        tracing::Span::current().record("session", session.ctx.id);
        tracing::info!(login = %session.ctx.identity.login, database = %session.ctx.database, "session started");
        let (id, grant_id, handle) = (session.ctx.id, session.ctx.identity.grant_id.clone(), session.handle());
        self.events.emit(Event::SessionOpened {
            session: id,
            grant: grant_id.clone(),
            login: session.ctx.identity.login.clone(),
            user: session.ctx.identity.person.clone(),
            scope: session.ctx.identity.scope.clone(),
            client: addr.to_string(),
            database: session.ctx.database.clone(),
            settings: session.ctx.settings.iter().cloned().collect(),
        });
        metrics::gauge!("pglease_sessions_active").increment(1.0);
        let end = Box::pin(session.run()).await;
        let statements = handle.statements();
        metrics::gauge!("pglease_sessions_active").decrement(1.0);
        let kind = match &end {
            SessionEnd::ClientClosed => "client_closed",
            SessionEnd::UpstreamClosed => "upstream_closed",
            SessionEnd::ClientProtocol(_) => "client_protocol",
            SessionEnd::UpstreamProtocol(_) => "upstream_protocol",
            SessionEnd::Ended(_) => "ended",
            SessionEnd::ClientStalled(_) => "client_stalled",
            SessionEnd::Io(_) => "io",
        };
        metrics::counter!("pglease_sessions_ended_total", "reason" => kind).increment(1);
        tracing::info!(?end, "session ended");
        let reason = match &end {
            SessionEnd::Ended(e) | SessionEnd::ClientProtocol(e) => e.message.clone(),
            other => kind.replace('_', " ") + if matches!(other, SessionEnd::Io(_)) { " error" } else { "" },
        };
        self.events.emit(Event::SessionClosed { session: id, grant: grant_id, reason, statements });
    }

    /// Answers a connection over the limit the way Postgres does: after TLS negotiation and the
    /// startup packet, `FATAL 53300`. A cancel request is still honoured.
    async fn reject_over_limit(&self, tcp: TcpStream) {
        let peer = tcp.peer_addr().ok().map(|a| a.ip());
        let state = self.state();
        let answer = async {
            match handshake::negotiate(tcp, &state.tls).await {
                Ok(Handshake::Cancel(request)) => {
                    if let Some(ip) = peer {
                        self.cancel(request.pid, &request.secret, ip).await;
                    }
                    request.close().await;
                }
                Ok(Handshake::Startup(mut s)) => {
                    let _ = handshake::refuse::<()>(&mut s.stream, ClientError::fatal(sqlstate::TOO_MANY_CONNECTIONS, "sorry, too many clients already")).await;
                }
                Err(_) => {}
            }
        };
        let _ = tokio::time::timeout(state.listen.handshake_timeout.min(Duration::from_secs(5)), answer).await;
    }

    /// Handshake, login, upstream session. `Ok(None)` for a cancel request.
    async fn setup(&self, state: &ProxyState, tcp: TcpStream, addr: SocketAddr, shutdown: &CancellationToken) -> Result<Option<Session>, HandshakeError> {
        let startup = match handshake::negotiate(tcp, &state.tls).await? {
            Handshake::Cancel(request) => {
                let forwarded = self.cancel(request.pid, &request.secret, addr.ip()).await;
                self.events.emit(Event::CancelRequest { pid: request.pid, client: addr.to_string(), forwarded });
                request.close().await;
                return Ok(None);
            }
            Handshake::Startup(s) => s,
        };
        let mut stream = startup.stream;
        if shutdown.is_cancelled() {
            return handshake::refuse(&mut stream, ClientError::fatal(sqlstate::CANNOT_CONNECT_NOW, "pglease is shutting down")).await;
        }
        let params = match handshake::vet_params(&startup.message) {
            Ok(p) => p,
            Err(e) => return handshake::refuse(&mut stream, e).await,
        };
        if let Some(negotiate) = handshake::negotiation_message(&startup.message, &params) {
            stream.write_all(negotiate.raw()).await.map_err(|e| HandshakeError::Closed(e.to_string()))?;
        }
        let channel = match (&stream, &state.tls.tls) {
            (Stream::ServerTls(_), Some(tls)) => Channel::Tls { end_point_hash: tls.end_point_hash.clone() },
            _ => Channel::Plain,
        };

        // Repeated failures from this address slow every further attempt down.
        let delay = self.throttle.delay(addr.ip(), state.grant_settings.failures_before_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // Fail closed, and say so: no login is decided on grants that may be out of date.
        let unavailable = self.credentials.unavailable().or_else(|| {
            self.fleet.get().and_then(|f| f.not_serving())
        });
        if let Some(why) = unavailable {
            metrics::counter!("pglease_logins_refused_stale_total").increment(1);
            return handshake::refuse(&mut stream, ClientError::fatal(sqlstate::CANNOT_CONNECT_NOW, why)).await;
        }
        let mut reader = FramedReader::new(stream, handshake::auth_limits());
        let identity = match handshake::authenticate(&mut reader, &params, self.credentials.as_ref(), &channel, &self.mock_secret).await {
            Ok(identity) => identity,
            Err(e) => {
                metrics::counter!("pglease_auth_failures_total").increment(1);
                if e.code == sqlstate::INVALID_PASSWORD || e.code == sqlstate::INVALID_AUTHORIZATION {
                    self.throttle.failed(addr.ip());
                    self.events.emit(Event::LoginFailed { login: params.user.clone(), client: addr.to_string() });
                }
                handshake::send_error(reader.get_mut(), &e).await;
                return Err(HandshakeError::Refused(e));
            }
        };
        self.throttle.succeeded(addr.ip());

        // Fail closed: a session governed by a scope logs in as that scope's role, under that
        // scope's policy, or not at all.
        let (login, hooks, pinned, budget): (UpstreamLogin, Arc<dyn SessionHooks>, Vec<(String, String)>, _) = match &identity.scope {
            Some(scope) => {
                let refuse = |why: String| ClientError::fatal(sqlstate::INSUFFICIENT_PRIVILEGE, why);
                let found = match (state.scope_logins.get(scope), state.policies.get(scope), state.disabled_scopes.get(scope)) {
                    (_, _, Some(why)) => Err(refuse(format!("pglease: scope \"{scope}\" is disabled: {why}"))),
                    (Some(l), Some(p), None) => Ok((l.clone(), p.clone())),
                    _ => Err(refuse(format!("pglease: scope \"{scope}\" is not configured on this proxy"))),
                };
                // Startup settings are decided like a SET of them, with the same message.
                let found = found.and_then(|(l, policy)| match params.settings.iter().find(|(name, _)| !policy.setting_allowed(name)) {
                    Some((name, _)) => Err(refuse(format!("pglease: scope \"{scope}\" does not allow changing setting {name}"))),
                    None => Ok((l, policy)),
                });
                match found {
                    Ok((l, policy)) => {
                        let hooks: Arc<dyn SessionHooks> = Arc::new(PolicyHooks::new(policy.clone(), &l.user));
                        (l, hooks, policy.pinned_startup_params(), policy.read_budget)
                    }
                    Err(e) => {
                        tracing::error!(scope = %scope, error = %e, "session refused");
                        handshake::send_error(reader.get_mut(), &e).await;
                        return Err(HandshakeError::Refused(e));
                    }
                }
            }
            None => (self.upstream.default_login().clone(), self.hooks.clone(), Vec::new(), None),
        };
        // The grant's read budget: what it has read so far must be known before it reads more.
        let reads = match budget {
            Some(budget) => {
                let meter = match (&self.reads, &identity.grant_id, &identity.scope) {
                    (Some(ledger), Some(grant), Some(scope)) => {
                        let who = crate::grants::reads::GrantRef { id: grant.clone(), user: identity.person.clone(), scope: scope.clone() };
                        ledger.meter(who, budget).await.map_err(|e| e.to_string())
                    }
                    _ => Err("no read budget ledger on this proxy".to_owned()),
                };
                match meter {
                    Ok(m) => Some(m),
                    Err(why) => {
                        tracing::error!(error = %why, "session refused: its grant's read budget usage cannot be read");
                        let e = ClientError::fatal(sqlstate::CANNOT_CONNECT_NOW, "pglease: cannot read how much this grant has read (its scope has a read budget); try again shortly");
                        handshake::send_error(reader.get_mut(), &e).await;
                        return Err(HandshakeError::Refused(e));
                    }
                }
            }
            None => None,
        };

        let mut forwarded: Vec<(String, String)> = params.forwarded.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("application_name")).cloned().collect();
        forwarded.push(("client_encoding".into(), "UTF8".into()));
        forwarded.extend(params.settings.iter().cloned());
        // What row filters (and the role's row-level security policies) read: pinned too.
        let mut pinned = pinned;
        if let Some(scope) = &identity.scope {
            pinned.push(("pglease.person".into(), identity.person.clone()));
            pinned.push(("pglease.grant".into(), identity.grant_id.clone().unwrap_or_default()));
            pinned.push(("pglease.scope".into(), scope.clone()));
        }
        forwarded.extend(pinned.iter().cloned());
        // Stamp the upstream session so pg_stat_activity shows who is behind it.
        let client_app = params.forwarded.iter().find(|(k, _)| k.eq_ignore_ascii_case("application_name")).map(|(_, v)| v.as_str()).unwrap_or("");
        forwarded.push(("application_name".into(), stamp(&identity, client_app)));
        let upstream = match self.upstream.connect(&login, &params.database, &forwarded).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, upstream = %self.upstream.describe(), "upstream connection failed");
                let client_error = e.to_client_error();
                handshake::send_error(reader.get_mut(), &client_error).await;
                return Err(HandshakeError::Refused(client_error));
            }
        };

        let registered = self.sessions.register(identity.clone(), addr, params.database.clone(), upstream.key.pid);
        // A reload that changed this scope while the session was starting ends the sessions it
        // finds registered; this one may have registered just after, under the old rules.
        if let Some(scope) = &identity.scope
            && !state.serves_as_now(scope, &self.state())
        {
            let e = ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, format!("pglease: scope \"{scope}\" was changed by a configuration reload while this session started; reconnect"));
            handshake::send_error(reader.get_mut(), &e).await;
            return Err(HandshakeError::Refused(e));
        }
        let cancel_key = self.cancels.register(self.upstream.clone(), upstream.key.clone());

        // The upstream's ParameterStatus set, our BackendKeyData, then ReadyForQuery.
        let mut hello = BytesMut::with_capacity(512);
        for p in &upstream.parameters {
            // The client sees the application_name it asked for; pg_stat_activity shows the stamp.
            let value = if p.name == "application_name" { client_app.to_owned() } else { p.value.clone() };
            hello.extend_from_slice(ParameterStatus { name: p.name.clone(), value }.encode().raw());
        }
        hello.extend_from_slice(cancel_key.key.encode().raw());
        hello.extend_from_slice(upstream.tx.encode_ready().raw());
        let s = reader.get_mut();
        s.write_all(&hello).await.map_err(|e| HandshakeError::Closed(e.to_string()))?;
        s.flush().await.map_err(|e| HandshakeError::Closed(e.to_string()))?;

        // The settings a replay must run under: the client's accepted ones, then the pinned.
        let settings = params.settings.iter().cloned().chain(pinned).collect();
        let ctx = SessionContext { id: registered.handle.id, identity, client_addr: addr, database: params.database, settings, reads };
        let hooks = match &self.audit {
            Some(log) => crate::audit::audited(hooks, log, &ctx),
            None => hooks,
        };
        let session = Session::new(SessionParts {
            ctx,
            client: reader,
            client_limits_max_frame: state.listen.max_message_bytes,
            upstream_stream: upstream.stream,
            upstream_leftover: upstream.leftover,
            upstream_max_frame: state.listen.max_message_bytes,
            upstream: self.upstream.clone(),
            upstream_key: upstream.key,
            tx: upstream.tx,
            hooks,
            handle: registered.handle.clone(),
            shutdown: shutdown.clone(),
            options: SessionOptions {
                idle_timeout: state.listen.idle_timeout,
                client_stall_timeout: Some(state.listen.client_stall_timeout),
                warn_before: state.grant_settings.warn_before.clone(),
            },
        })
        .with_guards(Box::new((registered, cancel_key)));
        Ok(Some(session))
    }
}


/// `application_name` of the upstream session: who, which grant, and the client's own name,
/// cut to Postgres's 63-byte limit on a character boundary.
pub(crate) fn stamp(identity: &Identity, client_app: &str) -> String {
    let mut s = format!("pglease {}", identity.person);
    if let Some(g) = &identity.grant_id {
        s.push(' ');
        s.push_str(g);
    }
    if !client_app.is_empty() {
        s.push_str(" / ");
        s.push_str(client_app);
    }
    let mut end = s.len().min(63);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

/// Failed logins per client address, to slow down guessing.
#[derive(Default)]
struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Cancel requests from one address that may match no session before its next ones are
/// dropped unread (for [`FAILURE_MEMORY`] after the last miss).
const CANCEL_MISSES_ALLOWED: u32 = 32;

/// Cancel requests from one address that may be passed on to other instances (for
/// [`FAILURE_MEMORY`] after the last one).
const CANCELS_ROUTED_ALLOWED: u32 = 64;

/// Failures are forgotten after this long without a new one.
const FAILURE_MEMORY: Duration = Duration::from_secs(300);
const MAX_DELAY: Duration = Duration::from_secs(10);

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long to wait before this address may try again: doubling from 250 ms after
    /// `free` failures, at most 10 s.
    fn delay(&self, ip: IpAddr, free: u32) -> Duration {
        let map = self.lock();
        match map.get(&ip) {
            Some((n, last)) if last.elapsed() < FAILURE_MEMORY && *n >= free => {
                let exp = (*n - free).min(6);
                (Duration::from_millis(250) * 2u32.pow(exp)).min(MAX_DELAY)
            }
            _ => Duration::ZERO,
        }
    }

    fn failed(&self, ip: IpAddr) {
        let mut map = self.lock();
        if map.len() > 100_000 {
            map.retain(|_, (_, last)| last.elapsed() < FAILURE_MEMORY);
        }
        let entry = map.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_MEMORY {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = Instant::now();
    }

    fn succeeded(&self, ip: IpAddr) {
        self.lock().remove(&ip);
    }
}
