//! `skiff-control`: flag parsing and wiring; the work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};
use skiff_control::alloc::Cidr;
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
    about = "Skiff control plane: apiserver, scheduler, controllers"
)]
struct Cli {
    /// State directory: CA, tokens, admin kubeconfig, local etcd data.
    #[arg(long, default_value = "/var/lib/skiff/control")]
    data_dir: PathBuf,
    /// etcd endpoints (comma separated); none starts a local etcd.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// The etcd binary for the local etcd.
    #[arg(long, default_value = "etcd")]
    etcd_binary: String,
    /// HTTPS listen address of the apiserver.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
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
    /// ClusterIP range.
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
    let service_cidr: Cidr = cli
        .service_cidr
        .parse()
        .map_err(|e| anyhow::anyhow!("--service-cidr {e}"))?;
    let components = cli
        .components
        .iter()
        .map(|c| match c {
            ComponentArg::Apiserver => Component::Apiserver,
            ComponentArg::Scheduler => Component::Scheduler,
            ComponentArg::Controllers => Component::Controllers,
        })
        .collect();
    server::run(ControlConfig {
        data_dir: cli.data_dir,
        etcd: cli.etcd,
        etcd_binary: cli.etcd_binary,
        listen: cli.listen,
        kubeconfig: cli.kubeconfig,
        components,
        service_cidr,
        node_ports: port_range(&cli.node_port_range)?,
        tls_sans: cli.tls_sans,
        node_grace: Duration::from_secs(cli.node_monitor_grace_seconds),
        eviction_timeout: Duration::from_secs(cli.pod_eviction_timeout_seconds),
    })
    .await
}
