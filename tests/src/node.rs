//! Real nodes for kubelet tests: a network namespace holding its own
//! containerd (own root, state and socket), a local OCI registry with
//! the workspace's images (`images`: busybox, skiff-probe, skiff-node), the node's CNI
//! conflist (`skiff-cni`), and `skiff-agent` running the kubelet role.
//! Everything is removed on drop: the agent, the containers and their
//! shims, containerd, the mounts under the node's directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde_json::json;
use skiff_cni_lib::subnet_env::SubnetEnv;

use crate::control::{ControlPlane, free_port};
use crate::{Netns, Proc, Spawn, TempDir, bin, bin_dir, wait_for};

/// Debian's docker-registry on loopback inside `ns`.
pub struct Registry {
    pub addr: String,
    _proc: Proc,
    _dir: TempDir,
}

impl Registry {
    pub fn start_in(ns: &Netns) -> Self {
        Self::start_on(ns, "127.0.0.1")
    }

    /// Listening on `host`, an address of `ns` (so that other namespaces on
    /// its network pull from it).
    pub fn start_on(ns: &Netns, host: &str) -> Self {
        let dir = TempDir::new();
        let port = free_port();
        let addr = format!("{host}:{port}");
        let config = dir.path.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path.join("data").display()
            ),
        )
        .unwrap_or_else(|e| panic!("registry config: {e}"));
        let proc = Spawn::new("docker-registry")
            .args(["serve", &config.display().to_string()])
            .netns(ns)
            .log_to(&dir.path.join("registry.log"))
            .start();
        let url = format!("http://{addr}/v2/");
        wait_for("the registry to answer", Duration::from_secs(20), || {
            Spawn::new("curl")
                .args(["-sf", &url])
                .netns(ns)
                .try_output()
                .ok()
        });
        Self {
            addr,
            _proc: proc,
            _dir: dir,
        }
    }

    /// Pushes the workspace's image `name` (see `images`) as
    /// `<registry>/<repo>` and returns that reference.
    pub fn push(&self, ns: &Netns, name: &str, repo: &str) -> String {
        self.push_labelled(ns, name, repo, None)
    }

    /// As `push`, with a label added to the image's config: the same files
    /// as another image (and so the same layer), yet another image.
    pub fn push_labelled(
        &self,
        ns: &Netns,
        name: &str,
        repo: &str,
        label: Option<(&str, &str)>,
    ) -> String {
        let mut image = crate::images::get(name).unwrap_or_else(|e| panic!("image {name}: {e}"));
        if let Some((k, v)) = label {
            image.config["config"]["Labels"][k] = json!(v);
        }
        let reference = format!("{}/{repo}", self.addr);
        let r = reference.clone();
        let nspath = ns.path();
        std::thread::spawn(move || {
            let _guard = skiff_netlink::NetnsGuard::enter(&nspath)
                .unwrap_or_else(|e| panic!("enter {nspath}: {e}"));
            crate::images::push(image, &r, true).unwrap_or_else(|e| panic!("{e}"));
        })
        .join()
        .unwrap_or_else(|_| panic!("pushing {reference} failed"));
        reference
    }
}

/// A containerd of its own, in `ns`.
pub struct Containerd {
    pub socket: PathBuf,
    pub proc: Proc,
    dir: PathBuf,
    netns: String,
    mntns: Option<PathBuf>,
}

impl Containerd {
    pub fn start_in(ns: &Netns, dir: &Path) -> Self {
        Self::start_with_mounts(ns, dir, None)
    }

