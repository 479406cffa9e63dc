//! The upstream side: connecting to Postgres, TLS, logging in, and cancel requests.
//!
//! pglease builds the upstream `StartupMessage` itself (never forwarding the client's) and logs in
//! with credentials only it holds. SCRAM uses postgres-protocol's client (the one tokio-postgres
//! runs), with channel binding whenever the connection is TLS and the server offers it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use sha2::Digest;

use crate::auth::scram::{ClientExchange, SCRAM_SHA_256_PLUS, ScramError, salted_password};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::codec::frame::FrameLimits;
use crate::codec::messages::{AuthRequest, BackendKeyData, ErrorFields, ParameterStatus, TxStatus};
use crate::codec::{FrameError, FramedReader, ReadEvent};
use crate::config::{UpstreamConfig, UpstreamTls};
use crate::error::{ClientError, UserFacingError, sqlstate};
use crate::stream::Stream;
use crate::tls::{self, UpstreamVerify};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to upstream {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("timed out connecting to upstream {0}")]
    Timeout(String),
    #[error("upstream refused TLS, and upstream.tls requires it")]
    TlsRefused,
    #[error("upstream TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("upstream asked for {0} authentication, which upstream.allow_* does not permit")]
    AuthMethodNotAllowed(&'static str),
    #[error("upstream asked for an unsupported authentication method (code {0})")]
    UnsupportedAuth(i32),
    #[error("upstream SCRAM exchange failed: {0}")]
    Scram(ScramError),
    #[error("upstream rejected the login: {code} {message}")]
    LoginRejected { code: String, message: String },
    #[error("upstream refused the session: {code} {message}")]
    Rejected { code: String, message: String, fields: ErrorFields },
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream framing: {0}")]
    Frame(#[from] FrameError),
    #[error("upstream I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl UserFacingError for UpstreamError {
    fn to_client_error(&self) -> ClientError {
        match self {
            // The upstream's own refusal of the session (database does not exist, too many
            // connections…) is what a direct client would see; pass its code and text on.
            UpstreamError::Rejected { code, message, .. } => {
                let code = match code.as_str() {
                    "3D000" => "3D000",
                    "53300" => sqlstate::TOO_MANY_CONNECTIONS,
                    "57P03" => sqlstate::CANNOT_CONNECT_NOW,
                    _ => sqlstate::CONNECTION_FAILURE,
                };
                ClientError::fatal(code, message.clone())
            }
            // Anything about the proxy's own credentials or network stays in the proxy's log.
            _ => ClientError::fatal(sqlstate::CONNECTION_FAILURE, "pglease could not connect to the upstream database"),
        }
    }
}

/// Frame limits for the upstream's messages: row and COPY data may be of any size and are
/// streamed; the rest is bounded.
pub fn upstream_limits(max_frame: usize) -> FrameLimits {
    FrameLimits { max_frame, streamable: b"dD", stream_threshold: 1 << 20 }
}

/// (hash of the password, salt, iterations): what a salted SCRAM password is derived from.
type SaltedKey = ([u8; 32], Vec<u8>, u32);

/// A Postgres role and its password, as the proxy logs in with it.
#[derive(Clone)]
pub struct UpstreamLogin {
    pub user: String,
    /// NOTE: secret; never logged.
    pub password: String,
}

impl std::fmt::Debug for UpstreamLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamLogin").field("user", &self.user).finish_non_exhaustive()
    }
}

/// Everything needed to open upstream sessions and send cancel requests. Shared by all sessions.
pub struct Upstream {
    config: UpstreamConfig,
    /// The `[upstream]` role, used for sessions that no scope governs (tests, the bare core).
    default_login: UpstreamLogin,
    tls: Option<Arc<rustls::ClientConfig>>,
    max_frame: usize,
    /// SCRAM salted passwords by (SHA-256 of password, salt, iterations): PBKDF2 runs once per
    /// role instead of once per upstream connection.
    salted: std::sync::Mutex<std::collections::HashMap<SaltedKey, [u8; 32]>>,
}

/// A logged-in upstream session, ready for queries.
pub struct UpstreamSession {
    pub stream: Stream,
    /// Bytes read past `ReadyForQuery` (none in practice; kept so nothing is lost).
    pub leftover: BytesMut,
    pub parameters: Vec<ParameterStatus>,
    pub key: BackendKeyData,
    pub tx: TxStatus,
}

impl Upstream {
    pub fn new(config: UpstreamConfig, password: String, max_frame: usize) -> Result<Self, tls::TlsError> {
        let tls = match config.tls {
            UpstreamTls::Disable => None,
            UpstreamTls::Prefer | UpstreamTls::Require => Some(tls::upstream_client_config(UpstreamVerify::None, None)?),
            UpstreamTls::VerifyFull => Some(tls::upstream_client_config(UpstreamVerify::Full, config.ca_file.as_deref())?),
        };
        let default_login = UpstreamLogin { user: config.user.clone(), password };
        Ok(Self { config, default_login, tls, max_frame, salted: Default::default() })
    }

