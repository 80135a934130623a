//! Small OCI images built from what the machine has (nothing is fetched):
//!
//! - `busybox`: busybox-static with every applet linked in /bin (httpd,
//!   nc, nslookup, sh: app, client and debug tool); command `sh`.
//! - `skiff-probe`: the workspace's probe server and client, with the
//!   shared libraries it loads; entrypoint `/skiff-probe`.
//! - `skiff-node`: what `deploy/skiff-node.yaml` runs: `skiff-agent`
//!   (entrypoint), `skiff-cni` in `/opt/skiff/bin` for its install step,
//!   and `nft` (the overlay's masquerade rules), with their libraries.
//!
//! Each is one gzipped layer and a config, built once into
//! `target/images/<name>/` (`cargo xtask images`, which `cargo xtask test`
//! runs) and rebuilt when its source binary is newer. `node::Registry`
//! pushes them to a test registry, so every pod start pulls for real.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Value, json};
use sha2::Digest as _;

use crate::{Spawn, TempDir, bin_dir};

/// The images there are.
pub const NAMES: [&str; 3] = ["busybox", "skiff-probe", "skiff-node"];

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One built image: its only layer (gzipped tar) and its config.
pub struct Image {
    pub layer_gz: Vec<u8>,
    pub config: Value,
}

/// `target/images`.
pub fn dir() -> PathBuf {
    let bins = bin_dir();
    bins.parent()
        .map_or(bins.clone(), Path::to_path_buf)
        .join("images")
}

/// Serializes builds between the threads of one test binary.
static BUILDING: Mutex<()> = Mutex::new(());

/// The image `name`, from `target/images` when it is there and newer than
/// what it is made of, else built (and stored) now.
pub fn get(name: &str) -> Result<Image, String> {
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let sources = sources_of(name)?;
    let out = dir().join(name);
    let (layer, config) = (out.join("layer.tar.gz"), out.join("config.json"));
    let fresh = |p: &Path| {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        sources
            .iter()
            .all(|s| matches!((m(p), m(s)), (Some(a), Some(b)) if a >= b))
    };
    if !(fresh(&layer) && fresh(&config)) {
        build(name, &out)?;
    }
    let layer_gz = std::fs::read(&layer).map_err(|e| format!("{}: {e}", layer.display()))?;
    let text = std::fs::read(&config).map_err(|e| format!("{}: {e}", config.display()))?;
    let config = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", config.display()))?;
    Ok(Image { layer_gz, config })
}

/// The files image `name` is made of (the first is its main binary).
fn sources_of(name: &str) -> Result<Vec<PathBuf>, String> {
    match name {
        "busybox" => Ok(vec![PathBuf::from("/bin/busybox")]),
        "skiff-probe" => Ok(vec![bin_dir().join("skiff-probe")]),
        "skiff-node" => Ok(vec![
            bin_dir().join("skiff-agent"),
            bin_dir().join("skiff-cni"),
            PathBuf::from("/usr/sbin/nft"),
        ]),
        other => Err(format!("no image {other:?} (there are {NAMES:?})")),
    }
}

