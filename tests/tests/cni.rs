//! skiff-cni called as a runtime calls it, inside a node namespace of the
//! test's own, against a subnet file the test writes (the overlay's part is
//! tested in overlay.rs): concurrency, crashes and GC, errors by the spec's
//! codes, idempotent DEL, CHECK, version negotiation, STATUS, and chaining
//! with the reference portmap and loopback plugins.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use skiff_tests::cni::{Call, Conflist, Reply, ip_of, result_ip};
use skiff_tests::netns::veth;
use skiff_tests::{Netns, Spawn, TempDir, bin, unique, wait_for};

/// A node namespace with a subnet file for `subnet` (`10.77.0.0/24`).
struct Node {
    ns: Netns,
    dir: TempDir,
}

impl Node {
    fn new(subnet: &str) -> Self {
        let n = Self {
            ns: Netns::new(),
            dir: TempDir::new(),
        };
        n.write_subnet_file(subnet);
        n
    }

    fn subnet_file(&self) -> PathBuf {
        self.dir.path.join("subnet.env")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path.join("cni")
    }

    fn write_subnet_file(&self, subnet: &str) {
        let (net, len) = subnet.split_once('/').unwrap_or((subnet, "24"));
        let gw = net
            .rsplit_once('.')
            .map(|(a, _)| format!("{a}.1"))
            .unwrap_or_default();
        std::fs::write(
            self.subnet_file(),
            format!("FLANNEL_NETWORK=10.77.0.0/16\nFLANNEL_SUBNET={gw}/{len}\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "testnet",
            "type": "skiff-cni",
            "subnetFile": self.subnet_file(),
            "dataDir": self.data_dir(),
        })
    }

    fn call<'a>(&'a self, command: &'a str, id: &'a str, netns: &'a str) -> Call<'a> {
        Call {
            node: &self.ns,
            command,
            container_id: id,
            netns,
            ifname: "eth0",
        }
    }

    fn run(&self, command: &str, id: &str, pod: &Netns) -> Reply {
        let path = pod.path();
        self.call(command, id, &path)
            .exec(&bin("skiff-cni"), &self.conf("1.1.0"))
    }

    /// Addresses recorded as allocated, with their owners.
    fn allocations(&self) -> BTreeSet<(String, String)> {
        let dir = self.data_dir().join("testnet");
        std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.parse::<std::net::IpAddr>().ok()?;
                let text = std::fs::read_to_string(e.path()).ok()?;
                Some((name, text.lines().next()?.to_string()))
            })
            .collect()
    }

    /// Every file under the data dir with its content, and the node's
    /// links: what a refused call must leave as it was.
    fn state(&self) -> (BTreeSet<String>, String) {
        let dir = self.data_dir().join("testnet");
        let files = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                format!("{}={text}", e.file_name().to_string_lossy())
            })
            .collect();
        (files, self.links())
    }

    fn links(&self) -> String {
        self.ns
            .exec(&["ip", "-o", "link"])
            .lines()
            .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn host_veths(&self) -> usize {
        self.links()
            .split(' ')
            .filter(|l| l.starts_with("skv"))
            .count()
    }
}

