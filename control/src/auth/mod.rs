//! Who a request comes from and what it may do.
//!
//! Authentication ([`authn`]) turns a request's credential into a [`User`]:
//! the admin token, a client certificate signed by the cluster CA, a
//! bootstrap token, a ServiceAccount token, or nobody (`system:anonymous`).
//! Authorization runs upstream's `Node,RBAC` chain: `system:masters` may do
//! anything; a node's credential is judged by the Node authorizer
//! ([`node`]), which also applies NodeRestriction's limits on what a node
//! may write; everyone else by RBAC ([`rbac`]).

pub mod authn;
pub mod bootstrap;
pub mod csr;
pub mod mirror;
pub mod node;
pub mod policy;
pub mod rbac;
pub mod serviceaccount;

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::status::ApiError;
use crate::storage::store::Store;

pub const MASTERS: &str = "system:masters";
pub const AUTHENTICATED: &str = "system:authenticated";
pub const UNAUTHENTICATED: &str = "system:unauthenticated";
pub const ANONYMOUS: &str = "system:anonymous";
pub const NODES: &str = "system:nodes";
pub const NODE_PREFIX: &str = "system:node:";
pub const BOOTSTRAPPERS: &str = "system:bootstrappers";
pub const SA_PREFIX: &str = "system:serviceaccount:";

/// An authenticated (or anonymous) requester.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl User {
    /// A user with `groups` plus `system:authenticated`.
    pub fn authenticated(name: impl Into<String>, groups: Vec<String>) -> Self {
        let mut groups = groups;
        if !groups.iter().any(|g| g == AUTHENTICATED) {
            groups.push(AUTHENTICATED.to_string());
        }
        Self {
            name: name.into(),
            uid: String::new(),
            groups,
        }
    }

    pub fn anonymous() -> Self {
        Self {
            name: ANONYMOUS.to_string(),
            uid: String::new(),
            groups: vec![UNAUTHENTICATED.to_string()],
        }
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// The node this user is, when it is a node's credential.
    pub fn node_name(&self) -> Option<&str> {
        if !self.in_group(NODES) {
            return None;
        }
        self.name
            .strip_prefix(NODE_PREFIX)
            .filter(|n| !n.is_empty())
    }
}

/// What a request asks to do, in RBAC's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attributes {
    Resource(ResourceAttributes),
    NonResource { verb: String, path: String },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceAttributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

impl ResourceAttributes {
    /// `pods` or `pods/status`.
    pub fn resource_path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

impl fmt::Display for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attributes::NonResource { verb, path } => write!(f, "{verb} path {path:?}"),
            Attributes::Resource(a) => {
                write!(
                    f,
                    "{} resource {:?} in API group {:?}",
                    a.verb,
                    a.resource_path(),
                    a.group
                )?;
                if a.namespace.is_empty() {
                    write!(f, " at the cluster scope")
                } else {
                    write!(f, " in the namespace {:?}", a.namespace)
                }
            }
        }
    }
}

/// The RBAC verb of an HTTP method on a resource path.
pub fn verb(method: &http::Method, named: bool, watching: bool) -> &'static str {
    match *method {
        http::Method::GET | http::Method::HEAD if watching => "watch",
        http::Method::GET | http::Method::HEAD if named => "get",
        http::Method::GET | http::Method::HEAD => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if named => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

/// An authorizer's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Not allowed; the reason (may be empty) is added to the 403.
    Deny(String),
}

/// Upstream's `Node,RBAC` chain, with `system:masters` above both.
pub struct Authorizer {
    store: Store,
    rbac: Arc<rbac::Rbac>,
    graph: node::Graph,
}

impl Authorizer {
    /// Reads the RBAC policy, the pods' bindings and the Ingresses' TLS
    /// Secrets, and follows them.
    pub async fn start(store: Store) -> Result<Self, crate::storage::store::StoreError> {
        let rbac = rbac::Rbac::start(store.clone()).await?;
        let graph = node::Graph::default();
        mirror::start(store.clone(), "/registry/pods/", graph.pods.clone()).await?;
        mirror::start(store.clone(), "/registry/ingresses/", graph.tls.clone()).await?;
        Ok(Self { store, rbac, graph })
    }

    /// `body` is the object of a create, which the Node authorizer reads.
    pub async fn authorize(
        &self,
        user: &User,
        attrs: &Attributes,
        body: Option<&Value>,
    ) -> Decision {
        if user.in_group(MASTERS) {
            return Decision::Allow;
        }
        let mut reason = String::new();
        if let (Some(node), Attributes::Resource(a)) = (user.node_name(), attrs) {
            match node::authorize(&self.store, &self.graph, node, a, body).await {
                Decision::Allow => return Decision::Allow,
                Decision::Deny(r) => reason = r,
            }
        }
        if self.rbac.allows(user, attrs) {
            return Decision::Allow;
        }
        Decision::Deny(reason)
    }

    pub fn rbac(&self) -> &rbac::Rbac {
        &self.rbac
    }
}

/// The 403 upstream answers: names the user, the verb and the resource.
pub fn forbidden(user: &User, attrs: &Attributes, reason: &str) -> ApiError {
    let mut why = format!("User {:?} cannot {attrs}", user.name);
    if !reason.is_empty() {
        why.push_str(": ");
        why.push_str(reason);
    }
    match attrs {
        Attributes::NonResource { .. } => ApiError::forbidden_path(&why),
        Attributes::Resource(a) => ApiError::forbidden(&a.group, &a.resource, &a.name, &why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_names_user_verb_and_resource() {
        let user = User::authenticated("system:node:n1", vec![NODES.into()]);
        let attrs = Attributes::Resource(ResourceAttributes {
            verb: "patch".into(),
            resource: "pods".into(),
            subresource: "status".into(),
            namespace: "default".into(),
            name: "web".into(),
            ..Default::default()
        });
        let s = forbidden(&user, &attrs, "").to_status().to_value();
        assert_eq!(s["code"], 403);
        assert_eq!(s["reason"], "Forbidden");
        assert_eq!(
            s["message"],
            "pods \"web\" is forbidden: User \"system:node:n1\" cannot patch resource \"pods/status\" in API group \"\" in the namespace \"default\""
        );
        let list = Attributes::Resource(ResourceAttributes {
            verb: "list".into(),
            group: "apps".into(),
            resource: "deployments".into(),
            ..Default::default()
        });
        let s = forbidden(&User::anonymous(), &list, "")
            .to_status()
            .to_value();
        assert_eq!(
            s["message"],
            "deployments.apps is forbidden: User \"system:anonymous\" cannot list resource \"deployments\" in API group \"apps\" at the cluster scope"
        );
        let path = Attributes::NonResource {
            verb: "get".into(),
            path: "/api".into(),
        };
        let s = forbidden(&User::anonymous(), &path, "")
            .to_status()
            .to_value();
        assert_eq!(
            s["message"],
            "forbidden: User \"system:anonymous\" cannot get path \"/api\""
        );
    }

    #[test]
    fn node_users() {
        let n = User::authenticated("system:node:n1", vec![NODES.into()]);
        assert_eq!(n.node_name(), Some("n1"));
        let not_in_group = User::authenticated("system:node:n1", vec![]);
        assert_eq!(not_in_group.node_name(), None);
    }

    #[test]
    fn verbs() {
        use http::Method;
        assert_eq!(verb(&Method::GET, false, true), "watch");
        assert_eq!(verb(&Method::GET, true, false), "get");
        assert_eq!(verb(&Method::GET, false, false), "list");
        assert_eq!(verb(&Method::DELETE, false, false), "deletecollection");
    }
}
