//! The proxy's data path for one client: accepting and negotiating ([`listener`], with
//! [`crate::net::tls`]), the session ([`session`]: login, then the frame relay, where each
//! statement is classified and routed), the session's own upstream connection
//! ([`upstream`]), cancel keys ([`cancel`]), users' secrets ([`auth`]), the sockets and
//! buffers the relay moves frames with, and the session threads' event loop it runs on
//! ([`io`]), and the order that closes every session
//! ([`shutdown`]).

pub mod auth;
pub mod cancel;
pub mod io;
pub mod listener;
pub mod session;
pub mod shutdown;
pub mod upstream;
