//! Where the control plane keeps its state: the etcd store the apiserver
//! writes through, the local etcd it starts when none is given, and the
//! TLS material for either.

pub mod etcd;
pub mod etcd_pki;
pub mod store;
