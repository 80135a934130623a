//! `skiff-control`: flag parsing and wiring; the work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use skiff_control::server::{self, Component, ControlConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ComponentArg {
    Apiserver,
    Scheduler,
    Controllers,
}

#[derive(Parser)]
#[command(
    name = "skiff-control",
    version,
    about = "Skiff control plane: apiserver, scheduler, controllers",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Certificates: `certs etcd` makes an etcd CA (once) and signs the
    /// members' server and peer certificates and the clients' ones, laid
    /// out as kubeadm lays them out.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Bootstrap tokens, for nodes to join with (`skiff-agent join`).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    Etcd {
        /// The pki directory (`etcd/ca.crt` and the rest go below it).
        #[arg(long, default_value = "/var/lib/skiff/control/pki")]
        dir: PathBuf,
        /// A name or address the members are reached at (beside loopback).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// A client certificate to make besides the control plane's:
        /// `etcd/<NAME>-client.crt`.
        #[arg(long = "client")]
        clients: Vec<String>,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The control plane's state directory (its admin kubeconfig is used).
    #[arg(long, default_value = "/var/lib/skiff/control")]
    data_dir: PathBuf,
    /// An admin kubeconfig to use instead of the data directory's.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

impl AdminArgs {
    fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig
            .clone()
            .unwrap_or_else(|| server::admin_kubeconfig_path(&self.data_dir))
    }
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token and print it.
    Create {
        #[command(flatten)]
        admin: AdminArgs,
        /// How long the token is valid (24h, 30m, 90s); 0: forever.
        #[arg(long, default_value = "24h")]
        ttl: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Print the whole `skiff-agent join` command.
        #[arg(long)]
        print_join_command: bool,
    },
    /// List the tokens.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a token (by id or whole token): nodes can no longer join with it.
    Delete {
        #[command(flatten)]
        admin: AdminArgs,
        token: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// State directory: CA, tokens, admin kubeconfig, local etcd data.
    #[arg(long, default_value = "/var/lib/skiff/control")]
    data_dir: PathBuf,
    /// etcd endpoints (comma separated); none starts a local etcd.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// The CA that signed the etcd members' certificates (etcd over TLS).
    #[arg(long, requires_all = ["etcd", "etcd_certfile", "etcd_keyfile"])]
    etcd_cafile: Option<PathBuf>,
    /// The client certificate shown to etcd.
    #[arg(long, requires_all = ["etcd_cafile", "etcd_keyfile"])]
    etcd_certfile: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, requires_all = ["etcd_cafile", "etcd_certfile"])]
    etcd_keyfile: Option<PathBuf>,
    /// The etcd binary for the local etcd.
    #[arg(long, default_value = "etcd")]
    etcd_binary: String,
    /// HTTPS listen address of the apiserver.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// The address other hosts and pods reach the apiserver at (default:
    /// the listen address, or this host's first IPv4 address when
    /// listening on all).
    #[arg(long)]
    advertise_address: Option<std::net::IpAddr>,
    /// Components to run in this process.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "apiserver,scheduler,controllers"
    )]
    components: Vec<ComponentArg>,
    /// Kubeconfig for the scheduler and controllers when the apiserver
    /// runs in another process.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// ClusterIP range; two, one per family, comma separated, for
    /// dual-stack Services (the first is the primary family).
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,
    /// NodePort range, inclusive.
    #[arg(long, default_value = "30000-32767")]
    node_port_range: String,
    /// Extra names or addresses for the serving certificate.
    #[arg(long = "tls-san")]
    tls_sans: Vec<String>,
    /// Seconds a node's Lease may go unrenewed before the node is NotReady.
    #[arg(long, default_value_t = 40)]
    node_monitor_grace_seconds: u64,
    /// Seconds pods stay on a NotReady node before they are evicted.
    #[arg(long, default_value_t = 300)]
    pod_eviction_timeout_seconds: u64,
    /// Give every Node a podCIDR from `--cluster-cidr` (for an overlay in
    /// Kubernetes subnet-manager mode, as kubeadm's `--pod-network-cidr`).
    #[arg(long)]
    allocate_node_cidrs: bool,
    /// The pod network Node podCIDRs are carved from; an IPv4 and an IPv6
    /// range, comma separated, for dual-stack Nodes.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: String,
    /// Prefix length of each Node's IPv4 podCIDR.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size: u8,
    /// Prefix length of each Node's IPv6 podCIDR (dual stack).
    #[arg(long, default_value_t = 64)]
    node_cidr_mask_size_ipv6: u8,
    /// Run the scheduler and the controllers only while holding their
    /// leases (kube-system/kube-scheduler, kube-system/kube-controller-manager),
    /// so that several replicas on one etcd take turns.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// How long a lease lasts without renewal before others may take it.
    #[arg(long, default_value = "15s", value_parser = duration)]
    leader_elect_lease_duration: Duration,
    /// How long the leader keeps trying to renew before it stops acting.
    #[arg(long, default_value = "10s", value_parser = duration)]
    leader_elect_renew_deadline: Duration,
    /// How often leaders renew and candidates try.
    #[arg(long, default_value = "2s", value_parser = duration)]
    leader_elect_retry_period: Duration,
    /// How often the apiserver scrapes each kubelet's resource metrics
    /// (`kubectl top`, the HorizontalPodAutoscaler), as metrics-server's
    /// flag of that name.
    #[arg(long, default_value = "15s", value_parser = duration)]
    metric_resolution: Duration,
    /// How often each HorizontalPodAutoscaler is evaluated.
    #[arg(long, default_value = "15s", value_parser = duration)]
    horizontal_pod_autoscaler_sync_period: Duration,
    /// When the apiserver is not in this process: the HTTPS port serving
    /// the scheduler's and controllers' /metrics (a token, reviewed by the
    /// apiserver) and health, as kube-controller-manager's (0: none).
    #[arg(long, default_value_t = 10257)]
    secure_port: u16,
    /// The address the secure port listens on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    secure_bind_address: std::net::IpAddr,
}

