//! Who may talk to the apiserver and what they may do: credentials (admin
//! token, bootstrap tokens, node client certificates, ServiceAccount
//! tokens) and authorization (the Node authorizer, RBAC), through the real
//! kubectl and curl. The nodes of the kubelet and cluster tests join with
//! `skiff-agent join`, so the whole join path runs there too.

use std::time::Duration;

use base64::Engine as _;
use skiff_tests::control::{ControlPlane, Credential};
use skiff_tests::wait_for;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// HTTP status code of a GET of `path` with curl's extra `args`.
fn code(cp: &ControlPlane, token: Option<&str>, path: &str, args: &[&str]) -> String {
    let url = format!("{}{path}", cp.server);
    let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    all.extend(args);
    all.push(&url);
    cp.curl(token, &all).unwrap_or_else(|e| panic!("{e}"))
}

fn json_get(cp: &ControlPlane, token: Option<&str>, path: &str) -> serde_json::Value {
    let out = cp
        .curl(token, &[&format!("{}{path}", cp.server)])
        .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A new bootstrap token from `skiff-control token create`.
fn bootstrap_token(cp: &ControlPlane, ttl: &str) -> String {
    let dir = cp.dir.path.display().to_string();
    cp.control(&["token", "create", "--data-dir", &dir, "--ttl", ttl])
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_string()
}

/// A key and a PEM certificate request for `cn` in `orgs`.
fn request(cn: &str, orgs: &[&str]) -> (rcgen::KeyPair, String) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    for o in orgs {
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, *o);
    }
    let key = rcgen::KeyPair::generate().expect("key");
    let pem = p.serialize_request(&key).expect("csr").pem().expect("pem");
    (key, pem)
}

fn csr_yaml(name: &str, pem: &str) -> String {
    format!(
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata: {{name: {name}}}\nspec:\n  request: {}\n  signerName: kubernetes.io/kube-apiserver-client-kubelet\n  usages: [digital signature, client auth]\n",
        b64(pem)
    )
}

fn write(cp: &ControlPlane, name: &str, text: &str) -> String {
    let path = cp.dir.path.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path.display().to_string()
}

#[test]
fn credentials_are_checked_and_the_anonymous_get_403() {
    let cp = ControlPlane::start(&[]);
    let admin = cp.token();

    // No credential: anonymous, which may read the version and nothing else.
    assert_eq!(code(&cp, None, "/version", &[]), "200");
    let denied = json_get(&cp, None, "/api/v1/namespaces");
    assert_eq!(denied["code"], 403, "{denied}");
    assert_eq!(denied["reason"], "Forbidden");
    assert_eq!(
        denied["message"],
        "namespaces is forbidden: User \"system:anonymous\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
    );
    assert_eq!(code(&cp, None, "/api", &[]), "403");

    // A credential that does not check out is a 401, never anonymous.
    let bad = json_get(&cp, Some("wrong"), "/api/v1/pods");
    assert_eq!(
        (bad["kind"].as_str(), bad["code"].as_i64()),
        (Some("Status"), Some(401)),
        "{bad}"
    );
    let err = cp
        .kubectl(&["--token=wrong", "get", "pods"])
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("Unauthorized") || err.contains("must be logged in"),
        "{err}"
    );

    // A client certificate from another CA.
    let other_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "skiff-ca");
    let other_ca = ca.self_signed(&other_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca, &other_key);
    let mut client = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    client
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    client
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:masters");
    let client_key = rcgen::KeyPair::generate().expect("key");
    let client_cert = client.signed_by(&client_key, &issuer).expect("cert");
    drop(other_ca);
    let cert_file = write(&cp, "foreign.crt", &client_cert.pem());
    let key_file = write(&cp, "foreign.key", &client_key.serialize_pem());
    let foreign = json_get_with(
        &cp,
        "/api/v1/namespaces",
        &["--cert", &cert_file, "--key", &key_file],
    );
    assert_eq!(
        foreign["code"], 401,
        "a certificate from another CA: {foreign}"
    );

    // Bootstrap tokens: valid until they expire or are deleted.
    let short = bootstrap_token(&cp, "2s");
    let csrs = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
    assert_eq!(
        code(&cp, Some(&short), csrs, &[]),
        "200",
        "a bootstrap token may list CSRs"
    );
    assert_eq!(
        code(&cp, Some(&short), "/api/v1/secrets", &[]),
        "403",
        "and nothing more"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        code(&cp, Some(&short), csrs, &[]),
        "401",
        "an expired bootstrap token"
    );
    let kept = bootstrap_token(&cp, "1h");
    assert_eq!(code(&cp, Some(&kept), csrs, &[]), "200");
    let dir = cp.dir.path.display().to_string();
    let listed = cp
        .control(&["token", "list", "--data-dir", &dir])
        .unwrap_or_else(|e| panic!("{e}"));
    let id = kept.split('.').next().unwrap_or_default();
    assert!(listed.contains(id), "{listed}");
    cp.control(&["token", "delete", "--data-dir", &dir, id])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        code(&cp, Some(&kept), csrs, &[]),
        "401",
        "a deleted bootstrap token"
    );
    let err = cp
        .control(&["token", "create", "--data-dir", &dir, "--ttl", "5d"])
        .err()
        .unwrap_or_default();
    assert!(err.contains("--ttl"), "bad input names the flag: {err}");

    // The admin credential still works, and says who it is.
    assert_eq!(code(&cp, Some(&admin), "/api/v1/namespaces", &[]), "200");
    let who = cp.kubectl_ok(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username} {.status.userInfo.groups}",
    ]);
    assert!(
        who.starts_with("admin ") && who.contains("system:masters"),
        "{who}"
    );
}

