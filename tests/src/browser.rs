//! A real browser for the dashboard's tests and benchmark: Debian's
//! headless Chromium, driven over WebDriver (chromedriver, with the
//! `fantoccini` client).
//!
//! chromedriver listens on the host's loopback. Chromium itself runs in a
//! network namespace of its own holding only a loopback (started through
//! `nsenter`, talking to chromedriver over a pipe rather than a debugging
//! port), so anything it would fetch on its own goes nowhere. One port on
//! that loopback is relayed by this process to the server under test in
//! the test's namespace. Chromium drops every connection when the
//! addresses of its namespace change ("A network change was detected"),
//! which a node's namespace does at each pod start; its own stays still.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use serde_json::{Value, json};

use crate::control::free_port;
use crate::{Netns, Proc, Spawn, TempDir};

/// One browser session; the browser, its driver and the relay end on
/// drop (in that order; the namespace last).
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Proc,
    relay: TcpListener,
    /// `https://127.0.0.1:<port>`: the server under test, as the browser
    /// reaches it.
    pub base: String,
    _profile: TempDir,
    _ns: Netns,
    /// Where screenshots go (`target/ui/<test>/`).
    shots: PathBuf,
}

/// Runs `f` on a thread inside the network namespace at `path`: the
/// sockets it makes stay in that namespace.
fn in_netns<T: Send>(
    path: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(path)?;
            // SAFETY: setns on a descriptor this thread owns; it moves only
            // this thread, which ends with the scope.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
    })
}

