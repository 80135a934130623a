//! Leader election on `coordination.k8s.io` Leases, with client-go's
//! semantics, so that of several control-plane replicas one schedules and
//! one runs the controllers (each under a lease of its own:
//! `kube-system/kube-scheduler`, `kube-system/kube-controller-manager`).
//!
//! - A candidate takes a lease that is free (no holder, or released) at
//!   once, and a held one only when it has seen no change to it for the
//!   lease's duration, timed on its own monotonic clock: a leader that
//!   still renews keeps it, whatever the replicas' wall clocks say.
//! - Every write carries the resourceVersion it read, so two candidates
//!   racing for a lease cannot both win.
//! - The leader renews every retry period. When it has not renewed for the
//!   renew deadline (shorter than the lease duration), it stops acting at
//!   once: its work is dropped (and with it every task the work owns)
//!   before another replica can see the lease as expired.
//! - On shutdown the leader releases the lease (empty holder), so that a
//!   successor need not wait out the duration.

use std::future::Future;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// The namespace upstream's components keep their leases in.
pub const NAMESPACE: &str = "kube-system";
/// The scheduler's lease, as upstream's kube-scheduler names it.
pub const SCHEDULER: &str = "kube-scheduler";
/// The controllers' lease, as upstream's kube-controller-manager names it.
pub const CONTROLLERS: &str = "kube-controller-manager";

/// How long a lease lasts and how its holder keeps it (upstream's flags
/// `--leader-elect-lease-duration`, `-renew-deadline`, `-retry-period`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for Timing {
    /// Upstream's defaults: 15 s, 10 s, 2 s.
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingError {
    #[error("--leader-elect-lease-duration must be longer than --leader-elect-renew-deadline")]
    DurationNotAboveDeadline,
    #[error("--leader-elect-renew-deadline must be longer than 1.2 × --leader-elect-retry-period")]
    DeadlineNotAboveRetry,
    #[error("--leader-elect-lease-duration must be whole seconds, at least 1 s")]
    NotWholeSeconds,
}

impl Timing {
    /// Upstream's checks: the holder must be able to retry within its
    /// deadline, and stop before the lease can be taken over.
    pub fn check(&self) -> Result<(), TimingError> {
        if self.lease_duration <= self.renew_deadline {
            return Err(TimingError::DurationNotAboveDeadline);
        }
        if self.renew_deadline.as_secs_f64() <= 1.2 * self.retry_period.as_secs_f64() {
            return Err(TimingError::DeadlineNotAboveRetry);
        }
        if self.lease_duration.subsec_nanos() != 0 || self.lease_duration.as_secs() == 0 {
            return Err(TimingError::NotWholeSeconds);
        }
        Ok(())
    }
}

/// One lease to hold while doing some work.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    /// This replica's name in the lease (upstream: `<hostname>_<uuid>`).
    pub identity: String,
    pub timing: Timing,
}

/// This replica's identity, kept in `dir` (made on first use: the host's
/// name and a random suffix), so that a replica restarted after a crash
/// takes its own leases back at once instead of waiting them out. Each
/// replica has a data directory of its own, hence an identity of its own.
pub fn identity(dir: &std::path::Path) -> std::io::Result<String> {
    let path = dir.join("leader-identity");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "skiff-control".into());
    let suffix = crate::pki::random_hex(8).map_err(std::io::Error::other)?;
    let id = format!("{host}_{suffix}");
    std::fs::write(&path, &id)?;
    Ok(id)
}

/// The lease as this replica last saw it change, and when (its own clock).
struct Observed {
    resource_version: Option<String>,
    duration: Duration,
    at: Instant,
}

/// What one attempt to take or keep the lease found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// Held by this replica now.
    Held,
    /// Held by `holder`, which has renewed within the lease's duration.
    Busy { holder: String },
    /// Someone else wrote the lease between our read and our write.
    Raced,
}

