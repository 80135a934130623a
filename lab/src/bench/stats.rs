//! Percentiles and summaries shared by the benchmarks.

use serde_json::{Value, json};

/// The `i`th of a fixed sequence of picks among `n` (n > 0), spread as
/// random ones (SplitMix64's output function of `i`): the same sequence
/// every run.
pub fn pick(i: usize, n: usize) -> usize {
    let mut z = (i as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 32) % n.max(1) as u64) as usize
}

/// The finite ones of `values`, ascending (what `pct` and `median_ci`
/// take).
pub fn sorted_finite(values: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The `p` quantile (0..=1) of an ascending slice; 0 when empty.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// An approximate 95 % confidence interval of the median of an ascending
/// slice, from its order statistics (the sign test's binomial, by its
/// normal approximation): where the true median lies, whatever the
/// distribution. Under about 6 values it is the whole range.
pub fn median_ci(sorted: &[f64]) -> (f64, f64) {
    let n = sorted.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let half = 0.98 * (n as f64).sqrt();
    let lo = ((n as f64 / 2.0) - half).floor().max(0.0) as usize;
    let hi = ((n as f64 / 2.0) + half).ceil() as usize;
    (sorted[lo.min(n - 1)], sorted[hi.min(n - 1)])
}

/// `{p50, p99, min, max, n}` of the values.
pub fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"p50": pct(&v, 0.5), "p99": pct(&v, 0.99), "min": v.first(), "max": v.last(), "n": v.len()})
}

/// The machine's CPU time counters (the `cpu` line of /proc/stat, in
/// clock ticks): user, nice, system, idle, iowait, irq, softirq, steal...
pub fn cpu_ticks() -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    Some(
        stat.lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect(),
    )
}

/// Seconds the machine's CPUs spent busy (user, nice, system, irq and
/// softirq: not idle, iowait or steal): what a load cost in CPU, whoever
/// ran it (client, server, softirq, kernel workers), and less moved than a
/// rate by a neighbour taking the host's cores.
pub fn busy_seconds() -> Option<f64> {
    let v = cpu_ticks()?;
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    Some(busy as f64 / clock_ticks())
}

/// utime + stime of process `pid` (all its threads), in seconds; 0 when
/// it cannot be read.
pub fn process_cpu_seconds(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .map_or(0.0, |t| t as f64 / clock_ticks())
}

/// utime + stime from a `/proc/<pid>/stat` line, in clock ticks.
fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the command (which may hold spaces and parentheses).
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: u64 = rest.get(11)?.parse().ok()?;
    let system: u64 = rest.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Clock ticks per second, the unit of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// A program's cost over one load: how often it ran and its mean run time.
pub struct BpfCost {
    pub program: &'static str,
    pub runs: u64,
    pub ns_per_run: f64,
}

/// Runs `load` with `kernel.bpf_stats_enabled` on (restored after) and
/// returns its result with the cost of each program that ran meanwhile;
/// `stats` reads (program, total run time, run count) as the agent reports
/// them.
pub fn bpf_cost<T>(
    stats: impl Fn() -> Vec<(&'static str, std::time::Duration, u64)>,
    load: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Vec<BpfCost>)> {
    use anyhow::Context as _;
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS).unwrap_or_else(|_| "0".into());
    std::fs::write(STATS, "1").with_context(|| format!("enable {STATS}"))?;
    let before = stats();
    let result = load();
    let after = stats();
    let _ = std::fs::write(STATS, was.trim());
    let result = result?;
    let costs = after
        .into_iter()
        .filter_map(|(program, t1, c1)| {
            let (t0, c0) = before
                .iter()
                .find(|(b, _, _)| *b == program)
                .map_or((std::time::Duration::ZERO, 0), |(_, t, c)| (*t, *c));
            let runs = c1.saturating_sub(c0);
            (runs > 0).then(|| BpfCost {
                program,
                runs,
                ns_per_run: t1.saturating_sub(t0).as_nanos() as f64 / runs as f64,
            })
        })
        .collect();
    Ok((result, costs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_narrows_with_more_values_and_stays_inside_them() {
        let few: Vec<f64> = (1..=5).map(f64::from).collect();
        assert_eq!(median_ci(&few), (1.0, 5.0));
        let many: Vec<f64> = (1..=100).map(f64::from).collect();
        // 50 ± 9.8: the 40th and 60th values (counting from 1).
        assert_eq!(median_ci(&many), (41.0, 61.0));
        assert!(median_ci(&[]).0.is_nan());
    }

    #[test]
    fn cpu_time_is_read_past_a_command_that_holds_spaces_and_parentheses() {
        let line = "4242 (nginx: worker (x)) S 4240 4240 4240 0 -1 4194624 \
                    900 0 0 0 176 766 0 0 20 0 1 0 123 45678 901 18446744073709551615";
        assert_eq!(stat_ticks(line), Some(176 + 766));
        assert_eq!(stat_ticks("4242 (short) S 1"), None);
    }
}
