//! Installing the CNI plugin and its conflist on the host, as the
//! DaemonSet's init container does (Flannel's install-cni): each file is
//! written beside its final name and renamed in, so a runtime calling the
//! plugin or reading the config at that moment sees the old file or the new
//! one, never half of one (and a running plugin binary is not "busy").

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a CNI conflist: {why}")]
    Conflist { path: PathBuf, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `text` is a conflist a runtime will load: a `name`, a
/// `cniVersion` and a non-empty `plugins` list each with a `type`.
pub fn check_conflist(path: &Path, text: &[u8]) -> Result<(), InstallError> {
    let bad = |why: String| InstallError::Conflist {
        path: path.to_path_buf(),
        why,
    };
    let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
    for field in ["name", "cniVersion"] {
        if !v.get(field).is_some_and(serde_json::Value::is_string) {
            return Err(bad(format!("{field} is missing")));
        }
    }
    let plugins = v
        .get("plugins")
        .and_then(serde_json::Value::as_array)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("plugins is missing or empty".into()))?;
    for (i, p) in plugins.iter().enumerate() {
        if !p.get("type").is_some_and(serde_json::Value::is_string) {
            return Err(bad(format!("plugins[{i}].type is missing")));
        }
    }
    Ok(())
}

/// Writes `bytes` to `to` with `mode`, through a temporary file renamed in.
fn put(to: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = to.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, to).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(to)(e)
    })
}

/// Copies `plugin` into `bin_dir` (same file name) and `conflist` into
/// `conf_dir/<conf_name>`. Returns the two paths written.
pub fn install(
    plugin: &Path,
    bin_dir: &Path,
    conflist: &Path,
    conf_dir: &Path,
    conf_name: &str,
) -> Result<(PathBuf, PathBuf), InstallError> {
    let text = std::fs::read(conflist).map_err(io(conflist))?;
    check_conflist(conflist, &text)?;
    let binary = std::fs::read(plugin).map_err(io(plugin))?;
    let name = plugin.file_name().unwrap_or(plugin.as_os_str());
    let bin_to = bin_dir.join(name);
    put(&bin_to, &binary, 0o755)?;
    let conf_to = conf_dir.join(conf_name);
    put(&conf_to, &text, 0o644)?;
    Ok((bin_to, conf_to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflist_without_plugins_is_refused_by_name() {
        let p = Path::new("/etc/skiff/cni-conf.json");
        let e = check_conflist(p, br#"{"name":"skiff","cniVersion":"1.0.0"}"#).unwrap_err();
        assert!(e.to_string().contains("plugins"), "{e}");
        let e = check_conflist(
            p,
            br#"{"name":"skiff","cniVersion":"1.0.0","plugins":[{}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("plugins[0].type"), "{e}");
        assert!(check_conflist(p, b"{").is_err());
        check_conflist(
            p,
            br#"{"name":"skiff","cniVersion":"1.0.0","plugins":[{"type":"skiff-cni"}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn install_writes_both_files_whole() {
        let dir = std::env::temp_dir().join(format!("skiff-install-cni-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let plugin = dir.join("skiff-cni");
        std::fs::write(&plugin, b"#!/bin/sh\n").unwrap();
        let conf = dir.join("cni-conf.json");
        std::fs::write(
            &conf,
            br#"{"name":"skiff","cniVersion":"1.0.0","plugins":[{"type":"skiff-cni"}]}"#,
        )
        .unwrap();
        let (b, c) = install(
            &plugin,
            &dir.join("bin"),
            &conf,
            &dir.join("net.d"),
            "10-skiff.conflist",
        )
        .unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"#!/bin/sh\n");
        let mode = std::fs::metadata(&b).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(std::fs::read(&c).unwrap(), std::fs::read(&conf).unwrap());
        // Nothing left beside them.
        assert_eq!(std::fs::read_dir(dir.join("bin")).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
