//! The control plane driven by the real kubectl (and the Python client),
//! against a real etcd each test starts. Nodes are API objects only; where a
//! scenario needs pods to run, `HollowNodes` reports them running through
//! the API the way a kubelet would.

use std::time::Duration;

use skiff_tests::control::{ControlPlane, HollowNodes};
use skiff_tests::kubelet::HollowKubelet;
use skiff_tests::node::sample;
use skiff_tests::{Spawn, wait_for};

const APP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: app
        image: busybox:1.36
        ports:
        - {name: http, containerPort: 8080}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
"#;

fn lines_with(out: &str, needle: &str) -> usize {
    out.lines().filter(|l| l.contains(needle)).count()
}

fn images(cp: &ControlPlane) -> Vec<String> {
    let out = cp.jsonpath(&["pods", "-l", "app=web"], "{range .items[*]}{.spec.containers[0].image}{\" \"}{.metadata.deletionTimestamp}{\"\\n\"}{end}");
    out.lines()
        .filter(|l| l.split_whitespace().count() == 1)
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn deployment_lifecycle_with_kubectl() {
    let cp = ControlPlane::start(&["--node-monitor-grace-seconds", "3600"]);
    for n in ["node-a", "node-b", "node-c"] {
        cp.add_node(n, "", "4");
    }
    let _nodes = HollowNodes::start(&cp, &["node-a", "node-b", "node-c"]);

    let out = cp.apply(APP).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.contains("deployment.apps/web created") && out.contains("service/web created"),
        "{out}"
    );
    let out = cp.apply(APP).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.contains("deployment.apps/web unchanged"),
        "re-apply changes nothing: {out}"
    );

    let status = cp.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    let table = cp.kubectl_ok(&["get", "deployment", "web"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "{table}"
    );
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.split_whitespace().take(4).eq(["web", "3/3", "3", "3"])),
        "{table}"
    );
    let wide = cp.kubectl_ok(&["get", "pods", "-o", "wide"]);
    assert!(
        wide.lines()
            .next()
            .is_some_and(|h| h.contains("STATUS") && h.contains("NODE")),
        "{wide}"
    );
    assert_eq!(lines_with(&wide, "Running"), 3, "{wide}");
    let nodes: std::collections::BTreeSet<String> = cp
        .jsonpath(&["pods", "-l", "app=web"], "{.items[*].spec.nodeName}")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(
        nodes.len(),
        3,
        "the scheduler spreads one deployment's pods: {nodes:?}"
    );

    let described = cp.kubectl_ok(&["describe", "deployment", "web"]);
    assert!(
        described.contains("3 desired | 3 updated | 3 total | 3 available"),
        "{described}"
    );
    let svc = cp.kubectl_ok(&["get", "svc", "web", "-o", "json"]);
    let svc: serde_json::Value = serde_json::from_str(&svc).unwrap_or_else(|e| panic!("{e}"));
    let ip = svc["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ip.starts_with("10.") && ip != "10.96.0.1",
        "ClusterIP from the service CIDR: {ip}"
    );
    let node_port = svc["spec"]["ports"][0]["nodePort"].as_i64().unwrap_or(0);
    assert!((30000..=32767).contains(&node_port), "{svc}");
    wait_for(
        "the endpointslice to list 3 ready pods",
        Duration::from_secs(20),
        || {
            let ready = cp.jsonpath(
                &["endpointslice", "web"],
                "{.endpoints[*].conditions.ready}",
            );
            (ready.split_whitespace().filter(|r| *r == "true").count() == 3).then_some(())
        },
    );
    assert_eq!(
        cp.jsonpath(&["endpointslice", "web"], "{.ports[0].port}"),
        "8080",
        "named targetPort resolved"
    );

    cp.kubectl_ok(&["scale", "deployment", "web", "--replicas=5"]);
    cp.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert_eq!(lines_with(&cp.kubectl_ok(&["get", "pods"]), "Running"), 5);

    cp.kubectl_ok(&["set", "image", "deployment/web", "app=busybox:1.37"]);
    let status = cp.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    wait_for(
        "every pod on the new image",
        Duration::from_secs(30),
        || {
            let imgs = images(&cp);
            (imgs.len() == 5 && imgs.iter().all(|i| i == "busybox:1.37")).then_some(())
        },
    );
    let history = cp.kubectl_ok(&["rollout", "history", "deployment/web"]);
    assert!(
        history.lines().any(|l| l.trim_start().starts_with('1'))
            && history.lines().any(|l| l.trim_start().starts_with('2')),
        "{history}"
    );

    cp.kubectl_ok(&["rollout", "undo", "deployment/web"]);
    cp.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    assert_eq!(
        cp.jsonpath(
            &["deployment", "web"],
            "{.spec.template.spec.containers[0].image}"
        ),
        "busybox:1.36"
    );
    assert_eq!(
        cp.jsonpath(
            &["deployment", "web"],
            "{.metadata.annotations.deployment\\.kubernetes\\.io/revision}"
        ),
        "3"
    );
    wait_for(
        "every pod back on the old image",
        Duration::from_secs(30),
        || {
            let imgs = images(&cp);
            (imgs.len() == 5 && imgs.iter().all(|i| i == "busybox:1.36")).then_some(())
        },
    );

    cp.kubectl_ok(&[
        "patch",
        "deployment",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"tier":"front"}}}"#,
    ]);
    assert_eq!(
        cp.jsonpath(&["deployment", "web"], "{.metadata.labels.tier}"),
        "front"
    );
    cp.kubectl_ok(&[
        "patch",
        "deployment",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":2}]"#,
    ]);
    cp.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);

    let out = cp.kubectl_ok(&["delete", "deployment", "web"]);
    assert!(out.contains("deployment.apps \"web\" deleted"), "{out}");
    wait_for(
        "the cascade to remove replicasets and pods",
        Duration::from_secs(30),
        || {
            let rs = cp.kubectl_ok(&["get", "rs", "-o", "name"]);
            let pods = cp.kubectl_ok(&["get", "pods", "-o", "name"]);
            (rs.trim().is_empty() && pods.trim().is_empty()).then_some(())
        },
    );
    cp.kubectl_ok(&["delete", "service", "web"]);
    // The ClusterIP is free again: a new Service may ask for it.
    let again = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: again}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
    );
    cp.apply(&again)
        .unwrap_or_else(|e| panic!("reusing {ip}: {e}"));
    let taken = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: clash}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
    );
    let err = cp.apply(&taken).err().unwrap_or_default();
    assert!(err.contains("provided IP is already allocated"), "{err}");
}

