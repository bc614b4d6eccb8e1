//! Adapters of agent-batch for the sibling services, and their local stand-ins for the
//! embedded default:
//!
//! * [`local::FileTemplates`] — execution templates read from a directory (`config/templates/`);
//! * [`local::RenderingExecutor`] — a request executor that renders the template with the
//!   item's data, the user's preferences and the parameters (minijinja): the rendered text is
//!   the result.
//!
//! The gRPC clients of the Request, Template and Config services join this crate with the
//! sibling-contracts issue. Which adapter serves a port is configuration, not code.
#![forbid(unsafe_code)]

pub mod local;
