//! A container's OCI runtime spec from its pod, its image config and the
//! pod's namespaces: pure, so the rules (Kubernetes' command/args over
//! ENTRYPOINT/CMD, env order, namespaces shared within the pod) are unit
//! tested.

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};

/// Paths of the namespaces the pod's containers share.
#[derive(Clone, Debug)]
pub struct PodNamespaces {
    pub net: String,
    pub ipc: String,
    pub uts: String,
}

/// The capabilities a container gets by default (containerd's and
/// Docker's default set).
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The process arguments: Kubernetes' rules over the image's
/// ENTRYPOINT and CMD (`command` replaces ENTRYPOINT and drops CMD; `args`
/// replaces CMD).
pub fn argv(c: &Container, image: &Value) -> Vec<String> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let entrypoint = strings(&image["Entrypoint"]);
    let cmd = strings(&image["Cmd"]);
    match (&c.command, &c.args) {
        (Some(command), Some(args)) => command.iter().chain(args).cloned().collect(),
        (Some(command), None) => command.clone(),
        (None, Some(args)) => entrypoint.into_iter().chain(args.iter().cloned()).collect(),
        (None, None) => entrypoint.into_iter().chain(cmd).collect(),
    }
}

/// Expands `$(VAR)` references from `env` ($$ escapes), as Kubernetes
/// does in command, args and env values.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Everything the spec needs beyond the pod and the image.
pub struct SpecInput<'a> {
    pub pod: &'a Pod,
    pub container: &'a Container,
    pub image_config: &'a Value,
    /// The resolved environment, in order (image env first).
    pub env: &'a [(String, String)],
    pub namespaces: &'a PodNamespaces,
    pub hostname: &'a str,
    pub cgroups_path: &'a str,
    /// Bind mounts (source, destination, read-only).
    pub mounts: &'a [(String, String, bool)],
}

fn parse_user(user: &str) -> (u32, u32) {
    let mut parts = user.splitn(2, ':');
    let uid = parts.next().and_then(|u| u.parse().ok()).unwrap_or(0);
    let gid = parts.next().and_then(|g| g.parse().ok()).unwrap_or(0);
    (uid, gid)
}

pub fn runtime_spec(i: &SpecInput) -> Value {
    let c = i.container;
    let args: Vec<String> = argv(c, i.image_config)
        .iter()
        .map(|a| expand(a, i.env))
        .collect();
    let env: Vec<String> = i.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let cwd = c
        .working_dir
        .clone()
        .or_else(|| i.image_config["WorkingDir"].as_str().map(String::from))
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".into());
    let sc = c.security_context.as_ref();
    let psc = i
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref());
    let (mut uid, mut gid) = parse_user(i.image_config["User"].as_str().unwrap_or(""));
    if let Some(u) = sc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|s| s.run_as_user))
    {
        uid = u as u32;
    }
    if let Some(g) = sc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|s| s.run_as_group))
    {
        gid = g as u32;
    }
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    let mut caps: Vec<String> = if privileged {
        all_caps()
    } else {
        DEFAULT_CAPS.iter().map(|s| s.to_string()).collect()
    };
    if let Some(cs) = sc.and_then(|s| s.capabilities.as_ref()) {
        let norm = |c: &String| {
            let c = c.to_uppercase();
            if c.starts_with("CAP_") {
                c
            } else {
                format!("CAP_{c}")
            }
        };
        let drop: Vec<String> = cs.drop.iter().flatten().map(norm).collect();
        if drop.iter().any(|d| d == "CAP_ALL") {
            caps.clear();
        } else {
            caps.retain(|c| !drop.contains(c));
        }
        for a in cs.add.iter().flatten().map(norm) {
            if a == "CAP_ALL" {
                caps = all_caps();
            } else if !caps.contains(&a) {
                caps.push(a);
            }
        }
    }
    let read_only = sc
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false);
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", if privileged { "rw" } else { "ro" }]}),
    ];
    for (src, dst, ro) in i.mounts {
        let mut opts = vec!["rbind", "rprivate"];
        opts.push(if *ro { "ro" } else { "rw" });
        mounts.push(json!({"destination": dst, "type": "bind", "source": src, "options": opts}));
    }
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(limits) = c.resources.as_ref().and_then(|r| r.limits.as_ref()) {
        if let Some(mem) = limits
            .get("memory")
            .and_then(|q| super::quantity::bytes(&q.0))
        {
            resources["memory"] = json!({"limit": mem});
        }
        if let Some(milli) = limits
            .get("cpu")
            .and_then(|q| super::quantity::millicores(&q.0))
        {
            resources["cpu"] = json!({"quota": milli * 100, "period": 100_000});
        }
    }
    if let Some(milli) = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("cpu"))
        .and_then(|q| super::quantity::millicores(&q.0))
    {
        // The kubelet's shares: 1024 per core, at least 2.
        let shares = (milli * 1024 / 1000).max(2);
        resources["cpu"]["shares"] = json!(shares);
    }
    // hostNetwork: the node's network and hostname (the runtime's own
    // namespaces), the pod's IPC.
    // hostPID: the node's PID namespace (the runtime's own).
    let pod_spec = i.pod.spec.as_ref();
    let host_network = pod_spec.and_then(|s| s.host_network).unwrap_or(false);
    let host_pid = pod_spec.and_then(|s| s.host_pid).unwrap_or(false);
    let mut namespaces = Vec::new();
    if !host_pid {
        namespaces.push(json!({"type": "pid"}));
    }
    namespaces.push(json!({"type": "mount"}));
    if !host_network {
        namespaces.push(json!({"type": "network", "path": i.namespaces.net}));
    }
    namespaces.push(json!({"type": "ipc", "path": i.namespaces.ipc}));
    if !host_network {
        namespaces.push(json!({"type": "uts", "path": i.namespaces.uts}));
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": i.cgroups_path,
        "resources": resources,
    });
    if !privileged {
        linux["maskedPaths"] = json!([
            "/proc/acpi",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware"
        ]);
        linux["readonlyPaths"] = json!([
            "/proc/asound",
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger"
        ]);
    }
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": !privileged && sc.and_then(|s| s.allow_privilege_escalation) != Some(true),
        },
        "root": {"path": "rootfs", "readonly": read_only},
        "hostname": i.hostname,
        "mounts": mounts,
        "linux": linux,
    });
    if host_network && let Some(m) = spec.as_object_mut() {
        // A hostname needs a UTS namespace of the container's own.
        m.remove("hostname");
    }
    spec
}

