//! Message framing: `tag: u8, length: i32 (including itself), body`.
//!
//! Following mini-redis's `Frame::check`, a frame is only split off the buffer once all of it has
//! arrived, and its length is checked against a limit before any room is reserved for it.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes requested from the socket per read when nothing bigger is pending.
const READ_CHUNK: usize = 16 << 10;
/// Room for the first read after a message boundary (see [`read_idle`]).
const IDLE_READ_CHUNK: usize = 16 << 10;
/// Chunk size when a large message body is streamed through.
const STREAM_CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("invalid length {len} in message of type {tag:?}")]
    BadLength { tag: char, len: i64 },
    #[error("message of type {tag:?} is {len} bytes, over the limit of {limit}")]
    TooLarge { tag: char, len: usize, limit: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One whole message, kept as the bytes that arrived so it can be forwarded untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    /// Wraps an already-encoded message (`tag`, length, body).
    ///
    /// NOTE: trusts the caller; only for messages pglease encoded itself.
    pub fn from_encoded(raw: Bytes) -> Self {
        debug_assert!(raw.len() >= 5);
        Self { raw }
    }

    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The message without its tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    /// The message as it arrived, tag and length included.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

thread_local! {
    /// Where an idle reader's next read lands: one per thread, borrowed only within a poll.
    static IDLE_READ: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; IDLE_READ_CHUNK].into_boxed_slice());
}

/// Reads into an empty `buf` without holding a buffer while nothing comes: the bytes land in the
/// thread's scratch space and only what arrived is copied into `buf`. An idle session (most of
/// them, most of the time) then holds no read buffer at all, at the price of copying what its
/// first read brought (proxy CPU per transaction in the benchmark did not rise).
///
/// Cancel-safe: a read that returns `Pending` has taken nothing off the stream.
async fn read_idle<R: AsyncRead + Unpin>(inner: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        IDLE_READ.with_borrow_mut(|scratch| {
            let mut read = tokio::io::ReadBuf::new(scratch);
            std::task::ready!(std::pin::Pin::new(&mut *inner).poll_read(cx, &mut read))?;
            buf.extend_from_slice(read.filled());
            std::task::Poll::Ready(Ok(read.filled().len()))
        })
    })
    .await
}

/// What [`FramedReader::next`] found.
#[derive(Debug)]
pub enum ReadEvent {
    /// A whole message.
    Frame(Frame),
    /// The header of a message too big to buffer whose type may be streamed; the caller must
    /// pass its `body_len` bytes on with [`FramedReader::stream_body`] before reading again.
    Large { tag: u8, body_len: usize },
}

/// Limits that bound how much one peer can make the proxy buffer.
#[derive(Debug, Clone)]
pub struct FrameLimits {
    /// Largest message buffered whole.
    pub max_frame: usize,
    /// Message types that may exceed `max_frame` and are then streamed (row and COPY data).
    pub streamable: &'static [u8],
    /// Streamable messages at least this big are streamed rather than buffered.
    pub stream_threshold: usize,
}

/// Reads framed messages from one side of the connection.
pub struct FramedReader<R> {
    inner: R,
    buf: BytesMut,
    limits: FrameLimits,
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    pub fn new(inner: R, limits: FrameLimits) -> Self {
        Self { inner, buf: BytesMut::new(), limits }
    }

    /// Starts from bytes already read off the socket (e.g. during the handshake).
    pub fn with_buffer(inner: R, limits: FrameLimits, buf: BytesMut) -> Self {
        Self { inner, buf, limits }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }

    /// True when a whole message (or a large message's header) is already buffered, so the
    /// next [`next`](Self::next) will not wait for the network.
    pub fn has_buffered_event(&self) -> bool {
        matches!(self.check(), Ok(Some(_)) | Err(_))
    }

