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

use crate::config::Role;
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
    oidc: Arc<Oidc>,
    logins: Arc<dyn LoginStore>,
    /// One refresh at a time per session (a rotating refresh token is good for one use).
    refreshing: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

const RUN_PGLEASE_LOGIN: &str = "run pglease login";

impl Identity {
    pub fn new(oidc: Oidc, logins: Arc<dyn LoginStore>) -> Self {
        Self { oidc: Arc::new(oidc), logins, refreshing: DashMap::new() }
    }

    pub fn oidc(&self) -> &Arc<Oidc> {
        &self.oidc
    }

    /// Runs a blocking call to the identity provider off the async threads.
    pub async fn call<T: Send + 'static>(&self, f: impl FnOnce(&Oidc) -> Result<T, OidcError> + Send + 'static) -> Result<T, AuthError> {
        let oidc = self.oidc.clone();
        tokio::task::spawn_blocking(move || f(&oidc)).await.map_err(|e| AuthError::Unavailable(format!("identity provider call failed: {e}")))?.map_err(AuthError::from)
    }

    /// Starts a session for someone the provider has just vouched for.
    pub async fn sign_in(&self, signed: oidc::SignedIn) -> Result<NewLogin, AuthError> {
        let config = self.oidc.config();
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

    /// Ends the session `token` stands for (`pglease logout`).
    pub async fn sign_out(&self, token: &str) -> Result<(), AuthError> {
        self.logins.delete(&logins::token_sha256(token)).await.map_err(store_down)
    }

    /// The person behind a session token or (with `bearer_id_tokens`) an ID token; `None`
    /// when the token is neither (a static token, or nothing pglease issued).
    pub async fn authenticate(&self, token: &str) -> Option<Result<Principal, AuthError>> {
        if token.starts_with(logins::TOKEN_PREFIX) {
            return Some(self.session(token).await);
        }
        if self.oidc.config().bearer_id_tokens && token.split('.').count() == 3 {
            let jwt = token.to_owned();
            return Some(self.call(move |o| o.verify_bearer(&jwt)).await.and_then(|person| {
                let roles = self.oidc.config().roles.of(&person.groups);
                if roles.is_empty() {
                    return Err(AuthError::Unauthorized(format!("{} is in none of the groups that give a role here (identity.oidc.roles)", person.name)));
                }
                Ok(Principal { person: person.name, roles, groups: person.groups })
            }));
        }
        None
    }

    async fn session(&self, token: &str) -> Result<Principal, AuthError> {
        let hash = logins::token_sha256(token);
        let login = self.current(&hash).await?;
        if login.sealed_refresh.is_none() || login.refreshed_at.elapsed().unwrap_or_default() < self.oidc.config().refresh_every {
            return Ok(principal(login));
        }
        let lock = self.refreshing.entry(hash.clone()).or_default().clone();
        let _one = lock.lock().await;
        // Another call may have refreshed it while this one waited.
        let login = self.current(&hash).await?;
        let result = self.refresh(token, &hash, login).await;
        drop(_one);
        self.refreshing.remove_if(&hash, |_, l| Arc::strong_count(l) <= 1);
        result.map(principal)
    }

    async fn current(&self, hash: &str) -> Result<Login, AuthError> {
        let login = self.logins.get(hash).await.map_err(store_down)?;
        login
            .filter(|l| l.expires_at > SystemTime::now())
            .ok_or_else(|| AuthError::Unauthorized(format!("this sign-in has ended or is not known here; {RUN_PGLEASE_LOGIN}")))
    }

    /// Reads roles and groups from the provider again, if they are due.
    async fn refresh(&self, token: &str, hash: &str, mut login: Login) -> Result<Login, AuthError> {
        let config = self.oidc.config();
        let Some(sealed) = login.sealed_refresh.clone().filter(|_| login.refreshed_at.elapsed().unwrap_or_default() >= config.refresh_every) else {
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

/// Roles a set of groups gives (for callers that have only the config).
pub fn roles_of(config: &crate::config::OidcConfig, groups: &std::collections::BTreeSet<String>) -> std::collections::BTreeSet<Role> {
    config.roles.of(groups)
}
