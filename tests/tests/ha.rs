//! High availability of the control plane: replicas of `skiff-control`
//! on one real etcd, each serving the API, taking turns at scheduling and
//! at running the controllers under `coordination.k8s.io` Leases.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use skiff_tests::cluster::Cluster;
use skiff_tests::control::{ControlPlane, EtcdClient, HollowNodes};
use skiff_tests::{Spawn, wait_for};

/// Upstream's defaults, which the replicas run with.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

const LEASES: [&str; 2] = ["kube-scheduler", "kube-controller-manager"];

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - {name: app, image: busybox:1.36}
"#;

/// The identity a replica stands for election under, from its log.
fn identity(cp: &ControlPlane) -> String {
    let log = cp.proc.log_text();
    log.lines()
        .filter(|l| l.contains("waiting for the lease"))
        .find_map(|l| l.split("identity=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(String::from)
        .unwrap_or_else(|| panic!("no identity in the log:\n{}", cp.log_tail()))
}

fn holder(cp: &ControlPlane, lease: &str) -> String {
    cp.jsonpath(
        &["lease", "-n", "kube-system", lease],
        "{.spec.holderIdentity}",
    )
}

fn transitions(cp: &ControlPlane, lease: &str) -> i64 {
    cp.jsonpath(
        &["lease", "-n", "kube-system", lease],
        "{.spec.leaseTransitions}",
    )
    .parse()
    .unwrap_or(0)
}

fn port_of(cp: &ControlPlane) -> String {
    cp.server.rsplit(':').next().unwrap_or_default().to_string()
}

/// The apiserver ports the `kubernetes` Service's Endpoints list, and the
/// ones its EndpointSlices list (all replicas here share 127.0.0.1).
fn listed(cp: &ControlPlane) -> (BTreeSet<String>, BTreeSet<String>) {
    let set = |s: String| s.split_whitespace().map(String::from).collect();
    let endpoints = cp.jsonpath(&["endpoints", "kubernetes"], "{.subsets[*].ports[*].port}");
    let slices = cp.jsonpath(
        &[
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=kubernetes",
        ],
        "{.items[*].ports[*].port}",
    );
    (set(endpoints), set(slices))
}

/// Waits until the `kubernetes` Service lists exactly `ports`; how long
/// that took.
fn wait_listed(cp: &ControlPlane, ports: &[String], within: Duration) -> Duration {
    let want: BTreeSet<String> = ports.iter().cloned().collect();
    let since = Instant::now();
    wait_for(
        "the kubernetes service to list the live apiservers",
        within,
        || {
            let (endpoints, slices) = listed(cp);
            (endpoints == want && slices == want).then_some(())
        },
    );
    since.elapsed()
}

/// Waits until `cp`'s replica holds both leases; how long that took.
fn wait_leading(cp: &ControlPlane, me: &str, within: Duration) -> Duration {
    let since = Instant::now();
    wait_for("the replica to hold both leases", within, || {
        LEASES.iter().all(|l| holder(cp, l) == me).then_some(())
    });
    since.elapsed()
}

#[test]
fn a_killed_leader_is_replaced_within_the_lease_duration_and_nothing_is_done_twice() {
    let grace = ["--node-monitor-grace-seconds", "3600"];
    let mut a = ControlPlane::start(&grace);
    let a_id = identity(&a);
    wait_leading(&a, &a_id, Duration::from_secs(20));
    let mut b = a.replica(&grace);
    let b_id = identity(&b);
    assert_ne!(a_id, b_id);
    // Each apiserver is in the `kubernetes` Service's endpoints.
    wait_listed(&a, &[port_of(&a), port_of(&b)], Duration::from_secs(5));
    b.add_node("n1", "", "8");
    let _nodes = HollowNodes::start(&b, &["n1"]);

    // Both replicas serve the API; only the leader acts.
    b.apply(WEB).unwrap_or_else(|e| panic!("{e}"));
    wait_for("3 available replicas", Duration::from_secs(30), || {
        (a.jsonpath(&["deployment", "web"], "{.status.availableReplicas}") == "3").then_some(())
    });
    for l in LEASES {
        assert_eq!(holder(&b, l), a_id, "{l}: the first replica leads");
    }
    assert!(
        !b.proc.log_text().contains("lease acquired"),
        "the second replica acted while the first led:\n{}",
        b.log_tail()
    );
    let before: Vec<i64> = LEASES.iter().map(|l| transitions(&b, l)).collect();

    // Every pod created from here on, as the API reports it.
    let watch_log = b.dir.path.join("pods.watch");
    let mut watch = Spawn::new("kubectl")
        .env("KUBECONFIG", &b.kubeconfig.display().to_string())
        .args(["get", "pods", "--watch-only", "-o", "name"])
        .log_to(&watch_log)
        .start();
    std::thread::sleep(Duration::from_secs(1));

    // The leader dies; meanwhile the Deployment is scaled and a pod waits
    // to be scheduled.
    a.proc.kill_now();
    b.kubectl_ok(&["scale", "deployment", "web", "--replicas", "5"]);
    b.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: waiting}\nspec:\n  containers:\n  - {name: c, image: busybox:1.36}\n")
        .unwrap_or_else(|e| panic!("{e}"));

    // The lease runs out on the survivor's clock from the last renewal it
    // saw (at most a retry period before the kill), and it looks every
    // retry period (jittered by up to a fifth).
    let took = wait_leading(&b, &b_id, Duration::from_secs(40));
    eprintln!("the second replica took both leases {took:?} after the kill");
    let bound = LEASE_DURATION + RETRY_PERIOD.mul_f64(2.4) + Duration::from_secs(2);
    assert!(
        took <= bound,
        "took over after {took:?}, more than {bound:?}"
    );
    // The killed apiserver leaves the endpoints once its record's lease
    // (15 s) runs out, seen at the next pass (every 10 s).
    let gone = wait_listed(&b, &[port_of(&b)], Duration::from_secs(30)) + took;
    eprintln!("the killed apiserver left the kubernetes endpoints {gone:?} after the kill");
    for (l, was) in LEASES.iter().zip(&before) {
        assert_eq!(transitions(&b, l), was + 1, "{l}: one more transition");
    }

    wait_for(
        "the waiting pod to be scheduled",
        Duration::from_secs(20),
        || (b.jsonpath(&["pod", "waiting"], "{.spec.nodeName}") == "n1").then_some(()),
    );
    wait_for("5 available replicas", Duration::from_secs(30), || {
        (b.jsonpath(&["deployment", "web"], "{.status.availableReplicas}") == "5").then_some(())
    });
    // Time for a duplicate to show, were there one.
    std::thread::sleep(Duration::from_secs(3));
    let pods = b.kubectl_ok(&["get", "pods", "-l", "app=web", "-o", "name"]);
    assert_eq!(pods.lines().count(), 5, "{pods}");
    watch.kill_now();
    let events = std::fs::read_to_string(&watch_log).unwrap_or_default();
    // Every pod the watch saw, once each: what was created since.
    let created: std::collections::BTreeSet<&str> =
        events.lines().filter(|l| l.starts_with("pod/")).collect();
    assert_eq!(
        created.len(),
        3,
        "two replicas and the waiting pod, each created once: {created:?}"
    );

    // A replica that stops gives its leases up: the next one takes them
    // at once, not after the lease's duration.
    let c = b.replica(&grace);
    let c_id = identity(&c);
    wait_listed(&c, &[port_of(&b), port_of(&c)], Duration::from_secs(5));
    b.proc.terminate();
    // And leaves the endpoints as it goes.
    let left = wait_listed(&c, &[port_of(&c)], Duration::from_secs(5));
    eprintln!("a stopped apiserver left the kubernetes endpoints in {left:?}");
    let took = wait_leading(&c, &c_id, Duration::from_secs(30));
    eprintln!("after a clean stop, the third replica took both leases in {took:?}");
    assert!(
        took < LEASE_DURATION,
        "a released lease is taken at once, took {took:?}"
    );
}

/// A pod bound to `node` that sleeps, from the cluster's busybox.
fn sleeper(name: &str, node: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    command: [\"sleep\", \"3600\"]\n"
    )
}

fn wait_running(cp: &ControlPlane, pod: &str) {
    wait_for(
        &format!("pod {pod} running"),
        Duration::from_secs(90),
        || {
            let phase = cp.jsonpath(&["pod", pod], "{.status.phase}");
            (phase == "Running").then_some(())
        },
    );
}

/// Requests `cp`'s apiserver logged from `user` for `path`, as their
/// query strings.
fn requests(cp: &ControlPlane, user: &str, path: &str) -> Vec<String> {
    let (who, at) = (format!("user={user} "), format!("path={path} "));
    cp.proc
        .log_text()
        .lines()
        .filter(|l| l.contains("request") && l.contains(&who) && l.contains(&at))
        .map(|l| {
            l.split("query=")
                .nth(1)
                .and_then(|q| q.split_whitespace().next())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// A pod bound to `node` running `script` in `image`'s shell.
fn shell_pod(name: &str, node: &str, image: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    command: [\"sh\", \"-c\", {script:?}]\n"
    )
}

/// A busybox httpd pod on `node` answering "hello from <name>" on 80.
fn web_pod(name: &str, node: &str, image: &str) -> String {
    shell_pod(
        name,
        node,
        image,
        "mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 80 -h /www",
    )
}

/// A Service with no selector at ClusterIP `ip`, port `port`, and the
/// EndpointSlice that sends it to `backends` on the same port: endpoints
/// a user keeps, so that no controller (and no leader) is involved.
fn service_to(name: &str, ip: &str, port: u16, backends: &[String]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|b| format!("- addresses: [\"{b}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: {ip}\n  ports:\n  - {{port: {port}, protocol: TCP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-own\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{port: {port}, protocol: TCP}}\nendpoints:\n{endpoints}"
    )
}

fn pod_ip(cp: &ControlPlane, pod: &str) -> String {
    cp.jsonpath(&["pod", pod], "{.status.podIP}")
}

/// The last `n` lines of a pod's log.
fn log_tail(cp: &ControlPlane, pod: &str, n: usize) -> Vec<String> {
    cp.kubectl(&["logs", pod, "--tail", &n.to_string()])
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Waits until the last `n` lines of `pod`'s log hold every one of
/// `lines`.
fn wait_lines(cp: &ControlPlane, pod: &str, lines: &[&str], within: Duration) {
    let t = Instant::now();
    loop {
        let tail = log_tail(cp, pod, 12);
        if lines.iter().all(|want| tail.iter().any(|l| l == want)) {
            return;
        }
        assert!(
            t.elapsed() < within,
            "no {lines:?} within {within:?} in pod {pod}'s log, which ends:\n{}",
            tail.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pod's shell script that holds one connection to the `held`
/// Service, a request on it every 0.2 s, and logs each answer (and the
/// close, if it comes) with the second it came in.
fn holder_script() -> String {
    format!(
        "(while :; do echo x; sleep 0.2; done) | nc {HELD_VIP} 7000 | while read l; do echo \"$(date +%s) $l\"; done; echo \"$(date +%s) closed\""
    )
}

/// The held connection's answers so far, and whether it closed.
fn held(cp: &ControlPlane) -> (usize, bool) {
    let lines = stamped(cp, "holder");
    (
        lines.iter().filter(|(_, l)| l == "echo").count(),
        lines.iter().any(|(_, l)| l == "closed"),
    )
}

const HELD_VIP: &str = "10.96.200.10";
const WEB_VIP: &str = "10.96.200.20";
const LATE_VIP: &str = "10.96.200.30";

/// A node agent reaches the apiservers through its balancer. When the one
/// it uses is killed while Services and pods change, it moves to the other
/// within seconds: its roles keep running; its watches resume from where
/// they were (no new list) and deliver what changed meanwhile, so a Service
/// created and another's endpoints changed after the kill are served to
/// the node's pods; a connection held through the proxy never breaks; the
/// node stays Ready, its running pods are untouched, and a pod bound to it
/// afterwards starts.
#[test]
fn a_node_agent_moves_to_a_live_apiserver_without_restarting_its_roles() {
    let mut c = Cluster::start(1);
    let b = c.control_replica();
    let (a_port, b_port) = (c.cp.port().to_string(), b.port().to_string());
    let name = c.nodes[0].name.clone();
    let agent_pid = c.nodes[0].agent.as_ref().map(|p| p.pid());
    wait_for(
        "the agent to list both apiservers",
        Duration::from_secs(30),
        || {
            let log = c.nodes[0].agent_log();
            log.lines()
                .any(|l| {
                    l.contains("apiservers listed")
                        && l.contains(&format!(":{a_port}"))
                        && l.contains(&format!(":{b_port}"))
                })
                .then_some(())
        },
    );
    let log = c.nodes[0].agent_log();
    assert!(
        log.lines().any(
            |l| l.contains("apiserver balancer listening") && l.contains(&format!(":{a_port}"))
        ),
        "the agent starts on the apiserver it joined through:\n{log}"
    );

    // Backends: an echo server for the held connection, two web servers.
    let echo = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: echo\nspec:\n  nodeName: {name}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {}\n    args: [serve-tcp, \"0.0.0.0:7000\", echo]\n",
        c.probe
    );
    for pod in [
        echo,
        web_pod("web-1", &name, &c.busybox),
        web_pod("web-2", &name, &c.busybox),
    ] {
        b.apply(&pod).unwrap_or_else(|e| panic!("{e}"));
    }
    for pod in ["echo", "web-1", "web-2"] {
        wait_running(&b, pod);
    }
    let (echo_ip, web1, web2) = (pod_ip(&b, "echo"), pod_ip(&b, "web-1"), pod_ip(&b, "web-2"));
    b.apply(&service_to(
        "held",
        HELD_VIP,
        7000,
        std::slice::from_ref(&echo_ip),
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    b.apply(&service_to("web", WEB_VIP, 80, std::slice::from_ref(&web1)))
        .unwrap_or_else(|e| panic!("{e}"));
    // One connection through the proxy, a request on it every 0.2 s.
    b.apply(&shell_pod("holder", &name, &c.busybox, &holder_script()))
        .unwrap_or_else(|e| panic!("{e}"));
    // New connections, to each Service in turn (busybox wget's own -T
    // crashes; timeout bounds each fetch instead).
    let prober = format!(
        "while :; do for ip in {WEB_VIP} {LATE_VIP}; do echo \"$ip $(timeout 1 wget -qO- http://$ip/ 2>/dev/null)\"; done; sleep 0.1; done"
    );
    b.apply(&shell_pod("prober", &name, &c.busybox, &prober))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_running(&b, "holder");
    wait_running(&b, "prober");
    let web_was = format!("{WEB_VIP} hello from web-1");
    wait_lines(&b, "prober", &[&web_was], Duration::from_secs(30));
    wait_for("the held connection", Duration::from_secs(30), || {
        (held(&b).0 >= 5).then_some(())
    });
    let node_user = format!("system:node:{name}");
    let lists_before = requests(&b, &node_user, "/api/v1/pods").len();

    let killed_at = unix_now();
    c.cp.proc.kill_now();
    let killed = Instant::now();
    // Through b, while the agent may still be on a: a new Service, the
    // other's endpoints moved, a pod bound.
    b.apply(&service_to(
        "late",
        LATE_VIP,
        80,
        std::slice::from_ref(&web1),
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    b.apply(&service_to("web", WEB_VIP, 80, std::slice::from_ref(&web2)))
        .unwrap_or_else(|e| panic!("{e}"));
    b.apply(&sleeper("after", &name, &c.busybox))
        .unwrap_or_else(|e| panic!("{e}"));
    let changed = killed.elapsed();
    wait_for(
        "the agent to switch apiservers",
        Duration::from_secs(20),
        || {
            c.nodes[0]
                .agent_log()
                .lines()
                .any(|l| l.contains("switched") && l.contains(&format!(":{b_port}")))
                .then_some(())
        },
    );
    eprintln!(
        "the agent switched apiservers {:?} after the kill",
        killed.elapsed()
    );
    let (late_is, web_is) = (
        format!("{LATE_VIP} hello from web-1"),
        format!("{WEB_VIP} hello from web-2"),
    );
    wait_lines(&b, "prober", &[&late_is, &web_is], Duration::from_secs(10));
    let served = killed.elapsed();
    eprintln!(
        "the changes made {changed:?} after the kill were served to the node's pods {served:?} after it"
    );
    assert!(
        served < Duration::from_secs(10),
        "changes served {served:?} after the kill"
    );
    wait_running(&b, "after");
    eprintln!(
        "a pod bound after the kill ran {:?} after it",
        killed.elapsed()
    );

    // The held connection still answers, on the same socket, and never
    // went quiet.
    let (answers, _) = held(&b);
    wait_for(
        "the held connection to keep answering",
        Duration::from_secs(10),
        || (held(&b).0 > answers + 5).then_some(()),
    );
    let (_, closed) = held(&b);
    assert!(!closed, "the held connection closed");
    let gap = longest_gap(&stamped(&b, "holder"), "echo", killed_at, unix_now() - 1);
    eprintln!("the held connection's longest silence since the kill: {gap} s");
    assert!(gap <= 2, "the held connection went quiet for {gap} s");
    assert_eq!(b.jsonpath(&["pod", "holder"], "{.status.phase}"), "Running");

    // The node's Lease is renewed through b, and the node stays Ready.
    let renewed = b.jsonpath(
        &["lease", "-n", "kube-node-lease", &name],
        "{.spec.renewTime}",
    );
    wait_for("the node's lease renewed", Duration::from_secs(30), || {
        let now = b.jsonpath(
            &["lease", "-n", "kube-node-lease", &name],
            "{.spec.renewTime}",
        );
        (now != renewed).then_some(())
    });
    assert_eq!(node_ready(&b, &name), "True");

    // Untouched: the pods from before, the agent process, its roles.
    for pod in ["echo", "web-1", "web-2", "holder", "prober"] {
        assert_eq!(
            b.jsonpath(&["pod", pod], "{.status.containerStatuses[0].restartCount}"),
            "0",
            "{pod} restarted"
        );
    }
    assert_eq!(c.nodes[0].agent.as_ref().map(|p| p.pid()), agent_pid);
    let log = c.nodes[0].agent_log();
    for restart in [
        "role failed",
        "role returned",
        "role panicked",
        "restarting role",
    ] {
        assert!(!log.contains(restart), "{restart}:\n{log}");
    }
    // The pod watch resumed from its resourceVersion: every request the
    // node made for pods on b since the kill is a watch, none a list.
    let since: Vec<String> = requests(&b, &node_user, "/api/v1/pods")
        .into_iter()
        .skip(lists_before)
        .collect();
    assert!(!since.is_empty(), "the node's pod watch never reached b");
    for q in &since {
        assert!(
            q.contains("watch=true") && q.contains("resourceVersion="),
            "a request for pods that is not a resumed watch: {q} (all: {since:?})"
        );
    }
}

fn node_ready(cp: &ControlPlane, node: &str) -> String {
    cp.jsonpath(
        &["node", node],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
    )
}

/// Unix seconds now.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `pod`'s log lines, each `<unix seconds> <text>`, as (seconds, text).
fn stamped(cp: &ControlPlane, pod: &str) -> Vec<(u64, String)> {
    cp.kubectl(&["logs", pod])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (t, rest) = l.split_once(' ').unwrap_or((l, ""));
            Some((t.parse().ok()?, rest.to_string()))
        })
        .collect()
}

/// The longest stretch of seconds within `[from, to]` with no line of
/// `lines` whose text is `want`.
fn longest_gap(lines: &[(u64, String)], want: &str, from: u64, to: u64) -> u64 {
    let mut last = from;
    let mut gap = 0;
    for (t, _) in lines
        .iter()
        .filter(|(t, text)| text == want && (from..=to).contains(t))
    {
        gap = gap.max(t - last);
        last = *t;
    }
    gap.max(to - last)
}

/// Over `[from, to]` (Unix seconds), the pods on node 0 reached both
/// Services on node 1 all along: the held connection answered at least
/// every few seconds, and every new connection was served.
fn routed_throughout(cp: &ControlPlane, from: u64, to: u64, what: &str) {
    let (holder, prober) = (stamped(cp, "holder"), stamped(cp, "prober"));
    let held_gap = longest_gap(&holder, "echo", from, to);
    let new_gap = longest_gap(&prober, "hello from web-1", from, to);
    let failed: Vec<&(u64, String)> = prober
        .iter()
        .filter(|(t, text)| (from..=to).contains(t) && text != "hello from web-1")
        .collect();
    eprintln!(
        "{what}: over {} s, the held connection's longest silence {held_gap} s; new connections' {new_gap} s, {} failed",
        to - from,
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{what}: new connections failed: {failed:?}"
    );
    assert!(
        held_gap <= 3 && new_gap <= 3,
        "{what}: routing stopped for {held_gap} s (held) / {new_gap} s (new)"
    );
    assert!(
        !holder.iter().any(|(_, l)| l == "closed"),
        "{what}: the held connection closed"
    );
}

/// The pods, by name, with their uids.
fn uids(cp: &ControlPlane) -> BTreeSet<String> {
    cp.jsonpath(
        &["pods"],
        r#"{range .items[*]}{.metadata.name}={.metadata.uid}{"\n"}{end}"#,
    )
    .lines()
    .map(String::from)
    .collect()
}

/// For `within` after a control plane came back, though every node's
/// Lease is old: every node stays Ready and no pod is replaced or
/// restarted (with a 5 s eviction timeout, an eviction would show at once).
fn nothing_evicted(c: &Cluster, pods: &BTreeSet<String>, back: Instant, within: Duration) {
    while back.elapsed() < within {
        for node in &c.nodes {
            let ready = node_ready(&c.cp, &node.name);
            if !(ready == "True" || ready.is_empty()) {
                let pick = |log: String, words: &[&str]| -> String {
                    log.lines()
                        .filter(|l| words.iter().any(|w| l.contains(w)))
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                panic!(
                    "node {} went {ready} {:?} after the outage\n--- control plane ---\n{}\n--- agent ---\n{}",
                    node.name,
                    back.elapsed(),
                    pick(
                        c.cp.proc.log_text(),
                        &["node", "grace", "judged", "answers"]
                    ),
                    pick(
                        node.agent_log(),
                        &["lease", "status", "switched", "apiserver"]
                    ),
                );
            }
        }
        let now = uids(&c.cp);
        assert!(
            now.is_empty() || &now == pods,
            "pods replaced: {pods:?} -> {now:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    for node in &c.nodes {
        assert_eq!(node_ready(&c.cp, &node.name), "True");
    }
    assert_eq!(&uids(&c.cp), pods);
    let restarts = c.cp.jsonpath(
        &["pods"],
        "{.items[*].status.containerStatuses[0].restartCount}",
    );
    assert!(
        restarts.split_whitespace().all(|n| n == "0"),
        "containers restarted: {restarts}"
    );
    let log = c.cp.proc.log_text();
    for wrong in ["NotReady", "evicted"] {
        assert!(
            !log.lines()
                .any(|l| l.contains(wrong) && c.nodes.iter().any(|n| l.contains(&n.name))),
            "{wrong}:\n{}",
            c.cp.log_tail()
        );
    }
}

/// A minute with no control plane at all costs the nodes nothing. First
/// `skiff-control` and etcd are both stopped: the pods on one node reach
/// Services whose pods run on the other throughout, over a held
/// connection and over new ones (the proxy's maps and the overlay's routes
/// stay as they were). Then etcd alone is stopped, so that the controllers
/// run on through it with caches a minute old. After each, though every
/// node's Lease is a minute old, no node is marked NotReady and no pod is
/// evicted.
#[test]
fn a_minute_long_control_plane_outage_marks_no_node_not_ready_and_evicts_nothing() {
    // Without leader election the controllers run on through an etcd
    // outage (with it they stop within the renew deadline and start
    // afresh): their caches hold Leases a minute old when the apiserver
    // answers again, before any node has renewed.
    let mut c = Cluster::start_with(
        2,
        &[
            "--pod-eviction-timeout-seconds",
            "5",
            "--leader-elect=false",
        ],
    );
    let (near, far) = (c.nodes[0].name.clone(), c.nodes[1].name.clone());
    let echo = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: echo\nspec:\n  nodeName: {far}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {}\n    args: [serve-tcp, \"0.0.0.0:7000\", echo]\n",
        c.probe
    );
    for pod in [
        echo,
        web_pod("web-1", &far, &c.busybox),
        sleeper("steady", &near, &c.busybox),
    ] {
        c.cp.apply(&pod).unwrap_or_else(|e| panic!("{e}"));
    }
    for pod in ["echo", "web-1", "steady"] {
        wait_running(&c.cp, pod);
    }
    let (echo_ip, web1) = (pod_ip(&c.cp, "echo"), pod_ip(&c.cp, "web-1"));
    c.cp.apply(&service_to("held", HELD_VIP, 7000, &[echo_ip]))
        .unwrap_or_else(|e| panic!("{e}"));
    c.cp.apply(&service_to("web", WEB_VIP, 80, &[web1]))
        .unwrap_or_else(|e| panic!("{e}"));
    // Each fetch logged with the second it came in.
    let prober = format!(
        "while :; do echo \"$(date +%s) $(timeout 1 wget -qO- http://{WEB_VIP}/ 2>/dev/null)\"; sleep 0.3; done"
    );
    c.cp.apply(&shell_pod("holder", &near, &c.busybox, &holder_script()))
        .unwrap_or_else(|e| panic!("{e}"));
    c.cp.apply(&shell_pod("prober", &near, &c.busybox, &prober))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_running(&c.cp, "holder");
    wait_running(&c.cp, "prober");
    wait_for("both Services to answer", Duration::from_secs(30), || {
        let ok = |pod, want| stamped(&c.cp, pod).iter().any(|(_, l)| l == want);
        (ok("holder", "echo") && ok("prober", "hello from web-1")).then_some(())
    });
    let pods = uids(&c.cp);

    // The whole control plane stopped.
    let stopped = unix_now();
    c.cp.proc.kill_now();
    c.cp.etcd.kill();
    std::thread::sleep(Duration::from_secs(60));
    let started = unix_now();
    c.cp.etcd.restart();
    c.cp.restart();
    let back = Instant::now();
    routed_throughout(&c.cp, stopped + 1, started - 1, "control plane stopped");
    nothing_evicted(&c, &pods, back, Duration::from_secs(50));

    // etcd alone stopped, under running controllers.
    let stopped = unix_now();
    c.cp.etcd.kill();
    std::thread::sleep(Duration::from_secs(60));
    let started = unix_now();
    c.cp.etcd.restart();
    let back = Instant::now();
    wait_for(
        "the apiserver to serve again",
        Duration::from_secs(30),
        || c.cp.kubectl(&["get", "node", &near]).ok(),
    );
    let renewed = c.cp.jsonpath(
        &["lease", "-n", "kube-node-lease", &near],
        "{.spec.renewTime}",
    );
    eprintln!(
        "serving again {:?} after etcd came back; lease last renewed {renewed}",
        back.elapsed()
    );
    routed_throughout(&c.cp, stopped + 1, started - 1, "etcd stopped");
    nothing_evicted(&c, &pods, back, Duration::from_secs(50));
}

/// Three etcd members and three apiservers: writes through an apiserver
/// go on while an etcd member is killed under them (each write either
/// fails or is kept; none is lost), the member catches up when it comes
/// back, and every replica serves what was written.
#[test]
fn writes_go_on_and_none_is_lost_when_an_etcd_member_dies_under_them() {
    let c = Cluster::start_ha(0);
    assert_eq!(c.replicas.len(), 2);
    // Every member refuses a client that trusts its CA but shows no
    // certificate, and serves one that shows a certificate of that CA.
    let [ca, _, _] = c.cp.etcd.client_files(EtcdClient::Admin);
    for i in 0..3 {
        let url = c.cp.etcd.member_url(i);
        let bare = Spawn::new("etcdctl")
            .netns_path(Some(&c.control_ns[0].0.path()))
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", url, "--cacert", &ca])
            .args(["--dial-timeout=2s", "--command-timeout=3s"])
            .args(["get", "/registry/namespaces/", "--prefix", "--keys-only"])
            .try_output();
        assert!(
            bare.is_err(),
            "member {i} answered a client without a certificate: {bare:?}"
        );
        let keys =
            c.cp.etcd
                .ctl(&[
                    "--endpoints",
                    url,
                    "get",
                    "/registry/namespaces/",
                    "--prefix",
                    "--keys-only",
                ])
                .unwrap_or_else(|e| panic!("member {i}: {e}"));
        assert!(
            keys.contains("/registry/namespaces/default"),
            "member {i}: {keys}"
        );
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, kubeconfig) = (stop.clone(), c.cp.kubeconfig.clone());
        let netns = c.control_ns[0].0.path();
        std::thread::spawn(move || {
            let (mut kept, mut failed) = (Vec::new(), Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("w{i}");
                let out = Spawn::new("kubectl")
                    .netns_path(Some(&netns))
                    .env("KUBECONFIG", &kubeconfig.display().to_string())
                    .args(["--request-timeout=5s", "create", "configmap", &name])
                    .args(["--from-literal", &format!("i={i}")])
                    .try_output();
                match out {
                    Ok(_) => kept.push((name, Instant::now())),
                    Err(_) => failed.push((name, Instant::now())),
                }
                i += 1;
            }
            (kept, failed)
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    // The member the first apiserver's client is likeliest to be on.
    c.cp.etcd.kill_member(0);
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    let restarted = Instant::now();
    c.cp.etcd.restart_member(0);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (kept, failed) = writer
        .join()
        .unwrap_or_else(|_| panic!("the writer panicked"));
    let after_kill: Vec<_> = failed
        .iter()
        .map(|(n, at)| (n, at.duration_since(killed)))
        .collect();
    eprintln!(
        "{} writes kept, {} failed: {after_kill:?}",
        kept.len(),
        failed.len()
    );
    assert!(
        kept.len() > 20,
        "too few writes went through: {}",
        kept.len()
    );
    // The apiserver's etcd client moves to a live member: at most a write
    // or two in flight at the kill fail.
    assert!(failed.len() <= 3, "{} writes failed", failed.len());
    // Writes went through while the member was down.
    let while_down = kept
        .iter()
        .filter(|(_, at)| *at > killed + Duration::from_secs(2) && *at < restarted)
        .count();
    eprintln!("{while_down} writes kept while the member was down");
    assert!(
        while_down > 0,
        "no write went through while the member was down"
    );

    // Every kept write is there, on every replica; a failed one at most
    // half-done is either there whole or not at all.
    for cp in std::iter::once(&c.cp).chain(&c.replicas) {
        let names = cp.kubectl_ok(&[
            "get",
            "configmaps",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        let names: BTreeSet<&str> = names.split_whitespace().collect();
        for (k, _) in &kept {
            assert!(names.contains(k.as_str()), "{k} lost on {}", cp.server);
        }
    }
    // The member that came back catches up: the same revision on all.
    wait_for("the members to agree", Duration::from_secs(20), || {
        let revisions: BTreeSet<String> = (0..3)
            .map(|i| {
                let url = c.cp.etcd.member_url(i);
                let out =
                    c.cp.etcd
                        .ctl(&["--endpoints", url, "endpoint", "status", "-w", "json"])
                        .unwrap_or_default();
                let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                v[0]["Status"]["header"]["revision"].to_string()
            })
            .collect();
        (revisions.len() == 1).then_some(())
    });
}

/// Two apiservers on one etcd hand out ClusterIPs and NodePorts at the
/// same time, from pools small enough that their picks collide: every
/// Service gets its own of each, and of two Services asking for the same
/// NodePort at once exactly one gets it.
#[test]
fn two_apiservers_allocating_at_once_never_hand_out_one_address_or_port_twice() {
    let flags = [
        "--service-cidr",
        "10.96.0.0/26",
        "--node-port-range",
        "30000-30079",
    ];
    let a = ControlPlane::start(&flags);
    let b = a.replica(&flags);
    // The /26 has 62 usable addresses; `kubernetes` and `kube-dns` hold
    // two. 2 × 27 here and at most one per round below leave one free, so
    // every refusal below is about the NodePort.
    const PER: usize = 27;
    let create = |cp: &ControlPlane, prefix: &str| {
        let (kubeconfig, prefix) = (cp.kubeconfig.clone(), prefix.to_string());
        std::thread::spawn(move || {
            for i in 0..PER {
                let name = format!("{prefix}{i}");
                Spawn::new("kubectl")
                    .env("KUBECONFIG", &kubeconfig.display().to_string())
                    .args(["create", "service", "nodeport", &name, "--tcp=80:80"])
                    .try_output()
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        })
    };
    let (ta, tb) = (create(&a, "a"), create(&b, "b"));
    for t in [ta, tb] {
        t.join().unwrap_or_else(|_| panic!("a creator panicked"));
    }
    let out = a.jsonpath(
        &["services"],
        r#"{range .items[*]}{.metadata.name} {.spec.clusterIP} {.spec.ports[0].nodePort}{"\n"}{end}"#,
    );
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let ips: BTreeSet<&str> = rows.iter().filter_map(|r| r.get(1).copied()).collect();
    let ports: BTreeSet<&str> = rows.iter().filter_map(|r| r.get(2).copied()).collect();
    // The `kubernetes` Service has an address and no NodePort.
    assert_eq!(rows.len(), 2 * PER + 1, "{out}");
    assert_eq!(
        ips.len(),
        rows.len(),
        "a ClusterIP handed out twice:\n{out}"
    );
    assert_eq!(ports.len(), 2 * PER, "a NodePort handed out twice:\n{out}");

    // The same NodePort asked for through both at once, several times.
    for round in 0..5 {
        let port = 30070 + round;
        let ask = |cp: &ControlPlane, name: String| {
            let kubeconfig = cp.kubeconfig.clone();
            std::thread::spawn(move || {
                let svc = format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: NodePort\n  ports: [{{port: 80, nodePort: {port}}}]\n"
                );
                let out = Spawn::new("kubectl")
                    .env("KUBECONFIG", &kubeconfig.display().to_string())
                    .args(["create", "-f", "-"])
                    .run_with_input(svc.as_bytes());
                let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
                (out.status.success(), format!("{name}: {said}"))
            })
        };
        let (x, y) = (ask(&a, format!("x{round}")), ask(&b, format!("y{round}")));
        let answers: Vec<(bool, String)> = [x, y]
            .into_iter()
            .map(|t| t.join().unwrap_or((false, "the thread panicked".into())))
            .collect();
        let won = answers.iter().filter(|(ok, _)| *ok).count();
        let said: Vec<&str> = answers.iter().map(|(_, s)| s.as_str()).collect();
        let free_before = !ports.contains(port.to_string().as_str());
        if free_before {
            assert_eq!(won, 1, "nodePort {port}: {won} Services got it: {said:?}");
        } else {
            assert_eq!(won, 0, "nodePort {port} was taken already: {said:?}");
        }
    }
}

/// The first line of `log` with every one of `words`: its timestamp.
fn stamp_of(log: &str, words: &[&str]) -> Option<String> {
    log.lines()
        .find(|l| words.iter().all(|w| l.contains(w)))
        .and_then(|l| l.split_whitespace().next())
        .map(String::from)
}

/// The leader cut off from the rest (its namespace's link down: its
/// apiserver unreachable, its etcd member without a quorum) stops acting
/// when its renew deadline passes, before another replica takes its
/// leases; the others go on, and nothing is done twice. Healed, it
/// rejoins as a follower.
#[test]
fn a_partitioned_leader_stops_before_another_takes_over_and_nothing_is_done_twice() {
    let c = Cluster::start_ha(1);
    let leader = std::fs::read_to_string(c.cp.dir.path.join("leader-identity"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let b = &c.replicas[0];
    wait_leading(b, &leader, Duration::from_secs(30));
    let web = WEB.replace("replicas: 3", "replicas: 2").replace(
        "{name: app, image: busybox:1.36}",
        &format!(
            "{{name: app, image: \"{}\", command: [sleep, \"3600\"]}}",
            c.busybox
        ),
    );
    b.apply(&web).unwrap_or_else(|e| panic!("{e}"));
    wait_for("2 available replicas", Duration::from_secs(90), || {
        (b.jsonpath(&["deployment", "web"], "{.status.availableReplicas}") == "2").then_some(())
    });

    c.control_ns[0].0.ip(&["link", "set", "eth0", "down"]);
    let cut = Instant::now();
    b.kubectl_ok(&["scale", "deployment", "web", "--replicas", "4"]);
    wait_for("another replica to lead", Duration::from_secs(60), || {
        let holders: Vec<String> = LEASES.iter().map(|l| holder(b, l)).collect();
        holders
            .iter()
            .all(|h| !h.is_empty() && *h != leader)
            .then_some(())
    });
    eprintln!("another replica led {:?} after the cut", cut.elapsed());
    wait_for("4 available replicas", Duration::from_secs(60), || {
        (b.jsonpath(&["deployment", "web"], "{.status.availableReplicas}") == "4").then_some(())
    });

    // The cut-off leader stopped before anyone else started, by the logs'
    // clocks (one host's).
    let cut_log = c.cp.proc.log_text();
    for lease in LEASES {
        let stopped = stamp_of(
            &cut_log,
            &[
                "lease lost; stopped",
                &format!("lease=\"kube-system/{lease}\""),
            ],
        )
        .unwrap_or_else(|| panic!("{lease}: the cut-off leader never stopped:\n{cut_log}"));
        let started = c
            .replicas
            .iter()
            .filter_map(|r| {
                stamp_of(
                    &r.proc.log_text(),
                    &[
                        "lease acquired; starting",
                        &format!("lease=\"kube-system/{lease}\""),
                    ],
                )
            })
            .min()
            .unwrap_or_else(|| panic!("{lease}: no other replica started"));
        eprintln!("{lease}: the cut-off leader stopped at {stopped}, another started at {started}");
        assert!(
            stopped < started,
            "{lease}: started at {started} before the old leader stopped at {stopped}"
        );
    }

    // Healed: it follows; still four pods, each created once. (The etcd
    // member behind the cut rejoins, and etcd may be without a leader
    // for some seconds; the API answers 503 until it has one.)
    c.control_ns[0].0.ip(&["link", "set", "eth0", "up"]);
    std::thread::sleep(Duration::from_secs(8));
    let pods = wait_for(
        "the API to answer after the heal",
        Duration::from_secs(30),
        || {
            b.kubectl(&["get", "pods", "-l", "app=web", "-o", "name"])
                .ok()
        },
    );
    assert_eq!(pods.lines().count(), 4, "{pods}");
    for l in LEASES {
        assert_ne!(holder(b, l), leader, "{l}: the healed replica took it back");
    }
}
