//! The agent in a cluster (`kube-fim-agent run`): it serves the policies that
//! select its node, hands every change to [`crate::report`] and writes its
//! FileIntegrityNode.

pub mod metrics;
pub mod node_status;
pub mod run;
pub mod selection;
