//! Per-kind rules of the object life cycle, as upstream's registry
//! strategies: the verbs of `objects.rs` stay generic and ask the kind's
//! [`Strategy`] what differs (admission, allocation with its guards and
//! side writes, fields an update may not change, how a delete goes). A
//! file per kind that has rules of its own.

mod ingress;
pub(crate) mod job;
mod namespace;
mod pod;
pub(super) mod service;
pub(crate) mod storage;
mod workload;

use serde_json::Value;

use super::Api;
use crate::alloc::Cidr;
use crate::resources::Resource;
use crate::status::ApiError;
use crate::storage::store::{Guard, Side};

/// The kinds with rules of their own; every other kind is `Plain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Strategy {
    Pod,
    Service,
    Namespace,
    /// Deployments, ReplicaSets and DaemonSets.
    Workload,
    /// ReplicationControllers: a workload whose selector may change.
    ReplicationController,
    Job,
    CronJob,
    /// HorizontalPodAutoscalers: the controller owns their status.
    Autoscaler,
    /// PersistentVolumeClaims: the default class and the protection
    /// finalizer on create, a spec fixed but for its requests.
    Claim,
    /// PersistentVolumes: a fixed source and node affinity.
    Volume,
    /// StorageClasses: fixed once created, but for their metadata.
    StorageClass,
    StatefulSet,
    /// ResourceQuotas: admission and the quota controller own their
    /// status.
    Quota,
    /// Ingresses: the default class on create; the ingress role owns
    /// their status.
    Ingress,
    Plain,
}

impl Strategy {
    pub(super) fn of(r: &Resource) -> Self {
        match (r.group, r.plural) {
            ("", "pods") => Self::Pod,
            ("", "services") => Self::Service,
            ("", "namespaces") => Self::Namespace,
            ("apps", "deployments" | "replicasets" | "daemonsets") => Self::Workload,
            ("", "replicationcontrollers") => Self::ReplicationController,
            ("batch", "jobs") => Self::Job,
            ("batch", "cronjobs") => Self::CronJob,
            ("autoscaling", "horizontalpodautoscalers") => Self::Autoscaler,
            ("", "persistentvolumeclaims") => Self::Claim,
            ("", "persistentvolumes") => Self::Volume,
            ("", "resourcequotas") => Self::Quota,
            ("networking.k8s.io", "ingresses") => Self::Ingress,
            ("storage.k8s.io", "storageclasses") => Self::StorageClass,
            ("apps", "statefulsets") => Self::StatefulSet,
            _ => Self::Plain,
        }
    }

    /// Whether a create drops the status the client sent: the kubelet and
    /// the controllers own it.
    pub(super) fn clears_status(self) -> bool {
        matches!(
            self,
            Self::Pod
                | Self::Service
                | Self::Workload
                | Self::ReplicationController
                | Self::Job
                | Self::CronJob
                | Self::Autoscaler
                | Self::Claim
                | Self::Volume
                | Self::StatefulSet
                | Self::Quota
                | Self::Ingress
        )
    }

    /// Admission on create, before the object is decoded and validated.
    pub(super) async fn admit(self, api: &Api, ns: &str, obj: &mut Value) -> Result<(), ApiError> {
        match self {
            Self::Pod => api.admit_service_account(ns, obj).await,
            Self::Job => {
                job::admit(obj);
                Ok(())
            }
            Self::Claim => api.admit_claim(obj).await,
            Self::Ingress => api.admit_ingress(obj).await,
            _ => Ok(()),
        }
    }

    /// Admission on create after decoding and defaults: the namespace's
    /// LimitRanges for pods and claims.
    pub(super) async fn admit_decoded(
        self,
        api: &Api,
        ns: &str,
        obj: &mut Value,
    ) -> Result<(), ApiError> {
        match self {
            Self::Pod => api.limit_pod(ns, obj).await,
            Self::Claim => api.limit_claim(ns, obj).await,
            _ => Ok(()),
        }
    }

    /// The keys (addresses, ports) the object holds beside itself.
    pub(super) fn held(self, obj: &Value, cidrs: &[Cidr]) -> Vec<String> {
        match self {
            Self::Service => service::held_keys(obj, cidrs),
            _ => Vec::new(),
        }
    }

    /// The side writes that free what the object held, when it goes.
    pub(super) fn released(self, obj: &Value, cidrs: &[Cidr]) -> Vec<Side> {
        self.held(obj, cidrs)
            .into_iter()
            .map(Side::Delete)
            .collect()
    }

    /// What a create (`old` none) or an update takes beside the object:
    /// guards on keys that must stay free, and side writes; `obj` is
    /// filled in with what was taken.
    pub(super) async fn allocate(
        self,
        api: &Api,
        obj: &mut Value,
        old: Option<&Value>,
    ) -> Result<(Vec<Guard>, Vec<Side>), ApiError> {
        match self {
            Self::Service => api.allocate(obj, old).await,
            _ => Ok((Vec::new(), Vec::new())),
        }
    }

    /// Refuses an update that changes what the kind keeps fixed.
    pub(super) fn check_update(
        self,
        r: &Resource,
        name: &str,
        cur: &Value,
        new: &Value,
    ) -> Result<(), ApiError> {
        match self {
            Self::Pod => pod::check_update(name, cur, new),
            Self::Workload => workload::check_update(r, name, cur, new),
            Self::Job => job::check_update(name, cur, new),
            Self::Claim => storage::check_claim_update(name, cur, new),
            Self::Volume => storage::check_volume_update(name, cur, new),
            Self::StorageClass => storage::check_class_update(name, cur, new),
            Self::StatefulSet => storage::check_stateful_set_update(name, cur, new),
            _ => Ok(()),
        }
    }

    /// The grace period a delete gives the object (`asked` by the
    /// request), if it is not to go at once.
    pub(super) fn grace(self, obj: &Value, asked: Option<i64>) -> Option<i64> {
        match self {
            Self::Pod => pod::grace(obj, asked),
            _ => None,
        }
    }

    /// Whether an object marked for deletion with a grace period stays
    /// until its owner (the kubelet) lets it go.
    pub(super) fn waits_out_grace(self) -> bool {
        self == Self::Pod
    }

    /// Whether a delete first marks the object terminating and empties it
    /// (a namespace), instead of removing it.
    pub(super) fn terminates(self) -> bool {
        self == Self::Namespace
    }

    /// Starts what a terminating object's deletion does in the background.
    pub(super) fn on_terminating(self, api: &Api, name: &str) {
        if self == Self::Namespace {
            tokio::spawn(namespace::purge(
                api.store.clone(),
                name.to_string(),
                api.cfg.service_cidrs.clone(),
            ));
        }
    }

    /// Whether a delete answers with the object rather than a Status
    /// (upstream's `ReturnDeletedObject`).
    pub(super) fn returns_deleted_object(self) -> bool {
        matches!(self, Self::Pod | Self::Service)
    }
}
