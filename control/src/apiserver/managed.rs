//! `metadata.managedFields` and server-side apply, after upstream's
//! structured-merge-diff.
//!
//! Every write records who set what: the writer (the `fieldManager`
//! parameter, else the first word of its User-Agent) owns the fields it
//! changed, as an `Update` entry, and they leave every other entry. An
//! apply (`PATCH` as `application/apply-patch+yaml`) merges the applied
//! configuration into the object along the schema (list-type `map`
//! lists by their keys, `set` lists by value, maps and structs by field,
//! everything else whole), owns exactly the fields it names (an `Apply`
//! entry), removes the fields its previous apply named that it no longer
//! does and nobody else owns, and is refused with a 409 naming each field
//! another manager owns with a different value, unless forced, which
//! takes them over.
//!
//! Field sets are written as `FieldsV1`: `f:<field>`, `k:<keys as JSON>`
//! for list-map items, `v:<value as JSON>` for set items, and `.` for an
//! item that is itself a member.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::openapi;

/// Metadata no manager owns.
const UNOWNED_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// A set of fields.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    pub fn from_v1(v: &Value) -> Self {
        let Some(m) = v.as_object() else {
            return Self::default();
        };
        let mut out = Self {
            member: m.is_empty() || m.contains_key("."),
            children: BTreeMap::new(),
        };
        for (k, c) in m.iter().filter(|(k, _)| k.as_str() != ".") {
            out.children.insert(k.clone(), Self::from_v1(c));
        }
        out
    }

    pub fn to_v1(&self) -> Value {
        let mut m = Map::new();
        if self.member && !self.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, c) in &self.children {
            m.insert(k.clone(), c.to_v1());
        }
        Value::Object(m)
    }

    pub fn is_empty(&self) -> bool {
        !self.member && self.children.values().all(Self::is_empty)
    }

    fn child(&mut self, k: String) -> &mut FieldSet {
        self.children.entry(k).or_default()
    }

    /// The paths of every member.
    pub fn members(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        self.walk(&mut Vec::new(), &mut out);
        out
    }

    fn walk(&self, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        if self.member && !at.is_empty() {
            out.push(at.clone());
        }
        for (k, c) in &self.children {
            at.push(k.clone());
            c.walk(at, out);
            at.pop();
        }
    }

    pub fn contains(&self, path: &[String]) -> bool {
        match path.split_first() {
            None => self.member,
            Some((k, rest)) => self.children.get(k).is_some_and(|c| c.contains(rest)),
        }
    }

    pub fn insert(&mut self, path: &[String]) {
        match path.split_first() {
            None => self.member = true,
            Some((k, rest)) => self.child(k.clone()).insert(rest),
        }
    }

    pub fn remove(&mut self, path: &[String]) {
        match path.split_first() {
            None => self.member = false,
            Some((k, rest)) => {
                if let Some(c) = self.children.get_mut(k) {
                    c.remove(rest);
                    if c.is_empty() {
                        self.children.remove(k);
                    }
                }
            }
        }
    }
}

/// How the schema says a value merges.
enum Kind<'a> {
    /// A struct (by its properties) or a map (every key the same schema).
    Fields(Option<&'a Map<String, Value>>, Option<&'a Value>),
    ListMap(Vec<String>, Option<&'a Value>),
    ListSet,
    Atomic,
}

/// The vendored definitions, to follow references.
struct Schema<'a> {
    defs: &'a Map<String, Value>,
}

