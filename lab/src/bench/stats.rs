//! Percentiles and summaries shared by the benchmarks.

use serde_json::{Value, json};

/// The `p` quantile (0..=1) of an ascending slice; 0 when empty.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `{p50, p99, min, max, n}` of the values.
pub fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"p50": pct(&v, 0.5), "p99": pct(&v, 0.99), "min": v.first(), "max": v.last(), "n": v.len()})
}
