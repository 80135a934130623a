//! The requests about access itself: access and rules reviews (`kubectl
//! auth can-i`), whoami, token reviews, the TokenRequest subresource
//! (`kubectl create token`), and CertificateSigningRequests, which record
//! who asked.

use std::time::Duration;

use http::Method;
use hyper::Response;
use serde_json::{Value, json};

use super::fields::str_at;
use super::objects::Write;
use super::{Api, Body, Target, json_response};
use crate::auth::serviceaccount::{self, Bound, Ref, Tokens};
use crate::auth::{Attributes, Decision, ResourceAttributes, User};
use crate::resources::{self, Resource};
use crate::status::{ApiError, Cause};

fn user_info(u: &User) -> Value {
    let mut info = json!({"username": u.name, "groups": u.groups});
    if !u.uid.is_empty() {
        info["uid"] = json!(u.uid);
    }
    info
}

/// The attributes a SubjectAccessReview's spec asks about.
fn review_attributes(spec: &Value, namespace: Option<&str>) -> Result<Attributes, ApiError> {
    if let Some(r) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        let s = |k: &str| {
            r.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        return Ok(Attributes::Resource(ResourceAttributes {
            verb: s("verb"),
            group: s("group"),
            resource: s("resource"),
            subresource: s("subresource"),
            namespace: namespace
                .map(String::from)
                .unwrap_or_else(|| s("namespace")),
            name: s("name"),
        }));
    }
    if let Some(n) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
        return Ok(Attributes::NonResource {
            verb: str_at(n, "/verb").to_string(),
            path: str_at(n, "/path").to_string(),
        });
    }
    Err(ApiError::invalid(
        "authorization.k8s.io",
        "SubjectAccessReview",
        "",
        vec![Cause::required("spec.resourceAttributes")],
    ))
}

fn rules_json(rules: &[crate::auth::rbac::Rule]) -> (Vec<Value>, Vec<Value>) {
    let mut resource = Vec::new();
    let mut non_resource = Vec::new();
    for r in rules {
        if r.non_resource_urls.is_empty() {
            let mut v =
                json!({"verbs": r.verbs, "apiGroups": r.api_groups, "resources": r.resources});
            if !r.resource_names.is_empty() {
                v["resourceNames"] = json!(r.resource_names);
            }
            resource.push(v);
        } else {
            non_resource.push(json!({"verbs": r.verbs, "nonResourceURLs": r.non_resource_urls}));
        }
    }
    (resource, non_resource)
}

