//! `skiff-agent`: flag parsing and wiring; the work is in the library.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::sync::Arc;

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
    Proxy,
    Overlay,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent's roles until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Inspect or remove the service proxy's kernel state.
    Proxy {
        #[command(subcommand)]
        command: ProxyCommand,
    },
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
}

impl OverlayArgs {
    fn config(&self) -> OverlayConfig {
        OverlayConfig {
            etcd: self.etcd.clone(),
            prefix: self.prefix.clone(),
            iface: self.iface.clone(),
            public_ip: self.public_ip,
            subnet_file: self.subnet_file.clone(),
            lease_ttl: Duration::from_secs(self.lease_ttl.max(3)),
            ip_masq: self.ip_masq,
            resync: Duration::from_secs(self.resync_seconds.max(1)),
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
struct RunArgs {
    /// Roles to run.
    #[arg(long, value_delimiter = ',', default_value = "proxy")]
    roles: Vec<Role>,
    /// Read Services and EndpointSlices from manifests in this directory
    /// instead of an apiserver.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the apiserver (default: $KUBECONFIG, ~/.kube/config,
    /// in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// cgroup v2 directory whose processes get service translation.
    #[arg(long, default_value = "/sys/fs/cgroup/unified")]
    cgroup: PathBuf,
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
    #[command(flatten)]
    overlay: OverlayArgs,
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
    let needs = args.roles.contains(&Role::Proxy) && args.manifests.is_none();
    if !needs {
        return Ok(None);
    }
    let config = match &args.kubeconfig {
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
    Ok(Some(
        kube::Client::try_from(config).context("building the apiserver client")?,
    ))
}

async fn run(args: RunArgs) -> Result<()> {
    if args.roles.is_empty() {
        bail!("no role to run: --roles takes proxy, overlay or both");
    }
    let ctx = NodeContext {
        node_name: node_name(args.node_name.clone()),
        client: client(&args).await?,
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut roles = tokio::task::JoinSet::new();
    let backoff = Backoff::default();
    if args.roles.contains(&Role::Overlay) {
        let overlay = Arc::new(args.overlay.config());
        roles.spawn(supervise(overlay, ctx.clone(), rx.clone(), backoff));
    }
    if args.roles.contains(&Role::Proxy) {
        let proxy = Arc::new(proxy_config(&args, &ctx)?);
        roles.spawn(supervise(proxy, ctx.clone(), rx.clone(), backoff));
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
    match cli.command {
        // Multi-threaded: a role's blocking kernel work (block_in_place)
        // must leave a worker for the others.
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(run(args)),
        Command::Proxy { command } => match command {
            ProxyCommand::List { bpffs, json } => list(bpffs, json),
            ProxyCommand::Uninstall { bpffs } => {
                proxy::dataplane::uninstall(&bpffs).context("uninstalling")
            }
        },
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
