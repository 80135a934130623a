//! The node's subnet lease in etcd, in Flannel's key layout.
//!
//! A lease is a key `<prefix>/subnets/<a.b.c.d>-<len>` attached to an etcd
//! lease with a TTL; it is taken with a create-if-absent transaction,
//! kept alive well before the TTL runs out, and found again by its public
//! IP when the node restarts. Watches ask for the previous value, so a
//! deletion says which subnet went without a cache.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use ipnetwork::{Ipv4Network, Ipv6Network};
use tracing::{info, warn};

use super::network::{LeaseAttrs, NetworkConfig, NetworkError, parse_subnet_key, subnet_key};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd client certificate {path}: {source}")]
    Tls {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{key} is missing: write the network config first (e.g. etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}')"
    )]
    NoConfig { key: String },
    #[error(
        "{path} is missing: mount the network config there (e.g. {{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}) or pass --net-config-path"
    )]
    NoConfigFile { path: String },
    #[error("{path}: {source}")]
    ConfigFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("apiserver: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "the Node's podCIDR {subnet} is outside the network {network}: give the control plane's --cluster-cidr and the network config the same range"
    )]
    Outside {
        subnet: Ipv4Network,
        network: Ipv4Network,
    },
    #[error(
        "the Node's IPv6 podCIDR {subnet} is not a /{len} of the network's IPv6Network {network}"
    )]
    Outside6 {
        subnet: Ipv6Network,
        network: Ipv6Network,
        len: u8,
    },
    #[error(transparent)]
    Config(#[from] NetworkError),
    #[error("every subnet of {network} is leased")]
    Exhausted { network: Ipv4Network },
    #[error("lease value at {key}: {source}")]
    Value {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("watch ended: {0}")]
    WatchEnded(String),
}

/// A peer's lease as read from etcd (or a Node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Network,
    pub attrs: LeaseAttrs,
    /// The peer's IPv6 subnet when its source names one (a Node's IPv6
    /// podCIDR); else, on a dual-stack network, the one paired with
    /// `subnet` (see [`NetworkConfig::ipv6_subnet_for`]).
    pub ipv6_subnet: Option<Ipv6Network>,
}

/// Our own lease: the subnet and the etcd lease keeping it.
#[derive(Clone, Debug)]
pub struct Held {
    pub subnet: Ipv4Network,
    pub etcd_lease: i64,
    /// As [`Lease::ipv6_subnet`].
    pub ipv6_subnet: Option<Ipv6Network>,
}

/// A change seen by the watch.
#[derive(Debug)]
pub enum Event {
    Put(Lease),
    Delete(Ipv4Network),
    /// The watch fell behind compaction: list again.
    Resync,
}

pub struct Registry {
    client: Client,
    prefix: String,
}

/// The CA and client certificate for an etcd behind mutual TLS (Flannel's
/// `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl EtcdTls {
    /// The connect options that present this certificate and trust the CA.
    pub fn options(&self) -> Result<etcd_client::ConnectOptions, LeaseError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| LeaseError::Tls {
                path: p.display().to_string(),
                source,
            })
        };
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)?))
            .identity(etcd_client::Identity::from_pem(
                read(&self.cert)?,
                read(&self.key)?,
            ));
        Ok(etcd_client::ConnectOptions::new().with_tls(tls))
    }
}

