//! The operators' surfaces over a running proxy: the HTTP API and `/metrics` ([`api`]), the
//! SQL console ([`console`]), the `cutover ctl` client ([`ctl`]) and hot reload
//! ([`reload`]).

pub mod api;
pub mod console;
pub mod ctl;
pub mod reload;
