//! `skiff-agent`: flag parsing and wiring; the work is in the library.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::sync::Arc;

use skiff_agent::apiservers;
use skiff_agent::dns::{self, DnsConfig};
use skiff_agent::kubelet::KubeletConfig;
use skiff_agent::kubelet::dns::ClusterDns;
use skiff_agent::overlay::{self, OverlayConfig};
use skiff_agent::proxy::{self, NodeView, ProxyConfig, Source, dataplane::DEFAULT_PIN_DIR};
use skiff_agent::role::{Backoff, NodeContext, supervise};

#[derive(Parser)]
#[command(name = "skiff-agent", version, about = "Skiff node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    Kubelet,
    Proxy,
    Overlay,
    Dns,
    /// Off by default: serves the Ingresses of `--ingress-class`.
    Ingress,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent's roles until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Join a cluster with a bootstrap token (obtaining the node's own
    /// client certificate), then run as `run` does.
    Join(Box<JoinArgs>),
    /// Inspect or remove the service proxy's kernel state.
    Proxy {
        #[command(subcommand)]
        command: ProxyCommand,
    },
    /// Copy the CNI plugin and its conflist onto the host (the DaemonSet's
    /// init step).
    InstallCni(InstallCniArgs),
    /// Leave the overlay.
    Overlay {
        #[command(subcommand)]
        command: OverlayCommand,
    },
}

#[derive(clap::Args, Clone)]
struct OverlayArgs {
    /// etcd endpoints holding the network config and the leases.
    #[arg(
        long = "etcd",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    /// The CA of an etcd behind TLS (with --etcd-certfile and
    /// --etcd-keyfile, the client certificate it accepts).
    #[arg(long, requires_all = ["etcd_certfile", "etcd_keyfile"])]
    etcd_cafile: Option<PathBuf>,
    #[arg(long, requires_all = ["etcd_cafile", "etcd_keyfile"])]
    etcd_certfile: Option<PathBuf>,
    #[arg(long, requires_all = ["etcd_cafile", "etcd_certfile"])]
    etcd_keyfile: Option<PathBuf>,
    /// etcd prefix of the network config and leases (Flannel's).
    #[arg(long = "etcd-prefix", default_value = overlay::network::DEFAULT_PREFIX)]
    prefix: String,
    /// Underlay interface (default: the first up interface with an IPv4
    /// address).
    #[arg(long)]
    iface: Option<String>,
    /// Address other nodes reach this one at (default: the interface's).
    #[arg(long)]
    public_ip: Option<Ipv4Addr>,
    /// Where the node's subnet is written for the CNI plugin.
    #[arg(long, default_value = overlay::DEFAULT_SUBNET_FILE)]
    subnet_file: PathBuf,
    /// Lease TTL in seconds (Flannel's is 24 h); renewed at a third of it.
    #[arg(long, default_value_t = 86_400)]
    lease_ttl: u64,
    /// Masquerade pod traffic that leaves the cluster network.
    #[arg(long)]
    ip_masq: bool,
    /// How often the kernel's routes, neighbours and FDB are re-checked,
    /// in seconds.
    #[arg(long, default_value_t = 60)]
    resync_seconds: u64,
    /// Take the node's subnet from its Node's podCIDR and find peers on
    /// Nodes (Flannel's --kube-subnet-mgr) instead of leasing in etcd.
    #[arg(long)]
    kube_subnet_mgr: bool,
    /// The network config file in --kube-subnet-mgr mode.
    #[arg(long, default_value = overlay::kube::DEFAULT_NET_CONFIG)]
    net_config_path: PathBuf,
    /// Carry pod traffic between nodes in TC eBPF (vxlan wrapped and
    /// unwrapped, host-gw routed), skipping the node's IP stack and the
    /// kernel's tunnel (`false`: the kernel alone, as Flannel).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fast_path: bool,
    /// The pods' bridge (the CNI config's `bridge`).
    #[arg(long, default_value = "cni0")]
    bridge: String,
    /// Where skiff-cni records the node's pods: its config's
    /// `<dataDir>/<name>`.
    #[arg(long, default_value = "/var/lib/skiff/cni/skiff")]
    cni_records: PathBuf,
}

