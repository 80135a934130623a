//! Cluster DNS: every node's `dns` role answers the cluster domain, and the
//! node's pods reach it through the `kube-dns` ClusterIP, which the node's
//! proxy sends to that node's own server.

use std::collections::BTreeSet;
use std::time::Duration;

use skiff_tests::cluster::Cluster;
use skiff_tests::wait_for;

const KUBE_DNS: &str = "10.96.0.10";

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
    let ips: Vec<String> = (1..=120)
        .map(|i| format!("\"10.99.{}.{}\"", i / 100, i % 100 + 1))
        .collect();
    format!(
        r#"{db0}{db1}apiVersion: v1
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
            "{.spec.clusterIP} {.spec.internalTrafficPolicy}"
        ),
        format!("{KUBE_DNS} Local")
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
    let want: BTreeSet<String> = c
        .nodes
        .iter()
        .map(|n| format!("kube-dns-{0} {1} {0} Node", n.name, n.ip))
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
                 nslookup nope.default.svc.cluster.local {KUBE_DNS}; echo done"
            ),
        );
        assert!(log.contains(&format!("Address: {web_ip}")), "{log}");
        assert!(log.contains(&format!("Address: {db0}")), "{log}");
        assert!(
            log.contains("can't find nope.default.svc.cluster.local: NXDOMAIN"),
            "{log}"
        );
        assert!(log.contains(&format!("Address:\t{KUBE_DNS}:53")), "{log}");
    }

    // A node that stops withdraws its endpoint; it comes back with it.
    let gone = format!("kube-dns-{0} {1} {0} Node", c.nodes[1].name, c.nodes[1].ip);
    if let Some(a) = c.nodes[1].agent.as_mut() {
        a.terminate();
    }
    wait_for(
        "the stopped node's endpoint to go",
        Duration::from_secs(20),
        || (!published(&c).contains(&gone)).then_some(()),
    );
    c.nodes[1].start_agent();
    wait_for(
        "the restarted node's endpoint",
        Duration::from_secs(60),
        || (published(&c) == want).then_some(()),
    );
}
