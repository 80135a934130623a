//! Skiff's node agent. Each role is a module that runs alone or beside the
//! others (`skiff-agent run --roles ...`):
//! - `proxy`: Services and EndpointSlices into the eBPF socket load balancer.
//! - `overlay`: the node's subnet lease in etcd and routes to every other
//!   node's subnet (Flannel-compatible, vxlan or host-gw).
//!
//! The kubelet role comes with its own issue.

pub mod overlay;
pub mod proxy;