/// A duration such as 15s or 1m30s.
fn duration(s: &str) -> Result<Duration, String> {
    skiff_control::duration::parse(s)
        .ok_or_else(|| format!("{s:?}: expected a duration such as 15s, 2m or 1m30s"))
}

/// `--etcd-cafile`, `--etcd-certfile` and `--etcd-keyfile` (clap has
/// them all three or none): the files of an etcd over TLS, whose endpoints
/// are then https (or given without a scheme).
fn etcd_tls(cli: &RunArgs) -> Result<Option<skiff_control::storage::etcd_pki::ClientFiles>> {
    let files = match (&cli.etcd_cafile, &cli.etcd_certfile, &cli.etcd_keyfile) {
        (Some(ca), Some(cert), Some(key)) => Some(skiff_control::storage::etcd_pki::ClientFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    for url in &cli.etcd {
        if url.starts_with("http://") && files.is_some() {
            bail!("--etcd {url}: with --etcd-cafile the endpoints are https://");
        }
        if url.starts_with("https://") && files.is_none() {
            bail!(
                "--etcd {url}: an https endpoint needs --etcd-cafile, --etcd-certfile and --etcd-keyfile"
            );
        }
    }
    Ok(files)
}

fn port_range(s: &str) -> Result<(u16, u16)> {
    let Some((a, b)) = s.split_once('-') else {
        bail!("--node-port-range {s:?}: expected LOW-HIGH")
    };
    let (a, b): (u16, u16) = (a.trim().parse()?, b.trim().parse()?);
    if a == 0 || a > b {
        bail!("--node-port-range {s:?}: LOW must be at least 1 and not above HIGH");
    }
    Ok((a, b))
}

async fn token(command: TokenCommand) -> Result<()> {
    use skiff_control::tokens;
    match command {
        TokenCommand::Create {
            admin,
            ttl,
            description,
            print_join_command,
        } => {
            let ttl = tokens::parse_ttl(&ttl)?;
            let path = admin.kubeconfig();
            let client = skiff_control::client::from_kubeconfig(&path, "skiff-control").await?;
            let token = tokens::create(client, ttl, &description).await?;
            if print_join_command {
                let kc = kube::config::Kubeconfig::read_from(&path)?;
                let cluster = kc
                    .clusters
                    .first()
                    .and_then(|c| c.cluster.as_ref())
                    .with_context(|| format!("{}: no cluster", path.display()))?;
                let server = cluster.server.clone().unwrap_or_default();
                let ca = cluster
                    .certificate_authority_data
                    .as_deref()
                    .with_context(|| {
                        format!("{}: no certificate-authority-data", path.display())
                    })?;
                use base64::Engine as _;
                let ca = base64::engine::general_purpose::STANDARD.decode(ca)?;
                let hash = skiff_control::pki::ca_cert_hash(&String::from_utf8_lossy(&ca))?;
                println!(
                    "skiff-agent join --server {server} --token {token} --ca-cert-hash {hash}"
                );
            } else {
                println!("{token}");
            }
        }
        TokenCommand::List { admin } => {
            let client =
                skiff_control::client::from_kubeconfig(&admin.kubeconfig(), "skiff-control")
                    .await?;
            println!("{:<8} {:<22} DESCRIPTION", "TOKEN ID", "EXPIRES");
            for t in tokens::list(client).await? {
                let expires = t
                    .expires
                    .map(|at| {
                        jiff::Timestamp::try_from(at)
                            .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                            .unwrap_or_default()
                    })
                    .unwrap_or_else(|| "<forever>".into());
                println!("{:<8} {:<22} {}", t.id, expires, t.description);
            }
        }
        TokenCommand::Delete { admin, token } => {
            let client =
                skiff_control::client::from_kubeconfig(&admin.kubeconfig(), "skiff-control")
                    .await?;
            tokens::delete(client, &token).await?;
            println!(
                "bootstrap token {:?} deleted",
                token.split('.').next().unwrap_or_default()
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Some(Command::Token { command }) => return token(command).await,
        Some(Command::Certs {
            command: CertsCommand::Etcd { dir, sans, clients },
        }) => {
            let files = skiff_control::storage::etcd_pki::ensure(&dir, &sans, &clients)?;
            println!("{}", files.ca.display());
            return Ok(());
        }
        None => {}
    }
    let cli = cli.run;
    let service_cidrs = skiff_control::alloc::parse_service_cidrs(&cli.service_cidr)
        .map_err(|e| anyhow::anyhow!("--service-cidr {e}"))?;
    let node_cidrs = if cli.allocate_node_cidrs {
        Some(
            skiff_control::controllers::nodeipam::NodeCidrs::new(
                &cli.cluster_cidr,
                cli.node_cidr_mask_size,
                cli.node_cidr_mask_size_ipv6,
            )
            .map_err(anyhow::Error::msg)?,
        )
    } else {
        None
    };
    let leader_elect = if cli.leader_elect {
        let timing = skiff_control::leader::Timing {
            lease_duration: cli.leader_elect_lease_duration,
            renew_deadline: cli.leader_elect_renew_deadline,
            retry_period: cli.leader_elect_retry_period,
        };
        timing.check()?;
        Some(timing)
    } else {
        None
    };
    let components = cli
        .components
        .iter()
        .map(|c| match c {
            ComponentArg::Apiserver => Component::Apiserver,
            ComponentArg::Scheduler => Component::Scheduler,
            ComponentArg::Controllers => Component::Controllers,
        })
        .collect();
    let etcd_tls = etcd_tls(&cli)?;
    server::run(ControlConfig {
        data_dir: cli.data_dir,
        etcd: cli.etcd,
        etcd_tls,
        etcd_binary: cli.etcd_binary,
        listen: cli.listen,
        advertise: cli.advertise_address,
        kubeconfig: cli.kubeconfig,
        components,
        service_cidrs,
        node_ports: port_range(&cli.node_port_range)?,
        tls_sans: cli.tls_sans,
        node_grace: Duration::from_secs(cli.node_monitor_grace_seconds),
        eviction_timeout: Duration::from_secs(cli.pod_eviction_timeout_seconds),
        node_cidrs,
        leader_elect,
        metric_resolution: cli.metric_resolution,
        hpa_sync_period: cli.horizontal_pod_autoscaler_sync_period,
        secure: (cli.secure_port != 0)
            .then(|| std::net::SocketAddr::new(cli.secure_bind_address, cli.secure_port)),
    })
    .await
}
