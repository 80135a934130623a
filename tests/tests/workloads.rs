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
    // What the controller did shows as events.
    assert!(
        described.contains("SuccessfulCreate") && described.contains("Created pod: web-"),
        "{described}"
    );

    // Deleting it takes its pods with it.
    c.cp.kubectl_ok(&["delete", "rc", "web"]);
    wait_for("the pods to go", Duration::from_secs(60), || {
        let left =
            c.cp.kubectl_ok(&["get", "pods", "-l", "app=rc-web", "-o", "name"]);
        left.trim().is_empty().then_some(())
    });
}

fn job(name: &str, spec: &str, restart: &str, image: &str, script: &str) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n{spec}  template:\n    spec:\n      restartPolicy: {restart}\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: {image}\n        command: [\"sh\", \"-c\", {script:?}]\n"
    )
}

/// `kubectl wait` for a Job's condition, as a user scripts it.
fn wait_job(c: &OneNode, name: &str, condition: &str, secs: u32) {
    c.cp.kubectl(&[
        "wait",
        &format!("--for=condition={condition}"),
        &format!("job/{name}"),
        &format!("--timeout={secs}s"),
    ])
    .unwrap_or_else(|e| {
        let pods =
            c.cp.kubectl(&["get", "pods", "-o", "wide"])
                .unwrap_or_default();
        let job =
            c.cp.kubectl(&["get", "job", name, "-o", "yaml"])
                .unwrap_or_default();
        panic!("job {name} never {condition}: {e}\n{job}\n{pods}")
    });
}

