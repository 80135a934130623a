//! The dashboard at `/ui/`, used in a real browser (Debian's headless
//! Chromium over WebDriver) against a real node: containerd and runc run
//! the pods it shows, scales and deletes. Screenshots of each step are
//! saved under `target/ui/dashboard/`; the assertions read the page.

use std::time::Duration;

use serde_json::json;
use skiff_tests::browser::Browser;
use skiff_tests::node::OneNode;
use skiff_tests::wait_for;

fn deployment(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: ticker\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: ticker}}\n  template:\n    metadata:\n      labels: {{app: ticker}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: {image}\n        command: [\"sh\", \"-c\", \"i=0; while true; do echo tick $i from $HOSTNAME; i=$((i+1)); sleep 1; done\"]\n"
    )
}

/// Live pods of the Deployment, by kubectl.
fn ticker_pods(c: &OneNode) -> Vec<String> {
    c.cp.jsonpath(
        &["pods", "-l", "app=ticker"],
        "{range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    )
    .lines()
    .filter(|l| l.split_whitespace().count() == 1)
    .map(|l| l.trim().to_string())
    .collect()
}

/// The page's marker, set once after login: a reload would lose it.
const MARK: &str = "window.__skiffNotReloaded = true; return true;";
const MARKED: &str = "return window.__skiffNotReloaded === true;";

#[test]
fn the_dashboard_shows_the_cluster_live_and_acts_as_the_logged_in_user() {
    let c = OneNode::start_with("172.31.22.2", "10.244.22.0/24", &["--metric-resolution=2s"]);
    c.cp.apply(&deployment(&c.image)).expect("the Deployment");
    // Two users: an operator bound to cluster-admin, and a viewer bound
    // to the built-in `view` role in the default namespace only.
    for sa in ["operator", "viewer"] {
        c.cp.kubectl_ok(&["create", "serviceaccount", sa]);
    }
    c.cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "operator-admin",
        "--clusterrole=cluster-admin",
        "--serviceaccount=default:operator",
    ]);
    c.cp.kubectl_ok(&[
        "create",
        "rolebinding",
        "viewer-view",
        "--clusterrole=view",
        "--serviceaccount=default:viewer",
    ]);
    let operator =
        c.cp.kubectl_ok(&["create", "token", "operator"])
            .trim()
            .to_string();
    let viewer =
        c.cp.kubectl_ok(&["create", "token", "viewer"])
            .trim()
            .to_string();

    let b = Browser::start(&c.ns, c.cp.addr(), "dashboard");
    b.goto(&format!("{}/ui/", b.base));

    // 1. Log in: a wrong token is refused on the page, the right one lets
    // the user in and names them.
    b.type_into("#token", "not-a-token");
    b.click("#login-button");
    b.wait_text("#login-error", "not accepted", Duration::from_secs(10));
    b.screenshot("login-refused");
    assert_eq!(
        b.log_in(&operator),
        "system:serviceaccount:default:operator"
    );
    b.js(MARK, vec![]);

    // 2. The nodes, Ready, with their usage from the metrics API.
    let node_row = format!("#nodes tr[data-key=\"{}\"]", c.node.name);
    b.wait_text(&node_row, "Ready", Duration::from_secs(20));
    let row = b.text(&node_row);
    assert!(
        row.contains("172.31.22.2") && row.contains("10.244.22.0/24"),
        "{row}"
    );
    let mem = b.wait("the node's memory use", Duration::from_secs(45), |b| {
        let t = b.text(&format!("{node_row} td.usage.mem span"));
        (t.ends_with("Mi") || t.ends_with("Gi")).then_some(t)
    });
    let allocatable = b.text(&format!("{node_row} td.usage.mem small"));
    assert!(
        allocatable.starts_with(" / "),
        "used {mem} of allocatable {allocatable}"
    );
    b.screenshot("nodes");

    // The Deployment on the workloads page, and its pods a click away.
    b.click("#nav a[data-view=workloads]");
    b.wait_text(
        "#deployments tr[data-key=\"default/ticker\"] td.ready",
        "1/1",
        Duration::from_secs(90),
    );
    assert_eq!(
        b.text("#deployments tr[data-key=\"default/ticker\"] td.rollout"),
        "complete"
    );
    b.screenshot("workloads");
    b.click("#deployments tr[data-key=\"default/ticker\"] td.name a");
    let first = ticker_pods(&c);
    assert_eq!(first.len(), 1, "{first:?}");
    let first_row = format!("#pods tr[data-key=\"default/{}\"]", first[0]);
    b.wait_text(
        &format!("{first_row} td.status"),
        "Running",
        Duration::from_secs(20),
    );
    let row = b.text(&first_row);
    assert!(
        row.contains(&c.node.name) && row.contains("10.244.22."),
        "node and IP: {row}"
    );
    b.screenshot("pods");

    // 3. Scale to 3 from the page: the new pods appear in the list, live.
    b.type_into("#owner input.replicas", "3");
    b.click("#owner button[data-action=scale]");
    b.wait("three pods listed", Duration::from_secs(20), |b| {
        (b.count("#pods tbody tr") == 3).then_some(())
    });
    let listed = b.wait("three Running pods listed", Duration::from_secs(90), |b| {
        let t = b.text("#pods tbody");
        (t.matches("Running").count() == 3).then_some(t)
    });
    b.wait_text("#owner .ready", "3/3 ready", Duration::from_secs(30));
    for p in ticker_pods(&c) {
        assert!(
            listed.contains(&p),
            "kubectl's {p} is on the page:\n{listed}"
        );
    }
    assert_eq!(
        b.js(MARKED, vec![]),
        json!(true),
        "the page was not reloaded"
    );
    assert_eq!(
        c.cp.jsonpath(&["deployment", "ticker"], "{.spec.replicas}"),
        "3"
    );
    b.screenshot("scaled");

    // What happened, on the events page: the ReplicaSet's creates and the
    // kubelet's starts.
    b.click("#nav a[data-view=events]");
    let events = b.wait_text("#events", "SuccessfulCreate", Duration::from_secs(20));
    assert!(
        events.contains("Started") && events.contains("replicaset/ticker-"),
        "{events}"
    );
    b.screenshot("events");
    // The services page: the apiserver's own Service and its endpoint.
    b.click("#nav a[data-view=services]");
    let svc = b.wait_text(
        "#services tr[data-key=\"default/kubernetes\"]",
        "443/TCP",
        Duration::from_secs(20),
    );
    assert!(svc.contains("10.96.0.1"), "{svc}");
    b.screenshot("services");
    b.click("#nav a[data-view=pods]");
    b.wait("the three pods", Duration::from_secs(20), |b| {
        (b.text("#pods tbody").matches("Running").count() == 3).then_some(())
    });

    // 4. Follow a pod's logs: lines keep arriving in the open page.
    b.click(&format!("{first_row} a[data-action=logs]"));
    b.wait_text(
        "#logs",
        &format!("tick 2 from {}", first[0]),
        Duration::from_secs(20),
    );
    let seen = b.text("#logs").lines().count();
    b.wait("more log lines", Duration::from_secs(15), |b| {
        (b.text("#logs").lines().count() >= seen + 3).then_some(())
    });
    b.screenshot("logs");
    // Its usage from the metrics API, drawn.
    b.click("nav.tabs a[data-tab=usage]");
    let mem = b.wait("the pod's memory use", Duration::from_secs(30), |b| {
        let t = b.text("#pod-charts .mem-now");
        (t.ends_with("Ki") || t.ends_with("Mi")).then_some(t)
    });
    assert_eq!(
        b.count("#pod-charts svg.chart.mem polyline"),
        1,
        "a memory chart beside {mem}"
    );
    b.screenshot("usage");
    b.click("nav.tabs a[data-tab=yaml]");
    let yaml = b.wait_text("#yaml", "kind: Pod", Duration::from_secs(10));
    assert!(
        yaml.contains(&format!("name: {}", first[0])) && yaml.contains("app: ticker"),
        "{yaml}"
    );
    assert!(
        !yaml.contains("managedFields"),
        "managed fields are left out"
    );
    assert_eq!(
        b.js(MARKED, vec![]),
        json!(true),
        "the page was not reloaded"
    );

    // Deleting a pod from its page: the ReplicaSet replaces it.
    b.click("button[data-action=delete]");
    b.click("button[data-action=delete].armed");
    wait_for("the pod to go", Duration::from_secs(30), || {
        let ps = ticker_pods(&c);
        (!ps.contains(&first[0]) && ps.len() == 3).then_some(())
    });
    b.wait_text("#pod-summary", "no longer exists", Duration::from_secs(20));

    // Restart the rollout from the workloads page.
    b.click("#nav a[data-view=workloads]");
    b.click("#deployments tr[data-key=\"default/ticker\"] button[data-action=restart]");
    wait_for("the restart annotation", Duration::from_secs(10), || {
        let at = c.cp.jsonpath(
            &["deployment", "ticker"],
            "{.spec.template.metadata.annotations.kubectl\\.kubernetes\\.io/restartedAt}",
        );
        (!at.is_empty()).then_some(())
    });
    b.wait_text(
        "#deployments tr[data-key=\"default/ticker\"] td.rollout",
        "of 3",
        Duration::from_secs(20),
    );
    b.screenshot("restarting");
    c.cp.kubectl_ok(&["rollout", "status", "deployment/ticker", "--timeout=120s"]);
    b.wait_text(
        "#deployments tr[data-key=\"default/ticker\"] td.rollout",
        "complete",
        Duration::from_secs(20),
    );

    // 5. The viewer sees the workloads but may not scale or delete; the
    // page says why, in the apiserver's words, and nothing changes.
    b.click("#logout");
    assert_eq!(b.log_in(&viewer), "system:serviceaccount:default:viewer");
    b.click("#nav a[data-view=nodes]");
    b.wait_text("#nodes", "forbidden", Duration::from_secs(10));
    // Its own namespace, as it may not list across all of them.
    b.type_into("#namespace", "default\n");
    b.click("#nav a[data-view=workloads]");
    b.wait_text(
        "#deployments tr[data-key=\"default/ticker\"] td.ready",
        "/3",
        Duration::from_secs(10),
    );
    b.type_into(
        "#deployments tr[data-key=\"default/ticker\"] input.replicas",
        "1",
    );
    b.click("#deployments tr[data-key=\"default/ticker\"] button[data-action=scale]");
    let refused = b.wait_text("#error", "forbidden", Duration::from_secs(10));
    assert!(
        refused.contains("system:serviceaccount:default:viewer")
            && refused.contains("cannot patch resource \"deployments/scale\""),
        "{refused}"
    );
    b.screenshot("refused");
    b.click("#nav a[data-view=pods]");
    let some_pod = ticker_pods(&c)[0].clone();
    let row = format!("#pods tr[data-key=\"default/{some_pod}\"]");
    b.click(&format!("{row} button[data-action=delete]"));
    b.click(&format!("{row} button[data-action=delete].armed"));
    let refused = b.wait_text("#error", "forbidden", Duration::from_secs(10));
    assert!(
        refused.contains("cannot delete resource \"pods\""),
        "{refused}"
    );
    assert_eq!(
        c.cp.jsonpath(&["deployment", "ticker"], "{.spec.replicas}"),
        "3"
    );
    assert!(ticker_pods(&c).contains(&some_pod));
}