    /// As `start_in`, in the mount namespace at `mntns` when given.
    pub fn start_with_mounts(ns: &Netns, dir: &Path, mntns: Option<PathBuf>) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let socket = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display()
            ),
        )
        .unwrap_or_else(|e| panic!("containerd config: {e}"));
        let mut cd = Self {
            socket,
            proc: Self::spawn(&ns.path(), mntns.as_deref(), dir),
            dir: dir.to_path_buf(),
            netns: ns.path(),
            mntns,
        };
        cd.wait_ready();
        cd
    }

    fn spawn(netns: &str, mntns: Option<&Path>, dir: &Path) -> Proc {
        Spawn::new("containerd")
            .args([
                "--config",
                &dir.join("containerd.toml").display().to_string(),
            ])
            .netns_path(Some(netns))
            .mntns_path(mntns)
            .log_to(&dir.join("containerd.log"))
            .start()
    }

    fn wait_ready(&mut self) {
        wait_for("containerd to answer", Duration::from_secs(20), || {
            self.ctr(&["version"]).ok()
        });
    }

    /// Kills containerd (SIGKILL, as a crash would) and starts it again;
    /// the shims and their containers live on.
    pub fn crash_and_restart(&mut self) {
        self.proc.kill_now();
        self.proc = Self::spawn(&self.netns, self.mntns.as_deref(), &self.dir);
        self.wait_ready();
    }

    /// `ctr` against this containerd, in the kubelet's namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        Spawn::new("ctr")
            .args([
                "--address",
                &self.socket.display().to_string(),
                "--namespace",
                "k8s.io",
            ])
            .args(args)
            .try_output()
    }

    /// Ids of the containers it holds.
    pub fn containers(&self) -> Vec<String> {
        self.ctr(&["containers", "list", "-q"])
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Kills and removes every task and container, then containerd.
    fn stop(&mut self) {
        for id in self.containers() {
            let _ = self.ctr(&["tasks", "kill", "--all", "--signal", "SIGKILL", &id]);
        }
        std::thread::sleep(Duration::from_millis(300));
        for id in self.containers() {
            let _ = self.ctr(&["tasks", "delete", "--force", &id]);
            let _ = self.ctr(&["containers", "delete", &id]);
        }
        self.proc.terminate();
        // Shims of this containerd that outlived their tasks.
        let sock = self.socket.display().to_string();
        for pid in crate::pids_with_arg(&sock) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        unmount_under(&self.dir);
    }
}