fn json_get_with(cp: &ControlPlane, path: &str, args: &[&str]) -> serde_json::Value {
    let mut all: Vec<&str> = args.to_vec();
    let url = format!("{}{path}", cp.server);
    all.push(&url);
    let out = cp.curl(None, &all).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Asks for a node client certificate with a bootstrap token, as
/// `skiff-agent join` does: the CSR is approved and signed without anyone.
fn node_credential(cp: &ControlPlane, node: &str) -> std::path::PathBuf {
    let token = bootstrap_token(cp, "1h");
    let joiner = cp.kubeconfig_as(&format!("joiner-{node}"), Credential::Token(&token));
    let (key, pem) = request(&format!("system:node:{node}"), &["system:nodes"]);
    let name = format!("csr-{node}");
    let file = write(cp, &format!("{name}.yaml"), &csr_yaml(&name, &pem));
    cp.kubectl_with(&joiner, &["create", "-f", &file])
        .unwrap_or_else(|e| panic!("{e}"));
    let cert = wait_for("the node certificate", Duration::from_secs(20), || {
        let c = cp.jsonpath(&["csr", &name], "{.status.certificate}");
        (!c.is_empty()).then_some(c)
    });
    let cert = base64::engine::general_purpose::STANDARD
        .decode(cert.trim())
        .expect("base64");
    let cert = String::from_utf8(cert).expect("pem");
    cp.kubeconfig_as(
        node,
        Credential::Cert {
            cert: &cert,
            key: &key.serialize_pem(),
        },
    )
}

#[test]
fn a_node_credential_writes_only_what_is_its_own() {
    let cp = ControlPlane::start(&[]);
    let n1 = node_credential(&cp, "n1");
    let shown = cp.kubectl_ok(&[
        "get",
        "csr",
        "csr-n1",
        "-o",
        "jsonpath={.spec.username} {.status.conditions[0].type} {.status.conditions[0].reason}",
    ]);
    assert!(
        shown.starts_with("system:bootstrap:") && shown.ends_with("Approved AutoApproved"),
        "{shown}"
    );
    let who = cp
        .kubectl_with(
            &n1,
            &[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username} {.status.userInfo.groups}",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        who.starts_with("system:node:n1 ") && who.contains("system:nodes"),
        "{who}"
    );

    // A request for more than a node client is left for a person.
    let token = bootstrap_token(&cp, "1h");
    let joiner = cp.kubeconfig_as("greedy", Credential::Token(&token));
    let (_k, pem) = request("system:node:n9", &["system:nodes", "system:masters"]);
    let file = write(&cp, "greedy.yaml", &csr_yaml("greedy", &pem));
    cp.kubectl_with(&joiner, &["create", "-f", &file])
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(2));
    let table = cp.kubectl_ok(&["get", "csr", "greedy"]);
    assert!(table.contains("Pending"), "{table}");

    let node = |name: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n");
    let f1 = write(&cp, "n1.yaml", &node("n1"));
    cp.kubectl_with(&n1, &["create", "-f", &f1])
        .unwrap_or_else(|e| panic!("its own Node: {e}"));
    cp.kubectl_with(&n1, &["label", "node", "n1", "zone=a"])
        .unwrap_or_else(|e| panic!("{e}"));
    cp.apply(&node("n2")).unwrap_or_else(|e| panic!("{e}"));
    let err = cp
        .kubectl_with(&n1, &["label", "node", "n2", "zone=a"])
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("nodes \"n2\" is forbidden: User \"system:node:n1\" cannot patch resource \"nodes\" in API group \"\" at the cluster scope"),
        "{err}"
    );

    // Pods: read all, write the status of its own, create none.
    let pod = |name: &str, node: &str, cm: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: busybox}}]\n  volumes: [{{name: v, configMap: {{name: {cm}}}}}]\n"
        )
    };
    cp.apply(&pod("p1", "n1", "cm1"))
        .unwrap_or_else(|e| panic!("{e}"));
    cp.apply(&pod("p2", "n2", "cm2"))
        .unwrap_or_else(|e| panic!("{e}"));
    for cm in ["cm1", "cm2"] {
        cp.kubectl_ok(&["create", "configmap", cm, "--from-literal=k=v"]);
    }
    cp.kubectl_with(&n1, &["get", "pods"])
        .unwrap_or_else(|e| panic!("{e}"));
    let status = r#"{"status":{"phase":"Running"}}"#;
    cp.kubectl_with(
        &n1,
        &[
            "patch",
            "pod",
            "p1",
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
        ],
    )
    .unwrap_or_else(|e| panic!("the status of its own pod: {e}"));
    let err = cp
        .kubectl_with(
            &n1,
            &[
                "patch",
                "pod",
                "p2",
                "--subresource=status",
                "--type=merge",
                "-p",
                status,
            ],
        )
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("cannot patch resource \"pods/status\""),
        "{err}"
    );
    let f3 = write(&cp, "p3.yaml", &pod("p3", "n1", "cm1"));
    let err = cp
        .kubectl_with(&n1, &["create", "-f", &f3])
        .err()
        .unwrap_or_default();
    assert!(err.contains("cannot create resource \"pods\""), "{err}");

    // ConfigMaps and Secrets only as its pods use them.
    cp.kubectl_with(&n1, &["get", "configmap", "cm1"])
        .unwrap_or_else(|e| panic!("used by p1 on n1: {e}"));
    let err = cp
        .kubectl_with(&n1, &["get", "configmap", "cm2"])
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("no relationship found between node \\\"n1\\\"")
            || err.contains("no relationship found"),
        "{err}"
    );
    let err = cp
        .kubectl_with(&n1, &["get", "secrets"])
        .err()
        .unwrap_or_default();
    assert!(err.contains("cannot list resource \"secrets\""), "{err}");
    // A Secret an Ingress names for TLS: read, and watched by name (the
    // ingress role), but no other.
    for s in ["site-tls", "other"] {
        cp.kubectl_ok(&["create", "secret", "generic", s, "--from-literal=k=v"]);
    }
    cp.apply(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: site}\nspec:\n  tls: [{hosts: [site.example], secretName: site-tls}]\n  defaultBackend: {service: {name: web, port: {number: 80}}}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The authorizer reads Ingresses from its in-memory mirror of etcd,
    // current a moment after the write.
    wait_for(
        "the Secret named by an Ingress readable",
        Duration::from_secs(5),
        || cp.kubectl_with(&n1, &["get", "secret", "site-tls"]).ok(),
    );
    let pinned = cp
        .kubectl_with(
            &n1,
            &[
                "get",
                "secrets",
                "--field-selector",
                "metadata.name=site-tls",
                "-o",
                "name",
            ],
        )
        .unwrap_or_else(|e| panic!("listed by its name: {e}"));
    assert_eq!(pinned.trim(), "secret/site-tls");
    let err = cp
        .kubectl_with(&n1, &["get", "secret", "other"])
        .err()
        .unwrap_or_default();
    assert!(err.contains("no relationship found"), "{err}");
    let err = cp
        .kubectl_with(
            &n1,
            &["get", "secrets", "--field-selector", "metadata.name=other"],
        )
        .err()
        .unwrap_or_default();
    assert!(err.contains("cannot list resource \"secrets\""), "{err}");

    // Its own Lease; Events.
    let lease = |name: &str| {
        format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{name: {name}, namespace: kube-node-lease}}\nspec: {{holderIdentity: {name}}}\n"
        )
    };
    let fl = write(&cp, "l1.yaml", &lease("n1"));
    cp.kubectl_with(&n1, &["create", "-f", &fl])
        .unwrap_or_else(|e| panic!("its own Lease: {e}"));
    let fl2 = write(&cp, "l2.yaml", &lease("n2"));
    let err = cp
        .kubectl_with(&n1, &["create", "-f", &fl2])
        .err()
        .unwrap_or_default();
    assert!(err.contains("cannot create resource \"leases\""), "{err}");
    let event = "apiVersion: v1\nkind: Event\nmetadata: {name: e1}\ninvolvedObject: {kind: Pod, name: p1, namespace: default}\nreason: Started\nmessage: started\n";
    let fe = write(&cp, "e1.yaml", event);
    cp.kubectl_with(&n1, &["create", "-f", &fe])
        .unwrap_or_else(|e| panic!("an Event: {e}"));
    let err = cp
        .kubectl_with(&n1, &["delete", "namespace", "default"])
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("cannot delete resource \"namespaces\""),
        "{err}"
    );
}

