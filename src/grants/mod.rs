//! Temporary grants: one person, one scope, a window, a reason, an approver.
//!
//! Lifecycle: `pending` → `active` (approved, or break-glass) or `denied`; `active` →
//! `expired` | `revoked`. The window starts when the grant is approved. Each grant has its
//! own login and a random secret shown once; only the SCRAM verifier is kept. When a grant
//! ends, its sessions are ended with `FATAL 57P01`.

pub mod reads;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::{Credential, CredentialSource, Identity, ScramVerifier};
use crate::error::{ClientError, sqlstate};
use crate::events::{Event, Events};
use crate::people::Principal;
use crate::scopes::Scopes;
use arc_swap::ArcSwap;
use crate::session::SessionRegistry;
pub use store::{FileStore, GrantStore, MemoryStore, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantStatus {
    Pending,
    Active,
    Denied,
    Expired,
    Revoked,
}

impl GrantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Pending => "pending",
            GrantStatus::Active => "active",
            GrantStatus::Denied => "denied",
            GrantStatus::Expired => "expired",
            GrantStatus::Revoked => "revoked",
        }
    }
}

/// A grant as stored. `verifier` is the only trace of the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Grant {
    pub id: String,
    /// The person the grant is for.
    pub user: String,
    pub scope: String,
    pub database: String,
    pub login: String,
    /// SCRAM-SHA-256 verifier of the secret, in Postgres's text form.
    pub verifier: String,
    pub status: GrantStatus,
    pub reason: String,
    pub requested_by: String,
    #[serde(with = "crate::time::serde_rfc3339")]
    pub requested_at: SystemTime,
    pub duration_secs: u64,
    pub break_glass: bool,
    pub decided_by: Option<String>,
    #[serde(with = "crate::time::serde_rfc3339_opt", default)]
    pub decided_at: Option<SystemTime>,
    #[serde(with = "crate::time::serde_rfc3339_opt", default)]
    pub expires_at: Option<SystemTime>,
    #[serde(with = "crate::time::serde_rfc3339_opt", default)]
    pub ended_at: Option<SystemTime>,
    pub ended_by: Option<String>,
    pub end_reason: Option<String>,
    /// How many times the grant was stored: a write names the version it read (see
    /// `GrantStore::put`). 0 for a grant not stored yet.
    #[serde(default)]
    pub version: u64,
    /// Whether the "expiring soon" event was sent (once, by one instance).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expiry_noticed: bool,
}

/// The "expiring soon" event comes this long before a grant's end (half its length for
/// shorter grants).
pub const EXPIRY_NOTICE: Duration = Duration::from_secs(600);

impl Grant {
    /// When the "expiring soon" event is due, for an active grant that has not had it.
    fn notice_at(&self) -> Option<SystemTime> {
        if self.status != GrantStatus::Active || self.expiry_noticed {
            return None;
        }
        let lead = EXPIRY_NOTICE.min(Duration::from_secs(self.duration_secs / 2));
        self.expires_at.and_then(|e| e.checked_sub(lead))
    }
}

impl Grant {
    /// The status as of `now`: an active grant past its end is expired even before the
    /// reaper has recorded it.
    pub fn status_at(&self, now: SystemTime) -> GrantStatus {
        match (self.status, self.expires_at) {
            (GrantStatus::Active, Some(end)) if now >= end => GrantStatus::Expired,
            (s, _) => s,
        }
    }

    pub fn is_usable(&self, now: SystemTime) -> bool {
        self.status_at(now) == GrantStatus::Active
    }
}

/// A grant as the API shows it (no verifier).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantView {
    pub id: String,
    pub user: String,
    pub scope: String,
    pub database: String,
    pub login: String,
    pub status: GrantStatus,
    pub reason: String,
    pub requested_by: String,
    pub requested_at: String,
    pub duration_secs: u64,
    pub break_glass: bool,
    pub decided_by: Option<String>,
    pub decided_at: Option<String>,
    pub expires_at: Option<String>,
    pub ended_at: Option<String>,
    pub ended_by: Option<String>,
    pub end_reason: Option<String>,
    /// What the grant has read, when its scope sets a read budget (`grant show` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<ReadView>,
}