#[test]
fn get_pods_watch_sees_changes() {
    let cp = ControlPlane::start(&[]);
    let out = cp.dir.path.join("watch.out");
    let mut watch = Spawn::new("kubectl")
        .env("KUBECONFIG", &cp.kubeconfig.display().to_string())
        .args(["get", "pods", "-w", "--output-watch-events"])
        .log_to(&out)
        .start();
    // kubectl lists first; give it that moment before the first change.
    std::thread::sleep(Duration::from_millis(800));
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: live, labels: {v: \"1\"}}\nspec:\n  containers: [{name: c, image: busybox:1.36}]\n";
    cp.apply(pod).unwrap_or_else(|e| panic!("{e}"));
    cp.kubectl_ok(&["label", "pod", "live", "v=2", "--overwrite"]);
    cp.kubectl_ok(&["delete", "pod", "live"]);
    let text = wait_for(
        "ADDED, MODIFIED and DELETED in the watch",
        Duration::from_secs(15),
        || {
            let t = watch.log_text();
            ["ADDED", "MODIFIED", "DELETED"]
                .iter()
                .all(|e| t.lines().any(|l| l.contains(e) && l.contains("live")))
                .then_some(t)
        },
    );
    let header = text.lines().next().unwrap_or_default();
    assert!(
        ["EVENT", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
            .iter()
            .all(|c| header.contains(c)),
        "table columns in the watch: {text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("ADDED") && l.contains("0/1") && l.contains("Pending")),
        "{text}"
    );
    watch.terminate();
}

/// `kubectl create <kind>` and `kubectl drain` use client-go's typed
/// clients, which send protobuf bodies: the objects must arrive whole,
/// with Go's unset fields (hostPort 0, nodePort 0, empty timestamps) read
/// as unset and pointer zeros (replicas 0) kept.
#[test]
fn imperative_kubectl_create_and_drain() {
    let cp = ControlPlane::start(&["--node-monitor-grace-seconds", "3600"]);
    cp.add_node("node-a", "", "4");
    cp.add_node("node-b", "", "4");
    let _nodes = HollowNodes::start(&cp, &["node-a", "node-b"]);
    let json = |args: &[&str]| -> serde_json::Value {
        let out = cp.kubectl_ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };

    cp.kubectl_ok(&["create", "namespace", "shop"]);
    assert_eq!(
        cp.jsonpath(&["namespace", "shop"], "{.status.phase}"),
        "Active"
    );
    let shop = |args: &[&str]| {
        let mut a = vec!["-n", "shop"];
        a.extend(args);
        cp.kubectl_ok(&a)
    };
    shop(&[
        "create",
        "deployment",
        "web",
        "--image=busybox:1.36",
        "--replicas=4",
        "--port=8080",
    ]);
    shop(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let d = json(&["-n", "shop", "get", "deployment", "web", "-o", "json"]);
    assert_eq!(d["spec"]["replicas"], 4);
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        (c["name"].as_str(), c["image"].as_str()),
        (Some("busybox"), Some("busybox:1.36"))
    );
    assert_eq!(
        c["ports"],
        serde_json::json!([{"containerPort": 8080, "protocol": "TCP"}]),
        "hostPort 0 means no host port"
    );
    assert!(
        d["spec"]["template"]["metadata"]["creationTimestamp"].is_null(),
        "{d}"
    );
    assert_eq!(lines_with(&shop(&["get", "pods"]), "Running"), 4);

    shop(&[
        "create",
        "deployment",
        "idle",
        "--image=busybox:1.36",
        "--replicas=0",
    ]);
    assert_eq!(
        cp.jsonpath(&["-n", "shop", "deployment", "idle"], "{.spec.replicas}"),
        "0"
    );

    shop(&[
        "create",
        "configmap",
        "cfg",
        "--from-literal=greeting=hello",
        "--from-literal=empty=",
    ]);
    let cm = json(&["-n", "shop", "get", "configmap", "cfg", "-o", "json"]);
    assert_eq!(
        cm["data"],
        serde_json::json!({"greeting": "hello", "empty": ""})
    );

    shop(&[
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal=password=s3cr3t!",
    ]);
    let password = shop(&[
        "get",
        "secret",
        "creds",
        "-o",
        "go-template={{index .data \"password\" | base64decode}}",
    ]);
    assert_eq!(password, "s3cr3t!");
    assert_eq!(
        cp.jsonpath(&["-n", "shop", "secret", "creds"], "{.type}"),
        "Opaque"
    );

    shop(&["create", "service", "clusterip", "web", "--tcp=80:8080"]);
    let svc = json(&["-n", "shop", "get", "service", "web", "-o", "json"]);
    let ip = svc["spec"]["clusterIP"].as_str().unwrap_or_default();
    assert!(ip.starts_with("10."), "a ClusterIP is allocated: {svc}");
    assert_eq!(
        svc["spec"]["ports"],
        serde_json::json!([{"name": "80-8080", "port": 80, "targetPort": 8080, "protocol": "TCP"}]),
        "no nodePort on a ClusterIP service"
    );
    shop(&["create", "service", "nodeport", "web-np", "--tcp=80:8080"]);
    let np: u32 = cp
        .jsonpath(
            &["-n", "shop", "service", "web-np"],
            "{.spec.ports[0].nodePort}",
        )
        .parse()
        .unwrap_or(0);
    assert!(
        (30000..=32767).contains(&np),
        "nodePort 0 means allocate one: {np}"
    );
    shop(&["create", "serviceaccount", "robot"]);
    shop(&["get", "serviceaccount", "robot"]);

    // drain: cordon, then an Eviction (protobuf) per pod; the Deployment
    // puts the evicted pods back on the other node.
    let out = cp.kubectl_ok(&["drain", "node-a", "--timeout=60s"]);
    assert!(out.contains("node/node-a drained"), "{out}");
    assert_eq!(
        cp.jsonpath(&["node", "node-a"], "{.spec.unschedulable}"),
        "true"
    );
    shop(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    wait_for("every web pod on node-b", Duration::from_secs(30), || {
        let nodes = cp.jsonpath(
            &["-n", "shop", "pods", "-l", "app=web"],
            "{range .items[*]}{.spec.nodeName}{\" \"}{.status.phase}{\"\\n\"}{end}",
        );
        (nodes.lines().count() == 4 && nodes.lines().all(|l| l == "node-b Running")).then_some(())
    });

    // A protobuf body that is cut short is a 400 Status, and nothing is made.
    let mut body = b"k8s\0\x0a\x0e\x0a\x02v1\x12\x09ConfigMap\x12\x40".to_vec();
    body.extend_from_slice(b"\x0a\x05\x0a\x03bad");
    let file = cp.dir.path.join("cut.pb");
    std::fs::write(&file, &body).unwrap_or_else(|e| panic!("{e}"));
    let out = cp
        .curl(
            Some(&cp.token()),
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/vnd.kubernetes.protobuf",
                "--data-binary",
                &format!("@{}", file.display()),
                "-w",
                "\n%{http_code}",
                &format!("{}/api/v1/namespaces/shop/configmaps", cp.server),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, code) = out.rsplit_once('\n').unwrap_or_default();
    assert_eq!(code, "400", "{out}");
    assert!(
        status.contains("\"kind\":\"Status\"") && status.contains("protobuf"),
        "{status}"
    );
    assert!(
        cp.kubectl(&["-n", "shop", "get", "configmap", "bad"])
            .is_err()
    );
}

/// minReadySeconds holds pods out of availableReplicas until they have
/// been Ready that long; progressDeadlineSeconds turns a rollout that makes
/// no progress into a failed one that `kubectl rollout status` reports,
/// and a fixed template makes it progress again.
#[test]
fn min_ready_seconds_and_progress_deadline() {
    let cp = ControlPlane::start(&["--node-monitor-grace-seconds", "3600"]);
    cp.add_node("node-a", "", "4");
    let _nodes = HollowNodes::start(&cp, &["node-a"]);
    let deployment = |name: &str, extra: &str, pod_extra: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  replicas: 2\n{extra}  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n{pod_extra}      containers: [{{name: c, image: busybox:1.36}}]\n"
        )
    };
    let counts = |name: &str| {
        cp.jsonpath(
            &["deployment", name],
            "{.status.readyReplicas}/{.status.availableReplicas}",
        )
    };

    cp.apply(&deployment("slow", "  minReadySeconds: 6\n", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for("both slow pods Ready", Duration::from_secs(20), || {
        counts("slow").starts_with("2/").then_some(())
    });
    let early = counts("slow");
    assert!(
        early == "2/0" || early == "2/",
        "Ready pods are not available before minReadySeconds: {early}"
    );
    assert_eq!(
        cp.jsonpath(
            &["rs", "-l", "app=slow"],
            "{.items[0].status.availableReplicas}"
        ),
        "0"
    );
    // Available once they have been Ready for 6 s (the controllers look
    // again when that time comes, not only at their resync).
    wait_for("slow pods available", Duration::from_secs(20), || {
        (counts("slow") == "2/2").then_some(())
    });
    cp.kubectl_ok(&["rollout", "status", "deployment/slow", "--timeout=10s"]);

    // Pods that fit nowhere: no progress, so the deadline passes.
    cp.apply(&deployment(
        "stuck",
        "  progressDeadlineSeconds: 3\n",
        "      nodeSelector: {disk: none}\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let reason = wait_for("ProgressDeadlineExceeded", Duration::from_secs(30), || {
        let r = cp.jsonpath(
            &["deployment", "stuck"],
            "{.status.conditions[?(@.type==\"Progressing\")].status} {.status.conditions[?(@.type==\"Progressing\")].reason}",
        );
        (r == "False ProgressDeadlineExceeded").then_some(r)
    });
    assert_eq!(reason, "False ProgressDeadlineExceeded");
    let err = cp
        .kubectl(&["rollout", "status", "deployment/stuck", "--timeout=20s"])
        .expect_err("a timed-out rollout fails");
    assert!(err.contains("exceeded its progress deadline"), "{err}");

    // A template that fits makes a new ReplicaSet, which progresses.
    cp.kubectl_ok(&[
        "patch",
        "deployment",
        "stuck",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/template/spec/nodeSelector"}]"#,
    ]);
    cp.kubectl_ok(&["rollout", "status", "deployment/stuck", "--timeout=30s"]);
    assert_eq!(
        cp.jsonpath(
            &["deployment", "stuck"],
            "{.status.conditions[?(@.type==\"Progressing\")].reason}"
        ),
        "NewReplicaSetAvailable"
    );
}

/// `limit` and `continue`: a list in chunks read at one revision, with
/// the count left; kubectl's own chunked `get` sees every object; a token
/// from before a compaction is 410 Expired.
#[test]
fn lists_come_in_chunks() {
    let cp = ControlPlane::start(&[]);
    let token = cp.token();
    let get = |query: &str| -> serde_json::Value {
        let url = format!("{}/api/v1/namespaces/default/configmaps?{query}", cp.server);
        let out = cp
            .curl(Some(&token), &[&url])
            .unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let names = |list: &serde_json::Value| -> Vec<String> {
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["metadata"]["name"].as_str().map(String::from))
            .collect()
    };
    // Every namespace gets the cluster CA as kube-root-ca.crt (listed
    // after the cm-* below).
    wait_for("kube-root-ca.crt", Duration::from_secs(20), || {
        cp.kubectl(&["get", "configmap", "kube-root-ca.crt"]).ok()
    });
    for i in 0..5 {
        let tier = if i % 2 == 0 { "even" } else { "odd" };
        cp.apply(&format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}, labels: {{tier: {tier}}}}}\n"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let first = get("limit=2");
    assert_eq!(names(&first), ["cm-0", "cm-1"]);
    assert_eq!(first["metadata"]["remainingItemCount"], 4, "{first}");
    let rv = first["metadata"]["resourceVersion"].clone();
    let cont = first["metadata"]["continue"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!cont.is_empty(), "{first}");

    // Changes after the first chunk are not in the later ones: one snapshot.
    cp.kubectl_ok(&["delete", "configmap", "cm-3"]);
    cp.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm-9}\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let second = get(&format!("limit=2&continue={cont}"));
    assert_eq!(names(&second), ["cm-2", "cm-3"]);
    assert_eq!(second["metadata"]["resourceVersion"], rv);
    let cont2 = second["metadata"]["continue"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let last = get(&format!("limit=2&continue={cont2}"));
    assert_eq!(names(&last), ["cm-4", "kube-root-ca.crt"]);
    assert!(last["metadata"].get("continue").is_none(), "{last}");

    // With a selector, chunks hold up to `limit` matches.
    let even = get("limit=2&labelSelector=tier%3Deven");
    assert_eq!(names(&even), ["cm-0", "cm-2"]);
    let c = even["metadata"]["continue"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        names(&get(&format!(
            "limit=2&labelSelector=tier%3Deven&continue={c}"
        ))),
        ["cm-4"]
    );

    // kubectl asks in chunks of 2 and prints all of them.
    let out = cp.kubectl_ok(&["get", "configmaps", "--chunk-size=2", "-o", "name"]);
    let printed: Vec<&str> = out.lines().filter(|l| l.contains("cm-")).collect();
    assert_eq!(
        printed,
        [
            "configmap/cm-0",
            "configmap/cm-1",
            "configmap/cm-2",
            "configmap/cm-4",
            "configmap/cm-9"
        ]
    );

    let bad = get("limit=2&continue=bm90LWEtdG9rZW4");
    assert_eq!(
        (bad["kind"].as_str(), bad["code"].as_i64()),
        (Some("Status"), Some(400)),
        "{bad}"
    );

    // Compact past the token's revision: the rest of that list is gone.
    let now = cp.etcd.revision();
    cp.etcd
        .ctl(&["compact", &now.to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    let gone = get(&format!("limit=2&continue={cont}"));
    assert_eq!(
        (gone["code"].as_i64(), gone["reason"].as_str()),
        (Some(410), Some("Expired")),
        "{gone}"
    );
}

/// `kubectl logs` goes through the apiserver's `pods/log`, which proxies
/// to the kubelet of the pod's node over TLS with its kubelet-client
/// certificate, passes the options on and streams the answer back.
#[test]
fn kubectl_logs_through_the_node_kubelet() {
    let cp = ControlPlane::start(&["--node-monitor-grace-seconds", "3600"]);
    cp.add_node("node-a", "", "4");
    let _nodes = HollowNodes::start(&cp, &["node-a"]);
    let _kubelet = HollowKubelet::start(&cp, "node-a");
    cp.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: one}\nspec:\n  containers: [{name: app, image: busybox:1.36}]\n")
        .unwrap_or_else(|e| panic!("{e}"));
    cp.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: two}\nspec:\n  containers: [{name: web, image: busybox:1.36}, {name: side, image: busybox:1.36}]\n")
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for("both pods running", Duration::from_secs(20), || {
        (lines_with(&cp.kubectl_ok(&["get", "pods"]), "Running") == 2).then_some(())
    });

    let out = cp.kubectl_ok(&["logs", "one"]);
    assert_eq!(out.lines().count(), 5, "{out}");
    assert_eq!(out.lines().next(), Some("line 1 from one/app"));
    assert_eq!(
        cp.kubectl_ok(&["logs", "one", "--tail=2"])
            .lines()
            .collect::<Vec<_>>(),
        ["line 4 from one/app", "line 5 from one/app"]
    );
    let stamped = cp.kubectl_ok(&["logs", "one", "--tail=1", "--timestamps"]);
    assert!(
        stamped.starts_with("2026-01-01T00:00:05Z line 5"),
        "{stamped}"
    );
    assert_eq!(
        cp.kubectl_ok(&["logs", "two", "-c", "side", "--tail=1"])
            .trim(),
        "line 5 from two/side"
    );
    // kubectl picks the first container itself; the API asks for a name.
    assert_eq!(
        cp.kubectl_ok(&["logs", "two", "--tail=1"]).trim(),
        "line 5 from two/web"
    );
    let url = format!("{}/api/v1/namespaces/default/pods/two/log", cp.server);
    let raw = cp
        .curl(Some(&cp.token()), &["-w", "\n%{http_code}", &url])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        raw.ends_with("\n400")
            && raw.contains(
                "a container name must be specified for pod two, choose one of: [web side]"
            ),
        "{raw}"
    );
    let err = cp
        .kubectl(&["logs", "one", "-c", "nope"])
        .expect_err("no such container");
    assert!(
        err.contains("container nope is not valid for pod one"),
        "{err}"
    );

    // -f streams: lines written after the request arrive while it is open.
    let mut follow = Spawn::new("kubectl")
        .env("KUBECONFIG", &cp.kubeconfig.display().to_string())
        .args(["logs", "-f", "one"])
        .log_to(&cp.dir.path.join("follow.log"))
        .start();
    let seen = wait_for("followed lines", Duration::from_secs(15), || {
        let text = follow.log_text();
        text.contains("line 8 from one/app").then_some(text)
    });
    follow.kill_now();
    assert!(
        seen.contains("line 1 from one/app") && seen.contains("line 7 from one/app"),
        "{seen}"
    );

    // A pod not yet on a node has no logs to give.
    cp.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: nowhere}\nspec:\n  nodeSelector: {disk: none}\n  containers: [{name: c, image: busybox:1.36}]\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let err = cp.kubectl(&["logs", "nowhere"]).expect_err("unscheduled");
    assert!(
        err.contains("pod nowhere does not have a host assigned"),
        "{err}"
    );

    // Without the apiserver's client certificate the kubelet refuses.
    let direct = Spawn::new("curl")
        .args([
            "-sk",
            &format!(
                "https://127.0.0.1:{}/containerLogs/default/one/app",
                _kubelet.port
            ),
        ])
        .try_output();
    assert!(direct.is_err(), "{direct:?}");
}

