//! Bringing the control plane up: etcd (given or local), trust material,
//! the apiserver, the bootstrap objects, then the scheduler and the
//! controllers as clients of that apiserver.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tracing::info;

use crate::alloc::Cidr;
use crate::apiserver::{self, Access, Api, ApiConfig};
use crate::auth::authn::Authenticator;
use crate::auth::serviceaccount::Tokens;
use crate::auth::{self, Authorizer, User};
use crate::pki;
use crate::resources;
use crate::storage::etcd::LocalEtcd;
use crate::storage::store::Store;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Apiserver,
    Scheduler,
    Controllers,
}

#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub data_dir: PathBuf,
    /// etcd endpoints; empty means: start a local etcd.
    pub etcd: Vec<String>,
    /// The CA and client certificate for the etcd endpoints given, when
    /// they serve over TLS (the local etcd always does, with its own).
    pub etcd_tls: Option<crate::storage::etcd_pki::ClientFiles>,
    pub etcd_binary: String,
    pub listen: SocketAddr,
    /// The address the apiserver is advertised at (the `kubernetes`
    /// Service's endpoint); default: see [`advertise_ip`].
    pub advertise: Option<IpAddr>,
    /// Where the scheduler and controllers reach the apiserver (when the
    /// apiserver is not in this process) — a kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    pub components: Vec<Component>,
    /// One or two (one per family; the first is the primary).
    pub service_cidrs: Vec<Cidr>,
    pub node_ports: (u16, u16),
    pub tls_sans: Vec<String>,
    /// Node lifecycle: how long a node's Lease may go unrenewed.
    pub node_grace: std::time::Duration,
    /// Node lifecycle: how long pods stay on a NotReady node.
    pub eviction_timeout: std::time::Duration,
    /// Node IPAM's pod network (`--allocate-node-cidrs`), if on.
    pub node_cidrs: Option<crate::controllers::nodeipam::NodeCidrs>,
    /// Leader election for the scheduler and the controllers (each under a
    /// lease of its own), so that replicas on one etcd take turns; None:
    /// they act without one.
    pub leader_elect: Option<crate::leader::Timing>,
    /// How often the kubelets are scraped for `metrics.k8s.io`.
    pub metric_resolution: std::time::Duration,
    /// How often each HorizontalPodAutoscaler is evaluated.
    pub hpa_sync_period: std::time::Duration,
    /// Where the scheduler and controllers serve their metrics and health
    /// when the apiserver is not in this process (see `secure`).
    pub secure: Option<SocketAddr>,
}

pub fn admin_kubeconfig_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("admin.kubeconfig")
}

