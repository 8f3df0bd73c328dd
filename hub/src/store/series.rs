//! Time ranges and downsampling for `GET /devices/{id}/series`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Most buckets one series request may ask for.
pub const MAX_BUCKETS: i64 = 10_000;

/// Parses a time bound: RFC 3339 (`2026-11-23T20:00:00Z`), epoch milliseconds, `now`, or a
/// duration back from now (`1h`, `-15m`).
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(now_ms);
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(d) = humantime::parse_duration(s.trim_start_matches('-')) {
        return Ok(now_ms - d.as_millis() as i64);
    }
    humantime::parse_rfc3339_weak(s)
        .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64))
        .map_err(|_| format!("{s:?} is not a time (use RFC 3339, epoch milliseconds, `now` or a duration like 1h)"))
}

/// One downsampled point: the summary of the samples in `[t, t + step)`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bucket {
    pub t: i64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    /// The value of the bucket's latest sample.
    pub last: f64,
}

/// A summary of values that merges: what a bucket and a stored rollup hold. Values that are
/// not finite are not counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub last: f64,
    /// `(timestamp ms, seq)` of the sample `last` came from: the latest wins.
    pub last_at: (i64, u64),
}

impl Default for Agg {
    fn default() -> Self {
        Self {
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            last: f64::NAN,
            last_at: (i64::MIN, 0),
        }
    }
}

impl Agg {
    pub fn push(&mut self, t_ms: i64, seq: u64, v: f64) {
        if !v.is_finite() {
            return;
        }
        self.merge(&Agg {
            count: 1,
            min: v,
            max: v,
            sum: v,
            last: v,
            last_at: (t_ms, seq),
        });
    }

    pub fn merge(&mut self, o: &Agg) {
        if o.count == 0 {
            return;
        }
        self.count += o.count;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.sum += o.sum;
        if o.last_at >= self.last_at {
            self.last = o.last;
            self.last_at = o.last_at;
        }
    }

    fn bucket(&self, t: i64) -> Bucket {
        Bucket {
            t,
            count: self.count,
            min: self.min,
            max: self.max,
            avg: self.sum / self.count as f64,
            last: self.last,
        }
    }
}

/// Buckets values by time.
pub struct Downsampler {
    from_ms: i64,
    step_ms: i64,
    buckets: Vec<Agg>,
}

impl Downsampler {
    pub fn new(from_ms: i64, to_ms: i64, step: Duration) -> Result<Self, String> {
        let step_ms = step.as_millis() as i64;
        if step_ms <= 0 {
            return Err("step must be at least 1ms".into());
        }
        if to_ms <= from_ms {
            return Err("`from` must be before `to`".into());
        }
        let n = (to_ms - from_ms + step_ms - 1) / step_ms;
        if n > MAX_BUCKETS {
            return Err(format!(
                "{n} buckets requested, at most {MAX_BUCKETS}: use a larger step or a shorter range"
            ));
        }
        Ok(Self {
            from_ms,
            step_ms,
            buckets: vec![Agg::default(); n as usize],
        })
    }

    pub fn step_ms(&self) -> i64 {
        self.step_ms
    }

    fn slot(&mut self, t_ms: i64) -> Option<&mut Agg> {
        if t_ms < self.from_ms {
            return None;
        }
        self.buckets
            .get_mut(((t_ms - self.from_ms) / self.step_ms) as usize)
    }

    pub fn push(&mut self, t_ms: i64, seq: u64, v: f64) {
        if let Some(b) = self.slot(t_ms) {
            b.push(t_ms, seq, v);
        }
    }

    /// Adds a summary whose samples lie in `[t_ms, t_ms + its resolution)`: a rollup. It counts
    /// in the bucket its start falls in.
    pub fn merge(&mut self, t_ms: i64, agg: &Agg) {
        if let Some(b) = self.slot(t_ms) {
            b.merge(agg);
        }
    }

    /// Non-empty buckets, oldest first.
    pub fn finish(self) -> Vec<Bucket> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, s)| s.count > 0)
            .map(|(i, s)| s.bucket(self.from_ms + i as i64 * self.step_ms))
            .collect()
    }
}

/// A step giving about 120 buckets, at least one second.
pub fn default_step(from_ms: i64, to_ms: i64) -> Duration {
    Duration::from_millis((((to_ms - from_ms) / 120).max(1000)) as u64)
}

/// Epoch milliseconds as RFC 3339 (seconds, UTC); past the year 9999, which RFC 3339 cannot
/// write, the number itself. Safe on any value a client sends.
pub fn rfc3339_ms(ms: i64) -> String {
    use std::fmt::Write;
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    let mut out = String::new();
    match write!(out, "{}", humantime::format_rfc3339_seconds(t)) {
        Ok(()) => out,
        Err(_) => format!("{ms} ms after the epoch (after the year 9999)"),
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod rfc3339_tests {
    #[test]
    fn every_millisecond_value_formats() {
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339_ms(-5), "1970-01-01T00:00:00Z");
        assert!(super::rfc3339_ms(i64::MAX).contains("after the year 9999"));
        assert!(super::rfc3339_ms(253_402_300_800_000).contains("after the year 9999"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_times() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("now", now), Ok(now));
        assert_eq!(parse_time("1h", now), Ok(now - 3_600_000));
        assert_eq!(parse_time("-15m", now), Ok(now - 900_000));
        assert_eq!(parse_time("1700000000000", now), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", now),
            Ok(1_700_000_000_000)
        );
        assert!(parse_time("yesterday-ish", now).is_err());
    }

    #[test]
    fn buckets_by_step() {
        let mut d = Downsampler::new(0, 10_000, Duration::from_secs(5)).unwrap();
        for (t, v) in [
            (0, 1.0),
            (4_999, 3.0),
            (5_000, 10.0),
            (9_999, f64::NAN),
            (10_000, 99.0),
            (-1, 7.0),
        ] {
            d.push(t, 0, v);
        }
        let b = d.finish();
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[0].t, b[0].count, b[0].min, b[0].max, b[0].avg),
            (0, 2, 1.0, 3.0, 2.0)
        );
        assert_eq!((b[1].t, b[1].count, b[1].avg), (5_000, 1, 10.0));
    }

    #[test]
    fn refuses_huge_or_backwards_ranges() {
        assert!(Downsampler::new(0, 1_000_000_000, Duration::from_millis(1)).is_err());
        assert!(Downsampler::new(10, 5, Duration::from_secs(1)).is_err());
        assert!(Downsampler::new(0, 5, Duration::ZERO).is_err());
    }
}
