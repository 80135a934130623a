//! A pod's volumes under `<pod dir>/volumes/<name>` and its containers'
//! environment from the API.
//!
//! configMap, secret, downwardAPI and projected volumes are written the way
//! upstream's atomic writer does: the files go into a fresh `..<time>`
//! directory, a `..data` symlink is swapped to it with one rename, and
//! each visible name is a symlink through `..data`, so a reader never sees
//! a half-updated volume. emptyDir is a directory (tmpfs with `medium:
//! Memory`); hostPath is the node's path.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Volume};
use kube::api::Api;

/// Why a container cannot be configured: its status reason is
/// `CreateContainerConfigError` with this message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// What the pod's volumes read from the API.
pub struct Sources<'a> {
    pub client: &'a kube::Client,
    pub namespace: &'a str,
    pub tokens: &'a TokenCache,
}

/// ServiceAccount tokens the kubelet holds for its pods' projected
/// volumes: one per (pod, account, audience, lifetime), asked for again
/// once 80 % of its life has passed, as upstream's token manager does.
#[derive(Default)]
pub struct TokenCache(std::sync::Mutex<BTreeMap<TokenKey, CachedToken>>);

type TokenKey = (String, String, String, i64);

struct CachedToken {
    token: String,
    refresh_at: std::time::Instant,
    expires_at: std::time::Instant,
}

/// Asked for every volume resync: a token this much older than its refresh
/// time is never used.
const TOKEN_REFRESH_SHARE: f64 = 0.8;

impl TokenCache {
    fn get(&self, key: &TokenKey) -> Option<String> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|c| std::time::Instant::now() < c.refresh_at)
            .map(|c| c.token.clone())
    }

    fn put(&self, key: TokenKey, token: String, lifetime: std::time::Duration) {
        let now = std::time::Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, c| c.expires_at > now);
        map.insert(
            key,
            CachedToken {
                token,
                refresh_at: now + lifetime.mul_f64(TOKEN_REFRESH_SHARE),
                expires_at: now + lifetime,
            },
        );
    }

    /// Forgets the tokens of a pod that is gone.
    pub fn forget_pod(&self, uid: &str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| k.0 != uid);
    }
}