#[test]
fn rbac_grants_what_bindings_say_and_service_account_tokens_follow_their_account() {
    let cp = ControlPlane::start(&[]);
    let defaults = cp.kubectl_ok(&[
        "get",
        "clusterroles",
        "cluster-admin",
        "admin",
        "edit",
        "view",
        "-o",
        "name",
    ]);
    assert_eq!(defaults.lines().count(), 4, "{defaults}");
    cp.kubectl_ok(&["create", "namespace", "team"]);
    cp.kubectl_ok(&["create", "serviceaccount", "bot", "-n", "team"]);
    cp.kubectl_ok(&[
        "create",
        "role",
        "pod-reader",
        "--verb=get,list,watch",
        "--resource=pods",
        "-n",
        "team",
    ]);
    cp.kubectl_ok(&[
        "create",
        "rolebinding",
        "bot-reads",
        "--role=pod-reader",
        "--serviceaccount=team:bot",
        "-n",
        "team",
    ]);
    let bot = "system:serviceaccount:team:bot";
    let can = |args: &[&str]| -> String {
        let mut all = vec!["auth", "can-i"];
        all.extend(args);
        // can-i exits 1 for "no".
        match cp.kubectl(&all) {
            Ok(out) => out.trim().to_string(),
            Err(e) => e.lines().last().unwrap_or_default().trim().to_string(),
        }
    };
    wait_for(
        "the binding to take effect",
        Duration::from_secs(10),
        || (can(&["list", "pods", "-n", "team", "--as", bot]) == "yes").then_some(()),
    );
    assert!(can(&["delete", "pods", "-n", "team", "--as", bot]).ends_with("no"));
    assert!(can(&["list", "pods", "-n", "default", "--as", bot]).ends_with("no"));

    // Its token works as the binding says.
    let token = cp
        .kubectl_ok(&["create", "token", "bot", "-n", "team"])
        .trim()
        .to_string();
    let as_bot = cp.kubeconfig_as("bot", Credential::Token(&token));
    cp.kubectl_with(&as_bot, &["get", "pods", "-n", "team"])
        .unwrap_or_else(|e| panic!("{e}"));
    let err = cp
        .kubectl_with(&as_bot, &["get", "pods", "-n", "default"])
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("pods is forbidden: User \"system:serviceaccount:team:bot\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""),
        "{err}"
    );
    let who = cp
        .kubectl_with(
            &as_bot,
            &[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(who, bot);
    let listed = cp
        .kubectl_with(&as_bot, &["auth", "can-i", "--list", "-n", "team"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("pods ") && l.contains("[get list watch]")),
        "{listed}"
    );

    // The default view role: workloads but not Secrets.
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "bot-views",
        "--clusterrole=view",
        "--serviceaccount=team:bot",
    ]);
    wait_for("view", Duration::from_secs(10), || {
        cp.kubectl_with(&as_bot, &["get", "deployments", "-n", "default"])
            .ok()
    });
    assert!(can(&["get", "secrets", "-n", "default", "--as", bot]).ends_with("no"));
    assert_eq!(
        can(&["get", "configmaps", "-n", "kube-system", "--as", bot]),
        "yes"
    );
    cp.kubectl_ok(&["delete", "clusterrolebinding", "bot-views"]);
    wait_for("the grant to go", Duration::from_secs(10), || {
        cp.kubectl_with(&as_bot, &["get", "deployments", "-n", "default"])
            .err()
    });

    // A token bound to a pod ends with the pod; every token with the account.
    cp.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: holder, namespace: team}\nspec:\n  serviceAccountName: bot\n  containers: [{name: c, image: busybox}]\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let bound = cp
        .kubectl_ok(&[
            "create",
            "token",
            "bot",
            "-n",
            "team",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "holder",
        ])
        .trim()
        .to_string();
    let pods = "/api/v1/namespaces/team/pods";
    assert_eq!(code(&cp, Some(&bound), pods, &[]), "200");
    cp.kubectl_ok(&[
        "delete",
        "pod",
        "holder",
        "-n",
        "team",
        "--grace-period=0",
        "--force",
    ]);
    assert_eq!(
        code(&cp, Some(&bound), pods, &[]),
        "401",
        "the pod it was bound to is gone"
    );
    assert_eq!(code(&cp, Some(&token), pods, &[]), "200");
    cp.kubectl_ok(&["delete", "serviceaccount", "bot", "-n", "team"]);
    assert_eq!(
        code(&cp, Some(&token), pods, &[]),
        "401",
        "its account is gone"
    );
    cp.kubectl_ok(&["create", "serviceaccount", "bot", "-n", "team"]);
    assert_eq!(
        code(&cp, Some(&token), pods, &[]),
        "401",
        "a new account of the same name is not the old one"
    );

    // Bad input.
    let err = cp
        .kubectl(&["create", "token", "bot", "-n", "team", "--duration=60s"])
        .err()
        .unwrap_or_default();
    assert!(err.contains("spec.expirationSeconds"), "{err}");
    let err = cp
        .kubectl(&["create", "token", "nobody", "-n", "team"])
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("serviceaccounts \"nobody\" not found"),
        "{err}"
    );
    let err = cp
        .apply("apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: b, namespace: team}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: Secret, name: x}\nsubjects: [{kind: User, name: u}]\n")
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("roleRef.kind: Unsupported value: \"Secret\""),
        "{err}"
    );
}
