//! `cargo xtask up`: the service proxy doing its job in a namespace it
//! makes. Three backend servers, one Service with a ClusterIP and a
//! NodePort, the real agent reading manifests, a client in the translated
//! cgroup; then one endpoint turns unready and the traffic moves.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use skiff_tests::{Cgroup, Netns, PinDir, Proc, Spawn, TempDir, bin, wait_for};

const BACKENDS: [&str; 3] = ["10.202.0.11", "10.202.0.12", "10.202.0.13"];

fn manifests(ready: [bool; 3]) -> String {
    let mut eps = String::new();
    for (ip, r) in BACKENDS.iter().zip(ready) {
        eps.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: {r}}}\n"
        ));
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {{name: http, port: 80, nodePort: 30080}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080}}\nendpoints:\n{eps}"
    )
}

fn write(dir: &TempDir, text: &str) -> Result<()> {
    let tmp = dir.path.join(".web.yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.path.join("web.yaml"))?;
    Ok(())
}

fn list(pins: &PinDir) -> Result<String> {
    Spawn::new(bin("skiff-agent"))
        .args(["proxy", "list", "--bpffs"])
        .args([&pins.path])
        .try_output()
        .map_err(anyhow::Error::msg)
}

fn traffic(ns: &Netns, cg: &Cgroup, to: &str, n: u32) -> Result<BTreeMap<String, u64>> {
    let out = Spawn::new(bin("skiff-probe"))
        .args(["tcp", to, &n.to_string()])
        .netns(ns)
        .cgroup(cg)
        .try_output()
        .map_err(anyhow::Error::msg)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("probe output")?;
    if let Some(e) = v["errors"].as_object().filter(|e| !e.is_empty()) {
        bail!("connections failed: {e:?}");
    }
    Ok(v["answers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, c)| (k.clone(), c.as_u64().unwrap_or(0)))
        .collect())
}

pub fn run(once: bool) -> Result<()> {
    let ns = Netns::new();
    ns.add_local_link("skd0", &["10.202.0.1/24"]);
    let mut servers: Vec<Proc> = Vec::new();
    for (i, b) in BACKENDS.iter().enumerate() {
        ns.ip(&["addr", "add", &format!("{b}/32"), "dev", "skd0"]);
        let mut p = Spawn::new(bin("skiff-probe"))
            .args(["serve-tcp", &format!("{b}:8080"), &format!("pod-{}", i + 1)])
            .netns(&ns)
            .start();
        if p.ask("") != "ready" {
            bail!("backend {b} did not start");
        }
        servers.push(p);
    }
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let dir = TempDir::new();
    let logs = TempDir::new();
    write(&dir, &manifests([true, true, true]))?;

    println!(
        "network namespace {} (10.202.0.0/24), client cgroup {}",
        ns.name,
        cg.path.display()
    );
    let agent = Spawn::new(bin("skiff-agent"))
        .args(["run", "--manifests"])
        .args([&dir.path])
        .args(["--cgroup"])
        .args([&cg.path])
        .args(["--bpffs"])
        .args([&pins.path])
        .args(["--nodeport-address", "10.202.0.1", "--poll-ms", "100"])
        .netns(&ns)
        .log_to(&logs.path.join("agent.log"))
        .start();
    wait_for(
        "the agent to program the service",
        Duration::from_secs(15),
        || list(&pins).ok().filter(|l| l.contains("10.202.0.13:8080")),
    );
    println!("\n$ skiff-agent proxy list\n{}", list(&pins)?);

    println!(
        "60 connections to the ClusterIP 10.96.0.10:80 -> {:?}",
        traffic(&ns, &cg, "10.96.0.10:80", 60)?
    );
    println!(
        "60 connections to the NodePort 10.202.0.1:30080 -> {:?}",
        traffic(&ns, &cg, "10.202.0.1:30080", 60)?
    );

    println!("\npod-3 becomes not ready...");
    write(&dir, &manifests([true, true, false]))?;
    wait_for("the agent to drop pod-3", Duration::from_secs(15), || {
        list(&pins).ok().filter(|l| !l.contains("10.202.0.13:8080"))
    });
    println!(
        "60 connections to the ClusterIP 10.96.0.10:80 -> {:?}",
        traffic(&ns, &cg, "10.96.0.10:80", 60)?
    );
    println!("\nagent log:\n{}", agent.log_text());

    if !once {
        println!(
            "Skiff is up. Try: ip netns exec {} sh -c 'echo $$ > {}/cgroup.procs; exec {} tcp 10.96.0.10:80 10'",
            ns.name,
            cg.path.display(),
            bin("skiff-probe").display()
        );
        println!("Press Ctrl-C to tear it down.");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut signals = nix::sys::signal::SigSet::empty();
        signals.add(nix::sys::signal::Signal::SIGINT);
        signals.add(nix::sys::signal::Signal::SIGTERM);
        signals.thread_block().context("blocking signals")?;
        std::thread::spawn(move || {
            let _ = signals.wait();
            let _ = tx.send(());
        });
        let _ = rx.recv();
    }
    drop(agent);
    drop(servers);
    println!("torn down");
    Ok(())
}
