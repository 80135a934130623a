//! `skiff-probe`: the servers and clients the tests, the demo and the
//! benchmarks run inside their namespaces.
//!
//! Servers answer each request line with their name, so a client can tell
//! which backend it reached (or, named `%peer`, with the client's address).
//! Clients print one JSON object on stdout.
//!
//! ```text
//! skiff-probe serve-tcp ADDR NAME [ACCEPTORS]   skiff-probe serve-udp ADDR NAME
//! skiff-probe tcp ADDR COUNT [FROM]      skiff-probe udp ADDR COUNT [TOS]
//! skiff-probe session ADDR               (one connection; a request per stdin line, or
//!                                         `?peer`: the peer name the application sees)
//! skiff-probe udp-size ADDR SIZE DF [BIG] (SIZE-byte datagrams, DF 1 or 0: answered, errnos, path
//!                                         MTU; BIG 1: the answers as big, and their size)
//! skiff-probe load ADDR[,ADDR...] CONNS THREADS
//! skiff-probe load-window ADDR[,ADDR...] START_NS MS THREADS  (connections completed in the
//!                                         MS ms from START_NS, CLOCK_MONOTONIC: side by side)
//! skiff-probe keepalive ADDR[,ADDR...] REQUESTS THREADS  (one kept-alive connection per thread)
//! skiff-probe in-cluster                 (kube-rs from inside a pod: who am I, my namespace's pods)
//! skiff-probe flows FIRST_PORT COUNT     (COUNT connections from fixed source ports; per stdin
//!                                         line `open ADDR` or `ask`, the answer of each)
//! skiff-probe ws-echo ADDR NAME          (WebSocket: each message back as `NAME: message`)
//! skiff-probe ws ADDR URL COUNT          (WebSocket client of ws://HOST/PATH through ADDR: the echoes)
//! skiff-probe serve-h2c ADDR NAME        (HTTP/2 with prior knowledge: `NAME HTTP/2.0`)
//! skiff-probe mark-ce IFACE              (VXLAN packets leaving IFACE marked CE, as a congested
//!                                         router would, until stdin closes)
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

const TIMEOUT: Duration = Duration::from_secs(2);

fn arg<'a>(args: &'a [String], i: usize, what: &str) -> Result<&'a str> {
    args.get(i)
        .map(String::as_str)
        .with_context(|| format!("missing argument {i}: {what}"))
}

fn addr(s: &str) -> Result<SocketAddr> {
    s.parse().with_context(|| format!("{s:?} is not ADDR:PORT"))
}

/// `ADDR:PORT[,ADDR:PORT...]`.
fn addrs(s: &str) -> Result<Vec<SocketAddr>> {
    s.split(',').map(addr).collect()
}

/// Acceptor threads per TCP server. Each serves its connection inline, so
/// no thread is spawned per connection (spawning would cost more than the
/// dataplane being measured) and bursts to one backend do not queue.
const ACCEPTORS: usize = 8;

/// The name `%peer` answers with the client's address as the server sees
/// it (to check for NAT on the way); an IPv4 client of a server on `[::]`
/// is named by its IPv4 address, not the mapped IPv6 form.
const PEER: &str = "%peer";

fn serve_conn(mut c: TcpStream, reply: &[u8]) {
    let peer;
    let reply = if reply == format!("{PEER}\n").as_bytes() {
        peer = format!(
            "{}\n",
            c.peer_addr()
                .map(|a| a.ip().to_canonical().to_string())
                .unwrap_or_default()
        );
        peer.as_bytes()
    } else {
        reply
    };
    let mut byte = [0u8; 1];
    // One reply per request line, until the client closes.
    while let Ok(1) = c.read(&mut byte) {
        if byte[0] == b'\n' && c.write_all(reply).is_err() {
            break;
        }
    }
}

