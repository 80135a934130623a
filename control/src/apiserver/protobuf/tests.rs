//! The decoder against bodies encoded by hand the way client-go's gogo
//! marshaller writes them (non-pointer fields always present, Go's zero
//! time for an unset timestamp).

use serde_json::json;

use super::*;

/// A minimal protobuf writer for building test bodies.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn varint(&mut self, mut v: u64) -> &mut Self {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return self;
            }
            self.0.push(b | 0x80);
        }
    }
    fn key(&mut self, tag: u32, wire: u8) -> &mut Self {
        self.varint((u64::from(tag) << 3) | u64::from(wire))
    }
    fn int(&mut self, tag: u32, v: i64) -> &mut Self {
        self.key(tag, 0).varint(v as u64)
    }
    fn bytes(&mut self, tag: u32, b: &[u8]) -> &mut Self {
        self.key(tag, 2).varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, tag: u32, s: &str) -> &mut Self {
        self.bytes(tag, s.as_bytes())
    }
    fn msg(&mut self, tag: u32, m: &W) -> &mut Self {
        self.bytes(tag, &m.0)
    }
    fn entry(&mut self, tag: u32, k: &str, v: &W) -> &mut Self {
        let mut e = W::default();
        e.str(1, k).msg(2, v);
        self.msg(tag, &e)
    }
    fn str_entry(&mut self, tag: u32, k: &str, v: &str) -> &mut Self {
        let mut e = W::default();
        e.str(1, k).str(2, v);
        self.msg(tag, &e)
    }
}

fn envelope(api_version: &str, kind: &str, raw: &W) -> Vec<u8> {
    let mut tm = W::default();
    tm.str(1, api_version).str(2, kind);
    let mut u = W::default();
    u.msg(1, &tm).msg(2, raw).str(3, "").str(4, "");
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&u.0);
    out
}

fn time(secs: i64) -> W {
    let mut t = W::default();
    t.int(1, secs).int(2, 0);
    t
}

fn meta(name: &str) -> W {
    let mut m = W::default();
    // gogo writes every non-pointer string, empty or not, and the zero
    // creationTimestamp.
    m.str(1, name)
        .str(2, "")
        .str(3, "")
        .str(4, "")
        .str(5, "")
        .str(6, "")
        .int(7, 0)
        .msg(8, &time(GO_ZERO_TIME))
        .str_entry(11, "app", "web");
    m
}

#[test]
fn a_deployment_as_kubectl_create_sends_it() {
    let mut port = W::default();
    port.str(1, "").int(2, 0).int(3, 8080).str(4, "TCP");
    let mut cpu = W::default();
    cpu.str(1, "250m");
    let mut resources = W::default();
    resources.entry(2, "cpu", &cpu);
    let mut container = W::default();
    container
        .str(1, "app")
        .str(2, "busybox")
        .msg(6, &port)
        .msg(8, &resources)
        .str(13, "File");
    let mut pod_spec = W::default();
    pod_spec
        .msg(2, &container)
        .str(3, "Always")
        .int(4, 30)
        .str(10, "");
    let mut tmeta = W::default();
    tmeta.msg(8, &W::default()).str_entry(11, "app", "web");
    let mut template = W::default();
    template.msg(1, &tmeta).msg(2, &pod_spec);
    let mut selector = W::default();
    selector.str_entry(1, "app", "web");
    let mut surge = W::default();
    surge.int(1, 1).int(2, 0).str(3, "25%");
    let mut rolling = W::default();
    rolling.msg(2, &surge);
    let mut strategy = W::default();
    strategy.str(1, "RollingUpdate").msg(2, &rolling);
    let mut spec = W::default();
    spec.int(1, 0)
        .msg(2, &selector)
        .msg(3, &template)
        .msg(4, &strategy)
        .int(5, 0)
        .int(7, 0);
    let mut status = W::default();
    status.int(1, 0).int(2, 0);
    let mut d = W::default();
    d.msg(1, &meta("web")).msg(2, &spec).msg(3, &status);

    let got = decode(&envelope("apps/v1", "Deployment", &d)).expect("decodes");
    assert_eq!(
        got,
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "generation": 0, "labels": {"app": "web"}},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [{
                            "name": "app",
                            "image": "busybox",
                            "ports": [{"hostPort": 0, "containerPort": 8080, "protocol": "TCP"}],
                            "resources": {"requests": {"cpu": "250m"}},
                            "terminationMessagePath": "File",
                        }],
                        "restartPolicy": "Always",
                        "terminationGracePeriodSeconds": 30,
                    },
                },
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%"}},
                "minReadySeconds": 0,
                "paused": false,
            },
            "status": {"observedGeneration": 0, "replicas": 0},
        })
    );
}

