//! The client side of connection setup: TLS negotiation, the startup packet, its parameters,
//! protocol version negotiation and authentication.
//!
//! [`negotiate`] returns either a startup to serve or a cancel request, so cancels leave the main
//! path at once (as in Neon's proxy). Every refusal here is a `FATAL` the client can read.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pgwire::messages::startup::{Authentication, NegotiateProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::scram::{self, Channel, ServerExchange};
use crate::auth::{CredentialSource, Identity, ScramVerifier};
use crate::codec::frame::FrameLimits;
use crate::codec::messages::{SaslInitialResponse, encode_pgwire};
use crate::codec::startup::{self, StartupError, StartupMessage, StartupPacket, TLS_HANDSHAKE_BYTE};
use crate::codec::{Frame, FramedReader, ReadEvent};
use crate::error::{ClientError, sqlstate};
use crate::stream::Stream;
use crate::tls::ServerTls;

/// What a new connection turned out to be.
pub enum Handshake {
    Startup(ClientStartup),
    Cancel(CancelRequest),
}

/// A `CancelRequest`, with the connection it came on: the caller acts on it, then ends the
/// connection with [`CancelRequest::close`].
pub struct CancelRequest {
    pub pid: i32,
    pub secret: Bytes,
    stream: Stream,
}

impl CancelRequest {
    /// Ends the cancel connection as Postgres does once it has passed the request on: over TLS
    /// a `close_notify` first, then the socket is closed. libpq 17+ (`PQcancelBlocking`,
    /// psycopg's `cancel_safe`) reads to the end of the connection and reports a TLS EOF
    /// without `close_notify` as a failed cancel. The request gets no answer either way.
    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

pub struct ClientStartup {
    pub stream: Stream,
    pub message: StartupMessage,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Sent to the client as a `FATAL` before closing.
    #[error("{0}")]
    Refused(ClientError),
    /// Nothing sensible to send (TLS failed, the client left): just close.
    #[error("{0}")]
    Closed(String),
}

/// Client-facing TLS and plaintext policy.
#[derive(Clone)]
pub struct ClientTlsPolicy {
    pub tls: Option<Arc<ServerTls>>,
    pub allow_plaintext: bool,
}

/// Reads `SSLRequest` / `GSSENCRequest` / `CancelRequest` / `StartupMessage` until a startup or a
/// cancel is found. Refusals are written to the client here, where the stream is at hand.
///
/// NOTE: not cancel-safe; the caller bounds it with the handshake timeout.
pub async fn negotiate(tcp: TcpStream, policy: &ClientTlsPolicy) -> Result<Handshake, HandshakeError> {
    // A PG 17+ client with `sslnegotiation=direct` starts with a TLS ClientHello.
    let mut first = [0u8; 1];
    let direct_tls = matches!(tcp.peek(&mut first).await, Ok(1) if first[0] == TLS_HANDSHAKE_BYTE);
    let mut stream = if direct_tls {
        let Some(tls) = &policy.tls else {
            return Err(HandshakeError::Closed("direct TLS without a certificate configured".into()));
        };
        let s = accept_tls(tcp, tls).await?;
        // Direct TLS must carry the "postgresql" ALPN protocol (protocol docs, "SSL Session Encryption").
        if s.get_ref().1.alpn_protocol() != Some(b"postgresql") {
            return Err(HandshakeError::Closed("direct TLS without ALPN \"postgresql\"".into()));
        }
        Stream::ServerTls(Box::new(s))
    } else {
        Stream::Tcp(tcp)
    };

    loop {
        let packet = match startup::read_packet(&mut stream).await {
            Ok(p) => p,
            Err(StartupError::Closed) => return Err(HandshakeError::Closed("client left during startup".into())),
            Err(StartupError::DirectTls) => return Err(HandshakeError::Closed("TLS record after negotiation".into())),
            Err(e) => return refuse(&mut stream, ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())).await,
        };
        match packet {
            StartupPacket::SslRequest => {
                let Stream::Tcp(mut tcp) = stream else {
                    return refuse(&mut stream, ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "SSLRequest on an encrypted connection")).await;
                };
                let Some(tls) = &policy.tls else {
                    tcp.write_all(b"N").await.map_err(|e| HandshakeError::Closed(e.to_string()))?;
                    stream = Stream::Tcp(tcp);
                    continue;
                };
                // Bytes that came with the SSLRequest were sent before the client could know
                // TLS would follow: never protocol (CVE-2021-23214). As Postgres does, they are
                // set aside, the handshake goes on, and the client is told over TLS.
                let injected = discard_pending(&mut tcp).await?;
                tcp.write_all(b"S").await.map_err(|e| HandshakeError::Closed(e.to_string()))?;
                // Plaintext where the ClientHello belongs: Postgres (OpenSSL) closes without a
                // TLS alert, and so does pglease; a bad record that looks like TLS gets rustls's
                // alert or close, as OpenSSL does.
                let mut first = [0u8; 1];
                match tcp.peek(&mut first).await {
                    Ok(1) if first[0] == TLS_HANDSHAKE_BYTE => {}
                    _ => return Err(HandshakeError::Closed("plaintext after the SSLRequest was answered".into())),
                }
                stream = Stream::ServerTls(Box::new(accept_tls(tcp, tls).await?));
                if injected {
                    let err = ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "received unencrypted data after SSL request")
                        .with_detail("This could be either a client-software bug or evidence of an attempted man-in-the-middle attack.");
                    return refuse(&mut stream, err).await;
                }
            }
            StartupPacket::GssEncRequest => {
                if stream.is_tls() {
                    return refuse(&mut stream, ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "GSSENCRequest on an encrypted connection")).await;
                }
                stream.write_all(b"N").await.map_err(|e| HandshakeError::Closed(e.to_string()))?;
            }
            StartupPacket::Cancel { pid, secret } => return Ok(Handshake::Cancel(CancelRequest { pid, secret, stream })),
            StartupPacket::Startup(message) => {
                if !stream.is_tls() && !policy.allow_plaintext {
                    let err = ClientError::fatal(sqlstate::INVALID_AUTHORIZATION, "pglease requires an encrypted connection")
                        .with_hint("Connect with sslmode=require (or verify-full with the proxy's CA certificate).");
                    return refuse(&mut stream, err).await;
                }
                return Ok(Handshake::Startup(ClientStartup { stream, message }));
            }
        }
    }
}

