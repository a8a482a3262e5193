//! What every request path does at the front, the same way on each port and
//! in each worker kind: the edge policy and local answers ([`front`]), serving
//! connections within limits and draining them ([`serve`]), the access log
//! ([`access`]), balanced accepts on plain HTTP ([`balance`]), the memory
//! budget of request bodies ([`budget`]), gRPC's wire format ([`grpc`]), the restricted API categories
//! ([`restricted`]), and who may pass and how often ([`gate`]: API keys in
//! [`keys`], rate limits in [`limit`]), with files kept current by [`watched`].

pub mod access;
pub mod balance;
pub mod budget;
pub mod front;
pub mod gate;
pub mod grpc;
pub mod keys;
pub mod limit;
pub mod restricted;
pub mod serve;
pub mod watched;
