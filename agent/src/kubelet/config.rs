//! The kubelet role's configuration (its flags), read by the role and by
//! the parts that register the node.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct KubeletConfig {
    pub node_name: String,
    pub node_ip: IpAddr,
    pub node_labels: BTreeMap<String, String>,
    /// containerd's socket.
    pub containerd: PathBuf,
    /// The containerd namespace the kubelet's containers live in.
    pub namespace: String,
    /// The OCI runtime binary containerd's runc shim runs (`runc`,
    /// `crun`); `None` for the shim's default, runc.
    pub runtime_binary: Option<String>,
    /// Pod state (pinned namespaces, CNI results): `<root>/pods/<uid>`.
    pub root_dir: PathBuf,
    pub log_dir: PathBuf,
    /// The `skiff-log` binary (CRI-format logs, run by containerd's shim).
    pub log_driver: PathBuf,
    /// The cluster CA: only clients it signed (the apiserver) may read
    /// logs from the kubelet's port.
    pub client_ca: Option<PathBuf>,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    /// cgroup parent of every pod (cgroupfs path, as runc takes it).
    pub cgroup_parent: String,
    /// Registries reached over plain HTTP (`host:port`).
    pub insecure_registries: Vec<String>,
    pub max_pods: u32,
    /// The kubelet's HTTPS port (daemonEndpoints.kubeletEndpoint).
    pub port: u16,
    pub lease_renew: Duration,
    pub lease_duration: Duration,
    pub status_report: Duration,
    /// The overlay's subnet.env, read for the Node's podCIDR.
    pub subnet_file: PathBuf,
    /// The cluster DNS pods are given (their resolv.conf).
    pub dns: super::dns::ClusterDns,
}
