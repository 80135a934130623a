"""The Python `kubernetes` client against skiff-control: selectors,
list-then-watch without gaps, 409 on a stale update, 422 naming the field,
and a watch from a compacted revision that gets 410 and recovers by
listing again. Run by tests/tests/control.rs; exits non-zero on failure."""

import json
import os
import subprocess
import sys

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

kubeconfig = sys.argv[1]
config.load_kube_config(config_file=kubeconfig)
v1 = client.CoreV1Api()
NS = "default"


def expect_status(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ApiException as e:
        assert e.status == code, f"wanted {code}, got {e.status}: {e.body}"
        return e
    raise AssertionError(f"wanted {code}, the call succeeded")


for i in range(3):
    meta = client.V1ObjectMeta(name=f"py-{i}", labels={"app": "py", "n": str(i)})
    v1.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=meta, data={"k": str(i)}))

listed = v1.list_namespaced_config_map(NS, label_selector="app=py")
assert sorted(c.metadata.name for c in listed.items) == ["py-0", "py-1", "py-2"], listed
picked = v1.list_namespaced_config_map(NS, label_selector="n in (0,2)")
assert sorted(c.metadata.name for c in picked.items) == ["py-0", "py-2"]
by_name = v1.list_namespaced_config_map(NS, field_selector="metadata.name=py-1")
assert [c.metadata.name for c in by_name.items] == ["py-1"]
rv = listed.metadata.resource_version

# list-then-watch: a change made after the list arrives on the watch.
v1.patch_namespaced_config_map("py-1", NS, {"data": {"k": "changed"}})
seen = []
w = watch.Watch()
for ev in w.stream(v1.list_namespaced_config_map, NS, resource_version=rv, label_selector="app=py", timeout_seconds=10):
    seen.append((ev["type"], ev["object"].metadata.name))
    if ("MODIFIED", "py-1") in seen:
        w.stop()
assert seen == [("MODIFIED", "py-1")], seen

# Optimistic concurrency.
cm = v1.read_namespaced_config_map("py-0", NS)
v1.patch_namespaced_config_map("py-0", NS, {"data": {"k": "moved-on"}})
cm.data = {"k": "stale"}
expect_status(409, v1.replace_namespaced_config_map, "py-0", NS, cm)
assert v1.read_namespaced_config_map("py-0", NS).data == {"k": "moved-on"}

# Validation names the field.
bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"}, "spec": {"ports": [{"port": 70000}]}}
e = expect_status(422, v1.create_namespaced_service, NS, bad)
assert "spec.ports[0].port" in json.loads(e.body)["details"]["causes"][0]["field"], e.body
expect_status(404, v1.read_namespaced_config_map, "missing", NS)

# A watch from before a compaction gets 410 Gone ...
old_rv = rv
for i in range(3):
    v1.patch_namespaced_config_map("py-2", NS, {"data": {"k": str(i)}})
# The endpoint and the admin certificate come in ETCDCTL_* variables.
env = dict(os.environ, ETCDCTL_API="3")
status = subprocess.run(["etcdctl", "endpoint", "status", "-w", "json"], env=env, check=True, capture_output=True, text=True)
revision = json.loads(status.stdout)[0]["Status"]["header"]["revision"]
subprocess.run(["etcdctl", "compact", str(revision)], env=env, check=True, capture_output=True)
try:
    for ev in watch.Watch().stream(v1.list_namespaced_config_map, NS, resource_version=old_rv, timeout_seconds=10):
        raise AssertionError(f"an event from a compacted revision: {ev['type']}")
    raise AssertionError("the watch ended without 410")
except ApiException as e:
    assert e.status == 410, e

# ... and the client recovers by listing again and watching from there.
fresh = v1.list_namespaced_config_map(NS, label_selector="app=py")
v1.delete_namespaced_config_map("py-2", NS)
seen = []
w = watch.Watch()
for ev in w.stream(v1.list_namespaced_config_map, NS, resource_version=fresh.metadata.resource_version, label_selector="app=py", timeout_seconds=10):
    seen.append((ev["type"], ev["object"].metadata.name))
    if ev["type"] == "DELETED":
        w.stop()
assert seen == [("DELETED", "py-2")], seen

# A list bigger than one storage page (500 keys) is one consistent list.
for i in range(620):
    meta = client.V1ObjectMeta(name=f"bulk-{i}", labels={"bulk": "yes"})
    v1.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=meta, data={"i": str(i)}))
bulk = v1.list_namespaced_config_map(NS, label_selector="bulk=yes")
assert len(bulk.items) == 620 and len({c.metadata.name for c in bulk.items}) == 620, len(bulk.items)
v1.delete_collection_namespaced_config_map(NS, label_selector="bulk=yes")
assert v1.list_namespaced_config_map(NS, label_selector="bulk=yes").items == []

# Typed deletes parse what comes back, as upstream's registries answer:
# the deleted object for pods and services, a Status for the rest.
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "py-pod"},
       "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
v1.create_namespaced_pod(NS, pod)
gone = v1.delete_namespaced_pod("py-pod", NS)
assert isinstance(gone, client.V1Pod) and gone.metadata.name == "py-pod", gone
svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "py-svc"},
       "spec": {"ports": [{"port": 80}]}}
v1.create_namespaced_service(NS, svc)
gone = v1.delete_namespaced_service("py-svc", NS)
assert isinstance(gone, client.V1Service) and gone.spec.ports[0].port == 80, gone
gone = v1.delete_namespaced_config_map("py-0", NS)
gone = gone if isinstance(gone, dict) else gone.to_dict()
assert gone["kind"] == "Status" and gone["status"] == "Success", gone
assert gone["details"]["name"] == "py-0" and gone["details"]["kind"] == "configmaps", gone

# Error bodies are byte for byte what upstream writes: Status fields in
# Go's order, then a newline (the client's own e2e suite compares text).
e = expect_status(409, v1.create_namespaced_config_map, NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="py-1")))
want = ('{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
        '"message":"configmaps \\"py-1\\" already exists","reason":"AlreadyExists",'
        '"details":{"name":"py-1","kind":"configmaps"},"code":409}\n')
assert e.body == want, repr(e.body)

apps = client.AppsV1Api()
assert any(r.name == "deployments" for r in apps.get_api_resources().resources)
print("ok: all checks passed")