/// A grant's reads against its scope's budget.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReadView {
    pub rows: u64,
    pub bytes: u64,
    pub max_rows: Option<u64>,
    pub max_bytes: Option<u64>,
}

impl ReadView {
    /// "30 rows (2.1 kB) of 50 rows" as a person reads it.
    pub fn describe(&self) -> String {
        let budget = reads::ReadBudget { rows: self.max_rows, bytes: self.max_bytes };
        format!("{} rows ({}) of {}", self.rows, reads::human_bytes(self.bytes), budget.describe())
    }
}

impl GrantView {
    pub fn of(g: &Grant, now: SystemTime) -> Self {
        let t = |t: Option<SystemTime>| t.map(crate::time::rfc3339);
        Self {
            id: g.id.clone(),
            user: g.user.clone(),
            scope: g.scope.clone(),
            database: g.database.clone(),
            login: g.login.clone(),
            status: g.status_at(now),
            reason: g.reason.clone(),
            requested_by: g.requested_by.clone(),
            requested_at: crate::time::rfc3339(g.requested_at),
            duration_secs: g.duration_secs,
            break_glass: g.break_glass,
            decided_by: g.decided_by.clone(),
            decided_at: t(g.decided_at),
            expires_at: t(g.expires_at),
            ended_at: t(g.ended_at),
            ended_by: g.ended_by.clone(),
            end_reason: g.end_reason.clone(),
            read: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no grant {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a requester asks for.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub scope: String,
    pub duration: Duration,
    pub reason: String,
    /// Whom the grant is for; the requester when None.
    pub user: Option<String>,
    pub break_glass: bool,
}

/// A new grant and its secret, which exists only in this value.
pub struct NewGrant {
    pub grant: Grant,
    /// The one-time secret, when the caller is the grant's user. A grant made for someone
    /// else gets no secret until its user takes one ([`GrantService::take_secret`]): whoever
    /// approves or issues a grant never learns how to log in with it.
    pub secret: Option<String>,
}

/// The grants, kept in memory and written through to the store.
pub struct GrantService {
    store: Arc<dyn GrantStore>,
    grants: RwLock<HashMap<String, Grant>>,
    /// Serialises changes so that store order equals memory order.
    write: tokio::sync::Mutex<()>,
    /// Swapped whole by a config reload.
    scopes: ArcSwap<Scopes>,
    events: Events,
    sessions: Arc<SessionRegistry>,
    changed: Notify,
    /// With a shared store: until when the grants in memory count as current. A login after
    /// that fails closed (the control plane cannot say whether the grant is live). None: the
    /// store is this process's own, memory is always current.
    fresh_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// What budgeted grants have read, kept with the grants.
    reads: Arc<reads::ReadLedger>,
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    crate::people::hex(&raw)
}

/// Runs a change once more if it lost a race with another instance (a write conflict):
/// `save` has brought memory up to date by then, and the change checks its conditions again
/// against that version. A decision someone else made first then fails this one on its merits
/// ("is active, not pending"); a change that merely read an old copy (a secret taken elsewhere
/// a moment ago) goes through. (A macro: the change is a call evaluated afresh each time.)
macro_rules! retrying {
    ($change:expr) => {
        match $change.await {
            Err(GrantError::Store(StoreError::Conflict(_))) => $change.await,
            other => other,
        }
    };
}

impl GrantService {
    /// Loads the store. A corrupt store is an error, never an empty start.
    pub async fn open(store: Arc<dyn GrantStore>, scopes: Arc<Scopes>, events: Events, sessions: Arc<SessionRegistry>) -> Result<Arc<Self>, StoreError> {
        let loaded = store.load().await?;
        let grants = loaded.into_iter().map(|g| (g.id.clone(), g)).collect();
        // A shared store's grants are current as of now; the watcher keeps them so. Until it
        // first succeeds, they count as current for a short while only.
        let fresh_until = store.shared().then(|| std::time::Instant::now() + Duration::from_secs(30));
        let reads = Arc::new(reads::ReadLedger::new(store.reads(), events.clone()));
        Ok(Arc::new(Self {
            reads,
            store,
            grants: RwLock::new(grants),
            write: tokio::sync::Mutex::new(()),
            scopes: ArcSwap::new(scopes),
            events,
            sessions,
            changed: Notify::new(),
            fresh_until: std::sync::Mutex::new(fresh_until),
        }))
    }

    /// The read budgets' ledger (its task is started with the app's).
    pub fn reads(&self) -> Arc<reads::ReadLedger> {
        self.reads.clone()
    }

    /// The scopes in force now.
    pub fn scopes(&self) -> Arc<Scopes> {
        self.scopes.load_full()
    }

    /// Puts new scope definitions in force (config reload). Grants already given keep their
    /// scope name; a grant whose scope is gone cannot log in ("not configured on this proxy").
    pub fn set_scopes(&self, scopes: Scopes) {
        self.scopes.store(Arc::new(scopes));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Grant>> {
        self.grants.read().unwrap_or_else(|p| p.into_inner())
    }

    fn get_raw(&self, id: &str) -> Option<Grant> {
        self.read().get(id).cloned()
    }

    /// The grant to change: from memory, or, with a shared store, as another instance may just
    /// have made it, from the store.
    async fn get_for_change(&self, id: &str) -> Result<Grant, GrantError> {
        if let Some(g) = self.get_raw(id) {
            return Ok(g);
        }
        if !self.store.shared() {
            return Err(GrantError::NotFound(id.to_owned()));
        }
        self.refresh().await?;
        self.get_raw(id).ok_or_else(|| GrantError::NotFound(id.to_owned()))
    }

    /// Reads the store again and takes every grant changed elsewhere (another instance):
    /// a grant that stopped being usable ends its sessions here too. Returns how many changed.
    pub async fn refresh(&self) -> Result<usize, StoreError> {
        let stored = self.store.load().await?;
        let now = SystemTime::now();
        let mut ended = Vec::new();
        let mut changed = 0;
        {
            let mut grants = self.grants.write().unwrap_or_else(|p| p.into_inner());
            for g in stored {
                let newer = grants.get(&g.id).is_none_or(|mine| g.version > mine.version);
                if !newer {
                    continue;
                }
                if grants.get(&g.id).is_some_and(|mine| mine.is_usable(now)) && !g.is_usable(now) {
                    ended.push(g.clone());
                }
                grants.insert(g.id.clone(), g);
                changed += 1;
            }
        }
        for g in ended {
            let why = g.end_reason.clone().unwrap_or_else(|| format!("{:?}", g.status_at(now)).to_lowercase());
            let by = g.ended_by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default();
            self.end_sessions(&g.id, &format!("pglease: grant {} for scope \"{}\" ended{by}: {why}", g.id, g.scope));
        }
        if changed > 0 {
            self.changed.notify_one();
        }
        Ok(changed)
    }

    /// With a shared store: the grants in memory count as current until `until` (the watcher
    /// moves it on after each successful refresh).
    pub fn set_fresh_until(&self, until: std::time::Instant) {
        *self.fresh_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
    }

    /// Whether this instance's grants may be out of date (a control plane it cannot read).
    pub fn is_stale(&self) -> bool {
        self.fresh_until.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| std::time::Instant::now() > t)
    }

    /// Persists, then publishes, a grant's new version. Caller holds `write`. A grant changed
    /// elsewhere meanwhile is a conflict: memory is brought up to date, nothing is written.
    async fn save(&self, mut grant: Grant) -> Result<Grant, GrantError> {
        grant.version = match self.store.put(&grant).await {
            Ok(v) => v,
            Err(StoreError::Conflict(id)) => {
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "cannot read the grant store after a conflict");
                }
                return Err(GrantError::Store(StoreError::Conflict(id)));
            }
            Err(e) => return Err(e.into()),
        };
        {
            // A refresh may already have brought a newer version (a change made elsewhere
            // right after this one): never put an older one back.
            let mut grants = self.grants.write().unwrap_or_else(|p| p.into_inner());
            if grants.get(&grant.id).is_none_or(|mine| mine.version <= grant.version) {
                grants.insert(grant.id.clone(), grant.clone());
            }
        }
        self.changed.notify_one();
        Ok(grant)
    }

    pub async fn request(&self, who: &Principal, req: GrantRequest) -> Result<NewGrant, GrantError> {
        use crate::config::Role;
        if !(who.has(Role::Engineer) || who.has(Role::Approver)) {
            return Err(GrantError::Forbidden(format!("{} may not request grants", who.person)));
        }
        let user = req.user.clone().unwrap_or_else(|| who.person.clone());
        if user != who.person && !who.can_approve() {
            return Err(GrantError::Forbidden("only approvers may request grants for someone else".into()));
        }
        if !crate::config::valid_person(&user) {
            return Err(GrantError::Invalid(format!("invalid user name {user:?}")));
        }
        let scopes = self.scopes();
        let scope = scopes.get(&req.scope).ok_or_else(|| GrantError::Invalid(format!("no scope named {:?}", req.scope)))?;
        if req.reason.trim().is_empty() {
            return Err(GrantError::Invalid("a reason is required".into()));
        }
        if req.duration.is_zero() {
            return Err(GrantError::Invalid("the duration must be more than 0s".into()));
        }
        if req.duration > scope.max_duration {
            return Err(GrantError::Invalid(format!(
                "scope {:?} allows grants of at most {}",
                scope.name,
                crate::time::human_duration(scope.max_duration)
            )));
        }
        if req.break_glass {
            let limit = scope.break_glass.ok_or_else(|| GrantError::Forbidden(format!("scope {:?} does not allow break-glass", scope.name)))?;
            if req.duration > limit {
                return Err(GrantError::Invalid(format!("break-glass grants of {:?} last at most {}", scope.name, crate::time::human_duration(limit))));
            }
            if user != who.person {
                return Err(GrantError::Forbidden("break-glass grants are only for oneself".into()));
            }
        }

        let _w = self.write.lock().await;
        let id = format!("g{}", random_hex(4));
        let secret = (user == who.person).then(|| random_hex(16));
        let now = SystemTime::now();
        let mut grant = Grant {
            login: format!("{user}.{id}"),
            id,
            user: user.clone(),
            scope: scope.name.clone(),
            database: scope.database.clone(),
            // No verifier yet for a grant made for someone else: it cannot be logged in to.
            verifier: secret.as_deref().map(|s| ScramVerifier::from_password(s).to_text()).unwrap_or_default(),
            status: GrantStatus::Pending,
            reason: req.reason.clone(),
            requested_by: who.person.clone(),
            requested_at: now,
            duration_secs: req.duration.as_secs(),
            break_glass: req.break_glass,
            decided_by: None,
            decided_at: None,
            expires_at: None,
            ended_at: None,
            ended_by: None,
            end_reason: None,
            version: 0,
            expiry_noticed: false,
        };
        if req.break_glass {
            grant.status = GrantStatus::Active;
            grant.decided_at = Some(now);
            grant.decided_by = Some(format!("{} (break-glass)", who.person));
            grant.expires_at = Some(now + req.duration);
        }
        let grant = self.save(grant).await?;
        self.events.emit(Event::GrantRequested {
            grant: grant.id.clone(),
            user: grant.user.clone(),
            scope: grant.scope.clone(),
            by: who.person.clone(),
            reason: grant.reason.clone(),
            duration_secs: grant.duration_secs,
            break_glass: grant.break_glass,
        });
        if grant.break_glass {
            self.emit_activated(&grant);
        }
        Ok(NewGrant { grant, secret })
    }

    fn emit_activated(&self, g: &Grant) {
        self.events.emit(Event::GrantActivated {
            grant: g.id.clone(),
            user: g.user.clone(),
            scope: g.scope.clone(),
            expires_at: g.expires_at.unwrap_or(SystemTime::UNIX_EPOCH),
            break_glass: g.break_glass,
        });
    }

    /// Whether `who` may decide on grants of `scope_name` for `grant_user` requested by `requested_by`.
    fn check_approver(&self, who: &Principal, scope_name: &str, grant_user: &str, requested_by: Option<&str>) -> Result<(), GrantError> {
        if !who.can_approve() {
            return Err(GrantError::Forbidden(format!("{} is not an approver", who.person)));
        }
        if who.person == grant_user || Some(who.person.as_str()) == requested_by {
            return Err(GrantError::Forbidden("nobody approves their own request".into()));
        }
        if let Some(scope) = self.scopes().get(scope_name)
            && !scope.approvers.is_empty()
            && !scope.approvers.iter().any(|g| who.groups.contains(g))
        {
            return Err(GrantError::Forbidden(format!("grants of scope {:?} need approval by a member of {}", scope.name, scope.approvers.join(" or "))));
        }
        Ok(())
    }

    /// Whether `who` may approve or deny this pending grant (what the console offers them;
    /// the same check [`approve`](Self::approve) and [`deny`](Self::deny) make).
    pub fn may_decide(&self, who: &Principal, g: &GrantView) -> bool {
        self.check_approver(who, &g.scope, &g.user, Some(&g.requested_by)).is_ok()
    }

    /// Whether `who` may end this grant: its own user (withdrawing or ending it), the one who
    /// asked for it while pending, and otherwise an approver; a pending request only one who
    /// may decide it (ending it is a denial under another name).
    pub fn may_revoke(&self, who: &Principal, g: &GrantView) -> bool {
        if who.person == g.user {
            return true;
        }
        match g.status {
            GrantStatus::Pending => who.person == g.requested_by || self.may_decide(who, g),
            _ => who.can_approve(),
        }
    }

    pub async fn approve(&self, who: &Principal, id: &str) -> Result<Grant, GrantError> {
        retrying!(self.activate(who, id, true))
    }


    /// Marks a pending grant approved and starts its window. `check_requester`: whether the
    /// approver must differ from the requester (not for `issue`, where they are the same by design).
    async fn activate(&self, who: &Principal, id: &str, check_requester: bool) -> Result<Grant, GrantError> {
        let _w = self.write.lock().await;
        let mut g = self.get_for_change(id).await?;
        self.check_approver(who, &g.scope, &g.user, check_requester.then_some(g.requested_by.as_str()))?;
        if g.status != GrantStatus::Pending {
            return Err(GrantError::Conflict(format!("grant {id} is {}, not pending", g.status_at(SystemTime::now()).as_str())));
        }
        let now = SystemTime::now();
        g.status = GrantStatus::Active;
        g.decided_by = Some(who.person.clone());
        g.decided_at = Some(now);
        g.expires_at = Some(now + Duration::from_secs(g.duration_secs));
        let g = self.save(g).await?;
        self.events.emit(Event::GrantApproved { grant: g.id.clone(), user: g.user.clone(), scope: g.scope.clone(), by: who.person.clone() });
        self.emit_activated(&g);
        Ok(g)
    }

    pub async fn deny(&self, who: &Principal, id: &str, reason: &str) -> Result<Grant, GrantError> {
        retrying!(self.deny_once(who, id, reason))
    }

    async fn deny_once(&self, who: &Principal, id: &str, reason: &str) -> Result<Grant, GrantError> {
        let _w = self.write.lock().await;
        let mut g = self.get_for_change(id).await?;
        self.check_approver(who, &g.scope, &g.user, Some(&g.requested_by))?;
        if g.status != GrantStatus::Pending {
            return Err(GrantError::Conflict(format!("grant {id} is {}, not pending", g.status_at(SystemTime::now()).as_str())));
        }
        let now = SystemTime::now();
        g.status = GrantStatus::Denied;
        g.decided_by = Some(who.person.clone());
        g.decided_at = Some(now);
        g.ended_at = Some(now);
        g.end_reason = Some(reason.to_owned()).filter(|r| !r.is_empty());
        let g = self.save(g).await?;
        self.events.emit(Event::GrantDenied { grant: g.id.clone(), user: g.user.clone(), scope: g.scope.clone(), by: who.person.clone(), reason: reason.to_owned() });
        Ok(g)
    }

    /// Requests and approves in one step; the approver may not issue to themself.
    pub async fn issue(&self, who: &Principal, user: &str, scope: &str, duration: Duration, reason: &str) -> Result<NewGrant, GrantError> {
        // The issuer is the requester by design; what matters is that the grant is not theirs.
        self.check_approver(who, scope, user, None)?;
        let mut new = self.request(who, GrantRequest { scope: scope.to_owned(), duration, reason: reason.to_owned(), user: Some(user.to_owned()), break_glass: false }).await?;
        new.grant = retrying!(self.activate(who, &new.grant.id, false))?;
        Ok(new)
    }

    /// A fresh secret for the caller's own grant, shown this once; a secret given before stops
    /// working. How the user of a grant made by someone else (`issue`, `request --user`) gets
    /// to log in.
    pub async fn take_secret(&self, who: &Principal, id: &str) -> Result<NewGrant, GrantError> {
        retrying!(self.take_secret_once(who, id))
    }

    async fn take_secret_once(&self, who: &Principal, id: &str) -> Result<NewGrant, GrantError> {
        let _w = self.write.lock().await;
        let mut g = self.get_for_change(id).await?;
        if who.person != g.user {
            // As for a grant the caller may not see: nothing tells it exists.
            return Err(if who.can_read_all() { GrantError::Forbidden("only the grant's user may take its secret".into()) } else { GrantError::NotFound(id.to_owned()) });
        }
        if !matches!(g.status_at(SystemTime::now()), GrantStatus::Pending | GrantStatus::Active) {
            return Err(GrantError::Conflict(format!("grant {id} has ended")));
        }
        let secret = random_hex(16);
        g.verifier = ScramVerifier::from_password(&secret).to_text();
        let grant = self.save(g).await?;
        self.events.emit(Event::GrantSecretTaken { grant: grant.id.clone(), user: grant.user.clone() });
        Ok(NewGrant { grant, secret: Some(secret) })
    }

    /// Ends a grant now and drops its sessions. Approvers, or the grant's own user.
    pub async fn revoke(&self, who: &Principal, id: &str, reason: &str) -> Result<Grant, GrantError> {
        retrying!(self.revoke_once(who, id, reason))
    }

    async fn revoke_once(&self, who: &Principal, id: &str, reason: &str) -> Result<Grant, GrantError> {
        if reason.trim().is_empty() {
            return Err(GrantError::Invalid("a reason is required".into()));
        }
        let _w = self.write.lock().await;
        let mut g = self.get_for_change(id).await?;
        if !self.may_revoke(who, &GrantView::of(&g, SystemTime::now())) {
            return Err(GrantError::Forbidden(format!("{} may not revoke grant {id}", who.person)));
        }
        let now = SystemTime::now();
        match g.status_at(now) {
            GrantStatus::Active | GrantStatus::Pending => {}
            other => return Err(GrantError::Conflict(format!("grant {id} is already {}", other.as_str()))),
        }
        g.status = GrantStatus::Revoked;
        g.ended_at = Some(now);
        g.ended_by = Some(who.person.clone());
        g.end_reason = Some(reason.to_owned());
        let g = self.save(g).await?;
        self.events.emit(Event::GrantRevoked { grant: g.id.clone(), user: g.user.clone(), scope: g.scope.clone(), by: who.person.clone(), reason: reason.to_owned() });
        let message = format!("pglease: grant {} for scope \"{}\" was revoked by {}: {}", g.id, g.scope, who.person, reason);
        self.end_sessions(&g.id, &message);
        Ok(g)
    }

    fn end_sessions(&self, grant_id: &str, message: &str) -> usize {
        let err = ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, message);
        self.sessions.kill_where(|h| h.identity.grant_id.as_deref() == Some(grant_id), &err)
    }

