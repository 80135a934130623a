//! Certificates: approves the client-certificate requests of joining nodes
//! (upstream's csrapproving), signs approved client certificates with the
//! cluster CA (csrsigning), and removes expired bootstrap tokens
//! (tokencleaner).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::auth::{bootstrap, csr};
use crate::informer::{next_pass, ready, reflect};
use crate::meta::name_of;

/// The CA the signer signs with.
#[derive(Clone, Debug)]
pub struct Signer {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// How long a signed certificate is valid.
    pub lifetime: Duration,
}

fn has_condition(c: &CertificateSigningRequest, ty: &str) -> bool {
    c.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|x| x.type_ == ty && x.status == "True"))
}

pub async fn run(client: Client, signer: Option<Arc<Signer>>) {
    let notify = Arc::new(Notify::new());
    let api = Api::<CertificateSigningRequest>::all(client.clone());
    let (csrs, _w) = reflect(api.clone(), notify.clone());
    ready(&csrs).await;
    let _cleaner = crate::informer::Owned::spawn(clean_tokens(client));
    loop {
        next_pass("certificates", &notify, Duration::from_secs(60)).await;
        for c in csrs.state() {
            let name = name_of(&c.metadata).to_string();
            let denied = has_condition(&c, "Denied") || has_condition(&c, "Failed");
            let approved = has_condition(&c, "Approved");
            let issued = c
                .status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .is_some_and(|b| !b.0.is_empty());
            if denied || issued {
                continue;
            }
            let value = serde_json::to_value(c.as_ref()).unwrap_or_default();
            if !approved {
                match csr::auto_approvable(&value) {
                    Ok(()) => approve(&api, &name).await,
                    Err(why) => {
                        tracing::debug!(csr = %name, %why, "left for a person to approve")
                    }
                }
                continue;
            }
            let signer_name = c.spec.signer_name.as_str();
            let Some(signer) = signer.as_deref() else {
                continue;
            };
            if ![csr::KUBELET_CLIENT, csr::CLIENT].contains(&signer_name) {
                continue;
            }
            let request = value
                .pointer("/spec/request")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default();
            let status = match csr::sign(
                &signer.ca_cert_pem,
                &signer.ca_key_pem,
                request,
                signer.lifetime,
            ) {
                Ok(pem) => {
                    info!(csr = %name, signer = signer_name, "certificate issued");
                    json!({"certificate": ByteString(pem.into_bytes())})
                }
                Err(e) => {
                    warn!(csr = %name, error = %e, "signing failed");
                    json!({"conditions": [{
                        "type": "Failed", "status": "True", "reason": "SigningError",
                        "message": e, "lastUpdateTime": crate::meta::now(),
                    }]})
                }
            };
            // The conditions (Approved) stay: a merge patch of status.
            let mut status = status;
            if status.get("conditions").is_some()
                && let Some(cs) = c.status.as_ref().and_then(|s| s.conditions.as_ref())
            {
                let mut all = serde_json::to_value(cs).unwrap_or(json!([]));
                if let (Some(a), Some(new)) = (all.as_array_mut(), status["conditions"].as_array())
                {
                    a.extend(new.iter().cloned());
                }
                status["conditions"] = all;
            }
            crate::informer::write_status(&api, &name, status).await;
        }
    }
}

async fn approve(api: &Api<CertificateSigningRequest>, name: &str) {
    let now = crate::meta::now();
    let patch = json!({"status": {"conditions": [{
        "type": "Approved", "status": "True", "reason": "AutoApproved",
        "message": "Auto approving a node client certificate requested with a bootstrap token or by the node itself.",
        "lastUpdateTime": now, "lastTransitionTime": now,
    }]}});
    match api
        .patch_subresource(
            "approval",
            name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => info!(csr = %name, "approved"),
        Err(e) => warn!(csr = %name, error = %e, "approving failed"),
    }
}

/// Deletes bootstrap-token Secrets past their expiration, once a minute.
async fn clean_tokens(client: Client) {
    let api = Api::<Secret>::namespaced(client, bootstrap::NAMESPACE);
    let lp = ListParams::default();
    loop {
        match api.list(&lp).await {
            Ok(list) => {
                for s in list.items {
                    if s.type_.as_deref() != Some(bootstrap::SECRET_TYPE) {
                        continue;
                    }
                    let v = serde_json::to_value(&s).unwrap_or_default();
                    let expired =
                        bootstrap::expiration(&v).is_some_and(|at| at <= SystemTime::now());
                    if expired {
                        let name = name_of(&s.metadata);
                        match api.delete(name, &Default::default()).await {
                            Ok(_) => info!(secret = %name, "expired bootstrap token removed"),
                            Err(e) => {
                                warn!(secret = %name, error = %e, "removing an expired bootstrap token failed")
                            }
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "listing bootstrap tokens failed"),
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}
