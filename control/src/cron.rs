//! CronJob schedules: the standard five-field cron syntax Kubernetes
//! accepts (minute, hour, day of month, month, day of week; `*`, `?`,
//! lists, ranges, steps, month and weekday names) and the `@yearly`,
//! `@monthly`, `@weekly`, `@daily`, `@midnight` and `@hourly`
//! descriptors, evaluated in a time zone.
//!
//! As upstream's parser does, a day matches when both day fields match if
//! either of them is a bare `*` or `?`, and when either matches otherwise
//! (`0 0 1,15 * MON` runs on the 1st, the 15th and every Monday).

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A parsed schedule: one bit per allowed value of each field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    minute: u64,
    hour: u64,
    dom: u64,
    month: u64,
    dow: u64,
    /// The day fields were a bare `*` or `?`.
    dom_any: bool,
    dow_any: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One field's bits, and whether it was a bare `*` or `?`.
fn field(text: &str, min: u32, max: u32, names: &[&str]) -> Result<(u64, bool), String> {
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            return Ok(min + i as u32);
        }
        s.parse::<u32>()
            .map_err(|_| format!("failed to parse int from {s}"))
    };
    let mut bits = 0u64;
    let mut any = false;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("failed to parse int from {s}"))?;
                if step == 0 {
                    return Err(format!("step of range should be a positive number: {part}"));
                }
                (r, Some(step))
            }
            None => (part, None),
        };
        let (lo, hi) = if range == "*" || range == "?" {
            if step.is_none_or(|s| s == 1) {
                any = true;
            }
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `N/step` runs from N to the field's end.
            (v, if step.is_some() { max } else { v })
        };
        if lo < min {
            return Err(format!(
                "beginning of range ({lo}) below minimum ({min}): {part}"
            ));
        }
        if hi > max {
            return Err(format!("end of range ({hi}) above maximum ({max}): {part}"));
        }
        if lo > hi {
            return Err(format!(
                "beginning of range ({lo}) beyond end of range ({hi}): {part}"
            ));
        }
        let step = step.unwrap_or(1) as usize;
        for v in (lo..=hi).step_by(step) {
            bits |= 1 << v;
        }
    }
    Ok((bits, any))
}

impl Schedule {
    /// Parses `text` as Kubernetes does; the error is the parser's
    /// message.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let expanded = match text {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            d if d.starts_with('@') => return Err(format!("unrecognized descriptor: {d}")),
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "expected exactly 5 fields, found {}: {text}",
                fields.len()
            ));
        }
        let (minute, _) = field(fields[0], 0, 59, &[])?;
        let (hour, _) = field(fields[1], 0, 23, &[])?;
        let (dom, dom_any) = field(fields[2], 1, 31, &[])?;
        let (month, _) = field(fields[3], 1, 12, &MONTHS)?;
        let (dow, dow_any) = field(fields[4], 0, 6, &DAYS)?;
        Ok(Self {
            minute,
            hour,
            dom,
            month,
            dow,
            dom_any,
            dow_any,
        })
    }

    fn day_matches(&self, d: Date) -> bool {
        if self.month & (1 << d.month()) == 0 {
            return false;
        }
        let dom = self.dom & (1 << d.day()) != 0;
        let dow = self.dow & (1 << d.weekday().to_sunday_zero_offset()) != 0;
        if self.dom_any || self.dow_any {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first scheduled time strictly after `after`, in `tz`; none
    /// within five years (a schedule such as `0 0 30 2 *`).
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let start = after.to_zoned(tz.clone()).datetime();
        let mut day = start.date();
        for _ in 0..(366 * 5) {
            if self.day_matches(day) {
                for h in (0..24).filter(|h| self.hour & (1 << h) != 0) {
                    for m in (0..60).filter(|m| self.minute & (1 << m) != 0) {
                        let at = DateTime::from_parts(day, jiff::civil::time(h, m, 0, 0));
                        if at <= start {
                            continue;
                        }
                        let Ok(z) = at.to_zoned(tz.clone()) else {
                            continue;
                        };
                        let ts = z.timestamp();
                        if ts > after {
                            return Some(ts);
                        }
                    }
                }
            }
            day = day.checked_add(1.day()).ok()?;
        }
        None
    }

    /// The latest scheduled time in `(since, now]`, and how many there
    /// were, counted up to `limit`.
    pub fn latest_between(
        &self,
        since: Timestamp,
        now: Timestamp,
        tz: &TimeZone,
        limit: usize,
    ) -> (Option<Timestamp>, usize) {
        let walk = |from: Timestamp, cap: usize| {
            let (mut latest, mut count, mut t) = (None, 0, from);
            while count < cap
                && let Some(next) = self.next_after(t, tz)
                && next <= now
            {
                latest = Some(next);
                count += 1;
                t = next;
            }
            (latest, count)
        };
        let (latest, count) = walk(since, limit);
        if count < limit {
            return (latest, count);
        }
        // Too many to walk: the newest lies in the shortest window before
        // now that holds one.
        for hours in [1, 24, 24 * 32, 24 * 366, 24 * 366 * 5] {
            let from = now
                .checked_sub(jiff::SignedDuration::from_hours(hours))
                .unwrap_or(since)
                .max(since);
            if let (Some(newest), _) = walk(from, usize::MAX) {
                return (Some(newest), count);
            }
        }
        (latest, count)
    }
}

