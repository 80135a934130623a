//! ServiceAccount: every active namespace has a `default` ServiceAccount.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{name_of, next_pass, ready, reflect};

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (namespaces, _a) = reflect(Api::<Namespace>::all(client.clone()), notify.clone());
    let (accounts, _b) = reflect(Api::<ServiceAccount>::all(client.clone()), notify.clone());
    ready(&namespaces).await;
    ready(&accounts).await;
    loop {
        next_pass("serviceaccount", &notify, Duration::from_secs(30)).await;
        for ns in namespaces.state() {
            let name = name_of(&ns.metadata);
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