/// Reads and drops whatever the client has already sent, without waiting for more; reports
/// whether there was anything. More than a startup packet's worth is not a client bug: close.
async fn discard_pending(tcp: &mut TcpStream) -> Result<bool, HandshakeError> {
    use std::os::fd::AsRawFd;
    // The kernel's queue is asked directly, not tokio's readiness cache, which may not have
    // seen the bytes yet. MSG_PEEK leaves them queued; MSG_DONTWAIT returns at once.
    let peek = |buf: &mut [u8]| {
        // SAFETY: recv(2) into a buffer we own, of the length we pass.
        let n = unsafe { libc::recv(tcp.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        usize::try_from(n).unwrap_or(0)
    };
    if peek(&mut [0u8; 1]) == 0 {
        return Ok(false);
    }
    // On the heap: this future lives inside every connection's task.
    let mut scratch = vec![0u8; startup::MAX_STARTUP_PACKET];
    let n = peek(&mut scratch);
    if n == scratch.len() {
        return Err(HandshakeError::Closed("a flood of plaintext after SSLRequest".into()));
    }
    tcp.read_exact(&mut scratch[..n]).await.map_err(|e| HandshakeError::Closed(e.to_string()))?;
    Ok(true)
}

async fn accept_tls(tcp: TcpStream, tls: &ServerTls) -> Result<tokio_rustls::server::TlsStream<TcpStream>, HandshakeError> {
    tokio_rustls::TlsAcceptor::from(tls.config.clone())
        .accept(tcp)
        .await
        .map_err(|e| HandshakeError::Closed(format!("TLS handshake failed: {e}")))
}

/// Writes a `FATAL` and returns the matching error.
pub async fn refuse<T>(stream: &mut Stream, err: ClientError) -> Result<T, HandshakeError> {
    send_error(stream, &err).await;
    Err(HandshakeError::Refused(err))
}

/// Best effort: the client may already be gone.
pub async fn send_error(stream: &mut Stream, err: &ClientError) {
    let mut buf = BytesMut::new();
    err.encode(&mut buf);
    let _ = stream.write_all(&buf).await;
    let _ = stream.flush().await;
}

// ---------------------------------------------------------------------------------------------
// Startup parameters

/// The startup parameters pglease accepted, split into what it uses and what it forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientParams {
    pub user: String,
    pub database: String,
    /// Parameters passed on to the upstream as they were sent (allowlisted, harmless).
    pub forwarded: Vec<(String, String)>,
    /// Settings (GUCs) the client asked for at startup, directly or in `options`: once the
    /// login's scope is known, each is decided like a `SET` of it, then forwarded.
    pub settings: Vec<(String, String)>,
    /// `_pq_.*` protocol options, which pglease does not support and names in
    /// `NegotiateProtocolVersion`.
    pub unsupported_options: Vec<String>,
}

/// Session settings that only shape how values are printed, forwarded as sent. Postgres
/// validates their values.
const FORWARDED: &[&str] = &["application_name", "datestyle", "timezone", "intervalstyle", "extra_float_digits"];

/// Settings no session may choose at startup: what every scope pins (see
/// [`crate::policy::PINNED_SETTINGS`]), replication, and `search_path`, which pglease sets at
/// startup and tracks from `SET search_path` afterwards.
fn pinned_for_every_session(name: &str) -> bool {
    matches!(name, "replication" | "search_path") || crate::policy::PINNED_SETTINGS.contains(&name)
}

/// A GUC name as Postgres accepts it (custom ones have a dot: `myapp.tenant`).
fn valid_setting_name(name: &str) -> bool {
    !name.is_empty() && name.len() < 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// Applies the startup-parameter rules that do not depend on the login's scope.
pub fn vet_params(message: &StartupMessage) -> Result<ClientParams, ClientError> {
    let mut user = None;
    let mut database = None;
    let mut forwarded = Vec::new();
    let mut settings = Vec::new();
    let mut unsupported_options = Vec::new();
    for (key, value) in &message.params {
        // GUC names are case-insensitive; `user` and `database` are not GUCs but match alike.
        let lower = key.to_ascii_lowercase();
        match lower.as_str() {
            "user" => user = Some(value.clone()),
            "database" => database = Some(value.clone()),
            "client_encoding" => {
                // pglease parses SQL as UTF-8 and talks UTF-8 upstream. SQL_ASCII is what libpq
                // sends under the C locale ("no conversion"); against a UTF-8 database it means
                // the same bytes, so it is served as UTF8.
                // Postgres compares encoding names without case and without anything but
                // letters and digits (asyncpg sends `'utf-8'`, quotes included).
                let v: String = value.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_uppercase()).collect();
                if !matches!(v.as_str(), "UTF8" | "UNICODE" | "SQLASCII") {
                    return Err(ClientError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        format!("client_encoding \"{value}\" is not supported: pglease speaks UTF8 only, so that it parses exactly the SQL Postgres will run"),
                    )
                    .with_hint("Set PGCLIENTENCODING=UTF8 or client_encoding=UTF8 in the connection string."));
                }
            }
            k if k.starts_with("_pq_.") => unsupported_options.push(key.clone()),
            k if FORWARDED.contains(&k) => forwarded.push((key.clone(), value.clone())),
            "options" => {
                for (name, value) in parse_options(value)? {
                    settings.push(vet_setting(&name, value)?);
                }
            }
            k if valid_setting_name(k) || pinned_for_every_session(k) => settings.push(vet_setting(k, value.clone())?),
            _ => {
                return Err(ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("unsupported startup parameter \"{key}\""))
                    .with_hint(format!("pglease accepts: user, database, client_encoding, options, {} and settings", FORWARDED.join(", "))));
            }
        }
    }
    let user = user.filter(|u| !u.is_empty()).ok_or_else(|| ClientError::fatal(sqlstate::INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet"))?;
    let database = database.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
    Ok(ClientParams { user, database, forwarded, settings, unsupported_options })
}

fn vet_setting(name: &str, value: String) -> Result<(String, String), ClientError> {
    let name = name.to_ascii_lowercase();
    if !valid_setting_name(&name) {
        return Err(ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid setting name \"{name}\" in the startup packet")));
    }
    if pinned_for_every_session(&name) {
        let hint = if name == "search_path" { " (a scope that allows it may SET search_path after connecting)" } else { "" };
        return Err(ClientError::fatal(sqlstate::INSUFFICIENT_PRIVILEGE, format!("startup parameter \"{name}\" is not allowed: pglease fixes this setting for the session{hint}")));
    }
    Ok((name, value))
}