#[test]
fn a_dual_stack_node_gives_pods_an_address_of_each_family_that_they_reach_each_other_on() {
    let node = Node::new("10.77.5.0/24");
    let mut env = std::fs::read_to_string(node.subnet_file()).unwrap_or_default();
    env += "FLANNEL_IPV6_NETWORK=fd00:77::/56\nFLANNEL_IPV6_SUBNET=fd00:77:0:5::1/64\n";
    std::fs::write(node.subnet_file(), env).unwrap_or_else(|e| panic!("{e}"));
    let pods = [Netns::new(), Netns::new()];
    let plugin = bin("skiff-cni");
    let adds: Vec<Reply> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| node.run("ADD", &format!("d{i}"), p))
        .collect();
    for a in &adds {
        assert!(a.ok, "{}", a.stdout);
    }
    let res = adds[0].json();
    assert_eq!(res["ips"].as_array().map(Vec::len), Some(2), "{res}");
    let (a6, b6) = (result_ip(&res, true), result_ip(&adds[1].json(), true));
    assert!(a6.starts_with("fd00:77:0:5::") && a6 != b6, "{a6} {b6}");
    assert!(
        res["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["gateway"] == "fd00:77:0:5::1" && i["interface"] == 2),
        "{res}"
    );
    assert!(
        res["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["dst"] == "::/0" && r["gw"] == "fd00:77:0:5::1"),
        "{res}"
    );
    let shown = pods[0].exec(&[
        "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global",
    ]);
    assert!(shown.contains(&format!("{a6}/64")), "{shown}");
    assert!(!shown.contains("tentative"), "usable at once: {shown}");
    let bridge6 = node
        .ns
        .exec(&["ip", "-6", "-o", "addr", "show", "dev", "cni0"]);
    assert!(
        bridge6.contains("fd00:77:0:5::1/64"),
        "the bridge holds the IPv6 gateway: {bridge6}"
    );
    // and a link-local address usable at once, for the node's neighbour
    // solicitations towards pods (overlay.rs shows why).
    assert!(
        bridge6
            .lines()
            .any(|l| l.contains("fe80::1/64") && !l.contains("tentative")),
        "{bridge6}"
    );
    assert_eq!(node.allocations().len(), 4, "{:?}", node.allocations());

    // Pod to pod over IPv6 through the bridge, and pod to its gateway.
    let mut server = Spawn::new(bin("skiff-probe"))
        .args(["serve-tcp", &format!("[{b6}]:80"), "%peer"])
        .netns(&pods[1])
        .start();
    assert_eq!(server.ask(""), "ready");
    let out = Spawn::new(bin("skiff-probe"))
        .args(["tcp", &format!("[{b6}]:80"), "3"])
        .netns(&pods[0])
        .output();
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        v["answers"][&a6], 3,
        "the peer is the pod's own IPv6 address: {out}"
    );
    let mut gw_server = Spawn::new(bin("skiff-probe"))
        .args(["serve-tcp", "[fd00:77:0:5::1]:81", "node"])
        .netns(&node.ns)
        .start();
    assert_eq!(gw_server.ask(""), "ready");
    let out = Spawn::new(bin("skiff-probe"))
        .args(["tcp", "[fd00:77:0:5::1]:81", "2"])
        .netns(&pods[1])
        .output();
    assert!(out.contains("\"node\":2"), "{out}");

    // CHECK sees both addresses; without the IPv6 one it says which.
    let path = pods[0].path();
    let mut conf = node.conf("1.1.0");
    conf["prevResult"] = res.clone();
    let check = node.call("CHECK", "d0", &path).exec(&plugin, &conf);
    assert!(check.ok, "{}", check.stdout);
    pods[0].ip(&["addr", "del", &format!("{a6}/64"), "dev", "eth0"]);
    let check = node.call("CHECK", "d0", &path).exec(&plugin, &conf);
    assert_eq!(check.code(), Some(102), "{}", check.stdout);
    assert!(check.stdout.contains(&a6), "{}", check.stdout);

    for (i, p) in pods.iter().enumerate() {
        let del = node.run("DEL", &format!("d{i}"), p);
        assert!(del.ok, "{}", del.stdout);
    }
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());

    // Bad dual-stack configuration is refused by name.
    let pod = Netns::new();
    let pod_path = pod.path();
    for (extra, field) in [
        (
            json!({"subnet": "10.77.6.0/24", "ipv6Subnet": "10.77.7.0/24"}),
            "ipv6Subnet",
        ),
        (json!({"ipv6Subnet": "fd00:78::/64"}), "subnet"),
    ] {
        let mut conf = node.conf("1.1.0");
        for (k, v) in extra.as_object().into_iter().flatten() {
            conf[k] = v.clone();
        }
        let r = node.call("ADD", "bad", &pod_path).exec(&plugin, &conf);
        assert_eq!(r.code(), Some(7), "{extra}: {}", r.stdout);
        assert!(r.stdout.contains(field), "{extra}: {}", r.stdout);
    }
    assert!(node.allocations().is_empty());
}

fn pod_addr(pod: &Netns) -> String {
    pod.exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
}

