//! ServiceAccount: every active namespace has a `default` ServiceAccount
//! and the `kube-root-ca.crt` ConfigMap holding the cluster CA, which pods'
//! service-account volumes mount as `ca.crt`.

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::informer::{next_pass, ready, reflect, reflect_named};
use crate::meta::name_of;

pub const ROOT_CA: &str = "kube-root-ca.crt";

pub async fn run(client: Client, ca_pem: Option<String>) {
    let notify = Arc::new(Notify::new());
    let (namespaces, _a) = reflect(Api::<Namespace>::all(client.clone()), notify.clone());
    let (accounts, _b) = reflect(Api::<ServiceAccount>::all(client.clone()), notify.clone());
    let published = Api::<ConfigMap>::all(client.clone());
    let (roots, _c) = reflect_named(published, ROOT_CA, notify.clone());
    ready(&namespaces).await;
    ready(&accounts).await;
    ready(&roots).await;
    loop {
        next_pass("serviceaccount", &notify, Duration::from_secs(30)).await;
        for ns in namespaces.state() {
            let name = name_of(&ns.metadata);
            if let Some(ca) = &ca_pem
                && ns.metadata.deletion_timestamp.is_none()
            {
                let want = BTreeMap::from([("ca.crt".to_string(), ca.to_string())]);
                let current = roots.get(&ObjectRef::new(ROOT_CA).within(name));
                if current.is_none_or(|c| c.data.as_ref() != Some(&want)) {
                    publish_ca(&client, name, want).await;
                }
            }
            if ns.metadata.deletion_timestamp.is_some()
                || accounts
                    .get(&ObjectRef::new("default").within(name))
                    .is_some()
            {
                continue;
            }
            let sa = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("default".into()),
                    namespace: Some(name.into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            match Api::<ServiceAccount>::namespaced(client.clone(), name)
                .create(&PostParams::default(), &sa)
                .await
            {
                Ok(_) => info!(namespace = %name, "default serviceaccount created"),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    warn!(namespace = %name, error = %e, "creating the default serviceaccount failed")
                }
            }
        }
    }
}

/// Creates or corrects `kube-root-ca.crt` in `ns`.
async fn publish_ca(client: &Client, ns: &str, data: BTreeMap<String, String>) {
    let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CA.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        data: Some(data.clone()),
        ..Default::default()
    };
    let result = match api.create(&PostParams::default(), &cm).await {
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let patch = kube::api::Patch::Merge(serde_json::json!({"data": data}));
            api.patch(ROOT_CA, &Default::default(), &patch).await
        }
        other => other,
    };
    if let Err(e) = result {
        warn!(namespace = %ns, error = %e, "publishing the cluster CA failed");
    }
}
