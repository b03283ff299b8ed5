//! # cutover
//!
//! A PostgreSQL wire-protocol proxy that carries a live application through a schema
//! migration: it mirrors writes into the new schema, shadow-runs reads on both schemas and
//! compares the answers, and moves each kind of query over a percentage at a time.
//! The contract is `../shared/design.md`; the map of the code is `docs/architecture.md`.
//!
//! # Layout
//!
//! In the order the work flows:
//!
//! - [`listener`]: accepts clients, answers SSL/GSS/cancel negotiation, enforces the client
//!   limit, owns start and graceful shutdown; [`tls`] terminates TLS.
//! - [`session`]: one client session — upstream connection with the client's own startup,
//!   then the frame relay ([`session::relay`]); the session's statements, where each Query
//!   and Bind is classified, routed and handed to the shadow, and the queue of answers the
//!   server owes (the proxy's own messages' answers taken out).
//! - [`classify`]: the cheap pre-check, the query type of a statement (cached by SQL text),
//!   its bucketing key and what comparing it needs; [`classify::fingerprint`] names
//!   statements.
//! - [`route`]: which side serves an execution (stage, sticky bucket) and the route checks
//!   that make sure a client cannot tell; [`rewrite`]: a statement as the same statement on
//!   the target.
//! - [`upstream`]: connections to PostgreSQL; [`cancel`]: the proxy's cancel keys.
//! - [`shadow`]: the bounded hand-off and the pool that runs reads on both sides, confirms
//!   in one snapshot and classifies; [`compare`]: the comparison itself (pure functions);
//!   [`divergence`]: the store of outcomes, samples and reviewers' marks.
//! - [`wire`]: the frame codec (no I/O).
//! - [`control`]: live state shared through PostgreSQL, gates, audit, ramp-down; [`admin`]:
//!   `/metrics`, `/healthz`, `/readyz`, `/status`, the control API; [`console`]: the admin
//!   console, a PostgreSQL endpoint on `pgwire` (SCRAM, both protocols; PAUSE/RESUME hold
//!   sessions through `session::clients`); [`ctl`]: the operator's CLI; [`reload`]: rules and
//!   configuration hot reload (SIGHUP, the console's RELOAD).
//! - [`report`]: `cutover report` and `/status`.
//! - [`metrics`]: every metric, in one place; [`config`]: `cutover serve` configuration.
//! - [`rules`]: the rule files, validated with `file:line:column` diagnostics.
//! - [`connect`]: reaching a PostgreSQL server from a URL, with errors an operator can act on.
//! - [`migrate`]: `cutover migrate`, `backfill`, `verify`, `repair`.
//! - [`fixture`]: the legacy table and a deterministic generator of a seed-shaped affiliate
//!   tree (tests, demo, benchmarks, `cutover fixture`); [`localpg`]: a private, throwaway
//!   PostgreSQL cluster; [`demo`]: `cutover demo`.

pub mod admin;
pub mod auth;
pub mod cancel;
pub mod classify;
pub mod compare;
pub mod config;
pub mod connect;
pub mod console;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod divergence;
pub mod fixture;
pub mod listener;
pub mod localpg;
pub mod metrics;
pub mod migrate;
pub mod reload;
pub mod report;
pub mod rewrite;
pub mod route;
pub mod rules;
pub mod session;
pub mod shadow;
pub mod tls;
pub mod upstream;
pub mod wire;
