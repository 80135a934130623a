//! The ingress role on real nodes: Ingresses routed by host and by path
//! to real pods (containerd and runc), straight to their ready endpoints;
//! over HTTPS by SNI to clients outside the cluster, with WebSockets, h2c
//! backends, certificate rotation, a rolling update and bad input.

use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_tests::cluster::Cluster;
use skiff_tests::netns::Netns;
use skiff_tests::node::OneNode;
use skiff_tests::overlay::attach;
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

/// The cluster's default IngressClass, served by the ingress role.
const CLASS: &str = r#"apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: skiff
  annotations: {ingressclass.kubernetes.io/is-default-class: "true"}
spec: {controller: skiff.io/ingress}
---
"#;

const INGRESSES: &str = r#"apiVersion: networking.k8s.io/v1
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
    c.cp.apply(&format!("{CLASS}{INGRESSES}"))
        .unwrap_or_else(|e| panic!("{e}"));
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

/// A CA, and certificates it signs for one host each.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("a key: {e}"));
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = p
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("the CA {name}: {e}"));
        Self {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    /// The certificate and key for `host`, in PEM files under `dir`.
    fn leaf(&self, dir: &Path, host: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("a key: {e}"));
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .and_then(|p| p.signed_by(&key, &self.issuer))
            .unwrap_or_else(|e| panic!("a certificate for {host}: {e}"));
        let name = skiff_tests::unique(host);
        let (crt, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&crt, cert.pem()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&k, key.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
        (crt, k)
    }

    fn file(&self, dir: &Path, name: &str) -> PathBuf {
        let f = dir.join(format!("{name}.pem"));
        std::fs::write(&f, &self.pem).unwrap_or_else(|e| panic!("{e}"));
        f
    }
}

/// A Deployment of `replicas` busybox httpd pods answering
/// `<name> <pod>` at `/` and `/<name>/`, and after 4 s at
/// `/cgi-bin/slow`; a pod leaves its Service 3 s before it stops. And its
/// Service on port 80.
fn web(name: &str, image: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      terminationGracePeriodSeconds: 10
      containers:
      - name: httpd
        image: {image}
        command: ["sh", "-c", "mkdir -p /www/{name} /www/cgi-bin && echo {name} $(hostname) > /www/index.html && cp /www/index.html /www/{name}/index.html && printf '#!/bin/sh\nsleep 4\necho Content-Type: text/plain\necho\necho slow done\n' > /www/cgi-bin/slow && chmod +x /www/cgi-bin/slow && exec httpd -f -p 80 -h /www"]
        ports: [{{name: http, containerPort: 80}}]
        lifecycle:
          preStop:
            exec: {{command: ["sleep", "3"]}}
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
  ports: [{{name: http, port: 80, targetPort: http}}]
"#
    )
}

/// One pod of the probe image running `args`, and its Service on port
/// 8080 (`app_protocol` set when given).
fn probe_app(name: &str, image: &str, args: &str, app_protocol: Option<&str>) -> String {
    let proto = app_protocol.map_or(String::new(), |p| format!(", appProtocol: {p}"));
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: probe
    image: {image}
    args: [{args}]
    ports: [{{containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  selector: {{app: {name}}}
  ports: [{{port: 8080, targetPort: 8080{proto}}}]
"#
    )
}

const CLUSTER_INGRESSES: &str = r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: by-host}
spec:
  tls:
  - {hosts: [apple.example], secretName: apple-tls}
  - {hosts: [banana.example], secretName: banana-tls}
  rules:
  - host: apple.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: apple, port: {name: http}}}}]
  - host: banana.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: banana, port: {number: 80}}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: by-path}
spec:
  rules:
  - host: shop.example
    http:
      paths:
      - {path: /apple, pathType: Prefix, backend: {service: {name: apple, port: {number: 80}}}}
      - {path: /banana, pathType: Prefix, backend: {service: {name: banana, port: {number: 80}}}}
      - {path: /ws, pathType: Exact, backend: {service: {name: echo, port: {number: 8080}}}}
      - {path: /h2, pathType: Exact, backend: {service: {name: h2, port: {number: 8080}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: slow
  annotations: {ingress.skiff.io/proxy-read-timeout: "2"}
spec:
  rules:
  - host: slow.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: apple, port: {number: 80}}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: no-secret}
spec:
  tls: [{hosts: [lost.example], secretName: never-made}]
  rules:
  - host: lost.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: banana, port: {number: 80}}}}]
