//! Strict decoding of the messages the proxy looks into, and encoding of the ones it sends.
//!
//! Decoders never panic: every read is bounds-checked, strings must be valid UTF-8 without
//! embedded NULs, and trailing bytes are an error.

use bytes::{Bytes, BytesMut};
use pgwire::messages::Message;

use super::Frame;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed {what} message: {why}")]
pub struct DecodeError {
    pub what: &'static str,
    pub why: &'static str,
}

/// A bounds-checked reader over a message body.
struct Cursor<'a> {
    what: &'static str,
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(what: &'static str, body: &'a [u8]) -> Self {
        Self { what, rest: body }
    }

    fn err(&self, why: &'static str) -> DecodeError {
        DecodeError { what: self.what, why }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(self.err("shorter than its fields"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count field: non-negative, and each of the `count` items needs `min_item` bytes.
    fn count16(&mut self, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.i16()?;
        if n < 0 || (n as usize).saturating_mul(min_item) > self.rest.len() {
            return Err(self.err("count larger than the message"));
        }
        Ok(n as usize)
    }

    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let nul = self.rest.iter().position(|&b| b == 0).ok_or_else(|| self.err("string without terminator"))?;
        let s = std::str::from_utf8(&self.rest[..nul]).map_err(|_| self.err("string is not valid UTF-8"))?;
        self.rest = &self.rest[nul + 1..];
        Ok(s)
    }

    fn remaining(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() { Ok(()) } else { Err(self.err("trailing bytes")) }
    }
}

// ---------------------------------------------------------------------------------------------
// Frontend messages

/// `Q`: one or more SQL statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub sql: String,
}

impl Query {
    pub fn decode(frame: &Frame) -> Result<Self, DecodeError> {
        let mut c = Cursor::new("Query", frame.body());
        let sql = c.cstr()?.to_owned();
        c.finish()?;
        Ok(Self { sql })
    }

    pub fn encode(sql: &str) -> Frame {
        encode_with(b'Q', |b| put_cstr(b, sql))
    }
}

/// `P`: prepare a statement. An empty name is the unnamed statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse {
    pub name: String,
    pub sql: String,
    pub param_types: Vec<u32>,
}

impl Parse {
    pub fn decode(frame: &Frame) -> Result<Self, DecodeError> {
        let mut c = Cursor::new("Parse", frame.body());
        let name = c.cstr()?.to_owned();
        let sql = c.cstr()?.to_owned();
        let n = c.count16(4)?;
        let mut param_types = Vec::with_capacity(n);
        for _ in 0..n {
            param_types.push(c.i32()? as u32);
        }
        c.finish()?;
        Ok(Self { name, sql, param_types })
    }

    pub fn encode(&self) -> Frame {
        encode_with(b'P', |b| {
            put_cstr(b, &self.name);
            put_cstr(b, &self.sql);
            b.extend_from_slice(&(self.param_types.len() as i16).to_be_bytes());
            for t in &self.param_types {
                b.extend_from_slice(&t.to_be_bytes());
            }
        })
    }
}

/// `B`: bind parameters to a prepared statement, making a portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: String,
    pub statement: String,
    /// Zero entries: all text; one: applies to all; else one per parameter (0 text, 1 binary).
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<Bytes>>,
    pub result_formats: Vec<i16>,
}

impl Bind {
    pub fn decode(frame: &Frame) -> Result<Self, DecodeError> {
        let body = frame.raw().slice(5..);
        let mut c = Cursor::new("Bind", &body);
        let portal = c.cstr()?.to_owned();
        let statement = c.cstr()?.to_owned();
        let n = c.count16(2)?;
        let param_formats = (0..n).map(|_| c.i16()).collect::<Result<Vec<_>, _>>()?;
        let n = c.count16(4)?;
        let mut params = Vec::with_capacity(n);
        for _ in 0..n {
            let len = c.i32()?;
            if len == -1 {
                params.push(None);
            } else if len < 0 {
                return Err(c.err("negative parameter length"));
            } else {
                let start = body.len() - c.rest.len();
                c.take(len as usize)?;
                params.push(Some(body.slice(start..start + len as usize)));
            }
        }
        let n = c.count16(2)?;
        let result_formats = (0..n).map(|_| c.i16()).collect::<Result<Vec<_>, _>>()?;
        c.finish()?;
        if param_formats.len() > 1 && param_formats.len() != params.len() {
            return Err(DecodeError { what: "Bind", why: "format count does not match parameter count" });
        }
        Ok(Self { portal, statement, param_formats, params, result_formats })
    }

    /// The format code (0 text, 1 binary) of parameter `i`.
    pub fn param_format(&self, i: usize) -> i16 {
        match self.param_formats.len() {
            0 => 0,
            1 => self.param_formats[0],
            _ => self.param_formats.get(i).copied().unwrap_or(0),
        }
    }
}

