//! Server side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677), as Postgres does it
//! (`src/backend/libpq/auth-scram.c`): the user name inside the SCRAM messages is ignored (the
//! startup packet's `user` counts), authzid is refused, and channel binding is
//! `tls-server-end-point` only.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Iterations for verifiers pglease makes; Postgres's default (`scram_iterations`).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// A SCRAM-SHA-256 verifier: what is stored instead of a password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(..)")
    }
}

impl ScramVerifier {
    /// Derives a verifier from a password with a fresh random salt.
    pub fn from_password(password: &str) -> Self {
        // postgres-protocol applies SASLprep and formats the verifier as Postgres stores it.
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Self::parse(&text).expect("postgres-protocol makes well-formed verifiers")
    }

    /// Parses Postgres's text form: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iter.parse().ok().filter(|i| *i > 0)?;
        Some(Self {
            iterations,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    pub fn to_text(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    /// A verifier no password matches, with a salt that depends only on `login` and
    /// `server_secret`, so that probing an unknown login looks like probing a known one.
    pub fn mock(login: &str, server_secret: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(server_secret).expect("HMAC takes any key length");
        mac.update(login.as_bytes());
        let salt = mac.finalize().into_bytes()[..16].to_vec();
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut stored_key);
        rand::rngs::OsRng.fill_bytes(&mut server_key);
        Self { iterations: DEFAULT_ITERATIONS, salt, stored_key, server_key }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM channel binding negotiation error")]
    ChannelBindingNegotiation,
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    #[error("client uses authorization identity, which is not supported")]
    Authzid,
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    #[error("SCRAM proof mismatch")]
    BadProof,
}

/// What the server knows about the TLS channel the exchange runs over.
#[derive(Debug, Clone)]
pub enum Channel {
    /// No TLS: only SCRAM-SHA-256 with `n` is possible.
    Plain,
    /// TLS with the `tls-server-end-point` data of the proxy's certificate.
    Tls { end_point_hash: Vec<u8> },
}

impl Channel {
    /// Mechanisms to offer, strongest first.
    pub fn mechanisms(&self) -> Vec<&'static str> {
        match self {
            Channel::Plain => vec![SCRAM_SHA_256],
            Channel::Tls { .. } => vec![SCRAM_SHA_256_PLUS, SCRAM_SHA_256],
        }
    }
}

/// The server's state between its first and final messages.
pub struct ServerExchange {
    verifier: ScramVerifier,
    /// `c=` value the client-final message must carry: base64 of gs2 header + binding data.
    expected_cbind: String,
    nonce: String,
    client_first_bare: String,
    server_first: String,
    /// Whether the client used channel binding.
    pub channel_bound: bool,
}

impl ServerExchange {
    /// Handles the client-first message and returns the server-first message to send.
    pub fn start(mechanism: &str, client_first: &[u8], verifier: ScramVerifier, channel: &Channel) -> Result<(Self, String), ScramError> {
        let client_first = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (cb_flag, rest) = client_first.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        let (authzid, client_first_bare) = rest.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Authzid);
        }
        let plus = match mechanism {
            SCRAM_SHA_256_PLUS => true,
            SCRAM_SHA_256 => false,
            _ => return Err(ScramError::Malformed("unsupported SASL mechanism")),
        };
        let binding: &[u8] = match (cb_flag, plus, channel) {
            ("p=tls-server-end-point", true, Channel::Tls { end_point_hash }) => end_point_hash,
            (flag, true, _) if flag.starts_with("p=") => return Err(ScramError::ChannelBindingNegotiation),
            (_, true, _) => return Err(ScramError::ChannelBindingNegotiation),
            ("n", false, _) => &[],
            // The client could bind but thinks we cannot: a downgrade, when we offered PLUS.
            ("y", false, Channel::Tls { .. }) => return Err(ScramError::ChannelBindingNegotiation),
            ("y", false, Channel::Plain) => &[],
            (flag, false, _) if flag.starts_with("p=") => return Err(ScramError::ChannelBindingNegotiation),
            _ => return Err(ScramError::Malformed("invalid channel binding flag")),
        };
        let mut cbind_input = format!("{cb_flag},,").into_bytes();
        cbind_input.extend_from_slice(binding);

        // client-first-bare: [reserved-mext ","] username "," nonce ["," extensions]
        let mut attrs = client_first_bare.split(',');
        let user = attrs.next().ok_or(ScramError::Malformed("no user name"))?;
        if user.starts_with("m=") {
            return Err(ScramError::Malformed("mandatory extensions are not supported"));
        }
        if !user.starts_with("n=") {
            return Err(ScramError::Malformed("no user name"));
        }
        let client_nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(ScramError::Malformed("no client nonce"))?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(ScramError::Malformed("invalid client nonce"));
        }