/// Unmounts everything mounted below `dir` (deepest first).
pub fn unmount_under(dir: &Path) {
    let prefix = dir.display().to_string();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        .filter(|m| {
            m.strip_prefix(&prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The host paths `deploy/skiff-node.yaml` names, made the node's own: a
/// mount namespace (held by a sleeping process) where the node's
/// containerd, its shims and its kubelet run, with the node's directories
/// bound over `/opt/cni/bin`, `/etc/cni/net.d`, `/run/skiff` and
/// `/var/lib/skiff`, a bpffs of its own on `/sys/fs/bpf`, and the node's
/// cgroup as the cgroup v2 root. Everything mounted there goes with the
/// namespace's last process.
pub struct NodeMounts {
    holder: Proc,
}

/// The host paths a node gets its own copy of, and their directory names
/// under the node's directory.
const NODE_PATHS: [(&str, &str); 4] = [
    ("/opt/cni/bin", "opt-cni-bin"),
    ("/etc/cni/net.d", "etc-cni-net.d"),
    ("/run/skiff", "run-skiff"),
    ("/var/lib/skiff", "var-lib-skiff"),
];

impl NodeMounts {
    /// `dir`: the node's directory; `cgroup`: its cgroup v2 directory.
    pub fn new(dir: &Path, cgroup: &Path) -> Self {
        let mut script = String::from("set -e\n");
        for (host, own) in NODE_PATHS {
            let own = dir.join("host").join(own);
            for d in [Path::new(host), &own] {
                std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            }
            script.push_str(&format!("mount --bind '{}' '{host}'\n", own.display()));
        }
        let ready = dir.join("host/mounted");
        script.push_str(&format!(
            "mount -t bpf bpf /sys/fs/bpf\nmount --bind '{cg}' {root}\ntouch '{ready}'\nexec sleep infinity\n",
            cg = cgroup.display(),
            root = crate::cgroup::CGROUP2_ROOT,
            ready = ready.display(),
        ));
        let holder = Spawn::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .log_to(&dir.join("mounts.log"))
            .start();
        let mut m = Self { holder };
        wait_for("the node's mounts", Duration::from_secs(10), || {
            if !m.holder.is_running() {
                panic!("node mounts: {}", m.holder.log_text());
            }
            ready.exists().then_some(())
        });
        m
    }

    /// `/proc/<pid>/ns/mnt` of the namespace.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.holder.pid()))
    }
}

/// One node: containerd, the node's CNI conflist, and `skiff-agent` with
/// the kubelet role (alone, on a hand-written subnet.env) or every role.
pub struct KubeletNode {
    pub name: String,
    pub agent: Option<Proc>,
    pub containerd: Containerd,
    pub dir: TempDir,
    pub ip: String,
    /// Flags added to the agent's at its next (re)start.
    pub extra_args: Vec<String>,
    /// The proxy role's bpffs pins, when it runs.
    pub pins: Option<crate::PinDir>,
    args: Vec<String>,
    netns: String,
    /// Dropped after the agent and containerd (fields drop after `drop`).
    mounts: Option<NodeMounts>,
}

/// How a node reaches the rest of its cluster.
pub struct NodeSetup<'a> {
    pub ip: &'a str,
    /// `skiff-agent join` flags: server, bootstrap token, CA hash.
    pub join: &'a [String],
    /// A plain-HTTP registry the kubelet may pull from.
    pub registry: &'a str,
    pub network: NodeNetwork<'a>,
}

pub enum NodeNetwork<'a> {
    /// The kubelet role alone, on a hand-written subnet.env for this pod
    /// subnet (`10.244.1.0/24`).
    Fixed(&'a str),
    /// Every role: the overlay leases the node's subnet in this etcd (vxlan
    /// over `eth0`) and the proxy translates Services for the node's pods;
    /// the dns role listens on the node's address and on `ip6`, its IPv6
    /// underlay address. `ip_masq`: the overlay's `--ip-masq`.
    Overlay {
        etcd: &'a [String],
        ip6: &'a str,
        ip_masq: bool,
    },
    /// The kubelet role alone, in [`NodeMounts`]: the network is
    /// installed onto the node as `deploy/skiff-node.yaml` does it (the
    /// CNI plugin and conflist under the standard paths, subnet.env in
    /// /run/skiff), the subnet being the Node's podCIDR.
    Installed,
}

impl KubeletNode {
    /// `subnet`: this node's pod subnet (`10.244.1.0/24`); `registry`: a
    /// plain-HTTP registry the kubelet may pull from.
    pub fn start(
        ns: &Netns,
        ip: &str,
        subnet: &str,
        cp: &crate::control::ControlPlane,
        registry: &str,
    ) -> Self {
        Self::start_with(
            ns,
            &NodeSetup {
                ip,
                join: &cp.join_args(&cp.server),
                registry,
                network: NodeNetwork::Fixed(subnet),
            },
        )
    }

    pub fn start_with(ns: &Netns, setup: &NodeSetup<'_>) -> Self {
        let dir = TempDir::new();
        let name = crate::unique("node");
        let subnet_file = dir.path.join("subnet.env");
        if let NodeNetwork::Fixed(subnet) = setup.network {
            let net: Ipv4Network = "10.244.0.0/16".parse().unwrap_or_else(|e| panic!("{e}"));
            let sub: Ipv4Network = subnet.parse().unwrap_or_else(|e| panic!("{subnet}: {e}"));
            SubnetEnv::for_subnet(net, sub, 1500, false)
                .write(&subnet_file)
                .unwrap_or_else(|e| panic!("subnet.env: {e}"));
        }
        let cgroup_parent = format!("/skiff-test/{name}");
        let installed = matches!(setup.network, NodeNetwork::Installed);
        let (conf_dir, cni_bin, subnet_file, mounts) = if installed {
            let cgroup = Path::new(crate::cgroup::CGROUP2_ROOT).join(&cgroup_parent[1..]);
            std::fs::create_dir_all(&cgroup)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
            let m = NodeMounts::new(&dir.path, &cgroup);
            let p = PathBuf::from;
            (
                p("/etc/cni/net.d"),
                p("/opt/cni/bin"),
                p("/run/skiff/subnet.env"),
                Some(m),
            )
        } else {
            let conf_dir = dir.path.join("net.d");
            std::fs::create_dir_all(&conf_dir).unwrap_or_else(|e| panic!("{e}"));
            let bridge = bridge_name(&name);
            let conflist = json!({"cniVersion": "1.0.0", "name": "skiff", "plugins": [
                {"type": "skiff-cni", "bridge": bridge, "subnetFile": subnet_file, "dataDir": dir.path.join("cni")},
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ]});
            std::fs::write(conf_dir.join("10-skiff.conflist"), conflist.to_string())
                .unwrap_or_else(|e| panic!("conflist: {e}"));
            (conf_dir, bin_dir(), subnet_file, None)
        };
        let mntns = mounts.as_ref().map(NodeMounts::path);
        let containerd =
            Containerd::start_with_mounts(ns, &dir.path.join("containerd"), mntns.clone());
        let roles = match setup.network {
            NodeNetwork::Fixed(_) | NodeNetwork::Installed => "kubelet",
            NodeNetwork::Overlay { .. } => "kubelet,proxy,overlay,dns",
        };
        let mut args: Vec<String> = vec!["join".to_string()];
        args.extend(setup.join.iter().cloned());
        args.extend(
            [
                "--roles",
                roles,
                "--node-name",
                &name,
                "--node-ip",
                setup.ip,
                "--kubeconfig",
                &dir.path.join("node/kubeconfig").display().to_string(),
                "--containerd",
                &containerd.socket.display().to_string(),
                "--root-dir",
                &dir.path.join("kubelet").display().to_string(),
                "--pod-log-dir",
                &dir.path.join("logs").display().to_string(),
                "--cni-conf-dir",
                &conf_dir.display().to_string(),
                "--cni-bin-dir",
                &cni_bin.display().to_string(),
                "--cni-bin-dir",
                "/usr/lib/cni",
                "--cgroup-parent",
                &cgroup_parent,
                "--insecure-registry",
                setup.registry,
                "--subnet-file",
                &subnet_file.display().to_string(),
                "--node-lease-renew-seconds",
                "2",
                "--kubelet-port",
                &free_port().to_string(),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let mut pins = None;
        if let NodeNetwork::Overlay { etcd, ip6, ip_masq } = setup.network {
            // The proxy translates the connections of this node's pods:
            // runc puts them below the cgroup parent in the v2 hierarchy too.
            let cgroup = Path::new(crate::cgroup::CGROUP2_ROOT).join(&cgroup_parent[1..]);
            std::fs::create_dir_all(&cgroup)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
            let p = crate::PinDir::new();
            args.extend(etcd.iter().cloned());
            if ip_masq {
                // As Flannel is deployed: pod traffic that leaves the pod
                // network (to the apiserver's host) is masqueraded.
                args.push("--ip-masq".to_string());
            }
            args.extend(
                [
                    "--iface",
                    "eth0",
                    "--cgroup",
                    &cgroup.display().to_string(),
                    "--bpffs",
                    &p.path.display().to_string(),
                    // The overlay's fast path goes on this node's bridge
                    // and delivers to the pods its plugin recorded.
                    "--bridge",
                    &bridge_name(&name),
                    "--cni-records",
                    &dir.path.join("cni/skiff").display().to_string(),
                    // Nothing leaves the test's namespaces: names outside
                    // the cluster domain are refused, not forwarded.
                    "--dns-upstream",
                    "none",
                    "--dns-listen",
                    setup.ip,
                    "--dns-listen",
                    ip6,
                ]
                .map(String::from),
            );
            pins = Some(p);
        }
        let mut node = Self {
            name,
            agent: None,
            containerd,
            dir,
            ip: setup.ip.to_string(),
            extra_args: Vec::new(),
            pins,
            args,
            netns: ns.path(),
            mounts,
        };
        node.start_agent();
        node
    }

    /// Starts the agent; one still running is stopped first, as a node
    /// restarts it (the new one needs its ports).
    pub fn start_agent(&mut self) {
        drop(self.agent.take());
        let n = std::fs::read_dir(&self.dir.path)
            .map(|d| d.count())
            .unwrap_or(0);
        self.agent = Some(
            Spawn::new(bin("skiff-agent"))
                .args(&self.args)
                .args(&self.extra_args)
                .netns_path(Some(&self.netns))
                .mntns_path(self.mounts.as_ref().map(NodeMounts::path).as_deref())
                .env("RUST_LOG", "info,skiff_agent=debug")
                .log_to(&self.dir.path.join(format!("agent-{n}.log")))
                .start(),
        );
    }

    /// Restarts the agent ([`KubeletNode::start_agent`]) and waits until
    /// `/readyz` answers 200 (each role's first sync done).
    pub fn restart_agent(&mut self) {
        self.start_agent();
        crate::wait_for("the restarted agent ready", Duration::from_secs(30), || {
            try_agent_get(&self.netns, "/readyz").filter(|r| r.ends_with("\n200"))
        });
    }

    /// The roles the agent runs from its next (re)start.
    pub fn set_roles(&mut self, roles: &str) {
        if let Some(i) = self.args.iter().position(|a| a == "--roles") {
            self.args[i + 1] = roles.to_string();
        }
    }

    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// The agent's `/metrics`, from its default loopback address in the
    /// node's network namespace.
    pub fn metrics(&self) -> String {
        Spawn::new("curl")
            .args(["-sf", "http://127.0.0.1:10249/metrics"])
            .netns_path(Some(&self.netns))
            .try_output()
            .unwrap_or_else(|e| panic!("scraping the agent: {e}"))
    }

    /// The agent's answer at a health path (`/readyz?verbose`, say): the
    /// body, then the status code on a line of its own.
    pub fn health(&self, path: &str) -> String {
        agent_get(&self.netns, path)
    }
}

/// What an agent's metrics port (its default loopback address in the
/// namespace at `netns`) answers at `path`: the body, then the status
/// code on a line of its own.
pub fn agent_get(netns: &str, path: &str) -> String {
    ask_agent(netns, path).unwrap_or_else(|e| panic!("asking the agent for {path}: {e}"))
}

/// [`agent_get`], or None while the agent does not answer (not yet
/// listening, say).
pub fn try_agent_get(netns: &str, path: &str) -> Option<String> {
    ask_agent(netns, path).ok()
}

fn ask_agent(netns: &str, path: &str) -> Result<String, String> {
    Spawn::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:10249{path}"),
        ])
        .netns_path(Some(netns))
        .try_output()
}

/// The value of the first sample of `name` whose line holds every one of
/// `labels`, in a Prometheus text exposition.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.agent_log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- agent log of {} (last 80 lines) ---\n{}",
                self.name,
                lines[lines.len().saturating_sub(80)..].join("\n")
            );
            let logs = Spawn::new("sh")
                .args([
                    "-c",
                    &format!(
                        "for f in $(find {} -name '*.log'); do echo \"== $f\"; tail -20 $f; done",
                        self.dir.path.join("logs").display()
                    ),
                ])
                .try_output()
                .unwrap_or_default();
            eprintln!("--- container logs ---\n{logs}");
        }
        if let Some(mut a) = self.agent.take() {
            a.kill_now();
        }
        self.containerd.stop();
        // Unpinning detaches the proxy's programs from the node's cgroup.
        self.pins.take();
        unmount_under(&self.dir.path);
        // runc's cgroups of this node, in every v1 hierarchy.
        if let Ok(ctrls) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in ctrls.flatten() {
                let p = c.path().join("skiff-test").join(&self.name);
                crate::sweep::remove_cgroup_tree(&p);
            }
        }
    }
}