/// Watches of one resource share one etcd watch: more watchers add no
/// etcd watchers, every one of them sees each change, and a watch from a
/// recent revision is replayed from memory.
#[test]
fn watches_share_one_etcd_watch() {
    let cp = ControlPlane::start(&[]);
    let token = cp.token();
    let etcd_watchers = || -> i64 {
        let out = Spawn::new("curl")
            .args(["-s", &format!("{}/metrics", cp.etcd.metrics_url)])
            .try_output()
            .unwrap_or_else(|e| panic!("{e}"));
        out.lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as i64)
            .unwrap_or_else(|| panic!("no watcher count in etcd's metrics"))
    };
    let url = format!(
        "{}/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=30",
        cp.server
    );
    let watch = |n: usize| {
        let log = cp.dir.path.join(format!("watch-{n}.log"));
        let p = Spawn::new("curl")
            .args([
                "-sN",
                "--cacert",
                &cp.ca_file().display().to_string(),
                "-H",
                &format!("Authorization: Bearer {}", token.trim()),
                &url,
            ])
            .log_to(&log)
            .start();
        (p, log)
    };
    let mut watches = vec![watch(0)];
    std::thread::sleep(Duration::from_secs(1));
    let one = etcd_watchers();
    watches.extend((1..8).map(watch));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        etcd_watchers(),
        one,
        "seven more API watches, no more etcd watchers"
    );

    let before = cp.etcd.revision();
    cp.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shared}\ndata: {k: v}\n")
        .unwrap_or_else(|e| panic!("{e}"));
    for (_, log) in &watches {
        wait_for(
            "every watcher to see the change",
            Duration::from_secs(10),
            || {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                (text.contains("\"type\":\"ADDED\"") && text.contains("\"name\":\"shared\""))
                    .then_some(())
            },
        );
    }
    for (p, _) in &mut watches {
        p.kill_now();
    }
    let replay = cp
        .curl(
            Some(&token),
            &[&format!(
                "{}/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=1&resourceVersion={before}",
                cp.server
            )],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        replay.contains("\"type\":\"ADDED\"") && replay.contains("\"name\":\"shared\""),
        "{replay}"
    );
}

#[test]
fn raw_api_bookmarks_deletecollection_and_field_selectors() {
    let cp = ControlPlane::start(&[]);
    let token = cp.token();
    let curl = |args: &[&str]| {
        cp.curl(Some(&token), args)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    for (name, tier) in [("a", "web"), ("b", "web"), ("c", "db")] {
        cp.apply(&format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, labels: {{tier: {tier}}}}}\ndata: {{k: v}}\n")).unwrap_or_else(|e| panic!("{e}"));
    }
    let list = curl(&[&format!(
        "{}/api/v1/namespaces/default/configmaps?fieldSelector=metadata.name%3Db",
        cp.server
    )]);
    let list: serde_json::Value =
        serde_json::from_str(&list).unwrap_or_else(|e| panic!("{e}: {list}"));
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["kind"], "ConfigMapList");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let bad = curl(&[&format!(
        "{}/api/v1/pods?fieldSelector=spec.bogus%3D1",
        cp.server
    )]);
    assert!(
        bad.contains("\"code\":400") && bad.contains("spec.bogus"),
        "{bad}"
    );

    // A watch asked for bookmarks gets them while nothing changes.
    // curl ends the stream at --max-time (exit 28); what it read is the test.
    let url = format!(
        "{}/api/v1/namespaces/default/configmaps?watch=true&allowWatchBookmarks=true&resourceVersion={rv}",
        cp.server
    );
    let stream = cp
        .curl(Some(&token), &["--max-time", "8", &url])
        .unwrap_or_else(|e| e);
    let bookmark = stream
        .lines()
        .find(|l| l.contains("\"BOOKMARK\""))
        .unwrap_or_else(|| panic!("no bookmark in {stream}"));
    let json_at = bookmark.find("{\"").unwrap_or(0);
    let mark: serde_json::Value =
        serde_json::from_str(&bookmark[json_at..]).unwrap_or_else(|e| panic!("{e}: {bookmark}"));
    let at: i64 = mark["object"]["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    assert!(at >= rv.parse::<i64>().unwrap_or(i64::MAX), "{mark}");

    let out = curl(&[
        "-X",
        "DELETE",
        &format!(
            "{}/api/v1/namespaces/default/configmaps?labelSelector=tier%3Dweb",
            cp.server
        ),
    ]);
    assert!(out.contains("\"kind\":\"ConfigMapList\""), "{out}");
    let left = cp.kubectl_ok(&["get", "cm", "-o", "name", "-l", "tier"]);
    assert_eq!(
        left.trim(),
        "configmap/c",
        "deletecollection honoured the selector"
    );
}

