//! Pulls: an OCI registry (HTTP or HTTPS) into containerd's content store,
//! unpacked into the overlayfs snapshotter and recorded as an image, the
//! way `ctr pull` does on containerd 1.6 (which has no transfer service):
//! resolve the reference, fetch the manifest (from an index, the one for
//! this platform), the config and the layers, write each to the content
//! store with the garbage collector's reference labels, apply each layer
//! through the diff service onto a snapshot named by its chain ID, then
//! point the image at the manifest.

use std::collections::HashMap;

use containerd_client::types::Descriptor;
use futures::StreamExt as _;
use oci_client::Reference;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE, IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
    IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use serde_json::Value;
use sha2::Digest as _;

use super::containerd::{Containerd, ContainerdError, SNAPSHOTTER};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("couldn't parse image name {image:?}: {why}")]
    InvalidName { image: String, why: String },
    #[error("failed to pull and unpack image {image:?}: {why}")]
    Pull { image: String, why: String },
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
}

/// What a container needs of a pulled image.
#[derive(Clone, Debug, Default)]
pub struct ImageInfo {
    /// The name containerd records it under (`registry/repo:tag`).
    pub name: String,
    /// `repo@sha256:...` of the manifest: the pod's `imageID`.
    pub id: String,
    /// The chain ID of the top layer: the parent of a container's rootfs.
    pub top_layer: String,
    /// The image config's `config` (Entrypoint, Cmd, Env, WorkingDir, User).
    pub config: Value,
}

impl ImageInfo {
    fn new(reference: &Reference, digest: &str, top_layer: String, config: &Value) -> Self {
        Self {
            name: reference.whole(),
            id: format!(
                "{}/{}@{digest}",
                reference.registry(),
                reference.repository()
            ),
            top_layer,
            config: config["config"].clone(),
        }
    }
}

/// Normalises a reference the way the kubelet and docker do
/// (`busybox` → `docker.io/library/busybox:latest`).
pub fn parse_reference(image: &str) -> Result<Reference, ImageError> {
    image
        .parse::<Reference>()
        .map_err(|e| ImageError::InvalidName {
            image: image.into(),
            why: e.to_string(),
        })
}

/// The chain IDs of a layer stack (OCI image spec, "Layer ChainID").
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                let h = sha2::Sha256::digest(format!("{prev} {d}").as_bytes());
                format!("sha256:{}", hex(&h))
            }
        };
        out.push(next);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Puller {
    client: oci_client::Client,
    /// Pulls go one at a time (upstream's serializeImagePulls default):
    /// two pods of one image pull it once.
    serial: tokio::sync::Mutex<()>,
}

