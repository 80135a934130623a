//! A control plane for tests: a real etcd on loopback ports of its own and
//! `skiff-control` against it, both killed on drop, plus the real
//! `kubectl` pointed at it through the admin kubeconfig. Either on the host's
//! loopback or inside a test's network namespace (so that an agent in that
//! namespace reaches it), never anywhere else.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Netns, Proc, Spawn, TempDir, bin, wait_for};

/// Ports the tests listen on come from below the kernel's ephemeral range
/// (`ip_local_port_range`, 32768 and up by default). A port found free with
/// `bind(0)` and released is in that range, and under the suite's load the
/// kernel may hand it to some client's outgoing connection before our
/// server binds it: etcd then exits on "address already in use".
const PORTS: std::ops::Range<u16> = 20000..32000;

/// A loopback port no other test of this run is likely to take: each test
/// process walks the range from a start of its own (its pid and the clock)
/// and skips ports something already holds.
pub fn free_port() -> u16 {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    let span = u32::from(PORTS.end - PORTS.start);
    static NEXT: LazyLock<AtomicU32> = LazyLock::new(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        AtomicU32::new(std::process::id().wrapping_mul(7919) ^ nanos)
    });
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = PORTS.start + offset as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {PORTS:?}")
}

/// A test etcd in a temp dir, of one member or several, behind mutual TLS
/// with a CA of its own (made by `skiff-control certs etcd`, as kubeadm
/// lays it out): only clients with a certificate from that CA get in.
pub struct Etcd {
    /// The members' client URLs, comma separated (as `--etcd` takes them).
    pub url: String,
    /// The first member's Prometheus metrics, on plain HTTP on loopback (in
    /// its namespace), as kubeadm's `--listen-metrics-urls`.
    pub metrics_url: String,
    members: Vec<Member>,
    dir: TempDir,
}

struct Member {
    /// Replaced on a restart, while the etcd is shared.
    proc: std::sync::Mutex<Proc>,
    netns: Option<String>,
    args: Vec<String>,
    url: String,
    log: std::path::PathBuf,
}

/// Who connects to a test etcd: each has a client certificate of its own.
#[derive(Clone, Copy, Debug)]
pub enum EtcdClient {
    /// `skiff-control` (`pki/apiserver-etcd-client.crt`).
    Apiserver,
    /// The agents' overlay, leasing subnets as Flannel does.
    Overlay,
    /// `etcdctl` and the tests' own reads.
    Admin,
}

impl Etcd {
    pub fn start() -> Self {
        Self::start_in(None)
    }

    pub fn start_in(netns: Option<&Netns>) -> Self {
        Self::start_on(netns, "127.0.0.1")
    }

    /// Listening for clients on `ip` (an address the namespace holds, so
    /// that other test namespaces on its network reach it).
    pub fn start_on(netns: Option<&Netns>, ip: &str) -> Self {
        Self::start_on_path(netns.map(Netns::path).as_deref(), ip)
    }

    fn start_on_path(netns: Option<&str>, ip: &str) -> Self {
        Self::start_members(&[(netns.map(String::from), ip.to_string())])
    }

    /// `n` members on the host's loopback, each on ports of its own.
    pub fn start_local_cluster(n: usize) -> Self {
        let places: Vec<(Option<String>, String)> =
            (0..n).map(|_| (None, "127.0.0.1".to_string())).collect();
        Self::start_members(&places)
    }

    /// One member per (namespace, address), peers over that address: a
    /// cluster that keeps serving while a majority of it runs.
    pub fn start_cluster(places: &[(&Netns, &str)]) -> Self {
        let places: Vec<(Option<String>, String)> = places
            .iter()
            .map(|(ns, ip)| (Some(ns.path()), ip.to_string()))
            .collect();
        Self::start_members(&places)
    }