/// `E`: run a portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execute {
    pub portal: String,
    pub max_rows: i32,
}

impl Execute {
    pub fn decode(frame: &Frame) -> Result<Self, DecodeError> {
        let mut c = Cursor::new("Execute", frame.body());
        let portal = c.cstr()?.to_owned();
        let max_rows = c.i32()?;
        c.finish()?;
        Ok(Self { portal, max_rows })
    }
}

/// `D` (Describe) and `C` (Close): a kind (`S` statement or `P` portal) and a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: u8,
    pub name: String,
}

impl Target {
    pub fn decode(what: &'static str, frame: &Frame) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(what, frame.body());
        let kind = c.u8()?;
        if kind != b'S' && kind != b'P' {
            return Err(c.err("target is neither 'S' nor 'P'"));
        }
        let name = c.cstr()?.to_owned();
        c.finish()?;
        Ok(Self { kind, name })
    }
}

/// `p` as `SASLInitialResponse`: the mechanism and the client-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslInitialResponse {
    pub mechanism: String,
    pub data: Vec<u8>,
}

impl SaslInitialResponse {
    pub fn decode(frame: &Frame) -> Result<Self, DecodeError> {
        let mut c = Cursor::new("SASLInitialResponse", frame.body());
        let mechanism = c.cstr()?.to_owned();
        let len = c.i32()?;
        if len < 0 {
            return Err(c.err("no initial response"));
        }
        let data = c.take(len as usize)?.to_vec();
        c.finish()?;
        Ok(Self { mechanism, data })
    }
}

/// Any message whose body is a single string (`PasswordMessage`, `CopyFail`).
pub fn decode_single_cstr(what: &'static str, frame: &Frame) -> Result<String, DecodeError> {
    let mut c = Cursor::new(what, frame.body());
    let s = c.cstr()?.to_owned();
    c.finish()?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Backend messages

/// `R`: an authentication request from the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    Cleartext,
    Md5 { salt: [u8; 4] },
    Sasl { mechanisms: Vec<String> },
    SaslContinue(Vec<u8>),
    SaslFinal(Vec<u8>),
    Other(i32),
}

impl AuthRequest {
    pub fn decode(frame: &Frame) -> Result<Self, DecodeError> {
        let mut c = Cursor::new("Authentication", frame.body());
        let code = c.i32()?;
        let req = match code {
            0 => AuthRequest::Ok,
            3 => AuthRequest::Cleartext,
            5 => {
                let s = c.take(4)?;
                AuthRequest::Md5 { salt: [s[0], s[1], s[2], s[3]] }
            }
            10 => {
                let mut mechanisms = Vec::new();
                loop {
                    let m = c.cstr()?;
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m.to_owned());
                }
                AuthRequest::Sasl { mechanisms }
            }
            11 => AuthRequest::SaslContinue(c.remaining().to_vec()),
            12 => AuthRequest::SaslFinal(c.remaining().to_vec()),
            other => {
                c.remaining();
                AuthRequest::Other(other)
            }
        };
        c.finish()?;
        Ok(req)
    }
}

/// `S`: a run-time parameter's current value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterStatus {
    pub name: String,
    pub value: String,
}

impl ParameterStatus {
    pub fn decode(frame: &Frame) -> Result<Self, DecodeError> {
        let mut c = Cursor::new("ParameterStatus", frame.body());
        let name = c.cstr()?.to_owned();
        let value = c.cstr()?.to_owned();
        c.finish()?;
        Ok(Self { name, value })
    }

    pub fn encode(&self) -> Frame {
        encode_pgwire(&pgwire::messages::startup::ParameterStatus::new(self.name.clone(), self.value.clone()))
    }
}

/// `K`: the key a client uses to cancel its running query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendKeyData {
    pub pid: i32,
    pub secret: Bytes,
}

impl BackendKeyData {
    pub fn decode(frame: &Frame) -> Result<Self, DecodeError> {
        let mut c = Cursor::new("BackendKeyData", frame.body());
        let pid = c.i32()?;
        let secret = Bytes::copy_from_slice(c.remaining());
        if !(4..=256).contains(&secret.len()) {
            return Err(DecodeError { what: "BackendKeyData", why: "key length out of range" });
        }
        Ok(Self { pid, secret })
    }

    pub fn encode(&self) -> Frame {
        encode_with(b'K', |b| {
            b.extend_from_slice(&self.pid.to_be_bytes());
            b.extend_from_slice(&self.secret);
        })
    }
}

