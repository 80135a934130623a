//! Events the scheduler and the controllers record about the objects
//! they act on, as `kubectl describe` shows them.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::warn;

/// What an event says: `Normal` or `Warning`, a reason, a message, and the
/// action taken.
pub(crate) struct Said<'a> {
    pub warning: bool,
    pub reason: &'a str,
    pub message: &'a str,
    pub action: &'a str,
}

/// Records an event about `about` from `component` in the background, as
/// upstream's event broadcaster does, so that a controller's pass does not
/// wait on it; a failure is logged, never returned.
pub(crate) fn record(client: &Client, component: &str, about: ObjectReference, said: Said<'_>) {
    let now = jiff::Timestamp::now();
    let ns = about.namespace.clone().unwrap_or_else(|| "default".into());
    let name = about.name.clone().unwrap_or_default();
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: about,
        reason: Some(said.reason.into()),
        message: Some(said.message.into()),
        type_: Some(if said.warning { "Warning" } else { "Normal" }.into()),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        reporting_component: Some(component.into()),
        reporting_instance: Some(component.into()),
        action: Some(said.action.into()),
        source: Some(EventSource {
            component: Some(component.into()),
            host: None,
        }),
        ..Default::default()
    };
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reason = said.reason.to_string();
    tokio::spawn(async move {
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            warn!(object = %name, %reason, error = %e, "recording an event failed");
        }
    });
}

/// A reference to `obj` for an event about it.
pub(crate) fn about<K: kube::Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    let m = obj.meta();
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        ..Default::default()
    }
}

/// A Normal event.
pub(crate) fn normal<'a>(reason: &'a str, message: &'a str) -> Said<'a> {
    Said {
        warning: false,
        reason,
        message,
        action: "",
    }
}