"#;

/// `curl` from `ns` with `args`: the body, then the status code on a line
/// of its own (000 when no answer came).
fn curl(ns: &Netns, args: &[&str]) -> String {
    curl_out(ns, "", args)
}

/// As [`curl`], with `more` written after the status code (curl's
/// `--write-out` variables).
fn curl_out(ns: &Netns, more: &str, args: &[&str]) -> String {
    let out = format!("\n%{{http_code}}{more}");
    let mut cmd = vec!["curl", "-s", "-m", "10", "-w", &out];
    cmd.extend_from_slice(args);
    Spawn::new(cmd[0])
        .args(&cmd[1..])
        .netns(ns)
        .try_output()
        .unwrap_or_else(|e| e)
}

/// An HTTPS request for `host` from `ns`, sent to node address `ip`,
/// trusting `ca` alone: the body, then the HTTP version and status code.
fn https(ns: &Netns, ip: &str, host: &str, path: &str, ca: &Path) -> String {
    let ca = ca.display().to_string();
    curl_out(
        ns,
        " %{http_version}",
        &[
            "--http2",
            "--cacert",
            &ca,
            "--resolve",
            &format!("{host}:443:{ip}"),
            &format!("https://{host}{path}"),
        ],
    )
}

#[test]
fn a_cluster_serves_ingresses_over_http_and_https_to_clients_outside_it() {
    let mut c = Cluster::start(2);
    let ips: Vec<String> = c.nodes.iter().map(|n| n.ip.clone()).collect();
    // The ingress role on both nodes, on their underlay addresses.
    for n in &mut c.nodes {
        n.set_roles("kubelet,proxy,overlay,dns,ingress");
        n.extra_args = [
            "--ingress-http-address",
            &format!("{}:80", n.ip),
            "--ingress-https-address",
            &format!("{}:443", n.ip),
        ]
        .map(String::from)
        .to_vec();
        if let Some(mut a) = n.agent.take() {
            a.terminate();
        }
        n.start_agent();
    }
    let dir = skiff_tests::TempDir::new();
    let (ca1, ca2) = (Ca::new("ingress test CA 1"), Ca::new("ingress test CA 2"));
    let (ca1_file, ca2_file) = (ca1.file(&dir.path, "ca1"), ca2.file(&dir.path, "ca2"));
    for host in ["apple", "banana"] {
        let (crt, key) = ca1.leaf(&dir.path, &format!("{host}.example"));
        c.cp.kubectl_ok(&[
            "create",
            "secret",
            "tls",
            &format!("{host}-tls"),
            "--cert",
            &crt.display().to_string(),
            "--key",
            &key.display().to_string(),
        ]);
    }
    for app in [
        web("apple", &c.busybox, 2),
        web("banana", &c.busybox, 1),
        probe_app("echo", &c.probe, "ws-echo, 0.0.0.0:8080, echo", None),
        probe_app(
            "h2",
            &c.probe,
            "serve-h2c, 0.0.0.0:8080, h2",
            Some("kubernetes.io/h2c"),
        ),
    ] {
        c.cp.apply(&app).unwrap_or_else(|e| panic!("{e}"));
    }
    c.cp.apply(&format!("{CLASS}{CLUSTER_INGRESSES}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let apples = c.ready_pods("app=apple", 2);
    c.ready_pods("app=banana", 1);
    c.ready_pods("app=echo", 1);
    c.ready_pods("app=h2", 1);

    let (client, _) = attach(&c.underlay, 9);
    // Slowloris: a client that sends half its headers is let go (after
    // 10 s), while the others are served meanwhile.
    let slowloris = Spawn::new("bash")
        .args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/80; printf 'GET / HTTP/1.1\\r\\nHost: shop.example\\r\\n' >&3; \
                 s=$(date +%s); timeout 30 cat <&3 >/dev/null; echo closed after $(( $(date +%s) - s )) s",
                ips[0]
            ),
        ])
        .netns(&client)
        .log_to(&dir.path.join("slowloris.log"))
        .start();

    // By path, on either node, from outside the cluster.
    for ip in &ips {
        wait_for(
            &format!("shop.example on {ip}"),
            Duration::from_secs(30),
            || {
                let out = curl(
                    &client,
                    &["-H", "Host: shop.example", &format!("http://{ip}/apple/")],
                );
                (out.starts_with("apple ") && out.ends_with("\n200")).then_some(())
            },
        );
        let out = curl(
            &client,
            &["-H", "Host: shop.example", &format!("http://{ip}/banana/")],
        );
        assert!(
            out.starts_with("banana ") && out.ends_with("\n200"),
            "{out}"
        );
    }
    // By host over HTTPS, each certificate chosen by SNI and verified
    // against the CA, in HTTP/2 by ALPN.
    for (ip, host) in [(&ips[0], "apple"), (&ips[1], "banana")] {
        let out = wait_for(
            &format!("{host} over HTTPS"),
            Duration::from_secs(30),
            || {
                let out = https(&client, ip, &format!("{host}.example"), "/", &ca1_file);
                out.ends_with(" 2").then_some(out)
            },
        );
        assert!(
            out.starts_with(&format!("{host} ")) && out.ends_with("\n200 2"),
            "{out}"
        );
    }
    // Plain HTTP to a TLS host is sent to HTTPS.
    let out = curl_out(
        &client,
        " %{redirect_url}",
        &[
            "-H",
            "Host: apple.example",
            &format!("http://{}/x?y=1", ips[0]),
        ],
    );
    assert!(out.ends_with("\n308 https://apple.example/x?y=1"), "{out}");
    // A Secret that does not exist: the node's own certificate (not
    // trusted), and a Warning Event.
    let out = https(&client, &ips[0], "lost.example", "/", &ca1_file);
    assert!(
        out.contains("\n000 "),
        "the CA does not sign the node's own: {out}"
    );
    let out = curl(
        &client,
        &[
            "-k",
            "--resolve",
            &format!("lost.example:443:{}", ips[0]),
            "https://lost.example/",
        ],
    );
    assert!(
        out.starts_with("banana ") && out.ends_with("\n200"),
        "{out}"
    );
    wait_for("the SecretNotFound Event", Duration::from_secs(20), || {
        let ev = c.cp.kubectl_ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=no-secret",
            "-o",
            "jsonpath={.items[*].reason} {.items[*].message}",
        ]);
        (ev.contains("SecretNotFound") && ev.contains("secret default/never-made not found"))
            .then_some(())
    });

    // A WebSocket echo through the Ingress.
    let p = skiff_tests::bin("skiff-probe");
    let ws = client.exec(&[
        p.to_str().unwrap_or_default(),
        "ws",
        &format!("{}:80", ips[1]),
        "ws://shop.example/ws",
        "3",
    ]);
    let ws: serde_json::Value =
        serde_json::from_str(ws.trim()).unwrap_or_else(|e| panic!("{e}: {ws}"));
    assert_eq!(ws["status"], 101, "{ws}");
    assert_eq!(
        ws["echoes"],
        serde_json::json!(["echo: m0", "echo: m1", "echo: m2"])
    );
    // An h2c backend is spoken to in HTTP/2.
    let out = curl(
        &client,
        &["-H", "Host: shop.example", &format!("http://{}/h2", ips[0])],
    );
    assert_eq!(out, "h2 HTTP/2.0\n\n200");
    // The route's read timeout: 504 after 2 s, not the endpoint's 4.
    let started = std::time::Instant::now();
    let out = curl(
        &client,
        &[
            "-H",
            "Host: slow.example",
            &format!("http://{}/cgi-bin/slow", ips[0]),
        ],
    );
    assert!(
        out.contains("did not answer within 2 s") && out.ends_with("\n504"),
        "{out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // Bad input: a request that is not HTTP gets 400, headers of 100 KB
    // get 431, and the node keeps serving.
    let raw = Spawn::new("bash")
        .args(["-c", &format!("exec 3<>/dev/tcp/{}/80; printf 'NOT HTTP AT ALL\\r\\n\\r\\n' >&3; timeout 5 head -c 12 <&3", ips[0])])
        .netns(&client)
        .try_output()
        .unwrap_or_else(|e| e);
    assert_eq!(raw, "HTTP/1.1 400", "{raw}");
    let huge = format!("X-Big: {}", "a".repeat(100 * 1024));
    let out = curl(
        &client,
        &[
            "-H",
            "Host: shop.example",
            "-H",
            &huge,
            &format!("http://{}/apple/", ips[0]),
        ],
    );
    assert!(out.ends_with("\n431"), "{out}");
    // Each Ingress served lists both nodes.
    for ing in ["by-host", "by-path"] {
        wait_for(
            &format!("{ing}'s addresses"),
            Duration::from_secs(20),
            || {
                let mut got: Vec<String> =
                    c.cp.jsonpath(&["ingress", ing], "{.status.loadBalancer.ingress[*].ip}")
                        .split_whitespace()
                        .map(String::from)
                        .collect();
                got.sort();
                let mut want = ips.clone();
                want.sort();
                (got == want).then_some(())
            },
        );
    }

    // A certificate rotated in its Secret is served within seconds, while
    // a request already under way on the old one finishes.
    let under_way = Spawn::new("curl")
        .args([
            "-s",
            "-m",
            "20",
            "--cacert",
            &ca1_file.display().to_string(),
            "--resolve",
            &format!("apple.example:443:{}", ips[0]),
            "-w",
            "\n%{http_code}",
            "https://apple.example/cgi-bin/slow",
        ])
        .netns(&client)
        .log_to(&dir.path.join("under-way.log"))
        .start();
    std::thread::sleep(Duration::from_millis(500));
    let (crt, key) = ca2.leaf(&dir.path, "apple.example");
    let yaml = c.cp.kubectl_ok(&[
        "create",
        "secret",
        "tls",
        "apple-tls",
        "--cert",
        &crt.display().to_string(),
        "--key",
        &key.display().to_string(),
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    let rotated = std::time::Instant::now();
    c.cp.apply(&yaml).unwrap_or_else(|e| panic!("{e}"));
    for ip in &ips {
        wait_for(
            &format!("the new certificate on {ip}"),
            Duration::from_secs(10),
            || {
                https(&client, ip, "apple.example", "/", &ca2_file)
                    .ends_with("\n200 2")
                    .then_some(())
            },
        );
    }
    eprintln!("rotated certificate served after {:?}", rotated.elapsed());
    let out = https(&client, &ips[0], "apple.example", "/", &ca1_file);
    assert!(
        out.contains("\n000 "),
        "the old certificate is no longer served: {out}"
    );
    let mut under_way = under_way;
    let (_, _) = under_way.finish();
    let log = std::fs::read_to_string(dir.path.join("under-way.log")).unwrap_or_default();
    assert_eq!(log, "slow done\n\n200", "the request under way finished");

    // A rolling update of a backend under continuous requests through the
    // Ingress, over both nodes: no request fails.
    let next = c.registry.push(&c.underlay, "busybox", "busybox:next");
    let load = Spawn::new("bash")
        .args([
            "-c",
            &format!(
                "while :; do for ip in {} {}; do out=$(curl -s -m 5 -H 'Host: shop.example' -w ' %{{http_code}}' http://$ip/apple/); echo $out; done; done",
                ips[0], ips[1]
            ),
        ])
        .netns(&client)
        .log_to(&dir.path.join("load.log"))
        .start();
    let lines = || {
        std::fs::read_to_string(dir.path.join("load.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    wait_for("the load to flow", Duration::from_secs(20), || {
        (lines().len() >= 20).then_some(())
    });
    c.cp.kubectl_ok(&["set", "image", "deployment/apple", &format!("httpd={next}")]);
    c.cp.kubectl_ok(&["rollout", "status", "deployment/apple", "--timeout=180s"]);
    let new = c.ready_pods("app=apple", 2);
    assert!(
        new.keys().all(|n| !apples.contains_key(n)),
        "replaced: {apples:?} -> {new:?}"
    );
    wait_for(
        "requests to reach the new pods",
        Duration::from_secs(20),
        || {
            let seen = lines()
                .iter()
                .filter(|l| new.keys().any(|n| l.starts_with(&format!("apple {n} "))))
                .count();
            (seen >= 10).then_some(())
        },
    );
    let mut load = load;
    load.terminate();
    let all = lines();
    // Each line `apple <pod> 200`; the last may have been cut by the stop.
    let failed: Vec<&String> = all[..all.len() - 1]
        .iter()
        .filter(|l| !(l.starts_with("apple ") && l.ends_with(" 200") && l.split(' ').count() == 3))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        all.len(),
        &failed[..failed.len().min(10)]
    );
    assert!(
        all.len() > 50,
        "the load ran through the roll: {}",
        all.len()
    );

    let mut slowloris = slowloris;
    let (_, _) = slowloris.finish();
    let log = std::fs::read_to_string(dir.path.join("slowloris.log")).unwrap_or_default();
    let secs: u64 = log
        .trim()
        .strip_prefix("closed after ")
        .and_then(|s| s.strip_suffix(" s"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        (9..=12).contains(&secs),
        "the half-sent request was let go after {secs} s"
    );
}