/// The pods' bridge the harness configures for node `name`.
fn bridge_name(name: &str) -> String {
    format!("cni{}", &name[name.len().saturating_sub(6)..])
}

/// One node with its own control plane and registry, in a namespace of
/// its own: the kubelet's and the workloads' tests. Dropped in field
/// order: the node (its pods) first, the namespace last.
pub struct OneNode {
    pub node: KubeletNode,
    /// `<registry>/busybox:1.36`.
    pub image: String,
    pub cp: ControlPlane,
    registry: Registry,
    pub ns: Netns,
}

impl OneNode {
    /// The node at `ip` with pod subnet `subnet`, registered and Ready.
    pub fn start(ip: &str, subnet: &str) -> Self {
        Self::start_with(ip, subnet, &[])
    }

    /// As [`OneNode::start`], with `control` flags for `skiff-control`.
    pub fn start_with(ip: &str, subnet: &str, control: &[&str]) -> Self {
        let ns = Netns::new();
        ns.add_local_link("eth0", &[&format!("{ip}/24")]);
        let cp = ControlPlane::start_in(Some(&ns), control);
        let registry = Registry::start_in(&ns);
        let image = registry.push(&ns, "busybox", "busybox:1.36");
        let node = KubeletNode::start(&ns, ip, subnet, &cp, &registry.addr);
        wait_for("the node to be Ready", Duration::from_secs(30), || {
            let s = cp.jsonpath(
                &["node", &node.name],
                "{.status.conditions[?(@.type==\"Ready\")].status}",
            );
            (s == "True").then_some(())
        });
        Self {
            node,
            image,
            cp,
            registry,
            ns,
        }
    }

    /// Another node of the same cluster at `ip` (on the same link) with
    /// pod subnet `subnet`, registered and Ready.
    pub fn second_node(&self, ip: &str, subnet: &str) -> KubeletNode {
        self.ns
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        let node = KubeletNode::start(&self.ns, ip, subnet, &self.cp, &self.registry.addr);
        wait_for(
            "the second node to be Ready",
            Duration::from_secs(30),
            || {
                let s = self.cp.jsonpath(
                    &["node", &node.name],
                    "{.status.conditions[?(@.type==\"Ready\")].status}",
                );
                (s == "True").then_some(())
            },
        );
        node
    }
}
