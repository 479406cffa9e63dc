//! Client authentication: who is connecting, and the SCRAM exchange that proves it.
//!
//! The proxy never sees a client's secret: a [`CredentialSource`] hands it a SCRAM-SHA-256
//! verifier for a login, and [`scram`] runs the server side of the exchange against it.
//! Grants (temporary logins) are one such source; tests use [`StaticCredentials`].

pub mod scram;

use std::collections::HashMap;
use std::time::SystemTime;

pub use scram::ScramVerifier;

/// Who is behind a session, as far as the proxy knows once the login is proven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The login the client gave (`user` startup parameter).
    pub login: String,
    /// The person the login belongs to.
    pub person: String,
    /// The grant the login belongs to, when it comes from one.
    pub grant_id: Option<String>,
    /// The scope that governs the session, when there is one.
    pub scope: Option<String>,
    /// When access ends; the session is dropped then.
    pub expires_at: Option<SystemTime>,
}

/// What a credential source knows about a login.
#[derive(Debug, Clone)]
pub struct Credential {
    pub verifier: ScramVerifier,
    pub identity: Identity,
}

/// Where logins come from. Implementations must answer in bounded time: the call runs inside
/// the handshake timeout.
#[async_trait::async_trait]
pub trait CredentialSource: Send + Sync + 'static {
    /// The credential for `login` connecting to `database`, or `None` when that login may not
    /// connect there now. The caller answers both cases alike, so a client cannot tell them apart.
    async fn lookup(&self, login: &str, database: &str) -> Option<Credential>;

    /// Why no login can be decided now (the same for every login, so saying it reveals
    /// nothing about any); `None` when logins are decided normally.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// A fixed set of logins, for tests and for the demo's single session-long login.
#[derive(Debug, Default, Clone)]
pub struct StaticCredentials {
    logins: HashMap<String, Credential>,
}

impl StaticCredentials {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a login; only the SCRAM verifier of `password` is kept.
    pub fn with_login(mut self, login: &str, password: &str) -> Self {
        let identity = Identity { login: login.to_owned(), person: login.to_owned(), grant_id: None, scope: None, expires_at: None };
        self.logins.insert(login.to_owned(), Credential { verifier: ScramVerifier::from_password(password), identity });
        self
    }

    pub fn with_credential(mut self, credential: Credential) -> Self {
        self.logins.insert(credential.identity.login.clone(), credential);
        self
    }
}

#[async_trait::async_trait]
impl CredentialSource for StaticCredentials {
    async fn lookup(&self, login: &str, _database: &str) -> Option<Credential> {
        self.logins.get(login).cloned()
    }
}
