//! The wire codec: framing of Postgres v3 messages with bounded sizes.
//!
//! pglease frames every message itself ([`frame`]) so that it can check the length before it
//! buffers anything and forward row data without decoding it. Messages the proxy has to look
//! into (startup, authentication, queries, `ReadyForQuery`…) are decoded by [`messages`] with
//! strict, bounds-checked readers; what the proxy itself sends is encoded with pgwire.
//!
//! NOTE: pgwire 0.42's decoders are not used on inbound bytes: they panic on short bodies
//! (`Buf::get_*` past the end) and decode strings lossily (`from_utf8_lossy`), which would let the
//! proxy vet a different SQL text than Postgres runs.

pub mod messages;
pub mod frame;
pub mod startup;

pub use frame::{Frame, FrameError, FramedReader, ReadEvent};
