//! What a container runtime needs of CNI, shared by the kubelet, the tests
//! and the benchmarks: [`exec`] loads a network configuration list and
//! invokes its plugins the way the spec's runtime section says (libcni's
//! order), [`subnet_env`] is the file in which the overlay hands the node's
//! subnet to `skiff-cni`, [`attachments`] is how `skiff-cni` records what it
//! wired.

pub mod attachments;
pub mod exec;
pub mod subnet_env;
