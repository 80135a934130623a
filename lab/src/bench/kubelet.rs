//! `cargo xtask bench kubelet`: the kubelet role beside containerd's own
//! client, `ctr run --cni`, on the same containerd, image, CNI conflist
//! and log driver (the runtime's own limit), in one run.
//!
//! - Pod start: from the create call until the pod is Running in the API,
//!   and until it is Ready (no readiness probe: ready once started), for
//!   pods created one at a time and for batches created at once; `ctr run
//!   -d --cni` timed from its start until it returns (the task running
//!   with its network). Modes alternate sample by sample, for each OCI
//!   runtime (runc, crun) in every round.
//! - Container exit to pod status: SIGKILL of the container's process
//!   until the API shows it terminated, beside containerd's own `/tasks/exit`
//!   event for the same exit (and for a `ctr` container).
//! - The kubelet's RSS and CPU while idle, with no pods and with many.
//!
//! Everything runs in one network namespace the benchmark makes: etcd,
//! skiff-control, a registry, containerd and the agent; nothing is
//! dialled from the host namespace.

use std::collections::HashMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};
use skiff_cni_lib::exec::{Attachment, Conflist, Runtime};
use skiff_tests::control::ControlPlane;
use skiff_tests::node::{KubeletNode, Registry};
use skiff_tests::{Netns, Proc, Spawn, TempDir, bin_dir};

use super::stats::{pct, summary};

pub struct Args {
    /// Pods started one at a time, per mode and runtime (over all rounds).
    pub singles: usize,
    /// Pods per batch created at once.
    pub batch: usize,
    /// Batches per mode and runtime (over all rounds).
    pub batches: usize,
    /// Exit samples per mode and runtime (over all rounds).
    pub exits: usize,
    /// Pods running for the second idle measurement.
    pub idle_pods: usize,
    pub idle_seconds: u64,
    pub rounds: usize,
    pub runtimes: Vec<String>,
    pub out: PathBuf,
}

const NODE_IP: &str = "172.31.9.2";
const SUBNET: &str = "10.244.1.0/24";
const NS: &str = "bench";
const WAIT: Duration = Duration::from_secs(120);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the pod watch has seen of each pod, and when.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    running: Option<Instant>,
    ready: Option<Instant>,
    terminated: Option<Instant>,
    gone: Option<Instant>,
}

/// A watch of the benchmark's pods on a thread of its own, so that the
/// time of each change is taken when it arrives, whatever the benchmark's
/// thread is doing.
struct PodWatch {
    seen: Mutex<HashMap<String, Seen>>,
    changed: Condvar,
    stop: AtomicBool,
}