impl Sources<'_> {
    /// The `KUBERNETES_SERVICE_*` and `KUBERNETES_PORT*` variables every
    /// container gets, from the `kubernetes` Service (in-cluster clients
    /// find the apiserver by them); none if it cannot be read.
    async fn apiserver_env(&self) -> Vec<(String, String)> {
        use k8s_openapi::api::core::v1::Service;
        let api: Api<Service> = Api::namespaced(self.client.clone(), "default");
        let svc = match api.get("kubernetes").await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "no kubernetes Service for the containers' environment");
                return Vec::new();
            }
        };
        let spec = svc.spec.unwrap_or_default();
        let Some(ip) = spec.cluster_ip.filter(|ip| !ip.is_empty() && ip != "None") else {
            return Vec::new();
        };
        let port = spec
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("https"))
            .or_else(|| spec.ports.iter().flatten().next())
            .map(|p| p.port)
            .unwrap_or(443);
        let url = format!("tcp://{ip}:{port}");
        vec![
            ("KUBERNETES_SERVICE_HOST".into(), ip.clone()),
            ("KUBERNETES_SERVICE_PORT".into(), port.to_string()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()),
            ("KUBERNETES_PORT".into(), url.clone()),
            (format!("KUBERNETES_PORT_{port}_TCP"), url),
            (format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
            (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.to_string()),
            (format!("KUBERNETES_PORT_{port}_TCP_ADDR"), ip),
        ]
    }

    /// A token of the pod's ServiceAccount bound to the pod (TokenRequest).
    async fn service_account_token(
        &self,
        pod: &Pod,
        audience: Option<&str>,
        seconds: i64,
    ) -> Result<String, ConfigError> {
        use k8s_openapi::api::authentication::v1::{
            BoundObjectReference, TokenRequest, TokenRequestSpec,
        };
        use k8s_openapi::api::core::v1::ServiceAccount;
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let key = (
            uid.clone(),
            sa.clone(),
            audience.unwrap_or_default().to_string(),
            seconds,
        );
        if let Some(t) = self.tokens.get(&key) {
            return Ok(t);
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: audience.map(|a| vec![a.to_string()]),
                expiration_seconds: Some(seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: Some(uid),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), self.namespace);
        let issued: TokenRequest = api
            .create_subresource("token", &sa, &Default::default(), &request)
            .await
            .map_err(|e| {
                ConfigError(format!("requesting a token for serviceaccount {sa:?}: {e}"))
            })?;
        let token = issued.status.and_then(|s| s.token).unwrap_or_default();
        if token.is_empty() {
            return Err(ConfigError(format!(
                "the token request for serviceaccount {sa:?} returned no token"
            )));
        }
        let lifetime = std::time::Duration::from_secs(seconds.max(1) as u64);
        self.tokens.put(key, token.clone(), lifetime);
        Ok(token)
    }

    async fn config_map(&self, name: &str) -> Result<Option<ConfigMap>, ConfigError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.namespace);
        api.get_opt(name)
            .await
            .map_err(|e| ConfigError(format!("reading configmap {name:?}: {e}")))
    }

    async fn secret(&self, name: &str) -> Result<Option<Secret>, ConfigError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), self.namespace);
        api.get_opt(name)
            .await
            .map_err(|e| ConfigError(format!("reading secret {name:?}: {e}")))
    }

    /// The data of a ConfigMap (text and binary) as bytes.
    async fn config_map_data(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, ConfigError> {
        match self.config_map(name).await? {
            Some(cm) => {
                let mut out: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in cm.binary_data.unwrap_or_default() {
                    out.insert(k, v.0);
                }
                Ok(Some(out))
            }
            None if optional => Ok(None),
            None => Err(ConfigError(format!("configmap {name:?} not found"))),
        }
    }

    async fn secret_data(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, ConfigError> {
        match self.secret(name).await? {
            Some(s) => {
                let mut out: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in s.string_data.unwrap_or_default() {
                    out.insert(k, v.into_bytes());
                }
                Ok(Some(out))
            }
            None if optional => Ok(None),
            None => Err(ConfigError(format!("secret {name:?} not found"))),
        }
    }
}

/// A pod field by its `fieldRef.fieldPath`.
pub fn field(pod: &Pod, path: &str) -> Result<String, ConfigError> {
    let m = &pod.metadata;
    let quoted = |s: &str, prefix: &str| {
        s.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['").and_then(|r| r.strip_suffix("']")))
            .map(String::from)
    };
    if let Some(k) = quoted(path, "metadata.labels") {
        return Ok(m
            .labels
            .as_ref()
            .and_then(|l| l.get(&k).cloned())
            .unwrap_or_default());
    }
    if let Some(k) = quoted(path, "metadata.annotations") {
        return Ok(m
            .annotations
            .as_ref()
            .and_then(|l| l.get(&k).cloned())
            .unwrap_or_default());
    }
    let kv = |map: &Option<BTreeMap<String, String>>| {
        map.iter()
            .flatten()
            .map(|(k, v)| format!("{k}=\"{v}\"\n"))
            .collect::<String>()
    };
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => kv(&m.labels),
        "metadata.annotations" => kv(&m.annotations),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.podIPs" => status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        other => return Err(ConfigError(format!("unsupported fieldPath {other:?}"))),
    })
}

/// A container's resource by `resourceFieldRef`, in the divisor's units
/// (rounded up, as upstream does).
fn resource(c: &Container, resource: &str, divisor: Option<&str>) -> Result<String, ConfigError> {
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| ConfigError(format!("unsupported resource {resource:?}")))?;
    let r = c.resources.as_ref();
    let map = match kind {
        "limits" => r.and_then(|r| r.limits.as_ref()),
        "requests" => r.and_then(|r| r.requests.as_ref()),
        _ => return Err(ConfigError(format!("unsupported resource {resource:?}"))),
    };
    let q = map.and_then(|m| m.get(name)).map(|q| q.0.clone());
    let value = if name == "cpu" {
        let milli = q
            .as_deref()
            .and_then(super::quantity::millicores)
            .unwrap_or(0);
        let div = divisor
            .and_then(super::quantity::millicores)
            .unwrap_or(1000)
            .max(1);
        (milli + div - 1) / div
    } else {
        let b = q.as_deref().and_then(super::quantity::bytes).unwrap_or(0);
        let div = divisor.and_then(super::quantity::bytes).unwrap_or(1).max(1);
        (b + div - 1) / div
    };
    Ok(value.to_string())
}

