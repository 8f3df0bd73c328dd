//! How the operator commands print: aligned tables, units, times.

use std::time::Duration;

use serde_json::Value;

/// An epoch-milliseconds field as RFC 3339, or "-".
pub fn time_of(v: &Value) -> String {
    v.as_i64()
        .map_or_else(|| "-".into(), crate::store::series::rfc3339_ms)
}

pub fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("json value serialises");
    s.push('\n');
    s
}

pub fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

pub fn num(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.2}"))
}

/// A size in binary units, or "-" when there is none (a missing reading is not zero).
pub fn bytes(v: Option<f64>) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = v;
    let mut i = 0;
    while x >= 1024.0 && i < units.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    format!("{x:.1} {}", units[i])
}

/// A value with its metric's unit: sizes in binary units, rates per second, durations in
/// days/hours/minutes; "-" when there is none.
pub fn with_unit(v: &Value, unit: shoal_proto::metrics::Unit) -> String {
    use shoal_proto::metrics::Unit;
    let Some(x) = v.as_f64() else {
        return "-".into();
    };
    match unit {
        Unit::Bytes => bytes(Some(x)),
        Unit::BytesPerSecond => format!("{}/s", bytes(Some(x))),
        Unit::Seconds => {
            humantime::format_duration(Duration::from_secs(x.max(0.0) as u64)).to_string()
        }
        Unit::Percent => format!("{x:.1} %"),
        Unit::Celsius => format!("{x:.1} °C"),
        Unit::Watts => format!("{x:.1} W"),
        Unit::Megahertz => format!("{x:.0} MHz"),
        Unit::Number => format!("{x:.2}"),
    }
}

pub fn ago(now_ms: i64, then_ms: i64) -> String {
    if then_ms <= 0 {
        return "never".into();
    }
    let secs = ((now_ms - then_ms).max(0) / 1000) as u64;
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            l.extend(std::iter::repeat_n(' ', w - c.chars().count()));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
    }

    #[test]
    fn formats_units() {
        assert_eq!(bytes(Some(1536.0)), "1.5 KiB");
        assert_eq!(ago(10_000, 0), "never");
        assert_eq!(ago(70_000, 10_000), "1m ago");
        use shoal_proto::metrics::Unit;
        let v = serde_json::json!(2_215_542_784.0);
        assert_eq!(with_unit(&v, Unit::Bytes), "2.1 GiB");
        assert_eq!(
            with_unit(&serde_json::json!(1536), Unit::BytesPerSecond),
            "1.5 KiB/s"
        );
        assert_eq!(
            with_unit(&serde_json::json!(90061), Unit::Seconds),
            "1day 1h 1m 1s"
        );
        assert_eq!(
            with_unit(&serde_json::json!(48.31), Unit::Celsius),
            "48.3 °C"
        );
        assert_eq!(with_unit(&Value::Null, Unit::Percent), "-");
    }
}