    pub fn describe(&self) -> String {
        if self.config.host.starts_with('/') {
            format!("{}/.s.PGSQL.{}", self.config.host, self.config.port)
        } else {
            format!("{}:{}", self.config.host, self.config.port)
        }
    }

    /// Opens the transport and, where configured, TLS.
    async fn open(&self) -> Result<Stream, UpstreamError> {
        let addr = self.describe();
        let timeout = self.config.connect_timeout;
        let connect = async {
            if self.config.host.starts_with('/') {
                UnixStream::connect(&addr).await.map(Stream::Unix)
            } else {
                let s = TcpStream::connect((self.config.host.as_str(), self.config.port)).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        };
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| UpstreamError::Timeout(addr.clone()))?
            .map_err(|source| UpstreamError::Connect { addr: addr.clone(), source })?;
        // Unix sockets (validated to `disable`/`prefer`) and `disable` stay plain.
        let (mut tcp, tls) = match (stream, &self.tls) {
            (Stream::Tcp(tcp), Some(tls)) => (tcp, tls),
            (plain, _) => return Ok(plain),
        };
        // SSLRequest: length 8, code 80877103.
        tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let name = self.config.server_name.clone().unwrap_or_else(|| self.config.host.clone());
                let name = rustls_pki_types::ServerName::try_from(name).map_err(|_| UpstreamError::Protocol("upstream.server_name is not a valid name".into()))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let tls_stream = tokio::time::timeout(timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| UpstreamError::Timeout(addr.clone()))?
                    .map_err(UpstreamError::Tls)?;
                Ok(Stream::ClientTls(Box::new(tls_stream)))
            }
            b'N' if self.config.tls == UpstreamTls::Prefer => Ok(Stream::Tcp(tcp)),
            b'N' => Err(UpstreamError::TlsRefused),
            _ => Err(UpstreamError::Protocol("unexpected answer to SSLRequest".into())),
        }
    }

    pub fn default_login(&self) -> &UpstreamLogin {
        &self.default_login
    }

    /// Opens an upstream session as `login` for `database` with extra startup parameters.
    pub async fn connect(&self, login: &UpstreamLogin, database: &str, params: &[(String, String)]) -> Result<UpstreamSession, UpstreamError> {
        let stream = self.open().await?;
        let end_point = match &stream {
            Stream::ClientTls(s) => s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(tls::end_point_hash),
            _ => None,
        };
        let mut reader = FramedReader::new(stream, upstream_limits(self.max_frame));

        let mut startup = BytesMut::with_capacity(256);
        startup.put_i32(0);
        startup.put_i32(3 << 16);
        for (k, v) in [("user", login.user.as_str()), ("database", database)]
            .into_iter()
            .chain(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            startup.put_slice(k.as_bytes());
            startup.put_u8(0);
            startup.put_slice(v.as_bytes());
            startup.put_u8(0);
        }
        startup.put_u8(0);
        let len = startup.len() as i32;
        startup[..4].copy_from_slice(&len.to_be_bytes());
        reader.get_mut().write_all(&startup).await?;

        self.authenticate(&mut reader, login, end_point).await?;

        let mut parameters = Vec::new();
        let mut key = None;
        loop {
            let frame = next_frame(&mut reader).await?;
            match frame.tag() {
                b'S' => parameters.push(ParameterStatus::decode(&frame).map_err(protocol)?),
                b'K' => key = Some(BackendKeyData::decode(&frame).map_err(protocol)?),
                b'N' => {} // startup notices are not shown to clients, as Postgres shows none either
                b'E' => return Err(rejected(&frame)),
                b'Z' => {
                    let tx = TxStatus::decode(&frame).map_err(protocol)?;
                    let key = key.ok_or_else(|| UpstreamError::Protocol("no BackendKeyData before ReadyForQuery".into()))?;
                    let (stream, leftover) = reader.into_parts();
                    return Ok(UpstreamSession { stream, leftover, parameters, key, tx });
                }
                t => return Err(UpstreamError::Protocol(format!("unexpected message {:?} during startup", t as char))),
            }
        }
    }

    async fn authenticate(&self, reader: &mut FramedReader<Stream>, login: &UpstreamLogin, end_point: Option<Vec<u8>>) -> Result<(), UpstreamError> {
        let mut scram: Option<ClientExchange> = None;
        loop {
            let frame = next_frame(reader).await?;
            if frame.tag() == b'E' {
                let err = rejected(&frame);
                return Err(match err {
                    UpstreamError::Rejected { code, message, .. } if code.starts_with("28") => UpstreamError::LoginRejected { code, message },
                    other => other,
                });
            }
            if frame.tag() != b'R' {
                return Err(UpstreamError::Protocol(format!("unexpected message {:?} during authentication", frame.tag() as char)));
            }
            match AuthRequest::decode(&frame).map_err(protocol)? {
                AuthRequest::Ok => return Ok(()),
                AuthRequest::Cleartext => {
                    if !self.config.allow_cleartext {
                        return Err(UpstreamError::AuthMethodNotAllowed("cleartext password"));
                    }
                    send_password_message(reader, login.password.as_bytes()).await?;
                }
                AuthRequest::Md5 { salt } => {
                    if !self.config.allow_md5 {
                        return Err(UpstreamError::AuthMethodNotAllowed("MD5 password"));
                    }
                    let hash = postgres_protocol::authentication::md5_hash(login.user.as_bytes(), login.password.as_bytes(), salt);
                    send_password_message(reader, hash.as_bytes()).await?;
                }
                AuthRequest::Sasl { mechanisms } => {
                    let plus = mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS);
                    let binding = end_point.clone().filter(|_| plus);
                    let s = ClientExchange::new(&login.password, binding, end_point.is_some());
                    let mechanism = s.mechanism();
                    if !mechanisms.iter().any(|m| m == mechanism) {
                        return Err(UpstreamError::UnsupportedAuth(10));
                    }
                    let first = s.client_first();
                    let mut msg = BytesMut::new();
                    msg.put_u8(b'p');
                    msg.put_i32(0);
                    msg.put_slice(mechanism.as_bytes());
                    msg.put_u8(0);
                    msg.put_i32(first.len() as i32);
                    msg.put_slice(&first);
                    finish_length(&mut msg);
                    reader.get_mut().write_all(&msg).await?;
                    scram = Some(s);
                }
                AuthRequest::SaslContinue(data) => {
                    let s = scram.as_mut().ok_or_else(|| UpstreamError::Protocol("SASL continue without SASL start".into()))?;
                    let fin = s.client_final(&data, |password, salt, iterations| self.salted_password(password, salt, iterations)).map_err(scram_error)?;
                    let mut msg = BytesMut::new();
                    msg.put_u8(b'p');
                    msg.put_i32(0);
                    msg.put_slice(&fin);
                    finish_length(&mut msg);
                    reader.get_mut().write_all(&msg).await?;
                }
                AuthRequest::SaslFinal(data) => {
                    let s = scram.as_mut().ok_or_else(|| UpstreamError::Protocol("SASL final without SASL start".into()))?;
                    // Verifies the server's signature: the upstream proved it knows the verifier.
                    s.finish(&data).map_err(scram_error)?;
                }
                AuthRequest::Other(code) => return Err(UpstreamError::UnsupportedAuth(code)),
            }
        }
    }

    /// Sends a `CancelRequest` for an upstream backend. Errors are the caller's to log.
    pub async fn cancel(&self, key: &BackendKeyData) -> Result<(), UpstreamError> {
        let mut stream = self.open().await?;
        let mut msg = BytesMut::with_capacity(16 + key.secret.len());
        msg.put_i32((12 + key.secret.len()) as i32);
        msg.put_i32((1234 << 16) | 5678);
        msg.put_i32(key.pid);
        msg.put_slice(&key.secret);
        stream.write_all(&msg).await?;
        stream.flush().await?;
        // Postgres closes the connection without answering; wait for that so the cancel is
        // delivered before we return (bounded: the server closes at once).
        let mut sink = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
        Ok(())
    }
}

