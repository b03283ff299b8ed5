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
//! - [`connect`]: reaching a PostgreSQL server from a URL, with errors an operator can act on.
//! - [`migrate`]: `cutover migrate` (the recorded, checksummed migrations of `migrations/`)
//!   and the seed's integrity checks of the `fature_v2` tree.
//! - [`fixture`]: the legacy `public.affiliates` table and a deterministic generator of a
//!   seed-shaped affiliate tree, with optional anomalies (tests, demo, benchmarks).
//! - [`localpg`]: a private, throwaway PostgreSQL cluster started from the system binaries
//!   (tests and the demo).

pub mod connect;
pub mod fixture;
pub mod localpg;
pub mod migrate;