/// Transaction status reported by `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn decode(frame: &Frame) -> Result<Self, DecodeError> {
        let mut c = Cursor::new("ReadyForQuery", frame.body());
        let status = match c.u8()? {
            b'I' => TxStatus::Idle,
            b'T' => TxStatus::InTransaction,
            b'E' => TxStatus::Failed,
            _ => return Err(c.err("unknown transaction status")),
        };
        c.finish()?;
        Ok(status)
    }

    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }

    pub fn encode_ready(self) -> Frame {
        encode_with(b'Z', |b| b.extend_from_slice(&[self.byte()]))
    }
}

/// `E` / `N`: the fields of an error or notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    pub fn decode(frame: &Frame) -> Result<Self, DecodeError> {
        let mut c = Cursor::new("ErrorResponse", frame.body());
        let mut fields = Vec::new();
        loop {
            let code = c.u8()?;
            if code == 0 {
                break;
            }
            fields.push((code, c.cstr()?.to_owned()));
        }
        c.finish()?;
        Ok(Self { fields })
    }

    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields.iter().find(|(c, _)| *c == code).map(|(_, v)| v.as_str())
    }

    /// The SQLSTATE (`C` field).
    pub fn code(&self) -> Option<&str> {
        self.get(b'C')
    }

    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }
}

/// `C`: the command tag of a finished statement (`SELECT 5`, `INSERT 0 1`…).
pub fn decode_command_tag(frame: &Frame) -> Result<String, DecodeError> {
    decode_single_cstr("CommandComplete", frame)
}

// ---------------------------------------------------------------------------------------------
// Encoding helpers

/// Encodes a pgwire message into a [`Frame`].
pub fn encode_pgwire<M: Message>(msg: &M) -> Frame {
    let mut buf = BytesMut::with_capacity(msg.message_length() + 1);
    // pgwire only fails for messages over its size limits; everything pglease builds is small.
    msg.encode(&mut buf).expect("message within pgwire's size limit");
    Frame::from_encoded(buf.freeze())
}

fn encode_with(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Frame {
    let mut buf = BytesMut::with_capacity(64);
    buf.extend_from_slice(&[tag, 0, 0, 0, 0]);
    body(&mut buf);
    let len = (buf.len() - 1) as i32;
    buf[1..5].copy_from_slice(&len.to_be_bytes());
    Frame::from_encoded(buf.freeze())
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.extend_from_slice(s.as_bytes());
    buf.extend_from_slice(&[0]);
}

/// `S` (Sync), for the upstream after a refused extended-protocol message.
pub fn sync() -> Frame {
    encode_with(b'S', |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        Frame::from_encoded(Bytes::from(v))
    }

    #[test]
    fn bind_round_trip_and_bounds() {
        let mut body = b"portal\0stmt\0".to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        let b = Bind::decode(&frame(b'B', &body)).unwrap();
        assert_eq!(b.portal, "portal");
        assert_eq!(b.params, vec![Some(Bytes::from_static(b"abc")), None]);
        assert_eq!(b.param_format(1), 1);

        // Every truncation of a valid message is an error, never a panic.
        for cut in 0..body.len() {
            assert!(Bind::decode(&frame(b'B', &body[..cut])).is_err(), "cut at {cut}");
        }
        let mut lying = b"\0\0".to_vec();
        lying.extend_from_slice(&0i16.to_be_bytes());
        lying.extend_from_slice(&i16::MAX.to_be_bytes());
        assert!(Bind::decode(&frame(b'B', &lying)).is_err());
    }

    #[test]
    fn query_rejects_invalid_utf8_and_trailing_bytes() {
        assert_eq!(Query::decode(&frame(b'Q', b"select 1\0")).unwrap().sql, "select 1");
        assert!(Query::decode(&frame(b'Q', b"select \xff\0")).is_err());
        assert!(Query::decode(&frame(b'Q', b"select 1\0drop table x\0")).is_err());
        assert!(Query::decode(&frame(b'Q', b"select 1")).is_err());
    }

    #[test]
    fn parse_and_errors_decode() {
        let mut body = b"s1\0select $1\0".to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&23i32.to_be_bytes());
        let p = Parse::decode(&frame(b'P', &body)).unwrap();
        assert_eq!(p.param_types, vec![23]);
        assert_eq!(Parse::decode(&p.encode()).unwrap(), p);

        let e = ErrorFields::decode(&frame(b'E', b"SERROR\0C42501\0Mnope\0\0")).unwrap();
        assert_eq!(e.code(), Some("42501"));
        assert_eq!(e.message(), Some("nope"));
        assert!(ErrorFields::decode(&frame(b'E', b"SERROR\0C4250")).is_err());
    }

    #[test]
    fn ready_for_query_round_trip() {
        for s in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            assert_eq!(TxStatus::decode(&s.encode_ready()).unwrap(), s);
        }
    }
}
