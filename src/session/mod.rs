//! A client session after login: the relay between the client and its upstream backend.
//!
//! Two pumps run concurrently inside one task, one per direction, so that a client sending a
//! long pipeline while Postgres answers it cannot deadlock the proxy. They share a small
//! [`RelayState`] (behind a mutex that is never held across an `.await`) that tracks the
//! protocol's sync points: each simple `Query`, each `Sync` and each refused `FunctionCall`
//! gets exactly one `ReadyForQuery` back, in order.
//!
//! Refusals are turned into real Postgres errors: instead of the refused message the proxy
//! sends the upstream a sentinel statement that fails at once, then swaps that failure for
//! its own error on the way back. Postgres itself therefore skips the rest of the batch until
//! `Sync` and leaves an open transaction failed, exactly as for any other error.

pub mod hooks;
pub mod registry;
pub mod stall;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BufMut;
use rand::RngCore;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

use crate::codec::messages::{self, Bind, BackendKeyData, ErrorFields, Execute, ParameterStatus, Parse, Query, Target, TxStatus};
use crate::codec::{Frame, FrameError, FramedReader, ReadEvent};
use crate::error::{ClientError, sqlstate};
use crate::stream::Stream;
use crate::upstream::Upstream;
pub use hooks::{BackendAction, BackendEvent, PassThrough, SessionContext, SessionHooks, Verdict};
pub use registry::{SessionHandle, SessionRegistry, SessionView};

/// Size of the write buffers in each direction. Together with the read buffers (bounded by
/// the frame limits) this bounds a session's memory whatever the peers do.
const WRITE_BUFFER: usize = 64 << 10;

/// How the session ended, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent `Terminate` or closed its socket.
    ClientClosed,
    /// The upstream closed its side (its own `FATAL`, if any, was passed on).
    UpstreamClosed,
    /// The client broke the protocol; it was sent this `FATAL`.
    ClientProtocol(ClientError),
    /// The upstream sent something the proxy does not relay.
    UpstreamProtocol(String),
    /// Ended by the proxy (shutdown, kill, idle timeout, grant end) with this `FATAL`.
    Ended(ClientError),
    /// The client stopped reading what it was sent; its statement was cancelled.
    ClientStalled(Duration),
    Io(String),
}

/// Per-session settings from the config.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub idle_timeout: Option<Duration>,
    /// End the session when the client accepts no bytes for this long.
    pub client_stall_timeout: Option<Duration>,
    /// Warn the client this long before its grant ends.
    pub warn_before: Vec<Duration>,
}

/// A unique marker that identifies the error of a sentinel statement.
struct Refusal {
    marker: String,
    error: ClientError,
}

/// Messages sent upstream that end with one `ReadyForQuery`.
struct SyncGroup {
    started: Instant,
    refusal: Option<Refusal>,
}

impl SyncGroup {
    fn new() -> Self {
        Self { started: Instant::now(), refusal: None }
    }
}

/// What both pumps need to know.
struct RelayState {
    /// Groups sent upstream whose `ReadyForQuery` has not come back yet, oldest first.
    pending: VecDeque<SyncGroup>,
    /// Extended-protocol messages sent since the last `Sync`.
    open: Option<SyncGroup>,
    tx: TxStatus,
    last_client_message: Instant,
    /// Set on shutdown: end the session as soon as nothing is in flight.
    draining: bool,
}

impl RelayState {
    fn idle(&self) -> bool {
        self.pending.is_empty() && self.open.is_none()
    }
}

type Shared = Arc<Mutex<RelayState>>;

/// The metrics a session updates on every statement, looked up in the registry once per session
/// rather than on each use.
struct Meters {
    messages_to_upstream: metrics::Counter,
    messages_to_client: metrics::Counter,
    query_duration: metrics::Histogram,
}

