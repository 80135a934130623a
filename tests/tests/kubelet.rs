//! The kubelet role on a real node: containerd and runc, images pulled
//! from a registry the test starts, pods wired by skiff-cni, driven by
//! the real kubectl through skiff-control. Everything lives in a network
//! namespace the test makes; the pods are dialled only from there.

use std::time::Duration;

use skiff_tests::cluster::web_app;
use skiff_tests::control::ControlPlane;
use skiff_tests::node::{KubeletNode, OneNode, Registry, sample};
use skiff_tests::{Netns, Spawn, wait_for};

/// `name podIP phase` of every pod with `app=web`.
fn web_pods(cp: &ControlPlane) -> Vec<(String, String, String)> {
    cp.jsonpath(
        &["pods", "-l", "app=web"],
        "{range .items[*]}{.metadata.name} {.status.podIP} {.status.phase}{\"\\n\"}{end}",
    )
    .lines()
    .filter_map(|l| {
        let mut p = l.split_whitespace();
        Some((p.next()?.into(), p.next()?.into(), p.next()?.into()))
    })
    .collect()
}

#[test]
fn a_deployment_runs_on_containerd_and_answers_on_its_pod_ips() {
    let ns = Netns::new();
    ns.add_local_link("eth0", &["172.31.7.2/24"]);
    let cp = ControlPlane::start_in(Some(&ns), &[]);
    let registry = Registry::start_in(&ns);
    let image = registry.push(&ns, "busybox", "busybox:1.36");
    let node = KubeletNode::start(&ns, "172.31.7.2", "10.244.1.0/24", &cp, &registry.addr);

    let ready = wait_for(
        "the node to register Ready",
        Duration::from_secs(30),
        || {
            let s = cp.jsonpath(
            &["node", &node.name],
            "{.status.conditions[?(@.type==\"Ready\")].status} {.status.nodeInfo.containerRuntimeVersion} {.spec.podCIDR}",
        );
            s.starts_with("True").then_some(s)
        },
    );
    assert!(ready.contains("containerd://1.6"), "{ready}");
    assert!(ready.ends_with("10.244.1.0/24"), "{ready}");
    let lease = cp.jsonpath(
        &["lease", "-n", "kube-node-lease", &node.name],
        "{.spec.holderIdentity}",
    );
    assert_eq!(lease, node.name);

    cp.apply(&web_app(&image, 2))
        .unwrap_or_else(|e| panic!("{e}"));
    let pods = wait_for("two pods Running with IPs", Duration::from_secs(90), || {
        let pods = web_pods(&cp);
        (pods.len() == 2
            && pods
                .iter()
                .all(|(_, ip, phase)| phase == "Running" && ip.starts_with("10.244.1.")))
        .then_some(pods)
    });
    for (name, ip, _) in &pods {
        let body = wait_for(
            "httpd to answer on the pod IP",
            Duration::from_secs(20),
            || {
                Spawn::new("curl")
                    .args(["-sf", "--max-time", "2", &format!("http://{ip}/")])
                    .netns(&ns)
                    .try_output()
                    .ok()
            },
        );
        assert_eq!(
            body.trim(),
            format!("hello from {name}"),
            "the pod's hostname is its name"
        );
        // httpd may answer a moment before its readiness probe has passed.
        let st = wait_for("the pod Ready", Duration::from_secs(20), || {
            let st = cp.jsonpath(
                &["pod", name],
                "{.status.hostIP} {.status.containerStatuses[0].ready} {.status.containerStatuses[0].containerID} {.status.containerStatuses[0].imageID}",
            );
            (st.split_whitespace().nth(1) == Some("true")).then_some(st)
        });
        let f: Vec<&str> = st.split_whitespace().collect();
        assert_eq!(f.first(), Some(&"172.31.7.2"), "{st}");
        assert_eq!(f.get(1), Some(&"true"), "{st}");
        assert!(
            f.get(2).is_some_and(|c| c.starts_with("containerd://")),
            "{st}"
        );
        assert!(
            f.get(3).is_some_and(|c| c.contains("busybox@sha256:")),
            "{st}"
        );
    }
    assert_eq!(
        node.containerd.containers().len(),
        2,
        "one container per pod"
    );

    // The project's own probe server, from the image built of it (its
    // args after the image's entrypoint), answers with the name it got.
    let probe = registry.push(&ns, "skiff-probe", "skiff-probe:dev");
    cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: probe\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: probe\n    image: {probe}\n    args: [serve-tcp, \"0.0.0.0:8080\", probe-pod]\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let ip = wait_for("the probe pod to run", Duration::from_secs(60), || {
        let s = cp.jsonpath(&["pod", "probe"], "{.status.phase} {.status.podIP}");
        s.strip_prefix("Running ")
            .filter(|ip| !ip.is_empty())
            .map(String::from)
    });
    let answers = wait_for(
        "the probe server to answer",
        Duration::from_secs(20),
        || {
            let out = Spawn::new(skiff_tests::bin("skiff-probe"))
                .args(["tcp", &format!("{ip}:8080"), "3"])
                .netns(&ns)
                .try_output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            (v["answers"]["probe-pod"] == 3).then_some(v)
        },
    );
    assert_eq!(
        answers["answers"].as_object().map(|a| a.len()),
        Some(1),
        "{answers}"
    );
    cp.kubectl_ok(&["delete", "pod", "probe", "--wait=false"]);

    // hostNetwork: the node's network, no CNI; the pod's IP is the node's.
    cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: on-host\nspec:\n  hostNetwork: true\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: probe\n    image: {probe}\n    args: [serve-tcp, \"0.0.0.0:8089\", on-host]\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let ip = wait_for(
        "the hostNetwork pod to run",
        Duration::from_secs(60),
        || {
            let s = cp.jsonpath(&["pod", "on-host"], "{.status.phase} {.status.podIP}");
            s.strip_prefix("Running ")
                .filter(|ip| !ip.is_empty())
                .map(String::from)
        },
    );
    assert_eq!(ip, "172.31.7.2", "a hostNetwork pod has the node's IP");
    let answers = wait_for(
        "the hostNetwork server to answer on the node's address",
        Duration::from_secs(20),
        || {
            let out = Spawn::new(skiff_tests::bin("skiff-probe"))
                .args(["tcp", "172.31.7.2:8089", "2"])
                .netns(&ns)
                .try_output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            (v["answers"]["on-host"] == 2).then_some(v)
        },
    );
    assert_eq!(answers["answers"]["on-host"], 2, "{answers}");
    cp.kubectl_ok(&["delete", "pod", "on-host", "--wait=false"]);

    // Deleting the Deployment stops the containers within their grace
    // period and leaves nothing on the node.
    cp.kubectl_ok(&["delete", "deployment", "web", "--wait=false"]);
    wait_for("the pods to go", Duration::from_secs(60), || {
        web_pods(&cp).is_empty().then_some(())
    });
    wait_for(
        "containerd to hold no container",
        Duration::from_secs(10),
        || node.containerd.containers().is_empty().then_some(()),
    );
    let pods_dir = node.dir.path.join("kubelet/pods");
    let left: Vec<_> = std::fs::read_dir(&pods_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "sandboxes left: {left:?}\n{}",
        node.agent_log()
    );
    // skiff-cni's address records (files named by the address) are gone.
    let allocated: Vec<String> = std::fs::read_dir(node.dir.path.join("cni/skiff"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        allocated.is_empty(),
        "addresses left allocated: {allocated:?}"
    );
}

