//! Calling CNI plugins the way a runtime does (libcni's order): each
//! plugin of a conflist in turn for ADD and CHECK, in reverse for DEL, each
//! given the network's name and cniVersion, the previous plugin's result as
//! `prevResult`, and the runtime config its capabilities ask for.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::{Netns, Spawn, bin_dir};

/// Where plugins are looked up: ours, then Debian's reference plugins.
pub fn cni_path() -> String {
    format!("{}:/usr/lib/cni", bin_dir().display())
}

pub fn plugin_path(kind: &str) -> PathBuf {
    cni_path()
        .split(':')
        .map(|d| Path::new(d).join(kind))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("CNI plugin {kind} not found in {}", cni_path()))
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

    /// The first address of an ADD result, without its prefix.
    pub fn ip(&self) -> String {
        let v = self.json();
        let a = v["ips"][0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no address in {}", self.stdout));
        a.split('/').next().unwrap_or_default().to_string()
    }
}

/// One call: `command` for the container, run inside `node`'s namespace.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    pub node: &'a Netns,
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
}

impl Call<'_> {
    /// Runs the plugin binary with this call's environment and `conf`.
    pub fn exec(&self, plugin: &Path, conf: &Value) -> Reply {
        self.exec_raw(plugin, conf.to_string().as_bytes(), &[])
    }

    /// Runs it with raw stdin and environment overrides (`("CNI_X", "")`
    /// removes a variable).
    pub fn exec_raw(&self, plugin: &Path, stdin: &[u8], env: &[(&str, &str)]) -> Reply {
        let mut s = Spawn::new(plugin)
            .env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_NETNS", self.netns)
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_PATH", &cni_path())
            .netns(self.node);
        for (k, v) in env {
            s = s.env(k, v);
        }
        let out = s.run_with_input(stdin);
        Reply {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
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

    fn conf_for(&self, plugin: &Value, prev: Option<&Value>) -> Value {
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

    /// ADD through every plugin; the last result, or the first failure.
    pub fn add(&self, call: &Call) -> Result<Value, Reply> {
        let mut prev: Option<Value> = None;
        for p in &self.plugins {
            let kind = p["type"].as_str().unwrap_or_default();
            let r = Call {
                command: "ADD",
                ..call.clone()
            }
            .exec(&plugin_path(kind), &self.conf_for(p, prev.as_ref()));
            if !r.ok {
                return Err(r);
            }
            prev = Some(r.json());
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// CHECK through every plugin with the ADD result.
    pub fn check(&self, call: &Call, result: &Value) -> Result<(), Reply> {
        for p in &self.plugins {
            let kind = p["type"].as_str().unwrap_or_default();
            let r = Call {
                command: "CHECK",
                ..call.clone()
            }
            .exec(&plugin_path(kind), &self.conf_for(p, Some(result)));
            if !r.ok {
                return Err(r);
            }
        }
        Ok(())
    }

    /// DEL through every plugin in reverse.
    pub fn del(&self, call: &Call, result: Option<&Value>) -> Result<(), Reply> {
        for p in self.plugins.iter().rev() {
            let kind = p["type"].as_str().unwrap_or_default();
            let r = Call {
                command: "DEL",
                ..call.clone()
            }
            .exec(&plugin_path(kind), &self.conf_for(p, result));
            if !r.ok {
                return Err(r);
            }
        }
        Ok(())
    }
}