#[test]
fn foreground_and_orphan_cascades() {
    let cp = ControlPlane::start(&["--node-monitor-grace-seconds", "3600"]);
    cp.add_node("n1", "", "8");
    let _nodes = HollowNodes::start(&cp, &["n1"]);
    let deployment = APP.split("---").next().unwrap_or_default();
    cp.apply(deployment).unwrap_or_else(|e| panic!("{e}"));
    cp.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    cp.kubectl_ok(&["delete", "deployment", "web", "--cascade=orphan"]);
    let rs = wait_for("the replicaset orphaned", Duration::from_secs(20), || {
        let owners = cp.jsonpath(
            &["rs", "-l", "app=web"],
            "{.items[*].metadata.ownerReferences}",
        );
        let names = cp.jsonpath(&["rs", "-l", "app=web"], "{.items[*].metadata.name}");
        (owners.is_empty()
            && !names.is_empty()
            && cp.kubectl(&["get", "deployment", "web"]).is_err())
        .then_some(names)
    });
    assert_eq!(
        lines_with(&cp.kubectl_ok(&["get", "pods"]), "Running"),
        3,
        "orphaned pods keep running"
    );
    let out = cp.kubectl_ok(&[
        "delete",
        "rs",
        rs.trim(),
        "--cascade=foreground",
        "--wait=true",
        "--timeout=60s",
    ]);
    assert!(out.contains("deleted"), "{out}");
    assert!(
        cp.kubectl(&["get", "rs", rs.trim()]).is_err(),
        "the owner went only after its dependents"
    );
    assert_eq!(
        cp.kubectl_ok(&["get", "pods", "-o", "name"]).trim(),
        "",
        "no pod left"
    );
}

#[test]
fn stale_update_is_a_conflict_and_invalid_objects_name_the_field() {
    let cp = ControlPlane::start(&[]);
    cp.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {a: \"1\"}\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let old = cp.kubectl_ok(&["get", "configmap", "cfg", "-o", "json"]);
    cp.kubectl_ok(&["patch", "configmap", "cfg", "-p", r#"{"data":{"a":"2"}}"#]);
    let stale = cp.dir.path.join("stale.json");
    std::fs::write(&stale, old.replace("\"a\": \"1\"", "\"a\": \"3\""))
        .unwrap_or_else(|e| panic!("{e}"));
    let err = cp
        .kubectl(&["replace", "-f", &stale.display().to_string()])
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("the object has been modified"),
        "409 on a stale resourceVersion: {err}"
    );
    assert_eq!(
        cp.jsonpath(&["configmap", "cfg"], "{.data.a}"),
        "2",
        "the stale write changed nothing"
    );

    let deployment = APP.split("---").next().unwrap_or_default();
    let bad_replicas = deployment.replace("replicas: 3", "replicas: -1");
    let err = cp.apply(&bad_replicas).err().unwrap_or_default();
    assert!(
        err.contains("spec.replicas: Invalid value: \"-1\""),
        "{err}"
    );
    let service = APP.split("---").nth(1).unwrap_or_default();
    let bad_port = service.replace("port: 80,", "port: 70000,");
    let err = cp.apply(&bad_port).err().unwrap_or_default();
    assert!(
        err.contains("spec.ports[0].port: Invalid value: \"70000\""),
        "{err}"
    );
    let no_image =
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c}]\n";
    let err = cp.apply(no_image).err().unwrap_or_default();
    assert!(
        err.contains("spec.containers[0].image: Required value"),
        "{err}"
    );
    let mismatch = deployment.replace(
        "labels: {app: web}\n    spec:",
        "labels: {app: other}\n    spec:",
    );
    let err = cp.apply(&mismatch).err().unwrap_or_default();
    assert!(
        err.contains("spec.template.metadata.labels")
            && err.contains("`selector` does not match template `labels`"),
        "{err}"
    );
    let unknown = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\nbogus: 1\n";
    let err = cp.apply(unknown).err().unwrap_or_default();
    assert!(
        err.contains("unknown field \"bogus\""),
        "strict field validation: {err}"
    );
    let out = cp.kubectl_ok(&["get", "deploy,pods,cm", "-o", "name"]);
    let stored: Vec<&str> = out
        .lines()
        .filter(|l| *l != "configmap/kube-root-ca.crt")
        .collect();
    assert_eq!(stored, ["configmap/cfg"], "nothing invalid was stored");
}

