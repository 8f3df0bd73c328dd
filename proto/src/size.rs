//! Sizes as operators write them: `512MB`, `2GB`, `1.5 GiB`, `64MiB`, or a byte count.

/// A size: `512MB`, `2GB`, `1.5 GiB`, `1048576` (bytes), `0` (off).
pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (use e.g. 512MB, 2GB, 1GiB or bytes)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0_f64.powi(4),
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse("512MB"), Ok(512_000_000));
        assert_eq!(parse("64MiB"), Ok(64 << 20));
        assert_eq!(parse("2KB"), Ok(2000));
        assert_eq!(parse("1GiB"), Ok(1 << 30));
        assert_eq!(parse(" 1.5 GB "), Ok(1_500_000_000));
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("0"), Ok(0));
        assert!(parse("MiB").unwrap_err().contains("not a size"));
        assert!(parse("lots").unwrap_err().contains("not a size"));
        assert!(parse("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse("1e30 TB").is_err());
    }
}
