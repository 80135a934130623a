//! The kubelet role: the pods bound to this node (`spec.nodeName`), run on
//! containerd's native API in the kubelet's own containerd namespace, each
//! in a sandbox wired by the node's CNI conflist; the Node object, its
//! heartbeat Lease and status.
//!
//! A watch of this node's pods feeds one worker per pod ([`pod`]); task
//! exits come from containerd's event stream and are routed to the pod's
//! worker by the container id (which starts with the pod's uid). At start
//! the kubelet adopts what runs and removes what belongs to pods that are
//! gone (containers, sandboxes, CNI attachments through CNI GC).

pub mod config;
pub mod containerd;
pub mod dns;
pub mod image;
pub mod local_volumes;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod pod;
pub mod portforward;
pub mod probe;
pub mod quantity;
pub mod sandbox;
pub mod server;
pub mod spdy;
pub mod spec;
pub mod stream;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::role::{NodeContext, Role, Shutdown, stopped};
pub use config::KubeletConfig;
use containerd::{Containerd, ContainerdError};
use skiff_cni_lib::exec::Runtime;

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    NoClient(#[from] crate::role::NoClient),
    #[error("node registration: {0}")]
    Node(#[source] kube::Error),
    #[error("watching this node's pods: {0}")]
    Watch(#[from] watcher::Error),
    #[error("{path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct Handle {
    updates: watch::Sender<Option<Pod>>,
    exits: mpsc::Sender<containerd::Exit>,
    task: tokio::task::JoinHandle<()>,
}

impl Role for KubeletConfig {
    type Error = KubeletError;

    fn name(&self) -> &'static str {
        "kubelet"
    }

    async fn run(&self, ctx: NodeContext, shutdown: Shutdown) -> Result<(), KubeletError> {
        let client = ctx.client("kubelet")?;
        run(self.clone(), client, ctx.telemetry.clone(), shutdown).await
    }
}

pub async fn run(
    cfg: KubeletConfig,
    client: kube::Client,
    telemetry: Arc<crate::telemetry::Telemetry>,
    mut shutdown: Shutdown,
) -> Result<(), KubeletError> {
    let pods_dir = cfg.root_dir.join("pods");
    for d in [&pods_dir, &cfg.log_dir] {
        std::fs::create_dir_all(d).map_err(|source| KubeletError::Dir {
            path: d.clone(),
            source,
        })?;
    }
    let cd = Containerd::connect(
        &cfg.containerd,
        &cfg.namespace,
        cfg.runtime_binary.as_deref(),
    )
    .await?;
    let version = cd.version().await?;
    info!(containerd = %version, node = %cfg.node_name, "kubelet starting");
    let node_task = {
        let (client, cfg, version, sd) = (
            client.clone(),
            cfg.clone(),
            version.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = node::run(client, &cfg, &version, sd).await {
                warn!(error = %e, "node registration failed");
            }
        })
    };
    let volume_task = tokio::spawn(local_volumes::cleanup(
        client.clone(),
        cfg.node_name.clone(),
        local_volumes::root(&cfg.root_dir),
    ));
    let server_task = cfg.client_ca.clone().map(|ca| {
        let addr = std::net::SocketAddr::new(cfg.node_ip, cfg.port);
        let streaming = Arc::new(stream::Streaming {
            cd: cd.clone(),
            fifo_dir: cfg.root_dir.join("exec"),
            log_dir: cfg.log_dir.clone(),
            pods_dir: pods_dir.clone(),
            telemetry: telemetry.clone(),
        });
        tokio::spawn(server::run(
            addr,
            ca,
            cfg.node_name.clone(),
            cfg.log_dir.clone(),
            streaming,
        ))
    });
    let shared = Arc::new(pod::Shared {
        cd: cd.clone(),
        puller: image::Puller::new(&cfg.insecure_registries),
        cni: sandbox::Cni {
            conf_dir: cfg.cni_conf_dir.clone(),
            runtime: Runtime::new(cfg.cni_bin_dirs.clone()),
        },
        client: client.clone(),
        pods_dir: pods_dir.clone(),
        log_dir: cfg.log_dir.clone(),
        log_driver: cfg.log_driver.clone(),
        cgroup_parent: cfg.cgroup_parent.clone(),
        node_name: cfg.node_name.clone(),
        node_ip: cfg.node_ip.to_string(),
        tokens: Default::default(),
        dns: cfg.dns.clone(),
        telemetry: telemetry.clone(),
        running: Default::default(),
    });
    // containerd answers a subscription only with its first event, so the
    // stream is read on a task of its own, resubscribing if it ends.
    let (exit_tx, mut exits) = mpsc::channel::<containerd::Exit>(256);
    let exit_task = {
        let cd = cd.clone();
        tokio::spawn(async move {
            loop {
                match cd.exits().await {
                    Ok(s) => {
                        let mut s = Box::pin(s);
                        while let Some(e) = s.next().await {
                            if exit_tx.send(e).await.is_err() {
                                return;
                            }
                        }
                        warn!("containerd's event stream ended; resubscribing");
                    }
                    Err(e) => warn!(error = %e, "subscribing to containerd's exits failed"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", cfg.node_name));
    // Backed off on errors: while no apiserver answers, the watch retries
    // every few seconds rather than in a loop.
    let mut events = Box::pin(watcher(api, wc).default_backoff());
    let mut workers: HashMap<String, Handle> = HashMap::new();
    let mut listing: Option<HashSet<String>> = None;
    // After a burst of pod events, once things have settled, the heap's
    // free pages go back to the kernel (an idle node keeps a small RSS).
    let mut settle = tokio::time::interval(Duration::from_secs(30));
    let mut changed = true;
    // The kubelet's `syncloop` check: this loop turns at least every 30 s
    // (the settle tick); ready once the node's pods were first listed.
    let health = telemetry.check(
        "syncloop",
        crate::telemetry::Watch::Loop(Duration::from_secs(120)),
    );
    let result = loop {
        health.beat();
        tokio::select! {
            _ = stopped(&mut shutdown) => break Ok(()),
            _ = settle.tick() => {
                if std::mem::take(&mut changed) {
                    crate::memory::release_free();
                }
            },
            Some(e) = exits.recv() => {
                if let Some(at) = &e.exited_at {
                    let stamped = std::time::UNIX_EPOCH
                        + Duration::new(at.seconds.max(0) as u64, at.nanos.max(0) as u32);
                    if let Ok(late) = std::time::SystemTime::now().duration_since(stamped) {
                        telemetry.kubelet.event_latency.observe(late.as_secs_f64());
                    }
                }
                if let Some(h) = workers.get(pod::uid_of(&e.container_id)) {
                    let _ = h.exits.send(e).await;
                }
            },
            ev = events.next() => match ev.inspect(|_| changed = true) {
                None => break Ok(()),
                Some(Err(e)) => warn!(error = %e, "pod watch error; retrying"),
                Some(Ok(watcher::Event::Init)) => listing = Some(HashSet::new()),
                Some(Ok(watcher::Event::InitApply(p))) => {
                    if let (Some(l), Some(uid)) = (listing.as_mut(), p.metadata.uid.clone()) {
                        l.insert(uid);
                    }
                    apply(&shared, &mut workers, p);
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    health.synced();
                    if let Some(valid) = listing.take() {
                        for (uid, h) in workers.iter() {
                            if !valid.contains(uid) {
                                let _ = h.updates.send(None);
                            }
                        }
                        cleanup_orphans(&shared, &valid).await;
                    }
                }
                Some(Ok(watcher::Event::Apply(p))) => apply(&shared, &mut workers, p),
                Some(Ok(watcher::Event::Delete(p))) => {
                    if let Some(h) = p.metadata.uid.as_ref().and_then(|u| workers.get(u)) {
                        let _ = h.updates.send(None);
                    }
                }
            },
        }
        workers.retain(|_, h| !h.task.is_finished());
    };
    // The containers keep running: a restarted kubelet adopts them.
    for (_, h) in workers.drain() {
        h.task.abort();
    }
    node_task.abort();
    volume_task.abort();
    exit_task.abort();
    if let Some(t) = server_task {
        t.abort();
    }
    result
}

fn apply(shared: &Arc<pod::Shared>, workers: &mut HashMap<String, Handle>, p: Pod) {
    let Some(uid) = p.metadata.uid.clone() else {
        return;
    };
    if let Some(h) = workers.get(&uid)
        && !h.task.is_finished()
    {
        let _ = h.updates.send(Some(p));
        return;
    }
    let (tx, rx) = watch::channel(Some(p.clone()));
    let (etx, erx) = mpsc::channel(16);
    let worker = pod::Worker::new(shared.clone(), p);
    let task = tokio::spawn(worker.run(rx, erx));
    workers.insert(
        uid,
        Handle {
            updates: tx,
            exits: etx,
            task,
        },
    );
}

/// Removes what belongs to pods that no longer exist: their containers,
/// sandboxes and CNI attachments.
async fn cleanup_orphans(shared: &Arc<pod::Shared>, valid: &HashSet<String>) {
    let cd = &shared.cd;
    if let Ok(list) = cd.containers("").await {
        for c in list {
            let uid = c
                .labels
                .get(pod::LABEL_POD_UID)
                .cloned()
                .unwrap_or_default();
            if valid.contains(&uid) {
                continue;
            }
            info!(container = %c.id, "removing a container of a deleted pod");
            cd.remove(&c.id).await;
        }
    }
    let (cni, dir, valid) = (shared.cni.clone(), shared.pods_dir.clone(), valid.clone());
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let uid = e.file_name().to_string_lossy().into_owned();
                if valid.contains(&uid) {
                    continue;
                }
                let pod = sandbox::PodRef {
                    namespace: "",
                    name: "",
                    uid: &uid,
                };
                if let Err(err) = cni.del(&e.path(), &pod) {
                    warn!(pod_uid = %uid, error = %err, "CNI DEL of a deleted pod failed");
                }
                sandbox::remove_namespaces(&e.path());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let valid: Vec<String> = valid.into_iter().collect();
        if let Err(err) = cni.gc(&valid) {
            warn!(error = %err, "CNI GC failed");
        }
    })
    .await;
}
