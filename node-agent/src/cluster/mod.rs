//! The agent in a cluster (`kube-fim-agent run`): it serves the policies that
//! select its node, hands every change to [`crate::report`] and writes its
//! FileIntegrityNode.

pub mod approvals;
pub mod heartbeat;
pub mod lifecycle;
pub mod node_status;
pub mod policies;
pub mod run;
pub mod selection;
pub mod startup;