/// Holds `election`'s lease while running `work`, for as long as `stop`
/// is not set: waits for the lease, runs a fresh `work()` while it is
/// held, drops that work the moment the lease cannot be renewed, and
/// waits for the lease again. On `stop` the lease is released.
pub async fn run<F, Fut>(
    client: kube::Client,
    election: Election,
    mut stop: watch::Receiver<bool>,
    work: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, &election.namespace);
    let lease = format!("{}/{}", election.namespace, election.name);
    info!(lease, identity = %election.identity, "waiting for the lease");
    let mut observed = None;
    loop {
        let since = tokio::select! {
            since = acquire(&api, &election, &mut observed) => since,
            _ = stop.wait_for(|s| *s) => return,
        };
        info!(lease, identity = %election.identity, "lease acquired; starting");
        tokio::select! {
            () = work() => warn!(lease, "work ended while leading"),
            () = keep(&api, &election, &mut observed, since) => {
                warn!(lease, identity = %election.identity, "lease lost; stopped, waiting for it again");
                continue;
            }
            _ = stop.wait_for(|s| *s) => {}
        }
        release(&api, &election).await;
        info!(lease, "lease released");
        return;
    }
}

/// Tries until the lease is ours; returns when the winning write was sent.
async fn acquire(
    api: &Api<Lease>,
    election: &Election,
    observed: &mut Option<Observed>,
) -> Instant {
    loop {
        let sent = Instant::now();
        match try_acquire_or_renew(api, election, observed).await {
            Ok(Attempt::Held) => return sent,
            Ok(Attempt::Busy { holder }) => {
                tracing::debug!(lease = %election.name, holder, "lease held elsewhere")
            }
            Ok(Attempt::Raced) => {}
            Err(e) => warn!(lease = %election.name, error = %e, "reading the lease failed"),
        }
        // Upstream jitters the candidates' retries apart.
        tokio::time::sleep(jittered(election.timing.retry_period)).await;
    }
}

/// Renews the lease every retry period; returns when it was not renewed
/// within the renew deadline (or was taken), which is when the work must
/// stop.
async fn keep(
    api: &Api<Lease>,
    election: &Election,
    observed: &mut Option<Observed>,
    mut renewed: Instant,
) {
    let t = election.timing;
    loop {
        let deadline = renewed + t.renew_deadline;
        tokio::time::sleep_until((Instant::now() + t.retry_period).min(deadline)).await;
        let sent = Instant::now();
        if sent >= deadline {
            warn!(lease = %election.name, "not renewed within the renew deadline");
            return;
        }
        match tokio::time::timeout_at(deadline, try_acquire_or_renew(api, election, observed)).await
        {
            Ok(Ok(Attempt::Held)) => renewed = sent,
            Ok(Ok(Attempt::Busy { holder })) => {
                warn!(lease = %election.name, holder, "lease taken by another replica");
                return;
            }
            Ok(Ok(Attempt::Raced)) => {}
            Ok(Err(e)) => warn!(lease = %election.name, error = %e, "renewing the lease failed"),
            Err(_) => {
                warn!(lease = %election.name, "not renewed within the renew deadline");
                return;
            }
        }
    }
}

/// One read and (unless another holder's lease is live) one write.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    election: &Election,
    observed: &mut Option<Observed>,
) -> Result<Attempt, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let me = election.identity.as_str();
    let ours = |transitions: i32, acquired: MicroTime| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(election.timing.lease_duration.as_secs() as i32),
        acquire_time: Some(acquired),
        renew_time: Some(now.clone()),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(current) = api.get_opt(&election.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(election.name.clone()),
                namespace: Some(election.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(ours(0, now.clone())),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(written) => {
                *observed = Some(observation(&written));
                Ok(Attempt::Held)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Raced),
            Err(e) => Err(e),
        };
    };
    let spec = current.spec.clone().unwrap_or_default();
    if observed.as_ref().map(|o| &o.resource_version) != Some(&current.metadata.resource_version) {
        *observed = Some(observation(&current));
    }
    let holder = spec.holder_identity.as_deref();
    if let (Some(holder), Some(seen)) = (holder, observed.as_ref())
        && !may_take(holder, me, seen, Instant::now())
    {
        return Ok(Attempt::Busy {
            holder: holder.to_string(),
        });
    }
    let transitions = spec.lease_transitions.unwrap_or(0);
    let next = if holder == Some(me) {
        ours(
            transitions,
            spec.acquire_time.clone().unwrap_or(now.clone()),
        )
    } else {
        ours(transitions + 1, now.clone())
    };
    let mut lease = current;
    lease.spec = Some(next);
    match api
        .replace(&election.name, &PostParams::default(), &lease)
        .await
    {
        Ok(written) => {
            *observed = Some(observation(&written));
            Ok(Attempt::Held)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Raced),
        Err(e) => Err(e),
    }
}

