//! Lists and watches.
//!
//! A list is one etcd range read (or, with `limit`, a few, at one
//! revision); its `resourceVersion` is the revision it was read at, so a
//! watch from there starts right after it. Watches read the store's change
//! stream for the resource's prefix (one etcd watch shared by all of them,
//! see `store::Hub`), with the previous value of every change so that
//! selectors see an object leave (`DELETED`) or enter (`ADDED`) the
//! selection as the upstream apiserver reports it. A watch from a
//! compacted revision ends with an `ERROR` event carrying 410 Expired,
//! which clients answer by listing again.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};

use super::fields::store_err;
use super::objects::{decode_item, raw_with_rv, with_rv};
use super::{Api, Body, json_response};
use crate::apiserver::table::{self, Include};
use crate::resources::Resource;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::storage::store::{Change, StoreError};

/// Fields a field selector may name, besides metadata.name/namespace.
fn selectable(r: &Resource) -> &'static [&'static str] {
    match (r.group, r.plural) {
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ("", "nodes") => &["spec.unschedulable"],
        ("", "namespaces") => &["status.phase"],
        ("", "secrets") => &["type"],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("apps", "replicasets") | ("", "replicationcontrollers") => &["status.replicas"],
        _ => &[],
    }
}

struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn parse(r: &Resource, q: &HashMap<String, String>) -> Result<Self, ApiError> {
        let labels = LabelSelector::parse(
            q.get("labelSelector")
                .map(String::as_str)
                .unwrap_or_default(),
        )
        .map_err(|e| ApiError::bad_request(format!("labelSelector: {e}")))?;
        let fields = FieldSelector::parse(
            q.get("fieldSelector")
                .map(String::as_str)
                .unwrap_or_default(),
            selectable(r),
        )
        .map_err(|e| ApiError::bad_request(format!("fieldSelector: {e}")))?;
        Ok(Self { labels, fields })
    }

    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches_object(obj) && self.fields.matches(obj)
    }

    fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }
}

/// `{"type":TYPE,"object":OBJECT}` and a newline, from the object's bytes.
fn raw_line(ty: &str, object: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(object.len() + 32);
    v.extend_from_slice(b"{\"type\":\"");
    v.extend_from_slice(ty.as_bytes());
    v.extend_from_slice(b"\",\"object\":");
    v.extend_from_slice(object);
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

/// The continue token: base64 of `{"v","rv","start"}`, where `start` is
/// the key to go on from, relative to the list's prefix (so a token only
/// ever reads inside the list it came from).
fn encode_continue(rev: i64, start: &str) -> String {
    use base64::Engine;
    let token = json!({"v": "meta.k8s.io/v1", "rv": rev, "start": start});
    base64::engine::general_purpose::URL_SAFE.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(i64, String), ApiError> {
    use base64::Engine;
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let raw = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .map_err(|_| bad("not base64"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("not JSON"))?;
    if v["v"] != "meta.k8s.io/v1" {
        return Err(bad("unknown version"));
    }
    let rev = v["rv"]
        .as_i64()
        .filter(|r| *r > 0)
        .ok_or_else(|| bad("no resource version"))?;
    let start = v["start"].as_str().ok_or_else(|| bad("no start key"))?;
    if start.starts_with('/') || start.split('/').any(|s| s == "..") {
        return Err(bad("start key leaves the list"));
    }
    Ok((rev, start.to_string()))
}

/// A `<Kind>List` of stored objects, built from their bytes.
fn raw_list(
    r: &Resource,
    items: &[crate::storage::store::Item],
    meta: &Value,
) -> Result<Response<Body>, ApiError> {
    let head = format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{meta},\"items\":[",
        list_kind(r),
        r.api_version()
    );
    let mut out = Vec::with_capacity(
        head.len() + items.iter().map(|i| i.value.len() + 32).sum::<usize>() + 2,
    );
    out.extend_from_slice(head.as_bytes());
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        match raw_with_rv(&item.value, item.mod_revision) {
            Some(bytes) => out.extend_from_slice(&bytes),
            None => {
                out.extend_from_slice(&serde_json::to_vec(&decode_item(item)?).unwrap_or_default())
            }
        }
    }
    out.extend_from_slice(b"]}");
    Ok(super::bytes_response(200, out))
}

/// The revision `resourceVersionMatch=Exact` asks a list to be read at.
fn exact_revision(q: &HashMap<String, String>) -> Result<Option<i64>, ApiError> {
    let exact = q.get("resourceVersionMatch").is_some_and(|m| m == "Exact");
    match q.get("resourceVersion") {
        Some(rv) if exact => rv
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("resourceVersion {rv:?} is not a number"))),
        _ => Ok(None),
    }
}

