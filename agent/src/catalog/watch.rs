//! Kubernetes source: Services and EndpointSlices watched on any
//! Kubernetes-compatible apiserver (kubeconfig or in-cluster config) with
//! kube-rs watchers, kept in a `Catalog`, reconciled per changed service.
//!
//! Shape (watch -> store -> reconcile): each event updates the catalog and
//! marks its service dirty; the loop then recomputes the dirty services from
//! the catalog, so a lost or repeated event cannot leave a service wrong. A
//! relist (watch restart) replaces the whole store and reconciles all.

use std::collections::BTreeSet;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tracing::{info, warn};

use super::{Catalog, Keep, service_key, slice_owner};

enum Change {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
}

/// What the reconcile loop must do after a batch of events.
#[derive(Debug, Default)]
pub struct Dirty {
    pub all: bool,
    pub services: BTreeSet<String>,
}

/// What the role keeps, as the watchers keep it, with relist buffers.
#[derive(Default)]
pub struct Store<C = Catalog> {
    pub catalog: C,
    services_ready: bool,
    slices_ready: bool,
    relist_services: Option<C>,
    relist_slices: Option<C>,
}

impl<C: Keep> Store<C> {
    pub fn ready(&self) -> bool {
        self.services_ready && self.slices_ready
    }

    fn apply(&mut self, change: Change, dirty: &mut Dirty) {
        match change {
            Change::Service(ev) => match *ev {
                watcher::Event::Apply(s) => {
                    dirty.services.insert(service_key(&s));
                    self.catalog.insert_service(s);
                }
                watcher::Event::Delete(s) => {
                    let k = service_key(&s);
                    self.catalog.remove_service(&k);
                    dirty.services.insert(k);
                }
                watcher::Event::Init => self.relist_services = Some(C::default()),
                watcher::Event::InitApply(s) => {
                    if let Some(c) = &mut self.relist_services {
                        c.insert_service(s);
                    }
                }
                watcher::Event::InitDone => {
                    if let Some(c) = self.relist_services.take() {
                        self.catalog.replace_services(c);
                    }
                    self.services_ready = true;
                    dirty.all = true;
                }
            },
            Change::Slice(ev) => match *ev {
                watcher::Event::Apply(s) => {
                    if let Some(owner) = slice_owner(&s) {
                        dirty.services.insert(owner);
                    }
                    self.catalog.insert_slice(s);
                }
                watcher::Event::Delete(s) => {
                    if let Some(owner) = slice_owner(&s) {
                        let name = s.metadata.name.as_deref().unwrap_or_default();
                        self.catalog.remove_slice(&owner, name);
                        dirty.services.insert(owner);
                    }
                }
                watcher::Event::Init => self.relist_slices = Some(C::default()),
                watcher::Event::InitApply(s) => {
                    if let Some(c) = &mut self.relist_slices {
                        c.insert_slice(s);
                    }
                }
                watcher::Event::InitDone => {
                    if let Some(c) = self.relist_slices.take() {
                        self.catalog.replace_slices(c);
                    }
                    self.slices_ready = true;
                    dirty.all = true;
                }
            },
        }
    }
}

/// Watches the apiserver and calls `reconcile` with the store and what
/// changed, after each batch of events once both lists are complete.
pub async fn run<C: Keep>(
    client: Client,
    mut reconcile: impl FnMut(&Store<C>, Dirty),
) -> Result<(), watcher::Error> {
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.map(|ev| Change::Service(Box::new(ev))))
    .boxed();
    let slices = watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.map(|ev| Change::Slice(Box::new(ev))))
    .boxed();
    let mut events = stream::select(services, slices).ready_chunks(1024);
    let mut store = Store::<C>::default();
    let mut pending = Dirty::default();
    info!("watching services and endpointslices");
    while let Some(batch) = events.next().await {
        for ev in batch {
            match ev {
                Ok(change) => store.apply(change, &mut pending),
                Err(e) => warn!(error = %e, "watch error; retrying"),
            }
        }
        if store.ready() {
            reconcile(&store, std::mem::take(&mut pending));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str) -> Service {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns"},
                                      "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}))
        .expect("service")
    }

    fn eps(name: &str, owner: &str) -> EndpointSlice {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns",
                                                   "labels": {"kubernetes.io/service-name": owner}},
                                      "addressType": "IPv4", "endpoints": []}))
        .expect("slice")
    }

    fn apply(store: &mut Store<Catalog>, changes: Vec<Change>) -> Dirty {
        let mut d = Dirty::default();
        for c in changes {
            store.apply(c, &mut d);
        }
        d
    }

    fn s(ev: watcher::Event<Service>) -> Change {
        Change::Service(Box::new(ev))
    }

    fn e(ev: watcher::Event<EndpointSlice>) -> Change {
        Change::Slice(Box::new(ev))
    }

    #[test]
    fn ready_only_after_both_lists_and_relist_replaces_the_store() {
        let mut store = Store::<Catalog>::default();
        let d = apply(
            &mut store,
            vec![
                s(watcher::Event::Init),
                s(watcher::Event::InitApply(svc("a"))),
                s(watcher::Event::InitApply(svc("b"))),
                s(watcher::Event::InitDone),
            ],
        );
        assert!(d.all);
        assert!(!store.ready(), "slices not listed yet");
        apply(
            &mut store,
            vec![
                e(watcher::Event::Init),
                e(watcher::Event::InitApply(eps("a-1", "a"))),
                e(watcher::Event::InitDone),
            ],
        );
        assert!(store.ready());
        assert_eq!(store.catalog.services.len(), 2);

        // A relist that no longer has "b" drops it (its delete event was
        // missed while the watch was down).
        apply(
            &mut store,
            vec![
                s(watcher::Event::Init),
                s(watcher::Event::InitApply(svc("a"))),
                s(watcher::Event::InitDone),
            ],
        );
        assert_eq!(store.catalog.services.keys().collect::<Vec<_>>(), ["ns/a"]);
    }

    #[test]
    fn events_mark_their_service_dirty() {
        let mut store = Store::<Catalog>::default();
        let d = apply(
            &mut store,
            vec![
                s(watcher::Event::Apply(svc("a"))),
                e(watcher::Event::Apply(eps("b-1", "b"))),
            ],
        );
        assert_eq!(d.services.iter().collect::<Vec<_>>(), ["ns/a", "ns/b"]);
        let d = apply(&mut store, vec![e(watcher::Event::Delete(eps("b-1", "b")))]);
        assert_eq!(d.services.iter().collect::<Vec<_>>(), ["ns/b"]);
        assert!(
            store
                .catalog
                .slices
                .get("ns/b")
                .is_some_and(|m| m.is_empty())
        );
        let d = apply(&mut store, vec![s(watcher::Event::Delete(svc("a")))]);
        assert!(!store.catalog.services.contains_key("ns/a"));
        assert!(d.services.contains("ns/a"));
    }
}
