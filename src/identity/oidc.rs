//! The identity provider, through the `openidconnect` crate: discovery and its keys (cached,
//! read again on a key this instance does not know, at most every [`REDISCOVER_AT_MOST`]),
//! the authorization code flow with PKCE for a loopback redirect (RFC 8252), the device
//! authorization grant (RFC 8628), refresh, and ID token verification (issuer, audience,
//! expiry, signature, nonce).
//!
//! pglease is the confidential client: the client secret stays on the server. `pglease login`
//! holds the PKCE verifier, the state and the nonce, and hands the code back here.
//!
//! Calls are blocking (ureq); callers run them with `spawn_blocking`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreClaimName, CoreClaimType, CoreClientAuthMethod, CoreErrorResponseType,
    CoreGenderClaim, CoreGrantType, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
    CoreJwsSigningAlgorithm, CoreResponseMode, CoreResponseType, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreSubjectIdentifierType, CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AdditionalClaims, AdditionalProviderMetadata, AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken,
    DeviceAuthorizationUrl, EmptyExtraTokenFields, EndpointMaybeSet, EndpointNotSet, EndpointSet, IdTokenFields, IssuerUrl, Nonce,
    OAuth2TokenResponse, PkceCodeVerifier, ProviderMetadata, RedirectUrl, RefreshToken, Scope, StandardErrorResponse,
    StandardTokenResponse, TokenResponse,
};
use serde::{Deserialize, Serialize};

use crate::config::OidcConfig;

/// The ID token signatures accepted.
const ASYMMETRIC: &[CoreJwsSigningAlgorithm] = &[
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EdDsa,
];

/// Discovery and keys are read again after this long in any case.
const REDISCOVER_EVERY: Duration = Duration::from_secs(3600);
/// A token signed with an unknown key reads the keys again, but not more often than this (a
/// flood of forged tokens must not become a flood of requests to the provider).
const REDISCOVER_AT_MOST: Duration = Duration::from_secs(10);

/// Claims beyond the standard ones: the groups claim, and a person claim of another name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OtherClaims {
    #[serde(flatten)]
    claims: BTreeMap<String, serde_json::Value>,
}
impl AdditionalClaims for OtherClaims {}

/// The device authorization endpoint, which core discovery does not know.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceEndpoint {
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
    revocation_endpoint: Option<String>,
}
impl AdditionalProviderMetadata for DeviceEndpoint {}

type Metadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;
type IdToken = openidconnect::IdToken<OtherClaims, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>;
type IdTokenClaims = openidconnect::IdTokenClaims<OtherClaims, CoreGenderClaim>;
type Tokens = StandardTokenResponse<
    IdTokenFields<OtherClaims, EmptyExtraTokenFields, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>,
    CoreTokenType,
>;
type Client<Device = EndpointNotSet> = openidconnect::Client<
    OtherClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    Tokens,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    Device,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// Why a sign-in or a token was refused. `Unavailable` is the provider not answering
/// (HTTP 503 for the caller); the rest are the caller's (401).
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("{0}")]
    Refused(String),
    #[error("the identity provider cannot be reached: {0}")]
    Unavailable(String),
}

/// Who an ID token says the person is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub name: String,
    pub groups: BTreeSet<String>,
    /// The provider's stable id for them (`iss` is fixed per config): a refresh that names
    /// someone else ends the session.
    pub subject: String,
}

/// What a sign-in (code, device or refresh) brought.
pub struct SignedIn {
    pub person: Person,
    pub refresh_token: Option<String>,
}

/// What `pglease login` shows for the device flow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStart {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    pub interval: u64,
}

/// One step of polling the device flow.
pub enum DevicePoll {
    Pending { slow_down: bool },
    Done(SignedIn),
}

struct Discovered {
    metadata: Metadata,
    at: Instant,
}

#[derive(Default)]
struct Discovery {
    last: Option<Discovered>,
    /// When reading it last failed: no new attempt within [`REDISCOVER_AT_MOST`].
    failed_at: Option<Instant>,
}

pub struct Oidc {
    config: OidcConfig,
    secret: ClientSecret,
    agent: ureq::Agent,
    discovered: Mutex<Discovery>,
}

/// The error the HTTP adapter gives `openidconnect`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