/// The settings in a startup `options` value, as Postgres reads it (`pg_split_opts`): words
/// split on spaces, `\` escaping the next character; `-c name=value`, `-cname=value` and
/// `--name=value` (dashes in the name read as underscores).
fn parse_options(options: &str) -> Result<Vec<(String, String)>, ClientError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let unsupported = |w: &str| {
        ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("unsupported switch \"{w}\" in startup parameter \"options\""))
            .with_hint("pglease accepts settings there: -c name=value or --name=value")
    };
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let assignment = if w == "-c" {
            words.next().ok_or_else(|| unsupported(&w))?
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_owned()
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_owned()
        } else {
            return Err(unsupported(&w));
        };
        let (name, value) = assignment.split_once('=').ok_or_else(|| unsupported(&w))?;
        out.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(out)
}

/// `NegotiateProtocolVersion`, needed when the client asked for a minor version above 3.0 or
/// sent `_pq_.` options (PG 17/18 libpq with `max_protocol_version=latest`).
pub fn negotiation_message(message: &StartupMessage, params: &ClientParams) -> Option<Frame> {
    if message.minor == 0 && params.unsupported_options.is_empty() {
        return None;
    }
    // Postgres sends its full newest version number (3.0 = 196608), which every libpq accepts.
    Some(encode_pgwire(&NegotiateProtocolVersion::new(3 << 16, params.unsupported_options.clone())))
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// Limits for the authentication phase: only small messages are expected.
pub fn auth_limits() -> FrameLimits {
    FrameLimits { max_frame: startup::MAX_STARTUP_PACKET, streamable: b"", stream_threshold: usize::MAX }
}

/// Runs SCRAM-SHA-256(-PLUS) with the client. On success the client has been sent
/// `AuthenticationSASLFinal` and `AuthenticationOk`.
///
/// An unknown login runs the same exchange against a mock verifier and fails at the same step
/// with the same message, so the answer does not tell whether the login exists.
pub async fn authenticate(
    reader: &mut FramedReader<Stream>,
    params: &ClientParams,
    credentials: &dyn CredentialSource,
    channel: &Channel,
    mock_secret: &[u8],
) -> Result<Identity, ClientError> {
    let failed = || ClientError::fatal(sqlstate::INVALID_PASSWORD, format!("password authentication failed for user \"{}\"", params.user));
    let found = credentials.lookup(&params.user, &params.database).await;
    let verifier = found.as_ref().map(|c| c.verifier.clone()).unwrap_or_else(|| ScramVerifier::mock(&params.user, mock_secret));

    let mechanisms = channel.mechanisms().into_iter().map(str::to_owned).collect();
    write_frame(reader, encode_pgwire(&Authentication::SASL(mechanisms))).await?;

    let first = read_password_message(reader).await?;
    let initial = SaslInitialResponse::decode(&first).map_err(|e| ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
    let (exchange, server_first) = ServerExchange::start(&initial.mechanism, &initial.data, verifier, channel).map_err(|e| scram_error(e, &failed))?;
    write_frame(reader, encode_pgwire(&Authentication::SASLContinue(Bytes::from(server_first)))).await?;

    let final_msg = read_password_message(reader).await?;
    let server_final = exchange.finish(final_msg.body()).map_err(|e| scram_error(e, &failed))?;
    let Some(credential) = found else {
        // Unreachable in practice (the mock verifier matches no proof), but never let it through.
        return Err(failed());
    };
    let mut ok = BytesMut::new();
    ok.extend_from_slice(encode_pgwire(&Authentication::SASLFinal(Bytes::from(server_final))).raw());
    ok.extend_from_slice(encode_pgwire(&Authentication::Ok).raw());
    reader.get_mut().write_all(&ok).await.map_err(|_| failed())?;
    Ok(credential.identity)
}

fn scram_error(e: scram::ScramError, failed: &dyn Fn() -> ClientError) -> ClientError {
    match e {
        scram::ScramError::Malformed(_) | scram::ScramError::Authzid => ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()),
        scram::ScramError::ChannelBindingNegotiation | scram::ScramError::ChannelBindingMismatch => ClientError::fatal(sqlstate::INVALID_AUTHORIZATION, e.to_string()),
        scram::ScramError::NonceMismatch | scram::ScramError::BadProof => failed(),
    }
}

async fn write_frame(reader: &mut FramedReader<Stream>, frame: Frame) -> Result<(), ClientError> {
    let s = reader.get_mut();
    s.write_all(frame.raw()).await.map_err(|_| closed())?;
    s.flush().await.map_err(|_| closed())
}

fn closed() -> ClientError {
    ClientError::fatal(sqlstate::CONNECTION_FAILURE, "client closed the connection during authentication")
}

async fn read_password_message(reader: &mut FramedReader<Stream>) -> Result<Frame, ClientError> {
    match reader.next().await {
        Ok(Some(ReadEvent::Frame(f))) if f.tag() == b'p' => Ok(f),
        Ok(Some(ReadEvent::Frame(f))) => Err(ClientError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("expected SASL response, got message type {:?}", f.tag() as char),
        )),
        Ok(None) => Err(closed()),
        Ok(Some(ReadEvent::Large { .. })) | Err(_) => Err(ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "invalid authentication message")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage { major: 3, minor: 0, params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn allowlist() {
        let p = vet_params(&msg(&[("user", "bob"), ("client_encoding", "UTF8"), ("application_name", "psql"), ("DateStyle", "ISO")])).unwrap();
        assert_eq!(p.database, "bob");
        assert_eq!(p.forwarded.len(), 2);
        for (k, code) in [("replication", "42501"), ("search_path", "42501"), ("Role", "42501"), ("standard_conforming_strings", "42501"), ("bad name", "08P01")] {
            let e = vet_params(&msg(&[("user", "bob"), (k, "x")])).unwrap_err();
            assert_eq!(e.code, code, "{k}");
            assert!(e.message.contains(&k.to_ascii_lowercase()) || e.message.contains(k), "{}", e.message);
        }
        // Settings wait for the scope's decision, wherever they were sent.
        let p = vet_params(&msg(&[("user", "bob"), ("statement_timeout", "5s"), ("options", r"-c jit=off --lock-timeout=1s -capp.x=a\ b")])).unwrap();
        assert_eq!(
            p.settings,
            [("statement_timeout", "5s"), ("jit", "off"), ("lock_timeout", "1s"), ("app.x", "a b")].map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        for options in ["-c search_path=evil", "--role=postgres", "-c default_transaction_read_only=off"] {
            assert_eq!(vet_params(&msg(&[("user", "bob"), ("options", options)])).unwrap_err().code, "42501", "{options}");
        }
        for options in ["-B 100", "-c", "-c jit", "-d 5"] {
            assert_eq!(vet_params(&msg(&[("user", "bob"), ("options", options)])).unwrap_err().code, "08P01", "{options}");
        }
        assert!(vet_params(&msg(&[("user", "bob"), ("client_encoding", "LATIN1")])).is_err());
        assert!(vet_params(&msg(&[("user", "bob"), ("client_encoding", "sql_ascii")])).is_ok());
        assert!(vet_params(&msg(&[("user", "bob"), ("client_encoding", "'utf-8'")])).is_ok());
        assert_eq!(vet_params(&msg(&[("database", "x")])).unwrap_err().code, "28000");
    }

    #[test]
    fn negotiation_only_when_needed() {
        let m = msg(&[("user", "bob")]);
        assert!(negotiation_message(&m, &vet_params(&m).unwrap()).is_none());
        let mut m = msg(&[("user", "bob"), ("_pq_.command_marker", "1")]);
        m.minor = 2;
        let p = vet_params(&m).unwrap();
        let f = negotiation_message(&m, &p).unwrap();
        assert_eq!(f.tag(), b'v');
        assert_eq!(&f.body()[..8], &[0, 3, 0, 0, 0, 0, 0, 1]);
    }
}