/// The container's environment: image env, then envFrom, then env (with
/// `$(VAR)` expansion of earlier names), as upstream orders it.
pub async fn environment(
    src: &Sources<'_>,
    pod: &Pod,
    c: &Container,
    image_env: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = image_env;
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(name, _)| *name != k);
        env.push((k, v));
    };
    for (k, v) in src.apiserver_env().await {
        set(&mut env, k, v);
    }
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            src.config_map_data(&r.name, r.optional.unwrap_or(false))
                .await?
        } else if let Some(r) = &from.secret_ref {
            src.secret_data(&r.name, r.optional.unwrap_or(false))
                .await?
        } else {
            None
        };
        for (k, v) in data.unwrap_or_default() {
            set(
                &mut env,
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for e in c.env.iter().flatten() {
        let value = match &e.value_from {
            None => Some(super::spec::expand(
                e.value.as_deref().unwrap_or_default(),
                &env,
            )),
            Some(from) => {
                if let Some(f) = &from.field_ref {
                    Some(field(pod, &f.field_path)?)
                } else if let Some(r) = &from.resource_field_ref {
                    let target = match &r.container_name {
                        Some(n) if !n.is_empty() => pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.containers.iter().find(|x| x.name == *n))
                            .unwrap_or(c),
                        _ => c,
                    };
                    Some(resource(
                        target,
                        &r.resource,
                        r.divisor.as_ref().map(|d| d.0.as_str()),
                    )?)
                } else if let Some(r) = &from.config_map_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match src.config_map_data(&r.name, optional).await? {
                        Some(d) => match d.get(&r.key) {
                            Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                            None if optional => None,
                            None => {
                                return Err(ConfigError(format!(
                                    "couldn't find key {} in ConfigMap {}/{}",
                                    r.key, src.namespace, r.name
                                )));
                            }
                        },
                        None => None,
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match src.secret_data(&r.name, optional).await? {
                        Some(d) => match d.get(&r.key) {
                            Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                            None if optional => None,
                            None => {
                                return Err(ConfigError(format!(
                                    "couldn't find key {} in Secret {}/{}",
                                    r.key, src.namespace, r.name
                                )));
                            }
                        },
                        None => None,
                    }
                } else {
                    None
                }
            }
        };
        if let Some(v) = value {
            set(&mut env, e.name.clone(), v);
        }
    }
    Ok(env)
}

/// The files one volume holds: relative path → (content, mode).
type Files = BTreeMap<String, (Vec<u8>, u32)>;

