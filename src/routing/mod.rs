//! What a statement is and where it goes: the rule files ([`rules`]), the query type of a
//! statement ([`classify`]), its formulation on the target ([`rewrite`]) and the side that
//! serves each execution ([`route`]).

pub mod classify;
pub mod fingerprint;
pub mod rewrite;
pub mod route;
pub mod rule_files;
pub mod rules;