/// `acceptors` connections are served at once (each held until its
/// client closes); more wait in the backlog.
fn serve_tcp(listen: SocketAddr, name: &str, acceptors: usize) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let reply = format!("{name}\n").into_bytes();
    let workers: Vec<_> = (0..acceptors)
        .map(|_| {
            let l = l.try_clone();
            let reply = reply.clone();
            std::thread::spawn(move || {
                let Ok(l) = l else { return };
                // An accept error (the peer gave up) ends no more than
                // that connection.
                for c in l.incoming().flatten() {
                    serve_conn(c, &reply);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// A datagram starting with this byte asks for an answer as long as
/// itself (the name, padded with it).
const AS_BIG: u8 = b'=';

fn serve_udp(listen: SocketAddr, name: &str) -> Result<()> {
    let s = UdpSocket::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let (len, from) = s.recv_from(&mut buf)?;
        let mut reply = if name == PEER {
            from.ip().to_canonical().to_string()
        } else {
            name.to_string()
        }
        .into_bytes();
        if buf.first() == Some(&AS_BIG) && len > reply.len() {
            reply.resize(len, AS_BIG);
        }
        let _ = s.send_to(&reply, from);
    }
}

#[derive(Default, Serialize)]
struct Tally {
    answers: BTreeMap<String, u32>,
    errors: BTreeMap<String, u32>,
    /// Addresses the answers came from (TCP: getpeername; UDP: recvfrom).
    peers: BTreeMap<String, u32>,
}

impl Tally {
    fn error(&mut self, e: &std::io::Error) {
        *self.errors.entry(format!("{:?}", e.kind())).or_default() += 1;
    }
}

/// Connect, one request and its answer, close.
fn request(to: SocketAddr) -> std::io::Result<(String, TcpStream)> {
    request_from(to, None)
}

/// A TCP connection to `to`, from the address `from` if given (one of the
/// namespace's own: a client of its own to the other side).
fn connect(to: SocketAddr, from: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect_timeout(&to, TIMEOUT);
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), TIMEOUT)?;
    Ok(s.into())
}

/// As `request`, from the address `from` if given.
fn request_from(
    to: SocketAddr,
    from: Option<std::net::IpAddr>,
) -> std::io::Result<(String, TcpStream)> {
    let mut c = connect(to, from)?;
    c.set_read_timeout(Some(TIMEOUT))?;
    c.write_all(b"q\n")?;
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line)?;
    Ok((line.trim().to_string(), c))
}

/// As `request`, also returning the peer name the application sees.
fn tcp_once(
    to: SocketAddr,
    from: Option<std::net::IpAddr>,
) -> std::io::Result<(String, SocketAddr)> {
    let (answer, c) = request_from(to, from)?;
    Ok((answer, c.peer_addr()?))
}

fn tcp(to: SocketAddr, count: u32, from: Option<std::net::IpAddr>) -> Result<()> {
    let mut t = Tally::default();
    for _ in 0..count {
        match tcp_once(to, from) {
            Ok((name, peer)) => {
                *t.answers.entry(name).or_default() += 1;
                *t.peers.entry(peer.to_string()).or_default() += 1;
            }
            Err(e) => t.error(&e),
        }
    }
    println!("{}", serde_json::to_string(&t)?);
    Ok(())
}

/// `tos`: the TOS (IPv4) or traffic class (IPv6) of the datagrams sent,
/// for example 2 to send them ECN-capable (ECT(0)).
fn udp(to: SocketAddr, count: u32, tos: Option<u32>) -> Result<()> {
    let mut t = Tally::default();
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    for _ in 0..count {
        // A new socket each time: a socket keeps its backend.
        let r = (|| -> std::io::Result<(String, SocketAddr)> {
            let s = UdpSocket::bind(bind)?;
            if let Some(tos) = tos {
                let s = socket2::SockRef::from(&s);
                if to.is_ipv4() {
                    s.set_tos_v4(tos)?;
                } else {
                    s.set_tclass_v6(tos)?;
                }
            }
            s.set_read_timeout(Some(TIMEOUT))?;
            s.send_to(b"q", to)?;
            let mut buf = [0u8; 2048];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
        })();
        match r {
            Ok((name, from)) => {
                *t.answers.entry(name).or_default() += 1;
                *t.peers.entry(from.to_string()).or_default() += 1;
            }
            Err(e) => t.error(&e),
        }
    }
    println!("{}", serde_json::to_string(&t)?);
    Ok(())
}

/// A connected UDP client, as a resolver's or a game's: one socket, a
/// request every 100 ms for `seconds`, a new socket only when the kernel
/// ends this one. Prints `<ms since the epoch> <answer>` or `<ms> error:
/// <kind> errno <n>` per request.
fn udp_follow(to: SocketAddr, seconds: u64) -> Result<()> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let end = std::time::Instant::now() + Duration::from_secs(seconds);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    };
    let mut sock: Option<UdpSocket> = None;
    let mut out = std::io::stdout().lock();
    while std::time::Instant::now() < end {
        let s = match &sock {
            Some(s) => s,
            None => {
                let s = UdpSocket::bind(bind)?;
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                s.connect(to)?;
                sock.insert(s)
            }
        };
        let r = s.send(b"q").and_then(|_| {
            let mut buf = [0u8; 2048];
            s.recv(&mut buf)
                .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        });
        match r {
            Ok(a) => writeln!(out, "{} {}", now_ms(), a.trim())?,
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0);
                writeln!(out, "{} error: {:?} errno {errno}", now_ms(), e.kind())?;
                // Ended by the kernel (socket termination): reads fail with
                // ECONNABORTED, and the socket is no longer connected, so
                // writes fail with EDESTADDRREQ. Connect again.
                if matches!(errno, libc::ECONNABORTED | libc::EDESTADDRREQ) {
                    sock = None;
                }
            }
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// What `udp-size` saw.
#[derive(Serialize)]
struct SizeTry {
    answered: bool,
    /// The errno of each failed try, in order.
    errnos: Vec<i32>,
    /// The path MTU the socket knows of at the end.
    mtu: i32,
    /// The payload each try sent (SIZE less the IP and UDP headers): what
    /// an answer as big carries back.
    sent_len: usize,
    /// The answer's length.
    answer_len: usize,
}

