//! Who is calling the admin API or the console, beyond `people`' static tokens: people signed
//! in with the company's identity provider (OpenID Connect), and console sessions.
//!
//! - [`oidc`]: the identity provider (discovery, keys, code and device flows, refresh, ID token
//!   verification).
//! - [`logins`]: pglease session tokens, stored by hash, with the provider's refresh token
//!   sealed under each.
//!
//! A session's roles come from its groups (`identity.oidc.roles`, applied at every call). The
//! groups are read from the provider again, with the refresh token, on the first call after
//! `refresh_every`: someone removed from the approver group there loses approval here on
//! their first call after that, so at most `refresh_every` after their last refresh. A
//! provider that gives no refresh token gets sessions of `refresh_every` (then sign in again),
//! so the bound holds for every provider. A provider that refuses the refresh
//! (`invalid_grant`: signed out, disabled, revoked) ends the session; one that cannot be
//! reached, or answers with an error of its own, makes the call fail (503) rather than trust
//! groups that may be gone, and the session is kept for a later try.
//!
//! Several instances may refresh one session at once (a fleet behind a load balancer): a
//! write names the `refreshed_at` it read, and the loser takes the winner's row instead of
//! reading a rotated refresh token's refusal as the end of the session.

pub mod logins;
pub mod oidc;

use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;

use crate::people::{People, Principal};
pub use logins::{Login, LoginStore, Via};
pub use oidc::{Oidc, OidcError};

/// Why a call is not let through.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// 401: the token is unknown, ended, or not valid.
    #[error("{0}")]
    Unauthorized(String),
    /// 503: whether the token is good cannot be told now.
    #[error("{0}")]
    Unavailable(String),
}

impl From<OidcError> for AuthError {
    fn from(e: OidcError) -> Self {
        match e {
            OidcError::Refused(m) => AuthError::Unauthorized(m),
            OidcError::Unavailable(m) => AuthError::Unavailable(format!("the identity provider cannot be reached: {m}")),
        }
    }
}

/// A new sign-in: the token (shown once) and what it stands for.
pub struct NewLogin {
    pub token: String,
    pub login: Login,
}

pub struct Identity {
    /// The identity provider, when `[identity.oidc]` names one.
    oidc: Option<Arc<Oidc>>,
    logins: Arc<dyn LoginStore>,
    /// One refresh at a time per session in this process.
    refreshing: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Calls to the provider that anyone can cause (the sign-in endpoints take no token):
    /// at most this many at once, so nobody can tie up the provider (or its rate limit for
    /// pglease's client) and the blocking threads notifications and the audit copy use.
    anonymous: tokio::sync::Semaphore,
}

/// Sign-in calls to the provider in flight at once (each is bounded to 10 s).
const ANONYMOUS_CALLS: usize = 8;

const RUN_PGLEASE_LOGIN: &str = "sign in again (pglease login)";

impl Identity {
    pub fn new(oidc: Option<Oidc>, logins: Arc<dyn LoginStore>) -> Self {
        Self { oidc: oidc.map(Arc::new), logins, refreshing: DashMap::new(), anonymous: tokio::sync::Semaphore::new(ANONYMOUS_CALLS) }
    }

    pub fn oidc(&self) -> Option<&Arc<Oidc>> {
        self.oidc.as_ref()
    }

    fn provider(&self) -> Result<&Arc<Oidc>, AuthError> {
        self.oidc.as_ref().ok_or_else(|| AuthError::Unauthorized("this pglease has no identity provider ([identity.oidc])".into()))
    }

