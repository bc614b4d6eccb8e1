//! Code generated from the `.proto` contracts under `proto/`: messages, clients and server
//! traits of the sibling services agent-batch consumes (`agent.request.v1`, `agent.template.v1`,
//! `agent.config.v1`). Only adapters (`batch-clients`), the server and tests use it: prost
//! messages never reach `batch-app` or `batch-domain`.
#![forbid(unsafe_code)]

/// The Request Service's contract.
pub mod request {
    /// Version 1.
    #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("agent.request.v1");
    }
}

/// The Template Service's contract.
pub mod template {
    /// Version 1.
    #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("agent.template.v1");
    }
}

/// The Config Service's preference contract.
pub mod config {
    /// Version 1.
    #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("agent.config.v1");
    }
}
