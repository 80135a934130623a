//! Durations as the command line gives them: whole hours, minutes and
//! seconds (`24h`, `2h30m`, `90s`), as `--ttl` and the leader-election
//! flags take them.

use std::time::Duration;

/// `s` as a duration; None when it is not one, or is zero.
pub fn parse(s: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    (num.is_empty() && total > 0).then(|| Duration::from_secs(total))
}