    /// Looks at the buffer: `Ok(None)` if more bytes are needed.
    fn check(&self) -> Result<Option<Header>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(FrameError::BadLength { tag: tag as char, len: len.into() });
        }
        let total = len as usize + 1;
        if total > self.limits.max_frame {
            if self.limits.streamable.contains(&tag) {
                return Ok(Some(Header { tag, total, stream: true }));
            }
            return Err(FrameError::TooLarge { tag: tag as char, len: total, limit: self.limits.max_frame });
        }
        if total >= self.limits.stream_threshold && self.limits.streamable.contains(&tag) {
            return Ok(Some(Header { tag, total, stream: true }));
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        Ok(Some(Header { tag, total, stream: false }))
    }

    /// Bytes still missing before the frame at the head of the buffer is complete.
    fn wanted(&self) -> usize {
        if self.buf.len() < 5 {
            return READ_CHUNK;
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]).max(4) as usize;
        (len + 1).saturating_sub(self.buf.len()).clamp(READ_CHUNK, STREAM_CHUNK * 16)
    }

    /// The next message. `Ok(None)` on a clean end of stream between messages.
    ///
    /// Cancel-safe: bytes read stay in the buffer, so it can be a `tokio::select!` branch.
    pub async fn next(&mut self) -> Result<Option<ReadEvent>, FrameError> {
        loop {
            if let Some(header) = self.check()? {
                if header.stream {
                    self.buf.advance(5);
                    return Ok(Some(ReadEvent::Large { tag: header.tag, body_len: header.total - 5 }));
                }
                let raw = self.buf.split_to(header.total).freeze();
                if self.buf.is_empty() {
                    // Give the read buffer back with the frame: an idle session holds none,
                    // and the next read starts small.
                    self.buf = BytesMut::new();
                }
                return Ok(Some(ReadEvent::Frame(Frame { raw })));
            }
            let n = if self.buf.is_empty() {
                read_idle(&mut self.inner, &mut self.buf).await?
            } else {
                self.buf.reserve(self.wanted());
                self.inner.read_buf(&mut self.buf).await?
            };
            if n == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(FrameError::Truncated) };
            }
        }
    }

    /// Passes a large message's body from this reader to `out` in bounded chunks.
    ///
    /// NOTE: not cancel-safe; a dropped call leaves the stream mid-message, so the caller must
    /// end the session if it abandons this future.
    pub async fn stream_body<W: AsyncWrite + Unpin>(&mut self, mut body_len: usize, out: &mut W) -> Result<(), FrameError> {
        while body_len > 0 {
            if self.buf.is_empty() {
                self.buf.reserve(STREAM_CHUNK);
                if self.inner.read_buf(&mut self.buf).await? == 0 {
                    return Err(FrameError::Truncated);
                }
            }
            let n = body_len.min(self.buf.len());
            let chunk = self.buf.split_to(n);
            out.write_all(&chunk).await?;
            body_len -= n;
        }
        Ok(())
    }
}

