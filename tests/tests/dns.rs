//! Cluster DNS: every node's `dns` role answers the cluster domain, and the
//! node's pods reach it through the `kube-dns` ClusterIP, which the node's
//! proxy sends to that node's own server.

use std::collections::BTreeSet;
use std::time::Duration;

use skiff_tests::cluster::{Cluster, node_ipv6};
use skiff_tests::control::ControlPlane;
use skiff_tests::netns::veth;
use skiff_tests::node::sample;
use skiff_tests::{Netns, Proc, Spawn, TempDir, bin, wait_for};

const KUBE_DNS: &str = "10.96.0.10";
/// Its address in the cluster's IPv6 service range.
const KUBE_DNS6: &str = "fd00:10:96::a";

/// Services of every kind, and two pods behind the headless one (one
/// naming itself with hostname and subdomain, one not).
fn manifests(c: &Cluster) -> String {
    let db = |name: &str, node: &str, hostname: bool| {
        let host = if hostname {
            format!("  hostname: {name}\n  subdomain: db\n")
        } else {
            String::new()
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: db}}\nspec:\n{host}  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: db, image: {}, command: [sleep, \"3600\"]}}\n---\n",
            c.busybox
        )
    };
    // Its resolver set by hand: dnsPolicy None.
    let custom = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: custom\n  labels: {{app: custom}}\nspec:\n  nodeName: {}\n  terminationGracePeriodSeconds: 1\n  dnsPolicy: \"None\"\n  dnsConfig:\n    nameservers: [{KUBE_DNS}]\n    searches: [db.default.svc.cluster.local]\n    options: [{{name: ndots, value: \"1\"}}]\n  containers:\n  - {{name: main, image: {}, command: [sleep, \"3600\"]}}\n---\n",
        c.nodes[1].name, c.busybox
    );
    let ips: Vec<String> = (1..=120)
        .map(|i| format!("\"10.99.{}.{}\"", i / 100, i % 100 + 1))
        .collect();
    format!(
        r#"{db0}{db1}{custom}apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {{app: web}}
  ports: [{{name: http, port: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: db}}
spec:
  clusterIP: None
  selector: {{app: db}}
  ports: [{{name: pg, port: 5432, targetPort: 15432}}]
---
apiVersion: v1
kind: Service
metadata: {{name: alias}}
spec: {{type: ExternalName, externalName: web.default.svc.cluster.local}}
---
apiVersion: v1
kind: Service
metadata: {{name: outside}}
spec: {{type: ExternalName, externalName: www.example.com}}
---
apiVersion: v1
kind: Service
metadata: {{name: many}}
spec: {{clusterIP: None}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: many-1
  labels: {{kubernetes.io/service-name: many}}
addressType: IPv4
endpoints: [{many}]
"#,
        db0 = db("db-0", &c.nodes[0].name, true),
        db1 = db("db-1", &c.nodes[1].name, false),
        many = ips
            .iter()
            .map(|ip| format!("{{addresses: [{ip}]}}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `dig` run in node `i`'s namespace against its server.
fn dig(c: &Cluster, i: usize, args: &[&str]) -> String {
    let server = format!("@{}", c.nodes[i].ip);
    let mut cmd = vec!["dig", &server, "+time=2", "+tries=2"];
    cmd.extend(args);
    c.ns(i).exec(&cmd)
}

fn short(c: &Cluster, i: usize, name: &str, t: &str) -> BTreeSet<String> {
    dig(c, i, &["+short", name, t])
        .lines()
        .map(String::from)
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn each_node_answers_the_cluster_domain_per_the_specification_and_its_pods_reach_it_by_the_kube_dns_service()
 {
    let mut c = Cluster::start(2);
    // The control plane made the Service; each node published itself.
    assert_eq!(
        c.cp.jsonpath(
            &["-n", "kube-system", "service", "kube-dns"],
            "{.spec.clusterIP} {.spec.clusterIPs[1]} {.spec.trafficDistribution}"
        ),
        format!("{KUBE_DNS} {KUBE_DNS6} PreferSameNode")
    );
    let published = |c: &Cluster| {
        c.cp.jsonpath(
            &[
                "-n",
                "kube-system",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=kube-dns",
            ],
            r#"{range .items[*]}{.metadata.name} {.endpoints[0].addresses[0]} {.endpoints[0].nodeName} {.metadata.ownerReferences[0].kind}{"\n"}{end}"#,
        )
        .lines()
        .map(String::from)
        .collect::<BTreeSet<String>>()
    };
    // A slice per family, each with the node's address of that family.
    let want: BTreeSet<String> = c
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            [
                format!("kube-dns-{0} {1} {0} Node", n.name, n.ip),
                format!("kube-dns-{0}-v6 {1} {0} Node", n.name, node_ipv6(i)),
            ]
        })
        .collect();
    wait_for(
        "each node's kube-dns endpoint",
        Duration::from_secs(60),
        || (published(&c) == want).then_some(()),
    );

    c.cp.apply(&manifests(&c)).unwrap_or_else(|e| panic!("{e}"));
    let db = c.ready_pods("app=db", 2);
    let ip_of = |name: &str| db.get(name).map(|p| p.ip.clone()).unwrap_or_default();
    let (db0, db1) = (ip_of("db-0"), ip_of("db-1"));
    let web_ip = c.cp.jsonpath(&["service", "web"], "{.spec.clusterIP}");
    let web_ip6 = c.cp.jsonpath(&["service", "web"], "{.spec.clusterIPs[1]}");
    let web = "web.default.svc.cluster.local.";

    for i in 0..2 {
        // Changes reach every node's zone within moments.
        wait_for(
            &format!("node {i} to answer for the headless Service's pods"),
            Duration::from_secs(20),
            || {
                (short(&c, i, "db.default.svc.cluster.local", "A") == set(&[&db0, &db1]))
                    .then_some(())
            },
        );
        assert_eq!(short(&c, i, web, "A"), set(&[&web_ip]));
        assert_eq!(short(&c, i, web, "AAAA"), set(&[&web_ip6]));
        assert_eq!(
            short(&c, i, &format!("_http._tcp.{web}"), "SRV"),
            set(&["0 100 80 web.default.svc.cluster.local."]),
            "the named port"
        );
        assert_eq!(short(&c, i, "-x", &web_ip), set(&[web]));
        assert_eq!(
            short(&c, i, "db-0.db.default.svc.cluster.local", "A"),
            set(&[&db0])
        );
        let dashed = format!("{}.db.default.svc.cluster.local.", db1.replace('.', "-"));
        assert_eq!(
            short(&c, i, "_pg._tcp.db.default.svc.cluster.local", "SRV"),
            set(&[
                "0 50 15432 db-0.db.default.svc.cluster.local.",
                &format!("0 50 15432 {dashed}"),
            ])
        );
        assert_eq!(
            short(&c, i, "-x", &db0),
            set(&["db-0.db.default.svc.cluster.local."])
        );
        assert_eq!(
            short(&c, i, "alias.default.svc.cluster.local", "A"),
            set(&[web, &web_ip]),
            "an ExternalName inside the zone is followed"
        );
        assert_eq!(
            short(&c, i, "outside.default.svc.cluster.local", "A"),
            set(&["www.example.com."])
        );
        assert_eq!(
            short(&c, i, "WeB.DeFault.SVC.Cluster.Local", "A"),
            set(&[&web_ip])
        );
        assert_eq!(
            short(&c, i, "10-1-2-3.any.pod.cluster.local", "A"),
            set(&["10.1.2.3"])
        );
        assert_eq!(
            short(&c, i, "dns-version.cluster.local", "TXT"),
            set(&["\"1.1.0\""])
        );
        let nx = dig(&c, i, &["nope.default.svc.cluster.local", "A"]);
        assert!(nx.contains("status: NXDOMAIN"), "{nx}");
        assert!(nx.contains("flags: qr aa rd"), "authoritative: {nx}");
        assert!(
            nx.contains("IN\tSOA\tns.dns.cluster.local. hostmaster.cluster.local."),
            "the SOA in the authority section: {nx}"
        );
        let nodata = dig(&c, i, &[web, "TXT"]);
        assert!(
            nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0,"),
            "NODATA: {nodata}"
        );
        assert!(nodata.contains("AUTHORITY: 1,"), "{nodata}");
        let refused = dig(&c, i, &["www.example.com", "A"]);
        assert!(
            refused.contains("status: REFUSED"),
            "no upstream here: {refused}"
        );
        // 120 addresses do not fit in UDP: truncated, then whole over TCP.
        let many = "many.default.svc.cluster.local";
        let tc = dig(&c, i, &["+ignore", "+bufsize=1232", many, "A"]);
        assert!(tc.contains(" tc "), "truncated over UDP: {tc}");
        assert_eq!(short(&c, i, many, "A").len(), 120, "whole over TCP");
        let edns = dig(&c, i, &[web, "A"]);
        assert!(
            edns.contains("; EDNS: version: 0, flags:; udp: 1232"),
            "{edns}"
        );
    }

    // Pods ask the kube-dns ClusterIP; the reply comes from their node.
    for (i, node) in c.nodes.iter().enumerate() {
        let log = c.run_script(
            &format!("ask-{i}"),
            &node.name,
            &format!(
                "nslookup {web} {KUBE_DNS}; nslookup db-0.db.default.svc.cluster.local {KUBE_DNS}; \
                 nslookup nope.default.svc.cluster.local {KUBE_DNS}; \
                 echo over-ipv6; nslookup db-0.db.default.svc.cluster.local {KUBE_DNS6}; echo done"
            ),
        );
        // The IPv6 ClusterIP reaches the node's server too.
        let (_, v6) = log
            .split_once("over-ipv6")
            .unwrap_or_else(|| panic!("{log}"));
        assert!(v6.contains(&format!("Address: {db0}")), "{log}");
        assert!(log.contains(&format!("Address: {web_ip}")), "{log}");
        assert!(log.contains(&format!("Address: {db0}")), "{log}");
        assert!(
            log.contains("can't find nope.default.svc.cluster.local: NXDOMAIN"),
            "{log}"
        );
        assert!(log.contains(&format!("Address:\t{KUBE_DNS}:53")), "{log}");
    }

    // The kubelet wrote each pod's resolver: ClusterFirst searches the
    // pod's namespace first, so short names reach Services.
    let exec = |pod: &str, cmd: &[&str]| {
        let mut args = vec!["exec", pod, "--"];
        args.extend(cmd);
        c.cp.kubectl_ok(&args)
    };
    assert_eq!(
        exec("db-0", &["cat", "/etc/resolv.conf"])
            .lines()
            .filter(|l| !l.starts_with("search"))
            .collect::<Vec<_>>(),
        [&*format!("nameserver {KUBE_DNS}"), "options ndots:5"]
    );
    let resolv = exec("db-0", &["cat", "/etc/resolv.conf"]);
    assert!(
        resolv.starts_with("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );
    let hosts = exec("db-0", &["cat", "/etc/hosts"]);
    assert!(
        hosts.contains(&format!("{db0}\tdb-0.db.default.svc.cluster.local\tdb-0\n")),
        "{hosts}"
    );
    assert_eq!(exec("db-0", &["hostname"]).trim(), "db-0");
    // busybox's nslookup tries every search domain, and exits 1 when any
    // of them is NXDOMAIN.
    let short_name = exec("db-0", &["sh", "-c", "nslookup web; true"]);
    assert!(
        short_name.contains(&format!("Address: {web_ip}")),
        "{short_name}"
    );
    c.ready_pods("app=custom", 1);
    assert_eq!(
        exec("custom", &["cat", "/etc/resolv.conf"]),
        format!("search db.default.svc.cluster.local\nnameserver {KUBE_DNS}\noptions ndots:1\n")
    );
    let custom = exec("custom", &["sh", "-c", "nslookup db-0; true"]);
    assert!(custom.contains(&format!("Address: {db0}")), "{custom}");

    // Failover: node 1's agent comes back without its dns role. It
    // withdrew its endpoint on the way out, so its pods' questions go to
    // node 0's server; with the role back they are its own again.
    let gone = format!("kube-dns-{0} {1} {0} Node", c.nodes[1].name, c.nodes[1].ip);
    c.nodes[1].set_roles("kubelet,proxy,overlay");
    if let Some(a) = c.nodes[1].agent.as_mut() {
        a.terminate();
    }
    c.nodes[1].start_agent();
    wait_for(
        "the stopped role's endpoint to go",
        Duration::from_secs(20),
        || (!published(&c).contains(&gone)).then_some(()),
    );
    let refused = c.ns(1).exec(&[
        "sh",
        "-c",
        &format!("dig @{} +time=1 +tries=1 {web} || true", c.nodes[1].ip),
    ]);
    assert!(
        !refused.contains("status: NOERROR"),
        "node 1 serves no DNS now: {refused}"
    );
    let answered = wait_for(
        "node 1's pods to be answered by node 0",
        Duration::from_secs(30),
        || {
            let out =
                c.cp.kubectl(&["exec", "custom", "--", "sh", "-c", "nslookup db-0; true"])
                    .unwrap_or_default();
            out.contains(&format!("Address: {db0}")).then_some(out)
        },
    );
    assert!(
        answered.contains(&format!("Server:\t\t{KUBE_DNS}")),
        "{answered}"
    );
    c.nodes[1].set_roles("kubelet,proxy,overlay,dns");
    if let Some(a) = c.nodes[1].agent.as_mut() {
        a.terminate();
    }
    c.nodes[1].start_agent();
    wait_for(
        "the restarted role's endpoint",
        Duration::from_secs(60),
        || (published(&c) == want).then_some(()),
    );
}

/// The dns role alone in a namespace of its own, beside an apiserver, with
/// dnsmasq as its upstream in another namespace.
struct Lone {
    node: Netns,
    up: Netns,
    cp: ControlPlane,
    agent: Proc,
    logs: TempDir,
}

const NODE_IP: &str = "10.77.0.1";
const UPSTREAM_IP: &str = "10.77.0.2";

impl Lone {
    fn start() -> Self {
        let node = Netns::new();
        let up = Netns::new();
        veth(&node, "eth0", "10.77.0.1/24", &up, "eth0", "10.77.0.2/24");
        let cp = ControlPlane::start_in(Some(&node), &["--node-monitor-grace-seconds", "3600"]);
        let logs = TempDir::new();
        let agent = Spawn::new(bin("skiff-agent"))
            .args([
                "run",
                "--roles",
                "dns",
                "--node-name",
                "lone",
                "--kubeconfig",
            ])
            .args([&cp.kubeconfig])
            .args(["--dns-listen", NODE_IP, "--dns-upstream", UPSTREAM_IP])
            .netns(&node)
            .log_to(&logs.path.join("agent.log"))
            .start();
        Self {
            node,
            up,
            cp,
            agent,
            logs,
        }
    }

    fn dig(&self, args: &[&str]) -> String {
        let server = format!("@{NODE_IP}");
        let mut cmd = vec!["dig", &server, "+time=5", "+tries=1"];
        cmd.extend(args);
        self.node.exec(&cmd)
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.agent.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// dnsmasq answering `example.test` itself (names not listed are
/// NXDOMAIN), with records that live `ttl` seconds, logging every question
/// it gets.
fn dnsmasq(up: &Netns, log: &std::path::Path, ttl: u32) -> Proc {
    let ttl = ttl.to_string();
    skiff_tests::resolver::dnsmasq(
        up,
        UPSTREAM_IP,
        &[
            "--log-queries",
            "--local=/example.test/",
            "--host-record=www.example.test,192.0.2.7",
            "--host-record=burst.example.test,192.0.2.8",
            "--host-record=late.example.test,192.0.2.9",
            "--local-ttl",
            &ttl,
            "--neg-ttl",
            &ttl,
        ],
        log,
    )
}

/// How many times dnsmasq was asked `name` (type A).
fn asked(log: &std::path::Path, name: &str) -> usize {
    let needle = format!("query[A] {name} from");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

#[test]
fn the_dns_role_forwards_through_a_cache_and_keeps_answering_the_cluster_through_bad_input() {
    let mut lone = Lone::start();
    let upstream_log = lone.logs.path.join("dnsmasq.log");
    let mut dnsmasq = dnsmasq(&lone.up, &upstream_log, 2);
    lone.cp
        .kubectl_ok(&["create", "service", "clusterip", "web", "--tcp=80:80"]);
    let web_ip = lone.cp.jsonpath(&["service", "web"], "{.spec.clusterIP}");
    let web = "web.default.svc.cluster.local";
    wait_for("the zone to hold web", Duration::from_secs(30), || {
        (lone.dig(&["+short", web]).trim() == web_ip).then_some(())
    });

    // Forwarded, then served from the cache while it lives.
    let www = "www.example.test";
    assert_eq!(lone.dig(&["+short", www]).trim(), "192.0.2.7");
    assert_eq!(lone.dig(&["+short", www]).trim(), "192.0.2.7");
    assert_eq!(
        asked(&upstream_log, www),
        1,
        "the second came from the cache"
    );
    let nx = lone.dig(&["nope.example.test"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    let out = lone.dig(&[www]);
    assert!(
        out.contains("flags: qr rd ra"),
        "recursion available, not authoritative: {out}"
    );

    // The role's metrics counted those: by type and response code, the
    // cache's hit and misses, and the time upstream took.
    let m = Spawn::new("curl")
        .args(["-sf", "http://127.0.0.1:10249/metrics"])
        .netns(&lone.node)
        .try_output()
        .unwrap_or_else(|e| panic!("scraping the agent: {e}"));
    for (name, labels, least) in [
        (
            "coredns_dns_requests_total",
            &[r#"proto="udp""#, r#"type="A""#][..],
            5.0,
        ),
        (
            "coredns_dns_responses_total",
            &[r#"rcode="NXDOMAIN""#][..],
            1.0,
        ),
        (
            "coredns_dns_responses_total",
            &[r#"rcode="NOERROR""#][..],
            4.0,
        ),
        ("coredns_cache_hits_total", &[][..], 1.0),
        ("coredns_cache_misses_total", &[][..], 2.0),
        (
            "coredns_forward_request_duration_seconds_count",
            &[][..],
            2.0,
        ),
    ] {
        assert!(
            sample(&m, name, labels).is_some_and(|v| v >= least),
            "{name} {labels:?} at least {least}:\n{m}"
        );
    }

    // Fifty clients asking one name at once: upstream is asked once.
    let burst = "burst.example.test";
    let script = format!(
        "for i in $(seq 50); do dig @{NODE_IP} +short +time=5 +tries=1 {burst} > /dev/null & done; wait"
    );
    lone.node.exec(&["sh", "-c", &script]);
    assert_eq!(
        asked(&upstream_log, burst),
        1,
        "fifty questions, one forward"
    );

    // Upstream gone: the expired answer is served stale, a name never
    // seen gets SERVFAIL, the cluster domain is answered throughout.
    std::thread::sleep(Duration::from_secs(3));
    dnsmasq.kill_now();
    let stale = lone.dig(&[www]);
    assert!(stale.contains("192.0.2.7"), "served stale: {stale}");
    let never = lone.dig(&["late.example.test"]);
    assert!(never.contains("status: SERVFAIL"), "{never}");
    assert_eq!(lone.dig(&["+short", web]).trim(), web_ip);

    // An upstream that takes questions and never answers, a flood of
    // outside names and of garbage from one client: the cluster domain
    // is answered during it and after it, the server does not fall over,
    // and its memory stays bounded.
    let mut blackhole = Spawn::new("python3")
        .args([
            "-c",
            &format!(
                "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 s.bind(('{UPSTREAM_IP}', 53))\nprint('ready', flush=True)\nwhile True:\n    s.recv(4096)\n"
            ),
        ])
        .netns(&lone.up)
        .start();
    assert_eq!(blackhole.ask(""), "ready");
    let before = lone.rss_kib();
    let flood = format!(
        "import os, socket, struct\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setblocking(False)\n\
         sent = 0\n\
         for i in range(40000):\n    \
             if i % 2:\n        \
                 pkt = os.urandom(i % 700)\n    \
             else:\n        \
                 name = b''.join(bytes([len(l)]) + l for l in [b'q%d' % i, b'flood', b'test']) + b'\\0'\n        \
                 pkt = struct.pack('>HHHHHH', i & 0xffff, 0x0100, 1, 0, 0, 0) + name + struct.pack('>HH', 1, 1)\n    \
             try:\n        \
                 s.sendto(pkt, ('{NODE_IP}', 53)); sent += 1\n    \
             except BlockingIOError:\n        \
                 pass\n\
         print(sent)\n"
    );
    let mut flooder = Spawn::new("python3")
        .args(["-c", &flood])
        .netns(&lone.node)
        .log_to(&lone.logs.path.join("flood.log"))
        .start();
    // As a resolver asks: again when a question goes unanswered.
    let during = lone.dig(&["+short", "+tries=3", web]);
    assert_eq!(during.trim(), web_ip, "answered during the flood");
    wait_for("the flood to end", Duration::from_secs(60), || {
        (!flooder.is_running()).then_some(())
    });
    // A name of the longest labels: NXDOMAIN, not an error. (Asked after
    // the flood: during it, a single question may be among the packets
    // dropped, as from any server whose socket a flood fills.)
    let absurd = format!("{}.cluster.local", vec!["a".repeat(63); 3].join("."));
    let a = lone.dig(&[&absurd]);
    assert!(a.contains("status: NXDOMAIN"), "{a}");
    let sent: usize = flooder.log_text().trim().parse().unwrap_or(0);
    assert!(sent > 20_000, "the flood went out: {sent} packets");
    assert_eq!(
        lone.dig(&["+short", web]).trim(),
        web_ip,
        "answered after it"
    );
    let after = lone.rss_kib();
    eprintln!(
        "dns role resident: {before} KiB before the flood, {after} KiB after ({sent} packets)"
    );
    assert!(
        after < before + 64 * 1024,
        "memory bounded: {before} KiB before, {after} KiB after"
    );
    assert!(lone.agent.is_running(), "the agent is alive");
    let log = lone.agent.log_text();
    assert!(!log.contains("panicked"), "{log}");
    blackhole.kill_now();
}