/// A connected UDP client sending datagrams of `size` bytes (IP header
/// included) to `to`, up to 5 tries 200 ms apart until one is answered.
/// `df`: path MTU discovery on (DF set; an ICMP "fragmentation needed" or
/// "packet too big" for the flow fails the next receive with EMSGSIZE and
/// lowers the socket's path MTU), or off (IPv4: DF clear, so routers may
/// fragment). `big`: each answer as big as the datagram (the server
/// pads it), so that it too may need fragments.
fn udp_size(to: SocketAddr, size: usize, df: bool, big: bool) -> Result<()> {
    let (bind, ip_header): (SocketAddr, usize) = if to.is_ipv4() {
        ("0.0.0.0:0".parse()?, 20)
    } else {
        ("[::]:0".parse()?, 40)
    };
    let mut payload = vec![b'q'; size.checked_sub(ip_header + 8).context("SIZE too small")?];
    if big && let Some(first) = payload.first_mut() {
        *first = AS_BIG;
    }
    let s = UdpSocket::bind(bind)?;
    let (level, opt, mtu_opt, on, off) = if to.is_ipv4() {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_MTU,
            libc::IP_PMTUDISC_DO,
            libc::IP_PMTUDISC_DONT,
        )
    } else {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_MTU,
            libc::IPV6_PMTUDISC_DO,
            libc::IPV6_PMTUDISC_DONT,
        )
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    let mode: libc::c_int = if df { on } else { off };
    // SAFETY: an int option of this socket, its own size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const mode).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("path MTU discovery mode");
    }
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    s.connect(to)?;
    let mut t = SizeTry {
        answered: false,
        errnos: Vec::new(),
        mtu: 0,
        sent_len: payload.len(),
        answer_len: 0,
    };
    let mut buf = vec![0u8; 65_536];
    for _ in 0..5 {
        match s.send(&payload).and_then(|_| s.recv(&mut buf)) {
            Ok(len) => {
                t.answered = true;
                t.answer_len = len;
                break;
            }
            Err(e) => t.errnos.push(e.raw_os_error().unwrap_or(0)),
        }
    }
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option of this socket, written into `t.mtu`.
    unsafe { libc::getsockopt(fd, level, mtu_opt, (&raw mut t.mtu).cast(), &mut len) };
    println!("{}", serde_json::to_string(&t)?);
    Ok(())
}