#[test]
fn two_hundred_concurrent_adds_get_distinct_addresses() {
    let node = Node::new("10.77.3.0/24");
    let pods: Vec<Netns> = (0..200).map(|_| Netns::new()).collect();
    let ids: Vec<String> = (0..200).map(|i| format!("c{i}")).collect();
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .zip(&ids)
            .map(|(p, id)| {
                let node = &node;
                s.spawn(move || node.run("ADD", id, p))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let mut ips = HashSet::new();
    for (r, p) in replies.iter().zip(&pods) {
        assert!(r.ok, "{} {}", r.stdout, r.stderr);
        let ip = ip_of(r);
        assert!(
            pod_addr(p).contains(&format!("{ip}/24")),
            "{ip}: {}",
            pod_addr(p)
        );
        ips.insert(ip);
    }
    assert_eq!(ips.len(), 200, "every ADD got its own address");
    assert!(!ips.contains("10.77.3.1") && !ips.contains("10.77.3.0"));
    assert_eq!(node.allocations().len(), 200);
    assert_eq!(node.host_veths(), 200);

    std::thread::scope(|s| {
        for (p, id) in pods.iter().zip(&ids) {
            let node = &node;
            s.spawn(move || {
                let r = node.run("DEL", id, p);
                assert!(r.ok, "{} {}", r.stdout, r.stderr);
            });
        }
    });
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert_eq!(node.host_veths(), 0);
}

#[test]
fn adds_killed_midway_then_gc_leave_nothing_for_containers_that_do_not_exist() {
    let node = Node::new("10.77.4.0/24");
    let pods: Vec<Netns> = (0..60).map(|_| Netns::new()).collect();
    let conf = node.conf("1.1.0").to_string();
    // Start each ADD and kill it after a pseudo-random delay of up to
    // 12 ms (a whole ADD takes a few): some finish, some die before,
    // during or after claiming an address or making their veth.
    let mut seed: u64 = 0x5eed_1234;
    let mut live = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let id = format!("k{i}");
        let mut proc = Spawn::new(bin("skiff-cni"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &id)
            .env("CNI_NETNS", &p.path())
            .env("CNI_IFNAME", "eth0")
            .netns(&node.ns)
            .start_with_input(conf.as_bytes());
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_micros((seed >> 33) % 12_000));
        proc.kill_now();
        let (code, out) = proc.finish();
        if code == Some(0) && out.contains("\"ips\"") {
            live.push(id);
        }
    }
    eprintln!("{} of 60 ADDs finished before their kill", live.len());
    let killed = 60 - live.len();
    assert!(killed > 0, "no ADD was killed: the delays are too long");
    assert!(
        !live.is_empty(),
        "every ADD was killed: the delays are too short"
    );

    // The runtime knows only the containers whose ADD succeeded.
    let mut gc = node.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = live
        .iter()
        .map(|id| json!({"containerID": id, "ifname": "eth0"}))
        .collect();
    let r = node.call("GC", "", "").exec(&bin("skiff-cni"), &gc);
    assert!(r.ok, "GC: {} {}", r.stdout, r.stderr);
    let owners: BTreeSet<String> = node.allocations().into_iter().map(|(_, o)| o).collect();
    assert_eq!(
        owners,
        live.iter().cloned().collect(),
        "{killed} ADDs were killed"
    );
    assert_eq!(node.host_veths(), live.len(), "{}", node.links());
    let leftovers: Vec<String> = std::fs::read_dir(node.data_dir().join("testnet"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // GC kept what is live, and the node still hands out addresses.
    let fresh = Netns::new();
    let r = node.run("ADD", "after-gc", &fresh);
    assert!(r.ok, "{}", r.stdout);
    assert!(
        !node
            .allocations()
            .iter()
            .filter(|(_, o)| o != "after-gc")
            .any(|(ip, _)| ip == &ip_of(&r))
    );
}

#[test]
fn bad_input_gets_the_spec_error_code_and_changes_nothing() {
    let node = Node::new("10.77.5.0/29");
    let pod = Netns::new();
    let path = pod.path();
    let plugin = bin("skiff-cni");
    // One good ADD first, so "nothing changed" has something to keep.
    let first = node.run("ADD", "keep", &pod);
    assert!(first.ok, "{}", first.stdout);
    let other = Netns::new();
    let other_path = other.path();
    let good = node.conf("1.1.0").to_string();
    let before = node.state();

    let cases: Vec<(&str, Reply, u64)> = vec![
        (
            "malformed JSON",
            node.call("ADD", "x1", &other_path)
                .exec_raw(&plugin, b"{\"cniVersion\": ", &[]),
            6,
        ),
        (
            "a field of the wrong type",
            node.call("ADD", "x1", &other_path).exec_raw(
                &plugin,
                br#"{"cniVersion":"1.1.0","name":"testnet","mtu":"big"}"#,
                &[],
            ),
            7,
        ),
        (
            "no name",
            node.call("ADD", "x1", &other_path).exec_raw(
                &plugin,
                br#"{"cniVersion":"1.1.0","type":"skiff-cni"}"#,
                &[],
            ),
            7,
        ),
        (
            "an unknown cniVersion",
            node.call("ADD", "x1", &other_path).exec(
                &plugin,
                &json!({"cniVersion":"9.9.9","name":"testnet","type":"skiff-cni"}),
            ),
            1,
        ),
        (
            "no CNI_COMMAND",
            node.call("ADD", "x1", &other_path).exec_raw(
                &plugin,
                good.as_bytes(),
                &[("CNI_COMMAND", "")],
            ),
            4,
        ),
        (
            "an unknown CNI_COMMAND",
            node.call("BOGUS", "x1", &other_path)
                .exec_raw(&plugin, good.as_bytes(), &[]),
            4,
        ),
        (
            "no CNI_CONTAINERID",
            node.call("ADD", "", &other_path)
                .exec_raw(&plugin, good.as_bytes(), &[]),
            4,
        ),
        (
            "no CNI_NETNS",
            node.call("ADD", "x1", "")
                .exec_raw(&plugin, good.as_bytes(), &[]),
            4,
        ),
        (
            "no CNI_IFNAME",
            node.call("ADD", "x1", &other_path).exec_raw(
                &plugin,
                good.as_bytes(),
                &[("CNI_IFNAME", "")],
            ),
            4,
        ),
        (
            "a netns that does not exist",
            node.call("ADD", "x1", "/run/netns/skiff-no-such-ns")
                .exec_raw(&plugin, good.as_bytes(), &[]),
            3,
        ),
        (
            "an interface name taken in the netns",
            node.call("ADD", "x2", &path)
                .exec_raw(&plugin, good.as_bytes(), &[]),
            101,
        ),
    ];
    for (what, r, code) in cases {
        assert_eq!(r.code(), Some(code), "{what}: {} {}", r.stdout, r.stderr);
        assert!(
            r.json()["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {}",
            r.stdout
        );
        assert_eq!(node.state(), before, "{what} changed something");
    }
    let e = node
        .call("ADD", "x1", &other_path)
        .exec_raw(&plugin, b"{", &[("CNI_CONTAINERID", "")]);
    assert_eq!(
        e.json()["cniVersion"],
        "1.1.0",
        "errors answer in a version: {}",
        e.stdout
    );

    // The subnet file is not there yet (the overlay has not started):
    // try again later, not a failure.
    let mut early = node.conf("1.1.0");
    early["subnetFile"] = json!(node.dir.path.join("not-yet.env"));
    let r = node.call("ADD", "x1", &other_path).exec(&plugin, &early);
    assert_eq!(r.code(), Some(11), "{}", r.stdout);
    assert_eq!(node.state(), before);

    // A /29 has 5 addresses for pods: 4 more, then the subnet is full.
    let pods: Vec<Netns> = (0..4).map(|_| Netns::new()).collect();
    for (i, p) in pods.iter().enumerate() {
        let r = node.run("ADD", &format!("fill{i}"), p);
        assert!(r.ok, "{}", r.stdout);
    }
    let full = node.state();
    let r = node.run("ADD", "one-too-many", &other);
    assert_eq!(r.code(), Some(100), "{}", r.stdout);
    assert!(
        r.json()["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("no IP addresses available"),
        "{}",
        r.stdout
    );
    assert_eq!(node.state(), full, "an exhausted ADD left something behind");
    assert_eq!(
        other.exec(&["ip", "-o", "link"]).lines().count(),
        1,
        "only lo in the refused pod"
    );
    let status = node
        .call("STATUS", "", "")
        .exec(&plugin, &node.conf("1.1.0"));
    assert_eq!(
        status.code(),
        Some(50),
        "STATUS with a full subnet: {}",
        status.stdout
    );
}

#[test]
fn del_is_idempotent_and_check_sees_what_changed() {
    let node = Node::new("10.77.6.0/24");
    let plugin = bin("skiff-cni");
    let pod = Netns::new();
    let path = pod.path();
    let add = node.run("ADD", "c1", &pod);
    assert!(add.ok, "{}", add.stdout);
    let mut conf = node.conf("1.1.0");
    conf["prevResult"] = add.json();
    let check = node.call("CHECK", "c1", &path).exec(&plugin, &conf);
    assert!(check.ok, "CHECK right after ADD: {}", check.stdout);

    // Someone removes the pod's address: CHECK says so.
    let ip = ip_of(&add);
    pod.ip(&["addr", "del", &format!("{ip}/24"), "dev", "eth0"]);
    let check = node.call("CHECK", "c1", &path).exec(&plugin, &conf);
    assert_eq!(check.code(), Some(102), "{}", check.stdout);
    assert!(check.stdout.contains(&ip), "{}", check.stdout);

    for _ in 0..2 {
        let del = node.call("DEL", "c1", &path).exec(&plugin, &conf);
        assert!(del.ok, "DEL (twice): {}", del.stdout);
    }
    assert!(node.allocations().is_empty());
    assert_eq!(
        pod.exec(&["ip", "-o", "link"]).lines().count(),
        1,
        "eth0 went with DEL"
    );
    let never = node
        .call("DEL", "never-added", &path)
        .exec(&plugin, &node.conf("1.1.0"));
    assert!(never.ok, "DEL of an unknown container: {}", never.stdout);
    let no_netns = node
        .call("DEL", "never-added", "")
        .exec(&plugin, &node.conf("1.1.0"));
    assert!(no_netns.ok, "DEL without CNI_NETNS: {}", no_netns.stdout);

    // The pod's namespace is gone before DEL: the address and the host
    // veth are still freed.
    let gone = Netns::new();
    let gone_path = gone.path();
    let add = node.run("ADD", "c2", &gone);
    assert!(add.ok, "{}", add.stdout);
    drop(gone);
    wait_for(
        "the veth to go with its namespace",
        Duration::from_secs(5),
        || (node.host_veths() == 0).then_some(()),
    );
    let del = node
        .call("DEL", "c2", &gone_path)
        .exec(&plugin, &node.conf("1.1.0"));
    assert!(del.ok, "DEL with the netns gone: {}", del.stdout);
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
}

#[test]
fn negotiates_versions_and_reports_status() {
    let node = Node::new("10.77.7.0/24");
    let plugin = bin("skiff-cni");
    let v = node
        .call("VERSION", "", "")
        .exec_raw(&plugin, br#"{"cniVersion":"1.0.0"}"#, &[]);
    assert!(v.ok, "{}", v.stdout);
    assert_eq!(v.json()["cniVersion"], "1.0.0");
    assert_eq!(
        v.json()["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );

    for (version, has_ip_version) in [
        ("0.3.1", true),
        ("0.4.0", true),
        ("1.0.0", false),
        ("1.1.0", false),
    ] {
        let pod = Netns::new();
        let path = pod.path();
        let id = unique("v");
        let mut conf = node.conf(version);
        conf["dns"] = json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]});
        let r = node.call("ADD", &id, &path).exec(&plugin, &conf);
        assert!(r.ok, "{version}: {}", r.stdout);
        let res = r.json();
        assert_eq!(res["dns"]["nameservers"], json!(["10.96.0.10"]), "{res}");
        assert_eq!(res["cniVersion"], version);
        assert_eq!(
            res["ips"][0].get("version").is_some(),
            has_ip_version,
            "{version}: {res}"
        );
        assert_eq!(res["ips"][0]["gateway"], "10.77.7.1");
        assert_eq!(res["routes"][0]["dst"], "0.0.0.0/0");
        let ifaces = res["interfaces"].as_array().cloned().unwrap_or_default();
        let idx = res["ips"][0]["interface"].as_u64().unwrap_or(99) as usize;
        assert_eq!(ifaces[idx]["name"], "eth0");
        assert_eq!(ifaces[idx]["sandbox"], path.as_str());
        let mac = ifaces[idx]["mac"].as_str().unwrap_or_default().to_string();
        assert!(
            pod.exec(&["ip", "link", "show", "eth0"]).contains(&mac),
            "{res}"
        );
        assert!(
            pod.exec(&["ip", "link", "show", "eth0"])
                .contains("mtu 1400"),
            "MTU from the subnet file"
        );
        let del = node
            .call("DEL", &id, &path)
            .exec(&plugin, &node.conf(version));
        assert!(del.ok, "{}", del.stdout);
    }

    let status = node
        .call("STATUS", "", "")
        .exec(&plugin, &node.conf("1.1.0"));
    assert!(status.ok, "STATUS: {}", status.stdout);
    std::fs::remove_file(node.subnet_file()).unwrap_or_else(|e| panic!("{e}"));
    let status = node
        .call("STATUS", "", "")
        .exec(&plugin, &node.conf("1.1.0"));
    assert_eq!(
        status.code(),
        Some(50),
        "STATUS before the overlay is up: {}",
        status.stdout
    );
}

#[test]
fn chains_with_the_reference_portmap_and_loopback_plugins() {
    let node = Node::new("10.77.8.0/24");
    // A client host next to the node.
    let client = Netns::new();
    veth(
        &node.ns,
        "eth0",
        "172.30.9.1/24",
        &client,
        "eth0",
        "172.30.9.2/24",
    );
    node.ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let mut list = Conflist::new(
        "testnet",
        "1.0.0",
        vec![
            json!({"type": "skiff-cni", "subnetFile": node.subnet_file(), "dataDir": node.data_dir()}),
            json!({"type": "portmap", "capabilities": {"portMappings": true}}),
            json!({"type": "loopback"}),
        ],
    );
    list.runtime_config =
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]});
    let pod = Netns::new();
    let path = pod.path();
    let call = Call {
        node: &node.ns,
        command: "ADD",
        container_id: "chained",
        netns: &path,
        ifname: "eth0",
    };
    let result = call
        .add(&list)
        .unwrap_or_else(|e| panic!("chained ADD: {e}"));
    let ip = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(ip.starts_with("10.77.8."), "{result}");
    assert!(
        pod.exec(&["ip", "link", "show", "lo"]).contains("UP"),
        "loopback plugin ran"
    );
    // CHECK of our plugin with the chain's result (portmap 1.1.1's own
    // CHECK fails on hosts without ip6tables NAT chains, whoever ran first).
    let ours = Conflist::new("testnet", "1.0.0", list.plugins[..1].to_vec());
    call.check(&ours, &result)
        .unwrap_or_else(|e| panic!("CHECK: {e}"));

    let mut server = Spawn::new(bin("skiff-probe"))
        .args(["serve-tcp", &format!("{ip}:80"), "pod"])
        .netns(&pod)
        .start();
    assert_eq!(server.ask(""), "ready");
    let out = Spawn::new(bin("skiff-probe"))
        .args(["tcp", "172.30.9.1:8080", "3"])
        .netns(&client)
        .output();
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        v["answers"]["pod"], 3,
        "hostPort 8080 → pod:80 through portmap: {out}"
    );

    call.del(&list, Some(&result))
        .unwrap_or_else(|e| panic!("chained DEL: {e}"));
    assert!(node.allocations().is_empty());
    let out = Spawn::new(bin("skiff-probe"))
        .args(["tcp", "172.30.9.1:8080", "1"])
        .netns(&client)
        .output();
    assert!(
        !out.contains("\"pod\""),
        "the port mapping went with DEL: {out}"
    );
}