/// Every capability, in the kernel's numbering (index = number).
const ALL_CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capabilities in a `CapBnd:` mask (hex, from /proc/<pid>/status).
fn caps_in(mask_hex: &str) -> Vec<String> {
    let mask = u64::from_str_radix(mask_hex.trim(), 16).unwrap_or(u64::MAX);
    ALL_CAPS
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// What a privileged container gets: every capability this process may
/// hold (its bounding set), as containerd's CRI gives them; asking runc
/// for one outside it fails the start.
fn all_caps() -> Vec<String> {
    let bounding = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:").map(str::to_string))
        })
        .unwrap_or_default();
    caps_in(&bounding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_caps_are_those_of_the_bounding_set() {
        let all = caps_in("000001ffffffffff");
        assert_eq!(all.len(), 41);
        assert!(all.contains(&"CAP_BPF".to_string()));
        // A sandbox without CAP_SYS_RESOURCE (bit 24).
        let some = caps_in("000001fffeffffff");
        assert_eq!(some.len(), 40);
        assert!(!some.contains(&"CAP_SYS_RESOURCE".to_string()));
    }

    fn container(command: Option<&[&str]>, args: Option<&[&str]>) -> Container {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Container {
            name: "c".into(),
            command: command.map(v),
            args: args.map(v),
            ..Default::default()
        }
    }

    #[test]
    fn command_and_args_override_the_image_as_kubernetes_says() {
        let img = json!({"Entrypoint": ["/ep"], "Cmd": ["cmd"]});
        assert_eq!(argv(&container(None, None), &img), ["/ep", "cmd"]);
        assert_eq!(argv(&container(Some(&["/c"]), None), &img), ["/c"]);
        assert_eq!(argv(&container(None, Some(&["a"])), &img), ["/ep", "a"]);
        assert_eq!(
            argv(&container(Some(&["/c"]), Some(&["a"])), &img),
            ["/c", "a"]
        );
    }

    #[test]
    fn variables_expand_and_unknown_ones_stay() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("cost $5", &env), "cost $5");
    }

    #[test]
    fn the_spec_joins_the_pods_namespaces_and_drops_capabilities() {
        let pod = Pod::default();
        let mut c = container(Some(&["sh"]), None);
        c.security_context = Some(k8s_openapi::api::core::v1::SecurityContext {
            run_as_user: Some(1000),
            capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                drop: Some(vec!["NET_RAW".into()]),
                add: Some(vec!["NET_ADMIN".into()]),
            }),
            ..Default::default()
        });
        let ns = PodNamespaces {
            net: "/n".into(),
            ipc: "/i".into(),
            uts: "/u".into(),
        };
        let s = runtime_spec(&SpecInput {
            pod: &pod,
            container: &c,
            image_config: &json!({"User": "5:6"}),
            env: &[],
            namespaces: &ns,
            hostname: "p",
            cgroups_path: "/skiff/x",
            mounts: &[],
        });
        assert_eq!(s["process"]["user"], json!({"uid": 1000, "gid": 6}));
        let caps = s["process"]["capabilities"]["bounding"].to_string();
        assert!(
            !caps.contains("CAP_NET_RAW") && caps.contains("CAP_NET_ADMIN"),
            "{caps}"
        );
        assert!(
            s["linux"]["namespaces"]
                .to_string()
                .contains("\"path\":\"/n\"")
        );
        assert_eq!(s["hostname"], "p");

        // hostNetwork: no network or UTS namespace of the pod's, no hostname.
        let host = Pod {
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                host_network: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec_of = |pod: &Pod| {
            runtime_spec(&SpecInput {
                pod,
                container: &c,
                image_config: &json!({}),
                env: &[],
                namespaces: &ns,
                hostname: "p",
                cgroups_path: "/skiff/x",
                mounts: &[],
            })
        };
        let kinds = |s: &serde_json::Value| -> Vec<String> {
            s["linux"]["namespaces"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n["type"].as_str().map(String::from))
                .collect()
        };
        let s = spec_of(&host);
        assert_eq!(kinds(&s), ["pid", "mount", "ipc"]);
        assert!(s.get("hostname").is_none());

        // hostPID as well: the node's PID namespace too.
        let mut both = host.clone();
        if let Some(spec) = both.spec.as_mut() {
            spec.host_pid = Some(true);
        }
        assert_eq!(kinds(&spec_of(&both)), ["mount", "ipc"]);
    }
}