#[test]
fn jobs_run_to_completion_in_parallel_stop_at_their_backoff_limit_and_give_each_index() {
    let c = OneNode::start("172.31.15.2", "10.244.9.0/24");
    let img = c.image.as_str();

    // Jobs only restart on failure or never.
    let err =
        c.cp.apply(&job("bad", "", "Always", img, "true"))
            .expect_err("restartPolicy Always");
    assert!(
        err.contains("spec.template.spec.restartPolicy: Unsupported value: \"Always\""),
        "{err}"
    );

    // All at once: five completions two at a time, a Job that keeps
    // failing, an Indexed Job, one suspended, and one kubectl makes.
    c.cp.apply(&job(
        "five",
        "  completions: 5\n  parallelism: 2\n",
        "Never",
        img,
        "sleep 1; echo done",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    c.cp.apply(&job("fails", "  backoffLimit: 1\n", "Never", img, "exit 3"))
        .unwrap_or_else(|e| panic!("{e}"));
    c.cp.apply(&job(
        "indexed",
        "  completions: 3\n  parallelism: 3\n  completionMode: Indexed\n",
        "Never",
        img,
        "echo index=$JOB_COMPLETION_INDEX host=$(hostname)",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    c.cp.apply(&job(
        "later",
        "  suspend: true\n  ttlSecondsAfterFinished: 1\n",
        "OnFailure",
        img,
        "true",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    c.cp.kubectl_ok(&["create", "job", "hello", "--image", img, "--", "echo", "hi"]);
    // A pod failure policy: exit 42 fails the Job at once, exit 3 is not
    // counted at all.
    let rules = |action: &str, code: u32| {
        format!(
            "  backoffLimit: 6\n  podFailurePolicy:\n    rules:\n    - action: {action}\n      onExitCodes: {{operator: In, values: [{code}]}}\n"
        )
    };
    c.cp.apply(&job(
        "policy",
        &rules("FailJob", 42),
        "Never",
        img,
        "exit 42",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    c.cp.apply(&job("ignored", &rules("Ignore", 3), "Never", img, "exit 3"))
        .unwrap_or_else(|e| panic!("{e}"));

    // Parallelism caps the running pods while the five go through.
    let mut most = 0;
    wait_for("job five to finish", Duration::from_secs(90), || {
        // Zero counts are left out, as upstream leaves them.
        let s =
            c.cp.jsonpath(&["job", "five"], "{.status.active}/{.status.succeeded}");
        let (active, done) = s.split_once('/').unwrap_or_default();
        most = most.max(active.parse().unwrap_or(0));
        (done == "5").then_some(())
    });
    assert!(most <= 2, "at most 2 pods at once, saw {most}");
    wait_job(&c, "five", "Complete", 30);
    let five = c.cp.jsonpath(
        &["pods", "-l", "batch.kubernetes.io/job-name=five"],
        "{range .items[*]}{.status.phase} {.metadata.finalizers}{\"\\n\"}{end}",
    );
    assert_eq!(
        five.lines().collect::<Vec<_>>(),
        ["Succeeded "; 5],
        "five pods succeeded, none still tracked"
    );

    wait_job(&c, "hello", "Complete", 60);
    let table = c.cp.kubectl_ok(&["get", "jobs"]);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert!(
        table.starts_with("NAME") && table.contains("COMPLETIONS") && table.contains("DURATION"),
        "{table}"
    );
    assert_eq!(row("five"), "five Complete 5/5", "{table}");
    assert_eq!(row("hello"), "hello Complete 1/1", "{table}");
    assert_eq!(row("later"), "later Suspended 0/1", "{table}");
    let hello = c.cp.jsonpath(
        &["pods", "-l", "job-name=hello"],
        "{.items[0].metadata.name}",
    );
    assert_eq!(c.cp.kubectl_ok(&["logs", &hello]).trim(), "hi");

    // Each index once, told to its pod.
    wait_job(&c, "indexed", "Complete", 60);
    assert_eq!(
        c.cp.jsonpath(&["job", "indexed"], "{.status.completedIndexes}"),
        "0-2"
    );
    let pods = c.cp.jsonpath(
        &["pods", "-l", "job-name=indexed"],
        "{range .items[*]}{.metadata.name} {.metadata.annotations.batch\\.kubernetes\\.io/job-completion-index}{\"\\n\"}{end}",
    );
    let mut seen = BTreeSet::new();
    for line in pods.lines() {
        let (pod, index) = line.split_once(' ').unwrap_or((line, ""));
        let log = c.cp.kubectl_ok(&["logs", pod]);
        assert_eq!(
            log.trim(),
            format!("index={index} host=indexed-{index}"),
            "{pod}"
        );
        seen.insert(index.to_string());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["0", "1", "2"]);

    // Two failures against a limit of one: failed, with upstream's reason,
    // and no third pod.
    wait_job(&c, "fails", "Failed", 90);
    assert_eq!(
        c.cp.jsonpath(
            &["job", "fails"],
            "{.status.failed} {.status.conditions[?(@.type==\"Failed\")].reason}"
        ),
        "2 BackoffLimitExceeded"
    );
    let described = c.cp.kubectl_ok(&["describe", "job", "fails"]);
    assert!(
        described.contains("BackoffLimitExceeded") && described.contains("Created pod: fails-"),
        "{described}"
    );
    let tries =
        c.cp.kubectl_ok(&["get", "pods", "-l", "job-name=fails", "-o", "name"]);
    assert_eq!(tries.lines().count(), 2, "{tries}");

    wait_job(&c, "policy", "Failed", 60);
    let why = c.cp.jsonpath(
        &["job", "policy"],
        r#"{.status.failed} {.status.conditions[?(@.type=="Failed")].reason}: {.status.conditions[?(@.type=="Failed")].message}"#,
    );
    assert!(
        why.starts_with("1 PodFailurePolicy: Container main for pod default/policy-")
            && why.ends_with("failed with exit code 42 matching FailJob rule at index 0"),
        "{why}"
    );
    // Ignored failures are replaced and never counted.
    wait_for(
        "ignored failures to be replaced",
        Duration::from_secs(60),
        || {
            let tries =
                c.cp.kubectl_ok(&["get", "pods", "-l", "job-name=ignored", "-o", "name"]);
            (tries.lines().count() >= 3).then_some(())
        },
    );
    assert_eq!(c.cp.jsonpath(&["job", "ignored"], "{.status.failed}"), "");
    c.cp.kubectl_ok(&["delete", "job", "ignored", "--wait=false"]);

    // Suspended, nothing ran; resumed, it runs, and its TTL removes it
    // with its pod.
    assert_eq!(
        c.cp.kubectl_ok(&["get", "pods", "-l", "job-name=later", "-o", "name"])
            .trim(),
        ""
    );
    c.cp.kubectl_ok(&[
        "patch",
        "job",
        "later",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ]);
    wait_for(
        "job later to run and be removed",
        Duration::from_secs(60),
        || {
            let gone = c.cp.kubectl(&["get", "job", "later"]).is_err();
            let left =
                c.cp.kubectl_ok(&["get", "pods", "-l", "job-name=later", "-o", "name"]);
            (gone && left.trim().is_empty()).then_some(())
        },
    );
}

#[test]
fn a_cron_job_runs_each_minute_and_keeps_its_history_limit() {
    let c = OneNode::start("172.31.16.2", "10.244.10.0/24");
    let cron = |name: &str, schedule: &str, extra: &str| {
        format!(
            "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: {name}\nspec:\n  schedule: {schedule:?}\n{extra}  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          terminationGracePeriodSeconds: 1\n          containers:\n          - name: main\n            image: {}\n            command: [\"sh\", \"-c\", \"echo tick $(date +%M)\"]\n",
            c.image
        )
    };
    // Bad schedules and zones are refused by field.
    for (schedule, extra, want) in [
        (
            "61 * * * *",
            "",
            "spec.schedule: Invalid value: \"61 * * * *\"",
        ),
        (
            "TZ=UTC * * * * *",
            "",
            "cannot use TZ or CRON_TZ in schedule, use timeZone field instead",
        ),
        (
            "* * * * *",
            "  timeZone: Mars/Olympus\n",
            "spec.timeZone: Invalid value: \"Mars/Olympus\"",
        ),
    ] {
        let err =
            c.cp.apply(&cron("bad", schedule, extra))
                .expect_err(schedule);
        assert!(err.contains(want), "{schedule}: {err}");
    }

    c.cp.apply(&cron(
        "tick",
        "*/1 * * * *",
        "  successfulJobsHistoryLimit: 1\n  timeZone: Europe/Berlin\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    // A suspended one never runs.
    c.cp.apply(&cron("idle", "* * * * *", "  suspend: true\n"))
        .unwrap_or_else(|e| panic!("{e}"));

    // Two runs (the first at the next minute), each a Job named by its
    // minute that completes; one kept after the second.
    let mut seen = BTreeSet::new();
    wait_for("two runs of tick", Duration::from_secs(150), || {
        let names = c.cp.jsonpath(
            &["jobs"],
            r#"{range .items[?(@.metadata.ownerReferences[0].name=="tick")]}{.metadata.name}{"\n"}{end}"#,
        );
        seen.extend(names.lines().map(String::from));
        (seen.len() >= 2).then_some(())
    });
    for name in &seen {
        let minutes: i64 = name
            .strip_prefix("tick-")
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("a job named by its minute: {name}"));
        assert!(minutes > 29_000_000, "{name}");
    }
    // Once the newest run has finished, it is the one finished run kept.
    let newest = seen.iter().next_back().cloned().unwrap_or_default();
    wait_for("the history limit", Duration::from_secs(60), || {
        let done = c.cp.jsonpath(
            &["jobs"],
            r#"{range .items[?(@.status.succeeded==1)]}{.metadata.name}{"\n"}{end}"#,
        );
        let done: Vec<&str> = done.lines().filter(|n| n.starts_with("tick-")).collect();
        (done == [newest.as_str()]).then_some(())
    });
    let described = c.cp.kubectl_ok(&["describe", "cronjob", "tick"]);
    assert!(
        described.contains("SuccessfulCreate") && described.contains("SuccessfulDelete"),
        "{described}"
    );
    let status = c.cp.jsonpath(
        &["cronjob", "tick"],
        "{.status.lastScheduleTime} {.status.lastSuccessfulTime}",
    );
    assert_eq!(status.split_whitespace().count(), 2, "{status}");
    let table = c.cp.kubectl_ok(&["get", "cronjobs"]);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .map(|l| l.split_whitespace().take(9).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(row("idle"), "idle * * * * * <none> True 0", "{table}");
    assert!(
        row("tick").starts_with("tick */1 * * * * Europe/Berlin False"),
        "{table}"
    );
    assert_eq!(
        c.cp.kubectl_ok(&["get", "jobs", "-o", "name"])
            .lines()
            .filter(|l| l.contains("idle"))
            .count(),
        0
    );

    // kubectl's manual run from the CronJob's template.
    c.cp.kubectl_ok(&["create", "job", "by-hand", "--from=cronjob/tick"]);
    wait_job(&c, "by-hand", "Complete", 60);
}

/// Quantities as `kubectl top` prints them: `250m` cores, `12Mi` bytes.
fn millicores(s: &str) -> u64 {
    s.strip_suffix('m')
        .and_then(|m| m.parse().ok())
        .or_else(|| s.parse::<u64>().ok().map(|c| c * 1000))
        .unwrap_or_else(|| panic!("a CPU figure: {s:?}"))
}

#[test]
fn kubectl_top_shows_what_pods_and_the_node_use() {
    let c = OneNode::start_with(
        "172.31.17.2",
        "10.244.11.0/24",
        &["--metric-resolution", "2s"],
    );
    let pod = |name: &str, script: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: top}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {}\n    command: [\"sh\", \"-c\", {script:?}]\n    resources: {{requests: {{cpu: 100m, memory: 16Mi}}}}\n",
            c.image
        )
    };
    c.cp.apply(&pod("busy", "while true; do :; done"))
        .unwrap_or_else(|e| panic!("{e}"));
    c.cp.apply(&pod("idle", "sleep 3600"))
        .unwrap_or_else(|e| panic!("{e}"));
    running(&c, "app=top", 2);

    // The busy loop shows as CPU in use, the sleeper as next to none.
    let rows = wait_for(
        "kubectl top pod to show both",
        Duration::from_secs(60),
        || {
            let out =
                c.cp.kubectl(&["top", "pod", "-l", "app=top", "--no-headers"])
                    .ok()?;
            let rows: Vec<(String, u64, String)> = out
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() == 3).then(|| (f[0].to_string(), millicores(f[1]), f[2].to_string()))
                })
                .collect();
            // At least a tenth of a core, even on a loaded machine.
            (rows.len() == 2 && rows.iter().any(|r| r.0 == "busy" && r.1 >= 100)).then_some(rows)
        },
    );
    let idle = rows
        .iter()
        .find(|r| r.0 == "idle")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert!(idle.1 < 50, "the sleeper uses next to no CPU: {rows:?}");
    assert!(idle.2.ends_with("Mi") || idle.2.ends_with("Ki"), "{rows:?}");

    // The node's row carries its share of allocatable.
    let node = c.cp.kubectl_ok(&["top", "node", "--no-headers"]);
    let f: Vec<&str> = node.split_whitespace().collect();
    assert!(f.len() == 5 && f[0] == c.node.name, "{node}");
    assert!(
        millicores(f[1]) >= 100 && f[2].ends_with('%') && f[4].ends_with('%'),
        "{node}"
    );

    // Read-only, and only for who may read it.
    let err =
        c.cp.kubectl(&["delete", "pods.metrics.k8s.io", "busy"])
            .expect_err("metrics are read-only");
    assert!(
        err.contains("MethodNotAllowed") || err.contains("not allowed") || err.contains("405"),
        "{err}"
    );
}

#[test]
fn an_autoscaler_scales_a_cpu_burning_deployment_up_and_back_down() {
    let c = OneNode::start_with(
        "172.31.18.2",
        "10.244.12.0/24",
        &[
            "--metric-resolution",
            "2s",
            "--horizontal-pod-autoscaler-sync-period",
            "2s",
        ],
    );
    // Each pod burns a core until told to idle.
    c.cp.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: burn}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: burn}}}}
  template:
    metadata: {{labels: {{app: burn}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: {}
        command: ["sh", "-c", "if [ \"$MODE\" = idle ]; then exec sleep 3600; fi; while true; do :; done"]
        resources: {{requests: {{cpu: 100m}}}}
"#,
        c.image
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    // kubectl autoscale writes autoscaling/v1; the behavior is set through
    // v2, and each version reads what the other wrote.
    c.cp.kubectl_ok(&[
        "autoscale",
        "deployment",
        "burn",
        "--min=1",
        "--max=3",
        "--cpu-percent=50",
    ]);
    c.cp.kubectl_ok(&[
        "patch",
        "hpa",
        "burn",
        "--type=merge",
        "-p",
        r#"{"spec":{"behavior":{"scaleDown":{"stabilizationWindowSeconds":5}}}}"#,
    ]);
    assert_eq!(
        c.cp.jsonpath(
            &["horizontalpodautoscalers.v2.autoscaling", "burn"],
            "{.spec.metrics[0].resource.target.averageUtilization} {.spec.behavior.scaleDown.stabilizationWindowSeconds}"
        ),
        "50 5"
    );
    assert_eq!(
        c.cp.jsonpath(
            &["horizontalpodautoscalers.v1.autoscaling", "burn"],
            "{.spec.targetCPUUtilizationPercentage}"
        ),
        "50"
    );

    // Far above 50 % of 100m: up to the maximum of three.
    wait_for(
        "the HPA to scale burn to 3",
        Duration::from_secs(120),
        || (c.cp.jsonpath(&["deployment", "burn"], "{.spec.replicas}") == "3").then_some(()),
    );
    let table = c.cp.kubectl_ok(&["get", "hpa", "burn"]);
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row.get(1), Some(&"Deployment/burn"), "{table}");
    // TARGETS reads `cpu: 506%/50%`.
    let (used, want) = row
        .get(3)
        .and_then(|t| t.split_once('/'))
        .unwrap_or_else(|| panic!("TARGETS: {table}"));
    let used: u64 = used
        .strip_suffix('%')
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("a utilization in TARGETS: {table}"));
    assert!(
        row.get(2) == Some(&"cpu:") && used > 50 && want == "50%",
        "{table}"
    );
    assert_eq!(row.get(4..6), Some(&["1", "3"][..]), "{table}");
    let described = c.cp.kubectl_ok(&["describe", "hpa", "burn"]);
    assert!(
        described.contains("SuccessfulRescale") && described.contains("New size: 3"),
        "{described}"
    );
    assert!(
        described.contains("ScalingActive") && described.contains("ValidMetricFound"),
        "{described}"
    );

    // Pods without CPU requests have no utilization: the HPA says why,
    // and the same warning repeated is one event counting up.
    c.cp.kubectl_ok(&[
        "create",
        "deployment",
        "bare",
        "--image",
        &c.image,
        "--",
        "sleep",
        "3600",
    ]);
    c.cp.kubectl_ok(&[
        "autoscale",
        "deployment",
        "bare",
        "--max=2",
        "--cpu-percent=50",
    ]);
    wait_for(
        "the missing-request warning to repeat",
        Duration::from_secs(60),
        || {
            let all = c.cp.jsonpath(
                &[
                    "events",
                    "--field-selector",
                    "involvedObject.name=bare,reason=FailedGetResourceMetric",
                ],
                r#"{range .items[*]}{.count} {.message}{"\n"}{end}"#,
            );
            all.lines()
                .find(|l| l.contains("missing request for cpu in container busybox of Pod bare-"))
                .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok())
                .filter(|n| *n >= 2)
        },
    );
    let active = c.cp.jsonpath(
        &["hpa", "bare"],
        r#"{.status.conditions[?(@.type=="ScalingActive")].status} {.status.conditions[?(@.type=="ScalingActive")].reason}"#,
    );
    assert_eq!(active, "False FailedGetResourceMetric");

    // The load stops (a rollout to idle pods); after the 5 s window it
    // goes back to one.
    c.cp.kubectl_ok(&["set", "env", "deployment/burn", "MODE=idle"]);
    wait_for(
        "the HPA to scale burn back to 1",
        Duration::from_secs(150),
        || (c.cp.jsonpath(&["deployment", "burn"], "{.spec.replicas}") == "1").then_some(()),
    );
    let reason = c.cp.jsonpath(
        &["hpa", "burn"],
        r#"{.status.conditions[?(@.type=="ScalingActive")].reason}"#,
    );
    assert_eq!(reason, "ValidMetricFound");
}