/// Relays each connection accepted on `listener` to `target` in the
/// namespace at `ns_path`, until the listener is shut down.
fn relay(listener: TcpListener, ns_path: String, target: SocketAddr) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(down) = conn else { return };
            let Ok(up) = in_netns(&ns_path, || TcpStream::connect(target)) else {
                continue;
            };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let (Ok(mut down2), Ok(mut up2)) = (down.try_clone(), up.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || {
                let mut down = down;
                let mut up = up;
                let _ = std::io::copy(&mut down, &mut up);
                let _ = up.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up2, &mut down2);
                let _ = down2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// The workspace's `target/ui/<name>/`, emptied.
fn screenshot_dir(name: &str) -> PathBuf {
    let target = crate::bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("ui").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

impl Browser {
    /// Starts Chromium with `target` (an HTTPS server in `server_ns`) at
    /// [`Browser::base`]; its screenshots are saved under
    /// `target/ui/<name>/`.
    pub fn start(server_ns: &Netns, target: SocketAddr, name: &str) -> Self {
        let ns = Netns::new();
        let listener = in_netns(&ns.path(), || TcpListener::bind("127.0.0.1:0"))
            .unwrap_or_else(|e| panic!("relay listener: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("relay address: {e}"))
            .port();
        let base = format!("https://127.0.0.1:{port}");
        let relay_handle = listener
            .try_clone()
            .unwrap_or_else(|e| panic!("relay listener: {e}"));
        relay(listener, server_ns.path(), target);
        let profile = TempDir::new();
        let wrapper = profile.path.join("chromium-in-netns");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec nsenter --net={} -- /usr/bin/chromium \"$@\"\n",
                ns.path()
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", wrapper.display()));
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap_or_else(|e| panic!("chmod {}: {e}", wrapper.display()));
        let port = free_port();
        let driver = Spawn::new("chromedriver")
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .die_with_parent()
            .log_to(&profile.path.join("chromedriver.log"))
            .start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
        let caps = json!({
            // The apiserver's certificate is the cluster's own.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": wrapper.display().to_string(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--remote-debugging-pipe",
                    "--window-size=1400,1000", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-default-apps", "--no-pings",
                    "--disable-extensions", "--disable-domain-reliability",
                    // A headless page counts as hidden: keep its timers and
                    // stream callbacks at full speed, as for a page in view.
                    "--disable-background-timer-throttling",
                    "--disable-renderer-backgrounding",
                    "--disable-backgrounding-occluded-windows",
                    format!("--user-data-dir={}", profile.path.join("profile").display()),
                ],
            },
        });
        let caps: fantoccini::wd::Capabilities = match caps {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match rt.block_on(
                ClientBuilder::new(connector)
                    .capabilities(caps.clone())
                    .connect(&url),
            ) {
                Ok(c) => break c,
                // chromedriver takes a moment to listen.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => panic!(
                    "starting Chromium through chromedriver: {e}\n--- chromedriver ---\n{}",
                    std::fs::read_to_string(profile.path.join("chromedriver.log"))
                        .unwrap_or_default()
                ),
            }
        };
        Self {
            rt,
            client: Some(client),
            driver,
            relay: relay_handle,
            base,
            _profile: profile,
            _ns: ns,
            shots: screenshot_dir(name),
        }
    }

    fn c(&self) -> &Client {
        self.client
            .as_ref()
            .unwrap_or_else(|| unreachable!("closed only on drop"))
    }

    /// Loads `url`.
    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.c().goto(url))
            .unwrap_or_else(|e| panic!("load {url}: {e}"));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt
            .block_on(self.c().execute(script, args))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// The element `css` names, waiting up to 20 s for it.
    pub fn find(&self, css: &str) -> Element {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.rt.block_on(self.c().find(Locator::Css(css))) {
                Ok(e) => return e,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => {
                    self.screenshot("missing");
                    panic!("no element {css}: {e}\n--- page ---\n{}", self.page_text());
                }
            }
        }
    }

    /// Clicks what `css` names, as a user would.
    pub fn click(&self, css: &str) {
        let el = self.find(css);
        self.rt
            .block_on(el.click())
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Replaces the value of the field `css` names by typing `text`.
    pub fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.rt
            .block_on(async {
                el.clear().await?;
                el.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// The visible text of what `css` names ("" when it is not there).
    pub fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            vec![json!(css)],
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// The whole page's visible text.
    pub fn page_text(&self) -> String {
        self.text("body")
    }

    /// How many elements `css` matches.
    pub fn count(&self, css: &str) -> usize {
        self.js(
            "return document.querySelectorAll(arguments[0]).length;",
            vec![json!(css)],
        )
        .as_u64()
        .unwrap_or(0) as usize
    }

    /// Waits up to `timeout` for `f` to give a value, taking a screenshot
    /// named `what` and failing with the page's text if it does not.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() >= deadline {
                let shot = self.screenshot(&format!("timeout-{}", what.replace(' ', "-")));
                panic!(
                    "timed out waiting for {what} (screenshot {})\n--- page ---\n{}",
                    shot.display(),
                    self.page_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the text of `css` contains `needle`; returns that text.
    pub fn wait_text(&self, css: &str, needle: &str, timeout: Duration) -> String {
        self.wait(&format!("{needle:?} in {css}"), timeout, |b| {
            let t = b.text(css);
            t.contains(needle).then_some(t)
        })
    }

    /// Logs in to the dashboard shown with `token`, as a user would;
    /// the name the page then shows for the user.
    pub fn log_in(&self, token: &str) -> String {
        self.type_into("#token", token.trim());
        self.click("#login-button");
        self.wait("the user's name", Duration::from_secs(10), |b| {
            let t = b.text("#user");
            (!t.is_empty()).then_some(t)
        })
    }

    /// Saves a PNG of the page as `<n>-<name>.png` under the test's
    /// screenshot directory and returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let n = std::fs::read_dir(&self.shots)
            .map(|d| d.count())
            .unwrap_or(0);
        let path = self.shots.join(format!("{n:02}-{name}.png"));
        match self.rt.block_on(self.c().screenshot()) {
            Ok(png) => {
                if let Err(e) = std::fs::write(&path, png) {
                    eprintln!("saving {}: {e}", path.display());
                }
            }
            Err(e) => eprintln!("screenshot {name}: {e}"),
        }
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
        self.driver.kill_now();
        // Wakes the relay's accept with an error, which ends its thread.
        // SAFETY: shutdown on a socket this struct owns.
        unsafe { libc::shutdown(self.relay.as_raw_fd(), libc::SHUT_RDWR) };
    }
}
