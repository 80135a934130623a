//! RBAC (rbac.authorization.k8s.io/v1): Roles and ClusterRoles grant rules,
//! RoleBindings and ClusterRoleBindings give them to users, groups and
//! ServiceAccounts. The four kinds are kept in memory ([`super::mirror`]),
//! so a decision costs no storage read.
//!
//! A ClusterRole with an `aggregationRule` also grants the rules of every
//! ClusterRole its selectors match (one level deep), as upstream's
//! aggregation controller would have copied them in.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::Value;

use super::{Attributes, SA_PREFIX, User};
use crate::selector::LabelSelector;
use crate::storage::store::Store;

/// One rule of a Role or ClusterRole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub verbs: Vec<String>,
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub resource_names: Vec<String>,
    pub non_resource_urls: Vec<String>,
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn has(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

impl Rule {
    pub fn from_json(v: &Value) -> Self {
        Self {
            verbs: strings(v.get("verbs")),
            api_groups: strings(v.get("apiGroups")),
            resources: strings(v.get("resources")),
            resource_names: strings(v.get("resourceNames")),
            non_resource_urls: strings(v.get("nonResourceURLs")),
        }
    }

    pub fn allows(&self, attrs: &Attributes) -> bool {
        match attrs {
            Attributes::Resource(a) => {
                if !has(&self.verbs, &a.verb) || !has(&self.api_groups, &a.group) {
                    return false;
                }
                let path = a.resource_path();
                let resource_ok = self.resources.iter().any(|r| {
                    r == "*"
                        || *r == path
                        || (!a.subresource.is_empty()
                            && r.strip_prefix("*/") == Some(a.subresource.as_str()))
                });
                resource_ok
                    && (self.resource_names.is_empty()
                        || (!a.name.is_empty() && self.resource_names.contains(&a.name)))
            }
            Attributes::NonResource { verb, path } => {
                has(&self.verbs, verb)
                    && self.non_resource_urls.iter().any(|u| {
                        u == "*"
                            || u == path
                            || u.strip_suffix('*').is_some_and(|p| path.starts_with(p))
                    })
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Role {
    rules: Vec<Rule>,
    labels: serde_json::Map<String, Value>,
    /// `aggregationRule.clusterRoleSelectors` (matchLabels).
    aggregate: Vec<LabelSelector>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Subject {
    kind: String,
    name: String,
    namespace: String,
}

#[derive(Clone, Debug)]
struct Binding {
    /// Empty for a ClusterRoleBinding.
    namespace: String,
    role_kind: String,
    role_name: String,
    subjects: Vec<Subject>,
}

impl Binding {
    fn names(&self, user: &User) -> bool {
        self.subjects.iter().any(|s| match s.kind.as_str() {
            "User" => s.name == user.name,
            "Group" => user.in_group(&s.name),
            "ServiceAccount" => {
                let ns = if s.namespace.is_empty() {
                    &self.namespace
                } else {
                    &s.namespace
                };
                user.name
                    .strip_prefix(SA_PREFIX)
                    .and_then(|rest| rest.split_once(':'))
                    .is_some_and(|(n, name)| n == ns && name == s.name)
            }
            _ => false,
        })
    }
}

/// Which of the four kinds a key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    ClusterRole,
    Role,
    ClusterRoleBinding,
    RoleBinding,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::ClusterRole,
        Kind::Role,
        Kind::ClusterRoleBinding,
        Kind::RoleBinding,
    ];

    fn prefix(self) -> &'static str {
        match self {
            Kind::ClusterRole => "/registry/clusterroles/",
            Kind::Role => "/registry/roles/",
            Kind::ClusterRoleBinding => "/registry/clusterrolebindings/",
            Kind::RoleBinding => "/registry/rolebindings/",
        }
    }
}

/// The whole policy at one moment.
#[derive(Debug, Default)]
pub struct Policy {
    cluster_roles: HashMap<String, Role>,
    roles: HashMap<(String, String), Role>,
    cluster_bindings: HashMap<String, Binding>,
    bindings: HashMap<(String, String), Binding>,
}

impl Policy {
    fn apply(&mut self, kind: Kind, obj: &Value, present: bool) {
        let (ns, name) = super::mirror::ns_name(obj);
        match kind {
            Kind::ClusterRole | Kind::Role => {
                let role = Role {
                    rules: obj
                        .get("rules")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().map(Rule::from_json).collect())
                        .unwrap_or_default(),
                    labels: obj
                        .pointer("/metadata/labels")
                        .and_then(Value::as_object)
                        .cloned()
                        .unwrap_or_default(),
                    aggregate: obj
                        .pointer("/aggregationRule/clusterRoleSelectors")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| s.get("matchLabels").and_then(Value::as_object))
                                .map(LabelSelector::from_map)
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                if kind == Kind::ClusterRole {
                    if present {
                        self.cluster_roles.insert(name, role);
                    } else {
                        self.cluster_roles.remove(&name);
                    }
                } else if present {
                    self.roles.insert((ns, name), role);
                } else {
                    self.roles.remove(&(ns, name));
                }
            }
            Kind::ClusterRoleBinding | Kind::RoleBinding => {
                let s = |p: &str| {
                    obj.pointer(p)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                let binding = Binding {
                    namespace: ns.clone(),
                    role_kind: s("/roleRef/kind"),
                    role_name: s("/roleRef/name"),
                    subjects: obj
                        .get("subjects")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .map(|x| Subject {
                                    kind: str_of(x, "kind"),
                                    name: str_of(x, "name"),
                                    namespace: str_of(x, "namespace"),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                if kind == Kind::ClusterRoleBinding {
                    if present {
                        self.cluster_bindings.insert(name, binding);
                    } else {
                        self.cluster_bindings.remove(&name);
                    }
                } else if present {
                    self.bindings.insert((ns, name), binding);
                } else {
                    self.bindings.remove(&(ns, name));
                }
            }
        }
    }

    /// The rules a binding's role grants (with what it aggregates).
    fn rules_of<'a>(&'a self, b: &Binding) -> Vec<&'a Rule> {
        let role = match b.role_kind.as_str() {
            "ClusterRole" => self.cluster_roles.get(&b.role_name),
            "Role" => self.roles.get(&(b.namespace.clone(), b.role_name.clone())),
            _ => None,
        };
        let Some(role) = role else {
            return Vec::new();
        };
        let mut out: Vec<&Rule> = role.rules.iter().collect();
        for sel in &role.aggregate {
            for (name, other) in &self.cluster_roles {
                if *name != b.role_name && sel.matches(Some(&other.labels)) {
                    out.extend(other.rules.iter());
                }
            }
        }
        out
    }

    /// The bindings that apply to `user` for a request in `namespace`.
    fn bindings_for<'a>(
        &'a self,
        user: &'a User,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Binding> + 'a {
        let local = self
            .bindings
            .values()
            .filter(move |b| !namespace.is_empty() && b.namespace == namespace);
        self.cluster_bindings
            .values()
            .chain(local)
            .filter(move |b| b.names(user))
    }

    pub fn allows(&self, user: &User, attrs: &Attributes) -> bool {
        let ns = match attrs {
            Attributes::Resource(a) => a.namespace.as_str(),
            Attributes::NonResource { .. } => "",
        };
        self.bindings_for(user, ns)
            .any(|b| self.rules_of(b).iter().any(|r| r.allows(attrs)))
    }

    /// Every rule `user` holds in `namespace` (SelfSubjectRulesReview).
    pub fn rules_for(&self, user: &User, namespace: &str) -> Vec<Rule> {
        let mut out: Vec<Rule> = Vec::new();
        for b in self.bindings_for(user, namespace) {
            for r in self.rules_of(b) {
                if !out.contains(r) {
                    out.push(r.clone());
                }
            }
        }
        out
    }
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// One of the four kinds, as a mirrored view of the policy.
struct KindView {
    rbac: Arc<Rbac>,
    kind: Kind,
}

impl super::mirror::View for KindView {
    fn reset(&self) {
        let mut p = self.rbac.policy.write().unwrap_or_else(|e| e.into_inner());
        match self.kind {
            Kind::ClusterRole => p.cluster_roles.clear(),
            Kind::Role => p.roles.clear(),
            Kind::ClusterRoleBinding => p.cluster_bindings.clear(),
            Kind::RoleBinding => p.bindings.clear(),
        }
    }

    fn apply(&self, obj: &Value, present: bool) {
        self.rbac
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(self.kind, obj, present);
    }
}

/// The policy, kept current from etcd.
pub struct Rbac {
    policy: RwLock<Policy>,
}

impl Rbac {
    /// Reads the four kinds, then follows them in the background.
    pub async fn start(store: Store) -> Result<Arc<Self>, crate::storage::store::StoreError> {
        let rbac = Arc::new(Self {
            policy: RwLock::new(Policy::default()),
        });
        for kind in Kind::ALL {
            let view = Arc::new(KindView {
                rbac: rbac.clone(),
                kind,
            });
            super::mirror::start(store.clone(), kind.prefix(), view).await?;
        }
        Ok(rbac)
    }

    pub fn allows(&self, user: &User, attrs: &Attributes) -> bool {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .allows(user, attrs)
    }

    pub fn rules_for(&self, user: &User, namespace: &str) -> Vec<Rule> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .rules_for(user, namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::super::ResourceAttributes;
    use super::*;
    use serde_json::json;

    fn res(verb: &str, group: &str, resource: &str, sub: &str, ns: &str, name: &str) -> Attributes {
        Attributes::Resource(ResourceAttributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
        })
    }

    fn policy(objs: &[(Kind, Value)]) -> Policy {
        let mut p = Policy::default();
        for (k, o) in objs {
            p.apply(*k, o, true);
        }
        p
    }

    #[test]
    fn rules_match_verbs_groups_resources_and_names() {
        let r = Rule::from_json(
            &json!({"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods", "pods/log"], "resourceNames": ["web"]}),
        );
        assert!(r.allows(&res("get", "", "pods", "", "d", "web")));
        assert!(r.allows(&res("get", "", "pods", "log", "d", "web")));
        assert!(!r.allows(&res("get", "", "pods", "exec", "d", "web")));
        assert!(!r.allows(&res("get", "", "pods", "", "d", "db")));
        assert!(
            !r.allows(&res("list", "", "pods", "", "d", "")),
            "resourceNames never match a list"
        );
        assert!(!r.allows(&res("get", "apps", "pods", "", "d", "web")));
        let sub =
            Rule::from_json(&json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*/scale"]}));
        assert!(sub.allows(&res("update", "apps", "deployments", "scale", "d", "x")));
        assert!(!sub.allows(&res("update", "apps", "deployments", "", "d", "x")));
        let urls =
            Rule::from_json(&json!({"verbs": ["get"], "nonResourceURLs": ["/apis/*", "/version"]}));
        let get = |p: &str| Attributes::NonResource {
            verb: "get".into(),
            path: p.into(),
        };
        assert!(urls.allows(&get("/apis/apps/v1")));
        assert!(urls.allows(&get("/version")));
        assert!(!urls.allows(&get("/versionx")));
    }

    #[test]
    fn bindings_grant_within_their_namespace() {
        let p = policy(&[
            (
                Kind::Role,
                json!({"metadata": {"name": "reader", "namespace": "a"}, "rules": [{"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods"]}]}),
            ),
            (
                Kind::RoleBinding,
                json!({"metadata": {"name": "r", "namespace": "a"}, "roleRef": {"kind": "Role", "name": "reader"}, "subjects": [{"kind": "User", "name": "alice"}, {"kind": "ServiceAccount", "name": "bot"}]}),
            ),
            (
                Kind::ClusterRole,
                json!({"metadata": {"name": "view"}, "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg": "view"}}]}}),
            ),
            (
                Kind::ClusterRole,
                json!({"metadata": {"name": "view-deploys", "labels": {"agg": "view"}}, "rules": [{"verbs": ["get"], "apiGroups": ["apps"], "resources": ["deployments"]}]}),
            ),
            (
                Kind::ClusterRoleBinding,
                json!({"metadata": {"name": "devs-view"}, "roleRef": {"kind": "ClusterRole", "name": "view"}, "subjects": [{"kind": "Group", "name": "devs"}]}),
            ),
        ]);
        let alice = User::authenticated("alice", vec![]);
        assert!(p.allows(&alice, &res("list", "", "pods", "", "a", "")));
        assert!(!p.allows(&alice, &res("list", "", "pods", "", "b", "")));
        assert!(!p.allows(&alice, &res("delete", "", "pods", "", "a", "x")));
        let bot = super::super::serviceaccount::service_account_user("a", "bot");
        assert!(p.allows(&bot, &res("get", "", "pods", "", "a", "x")));
        let other_bot = super::super::serviceaccount::service_account_user("b", "bot");
        assert!(!p.allows(&other_bot, &res("get", "", "pods", "", "b", "x")));
        let dev = User::authenticated("bob", vec!["devs".into()]);
        assert!(
            p.allows(&dev, &res("get", "apps", "deployments", "", "z", "w")),
            "aggregated rule"
        );
        assert!(!p.allows(&dev, &res("delete", "apps", "deployments", "", "z", "w")));
        assert_eq!(p.rules_for(&dev, "z").len(), 1);
        // Deleting the binding takes the grant away.
        let mut p = p;
        p.apply(
            Kind::RoleBinding,
            &json!({"metadata": {"name": "r", "namespace": "a"}}),
            false,
        );
        assert!(!p.allows(&alice, &res("list", "", "pods", "", "a", "")));
    }
}