fn stateful_set(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: None
  selector: {{app: sts-web}}
  ports: [{{name: http, port: 80}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: web}}
spec:
  serviceName: web
  replicas: 3
  selector: {{matchLabels: {{app: sts-web}}}}
  template:
    metadata: {{labels: {{app: sts-web}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: {image}
        command: ["sh", "-c", "hostname >> /data/log; exec sleep 3600"]
        volumeMounts: [{{name: data, mountPath: /data}}]
  volumeClaimTemplates:
  - metadata: {{name: data}}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{requests: {{storage: 16Mi}}}}
"#
    )
}

/// `uid node phase` of pod `name`, or an empty string.
fn pod_line(c: &OneNode, name: &str) -> String {
    c.cp.jsonpath(
        &["pod", name],
        "{.metadata.uid} {.spec.nodeName} {.status.phase}",
    )
}

fn exec(c: &OneNode, pod: &str, script: &str) -> String {
    c.cp.kubectl_ok(&["exec", pod, "--", "sh", "-c", script])
}

#[test]
fn a_stateful_set_starts_in_order_keeps_names_and_data_and_scales_down_in_reverse() {
    let c = OneNode::start("172.31.19.2", "10.244.13.0/24");
    let other = c.second_node("172.31.19.3", "10.244.14.0/24");

    // The default class is the node-local one, bound where the pod lands.
    let classes = c.cp.kubectl_ok(&["get", "storageclass"]);
    assert!(
        classes.contains("local-path (default)")
            && classes.contains("skiff.io/local-path")
            && classes.contains("WaitForFirstConsumer"),
        "{classes}"
    );

    // A claim without access modes is refused, naming the field.
    let err = c
        .cp
        .apply("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: bad}\nspec:\n  resources: {requests: {storage: 1Mi}}\n")
        .expect_err("no access modes");
    assert!(
        err.contains("spec.accessModes: Required value: at least 1 access mode is required"),
        "{err}"
    );

    // A volume made by hand binds at once to a claim asking for no class,
    // and keeps its data when the claim goes (Retain).
    let dir = c.node.dir.path.join("static");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let manual = format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: manual}}\nspec:\n  capacity: {{storage: 1Gi}}\n  accessModes: [ReadWriteOnce]\n  hostPath: {{path: {}}}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: manual}}\nspec:\n  storageClassName: \"\"\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 100Mi}}}}\n",
        dir.display()
    );
    c.cp.apply(&manual).unwrap_or_else(|e| panic!("{e}"));
    wait_for("the manual claim to bind", Duration::from_secs(30), || {
        (c.cp.jsonpath(
            &["pvc", "manual"],
            "{.status.phase} {.spec.volumeName} {.status.capacity.storage}",
        ) == "Bound manual 1Gi")
            .then_some(())
    });
    c.cp.kubectl_ok(&[
        "run", "writer", "--image", &c.image, "--restart=Never", "--overrides",
        r#"{"spec":{"volumes":[{"name":"v","persistentVolumeClaim":{"claimName":"manual"}}],"containers":[{"name":"writer","image":"IMAGE","command":["sh","-c","echo hello > /v/out"],"volumeMounts":[{"name":"v","mountPath":"/v"}]}]}}"#.replace("IMAGE", &c.image).as_str(),
    ]);
    wait_for("the writer to finish", Duration::from_secs(60), || {
        (c.cp.jsonpath(&["pod", "writer"], "{.status.phase}") == "Succeeded").then_some(())
    });
    assert_eq!(
        std::fs::read_to_string(dir.join("out")).unwrap_or_default(),
        "hello\n"
    );
    c.cp.kubectl_ok(&["delete", "pod", "writer"]);
    c.cp.kubectl_ok(&["delete", "pvc", "manual"]);
    wait_for(
        "the manual volume to be released",
        Duration::from_secs(30),
        || (c.cp.jsonpath(&["pv", "manual"], "{.status.phase}") == "Released").then_some(()),
    );
    assert!(dir.join("out").exists());
    c.cp.kubectl_ok(&["delete", "pv", "manual"]);

    c.cp.apply(&stateful_set(&c.image))
        .unwrap_or_else(|e| panic!("{e}"));
    running(&c, "app=sts-web", 3);

    // OrderedReady: each pod was created only once the one below it was
    // Ready.
    let times = |pod: &str| -> (String, String) {
        let t = c.cp.jsonpath(
            &["pod", pod],
            r#"{.metadata.creationTimestamp} {.status.conditions[?(@.type=="Ready")].lastTransitionTime}"#,
        );
        let (a, b) = t.split_once(' ').unwrap_or_default();
        (a.to_string(), b.to_string())
    };
    for i in 1..3 {
        let (created, _) = times(&format!("web-{i}"));
        let (_, below_ready) = times(&format!("web-{}", i - 1));
        assert!(
            created >= below_ready,
            "web-{i} created at {created}, before web-{} was Ready at {below_ready}",
            i - 1
        );
    }
    wait_for("the set's status", Duration::from_secs(30), || {
        let out = c.cp.kubectl_ok(&["get", "sts", "web"]);
        out.lines()
            .nth(1)
            .is_some_and(|r| r.starts_with("web") && r.contains("3/3"))
            .then_some(())
    });

    // Each pod has its own claim, bound to a local volume on its node.
    let claims = c.cp.kubectl_ok(&["get", "pvc"]);
    for i in 0..3 {
        let row = claims
            .lines()
            .find(|l| l.starts_with(&format!("data-web-{i} ")))
            .unwrap_or_else(|| panic!("no claim data-web-{i}:\n{claims}"));
        let f: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            [f[1], f[3], f[4], f[5]],
            ["Bound", "16Mi", "RWO", "local-path"],
            "{row}"
        );
    }
    let volumes = c.cp.kubectl_ok(&["get", "pv"]);
    assert!(
        volumes.contains("default/data-web-0") && volumes.contains("Delete"),
        "{volumes}"
    );
    let node_of = |pod: &str| {
        pod_line(&c, pod)
            .split(' ')
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };
    for i in 0..3 {
        let pv =
            c.cp.jsonpath(&["pvc", &format!("data-web-{i}")], "{.spec.volumeName}");
        let pinned = c.cp.jsonpath(
            &["pv", &pv],
            "{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}",
        );
        assert_eq!(pinned, node_of(&format!("web-{i}")), "volume {pv}");
    }

    // Stable names: the hostname is the pod's name, and the headless
    // Service's slice names each pod for DNS.
    assert_eq!(exec(&c, "web-0", "hostname").trim(), "web-0");
    let hosts = exec(&c, "web-0", "cat /etc/hosts");
    assert!(
        hosts.contains("\tweb-0.web.default.svc.cluster.local\tweb-0\n"),
        "{hosts}"
    );
    assert_eq!(exec(&c, "web-2", "cat /data/log").trim(), "web-2");
    let hostnames = wait_for("the pods' DNS names", Duration::from_secs(30), || {
        let h = c.cp.jsonpath(
            &["endpointslices", "-l", "kubernetes.io/service-name=web"],
            "{.items[*].endpoints[*].hostname}",
        );
        let mut names: Vec<&str> = h.split_whitespace().collect();
        names.sort();
        (names == ["web-0", "web-1", "web-2"]).then_some(h.clone())
    });
    assert!(!hostnames.is_empty());

    // A deleted pod comes back under its name, with its data.
    exec(&c, "web-1", "echo kept > /data/marker");
    let uid = pod_line(&c, "web-1");
    c.cp.kubectl_ok(&["delete", "pod", "web-1", "--wait=false"]);
    wait_for("web-1 to come back", Duration::from_secs(90), || {
        let now = pod_line(&c, "web-1");
        (now.ends_with("Running") && now.split(' ').next() != uid.split(' ').next()).then_some(())
    });
    running(&c, "app=sts-web", 3);
    assert_eq!(exec(&c, "web-1", "cat /data/marker").trim(), "kept");
    assert_eq!(exec(&c, "web-1", "cat /data/log"), "web-1\nweb-1\n");

    // Drained, its node's pods cannot go anywhere else: their volumes
    // live there. Uncordoned, they come back to their data.
    let drained = node_of("web-1");
    c.cp.kubectl(&["drain", &drained, "--ignore-daemonsets", "--timeout=90s"])
        .unwrap_or_else(|e| panic!("drain: {e}"));
    let why = wait_for(
        "an evicted pod to wait for its volume's node",
        Duration::from_secs(60),
        || {
            let all = c.cp.jsonpath(
                &["pods", "-l", "app=sts-web"],
                r#"{range .items[*]}{.status.phase} {.status.conditions[?(@.type=="PodScheduled")].message}{"\n"}{end}"#,
            );
            all.lines()
                .find(|l| l.starts_with("Pending ") && l.contains("volume node affinity conflict"))
                .map(String::from)
        },
    );
    assert!(
        why.contains("0/2 nodes are available")
            && why.contains("1 node(s) had volume node affinity conflict")
            && why.contains("1 node(s) were unschedulable"),
        "{why}"
    );
    c.cp.kubectl_ok(&["uncordon", &drained]);
    running(&c, "app=sts-web", 3);
    assert_eq!(node_of("web-1"), drained);
    assert_eq!(exec(&c, "web-1", "cat /data/marker").trim(), "kept");

    // A partitioned update changes only the pods at or above the
    // partition; lifting it rolls the rest, highest first.
    c.cp.kubectl_ok(&[
        "patch",
        "sts",
        "web",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":2}}}}"#,
    ]);
    c.cp.kubectl_ok(&["set", "env", "sts/web", "MODE=v2"]);
    let out =
        c.cp.kubectl_ok(&["rollout", "status", "sts/web", "--timeout=90s"]);
    assert!(
        out.contains("partitioned roll out complete: 1 new pods have been updated"),
        "{out}"
    );
    let env = |pod: &str| {
        c.cp.jsonpath(&["pod", pod], "{.spec.containers[0].env[0].value}")
    };
    assert_eq!(
        [env("web-0"), env("web-1"), env("web-2")],
        ["", "", "v2"].map(String::from)
    );
    c.cp.kubectl_ok(&[
        "patch",
        "sts",
        "web",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":0}}}}"#,
    ]);
    let out =
        c.cp.kubectl_ok(&["rollout", "status", "sts/web", "--timeout=120s"]);
    // A set with a partition (0 by default) reports its roll out so.
    assert!(
        out.contains("partitioned roll out complete: 3 new pods have been updated"),
        "{out}"
    );
    assert_eq!(
        [env("web-0"), env("web-1"), env("web-2")],
        ["v2", "v2", "v2"].map(String::from)
    );
    let (web0, _) = times("web-0");
    let (web1, _) = times("web-1");
    assert!(
        web1 <= web0,
        "web-1 ({web1}) was replaced after web-0 ({web0})"
    );

    // Forbidden changes are refused with upstream's message.
    let err =
        c.cp.kubectl(&[
            "patch",
            "sts",
            "web",
            "--type=merge",
            "-p",
            r#"{"spec":{"serviceName":"other"}}"#,
        ])
        .expect_err("serviceName is fixed");
    assert!(
        err.contains("updates to statefulset spec for fields other than"),
        "{err}"
    );

    // Scaling down removes the highest ordinals first, one at a time; the
    // claims stay.
    let before = exec(&c, "web-2", "cat /data/log");
    c.cp.kubectl_ok(&["scale", "sts", "web", "--replicas=1"]);
    let mut seen: Vec<BTreeSet<String>> = Vec::new();
    wait_for(
        "the set to shrink to web-0",
        Duration::from_secs(90),
        || {
            let now: BTreeSet<String> = pods(&c, "app=sts-web")
                .into_iter()
                .map(|[name, ..]| name)
                .collect();
            if seen.last() != Some(&now) {
                seen.push(now.clone());
            }
            (now.len() == 1 && now.contains("web-0")).then_some(())
        },
    );
    assert!(
        !seen
            .iter()
            .any(|s| s.contains("web-2") && !s.contains("web-1")),
        "web-1 went before web-2: {seen:?}"
    );
    for i in 1..3 {
        let phase =
            c.cp.jsonpath(&["pvc", &format!("data-web-{i}")], "{.status.phase}");
        assert_eq!(phase, "Bound", "data-web-{i} is kept");
    }
    c.cp.kubectl_ok(&["scale", "sts", "web", "--replicas=3"]);
    running(&c, "app=sts-web", 3);
    // web-2 comes back to the log its earlier lives wrote.
    assert_eq!(
        exec(&c, "web-2", "cat /data/log"),
        format!("{before}web-2\n")
    );

    // The set goes, its claims stay; deleting them deletes their volumes
    // and the directories on their nodes.
    let paths: Vec<String> = (0..3)
        .map(|i| {
            let pv =
                c.cp.jsonpath(&["pvc", &format!("data-web-{i}")], "{.spec.volumeName}");
            c.cp.jsonpath(&["pv", &pv], "{.spec.local.path}")
        })
        .collect();
    for p in &paths {
        assert!(std::path::Path::new(p).join("log").exists(), "{p}");
    }
    c.cp.kubectl_ok(&["delete", "sts", "web"]);
    wait_for("the set's pods to go", Duration::from_secs(60), || {
        pods(&c, "app=sts-web").is_empty().then_some(())
    });
    assert_eq!(
        c.cp.jsonpath(&["pvc"], "{.items[*].metadata.name}"),
        "data-web-0 data-web-1 data-web-2"
    );
    c.cp.kubectl_ok(&["delete", "pvc", "data-web-0", "data-web-1", "data-web-2"]);
    wait_for(
        "the volumes and their directories to go",
        Duration::from_secs(60),
        || {
            (c.cp
                .jsonpath(&["pv"], "{.items[*].metadata.name}")
                .is_empty()
                && paths.iter().all(|p| !std::path::Path::new(p).exists()))
            .then_some(())
        },
    );
    drop(other);
}