    pub fn list(&self, who: &Principal, active_only: bool) -> Vec<GrantView> {
        let now = SystemTime::now();
        let mut out: Vec<GrantView> = self
            .read()
            .values()
            .filter(|g| who.can_read_all() || g.user == who.person || g.requested_by == who.person)
            .filter(|g| !active_only || g.is_usable(now))
            .map(|g| GrantView::of(g, now))
            .collect();
        out.sort_by(|a, b| a.requested_at.cmp(&b.requested_at).then(a.id.cmp(&b.id)));
        out
    }

    pub fn show(&self, who: &Principal, id: &str) -> Result<GrantView, GrantError> {
        let g = self.get_raw(id).ok_or_else(|| GrantError::NotFound(id.to_owned()))?;
        if !(who.can_read_all() || g.user == who.person || g.requested_by == who.person) {
            // Same answer as a missing grant: ids of others' grants are not confirmed.
            return Err(GrantError::NotFound(id.to_owned()));
        }
        Ok(GrantView::of(&g, SystemTime::now()))
    }

    /// One grant with what it has read, when its scope sets a read budget: as counted here if a
    /// session of it is on this instance, else as stored (None if the store cannot say now).
    pub async fn show_with_reads(&self, who: &Principal, id: &str) -> Result<GrantView, GrantError> {
        let mut view = self.show(who, id)?;
        let Some(budget) = self.scopes().get(&view.scope).and_then(|s| reads::ReadBudget::of(&s.config)) else { return Ok(view) };
        let used = match self.reads.usage(id) {
            Some((used, _)) => Some(used),
            None => match self.reads.stored_usage(id).await {
                Ok(used) => Some(used),
                Err(e) => {
                    tracing::warn!(grant = %id, error = %e, "cannot read the grant's read budget usage");
                    None
                }
            },
        };
        view.read = used.map(|u| ReadView { rows: u.rows, bytes: u.bytes, max_rows: budget.rows, max_bytes: budget.bytes });
        Ok(view)
    }

