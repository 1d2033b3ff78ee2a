//! The agent in a cluster (`kube-fim-agent run`): it serves the policies that
//! select its node, reports every change as a FileChange and an Event through a
//! durable queue, caps change storms, and writes its FileIntegrityNode.

pub mod deliver;
pub mod metrics;
pub mod node_status;
pub mod queue;
pub mod record;
pub mod run;
pub mod selection;
pub mod storm;