impl Puller {
    /// `insecure`: registries reached over plain HTTP (`host:port`).
    pub fn new(insecure: &[String]) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if insecure.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(insecure.to_vec())
        };
        Self {
            client: oci_client::Client::new(ClientConfig {
                protocol,
                ..Default::default()
            }),
            serial: tokio::sync::Mutex::new(()),
        }
    }

    /// What containerd already holds for `image`, if it has it unpacked.
    pub async fn local(
        &self,
        cd: &Containerd,
        image: &str,
    ) -> Result<Option<ImageInfo>, ImageError> {
        let reference = parse_reference(image)?;
        let name = reference.whole();
        let Some(img) = cd.image(&name).await? else {
            return Ok(None);
        };
        let Some(target) = img.target else {
            return Ok(None);
        };
        match self.inspect(cd, &reference, &target).await {
            Ok(info) => Ok(Some(info)),
            Err(ImageError::Containerd(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads an image that is in the content store and checks that its
    /// layers are unpacked.
    async fn inspect(
        &self,
        cd: &Containerd,
        reference: &Reference,
        target: &Descriptor,
    ) -> Result<ImageInfo, ImageError> {
        let mut manifest_digest = target.digest.clone();
        let mut manifest: Value = json(&cd.read_content(&manifest_digest).await?, reference)?;
        if manifest["manifests"].is_array() {
            let Some(d) = pick_platform(&manifest) else {
                return Err(pull_err(reference, "no linux/amd64 manifest in the index"));
            };
            manifest_digest = d;
            manifest = json(&cd.read_content(&manifest_digest).await?, reference)?;
        }
        let config_digest = manifest["config"]["digest"].as_str().unwrap_or_default();
        let config: Value = json(&cd.read_content(config_digest).await?, reference)?;
        let chain = chain_ids(&diff_ids(&config));
        let top = chain.last().cloned().unwrap_or_default();
        if top.is_empty() || !cd.snapshot_exists(&top).await? {
            return Err(ImageError::Containerd(ContainerdError::Call {
                op: "snapshot stat",
                what: top,
                status: Box::new(containerd_client::tonic::Status::not_found("not unpacked")),
            }));
        }
        Ok(ImageInfo::new(reference, &target.digest, top, &config))
    }

    /// Pulls `image` into containerd and unpacks it (`always`: even when an earlier pull of the same
    /// reference is unpacked, to pick up a moved tag).
    pub async fn pull(
        &self,
        cd: &Containerd,
        image: &str,
        always: bool,
    ) -> Result<ImageInfo, ImageError> {
        let _one_at_a_time = self.serial.lock().await;
        // A pull that waited behind another of the same image uses its
        // result; Always resolves again (layers it has are not fetched).
        if !always && let Some(info) = self.local(cd, image).await? {
            return Ok(info);
        }
        // Under a lease: until the image record references them, the
        // content and snapshots written are the garbage collector's.
        let leased = cd.leased("pull").await?;
        let pulled = self.pull_now(&leased, image).await;
        leased.release().await;
        pulled
    }

    async fn pull_now(&self, cd: &Containerd, image: &str) -> Result<ImageInfo, ImageError> {
        let reference = parse_reference(image)?;
        let auth = RegistryAuth::Anonymous;
        let accepted = [
            OCI_IMAGE_MEDIA_TYPE,
            IMAGE_MANIFEST_MEDIA_TYPE,
            OCI_IMAGE_INDEX_MEDIA_TYPE,
            IMAGE_MANIFEST_LIST_MEDIA_TYPE,
        ];
        tracing::debug!(image = %reference, "resolving");
        let (raw, digest) = self
            .client
            .pull_manifest_raw(&reference, &auth, &accepted)
            .await
            .map_err(|e| pull_err(&reference, e))?;
        tracing::debug!(image = %reference, %digest, "resolved");
        let top: Value = json(&raw, &reference)?;
        let top_desc = Descriptor {
            media_type: media_type(&top, OCI_IMAGE_MEDIA_TYPE),
            digest: digest.clone(),
            size: raw.len() as i64,
            ..Default::default()
        };
        // An index: the manifest for this platform, fetched by digest.
        let (manifest_raw, manifest_digest) = if top["manifests"].is_array() {
            let d = pick_platform(&top)
                .ok_or_else(|| pull_err(&reference, "no linux/amd64 manifest in the index"))?;
            let by_digest = reference.clone_with_digest(d.clone());
            let (m, _) = self
                .client
                .pull_manifest_raw(&by_digest, &auth, &accepted)
                .await
                .map_err(|e| pull_err(&reference, e))?;
            let mut labels = HashMap::new();
            labels.insert("containerd.io/gc.ref.content.m.0".to_string(), d.clone());
            cd.write_content(&top_desc, once(raw.clone()), labels)
                .await?;
            (m, d)
        } else {
            (raw.clone(), digest.clone())
        };
        let manifest: Value = json(&manifest_raw, &reference)?;
        let config_desc = descriptor(&manifest["config"]);
        let layers: Vec<Descriptor> = manifest["layers"]
            .as_array()
            .map(|l| l.iter().map(descriptor).collect())
            .unwrap_or_default();
        for l in &layers {
            if ![
                IMAGE_LAYER_GZIP_MEDIA_TYPE,
                IMAGE_LAYER_MEDIA_TYPE,
                IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
                IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
            ]
            .contains(&l.media_type.as_str())
            {
                return Err(pull_err(
                    &reference,
                    format!("unsupported layer type {}", l.media_type),
                ));
            }
        }
        // The config, then the layers, then the manifest that refers to
        // them (so the garbage collector never sees a dangling reference).
        let mut config_raw = Vec::new();
        self.client
            .pull_blob(&reference, config_desc.digest.as_str(), &mut config_raw)
            .await
            .map_err(|e| pull_err(&reference, e))?;
        let config: Value = json(&config_raw, &reference)?;
        let diffs = diff_ids(&config);
        if diffs.len() != layers.len() {
            return Err(pull_err(
                &reference,
                "config's diff_ids do not match the layers",
            ));
        }
        let chain = chain_ids(&diffs);
        let top_layer = chain.last().cloned().unwrap_or_default();
        let mut config_labels = HashMap::new();
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
            top_layer.clone(),
        );
        cd.write_content(&config_desc, once(config_raw.into()), config_labels)
            .await?;
        tracing::debug!(image = %reference, "config written");
        for l in &layers {
            if cd.has_content(&l.digest).await? {
                continue;
            }
            let blob = self
                .client
                .pull_blob_stream(&reference, l.digest.as_str())
                .await
                .map_err(|e| pull_err(&reference, e))?;
            let chunks = blob.stream.map(|c| c.map_err(|e| e.to_string()));
            cd.write_content(l, chunks, HashMap::new()).await?;
        }
        let mut manifest_labels = HashMap::new();
        manifest_labels.insert(
            "containerd.io/gc.ref.content.config".to_string(),
            config_desc.digest.clone(),
        );
        for (i, l) in layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        let manifest_desc = Descriptor {
            media_type: media_type(&manifest, OCI_IMAGE_MEDIA_TYPE),
            digest: manifest_digest,
            size: manifest_raw.len() as i64,
            ..Default::default()
        };
        cd.write_content(&manifest_desc, once(manifest_raw), manifest_labels)
            .await?;
        tracing::debug!(image = %reference, "content written");
        self.unpack(cd, &layers, &chain).await?;
        tracing::debug!(image = %reference, "unpacked");
        let target = if top["manifests"].is_array() {
            top_desc
        } else {
            manifest_desc
        };
        cd.put_image(&reference.whole(), target.clone()).await?;
        Ok(ImageInfo::new(
            &reference,
            &target.digest,
            top_layer,
            &config,
        ))
    }

    /// Applies each layer onto a snapshot named by its chain ID, skipping
    /// those already unpacked.
    async fn unpack(
        &self,
        cd: &Containerd,
        layers: &[Descriptor],
        chain: &[String],
    ) -> Result<(), ImageError> {
        let mut parent = String::new();
        for (layer, id) in layers.iter().zip(chain) {
            if !cd.snapshot_exists(id).await? {
                let key = format!("extract-{}-{id}", std::process::id());
                let mounts = cd.prepare(&key, &parent, HashMap::new()).await?;
                let applied = cd.apply(layer, mounts).await;
                let committed = match applied {
                    Ok(()) => cd.commit(id, &key).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = committed {
                    let _ = cd.remove_snapshot(&key).await;
                    // Another pull of the same image committed it first.
                    if !(e.is_already_exists() && cd.snapshot_exists(id).await?) {
                        return Err(e.into());
                    }
                }
            }
            parent = id.clone();
        }
        Ok(())
    }
}

fn once(
    b: bytes::Bytes,
) -> impl futures::Stream<Item = Result<bytes::Bytes, String>> + Send + 'static {
    futures::stream::once(async move { Ok(b) })
}

fn pull_err(reference: &Reference, e: impl std::fmt::Display) -> ImageError {
    ImageError::Pull {
        image: reference.whole(),
        why: e.to_string(),
    }
}

fn json(raw: &[u8], reference: &Reference) -> Result<Value, ImageError> {
    serde_json::from_slice(raw).map_err(|e| pull_err(reference, format!("bad JSON: {e}")))
}

fn media_type(v: &Value, default: &str) -> String {
    v["mediaType"].as_str().unwrap_or(default).to_string()
}

fn descriptor(v: &Value) -> Descriptor {
    Descriptor {
        media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
        digest: v["digest"].as_str().unwrap_or_default().to_string(),
        size: v["size"].as_i64().unwrap_or_default(),
        ..Default::default()
    }
}

fn diff_ids(config: &Value) -> Vec<String> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The linux/amd64 entry of an index.
fn pick_platform(index: &Value) -> Option<String> {
    index["manifests"].as_array()?.iter().find_map(|m| {
        let p = &m["platform"];
        (p["os"] == "linux" && p["architecture"] == "amd64")
            .then(|| m["digest"].as_str().map(String::from))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        let want = hex(&sha2::Sha256::digest(b"sha256:aaaa sha256:bbbb"));
        assert_eq!(ids[1], format!("sha256:{want}"));
    }

    #[test]
    fn short_names_normalise_like_docker() {
        let r = parse_reference("busybox").expect("parses");
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");
        let r = parse_reference("127.0.0.1:5000/app:1").expect("parses");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert!(parse_reference("UPPER/Case:x").is_err());
    }
}
