//! The proxy's data path for one client: accepting and negotiating ([`listener`], with
//! [`crate::net::tls`]), the session ([`session`]: login, then the frame relay, where each
//! statement is classified and routed), the session's own upstream connection
//! ([`upstream`]), cancel keys ([`cancel`]) and users' secrets ([`auth`]).

pub mod auth;
pub mod cancel;
pub mod io;
pub mod listener;
pub mod session;
pub mod upstream;