    fn start_members(places: &[(Option<String>, String)]) -> Self {
        let dir = TempDir::new();
        let pki = dir.path.join("pki");
        let mut certs = Spawn::new(bin("skiff-control"))
            .args(["certs", "etcd", "--dir", &pki.display().to_string()])
            .args(["--client", "overlay", "--client", "admin"]);
        for (_, ip) in places {
            certs = certs.args(["--san", ip]);
        }
        if let Err(e) = certs.try_output() {
            panic!("making etcd's certificates: {e}");
        }
        let ports: Vec<(u16, u16, u16)> = places
            .iter()
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let peer_url = |i: usize| format!("https://{}:{}", places[i].1, ports[i].1);
        let initial: Vec<String> = (0..places.len())
            .map(|i| format!("m{i}={}", peer_url(i)))
            .collect();
        let file = |name: &str| pki.join("etcd").join(name).display().to_string();
        let mut members = Vec::new();
        for (i, (netns, ip)) in places.iter().enumerate() {
            let (client, _, metrics) = ports[i];
            let url = format!("https://{ip}:{client}");
            let args = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", dir.path.join(format!("data{i}")).display()),
                format!("--listen-client-urls={url}"),
                format!("--advertise-client-urls={url}"),
                format!("--listen-peer-urls={}", peer_url(i)),
                format!("--initial-advertise-peer-urls={}", peer_url(i)),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".to_string(),
                // A member back from a partition with a higher term asks
                // for a vote first instead of forcing an election (the
                // default from etcd 3.5; 3.4 leaves it off).
                "--pre-vote=true".to_string(),
                format!("--listen-metrics-urls=http://127.0.0.1:{metrics}"),
                format!("--cert-file={}", file("server.crt")),
                format!("--key-file={}", file("server.key")),
                format!("--trusted-ca-file={}", file("ca.crt")),
                "--client-cert-auth=true".to_string(),
                format!("--peer-cert-file={}", file("peer.crt")),
                format!("--peer-key-file={}", file("peer.key")),
                format!("--peer-trusted-ca-file={}", file("ca.crt")),
                "--peer-client-cert-auth=true".to_string(),
                "--log-level=warn".to_string(),
            ];
            let log = dir.path.join(format!("etcd{i}.log"));
            let proc = Self::spawn(&args, netns.as_deref(), &log);
            members.push(Member {
                proc: std::sync::Mutex::new(proc),
                netns: netns.clone(),
                args,
                url,
                log,
            });
        }
        let etcd = Self {
            url: members
                .iter()
                .map(|m| m.url.as_str())
                .collect::<Vec<_>>()
                .join(","),
            metrics_url: format!("http://127.0.0.1:{}", ports[0].2),
            members,
            dir,
        };
        for i in 0..etcd.members.len() {
            etcd.wait_healthy(i);
        }
        etcd
    }

    /// The CA, certificate and key `who` connects with.
    pub fn client_files(&self, who: EtcdClient) -> [String; 3] {
        let pki = self.dir.path.join("pki");
        let (cert, key) = match who {
            EtcdClient::Apiserver => (
                pki.join("apiserver-etcd-client.crt"),
                pki.join("apiserver-etcd-client.key"),
            ),
            EtcdClient::Overlay => (
                pki.join("etcd/overlay-client.crt"),
                pki.join("etcd/overlay-client.key"),
            ),
            EtcdClient::Admin => (
                pki.join("etcd/admin-client.crt"),
                pki.join("etcd/admin-client.key"),
            ),
        };
        [pki.join("etcd/ca.crt"), cert, key].map(|p| p.display().to_string())
    }

    /// `--etcd` and the TLS flags `skiff-control` and `skiff-agent` take
    /// (Flannel's names), for `who`.
    pub fn client_args(&self, who: EtcdClient) -> Vec<String> {
        let [ca, cert, key] = self.client_files(who);
        [
            "--etcd",
            &self.url,
            "--etcd-cafile",
            &ca,
            "--etcd-certfile",
            &cert,
            "--etcd-keyfile",
            &key,
        ]
        .map(String::from)
        .to_vec()
    }

    /// The environment that points `etcdctl` at this etcd as an admin.
    pub fn ctl_env(&self) -> Vec<(&'static str, String)> {
        let [ca, cert, key] = self.client_files(EtcdClient::Admin);
        vec![
            ("ETCDCTL_API", "3".to_string()),
            ("ETCDCTL_ENDPOINTS", self.url.clone()),
            ("ETCDCTL_CACERT", ca),
            ("ETCDCTL_CERT", cert),
            ("ETCDCTL_KEY", key),
        ]
    }

    fn spawn(args: &[String], netns: Option<&str>, log: &std::path::Path) -> Proc {
        Spawn::new("etcd")
            .args(args)
            .netns_path(netns)
            .log_to(log)
            .start()
    }

    /// Waits until member `i` answers; a member that exits instead fails
    /// at once, with its log.
    fn wait_healthy(&self, i: usize) {
        let member = &self.members[i];
        wait_for(
            &format!("etcd member {i} to answer"),
            Duration::from_secs(30),
            || {
                let running = member.proc.lock().map(|mut p| p.is_running());
                if let Ok(false) = running {
                    let log = std::fs::read_to_string(&member.log).unwrap_or_default();
                    panic!("etcd member {i} exited while starting:\n{log}");
                }
                let url = &member.url;
                self.ctl(&["--endpoints", url, "endpoint", "health"]).ok()
            },
        );
    }

    /// The first member's pid.
    pub fn pid(&self) -> i32 {
        self.members[0].proc.lock().map(|p| p.pid()).unwrap_or(0)
    }

    /// The members' logs, for a failure's report.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| std::fs::read_to_string(&m.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills etcd (SIGKILL, as a crash would).
    pub fn kill(&self) {
        self.kill_member(0);
    }

    /// Starts etcd again on the same data and address, after `kill`.
    pub fn restart(&self) {
        self.restart_member(0);
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill_member(&self, i: usize) {
        if let Ok(mut p) = self.members[i].proc.lock() {
            p.kill_now();
        }
    }

    /// Starts member `i` again on its data and addresses, after
    /// `kill_member`, and waits until it answers.
    pub fn restart_member(&self, i: usize) {
        let m = &self.members[i];
        let proc = Self::spawn(&m.args, m.netns.as_deref(), &m.log);
        if let Ok(mut p) = m.proc.lock() {
            *p = proc;
        }
        self.wait_healthy(i);
    }

    /// The client URL of member `i`.
    pub fn member_url(&self, i: usize) -> &str {
        &self.members[i].url
    }

    /// Runs `etcdctl` against this etcd, as an admin.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let netns = self.members.first().and_then(|m| m.netns.as_deref());
        let mut cmd = Spawn::new("etcdctl").netns_path(netns);
        // A flag and its variable together are refused.
        let own_endpoints = args.contains(&"--endpoints");
        for (k, v) in self.ctl_env() {
            if !(own_endpoints && k == "ETCDCTL_ENDPOINTS") {
                cmd = cmd.env(k, &v);
            }
        }
        cmd.args(args).try_output()
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        let out = self
            .ctl(&["endpoint", "status", "-w", "json"])
            .unwrap_or_else(|e| panic!("{e}"));
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .unwrap_or_else(|| panic!("no revision in {out}"))
    }
}