impl Oidc {
    pub fn new(config: OidcConfig) -> Result<Self, String> {
        let secret = config.client_secret().map_err(|e| e.to_string())?;
        let agent = crate::outbound::agent(config.ca_file.as_deref(), "identity.oidc.ca_file")?;
        Ok(Self { config, secret: ClientSecret::new(secret), agent, discovered: Mutex::new(Discovery::default()) })
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// `openidconnect`'s requests, sent with ureq; bodies at most 1 MiB.
    fn http(&self) -> impl Fn(openidconnect::HttpRequest) -> Result<openidconnect::HttpResponse, HttpError> + '_ {
        move |request| {
            let response = self.agent.run(request).map_err(|e| HttpError(e.to_string()))?;
            let (parts, mut body) = response.into_parts();
            let bytes = body.with_config().limit(1 << 20).read_to_vec().map_err(|e| HttpError(e.to_string()))?;
            Ok(openidconnect::HttpResponse::from_parts(parts, bytes))
        }
    }

    /// The provider's metadata and keys: cached; read again when old, or when `stale` (a
    /// token named a key not in them) and the last read is not too recent.
    fn metadata(&self, stale: bool) -> Result<Metadata, OidcError> {
        let mut slot = self.discovered.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = |d: &Discovered| d.at.elapsed() < REDISCOVER_EVERY && !(stale && d.at.elapsed() >= REDISCOVER_AT_MOST);
        if let Some(d) = slot.last.as_ref().filter(|d| fresh(d)) {
            return Ok(d.metadata.clone());
        }
        // Keys a little old are better than none while the provider is briefly away; and a
        // provider that just failed is not asked again at once by every caller.
        let fallback = |slot: &Discovery, why: String| match slot.last.as_ref() {
            Some(d) if d.at.elapsed() < REDISCOVER_EVERY * 2 => Ok(d.metadata.clone()),
            _ => Err(OidcError::Unavailable(why)),
        };
        if slot.failed_at.is_some_and(|t| t.elapsed() < REDISCOVER_AT_MOST) {
            return fallback(&slot, format!("discovery at {} failed moments ago", self.config.issuer));
        }
        let issuer = IssuerUrl::new(self.config.issuer.clone()).map_err(|e| OidcError::Refused(format!("identity.oidc.issuer: {e}")))?;
        match Metadata::discover(&issuer, &self.http()) {
            Ok(metadata) => {
                *slot = Discovery { last: Some(Discovered { metadata: metadata.clone(), at: Instant::now() }), failed_at: None };
                Ok(metadata)
            }
            Err(e) => {
                tracing::warn!(error = %describe(&e), "could not read the identity provider's discovery document and keys");
                slot.failed_at = Some(Instant::now());
                fallback(&slot, format!("discovery at {}: {}", self.config.issuer, describe(&e)))
            }
        }
    }

    /// Reads the discovery document and keys (at start, so a wrong issuer shows early).
    pub fn discover(&self) -> Result<(), OidcError> {
        self.metadata(false).map(drop)
    }

    fn client(&self, metadata: Metadata) -> Client {
        Client::from_provider_metadata(metadata, ClientId::new(self.config.client_id.clone()), Some(self.secret.clone()))
    }

