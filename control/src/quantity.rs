//! Kubernetes resource quantities, as the scheduler and the autoscaler
//! read them.

/// A Kubernetes quantity in base units (`100m` → 0.1, `1Gi` → 2^30).
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    Some(n * mult)
}

/// `v` written back as a quantity: whole numbers plainly (in Ki, Mi, Gi
/// or Ti when `binary` and exact), fractions in milli-units (`250m`).
pub fn format_quantity(v: f64, binary: bool) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if (v - v.round()).abs() > 1e-9 {
        return format!("{}m", (v * 1000.0).round() as i64);
    }
    let n = v.round() as i64;
    if binary {
        for (suffix, unit) in [
            ("Ti", 1i64 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ] {
            if n >= unit && n % unit == 0 {
                return format!("{}{suffix}", n / unit);
            }
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_written_back() {
        assert_eq!(format_quantity(0.25, false), "250m");
        assert_eq!(format_quantity(2.0, false), "2");
        assert_eq!(format_quantity(64.0 * 1048576.0, true), "64Mi");
        assert_eq!(format_quantity(1536.0, true), "1536");
        assert_eq!(format_quantity(0.0, true), "0");
        assert_eq!(parse_quantity(&format_quantity(0.1, false)), Some(0.1));
    }
}