/// Where the ServiceAccount volume is mounted in every container.
pub const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The token lifetime of the admitted volume (upstream's 3607 s: an hour
/// and a little, so that kubelets refresh it well before it ends).
const SA_TOKEN_SECONDS: i64 = 3607;

impl Api {
    /// ServiceAccount admission for a new pod: the account defaults to
    /// `default`, a named account must exist, and unless automounting is
    /// off (on the pod or its account) every container gets the
    /// `kube-api-access-*` projected volume: a bound token, the cluster CA
    /// (`kube-root-ca.crt`) and the namespace, at the standard path.
    pub(super) async fn admit_service_account(
        &self,
        ns: &str,
        pod: &mut Value,
    ) -> Result<(), ApiError> {
        let spec = &mut pod["spec"];
        if !spec.is_object() {
            return Ok(());
        }
        let name = [spec.get("serviceAccountName"), spec.get("serviceAccount")]
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|s| !s.is_empty())
            .unwrap_or("default")
            .to_string();
        spec["serviceAccountName"] = json!(name);
        spec["serviceAccount"] = json!(name);
        let sa_res = resources::find("", "v1", "serviceaccounts")
            .ok_or_else(|| ApiError::internal("no serviceaccounts resource"))?;
        let sa = match self.read(sa_res, Some(ns), &name).await {
            Ok((sa, _)) => Some(sa),
            // `default` appears with its namespace; the kubelet waits for it.
            Err(e) if e.code == 404 && name == "default" => None,
            Err(e) if e.code == 404 => {
                let pod_name = str_at(pod, "/metadata/name");
                return Err(ApiError::forbidden(
                    "",
                    "pods",
                    pod_name,
                    &format!(
                        "error looking up service account {ns}/{name}: serviceaccount \"{name}\" not found"
                    ),
                ));
            }
            Err(e) => return Err(e),
        };
        let spec = &mut pod["spec"];
        let automount = spec
            .get("automountServiceAccountToken")
            .and_then(Value::as_bool)
            .or_else(|| {
                sa.as_ref()
                    .and_then(|s| s.get("automountServiceAccountToken"))
                    .and_then(Value::as_bool)
            })
            .unwrap_or(true);
        if !automount {
            return Ok(());
        }
        let mounted = |c: &Value| {
            c.get("volumeMounts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|m| str_at(m, "/mountPath") == SA_MOUNT)
        };
        let volume = format!("kube-api-access-{}", super::objects::random_suffix(5));
        let mut used = false;
        for list in ["initContainers", "containers"] {
            for c in spec
                .get_mut(list)
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if !c.is_object() || mounted(c) {
                    continue;
                }
                if !c.get("volumeMounts").is_some_and(Value::is_array) {
                    c["volumeMounts"] = json!([]);
                }
                if let Some(mounts) = c["volumeMounts"].as_array_mut() {
                    mounts.push(json!({"name": volume, "readOnly": true, "mountPath": SA_MOUNT}));
                    used = true;
                }
            }
        }
        if !used {
            return Ok(());
        }
        if !spec.get("volumes").is_some_and(Value::is_array) {
            spec["volumes"] = json!([]);
        }
        if let Some(vols) = spec["volumes"].as_array_mut() {
            vols.push(json!({"name": volume, "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": SA_TOKEN_SECONDS, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ]}}));
        }
        Ok(())
    }

    /// Answers the requests this module owns; None for every other.
    pub(super) async fn access_request(
        &self,
        t: &Target,
        method: &Method,
        posted: Option<&Value>,
        user: &User,
        w: Write,
    ) -> Result<Option<Response<Body>>, ApiError> {
        let (r, ns) = (t.resource, t.namespace.as_deref());
        let sub = t.sub.as_deref();
        if r.review() {
            if *method != Method::POST || t.name.is_some() {
                return Err(ApiError::method_not_allowed(method.as_str()));
            }
            let obj = posted.ok_or_else(|| ApiError::bad_request("the request body is empty"))?;
            return self
                .review(r, ns, obj, user)
                .await
                .map(|v| Some(json_response(201, &v)));
        }
        if r.is("", "serviceaccounts") && sub == Some("token") && *method == Method::POST {
            let obj = posted.ok_or_else(|| ApiError::bad_request("the request body is empty"))?;
            let name = t.name.as_deref().unwrap_or_default();
            let v = self
                .token_request(ns.unwrap_or_default(), name, obj)
                .await?;
            return Ok(Some(json_response(201, &v)));
        }
        if r.is("certificates.k8s.io", "certificatesigningrequests")
            && *method == Method::POST
            && t.name.is_none()
        {
            // Who asked is recorded by the apiserver, never taken from the
            // client: the approver trusts it.
            let mut obj = posted
                .cloned()
                .ok_or_else(|| ApiError::bad_request("the request body is empty"))?;
            if !obj.get("spec").is_some_and(Value::is_object) {
                obj["spec"] = json!({});
            }
            obj["spec"]["username"] = json!(user.name);
            obj["spec"]["groups"] = json!(user.groups);
            obj["spec"]["uid"] = json!(user.uid);
            if let Some(m) = obj["spec"].as_object_mut() {
                m.remove("extra");
            }
            let created = self.create(r, None, obj, w).await?;
            return Ok(Some(json_response(201, &created)));
        }
        Ok(None)
    }

    async fn decide(&self, user: &User, attrs: &Attributes) -> (bool, String) {
        match self.access.authz.authorize(user, attrs, None).await {
            Decision::Allow => (true, String::new()),
            Decision::Deny(why) => (false, why),
        }
    }

    async fn review(
        &self,
        r: &Resource,
        ns: Option<&str>,
        obj: &Value,
        user: &User,
    ) -> Result<Value, ApiError> {
        let spec = obj.get("spec").cloned().unwrap_or(json!({}));
        let mut out = json!({
            "apiVersion": r.api_version(), "kind": r.kind,
            "metadata": {"creationTimestamp": null},
            "spec": spec,
        });
        match r.plural {
            "selfsubjectaccessreviews" => {
                let attrs = review_attributes(&spec, None)?;
                let (allowed, reason) = self.decide(user, &attrs).await;
                out["status"] = json!({"allowed": allowed});
                if !reason.is_empty() {
                    out["status"]["reason"] = json!(reason);
                }
            }
            "subjectaccessreviews" | "localsubjectaccessreviews" => {
                let who = User {
                    name: str_at(&spec, "/user").to_string(),
                    uid: str_at(&spec, "/uid").to_string(),
                    groups: spec
                        .get("groups")
                        .and_then(Value::as_array)
                        .map(|g| {
                            g.iter()
                                .filter_map(Value::as_str)
                                .map(String::from)
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                if who.name.is_empty() && who.groups.is_empty() {
                    return Err(ApiError::invalid(
                        r.group,
                        r.kind,
                        "",
                        vec![Cause::required("spec.user")],
                    ));
                }
                let attrs = review_attributes(&spec, ns)?;
                let (allowed, reason) = self.decide(&who, &attrs).await;
                out["status"] = json!({"allowed": allowed});
                if !reason.is_empty() {
                    out["status"]["reason"] = json!(reason);
                }
            }
            "selfsubjectrulesreviews" => {
                let namespace = str_at(&spec, "/namespace");
                let (resource, non_resource) = if user.in_group(crate::auth::MASTERS) {
                    (
                        vec![json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]})],
                        vec![json!({"verbs": ["*"], "nonResourceURLs": ["*"]})],
                    )
                } else {
                    rules_json(&self.access.authz.rbac().rules_for(user, namespace))
                };
                // Rules the Node authorizer grants are not listed.
                out["status"] = json!({
                    "resourceRules": resource, "nonResourceRules": non_resource,
                    "incomplete": user.node_name().is_some(),
                });
            }
            "selfsubjectreviews" => {
                out["status"] = json!({"userInfo": user_info(user)});
            }
            "tokenreviews" => {
                let token = str_at(&spec, "/token");
                out["status"] = match self.access.authn.token_user(token).await {
                    Ok(u) => {
                        json!({"authenticated": true, "user": user_info(&u), "audiences": [serviceaccount::ISSUER]})
                    }
                    Err(e) => json!({"authenticated": false, "error": e.to_string()}),
                };
                if let Some(m) = out["spec"].as_object_mut() {
                    m.remove("token");
                }
            }
            _ => return Err(ApiError::method_not_allowed("POST")),
        }
        Ok(out)
    }

    /// `POST .../serviceaccounts/<name>/token`: a new bound token.
    async fn token_request(&self, ns: &str, name: &str, obj: &Value) -> Result<Value, ApiError> {
        let sa_res = resources::find("", "v1", "serviceaccounts")
            .ok_or_else(|| ApiError::internal("no serviceaccounts resource"))?;
        let (sa, _) = self.read(sa_res, Some(ns), name).await?;
        let spec = obj.get("spec").cloned().unwrap_or(json!({}));
        let invalid = |field: &str, value: &str, why: &str| {
            ApiError::invalid(
                "authentication.k8s.io",
                "TokenRequest",
                name,
                vec![Cause::invalid(field, value, why)],
            )
        };
        let seconds = spec
            .get("expirationSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(serviceaccount::DEFAULT_SECONDS);
        if seconds < serviceaccount::MIN_SECONDS {
            return Err(invalid(
                "spec.expirationSeconds",
                &seconds.to_string(),
                "may not specify a duration less than 10 minutes",
            ));
        }
        let seconds = seconds.min(365 * 24 * 3600);
        let audiences: Vec<String> = spec
            .get("audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let bound_ref = spec.get("boundObjectRef").filter(|v| v.is_object());
        let bound = match bound_ref {
            None => Bound::None,
            Some(b) => {
                let kind = str_at(b, "/kind");
                let plural = match kind {
                    "Pod" => "pods",
                    "Secret" => "secrets",
                    other => {
                        return Err(invalid(
                            "spec.boundObjectRef.kind",
                            other,
                            "supported values: \"Pod\", \"Secret\"",
                        ));
                    }
                };
                let res = resources::find("", "v1", plural)
                    .ok_or_else(|| ApiError::internal("no such resource"))?;
                let bound_name = str_at(b, "/name");
                let (target, _) = self.read(res, Some(ns), bound_name).await?;
                let uid = str_at(&target, "/metadata/uid").to_string();
                let given = str_at(b, "/uid");
                if !given.is_empty() && given != uid {
                    return Err(ApiError::conflict("", plural, bound_name).saying(format!(
                        "the UID in the bound object reference ({given}) does not match the UID in record ({uid}). The object might have been deleted and then recreated"
                    )));
                }
                let r = Ref {
                    name: bound_name.to_string(),
                    uid,
                };
                if kind == "Pod" {
                    Bound::Pod(r)
                } else {
                    Bound::Secret(r)
                }
            }
        };
        let sa_ref = Ref {
            name: name.to_string(),
            uid: str_at(&sa, "/metadata/uid").to_string(),
        };
        let claims = Tokens::claims(
            ns,
            sa_ref,
            audiences.clone(),
            Duration::from_secs(seconds as u64),
            bound,
        );
        let token = self
            .access
            .tokens
            .sign(&claims)
            .map_err(ApiError::internal)?;
        let expires = jiff::Timestamp::from_second(claims.exp)
            .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default();
        let mut spec_out = spec.clone();
        spec_out["expirationSeconds"] = json!(seconds);
        spec_out["audiences"] = json!(claims.aud);
        Ok(json!({
            "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": crate::meta::now()},
            "spec": spec_out,
            "status": {"token": token, "expirationTimestamp": expires},
        }))
    }
}
