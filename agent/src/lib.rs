//! Skiff's node agent. Each role is a module that runs alone or beside the
//! others (`skiff-agent run --roles ...`):
//! - `proxy`: Services and EndpointSlices into the eBPF socket load balancer.
//!
//! The overlay and kubelet roles come with their own issues.

pub mod proxy;