impl<'a> Schema<'a> {
    fn resolve(&self, s: &'a Value) -> &'a Value {
        let r = s.get("$ref").or_else(|| s.pointer("/allOf/0/$ref"));
        match r
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/definitions/"))
            .and_then(|n| self.defs.get(n))
        {
            Some(d) => self.resolve(d),
            None => s,
        }
    }

    /// The kind of a value with schema `s` (none: unknown, so granular
    /// for objects, atomic otherwise).
    fn kind(&self, s: Option<&'a Value>, v: &Value) -> Kind<'a> {
        let Some(s) = s.map(|s| self.resolve(s)) else {
            return if v.is_object() {
                Kind::Fields(None, None)
            } else {
                Kind::Atomic
            };
        };
        let str_of = |k: &str| s.get(k).and_then(Value::as_str);
        if str_of("x-kubernetes-map-type") == Some("atomic") {
            return Kind::Atomic;
        }
        if let Some(items) = s.get("items") {
            let keys = |k: &str| -> Vec<String> {
                s.get(k)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            };
            return match str_of("x-kubernetes-list-type") {
                Some("map") => Kind::ListMap(keys("x-kubernetes-list-map-keys"), Some(items)),
                Some("set") => Kind::ListSet,
                Some(_) => Kind::Atomic,
                None => match (
                    str_of("x-kubernetes-patch-strategy"),
                    str_of("x-kubernetes-patch-merge-key"),
                ) {
                    (Some(st), Some(key)) if st.contains("merge") => {
                        Kind::ListMap(vec![key.to_string()], Some(items))
                    }
                    _ => Kind::Atomic,
                },
            };
        }
        let props = s.get("properties").and_then(Value::as_object);
        let extra = s.get("additionalProperties").filter(|a| a.is_object());
        if props.is_some() || extra.is_some() {
            Kind::Fields(props, extra)
        } else {
            Kind::Atomic
        }
    }

    fn field_schema(
        props: Option<&'a Map<String, Value>>,
        extra: Option<&'a Value>,
        k: &str,
    ) -> Option<&'a Value> {
        props.and_then(|p| p.get(k)).or(extra)
    }

    /// Whether a value of schema `s` is merged and owned part by part.
    fn granular(&self, s: Option<&'a Value>, v: &Value) -> bool {
        let non_empty = v.as_object().is_some_and(|m| !m.is_empty())
            || v.as_array().is_some_and(|a| !a.is_empty());
        non_empty && !matches!(self.kind(s, v), Kind::Atomic)
    }

    /// Adds the fields `v` sets to `set`.
    fn fields(&self, s: Option<&'a Value>, v: &Value, set: &mut FieldSet) {
        match self.kind(s, v) {
            Kind::Fields(props, extra) => {
                for (k, c) in v.as_object().into_iter().flatten() {
                    let cs = Self::field_schema(props, extra, k);
                    let node = set.child(format!("f:{k}"));
                    if self.granular(cs, c) {
                        self.fields(cs, c, node);
                    } else {
                        node.member = true;
                    }
                }
            }
            Kind::ListMap(keys, item) => {
                for it in v.as_array().into_iter().flatten() {
                    let node = set.child(format!("k:{}", key_of(it, &keys)));
                    node.member = true;
                    self.fields(item, it, node);
                }
            }
            Kind::ListSet => {
                for it in v.as_array().into_iter().flatten() {
                    set.child(format!("v:{it}")).member = true;
                }
            }
            Kind::Atomic => set.member = true,
        }
    }

    /// Merges `applied` into `live`.
    fn merge(&self, s: Option<&'a Value>, live: &mut Value, applied: &Value) {
        match self.kind(s, applied) {
            Kind::Fields(props, extra) if live.is_object() => {
                let (Some(l), Some(a)) = (live.as_object_mut(), applied.as_object()) else {
                    return;
                };
                for (k, av) in a {
                    let cs = Self::field_schema(props, extra, k);
                    match l.get_mut(k) {
                        Some(lv) if self.granular(cs, av) && same_shape(lv, av) => {
                            self.merge(cs, lv, av)
                        }
                        _ => {
                            l.insert(k.clone(), av.clone());
                        }
                    }
                }
            }
            Kind::ListMap(keys, item) if live.is_array() => {
                let Some(l) = live.as_array_mut() else { return };
                for it in applied.as_array().into_iter().flatten() {
                    let k = key_of(it, &keys);
                    match l.iter_mut().find(|x| key_of(x, &keys) == k) {
                        Some(x) => self.merge(item, x, it),
                        None => l.push(it.clone()),
                    }
                }
            }
            Kind::ListSet if live.is_array() => {
                let Some(l) = live.as_array_mut() else { return };
                for it in applied.as_array().into_iter().flatten() {
                    if !l.contains(it) {
                        l.push(it.clone());
                    }
                }
            }
            _ => *live = applied.clone(),
        }
    }
}

fn same_shape(a: &Value, b: &Value) -> bool {
    (a.is_object() && b.is_object()) || (a.is_array() && b.is_array())
}

/// The keys of a list-map item, as `k:` writes them.
fn key_of(item: &Value, keys: &[String]) -> String {
    let mut m = Map::new();
    for k in keys {
        if let Some(v) = item.get(k) {
            m.insert(k.clone(), v.clone());
        }
    }
    Value::Object(m).to_string()
}

/// The value at `path`, if the object has one there.
fn value_at<'v>(v: &'v Value, path: &[String]) -> Option<&'v Value> {
    let Some((k, rest)) = path.split_first() else {
        return Some(v);
    };
    let next = if let Some(f) = k.strip_prefix("f:") {
        v.get(f)?
    } else if let Some(keys) = k.strip_prefix("k:") {
        let want: Map<String, Value> = serde_json::from_str(keys).ok()?;
        v.as_array()?
            .iter()
            .find(|it| want.iter().all(|(wk, wv)| it.get(wk) == Some(wv)))?
    } else if let Some(item) = k.strip_prefix("v:") {
        let want: Value = serde_json::from_str(item).ok()?;
        v.as_array()?.iter().find(|it| **it == want)?
    } else {
        return None;
    };
    value_at(next, rest)
}

