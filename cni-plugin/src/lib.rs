//! `skiff-cni`: a CNI 1.1 plugin that wires containers into the node's
//! subnet (bridge + veth + IPAM). [`spec`] holds the protocol, [`ipam`] the
//! address records, [`plugin`] the commands, [`subnet_env`] the file the
//! overlay hands the node's subnet over in.

pub mod ipam;
pub mod plugin;
pub mod spec;
/// The overlay's subnet.env, read on every call (its codec lives in the
/// library the overlay shares).
pub use skiff_cni_lib::subnet_env;