    fn scopes(&self) -> impl Iterator<Item = Scope> + '_ {
        self.config.scopes.iter().filter(|s| s.as_str() != "openid").map(|s| Scope::new(s.clone()))
    }

    /// The URL to send the person's browser to. `challenge` is the S256 PKCE challenge of a
    /// verifier only `pglease login` holds.
    pub fn authorize_url(&self, redirect_uri: &str, state: &str, nonce: &str, challenge: &str) -> Result<String, OidcError> {
        let client = self.client(self.metadata(false)?).set_redirect_uri(redirect(redirect_uri)?);
        let (state, nonce) = (state.to_owned(), nonce.to_owned());
        let (url, _, _) = client
            .authorize_url(CoreAuthenticationFlow::AuthorizationCode, move || CsrfToken::new(state), move || Nonce::new(nonce))
            .add_scopes(self.scopes())
            .add_extra_param("code_challenge", challenge.to_owned())
            .add_extra_param("code_challenge_method", "S256")
            .url();
        Ok(url.to_string())
    }

    /// Trades an authorization code for tokens and verifies the ID token.
    pub fn finish_code(&self, code: &str, verifier: &str, redirect_uri: &str, nonce: &str) -> Result<SignedIn, OidcError> {
        let client = self.client(self.metadata(false)?).set_redirect_uri(redirect(redirect_uri)?);
        let tokens = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| OidcError::Unavailable(format!("the provider has no token endpoint: {e}")))?
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_owned()))
            .request(&self.http())
            .map_err(token_error)?;
        self.signed_in(&tokens, Some(nonce))
    }

    /// Starts the device flow: the person enters `user_code` at `verification_uri`.
    pub fn start_device(&self) -> Result<DeviceStart, OidcError> {
        let metadata = self.metadata(false)?;
        let url = metadata
            .additional_metadata()
            .device_authorization_endpoint
            .clone()
            .ok_or_else(|| OidcError::Refused("the identity provider does not offer the device flow (no device_authorization_endpoint); use pglease login on a machine with a browser".into()))?;
        let client = self.client(metadata).set_device_authorization_url(url);
        let start: openidconnect::core::CoreDeviceAuthorizationResponse =
            client.exchange_device_code().add_scopes(self.scopes()).request(&self.http()).map_err(token_error)?;
        Ok(DeviceStart {
            device_code: start.device_code().secret().clone(),
            user_code: start.user_code().secret().clone(),
            verification_uri: start.verification_uri().to_string(),
            verification_uri_complete: start.verification_uri_complete().map(|u| u.secret().clone()),
            expires_in: start.expires_in().as_secs(),
            interval: start.interval().as_secs().max(1),
        })
    }

    /// Asks the token endpoint once whether the person has approved the device.
    ///
    /// One request per call (the crate's own poll loops until done): the request is the form
    /// RFC 8628 §3.4 gives, with the client authenticated as for every token request.
    pub fn poll_device(&self, device_code: &str) -> Result<DevicePoll, OidcError> {
        let metadata = self.metadata(false)?;
        let token_url = metadata.token_endpoint().cloned().ok_or_else(|| OidcError::Unavailable("the provider has no token endpoint".into()))?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:device_code")
            .append_pair("device_code", device_code)
            .finish();
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{}:{}", enc(&self.config.client_id), enc(self.secret.secret())));
        let mut response = self
            .agent
            .post(token_url.as_str())
            .header("Authorization", format!("Basic {basic}"))
            .header("Accept", "application/json")
            .content_type("application/x-www-form-urlencoded")
            .send(form.as_bytes())
            .map_err(|e| OidcError::Unavailable(e.to_string()))?;
        let status = response.status();
        let body = response.body_mut().with_config().limit(1 << 20).read_to_vec().map_err(|e| OidcError::Unavailable(e.to_string()))?;
        if status.is_success() {
            let tokens: Tokens = serde_json::from_slice(&body).map_err(|e| OidcError::Unavailable(format!("the token response does not read: {e}")))?;
            return self.signed_in(&tokens, None).map(DevicePoll::Done);
        }
        let error: StandardErrorResponse<openidconnect::DeviceCodeErrorResponseType> = serde_json::from_slice(&body)
            .map_err(|_| OidcError::Unavailable(format!("the token endpoint answered HTTP {status}")))?;
        use openidconnect::DeviceCodeErrorResponseType as E;
        match error.error() {
            E::AuthorizationPending => Ok(DevicePoll::Pending { slow_down: false }),
            E::SlowDown => Ok(DevicePoll::Pending { slow_down: true }),
            E::AccessDenied => Err(OidcError::Refused("the sign-in was declined at the identity provider".into())),
            E::ExpiredToken => Err(OidcError::Refused("the code expired before it was entered; run pglease login again".into())),
            other => Err(OidcError::Refused(format!("the identity provider refused: {}", other.as_ref()))),
        }
    }

    /// Reads the person's claims again with a refresh token. Only the provider refusing the
    /// grant (`invalid_grant`: signed out, disabled, revoked) is `Refused`; anything else
    /// (an error of the provider's, a key not fetched yet) is `Unavailable`, and the session
    /// is kept for a later try.
    pub fn refresh(&self, refresh_token: &str) -> Result<SignedIn, OidcError> {
        let client = self.client(self.metadata(false)?);
        let token = RefreshToken::new(refresh_token.to_owned());
        let tokens = client
            .exchange_refresh_token(&token)
            .map_err(|e| OidcError::Unavailable(format!("the provider has no token endpoint: {e}")))?
            .request(&self.http())
            .map_err(|e| match e {
                openidconnect::RequestTokenError::ServerResponse(r) if *r.error() == openidconnect::core::CoreErrorResponseType::InvalidGrant => {
                    OidcError::Refused(format!("the identity provider refused: {r}"))
                }
                other => OidcError::Unavailable(describe(&other)),
            })?;
        let again = |e: OidcError| match e {
            OidcError::Refused(why) => OidcError::Unavailable(why),
            other => other,
        };
        let person = match tokens.id_token() {
            Some(id_token) => self.verify(id_token, None).map_err(again)?,
            // OpenID Connect lets a refresh answer without an ID token: ask userinfo.
            None => self.userinfo(&client, tokens.access_token()).map_err(again)?,
        };
        let refresh_token = tokens.refresh_token().map(|t| t.secret().clone()).unwrap_or_else(|| refresh_token.to_owned());
        Ok(SignedIn { person, refresh_token: Some(refresh_token) })
    }

    fn userinfo(&self, client: &Client, access_token: &openidconnect::AccessToken) -> Result<Person, OidcError> {
        let claims: openidconnect::UserInfoClaims<OtherClaims, CoreGenderClaim> = client
            .user_info(access_token.clone(), None)
            .map_err(|_| OidcError::Unavailable("the refresh brought no ID token and the provider has no userinfo endpoint".into()))?
            .request(&self.http())
            .map_err(|e| OidcError::Unavailable(format!("userinfo: {}", describe(&e))))?;
        self.person_of(claims.subject(), claims.email().map(|e| e.to_string()), claims.email_verified(), claims.preferred_username().map(|u| u.to_string()), &claims.additional_claims().claims)
    }

    /// Tells the provider a refresh token is no longer needed (sign-out); best effort.
    pub fn revoke(&self, refresh_token: &str) -> Result<(), OidcError> {
        let metadata = self.metadata(false)?;
        let Some(url) = metadata.additional_metadata().revocation_endpoint.clone() else {
            return Ok(());
        };
        let url = openidconnect::RevocationUrl::new(url).map_err(|e| OidcError::Unavailable(format!("revocation_endpoint: {e}")))?;
        self.client(metadata)
            .set_revocation_url(url)
            .revoke_token(CoreRevocableToken::RefreshToken(RefreshToken::new(refresh_token.to_owned())))
            .map_err(|e| OidcError::Unavailable(e.to_string()))?
            .request(&self.http())
            .map_err(|e| OidcError::Unavailable(describe(&e)))
    }

    fn signed_in(&self, tokens: &Tokens, nonce: Option<&str>) -> Result<SignedIn, OidcError> {
        let id_token = tokens.id_token().ok_or_else(|| OidcError::Refused("the identity provider sent no ID token (is `openid` among the scopes?)".into()))?;
        let person = self.verify(id_token, nonce)?;
        Ok(SignedIn { person, refresh_token: tokens.refresh_token().map(|t| t.secret().clone()) })
    }

    /// Verifies an ID token given as a bearer token (`bearer_id_tokens`).
    ///
    /// Such a token cannot be revoked, so it is taken only while younger than
    /// `refresh_every` (the same bound on stale roles as a session's): the holder gets a fresh
    /// one from the provider after that.
    pub fn verify_bearer(&self, jwt: &str) -> Result<Person, OidcError> {
        let token: IdToken = jwt.parse().map_err(|_| OidcError::Refused("not a well-formed ID token".into()))?;
        let (person, issued) = self.verified(&token, None)?;
        let age = chrono::Utc::now().signed_duration_since(issued);
        if age > chrono::Duration::from_std(self.config.refresh_every + self.config.clock_skew).unwrap_or(chrono::Duration::MAX) {
            return Err(OidcError::Refused(format!("the ID token was issued more than {} ago (identity.oidc.refresh_every); get a fresh one", crate::time::human_duration(self.config.refresh_every))));
        }
        Ok(person)
    }

    /// Issuer, audience, expiry, signature and (for the code flow) nonce; then the person.
    fn verify(&self, token: &IdToken, nonce: Option<&str>) -> Result<Person, OidcError> {
        self.verified(token, nonce).map(|(person, _)| person)
    }

    /// [`verify`](Self::verify), with the token's issue time.
    fn verified(&self, token: &IdToken, nonce: Option<&str>) -> Result<(Person, chrono::DateTime<chrono::Utc>), OidcError> {
        let attempt = |metadata: Metadata| -> Result<IdTokenClaims, ClaimsVerificationError> {
            let client = self.client(metadata);
            // Asymmetric signatures only: an HMAC one would be keyed with the client secret,
            // which pglease holds too (a leaked secret must not mint ID tokens).
            let verifier = client.id_token_verifier().set_allowed_algs(ASYMMETRIC.iter().cloned()).set_time_fn(time_with_skew(self.config.clock_skew));
            let nonce = nonce.map(|n| Nonce::new(n.to_owned()));
            let check_nonce = |got: Option<&Nonce>| match (&nonce, got) {
                (None, _) => Ok(()),
                (Some(want), Some(got)) if want.secret().as_bytes() == got.secret().as_bytes() => Ok(()),
                _ => Err("the nonce does not match this sign-in".to_owned()),
            };
            token.claims(&verifier, check_nonce).cloned()
        };
        let claims = match attempt(self.metadata(false)?) {
            // A key this instance has not seen: the provider may have rotated its keys.
            Err(ClaimsVerificationError::SignatureVerification(_)) => attempt(self.metadata(true)?),
            other => other,
        }
        .map_err(|e| OidcError::Refused(verification_message(&e)))?;
        Ok((self.person(&claims)?, claims.issue_time()))
    }

    fn person(&self, claims: &IdTokenClaims) -> Result<Person, OidcError> {
        self.person_of(claims.subject(), claims.email().map(|e| e.to_string()), claims.email_verified(), claims.preferred_username().map(|u| u.to_string()), &claims.additional_claims().claims)
    }

    /// The person the claims name (`person_claim`) and their groups (`groups_claim`).
    fn person_of(
        &self,
        subject: &openidconnect::SubjectIdentifier,
        email: Option<String>,
        email_verified: Option<bool>,
        preferred_username: Option<String>,
        other: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Person, OidcError> {
        let claim = self.config.person_claim.as_str();
        let name = match claim {
            "sub" => Some(subject.to_string()),
            "email" => {
                // Only an address the provider says it verified names someone: anyone may
                // type any address into an account at many providers.
                if email_verified != Some(true) {
                    return Err(OidcError::Refused("the identity provider does not say this email address is verified (email_verified); use another person_claim".into()));
                }
                email
            }
            "preferred_username" => preferred_username,
            _ => other.get(claim).and_then(|v| v.as_str()).map(str::to_owned),
        }
        .ok_or_else(|| OidcError::Refused(format!("the ID token has no {claim:?} claim (identity.oidc.person_claim)")))?;
        if !crate::config::valid_person(&name) {
            return Err(OidcError::Refused(format!("{claim:?} is not a usable person name here (letters, digits and -_.@+, at most 64)")));
        }
        let groups = match other.get(&self.config.groups_claim) {
            None | Some(serde_json::Value::Null) => BTreeSet::new(),
            Some(serde_json::Value::Array(items)) => items.iter().filter_map(|g| g.as_str().map(str::to_owned)).collect(),
            Some(serde_json::Value::String(one)) => [one.clone()].into(),
            Some(_) => return Err(OidcError::Refused(format!("the {:?} claim is not a list of groups", self.config.groups_claim))),
        };
        Ok(Person { name, groups, subject: subject.to_string() })
    }
}