/// `skiff-control` with all components against its own etcd.
/// How a user proves who it is.
pub enum Credential<'a> {
    Token(&'a str),
    Cert { cert: &'a str, key: &'a str },
}

pub struct ControlPlane {
    pub proc: Proc,
    /// Shared by the replicas of one control plane (see `replica`).
    pub etcd: std::sync::Arc<Etcd>,
    pub dir: TempDir,
    pub kubeconfig: PathBuf,
    pub server: String,
    netns: Option<String>,
    /// The address it listens on (loopback, or every address).
    host: String,
    /// Every flag it was started with (see `restart`).
    args: Vec<String>,
    /// Starts so far, to keep each start's log.
    starts: usize,
    join_token: std::sync::OnceLock<String>,
}

impl ControlPlane {
    /// Starts etcd and `skiff-control` with `extra` flags and waits until
    /// kubectl gets an answer.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_in(None, extra)
    }

    /// As `start`, with etcd, the control plane and kubectl in `netns`.
    pub fn start_in(netns: Option<&Netns>, extra: &[&str]) -> Self {
        let netns = netns.map(Netns::path);
        let etcd = Etcd::start_on_path(netns.as_deref(), "127.0.0.1");
        Self::launch(etcd.into(), netns, "127.0.0.1", TempDir::new(), extra)
    }

    /// On the host's loopback, on `etcd` (one of several members, say).
    pub fn start_on_etcd(etcd: Etcd, extra: &[&str]) -> Self {
        Self::launch(etcd.into(), None, "127.0.0.1", TempDir::new(), extra)
    }

    /// In `netns`, on `etcd`, listening on every address of the namespace
    /// (so that other namespaces on its network reach it); kubectl here
    /// still goes through loopback.
    pub fn start_on(netns: &Netns, etcd: Etcd, extra: &[&str]) -> Self {
        Self::launch(
            etcd.into(),
            Some(netns.path()),
            "0.0.0.0",
            TempDir::new(),
            extra,
        )
    }

    /// Another replica of this control plane: a `skiff-control` of its own
    /// (every component, with `extra`) on the same etcd and in the same
    /// place, with a copy of this one's PKI (CA, service-account key, admin
    /// token), as kubeadm copies them to a control-plane node that joins.
    pub fn replica(&self, extra: &[&str]) -> Self {
        self.replica_at(self.netns.clone(), &self.host.clone(), extra)
    }

    /// A replica as [`ControlPlane::replica`], in another namespace on the
    /// same network (listening on every address there).
    pub fn replica_in(&self, netns: &Netns, extra: &[&str]) -> Self {
        self.replica_at(Some(netns.path()), "0.0.0.0", extra)
    }

    fn replica_at(&self, netns: Option<String>, host: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new();
        let (from, to) = (self.dir.path.join("pki"), dir.path.join("pki"));
        std::fs::create_dir_all(&to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
        for name in ["ca.crt", "ca.key", "sa.key", "admin.token"] {
            let (f, t) = (from.join(name), to.join(name));
            std::fs::copy(&f, &t).unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
        }
        Self::launch(self.etcd.clone(), netns, host, dir, extra)
    }

    fn launch(
        etcd: std::sync::Arc<Etcd>,
        netns: Option<String>,
        host: &str,
        dir: TempDir,
        extra: &[&str],
    ) -> Self {
        let port = free_port();
        let mut args: Vec<String> = [
            "--data-dir",
            &dir.path.display().to_string(),
            "--listen",
            &format!("{host}:{port}"),
        ]
        .map(String::from)
        .to_vec();
        args.extend(etcd.client_args(EtcdClient::Apiserver));
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Self::spawn(&args, netns.as_deref(), &dir.path.join("control.log"));
        let kubeconfig = dir.path.join("admin.kubeconfig");
        let mut cp = Self {
            proc,
            etcd,
            kubeconfig,
            server: format!("https://127.0.0.1:{port}"),
            dir,
            netns,
            host: host.to_string(),
            args,
            starts: 1,
            join_token: std::sync::OnceLock::new(),
        };
        cp.wait_answering();
        // The admin kubeconfig names the advertised address.
        let text = std::fs::read_to_string(&cp.kubeconfig).unwrap_or_default();
        if let Some(server) = text.lines().find_map(|l| l.trim().strip_prefix("server: ")) {
            cp.server = server.trim().to_string();
        }
        cp
    }

    fn spawn(args: &[String], netns: Option<&str>, log: &std::path::Path) -> Proc {
        Spawn::new(bin("skiff-control"))
            .args(args)
            .netns_path(netns)
            .env("RUST_LOG", "info,skiff_control=debug")
            .log_to(log)
            .start()
    }

    fn wait_answering(&self) {
        wait_for(
            "the apiserver to answer kubectl",
            Duration::from_secs(30),
            || self.kubectl(&["get", "namespaces"]).ok(),
        );
    }

    /// Starts `skiff-control` again, as it was started (same data
    /// directory, address and flags), killing it first if it runs, and
    /// waits until it answers. The last run's log is kept beside the new
    /// one as `control.log.<n>`.
    pub fn restart(&mut self) {
        self.proc.kill_now();
        let log = self.dir.path.join("control.log");
        let kept = self.dir.path.join(format!("control.log.{}", self.starts));
        let _ = std::fs::rename(&log, kept);
        self.proc = Self::spawn(&self.args, self.netns.as_deref(), &log);
        self.starts += 1;
        self.wait_answering();
    }

    /// Runs `skiff-control` with `args` (a subcommand) where the control
    /// plane runs.
    pub fn control(&self, args: &[&str]) -> Result<String, String> {
        Spawn::new(bin("skiff-control"))
            .netns_path(self.netns.as_deref())
            .args(args)
            .try_output()
    }

    /// `skiff-agent join` flags for a node that reaches the apiserver at
    /// `server`: a bootstrap token (one per control plane, made on first
    /// use) and the CA's hash.
    pub fn join_args(&self, server: &str) -> Vec<String> {
        let line = self.join_token.get_or_init(|| {
            let data_dir = self.dir.path.display().to_string();
            self.control(&[
                "token",
                "create",
                "--data-dir",
                &data_dir,
                "--ttl",
                "2h",
                "--description",
                "test nodes",
                "--print-join-command",
            ])
            .unwrap_or_else(|e| panic!("token create: {e}"))
        });
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .and_then(|i| words.get(i + 1))
                .unwrap_or_else(|| panic!("{flag} missing in {line:?}"))
                .to_string()
        };
        vec![
            "--server".into(),
            server.into(),
            "--token".into(),
            after("--token"),
            "--ca-cert-hash".into(),
            after("--ca-cert-hash"),
        ]
    }

    /// Runs the real kubectl with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        Spawn::new("kubectl")
            .netns_path(self.netns.as_deref())
            .env("KUBECONFIG", &self.kubeconfig.display().to_string())
            .args(["--request-timeout=20s"])
            .args(args)
            .try_output()
    }

    /// kubectl with `input` on stdin: its whole result (exit status,
    /// stdout, stderr), for commands whose failure is the point.
    pub fn kubectl_run(&self, args: &[&str], input: &[u8]) -> std::process::Output {
        Spawn::new("kubectl")
            .netns_path(self.netns.as_deref())
            .env("KUBECONFIG", &self.kubeconfig.display().to_string())
            .args(["--request-timeout=20s"])
            .args(args)
            .run_with_input(input)
    }

    /// kubectl that must succeed.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.kubectl(args)
            .unwrap_or_else(|e| panic!("{e}\n--- control plane log ---\n{}", self.log_tail()))
    }

    /// `text` written to a new file in the control plane's directory
    /// (removed with it): its path, for `kubectl ... -f`.
    pub fn manifest(&self, text: &str) -> String {
        let file = self.dir.path.join(format!("{}.yaml", crate::unique("m")));
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        file.display().to_string()
    }

    /// `kubectl apply -f -` with `yaml` on stdin.
    pub fn apply(&self, yaml: &str) -> Result<String, String> {
        self.kubectl(&["apply", "-f", &self.manifest(yaml)])
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("pki/admin.token"))
            .unwrap_or_else(|e| panic!("admin token: {e}"))
    }

    /// curl against the apiserver, trusting its CA, with `token` if given
    /// (`Err` carries the output of a failed run, such as a timed-out stream).
    pub fn curl(&self, token: Option<&str>, args: &[&str]) -> Result<String, String> {
        let mut c = Spawn::new("curl").netns_path(self.netns.as_deref()).args([
            "-s",
            "--cacert",
            &self.ca_file().display().to_string(),
        ]);
        if let Some(t) = token {
            c = c.args(["-H", &format!("Authorization: Bearer {}", t.trim())]);
        }
        c.args(args).try_output()
    }

    /// A kubeconfig for another user of this apiserver, by bearer token or
    /// client certificate (PEM).
    pub fn kubeconfig_as(&self, name: &str, cred: Credential<'_>) -> PathBuf {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let ca = std::fs::read_to_string(self.ca_file()).unwrap_or_else(|e| panic!("CA: {e}"));
        let user = match cred {
            Credential::Token(t) => format!("    token: {t}\n"),
            Credential::Cert { cert, key } => format!(
                "    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(cert),
                b64(key)
            ),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: default\ncurrent-context: c\nusers:\n- name: u\n  user:\n{user}",
            self.server,
            b64(&ca)
        );
        let path = self.dir.path.join(format!("{name}.kubeconfig"));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }

    /// The real kubectl with another kubeconfig.
    pub fn kubectl_with(
        &self,
        kubeconfig: &std::path::Path,
        args: &[&str],
    ) -> Result<String, String> {
        Spawn::new("kubectl")
            .netns_path(self.netns.as_deref())
            .env("KUBECONFIG", &kubeconfig.display().to_string())
            .args(["--request-timeout=20s"])
            .args(args)
            .try_output()
    }

    /// The port the apiserver listens on.
    pub fn port(&self) -> &str {
        self.server.rsplit(':').next().unwrap_or_default()
    }

    /// The apiserver's address (in its namespace, if it has one).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server
            .trim_start_matches("https://")
            .parse()
            .unwrap_or_else(|e| panic!("the apiserver's address {}: {e}", self.server))
    }

    /// A copy of the admin kubeconfig that reaches the apiserver at `ip`.
    pub fn kubeconfig_for(&self, ip: &str) -> PathBuf {
        let path = self.dir.path.join(format!("{ip}.kubeconfig"));
        self.write_kubeconfig(&format!("https://{ip}:{}", self.port()), &path);
        path
    }

    /// Writes the admin kubeconfig to `path`, with `server` as the
    /// apiserver's URL (for a forwarded or other address).
    pub fn write_kubeconfig(&self, server: &str, path: &std::path::Path) {
        let text = std::fs::read_to_string(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("{}: {e}", self.kubeconfig.display()));
        std::fs::write(path, text.replace(&self.server, server))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// A client certificate for `common_name`, signed by this control
    /// plane's CA (as the apiserver's kubelet client certificate is): the
    /// certificate and key files.
    pub fn client_cert(&self, common_name: &str) -> (PathBuf, PathBuf) {
        let key_pem = std::fs::read_to_string(self.dir.path.join("pki/ca.key"))
            .unwrap_or_else(|e| panic!("the CA key: {e}"));
        let ca_key =
            rcgen::KeyPair::from_pem(&key_pem).unwrap_or_else(|e| panic!("the CA key: {e}"));
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // The CA's own name, so that the chain verifies.
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "skiff-ca");
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("a key: {e}"));
        let cert = params
            .signed_by(&key, &issuer)
            .unwrap_or_else(|e| panic!("signing {common_name}: {e}"));
        let name = crate::unique("client");
        let (crt, keyf) = (
            self.dir.path.join(format!("{name}.crt")),
            self.dir.path.join(format!("{name}.key")),
        );
        std::fs::write(&crt, cert.pem()).unwrap_or_else(|e| panic!("write {}: {e}", crt.display()));
        std::fs::write(&keyf, key.serialize_pem())
            .unwrap_or_else(|e| panic!("write {}: {e}", keyf.display()));
        (crt, keyf)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path.join("pki/ca.crt")
    }

    pub fn log_tail(&self) -> String {
        let text = self.proc.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// A `jsonpath` read of one object.
    pub fn jsonpath(&self, what: &[&str], path: &str) -> String {
        let mut args: Vec<&str> = vec!["get"];
        args.extend(what);
        let jp = format!("jsonpath={path}");
        args.extend(["-o", &jp]);
        self.kubectl(&args).unwrap_or_default()
    }

    /// A node object (no agent behind it) with room for `cpu` cores.
    pub fn add_node(&self, name: &str, labels: &str, cpu: &str) {
        let yaml = format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/hostname: {name}{labels}}}\nstatus:\n  capacity: {{cpu: \"{cpu}\", memory: 8Gi, pods: \"110\"}}\n  allocatable: {{cpu: \"{cpu}\", memory: 8Gi, pods: \"110\"}}\n  conditions:\n  - {{type: Ready, status: \"True\", reason: KubeletReady, message: ready}}\n  addresses:\n  - {{type: InternalIP, address: 127.0.0.1}}\n"
        );
        self.apply(&yaml)
            .unwrap_or_else(|e| panic!("node {name}: {e}"));
    }
}

