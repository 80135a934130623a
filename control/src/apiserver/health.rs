//! `/healthz`, `/livez` and `/readyz` as upstream's apiserver answers
//! them: named checks, each also at `/<probe>/<check>`; `?verbose` lists
//! them; `?exclude=<check>` leaves one out; a failure answers 500 with
//! the list. Checks: `ping` (the server answers), `etcd` (a read answered
//! within 2 s), and for readiness `shutdown` (failing from SIGTERM on, so
//! load balancers stop sending before the process goes).

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Response, StatusCode};

use super::{Api, Body, full};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Check {
    Ping,
    Etcd,
    Shutdown,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::Ping => "ping",
            Check::Etcd => "etcd",
            Check::Shutdown => "shutdown",
        }
    }
}

/// The checks of `probe` (`healthz`, `livez` or `readyz`).
fn checks(probe: &str) -> &'static [Check] {
    match probe {
        "readyz" => &[Check::Ping, Check::Etcd, Check::Shutdown],
        _ => &[Check::Ping, Check::Etcd],
    }
}

/// The answer for `results` of `probe`, as upstream words it.
fn answer(probe: &str, results: &[(Check, Result<(), String>)], verbose: bool) -> Response<Body> {
    let failed = results.iter().any(|(_, r)| r.is_err());
    if !failed && !verbose {
        return full(StatusCode::OK, "text/plain; charset=utf-8", "ok");
    }
    let mut text = String::new();
    for (c, r) in results {
        match r {
            Ok(()) => text.push_str(&format!("[+]{} ok\n", c.name())),
            // Upstream withholds the reason from the caller; it goes to
            // the log instead.
            Err(_) => text.push_str(&format!("[-]{} failed: reason withheld\n", c.name())),
        }
    }
    if failed {
        text.push_str(&format!("{probe} check failed\n"));
        full(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            text,
        )
    } else {
        text.push_str(&format!("{probe} check passed\n"));
        full(StatusCode::OK, "text/plain; charset=utf-8", text)
    }
}

impl Api {
    /// From now on `/readyz` fails its `shutdown` check.
    pub fn shutting_down(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    async fn run_check(&self, c: Check) -> Result<(), String> {
        match c {
            Check::Ping => Ok(()),
            Check::Etcd => {
                match tokio::time::timeout(Duration::from_secs(2), self.store.ping()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no answer within 2s".into()),
                }
            }
            Check::Shutdown => {
                if self.stopping.load(Ordering::Relaxed) {
                    Err("process is shutting down".into())
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Answers `/<probe>[/<check>]` (`rest` is the path after the probe).
    pub(super) async fn health(
        &self,
        probe: &str,
        rest: &[&str],
        query: Option<&str>,
    ) -> Response<Body> {
        let all = checks(probe);
        let params: Vec<(&str, &str)> = query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        let verbose = params.iter().any(|(k, _)| *k == "verbose");
        let chosen: Vec<Check> = match rest {
            [] => all
                .iter()
                .copied()
                .filter(|c| {
                    !params
                        .iter()
                        .any(|(k, v)| *k == "exclude" && *v == c.name())
                })
                .collect(),
            [one] => match all.iter().find(|c| c.name() == *one) {
                Some(c) => vec![*c],
                None => {
                    return full(
                        StatusCode::NOT_FOUND,
                        "text/plain; charset=utf-8",
                        "404 page not found\n",
                    );
                }
            },
            _ => {
                return full(
                    StatusCode::NOT_FOUND,
                    "text/plain; charset=utf-8",
                    "404 page not found\n",
                );
            }
        };
        let mut results = Vec::with_capacity(chosen.len());
        for c in chosen {
            let r = self.run_check(c).await;
            if let Err(e) = &r {
                tracing::warn!(probe, check = c.name(), error = %e, "health check failed");
            }
            results.push((c, r));
        }
        if let ([_], [(c, r)]) = (rest, results.as_slice()) {
            // One check asked for by name: its own answer.
            return match r {
                Ok(()) => full(StatusCode::OK, "text/plain; charset=utf-8", "ok"),
                Err(_) => full(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    format!(
                        "internal server error: {} failed: reason withheld\n",
                        c.name()
                    ),
                ),
            };
        }
        answer(probe, &results, verbose)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    async fn text(r: Response<Body>) -> (u16, String) {
        let code = r.status().as_u16();
        let body = r
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn lists_checks_as_upstream_does() {
        let ok = [(Check::Ping, Ok(())), (Check::Etcd, Ok(()))];
        assert_eq!(text(answer("livez", &ok, false)).await, (200, "ok".into()));
        assert_eq!(
            text(answer("livez", &ok, true)).await,
            (200, "[+]ping ok\n[+]etcd ok\nlivez check passed\n".into())
        );
        let bad = [
            (Check::Ping, Ok(())),
            (Check::Etcd, Ok(())),
            (Check::Shutdown, Err("stopping".into())),
        ];
        assert_eq!(
            text(answer("readyz", &bad, false)).await,
            (
                500,
                "[+]ping ok\n[+]etcd ok\n[-]shutdown failed: reason withheld\nreadyz check failed\n".into()
            )
        );
        assert_eq!(checks("readyz").len(), 3);
        assert!(!checks("livez").contains(&Check::Shutdown));
    }
}
