//! The one shape every role of the node agent has, and the supervisor that
//! runs them side by side.
//!
//! A role is its config (the struct implementing [`Role`]), its error
//! type, and `run(ctx, shutdown)`. The node builds the shared things once
//! (the apiserver client, the node's name) into a [`NodeContext`] and owns
//! the one [`Shutdown`] signal. [`supervise`] runs a role as a task of its
//! own on the multi-threaded runtime and restarts it with back-off when it
//! fails or panics, so one role's failure never stops the others. Roles
//! keep their blocking kernel work off the runtime's workers
//! (`block_in_place`, `spawn_blocking`), so it cannot stall another role.
//!
//! Roles never import each other; they meet through the API, the kernel
//! and files with a contract (`subnet.env`, the CNI conflist).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

/// Turns true once, when the node stops.
pub type Shutdown = tokio::sync::watch::Receiver<bool>;

/// Waits until `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut Shutdown) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// What the node builds once and hands every role.
#[derive(Clone)]
pub struct NodeContext {
    /// This node's name (the Node object's, `spec.nodeName` of its pods).
    pub node_name: String,
    /// The apiserver client, if the node was given one.
    pub client: Option<kube::Client>,
    /// The process's metrics, which every role records into.
    pub telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
}

#[derive(Debug, thiserror::Error)]
#[error("role {role} needs an apiserver: pass --kubeconfig or run where one is found")]
pub struct NoClient {
    pub role: &'static str,
}

impl NodeContext {
    pub fn client(&self, role: &'static str) -> Result<kube::Client, NoClient> {
        self.client.clone().ok_or(NoClient { role })
    }
}

/// A role of the node agent.
pub trait Role: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    fn name(&self) -> &'static str;

    /// Runs until `shutdown` turns true (then returns `Ok`) or fails.
    fn run(
        &self,
        ctx: NodeContext,
        shutdown: Shutdown,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Back-off between restarts of a failed role.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    /// A run at least this long resets the delay to `first`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(120),
        }
    }
}

impl Backoff {
    /// The delay after a run of `ran` that followed a delay of `last`.
    pub fn next(&self, last: Option<Duration>, ran: Duration) -> Duration {
        match last {
            Some(d) if ran < self.reset_after => (d * 2).min(self.max),
            _ => self.first,
        }
    }
}

/// Runs `role` until shutdown, restarting it with back-off whenever it
/// fails, panics or returns early.
pub async fn supervise<R: Role>(
    role: Arc<R>,
    ctx: NodeContext,
    mut shutdown: Shutdown,
    backoff: Backoff,
) {
    let name = role.name();
    let mut delay = None;
    loop {
        let started = Instant::now();
        let run = {
            let (role, ctx, sd) = (role.clone(), ctx.clone(), shutdown.clone());
            tokio::spawn(async move { role.run(ctx, sd).await })
        };
        let outcome = run.await;
        if *shutdown.borrow() {
            if let Ok(Err(e)) = &outcome {
                warn!(role = name, error = %e, "role failed while stopping");
            }
            info!(role = name, "role stopped");
            return;
        }
        match outcome {
            Ok(Ok(())) => warn!(role = name, "role returned before shutdown"),
            Ok(Err(e)) => error!(role = name, error = %e, "role failed"),
            Err(e) if e.is_panic() => error!(role = name, "role panicked"),
            Err(e) => error!(role = name, error = %e, "role task ended"),
        }
        let d = backoff.next(delay, started.elapsed());
        delay = Some(d);
        warn!(
            role = name,
            delay_ms = d.as_millis() as u64,
            "restarting role"
        );
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// Aborts its task when dropped: a role's helper tasks end with it.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_long_run() {
        let b = Backoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(5),
            reset_after: Duration::from_secs(10),
        };
        let short = Duration::from_millis(10);
        let mut d = b.next(None, short);
        let mut seen = vec![d.as_secs()];
        for _ in 0..4 {
            d = b.next(Some(d), short);
            seen.push(d.as_secs());
        }
        assert_eq!(seen, vec![1, 2, 4, 5, 5]);
        assert_eq!(b.next(Some(d), Duration::from_secs(11)).as_secs(), 1);
    }

    /// Fails twice, panics once, then runs until shutdown.
    struct Flaky {
        runs: AtomicU32,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("flaky")]
    struct FlakyError;

    impl Role for Flaky {
        type Error = FlakyError;
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn run(&self, _ctx: NodeContext, mut shutdown: Shutdown) -> Result<(), FlakyError> {
            match self.runs.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(FlakyError),
                2 => panic!("a bug"),
                _ => {
                    stopped(&mut shutdown).await;
                    Ok(())
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_role_is_restarted_and_stops_on_shutdown() {
        let role = Arc::new(Flaky {
            runs: AtomicU32::new(0),
        });
        let (tx, rx) = tokio::sync::watch::channel(false);
        let ctx = NodeContext {
            node_name: "n".into(),
            client: None,
            telemetry: Arc::default(),
        };
        let backoff = Backoff {
            first: Duration::from_millis(5),
            max: Duration::from_millis(20),
            reset_after: Duration::from_secs(60),
        };
        let task = tokio::spawn(supervise(role.clone(), ctx, rx, backoff));
        let deadline = Instant::now() + Duration::from_secs(5);
        while role.runs.load(Ordering::SeqCst) < 4 {
            assert!(Instant::now() < deadline, "the role was not restarted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = tx.send(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the supervisor stops on shutdown")
            .expect("supervisor task");
        assert_eq!(role.runs.load(Ordering::SeqCst), 4);
    }
}