/// Builds image `name` into `out` (written whole, then renamed in).
pub fn build(name: &str, out: &Path) -> Result<(), String> {
    let work = TempDir::new();
    let root = work.path.join("rootfs");
    let mkdir =
        |d: &Path| std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()));
    for d in ["tmp", "etc", "proc", "sys", "dev", "root"] {
        mkdir(&root.join(d))?;
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .map_err(|e| format!("passwd: {e}"))?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")
        .map_err(|e| format!("group: {e}"))?;
    let sources = sources_of(name)?;
    let source = sources[0].clone();
    let copy = |from: &Path, to: &Path| {
        if let Some(d) = to.parent() {
            mkdir(d)?;
        }
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| format!("copy {}: {e}", from.display()))
    };
    let run_config = match name {
        "busybox" => {
            mkdir(&root.join("bin"))?;
            mkdir(&root.join("var/www"))?;
            copy(&source, &root.join("bin/busybox"))
                .map_err(|e| format!("{e} (package busybox-static)"))?;
            let applets = Spawn::new(&source).args(["--list"]).try_output()?;
            for a in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
                let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(a));
            }
            json!({"Env": [PATH_ENV], "Cmd": ["sh"]})
        }
        "skiff-node" => {
            let places = ["usr/local/bin", "opt/skiff/bin", "usr/sbin"];
            for (from, dir) in sources.iter().zip(places) {
                let file = from.file_name().unwrap_or(from.as_os_str());
                let to = root.join(dir).join(file);
                copy(from, &to).map_err(|e| {
                    format!("{e} (run `cargo build --bins`; nft is package nftables)")
                })?;
                // A debug build's agent is mostly debug info (360 MB of it).
                Spawn::new("strip")
                    .args(["--strip-debug"])
                    .arg_path(&to)
                    .try_output()?;
                for lib in shared_libraries(from)? {
                    copy(&lib, &root.join(lib.strip_prefix("/").unwrap_or(&lib)))?;
                }
            }
            mkdir(&root.join("run"))?;
            json!({"Env": [PATH_ENV], "Entrypoint": ["/usr/local/bin/skiff-agent"]})
        }
        _ => {
            copy(&source, &root.join("skiff-probe"))
                .map_err(|e| format!("{e} (run `cargo build --bins`)"))?;
            for lib in shared_libraries(&source)? {
                copy(&lib, &root.join(lib.strip_prefix("/").unwrap_or(&lib)))?;
            }
            json!({"Env": [PATH_ENV], "Entrypoint": ["/skiff-probe"]})
        }
    };
    let tar = work.path.join("layer.tar");
    Spawn::new("tar")
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
            "--sort=name",
            "-cf",
        ])
        .arg_path(&tar)
        .args(["-C", &root.display().to_string(), "."])
        .try_output()?;
    let raw = std::fs::read(&tar).map_err(|e| format!("read layer: {e}"))?;
    let diff_id = format!("sha256:{}", hex(&sha2::Sha256::digest(&raw)));
    Spawn::new("gzip")
        .args(["-n", "-f"])
        .arg_path(&tar)
        .try_output()?;
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    // Each file is written beside its final name and renamed in, so a
    // reader never sees half of one.
    mkdir(out)?;
    let put = |f: &str, bytes: &[u8]| {
        let tmp = out.join(format!(".{f}.{}", std::process::id()));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, out.join(f)))
            .map_err(|e| format!("store {}: {e}", out.join(f).display()))
    };
    let gz = std::fs::read(work.path.join("layer.tar.gz")).map_err(|e| format!("read gz: {e}"))?;
    put("layer.tar.gz", &gz)?;
    put("config.json", config.to_string().as_bytes())?;
    Ok(())
}

/// Pushes `image` as `reference` (`host[:port]/repo:tag`), over plain
/// HTTP when `plain_http`, anonymously. Blocks (a runtime of its own).
pub fn push(image: Image, reference: &str, plain_http: bool) -> Result<(), String> {
    use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let parsed: oci_client::Reference =
        reference.parse().map_err(|e| format!("{reference}: {e}"))?;
    rt.block_on(async {
        let client = oci_client::Client::new(ClientConfig {
            protocol: if plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            ..Default::default()
        });
        let layer = ImageLayer::new(
            image.layer_gz,
            oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE.to_string(),
            None,
        );
        let config = Config::new(
            image.config.to_string().into_bytes(),
            oci_client::manifest::IMAGE_CONFIG_MEDIA_TYPE.to_string(),
            None,
        );
        client
            .push(
                &parsed,
                &[layer],
                config,
                &oci_client::secrets::RegistryAuth::Anonymous,
                None,
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("push {reference}: {e}"))
    })
}

/// The shared libraries `binary` loads, the dynamic loader included
/// (`ldd`'s answer).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Spawn::new("ldd").arg_path(binary).try_output()?;
    Ok(out
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)".
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