fn select(
    data: BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    default_mode: u32,
    what: &str,
    optional: bool,
) -> Result<Files, ConfigError> {
    let mut out = Files::new();
    match items {
        None => {
            for (k, v) in data {
                out.insert(k, (v, default_mode));
            }
        }
        Some(items) => {
            for i in items {
                match data.get(&i.key) {
                    Some(v) => {
                        let mode = i.mode.map(|m| m as u32).unwrap_or(default_mode);
                        out.insert(i.path.clone(), (v.clone(), mode));
                    }
                    None if optional => {}
                    None => {
                        return Err(ConfigError(format!(
                            "configmap references non-existent config key: {} ({what})",
                            i.key
                        )));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The files of a configMap, secret, downwardAPI or projected volume;
/// None for volumes that are not written from the API.
pub async fn files(src: &Sources<'_>, pod: &Pod, v: &Volume) -> Result<Option<Files>, ConfigError> {
    let mode = |m: Option<i32>| m.map(|m| m as u32).unwrap_or(0o644);
    if let Some(cm) = &v.config_map {
        let optional = cm.optional.unwrap_or(false);
        let data = src
            .config_map_data(&cm.name, optional)
            .await?
            .unwrap_or_default();
        return Ok(Some(select(
            data,
            &cm.items,
            mode(cm.default_mode),
            &cm.name,
            optional,
        )?));
    }
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let optional = s.optional.unwrap_or(false);
        let data = src.secret_data(&name, optional).await?.unwrap_or_default();
        return Ok(Some(select(
            data,
            &s.items,
            mode(s.default_mode),
            &name,
            optional,
        )?));
    }
    if let Some(d) = &v.downward_api {
        return Ok(Some(downward(
            pod,
            d.items.as_deref().unwrap_or_default(),
            mode(d.default_mode),
        )?));
    }
    if let Some(p) = &v.projected {
        let default = mode(p.default_mode);
        let mut out = Files::new();
        for s in p.sources.iter().flatten() {
            if let Some(cm) = &s.config_map {
                let optional = cm.optional.unwrap_or(false);
                let data = src
                    .config_map_data(&cm.name, optional)
                    .await?
                    .unwrap_or_default();
                out.extend(select(data, &cm.items, default, &cm.name, optional)?);
            }
            if let Some(sec) = &s.secret {
                let optional = sec.optional.unwrap_or(false);
                let data = src
                    .secret_data(&sec.name, optional)
                    .await?
                    .unwrap_or_default();
                out.extend(select(data, &sec.items, default, &sec.name, optional)?);
            }
            if let Some(d) = &s.downward_api {
                out.extend(downward(
                    pod,
                    d.items.as_deref().unwrap_or_default(),
                    default,
                )?);
            }
            if let Some(t) = &s.service_account_token {
                let token = src
                    .service_account_token(
                        pod,
                        t.audience.as_deref().filter(|a| !a.is_empty()),
                        t.expiration_seconds.unwrap_or(3600),
                    )
                    .await?;
                out.insert(t.path.clone(), (token.into_bytes(), default));
            }
        }
        return Ok(Some(out));
    }
    Ok(None)
}

fn downward(
    pod: &Pod,
    items: &[k8s_openapi::api::core::v1::DownwardAPIVolumeFile],
    default: u32,
) -> Result<Files, ConfigError> {
    let mut out = Files::new();
    for i in items {
        let value = match (&i.field_ref, &i.resource_field_ref) {
            (Some(f), _) => field(pod, &f.field_path)?,
            (None, Some(r)) => {
                let c = pod
                    .spec
                    .as_ref()
                    .and_then(|s| {
                        s.containers
                            .iter()
                            .find(|c| Some(&c.name) == r.container_name.as_ref())
                    })
                    .ok_or_else(|| ConfigError(format!("{}: no container named", i.path)))?;
                resource(c, &r.resource, r.divisor.as_ref().map(|d| d.0.as_str()))?
            }
            (None, None) => continue,
        };
        out.insert(
            i.path.clone(),
            (
                value.into_bytes(),
                i.mode.map(|m| m as u32).unwrap_or(default),
            ),
        );
    }
    Ok(out)
}

/// Writes `files` into `dir` atomically (the `..data` swap); true when
/// anything changed.
pub fn write_atomic(dir: &Path, files: &Files) -> std::io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join("..data");
    // Unchanged: nothing to do.
    let current = std::fs::read_link(&data).ok().map(|t| dir.join(t));
    if let Some(cur) = &current {
        let same = files
            .iter()
            .all(|(p, (content, _))| std::fs::read(cur.join(p)).is_ok_and(|c| c == *content))
            && count_files(cur) == files.len();
        if same {
            return Ok(false);
        }
    }
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let fresh = dir.join(&stamp);
    for (p, (content, mode)) in files {
        if p.split('/').any(|part| part == ".." || part.is_empty()) || p.starts_with("..") {
            return Err(std::io::Error::other(format!("invalid path {p:?}")));
        }
        let target = fresh.join(p);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, content)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))?;
    }
    std::fs::create_dir_all(&fresh)?;
    // The swap: a new symlink renamed over ..data.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, &data)?;
    // Top-level names point through ..data.
    let tops: std::collections::BTreeSet<String> = files
        .keys()
        .filter_map(|p| p.split('/').next().map(String::from))
        .collect();
    for t in &tops {
        let link = dir.join(t);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{t}"), &link)?;
        }
    }
    // Names that went away, and the old data.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..") && !tops.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Some(cur) = current
        && cur != fresh
    {
        let _ = std::fs::remove_dir_all(cur);
    }
    Ok(true)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        count_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Where a volume lives on the node.
pub fn host_path(pod_dir: &Path, v: &Volume) -> Result<PathBuf, ConfigError> {
    if let Some(h) = &v.host_path {
        let p = PathBuf::from(&h.path);
        match h.type_.as_deref().unwrap_or("") {
            "DirectoryOrCreate" => {
                std::fs::create_dir_all(&p)
                    .map_err(|e| ConfigError(format!("hostPath {}: {e}", h.path)))?;
            }
            "Directory" if !p.is_dir() => {
                return Err(ConfigError(format!(
                    "hostPath type check failed: {} is not a directory",
                    h.path
                )));
            }
            "File" if !p.is_file() => {
                return Err(ConfigError(format!(
                    "hostPath type check failed: {} is not a file",
                    h.path
                )));
            }
            _ => {}
        }
        return Ok(p);
    }
    if v.empty_dir.is_some()
        || v.config_map.is_some()
        || v.secret.is_some()
        || v.downward_api.is_some()
        || v.projected.is_some()
    {
        return Ok(pod_dir.join("volumes").join(&v.name));
    }
    Err(ConfigError(format!(
        "volume {:?}: unsupported volume type (emptyDir, hostPath, configMap, secret, downwardAPI, projected and persistentVolumeClaim are)",
        v.name
    )))
}

/// Prepares every volume of the pod (an emptyDir with `medium: Memory` is
/// a tmpfs) and refreshes those written from the API; true when a file
/// changed.
pub async fn prepare(src: &Sources<'_>, pod: &Pod, pod_dir: &Path) -> Result<bool, ConfigError> {
    let mut changed = false;
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        // A claim's volume is the node path `mounts` is given.
        .filter(|v| v.persistent_volume_claim.is_none())
    {
        let path = host_path(pod_dir, v)?;
        if let Some(e) = &v.empty_dir {
            std::fs::create_dir_all(&path)
                .map_err(|e| ConfigError(format!("emptyDir {}: {e}", v.name)))?;
            if e.medium.as_deref() == Some("Memory") && !is_mountpoint(&path) {
                let size = e
                    .size_limit
                    .as_ref()
                    .and_then(|q| super::quantity::bytes(&q.0))
                    .map(|b| format!("size={b}"))
                    .unwrap_or_default();
                nix::mount::mount(
                    Some("tmpfs"),
                    &path,
                    Some("tmpfs"),
                    nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                    Some(size.as_str()),
                )
                .map_err(|e| ConfigError(format!("emptyDir {} (Memory): {e}", v.name)))?;
            }
        }
        if let Some(files) = files(src, pod, v).await? {
            changed |= write_atomic(&path, &files)
                .map_err(|e| ConfigError(format!("volume {}: {e}", v.name)))?;
        }
    }
    Ok(changed)
}

fn is_mountpoint(p: &Path) -> bool {
    let s = p.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(s.as_str()))
}