        let mut raw = [0u8; 18];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&verifier.salt), verifier.iterations);
        let exchange = Self {
            verifier,
            expected_cbind: B64.encode(cbind_input),
            nonce,
            client_first_bare: client_first_bare.to_owned(),
            server_first: server_first.clone(),
            channel_bound: plus,
        };
        Ok((exchange, server_first))
    }

    /// Checks the client-final message; on success returns the server-final message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let client_final = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = client_final.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs.next().and_then(|a| a.strip_prefix("c=")).ok_or(ScramError::Malformed("no channel binding"))?;
        let nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(ScramError::Malformed("no nonce"))?;
        if !bool::from(cbind.as_bytes().ct_eq(self.expected_cbind.as_bytes())) {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if nonce != self.nonce {
            return Err(ScramError::NonceMismatch);
        }
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("proof has the wrong length"));
        }

        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(client_signature.iter()).map(|(p, s)| p ^ s).collect();
        let stored_key = Sha256::digest(&client_key);
        if !bool::from(stored_key.as_slice().ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a whole exchange with postgres-protocol's client (what tokio-postgres uses).
    fn run(password_client: &str, password_server: &str, client_cb: ChannelBinding, mechanism: &str, channel: &Channel) -> Result<(), ScramError> {
        let verifier = ScramVerifier::from_password(password_server);
        let mut client = ScramSha256::new(password_client.as_bytes(), client_cb);
        let (server, server_first) = ServerExchange::start(mechanism, client.message(), verifier, channel)?;
        client.update(server_first.as_bytes()).expect("client accepts server-first");
        let server_final = server.finish(client.message())?;
        client.finish(server_final.as_bytes()).expect("client verifies the server");
        Ok(())
    }

    #[test]
    fn right_password_passes_wrong_fails() {
        assert_eq!(run("s3cret", "s3cret", ChannelBinding::unsupported(), SCRAM_SHA_256, &Channel::Plain), Ok(()));
        assert_eq!(run("wrong", "s3cret", ChannelBinding::unsupported(), SCRAM_SHA_256, &Channel::Plain), Err(ScramError::BadProof));
    }

    #[test]
    fn channel_binding_must_match_the_certificate() {
        let tls = Channel::Tls { end_point_hash: vec![1; 32] };
        assert_eq!(run("pw", "pw", ChannelBinding::tls_server_end_point(vec![1; 32]), SCRAM_SHA_256_PLUS, &tls), Ok(()));
        // A man in the middle presents another certificate: the client binds to that one.
        assert_eq!(
            run("pw", "pw", ChannelBinding::tls_server_end_point(vec![2; 32]), SCRAM_SHA_256_PLUS, &tls),
            Err(ScramError::ChannelBindingMismatch)
        );
        // 'y' means "I could bind but you can't": a downgrade when we offered PLUS.
        assert_eq!(run("pw", "pw", ChannelBinding::unrequested(), SCRAM_SHA_256, &tls), Err(ScramError::ChannelBindingNegotiation));
    }

    #[test]
    fn verifier_text_round_trips_and_mock_never_matches() {
        let v = ScramVerifier::from_password("pw");
        assert_eq!(ScramVerifier::parse(&v.to_text()), Some(v));
        assert!(ScramVerifier::parse("md5abc").is_none());
        let a = ScramVerifier::mock("ghost", b"secret");
        let b = ScramVerifier::mock("ghost", b"secret");
        assert_eq!(a.salt, b.salt, "same salt on every probe of the same login");
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let (server, first) = ServerExchange::start(SCRAM_SHA_256, client.message(), a, &Channel::Plain).unwrap();
        client.update(first.as_bytes()).unwrap();
        assert_eq!(server.finish(client.message()), Err(ScramError::BadProof));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let v = ScramVerifier::from_password("pw");
        for msg in [&b""[..], b"n", b"n,,", b"n,,n=,r=", b"n,a=admin,n=,r=abc", b"\xff,,n=,r=x", b"x,,n=,r=abc"] {
            assert!(ServerExchange::start(SCRAM_SHA_256, msg, v.clone(), &Channel::Plain).is_err(), "{msg:?}");
        }
        let (server, _) = ServerExchange::start(SCRAM_SHA_256, b"n,,n=,r=abc", v, &Channel::Plain).unwrap();
        assert!(server.finish(b"c=biws,r=abc").is_err());
    }
}

/// Client side of SCRAM-SHA-256(-PLUS), for logging in upstream.
///
/// Unlike postgres-protocol's client, the PBKDF2 step (4096 iterations by default: ~15 ms of
/// CPU) can be skipped with a cached salted password, since the upstream's salt and iteration
/// count for a role stay the same until its password changes.
pub struct ClientExchange {
    password: Vec<u8>,
    gs2_header: String,
    binding: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    state: ClientState,
}

enum ClientState {
    Start,
    /// Waiting for server-final: the expected server signature.
    Final { server_signature: [u8; 32] },
    Done,
}

/// Salted password for (salt, iterations), computed or cached by the caller.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