/// Removes what `path` names from `v`.
fn remove_at(v: &mut Value, path: &[String]) {
    let Some((k, rest)) = path.split_first() else {
        return;
    };
    if let Some(f) = k.strip_prefix("f:") {
        let Some(m) = v.as_object_mut() else { return };
        if rest.is_empty() {
            m.remove(f);
        } else if let Some(c) = m.get_mut(f) {
            remove_at(c, rest);
        }
        return;
    }
    let Some(a) = v.as_array_mut() else { return };
    let at = if let Some(keys) = k.strip_prefix("k:") {
        let want: Map<String, Value> = serde_json::from_str(keys).unwrap_or_default();
        a.iter()
            .position(|it| want.iter().all(|(wk, wv)| it.get(wk) == Some(wv)))
    } else {
        let want: Value = serde_json::from_str(k.trim_start_matches("v:")).unwrap_or(Value::Null);
        a.iter().position(|it| *it == want)
    };
    if let Some(i) = at {
        if rest.is_empty() {
            a.remove(i);
        } else {
            remove_at(&mut a[i], rest);
        }
    }
}

/// `.spec.containers[name="a"].image`, as a conflict names a field.
pub fn display(path: &[String]) -> String {
    let mut out = String::new();
    for k in path {
        if let Some(f) = k.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(keys) = k.strip_prefix("k:") {
            let m: Map<String, Value> = serde_json::from_str(keys).unwrap_or_default();
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = k.strip_prefix("v:") {
            out.push_str(&format!("[={v}]"));
        }
    }
    out
}

/// One entry of `metadata.managedFields`.
#[derive(Clone, Debug)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub subresource: String,
    pub time: String,
    pub fields: FieldSet,
}

impl Entry {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "manager": self.manager, "operation": self.operation, "apiVersion": self.api_version,
            "time": self.time, "fieldsType": "FieldsV1", "fieldsV1": self.fields.to_v1(),
        });
        if !self.subresource.is_empty() {
            v["subresource"] = json!(self.subresource);
        }
        v
    }
}

pub fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let s = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            Entry {
                manager: s("manager"),
                operation: s("operation"),
                api_version: s("apiVersion"),
                subresource: s("subresource"),
                time: s("time"),
                fields: FieldSet::from_v1(e.get("fieldsV1").unwrap_or(&Value::Null)),
            }
        })
        .collect()
}

pub fn set_entries(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(Entry::to_json)
        .collect();
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// The object's fields, by the schema of its kind, without the metadata
/// no one owns (and without its status, unless `status`).
fn owned_fields(api_version: &str, kind: &str, obj: &Value, status: bool) -> FieldSet {
    let defs = openapi::definitions();
    let schema = Schema { defs };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let root = openapi::definition(group, version, kind);
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        if !status {
            m.remove("status");
        }
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            for f in UNOWNED_META {
                meta.remove(*f);
            }
            if meta.is_empty() {
                m.remove("metadata");
            }
        }
    }
    let mut set = FieldSet::default();
    schema.fields(root, &o, &mut set);
    set.member = false;
    set
}

