//! pglease: least-privilege, time-leased access to production PostgreSQL.
//!
//! The layout follows the architecture:
//! - [`codec`]: framing and decoding of Postgres v3 messages, with bounded sizes
//! - [`handshake`]: TLS negotiation, startup parameters, client authentication
//! - [`auth`]: credential sources and the SCRAM server
//! - [`upstream`]: connecting and logging in to Postgres, cancel requests
//! - [`session`]: the relay, and the hooks policy and audit plug into
//! - [`cancel`]: proxy-issued cancel keys
//! - [`server`]: the listener, connection limit, graceful shutdown
//! - [`admin`]: the admin HTTP listener (`/metrics`, `/healthz`, `/readyz`, the JSON API)
//! - [`control_plane`]: the database several instances share (grants, the fleet, events)
//! - [`cli`], [`connect`]: the admin commands, and `pglease connect`
//! - [`config`], [`tls`], [`error`]: configuration, TLS setup, client-visible errors
//! - [`cluster`], [`demo`]: the throwaway Postgres and the demo built on it

pub mod admin;
pub mod auth;
pub mod cancel;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod connect;
pub mod console;
pub mod conninfo;
pub mod control_plane;
pub mod demo;
pub mod error;
pub mod handshake;
pub mod logging;
pub mod notify;
pub mod server;
pub mod session;
pub mod signals;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod workers;
pub mod events;
pub mod grants;
pub mod identity;
pub mod outbound;
pub mod init;
pub mod login;
pub mod people;
pub mod scopes;
pub mod time;
pub mod app;
pub mod reload;
pub mod cli;
pub mod policy;
pub mod audit;