#[test]
fn a_parallel_stateful_set_starts_at_once_and_on_delete_waits_for_deletions() {
    let c = OneNode::start("172.31.20.2", "10.244.15.0/24");
    // Pods become Ready 5 s after they start: ordered creation would wait
    // for that between pods; Parallel does not.
    let set = |env: &str| {
        format!(
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: par}}\nspec:\n  replicas: 3\n  podManagementPolicy: Parallel\n  updateStrategy: {{type: OnDelete}}\n  selector: {{matchLabels: {{app: par}}}}\n  template:\n    metadata: {{labels: {{app: par}}}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: {}\n        command: [\"sleep\", \"3600\"]\n        env: [{{name: MODE, value: {env}}}]\n        readinessProbe: {{exec: {{command: [\"true\"]}}, initialDelaySeconds: 5, periodSeconds: 1}}\n",
            c.image
        )
    };
    c.cp.apply(&set("one")).unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        "three pods before any is Ready",
        Duration::from_secs(30),
        || {
            let ps = pods(&c, "app=par");
            let names: BTreeSet<&str> = ps.iter().map(|p| p[0].as_str()).collect();
            if ps.iter().any(|p| p[2] == "True") {
                panic!("a pod was Ready before all three existed: {ps:?}");
            }
            (names == BTreeSet::from(["par-0", "par-1", "par-2"])).then_some(())
        },
    );
    running(&c, "app=par", 3);

    // OnDelete: a new template replaces nothing by itself; a deleted pod
    // comes back from it.
    c.cp.apply(&set("two")).unwrap_or_else(|e| panic!("{e}"));
    let env = |pod: &str| {
        c.cp.jsonpath(&["pod", pod], "{.spec.containers[0].env[0].value}")
    };
    wait_for("the new revision", Duration::from_secs(30), || {
        let s = c.cp.jsonpath(
            &["sts", "par"],
            "{.status.updateRevision} {.status.currentRevision}",
        );
        let (u, cur) = s.split_once(' ').unwrap_or_default();
        (!u.is_empty() && u != cur).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        [env("par-0"), env("par-1"), env("par-2")],
        ["one", "one", "one"].map(String::from)
    );
    c.cp.kubectl_ok(&["delete", "pod", "par-1", "--wait=false"]);
    wait_for("par-1 at the new revision", Duration::from_secs(60), || {
        (env("par-1") == "two").then_some(())
    });
    running(&c, "app=par", 3);
    assert_eq!(
        [env("par-0"), env("par-2")],
        ["one", "one"].map(String::from)
    );
    assert_eq!(
        c.cp.jsonpath(&["sts", "par"], "{.status.updatedReplicas}"),
        "1"
    );
}

#[test]
fn finished_pods_give_their_addresses_back_so_a_small_node_runs_a_long_job() {
    // A /29: five addresses for pods. The Job's eight finished pods are
    // kept, as Jobs keep them; each gives its address back when it ends.
    let c = OneNode::start("172.31.21.2", "10.244.16.0/29");
    c.cp.apply(&job(
        "many",
        "  completions: 8\n  parallelism: 2\n",
        "Never",
        &c.image,
        "true",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    wait_job(&c, "many", "complete", 120);
    let ips = c.cp.jsonpath(
        &["pods", "-l", "job-name=many"],
        r#"{range .items[*]}{.status.phase}={.status.podIP}{"\n"}{end}"#,
    );
    let done: Vec<&str> = ips
        .lines()
        .filter(|l| l.starts_with("Succeeded=10.244.16."))
        .collect();
    assert_eq!(done.len(), 8, "{ips}");
}
