//! The life of one object: create (with generateName and allocation),
//! get, update and patch (optimistic concurrency, status/scale
//! subresources, immutable fields), binding, and deletion (grace periods,
//! finalizers, propagation policy; the garbage collector does the cascade).

use jiff::Timestamp;
use serde_json::{Map, Value, json};

use super::Api;
use super::fields::{core, selector_text, store_err, str_at};
use super::managed;
use super::registry::Strategy;
use crate::apiserver::validate;
use crate::meta::now;
use crate::resources::{self, Resource};
use crate::status::{self, ApiError, Cause};
use crate::storage::store::{Guard, Item, Side, StoreError};

/// How a write is to be made (`?dryRun=All`, `?fieldValidation=Strict`)
/// and by whom (`?fieldManager=`, else the User-Agent's first word).
#[derive(Clone, Debug, Default)]
pub(crate) struct Write {
    pub dry_run: bool,
    pub strict: bool,
    pub manager: String,
    /// `?force=true`: an apply takes over the fields it conflicts on.
    pub force: bool,
    /// The write is a server-side apply: the object carries its
    /// managedFields already.
    pub apply: bool,
}

impl Write {
    fn writer<'a>(
        &'a self,
        r: &Resource,
        sub: Option<&'a str>,
        now: &'a str,
    ) -> managed::Writer<'a> {
        managed::Writer {
            manager: if self.manager.is_empty() {
                "unknown"
            } else {
                &self.manager
            },
            api_version: r.api_version(),
            kind: r.kind,
            subresource: sub.filter(|s| *s == "status").unwrap_or_default(),
            now,
        }
    }
}

pub(crate) fn random_suffix(n: usize) -> String {
    // The upstream alphabet: no vowels (no words), no look-alike characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut buf = vec![0u8; n];
    let _ = getrandom::fill(&mut buf);
    buf.iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

fn uid() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

/// The stored bytes: the object without its resourceVersion.
pub(crate) fn encode(obj: &Value) -> Vec<u8> {
    let mut o = obj.clone();
    if let Some(Value::Object(m)) = o.get_mut("metadata") {
        m.remove("resourceVersion");
    }
    serde_json::to_vec(&o).unwrap_or_default()
}

/// A stored object as clients see it.
pub(crate) fn decode_item(item: &Item) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&item.value)
        .map_err(|e| ApiError::internal(format!("stored object {} is corrupt: {e}", item.key)))?;
    meta_mut(&mut v).insert(
        "resourceVersion".into(),
        json!(item.mod_revision.to_string()),
    );
    Ok(v)
}

/// The stored bytes as clients see them, without parsing: the
/// `resourceVersion` spliced in right after `"metadata":{`. Stored objects
/// are serde_json output of upstream types, whose top-level `metadata`
/// comes before any nested one (`spec.template.metadata`) and whose
/// strings cannot hold an unescaped quote, so the first match is the
/// object's own metadata. `None` when it is not there.
pub(crate) fn raw_with_rv(raw: &[u8], rev: i64) -> Option<Vec<u8>> {
    const NEEDLE: &[u8] = b"\"metadata\":{";
    let at = raw.windows(NEEDLE.len()).position(|w| w == NEEDLE)? + NEEDLE.len();
    let rv = format!("\"resourceVersion\":\"{rev}\"");
    let mut out = Vec::with_capacity(raw.len() + rv.len() + 1);
    out.extend_from_slice(&raw[..at]);
    out.extend_from_slice(rv.as_bytes());
    if raw.get(at) != Some(&b'}') {
        out.push(b',');
    }
    out.extend_from_slice(&raw[at..]);
    Some(out)
}

pub(crate) fn with_rv(mut v: Value, rev: i64) -> Value {
    meta_mut(&mut v).insert("resourceVersion".into(), json!(rev.to_string()));
    v
}

/// Fields of the incoming object that its type does not know, as
/// `a.b[2].c` paths (for `fieldValidation=Strict`).
fn unknown_fields(input: &Value, decoded: &Value, at: &str, out: &mut Vec<String>) {
    match (input, decoded) {
        (Value::Object(i), Value::Object(d)) => {
            for (k, v) in i {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match d.get(k) {
                    None if !v.is_null() => out.push(path),
                    Some(dv) => unknown_fields(v, dv, &path, out),
                    None => {}
                }
            }
        }
        (Value::Array(i), Value::Array(d)) => {
            for (n, (iv, dv)) in i.iter().zip(d).enumerate() {
                unknown_fields(iv, dv, &format!("{at}[{n}]"), out);
            }
        }
        _ => {}
    }
}

