//! Skiff's node agent: one process per node whose roles share one shape
//! ([`role`]: a config, an error type, `run(ctx, shutdown)`) and run side
//! by side under one supervisor (`skiff-agent run --roles ...`):
//! - `kubelet`: the pods bound to this node, on containerd, wired by the
//!   node's CNI conflist; the Node object and its heartbeats.
//! - `proxy`: Services and EndpointSlices into the eBPF socket load balancer.
//! - `overlay`: the node's subnet lease in etcd and routes to every other
//!   node's subnet (Flannel-compatible, vxlan or host-gw).
//! - `dns`: the cluster domain answered on the node, per the Kubernetes
//!   DNS specification, the rest forwarded upstream.
//!
//! Below the roles: [`catalog`], the Services and EndpointSlices the proxy
//! and dns roles each read their own way; [`pki`], the TLS material the
//! roles make for themselves.
//!
//! Before the roles run, `skiff-agent join` ([`join`]) turns a bootstrap
//! token into the node's own credential.
//!
//! Roles never import each other: the kubelet reaches the overlay only
//! through `subnet.env`, read by the CNI plugin it runs.

pub mod apiservers;
pub mod catalog;
pub mod dns;
pub mod ingress;
pub mod install_cni;
pub mod join;
pub mod kubelet;
pub mod memory;
pub mod overlay;
pub mod pki;
pub mod proxy;
pub mod role;
pub mod telemetry;
