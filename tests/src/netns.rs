//! Network namespaces made with `ip netns`, deleted on drop.

use std::process::Command;

use crate::unique;

#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

/// Runs `ip` with `args`; panics with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A namespace with only a loopback interface, up.
    pub fn new() -> Self {
        let name = unique("ns");
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a);
    }

    /// Runs a command inside the namespace and returns its stdout; panics
    /// when it fails.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("running {cmd:?} in {}: {e}", self.name));
        assert!(
            out.status.success(),
            "{cmd:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command inside the namespace feeding `input` on stdin.
    pub fn exec_with_input(&self, cmd: &[&str], input: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {cmd:?} in {}: {e}", self.name));
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input)
                .unwrap_or_else(|e| panic!("writing to {cmd:?}: {e}"));
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}"))
    }

    /// Path of the namespace file, for setns.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Adds an interface `name` holding `addrs` (CIDR strings), up: one
    /// end of a veth pair whose other end (`<name>p`) also stays in the
    /// namespace. (This kernel has no dummy driver.)
    pub fn add_local_link(&self, name: &str, addrs: &[&str]) {
        let peer = format!("{name}p");
        self.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        for a in addrs {
            self.ip(&["addr", "add", a, "dev", name]);
        }
        self.ip(&["link", "set", &peer, "up"]);
        self.ip(&["link", "set", name, "up"]);
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins two namespaces with a veth pair: `a_name` in `a` with `a_addr`,
/// `b_name` in `b` with `b_addr` (CIDR strings), both up.
pub fn veth(a: &Netns, a_name: &str, a_addr: &str, b: &Netns, b_name: &str, b_addr: &str) {
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", a_addr, "dev", a_name]);
    b.ip(&["addr", "add", b_addr, "dev", b_name]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}
