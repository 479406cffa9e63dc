//! Who is calling the admin API, beyond `people`' static tokens: people signed in with the
//! company's identity provider (OpenID Connect).
//!
//! - [`oidc`]: the identity provider (discovery, keys, code and device flows, refresh, ID token
//!   verification).
//! - [`logins`]: pglease session tokens, stored by hash, with the provider's refresh token
//!   sealed under each.
//!
//! A session's roles come from its groups (`identity.oidc.roles`). They are read from the
//! provider again, with the refresh token, on the first call after `refresh_every`: someone
//! removed from the approver group there loses approval here on their first call after that
//! (at most `refresh_every` after their last refresh), or when the session ends
//! (`session_ttl`), whichever comes first. A provider that refuses the refresh (the person was
//! disabled, the grant revoked) ends the session; one that cannot be reached makes the call
//! fail (503) rather than trust roles that may be gone.

pub mod logins;
pub mod oidc;

use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;

use crate::people::Principal;
pub use logins::{Login, LoginStore};
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

/// A new sign-in: the token (shown once, to the CLI) and what it stands for.
pub struct NewLogin {
    pub token: String,
    pub login: Login,
}

pub struct Identity {
    /// The identity provider, when `[identity.oidc]` names one.
    oidc: Option<Arc<Oidc>>,
    logins: Arc<dyn LoginStore>,
    /// One refresh at a time per session (a rotating refresh token is good for one use).
    refreshing: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

const RUN_PGLEASE_LOGIN: &str = "run pglease login";

impl Identity {
    pub fn new(oidc: Option<Oidc>, logins: Arc<dyn LoginStore>) -> Self {
        Self { oidc: oidc.map(Arc::new), logins, refreshing: DashMap::new() }
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

    /// Starts a session for someone the provider has just vouched for.
    pub async fn sign_in(&self, signed: oidc::SignedIn) -> Result<NewLogin, AuthError> {
        let config = self.provider()?.config();
        let roles = config.roles.of(&signed.person.groups);
        if roles.is_empty() {
            return Err(AuthError::Unauthorized(format!(
                "{} is in none of the groups that give a role here (identity.oidc.roles); ask an admin",
                signed.person.name
            )));
        }
        let (token, hash) = logins::new_token();
        let now = SystemTime::now();
        let login = Login {
            via: logins::Via::Oidc,
            person: signed.person.name,
            roles,
            groups: signed.person.groups,
            issued_at: now,
            expires_at: now + config.session_ttl,
            refreshed_at: now,
            sealed_refresh: signed.refresh_token.as_deref().map(|rt| logins::seal(&token, rt)),
        };
        if login.sealed_refresh.is_none() {
            tracing::warn!(person = %login.person, "the identity provider gave no refresh token: this session keeps its roles until it ends (identity.oidc.session_ttl)");
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
            via: logins::Via::Token,
            person: who.person.clone(),
            roles: who.roles.clone(),
            groups: who.groups.clone(),
            issued_at: now,
            expires_at: now + ttl,
            refreshed_at: now,
            sealed_refresh: None,
        };
        self.logins.put(&hash, &login).await.map_err(store_down)?;
        Ok(NewLogin { token, login })
    }

    /// Ends the session `token` stands for (`pglease logout`).
    pub async fn sign_out(&self, token: &str) -> Result<(), AuthError> {
        self.logins.delete(&logins::token_sha256(token)).await.map_err(store_down)
    }

    /// The person behind a session token or (with `bearer_id_tokens`) an ID token; `None`
    /// when the token is neither (a static token, or nothing pglease issued). `people` are the
    /// static tokens' people: a console session opened with one takes their roles from there.
    pub async fn authenticate(&self, token: &str, people: &crate::people::People) -> Option<Result<Principal, AuthError>> {
        if token.starts_with(logins::TOKEN_PREFIX) {
            return Some(self.session(token).await.and_then(|login| match login.via {
                logins::Via::Oidc => Ok(principal(login)),
                logins::Via::Token => people
                    .principal(&login.person)
                    .ok_or_else(|| AuthError::Unauthorized(format!("{} is no longer in [people]; sign in again", login.person))),
            }));
        }
        let oidc = self.oidc.as_ref()?;
        if oidc.config().bearer_id_tokens && token.split('.').count() == 3 {
            let jwt = token.to_owned();
            return Some(self.call(move |o| o.verify_bearer(&jwt)).await.and_then(|person| {
                let roles = oidc.config().roles.of(&person.groups);
                if roles.is_empty() {
                    return Err(AuthError::Unauthorized(format!("{} is in none of the groups that give a role here (identity.oidc.roles)", person.name)));
                }
                Ok(Principal { person: person.name, roles, groups: person.groups })
            }));
        }
        None
    }

    /// The sign-in `token` stands for, its roles read again from the provider if they are due.
    async fn session(&self, token: &str) -> Result<Login, AuthError> {
        let hash = logins::token_sha256(token);
        let login = self.current(&hash).await?;
        let due = |l: &Login| l.sealed_refresh.is_some() && self.oidc.as_ref().is_some_and(|o| l.refreshed_at.elapsed().unwrap_or_default() >= o.config().refresh_every);
        if login.via != logins::Via::Oidc || !due(&login) {
            return Ok(login);
        }
        let lock = self.refreshing.entry(hash.clone()).or_default().clone();
        let one = lock.lock().await;
        // Another call may have refreshed it while this one waited.
        let login = self.current(&hash).await?;
        let result = if due(&login) { self.refresh(token, &hash, login).await } else { Ok(login) };
        drop(one);
        self.refreshing.remove_if(&hash, |_, l| Arc::strong_count(l) <= 1);
        result
    }

    async fn current(&self, hash: &str) -> Result<Login, AuthError> {
        let login = self.logins.get(hash).await.map_err(store_down)?;
        login
            .filter(|l| l.expires_at > SystemTime::now())
            .ok_or_else(|| AuthError::Unauthorized(format!("this sign-in has ended or is not known here; {RUN_PGLEASE_LOGIN}")))
    }

    /// Reads roles and groups from the provider again, if they are due.
    async fn refresh(&self, token: &str, hash: &str, mut login: Login) -> Result<Login, AuthError> {
        let config = self.provider()?.config();
        let Some(sealed) = login.sealed_refresh.clone() else {
            return Ok(login);
        };
        let refresh_token = logins::open(token, &sealed).ok_or_else(|| AuthError::Unauthorized(format!("this sign-in cannot be renewed; {RUN_PGLEASE_LOGIN}")))?;
        let signed = match self.call(move |o| o.refresh(&refresh_token)).await {
            Ok(signed) => signed,
            Err(AuthError::Unauthorized(why)) => {
                tracing::info!(person = %login.person, %why, "the identity provider ended a sign-in");
                self.logins.delete(hash).await.map_err(store_down)?;
                return Err(AuthError::Unauthorized(format!("the identity provider ended this sign-in ({why}); {RUN_PGLEASE_LOGIN}")));
            }
            Err(e) => return Err(e),
        };
        if signed.person.name != login.person {
            self.logins.delete(hash).await.map_err(store_down)?;
            return Err(AuthError::Unauthorized(format!("the identity provider now names this sign-in someone else; {RUN_PGLEASE_LOGIN}")));
        }
        let roles = config.roles.of(&signed.person.groups);
        if roles.is_empty() {
            self.logins.delete(hash).await.map_err(store_down)?;
            return Err(AuthError::Unauthorized(format!("{} is no longer in a group that gives a role here", login.person)));
        }
        if roles != login.roles || signed.person.groups != login.groups {
            tracing::info!(person = %login.person, before = ?login.roles, after = ?roles, "roles changed at the identity provider");
        }
        login.roles = roles;
        login.groups = signed.person.groups;
        login.refreshed_at = SystemTime::now();
        login.sealed_refresh = signed.refresh_token.as_deref().map(|rt| logins::seal(token, rt));
        self.logins.put(hash, &login).await.map_err(store_down)?;
        Ok(login)
    }
}

fn principal(login: Login) -> Principal {
    Principal { person: login.person, roles: login.roles, groups: login.groups }
}

fn store_down(why: String) -> AuthError {
    tracing::error!(error = %why, "sign-in store failure");
    AuthError::Unavailable("sign-ins cannot be read or written now; try again shortly".into())
}