/// One connection kept open; each stdin line is a request whose answer (or
/// error) is printed on its own line.
fn session(to: SocketAddr) -> Result<()> {
    let c = TcpStream::connect_timeout(&to, TIMEOUT).with_context(|| format!("connect {to}"))?;
    c.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(c.try_clone()?);
    let mut writer = c;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        if line == "?peer" {
            match writer.peer_addr() {
                Ok(peer) => writeln!(out, "{peer}")?,
                Err(e) => writeln!(out, "error: {:?}", e.kind())?,
            }
            out.flush()?;
            continue;
        }
        let answer = writer
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| {
                let mut a = String::new();
                reader.read_line(&mut a).map(|_| a)
            });
        match answer {
            Ok(a) if !a.is_empty() => writeln!(out, "{}", a.trim())?,
            Ok(_) => writeln!(out, "error: closed")?,
            Err(e) => writeln!(out, "error: {:?}", e.kind())?,
        }
        out.flush()?;
    }
    Ok(())
}

#[derive(Serialize)]
struct Load {
    connections: u64,
    errors: u64,
    seconds: f64,
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    /// This process's CPU time (user and system, all threads) per
    /// connection or request: the client's side of the cost, including the
    /// kernel work its system calls do (a cgroup program's run among it).
    cpu_us: f64,
}

/// CPU seconds this process has used so far (user and system).
fn own_cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        secs(u.user_time()) + secs(u.system_time())
    })
}

/// Waits for the load's threads, each with its latencies (µs) and error
/// count, and prints the figures.
fn print_load(
    handles: Vec<std::thread::JoinHandle<(Vec<f64>, u64)>>,
    started: Instant,
    cpu_before: f64,
) -> Result<()> {
    print_load_over(handles, || started.elapsed().as_secs_f64(), cpu_before)
}

/// As `print_load`, the rate over the seconds `seconds` gives once every
/// thread is done.
fn print_load_over(
    handles: Vec<std::thread::JoinHandle<(Vec<f64>, u64)>>,
    seconds: impl FnOnce() -> f64,
    cpu_before: f64,
) -> Result<()> {
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (lat, e) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        all.extend(lat);
        errors += e;
    }
    let seconds = seconds();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() - 1) as f64 * p) as usize]
        }
    };
    let l = Load {
        connections: all.len() as u64,
        errors,
        seconds,
        rate: all.len() as f64 / seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        cpu_us: (own_cpu_seconds() - cpu_before) * 1e6 / (all.len() as f64).max(1.0),
    };
    println!("{}", serde_json::to_string(&l)?);
    Ok(())
}