#[test]
fn scheduler_filters_and_retries_unschedulable_pods() {
    let cp = ControlPlane::start(&["--node-monitor-grace-seconds", "3600"]);
    cp.add_node("small", "", "1");
    cp.add_node("big", ", disk: hdd", "8");
    cp.kubectl_ok(&["taint", "node", "big", "dedicated=db:NoSchedule"]);
    let pod = |name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n{extra}  containers:\n  - name: c\n    image: busybox:1.36\n    resources: {{requests: {{cpu: \"2\"}}}}\n"
        )
    };
    cp.apply(&pod("needs-cpu", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    let reason = wait_for(
        "the Unschedulable condition",
        Duration::from_secs(15),
        || {
            let c = cp.jsonpath(
                &["pod", "needs-cpu"],
                "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
            );
            (!c.is_empty()).then_some(c)
        },
    );
    assert!(
        reason.contains("0/2 nodes are available")
            && reason.contains("1 Insufficient cpu")
            && reason.contains("untolerated taint {dedicated: db}"),
        "{reason}"
    );
    // Events are recorded in the background: the condition may come first.
    wait_for(
        "the FailedScheduling event",
        Duration::from_secs(15),
        || {
            let events = cp.kubectl_ok(&["get", "events"]);
            (events.contains("FailedScheduling") && events.contains("pod/needs-cpu")).then_some(())
        },
    );
    // The cluster changes: the pod is tried again and lands.
    cp.kubectl_ok(&["taint", "node", "big", "dedicated-"]);
    wait_for(
        "the pod to be bound to big",
        Duration::from_secs(15),
        || (cp.jsonpath(&["pod", "needs-cpu"], "{.spec.nodeName}") == "big").then_some(()),
    );

    cp.apply(&pod("wants-ssd", "  nodeSelector: {disk: ssd}\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        cp.jsonpath(&["pod", "wants-ssd"], "{.spec.nodeName}"),
        "",
        "no node matches the selector"
    );
    cp.kubectl_ok(&["label", "node", "big", "disk=ssd", "--overwrite"]);
    wait_for(
        "the selector pod to land on big",
        Duration::from_secs(15),
        || (cp.jsonpath(&["pod", "wants-ssd"], "{.spec.nodeName}") == "big").then_some(()),
    );
    let hostport = "apiVersion: v1\nkind: Pod\nmetadata: {name: NAME}\nspec:\n  nodeSelector: {kubernetes.io/hostname: big}\n  containers:\n  - {name: c, image: busybox:1.36, ports: [{containerPort: 80, hostPort: 8080}]}\n";
    cp.apply(&hostport.replace("NAME", "hp-1"))
        .unwrap_or_else(|e| panic!("{e}"));
    cp.apply(&hostport.replace("NAME", "hp-2"))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for("hp-1 bound", Duration::from_secs(15), || {
        (!cp.jsonpath(&["pod", "hp-1"], "{.spec.nodeName}").is_empty()).then_some(())
    });
    let msg = wait_for("hp-2 unschedulable", Duration::from_secs(15), || {
        let c = cp.jsonpath(
            &["pod", "hp-2"],
            "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        );
        (!c.is_empty()).then_some(c)
    });
    assert!(msg.contains("didn't have free ports"), "{msg}");
}

#[test]
fn silent_node_goes_notready_and_its_pods_are_evicted() {
    let cp = ControlPlane::start(&[
        "--node-monitor-grace-seconds",
        "3",
        "--pod-eviction-timeout-seconds",
        "2",
    ]);
    cp.add_node("alive", "", "4");
    cp.add_node("silent", "", "4");
    let _nodes = HollowNodes::start(&cp, &["alive", "silent"]);
    let renew = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = renew.clone();
    let kubeconfig = cp.kubeconfig.clone();
    // The live node's heartbeat: its Lease renewed every second.
    let heartbeat = std::thread::spawn(move || {
        while flag.load(std::sync::atomic::Ordering::Relaxed) {
            let now = Spawn::new("date")
                .args(["-u", "+%Y-%m-%dT%H:%M:%S.000000Z"])
                .output();
            let lease = format!(
                "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{name: alive, namespace: kube-node-lease}}\nspec: {{holderIdentity: alive, leaseDurationSeconds: 40, renewTime: \"{}\"}}\n",
                now.trim()
            );
            let f = std::env::temp_dir().join(format!("lease-{}.yaml", std::process::id()));
            let _ = std::fs::write(&f, lease);
            let _ = Spawn::new("kubectl")
                .env("KUBECONFIG", &kubeconfig.display().to_string())
                .args(["apply", "-f", &f.display().to_string()])
                .try_output();
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let two = APP.replace("replicas: 3", "replicas: 2");
    cp.apply(&two).unwrap_or_else(|e| panic!("{e}"));
    wait_for("both pods running", Duration::from_secs(30), || {
        (lines_with(&cp.kubectl_ok(&["get", "pods"]), "Running") == 2).then_some(())
    });
    wait_for(
        "the silent node to go NotReady",
        Duration::from_secs(20),
        || {
            let nodes = cp.kubectl_ok(&["get", "nodes"]);
            (nodes
                .lines()
                .any(|l| l.starts_with("silent") && l.contains("NotReady"))
                && nodes
                    .lines()
                    .any(|l| l.starts_with("alive") && l.contains(" Ready")))
            .then_some(())
        },
    );
    let taints = cp.jsonpath(&["node", "silent"], "{.spec.taints[*].key}");
    assert!(
        taints.contains("node.kubernetes.io/unreachable"),
        "{taints}"
    );
    wait_for(
        "every pod to end up on the live node",
        Duration::from_secs(40),
        || {
            let nodes = cp.jsonpath(
                &[
                    "pods",
                    "-l",
                    "app=web",
                    "--field-selector=status.phase=Running",
                ],
                "{.items[*].spec.nodeName}",
            );
            let all: Vec<&str> = nodes.split_whitespace().collect();
            (all.len() == 2 && all.iter().all(|n| *n == "alive")).then_some(())
        },
    );
    renew.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = heartbeat.join();
}

#[test]
fn daemonset_runs_one_pod_per_eligible_node() {
    let cp = ControlPlane::start(&["--node-monitor-grace-seconds", "3600"]);
    for n in ["d1", "d2", "d3"] {
        cp.add_node(n, "", "4");
    }
    cp.kubectl_ok(&["taint", "node", "d3", "gpu=yes:NoSchedule"]);
    let ds = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: agent}\nspec:\n  selector: {matchLabels: {app: agent}}\n  template:\n    metadata: {labels: {app: agent}}\n    spec:\n      containers: [{name: a, image: busybox:1.36}]\n";
    cp.apply(ds).unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        "daemon pods on d1 and d2 only",
        Duration::from_secs(20),
        || {
            let mut nodes: Vec<String> = cp
                .jsonpath(&["pods", "-l", "app=agent"], "{.items[*].spec.nodeName}")
                .split_whitespace()
                .map(String::from)
                .collect();
            nodes.sort();
            (nodes == ["d1", "d2"]).then_some(())
        },
    );
    cp.add_node("d4", "", "4");
    wait_for(
        "a daemon pod on the new node",
        Duration::from_secs(20),
        || {
            cp.jsonpath(&["pods", "-l", "app=agent"], "{.items[*].spec.nodeName}")
                .contains("d4")
                .then_some(())
        },
    );
    let desired = wait_for("the daemonset status", Duration::from_secs(20), || {
        let d = cp.jsonpath(&["ds", "agent"], "{.status.desiredNumberScheduled}");
        (d == "3").then_some(d)
    });
    assert_eq!(desired, "3");
}

#[test]
fn python_client_lists_watches_and_recovers_from_410() {
    let cp = ControlPlane::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/client_check.py");
    // Compaction happens from outside, as an operator's etcd maintenance would.
    let mut python = Spawn::new("python3");
    // etcdctl takes the endpoint and the admin's certificate from these.
    for (k, v) in cp.etcd.ctl_env() {
        python = python.env(k, &v);
    }
    let out = python
        .args([script, &cp.kubeconfig.display().to_string()])
        .try_output()
        .unwrap_or_else(|e| panic!("{e}\n--- control plane log ---\n{}", cp.log_tail()));
    assert!(out.contains("ok: all checks passed"), "{out}");
}

/// `skiff-control` with its own local etcd in `dir`, on a loopback port.
fn one_command_control_plane(dir: &std::path::Path, port: u16, log: &str) -> skiff_tests::Proc {
    Spawn::new(skiff_tests::bin("skiff-control"))
        .args([
            "--data-dir",
            &dir.display().to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .log_to(&dir.join(log))
        .start()
}

#[test]
fn one_command_control_plane_manages_its_own_etcd() {
    let dir = skiff_tests::TempDir::new();
    let port = skiff_tests::control::free_port();
    let mut cp = one_command_control_plane(&dir.path, port, "control.log");
    let kubeconfig = dir.path.join("admin.kubeconfig");
    let kubectl = |args: &[&str]| {
        Spawn::new("kubectl")
            .env("KUBECONFIG", &kubeconfig.display().to_string())
            .args(args)
            .try_output()
    };
    let out = wait_for(
        "kubectl against the one-command control plane",
        Duration::from_secs(30),
        || kubectl(&["get", "namespaces"]).ok(),
    );
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(out.contains(ns), "{out}");
    }
    let sa = wait_for(
        "the default serviceaccount",
        Duration::from_secs(15),
        || kubectl(&["get", "sa", "default"]).ok(),
    );
    assert!(sa.contains("default"), "{sa}");
    let etcd_pid = wait_for("the local etcd process", Duration::from_secs(5), || {
        let ps = Spawn::new("pgrep")
            .args([
                "-f",
                &format!("etcd --name=skiff --data-dir={}/etcd", dir.path.display()),
            ])
            .try_output()
            .ok()?;
        ps.split_whitespace()
            .next()
            .and_then(|p| p.parse::<i32>().ok())
    });
    local_etcd_lets_in_only_the_control_planes_certificate(&dir.path, &cp.log_text());
    cp.terminate();
    wait_for(
        "the local etcd to stop with the control plane",
        Duration::from_secs(10),
        || (!std::path::Path::new(&format!("/proc/{etcd_pid}")).exists()).then_some(()),
    );
}

/// The local etcd serves over mutual TLS: a client with the control
/// plane's certificate reads the store; one without a certificate, one
/// over plain HTTP, and one whose certificate another CA signed get
/// nothing.
fn local_etcd_lets_in_only_the_control_planes_certificate(data_dir: &std::path::Path, log: &str) {
    let url = log
        .lines()
        .filter(|l| l.contains("local etcd started"))
        .find_map(|l| l.split("url=").nth(1)?.split_whitespace().next())
        .unwrap_or_else(|| panic!("no local etcd url in the log:\n{log}"));
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let pki = data_dir.join("pki");
    let file = |p: &str| pki.join(p).display().to_string();
    let get = |endpoint: &str, tls: &[String]| {
        Spawn::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                endpoint,
                "--dial-timeout=2s",
                "--command-timeout=3s",
            ])
            .args(tls)
            .args(["get", "/registry/namespaces/", "--prefix", "--keys-only"])
            .try_output()
    };
    let ca = format!("--cacert={}", file("etcd/ca.crt"));
    let own = [
        ca.clone(),
        format!("--cert={}", file("apiserver-etcd-client.crt")),
        format!("--key={}", file("apiserver-etcd-client.key")),
    ];
    let keys = get(url, &own).unwrap_or_else(|e| panic!("with the certificate: {e}"));
    assert!(keys.contains("/registry/namespaces/kube-system"), "{keys}");

    let refused = |what: &str, out: Result<String, String>| match out {
        Ok(o) => panic!("etcd answered {what}: {o}"),
        // Failed, and with no key in what it said.
        Err(e) => assert!(!e.contains("kube-system"), "{what}: {e}"),
    };
    refused("without a certificate", get(url, std::slice::from_ref(&ca)));
    refused(
        "over plain HTTP",
        get(&url.replace("https://", "http://"), &[]),
    );
    let other = skiff_tests::TempDir::new();
    Spawn::new(skiff_tests::bin("skiff-control"))
        .args(["certs", "etcd", "--dir", &other.path.display().to_string()])
        .output();
    let stranger = [
        ca,
        format!(
            "--cert={}",
            other.path.join("apiserver-etcd-client.crt").display()
        ),
        format!(
            "--key={}",
            other.path.join("apiserver-etcd-client.key").display()
        ),
    ];
    refused("to a certificate of another CA", get(url, &stranger));
}

/// Pids of processes running etcd on `data_dir` (exact argument match).
fn etcds_on(data_dir: &std::path::Path) -> Vec<i32> {
    skiff_tests::pids_with_arg(&format!("--data-dir={}", data_dir.display()))
}

#[test]
fn control_plane_killed_with_sigkill_comes_back_with_its_data() {
    let dir = skiff_tests::TempDir::new();
    let data_dir = dir.path.join("etcd");
    let port = skiff_tests::control::free_port();
    let start = |log: &str| one_command_control_plane(&dir.path, port, log);
    let kubeconfig = dir.path.join("admin.kubeconfig");
    let kubectl = |args: &[&str]| {
        Spawn::new("kubectl")
            .env("KUBECONFIG", &kubeconfig.display().to_string())
            .args(["--request-timeout=5s"])
            .args(args)
            .try_output()
    };
    let mut cp = start("control-1.log");
    wait_for("the apiserver", Duration::from_secs(30), || {
        kubectl(&["get", "namespaces"]).ok()
    });
    let out = kubectl(&["create", "configmap", "a", "--from-literal=a=1"]);
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(etcds_on(&data_dir).len(), 1, "one local etcd runs");

    // A crash: no chance to stop etcd. It must go with its parent.
    cp.kill_now();
    wait_for(
        "the local etcd to die with its SIGKILLed parent",
        Duration::from_secs(15),
        || etcds_on(&data_dir).is_empty().then_some(()),
    );

    let _cp = start("control-2.log");
    let value = wait_for(
        "the configmap after the restart",
        Duration::from_secs(30),
        || kubectl(&["get", "configmap", "a", "-o", "jsonpath={.data.a}"]).ok(),
    );
    assert_eq!(value, "1");
    assert_eq!(etcds_on(&data_dir).len(), 1, "still one local etcd");
}

#[test]
fn control_plane_replaces_an_etcd_left_on_its_data_dir() {
    let dir = skiff_tests::TempDir::new();
    let data_dir = dir.path.join("etcd");
    let port = skiff_tests::control::free_port();
    // An etcd that outlived an older control plane, holding the data dir's
    // lock (started here by hand: the current build's children die with it).
    let (client, peer) = (
        skiff_tests::control::free_port(),
        skiff_tests::control::free_port(),
    );
    let mut orphan = Spawn::new("etcd")
        .args([
            "--name=skiff".to_string(),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls=http://127.0.0.1:{client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster=skiff=http://127.0.0.1:{peer}"),
        ])
        .log_to(&dir.path.join("orphan.log"))
        .start();
    wait_for("the orphan etcd to serve", Duration::from_secs(30), || {
        Spawn::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &format!("http://127.0.0.1:{client}"),
                "endpoint",
                "health",
            ])
            .try_output()
            .ok()
    });
    let _cp = one_command_control_plane(&dir.path, port, "control.log");
    let kubeconfig = dir.path.join("admin.kubeconfig");
    let answered = skiff_tests::wait_until(Duration::from_secs(40), || {
        Spawn::new("kubectl")
            .env("KUBECONFIG", &kubeconfig.display().to_string())
            .args(["--request-timeout=5s", "get", "namespaces"])
            .try_output()
            .is_ok()
    });
    let log = |name: &str| std::fs::read_to_string(dir.path.join(name)).unwrap_or_default();
    assert!(
        answered,
        "the apiserver did not answer within 40 s\n--- control.log ---\n{}\n--- etcd.log ---\n{}",
        log("control.log"),
        log("etcd.log")
    );
    wait_for("the orphan to be stopped", Duration::from_secs(5), || {
        (!orphan.is_running()).then_some(())
    });
    assert_eq!(etcds_on(&data_dir).len(), 1, "one etcd on the data dir");
}

#[test]
fn dual_stack_services_get_an_address_of_each_family_they_ask_for() {
    let cp = ControlPlane::start(&["--service-cidr", "10.96.0.0/12,fd00:96::/108"]);
    let svc = |name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{extra}  ports: [{{port: 80}}]\n"
        )
    };
    let families = |name: &str| {
        cp.jsonpath(
            &["service", name],
            "{.spec.ipFamilyPolicy} {.spec.ipFamilies[*]}",
        )
    };
    let ips = |name: &str| -> Vec<std::net::IpAddr> {
        cp.jsonpath(&["service", name], "{.spec.clusterIPs[*]}")
            .split_whitespace()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
            .collect()
    };
    let v4_range = |ip: &std::net::IpAddr| matches!(ip, std::net::IpAddr::V4(a) if (a.octets()[0], a.octets()[1] & 0xf0) == (10, 96));
    let v6_range = |ip: &std::net::IpAddr| ip.to_string().starts_with("fd00:96::");

    // By default a Service is single-stack, of the primary family.
    cp.apply(&svc("plain", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(families("plain"), "SingleStack IPv4");
    let plain = ips("plain");
    assert!(plain.len() == 1 && v4_range(&plain[0]), "{plain:?}");

    // PreferDualStack: one of each, the primary first.
    cp.apply(&svc("both", "  ipFamilyPolicy: PreferDualStack\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(families("both"), "PreferDualStack IPv4 IPv6");
    let both = ips("both");
    assert!(
        both.len() == 2 && v4_range(&both[0]) && v6_range(&both[1]),
        "{both:?}"
    );
    assert_eq!(
        cp.jsonpath(&["service", "both"], "{.spec.clusterIP}"),
        both[0].to_string()
    );

    // IPv6 alone, and IPv6 first.
    cp.apply(&svc("six", "  ipFamilies: [IPv6]\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(families("six"), "SingleStack IPv6");
    assert!(ips("six").iter().all(v6_range), "{:?}", ips("six"));
    cp.apply(&svc(
        "six-first",
        "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  clusterIPs: [\"fd00:96::20\"]\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let six_first = ips("six-first");
    assert_eq!(six_first[0].to_string(), "fd00:96::20");
    assert!(
        six_first.len() == 2 && v4_range(&six_first[1]),
        "{six_first:?}"
    );

    // Moving a Service to dual-stack keeps its address and adds the other.
    cp.kubectl_ok(&[
        "patch",
        "service",
        "plain",
        "-p",
        r#"{"spec":{"ipFamilyPolicy":"PreferDualStack"}}"#,
    ]);
    let upgraded = ips("plain");
    assert!(
        upgraded.len() == 2 && upgraded[0] == plain[0] && v6_range(&upgraded[1]),
        "{plain:?} -> {upgraded:?}"
    );

    // What cannot be is refused, naming the field; nothing is allocated.
    for (extra, field) in [
        (
            "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [\"fd00:96::30\", \"10.96.0.30\"]\n",
            "spec.clusterIPs[0]",
        ),
        (
            "  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: SingleStack\n",
            "spec.ipFamilyPolicy",
        ),
        (
            "  ipFamilies: [IPv4, IPv4]\n  ipFamilyPolicy: PreferDualStack\n",
            "spec.ipFamilies[1]",
        ),
        ("  ipFamilies: [IPv5]\n", "spec.ipFamilies[0]"),
        ("  clusterIPs: [\"fd00:97::1\"]\n", "spec.clusterIPs[0]"),
    ] {
        let err = cp.apply(&svc("bad", extra)).err().unwrap_or_default();
        assert!(err.contains(field), "{field} named in: {err}");
    }
    assert!(cp.kubectl(&["get", "service", "bad"]).is_err());
    // The explicit addresses of a deleted Service are free again.
    cp.kubectl_ok(&["delete", "service", "six-first"]);
    cp.apply(&svc(
        "again",
        "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  clusterIPs: [\"fd00:96::20\"]\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));

    // A single-stack cluster refuses what it cannot give.
    let single = ControlPlane::start(&[]);
    let err = single
        .apply(&svc("req", "  ipFamilyPolicy: RequireDualStack\n"))
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("spec.ipFamilyPolicy") && err.contains("not configured for dual-stack"),
        "{err}"
    );
    let err = single
        .apply(&svc("only-six", "  ipFamilies: [IPv6]\n"))
        .err()
        .unwrap_or_default();
    assert!(err.contains("spec.ipFamilies[0]"), "{err}");
    // PreferDualStack there is single-stack.
    single
        .apply(&svc("pref", "  ipFamilyPolicy: PreferDualStack\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        single.jsonpath(
            &["service", "pref"],
            "{.spec.ipFamilyPolicy} {.spec.ipFamilies[*]}"
        ),
        "PreferDualStack IPv4"
    );
}

#[test]
fn a_local_load_balancer_gets_a_health_check_node_port_it_gives_back_when_it_no_longer_needs_it() {
    let cp = ControlPlane::start(&[]);
    let lb = |policy: &str, hc: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: lb}}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: {policy}\n{hc}  ports: [{{port: 80}}]\n"
        )
    };
    cp.apply(&lb("Local", "")).unwrap_or_else(|e| panic!("{e}"));
    let hc = cp.jsonpath(&["service", "lb"], "{.spec.healthCheckNodePort}");
    let port: u16 = hc.parse().unwrap_or_else(|e| panic!("{hc:?}: {e}"));
    let node_port = cp.jsonpath(&["service", "lb"], "{.spec.ports[0].nodePort}");
    assert!((30000..=32767).contains(&port), "{port}");
    assert_ne!(
        hc, node_port,
        "the health check port is a NodePort of its own"
    );

    // Taken: another Service cannot have it as a NodePort.
    let taken = cp.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: other}}\nspec:\n  type: NodePort\n  ports: [{{port: 80, nodePort: {port}}}]\n"
    ));
    let err = taken.expect_err("the port is held");
    assert!(
        err.contains("nodePort") && err.contains("already allocated"),
        "{err}"
    );

    // Cluster policy: no health check port, and it is free again.
    cp.kubectl_ok(&[
        "patch",
        "service",
        "lb",
        "-p",
        r#"{"spec":{"externalTrafficPolicy":"Cluster"}}"#,
    ]);
    assert_eq!(
        cp.jsonpath(&["service", "lb"], "{.spec.healthCheckNodePort}"),
        ""
    );
    cp.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: other}}\nspec:\n  type: NodePort\n  ports: [{{port: 80, nodePort: {port}}}]\n"
    ))
    .unwrap_or_else(|e| panic!("the released port is free: {e}"));

    // Out of range is refused, naming the field.
    let err = cp
        .apply(&lb("Local", "  healthCheckNodePort: 80\n"))
        .expect_err("out of range");
    assert!(err.contains("spec.healthCheckNodePort"), "{err}");
}

