//! The kube-rs client the scheduler and controllers use, built from a
//! kubeconfig exactly as any other client of the apiserver would.

use std::path::Path;

use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// `agent` is the User-Agent it sends, whose first word names it as the
/// manager of the fields it writes (`kube-scheduler`,
/// `kube-controller-manager`).
pub async fn from_kubeconfig(path: &Path, agent: &str) -> Result<kube::Client> {
    let kubeconfig =
        Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading {}", path.display()))?;
    let ua = format!("{agent}/{} (skiff)", env!("CARGO_PKG_VERSION"));
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_str(&ua).context("the user agent")?,
    ));
    kube::Client::try_from(config).context("building the apiserver client")
}