/// Bounded load: CONNS connections in all, spread over THREADS threads,
/// each a connect + one request/response + close, cycling over the targets.
fn load(targets: &[SocketAddr], conns: u64, threads: u64) -> Result<()> {
    if targets.is_empty() || threads == 0 {
        bail!("load needs at least one target and one thread");
    }
    let per = conns / threads;
    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let targets = targets.to_vec();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(per as usize);
                let mut errors = 0u64;
                for i in 0..per {
                    let to = targets[((t * per + i) as usize) % targets.len()];
                    let s = Instant::now();
                    match request(to) {
                        Ok(_) => lat.push(s.elapsed().as_secs_f64() * 1e6),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    print_load(handles, started, cpu_before)
}

/// Pins the calling thread to CPU `t` modulo the CPUs this process may
/// use: two side-by-side loads put their threads on the same CPUs, so
/// neither gets the quieter one. Best effort.
fn pin_to_cpu(t: usize) {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let cpus = skiff_tests::allowed_cpus();
    let mut set = CpuSet::new();
    if cpus.is_empty() || set.set(cpus[t % cpus.len()]).is_err() {
        return;
    }
    let _ = sched_setaffinity(Pid::from_raw(0), &set);
}

/// How late after its window opened a windowed load may start.
const WINDOW_LATE_NS: u64 = 20_000_000;

/// Windowed load, for two loads measured side by side (each from its own
/// cgroup): every thread waits for the instant `start_ns` (CLOCK_MONOTONIC),
/// then makes connections, cycling over the targets, until `window_ms`
/// later. Only connections completed inside the window count, and the
/// rate is over the window, so two loads given the same instant share the
/// machine's every moment.
fn load_window(targets: &[SocketAddr], start_ns: u64, window_ms: u64, threads: u64) -> Result<()> {
    if targets.is_empty() || threads == 0 || window_ms == 0 {
        bail!("load-window needs at least one target, one thread and a window");
    }
    let now = skiff_tests::monotonic_ns();
    if now > start_ns + WINDOW_LATE_NS {
        bail!(
            "started {} ms after its window opened",
            (now - start_ns) / 1_000_000
        );
    }
    let end_ns = start_ns + window_ms * 1_000_000;
    let sleep_until = |t: u64| {
        let now = skiff_tests::monotonic_ns();
        if t > now {
            std::thread::sleep(Duration::from_nanos(t - now));
        }
    };
    let handles: Vec<_> = (0..threads as usize)
        .map(|t| {
            let targets = targets.to_vec();
            std::thread::spawn(move || {
                pin_to_cpu(t);
                sleep_until(start_ns);
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut i = t;
                loop {
                    let s = Instant::now();
                    let result = request(targets[i % targets.len()]);
                    if skiff_tests::monotonic_ns() >= end_ns {
                        break;
                    }
                    match result {
                        Ok(_) => lat.push(s.elapsed().as_secs_f64() * 1e6),
                        Err(_) => errors += 1,
                    }
                    i += threads as usize;
                }
                (lat, errors)
            })
        })
        .collect();
    sleep_until(start_ns);
    let cpu_before = own_cpu_seconds();
    print_load_over(handles, || window_ms as f64 / 1e3, cpu_before)
}

/// Requests on kept-alive connections: each thread opens one connection
/// (to the targets in turn) and sends its share of `requests` on it, one at
/// a time. Prints the same figures as `load`, per request.
fn keepalive(targets: &[SocketAddr], requests: u64, threads: u64) -> Result<()> {
    if targets.is_empty() || threads == 0 {
        bail!("keepalive needs at least one target and one thread");
    }
    let per = requests / threads;
    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let to = targets[t as usize % targets.len()];
            std::thread::spawn(move || -> (Vec<f64>, u64) {
                let mut lat = Vec::with_capacity(per as usize);
                let Ok((_, c)) = request(to) else {
                    return (lat, per);
                };
                let mut reader = BufReader::new(&c);
                let mut writer = &c;
                let mut errors = 0;
                let mut line = String::new();
                for _ in 0..per {
                    let s = Instant::now();
                    line.clear();
                    match writer
                        .write_all(b"q\n")
                        .and_then(|()| reader.read_line(&mut line))
                    {
                        Ok(n) if n > 0 => lat.push(s.elapsed().as_secs_f64() * 1e6),
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    print_load(handles, started, cpu_before)
}

/// What a pod's kube-rs client sees with in-cluster config (the
/// ServiceAccount volume and the `KUBERNETES_SERVICE_*` variables).
#[derive(Serialize)]
struct InCluster {
    user: String,
    namespace: String,
    pods: Vec<String>,
}

fn in_cluster() -> Result<()> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    use k8s_openapi::api::core::v1::Pod;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = kube::Config::incluster().context("in-cluster config")?;
        let namespace = config.default_namespace.clone();
        let client = kube::Client::try_from(config)?;
        let review: SelfSubjectReview = kube::Api::all(client.clone())
            .create(&Default::default(), &SelfSubjectReview::default())
            .await
            .context("whoami")?;
        let user = review
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .unwrap_or_default();
        let pods = kube::Api::<Pod>::namespaced(client, &namespace)
            .list(&Default::default())
            .await
            .context("listing pods")?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        let out = InCluster {
            user,
            namespace,
            pods,
        };
        println!("{}", serde_json::to_string(&out)?);
        Ok(())
    })
}

/// Connections from source ports FIRST_PORT.. that live across commands:
/// `open ADDR` (re)connects them all (the old ones reset, so their ports
/// are free at once) and asks each once; `ask` asks each again. Each
/// command prints `{"names": [...]}`, one per connection in port order,
/// `error:<kind>` where it failed.
fn flows(first_port: u16, count: u16) -> Result<()> {
    let mut conns: Vec<Option<TcpStream>> = Vec::new();
    let ask = |c: &mut Option<TcpStream>| -> String {
        let r = (|| -> std::io::Result<String> {
            let s = c
                .as_mut()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))?;
            s.write_all(b"q\n")?;
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            loop {
                match s.read(&mut byte)? {
                    0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    _ if byte[0] == b'\n' => break,
                    _ => line.push(byte[0]),
                }
            }
            Ok(String::from_utf8_lossy(&line).into_owned())
        })();
        r.unwrap_or_else(|e| {
            // Reset, so that the port is free for the next `open`.
            if let Some(s) = c.take() {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
            format!("error:{:?}", e.kind())
        })
    };
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("open") => {
                let to = addr(words.next().context("open ADDR")?)?;
                for c in conns.drain(..).flatten() {
                    let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
                }
                for i in 0..count {
                    let port = first_port + i;
                    let c = (|| -> std::io::Result<TcpStream> {
                        let s = socket2::Socket::new(
                            socket2::Domain::for_address(to),
                            socket2::Type::STREAM,
                            None,
                        )?;
                        s.set_reuse_address(true)?;
                        let bind: SocketAddr = if to.is_ipv4() {
                            (std::net::Ipv4Addr::UNSPECIFIED, port).into()
                        } else {
                            (std::net::Ipv6Addr::UNSPECIFIED, port).into()
                        };
                        s.bind(&bind.into())?;
                        s.connect_timeout(&to.into(), TIMEOUT)?;
                        s.set_read_timeout(Some(TIMEOUT))?;
                        Ok(s.into())
                    })();
                    conns.push(c.ok());
                }
            }
            Some("ask") => {}
            other => bail!("unknown flows command {other:?}"),
        }
        let names: Vec<String> = conns.iter_mut().map(ask).collect();
        println!("{}", serde_json::json!({ "names": names }));
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// A WebSocket echo server: each text message comes back as
/// `NAME: message`, on a thread per connection.
fn ws_echo(at: SocketAddr, name: &str) -> Result<()> {
    use tokio_tungstenite::tungstenite::{Message, accept};
    let l = TcpListener::bind(at).with_context(|| format!("binding {at}"))?;
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        let name = name.to_string();
        std::thread::spawn(move || {
            let Ok(mut ws) = accept(s) else { return };
            while let Ok(m) = ws.read() {
                let reply = match m {
                    Message::Text(t) => Message::text(format!("{name}: {t}")),
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// A WebSocket client of `url` (`ws://HOST/PATH`) connected to `to` (a
/// proxy): COUNT messages on one connection, then the echoes.
fn ws(to: SocketAddr, url: &str, count: usize) -> Result<()> {
    use tokio_tungstenite::tungstenite::{Message, client};
    let s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let (mut ws, resp) = client(url, s).context("the WebSocket handshake")?;
    let mut echoes = Vec::new();
    for i in 0..count {
        ws.send(Message::text(format!("m{i}")))?;
        match ws.read()? {
            Message::Text(t) => echoes.push(t.to_string()),
            other => bail!("a {other:?} for a text message"),
        }
    }
    let _ = ws.close(None);
    println!(
        "{}",
        serde_json::json!({"status": resp.status().as_u16(), "echoes": echoes})
    );
    Ok(())
}

/// An HTTP/2 server with prior knowledge (no HTTP/1.1): each request is
/// answered `NAME HTTP/2.0`.
fn serve_h2c(at: SocketAddr, name: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("binding {at}"))?;
        loop {
            let (s, _) = l.accept().await?;
            let name = name.to_string();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let body = format!("{name} {:?}\n", req.version());
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
                            ))
                        }
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = arg(&args, 0, "command")?;
    match cmd {
        "serve-tcp" => serve_tcp(
            addr(arg(&args, 1, "ADDR")?)?,
            arg(&args, 2, "NAME")?,
            match args.get(3) {
                Some(n) => n.parse().context("ACCEPTORS")?,
                None => ACCEPTORS,
            },
        ),
        "serve-udp" => serve_udp(addr(arg(&args, 1, "ADDR")?)?, arg(&args, 2, "NAME")?),
        "tcp" => tcp(
            addr(arg(&args, 1, "ADDR")?)?,
            arg(&args, 2, "COUNT")?.parse()?,
            args.get(3)
                .map(|f| f.parse().context("FROM (an address of this namespace)"))
                .transpose()?,
        ),
        "udp" => udp(
            addr(arg(&args, 1, "ADDR")?)?,
            arg(&args, 2, "COUNT")?.parse()?,
            args.get(3)
                .map(|t| t.parse().context("TOS (0-255)"))
                .transpose()?,
        ),
        "session" => session(addr(arg(&args, 1, "ADDR")?)?),
        "udp-size" => udp_size(
            addr(arg(&args, 1, "ADDR")?)?,
            arg(&args, 2, "SIZE")?.parse()?,
            arg(&args, 3, "DF (0 or 1)")? == "1",
            args.get(4).is_some_and(|b| b == "1"),
        ),
        "udp-follow" => udp_follow(
            addr(arg(&args, 1, "ADDR")?)?,
            arg(&args, 2, "SECONDS")?.parse()?,
        ),
        "load" => {
            let targets = addrs(arg(&args, 1, "ADDR[,ADDR...]")?)?;
            load(
                &targets,
                arg(&args, 2, "CONNS")?.parse()?,
                arg(&args, 3, "THREADS")?.parse()?,
            )
        }
        "load-window" => {
            let targets = addrs(arg(&args, 1, "ADDR[,ADDR...]")?)?;
            load_window(
                &targets,
                arg(&args, 2, "START_NS")?.parse()?,
                arg(&args, 3, "MS")?.parse()?,
                arg(&args, 4, "THREADS")?.parse()?,
            )
        }
        "keepalive" => {
            let targets = addrs(arg(&args, 1, "ADDR[,ADDR...]")?)?;
            keepalive(
                &targets,
                arg(&args, 2, "REQUESTS")?.parse()?,
                arg(&args, 3, "THREADS")?.parse()?,
            )
        }
        "in-cluster" => in_cluster(),
        "ws-echo" => ws_echo(addr(arg(&args, 1, "ADDR")?)?, arg(&args, 2, "NAME")?),
        "ws" => ws(
            addr(arg(&args, 1, "ADDR")?)?,
            arg(&args, 2, "URL")?,
            arg(&args, 3, "COUNT")?.parse()?,
        ),
        "serve-h2c" => serve_h2c(addr(arg(&args, 1, "ADDR")?)?, arg(&args, 2, "NAME")?),
        "flows" => flows(
            arg(&args, 1, "FIRST_PORT")?.parse()?,
            arg(&args, 2, "COUNT")?.parse()?,
        ),
        "mark-ce" => {
            let _link = skiff_tests::ecn::mark_ce_on_egress(arg(&args, 1, "IFACE")?)?;
            println!("ready");
            std::io::stdout().flush()?;
            // Attached while the caller holds our stdin.
            std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
            Ok(())
        }
        other => bail!("unknown command {other:?}"),
    }
}