fn scram_error(e: ScramError) -> UpstreamError {
    UpstreamError::Scram(e)
}

impl Upstream {
    /// The salted password for a SCRAM exchange, from the cache when this role's salt was seen.
    fn salted_password(&self, password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let key: ([u8; 32], Vec<u8>, u32) = (sha2::Sha256::digest(password).into(), salt.to_vec(), iterations);
        if let Some(s) = self.salted.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return *s;
        }
        let s = salted_password(password, salt, iterations);
        let mut cache = self.salted.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 1000 {
            cache.clear();
        }
        cache.insert(key, s);
        s
    }
}

async fn next_frame(reader: &mut FramedReader<Stream>) -> Result<crate::codec::Frame, UpstreamError> {
    match reader.next().await? {
        Some(ReadEvent::Frame(f)) => Ok(f),
        Some(ReadEvent::Large { .. }) => Err(UpstreamError::Protocol("oversized message during startup".into())),
        None => Err(UpstreamError::Protocol("upstream closed the connection during startup".into())),
    }
}

fn protocol(e: crate::codec::messages::DecodeError) -> UpstreamError {
    UpstreamError::Protocol(e.to_string())
}

fn rejected(frame: &crate::codec::Frame) -> UpstreamError {
    match ErrorFields::decode(frame) {
        Ok(fields) => UpstreamError::Rejected {
            code: fields.code().unwrap_or("XX000").to_owned(),
            message: fields.message().unwrap_or("").to_owned(),
            fields,
        },
        Err(e) => protocol(e),
    }
}

async fn send_password_message(reader: &mut FramedReader<Stream>, password: &[u8]) -> Result<(), UpstreamError> {
    let mut msg = BytesMut::new();
    msg.put_u8(b'p');
    msg.put_i32(0);
    msg.put_slice(password);
    msg.put_u8(0);
    finish_length(&mut msg);
    reader.get_mut().write_all(&msg).await?;
    Ok(())
}

fn finish_length(msg: &mut BytesMut) {
    let len = (msg.len() - 1) as i32;
    msg[1..5].copy_from_slice(&len.to_be_bytes());
}
