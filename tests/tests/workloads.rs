//! Workload kinds beside Deployments, on a real node (containerd and
//! runc, pods wired by skiff-cni), driven by the real kubectl through
//! skiff-control.

use std::collections::BTreeSet;
use std::time::Duration;

use skiff_tests::node::OneNode;
use skiff_tests::wait_for;

/// `name phase ready owner-kind/owner-name` of each live pod matching
/// `selector` (pods being deleted are left out).
fn pods(c: &OneNode, selector: &str) -> Vec<[String; 4]> {
    c.cp.jsonpath(
        &["pods", "-l", selector],
        r#"{range .items[*]}{.metadata.name} {.status.phase} {.status.conditions[?(@.type=="Ready")].status} {.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name} {.metadata.deletionTimestamp}{"\n"}{end}"#,
    )
    .lines()
    .filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() == 4).then(|| [0, 1, 2, 3].map(|i| f[i].to_string()))
    })
    .collect()
}

/// Waits until exactly `n` live pods match `selector`, all Running and
/// Ready; their names.
fn running(c: &OneNode, selector: &str, n: usize) -> BTreeSet<String> {
    wait_for(
        &format!("{n} pods {selector} Running and Ready"),
        Duration::from_secs(90),
        || {
            let ps = pods(c, selector);
            (ps.len() == n && ps.iter().all(|p| p[1] == "Running" && p[2] == "True"))
                .then(|| ps.into_iter().map(|[name, ..]| name).collect())
        },
    )
}

fn rc(name: &str, replicas: u32, selector: &str, labels: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ReplicationController\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n{selector}  template:\n    metadata:\n      labels: {labels}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: {image}\n        command: [\"sleep\", \"3600\"]\n"
    )
}

#[test]
fn a_replication_controller_keeps_its_pods_scales_and_takes_them_when_deleted() {
    let c = OneNode::start("172.31.14.2", "10.244.8.0/24");

    // A selector its template's labels do not carry is refused with the
    // field and upstream's message, and nothing is stored.
    let bad = rc(
        "web",
        3,
        "  selector: {app: other}\n",
        "{app: rc-web}",
        &c.image,
    );
    let err = c.cp.apply(&bad).expect_err("a mismatched selector");
    assert!(
        err.contains("spec.template.metadata.labels: Invalid value")
            && err.contains("selector does not match labels in `template`"),
        "{err}"
    );
    assert!(c.cp.kubectl(&["get", "rc", "web"]).is_err());

    // No selector: it defaults to the template's labels.
    c.cp.apply(&rc("web", 3, "", "{app: rc-web}", &c.image))
        .unwrap_or_else(|e| panic!("{e}"));
    let first = running(&c, "app=rc-web", 3);
    for p in pods(&c, "app=rc-web") {
        assert_eq!(p[3], "ReplicationController/web", "{p:?}");
    }
    assert_eq!(
        c.cp.jsonpath(
            &["rc", "web"],
            "{.spec.selector.app} {.metadata.labels.app}"
        ),
        "rc-web rc-web"
    );
    let table = wait_for("the rc's status", Duration::from_secs(30), || {
        let out = c.cp.kubectl_ok(&["get", "rc", "web"]);
        out.lines()
            .nth(1)
            .is_some_and(|row| {
                row.split_whitespace().take(4).collect::<Vec<_>>() == ["web", "3", "3", "3"]
            })
            .then_some(out)
    });
    assert!(
        table.starts_with("NAME") && table.contains("DESIRED") && table.contains("READY"),
        "{table}"
    );
    let all = c.cp.kubectl_ok(&["get", "all"]);
    assert!(all.contains("replicationcontroller/web"), "{all}");
    let wide = c.cp.kubectl_ok(&["get", "rc", "web", "-o", "wide"]);
    assert!(
        wide.contains("app=rc-web") && wide.contains("busybox"),
        "{wide}"
    );

    // A pod deleted behind its back is replaced.
    let gone = first.iter().next().cloned().unwrap_or_default();
    c.cp.kubectl_ok(&["delete", "pod", &gone, "--wait=false"]);
    let after = wait_for("a replacement pod", Duration::from_secs(90), || {
        let now = running(&c, "app=rc-web", 3);
        (!now.contains(&gone)).then_some(now)
    });
    assert_eq!(after.difference(&first).count(), 1, "{first:?} → {after:?}");

    // Scaled through the scale subresource, as kubectl scale does it.
    c.cp.kubectl_ok(&["scale", "rc", "web", "--replicas=1"]);
    running(&c, "app=rc-web", 1);
    assert_eq!(
        c.cp.jsonpath(
            &["rc", "web", "--subresource=scale"],
            "{.spec.replicas} {.status.selector}"
        ),
        "1 app=rc-web"
    );
    let described = wait_for("describe to show one", Duration::from_secs(30), || {
        let out = c.cp.kubectl_ok(&["describe", "rc", "web"]);
        out.contains("1 current / 1 desired").then_some(out)
    });
    assert!(described.contains("Selector:"), "{described}");

    // Deleting it takes its pods with it.
    c.cp.kubectl_ok(&["delete", "rc", "web"]);
    wait_for("the pods to go", Duration::from_secs(60), || {
        let left =
            c.cp.kubectl_ok(&["get", "pods", "-l", "app=rc-web", "-o", "name"]);
        left.trim().is_empty().then_some(())
    });
}