impl Registry {
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<&EtcdTls>,
    ) -> Result<Self, LeaseError> {
        let opts = tls.map(EtcdTls::options).transpose()?;
        let client = Client::connect(endpoints, opts).await?;
        Ok(Self {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
        })
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub fn key(&self, s: &Ipv4Network) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key(s))
    }

    pub async fn config(&self) -> Result<NetworkConfig, LeaseError> {
        let key = format!("{}/config", self.prefix);
        let resp = self.client.kv_client().get(key.as_str(), None).await?;
        let kv = resp.kvs().first().ok_or(LeaseError::NoConfig { key })?;
        Ok(NetworkConfig::parse(kv.value())?)
    }

    /// Every lease, and the revision they were read at. Keys that do not
    /// parse are skipped with a warning: one bad record must not stop a
    /// node from routing to the others.
    pub async fn list(
        &self,
    ) -> Result<(BTreeMap<Ipv4Network, (Lease, i64, i64)>, i64), LeaseError> {
        let resp = self
            .client
            .kv_client()
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let mut out = BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match decode(&key, kv.value()) {
                Ok(l) => {
                    out.insert(l.subnet, (l, kv.mod_revision(), kv.lease()));
                }
                Err(e) => warn!(%key, error = %e, "skipping lease"),
            }
        }
        Ok((out, rev))
    }

    /// Takes a subnet for `attrs`: the one this public IP already holds (a
    /// restart), else `previous` (from the last subnet.env) if it is free,
    /// else the first free one. Each claim is a transaction that only
    /// succeeds if nobody changed the key since we looked.
    pub async fn acquire(
        &self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Network>,
        ttl_seconds: i64,
    ) -> Result<Held, LeaseError> {
        let value = serde_json::to_string(attrs).map_err(|source| LeaseError::Value {
            key: String::new(),
            source,
        })?;
        for _attempt in 0..16 {
            let (leases, _) = self.list().await?;
            let mine = leases
                .values()
                .find(|(l, _, _)| l.attrs.public_ip == attrs.public_ip && cfg.owns(&l.subnet));
            let grant = self
                .client
                .lease_client()
                .grant(ttl_seconds, None)
                .await?
                .id();
            let (subnet, cmp, old_lease) = if let Some((l, rev, old)) = mine {
                (
                    l.subnet,
                    Compare::mod_revision(self.key(&l.subnet), CompareOp::Equal, *rev),
                    Some(*old),
                )
            } else {
                let free = previous
                    .filter(|p| cfg.owns(p) && !leases.contains_key(p))
                    .into_iter()
                    .chain(cfg.subnets().filter(|s| !leases.contains_key(s)))
                    .next()
                    .ok_or(LeaseError::Exhausted {
                        network: cfg.network,
                    })?;
                (
                    free,
                    Compare::create_revision(self.key(&free), CompareOp::Equal, 0),
                    None,
                )
            };
            let txn = Txn::new().when(vec![cmp]).and_then(vec![TxnOp::put(
                self.key(&subnet),
                value.clone(),
                Some(PutOptions::new().with_lease(grant)),
            )]);
            let resp = self.client.kv_client().txn(txn).await?;
            if resp.succeeded() {
                if let Some(old) = old_lease.filter(|&o| o != 0 && o != grant) {
                    // The key now lives on the new lease; the old one only
                    // holds nothing.
                    let _ = self.client.lease_client().revoke(old).await;
                }
                info!(subnet = %subnet, reused = old_lease.is_some(), "subnet leased");
                return Ok(Held {
                    subnet,
                    etcd_lease: grant,
                    ipv6_subnet: None,
                });
            }
            let _ = self.client.lease_client().revoke(grant).await;
        }
        Err(LeaseError::Exhausted {
            network: cfg.network,
        })
    }

    /// Extends the lease's TTL; `false` when the lease is gone (expired or
    /// revoked while we were not looking).
    pub async fn renew(&self, held: &Held) -> Result<bool, LeaseError> {
        let (mut keeper, mut stream) = self
            .client
            .lease_client()
            .keep_alive(held.etcd_lease)
            .await?;
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(r) => Ok(r.ttl() > 0),
            None => Ok(false),
        }
    }

    /// Whether our key still exists and names our public IP.
    pub async fn still_ours(&self, held: &Held, ip: Ipv4Addr) -> Result<bool, LeaseError> {
        let key = self.key(&held.subnet);
        let resp = self.client.kv_client().get(key.as_str(), None).await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| decode(&key, kv.value()).ok())
            .is_some_and(|l| l.attrs.public_ip == ip))
    }

    /// Gives the subnet back at once (an explicit leave): peers drop their
    /// routes to it now instead of when the TTL runs out.
    pub async fn release(&self, subnet: &Ipv4Network) -> Result<bool, LeaseError> {
        let key = self.key(subnet);
        let resp = self.client.kv_client().get(key.as_str(), None).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(false);
        };
        if kv.lease() != 0 {
            let _ = self.client.lease_client().revoke(kv.lease()).await;
        }
        self.client.kv_client().delete(key.as_str(), None).await?;
        Ok(true)
    }

    /// Watches the leases from `after + 1`, sending events until the
    /// receiver goes away.
    pub async fn watch(
        &self,
        after: i64,
        tx: tokio::sync::mpsc::Sender<Vec<Event>>,
    ) -> Result<(), LeaseError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(after + 1);
        let mut stream = self
            .client
            .watch_client()
            .watch(self.subnets_prefix(), Some(opts))
            .await?;
        loop {
            let Some(resp) = stream.message().await? else {
                return Err(LeaseError::WatchEnded("stream closed".into()));
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                let _ = tx.send(vec![Event::Resync]).await;
                return Err(LeaseError::WatchEnded(format!(
                    "canceled at compaction {}: {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                )));
            }
            let mut batch = Vec::with_capacity(resp.events().len());
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match ev.event_type() {
                    EventType::Put => match decode(&key, kv.value()) {
                        Ok(l) => batch.push(Event::Put(l)),
                        Err(e) => warn!(%key, error = %e, "skipping lease"),
                    },
                    EventType::Delete => {
                        if let Some(s) = parse_subnet_key(&key) {
                            batch.push(Event::Delete(s));
                        }
                    }
                }
            }
            if !batch.is_empty() && tx.send(batch).await.is_err() {
                return Ok(());
            }
        }
    }
}

fn decode(key: &str, value: &[u8]) -> Result<Lease, LeaseError> {
    let subnet = parse_subnet_key(key).ok_or_else(|| LeaseError::Value {
        key: key.to_string(),
        source: serde::de::Error::custom("the key is not <a.b.c.d>-<len>"),
    })?;
    let attrs = serde_json::from_slice(value).map_err(|source| LeaseError::Value {
        key: key.to_string(),
        source,
    })?;
    Ok(Lease {
        subnet,
        attrs,
        ipv6_subnet: None,
    })
}