/// What one write is.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: String,
    pub kind: &'a str,
    /// `status` for a write to the status subresource, else empty.
    pub subresource: &'a str,
    pub now: &'a str,
}

/// Records an `Update` by `w` from `old` (none for a create) to `new`:
/// `new` gets its managedFields.
pub fn record_update(w: &Writer<'_>, old: Option<&Value>, new: &mut Value) {
    let status = w.subresource == "status";
    let mut list = old.map(entries).unwrap_or_default();
    let before = old
        .map(|o| owned_fields(&w.api_version, w.kind, o, status))
        .unwrap_or_default();
    let after = owned_fields(&w.api_version, w.kind, new, status);
    let mut changed = Vec::new();
    for p in after.members() {
        if old.is_none_or(|o| value_at(o, &p) != value_at(new, &p)) {
            changed.push(p);
        }
    }
    let gone: Vec<Vec<String>> = before
        .members()
        .into_iter()
        .filter(|p| !after.contains(p))
        .collect();
    if changed.is_empty() && gone.is_empty() && old.is_some() {
        set_entries(new, &list);
        return;
    }
    for e in list.iter_mut() {
        for p in changed.iter().chain(&gone) {
            e.fields.remove(p);
        }
    }
    let at = list.iter().position(|e| {
        e.manager == w.manager && e.operation == "Update" && e.subresource == w.subresource
    });
    let i = match at {
        Some(i) => i,
        None => {
            list.push(Entry {
                manager: w.manager.to_string(),
                operation: "Update".into(),
                api_version: w.api_version.clone(),
                subresource: w.subresource.to_string(),
                time: w.now.to_string(),
                fields: FieldSet::default(),
            });
            list.len() - 1
        }
    };
    list[i].time = w.now.to_string();
    list[i].api_version = w.api_version.clone();
    for p in &changed {
        list[i].fields.insert(p);
    }
    set_entries(new, &list);
}

/// A field another manager owns with another value.
#[derive(Debug, PartialEq)]
pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    pub field: String,
}