struct Header {
    tag: u8,
    total: usize,
    stream: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FrameLimits {
        FrameLimits { max_frame: 1024, streamable: b"D", stream_threshold: 512 }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn frames_split_across_reads_are_reassembled() {
        let mut bytes = msg(b'Q', b"select 1\0");
        bytes.extend(msg(b'S', b""));
        let (client, mut server) = tokio::io::duplex(3);
        let writer = tokio::spawn(async move { server.write_all(&bytes).await.unwrap() });
        let mut r = FramedReader::new(client, limits());
        let Some(ReadEvent::Frame(f)) = r.next().await.unwrap() else { panic!() };
        assert_eq!(f.tag(), b'Q');
        assert_eq!(f.body(), b"select 1\0");
        let Some(ReadEvent::Frame(f)) = r.next().await.unwrap() else { panic!() };
        assert_eq!(f.tag(), b'S');
        writer.await.unwrap();
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer_and_loses_nothing_when_its_read_is_dropped() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut r = FramedReader::new(client, limits());
        // Nothing to read: the pending read is given up (a `select!` that took another branch).
        assert!(tokio::time::timeout(std::time::Duration::from_millis(20), r.next()).await.is_err());
        assert_eq!(r.buf.capacity(), 0, "an idle reader holds a read buffer");
        // Two messages in one read, then one split across reads, none lost.
        let mut bytes = msg(b'Q', b"select 1\0");
        bytes.extend(msg(b'S', b""));
        server.write_all(&bytes).await.unwrap();
        let Some(ReadEvent::Frame(f)) = r.next().await.unwrap() else { panic!() };
        assert_eq!((f.tag(), f.body()), (b'Q', &b"select 1\0"[..]));
        let Some(ReadEvent::Frame(f)) = r.next().await.unwrap() else { panic!() };
        assert_eq!(f.tag(), b'S');
        assert_eq!(r.buf.capacity(), 0, "the buffer is given back once it is drained");
        let long = msg(b'Q', &[b'x'; 300]);
        server.write_all(&long[..40]).await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            server.write_all(&long[40..]).await.unwrap();
        });
        let Some(ReadEvent::Frame(f)) = r.next().await.unwrap() else { panic!() };
        assert_eq!(f.body(), &[b'x'; 300][..]);
        writer.await.unwrap();
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn bad_lengths_are_refused_before_buffering() {
        for len in [0i32, 3, -1] {
            let mut bytes = vec![b'Q'];
            bytes.extend_from_slice(&len.to_be_bytes());
            let mut r = FramedReader::new(&bytes[..], limits());
            assert!(matches!(r.next().await, Err(FrameError::BadLength { .. })), "len {len}");
        }
        let mut bytes = vec![b'Q'];
        bytes.extend_from_slice(&(i32::MAX).to_be_bytes());
        let mut r = FramedReader::new(&bytes[..], limits());
        assert!(matches!(r.next().await, Err(FrameError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn truncated_message_is_an_error_not_a_hang() {
        let bytes = &msg(b'Q', b"select 1\0")[..8];
        let mut r = FramedReader::new(bytes, limits());
        assert!(matches!(r.next().await, Err(FrameError::Truncated)));
    }

    #[tokio::test]
    async fn large_streamable_messages_are_streamed() {
        let body = vec![7u8; 5000];
        let mut bytes = msg(b'D', &body);
        bytes.extend(msg(b'C', b"SELECT 1\0"));
        let mut r = FramedReader::new(&bytes[..], limits());
        let Some(ReadEvent::Large { tag, body_len }) = r.next().await.unwrap() else { panic!() };
        assert_eq!((tag, body_len), (b'D', 5000));
        let mut out = Vec::new();
        r.stream_body(body_len, &mut out).await.unwrap();
        assert_eq!(out, body);
        let Some(ReadEvent::Frame(f)) = r.next().await.unwrap() else { panic!() };
        assert_eq!(f.tag(), b'C');
    }

    /// Reads `data` in the pieces `cuts` makes of it (one `read` per piece).
    struct Pieces {
        data: Vec<u8>,
        cuts: Vec<usize>,
        at: usize,
    }

    impl AsyncRead for Pieces {
        fn poll_read(mut self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
            let end = self.cuts.iter().copied().find(|&c| c > self.at).unwrap_or(self.data.len());
            let n = (end - self.at).min(buf.remaining());
            buf.put_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Everything the reader yields for a byte stream: frames (tag, body) and streamed bodies.
    async fn decode_all(r: &mut FramedReader<Pieces>) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(event) = r.next().await.unwrap() {
            match event {
                ReadEvent::Frame(f) => out.push((f.tag(), f.body().to_vec())),
                ReadEvent::Large { tag, body_len } => {
                    let mut body = Vec::new();
                    r.stream_body(body_len, &mut body).await.unwrap();
                    out.push((tag, body));
                }
            }
        }
        out
    }

    /// Property: a stream split at any one byte boundary, or into single bytes, decodes to the
    /// same messages as the whole stream.
    #[tokio::test]
    async fn messages_split_at_every_byte_boundary_decode_the_same() {
        let mut data = msg(b'Q', b"select 1\0");
        data.extend(msg(b'S', b""));
        data.extend(msg(b'D', &[9u8; 1500])); // streamed (over the 1 KiB threshold of limits())
        data.extend(msg(b'd', &[1, 2, 3]));
        data.extend(msg(b'C', b"SELECT 1\0"));
        let whole = decode_all(&mut FramedReader::new(Pieces { data: data.clone(), cuts: vec![], at: 0 }, limits())).await;
        assert_eq!(whole.len(), 5);
        assert_eq!(whole[2], (b'D', vec![9u8; 1500]));
        for cut in 1..data.len() {
            let got = decode_all(&mut FramedReader::new(Pieces { data: data.clone(), cuts: vec![cut], at: 0 }, limits())).await;
            assert_eq!(got, whole, "split at {cut}");
        }
        let bytes = decode_all(&mut FramedReader::new(Pieces { data: data.clone(), cuts: (1..data.len()).collect(), at: 0 }, limits())).await;
        assert_eq!(bytes, whole, "one byte per read");
    }
}
