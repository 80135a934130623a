//! The apiservers a node talks to, behind a balancer on the node's
//! loopback, as k3s's agent keeps one. The roles' client dials the
//! balancer, which forwards each connection to the apiserver in use. The
//! list of apiservers starts from the kubeconfig's server and follows the
//! `kubernetes` Service's Endpoints, which the apiservers keep themselves.
//!
//! When the apiserver in use stops answering (a refused or timed-out
//! connect, on a new connection or on the check every
//! [`CHECK_EVERY`]), the balancer moves to the next one that answers and
//! closes the connections still open to the old one. The client then
//! reconnects, and its watches resume from their last resourceVersion on
//! the new apiserver. The roles keep running throughout.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Endpoints;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How often the apiserver in use is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// How long a connect to an apiserver may take before it counts as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The name every apiserver replica's serving certificate holds (the
/// `kubernetes` Service's), checked instead of the balancer's address.
pub const SERVER_NAME: &str = "kubernetes";

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("the kubeconfig's server {0}: expected https://host:port")]
    Server(String),
    #[error("resolving {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the balancer knows: the apiservers in order of preference, and
/// the one connections go to now.
struct Known {
    /// From the `kubernetes` Endpoints, first; then the seeds (the
    /// kubeconfig's server), kept as a last resort.
    listed: Vec<SocketAddr>,
    seeds: Vec<SocketAddr>,
}

impl Known {
    fn all(&self) -> Vec<SocketAddr> {
        let mut out = self.listed.clone();
        for s in &self.seeds {
            if !out.contains(s) {
                out.push(*s);
            }
        }
        out
    }
}

/// The apiservers after `current`, in the order of `all`, wrapping around
/// (the ones to try when `current` fails).
fn after(all: &[SocketAddr], current: SocketAddr) -> Vec<SocketAddr> {
    let at = all.iter().position(|a| *a == current).map_or(0, |i| i + 1);
    all.iter()
        .cycle()
        .skip(at)
        .take(all.len())
        .copied()
        .filter(|a| *a != current)
        .collect()
}

#[derive(Clone)]
pub struct Balancer {
    known: Arc<Mutex<Known>>,
    current: Arc<watch::Sender<SocketAddr>>,
    /// Where the balancer listens (loopback).
    pub local: SocketAddr,
}

async fn answers(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

impl Balancer {
    /// Listens on loopback `port` (0: any) in front of `seeds`.
    pub async fn start(seeds: Vec<SocketAddr>, port: u16) -> Result<Self, BalancerError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BalancerError::Listen { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| BalancerError::Listen { addr, source })?;
        let first = seeds.first().copied().unwrap_or(local);
        let b = Self {
            known: Arc::new(Mutex::new(Known {
                listed: Vec::new(),
                seeds,
            })),
            current: Arc::new(watch::channel(first).0),
            local,
        };
        info!(%local, apiserver = %first, "apiserver balancer listening");
        tokio::spawn(b.clone().accept(listener));
        tokio::spawn(b.clone().check());
        Ok(b)
    }

    pub fn current(&self) -> SocketAddr {
        *self.current.borrow()
    }

    fn all(&self) -> Vec<SocketAddr> {
        self.known.lock().map(|k| k.all()).unwrap_or_default()
    }

    /// Moves from `failed` to the first apiserver after it that answers;
    /// connections still open to `failed` are closed. Another caller may
    /// have moved on already: then its choice stands.
    async fn fail_over(&self, failed: SocketAddr) -> SocketAddr {
        if self.current() != failed {
            return self.current();
        }
        for next in after(&self.all(), failed) {
            if answers(next).await {
                let moved = self.current.send_if_modified(|cur| {
                    if *cur == failed {
                        *cur = next;
                        true
                    } else {
                        false
                    }
                });
                if moved {
                    warn!(from = %failed, to = %next, "apiserver not answering; switched");
                }
                return self.current();
            }
        }
        debug!(apiserver = %failed, "no other apiserver answers");
        failed
    }

    async fn accept(self, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let _ = conn.set_nodelay(true);
                    tokio::spawn(self.clone().forward(conn));
                }
                Err(e) => {
                    warn!(error = %e, "apiserver balancer: accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Joins `conn` to the apiserver in use (failing over if it does not
    /// answer) until either side closes or the balancer moves away from it.
    async fn forward(self, mut conn: TcpStream) {
        let mut tried = 0;
        let (target, mut upstream) = loop {
            let target = self.current();
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                Ok(Ok(up)) => break (target, up),
                _ => {
                    tried += 1;
                    if tried > self.all().len().max(1) || self.fail_over(target).await == target {
                        debug!(apiserver = %target, "no apiserver for a connection");
                        return;
                    }
                }
            }
        };
        let _ = upstream.set_nodelay(true);
        let mut moved = self.current.subscribe();
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream) => {}
            _ = moved.wait_for(|cur| *cur != target) => {
                debug!(apiserver = %target, "closing a connection to an apiserver no longer in use");
            }
        }
    }

    /// Checks the apiserver in use every [`CHECK_EVERY`].
    async fn check(self) {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let cur = self.current();
            if !answers(cur).await {
                self.fail_over(cur).await;
            }
        }
    }

    /// Follows the `kubernetes` Service's Endpoints through `client`
    /// (which reaches them through this balancer).
    pub async fn follow(self, client: kube::Client) {
        let api: kube::Api<Endpoints> = kube::Api::namespaced(client, "default");
        let config = watcher::Config::default().fields("metadata.name=kubernetes");
        let mut events = Box::pin(watcher(api, config).default_backoff().applied_objects());
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ep) => {
                    let listed = addresses(&ep);
                    if let Ok(mut k) = self.known.lock()
                        && k.listed != listed
                    {
                        info!(apiservers = ?listed, "apiservers listed");
                        k.listed = listed;
                    }
                }
                Err(e) => debug!(error = %e, "watching the kubernetes endpoints"),
            }
        }
    }
}

