//! Adapters of agent-batch for the sibling services, and their local stand-ins for the
//! embedded default:
//!
//! * [`local::FileTemplates`] — execution templates read from a directory (`config/templates/`);
//! * [`local::RenderingExecutor`] — a request executor that renders the template with the
//!   item's data, the user's preferences and the parameters (minijinja): the rendered text is
//!   the result.
//!
//! * [`grpc`] — clients of the sibling services over gRPC: [`grpc::GrpcExecutor`] (Request
//!   service, with deadlines, retryable/permanent status mapping and a [`breaker`]),
//!   [`grpc::GrpcTemplates`] (Template service) and [`grpc::GrpcPreferences`] (Config service:
//!   paged listing and a reconnecting change watch);
//! * [`cache::CachedTemplates`] — a TTL cache over any template source that serves the last
//!   good template while the source is down.
//!
//! Which adapter serves a port is configuration, not code. prost messages stay in this crate.
#![forbid(unsafe_code)]

pub mod breaker;
pub mod cache;
pub mod grpc;
pub mod local;