/// Unmounts the pod's tmpfs volumes.
pub fn release(pod_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(pod_dir.join("volumes")) {
        for e in entries.flatten() {
            let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A container's bind mounts: (source, destination, read-only). `claims`
/// holds the node path of each claim volume (`local_volumes`).
pub fn mounts(
    pod: &Pod,
    c: &Container,
    pod_dir: &Path,
    claims: &BTreeMap<String, PathBuf>,
) -> Result<Vec<(String, String, bool)>, ConfigError> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let v = volumes
            .into_iter()
            .flatten()
            .find(|v| v.name == m.name)
            .ok_or_else(|| {
                ConfigError(format!(
                    "cannot find volume {:?} to mount into container {:?}",
                    m.name, c.name
                ))
            })?;
        let mut src = match claims.get(&v.name) {
            Some(p) => p.clone(),
            None => host_path(pod_dir, v)?,
        };
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            if sub.split('/').any(|p| p == "..") || sub.starts_with('/') {
                return Err(ConfigError(format!("invalid subPath {sub:?}")));
            }
            src = src.join(sub);
            if !src.exists() {
                std::fs::create_dir_all(&src)
                    .map_err(|e| ConfigError(format!("subPath {sub}: {e}")))?;
            }
        }
        let ro = m.read_only.unwrap_or(false)
            || v.persistent_volume_claim
                .as_ref()
                .is_some_and(|c| c.read_only == Some(true))
            || v.config_map.is_some()
            || v.secret.is_some()
            || v.downward_api.is_some()
            || v.projected.is_some();
        out.push((src.display().to_string(), m.mount_path.clone(), ro));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_swap_data_and_drop_old_names() {
        let dir = std::env::temp_dir().join(format!("skiff-vol-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut f = Files::new();
        f.insert("a".into(), (b"1".to_vec(), 0o644));
        f.insert("b".into(), (b"2".to_vec(), 0o600));
        assert!(write_atomic(&dir, &f).expect("first"));
        assert_eq!(std::fs::read(dir.join("a")).expect("a"), b"1");
        assert!(
            !write_atomic(&dir, &f).expect("same"),
            "unchanged writes nothing"
        );
        f.remove("b");
        f.insert("a".into(), (b"3".to_vec(), 0o644));
        assert!(write_atomic(&dir, &f).expect("second"));
        assert_eq!(std::fs::read(dir.join("a")).expect("a"), b"3");
        assert!(
            std::fs::symlink_metadata(dir.join("b")).is_err(),
            "b is gone"
        );
        let stamps = std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("..1"))
            .count();
        assert_eq!(stamps, 1, "the old data went");
        let _ = std::fs::remove_dir_all(&dir);
        let mut bad = Files::new();
        bad.insert("../x".into(), (vec![], 0o644));
        assert!(write_atomic(&dir, &bad).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fields_by_path() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("p".into());
        pod.metadata.labels = Some(BTreeMap::from([("app".to_string(), "web".to_string())]));
        assert_eq!(field(&pod, "metadata.name").expect("name"), "p");
        assert_eq!(field(&pod, "metadata.labels['app']").expect("label"), "web");
        assert_eq!(
            field(&pod, "metadata.labels").expect("labels"),
            "app=\"web\"\n"
        );
        assert!(field(&pod, "spec.bogus").is_err());
    }
}