/// A list of `items` as a `<Kind>List`, or as a Table for `kubectl get`.
fn list_response(
    r: &Resource,
    q: &HashMap<String, String>,
    items: &[Value],
    meta: Value,
    as_table: bool,
) -> Response<Body> {
    if as_table {
        let include = Include::parse(q.get("includeObject").map(String::as_str));
        return json_response(200, &table::table(r, items, meta, include));
    }
    json_response(
        200,
        &json!({"kind": list_kind(r), "apiVersion": r.api_version(), "metadata": meta, "items": items}),
    )
}

fn list_kind(r: &Resource) -> String {
    format!("{}List", r.kind)
}

impl Api {
    pub(crate) async fn list_objects(
        &self,
        r: &Resource,
        ns: Option<&str>,
        q: &HashMap<String, String>,
    ) -> Result<(Vec<Value>, i64), ApiError> {
        let filter = Filter::parse(r, q)?;
        let revision = exact_revision(q)?;
        let (items, rev) = self
            .store
            .list(&r.prefix(ns), revision)
            .await
            .map_err(|e| store_err(r, "", e))?;
        let mut out = Vec::with_capacity(items.len());
        for item in &items {
            let obj = decode_item(item)?;
            if filter.matches(&obj) {
                out.push(obj);
            }
        }
        Ok((out, rev))
    }

