//! Reaching PostgreSQL: a database URL turned into a connection with errors an operator can
//! act on ([`connect`]), and TLS on both legs ([`tls`]).

pub mod connect;
pub mod tls;