    /// Records the end of every grant past its window; returns the next deadline, if any.
    pub async fn expire_due(&self) -> Result<Option<SystemTime>, GrantError> {
        let now = SystemTime::now();
        let due: Vec<String> = self.read().values().filter(|g| g.status == GrantStatus::Active && g.expires_at.is_some_and(|e| e <= now)).map(|g| g.id.clone()).collect();
        for id in due {
            let _w = self.write.lock().await;
            // The grant as it is now, under the write lock: a revoke or a new secret may have
            // come in since the list above, and must not be written over.
            let Some(mut g) = self.get_raw(&id).filter(|c| c.status == GrantStatus::Active) else {
                continue;
            };
            g.status = GrantStatus::Expired;
            g.ended_at = g.expires_at;
            g.end_reason = Some("expired".into());
            let g = match self.save(g).await {
                Ok(g) => g,
                // Another instance recorded the end first (its reaper, or a revoke): memory
                // now has its version, and its sessions here end by their own deadline.
                Err(GrantError::Store(StoreError::Conflict(_))) => continue,
                Err(e) => return Err(e),
            };
            self.events.emit(Event::GrantExpired { grant: g.id.clone(), user: g.user.clone(), scope: g.scope.clone() });
            let at = g.expires_at.map(crate::time::rfc3339).unwrap_or_default();
            self.end_sessions(&g.id, &format!("pglease: grant {} for scope \"{}\" expired at {at}", g.id, g.scope));
        }
        // "Expiring soon", once per grant: the write decides which instance sends it.
        let noticed: Vec<String> = self.read().values().filter(|g| g.notice_at().is_some_and(|t| t <= now) && g.expires_at.is_some_and(|e| e > now)).map(|g| g.id.clone()).collect();
        for id in noticed {
            let _w = self.write.lock().await;
            let Some(mut g) = self.get_raw(&id).filter(|c| c.notice_at().is_some()) else {
                continue;
            };
            g.expiry_noticed = true;
            let g = match self.save(g).await {
                Ok(g) => g,
                Err(GrantError::Store(StoreError::Conflict(_))) => continue,
                Err(e) => return Err(e),
            };
            if let Some(expires_at) = g.expires_at {
                self.events.emit(Event::GrantExpiring { grant: g.id.clone(), user: g.user.clone(), scope: g.scope.clone(), expires_at });
            }
        }
        let grants = self.read();
        let ends = grants.values().filter(|g| g.status == GrantStatus::Active).filter_map(|g| g.expires_at);
        Ok(ends.chain(grants.values().filter_map(Grant::notice_at)).min())
    }