#[test]
fn limit_ranges_default_and_bound_pods_and_quotas_refuse_what_is_over() {
    let cp = ControlPlane::start(&[]);
    cp.kubectl_ok(&["create", "namespace", "team"]);
    cp.kubectl_ok(&[
        "-n",
        "team",
        "create",
        "quota",
        "compute",
        "--hard=pods=3,requests.cpu=1,requests.memory=1Gi,limits.cpu=2",
    ]);
    let run = |name: &str, overrides: Option<&str>| -> Result<String, String> {
        let mut args = vec![
            "-n",
            "team",
            "run",
            name,
            "--image=busybox:1.36",
            "--restart=Never",
        ];
        if let Some(o) = overrides {
            args.extend(["--overrides", o]);
        }
        args.extend(["--", "sleep", "3600"]);
        cp.kubectl(&args)
    };

    // A quota on compute resources wants every container to say them.
    let err = run("bare", None).expect_err("no requests");
    assert!(
        err.contains(r#"pods "bare" is forbidden: failed quota: compute: must specify limits.cpu for: bare; requests.cpu for: bare; requests.memory for: bare"#),
        "{err}"
    );

    // A LimitRange fills them in (max is the default limit), and refuses
    // a container over its max.
    cp.apply(
        "apiVersion: v1\nkind: LimitRange\nmetadata: {name: defaults, namespace: team}\nspec:\n  limits:\n  - type: Container\n    max: {cpu: \"1\"}\n    defaultRequest: {cpu: 300m, memory: 64Mi}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    run("one", None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cp.jsonpath(
            &["-n", "team", "pod", "one"],
            "{.spec.containers[0].resources.requests.cpu} {.spec.containers[0].resources.requests.memory} {.spec.containers[0].resources.limits.cpu}"
        ),
        "300m 64Mi 1"
    );
    let note = cp.jsonpath(
        &["-n", "team", "pod", "one"],
        r#"{.metadata.annotations.kubernetes\.io/limit-ranger}"#,
    );
    assert_eq!(
        note,
        "LimitRanger plugin set: cpu limit for container one; cpu, memory request for container one"
    );
    let big = r#"{"spec":{"containers":[{"name":"big","image":"busybox:1.36","resources":{"limits":{"cpu":"3"}}}]}}"#;
    let err = run("big", Some(big)).expect_err("over the max");
    assert!(
        err.contains(
            r#"pods "big" is forbidden: maximum cpu usage per Container is 1, but limit is 3"#
        ),
        "{err}"
    );

    // The quota counts what is admitted and refuses what would pass it.
    run("two", None).unwrap_or_else(|e| panic!("{e}"));
    let err = run("three", None).expect_err("limits.cpu is used up");
    assert!(
        err.contains(r#"pods "three" is forbidden: exceeded quota: compute, requested: limits.cpu=1, used: limits.cpu=2, limited: limits.cpu=2"#),
        "{err}"
    );
    let table = cp.kubectl_ok(&["-n", "team", "get", "quota"]);
    assert!(
        table.contains("pods: 2/3, requests.cpu: 600m/1, requests.memory: 128Mi/1Gi")
            && table.contains("limits.cpu: 2/2"),
        "{table}"
    );
    // Deleting a pod gives its share back.
    cp.kubectl_ok(&[
        "-n",
        "team",
        "delete",
        "pod",
        "one",
        "--grace-period=0",
        "--force",
    ]);
    wait_for("the quota to give back", Duration::from_secs(30), || {
        (cp.jsonpath(&["-n", "team", "quota", "compute"], "{.status.used.pods}") == "1")
            .then_some(())
    });
    run("three", None).unwrap_or_else(|e| panic!("{e}"));

    // Racing creates cannot both take the last of a quota.
    cp.kubectl_ok(&["create", "namespace", "race"]);
    cp.kubectl_ok(&["-n", "race", "create", "quota", "count", "--hard=pods=3"]);
    let made: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let cp = &cp;
                s.spawn(move || {
                    cp.kubectl(&[
                        "-n",
                        "race",
                        "run",
                        &format!("p{i}"),
                        "--image=busybox:1.36",
                        "--restart=Never",
                    ])
                    .is_ok()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(false))
            .filter(|made| *made)
            .count()
    });
    assert_eq!(made, 3);
    let names = cp.jsonpath(&["-n", "race", "pods"], "{.items[*].metadata.name}");
    assert_eq!(names.split_whitespace().count(), 3, "{names}");
}

