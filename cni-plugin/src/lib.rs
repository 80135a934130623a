//! `skiff-cni`: a CNI 1.1 plugin that wires containers into the node's
//! subnet (bridge + veth + IPAM). [`spec`] holds the protocol, [`ipam`] the
//! address records, [`plugin`] the commands, [`subnet_env`] the file the
//! overlay hands the node's subnet over in.

pub mod ipam;
pub mod plugin;
pub mod spec;
pub mod subnet_env;