/// Gives the lease up: no holder, so a candidate takes it at once.
async fn release(api: &Api<Lease>, election: &Election) {
    let Ok(Some(mut lease)) = api.get_opt(&election.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(election.identity.as_str()) {
        return;
    }
    let now = MicroTime(Timestamp::now());
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.acquire_time = Some(now.clone());
    spec.renew_time = Some(now);
    if let Err(e) = api
        .replace(&election.name, &PostParams::default(), &lease)
        .await
    {
        warn!(lease = %election.name, error = %e, "releasing the lease failed");
    }
}

fn observation(lease: &Lease) -> Observed {
    let spec = lease.spec.as_ref();
    Observed {
        resource_version: lease.metadata.resource_version.clone(),
        duration: Duration::from_secs(
            spec.and_then(|s| s.lease_duration_seconds)
                .unwrap_or(0)
                .max(0) as u64,
        ),
        at: Instant::now(),
    }
}

/// Whether this replica may write a lease `holder` holds, as it was `seen`:
/// it is free (released), ours, or nothing changed in it for its whole
/// duration, on this replica's clock.
fn may_take(holder: &str, me: &str, seen: &Observed, now: Instant) -> bool {
    holder.is_empty() || holder == me || seen.at + seen.duration <= now
}

/// `period` stretched by up to 20 %, from the clock's low bits.
fn jittered(period: Duration) -> Duration {
    let nanos = Timestamp::now().subsec_nanosecond().unsigned_abs();
    period + period.mul_f64(f64::from(nanos % 1000) / 5000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn seen(secs: u64, at: Instant) -> Observed {
        Observed {
            resource_version: Some("1".into()),
            duration: Duration::from_secs(secs),
            at,
        }
    }

    #[test]
    fn a_lease_expires_only_after_its_duration_without_change_or_when_free() {
        let t0 = Instant::now();
        let held = seen(15, t0);
        assert!(!may_take("a", "b", &held, t0 + Duration::from_secs(14)));
        assert!(may_take("a", "b", &held, t0 + Duration::from_secs(15)));
        assert!(may_take("", "b", &held, t0), "released");
        assert!(may_take("b", "b", &held, t0), "our own");
    }

    #[test]
    fn timing_is_checked_as_upstream_does() {
        assert_eq!(Timing::default().check(), Ok(()));
        let t = |d, r, p| Timing {
            lease_duration: Duration::from_secs(d),
            renew_deadline: Duration::from_secs(r),
            retry_period: Duration::from_secs(p),
        };
        assert_eq!(
            t(10, 10, 2).check(),
            Err(TimingError::DurationNotAboveDeadline)
        );
        assert_eq!(t(15, 2, 2).check(), Err(TimingError::DeadlineNotAboveRetry));
        let odd = Timing {
            lease_duration: Duration::from_millis(15_500),
            ..Timing::default()
        };
        assert_eq!(odd.check(), Err(TimingError::NotWholeSeconds));
    }

    #[test]
    fn the_identity_is_made_once_per_data_directory() {
        let (a, b) = (TempDir::new("skiff-leader"), TempDir::new("skiff-leader"));
        let first = identity(&a.0).expect("made");
        assert_eq!(identity(&a.0).expect("read"), first, "kept across restarts");
        assert_ne!(identity(&b.0).expect("made"), first, "one per replica");
        assert!(first.contains('_'), "{first}");
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..100 {
            let j = jittered(Duration::from_secs(2));
            assert!(
                j >= Duration::from_secs(2) && j <= Duration::from_millis(2400),
                "{j:?}"
            );
        }
    }
}