impl Meters {
    fn new() -> Self {
        Self {
            messages_to_upstream: metrics::counter!("pglease_messages_total", "direction" => "client_to_upstream"),
            messages_to_client: metrics::counter!("pglease_messages_total", "direction" => "upstream_to_client"),
            query_duration: metrics::histogram!("pglease_query_duration_seconds"),
        }
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, RelayState> {
    // A poisoned lock means a pump panicked; the state is still consistent enough to end on.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// A buffered writer that knows whether it stopped in the middle of a message: if a pump is
/// dropped mid-write, nothing more may be written to that stream. Messages are gathered and
/// sent with one write per flush; between flushes of an idle session the buffer is given back,
/// so idle sessions hold no write buffers.
struct Out {
    w: stall::StallLimit<WriteHalf<Stream>>,
    buf: Vec<u8>,
    mid_message: bool,
    bytes: u64,
}

/// How long a closing session waits for its last message to be taken.
const LAST_WORDS_TIMEOUT: Duration = Duration::from_secs(2);

/// Buffers up to this size are kept across flushes; larger ones are freed.
const KEEP_WRITE_BUFFER: usize = 1024;

impl Out {
    /// `stall_limit`: give up when the peer accepts nothing for this long.
    fn new(w: WriteHalf<Stream>, stall_limit: Option<Duration>) -> Self {
        Self { w: stall::StallLimit::new(w, stall_limit), buf: Vec::new(), mid_message: false, bytes: 0 }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.mid_message = true;
        if self.buf.len() + bytes.len() > WRITE_BUFFER {
            self.write_buffered().await?;
        }
        if bytes.len() >= WRITE_BUFFER {
            self.w.write_all(bytes).await?;
        } else {
            self.buf.extend_from_slice(bytes);
        }
        self.bytes += bytes.len() as u64;
        self.mid_message = false;
        Ok(())
    }

    /// Writes out the buffer. Cancel-safe: what was written is gone from the buffer.
    async fn write_buffered(&mut self) -> std::io::Result<()> {
        while !self.buf.is_empty() {
            let n = self.w.write(&self.buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.buf.drain(..n);
        }
        if self.buf.capacity() > KEEP_WRITE_BUFFER {
            self.buf = Vec::new();
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.write_buffered().await?;
        self.w.flush().await
    }

    /// Best-effort final message (a `FATAL`, a `Terminate`) before closing. Bounded in time: a
    /// peer that does not read must not keep the session from ending.
    async fn last_words(&mut self, bytes: &[u8]) {
        if !self.mid_message {
            self.buf.extend_from_slice(bytes);
        }
        let _ = tokio::time::timeout(LAST_WORDS_TIMEOUT, async {
            let _ = self.flush().await;
            let _ = self.w.shutdown().await;
        })
        .await;
    }
}

/// A live session, built by the server after login.
pub struct Session {
    pub ctx: SessionContext,
    client_r: FramedReader<ReadHalf<Stream>>,
    client_w: Out,
    up_r: FramedReader<ReadHalf<Stream>>,
    up_w: Out,
    upstream: Arc<Upstream>,
    upstream_key: BackendKeyData,
    hooks: Arc<dyn SessionHooks>,
    handle: Arc<SessionHandle>,
    shutdown: CancellationToken,
    options: SessionOptions,
    initial_tx: TxStatus,
    /// Registrations (cancel key, session list) released when the session ends.
    guards: Option<Box<dyn std::any::Any + Send>>,
}

/// The parts a session is made of.
pub struct SessionParts {
    pub ctx: SessionContext,
    pub client: FramedReader<Stream>,
    pub client_limits_max_frame: usize,
    pub upstream_stream: Stream,
    pub upstream_leftover: bytes::BytesMut,
    pub upstream_max_frame: usize,
    pub upstream: Arc<Upstream>,
    pub upstream_key: BackendKeyData,
    pub tx: TxStatus,
    pub hooks: Arc<dyn SessionHooks>,
    pub handle: Arc<SessionHandle>,
    pub shutdown: CancellationToken,
    pub options: SessionOptions,
}

/// Frame limits for client messages: COPY data may be of any size and is streamed.
pub fn client_limits(max_frame: usize) -> crate::codec::frame::FrameLimits {
    crate::codec::frame::FrameLimits { max_frame, streamable: b"d", stream_threshold: 1 << 20 }
}

impl Session {
    pub fn new(p: SessionParts) -> Self {
        let (client_stream, client_buf) = p.client.into_parts();
        let (cr, cw) = tokio::io::split(client_stream);
        let (ur, uw) = tokio::io::split(p.upstream_stream);
        Self {
            ctx: p.ctx,
            client_r: FramedReader::with_buffer(cr, client_limits(p.client_limits_max_frame), client_buf),
            client_w: Out::new(cw, p.options.client_stall_timeout),
            up_r: FramedReader::with_buffer(ur, crate::upstream::upstream_limits(p.upstream_max_frame), p.upstream_leftover),
            // Postgres may take its time to read (a large COPY IN): no limit upstream.
            up_w: Out::new(uw, None),
            upstream: p.upstream,
            upstream_key: p.upstream_key,
            hooks: p.hooks,
            handle: p.handle,
            shutdown: p.shutdown,
            options: p.options,
            initial_tx: p.tx,
            guards: None,
        }
    }

    pub fn handle(&self) -> Arc<SessionHandle> {
        self.handle.clone()
    }

    /// Keeps `guards` alive until the session ends.
    pub fn with_guards(mut self, guards: Box<dyn std::any::Any + Send>) -> Self {
        self.guards = Some(guards);
        self
    }

    /// Relays until one side ends or the proxy ends the session.
    pub async fn run(self) -> SessionEnd {
        let Session { ctx, mut client_r, mut client_w, mut up_r, mut up_w, upstream, upstream_key, hooks, handle, shutdown, options, initial_tx, guards: _guards } = self;
        let shared: Shared = Arc::new(Mutex::new(RelayState {
            pending: VecDeque::new(),
            open: None,
            tx: initial_tx,
            last_client_message: Instant::now(),
            draining: false,
        }));

        // The grant's end, and the warnings before it, on this session's own timers.
        let to_instant = |t: std::time::SystemTime| tokio::time::Instant::now() + t.duration_since(std::time::SystemTime::now()).unwrap_or_default();
        let deadline = ctx.identity.expires_at.map(to_instant);
        let mut warnings: Vec<(tokio::time::Instant, Duration)> = match (ctx.identity.expires_at, deadline) {
            (Some(end), Some(_)) => {
                let mut w: Vec<_> = options
                    .warn_before
                    .iter()
                    .filter_map(|before| end.checked_sub(*before).filter(|t| *t > std::time::SystemTime::now()).map(|t| (to_instant(t), *before)))
                    .collect();
                w.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
                w
            }
            _ => Vec::new(),
        };
        let (notice_tx, mut notice_rx) = tokio::sync::mpsc::channel::<Frame>(NOTICES_QUEUED);
        let meters = Meters::new();

        let outcome = {
            let up = client_to_upstream(&mut client_r, &mut up_w, &shared, hooks.as_ref(), &ctx, &handle, &meters, &notice_tx);
            let down = upstream_to_client(&mut up_r, &mut client_w, &shared, hooks.as_ref(), &ctx, &mut notice_rx, &meters);
            tokio::pin!(up);
            tokio::pin!(down);
            let mut idle_check = tokio::time::interval(Duration::from_millis(500));
            let mut draining = false;
            let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
            loop {
                let next_warning = warnings.last().map(|(at, _)| *at);
                tokio::select! {
                    r = &mut up => break r,
                    r = &mut down => break r,
                    _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                        break Outcome::End(grant_ended(&ctx));
                    }
                    _ = tokio::time::sleep_until(next_warning.unwrap_or(far)), if next_warning.is_some() => {
                        if let Some((_, before)) = warnings.pop() {
                            let _ = notice_tx.try_send(grant_warning(&ctx, before));
                        }
                    }
                    reason = handle.killed() => break Outcome::End(reason),
                    _ = shutdown.cancelled(), if !draining => {
                        draining = true;
                        let mut st = lock(&shared);
                        st.draining = true;
                        if st.idle() {
                            break Outcome::End(shutdown_error());
                        }
                    }
                    _ = idle_check.tick(), if options.idle_timeout.is_some() => {
                        let st = lock(&shared);
                        if let Some(limit) = options.idle_timeout && st.idle() && st.last_client_message.elapsed() >= limit {
                            break Outcome::End(ClientError::fatal(sqlstate::IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout"));
                        }
                    }
                }
            }
        };

        metrics::counter!("pglease_bytes_total", "direction" => "client_to_upstream").increment(up_w.bytes);
        metrics::counter!("pglease_bytes_total", "direction" => "upstream_to_client").increment(client_w.bytes);

        let terminate = [b'X', 0, 0, 0, 4];
        // A statement may be running: cancel it so that it does not run on for nobody, and the
        // backend is free to see our Terminate (an open transaction rolls back as it exits).
        let cancel_running = || async {
            if !lock(&shared).idle()
                && let Err(e) = tokio::time::timeout(Duration::from_secs(2), upstream.cancel(&upstream_key)).await.unwrap_or(Ok(()))
            {
                tracing::warn!(error = %e, "cancel of the running statement failed");
            }
        };
        match outcome {
            Outcome::ClientClosed => {
                cancel_running().await;
                up_w.last_words(&terminate).await;
                SessionEnd::ClientClosed
            }
            Outcome::UpstreamClosed => {
                let err = ClientError::fatal(sqlstate::CONNECTION_FAILURE, "the upstream database closed the connection");
                client_w.last_words(&encode_error(&err)).await;
                SessionEnd::UpstreamClosed
            }
            Outcome::ClientProtocol(err) => {
                client_w.last_words(&encode_error(&err)).await;
                cancel_running().await;
                up_w.last_words(&terminate).await;
                SessionEnd::ClientProtocol(err)
            }
            Outcome::UpstreamProtocol(why) => {
                let err = ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "pglease ended the session: the upstream sent a message it does not relay");
                client_w.last_words(&encode_error(&err)).await;
                up_w.last_words(&terminate).await;
                SessionEnd::UpstreamProtocol(why)
            }
            Outcome::End(err) => {
                cancel_running().await;
                up_w.last_words(&terminate).await;
                client_w.last_words(&encode_error(&err)).await;
                SessionEnd::Ended(err)
            }
            Outcome::ClientStalled(limit) => {
                tracing::warn!(limit = ?limit, "the client stopped reading; session ended");
                cancel_running().await;
                up_w.last_words(&terminate).await;
                client_w.last_words(&[]).await;
                SessionEnd::ClientStalled(limit)
            }
            Outcome::Io(e) => {
                cancel_running().await;
                up_w.last_words(&terminate).await;
                client_w.last_words(&[]).await;
                SessionEnd::Io(e)
            }
        }
    }
}

/// The `FATAL` a session gets when its grant's window closes.
fn grant_ended(ctx: &SessionContext) -> ClientError {
    let at = ctx.identity.expires_at.map(crate::time::rfc3339).unwrap_or_default();
    let message = match (&ctx.identity.grant_id, &ctx.identity.scope) {
        (Some(g), Some(s)) => format!("pglease: grant {g} for scope \"{s}\" expired at {at}"),
        _ => format!("pglease: access expired at {at}"),
    };
    ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, message)
}

/// A `WARNING` notice ahead of the grant's end.
/// pglease's own notices waiting for the client (grant warnings, what a rewrite left out).
const NOTICES_QUEUED: usize = 64;

fn grant_warning(ctx: &SessionContext, before: Duration) -> Frame {
    let at = ctx.identity.expires_at.map(crate::time::rfc3339).unwrap_or_default();
    let what = match (&ctx.identity.grant_id, &ctx.identity.scope) {
        (Some(g), Some(s)) => format!("grant {g} for scope \"{s}\""),
        _ => "access".to_owned(),
    };
    let text = format!("pglease: {what} ends in {} (at {at}); this session will then be closed", crate::time::human_duration(before));
    messages::encode_pgwire(&crate::error::notice("WARNING", "01000", &text))
}

pub fn shutdown_error() -> ClientError {
    ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection: pglease is shutting down")
}

fn encode_error(err: &ClientError) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    err.encode(&mut buf);
    buf.to_vec()
}

enum Outcome {
    ClientClosed,
    UpstreamClosed,
    ClientProtocol(ClientError),
    UpstreamProtocol(String),
    End(ClientError),
    ClientStalled(Duration),
    Io(String),
}

/// An error writing to the client: a stall, or the client is gone.
fn client_write_error(e: std::io::Error) -> Outcome {
    match stall::ClientStalled::of(&e) {
        Some(stalled) => Outcome::ClientStalled(stalled.0),
        None => Outcome::Io(e.to_string()),
    }
}

fn violation(message: impl Into<String>) -> Outcome {
    Outcome::ClientProtocol(ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, message))
}

fn client_read_error(e: FrameError) -> Outcome {
    match e {
        FrameError::Io(e) => Outcome::Io(e.to_string()),
        FrameError::Truncated => Outcome::ClientClosed,
        FrameError::TooLarge { .. } => Outcome::ClientProtocol(ClientError::fatal(sqlstate::PROGRAM_LIMIT_EXCEEDED, e.to_string())),
        FrameError::BadLength { .. } => violation(e.to_string()),
    }
}

/// A statement that fails at once with an error naming `marker`, in every server locale.
fn sentinel_sql(marker: &str) -> String {
    format!("SELECT {marker}")
}

fn new_marker() -> String {
    let mut raw = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    format!("pglease_refused_{hex}")
}

/// Client → upstream. Returns when the client leaves or breaks the protocol.
async fn client_to_upstream(
    client: &mut FramedReader<ReadHalf<Stream>>,
    up: &mut Out,
    shared: &Shared,
    hooks: &dyn SessionHooks,
    ctx: &SessionContext,
    handle: &SessionHandle,
    meters: &Meters,
    notices: &tokio::sync::mpsc::Sender<Frame>,
) -> Outcome {
    // A rewrite's notice goes to the client ahead of the rewritten statement's results (or
    // right after, as the two directions run apart); one that finds the queue full is dropped.
    let tell = |notice: Option<String>| {
        if let Some(text) = notice {
            let _ = notices.try_send(messages::encode_pgwire(&crate::error::notice("NOTICE", "00000", &text)));
        }
    };
    // After a refused extended-protocol message, Postgres semantics: skip until Sync.
    let mut discarding = false;
    let mut messages: u64 = 0;
    loop {
        let event = match client.next().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return Outcome::ClientClosed,
            Err(e) => return client_read_error(e),
        };
        lock(shared).last_client_message = Instant::now();
        messages += 1;
        let frame = match event {
            ReadEvent::Large { tag, body_len } => {
                // Only CopyData is streamable on this side.
                if let Err(e) = stream_large(client, up, tag, body_len).await {
                    return match e {
                        FrameError::Io(e) => Outcome::Io(e.to_string()),
                        e => client_read_error(e),
                    };
                }
                continue;
            }
            ReadEvent::Frame(f) => f,
        };

        let forward: Option<Frame> = match frame.tag() {
            b'Q' => {
                let query = match Query::decode(&frame) {
                    Ok(q) => q,
                    Err(e) => return violation(e.to_string()),
                };
                handle.count_statement();
                let mut group = SyncGroup::new();
                let out = match hooks.on_query(ctx, &query.sql).await {
                    Verdict::Forward => frame,
                    Verdict::Rewrite { sql, notice } => {
                        tell(notice);
                        Query::encode(&sql)
                    }
                    Verdict::Refuse(error) => {
                        let marker = new_marker();
                        let f = Query::encode(&sentinel_sql(&marker));
                        group.refusal = Some(Refusal { marker, error });
                        f
                    }
                };
                lock(shared).pending.push_back(group);
                Some(out)
            }
            b'P' | b'B' if discarding => None,
            b'P' => {
                let parse = match Parse::decode(&frame) {
                    Ok(p) => p,
                    Err(e) => return violation(e.to_string()),
                };
                handle.count_statement();
                let verdict = match hooks.on_parse(ctx, &parse).await {
                    Verdict::Rewrite { sql, notice } => {
                        tell(notice);
                        Verdict::Rewrite { sql, notice: None }
                    }
                    v => v,
                };
                Some(extended(shared, frame, verdict, &mut discarding, |sql| Parse { sql, ..parse.clone() }.encode()))
            }
            b'B' => {
                let bind = match Bind::decode(&frame) {
                    Ok(b) => b,
                    Err(e) => return violation(e.to_string()),
                };
                let verdict = match hooks.on_bind(ctx, &bind).await {
                    // A Bind has no SQL to rewrite; a hook that tries fails closed.
                    Verdict::Rewrite { .. } => Verdict::Refuse(ClientError::error(sqlstate::INTERNAL_ERROR, "pglease: a Bind cannot be rewritten")),
                    v => v,
                };
                Some(extended(shared, frame, verdict, &mut discarding, |_| unreachable_rewrite()))
            }
            b'E' => {
                let execute = match Execute::decode(&frame) {
                    Ok(e) => e,
                    Err(e) => return violation(e.to_string()),
                };
                if discarding {
                    None
                } else {
                    let verdict = match hooks.on_execute(ctx, &execute).await {
                        Verdict::Rewrite { .. } => Verdict::Refuse(ClientError::error(sqlstate::INTERNAL_ERROR, "pglease: an Execute cannot be rewritten")),
                        v => v,
                    };
                    Some(extended(shared, frame, verdict, &mut discarding, |_| unreachable_rewrite()))
                }
            }
            b'D' | b'C' | b'H' => {
                let valid = match frame.tag() {
                    b'D' => Target::decode("Describe", &frame).map(drop),
                    b'C' => Target::decode("Close", &frame).map(drop),
                    _ => Ok(()),
                };
                if let Err(e) = valid {
                    return violation(e.to_string());
                }
                if discarding {
                    None
                } else {
                    let mut st = lock(shared);
                    if st.open.is_none() {
                        st.open = Some(SyncGroup::new());
                    }
                    Some(frame)
                }
            }
            b'S' => {
                discarding = false;
                {
                    let mut st = lock(shared);
                    let group = st.open.take().unwrap_or_else(SyncGroup::new);
                    st.pending.push_back(group);
                }
                hooks.on_sync(ctx);
                Some(frame)
            }
            b'd' | b'c' => Some(frame),
            b'f' => {
                if let Err(e) = messages::decode_single_cstr("CopyFail", &frame) {
                    return violation(e.to_string());
                }
                Some(frame)
            }
            b'F' => {
                // FunctionCall runs a function by OID with no SQL text to vet: refused, with
                // Postgres's own reply shape (an error, then ReadyForQuery).
                let marker = new_marker();
                let error = ClientError::error(sqlstate::INSUFFICIENT_PRIVILEGE, "pglease: the fast-path function call protocol is not allowed");
                lock(shared).pending.push_back(SyncGroup { started: Instant::now(), refusal: Some(Refusal { marker: marker.clone(), error }) });
                // It ends with one ReadyForQuery, as a Sync does: hooks count those.
                hooks.on_sync(ctx);
                Some(Query::encode(&sentinel_sql(&marker)))
            }
            b'X' => {
                let _ = up.send(frame.raw()).await;
                let _ = up.flush().await;
                return Outcome::ClientClosed;
            }
            b'p' => return violation("unexpected password message after authentication"),
            other => return violation(format!("invalid frontend message type {other}")),
        };

        if let Some(f) = forward
            && let Err(e) = up.send(f.raw()).await
        {
            return Outcome::Io(e.to_string());
        }
        if !client.has_buffered_event() {
            if let Err(e) = up.flush().await {
                return Outcome::Io(e.to_string());
            }
            meters.messages_to_upstream.increment(messages);
            messages = 0;
        }
    }
}

/// Passes a message too large to buffer from `from` to `to` in chunks (row or COPY data).
///
/// NOTE: not cancel-safe: `to` is marked mid-message until the body is through.
async fn stream_large(from: &mut FramedReader<ReadHalf<Stream>>, to: &mut Out, tag: u8, body_len: usize) -> Result<(), FrameError> {
    let mut header = Vec::with_capacity(5);
    header.put_u8(tag);
    header.put_i32((body_len + 4) as i32);
    to.mid_message = true;
    to.write_buffered().await?;
    to.w.write_all(&header).await?;
    from.stream_body(body_len, &mut to.w).await?;
    to.mid_message = false;
    to.bytes += (body_len + 5) as u64;
    Ok(())
}

fn unreachable_rewrite() -> Frame {
    unreachable!("Bind rewrites are turned into refusals before this point")
}

/// Applies a verdict to an extended-protocol message and opens the sync group.
fn extended(shared: &Shared, frame: Frame, verdict: Verdict, discarding: &mut bool, rewrite: impl FnOnce(String) -> Frame) -> Frame {
    let mut st = lock(shared);
    let group = st.open.get_or_insert_with(SyncGroup::new);
    match verdict {
        Verdict::Forward => frame,
        Verdict::Rewrite { sql, .. } => rewrite(sql),
        Verdict::Refuse(error) => {
            *discarding = true;
            let marker = new_marker();
            let sentinel = Parse { name: String::new(), sql: sentinel_sql(&marker), param_types: vec![] }.encode();
            group.refusal = Some(Refusal { marker, error });
            sentinel
        }
    }
}

/// Whether an upstream error is the failure of a sentinel statement (a refusal pglease answers).
fn is_refusal(shared: &Shared, frame: &Frame) -> bool {
    let Ok(fields) = ErrorFields::decode(frame) else { return false };
    let st = lock(shared);
    let group = st.pending.front().or(st.open.as_ref());
    matches!(group, Some(SyncGroup { refusal: Some(r), .. }) if fields.message().is_some_and(|m| m.contains(&r.marker)))
}

/// Upstream → client. Returns when the upstream closes, the client is gone, or the session
/// drained for shutdown.
async fn upstream_to_client(
    up: &mut FramedReader<ReadHalf<Stream>>,
    client: &mut Out,
    shared: &Shared,
    hooks: &dyn SessionHooks,
    ctx: &SessionContext,
    notices: &mut tokio::sync::mpsc::Receiver<Frame>,
    meters: &Meters,
) -> Outcome {
    let mut messages: u64 = 0;
    loop {
        let next = tokio::select! {
            biased;
            // pglease's own notices go out between whole messages, as Postgres's asynchronous
            // notices do.
            Some(notice) = notices.recv() => {
                if let Err(e) = client.send(notice.raw()).await {
                    return client_write_error(e);
                }
                if let Err(e) = client.flush().await {
                    return client_write_error(e);
                }
                continue;
            }
            r = up.next() => r,
        };
        let event = match next {
            Ok(Some(ev)) => ev,
            Ok(None) | Err(FrameError::Truncated) => return Outcome::UpstreamClosed,
            Err(FrameError::Io(e)) => return Outcome::Io(e.to_string()),
            Err(e) => return Outcome::UpstreamProtocol(e.to_string()),
        };
        messages += 1;
        // A row that would take the grant past its read budget is not sent: the session ends
        // there (what the client was sent before it stays sent). Ending it, rather than
        // answering this one statement with an error, keeps the outcome exact: the statement
        // may already have finished upstream, with more of a pipeline behind it.
        if let Some(meter) = &ctx.reads {
            // Errors, notices and notifications carry what a statement computed too (a cast
            // error quotes its input): their bytes count. pglease's own refusals do not.
            let counted = match &event {
                ReadEvent::Large { tag: b'D' | b'd', body_len } => meter.take_row(*body_len as u64 + 5),
                ReadEvent::Frame(f) if matches!(f.tag(), b'D' | b'd') => meter.take_row(f.raw().len() as u64),
                ReadEvent::Frame(f) if f.tag() == b'E' && is_refusal(shared, f) => Ok(()),
                ReadEvent::Frame(f) if matches!(f.tag(), b'E' | b'N' | b'A') => meter.take_message(f.raw().len() as u64),
                _ => Ok(()),
            };
            if counted.is_err() {
                return Outcome::End(meter.cut_error());
            }
        }
        let frame = match event {
            ReadEvent::Large { tag, body_len } => {
                match stream_large(up, client, tag, body_len).await {
                    Ok(()) => {}
                    Err(FrameError::Io(e)) => return client_write_error(e),
                    Err(e) => return Outcome::Io(e.to_string()),
                }
                continue;
            }
            ReadEvent::Frame(f) => f,
        };

        let mut drained = false;
        let out: Frame = match frame.tag() {
            b'Z' => {
                let tx = match TxStatus::decode(&frame) {
                    Ok(tx) => tx,
                    Err(e) => return Outcome::UpstreamProtocol(e.to_string()),
                };
                let mut st = lock(shared);
                st.tx = tx;
                if let Some(group) = st.pending.pop_front() {
                    meters.query_duration.record(group.started.elapsed().as_secs_f64());
                }
                drained = st.draining && st.idle();
                drop(st);
                let _ = hooks.on_backend(ctx, BackendEvent::Ready(tx));
                frame
            }
            b'E' => {
                let fields = match ErrorFields::decode(&frame) {
                    Ok(f) => f,
                    Err(e) => return Outcome::UpstreamProtocol(e.to_string()),
                };
                let replacement = {
                    let mut st = lock(shared);
                    let RelayState { pending, open, .. } = &mut *st;
                    let group = pending.front_mut().or(open.as_mut());
                    match group {
                        Some(SyncGroup { refusal: Some(r), .. }) if fields.message().is_some_and(|m| m.contains(&r.marker)) => {
                            let err = r.error.clone();
                            Some(err)
                        }
                        _ => None,
                    }
                };
                let source = if replacement.is_some() { "refused" } else { "upstream" };
                metrics::counter!("pglease_errors_total", "source" => source).increment(1);
                match replacement {
                    Some(err) => {
                        let mut buf = bytes::BytesMut::new();
                        err.encode(&mut buf);
                        let refused = Frame::from_encoded(buf.freeze());
                        if let Ok(f) = ErrorFields::decode(&refused) {
                            let _ = hooks.on_backend(ctx, BackendEvent::Error(&f));
                        }
                        refused
                    }
                    None => {
                        let _ = hooks.on_backend(ctx, BackendEvent::Error(&fields));
                        frame
                    }
                }
            }
            b'C' => {
                match messages::decode_command_tag(&frame) {
                    Ok(tag) => {
                        if let BackendAction::Notice(text) = hooks.on_backend(ctx, BackendEvent::CommandComplete(&tag)) {
                            // Before the CommandComplete it is about, as Postgres's own notices come.
                            let notice = messages::encode_pgwire(&crate::error::notice("NOTICE", "00000", &text));
                            if let Err(e) = client.send(notice.raw()).await {
                                return client_write_error(e);
                            }
                        }
                    }
                    Err(e) => return Outcome::UpstreamProtocol(e.to_string()),
                }
                frame
            }
            b'S' => {
                match ParameterStatus::decode(&frame) {
                    Ok(p) => match hooks.on_backend(ctx, BackendEvent::ParameterStatus { name: &p.name, value: &p.value }) {
                        BackendAction::End(err) => return Outcome::End(err),
                        BackendAction::ShowValue(value) if value != p.value => ParameterStatus { name: p.name, value }.encode(),
                        BackendAction::ShowValue(_) | BackendAction::Continue | BackendAction::Notice(_) => frame,
                    },
                    Err(e) => return Outcome::UpstreamProtocol(e.to_string()),
                }
            }
            b'I' => {
                let _ = hooks.on_backend(ctx, BackendEvent::EmptyQuery);
                frame
            }
            b's' => {
                let _ = hooks.on_backend(ctx, BackendEvent::PortalSuspended);
                frame
            }
            b'W' => return Outcome::UpstreamProtocol("CopyBothResponse (replication) is not relayed".into()),
            b'K' | b'R' | b'v' => return Outcome::UpstreamProtocol(format!("unexpected message {:?} after startup", frame.tag() as char)),
            // Row data, descriptions, notices, notifications, COPY and completion messages
            // pass through untouched.
            _ => frame,
        };
        if let Err(e) = client.send(out.raw()).await {
            return client_write_error(e);
        }
        if !up.has_buffered_event() {
            if let Err(e) = client.flush().await {
                return client_write_error(e);
            }
            meters.messages_to_client.increment(messages);
            messages = 0;
        }
        if drained {
            let _ = client.flush().await;
            return Outcome::End(shutdown_error());
        }
    }
}
