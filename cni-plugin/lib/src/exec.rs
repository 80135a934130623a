//! Invoking CNI plugins as a runtime does (CNI spec, "Execution of
//! Network Configurations"): for ADD and CHECK each plugin of the list in
//! order, for DEL in reverse, each given the list's `name` and
//! `cniVersion`, the previous plugin's result as `prevResult`, and the
//! runtime config its `capabilities` ask for; GC and STATUS go to every
//! plugin. Synchronous: callers on an async runtime run it on a blocking
//! thread.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Config { path: PathBuf, what: String },
    #[error("no network configuration in {dir}")]
    NoConfig { dir: PathBuf },
    #[error("CNI plugin {kind:?} not found in {path}")]
    PluginNotFound { kind: String, path: String },
    #[error("running {plugin}: {source}")]
    Spawn {
        plugin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind} {command}: {}", .reply.message())]
    Plugin {
        kind: String,
        command: String,
        reply: Reply,
    },
}

/// What one plugin call returned.
#[derive(Debug, Clone)]
pub struct Reply {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    /// The JSON on stdout (result or error), or null when there is none.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or(Value::Null)
    }

    /// The error code, when the call failed.
    pub fn code(&self) -> Option<u64> {
        (!self.ok).then(|| self.json()["code"].as_u64()).flatten()
    }

    /// The error's `msg` and `details`, or what the plugin printed.
    pub fn message(&self) -> String {
        let v = self.json();
        match (v["msg"].as_str(), v["details"].as_str()) {
            (Some(m), Some(d)) if !d.is_empty() => format!("{m}: {d}"),
            (Some(m), _) => m.to_string(),
            _ => format!("{}{}", self.stdout.trim(), self.stderr.trim()),
        }
    }

    /// The first address of an ADD result, without its prefix.
    pub fn ip(&self) -> Option<String> {
        first_ip(&self.json())
    }
}

/// The first address of a result, without its prefix.
pub fn first_ip(result: &Value) -> Option<String> {
    all_ips(result).into_iter().next()
}

/// Every address of a result's `ips`, without prefix lengths, in its order
/// (a dual-stack pod's IPv4 and IPv6 addresses: the pod's `podIPs`).
pub fn all_ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or_default().to_string())
        .collect()
}

/// Where plugins are found and where they run.
#[derive(Clone, Debug, Default)]
pub struct Runtime {
    /// Directories searched for plugin binaries, in order (CNI_PATH).
    pub bin_dirs: Vec<PathBuf>,
    /// A network namespace (a file such as /run/netns/x) to run plugins
    /// in, when the caller is not already in the node's namespace.
    pub node_netns: Option<PathBuf>,
}

impl Runtime {
    pub fn new(bin_dirs: Vec<PathBuf>) -> Self {
        Self {
            bin_dirs,
            node_netns: None,
        }
    }