#[test]
fn kubectl_explain_diff_and_list_files_read_the_served_openapi() {
    let cp = ControlPlane::start(&[]);

    // explain reads the schemas (v3 by default, v2 when asked).
    let out = cp.kubectl_ok(&["explain", "statefulsets.spec.volumeClaimTemplates"]);
    assert!(
        out.contains("KIND:       StatefulSet")
            && out.contains("FIELD: volumeClaimTemplates <[]PersistentVolumeClaim>"),
        "{out}"
    );
    let out = cp.kubectl_ok(&[
        "explain",
        "pods.spec.containers",
        "--output=plaintext-openapiv2",
    ]);
    assert!(out.contains("RESOURCE: containers <[]Object>"), "{out}");

    // A List file is validated item by item on the client, against /openapi/v2.
    let list = |extra: &str| {
        format!(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {{name: one}}\n  data: {{a: \"1\"}}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {{name: two}}\n{extra}"
        )
    };
    let file = |_name: &str, text: &str| cp.manifest(text);
    let bad = file("bad.yaml", &list("  bogus: 3\n"));
    let err = cp
        .kubectl(&["create", "-f", &bad])
        .expect_err("an unknown field");
    assert!(
        err.contains(r#"unknown field "bogus" in io.k8s.api.core.v1.ConfigMap"#),
        "{err}"
    );
    assert!(
        cp.kubectl(&["get", "configmap", "one"]).is_err(),
        "nothing is created"
    );
    let good = file("good.yaml", &list("  data: {b: \"2\"}\n"));
    let out = cp.kubectl_ok(&["create", "-f", &good]);
    assert!(
        out.contains("configmap/one created") && out.contains("configmap/two created"),
        "{out}"
    );

    // diff shows what an apply would change, through a dry run, and
    // exits 1 for a difference.
    let web = |replicas: u32, value: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n      - name: a\n        image: busybox:1.36\n        env: [{{name: X, value: \"{value}\"}}]\n      - name: b\n        image: busybox:1.36\n"
        )
    };
    cp.apply(&web(2, "1")).unwrap_or_else(|e| panic!("{e}"));
    let changed = file("web.yaml", &web(3, "2"));
    let out = cp.kubectl_run(&["diff", "-f", &changed], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("-  replicas: 2")
            && text.contains("+  replicas: 3")
            && text.contains("+          value: \"2\""),
        "{text}"
    );
    assert_eq!(
        cp.jsonpath(&["deployment", "web"], "{.spec.replicas}"),
        "2",
        "diff changes nothing"
    );
    let same = file("same.yaml", &web(2, "1"));
    let out = cp.kubectl_run(&["diff", "-f", &same], b"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn server_side_apply_owns_fields_and_reports_conflicts() {
    let cp = ControlPlane::start(&[]);
    let web = |replicas: u32, image: &str| {
        cp.manifest(&format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, labels: {{team: a}}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n      - name: main\n        image: {image}\n"
        ))
    };
    let first = web(2, "busybox:1.36");
    let out = cp.kubectl_ok(&["apply", "--server-side", "-f", &first]);
    assert!(
        out.contains("deployment.apps/web serverside-applied"),
        "{out}"
    );
    let managers = || {
        cp.jsonpath(
            &["deployment", "web", "--show-managed-fields"],
            r#"{range .metadata.managedFields[*]}{.manager}/{.operation}{"\n"}{end}"#,
        )
    };
    assert!(
        managers().lines().any(|l| l == "kubectl/Apply"),
        "{}",
        managers()
    );
    let owned = cp.jsonpath(
        &["deployment", "web", "--show-managed-fields"],
        r#"{.metadata.managedFields[?(@.manager=="kubectl")].fieldsV1}"#,
    );
    assert!(
        owned.contains(r#""f:replicas":{}"#) && owned.contains(r#""k:{\"name\":\"main\"}""#),
        "{owned}"
    );

    // Another manager (ops, applying only the replica count) asking for
    // another count conflicts, with the field and its manager named;
    // nothing changes.
    let other = cp.manifest(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 5\n",
    );
    let ops_apply = || {
        cp.kubectl(&[
            "apply",
            "--server-side",
            "--field-manager=ops",
            "-f",
            &other,
        ])
    };
    let err = ops_apply().expect_err("a conflict");
    assert!(
        err.contains(
            r#"Apply failed with 1 conflict: conflict with "kubectl" using apps/v1: .spec.replicas"#
        ),
        "{err}"
    );
    assert_eq!(cp.jsonpath(&["deployment", "web"], "{.spec.replicas}"), "2");

    // Forced, ops takes the field over; kubectl no longer owns it, and
    // its next apply without replicas leaves ops' value alone.
    cp.kubectl_ok(&[
        "apply",
        "--server-side",
        "--field-manager=ops",
        "--force-conflicts",
        "-f",
        &other,
    ]);
    assert_eq!(cp.jsonpath(&["deployment", "web"], "{.spec.replicas}"), "5");
    let p = cp.manifest(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: main\n        image: busybox:1.37\n",
    );
    cp.kubectl_ok(&["apply", "--server-side", "-f", &p]);
    assert_eq!(
        cp.jsonpath(
            &["deployment", "web"],
            "{.spec.replicas} {.spec.template.spec.containers[0].image} {.metadata.labels.team}"
        ),
        // The label kubectl stopped applying went; ops' replicas stayed.
        "5 busybox:1.37 "
    );

    // A write that is not an apply takes the fields it changes.
    cp.kubectl_ok(&["scale", "deployment", "web", "--replicas=3"]);
    let err = ops_apply().expect_err("scale took replicas");
    assert!(
        err.contains(r#"conflict with "kubectl" using apps/v1: .spec.replicas"#),
        "{err}"
    );

    // An apply creates what does not exist yet.
    let cm = cp
        .manifest("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: applied}\ndata: {a: \"1\"}\n");
    cp.kubectl_ok(&["apply", "--server-side", "-f", &cm]);
    assert_eq!(cp.jsonpath(&["configmap", "applied"], "{.data.a}"), "1");
}

#[test]
fn ingresses_are_stored_with_their_default_class_and_checked() {
    let cp = ControlPlane::start(&[]);
    cp.apply(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata:\n  name: skiff\n  annotations: {ingressclass.kubernetes.io/is-default-class: \"true\"}\nspec: {controller: skiff.io/ingress}\n---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: web}\nspec:\n  tls: [{hosts: [a.example.com], secretName: tls}]\n  rules:\n  - host: \"*.example.com\"\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // No class named: the default one.
    assert_eq!(
        cp.jsonpath(&["ingress", "web"], "{.spec.ingressClassName}"),
        "skiff"
    );
    let table = cp.kubectl_ok(&["get", "ingress", "web"]);
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..5],
        ["web", "skiff", "*.example.com", "80,", "443"],
        "{table}"
    );
    let err = cp
        .apply("apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: bad}\nspec:\n  rules:\n  - host: 10.0.0.1\n    http:\n      paths:\n      - {path: x, pathType: Exact, backend: {service: {name: web}}}\n")
        .expect_err("invalid");
    for want in [
        "spec.rules[0].host: Invalid value: \"10.0.0.1\": must be a DNS name, not an IP address",
        "spec.rules[0].http.paths[0].path: Invalid value: \"x\": must be an absolute path",
        "spec.rules[0].http.paths[0].backend.service.port: Required value",
    ] {
        assert!(err.contains(want), "{want}\n{err}");
    }
}

/// `/metrics` needs a token RBAC lets read it; what it serves moves with
/// the requests: created ConfigMaps raise the request counter and the
/// etcd histogram, and a `kubectl get -w` shows as a long-running request
/// for as long as it runs.
#[test]
fn apiserver_metrics_count_requests_and_need_a_token() {
    let cp = ControlPlane::start(&[]);
    let url = format!("{}/metrics", cp.server);
    let anonymous = cp
        .curl(None, &["-w", "\n%{http_code}", &url])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        (anonymous.ends_with("\n401") || anonymous.ends_with("\n403"))
            && !anonymous.contains("apiserver_request_total"),
        "{anonymous}"
    );
    // A ServiceAccount may scrape once bound to system:monitoring, as a
    // Prometheus in the cluster would be.
    let token = prom_token(&cp);
    let code = |token: &str| {
        cp.curl(
            Some(token),
            &["-o", "/dev/null", "-w", "%{http_code}", &url],
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(code(&token), "403");
    bind_monitoring(&cp);
    wait_for("the binding applied", Duration::from_secs(10), || {
        (code(&token) == "200").then_some(())
    });

    let scrape = || cp.kubectl_ok(&["get", "--raw", "/metrics"]);
    let created = [
        r#"verb="POST""#,
        r#"resource="configmaps""#,
        r#"scope="namespace""#,
        r#"code="201""#,
    ];
    let etcd_creates = [r#"operation="create""#, r#"type="configmaps""#];
    let before = scrape();
    for name in [
        "# TYPE apiserver_request_duration_seconds histogram",
        "# TYPE apiserver_request counter",
        r#"apiserver_current_inflight_requests{request_kind="readOnly"}"#,
        r#"apiserver_current_inflight_requests{request_kind="mutating"}"#,
        "# TYPE etcd_request_duration_seconds histogram",
    ] {
        assert!(before.contains(name), "{name} missing:\n{before}");
    }
    let count = |text: &str| sample(text, "apiserver_request_total", &created).unwrap_or(0.0);
    let etcd = |text: &str| {
        sample(text, "etcd_request_duration_seconds_count", &etcd_creates).unwrap_or(0.0)
    };
    cp.kubectl_ok(&["create", "configmap", "m1", "--from-literal=a=1"]);
    cp.kubectl_ok(&["create", "configmap", "m2", "--from-literal=a=2"]);
    let after = scrape();
    assert_eq!(count(&after) - count(&before), 2.0, "{after}");
    assert!(etcd(&after) - etcd(&before) >= 2.0, "{after}");
    assert!(
        sample(
            &after,
            "apiserver_request_duration_seconds_count",
            &[r#"verb="POST""#, r#"resource="configmaps""#]
        )
        .is_some_and(|n| n >= 2.0),
        "{after}"
    );

    // The controllers watch ConfigMaps across namespaces; kubectl watches
    // one namespace.
    // The scheduler and the controllers run in this process and show in
    // the same scrape: a Deployment wakes its controller, and its pods,
    // with no node to go to, are counted as unschedulable attempts.
    let adds =
        |text: &str| sample(text, "workqueue_adds_total", &[r#"name="deployment""#]).unwrap_or(0.0);
    let unschedulable = [r#"result="unschedulable""#];
    let tries = |text: &str| {
        sample(text, "scheduler_schedule_attempts_total", &unschedulable).unwrap_or(0.0)
    };
    let quiet = scrape();
    cp.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox:1.36",
        "--replicas=2",
    ]);
    let busy = wait_for("the pods tried", Duration::from_secs(20), || {
        let t = scrape();
        (sample(&t, "scheduler_pending_pods", &[r#"queue="unschedulable""#]) == Some(2.0))
            .then_some(t)
    });
    assert!(adds(&busy) > adds(&quiet), "{busy}");
    assert!(tries(&busy) >= tries(&quiet) + 2.0, "{busy}");
    assert!(
        sample(
            &busy,
            "workqueue_work_duration_seconds_count",
            &[r#"name="deployment""#]
        )
        .is_some_and(|n| n >= 1.0),
        "{busy}"
    );

    let watching = [
        r#"verb="WATCH""#,
        r#"resource="configmaps""#,
        r#"scope="namespace""#,
    ];
    let long_running =
        |text: &str| sample(text, "apiserver_longrunning_requests", &watching).unwrap_or(0.0);
    let mut watch = Spawn::new("kubectl")
        .env("KUBECONFIG", &cp.kubeconfig.display().to_string())
        .args(["get", "configmaps", "-w"])
        .start();
    wait_for("the watch counted", Duration::from_secs(15), || {
        (long_running(&scrape()) == 1.0).then_some(())
    });
    watch.terminate();
    wait_for("the watch uncounted", Duration::from_secs(15), || {
        (long_running(&scrape()) == 0.0).then_some(())
    });

    // Health as upstream answers it, with no token: each check by name,
    // the list with ?verbose, and etcd's loss seen by /livez and /readyz.
    let health = |path: &str| {
        cp.curl(
            None,
            &["-w", "\n%{http_code}", &format!("{}{path}", cp.server)],
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(
        health("/readyz?verbose"),
        "[+]ping ok\n[+]etcd ok\n[+]shutdown ok\nreadyz check passed\n\n200"
    );
    assert_eq!(health("/livez/etcd"), "ok\n200");
    assert!(health("/livez/shutdown").ends_with("\n404"));
    assert_eq!(health("/healthz"), "ok\n200");
    cp.etcd.kill();
    let down = wait_for("etcd's loss seen", Duration::from_secs(15), || {
        let r = health("/livez");
        r.ends_with("\n500").then_some(r)
    });
    assert!(down.contains("[-]etcd failed: reason withheld\n"), "{down}");
    assert_eq!(health("/livez?exclude=etcd"), "ok\n200");
    cp.etcd.restart();
    wait_for("etcd back", Duration::from_secs(30), || {
        (health("/readyz") == "ok\n200").then_some(())
    });
}

/// A ServiceAccount `default/prom`, bound to nothing yet, and a token of it.
fn prom_token(cp: &ControlPlane) -> String {
    cp.kubectl_ok(&["create", "serviceaccount", "prom"]);
    cp.kubectl_ok(&["create", "token", "prom"])
}

/// Binds `default/prom` to `system:monitoring`, as a Prometheus in the
/// cluster would be bound.
fn bind_monitoring(cp: &ControlPlane) {
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "prom",
        "--clusterrole=system:monitoring",
        "--serviceaccount=default:prom",
    ]);
}

/// A scheduler and controllers running apart from the apiserver serve
/// their metrics on their own HTTPS port, as kube-controller-manager's
/// 10257: health for anyone, `/metrics` for a token the apiserver says
/// may get it (TokenReview, then SubjectAccessReview).
#[test]
fn components_apart_serve_metrics_to_whom_the_apiserver_allows() {
    let cp = ControlPlane::start(&["--components", "apiserver"]);
    let dir = skiff_tests::TempDir::new();
    let port = skiff_tests::control::free_port().to_string();
    let _components = Spawn::new(skiff_tests::bin("skiff-control"))
        .args([
            "--components",
            "scheduler,controllers",
            "--secure-port",
            &port,
        ])
        .args(["--data-dir".as_ref(), dir.path.as_os_str()])
        .args(["--kubeconfig".as_ref(), cp.kubeconfig.as_os_str()])
        .log_to(&dir.path.join("components.log"))
        .start();
    let get = |token: Option<&str>, path: &str| {
        cp.curl(
            token,
            &[
                "-k",
                "-w",
                "\n%{http_code}",
                &format!("https://127.0.0.1:{port}{path}"),
            ],
        )
        .unwrap_or_default()
    };
    wait_for("the secure port", Duration::from_secs(20), || {
        (get(None, "/healthz") == "ok\n200").then_some(())
    });
    assert!(get(None, "/metrics").ends_with("\n401"));
    assert!(get(Some("not-a-token"), "/metrics").ends_with("\n401"));
    let token = prom_token(&cp);
    let refused = get(Some(&token), "/metrics");
    assert!(
        refused.ends_with("\n403") && refused.contains("system:serviceaccount:default:prom"),
        "{refused}"
    );
    bind_monitoring(&cp);
    // A refusal is kept 10 s, as upstream keeps it.
    let text = wait_for("the binding honoured", Duration::from_secs(30), || {
        let t = get(Some(&token), "/metrics");
        t.ends_with("\n200").then_some(t)
    });
    // The components' own families, moving: a Deployment with no node
    // to go to wakes its controller and is tried by the scheduler.
    assert!(text.contains("# TYPE workqueue_adds counter"), "{text}");
    cp.kubectl_ok(&["create", "deployment", "web", "--image=busybox:1.36"]);
    wait_for("the pod tried", Duration::from_secs(30), || {
        let t = get(Some(&token), "/metrics");
        (sample(
            &t,
            "scheduler_schedule_attempts_total",
            &[r#"result="unschedulable""#],
        )
        .unwrap_or(0.0)
            >= 1.0)
            .then_some(())
    });
    assert!(!get(Some(&token), "/metrics").contains("apiserver_request_total"));
}
