//! `cargo xtask`: setup, eBPF build, local bring-up, tests, benchmarks.
//!
//! `setup` installs, idempotently, everything a fresh machine lacks; every
//! other command runs it first, so `cargo xtask test` works on a new
//! machine by itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod openapi;
mod protobuf_schema;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install apt packages, nightly rust-src, bpf-linker (LLVM 22), protoc,
    /// the Python Kubernetes client.
    Setup,
    /// Build the kernel programs (through the agent's build script).
    BuildEbpf,
    /// Bring up a three-node Skiff cluster in namespaces it makes, run a
    /// Deployment and a Service on it and show a client pod reaching them by
    /// ClusterIP and pod IP across nodes; stays up for the host's kubectl
    /// until Ctrl-C unless --once. With --ha the control plane is three
    /// members (an etcd member and a skiff-control replica each, in
    /// namespaces of their own), and the demo goes on to kill the first
    /// and show the cluster carry on.
    Up {
        #[arg(long)]
        once: bool,
        #[arg(long)]
        ha: bool,
    },
    /// fmt, clippy, and every test, privileged ones included (run as root).
    Test,
    /// Build the OCI images pods run in tests, the demo and benchmarks
    /// (busybox, skiff-probe, skiff-node) into target/images; the test harness pushes
    /// them to its registry (and builds any that are missing or stale).
    Images {
        /// Also push each as `<REGISTRY>/<name>:<version>` (anonymous; for
        /// deploy/skiff-node.yaml on a cluster of your own).
        #[arg(long)]
        push: Option<String>,
        /// The registry speaks plain HTTP.
        #[arg(long)]
        plain_http: bool,
    },
    /// Benchmarks (not tests): `proxy`, `control`, `net`, `kubelet`,
    /// `cluster`, `nodeport`.
    Bench {
        /// Which benchmark.
        what: String,
        /// Extra arguments for the benchmark (after --).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Write control/src/apiserver/openapi/kubernetes-v<version>.json from
    /// Kubernetes' api/openapi-spec/swagger.json of that version.
    GenOpenapi {
        /// The upstream swagger.json.
        swagger: PathBuf,
        /// The Kubernetes version it is from (`1.33.1`).
        #[arg(long)]
        version: String,
    },
    /// Write control/src/apiserver/protobuf/schema.txt (Kubernetes protobuf field
    /// numbers) from the k8s-pb and k8s-openapi sources in cargo's registry.
    GenProtobufSchema {
        /// k8s-pb's `src` directory (default: the newest in cargo's registry).
        #[arg(long)]
        k8s_pb: Option<PathBuf>,
        /// k8s-openapi's `src/v1_NN` directory (default: the newest version
        /// in the registry's k8s-openapi 0.29).
        #[arg(long)]
        k8s_openapi: Option<PathBuf>,
    },
}

/// Debian packages the build, the tests and the benchmarks use.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "protobuf-compiler",
    // The well-known .proto files (google/protobuf/*.proto) that
    // etcd-client's and containerd-client's prost builds import.
    "libprotobuf-dev",
    "iproute2",
    "procps",
    "iptables",
    "nftables",
    "iperf3",
    "wrk",
    // `bench ingress`: nginx as the reverse proxy the ingress role is
    // measured against (its package's service is not started here).
    "nginx-light",
    "etcd-server",
    "etcd-client",
    "containerd",
    "runc",
    "containernetworking-plugins",
    // The registry the kubelet tests pull their images from, and the
    // second OCI runtime the kubelet benchmark measures against runc.
    "docker-registry",
    "crun",
    "busybox-static",
    // strip: the skiff-node image carries the agent without debug info.
    "binutils",
    // ethtool: `bench net` turns offloads on and off per knob.
    "ethtool",
    "fonts-dejavu-core",
    // CronJobs' time zones.
    "tzdata",
    "curl",
    // dig: the DNS tests ask the nodes' servers as a user would.
    "bind9-dnsutils",
    // dnsmasq: the upstream resolver the dns role forwards to in its tests;
    // dnsperf and unbound: `bench dns`, its load and its baseline.
    "dnsmasq-base",
    "dnsperf",
    "unbound",
    "python3-pip",
    // The dashboard's tests and benchmark: a real browser over WebDriver.
    "chromium",
    "chromium-driver",
];