impl PodWatch {
    fn start(kubeconfig: PathBuf, netns: String) -> Arc<Self> {
        let w = Arc::new(Self {
            seen: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let me = w.clone();
        std::thread::spawn(move || {
            let run = || -> Result<()> {
                let _ns = skiff_netlink::NetnsGuard::enter(&netns)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(me.run(&kubeconfig))
            };
            if let Err(e) = run() {
                eprintln!("pod watch stopped: {e:#}");
            }
        });
        w
    }

    async fn run(&self, kubeconfig: &Path) -> Result<()> {
        let client = super::kube_client(kubeconfig).await?;
        let pods: Api<Pod> = Api::namespaced(client, NS);
        let mut version = "0".to_string();
        while !self.stop.load(Ordering::Relaxed) {
            // A watch that ends (its timeout) or fails is made again from
            // the last version seen; a failure is retried after a pause.
            if let Err(e) = self.watch_once(&pods, &mut version).await {
                if self.stop.load(Ordering::Relaxed) {
                    break;
                }
                eprintln!("pod watch: {e:#}; watching again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    async fn watch_once(&self, pods: &Api<Pod>, version: &mut String) -> Result<()> {
        let mut stream = pods
            .watch(&WatchParams::default().timeout(60), version)
            .await?
            .boxed();
        while let Some(ev) = stream.next().await {
            let now = Instant::now();
            let (pod, gone) = match ev? {
                WatchEvent::Added(p) | WatchEvent::Modified(p) => (p, false),
                WatchEvent::Deleted(p) => (p, true),
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Error(e) => {
                    *version = "0".into();
                    bail!("{}", e.message);
                }
            };
            if let Some(v) = &pod.metadata.resource_version {
                version.clone_from(v);
            }
            self.note(&pod, gone, now);
        }
        Ok(())
    }

    fn note(&self, pod: &Pod, gone: bool, now: Instant) {
        let Some(name) = pod.metadata.name.clone() else {
            return;
        };
        let status = pod.status.as_ref();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let terminated = status
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.state.as_ref().is_some_and(|st| st.terminated.is_some()))
            });
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let s = seen.entry(name).or_default();
        if running {
            s.running.get_or_insert(now);
        }
        if ready {
            s.ready.get_or_insert(now);
        }
        if terminated {
            s.terminated.get_or_insert(now);
        }
        if gone {
            s.gone.get_or_insert(now);
        }
        self.changed.notify_all();
    }

    /// When `what` of pod `name` was first seen; waits for it.
    fn wait(&self, name: &str, what: fn(&Seen) -> Option<Instant>) -> Result<Instant> {
        let deadline = Instant::now() + WAIT;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(t) = seen.get(name).and_then(what) {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("pod {name}: not seen in time ({:?})", seen.get(name));
            }
            seen = self
                .changed
                .wait_timeout(seen, left.min(Duration::from_millis(500)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn forget(&self, name: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}

/// Lines with the time each arrived, and a signal for each new one.
type Lines = Arc<(Mutex<Vec<(Instant, String)>>, Condvar)>;

/// containerd's event stream (`ctr events`), each line with the time it
/// arrived.
struct Events {
    child: Child,
    lines: Lines,
}

impl Events {
    fn start(socket: &Path) -> Result<Self> {
        let mut child = Command::new("ctr")
            .args(["--address", &socket.display().to_string(), "events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("ctr events")?;
        let out = child.stdout.take().context("ctr events: no stdout")?;
        let lines: Lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let now = Instant::now();
                sink.0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((now, line));
                sink.1.notify_all();
            }
        });
        Ok(Self { child, lines })
    }

    /// When containerd announced the exit of container `id`'s task.
    fn exit_of(&self, id: &str) -> Result<Instant> {
        let key = format!("\"container_id\":\"{id}\"");
        let deadline = Instant::now() + WAIT;
        let mut lines = self.lines.0.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((t, _)) = lines
                .iter()
                .find(|(_, l)| l.contains("/tasks/exit") && l.contains(&key))
            {
                return Ok(*t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no /tasks/exit event for {id}");
            }
            lines = self
                .lines
                .1
                .wait_timeout(lines, left.min(Duration::from_millis(500)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ctr` in a private mount namespace (inside the node's network
/// namespace) where `/etc/cni/net.d` holds the node's conflist and
/// `/opt/cni/bin` its plugins: ctr 1.6 reads CNI from those fixed paths
/// only. The host's /etc is left alone (an overlay in that namespace).
struct CtrRunner {
    holder: Proc,
    socket: PathBuf,
    conflist: Conflist,
    cni: Runtime,
    log_dir: PathBuf,
    _dir: TempDir,
}

impl CtrRunner {
    fn start(ns: &Netns, node: &KubeletNode) -> Result<Self> {
        let dir = TempDir::new();
        let conf_dir = node.dir.path.join("net.d");
        let t = dir.path.display();
        let script = format!(
            "set -e; mount -t tmpfs tmpfs {t}; mkdir -p {t}/up {t}/work; \
             mount -t overlay overlay -o lowerdir=/etc,upperdir={t}/up,workdir={t}/work /etc; \
             mkdir -p /etc/cni/net.d; cp {conf}/*.conflist /etc/cni/net.d/; \
             mount -t tmpfs tmpfs /opt; mkdir -p /opt/cni/bin; \
             cp {cni} /usr/lib/cni/portmap /opt/cni/bin/; \
             touch {t}/ready; exec sleep infinity",
            conf = conf_dir.display(),
            cni = bin_dir().join("skiff-cni").display(),
        );
        let holder = Spawn::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .netns(ns)
            .log_to(&node.dir.path.join("ctr-holder.log"))
            .start();
        // The tmpfs is mounted in the holder's namespace only: look there.
        let ready = PathBuf::from(format!("/proc/{}/root{}/ready", holder.pid(), t));
        if !skiff_tests::wait_until(Duration::from_secs(10), || ready.exists()) {
            bail!(
                "the ctr mount namespace did not come up: {}",
                holder.log_text()
            );
        }
        Ok(Self {
            holder,
            socket: node.containerd.socket.clone(),
            conflist: Conflist::load_dir(&conf_dir)?,
            cni: Runtime {
                bin_dirs: vec![bin_dir(), PathBuf::from("/usr/lib/cni")],
                node_netns: Some(PathBuf::from(ns.path())),
            },
            log_dir: node.dir.path.join("ctr-logs"),
            _dir: dir,
        })
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.holder.pid().to_string(),
            "-m",
            "-n",
            "--",
            "ctr",
            "--address",
            &self.socket.display().to_string(),
            "--namespace",
            "k8s.io",
        ]);
        c
    }

    /// `ctr run -d --cni` of `image` as `id` with `runtime`, logs through
    /// the kubelet's own log driver; not waited for.
    fn run(&self, image: &str, id: &str, runtime: &str) -> Result<Child> {
        let log = skiff_agent::kubelet::logs::uri(
            &skiff_tests::bin("skiff-log"),
            &self.log_dir.join(format!("{id}.log")),
            skiff_agent::kubelet::logs::MAX_SIZE,
        );
        self.ctr()
            .args([
                "run",
                "-d",
                "--cni",
                "--runc-binary",
                runtime,
                "--log-uri",
                &log,
                image,
                id,
                "sleep",
                "3600",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("ctr run")
    }

    fn wait_run(child: Child, id: &str) -> Result<()> {
        let out = child.wait_with_output().context("ctr run")?;
        if !out.status.success() {
            bail!(
                "ctr run {id}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Kills and removes the container and its network (ctr's detached
    /// run leaves CNI DEL to its caller).
    fn remove(&self, id: &str) -> Result<()> {
        let _ = self
            .ctr()
            .args(["tasks", "kill", "-s", "SIGKILL", id])
            .output();
        let mut deleted = false;
        for _ in 0..100 {
            let out = self.ctr().args(["tasks", "delete", id]).output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() || err.contains("not found") {
                deleted = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !deleted {
            bail!("ctr tasks delete {id} kept failing");
        }
        let out = self.ctr().args(["containers", "delete", id]).output()?;
        if !out.status.success() {
            bail!(
                "ctr containers delete {id}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let full = format!("k8s.io-{id}");
        self.conflist
            .del(
                &self.cni,
                &Attachment {
                    container_id: &full,
                    netns: "",
                    ifname: "eth0",
                    args: "",
                },
                None,
            )
            .with_context(|| format!("CNI DEL of {full}"))?;
        Ok(())
    }

    /// The host pid of container `id`'s task.
    fn task_pid(&self, id: &str) -> Result<i32> {
        let out = self.ctr().args(["tasks", "list"]).output()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(id)).then(|| f.next()?.parse().ok())?
            })
            .with_context(|| format!("no running task {id}"))
    }

    /// The IPv4 address on eth0 inside container `id`'s network namespace.
    fn pod_ip(&self, id: &str) -> Result<String> {
        let pid = self.task_pid(id)?;
        let out = Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-n",
                "ip",
                "-4",
                "-o",
                "addr",
                "show",
                "eth0",
            ])
            .output()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .map(String::from)
            .with_context(|| format!("{id} has no address on eth0"))
    }
}

/// Which OCI runtime created container `id`: runc keeps `state.json` in
/// its state directory, crun a `status` file.
fn runtime_of(id: &str) -> &'static str {
    let dir = Path::new("/run/containerd/runc/k8s.io").join(id);
    if dir.join("state.json").exists() {
        "runc"
    } else if dir.join("status").exists() {
        "crun"
    } else {
        "unknown"
    }
}

/// crun refuses cgroup hybrid mode while the v2 hierarchy holds any
/// controller ("drop all controllers from cgroupv2"); on these machines
/// it holds hugetlb, which no v1 hierarchy has. For the benchmark's
/// length, each such controller gets a v1 hierarchy of its own under
/// /sys/fs/cgroup, as a v1 host would have, which takes it out of v2; the
/// drop unmounts them and the controllers go back.
struct V1Controllers {
    mounted: Vec<PathBuf>,
}

impl V1Controllers {
    fn for_crun() -> Result<Self> {
        let root = Path::new("/sys/fs/cgroup");
        let unified = root.join("unified/cgroup.controllers");
        let mut mounted = Vec::new();
        let Ok(list) = std::fs::read_to_string(&unified) else {
            return Ok(Self { mounted });
        };
        for c in list.split_whitespace() {
            let dir = root.join(c);
            if dir.exists() {
                continue;
            }
            eprintln!(
                "crun: moving the {c} controller from cgroup v2 to {} for the run",
                dir.display()
            );
            std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            if let Err(e) = Self::mount(c, &dir) {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
            mounted.push(dir);
        }
        Ok(Self { mounted })
    }

    fn mount(c: &str, dir: &Path) -> Result<()> {
        let out = Command::new("mount")
            .args(["-t", "cgroup", "-o", c, "cgroup"])
            .arg(dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "mount the {c} cgroup controller at {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Gives controller `c` (mounted at `dir`) back to cgroup v2. The
    /// kernel frees a v1 hierarchy only if it has no child cgroups when its
    /// last mount goes, and removed cgroups leave the list a little later:
    /// remove them, unmount, and mount and try again until v2 has it back.
    fn release(c: &str, dir: &Path) -> Result<()> {
        let back = || {
            std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
                .is_ok_and(|l| l.split_whitespace().any(|x| x == c))
        };
        for _ in 0..10 {
            remove_cgroups_below(dir);
            std::thread::sleep(Duration::from_millis(200));
            nix::mount::umount(dir).with_context(|| format!("umount {}", dir.display()))?;
            if skiff_tests::wait_until(Duration::from_millis(500), back) {
                let _ = std::fs::remove_dir(dir);
                return Ok(());
            }
            Self::mount(c, dir)?;
        }
        bail!("the {c} controller did not go back to cgroup v2")
    }
}

/// Removes every cgroup below `dir`, deepest first.
fn remove_cgroups_below(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for c in children.flatten() {
            if c.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroups_below(&c.path());
                let _ = std::fs::remove_dir(c.path());
            }
        }
    }
}

impl Drop for V1Controllers {
    fn drop(&mut self) {
        for dir in &self.mounted {
            let c = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Err(e) = Self::release(&c, dir) {
                eprintln!("{e:#}: umount {} by hand", dir.display());
            }
        }
    }
}

fn pod(name: &str, node: &str, image: &str, restart: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"skiff-bench": "1"}},
        "spec": {
            "nodeName": node,
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "c",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["sleep", "3600"],
            }],
        },
    }))?)
}

/// The benchmark's world: control plane, registry, node, ctr, watch.
struct Bench<'a> {
    rt: tokio::runtime::Runtime,
    pods: Api<Pod>,
    watch: Arc<PodWatch>,
    node: &'a mut KubeletNode,
    ctr: CtrRunner,
    image: String,
    seq: usize,
}

impl Bench<'_> {
    fn name(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}-{}", self.seq)
    }

    fn create(&self, names: &[String], restart: &str) -> Result<()> {
        let pods = names
            .iter()
            .map(|n| pod(n, &self.node.name, &self.image, restart))
            .collect::<Result<Vec<_>>>()?;
        let api = &self.pods;
        self.rt.block_on(async {
            let calls = pods
                .iter()
                .map(|p| async move { api.create(&PostParams::default(), p).await });
            for r in futures::future::join_all(calls).await {
                r?;
            }
            Ok::<_, kube::Error>(())
        })?;
        Ok(())
    }

    /// Deletes the pods at once (grace 0) and waits until the API and
    /// containerd hold none of them.
    fn delete(&self, names: &[String]) -> Result<()> {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        for n in names {
            self.rt.block_on(self.pods.delete(n, &dp))?;
        }
        for n in names {
            self.watch.wait(n, |s| s.gone)?;
            self.watch.forget(n);
        }
        self.wait_no_containers()
    }

    fn wait_no_containers(&self) -> Result<()> {
        if !skiff_tests::wait_until(WAIT, || self.node.containerd.containers().is_empty()) {
            bail!(
                "containers left in containerd: {:?}",
                self.node.containerd.containers()
            );
        }
        Ok(())
    }

    /// Starts `n` pods at once; per pod, ms until Running and until Ready,
    /// and the pods' names.
    fn skiff_start(&mut self, n: usize) -> Result<(Vec<Started>, Vec<String>)> {
        let names: Vec<String> = (0..n).map(|_| self.name("s")).collect();
        let t0 = Instant::now();
        self.create(&names, "Always")?;
        let mut out = Vec::new();
        for name in &names {
            let running = self.watch.wait(name, |s| s.running)?;
            let ready = self.watch.wait(name, |s| s.ready)?;
            if ready - running > Duration::from_secs(1) {
                // Running but not ready for long: a failed start retried
                // after its back-off. Say why, for whoever reads the run.
                let p = self.rt.block_on(self.pods.get(name))?;
                let last = p
                    .status
                    .and_then(|s| s.container_statuses)
                    .and_then(|cs| cs.into_iter().next())
                    .and_then(|c| c.last_state);
                eprintln!(
                    "pod {name}: Ready {:.0} ms after Running; last state {last:?}",
                    ms(ready - running)
                );
            }
            out.push((ms(running - t0), ms(ready - t0)));
        }
        Ok((out, names))
    }

    /// Starts `n` containers with `ctr run` at once; per container, ms
    /// until its ctr returned.
    fn ctr_start(&mut self, n: usize, runtime: &str) -> Result<(Vec<f64>, Vec<String>)> {
        let ids: Vec<String> = (0..n).map(|_| self.name("c")).collect();
        let t0 = Instant::now();
        let children = ids
            .iter()
            .map(|id| self.ctr.run(&self.image, id, runtime))
            .collect::<Result<Vec<_>>>()?;
        let waits: Vec<_> = children
            .into_iter()
            .zip(&ids)
            .map(|(child, id)| {
                let id = id.clone();
                std::thread::spawn(move || {
                    CtrRunner::wait_run(child, &id).map(|()| ms(t0.elapsed()))
                })
            })
            .collect();
        let mut out = Vec::new();
        for w in waits {
            out.push(
                w.join()
                    .map_err(|_| anyhow::anyhow!("ctr waiter panicked"))??,
            );
        }
        Ok((out, ids))
    }

    fn ctr_remove(&self, ids: &[String]) -> Result<()> {
        for id in ids {
            self.ctr.remove(id)?;
        }
        self.wait_no_containers()
    }

    /// The kubelet's pod: SIGKILL of its container's process until
    /// containerd's exit event, and until the API shows it terminated.
    fn skiff_exit(&mut self, events: &Events) -> Result<(f64, f64)> {
        let name = self.name("e");
        self.create(std::slice::from_ref(&name), "Never")?;
        self.watch.wait(&name, |s| s.running)?;
        let p = self.rt.block_on(self.pods.get(&name))?;
        let id = p
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|cs| cs.into_iter().next())
            .and_then(|c| c.container_id)
            .and_then(|c| c.strip_prefix("containerd://").map(String::from))
            .with_context(|| format!("pod {name} has no containerID"))?;
        let pid = self.ctr.task_pid(&id)?;
        let t0 = Instant::now();
        kill(pid)?;
        let event = events.exit_of(&id)?;
        let api = self.watch.wait(&name, |s| s.terminated)?;
        self.delete(&[name])?;
        Ok((ms(event - t0), ms(api - t0)))
    }

    /// The same for a `ctr run` container: until containerd's event.
    fn ctr_exit(&mut self, events: &Events, runtime: &str) -> Result<f64> {
        let (_, ids) = self.ctr_start(1, runtime)?;
        let id = &ids[0];
        let pid = self.ctr.task_pid(id)?;
        let t0 = Instant::now();
        kill(pid)?;
        let event = events.exit_of(id)?;
        self.ctr_remove(&ids)?;
        Ok(ms(event - t0))
    }

    /// Restarts the agent with `runtime` and checks, on one pod of each
    /// mode, that both run their containers with it and have a network.
    fn use_runtime(&mut self, runtime: &str) -> Result<()> {
        if let Some(mut a) = self.node.agent.take() {
            a.terminate();
        }
        self.node.extra_args = vec!["--runtime-binary".into(), runtime.into()];
        self.node.start_agent();
        let (_, names) = self.skiff_start(1)?;
        let p = self.rt.block_on(self.pods.get(&names[0]))?;
        let st = p.status.unwrap_or_default();
        let id = st
            .container_statuses
            .and_then(|cs| cs.into_iter().next())
            .and_then(|c| c.container_id)
            .unwrap_or_default();
        let id = id.trim_start_matches("containerd://");
        let used = runtime_of(id);
        if used != runtime {
            bail!("the kubelet's container {id} runs on {used}, not {runtime}");
        }
        if !st.pod_ip.is_some_and(|ip| ip.starts_with("10.244.1.")) {
            bail!("pod {} has no address from {SUBNET}", names[0]);
        }
        self.delete(&names)?;
        let (_, ids) = self.ctr_start(1, runtime)?;
        let used = runtime_of(&ids[0]);
        let ip = self.ctr.pod_ip(&ids[0])?;
        if used != runtime || !ip.starts_with("10.244.1.") {
            bail!(
                "ctr's container {} runs on {used} with address {ip}",
                ids[0]
            );
        }
        self.ctr_remove(&ids)
    }
}

/// ms from the create until Running, and until Ready.
type Started = (f64, f64);

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kill(pid: i32) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .with_context(|| format!("kill {pid}"))
}

/// The agent's RSS (MiB) and CPU (% of one core) over `seconds` of idling.
fn idle_usage(pid: i32, seconds: u64) -> Value {
    let c0 = super::stats::process_cpu_seconds(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let cpu = (super::stats::process_cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    json!({
        "rss_mib": field("VmRSS:"),
        "rss_anon_mib": field("RssAnon:"),
        "rss_file_mib": field("RssFile:"),
        "threads": field("Threads:") * 1024.0,
        "cpu_pct": cpu,
    })
}

#[derive(Default)]
struct Samples {
    /// runtime → case → series → values (ms).
    by: HashMap<String, HashMap<&'static str, HashMap<&'static str, Vec<f64>>>>,
}

impl Samples {
    fn add(&mut self, runtime: &str, case: &'static str, series: &'static str, v: f64) {
        self.by
            .entry(runtime.to_string())
            .or_default()
            .entry(case)
            .or_default()
            .entry(series)
            .or_default()
            .push(v);
    }

    fn get(&self, runtime: &str, case: &str, series: &str) -> Vec<f64> {
        let mut v = self
            .by
            .get(runtime)
            .and_then(|c| c.get(case))
            .and_then(|s| s.get(series))
            .cloned()
            .unwrap_or_default();
        v.sort_by(f64::total_cmp);
        v
    }
}

fn per_round(total: usize, rounds: usize, round: usize) -> usize {
    total / rounds + usize::from(round < total % rounds)
}

fn measure(args: &Args, b: &mut Bench<'_>, events: &Events) -> Result<(Samples, Vec<Value>)> {
    let mut s = Samples::default();
    for round in 0..args.rounds {
        for runtime in &args.runtimes {
            eprintln!("round {}/{}: {runtime}", round + 1, args.rounds);
            b.use_runtime(runtime)?;
            for i in 0..per_round(args.singles, args.rounds, round) {
                let skiff_first = (i + round) % 2 == 0;
                for mode in if skiff_first { [0, 1] } else { [1, 0] } {
                    if mode == 0 {
                        let (v, names) = b.skiff_start(1)?;
                        s.add(runtime, "single", "skiff_running", v[0].0);
                        s.add(runtime, "single", "skiff_ready", v[0].1);
                        b.delete(&names)?;
                    } else {
                        let (v, ids) = b.ctr_start(1, runtime)?;
                        s.add(runtime, "single", "ctr", v[0]);
                        b.ctr_remove(&ids)?;
                    }
                }
            }
            for _ in 0..per_round(args.batches, args.rounds, round) {
                let (v, names) = b.skiff_start(args.batch)?;
                for (running, ready) in v {
                    s.add(runtime, "batch", "skiff_running", running);
                    s.add(runtime, "batch", "skiff_ready", ready);
                }
                b.delete(&names)?;
                let (v, ids) = b.ctr_start(args.batch, runtime)?;
                for x in v {
                    s.add(runtime, "batch", "ctr", x);
                }
                b.ctr_remove(&ids)?;
            }
            for _ in 0..per_round(args.exits, args.rounds, round) {
                let (event, api) = b.skiff_exit(events)?;
                s.add(runtime, "exit", "skiff_event", event);
                s.add(runtime, "exit", "skiff_api", api);
                let event = b.ctr_exit(events, runtime)?;
                s.add(runtime, "exit", "ctr_event", event);
            }
        }
    }

    // Idle cost on the default runtime (the first one listed).
    let default = args.runtimes.first().map_or("runc", String::as_str);
    b.use_runtime(default)?;
    let mut idle = Vec::new();
    let pid = b.node.agent.as_ref().map(Proc::pid).context("no agent")?;
    eprintln!("idle, no pods ({} s)", args.idle_seconds);
    std::thread::sleep(Duration::from_secs(5));
    let mut u = idle_usage(pid, args.idle_seconds);
    u["pods"] = json!(0);
    idle.push(u);
    if args.idle_pods > 0 {
        eprintln!("idle, {} pods ({} s)", args.idle_pods, args.idle_seconds);
        let (_, names) = b.skiff_start(args.idle_pods)?;
        std::thread::sleep(Duration::from_secs(10));
        let mut u = idle_usage(pid, args.idle_seconds);
        u["pods"] = json!(args.idle_pods);
        idle.push(u);
        b.delete(&names)?;
    }
    Ok((s, idle))
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "bench kubelet: {} single pods, {}×{} in batches, {} exits per mode and runtime {:?}; idle with 0 and {} pods; {} rounds; {cores} cores",
        args.singles,
        args.batches,
        args.batch,
        args.exits,
        args.runtimes,
        args.idle_pods,
        args.rounds
    );
    // Dropped last, once every container and cgroup is gone.
    let _v1 = if args.runtimes.iter().any(|r| r == "crun") {
        Some(V1Controllers::for_crun()?)
    } else {
        None
    };
    let ns = Netns::new();
    ns.add_local_link("eth0", &[&format!("{NODE_IP}/24")]);
    let cp = ControlPlane::start_in(Some(&ns), &[]);
    let registry = Registry::start_in(&ns);
    let image = registry.push(&ns, "busybox", "busybox:bench");
    let mut node = KubeletNode::start(&ns, NODE_IP, SUBNET, &cp, &registry.addr);
    let ctr = CtrRunner::start(&ns, &node)?;
    let events = Events::start(&node.containerd.socket)?;

    // The benchmark's own API calls go from a thread in the namespace.
    let netns = ns.path();
    let kubeconfig = cp.kubeconfig.clone();
    let (samples, idle) = std::thread::scope(|sc| {
        sc.spawn(|| -> Result<(Samples, Vec<Value>)> {
            let _ns = skiff_netlink::NetnsGuard::enter(&netns)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let client = rt.block_on(super::kube_client(&kubeconfig))?;
            let nss: Api<Namespace> = Api::all(client.clone());
            rt.block_on(nss.create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
            ))?;
            let watch = PodWatch::start(kubeconfig.clone(), netns.clone());
            let mut b = Bench {
                pods: Api::namespaced(client, NS),
                rt,
                watch,
                node: &mut node,
                ctr,
                image: image.clone(),
                seq: 0,
            };
            let result = measure(args, &mut b, &events);
            b.watch.stop.store(true, Ordering::Relaxed);
            result
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?
    })
    .inspect_err(|_| {
        let containerd_log =
            std::fs::read_to_string(node.dir.path.join("containerd/containerd.log"))
                .unwrap_or_default();
        eprintln!(
            "--- control plane log ---\n{}\n--- agent log ---\n{}\n--- containerd log ---\n{}",
            cp.log_tail(),
            tail(&node.agent_log(), 60),
            tail(&containerd_log, 30)
        );
        let pods = cp
            .kubectl(&[
                "get",
                "pods",
                "-n",
                NS,
                "-o",
                "jsonpath={.items[*].status.containerStatuses}",
            ])
            .unwrap_or_else(|e| e);
        eprintln!("--- container statuses ---\n{}", tail(&pods, 20));
    })?;

    report(args, &samples, &idle, cores, started)
}

fn report(args: &Args, s: &Samples, idle: &[Value], cores: usize, started: Instant) -> Result<()> {
    let mut start = serde_json::Map::new();
    let mut exit = serde_json::Map::new();
    let mut ratios = serde_json::Map::new();
    println!(
        "\npod start, ms (create → Running / Ready in the API; ctr run -d --cni until it returns)"
    );
    println!(
        "| runtime | pods | Running p50 | p99 | Ready p50 | p99 | ctr run p50 | p99 | ratio p50 | ratio p99 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for rt in &args.runtimes {
        let mut per_case = serde_json::Map::new();
        for (case, label) in [
            ("single", "one at a time".to_string()),
            ("batch", format!("{} at once", args.batch)),
        ] {
            let run = s.get(rt, case, "skiff_running");
            let ready = s.get(rt, case, "skiff_ready");
            let ctr = s.get(rt, case, "ctr");
            let r50 = pct(&ready, 0.5) / pct(&ctr, 0.5).max(1e-9);
            let r99 = pct(&ready, 0.99) / pct(&ctr, 0.99).max(1e-9);
            println!(
                "| {rt} | {label} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {r50:.2} | {r99:.2} |",
                pct(&run, 0.5),
                pct(&run, 0.99),
                pct(&ready, 0.5),
                pct(&ready, 0.99),
                pct(&ctr, 0.5),
                pct(&ctr, 0.99),
            );
            per_case.insert(
                case.into(),
                json!({
                    "skiff_running_ms": summary(run.clone()),
                    "skiff_ready_ms": summary(ready.clone()),
                    "ctr_ms": summary(ctr.clone()),
                    "samples": {"skiff_running": run, "skiff_ready": ready, "ctr": ctr},
                }),
            );
            ratios.insert(
                format!("{rt}_{case}_ready_over_ctr"),
                json!({"p50": r50, "p99": r99}),
            );
        }
        start.insert(rt.clone(), Value::Object(per_case));
    }
    println!(
        "ratio = Ready ÷ ctr run, same runtime (target ≤ 1.25; single-pod p99 target < 1000 ms)"
    );

    println!("\ncontainer exit → status, ms (from SIGKILL of the container's process)");
    println!(
        "| runtime | containerd event p50 | p99 | pod status in the API p50 | p99 | kubelet's share p50 | ctr's container: event p50 | p99 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for rt in &args.runtimes {
        let ev = s.get(rt, "exit", "skiff_event");
        let api = s.get(rt, "exit", "skiff_api");
        let ctr = s.get(rt, "exit", "ctr_event");
        println!(
            "| {rt} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            pct(&ev, 0.5),
            pct(&ev, 0.99),
            pct(&api, 0.5),
            pct(&api, 0.99),
            pct(&api, 0.5) - pct(&ev, 0.5),
            pct(&ctr, 0.5),
            pct(&ctr, 0.99),
        );
        exit.insert(
            rt.clone(),
            json!({
                "containerd_event_ms": summary(ev.clone()),
                "api_ms": summary(api.clone()),
                "ctr_event_ms": summary(ctr.clone()),
                "samples": {"containerd_event": ev, "api": api, "ctr_event": ctr},
            }),
        );
    }
    println!("target: API p99 < 100 ms");

    println!(
        "\nkubelet (skiff-agent --roles kubelet) idle over {} s",
        args.idle_seconds
    );
    println!(
        "| pods | RSS MiB | of it anonymous | of it file-backed | threads | CPU % of a core |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for u in idle {
        let f = |k: &str| u[k].as_f64().unwrap_or(0.0);
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} |",
            u["pods"],
            f("rss_mib"),
            f("rss_anon_mib"),
            f("rss_file_mib"),
            f("threads"),
            f("cpu_pct")
        );
    }
    println!("targets at 100 pods: < 40 MiB, < 1 %");

    if args.runtimes.len() > 1 {
        let (a, b) = (&args.runtimes[0], &args.runtimes[1]);
        let p50 = |rt: &str, series: &str| pct(&s.get(rt, "single", series), 0.5);
        let k = p50(b, "skiff_ready") / p50(a, "skiff_ready").max(1e-9);
        let c = p50(b, "ctr") / p50(a, "ctr").max(1e-9);
        println!("\n{b} ÷ {a}, single pod start p50: kubelet {k:.2}, ctr run {c:.2}");
        ratios.insert(
            format!("{b}_over_{a}_single_p50"),
            json!({"kubelet": k, "ctr": c}),
        );
    }

    let doc = json!({
        "benchmark": "kubelet",
        "commit": super::git_commit(),
        "kernel": super::kernel(),
        "cores": cores,
        "seconds": started.elapsed().as_secs_f64(),
        "args": {
            "singles": args.singles, "batch": args.batch, "batches": args.batches,
            "exits": args.exits, "idle_pods": args.idle_pods, "idle_seconds": args.idle_seconds,
            "rounds": args.rounds, "runtimes": args.runtimes,
        },
        "start": start,
        "exit": exit,
        "idle": idle,
        "ratios": ratios,
    });
    let path = super::write_results(&args.out, "kubelet", &doc)?;
    let png = args.out.join("kubelet.png");
    super::plot::kubelet(&doc, &png)?;
    println!("wrote {} and {}", path.display(), png.display());
    Ok(())
}