impl ClientExchange {
    /// `binding`: `Some(tls-server-end-point data)` to use SCRAM-SHA-256-PLUS, `None` for plain
    /// SCRAM-SHA-256; `tls` says whether the connection is encrypted (for the `y` flag).
    pub fn new(password: &str, binding: Option<Vec<u8>>, tls: bool) -> Self {
        // SASLprep; Postgres itself falls back to the raw password when it is not valid.
        let password = stringprep::saslprep(password).map(|p| p.into_owned()).unwrap_or_else(|_| password.to_owned()).into_bytes();
        let mut raw = [0u8; 18];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        let gs2_header = match (&binding, tls) {
            (Some(_), _) => "p=tls-server-end-point,,".to_owned(),
            (None, true) => "y,,".to_owned(),
            (None, false) => "n,,".to_owned(),
        };
        Self { password, gs2_header, binding: binding.unwrap_or_default(), client_first_bare: format!("n=,r={nonce}"), nonce, state: ClientState::Start }
    }

    pub fn mechanism(&self) -> &'static str {
        if self.binding.is_empty() { SCRAM_SHA_256 } else { SCRAM_SHA_256_PLUS }
    }

    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header, self.client_first_bare).into_bytes()
    }

    /// Handles server-first; returns (client-final, salt, iterations). `salted` returns the
    /// salted password for the salt and iteration count (from a cache, or computed).
    pub fn client_final(&mut self, server_first: &[u8], salted: impl FnOnce(&[u8], &[u8], u32) -> [u8; 32]) -> Result<Vec<u8>, ScramError> {
        let server_first = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("server-first is not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            match attr.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = Some(B64.decode(v).map_err(|_| ScramError::Malformed("salt is not base64"))?),
                Some(("i=", v)) => iterations = Some(v.parse::<u32>().map_err(|_| ScramError::Malformed("bad iteration count"))?),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(ScramError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        let salt = salt.ok_or(ScramError::Malformed("no salt"))?;
        let iterations = iterations.filter(|i| *i > 0).ok_or(ScramError::Malformed("no iteration count"))?;
        let salted = salted(&self.password, &salt, iterations);

        let mut cbind = self.gs2_header.clone().into_bytes();
        cbind.extend_from_slice(&self.binding);
        let without_proof = format!("c={},r={nonce}", B64.encode(cbind));
        let auth_message = format!("{},{},{}", self.client_first_bare, server_first, without_proof);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(signature.iter()).map(|(k, s)| k ^ s).collect();
        let server_key = hmac(&salted, b"Server Key");
        self.state = ClientState::Final { server_signature: hmac(&server_key, auth_message.as_bytes()) };
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks server-final: the server proves it knows the verifier.
    pub fn finish(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        let ClientState::Final { server_signature } = self.state else {
            return Err(ScramError::Malformed("server-final out of order"));
        };
        let text = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("server-final is not UTF-8"))?;
        let v = text.split(',').find_map(|a| a.strip_prefix("v=")).ok_or(ScramError::BadProof)?;
        let got = B64.decode(v).map_err(|_| ScramError::Malformed("server signature is not base64"))?;
        if !bool::from(got.as_slice().ct_eq(&server_signature)) {
            return Err(ScramError::BadProof);
        }
        self.state = ClientState::Done;
        Ok(())
    }
}

#[cfg(test)]
mod client_tests {
    use super::*;

    fn login(password: &str, verifier_password: &str, binding: Option<Vec<u8>>, channel: &Channel) -> Result<(), ScramError> {
        let verifier = ScramVerifier::from_password(verifier_password);
        let mut client = ClientExchange::new(password, binding, matches!(channel, Channel::Tls { .. }));
        let (server, first) = ServerExchange::start(client.mechanism(), &client.client_first(), verifier, channel)?;
        let fin = client.client_final(first.as_bytes(), salted_password)?;
        let server_final = server.finish(&fin)?;
        client.finish(server_final.as_bytes())
    }

    #[test]
    fn client_and_server_agree() {
        let tls = Channel::Tls { end_point_hash: vec![9; 32] };
        assert_eq!(login("pw", "pw", None, &Channel::Plain), Ok(()));
        assert_eq!(login("pw", "pw", Some(vec![9; 32]), &tls), Ok(()));
        assert_eq!(login("wrong", "pw", None, &Channel::Plain), Err(ScramError::BadProof));
        assert_eq!(login("pw", "pw", Some(vec![1; 32]), &tls), Err(ScramError::ChannelBindingMismatch));
        // Non-ASCII passwords go through SASLprep on both sides.
        assert_eq!(login("pässwörd", "pässwörd", None, &Channel::Plain), Ok(()));
    }

    #[test]
    fn a_forged_server_signature_is_refused() {
        let verifier = ScramVerifier::from_password("pw");
        let mut client = ClientExchange::new("pw", None, false);
        let (server, first) = ServerExchange::start(SCRAM_SHA_256, &client.client_first(), verifier, &Channel::Plain).unwrap();
        let fin = client.client_final(first.as_bytes(), salted_password).unwrap();
        server.finish(&fin).unwrap();
        assert_eq!(client.finish(format!("v={}", B64.encode([0u8; 32])).as_bytes()), Err(ScramError::BadProof));
    }
}