impl OverlayArgs {
    fn config(&self) -> OverlayConfig {
        OverlayConfig {
            etcd: self.etcd.clone(),
            etcd_tls: match (&self.etcd_cafile, &self.etcd_certfile, &self.etcd_keyfile) {
                (Some(ca), Some(cert), Some(key)) => Some(overlay::lease::EtcdTls {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
            prefix: self.prefix.clone(),
            iface: self.iface.clone(),
            public_ip: self.public_ip,
            subnet_file: self.subnet_file.clone(),
            lease_ttl: Duration::from_secs(self.lease_ttl.max(3)),
            ip_masq: self.ip_masq,
            resync: Duration::from_secs(self.resync_seconds.max(1)),
            kube_subnet_mgr: self.kube_subnet_mgr.then(|| self.net_config_path.clone()),
            fast_path: self.fast_path,
            bridge: self.bridge.clone(),
            cni_records: self.cni_records.clone(),
        }
    }
}

#[derive(Subcommand)]
enum OverlayCommand {
    /// Give this node's subnet back now (peers drop their routes to it) and
    /// remove the VTEP, routes, masquerade rules and subnet file.
    Leave(OverlayArgs),
}

#[derive(clap::Args)]
struct InstallCniArgs {
    /// The plugin binary to install.
    #[arg(long, default_value = "/opt/skiff/bin/skiff-cni")]
    plugin: PathBuf,
    /// The conflist to install.
    #[arg(long, default_value = "/etc/skiff/cni-conf.json")]
    conflist: PathBuf,
    /// The host's CNI plugin directory (as mounted).
    #[arg(long, default_value = "/host/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The host's CNI config directory (as mounted).
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The conflist's file name there.
    #[arg(long, default_value = "10-skiff.conflist")]
    conf_name: String,
}

#[derive(clap::Args)]
struct JoinArgs {
    /// The apiserver (`https://host:port`).
    #[arg(long)]
    server: String,
    /// A bootstrap token (`skiff-control token create`).
    #[arg(long, env = "SKIFF_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// The cluster CA's public-key hash, `sha256:<hex>`: the CA is trusted
    /// only if it matches.
    #[arg(long)]
    ca_cert_hash: String,
    /// Seconds to wait for the certificate to be issued.
    #[arg(long, default_value_t = 300)]
    join_timeout_seconds: u64,
    #[command(flatten)]
    run: RunArgs,
}

/// Where `join` writes the node's kubeconfig unless `--kubeconfig` says.
const NODE_KUBECONFIG: &str = "/var/lib/skiff/node/kubeconfig";

#[derive(clap::Args)]
struct RunArgs {
    /// Roles to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kubelet,proxy,overlay,dns"
    )]
    roles: Vec<Role>,
    /// Read Services and EndpointSlices from manifests in this directory
    /// instead of an apiserver.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the apiserver (default: $KUBECONFIG, ~/.kube/config,
    /// in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Reach the apiservers through a balancer on loopback that follows
    /// the `kubernetes` Service's Endpoints and moves to another apiserver
    /// when the one in use stops answering (`false`: the kubeconfig's
    /// server only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    apiserver_balancer: bool,
    /// The balancer's loopback port (0: any free one).
    #[arg(long, default_value_t = 0)]
    apiserver_balancer_port: u16,
    /// cgroup v2 directory whose processes get service translation.
    #[arg(long, default_value = "/sys/fs/cgroup/unified")]
    cgroup: PathBuf,
    /// Where `/metrics` (every role's) and the health paths are served,
    /// plain HTTP; loopback by default, off the pod network.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: std::net::SocketAddr,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
    /// This node's name (for internalTrafficPolicy: Local).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Address on which NodePorts are served to local clients (repeatable;
    /// default: every non-loopback address in the agent's network namespace).
    #[arg(long = "nodeport-address")]
    nodeport_addresses: Vec<IpAddr>,
    /// How often the manifest directory is checked, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// Interface on which NodePorts, externalIPs and LoadBalancer IPs are
    /// served to other hosts (repeatable; default: every interface with a
    /// global IPv4 or IPv6 address that is not a bridge, rescanned as they
    /// come).
    #[arg(long = "external-interface")]
    external_interfaces: Vec<String>,
    /// Interface the node's pods are reached through (repeatable; default:
    /// every bridge, rescanned). A NodePort's, externalIP's or LoadBalancer
    /// IP's local backend behind one is sent its packets directly, and its
    /// replies leave directly, without the node's forwarding path.
    #[arg(long = "pod-interface")]
    pod_interfaces: Vec<String>,
    /// Slots in each Service's Maglev table for external traffic (a prime;
    /// the same on every node).
    #[arg(long, default_value_t = skiff_ebpf_common::DEFAULT_MAGLEV_SIZE)]
    maglev_table_size: u32,
    #[command(flatten)]
    overlay: OverlayArgs,
    #[command(flatten)]
    kubelet: KubeletArgs,
    #[command(flatten)]
    dns: DnsArgs,
    #[command(flatten)]
    ingress: IngressArgs,
}

#[derive(clap::Args, Clone)]
struct IngressArgs {
    /// The IngressClass the ingress role serves.
    #[arg(long, default_value = "skiff")]
    ingress_class: String,
    /// Where the ingress role serves HTTP.
    #[arg(long, default_value = "0.0.0.0:80")]
    ingress_http_address: std::net::SocketAddr,
    /// Where the ingress role serves HTTPS.
    #[arg(long, default_value = "0.0.0.0:443")]
    ingress_https_address: std::net::SocketAddr,
}

#[derive(clap::Args, Clone)]
struct DnsArgs {
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// TTL of the cluster domain's records and negative answers, in
    /// seconds.
    #[arg(long, default_value_t = 30)]
    dns_ttl: u32,
    /// Address the DNS server listens on, the first one of each family
    /// published as the node's `kube-dns` endpoint of that family
    /// (repeatable; default: the node's address).
    #[arg(long = "dns-listen")]
    dns_listen: Vec<IpAddr>,
    #[arg(long, default_value_t = 53)]
    dns_port: u16,
    /// Upstream resolver for names outside the cluster domain, `ip` or
    /// `ip:port` (repeatable; default: the nameservers of --resolv-conf;
    /// `none`: such names are refused).
    #[arg(long = "dns-upstream")]
    dns_upstreams: Vec<String>,
    /// The node's resolver configuration.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Upstream answers kept at most.
    #[arg(long, default_value_t = 10_000)]
    dns_cache_size: usize,
}

#[derive(clap::Args, Clone)]
struct KubeletArgs {
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    /// containerd namespace of the node's pods.
    #[arg(long, default_value = "k8s.io")]
    containerd_namespace: String,
    /// The OCI runtime binary the runc shim runs for pods: `runc` (the
    /// default) or `crun`, or a path.
    #[arg(long)]
    runtime_binary: Option<String>,
    /// Pod state: pinned namespaces, CNI results.
    #[arg(long, default_value = "/var/lib/skiff/kubelet")]
    root_dir: PathBuf,
    /// Container logs (`<ns>_<pod>_<uid>/<container>/<restart>.log`).
    #[arg(long, default_value = "/var/log/pods")]
    pod_log_dir: PathBuf,
    /// The log driver containerd's shim runs (default: skiff-log beside
    /// this binary).
    #[arg(long)]
    log_driver: Option<PathBuf>,
    /// CA whose client certificates may read logs on the kubelet's port
    /// (the cluster CA; without it the port is not served).
    #[arg(long)]
    client_ca_file: Option<PathBuf>,
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where CNI plugins are (repeatable).
    #[arg(long = "cni-bin-dir", default_value = "/opt/cni/bin")]
    cni_bin_dirs: Vec<PathBuf>,
    /// cgroup parent of the pods (cgroupfs path).
    #[arg(long, default_value = "/skiff")]
    cgroup_parent: String,
    /// A registry reached over plain HTTP (`host:port`, repeatable).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// The node's address (default: its first non-loopback IPv4 address).
    #[arg(long)]
    node_ip: Option<IpAddr>,
    /// `key=value` labels for the Node (comma separated).
    #[arg(long, value_delimiter = ',')]
    node_labels: Vec<String>,
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
    /// The kubelet's HTTPS port.
    #[arg(long, default_value_t = 10250)]
    kubelet_port: u16,
    /// Seconds between renewals of the node's Lease.
    #[arg(long, default_value_t = 10)]
    node_lease_renew_seconds: u64,
    /// Seconds the node's status is written at the least this often.
    #[arg(long, default_value_t = 300)]
    node_status_report_seconds: u64,
    /// The cluster DNS Service's address, pods' nameserver under
    /// dnsPolicy ClusterFirst (repeatable; `none`: pods get the node's
    /// resolver).
    #[arg(long = "cluster-dns", default_value = "10.96.0.10")]
    cluster_dns: Vec<String>,
}

#[derive(Subcommand)]
enum ProxyCommand {
    /// Print the programmed frontends and backends from the pinned maps.
    List {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print how full each pinned map is (entries against its size).
    Maps {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Detach the programs and remove the pinned maps.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
    },
}

fn node_name(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    })
}

