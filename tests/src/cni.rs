//! CNI calls as the tests make them: the runtime library
//! (`skiff_cni_lib::exec`, which the kubelet uses too) run inside a test
//! node's namespace, with plugins from the workspace's build and Debian's
//! reference plugins.

use std::path::{Path, PathBuf};

use serde_json::Value;
use skiff_cni_lib::exec::{Attachment, Runtime};
pub use skiff_cni_lib::exec::{Conflist, ExecError, Reply};

use crate::{Netns, bin_dir};

/// Where plugins are looked up: ours, then Debian's reference plugins.
pub fn runtime(node: Option<&Netns>) -> Runtime {
    Runtime {
        bin_dirs: vec![bin_dir(), PathBuf::from("/usr/lib/cni")],
        node_netns: node.map(|n| PathBuf::from(n.path())),
    }
}

pub fn plugin_path(kind: &str) -> PathBuf {
    runtime(None)
        .plugin_path(kind)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One call: `command` for the container, run inside `node`'s namespace.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    pub node: &'a Netns,
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
}

impl Call<'_> {
    /// Runs the plugin binary with this call's environment and `conf`.
    pub fn exec(&self, plugin: &Path, conf: &Value) -> Reply {
        self.exec_raw(plugin, conf.to_string().as_bytes(), &[])
    }

    /// Runs it with raw stdin and environment overrides (`("CNI_X", "")`
    /// removes a variable).
    pub fn exec_raw(&self, plugin: &Path, stdin: &[u8], env: &[(&str, &str)]) -> Reply {
        let mut all = vec![
            ("CNI_COMMAND", self.command),
            ("CNI_CONTAINERID", self.container_id),
            ("CNI_NETNS", self.netns),
            ("CNI_IFNAME", self.ifname),
        ];
        // Overrides replace the defaults rather than repeat them.
        all.retain(|(k, _)| !env.iter().any(|(o, _)| o == k));
        all.extend_from_slice(env);
        runtime(Some(self.node))
            .exec_raw(plugin, &all, stdin)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment {
            container_id: self.container_id,
            netns: self.netns,
            ifname: self.ifname,
            args: "",
        }
    }

    /// ADD through every plugin of `list`; the last result.
    pub fn add(&self, list: &Conflist) -> Result<Value, ExecError> {
        list.add(&runtime(Some(self.node)), &self.attachment())
    }

    /// CHECK through every plugin of `list`.
    pub fn check(&self, list: &Conflist, result: &Value) -> Result<(), ExecError> {
        list.check(&runtime(Some(self.node)), &self.attachment(), result)
    }

    /// DEL through every plugin of `list`, in reverse.
    pub fn del(&self, list: &Conflist, result: Option<&Value>) -> Result<(), ExecError> {
        list.del(&runtime(Some(self.node)), &self.attachment(), result)
    }
}

/// The first address of a reply that must hold one.
pub fn ip_of(r: &Reply) -> String {
    r.ip()
        .unwrap_or_else(|| panic!("no address in {}", r.stdout))
}

/// The IPv6 (`v6`) or IPv4 address in an ADD result's `ips`, which must
/// hold one.
pub fn result_ip(result: &serde_json::Value, v6: bool) -> String {
    skiff_cni_lib::exec::all_ips(result)
        .into_iter()
        .find(|a| a.contains(':') == v6)
        .unwrap_or_else(|| panic!("no IPv{} address in {result}", if v6 { 6 } else { 4 }))
}
