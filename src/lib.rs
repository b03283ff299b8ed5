//! # cutover
//!
//! A PostgreSQL wire-protocol proxy that carries a live application through a schema
//! migration: it mirrors writes into the new schema, shadow-runs reads on both schemas and
//! compares the answers, and moves each kind of query over a percentage at a time.
//! The contract is `../shared/design.md`; the map of the code is `docs/architecture.md`.
//!
//! # Layout
//!
//! What exists today, in the order the work flows:
//!
//! - [`listener`]: accepts clients, answers SSL/GSS/cancel negotiation, enforces the client
//!   limit, owns start and graceful shutdown; [`tls`] terminates TLS.
//! - [`session`]: one client session — upstream connection with the client's own startup,
//!   then the frame relay ([`session::relay`]) where the stages plug in.
//! - [`classify`]: the cheap pre-check that leaves statements not on the legacy table
//!   unparsed.
//! - [`upstream`]: connections to PostgreSQL; [`cancel`]: the proxy's cancel keys.
//! - [`wire`]: the frame codec (no I/O).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`; [`metrics`]: every metric, in one place.
//! - [`config`]: `cutover serve` configuration (TOML file + flags).
//! - [`rules`]: the rule files (table and column map, query types), validated with
//!   `file:line:column` diagnostics; [`classify::fingerprint`] names statements.
//! - [`rewrite`]: a statement on the legacy table as the same statement on the target.
//! - [`compare`]: the two sides' answers compared (canonical values, multisets, ties,
//!   tolerances) and which statements cannot be compared (pure functions; the shadow that
//!   feeds them is issue 5).
//! - [`connect`]: reaching a PostgreSQL server from a URL, with errors an operator can act on.
//! - [`migrate`]: `cutover migrate` (the recorded, checksummed migrations of `migrations/`)
//!   and the seed's integrity checks of the `fature_v2` tree.
//! - [`fixture`]: the legacy `public.affiliates` table and a deterministic generator of a
//!   seed-shaped affiliate tree, with optional anomalies (tests, demo, benchmarks).
//! - [`localpg`]: a private, throwaway PostgreSQL cluster started from the system binaries
//!   (tests and the demo).

pub mod admin;
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
