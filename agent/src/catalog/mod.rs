//! The cluster's Services and EndpointSlices as the node's roles read
//! them, kept by [`watch`] from the apiserver in what each role keeps of
//! them (a [`Keep`]): the service proxy keeps the objects (a [`Catalog`]
//! by name); the DNS server keeps only what its records need.

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

/// An endpoint's state as kube-proxy reads its conditions: `ready` unset
/// means ready, `serving` unset means `ready`, `terminating` unset means
/// not terminating. New connections go to the ready endpoints, or, when a
/// port has none, to those still serving while they terminate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub serving_terminating: bool,
}

impl Readiness {
    pub fn of(ep: &k8s_openapi::api::discovery::v1::Endpoint) -> Self {
        let cond = ep.conditions.as_ref();
        let r = cond.and_then(|c| c.ready).unwrap_or(true);
        let s = cond.and_then(|c| c.serving).unwrap_or(r);
        let t = cond.and_then(|c| c.terminating).unwrap_or(false);
        Self {
            ready: r && !t,
            serving_terminating: s && t,
        }
    }
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

/// What a role keeps of the Services and EndpointSlices it watches.
pub trait Keep: Default {
    fn insert_service(&mut self, svc: Service);
    fn remove_service(&mut self, key: &str);
    /// Slices without the service-name label belong to no service and are
    /// ignored, as kube-proxy ignores them.
    fn insert_slice(&mut self, slice: EndpointSlice);
    /// Removes slice `name` of Service `owner`.
    fn remove_slice(&mut self, owner: &str, name: &str);
    /// Takes `from`'s Services in place of its own (after a relist).
    fn replace_services(&mut self, from: Self);
    /// Takes `from`'s slices in place of its own (after a relist).
    fn replace_slices(&mut self, from: Self);
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

impl Keep for Catalog {
    fn insert_service(&mut self, svc: Service) {
        Catalog::insert_service(self, svc);
    }

    fn remove_service(&mut self, key: &str) {
        self.services.remove(key);
    }

    fn insert_slice(&mut self, slice: EndpointSlice) {
        Catalog::insert_slice(self, slice);
    }

    fn remove_slice(&mut self, owner: &str, name: &str) {
        if let Some(m) = self.slices.get_mut(owner) {
            m.remove(name);
        }
    }

    fn replace_services(&mut self, from: Self) {
        self.services = from.services;
    }

    fn replace_slices(&mut self, from: Self) {
        self.slices = from.slices;
    }
}