/// The time zone a CronJob names, or the control plane's own.
pub fn zone(name: Option<&str>) -> Result<TimeZone, String> {
    match name {
        None | Some("") => Ok(TimeZone::try_system().unwrap_or(TimeZone::UTC)),
        Some(n) => TimeZone::get(n).map_err(|_| format!("unknown time zone {n}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn fields_ranges_steps_and_names() {
        let s = Schedule::parse("*/15 9-17 * JAN-mar mon-FRI").expect("parses");
        let utc = TimeZone::UTC;
        // Friday 2027-01-01 17:50 → the next is Monday 09:00.
        assert_eq!(
            s.next_after(at("2027-01-01T17:50:00Z"), &utc),
            Some(at("2027-01-04T09:00:00Z"))
        );
        assert_eq!(
            s.next_after(at("2027-01-04T09:00:00Z"), &utc),
            Some(at("2027-01-04T09:15:00Z"))
        );
        for bad in [
            "* * *",
            "60 * * * *",
            "* * 0 * *",
            "5-1 * * * *",
            "*/0 * * * *",
            "@every 1m",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Schedule::parse("@hourly"), Schedule::parse("0 * * * *"));
    }

    #[test]
    fn restricted_day_fields_are_either_or() {
        // The 13th or any Friday.
        let s = Schedule::parse("0 0 13 * 5").expect("parses");
        let utc = TimeZone::UTC;
        assert_eq!(
            s.next_after(at("2027-01-01T00:00:00Z"), &utc),
            Some(at("2027-01-08T00:00:00Z"))
        );
        assert_eq!(
            s.next_after(at("2027-01-08T00:00:00Z"), &utc),
            Some(at("2027-01-13T00:00:00Z"))
        );
        // A star on one side makes it both.
        let s = Schedule::parse("0 0 * * 5").expect("parses");
        assert_eq!(
            s.next_after(at("2027-01-08T00:00:00Z"), &utc),
            Some(at("2027-01-15T00:00:00Z"))
        );
        assert_eq!(
            Schedule::parse("0 0 30 2 *")
                .expect("parses")
                .next_after(at("2027-01-01T00:00:00Z"), &utc),
            None
        );
    }

    #[test]
    fn time_zones_and_missed_runs() {
        let tz = zone(Some("Europe/Berlin")).expect("tzdata");
        let s = Schedule::parse("30 2 * * *").expect("parses");
        // 02:30 Berlin in winter is 01:30 UTC.
        assert_eq!(
            s.next_after(at("2027-01-10T00:00:00Z"), &tz),
            Some(at("2027-01-10T01:30:00Z"))
        );
        assert!(zone(Some("Mars/Olympus")).is_err());
        let every = Schedule::parse("* * * * *").expect("parses");
        let (latest, n) = every.latest_between(
            at("2027-01-01T00:00:00Z"),
            at("2027-01-01T00:10:30Z"),
            &TimeZone::UTC,
            100,
        );
        assert_eq!((latest, n), (Some(at("2027-01-01T00:10:00Z")), 10));
        // A month of missed minutes still finds the newest.
        let (latest, n) = every.latest_between(
            at("2027-01-01T00:00:00Z"),
            at("2027-02-01T00:00:30Z"),
            &TimeZone::UTC,
            100,
        );
        assert_eq!(latest, Some(at("2027-02-01T00:00:00Z")));
        assert!(n >= 100);
    }
}