/// The apiserver client the roles share: from `--kubeconfig`, else the
/// usual lookup ($KUBECONFIG, ~/.kube/config, in-cluster). None when no
/// role needs one.
async fn client(args: &RunArgs) -> Result<Option<kube::Client>> {
    let needs = args.roles.contains(&Role::Kubelet)
        || args.roles.contains(&Role::Dns)
        || args.roles.contains(&Role::Ingress)
        || (args.roles.contains(&Role::Proxy) && args.manifests.is_none())
        || (args.roles.contains(&Role::Overlay) && args.overlay.kube_subnet_mgr);
    if !needs {
        return Ok(None);
    }
    let mut config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using --kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding an apiserver (pass --kubeconfig)")?,
    };
    // The fields the node's roles write are managed as `skiff-agent`'s.
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("skiff-agent/", env!("CARGO_PKG_VERSION"))),
    ));
    if !args.apiserver_balancer {
        return Ok(Some(
            kube::Client::try_from(config).context("building the apiserver client")?,
        ));
    }
    let seed = apiservers::server_addr(&config.cluster_url).await?;
    let balancer = apiservers::Balancer::start(vec![seed], args.apiserver_balancer_port).await?;
    config.cluster_url = format!("https://{}", balancer.local)
        .parse()
        .context("the balancer's address")?;
    // Every replica's certificate names the `kubernetes` Service; the
    // balancer's loopback address says nothing of which one answers.
    config.tls_server_name = Some(apiservers::SERVER_NAME.to_string());
    let client = kube::Client::try_from(config).context("building the apiserver client")?;
    tokio::spawn(balancer.follow(client.clone()));
    Ok(Some(client))
}

