//! The ingress role on a real node: Ingresses routed by host and by path
//! to real pods (containerd and runc), straight to their ready endpoints.

use std::time::Duration;

use skiff_tests::node::OneNode;
use skiff_tests::{Spawn, wait_for};

const NODE: &str = "172.31.24.2";

/// A pod answering with `name` at `/`, at `/<name>/`, and the request's
/// headers as the CGI environment at `/cgi-bin/env`; and its Service.
fn app(name: &str, image: &str, service_port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: {image}
    command: ["sh", "-c", "mkdir -p /www/{name} /www/cgi-bin && echo {name} > /www/index.html && echo {name} > /www/{name}/index.html && printf '#!/bin/sh\necho Content-Type: text/plain\necho\nenv\n' > /www/cgi-bin/env && chmod +x /www/cgi-bin/env && exec httpd -f -p 80 -h /www"]
    ports: [{{name: http, containerPort: 80}}]
    readinessProbe:
      httpGet: {{path: /, port: http}}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: {service_port}, targetPort: http}}]
"#
    )
}

const INGRESSES: &str = r#"apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: skiff
  annotations: {ingressclass.kubernetes.io/is-default-class: "true"}
spec: {controller: skiff.io/ingress}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: by-host}
spec:
  rules:
  - host: apple.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: apple, port: {number: 80}}}}
  - host: "*.banana.example"
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: banana, port: {name: http}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: by-path}
spec:
  ingressClassName: skiff
  rules:
  - host: shop.example
    http:
      paths:
      - {path: /apple, pathType: Prefix, backend: {service: {name: apple, port: {name: http}}}}
      - {path: /banana/, pathType: Exact, backend: {service: {name: banana, port: {number: 8080}}}}
      - {path: /empty, pathType: Prefix, backend: {service: {name: nobody, port: {number: 80}}}}
      - {path: /ghost, pathType: Prefix, backend: {service: {name: ghost, port: {number: 80}}}}
---
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  selector: {app: nobody}
  ports: [{port: 80}]
"#;

/// `curl` from the node's namespace to the ingress port with `host`:
/// the body, then the status code on a line of its own.
fn get(c: &OneNode, host: &str, path: &str) -> String {
    Spawn::new("curl")
        .args([
            "-s",
            "-m",
            "5",
            "-H",
            &format!("Host: {host}"),
            "-w",
            "\n%{http_code}",
            &format!("http://{NODE}{path}"),
        ])
        .netns(&c.ns)
        .try_output()
        .unwrap_or_else(|e| e)
}

#[test]
fn ingresses_route_by_host_and_path_to_ready_endpoints() {
    let mut c = OneNode::start(NODE, "10.244.24.0/24");
    c.node.set_roles("kubelet,ingress");
    c.node.extra_args = vec!["--ingress-http-address".into(), format!("{NODE}:80")];
    if let Some(mut a) = c.node.agent.take() {
        a.terminate();
    }
    c.node.start_agent();
    for (name, port) in [("apple", 80), ("banana", 8080)] {
        c.cp.apply(&app(name, &c.image, port))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    c.cp.apply(INGRESSES).unwrap_or_else(|e| panic!("{e}"));
    for p in ["apple", "banana"] {
        wait_for(&format!("{p} ready"), Duration::from_secs(60), || {
            let s = c.cp.jsonpath(
                &["pod", p],
                "{.status.conditions[?(@.type==\"Ready\")].status}",
            );
            (s == "True").then_some(())
        });
    }

    // By host: exact, and a wildcard of one label; the port by number
    // and by name.
    wait_for("apple by host", Duration::from_secs(30), || {
        (get(&c, "apple.example", "/") == "apple\n\n200").then_some(())
    });
    assert_eq!(get(&c, "a.banana.example:80", "/"), "banana\n\n200");
    assert!(get(&c, "a.b.banana.example", "/").ends_with("\n404"));
    // By path, with the spec's matching: /apple by element, /banana/
    // exactly.
    assert_eq!(get(&c, "shop.example", "/apple/"), "apple\n\n200");
    assert!(get(&c, "shop.example", "/applesauce").ends_with("\n404"));
    assert_eq!(get(&c, "shop.example", "/banana/"), "banana\n\n200");
    assert!(get(&c, "shop.example", "/banana/x").ends_with("\n404"));
    // Failures say which rule and Service.
    let none = get(&c, "other.example", "/");
    assert!(
        none.contains("no Ingress rule takes other.example/") && none.ends_with("\n404"),
        "{none}"
    );
    let empty = get(&c, "shop.example", "/empty");
    assert!(
        empty.contains("service default/nobody (Ingress default/by-path) has no ready endpoint")
            && empty.ends_with("\n503"),
        "{empty}"
    );

    // A Service that does not exist: 503, and a Warning Event on the
    // Ingress that names it.
    let ghost = get(&c, "shop.example", "/ghost");
    assert!(
        ghost.contains("service default/ghost (Ingress default/by-path) does not exist")
            && ghost.ends_with("\n503"),
        "{ghost}"
    );
    wait_for("the Warning Event", Duration::from_secs(10), || {
        let ev = c.cp.kubectl_ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=by-path",
            "-o",
            "jsonpath={.items[*].reason} {.items[*].message}",
        ]);
        (ev.contains("ServiceNotFound") && ev.contains("service default/ghost not found"))
            .then_some(())
    });

    // The forwarding headers, as the pod sees them: the client's address
    // (the node's own here), the scheme and the host asked for.
    let env = get(&c, "apple.example", "/cgi-bin/env");
    for line in [
        format!("HTTP_X_FORWARDED_FOR={NODE}"),
        "HTTP_X_FORWARDED_PROTO=http".to_string(),
        "HTTP_X_FORWARDED_HOST=apple.example".to_string(),
        "HTTP_HOST=apple.example".to_string(),
    ] {
        assert!(env.lines().any(|l| l == line), "{line} in\n{env}");
    }

    // A new rule is served once stored; a pod no longer ready leaves.
    c.cp.kubectl_ok(&[
        "create",
        "ingress",
        "late",
        "--rule=late.example/*=banana:8080",
    ]);
    wait_for("the new rule served", Duration::from_secs(10), || {
        (get(&c, "late.example", "/") == "banana\n\n200").then_some(())
    });
    c.cp.kubectl_ok(&["delete", "pod", "apple", "--wait=false"]);
    wait_for(
        "apple gone from the routes",
        Duration::from_secs(20),
        || {
            get(&c, "apple.example", "/")
                .ends_with("\n503")
                .then_some(())
        },
    );
    let ready = c.node.health("/readyz?verbose");
    assert!(ready.contains("[+]ingress ok\n"), "{ready}");

    // Each Ingress served shows the node's address, as kubectl prints it;
    // it leaves when the role stops.
    for ing in ["by-host", "by-path", "late"] {
        wait_for(&format!("{ing}'s address"), Duration::from_secs(10), || {
            let ips =
                c.cp.jsonpath(&["ingress", ing], "{.status.loadBalancer.ingress[*].ip}");
            (ips == NODE).then_some(())
        });
    }
    let table = c.cp.kubectl_ok(&["get", "ingress", "by-host"]);
    assert!(table.contains("ADDRESS") && table.contains(NODE), "{table}");
    if let Some(mut a) = c.node.agent.take() {
        a.terminate();
    }
    wait_for("the address withdrawn", Duration::from_secs(10), || {
        let ips = c.cp.jsonpath(
            &["ingress", "by-host"],
            "{.status.loadBalancer.ingress[*].ip}",
        );
        ips.is_empty().then_some(())
    });
}