    /// Marks grants expired as their windows close. Sessions end on their own deadline timers;
    /// this records the state change (and ends any session that slipped through).
    pub async fn run_reaper(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = match self.expire_due().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "cannot record grant expiry; retrying");
                    Some(SystemTime::now() + Duration::from_secs(1))
                }
            };
            let wait = next.map(|t| t.duration_since(SystemTime::now()).unwrap_or_default()).unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.changed.notified() => {}
            }
        }
    }

    /// The grant behind a login, if it may connect to `database` now.
    pub fn credential(&self, login: &str, database: &str) -> Option<Credential> {
        if self.is_stale() {
            // Fail closed: whether the grant is still live is not known here now.
            tracing::warn!(login, "login refused: the control plane has not been reachable; grants may have changed");
            metrics::counter!("pglease_logins_refused_stale_total").increment(1);
            return None;
        }
        let now = SystemTime::now();
        let grants = self.read();
        let g = grants.values().find(|g| g.login == login)?;
        // The scope as in force now decides which databases its grants reach.
        let reaches = self.scopes().get(&g.scope).is_some_and(|s| s.databases.iter().any(|d| d == database));
        if !g.is_usable(now) || !reaches {
            return None;
        }
        let verifier = ScramVerifier::parse(&g.verifier)?;
        Some(Credential {
            verifier,
            identity: Identity { login: g.login.clone(), person: g.user.clone(), grant_id: Some(g.id.clone()), scope: Some(g.scope.clone()), expires_at: g.expires_at },
        })
    }

    /// Whether the grant is still usable (checked again after authentication).
    pub fn is_active(&self, id: &str) -> bool {
        self.read().get(id).is_some_and(|g| g.is_usable(SystemTime::now()))
    }
}

/// Grants are the proxy's credential source.
#[async_trait::async_trait]
impl CredentialSource for GrantService {
    async fn lookup(&self, login: &str, database: &str) -> Option<Credential> {
        self.credential(login, database)
    }

    fn unavailable(&self) -> Option<String> {
        self.is_stale().then(|| {
            "pglease: this instance cannot reach its control plane now, so it cannot tell whether grants are still valid; \
             it takes no new logins until it can (try again shortly, or through another instance)"
                .to_owned()
        })
    }
}
