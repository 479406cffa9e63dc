//! The untyped packets that open a connection: `SSLRequest`, `GSSENCRequest`, `CancelRequest`
//! and `StartupMessage` (protocol docs, "Message Formats"; `ProcessStartupPacket` in
//! `src/backend/tcop/backend_startup.c`).
//!
//! They are read with exact-length reads, never into a read-ahead buffer: bytes a client sends
//! after `SSLRequest` must go to the TLS handshake, not be taken as plaintext protocol
//! (CVE-2021-23214).

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Postgres's own limit for a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

const CANCEL_REQUEST_CODE: u32 = (1234 << 16) | 5678;
const SSL_REQUEST_CODE: u32 = (1234 << 16) | 5679;
const GSSENC_REQUEST_CODE: u32 = (1234 << 16) | 5680;

/// The first byte of a TLS ClientHello record: a PG 17+ client with `sslnegotiation=direct`.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: Bytes },
    Startup(StartupMessage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    /// Parameters in the order sent. Duplicates are refused during parsing.
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    BadLength(i64),
    #[error("startup packet is {0} bytes, over the limit of {MAX_STARTUP_PACKET}")]
    TooLarge(usize),
    #[error("unsupported frontend protocol {0}.{1}: server supports 3.0")]
    UnsupportedProtocol(u16, u16),
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
    #[error("startup parameter {0:?} appears twice")]
    Duplicate(String),
    #[error("connection closed during startup")]
    Closed,
    #[error("client speaks TLS directly (sslnegotiation=direct)")]
    DirectTls,
}

/// Reads one startup-phase packet.
///
/// NOTE: not cancel-safe (exact reads); callers bound it with the handshake timeout instead.
pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, StartupError> {
    let mut len_bytes = [0u8; 4];
    read_exact(r, &mut len_bytes[..1]).await?;
    if len_bytes[0] == TLS_HANDSHAKE_BYTE {
        return Err(StartupError::DirectTls);
    }
    read_exact(r, &mut len_bytes[1..]).await?;
    let len = i32::from_be_bytes(len_bytes);
    if len < 8 {
        return Err(StartupError::BadLength(len.into()));
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(StartupError::TooLarge(len));
    }
    let mut body = vec![0u8; len - 4];
    read_exact(r, &mut body).await?;
    parse_body(&body)
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), StartupError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(_) => Err(StartupError::Closed),
    }
}

/// Parses a packet body (everything after the length word).
pub fn parse_body(body: &[u8]) -> Result<StartupPacket, StartupError> {
    let Some((code, rest)) = body.split_first_chunk::<4>() else {
        return Err(StartupError::Malformed("packet shorter than its protocol code"));
    };
    let code = u32::from_be_bytes(*code);
    match code {
        SSL_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::GssEncRequest),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => Err(StartupError::Malformed("negotiation request with a payload")),
        CANCEL_REQUEST_CODE => {
            // Protocol 3.0 keys are 4 bytes; 3.2 allows up to 256.
            if rest.len() < 8 || rest.len() > 4 + 256 {
                return Err(StartupError::Malformed("cancel request of the wrong size"));
            }
            let pid = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            Ok(StartupPacket::Cancel { pid, secret: Bytes::copy_from_slice(&rest[4..]) })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol(major, minor));
            }
            Ok(StartupPacket::Startup(StartupMessage { major, minor, params: parse_params(rest)? }))
        }
    }
}

fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        let key = take_cstr(&mut rest)?;
        if key.is_empty() {
            break;
        }
        let value = take_cstr(&mut rest)?;
        if params.iter().any(|(k, _)| *k == key) {
            return Err(StartupError::Duplicate(key));
        }
        params.push((key, value));
    }
    if !rest.is_empty() {
        return Err(StartupError::Malformed("bytes after the parameter list terminator"));
    }
    Ok(params)
}

fn take_cstr(rest: &mut &[u8]) -> Result<String, StartupError> {
    let nul = rest.iter().position(|&b| b == 0).ok_or(StartupError::Malformed("missing terminator"))?;
    let s = std::str::from_utf8(&rest[..nul]).map_err(|_| StartupError::Malformed("parameter is not valid UTF-8"))?;
    *rest = &rest[nul + 1..];
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[tokio::test]
    async fn parses_each_kind() {
        assert_eq!(read_packet(&mut &packet(SSL_REQUEST_CODE, b"")[..]).await, Ok(StartupPacket::SslRequest));
        assert_eq!(read_packet(&mut &packet(GSSENC_REQUEST_CODE, b"")[..]).await, Ok(StartupPacket::GssEncRequest));
        let p = read_packet(&mut &packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4])[..]).await.unwrap();
        assert_eq!(p, StartupPacket::Cancel { pid: 7, secret: Bytes::from_static(&[1, 2, 3, 4]) });
        let p = read_packet(&mut &packet(3 << 16 | 2, b"user\0bob\0database\0shop\0\0")[..]).await.unwrap();
        let StartupPacket::Startup(m) = p else { panic!() };
        assert_eq!((m.major, m.minor), (3, 2));
        assert_eq!(m.get("user"), Some("bob"));
        assert_eq!(m.get("database"), Some("shop"));
    }

    #[tokio::test]
    async fn refuses_malformed_packets() {
        let bad_len = [0u8, 0, 0, 2];
        assert_eq!(read_packet(&mut &bad_len[..]).await, Err(StartupError::BadLength(2)));
        let huge = (1i32 << 30).to_be_bytes();
        assert!(matches!(read_packet(&mut &huge[..]).await, Err(StartupError::TooLarge(_))));
        let no_term = packet(3 << 16, b"user\0bob\0");
        assert!(matches!(read_packet(&mut &no_term[..]).await, Err(StartupError::Malformed(_))));
        let dup = packet(3 << 16, b"user\0a\0user\0b\0\0");
        assert!(matches!(read_packet(&mut &dup[..]).await, Err(StartupError::Duplicate(_))));
        let v2 = packet(2 << 16, b"\0");
        assert!(matches!(read_packet(&mut &v2[..]).await, Err(StartupError::UnsupportedProtocol(2, 0))));
        let short = &packet(3 << 16, b"user\0bob\0\0")[..10];
        assert_eq!(read_packet(&mut &short[..]).await, Err(StartupError::Closed));
        let bad_utf8 = packet(3 << 16, b"user\0\xff\0\0");
        assert!(matches!(read_packet(&mut &bad_utf8[..]).await, Err(StartupError::Malformed(_))));
    }
}
