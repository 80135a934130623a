//! The dashboard's figures (part of `bench control`), in a real browser:
//! headless Chromium over WebDriver, in a network namespace of its own
//! with the control plane.
//!
//! - first load: a full navigation to the pods page until the list of
//!   every pod is on the page (the page's `skiff:list:pods` mark, in ms
//!   since the navigation started), beside the bare list request made by
//!   the same page (fetch and JSON parse, nothing drawn): the limit;
//! - live update: a pod created (and later deleted) through the API by
//!   the page itself, until its row shows (or goes), beside the same
//!   event read off a bare watch opened by the same page: the limit.
//!
//! Times are taken by the browser's own clock (`performance.now()`), so
//! the driver's round trips do not count.

use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use skiff_tests::Netns;
use skiff_tests::browser::Browser;
use skiff_tests::control::ControlPlane;

use super::stats::pct;

/// Pods `n` Pending pods (no nodes: only the API's objects matter here),
/// `bench/p-<i>`.
fn pod_list(n: usize) -> String {
    let items: Vec<Value> = (0..n)
        .map(|i| {
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p-{i}"), "namespace": "bench", "labels": {"app": "bench"}},
                "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}})
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// Watches the pods table and a bare watch, recording when each
/// `bench/live-*` row appears or goes and when its event arrives.
const INSTRUMENT: &str = r#"
const w = window.__bench = { sent: {}, row: {}, gone: {}, ev: {}, evDel: {}, deletedAt: {} };
const body = document.querySelector('#pods tbody');
new MutationObserver((records) => {
  const now = performance.now();
  for (const r of records) {
    for (const n of r.addedNodes) {
      const k = n.dataset && n.dataset.key;
      if (k && k.startsWith('bench/live-') && !(k in w.row)) w.row[k] = now;
    }
    for (const n of r.removedNodes) {
      const k = n.dataset && n.dataset.key;
      if (k && k.startsWith('bench/live-') && !body.querySelector(`tr[data-key="${k}"]`)) w.gone[k] = now;
    }
  }
}).observe(body, { childList: true });
const headers = { Authorization: 'Bearer ' + sessionStorage.getItem('skiff.token') };
return (async () => {
  const list = await (await fetch('/api/v1/namespaces/bench/pods?limit=1', { headers })).json();
  const rv = list.metadata.resourceVersion;
  const res = await fetch(`/api/v1/namespaces/bench/pods?watch=1&resourceVersion=${rv}`, { headers });
  if (!res.ok) throw new Error('watch: ' + res.status);
  read(res);
  return true;
})();
async function read(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const ev = JSON.parse(buf.slice(0, i));
      buf = buf.slice(i + 1);
      const k = 'bench/' + ev.object.metadata.name;
      const now = performance.now();
      if (ev.type === 'ADDED' && !(k in w.ev)) w.ev[k] = now;
      if (ev.type === 'DELETED' && !(k in w.evDel)) w.evDel[k] = now;
    }
  }
}
"#;

/// Sends one create (or delete) of `bench/<name>` from the page, not
/// waiting for its answer.
const CHANGE: &str = r#"
const [name, del] = arguments;
const w = window.__bench;
const headers = { Authorization: 'Bearer ' + sessionStorage.getItem('skiff.token'), 'Content-Type': 'application/json' };
const k = 'bench/' + name;
if (del) {
  w.deletedAt[k] = performance.now();
  fetch(`/api/v1/namespaces/bench/pods/${name}?gracePeriodSeconds=0`, { method: 'DELETE', headers });
} else {
  w.sent[k] = performance.now();
  fetch('/api/v1/namespaces/bench/pods', { method: 'POST', headers, body: JSON.stringify(
    { apiVersion: 'v1', kind: 'Pod', metadata: { name, namespace: 'bench' },
      spec: { containers: [{ name: 'c', image: 'busybox:1.36' }] } }) });
}
return true;
"#;

/// The bare list, timed in the page: request, body and JSON parse.
const BARE_LIST: &str = r#"
return (async () => {
  const t = performance.now();
  const res = await fetch('/api/v1/pods', { headers: { Authorization: 'Bearer ' + sessionStorage.getItem('skiff.token') } });
  const list = await res.json();
  return [performance.now() - t, list.items.length];
})();
"#;

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"n": v.len(), "p50_ms": pct(&v, 0.5), "p99_ms": pct(&v, 0.99), "max_ms": v.last().copied().unwrap_or(0.0)})
}