#[test]
fn secrets_keep_bytes_as_base64_and_embedded_structs_inline() {
    let mut s = W::default();
    let mut e = W::default();
    e.str(1, "token").bytes(2, b"\x00\xffhi");
    s.msg(1, &meta("creds")).msg(2, &e).str(3, "Opaque");
    let got = decode(&envelope("v1", "Secret", &s)).expect("secret");
    assert_eq!(got["data"], json!({"token": "AP9oaQ=="}));
    assert_eq!(got["type"], "Opaque");

    // Probe embeds ProbeHandler; the handler's fields sit in the probe.
    let mut tcp = W::default();
    let mut port = W::default();
    port.int(1, 0).int(2, 80);
    tcp.msg(1, &port);
    let mut handler = W::default();
    handler.msg(3, &tcp);
    let mut probe = W::default();
    probe.msg(1, &handler).int(2, 5);
    let mut container = W::default();
    container
        .str(1, "c")
        .str(4, "")
        .str(4, "-x")
        .msg(11, &probe);
    let mut spec = W::default();
    spec.msg(2, &container);
    let mut pod = W::default();
    pod.msg(1, &meta("p")).msg(2, &spec);
    let got = decode(&envelope("v1", "Pod", &pod)).expect("pod");
    assert_eq!(got["spec"]["containers"][0]["args"], json!(["", "-x"]));
    assert_eq!(
        got["spec"]["containers"][0]["readinessProbe"],
        json!({"tcpSocket": {"port": 80}, "initialDelaySeconds": 5})
    );
}

#[test]
fn times_durations_and_options_types() {
    let mut ts = W::default();
    ts.int(1, 1_700_000_000).int(2, 123_456_000);
    let mut spec = W::default();
    spec.str(1, "node-a").int(2, 40).msg(3, &ts).msg(4, &ts);
    let mut lease = W::default();
    lease.msg(1, &meta("node-a")).msg(2, &spec);
    let got = decode(&envelope("coordination.k8s.io/v1", "Lease", &lease)).expect("lease");
    assert_eq!(got["spec"]["renewTime"], "2023-11-14T22:13:20.123456Z");
    assert!(got["metadata"].get("creationTimestamp").is_none());

    // DeleteOptions come under the group version of the call.
    let mut opts = W::default();
    opts.int(1, 0).int(3, 0).str(4, "Foreground");
    let got = decode(&envelope("apps/v1", "DeleteOptions", &opts)).expect("options");
    assert_eq!(got["gracePeriodSeconds"], 0);
    assert_eq!(got["propagationPolicy"], "Foreground");

    assert_eq!(go_duration(0), "0s");
    assert_eq!(go_duration(90_000_000_000), "1m30s");
    assert_eq!(go_duration(3_723_500_000_000), "1h2m3.5s");
    assert_eq!(go_duration(250_000_000), "250ms");
}

#[test]
fn unknown_fields_are_skipped_and_bad_bodies_are_errors() {
    let mut cm = W::default();
    cm.msg(1, &meta("cfg"))
        .str_entry(2, "k", "")
        .str(99, "from a newer client");
    let got = decode(&envelope("v1", "ConfigMap", &cm)).expect("configmap");
    assert_eq!(got["data"], json!({"k": ""}));

    assert!(matches!(decode(b"{\"kind\":1}"), Err(DecodeError::Magic)));
    // A string where the schema has a bool names the field.
    let mut opts = W::default();
    opts.str(3, "yes");
    let err = decode(&envelope("v1", "DeleteOptions", &opts)).expect_err("wrong wire type");
    assert!(err.to_string().contains("orphanDependents"), "{err}");
    let mut body = envelope("v1", "ConfigMap", &cm);
    body.truncate(body.len() - 5);
    assert!(matches!(decode(&body), Err(DecodeError::Malformed(_))));
    assert!(matches!(
        decode(&envelope("example.com/v1", "Widget", &W::default())),
        Err(DecodeError::UnknownKind { .. })
    ));
}
