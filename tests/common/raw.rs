//! A deliberately low-level Postgres client for protocol tests: it sends exactly the bytes a
//! test asks for, including malformed ones, and reads raw messages back.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Raw {
    pub io: Box<dyn Io>,
    buf: BytesMut,
}

/// One message: its type byte and body.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// A field of an ErrorResponse/NoticeResponse.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while !rest.is_empty() && rest[0] != 0 {
            let c = rest[0];
            let end = rest[1..].iter().position(|&b| b == 0)? + 1;
            let value = String::from_utf8_lossy(&rest[1..end]).into_owned();
            if c == code {
                return Some(value);
            }
            rest = &rest[end + 1..];
        }
        None
    }

    pub fn code(&self) -> String {
        self.field(b'C').unwrap_or_default()
    }
}

pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

pub fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_u32(version);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut v = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    v
}

pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];
pub const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 48];

pub fn tls_config() -> std::sync::Arc<rustls::ClientConfig> {
    let h = super::HARNESS.get().expect("harness started");
    let mut roots = rustls::RootCertStore::empty();
    for cert in pglease::tls::load_certs(&h.ca_file).unwrap() {
        roots.add(cert).unwrap();
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(pglease::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl Raw {
    /// Wraps a stream a test set up itself.
    pub fn from_io(io: Box<dyn Io>) -> Raw {
        Raw { io, buf: BytesMut::new() }
    }

    pub async fn plain(addr: SocketAddr) -> Raw {
        Raw { io: Box::new(TcpStream::connect(addr).await.unwrap()), buf: BytesMut::new() }
    }

    /// SSLRequest, expect 'S', TLS handshake.
    pub async fn tls(addr: SocketAddr) -> Raw {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&SSL_REQUEST).await.unwrap();
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[0], b'S');
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(tls_config()).connect(name, tcp).await.unwrap();
        Raw { io: Box::new(tls), buf: BytesMut::new() }
    }

    /// TLS, startup, SCRAM; returns once the first ReadyForQuery arrived.
    pub async fn login(addr: SocketAddr, database: &str) -> Raw {
        let mut raw = Raw::tls(addr).await;
        raw.send(&startup_packet(3 << 16, &[("user", super::LOGIN), ("database", database)])).await;
        raw.scram(super::LOGIN_PASSWORD).await.expect("login succeeds");
        raw.until_ready().await;
        raw
    }

    /// Runs the SCRAM exchange; returns the error message if the proxy refuses.
    pub async fn scram(&mut self, password: &str) -> Result<(), Msg> {
        let m = self.recv().await.expect("auth request");
        if m.tag == b'E' {
            return Err(m);
        }
        assert_eq!(m.tag, b'R');
        assert_eq!(&m.body[..4], &10i32.to_be_bytes(), "SASL requested");
        // "n": no channel binding, as libpq with channel_binding=disable.
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut body = BytesMut::new();
        body.put_slice(b"SCRAM-SHA-256\0");
        body.put_i32(scram.message().len() as i32);
        body.put_slice(scram.message());
        self.send(&message(b'p', &body)).await;
        let m = self.recv().await.expect("SASL continue");
        if m.tag == b'E' {
            return Err(m);
        }
        scram.update(&m.body[4..]).unwrap();
        self.send(&message(b'p', scram.message())).await;
        let m = self.recv().await.expect("SASL final");
        if m.tag == b'E' {
            return Err(m);
        }
        scram.finish(&m.body[4..]).unwrap();
        let ok = self.recv().await.expect("AuthenticationOk");
        assert_eq!((ok.tag, &ok.body[..]), (b'R', &[0u8, 0, 0, 0][..]));
        Ok(())
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        // The peer may already have closed; tests then look at what was answered.
        let _ = self.io.write_all(bytes).await;
        let _ = self.io.flush().await;
    }

    /// The next message, or None when the connection closed. Fails the test after 20 s.
    pub async fn recv(&mut self) -> Option<Msg> {
        tokio::time::timeout(Duration::from_secs(20), self.recv_inner()).await.expect("proxy answered within 20s")
    }

    async fn recv_inner(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    self.buf.advance(5);
                    let body = self.buf.split_to(len - 4).to_vec();
                    return Some(Msg { tag, body });
                }
            }
            let mut chunk = [0u8; 8192];
            match self.io.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads a single byte (answers to SSLRequest/GSSENCRequest).
    pub async fn recv_byte(&mut self) -> Option<u8> {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(20), self.io.read(&mut b)).await.expect("answer within 20s") {
            Ok(1) => Some(b[0]),
            _ => None,
        }
    }

    /// Messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
        panic!("connection closed before ReadyForQuery; got {out:?}");
    }

    /// Everything until the connection closes.
    pub async fn until_closed(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            out.push(m);
        }
        out
    }
}