/// Differences `to[k] - from[k]` for the keys in both objects.
fn deltas(from: &Value, to: &Value) -> Vec<f64> {
    let (Some(from), Some(to)) = (from.as_object(), to.as_object()) else {
        return Vec::new();
    };
    from.iter()
        .filter_map(|(k, a)| Some(to.get(k)?.as_f64()? - a.as_f64()?))
        .collect()
}

pub fn run(pods: usize, loads: usize, updates: usize) -> Result<Value> {
    let ns = Netns::new();
    let cp = ControlPlane::start_in(Some(&ns), &[]);
    cp.kubectl_ok(&["create", "namespace", "bench"]);
    eprintln!("dashboard: creating {pods} pods ...");
    let out = cp.kubectl_run(
        &["create", "-f", "-", "-o", "name"],
        pod_list(pods).as_bytes(),
    );
    if !out.status.success() {
        bail!(
            "creating the pods: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cp.kubectl_ok(&["create", "serviceaccount", "bench", "-n", "bench"]);
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "bench-admin",
        "--clusterrole=cluster-admin",
        "--serviceaccount=bench:bench",
    ]);
    let token = cp.kubectl_ok(&["create", "token", "bench", "-n", "bench"]);

    let b = Browser::start(&ns, cp.addr(), "bench-dashboard");
    b.goto(&format!("{}/ui/", b.base));
    b.log_in(&token);
    let want = pods;
    let rows = |b: &Browser| b.count("#pods tbody tr");

    // First loads: each a full navigation (the token stays in the tab).
    let (mut first, mut bare) = (Vec::new(), Vec::new());
    for i in 0..loads {
        b.goto(&format!("{}/ui/?load={i}#/pods", b.base));
        let at = b.wait("the pods listed", Duration::from_secs(60), |b| {
            let v = b.js(
                "const m = performance.getEntriesByName('skiff:list:pods'); return m.length ? m[0].startTime : null;",
                vec![],
            );
            v.as_f64().filter(|_| rows(b) >= want)
        });
        first.push(at);
        let v = b.js(BARE_LIST, vec![]);
        if v[1].as_u64().unwrap_or(0) < want as u64 {
            bail!("the bare list returned {} of {want} pods", v[1]);
        }
        bare.push(v[0].as_f64().unwrap_or(0.0));
    }
    b.screenshot("pods-listed");

    // Live updates, on the last loaded page.
    b.js(INSTRUMENT, vec![]);
    for del in [false, true] {
        for i in 0..updates {
            b.js(CHANGE, vec![json!(format!("live-{i}")), json!(del)]);
            std::thread::sleep(Duration::from_millis(150));
        }
        let key = if del { "gone" } else { "row" };
        b.wait("every change on the page", Duration::from_secs(30), |b| {
            let n = b.js(
                &format!("return Object.keys(window.__bench.{key}).length;"),
                vec![],
            );
            (n.as_u64().unwrap_or(0) >= updates as u64).then_some(())
        });
    }
    let w = b.js("return window.__bench;", vec![]);
    b.screenshot("after-updates");
    drop(b);
    drop(cp);
    Ok(json!({
        "pods": pods,
        "first_load": summary(first.clone()), "first_load_all_ms": first,
        "bare_list": summary(bare),
        "created_row": summary(deltas(&w["sent"], &w["row"])),
        "created_event": summary(deltas(&w["sent"], &w["ev"])),
        "deleted_row": summary(deltas(&w["deletedAt"], &w["gone"])),
        "deleted_event": summary(deltas(&w["deletedAt"], &w["evDel"])),
    }))
}

pub fn print(d: &Value) {
    println!(
        "\ndashboard with {} pods, in headless Chromium (ms by the page's clock; ratio = page / bare API, the limit)",
        d["pods"]
    );
    println!("| what | p50 | p99 | limit | limit p50 | limit p99 | ratio |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (what, v, limit_what, l) in [
        (
            "first load: every pod on the page",
            &d["first_load"],
            "list request + JSON parse",
            &d["bare_list"],
        ),
        (
            "created pod's row shows",
            &d["created_row"],
            "its watch event arrives",
            &d["created_event"],
        ),
        (
            "deleted pod's row goes",
            &d["deleted_row"],
            "its watch event arrives",
            &d["deleted_event"],
        ),
    ] {
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        let ratio = if f(l, "p50_ms") > 0.0 {
            f(v, "p50_ms") / f(l, "p50_ms")
        } else {
            0.0
        };
        println!(
            "| {what} | {:.1} | {:.1} | {limit_what} | {:.1} | {:.1} | {ratio:.2} |",
            f(v, "p50_ms"),
            f(v, "p99_ms"),
            f(l, "p50_ms"),
            f(l, "p99_ms"),
        );
    }
}