/// The clock the verifier reads, moved back by the allowed skew: a token that expired less
/// than `skew` ago still passes (the provider's clock may be ahead of ours).
fn time_with_skew(skew: Duration) -> impl Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync {
    let skew = chrono::Duration::from_std(skew).unwrap_or_else(|_| chrono::Duration::zero());
    move || chrono::Utc::now() - skew
}

fn redirect(uri: &str) -> Result<RedirectUrl, OidcError> {
    RedirectUrl::new(uri.to_owned()).map_err(|e| OidcError::Refused(format!("redirect_uri: {e}")))
}

fn describe<E: std::error::Error>(e: &E) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A failed token request: the provider's refusal (the caller's), or no answer.
fn token_error<RE: std::error::Error + 'static, T: openidconnect::ErrorResponse + 'static>(e: openidconnect::RequestTokenError<RE, T>) -> OidcError {
    match e {
        openidconnect::RequestTokenError::ServerResponse(r) => OidcError::Refused(format!("the identity provider refused: {r}")),
        other => OidcError::Unavailable(describe(&other)),
    }
}

/// What a person reads when their token is refused.
fn verification_message(e: &ClaimsVerificationError) -> String {
    match e {
        ClaimsVerificationError::Expired(_) => "the ID token has expired".into(),
        ClaimsVerificationError::InvalidAudience(_) => "the ID token is for another application (its audience is not this client id)".into(),
        ClaimsVerificationError::InvalidIssuer(_) => "the ID token is from another issuer".into(),
        ClaimsVerificationError::InvalidNonce(_) => "the ID token's nonce does not match this sign-in".into(),
        ClaimsVerificationError::SignatureVerification(_) => "the ID token's signature does not verify with the identity provider's keys".into(),
        other => format!("the ID token is not valid: {other}"),
    }
}
