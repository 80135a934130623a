//! The cluster's Services and EndpointSlices as the node's roles read
//! them: a [`Catalog`] by name, kept by [`watch`] from the apiserver. The
//! service proxy and the DNS server each read it their own way.

pub mod watch;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name` of an object.
pub fn object_key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.unwrap_or("default"),
        name.unwrap_or_default()
    )
}

pub fn service_key(svc: &Service) -> String {
    object_key(
        svc.metadata.namespace.as_deref(),
        svc.metadata.name.as_deref(),
    )
}

/// The Service (`namespace/name`) an EndpointSlice belongs to, if labelled.
pub fn slice_owner(slice: &EndpointSlice) -> Option<String> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(object_key(
        slice.metadata.namespace.as_deref(),
        Some(name.as_str()),
    ))
}

/// Drops what no role reads and can be most of an object's size: its
/// managed fields and kubectl's last-applied copy of it.
pub(crate) fn slim(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

/// Services and EndpointSlices by name, as read from any source.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub services: BTreeMap<String, Service>,
    /// Slices by owning service, then by slice name.
    pub slices: BTreeMap<String, BTreeMap<String, EndpointSlice>>,
}

impl Catalog {
    pub fn insert_service(&mut self, mut svc: Service) {
        slim(&mut svc.metadata);
        self.services.insert(service_key(&svc), svc);
    }

    /// Slices without the service-name label belong to no service and are
    /// ignored, as kube-proxy ignores them.
    pub fn insert_slice(&mut self, mut slice: EndpointSlice) {
        slim(&mut slice.metadata);
        if let Some(owner) = slice_owner(&slice) {
            let name = slice.metadata.name.clone().unwrap_or_default();
            self.slices.entry(owner).or_default().insert(name, slice);
        }
    }
}