fn pod(name: &str, image: &str, restart: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: {restart}\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    image: {image}\n    command: [\"sh\", \"-c\", {script:?}]\n"
    )
}

#[test]
fn crash_loops_back_off_logs_follow_and_run_to_completion_pods_end() {
    let c = OneNode::start("172.31.8.2", "10.244.2.0/24");
    let cp = &c.cp;
    // A container that logs, then fails: restarted with growing delays.
    cp.apply(&pod(
        "crasher",
        &c.image,
        "Always",
        "echo run at $(date +%s%N); echo to stderr >&2; sleep 1; exit 3",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    // A container that runs to completion, and one that fails, never restarted.
    cp.apply(&pod("done", &c.image, "Never", "echo finished; exit 0"))
        .unwrap_or_else(|e| panic!("{e}"));
    cp.apply(&pod("failed", &c.image, "Never", "exit 7"))
        .unwrap_or_else(|e| panic!("{e}"));
    // A long runner whose log is followed.
    cp.apply(&pod(
        "ticker",
        &c.image,
        "Always",
        "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.3; done",
    ))
    .unwrap_or_else(|e| panic!("{e}"));

    // Init containers run first, in order, sharing the pod's volumes; a
    // failing one under Never fails the pod before any app container.
    let inits = format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: initialized
spec:
  restartPolicy: Never
  initContainers:
  - {{name: one, image: {image}, command: ["sh", "-c", "echo one >> /work/order"], volumeMounts: [{{name: w, mountPath: /work}}]}}
  - {{name: two, image: {image}, command: ["sh", "-c", "echo two >> /work/order"], volumeMounts: [{{name: w, mountPath: /work}}]}}
  containers:
  - {{name: main, image: {image}, command: ["sh", "-c", "cat /work/order"], volumeMounts: [{{name: w, mountPath: /work}}]}}
  volumes: [{{name: w, emptyDir: {{}}}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: init-fails
spec:
  restartPolicy: Never
  initContainers:
  - {{name: bad, image: {image}, command: ["sh", "-c", "exit 2"]}}
  containers:
  - {{name: main, image: {image}, command: ["sh", "-c", "echo should not run"]}}
"#,
        image = c.image
    );
    cp.apply(&inits).unwrap_or_else(|e| panic!("{e}"));

    let phase = |p: &str| cp.jsonpath(&["pod", p], "{.status.phase}");

    wait_for("done to succeed", Duration::from_secs(60), || {
        (phase("done") == "Succeeded").then_some(())
    });
    wait_for("failed to fail", Duration::from_secs(60), || {
        (phase("failed") == "Failed").then_some(())
    });
    let code = cp.jsonpath(
        &["pod", "failed"],
        "{.status.containerStatuses[0].state.terminated.exitCode}",
    );
    assert_eq!(code, "7");
    assert_eq!(cp.kubectl_ok(&["logs", "done"]), "finished\n");
    wait_for("initialized to succeed", Duration::from_secs(60), || {
        (phase("initialized") == "Succeeded").then_some(())
    });
    assert_eq!(cp.kubectl_ok(&["logs", "initialized"]), "one\ntwo\n");
    assert_eq!(cp.kubectl_ok(&["logs", "initialized", "-c", "two"]), "");
    wait_for("init-fails to fail", Duration::from_secs(60), || {
        (phase("init-fails") == "Failed").then_some(())
    });

    // The agent's metrics saw it: pods started (the SLI), containers
    // exiting (containerd's events), and the ticker running now.
    wait_for("ticker to run", Duration::from_secs(60), || {
        (phase("ticker") == "Running").then_some(())
    });
    let m = wait_for("the kubelet's metrics", Duration::from_secs(10), || {
        let m = c.node.metrics();
        (sample(&m, "kubelet_running_pods", &[]).unwrap_or(0.0) >= 1.0).then_some(m)
    });
    // The kubelet's sync loop turns and its pods were listed: ready.
    let ready = c.node.health("/readyz?verbose");
    assert!(
        ready.contains("[+]syncloop ok\n") && ready.ends_with("readyz check passed\n\n200"),
        "{ready}"
    );
    for (name, labels) in [
        ("kubelet_pod_start_sli_duration_seconds_count", &[][..]),
        (
            "kubelet_running_containers",
            &[r#"container_state="running""#][..],
        ),
        (
            "kubelet_evented_pleg_connection_latency_seconds_count",
            &[][..],
        ),
    ] {
        assert!(
            sample(&m, name, labels).is_some_and(|v| v >= 1.0),
            "{name} {labels:?}:\n{m}"
        );
    }
    let main_state = cp.jsonpath(&["pod", "init-fails"], "{.status.containerStatuses[0].state.waiting.reason} {.status.initContainerStatuses[0].state.terminated.exitCode}");
    assert_eq!(
        main_state, "ContainerCreating 2",
        "the app container never ran"
    );

    // Back-off: 10 s after the first exit, then 20 s; the status says
    // CrashLoopBackOff in between, with the last exit in lastState.
    let waiting = wait_for("CrashLoopBackOff", Duration::from_secs(60), || {
        let s = cp.jsonpath(&["pod", "crasher"], "{.status.containerStatuses[0].state.waiting.reason} {.status.containerStatuses[0].lastState.terminated.exitCode} {.status.containerStatuses[0].restartCount}");
        s.starts_with("CrashLoopBackOff").then_some(s)
    });
    assert!(waiting.starts_with("CrashLoopBackOff 3 1"), "{waiting}");
    wait_for("the second restart", Duration::from_secs(60), || {
        let n = cp.jsonpath(
            &["pod", "crasher"],
            "{.status.containerStatuses[0].restartCount}",
        );
        (n == "2").then_some(())
    });
    let msg = cp.jsonpath(
        &["pod", "crasher"],
        "{.status.containerStatuses[0].state.waiting.message}",
    );
    assert!(msg.contains("back-off 20s"), "the delay doubles: {msg}");
    // The current run's log and the previous one's.
    let current = wait_for("the current run's log", Duration::from_secs(30), || {
        cp.kubectl(&["logs", "crasher"])
            .ok()
            .filter(|l| l.contains("run at"))
    });
    let previous = cp.kubectl_ok(&["logs", "crasher", "--previous"]);
    assert!(
        previous.contains("run at") && previous.contains("to stderr"),
        "{previous}"
    );
    assert_ne!(current, previous, "--previous is another run");

    // Follow: lines written after the request arrive on the stream.
    let out = Spawn::new("timeout")
        .args([
            "3",
            "kubectl",
            "--kubeconfig",
            &cp.kubeconfig.display().to_string(),
            "logs",
            "-f",
            "--tail=1",
            "ticker",
        ])
        .netns(&c.ns)
        .run_with_input(b"");
    let text = String::from_utf8_lossy(&out.stdout);
    let ticks: Vec<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(
        ticks.len() >= 5,
        "following for 3 s at 0.3 s a line: {text}"
    );
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, none lost: {ticks:?}"
    );
    let stamped = cp.kubectl_ok(&["logs", "ticker", "--tail=2", "--timestamps"]);
    assert_eq!(stamped.lines().count(), 2, "{stamped}");
    assert!(stamped.lines().all(|l| l.contains("Z tick ")), "{stamped}");
    let _ = &c.node;
}

#[test]
fn probes_restart_the_unhealthy_and_readiness_moves_the_endpoints() {
    let c = OneNode::start("172.31.9.2", "10.244.3.0/24");
    let cp = &c.cp;
    // Ready while /www/ready.html exists: there for 5 s, gone for 6 s,
    // then back for good.
    let flapper = format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: flapper
  labels: {{app: flap}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: {image}
    command: ["sh", "-c", "mkdir -p /www && echo ok > /www/ready.html && httpd -p 80 -h /www && sleep 5 && rm /www/ready.html && sleep 6 && echo ok > /www/ready.html && sleep 3600"]
    ports: [{{name: http, containerPort: 80}}]
    readinessProbe:
      httpGet: {{path: /ready.html, port: http}}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Service
metadata:
  name: flap
spec:
  selector: {{app: flap}}
  ports: [{{port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: dying
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "touch /tmp/alive; sleep 3; rm /tmp/alive; sleep 3600"]
    livenessProbe:
      exec: {{command: ["test", "-f", "/tmp/alive"]}}
      periodSeconds: 1
      failureThreshold: 2
"#,
        image = c.image
    );
    cp.apply(&flapper).unwrap_or_else(|e| panic!("{e}"));
    let ready = |p: &str| {
        cp.jsonpath(
            &["pod", p],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        )
    };
    let slice_ready = || {
        cp.jsonpath(
            &["endpointslices", "-l", "kubernetes.io/service-name=flap"],
            "{.items[*].endpoints[*].conditions.ready}",
        )
    };
    wait_for("flapper Ready", Duration::from_secs(60), || {
        (ready("flapper") == "True").then_some(())
    });
    wait_for(
        "flapper in the EndpointSlice as ready",
        Duration::from_secs(20),
        || (slice_ready() == "true").then_some(()),
    );
    let went = skiff_tests::wait_until(Duration::from_secs(20), || ready("flapper") == "False");
    assert!(
        went,
        "flapper stayed Ready: {}\n{}",
        cp.kubectl_ok(&["get", "events", "-o", "jsonpath={.items[*].message}"]),
        cp.kubectl_ok(&["logs", "flapper"])
    );
    wait_for(
        "flapper out of the ready endpoints",
        Duration::from_secs(20),
        || (slice_ready() == "false").then_some(()),
    );
    wait_for("flapper Ready again", Duration::from_secs(20), || {
        (ready("flapper") == "True").then_some(())
    });
    wait_for(
        "flapper back in the ready endpoints",
        Duration::from_secs(20),
        || (slice_ready() == "true").then_some(()),
    );
    let restarts = cp.jsonpath(
        &["pod", "flapper"],
        "{.status.containerStatuses[0].restartCount}",
    );
    assert_eq!(restarts, "0", "readiness never restarts a container");

    // The liveness probe fails after 3 s: the container is killed and
    // restarted, and the kill is on record.
    wait_for(
        "the unhealthy container restarted",
        Duration::from_secs(40),
        || {
            let n = cp.jsonpath(
                &["pod", "dying"],
                "{.status.containerStatuses[0].restartCount}",
            );
            (n == "1").then_some(())
        },
    );
    let events = cp.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=dying",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(events.contains("Liveness probe failed"), "{events}");

    // The kubelet's /metrics/probes, as a scraper with a certificate of
    // the cluster's CA reads it: each probe's results by upstream's names
    // and labels; a deleted pod's series go with it.
    let (crt, key) = cp.client_cert("prometheus");
    let port = cp.jsonpath(
        &["node", &c.node.name],
        "{.status.daemonEndpoints.kubeletEndpoint.Port}",
    );
    let url = format!("https://172.31.9.2:{port}/metrics/probes");
    let probes = || {
        Spawn::new("curl")
            .args(["-sk", "--cert"])
            .arg_path(&crt)
            .args(["--key"])
            .arg_path(&key)
            .args([&url])
            .netns(&c.ns)
            .try_output()
            .unwrap_or_else(|e| panic!("scraping the kubelet's probes: {e}"))
    };
    let text = probes();
    let count = |labels: &[&str]| sample(&text, "prober_probe_total", labels).unwrap_or(0.0);
    let flapper = [
        r#"probe_type="Readiness""#,
        r#"container="web""#,
        r#"pod="flapper""#,
        r#"namespace="default""#,
    ];
    assert!(
        count(&[&flapper[..], &[r#"result="successful""#]].concat()) >= 3.0,
        "{text}"
    );
    assert!(
        count(&[&flapper[..], &[r#"result="failed""#]].concat()) >= 1.0,
        "{text}"
    );
    assert!(
        count(&[
            r#"probe_type="Liveness""#,
            r#"pod="dying""#,
            r#"result="failed""#
        ]) >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "prober_probe_duration_seconds_count", &flapper).unwrap_or(0.0) >= 3.0,
        "{text}"
    );
    cp.kubectl_ok(&["delete", "pod", "flapper", "--wait=true"]);
    wait_for("flapper's series gone", Duration::from_secs(20), || {
        (!probes().contains("pod=\"flapper\"")).then_some(())
    });
    // The kubelet's own families on its port too, where scrape configs
    // for kubelets look.
    let all = Spawn::new("curl")
        .args(["-sk", "--cert"])
        .arg_path(&crt)
        .args(["--key"])
        .arg_path(&key)
        .args([&url.replace("/metrics/probes", "/metrics")])
        .netns(&c.ns)
        .try_output()
        .unwrap_or_else(|e| panic!("scraping the kubelet: {e}"));
    assert!(
        sample(&all, "kubelet_running_pods", &[]).unwrap_or(0.0) >= 1.0,
        "{all}"
    );
    // Without a certificate of the cluster's CA, nothing.
    let anonymous = Spawn::new("curl")
        .args(["-sk", &url])
        .netns(&c.ns)
        .try_output()
        .unwrap_or_default();
    assert!(!anonymous.contains("prober_probe_total"), "{anonymous}");
}

#[test]
fn a_restarted_kubelet_adopts_running_pods_and_cleans_up_deleted_ones() {
    let mut c = OneNode::start("172.31.10.2", "10.244.4.0/24");
    let cp = &c.cp;
    for name in ["keep", "gone"] {
        cp.apply(&pod(
            name,
            &c.image,
            "Always",
            "echo started $(date +%s%N); exec sleep 3600",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let running = |p: &str| {
        cp.jsonpath(
            &["pod", p],
            "{.status.phase} {.status.containerStatuses[0].containerID}",
        )
    };
    let keep_before = wait_for("both pods Running", Duration::from_secs(60), || {
        let k = running("keep");
        (k.starts_with("Running containerd://") && running("gone").starts_with("Running"))
            .then_some(k)
    });
    // The kubelet dies without warning; a pod is deleted meanwhile.
    if let Some(mut a) = c.node.agent.take() {
        a.kill_now();
    }
    cp.kubectl_ok(&["delete", "pod", "gone", "--wait=false"]);
    c.node.start_agent();
    wait_for(
        "the deleted pod to be gone",
        Duration::from_secs(40),
        || cp.kubectl(&["get", "pod", "gone"]).is_err().then_some(()),
    );
    wait_for(
        "containerd to keep one container",
        Duration::from_secs(20),
        || (c.node.containerd.containers().len() == 1).then_some(()),
    );
    assert_eq!(
        running("keep"),
        keep_before,
        "the running container was adopted, not restarted"
    );
    let restarts = cp.jsonpath(
        &["pod", "keep"],
        "{.status.containerStatuses[0].restartCount}",
    );
    assert_eq!(restarts, "0");
    let sandboxes = std::fs::read_dir(c.node.dir.path.join("kubelet/pods"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(sandboxes, 1, "the deleted pod's sandbox is gone");
    let log = cp.kubectl_ok(&["logs", "keep"]);
    assert_eq!(log.lines().count(), 1, "one run: {log}");
}

#[test]
fn config_maps_and_secrets_reach_env_and_volumes_and_updates_show_up() {
    let c = OneNode::start("172.31.11.2", "10.244.5.0/24");
    let cp = &c.cp;
    cp.kubectl_ok(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=color=blue",
        "--from-literal=size=9",
    ]);
    cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal=password=s3cret",
    ]);
    let yaml = format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: reader
  labels: {{tier: web}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "echo COLOR=$COLOR PASS=$PASS NAME=$MY_NAME CFG_size=$CFG_size; while true; do cat /cfg/color; echo; sleep 0.5; done"]
    env:
    - {{name: COLOR, valueFrom: {{configMapKeyRef: {{name: settings, key: color}}}}}}
    - {{name: PASS, valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}}}
    - {{name: MY_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    envFrom:
    - {{prefix: CFG_, configMapRef: {{name: settings}}}}
    volumeMounts:
    - {{name: cfg, mountPath: /cfg}}
    - {{name: sec, mountPath: /sec}}
    - {{name: info, mountPath: /info}}
    - {{name: scratch, mountPath: /scratch}}
  volumes:
  - {{name: cfg, configMap: {{name: settings}}}}
  - {{name: sec, secret: {{secretName: creds}}}}
  - {{name: info, downwardAPI: {{items: [{{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}]}}}}
  - {{name: scratch, emptyDir: {{medium: Memory}}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: missing
spec:
  containers:
  - name: main
    image: {image}
    command: ["sleep", "3600"]
    env:
    - {{name: X, valueFrom: {{configMapKeyRef: {{name: settings, key: nope}}}}}}
"#,
        image = c.image
    );
    cp.apply(&yaml).unwrap_or_else(|e| panic!("{e}"));
    let first = wait_for("the reader's first lines", Duration::from_secs(60), || {
        cp.kubectl(&["logs", "reader"])
            .ok()
            .filter(|l| l.lines().count() >= 2)
    });
    assert_eq!(
        first.lines().next(),
        Some("COLOR=blue PASS=s3cret NAME=reader CFG_size=9"),
        "{first}"
    );
    assert!(first.lines().nth(1).is_some_and(|l| l == "blue"), "{first}");
    let pod_dir = std::fs::read_dir(c.node.dir.path.join("kubelet/pods"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("volumes/sec").exists())
        .unwrap_or_else(|| panic!("no pod dir with volumes"));
    let secret = std::fs::read_to_string(pod_dir.join("volumes/sec/password")).unwrap_or_default();
    assert_eq!(secret, "s3cret");
    let labels = std::fs::read_to_string(pod_dir.join("volumes/info/labels")).unwrap_or_default();
    assert_eq!(labels, "tier=\"web\"\n");

    // An update reaches the volume (through the ..data swap), not the env.
    cp.kubectl_ok(&[
        "patch",
        "configmap",
        "settings",
        "--type=merge",
        "-p",
        r#"{"data":{"color":"green"}}"#,
    ]);
    wait_for(
        "the new color in the volume",
        Duration::from_secs(30),
        || {
            cp.kubectl(&["logs", "reader", "--tail=1"])
                .ok()
                .filter(|l| l.trim() == "green")
        },
    );
    // A missing key is the upstream reason, with the key named.
    let waiting = wait_for(
        "CreateContainerConfigError",
        Duration::from_secs(30),
        || {
            let s = cp.jsonpath(&["pod", "missing"], "{.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}");
            s.starts_with("CreateContainerConfigError").then_some(s)
        },
    );
    assert!(
        waiting.contains("couldn't find key nope in ConfigMap default/settings"),
        "{waiting}"
    );
    let _ = &c.node;
}

#[test]
fn termination_honours_prestop_and_grace_and_bad_input_gets_its_reason() {
    let c = OneNode::start("172.31.12.2", "10.244.6.0/24");
    let cp = &c.cp;
    let shared = c.node.dir.path.join("shared");
    std::fs::create_dir_all(&shared).unwrap_or_else(|e| panic!("{e}"));
    let registry = c.image.split('/').next().unwrap_or_default().to_string();
    let yaml = format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: graceful
spec:
  terminationGracePeriodSeconds: 10
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "trap 'echo term >> /shared/order; exit 0' TERM; while true; do sleep 0.2; done"]
    lifecycle:
      preStop:
        exec: {{command: ["sh", "-c", "echo prestop >> /shared/order"]}}
    volumeMounts: [{{name: shared, mountPath: /shared}}]
  volumes: [{{name: shared, hostPath: {{path: {shared}}}}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: stubborn
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"]
---
apiVersion: v1
kind: Pod
metadata:
  name: no-image
spec:
  containers:
  - {{name: main, image: "{registry}/does-not-exist:1"}}
---
apiVersion: v1
kind: Pod
metadata:
  name: bad-name
spec:
  containers:
  - {{name: main, image: "Not A Reference"}}
---
apiVersion: v1
kind: Pod
metadata:
  name: no-command
spec:
  containers:
  - {{name: main, image: {image}, command: ["/no/such/binary"]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: no-command-never
spec:
  restartPolicy: Never
  containers:
  - {{name: main, image: {image}, command: ["/no/such/binary"]}}
"#,
        image = c.image,
        shared = shared.display()
    );
    cp.apply(&yaml).unwrap_or_else(|e| panic!("{e}"));
    let reason = |p: &str| {
        cp.jsonpath(
            &["pod", p],
            "{.status.containerStatuses[0].state.waiting.reason}|{.status.containerStatuses[0].state.waiting.message}",
        )
    };
    let pull = wait_for("ImagePullBackOff", Duration::from_secs(60), || {
        Some(reason("no-image")).filter(|r| r.starts_with("ImagePullBackOff"))
    });
    assert!(
        pull.contains("does-not-exist"),
        "the message names the image: {pull}"
    );
    let invalid = wait_for("InvalidImageName", Duration::from_secs(30), || {
        Some(reason("bad-name")).filter(|r| r.starts_with("InvalidImageName"))
    });
    assert!(invalid.contains("Not A Reference"), "{invalid}");
    let run = wait_for("RunContainerError", Duration::from_secs(30), || {
        Some(reason("no-command")).filter(|r| r.starts_with("RunContainerError"))
    });
    assert!(run.contains("/no/such/binary"), "{run}");
    // Under restartPolicy Never a container that cannot start is not
    // retried: it ends as exit 128 and the pod fails.
    wait_for("no-command-never Failed", Duration::from_secs(30), || {
        (cp.jsonpath(&["pod", "no-command-never"], "{.status.phase}") == "Failed").then_some(())
    });
    assert_eq!(
        cp.jsonpath(
            &["pod", "no-command-never"],
            "{.status.containerStatuses[0].state.terminated.reason}/{.status.containerStatuses[0].state.terminated.exitCode}/{.status.containerStatuses[0].restartCount}"
        ),
        "StartError/128/0"
    );
    let warnings = cp.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "type=Warning",
        "-o",
        "jsonpath={.items[*].involvedObject.name}",
    ]);
    for p in ["no-image", "bad-name", "no-command", "no-command-never"] {
        assert!(warnings.contains(p), "a Warning event for {p}: {warnings}");
    }

    for p in ["graceful", "stubborn"] {
        wait_for("Running", Duration::from_secs(60), || {
            (cp.jsonpath(&["pod", p], "{.status.phase}") == "Running").then_some(())
        });
    }
    // preStop, then SIGTERM, which the container handles at once.
    let started = std::time::Instant::now();
    cp.kubectl_ok(&["delete", "pod", "graceful", "--wait=true", "--timeout=30s"]);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "it exited on SIGTERM: {:?}",
        started.elapsed()
    );
    let order = std::fs::read_to_string(shared.join("order")).unwrap_or_default();
    assert_eq!(order, "prestop\nterm\n");
    // A container that ignores SIGTERM is killed when the grace period ends.
    let started = std::time::Instant::now();
    cp.kubectl_ok(&["delete", "pod", "stubborn", "--wait=true", "--timeout=30s"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(12),
        "grace 3 s, took {took:?}"
    );
    // Grace 0: gone at once.
    cp.kubectl_ok(&[
        "delete",
        "pod",
        "no-command",
        "--grace-period=0",
        "--force",
        "--wait=true",
        "--timeout=30s",
    ]);
    let _ = &c.node;
}

#[test]
fn pods_survive_a_containerd_restart_and_exits_are_still_seen() {
    let mut c = OneNode::start("172.31.13.2", "10.244.7.0/24");
    c.cp.apply(&pod(
        "steady",
        &c.image,
        "Always",
        "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let id = wait_for("steady Running", Duration::from_secs(60), || {
        let s = c.cp.jsonpath(
            &["pod", "steady"],
            "{.status.phase} {.status.containerStatuses[0].containerID}",
        );
        s.strip_prefix("Running ").map(String::from)
    });
    c.node.containerd.crash_and_restart();
    let cp = &c.cp;
    // The container ran on through the restart.
    let ticks_before = cp.kubectl_ok(&["logs", "steady"]).lines().count();
    std::thread::sleep(Duration::from_secs(1));
    let ticks_after = cp.kubectl_ok(&["logs", "steady"]).lines().count();
    assert!(
        ticks_after > ticks_before,
        "still logging: {ticks_before} then {ticks_after}"
    );
    // New pods run, and their exits reach the status: the kubelet
    // resubscribed to containerd's events.
    cp.apply(&pod("late", &c.image, "Never", "sleep 1; exit 4"))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        "late to fail with its exit code",
        Duration::from_secs(60),
        || {
            let s = cp.jsonpath(
                &["pod", "late"],
                "{.status.phase} {.status.containerStatuses[0].state.terminated.exitCode}",
            );
            (s == "Failed 4").then_some(())
        },
    );
    let s = cp.jsonpath(
        &["pod", "steady"],
        "{.status.containerStatuses[0].containerID} {.status.containerStatuses[0].restartCount}",
    );
    assert_eq!(
        s,
        format!("{id} 0"),
        "the running container was not restarted"
    );
}