async fn run(args: RunArgs) -> Result<()> {
    if args.roles.is_empty() {
        bail!("no role to run: --roles takes kubelet, proxy, overlay, dns, ingress");
    }
    let telemetry = Arc::new(skiff_agent::telemetry::Telemetry::default());
    tokio::spawn(telemetry.clone().serve(args.metrics_bind_address));
    let ctx = NodeContext {
        node_name: node_name(args.node_name.clone()),
        client: client(&args).await?,
        telemetry,
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut roles = tokio::task::JoinSet::new();
    let backoff = Backoff::default();
    if args.roles.contains(&Role::Overlay) {
        let overlay = Arc::new(args.overlay.config());
        roles.spawn(supervise(overlay, ctx.clone(), rx.clone(), backoff));
    }
    if args.roles.contains(&Role::Kubelet) {
        let kubelet = Arc::new(kubelet_config(&args, &ctx)?);
        roles.spawn(supervise(kubelet, ctx.clone(), rx.clone(), backoff));
    }
    if args.roles.contains(&Role::Proxy) {
        let proxy = Arc::new(proxy_config(&args, &ctx)?);
        roles.spawn(supervise(proxy, ctx.clone(), rx.clone(), backoff));
    }
    if args.roles.contains(&Role::Dns) {
        let dns = Arc::new(dns_config(&args)?);
        roles.spawn(supervise(dns, ctx.clone(), rx.clone(), backoff));
    }
    if args.roles.contains(&Role::Ingress) {
        let http = args.ingress.ingress_http_address;
        let ingress = Arc::new(skiff_agent::ingress::IngressConfig {
            class: args.ingress.ingress_class.clone(),
            http,
            https: args.ingress.ingress_https_address,
            // Where the Ingresses say they are served: the address bound,
            // or the node's when every address is.
            address: if http.ip().is_unspecified() {
                node_ip(&args)?
            } else {
                http.ip()
            },
            node_name: ctx.node_name.clone(),
        });
        roles.spawn(supervise(ingress, ctx.clone(), rx.clone(), backoff));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handling SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    let _ = tx.send(true);
    while roles.join_next().await.is_some() {}
    Ok(())
}

async fn join(args: JoinArgs) -> Result<()> {
    let mut run_args = args.run;
    let kubeconfig = run_args
        .kubeconfig
        .clone()
        .unwrap_or_else(|| PathBuf::from(NODE_KUBECONFIG));
    let cfg = skiff_agent::join::JoinConfig {
        server: args.server,
        token: args.token,
        ca_cert_hash: args.ca_cert_hash,
        node_name: node_name(run_args.node_name.clone()),
        kubeconfig: kubeconfig.clone(),
        timeout: Duration::from_secs(args.join_timeout_seconds.max(1)),
    };
    skiff_agent::join::join(&cfg)
        .await
        .context("joining the cluster")?;
    run_args.kubeconfig = Some(kubeconfig.clone());
    if run_args.kubelet.client_ca_file.is_none() {
        run_args.kubelet.client_ca_file = Some(kubeconfig.with_file_name("ca.crt"));
    }
    run(run_args).await
}

/// The node's address: `--node-ip`, else its first non-loopback IPv4
/// address.
fn node_ip(args: &RunArgs) -> Result<IpAddr> {
    match args.kubelet.node_ip {
        Some(ip) => Ok(ip),
        None => proxy::local_addresses()
            .into_iter()
            .find(IpAddr::is_ipv4)
            .context("no IPv4 address for the node: pass --node-ip"),
    }
}

fn dns_config(args: &RunArgs) -> Result<DnsConfig> {
    let d = &args.dns;
    let listen = if d.dns_listen.is_empty() {
        vec![node_ip(args)?]
    } else {
        d.dns_listen.clone()
    };
    let upstreams = if d.dns_upstreams.iter().any(|u| u == "none") {
        if d.dns_upstreams.len() > 1 {
            bail!("--dns-upstream none cannot be given with other upstreams");
        }
        Vec::new()
    } else if d.dns_upstreams.is_empty() {
        dns::forward::resolv_conf_upstreams(&d.resolv_conf, &listen).with_context(|| {
            format!(
                "reading upstream resolvers from --resolv-conf {} (or pass --dns-upstream)",
                d.resolv_conf.display()
            )
        })?
    } else {
        d.dns_upstreams
            .iter()
            .map(|u| {
                u.parse::<SocketAddr>()
                    .or_else(|_| u.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .with_context(|| format!("--dns-upstream {u:?}: expected ip or ip:port"))
            })
            .collect::<Result<_>>()?
    };
    Ok(DnsConfig {
        domain: d.cluster_domain.clone(),
        ttl: d.dns_ttl,
        listen,
        port: d.dns_port,
        upstreams,
        udp_workers: std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
        cache: dns::cache::CacheConfig {
            capacity: d.dns_cache_size,
            ..Default::default()
        },
    })
}

fn kubelet_config(args: &RunArgs, ctx: &NodeContext) -> Result<KubeletConfig> {
    let k = &args.kubelet;
    let node_ip = node_ip(args)?;
    let mut node_labels = std::collections::BTreeMap::new();
    for l in &k.node_labels {
        let Some((key, value)) = l.split_once('=') else {
            bail!("--node-labels {l:?}: expected key=value");
        };
        node_labels.insert(key.to_string(), value.to_string());
    }
    Ok(KubeletConfig {
        node_name: ctx.node_name.clone(),
        node_ip,
        node_labels,
        containerd: k.containerd.clone(),
        namespace: k.containerd_namespace.clone(),
        runtime_binary: k.runtime_binary.clone(),
        root_dir: k.root_dir.clone(),
        log_dir: k.pod_log_dir.clone(),
        log_driver: match &k.log_driver {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .context("finding skiff-log beside skiff-agent")?
                .with_file_name("skiff-log"),
        },
        client_ca: k.client_ca_file.clone(),
        cni_conf_dir: k.cni_conf_dir.clone(),
        cni_bin_dirs: k.cni_bin_dirs.clone(),
        cgroup_parent: k.cgroup_parent.clone(),
        insecure_registries: k.insecure_registries.clone(),
        max_pods: k.max_pods,
        port: k.kubelet_port,
        lease_renew: Duration::from_secs(k.node_lease_renew_seconds.max(1)),
        lease_duration: Duration::from_secs(40),
        status_report: Duration::from_secs(k.node_status_report_seconds.max(1)),
        subnet_file: args.overlay.subnet_file.clone(),
        dns: ClusterDns {
            servers: k
                .cluster_dns
                .iter()
                .filter(|s| *s != "none")
                .map(|s| {
                    s.parse()
                        .with_context(|| format!("--cluster-dns {s:?}: not an IP address"))
                })
                .collect::<Result<_>>()?,
            domain: args.dns.cluster_domain.clone(),
            resolv_conf: args.dns.resolv_conf.clone(),
        },
    })
}

fn proxy_config(args: &RunArgs, ctx: &NodeContext) -> Result<ProxyConfig> {
    let source = match args.manifests.clone() {
        Some(dir) => {
            if !dir.is_dir() {
                bail!("--manifests {}: not a directory", dir.display());
            }
            Source::Manifests(dir)
        }
        None => Source::Kube,
    };
    let nodeport_addresses = if args.nodeport_addresses.is_empty() {
        proxy::local_addresses()
    } else {
        args.nodeport_addresses.clone()
    };
    Ok(ProxyConfig {
        pin_dir: args.bpffs.clone(),
        cgroup: args.cgroup.clone(),
        node: NodeView {
            node_name: ctx.node_name.clone(),
            nodeport_addresses,
        },
        source,
        poll: Duration::from_millis(args.poll_ms),
        external: proxy::ExternalConfig {
            interfaces: args.external_interfaces.clone(),
            pod_interfaces: args.pod_interfaces.clone(),
            maglev_size: args.maglev_table_size,
        },
    })
}

fn list(bpffs: PathBuf, json: bool) -> Result<()> {
    let frontends = proxy::list(&bpffs).context("reading the pinned maps")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&frontends)?);
        return Ok(());
    }
    println!("{:<32} {:>5} {:>9}  BACKENDS", "FRONTEND", "ID", "AFFINITY");
    for f in frontends {
        let affinity = if f.affinity_timeout > 0 {
            format!("{}s", f.affinity_timeout)
        } else {
            "-".to_string()
        };
        let backends = if f.backends.is_empty() {
            "(none: refused)".to_string()
        } else {
            f.backends.join(", ")
        };
        println!(
            "{:<32} {:>5} {:>9}  {}",
            f.frontend, f.id, affinity, backends
        );
    }
    Ok(())
}