/// Plays the node side of the API for node objects that have no agent:
/// pods bound to them are reported Running and Ready with an address, and
/// terminating pods are removed, through the same API calls a kubelet
/// makes (`pods/status`, delete with grace 0). Stops on drop.
pub struct HollowNodes {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HollowNodes {
    pub fn start(cp: &ControlPlane, nodes: &[&str]) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kubeconfig, nodes): (PathBuf, Vec<String>) = (
            cp.kubeconfig.clone(),
            nodes.iter().map(|s| s.to_string()).collect(),
        );
        let netns = cp.netns.clone();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let kubectl = |args: &[&str]| {
                Spawn::new("kubectl")
                    .netns_path(netns.as_deref())
                    .env("KUBECONFIG", &kubeconfig.display().to_string())
                    .args(args)
                    .try_output()
            };
            let mut next_ip = 2u32;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(out) = kubectl(&["get", "pods", "-A", "-o", "json"]) else {
                    continue;
                };
                let Ok(list) = serde_json::from_str::<serde_json::Value>(&out) else {
                    continue;
                };
                for pod in list["items"].as_array().into_iter().flatten() {
                    let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
                    let Some(idx) = nodes.iter().position(|n| n == node) else {
                        continue;
                    };
                    let (name, ns) = (
                        pod["metadata"]["name"].as_str().unwrap_or_default(),
                        pod["metadata"]["namespace"].as_str().unwrap_or_default(),
                    );
                    if pod["metadata"]["deletionTimestamp"].is_string() {
                        let _ = kubectl(&[
                            "delete",
                            "pod",
                            name,
                            "-n",
                            ns,
                            "--grace-period=0",
                            "--force",
                            "--wait=false",
                        ]);
                        continue;
                    }
                    let ready = pod["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True");
                    if pod["status"]["phase"] == "Running" && ready {
                        continue;
                    }
                    let ip = format!("10.244.{}.{}", idx + 1, next_ip % 250 + 2);
                    next_ip += 1;
                    // As a kubelet does, conditions carry the time they turned.
                    let now = k8s_openapi::jiff::Timestamp::now()
                        .strftime("%Y-%m-%dT%H:%M:%SZ")
                        .to_string();
                    let cond = |ty: &str| serde_json::json!({"type": ty, "status": "True", "lastTransitionTime": now});
                    let status = serde_json::json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1", "startTime": now,
                        "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
                        "containerStatuses": pod["spec"]["containers"].as_array().into_iter().flatten().map(|c| serde_json::json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": true, "restartCount": 0, "started": true, "state": {"running": {}}})).collect::<Vec<_>>()}});
                    let _ = kubectl(&[
                        "patch",
                        "pod",
                        name,
                        "-n",
                        ns,
                        "--subresource=status",
                        "--type=merge",
                        "-p",
                        &status.to_string(),
                    ]);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HollowNodes {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
