//! # cutover
//!
//! A PostgreSQL wire-protocol proxy that carries a live application through a schema
//! migration: it mirrors writes into the new schema, shadow-runs reads on both schemas and
//! compares the answers, and moves each kind of query over a percentage at a time.
//! The contract is `../shared/design.md`; the map of the code is `docs/architecture.md`.
//!
//! # Layout
//!
//! The parts in the order the work flows:
//!
//! - [`proxy`]: the data path of one client — [`proxy::listener`] accepts and negotiates
//!   (TLS through [`net::tls`]); [`proxy::session`] logs the client in on its own upstream
//!   connection ([`proxy::upstream`], secrets in [`proxy::auth`]), then relays frames
//!   ([`proxy::session::relay`]), where each Query and Bind is classified, routed and handed
//!   to the shadow (`proxy::session::statements`) and the answers the server owes are kept
//!   in order (`proxy::session::pending`); [`proxy::cancel`] the proxy's cancel keys,
//!   [`proxy::io`] the sockets and their read buffers.
//! - [`routing`]: what a statement is and where it goes — the rule set
//!   ([`routing::rules`], read from the files by [`routing::rule_files`]), the query type of a
//!   statement ([`routing::classify`], named by [`routing::fingerprint`]), the same statement
//!   on the target ([`routing::rewrite`]), and the side that serves an execution
//!   ([`routing::route`]: stage, sticky bucket, route checks).
//! - [`shadow`]: the bounded hand-off and the pool that runs reads on both sides, confirms in
//!   one snapshot and classifies; [`shadow::compare`] the comparison (pure functions);
//!   [`shadow::divergence`] the store of outcomes, samples and reviewers' marks.
//! - [`control`]: the live state shared through PostgreSQL, stage changes with their gates
//!   and audit, the automatic ramp-down, behaviour changes.
//! - [`admin`]: the operators' surfaces over a running proxy — the HTTP API and `/metrics`
//!   ([`admin::api`]), the SQL console ([`admin::console`]), `cutover ctl` ([`admin::ctl`]),
//!   hot reload ([`admin::reload`]).
//! - [`migrate`]: `cutover migrate`, `backfill`, `verify`, `repair`, and the network-size
//!   fold.
//! - [`report`]: `cutover report` and `/status`.
//! - [`serve`]: `cutover serve` — the proxy started with everything beside it.
//! - [`demo`]: `cutover demo`, with the fixture generator ([`demo::fixture`]) and a private
//!   PostgreSQL ([`demo::localpg`]).
//! - [`cli`]: the command line; `src/main.rs` only calls it.
//!
//! Beside them: [`wire`] (the frame codec, no I/O), [`net`] (reaching PostgreSQL from a URL,
//! TLS both ways), [`config`] (`cutover serve` settings) and [`metrics`] (every metric).
//!
//! # Layers
//!
//! A part imports only parts below it, never one above (`docs/architecture.md` draws it):
//!
//! ```text
//! cli ─▶ demo ─▶ serve ─▶ admin ─▶ report ─▶ proxy ─▶ control ─▶ migrate ─▶ shadow ─▶ metrics ─▶ routing ─▶ config ─▶ net ─▶ wire
//! ```
//!
//! Where a lower part needs what a higher one provides, the higher one plugs it in: the
//! console is a [`proxy::session::Endpoint`] that [`serve`] gives the proxy.

pub mod admin;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod metrics;
pub mod migrate;
pub mod net;
pub mod proxy;
pub mod report;
pub mod routing;
pub mod serve;
pub mod shadow;
pub mod wire;