fn maps(bpffs: PathBuf, json: bool) -> Result<()> {
    let fill = proxy::dataplane::map_fill(&bpffs).context("reading the pinned maps")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&fill)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<14} {:>10} {:>10} {:>6}",
        "MAP", "TYPE", "ENTRIES", "MAX", "FILL"
    );
    for m in fill {
        let pct = 100.0 * m.entries as f64 / f64::from(m.max_entries.max(1));
        println!(
            "{:<16} {:<14} {:>10} {:>10} {:>5.1}%",
            m.name, m.kind, m.entries, m.max_entries, pct
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // The ingress role's worker threads allocate on every request.
    let workers = match &cli.command {
        Command::Run(args) if args.roles.contains(&Role::Ingress) => {
            skiff_agent::ingress::workers()
        }
        _ => 0,
    };
    skiff_agent::memory::limit_arenas(skiff_agent::memory::arenas_for(workers));
    skiff_agent::memory::raise_file_limit();
    match cli.command {
        // Multi-threaded: a role's blocking kernel work (block_in_place)
        // must leave a worker for the others.
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(run(*args)),
        Command::Join(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(join(*args)),
        Command::Proxy { command } => match command {
            ProxyCommand::List { bpffs, json } => list(bpffs, json),
            ProxyCommand::Maps { bpffs, json } => maps(bpffs, json),
            ProxyCommand::Uninstall { bpffs } => {
                proxy::dataplane::uninstall(&bpffs).context("uninstalling")
            }
        },
        Command::InstallCni(a) => {
            let (bin, conf) = skiff_agent::install_cni::install(
                &a.plugin,
                &a.bin_dir,
                &a.conflist,
                &a.conf_dir,
                &a.conf_name,
            )?;
            println!("installed {} and {}", bin.display(), conf.display());
            Ok(())
        }
        Command::Overlay {
            command: OverlayCommand::Leave(args),
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(async {
                match overlay::leave(&args.config())
                    .await
                    .context("leaving the overlay")?
                {
                    Some(s) => println!("released {s}"),
                    None => println!("no lease to release"),
                }
                Ok(())
            }),
    }
}
