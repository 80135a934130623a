//! The CNI 1.1 contract: environment, network configuration, result and
//! error JSON, version negotiation. Every error code the plugin returns is
//! chosen here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Versions whose configuration and result format this plugin speaks
/// (Flannel's stock conflist says 0.3.1).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes: 1–99 as the spec defines them (section "Error"), 100 and up
/// this plugin's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADDs now.
    NotAvailable = 50,
    /// The node's subnet has no free address.
    AddressesExhausted = 100,
    /// CNI_IFNAME already exists in the container's namespace.
    InterfaceExists = 101,
    /// CHECK found the attachment not as ADD left it.
    CheckFailed = 102,
}

#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl std::fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// The error object written to stdout.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code as u32, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

impl From<skiff_netlink::Error> for CniError {
    fn from(e: skiff_netlink::Error) -> Self {
        CniError::new(Code::Io, "kernel refused a network change").with_details(e)
    }
}

pub type Result<T> = std::result::Result<T, CniError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

/// The CNI_* variables a call brings.
#[derive(Clone, Debug)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
}

/// Container IDs: "must have at least one character, consisting of
/// alphanumeric, underscore, hyphen and period characters".
fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Interface names: at most 15 bytes, not `.`/`..`, no `/`, `:` or space.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl Env {
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let need = |k: &str| {
            var(k)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| CniError::new(Code::InvalidEnvironment, format!("{k} is not set")))
        };
        let command = match need("CNI_COMMAND")?.as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            other => {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    format!(
                        "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"
                    ),
                ));
            }
        };
        let mut env = Env {
            command,
            container_id: String::new(),
            netns: var("CNI_NETNS").filter(|v| !v.is_empty()),
            ifname: String::new(),
        };
        if matches!(command, Command::Add | Command::Del | Command::Check) {
            env.container_id = need("CNI_CONTAINERID")?;
            if !valid_container_id(&env.container_id) {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    format!(
                        "CNI_CONTAINERID {:?}: only letters, digits, '_', '-' and '.' are allowed",
                        env.container_id
                    ),
                ));
            }
            env.ifname = need("CNI_IFNAME")?;
            if !valid_ifname(&env.ifname) {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    format!("CNI_IFNAME {:?} is not a valid interface name", env.ifname),
                ));
            }
            if command != Command::Del && env.netns.is_none() {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    "CNI_NETNS is not set",
                ));
            }
        }
        Ok(env)
    }
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's network configuration, as the runtime passes it on stdin.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The node bridge (gateway = first address of the subnet).
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// Written by the overlay: FLANNEL_SUBNET, FLANNEL_MTU, ...
    #[serde(default = "default_subnet_file")]
    pub subnet_file: String,
    /// Where address allocations are recorded.
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
    /// The node's subnet (`10.244.3.0/24`), instead of the subnet file.
    pub subnet: Option<String>,
    /// With `subnet`: the node's IPv6 subnet (`fd00:10:244:3::/64`), for
    /// dual-stack pods. (From the subnet file, FLANNEL_IPV6_SUBNET.)
    pub ipv6_subnet: Option<String>,
    /// Overrides the MTU from the subnet file.
    pub mtu: Option<u32>,
    /// A default route through the gateway (else a route to the cluster
    /// network only).
    #[serde(default = "yes")]
    pub is_default_gateway: bool,
    pub prev_result: Option<Value>,
    /// Passed through to the result, as the reference bridge plugin does.
    pub dns: Option<Dns>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn default_bridge() -> String {
    "cni0".into()
}
fn default_subnet_file() -> String {
    "/run/skiff/subnet.env".into()
}
fn default_data_dir() -> String {
    "/var/lib/skiff/cni".into()
}
fn yes() -> bool {
    true
}

/// The version of a message, for error replies written before the
/// configuration parsed.
pub fn version_of(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".into())
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            use serde_json::error::Category;
            let code = match e.classify() {
                Category::Data => Code::InvalidConfig,
                _ => Code::Decode,
            };
            CniError::new(code, "network configuration is not valid").with_details(e)
        })?;
        if conf.cni_version.is_empty() {
            return Err(CniError::new(Code::InvalidConfig, "cniVersion is missing"));
        }
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("cniVersion {} is not supported", conf.cni_version),
            )
            .with_details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(Code::InvalidConfig, "name is missing"));
        }
        if conf.name.contains('/') || conf.name.starts_with('.') {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("name {:?} cannot be a directory name", conf.name),
            ));
        }
        if conf.bridge.is_empty() || !valid_ifname(&conf.bridge) {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("bridge {:?} is not a valid interface name", conf.bridge),
            ));
        }
        if let Some(m) = conf.mtu
            && !(576..=65535).contains(&m)
        {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("mtu {m} is outside 576..=65535"),
            ));
        }
        Ok(conf)
    }

    /// Results before 1.0.0 carry `"version": "4"` on each address.
    pub fn result_has_ip_version(&self) -> bool {
        self.cni_version.starts_with("0.")
    }
}

/// The ADD result (spec section "Success").
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RouteConfig {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// The VERSION reply.
pub fn version_reply(stdin: &[u8]) -> Value {
    json!({"cniVersion": version_of(stdin), "supportedVersions": SUPPORTED_VERSIONS})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::read(|k| vars.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn missing_variables_are_code_4_naming_the_variable() {
        let e = env(&[]).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (Code::InvalidEnvironment, "CNI_COMMAND is not set")
        );
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert_eq!(e.msg, "CNI_NETNS is not set");
        assert!(
            env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0")
            ])
            .is_ok()
        );
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ])
        .unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "a-very-long-ifname"),
            ("CNI_NETNS", "/x"),
        ])
        .unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
    }

    #[test]
    fn configuration_errors_have_their_codes() {
        let code = |s: &str| NetConf::parse(s.as_bytes()).unwrap_err().code;
        assert_eq!(code("{not json"), Code::Decode);
        assert_eq!(
            code(r#"{"cniVersion":"9.9.9","name":"n","type":"skiff-cni"}"#),
            Code::IncompatibleVersion
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","type":"skiff-cni"}"#),
            Code::InvalidConfig
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"n","mtu":"big"}"#),
            Code::InvalidConfig
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"n","mtu":10}"#),
            Code::InvalidConfig
        );
        let c =
            NetConf::parse(br#"{"cniVersion":"0.3.1","name":"cbr0","type":"skiff-cni"}"#).unwrap();
        assert!(c.result_has_ip_version());
        assert_eq!(c.bridge, "cni0");
    }

    #[test]
    fn errors_answer_in_the_callers_version() {
        assert_eq!(version_of(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(version_of(b"garbage"), "1.1.0");
        let e = CniError::new(Code::TryAgainLater, "later").to_json("0.4.0");
        assert_eq!(e, json!({"cniVersion":"0.4.0","code":11,"msg":"later"}));
    }
}