    pub(crate) async fn list(
        &self,
        r: &Resource,
        ns: Option<&str>,
        q: &HashMap<String, String>,
        as_table: bool,
    ) -> Result<Response<Body>, ApiError> {
        let limit = match q.get("limit").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(l) => Some(l.parse::<usize>().map_err(|_| {
                ApiError::bad_request(format!("limit {l:?} is not a non-negative integer"))
            })?),
        };
        let cont = q.get("continue").filter(|c| !c.is_empty());
        if limit.is_some() || cont.is_some() {
            return self.list_chunk(r, ns, q, as_table, limit, cont).await;
        }
        if !as_table
            && Filter::parse(r, q)?.is_empty()
            && q.get("resourceVersionMatch").is_none_or(|m| m != "Exact")
        {
            return self.list_raw(r, ns).await;
        }
        let (items, rev) = self.list_objects(r, ns, q).await?;
        let meta = json!({"resourceVersion": rev.to_string()});
        Ok(list_response(r, q, &items, meta, as_table))
    }

    /// One chunk of a list (`limit`, `continue`): at most `limit` matching
    /// objects, read at the revision of the first chunk, with a continue
    /// token for the rest and, without selectors, how many remain.
    async fn list_chunk(
        &self,
        r: &Resource,
        ns: Option<&str>,
        q: &HashMap<String, String>,
        as_table: bool,
        limit: Option<usize>,
        cont: Option<&String>,
    ) -> Result<Response<Body>, ApiError> {
        let filter = Filter::parse(r, q)?;
        let prefix = r.prefix(ns);
        let (start, mut at) = match cont {
            Some(token) => {
                if q.get("resourceVersion").is_some_and(|v| !v.is_empty()) {
                    return Err(ApiError::bad_request(
                        "specifying resource version is not allowed when using continue",
                    ));
                }
                let (rev, rest) = decode_continue(token)?;
                (format!("{prefix}{rest}").into_bytes(), Some(rev))
            }
            None => (prefix.clone().into_bytes(), exact_revision(q)?),
        };
        let end = crate::storage::store::prefix_end(prefix.as_bytes());
        let want = limit.unwrap_or(usize::MAX);
        // No selector and no table: the stored bytes go out unparsed.
        let raw = filter.is_empty() && !as_table;
        let mut from = start;
        let mut items = Vec::new();
        let mut stored = Vec::new();
        let mut total_from_start: Option<i64> = None;
        // The key after the last object returned, when more may follow.
        let mut resume: Option<String> = None;
        'pages: loop {
            let ask = if filter.is_empty() {
                (want - items.len() - stored.len()).clamp(1, 500)
            } else {
                500
            };
            let page = self
                .store
                .page(&from, &end, at, ask as i64)
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } if cont.is_some() => ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ),
                    e => store_err(r, "", e),
                })?;
            at = Some(page.revision);
            total_from_start.get_or_insert(page.count);
            let n = page.items.len();
            for (i, item) in page.items.into_iter().enumerate() {
                let key = if i + 1 < n || page.next.is_some() {
                    Some(format!("{}\0", item.key))
                } else {
                    None
                };
                if raw {
                    stored.push(item);
                } else {
                    let obj = decode_item(&item)?;
                    if filter.matches(&obj) {
                        items.push(obj);
                    }
                }
                if items.len() + stored.len() == want {
                    resume = key;
                    break 'pages;
                }
            }
            match page.next {
                Some(next) => from = next,
                None => break,
            }
        }
        let rev = at.unwrap_or(0);
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if let Some(key) = resume {
            let rest = key.strip_prefix(&prefix).unwrap_or(&key);
            meta["continue"] = json!(encode_continue(rev, rest));
            if filter.is_empty()
                && let Some(total) = total_from_start
            {
                meta["remainingItemCount"] =
                    json!((total - (items.len() + stored.len()) as i64).max(0));
            }
        }
        if raw {
            return raw_list(r, &stored, &meta);
        }
        Ok(list_response(r, q, &items, meta, as_table))
    }

    /// A list without selectors, built from the stored bytes.
    async fn list_raw(&self, r: &Resource, ns: Option<&str>) -> Result<Response<Body>, ApiError> {
        let (items, rev) = self
            .store
            .list(&r.prefix(ns), None)
            .await
            .map_err(|e| store_err(r, "", e))?;
        raw_list(r, &items, &json!({"resourceVersion": rev.to_string()}))
    }

    pub(crate) async fn watch(
        &self,
        r: &'static Resource,
        ns: Option<&str>,
        q: &HashMap<String, String>,
        as_table: bool,
    ) -> Result<Response<Body>, ApiError> {
        let filter = Filter::parse(r, q)?;
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|t| *t > 0)
            .unwrap_or(1800);
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let initial_events = q.get("sendInitialEvents").is_some_and(|v| v == "true");
        let include = Include::parse(q.get("includeObject").map(String::as_str));
        let rv = q
            .get("resourceVersion")
            .map(String::as_str)
            .unwrap_or_default();
        // Unset or "0" means: the current state as ADDED events, then changes.
        let (start, initial) = if rv.is_empty() || rv == "0" || initial_events {
            let (items, rev) = self.list_objects(r, ns, q).await?;
            (rev, items)
        } else {
            let rev = rv.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion {rv:?} is not a number"))
            })?;
            (rev, Vec::new())
        };
        let period = if bookmarks {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(3600)
        };
        let changes = self
            .store
            .watch(&r.prefix(ns), start, tokio::time::interval(period))
            .await
            .map_err(|e| store_err(r, "", e))?;

        // No selector and no table: events go out as stored, unparsed.
        let raw = filter.is_empty() && !as_table;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let mut encoder = Encoder {
            r,
            as_table,
            include,
            first: true,
        };
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(Duration::from_secs(timeout));
            tokio::pin!(deadline);
            tokio::pin!(changes);
            for obj in initial {
                if tx.send(encoder.event("ADDED", &obj)).await.is_err() {
                    return;
                }
            }
            if initial_events {
                let mark = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": start.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
                if tx.send(line("BOOKMARK", &mark)).await.is_err() {
                    return;
                }
            }
            loop {
                let change = tokio::select! {
                    _ = &mut deadline => return,
                    _ = tx.closed() => return,
                    c = changes.next() => c,
                };
                let out = match change {
                    None => return,
                    Some(Err(StoreError::Compacted {
                        requested,
                        compacted,
                    })) => {
                        let status = ApiError::gone(format!(
                            "too old resource version: {requested} ({compacted})"
                        ))
                        .to_status();
                        let _ = tx.send(line("ERROR", &status)).await;
                        return;
                    }
                    Some(Err(e)) => {
                        let status = ApiError::internal(format!("watch: {e}")).to_status();
                        let _ = tx.send(line("ERROR", &status)).await;
                        return;
                    }
                    Some(Ok(Change::Progress { revision })) if bookmarks => {
                        let mark = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": revision.to_string()}});
                        Some(line("BOOKMARK", &mark))
                    }
                    Some(Ok(Change::Progress { .. })) => None,
                    Some(Ok(Change::Put { item, prev })) if raw => {
                        let ty = if prev.is_none() { "ADDED" } else { "MODIFIED" };
                        raw_with_rv(&item.value, item.mod_revision).map(|b| raw_line(ty, &b))
                    }
                    Some(Ok(Change::Delete { last, revision })) if raw => {
                        raw_with_rv(&last.value, revision).map(|b| raw_line("DELETED", &b))
                    }
                    Some(Ok(Change::Put { item, prev })) => {
                        let Ok(now) = decode_item(&item) else {
                            continue;
                        };
                        let was = prev
                            .as_ref()
                            .and_then(|p| decode_item(p).ok())
                            .is_some_and(|p| filter.matches(&p));
                        match (was, filter.matches(&now)) {
                            (_, true) if prev.is_none() || !was => {
                                Some(encoder.event("ADDED", &now))
                            }
                            (true, true) => Some(encoder.event("MODIFIED", &now)),
                            (true, false) => Some(encoder.event("DELETED", &now)),
                            _ => None,
                        }
                    }
                    Some(Ok(Change::Delete { last, revision })) => {
                        let Ok(obj) = decode_item(&last) else {
                            continue;
                        };
                        filter
                            .matches(&obj)
                            .then(|| encoder.event("DELETED", &with_rv(obj, revision)))
                    }
                };
                if let Some(bytes) = out
                    && tx.send(bytes).await.is_err()
                {
                    return;
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(resp)
    }
}

fn line(ty: &str, obj: &impl serde::Serialize) -> Bytes {
    #[derive(serde::Serialize)]
    struct Event<'a, T> {
        #[serde(rename = "type")]
        ty: &'a str,
        object: &'a T,
    }
    let mut v = serde_json::to_vec(&Event { ty, object: obj }).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Turns objects into watch event lines, as Tables when the client asked.
struct Encoder {
    r: &'static Resource,
    as_table: bool,
    include: Include,
    first: bool,
}

impl Encoder {
    fn event(&mut self, ty: &str, obj: &Value) -> Bytes {
        if !self.as_table {
            return line(ty, obj);
        }
        let rv = obj
            .pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or_default();
        let mut t = table::table(
            self.r,
            std::slice::from_ref(obj),
            json!({"resourceVersion": rv}),
            self.include,
        );
        // As upstream: column definitions travel with the first event only.
        if !std::mem::replace(&mut self.first, false) {
            t["columnDefinitions"] = json!([]);
        }
        line(ty, &t)
    }
}
