//! Code generated from the `.proto` contracts under `proto/`: messages, clients and server
//! traits of agent-batch's own API (`agent.batch.v1`) and of the sibling services it consumes
//! (`agent.request.v1`, `agent.template.v1`, `agent.config.v1`). Only adapters (`batch-clients`), the server and tests use it: prost
//! messages never reach `batch-app` or `batch-domain`.
#![forbid(unsafe_code)]

pub mod json;

/// The encoded descriptors of every contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptors");

/// agent-batch's own API.
pub mod batch {
    /// Version 1.
    #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("agent.batch.v1");
    }
}

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