fn decode_checked(r: &Resource, obj: &Value, strict: bool) -> Result<Value, ApiError> {
    let decoded = validate::decode(r, obj)?;
    if strict {
        let mut unknown = Vec::new();
        unknown_fields(obj, &decoded, "", &mut unknown);
        if !unknown.is_empty() {
            let list: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                list.join(", ")
            )));
        }
    }
    Ok(decoded)
}

/// The 409 of an apply that conflicts, worded as upstream's.
fn conflict_error(r: &Resource, name: &str, conflicts: Vec<managed::Conflict>) -> ApiError {
    let n = conflicts.len();
    let detail = match conflicts.as_slice() {
        [one] => format!(
            "conflict with \"{}\" using {}: {}",
            one.manager, one.api_version, one.field
        ),
        many => {
            let mut by: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
            for c in many {
                by.entry(format!("\"{}\" using {}", c.manager, c.api_version))
                    .or_default()
                    .push(&c.field);
            }
            by.iter()
                .map(|(m, fields)| {
                    let list: Vec<String> = fields.iter().map(|f| format!("- {f}")).collect();
                    format!("conflicts with {m}:\n{}", list.join("\n"))
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let mut e = ApiError::conflict(r.group, r.plural, name).saying(format!(
        "Apply failed with {n} conflict{}: {detail}",
        if n == 1 { "" } else { "s" }
    ));
    e.details.causes = conflicts
        .into_iter()
        .map(|c| Cause {
            field: c.field,
            reason: "FieldManagerConflict",
            message: format!("conflict with \"{}\" using {}", c.manager, c.api_version),
        })
        .collect();
    e
}

fn check_kind(r: &Resource, obj: &mut Value) -> Result<(), ApiError> {
    let kind = str_at(obj, "/kind");
    let api_version = str_at(obj, "/apiVersion");
    if (!kind.is_empty() && kind != r.kind)
        || (!api_version.is_empty() && api_version != r.api_version())
    {
        return Err(ApiError::bad_request(format!(
            "the object is a {api_version}, Kind={kind}, but this endpoint serves {}, Kind={}",
            r.api_version(),
            r.kind
        )));
    }
    obj["kind"] = json!(r.kind);
    obj["apiVersion"] = json!(r.api_version());
    Ok(())
}

/// How a resource served at another version than it is stored at turns
/// objects from one into the other.
#[derive(Clone, Copy)]
pub(crate) struct Served {
    pub to_served: fn(&Value) -> Value,
    pub to_stored: fn(&Value) -> Value,
}

fn scale_of(obj: &Value) -> Value {
    let selector = selector_text(obj.pointer("/spec/selector"));
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"), "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {"replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": selector},
    })
}

impl Api {
    fn key(r: &Resource, ns: Option<&str>, name: &str) -> String {
        r.key(ns, name)
    }

    pub(crate) async fn read(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<(Value, i64), ApiError> {
        let item = self
            .store
            .get(&Self::key(r, ns, name))
            .await
            .map_err(|e| store_err(r, name, e))?
            .ok_or_else(|| ApiError::not_found(r.group, r.plural, name))?;
        Ok((decode_item(&item)?, item.mod_revision))
    }

    pub(crate) async fn get_sub(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
    ) -> Result<Value, ApiError> {
        let (obj, _) = self.read(r, ns, name).await?;
        match sub {
            None => Ok(obj),
            Some("status") if r.status => Ok(obj),
            Some("approval") if r.is("certificates.k8s.io", "certificatesigningrequests") => {
                Ok(obj)
            }
            Some("scale") if r.scale => Ok(scale_of(&obj)),
            _ => Err(ApiError::path_not_found(&format!(
                "{}/{name}/{}",
                r.plural,
                sub.unwrap_or_default()
            ))),
        }
    }

    async fn namespace_usable(&self, ns: &str) -> Result<(), ApiError> {
        let nsr = resources::find("", "v1", "namespaces")
            .ok_or_else(|| ApiError::internal("no namespaces resource"))?;
        match self.read(nsr, None, ns).await {
            Ok((obj, _)) if obj.pointer("/metadata/deletionTimestamp").is_some() => {
                Err(ApiError::forbidden(
                    "",
                    "namespaces",
                    ns,
                    &format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    ),
                ))
            }
            Ok(_) => Ok(()),
            Err(e) if e.code == 404 => Err(ApiError::not_found("", "namespaces", ns)),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn create(
        &self,
        r: &Resource,
        ns: Option<&str>,
        mut obj: Value,
        w: Write,
    ) -> Result<Value, ApiError> {
        let obj = &mut obj;
        let (dry_run, strict) = (w.dry_run, w.strict);
        let w = &w;
        if !obj.is_object() {
            return Err(ApiError::bad_request("the object is not a JSON object"));
        }
        check_kind(r, obj)?;
        let meta = meta_mut(obj);
        if r.namespaced {
            let ns = ns.unwrap_or_default();
            match meta.get("namespace").and_then(Value::as_str) {
                Some(given) if !given.is_empty() && given != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    meta.insert("namespace".into(), json!(ns));
                }
            }
        } else {
            meta.remove("namespace");
        }
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            meta.remove(f);
        }
        if !w.apply {
            meta.remove("managedFields");
        }
        meta.insert("uid".into(), json!(uid()));
        meta.insert("creationTimestamp".into(), json!(now()));
        if r.generation {
            meta.insert("generation".into(), json!(1));
        }
        let generate = meta
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
            .then(|| {
                meta.get("generateName")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .flatten();
        if r.namespaced {
            self.namespace_usable(ns.unwrap_or_default()).await?;
        }
        let strategy = Strategy::of(r);
        if strategy.clears_status() {
            obj["status"] = json!({});
        }
        strategy.admit(self, ns.unwrap_or_default(), obj).await?;
        let carried = w
            .apply
            .then(|| obj.pointer("/metadata/managedFields").cloned())
            .flatten();
        let mut decoded = decode_checked(r, obj, strict)?;
        validate::default(r, &mut decoded);
        strategy
            .admit_decoded(self, ns.unwrap_or_default(), &mut decoded)
            .await?;
        match carried {
            Some(m) => {
                meta_mut(&mut decoded).insert("managedFields".into(), m);
            }
            None => {
                let stamp = now();
                managed::record_update(&w.writer(r, None, &stamp), None, &mut decoded);
            }
        }
        // What the client named itself (a Service's ClusterIP, NodePorts).
        let requested = strategy.held(&decoded, &self.cfg.service_cidrs);
        for attempt in 0..8 {
            let mut obj = decoded.clone();
            if let Some(prefix) = &generate {
                meta_mut(&mut obj).insert(
                    "name".into(),
                    json!(format!("{prefix}{}", random_suffix(5))),
                );
            }
            validate::validate(r, &obj, self.limits())?;
            let name = str_at(&obj, "/metadata/name").to_string();
            let (mut guards, mut sides) = strategy.allocate(self, &mut obj, None).await?;
            let (quota_guards, quota_sides) =
                self.charge_quota(r, ns.unwrap_or_default(), &obj).await?;
            guards.extend(quota_guards);
            sides.extend(quota_sides);
            if dry_run {
                return Ok(obj);
            }
            let key = Self::key(r, ns, &name);
            match self.store.create(&key, encode(&obj), &guards, &sides).await {
                Ok(rev) => return Ok(with_rv(obj, rev)),
                Err(StoreError::Exists { key: taken }) if taken == key => {
                    if generate.is_none() || attempt == 7 {
                        return Err(ApiError::already_exists(r.group, r.plural, &name));
                    }
                }
                Err(StoreError::Exists { key: taken }) => {
                    // A value the client asked for is taken: say so. One we
                    // picked was taken since: pick again.
                    if requested.contains(&taken) || attempt == 7 {
                        return Err(Self::allocation_error(&obj, &taken));
                    }
                }
                Err(e) => return Err(store_err(r, &name, e)),
            }
        }
        Err(ApiError::internal("create retries exhausted"))
    }

    /// The object to store when `incoming` replaces `cur` through `sub`.
    async fn prepare_update(
        &self,
        r: &Resource,
        cur: &Value,
        incoming: Value,
        sub: Option<&str>,
        w: &Write,
    ) -> Result<(Value, Vec<Guard>, Vec<Side>), ApiError> {
        let strict = w.strict;
        let carried = w
            .apply
            .then(|| incoming.pointer("/metadata/managedFields").cloned())
            .flatten();
        let name = str_at(cur, "/metadata/name").to_string();
        let mut new = match sub {
            None => {
                let mut new = incoming;
                if !new.is_object() {
                    return Err(ApiError::bad_request("the object is not a JSON object"));
                }
                check_kind(r, &mut new)?;
                let given = str_at(&new, "/metadata/name");
                if !given.is_empty() && given != name {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({given}) does not match the name on the URL ({name})"
                    )));
                }
                if r.status {
                    match cur.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                new
            }
            Some("status") if r.status => {
                // As upstream's built-in status strategies: the spec stays,
                // labels and annotations may change with the status (the
                // overlay publishes its VTEP on its Node this way).
                let mut new = cur.clone();
                new["status"] = incoming.get("status").cloned().unwrap_or(json!({}));
                for field in ["labels", "annotations"] {
                    match incoming.pointer(&format!("/metadata/{field}")) {
                        Some(v) if !v.is_null() => new["metadata"][field] = v.clone(),
                        _ => {
                            if let Some(m) = new["metadata"].as_object_mut() {
                                m.remove(field);
                            }
                        }
                    }
                }
                new
            }
            Some("approval") if r.is("certificates.k8s.io", "certificatesigningrequests") => {
                // Approval changes the conditions and nothing else.
                let mut new = cur.clone();
                new["status"]["conditions"] = incoming
                    .pointer("/status/conditions")
                    .cloned()
                    .unwrap_or(json!([]));
                new
            }
            Some("scale") if r.scale => {
                let replicas = incoming
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "autoscaling",
                            "Scale",
                            &name,
                            vec![Cause::required("spec.replicas")],
                        )
                    })?;
                if replicas < 0 {
                    return Err(ApiError::invalid(
                        "autoscaling",
                        "Scale",
                        &name,
                        vec![Cause::invalid(
                            "spec.replicas",
                            replicas,
                            "must be greater than or equal to 0",
                        )],
                    ));
                }
                let mut new = cur.clone();
                new["spec"]["replicas"] = json!(replicas);
                new
            }
            Some(other) => {
                return Err(ApiError::path_not_found(&format!(
                    "{}/{name}/{other}",
                    r.plural
                )));
            }
        };
        {
            let cur_meta = cur
                .get("metadata")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let meta = meta_mut(&mut new);
            for f in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match cur_meta.get(f) {
                    Some(v) => meta.insert(f.into(), v.clone()),
                    None => meta.remove(f),
                };
            }
            meta.remove("managedFields");
        }
        let mut new = decode_checked(r, &new, strict)?;
        validate::default(r, &mut new);
        if r.generation && new.get("spec") != cur.get("spec") {
            let g = cur
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                + 1;
            meta_mut(&mut new).insert("generation".into(), json!(g));
        }
        match carried {
            Some(m) => {
                meta_mut(&mut new).insert("managedFields".into(), m);
            }
            None => {
                let stamp = now();
                managed::record_update(&w.writer(r, sub, &stamp), Some(cur), &mut new);
            }
        }
        validate::validate(r, &new, self.limits())?;
        let strategy = Strategy::of(r);
        strategy.check_update(r, &name, cur, &new)?;
        let (guards, sides) = strategy.allocate(self, &mut new, Some(cur)).await?;
        Ok((new, guards, sides))
    }

    /// Writes `new` over the object at `rev`; completes a pending deletion
    /// when the last finalizer went away.
    async fn write(
        &self,
        r: &Resource,
        ns: Option<&str>,
        rev: i64,
        new: Value,
        guards: &[Guard],
        sides: &[Side],
    ) -> Result<Value, StoreError> {
        let name = str_at(&new, "/metadata/name").to_string();
        let key = Self::key(r, ns, &name);
        let finalizers_left = new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
        let graceful = new
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            > 0;
        let strategy = Strategy::of(r);
        if deleting && !finalizers_left && !(strategy.waits_out_grace() && graceful) {
            let mut release: Vec<Side> = sides.to_vec();
            release.extend(strategy.released(&new, &self.cfg.service_cidrs));
            let del = self.store.delete(&key, rev, &release).await?;
            return Ok(with_rv(new, del));
        }
        let out = self
            .store
            .update(&key, rev, encode(&new), guards, sides)
            .await?;
        Ok(with_rv(new, out))
    }

    pub(crate) async fn update(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        body: Value,
        w: Write,
    ) -> Result<Value, ApiError> {
        self.replace_with(r, ns, name, sub, w, |_, _| Ok(body.clone()))
            .await
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, the request's parts"
    )]
    pub(crate) async fn patch(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        content_type: &str,
        patch: &Value,
        w: Write,
        served: Option<Served>,
    ) -> Result<Value, ApiError> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        self.replace_with(r, ns, name, sub, w, |cur, _| {
            // A scale patch applies to the Scale view of the object, and a
            // patch sent to another served version to that version's.
            let view = if sub == Some("scale") && r.scale {
                scale_of(cur)
            } else if let Some(s) = served {
                (s.to_served)(cur)
            } else {
                cur.clone()
            };
            let patched = match media {
                "application/json-patch+json" => crate::apiserver::patch::json_patch(&view, patch),
                "application/merge-patch+json" => crate::apiserver::patch::merge_patch(&view, patch),
                "application/strategic-merge-patch+json" => {
                    crate::apiserver::patch::strategic_merge(&view, patch)
                }
                other => return Err(ApiError::unsupported_media(other, "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml")),
            }
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
            Ok(match served {
                Some(s) if sub.is_none() => (s.to_stored)(&patched),
                _ => patched,
            })
        })
        .await
    }

    /// Server-side apply of `applied` to object `name` by `w.manager`:
    /// the object, and whether the apply created it.
    pub(crate) async fn apply(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        mut applied: Value,
        mut w: Write,
    ) -> Result<(Value, bool), ApiError> {
        if w.manager.is_empty() {
            return Err(ApiError::bad_request(
                "PATCH requests of type apply must have a fieldManager",
            ));
        }
        if !applied.is_object() {
            return Err(ApiError::bad_request(
                "the applied configuration is not an object",
            ));
        }
        check_kind(r, &mut applied)?;
        let given = str_at(&applied, "/metadata/name");
        if !given.is_empty() && given != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({given}) does not match the name on the URL ({name})"
            )));
        }
        meta_mut(&mut applied).insert("name".into(), json!(name));
        w.apply = true;
        let stamp = now();
        let conflicts = |c: Vec<managed::Conflict>| conflict_error(r, name, c);
        for _ in 0..8 {
            match self.read(r, ns, name).await {
                Err(e) if e.code == 404 => {
                    let obj = managed::apply(&w.writer(r, None, &stamp), None, &applied, w.force)
                        .map_err(conflicts)?;
                    match self.create(r, ns, obj, w.clone()).await {
                        Ok(v) => return Ok((v, true)),
                        // Created meanwhile: apply over it.
                        Err(e) if e.code == 409 && e.reason == "AlreadyExists" => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
                Ok(_) => break,
            }
        }
        let writer = w.writer(r, None, &stamp);
        let out = self
            .replace_with(r, ns, name, None, w.clone(), |cur, _| {
                managed::apply(&writer, Some(cur), &applied, w.force).map_err(conflicts)
            })
            .await?;
        Ok((out, false))
    }

    /// Read, compute the incoming object from the current one, prepare and
    /// write guarded by the revision read; again on a concurrent write. An
    /// incoming `resourceVersion` pins the revision: a mismatch is a 409.
    async fn replace_with(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        w: Write,
        incoming: impl Fn(&Value, i64) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        for _ in 0..8 {
            let (cur, rev) = self.read(r, ns, name).await?;
            let next = incoming(&cur, rev)?;
            let pinned = next
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            if pinned.is_some_and(|p| p != rev.to_string()) {
                return Err(ApiError::conflict(r.group, r.plural, name));
            }
            let (new, guards, sides) = self.prepare_update(r, &cur, next, sub, &w).await?;
            if w.dry_run {
                return Ok(new);
            }
            match self.write(r, ns, rev, new, &guards, &sides).await {
                Ok(v) if sub == Some("scale") => return Ok(scale_of(&v)),
                Ok(v) => return Ok(v),
                // Raced with another writer: read again (a pinned version
                // then fails the check above).
                Err(StoreError::Conflict { .. }) => continue,
                Err(StoreError::Exists { key }) => return Err(Self::allocation_error(&cur, &key)),
                Err(e) => return Err(store_err(r, name, e)),
            }
        }
        Err(ApiError::conflict(r.group, r.plural, name))
    }

    pub(crate) async fn bind(
        &self,
        ns: &str,
        name: &str,
        binding: &Value,
    ) -> Result<Value, ApiError> {
        let pods = core("pods")?;
        let node = str_at(binding, "/target/name").to_string();
        if node.is_empty() {
            return Err(ApiError::invalid(
                "",
                "Binding",
                name,
                vec![Cause::required("target.name")],
            ));
        }
        for _ in 0..8 {
            let (mut pod, rev) = self.read(pods, Some(ns), name).await?;
            let current = str_at(&pod, "/spec/nodeName");
            if !current.is_empty() {
                return Err(ApiError::conflict("", "pods/binding", name).saying(format!(
                        "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{current}\""
                    )));
            }
            if pod.pointer("/metadata/deletionTimestamp").is_some() {
                return Err(ApiError::conflict("", "pods/binding", name));
            }
            pod["spec"]["nodeName"] = json!(node);
            set_condition(&mut pod, "PodScheduled", "True", "", "");
            match self.write(pods, Some(ns), rev, pod, &[], &[]).await {
                Ok(_) => {
                    return Ok(status::Status::success_with_code(201).to_value());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(store_err(pods, name, e)),
            }
        }
        Err(ApiError::conflict("", "pods/binding", name))
    }

    /// Deletes one object. What comes back follows upstream's registries:
    /// the object itself while its deletion is pending (grace period,
    /// finalizers, a namespace being emptied) and always for pods and
    /// services (`ReturnDeletedObject`); a `Status` for the rest.
    pub(crate) async fn delete(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        opts: &Value,
        q: &std::collections::HashMap<String, String>,
    ) -> Result<Deleted, ApiError> {
        let policy = q
            .get("propagationPolicy")
            .map(String::as_str)
            .or_else(|| opts.get("propagationPolicy").and_then(Value::as_str))
            .unwrap_or("Background")
            .to_string();
        if !matches!(policy.as_str(), "Background" | "Foreground" | "Orphan") {
            return Err(ApiError::invalid(
                "",
                "DeleteOptions",
                "",
                vec![Cause::unsupported(
                    "propagationPolicy",
                    &policy,
                    &["Background", "Foreground", "Orphan"],
                )],
            ));
        }
        let grace = q
            .get("gracePeriodSeconds")
            .and_then(|g| g.parse::<i64>().ok())
            .or_else(|| opts.get("gracePeriodSeconds").and_then(Value::as_i64));
        let dry_run = q.get("dryRun").is_some_and(|v| v == "All");
        for _ in 0..8 {
            let (mut obj, rev) = self.read(r, ns, name).await?;
            let uid = str_at(&obj, "/metadata/uid").to_string();
            if let Some(want) = opts.pointer("/preconditions/uid").and_then(Value::as_str)
                && want != uid
            {
                return Err(ApiError {
                    message: format!(
                        "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                    ),
                    ..ApiError::conflict(r.group, r.plural, name)
                });
            }
            if let Some(want) = opts
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                && want != rev.to_string()
            {
                return Err(ApiError {
                    message: format!(
                        "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {rev}"
                    ),
                    ..ApiError::conflict(r.group, r.plural, name)
                });
            }
            let already = obj.pointer("/metadata/deletionTimestamp").is_some();
            let mut finalizers: Vec<Value> = obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let gc_finalizer = match policy.as_str() {
                "Orphan" => Some("orphan"),
                "Foreground" => Some("foregroundDeletion"),
                _ => None,
            };
            if let Some(f) = gc_finalizer
                && !already
                && !finalizers.contains(&json!(f))
            {
                finalizers.push(json!(f));
            }
            let strategy = Strategy::of(r);
            let pod_grace = strategy.grace(&obj, grace);
            let is_namespace = strategy.terminates();
            let keep = !finalizers.is_empty() || pod_grace.is_some() || is_namespace;
            if keep {
                let shorter = pod_grace.is_some_and(|g| {
                    obj.pointer("/metadata/deletionGracePeriodSeconds")
                        .and_then(Value::as_i64)
                        .is_none_or(|old| g < old)
                });
                if already && !shorter {
                    return Ok(Deleted::Object(obj));
                }
                let m = meta_mut(&mut obj);
                let at = match pod_grace {
                    Some(g) => Timestamp::now()
                        .checked_add(jiff::SignedDuration::from_secs(g))
                        .unwrap_or_else(|_| Timestamp::now()),
                    None => Timestamp::now(),
                };
                m.insert(
                    "deletionTimestamp".into(),
                    json!(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
                );
                m.insert(
                    "deletionGracePeriodSeconds".into(),
                    json!(pod_grace.unwrap_or(0)),
                );
                if !finalizers.is_empty() {
                    m.insert("finalizers".into(), Value::Array(finalizers));
                }
                if is_namespace {
                    obj["status"]["phase"] = json!("Terminating");
                }
                if dry_run {
                    return Ok(Deleted::Object(obj));
                }
                let key = Self::key(r, ns, name);
                match self.store.update(&key, rev, encode(&obj), &[], &[]).await {
                    Ok(new_rev) => {
                        strategy.on_terminating(self, name);
                        return Ok(Deleted::Object(with_rv(obj, new_rev)));
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(store_err(r, name, e)),
                }
            }
            let returns_object = strategy.returns_deleted_object();
            let gone = |obj: Value| {
                if returns_object {
                    Deleted::Object(obj)
                } else {
                    Deleted::Status(Box::new(status::success(r.group, r.plural, name, &uid)))
                }
            };
            if dry_run {
                return Ok(gone(obj));
            }
            let sides = strategy.released(&obj, &self.cfg.service_cidrs);
            match self
                .store
                .delete(&Self::key(r, ns, name), rev, &sides)
                .await
            {
                Ok(_) => return Ok(gone(obj)),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(store_err(r, name, e)),
            }
        }
        Err(ApiError::conflict(r.group, r.plural, name))
    }

    pub(crate) async fn delete_collection(
        &self,
        r: &Resource,
        ns: Option<&str>,
        opts: &Value,
        q: &std::collections::HashMap<String, String>,
    ) -> Result<Value, ApiError> {
        let items = self.list_objects(r, ns, q).await?.0;
        let mut deleted = Vec::new();
        for obj in items {
            let name = str_at(&obj, "/metadata/name").to_string();
            let obj_ns = obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .map(String::from);
            match self
                .delete(r, obj_ns.as_deref().or(ns), &name, opts, q)
                .await
            {
                Ok(_) => deleted.push(obj),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(
            json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": {}, "items": deleted}),
        )
    }
}

/// What a delete answers: the object, or a `Status` when it is gone and
/// its kind does not return it.
pub(crate) enum Deleted {
    Object(Value),
    Status(Box<status::Status>),
}

/// Sets one condition in `status.conditions`, keeping the transition time
/// when the status did not change.
pub(crate) fn set_condition(obj: &mut Value, ty: &str, status: &str, reason: &str, message: &str) {
    if !obj.get("status").is_some_and(Value::is_object) {
        obj["status"] = json!({});
    }
    let conds = obj["status"].as_object_mut().and_then(|s| {
        s.entry("conditions").or_insert(json!([]));
        s.get_mut("conditions").and_then(Value::as_array_mut)
    });
    let Some(conds) = conds else { return };
    let mut cond =
        json!({"type": ty, "status": status, "lastTransitionTime": now(), "lastProbeTime": null});
    if !reason.is_empty() {
        cond["reason"] = json!(reason);
        cond["message"] = json!(message);
    }
    match conds.iter_mut().find(|c| c["type"] == ty) {
        Some(c) => {
            if c["status"] == status {
                cond["lastTransitionTime"] = c["lastTransitionTime"].clone();
            }
            *c = cond;
        }
        None => conds.push(cond),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_matches_parse() {
        for raw in [
            &br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"template":{"metadata":{}}}}"#[..],
            &br#"{"kind":"Namespace","metadata":{}}"#[..],
        ] {
            let spliced = raw_with_rv(raw, 42).expect("has metadata");
            let parsed: Value = serde_json::from_slice(&spliced).expect("valid JSON");
            let expected = with_rv(serde_json::from_slice(raw).expect("valid"), 42);
            assert_eq!(parsed, expected);
        }
        assert!(raw_with_rv(br#"{"kind":"X"}"#, 1).is_none());
    }
}
