//! High availability of the control plane: replicas of `skiff-control`
//! on one real etcd, each serving the API, taking turns at scheduling and
//! at running the controllers under `coordination.k8s.io` Leases.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use skiff_tests::cluster::Cluster;
use skiff_tests::control::{ControlPlane, HollowNodes};
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

/// A node agent reaches the apiservers through its balancer. When the one
/// it uses is killed, it moves to the other within seconds: its roles keep
/// running, its pod watch resumes from where it was (no new list), the
/// node stays Ready, its running pod is untouched, and a pod bound to it
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
    b.apply(&sleeper("before", &name, &c.busybox))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_running(&b, "before");
    let node_user = format!("system:node:{name}");
    let lists_before = requests(&b, &node_user, "/api/v1/pods").len();

    c.cp.proc.kill_now();
    let killed = Instant::now();
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

    // A pod bound after the switch: the kubelet's watch goes on on b.
    b.apply(&sleeper("after", &name, &c.busybox))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_running(&b, "after");
    eprintln!(
        "a pod bound after the kill ran {:?} after it",
        killed.elapsed()
    );

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
    let ready = b.jsonpath(
        &["node", &name],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
    );
    assert_eq!(ready, "True");

    // Untouched: the pod from before, the agent process, its roles.
    assert_eq!(
        b.jsonpath(
            &["pod", "before"],
            "{.status.containerStatuses[0].restartCount}"
        ),
        "0"
    );
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
