//! Events the scheduler and the controllers record about the objects
//! they act on, as `kubectl describe` shows them.
//!
//! As upstream's event recorder does, an event repeating one recorded in
//! the last ten minutes (same object, component, type, reason and
//! message) is not created again: the first one's `count` goes up and its
//! `lastTimestamp` moves, which `kubectl describe` shows as `x3 over 2m`.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tracing::warn;

/// How long a repeat is folded into the first event.
const WINDOW: Duration = Duration::from_secs(600);
/// Distinct events remembered at most; the oldest go first.
const REMEMBERED: usize = 4096;

/// What makes two events the same one.
type Key = (String, String, String, bool, String, String);

/// Recent events by what they say: the first one's name, the count so
/// far, and when it was last seen.
#[derive(Default)]
pub(crate) struct Correlator(HashMap<Key, (String, i32, Instant)>);

impl Correlator {
    /// The name to record under and the count it now has: a new name with
    /// count 1, or an earlier event's name with its count raised.
    pub(crate) fn observe(&mut self, key: Key, fresh_name: String, now: Instant) -> (String, i32) {
        if let Some((name, count, seen)) = self.0.get_mut(&key)
            && now.duration_since(*seen) < WINDOW
        {
            *count += 1;
            *seen = now;
            return (name.clone(), *count);
        }
        if self.0.len() >= REMEMBERED {
            self.0
                .retain(|_, (_, _, seen)| now.duration_since(*seen) < WINDOW);
            if self.0.len() >= REMEMBERED
                && let Some(oldest) = self
                    .0
                    .iter()
                    .min_by_key(|(_, (_, _, seen))| *seen)
                    .map(|(k, _)| k.clone())
            {
                self.0.remove(&oldest);
            }
        }
        self.0.insert(key, (fresh_name.clone(), 1, now));
        (fresh_name, 1)
    }
}

static RECENT: LazyLock<Mutex<Correlator>> = LazyLock::new(Mutex::default);

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
    let key: Key = (
        ns.clone(),
        about_key(&event.involved_object),
        component.to_string(),
        said.warning,
        said.reason.to_string(),
        said.message.to_string(),
    );
    let fresh = event.metadata.name.clone().unwrap_or_default();
    let (event_name, count) =
        RECENT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(key, fresh, Instant::now());
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reason = said.reason.to_string();
    tokio::spawn(async move {
        if count > 1 {
            let patch = json!({"count": count, "lastTimestamp": Time(now)});
            match events
                .patch(&event_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return,
                // Gone (or not written yet): recorded anew below.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    warn!(object = %name, %reason, error = %e, "updating an event failed");
                    return;
                }
            }
        }
        let mut event = event;
        event.count = Some(count);
        event.metadata.name = Some(event_name);
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            warn!(object = %name, %reason, error = %e, "recording an event failed");
        }
    });
}

/// The object an event is about, as a key: its uid, else kind and name.
fn about_key(r: &ObjectReference) -> String {
    r.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            r.kind.as_deref().unwrap_or_default(),
            r.name.as_deref().unwrap_or_default()
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(message: &str) -> Key {
        (
            "default".into(),
            "uid-1".into(),
            "job-controller".into(),
            true,
            "BackoffLimitExceeded".into(),
            message.into(),
        )
    }

    #[test]
    fn repeats_within_ten_minutes_raise_the_first_events_count() {
        let mut c = Correlator::default();
        let t = Instant::now();
        assert_eq!(c.observe(key("a"), "e1".into(), t), ("e1".into(), 1));
        assert_eq!(
            c.observe(key("a"), "e2".into(), t + Duration::from_secs(5)),
            ("e1".into(), 2)
        );
        assert_eq!(
            c.observe(key("a"), "e3".into(), t + Duration::from_secs(9)),
            ("e1".into(), 3)
        );
        // Another message is another event.
        assert_eq!(c.observe(key("b"), "e4".into(), t), ("e4".into(), 1));
        // Past the window since it was last seen: a new one.
        assert_eq!(
            c.observe(key("a"), "e5".into(), t + Duration::from_secs(700)),
            ("e5".into(), 1)
        );
    }
}