/// A component's work, started afresh each time it leads.
type Work = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs until SIGINT/SIGTERM.
pub async fn run(cfg: ControlConfig) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let mut local_etcd = None;
    let (endpoints, etcd_tls) = if cfg.etcd.is_empty() {
        let etcd = LocalEtcd::start(&cfg.etcd_binary, &cfg.data_dir)
            .await
            .context("starting the local etcd")?;
        info!(url = %etcd.url, pid = ?etcd.pid(), "local etcd started");
        let found = (vec![etcd.url.clone()], Some(etcd.client.clone()));
        local_etcd = Some(etcd);
        found
    } else {
        (cfg.etcd.clone(), cfg.etcd_tls.clone())
    };

    let mut tasks = Vec::new();
    // Set on shutdown: elected components release their leases and the
    // apiserver leaves the `kubernetes` Service's endpoints.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut leaving = Vec::new();
    let mut registry = crate::telemetry::shared();
    let mut serving = None;
    let kubeconfig = if cfg.components.contains(&Component::Apiserver) {
        let store = Store::connect(&endpoints, etcd_tls.as_ref())
            .await
            .context("connecting to etcd")?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        let advertise = SocketAddr::new(advertise_ip(cfg.advertise, bound.ip()), bound.port());
        let sans = pki::default_sans(
            &cfg.tls_sans,
            cfg.service_cidrs.first().map(Cidr::first),
            advertise.ip(),
        );
        let pki = pki::load_or_create(&cfg.data_dir.join("pki"), &sans)
            .context("preparing the CA and serving certificate")?;
        let authz = Authorizer::start(store.clone())
            .await
            .context("reading the RBAC policy and the pods' bindings")?;
        let admin = User::authenticated("admin", vec![auth::MASTERS.to_string()]);
        let tokens = Arc::new(
            Tokens::load_or_create(&cfg.data_dir.join("pki").join("sa.key"))
                .context("preparing the service-account signing key")?,
        );
        let authn = Authenticator::new(
            HashMap::from([(pki.admin_token.clone(), admin)]),
            store.clone(),
            &pki.ca_pem,
            Some(tokens.clone()),
        )
        .map_err(anyhow::Error::msg)?;
        let tls = apiserver::tls_config(&pki.cert_pem, &pki.key_pem, authn.tls_verifier())
            .map_err(anyhow::Error::msg)?;
        let api = Api::new(
            store,
            ApiConfig {
                service_cidrs: cfg.service_cidrs.clone(),
                node_ports: cfg.node_ports,
                advertise,
                kubelet_tls: Some(
                    apiserver::kubelet_tls(
                        &pki.kubelet_client_cert_pem,
                        &pki.kubelet_client_key_pem,
                    )
                    .map_err(anyhow::Error::msg)?,
                ),
            },
            Access {
                authn,
                authz,
                tokens,
            },
        );
        registry = api.registry();
        api.follow_policies()
            .await
            .context("reading the LimitRanges and ResourceQuotas")?;
        let server = format!("https://{advertise}");
        bootstrap(&api, advertise, &server, &pki.ca_pem)
            .await
            .context("creating the bootstrap objects")?;
        let path = admin_kubeconfig_path(&cfg.data_dir);
        pki::write_private(
            &path,
            pki::kubeconfig(&server, &pki.ca_pem, &pki.admin_token).as_bytes(),
        )?;
        leaving.push(tokio::spawn(apiserver::peers::keep(
            api.clone(),
            advertise,
            stopped.clone(),
        )));
        tasks.push(tokio::spawn(
            api.clone().scrape_metrics(cfg.metric_resolution),
        ));
        serving = Some(api.clone());
        tasks.push(tokio::spawn(apiserver::serve(listener, tls, api)));
        info!(%server, kubeconfig = %path.display(), ms = started.elapsed().as_millis() as u64, "apiserver ready");
        path
    } else {
        cfg.kubeconfig
            .clone()
            .context("--kubeconfig is needed when the apiserver runs elsewhere")?
    };

    crate::telemetry::Passes::install(&registry);
    if cfg.components.iter().any(|c| *c != Component::Apiserver) {
        let client = crate::client::from_kubeconfig(&kubeconfig, "kube-controller-manager").await?;
        // Without the apiserver in this process, its port cannot serve
        // these components' metrics: their own secure port does.
        if let (false, Some(addr)) = (cfg.components.contains(&Component::Apiserver), cfg.secure) {
            tasks.push(tokio::spawn(crate::secure::serve(
                addr,
                registry.clone(),
                client.clone(),
            )));
        }
        let scheduler_client =
            crate::client::from_kubeconfig(&kubeconfig, "kube-scheduler").await?;
        let identity = crate::leader::identity(&cfg.data_dir)
            .with_context(|| format!("the leader identity in {}", cfg.data_dir.display()))?;
        // Under its lease when elections are on (the task ends once it has
        // released the lease), else on its own until the process ends.
        let mut start =
            |lease: &str, work: Box<dyn Fn() -> Work + Send + Sync>| match cfg.leader_elect {
                Some(timing) => {
                    let election = crate::leader::Election {
                        namespace: crate::leader::NAMESPACE.into(),
                        name: lease.into(),
                        identity: identity.clone(),
                        timing,
                    };
                    let task = crate::leader::run(client.clone(), election, stopped.clone(), work);
                    leaving.push(tokio::spawn(task));
                }
                None => tasks.push(tokio::spawn(work())),
            };
        if cfg.components.contains(&Component::Scheduler) {
            let c = scheduler_client.clone();
            let metrics = crate::telemetry::Scheduler::new(&registry);
            start(
                crate::leader::SCHEDULER,
                Box::new(move || Box::pin(crate::scheduler::run(c.clone(), metrics.clone()))),
            );
        }
        if cfg.components.contains(&Component::Controllers) {
            let settings = crate::controllers::Settings {
                node_grace: cfg.node_grace,
                eviction_timeout: cfg.eviction_timeout,
                node_cidrs: cfg.node_cidrs,
                signer: signer(&cfg.data_dir),
                hpa_sync_period: cfg.hpa_sync_period,
            };
            let c = client.clone();
            start(
                crate::leader::CONTROLLERS,
                Box::new(move || {
                    Box::pin(crate::controllers::run_all(c.clone(), settings.clone()))
                }),
            );
        }
    }
    info!(ms = started.elapsed().as_millis() as u64, components = ?cfg.components, "control plane up");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("stopping");
    if let Some(api) = &serving {
        api.shutting_down();
    }
    // The leaders give their leases up (briefly: the apiserver they write
    // to may be this process, still serving until the tasks below end).
    let _ = stop.send(true);
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        futures::future::join_all(leaving),
    )
    .await;
    for t in tasks {
        t.abort();
    }
    if let Some(etcd) = local_etcd {
        etcd.stop().await;
    }
    Ok(())
}