/// Applies `applied` by `w` over `live` (none: nothing there yet): the
/// merged object with its managedFields, or the conflicts.
pub fn apply(
    w: &Writer<'_>,
    live: Option<&Value>,
    applied: &Value,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let defs = openapi::definitions();
    let schema = Schema { defs };
    let (group, version) = w
        .api_version
        .split_once('/')
        .unwrap_or(("", w.api_version.as_str()));
    let root = openapi::definition(group, version, w.kind);
    let mut list = live.map(entries).unwrap_or_default();
    let mine = owned_fields(&w.api_version, w.kind, applied, false);
    let members = mine.members();
    let mut conflicts = Vec::new();
    if let Some(live) = live {
        for e in list.iter_mut() {
            if e.manager == w.manager {
                continue;
            }
            let mut taken = Vec::new();
            for p in &members {
                if !e.fields.contains(p) {
                    continue;
                }
                // A list item's own membership is its existence, which
                // two managers may share.
                let item = p
                    .last()
                    .is_some_and(|k| k.starts_with("k:") || k.starts_with("v:"));
                if !item && value_at(live, p) != value_at(applied, p) {
                    if force {
                        taken.push(p.clone());
                    } else {
                        conflicts.push(Conflict {
                            manager: e.manager.clone(),
                            api_version: e.api_version.clone(),
                            field: display(p),
                        });
                    }
                }
            }
            for p in taken {
                e.fields.remove(&p);
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    let mut merged = live.cloned().unwrap_or_else(|| applied.clone());
    if live.is_some() {
        let mut body = applied.clone();
        if let Some(m) = body.as_object_mut() {
            m.remove("status");
            if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
                for f in UNOWNED_META {
                    meta.remove(*f);
                }
            }
        }
        schema.merge(root, &mut merged, &body);
        // What this manager applied before and no longer does goes, unless
        // another manager owns it too.
        let before = list
            .iter()
            .find(|e| e.manager == w.manager && e.operation == "Apply")
            .map(|e| e.fields.clone())
            .unwrap_or_default();
        let mut gone: Vec<Vec<String>> = before
            .members()
            .into_iter()
            .filter(|p| !mine.contains(p))
            .filter(|p| {
                !list.iter().any(|e| {
                    !(e.manager == w.manager && e.operation == "Apply") && e.fields.contains(p)
                })
            })
            .collect();
        // Deepest first, so an item goes after its fields.
        gone.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in gone {
            remove_at(&mut merged, &p);
        }
    }
    list.retain(|e| !(e.manager == w.manager && e.operation == "Apply"));
    list.push(Entry {
        manager: w.manager.to_string(),
        operation: "Apply".into(),
        api_version: w.api_version.clone(),
        subresource: String::new(),
        time: w.now.to_string(),
        fields: mine,
    });
    set_entries(&mut merged, &list);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer<'a>(manager: &'a str) -> Writer<'a> {
        Writer {
            manager,
            api_version: "apps/v1".into(),
            kind: "Deployment",
            subresource: "",
            now: "2026-12-05T00:00:00Z",
        }
    }

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "a", "image": image}]}}}})
    }

    #[test]
    fn apply_owns_merges_and_conflicts_by_field() {
        let first =
            apply(&writer("alice"), None, &deployment(2, "x:1"), false).expect("first apply");
        let fields = &first["metadata"]["managedFields"][0]["fieldsV1"];
        assert_eq!(fields["f:spec"]["f:replicas"], json!({}));
        assert_eq!(
            fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"a\"}"],
            json!({".": {}, "f:image": {}, "f:name": {}})
        );
        // Another manager setting a field alice owns to another value
        // conflicts; the same value does not.
        let err = apply(
            &writer("bob"),
            Some(&first),
            &json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"}, "spec": {"replicas": 3}}),
            false,
        )
        .expect_err("a conflict");
        assert_eq!(
            err,
            [Conflict {
                manager: "alice".into(),
                api_version: "apps/v1".into(),
                field: ".spec.replicas".into()
            }]
        );
        let shared = apply(
            &writer("bob"),
            Some(&first),
            &json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"}, "spec": {"replicas": 2}}),
            false,
        )
        .expect("same value");
        assert_eq!(entries(&shared).len(), 2);
        // Forced, bob takes it; alice's later apply without replicas
        // leaves it to bob.
        let forced = apply(
            &writer("bob"),
            Some(&first),
            &json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"}, "spec": {"replicas": 5}}),
            true,
        )
        .expect("forced");
        assert_eq!(forced["spec"]["replicas"], 5);
        let mut without = deployment(0, "x:2");
        without["spec"]
            .as_object_mut()
            .map(|m| m.remove("replicas"));
        let again = apply(&writer("alice"), Some(&forced), &without, false).expect("alice again");
        assert_eq!(again["spec"]["replicas"], 5);
        assert_eq!(
            again["spec"]["template"]["spec"]["containers"][0]["image"],
            "x:2"
        );
        // A field alice stops applying, that no one else owns, goes.
        let mut fewer = without.clone();
        fewer["metadata"]
            .as_object_mut()
            .map(|m| m.remove("labels"));
        let last = apply(&writer("alice"), Some(&again), &fewer, false).expect("fewer");
        assert!(last["metadata"].get("labels").is_none(), "{last}");
    }

    #[test]
    fn updates_take_what_they_change() {
        let first = apply(&writer("alice"), None, &deployment(2, "x:1"), false).expect("apply");
        let mut scaled = first.clone();
        scaled["spec"]["replicas"] = json!(4);
        record_update(&writer("kubectl-scale"), Some(&first), &mut scaled);
        let list = entries(&scaled);
        let alice = list.iter().find(|e| e.manager == "alice").expect("alice");
        assert!(
            !alice
                .fields
                .contains(&["f:spec".into(), "f:replicas".into()])
        );
        let scale = list
            .iter()
            .find(|e| e.manager == "kubectl-scale")
            .expect("scale");
        assert_eq!(scale.operation, "Update");
        assert_eq!(
            scale.fields.members(),
            [vec!["f:spec".to_string(), "f:replicas".to_string()]]
        );
        assert_eq!(
            display(&[
                "f:spec".into(),
                "k:{\"name\":\"a\"}".into(),
                "f:image".into()
            ]),
            ".spec[name=\"a\"].image"
        );
    }
}
