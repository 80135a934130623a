//! A real browser for the dashboard's tests and benchmark: Debian's
//! headless Chromium, driven over WebDriver (chromedriver, with the
//! `fantoccini` client).
//!
//! chromedriver listens on the host's loopback; Chromium itself runs in
//! the test's network namespace (started through `nsenter`, talking to
//! chromedriver over a pipe rather than a debugging port), so the pages it
//! loads and anything it would fetch on its own stay inside that
//! namespace.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use serde_json::{Value, json};

use crate::control::free_port;
use crate::{Netns, Proc, Spawn, TempDir};

/// One browser session; the browser and its driver end on drop.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    _driver: Proc,
    _profile: TempDir,
    /// Where screenshots go (`target/ui/<test>/`).
    shots: PathBuf,
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
    /// Starts Chromium in `ns`, its screenshots saved under
    /// `target/ui/<name>/`.
    pub fn start_in(ns: &Netns, name: &str) -> Self {
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
            _driver: driver,
            _profile: profile,
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
    }
}