/// The CA in the data directory, for the certificate signer; None when
/// this process has no CA key (controllers run apart from the apiserver
/// without the CA).
fn signer(data_dir: &std::path::Path) -> Option<Arc<crate::controllers::certificates::Signer>> {
    let pki = data_dir.join("pki");
    let ca_cert_pem = std::fs::read_to_string(pki.join("ca.crt")).ok()?;
    let ca_key_pem = std::fs::read_to_string(pki.join("ca.key")).ok()?;
    Some(Arc::new(crate::controllers::certificates::Signer {
        ca_cert_pem,
        ca_key_pem,
        lifetime: std::time::Duration::from_secs(365 * 24 * 3600),
    }))
}

/// The address other hosts and pods reach the apiserver at: the one given,
/// else the listen address, else (listening on every address) the first
/// non-loopback IPv4 address of this host, else loopback.
fn advertise_ip(given: Option<IpAddr>, bound: IpAddr) -> IpAddr {
    if let Some(ip) = given {
        return ip;
    }
    if !bound.is_unspecified() {
        return bound;
    }
    nix::ifaddrs::getifaddrs()
        .ok()
        .into_iter()
        .flatten()
        .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())))
        .find(|ip| !ip.is_loopback())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// Creates `obj` (of its kind) unless it exists.
async fn ensure_object(api: &Arc<Api>, obj: Value) -> Result<()> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let r = resources::by_kind(api_version, kind).with_context(|| format!("no {kind}"))?;
    let ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(String::from);
    api.ensure(r, ns.as_deref(), obj.clone()).await?;
    Ok(())
}

/// The namespaces every cluster has, the default RBAC policy, the default
/// StorageClass, the public `cluster-info` a joining node starts from, and
/// the `kubernetes` Service.
async fn bootstrap(
    api: &Arc<Api>,
    advertise: SocketAddr,
    server: &str,
    ca_pem: &str,
) -> Result<()> {
    let ns = resources::find("", "v1", "namespaces").context("namespaces")?;
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        api.ensure(ns, None, obj).await?;
    }
    for obj in auth::policy::cluster_objects()
        .into_iter()
        .chain(auth::policy::cluster_info_access())
    {
        ensure_object(api, obj).await?;
    }
    // The default class: node-local volumes made where the pod lands.
    let local_path = json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "local-path", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": crate::claims::PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
    });
    ensure_object(api, local_path).await?;
    let cluster_info = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cluster-info", "namespace": "kube-public"},
        "data": {"kubeconfig": pki::cluster_kubeconfig(server, ca_pem)},
    });
    // Kept current: the server address may change between starts.
    let cm = resources::find("", "v1", "configmaps").context("configmaps")?;
    api.put(cm, Some("kube-public"), "cluster-info", cluster_info)
        .await?;
    let svc = resources::find("", "v1", "services").context("services")?;
    let kubernetes = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": api.first_service_ip(), "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": advertise.port()}]}
    });
    api.ensure(svc, Some("default"), kubernetes).await?;
    // Its endpoints: this apiserver and every other one alive.
    api.join_peers(advertise).await?;
    ensure_dns_service(api).await;
    Ok(())
}

/// The cluster DNS Service pods are given as their nameserver, with an
/// address of each family the service range has. It has no selector:
/// each node's dns role writes its own endpoints, and
/// `trafficDistribution: PreferSameNode` keeps every node's questions on
/// them while it serves, and sends them to the other nodes' when it does
/// not.
async fn ensure_dns_service(api: &Arc<Api>) {
    let ips = api.dns_service_ips();
    let Some(first) = ips.first() else {
        tracing::warn!("the service range is too small for the kube-dns Service's address");
        return;
    };
    let Some(svc) = resources::find("", "v1", "services") else {
        return;
    };
    let policy = if ips.len() > 1 {
        "PreferDualStack"
    } else {
        "SingleStack"
    };
    let kube_dns = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system",
                     "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "skiff-dns"}},
        "spec": {
            "clusterIP": first.to_string(),
            "clusterIPs": ips.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
            "ipFamilyPolicy": policy,
            "ipFamilies": ips.iter().map(|ip| crate::alloc::family_of(*ip)).collect::<Vec<_>>(),
            "trafficDistribution": "PreferSameNode",
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
            ]
        }
    });
    // Another Service holding the address must not stop the control plane.
    if let Err(e) = api.ensure(svc, Some("kube-system"), kube_dns).await {
        tracing::warn!(error = %e.message, ip = %first, "creating the kube-dns Service");
    }
}