/// The Python client the control-plane tests drive the apiserver with.
const PYTHON_CLIENT: &str = "kubernetes==37.0.2";

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|_| PathBuf::from("/root/.cargo"));
    home.join("bin").join(name)
}

fn apt_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing))?;
    }

    let have_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !have_src {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // bpf-linker must link against the LLVM that nightly's rustc uses (22);
    // without LLVM_PREFIX its build finds /usr's libraries and fails.
    if !succeeds(Command::new(cargo_bin("bpf-linker")).arg("--version")) {
        run(Command::new("cargo")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env(
                "PATH",
                format!(
                    "{LLVM_PREFIX}/bin:{}",
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                "0.13.0",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]))?;
    }
    if !succeeds(Command::new("python3").args(["-c", "import kubernetes"])) {
        let pip = [
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            PYTHON_CLIENT,
        ];
        // Debian's own python3 refuses pip installs unless told otherwise.
        if run(Command::new("python3").args(pip)).is_err() {
            run(Command::new("python3")
                .args(pip)
                .arg("--break-system-packages"))?;
        }
    }
    // kubectl is on every machine of this kind; say so plainly if not.
    if !succeeds(Command::new("kubectl").args(["version", "--client"])) {
        bail!(
            "kubectl is missing: the control-plane tests drive the apiserver with the real kubectl"
        );
    }
    eprintln!("setup: everything is installed");
    Ok(())
}

fn build_release() -> Result<()> {
    run(cargo().args(["build", "--bins", "--release"]))
}

fn test() -> Result<()> {
    setup()?;
    // A test run builds once: the incremental cache (several GB) buys nothing.
    let cargo = || {
        let mut c = cargo();
        if std::env::var_os("CARGO_INCREMENTAL").is_none() {
            c.env("CARGO_INCREMENTAL", "0");
        }
        c
    };
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    run(cargo().args(["build", "--bins"]))?;
    // Privileged tests share the machine's bpffs and cgroup tree; each makes
    // its own names, so they may run in parallel.
    run_tests(cargo().args(["test", "--no-fail-fast"]))
}

/// Runs cargo test, passing its output through, and ends with one line
/// adding up every test binary's result (cargo's own last line is that of
/// the last doc-test binary, often "0 passed").
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::BufRead as _;
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(['.', ';']) {
                    let mut words = part.split_whitespace();
                    if let (Some(n), Some(what)) = (words.next(), words.next()) {
                        let n: u64 = n.parse().unwrap_or(0);
                        match what {
                            "passed" => passed += n,
                            "failed" => failed += n,
                            "ignored" => ignored += n,
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

fn lab(args: &[&str]) -> Result<()> {
    build_release()?;
    run(Command::new(root().join("target/release/skiff-lab"))
        .current_dir(root())
        .args(args))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => {
            setup()?;
            run(cargo().args(["build", "-p", "skiff-agent"]))
        }
        Cmd::Up { once, ha } => {
            setup()?;
            let mut args = vec!["demo"];
            if once {
                args.push("--once");
            }
            if ha {
                args.push("--ha");
            }
            lab(&args)
        }
        Cmd::Test => test(),
        Cmd::Images { push, plain_http } => {
            setup()?;
            let mut args = vec!["images".to_string()];
            if let Some(r) = push {
                args.extend(["--push".to_string(), r]);
            }
            if plain_http {
                args.push("--plain-http".into());
            }
            lab(&args.iter().map(String::as_str).collect::<Vec<_>>())
        }
        Cmd::GenOpenapi { swagger, version } => openapi::generate(&root(), &swagger, &version),
        Cmd::GenProtobufSchema {
            k8s_pb,
            k8s_openapi,
        } => protobuf_schema::generate(&root(), k8s_pb, k8s_openapi),
        Cmd::Bench { what, args } => {
            setup()?;
            const BENCHES: [&str; 8] = [
                "proxy", "control", "net", "kubelet", "cluster", "nodeport", "dns", "ingress",
            ];
            if !BENCHES.contains(&what.as_str()) {
                bail!(
                    "unknown benchmark {what:?}: try one of {}",
                    BENCHES.join(", ")
                );
            }
            let name = format!("bench-{what}");
            let mut a = vec![name.as_str()];
            a.extend(args.iter().map(String::as_str));
            lab(&a)
        }
    }
}