/// The addresses and ports of an Endpoints object, in its order.
fn addresses(ep: &Endpoints) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in ep.subsets.iter().flatten() {
        let ports: Vec<u16> = s
            .ports
            .iter()
            .flatten()
            .filter_map(|p| u16::try_from(p.port).ok())
            .collect();
        for a in s.addresses.iter().flatten() {
            let Ok(ip) = a.ip.parse::<std::net::IpAddr>() else {
                continue;
            };
            out.extend(ports.iter().map(|p| SocketAddr::new(ip, *p)));
        }
    }
    out
}

/// The address of a kubeconfig's `https://host:port` server.
pub async fn server_addr(uri: &http::Uri) -> Result<SocketAddr, BalancerError> {
    let bad = || BalancerError::Server(uri.to_string());
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let mut found = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| BalancerError::Resolve {
            host: host.to_string(),
            source,
        })?;
    found.next().ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(s: &[&str]) -> Vec<SocketAddr> {
        s.iter().map(|a| a.parse().expect("address")).collect()
    }

    #[test]
    fn a_failed_apiserver_is_followed_by_the_next_ones_in_turn() {
        let all = addrs(&["10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"]);
        assert_eq!(
            after(&all, all[1]),
            addrs(&["10.0.0.3:6443", "10.0.0.1:6443"])
        );
        assert_eq!(
            after(&all, all[2]),
            addrs(&["10.0.0.1:6443", "10.0.0.2:6443"])
        );
        // One no longer listed: every listed one, in order.
        let gone = "10.0.0.9:6443".parse().expect("address");
        assert_eq!(after(&all, gone), all);
    }

    #[test]
    fn the_seed_is_kept_behind_the_listed_apiservers() {
        let k = Known {
            listed: addrs(&["10.0.0.2:6443", "10.0.0.1:6443"]),
            seeds: addrs(&["10.0.0.1:6443", "10.0.0.5:6443"]),
        };
        assert_eq!(
            k.all(),
            addrs(&["10.0.0.2:6443", "10.0.0.1:6443", "10.0.0.5:6443"])
        );
    }

    #[test]
    fn endpoints_give_every_address_on_every_port() {
        let ep: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes"},
            "subsets": [
                {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"name": "https", "port": 6443}]},
                {"addresses": [{"ip": "fd00::1"}], "ports": [{"name": "https", "port": 7443}]}
            ]
        }))
        .expect("endpoints");
        assert_eq!(
            addresses(&ep),
            addrs(&["10.0.0.1:6443", "10.0.0.2:6443", "[fd00::1]:7443"])
        );
    }
}