    pub fn cni_path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    pub fn plugin_path(&self, kind: &str) -> Result<PathBuf, ExecError> {
        // A type naming a path would escape CNI_PATH.
        if !kind.is_empty() && !kind.contains('/') {
            for d in &self.bin_dirs {
                let p = d.join(kind);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(ExecError::PluginNotFound {
            kind: kind.into(),
            path: self.cni_path(),
        })
    }

    /// Runs `plugin` with `env` and `stdin`; whatever it answered.
    pub fn exec_raw(
        &self,
        plugin: &Path,
        env: &[(&str, &str)],
        stdin: &[u8],
    ) -> Result<Reply, ExecError> {
        let spawn_err = |source| ExecError::Spawn {
            plugin: plugin.to_path_buf(),
            source,
        };
        let mut cmd = Command::new(plugin);
        cmd.env("CNI_PATH", self.cni_path());
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let netns = match &self.node_netns {
            Some(p) => Some(std::fs::File::open(p).map_err(spawn_err)?),
            None => None,
        };
        let fd = netns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        // SAFETY: the closure runs in the forked child before exec and
        // makes only async-signal-safe calls (setns, prctl) on an fd
        // opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // A plugin dies with the runtime that runs it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut input) = child.stdin.take() {
            // A plugin that exits without reading closes the pipe: its
            // answer says why.
            let _ = input.write_all(stdin);
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        Ok(Reply {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// One attachment: a container's interface in a network namespace.
#[derive(Clone, Debug)]
pub struct Attachment<'a> {
    pub container_id: &'a str,
    /// The namespace's path; empty for a DEL whose namespace is gone.
    pub netns: &'a str,
    pub ifname: &'a str,
    /// CNI_ARGS (`K8S_POD_NAMESPACE=...;K8S_POD_NAME=...`).
    pub args: &'a str,
}

impl Attachment<'_> {
    fn env(&self) -> [(&str, &str); 4] {
        [
            ("CNI_CONTAINERID", self.container_id),
            ("CNI_NETNS", self.netns),
            ("CNI_IFNAME", self.ifname),
            ("CNI_ARGS", self.args),
        ]
    }
}

/// A network configuration list.
#[derive(Clone, Debug)]
pub struct Conflist {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
    /// Runtime config offered to plugins whose capabilities ask for it
    /// (`portMappings`, ...).
    pub runtime_config: Value,
}

impl Conflist {
    pub fn new(name: &str, version: &str, plugins: Vec<Value>) -> Self {
        Self {
            name: name.into(),
            cni_version: version.into(),
            plugins,
            runtime_config: json!({}),
        }
    }

    /// Parses a `.conflist`, or a single-plugin `.conf` as a list of one.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ExecError> {
        let bad = |what: String| ExecError::Config {
            path: path.to_path_buf(),
            what,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let name = v["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("missing name".into()))?;
        let version = v["cniVersion"].as_str().unwrap_or("0.4.0");
        let plugins = match v.get("plugins") {
            Some(Value::Array(p)) if !p.is_empty() => p.clone(),
            Some(_) => return Err(bad("plugins must be a non-empty list".into())),
            None if v["type"].is_string() => vec![v.clone()],
            None => return Err(bad("neither plugins nor type".into())),
        };
        for (i, p) in plugins.iter().enumerate() {
            if p["type"].as_str().is_none_or(str::is_empty) {
                return Err(bad(format!("plugins[{i}].type: missing")));
            }
        }
        Ok(Self::new(name, version, plugins))
    }

    /// The first configuration in `dir` by file name (`.conflist`,
    /// `.conf`, `.json`), as libcni picks the default network.
    pub fn load_dir(dir: &Path) -> Result<Self, ExecError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ExecError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ExecError::Read {
                path: dir.to_path_buf(),
                source,
            })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        let first = files.first().ok_or_else(|| ExecError::NoConfig {
            dir: dir.to_path_buf(),
        })?;
        Self::parse(&read(first)?, first)
    }

    /// The configuration one plugin is given.
    pub fn conf_for(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["name"] = json!(self.name);
        c["cniVersion"] = json!(self.cni_version);
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        if let Some(caps) = plugin["capabilities"].as_object() {
            let mut rc = serde_json::Map::new();
            for (k, on) in caps {
                if on.as_bool() == Some(true)
                    && let Some(v) = self.runtime_config.get(k)
                {
                    rc.insert(k.clone(), v.clone());
                }
            }
            if !rc.is_empty() {
                c["runtimeConfig"] = Value::Object(rc);
            }
        }
        c
    }

    fn call(
        &self,
        rt: &Runtime,
        command: &str,
        plugin: &Value,
        env: &[(&str, &str)],
        prev: Option<&Value>,
    ) -> Result<Value, ExecError> {
        let kind = plugin["type"].as_str().unwrap_or_default();
        let path = rt.plugin_path(kind)?;
        let conf = self.conf_for(plugin, prev);
        let mut all = vec![("CNI_COMMAND", command)];
        all.extend_from_slice(env);
        let reply = rt.exec_raw(&path, &all, conf.to_string().as_bytes())?;
        if !reply.ok {
            return Err(ExecError::Plugin {
                kind: kind.into(),
                command: command.into(),
                reply,
            });
        }
        Ok(reply.json())
    }

    /// ADD through every plugin; the last result.
    pub fn add(&self, rt: &Runtime, at: &Attachment) -> Result<Value, ExecError> {
        let env = at.env();
        let mut prev: Option<Value> = None;
        for p in &self.plugins {
            prev = Some(self.call(rt, "ADD", p, &env, prev.as_ref())?);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// CHECK through every plugin with the ADD result.
    pub fn check(&self, rt: &Runtime, at: &Attachment, result: &Value) -> Result<(), ExecError> {
        let env = at.env();
        for p in &self.plugins {
            self.call(rt, "CHECK", p, &env, Some(result))?;
        }
        Ok(())
    }

    /// DEL through every plugin in reverse. Every plugin is called even
    /// when one fails (DEL must free what it can); the first error is
    /// returned.
    pub fn del(
        &self,
        rt: &Runtime,
        at: &Attachment,
        result: Option<&Value>,
    ) -> Result<(), ExecError> {
        let env = at.env();
        let mut first = None;
        for p in self.plugins.iter().rev() {
            if let Err(e) = self.call(rt, "DEL", p, &env, result) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// GC (CNI 1.1) with the attachments still valid, as
    /// `cni.dev/valid-attachments`; goes on past errors.
    pub fn gc(&self, rt: &Runtime, valid: &[(String, String)]) -> Result<(), ExecError> {
        // GC exists from CNI 1.1 on; a runtime sends it only to lists of
        // that version (reference plugins of 1.1.1 reject it otherwise).
        if !version_at_least(&self.cni_version, (1, 1)) {
            return Ok(());
        }
        let list: Vec<Value> = valid
            .iter()
            .map(|(id, ifname)| json!({"containerID": id, "ifname": ifname}))
            .collect();
        let mut first = None;
        for p in &self.plugins {
            let mut p = p.clone();
            p["cni.dev/valid-attachments"] = Value::Array(list.clone());
            match self.call(rt, "GC", &p, &[], None) {
                Ok(_) => {}
                // Plugins older than 1.1 do not know GC.
                Err(ExecError::Plugin { reply, .. }) if reply.code() == Some(4) => {}
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn version_at_least(v: &str, want: (u32, u32)) -> bool {
    let mut p = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    (p.next().unwrap_or(0), p.next().unwrap_or(0)) >= want
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_conf_is_a_list_of_one_and_errors_name_the_field() {
        let p = Path::new("/x/10-net.conf");
        let one = Conflist::parse(r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#, p)
            .expect("conf");
        assert_eq!(one.plugins.len(), 1);
        assert_eq!(one.plugins[0]["type"], "bridge");
        let err = Conflist::parse(r#"{"name":"n","plugins":[{"type":"a"},{}]}"#, p)
            .expect_err("missing type");
        assert!(err.to_string().contains("plugins[1].type"), "{err}");
        assert!(Conflist::parse(r#"{"plugins":[{"type":"a"}]}"#, p).is_err());
    }

    #[test]
    fn capabilities_select_runtime_config() {
        let mut l = Conflist::new(
            "n",
            "1.1.0",
            vec![
                json!({"type": "a"}),
                json!({"type": "portmap", "capabilities": {"portMappings": true}}),
            ],
        );
        l.runtime_config = json!({"portMappings": [{"hostPort": 8080}], "other": 1});
        let prev = json!({"ips": [{"address": "10.0.0.2/24"}]});
        let a = l.conf_for(&l.plugins[0], None);
        assert!(a.get("runtimeConfig").is_none());
        let b = l.conf_for(&l.plugins[1], Some(&prev));
        assert_eq!(
            b["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080}]})
        );
        assert_eq!(b["prevResult"], prev);
        assert_eq!(b["name"], "n");
        assert_eq!(first_ip(&prev).as_deref(), Some("10.0.0.2"));
    }

    #[test]
    fn plugin_types_cannot_name_paths() {
        let rt = Runtime::new(vec![PathBuf::from("/usr/bin")]);
        assert!(rt.plugin_path("../bin/sh").is_err());
        assert!(rt.plugin_path("env").is_ok());
    }
}
