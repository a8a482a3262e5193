//! Certificates as every process sees them: the cache on disk and which file
//! holds what ([`cache`]), what the served certificate is as plain data
//! ([`status`]), and the primitives (parse and check a key and chain, inspect
//! a leaf, make a self-signed one: [`primitives`]).

pub mod cache;
pub mod primitives;
pub mod status;