    /// Runs a blocking call to the identity provider off the async threads.
    pub async fn call<T: Send + 'static>(&self, f: impl FnOnce(&Oidc) -> Result<T, OidcError> + Send + 'static) -> Result<T, AuthError> {
        let oidc = self.provider()?.clone();
        tokio::task::spawn_blocking(move || f(&oidc)).await.map_err(|e| AuthError::Unavailable(format!("identity provider call failed: {e}")))?.map_err(AuthError::from)
    }

    /// [`call`](Self::call) for the sign-in endpoints: refused (503) while
    /// [`ANONYMOUS_CALLS`] are in flight already.
    pub async fn call_anonymous<T: Send + 'static>(&self, f: impl FnOnce(&Oidc) -> Result<T, OidcError> + Send + 'static) -> Result<T, AuthError> {
        let _permit = self.anonymous.try_acquire().map_err(|_| AuthError::Unavailable("too many sign-ins at once; try again in a moment".into()))?;
        self.call(f).await
    }

    /// Starts a session for someone the provider has just vouched for.
    pub async fn sign_in(&self, signed: oidc::SignedIn, people: &People) -> Result<NewLogin, AuthError> {
        let config = self.provider()?.config();
        let person = signed.person;
        // One name, one person: a provider account must not take over a static one's grants.
        if people.exists(&person.name) {
            return Err(AuthError::Unauthorized(format!(
                "{} is also a person of [people] with a static token; one name cannot be both (use person_claim = \"email\", or rename one)",
                person.name
            )));
        }
        if config.roles.of(&person.groups).is_empty() {
            return Err(AuthError::Unauthorized(format!("{} is in none of the groups that give a role here (identity.oidc.roles); ask an admin", person.name)));
        }
        let (token, hash) = logins::new_token();
        let now = SystemTime::now();
        // Without a refresh token the groups cannot be read again: the session lasts only as
        // long as groups may be stale.
        let lasts = if signed.refresh_token.is_some() { config.session_ttl } else { config.refresh_every };
        let login = Login {
            via: Via::Oidc,
            person: person.name,
            roles: config.roles.of(&person.groups),
            groups: person.groups,
            subject: Some(person.subject),
            issued_at: now,
            expires_at: now + lasts,
            refreshed_at: now,
            sealed_refresh: signed.refresh_token.as_deref().map(|rt| logins::seal(&token, rt)),
        };
        if login.sealed_refresh.is_none() {
            tracing::warn!(person = %login.person, "the identity provider gave no refresh token: the session lasts identity.oidc.refresh_every (add offline_access to the scopes for longer ones)");
        }
        self.logins.put(&hash, &login).await.map_err(store_down)?;
        tracing::info!(person = %login.person, roles = ?login.roles, "signed in with the identity provider");
        Ok(NewLogin { token, login })
    }

    /// Starts a console session for someone who gave a static token of `[people]`.
    pub async fn sign_in_with_token(&self, who: &Principal, ttl: std::time::Duration) -> Result<NewLogin, AuthError> {
        let (token, hash) = logins::new_token();
        let now = SystemTime::now();
        let login = Login {
            via: Via::Token,
            person: who.person.clone(),
            roles: who.roles.clone(),
            groups: who.groups.clone(),
            subject: None,
            issued_at: now,
            expires_at: now + ttl,
            refreshed_at: now,
            sealed_refresh: None,
        };
        self.logins.put(&hash, &login).await.map_err(store_down)?;
        Ok(NewLogin { token, login })
    }

    /// Ends the session `token` stands for (`pglease logout`, the console's sign-out), without
    /// asking the provider anything first; then tells the provider its refresh token is no
    /// longer needed, if it can.
    pub async fn sign_out(&self, token: &str) -> Result<(), AuthError> {
        let hash = logins::token_sha256(token);
        let login = self.logins.get(&hash).await.map_err(store_down)?;
        self.logins.delete(&hash).await.map_err(store_down)?;
        if let Some(refresh_token) = login.and_then(|l| l.sealed_refresh).and_then(|s| logins::open(token, &s))
            && self.oidc.is_some()
            && let Err(e) = self.call(move |o| o.revoke(&refresh_token)).await
        {
            tracing::info!(error = %e, "could not revoke a refresh token at sign-out (it expires on its own)");
        }
        Ok(())
    }

    /// The person behind a session token or (with `bearer_id_tokens`) an ID token; `None`
    /// when the token is neither (a static token, or nothing pglease issued). `people` are the
    /// static tokens' people: a console session opened with one takes their roles from there.
    pub async fn authenticate(&self, token: &str, people: &People) -> Option<Result<Principal, AuthError>> {
        if token.starts_with(logins::TOKEN_PREFIX) {
            return Some(self.session(token).await.and_then(|login| self.principal(login, people)));
        }
        let oidc = self.oidc.as_ref()?;
        if oidc.config().bearer_id_tokens && token.split('.').count() == 3 {
            let jwt = token.to_owned();
            return Some(self.call(move |o| o.verify_bearer(&jwt)).await.and_then(|person| {
                if people.exists(&person.name) {
                    return Err(AuthError::Unauthorized(format!("{} is also a person of [people]; one name cannot be both", person.name)));
                }
                let roles = oidc.config().roles.of(&person.groups);
                if roles.is_empty() {
                    return Err(AuthError::Unauthorized(format!("{} is in none of the groups that give a role here (identity.oidc.roles)", person.name)));
                }
                Ok(Principal { person: person.name, roles, groups: person.groups })
            }));
        }
        None
    }

    /// Who a session is now: an identity provider's person gets the roles their groups give
    /// under the config in force; a static token's, what `[people]` says now.
    fn principal(&self, login: Login, people: &People) -> Result<Principal, AuthError> {
        match login.via {
            Via::Oidc => {
                let oidc = self.oidc.as_ref().ok_or_else(|| AuthError::Unauthorized(format!("sign-in with an identity provider is no longer configured here; {RUN_PGLEASE_LOGIN}")))?;
                let roles = oidc.config().roles.of(&login.groups);
                if roles.is_empty() {
                    return Err(AuthError::Unauthorized(format!("{} is in none of the groups that give a role here", login.person)));
                }
                Ok(Principal { person: login.person, roles, groups: login.groups })
            }
            Via::Token => people.principal(&login.person).ok_or_else(|| AuthError::Unauthorized(format!("{} is no longer in [people]; sign in again", login.person))),
        }
    }

    /// Whether a session's groups are due to be read from the provider again. A refresh time
    /// in the future (clocks of a fleet disagree) counts as due.
    fn due(&self, login: &Login) -> bool {
        let Some(oidc) = &self.oidc else { return false };
        login.via == Via::Oidc && login.sealed_refresh.is_some() && login.refreshed_at.elapsed().map_or(true, |age| age >= oidc.config().refresh_every)
    }

    /// The sign-in `token` stands for, its groups read again from the provider if they are due.
    async fn session(&self, token: &str) -> Result<Login, AuthError> {
        let hash = logins::token_sha256(token);
        let login = self.current(&hash).await?;
        if !self.due(&login) {
            return Ok(login);
        }
        let lock = self.refreshing.entry(hash.clone()).or_default().clone();
        let one = lock.lock().await;
        // Another call may have refreshed it while this one waited.
        let login = self.current(&hash).await?;
        let result = if self.due(&login) { self.refresh(token, &hash, login).await } else { Ok(login) };
        drop(one);
        drop(lock);
        self.refreshing.remove_if(&hash, |_, l| Arc::strong_count(l) == 1);
        result
    }

    async fn current(&self, hash: &str) -> Result<Login, AuthError> {
        let login = self.logins.get(hash).await.map_err(store_down)?;
        login
            .filter(|l| l.expires_at > SystemTime::now())
            .ok_or_else(|| AuthError::Unauthorized(format!("this sign-in has ended or is not known here; {RUN_PGLEASE_LOGIN}")))
    }

    /// Reads the groups from the provider again.
    async fn refresh(&self, token: &str, hash: &str, login: Login) -> Result<Login, AuthError> {
        let sealed = login.sealed_refresh.clone().expect("due() saw a refresh token");
        let refresh_token = logins::open(token, &sealed).ok_or_else(|| AuthError::Unauthorized(format!("this sign-in cannot be renewed; {RUN_PGLEASE_LOGIN}")))?;
        let read_at = login.refreshed_at;
        let signed = match self.call(move |o| o.refresh(&refresh_token)).await {
            Ok(signed) => signed,
            Err(AuthError::Unauthorized(why)) => {
                // Another instance may have refreshed first with the same (rotated) token.
                if let Some(newer) = self.logins.get(hash).await.map_err(store_down)?.filter(|l| l.refreshed_at != read_at) {
                    return Ok(newer);
                }
                tracing::info!(person = %login.person, %why, "the identity provider ended a sign-in");
                self.logins.delete(hash).await.map_err(store_down)?;
                return Err(AuthError::Unauthorized(format!("the identity provider ended this sign-in ({why}); {RUN_PGLEASE_LOGIN}")));
            }
            Err(e) => return Err(e),
        };
        let person = signed.person;
        if login.subject.as_deref().is_some_and(|s| s != person.subject) || person.name != login.person {
            self.logins.delete(hash).await.map_err(store_down)?;
            return Err(AuthError::Unauthorized(format!("the identity provider now names this sign-in someone else; {RUN_PGLEASE_LOGIN}")));
        }
        let config = self.provider()?.config();
        if config.roles.of(&person.groups) != config.roles.of(&login.groups) {
            tracing::info!(person = %login.person, before = ?login.groups, after = ?person.groups, "groups changed at the identity provider");
        }
        let next = Login {
            roles: config.roles.of(&person.groups),
            groups: person.groups,
            refreshed_at: SystemTime::now(),
            sealed_refresh: signed.refresh_token.as_deref().map(|rt| logins::seal(token, rt)),
            ..login
        };
        // Update only the row as read: a sign-out meanwhile stays signed out, and a refresh by
        // another instance meanwhile wins.
        if !self.logins.update(hash, read_at, &next).await.map_err(store_down)? {
            return self.current(hash).await;
        }
        Ok(next)
    }
}

fn store_down(why: String) -> AuthError {
    tracing::error!(error = %why, "sign-in store failure");
    AuthError::Unavailable("sign-ins cannot be read or written now; try again shortly".into())
}
