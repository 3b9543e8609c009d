//! The generated protobuf messages and tonic clients and servers: the wire
//! between the CLI, node agents, drivers and executors (`proto/*.proto`,
//! compiled by `build.rs`). Generated code only: a leaf every side imports,
//! so the agent, startup and the runtime depend on the wire, not on each
//! other.

/// `motorpool.agent.v1`: the node agent's service.
pub mod agent {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("motorpool.agent.v1");
}

/// `motorpool.runtime.v1`: the bundled runtime's driver and executor services.
pub mod runtime {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("motorpool.runtime.v1");
}

/// The role words of the agent's wire (`StartRuntimeRequest.role`,
/// `NodeState.runtime_role`): the bundled runtime's names, kept for every
/// engine so that older agents keep understanding newer CLIs.
pub mod roles {
    pub const DRIVER: &str = "driver";
    pub const EXECUTOR: &str = "executor";
}
