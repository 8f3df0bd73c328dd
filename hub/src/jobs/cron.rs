//! Cron schedules as Kubernetes CronJobs read them: exactly what `cron.ParseStandard` of
//! robfig/cron v3 (the parser Kubernetes validates and schedules with) accepts, less a time
//! zone inside the schedule, which Kubernetes refuses in favour of `spec.timeZone`:
//!
//! - fields: minute 0-59, hour 0-23, day of month 1-31, month 1-12 or JAN-DEC, day of week 0-6
//!   or SUN-SAT (7 is refused, as by robfig/cron); `*`, `?`, lists, ranges, steps (`*/15`, `1-30/2`,
//!   `5/10`); names in any case;
//! - descriptors, lowercase only: `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`,
//!   `@midnight`, `@hourly`, and `@every DURATION` in Go's duration syntax (`@every 1h30m`);
//! - day of month and day of week: when both are restricted a day matching **either** runs (as
//!   in Vixie cron); a field starting with `*` or `?` without a step counts as unrestricted;
//! - time zones (`spec.timeZone`): the next time is searched in absolute time while fields
//!   are read in local time, so on a daylight-saving change a time that does not exist is
//!   skipped (spring forward) and a time that exists twice runs twice (fall back) — exactly
//!   what Kubernetes does. `@every` runs a fixed delay after the previous time, in any zone.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    kind: Kind,
    source: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Fields(Fields),
    /// `@every`: whole seconds, at least one.
    Every(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fields {
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    days_of_week: u64,
    /// Day-of-month or day-of-week is unrestricted: both must match (AND), else either (OR).
    dom_star: bool,
    dow_star: bool,
}

/// Why a schedule does not parse; says which field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid schedule {schedule:?}: {reason}")]
pub struct CronError {
    pub schedule: String,
    pub reason: String,
}

struct Field {
    name: &'static str,
    min: u64,
    max: u64,
    names: &'static [&'static str],
}

const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DOM: Field = Field {
    name: "day of month",
    min: 1,
    max: 31,
    names: &[],
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
};
const DOW: Field = Field {
    name: "day of week",
    min: 0,
    max: 6,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

const DESCRIPTORS: &str =
    "@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly or @every DURATION";

impl Schedule {
    pub fn parse(spec: &str) -> Result<Self, CronError> {
        let err = |reason: String| CronError {
            schedule: spec.to_string(),
            reason,
        };
        if spec.is_empty() {
            return Err(err("empty schedule".into()));
        }
        // Kubernetes refuses any "TZ" on creation, not only a leading TZ=/CRON_TZ= prefix.
        if spec.contains("TZ") {
            return Err(err(
                "a time zone in the schedule (TZ= or CRON_TZ=) is not allowed; use spec.timeZone"
                    .into(),
            ));
        }
        // Descriptors are matched on the untrimmed text: robfig/cron refuses " @hourly" and
        // "@hourly ", while it allows whitespace around five fields.
        let kind = if spec.starts_with('@') {
            parse_descriptor(spec).map_err(err)?
        } else {
            Kind::Fields(parse_fields(spec).map_err(err)?)
        };
        Ok(Self {
            kind,
            source: spec.trim().to_string(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The first activation strictly after `after`, read in `tz`; `None` when a cron schedule
    /// has none within five years (e.g. February 30th). `@every` is `after`, cut to the whole
    /// second, plus the delay.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        match &self.kind {
            Kind::Fields(f) => f.next_after(after, tz),
            Kind::Every(delay) => after.with_nanosecond(0)?.checked_add_signed(*delay),
        }
    }
}

fn parse_descriptor(spec: &str) -> Result<Kind, String> {
    let fields = match spec {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => {
            let Some(text) = spec.strip_prefix("@every ") else {
                return Err(format!(
                    "unknown macro {spec:?} (use {DESCRIPTORS}; macros are lowercase)"
                ));
            };
            let nanos = go_duration(text).map_err(|e| format!("@every: {e}"))?;
            // Shorter delays run every second; a fraction of a second is dropped.
            let seconds = if nanos < 1_000_000_000 {
                1
            } else {
                nanos / 1_000_000_000
            };
            let delay = Duration::try_seconds(seconds)
                .ok_or_else(|| format!("@every: {text:?} is too long"))?;
            return Ok(Kind::Every(delay));
        }
    };
    parse_fields(fields).map(Kind::Fields)
}

fn parse_fields(spec: &str) -> Result<Fields, String> {
    let fields: Vec<&str> = spec.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!(
            "expected 5 fields (minute hour day-of-month month day-of-week) or one of {DESCRIPTORS}, found {} field(s)",
            fields.len()
        ));
    }
    let (minutes, _) = parse_field(fields[0], &MINUTE)?;
    let (hours, _) = parse_field(fields[1], &HOUR)?;
    let (days_of_month, dom_star) = parse_field(fields[2], &DOM)?;
    let (months, _) = parse_field(fields[3], &MONTH)?;
    let (days_of_week, dow_star) = parse_field(fields[4], &DOW)?;
    Ok(Fields {
        minutes,
        hours,
        days_of_month,
        months,
        days_of_week,
        dom_star,
        dow_star,
    })
}

impl Fields {
    fn day_matches(&self, date: NaiveDate) -> bool {
        let dom = self.days_of_month & (1 << date.day()) != 0;
        let dow = self.days_of_week & (1 << date.weekday().num_days_from_sunday()) != 0;
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        // A list of only commas ("," parses as no value at all) never runs; answering now saves
        // walking five years minute by minute.
        if self.minutes == 0 || self.hours == 0 || self.months == 0 {
            return None;
        }
        let mut t = after.with_second(0)?.with_nanosecond(0)? + Duration::minutes(1);
        let limit = after + Duration::days(366 * 5);
        while t <= limit {
            let local = t.with_timezone(&tz);
            if self.months & (1 << local.month()) == 0 {
                let (y, m) = if local.month() == 12 {
                    (local.year() + 1, 1)
                } else {
                    (local.year(), local.month() + 1)
                };
                t = local_midnight(tz, NaiveDate::from_ymd_opt(y, m, 1)?)?;
                continue;
            }
            if !self.day_matches(local.date_naive()) {
                t = local_midnight(tz, local.date_naive().succ_opt()?)?;
                continue;
            }
            if self.hours & (1 << local.hour()) == 0 {
                t += Duration::minutes(i64::from(60 - local.minute()));
                continue;
            }
            if self.minutes & (1 << local.minute()) == 0 {
                t += Duration::minutes(1);
                continue;
            }
            return Some(t);
        }
        None
    }
}

/// The instant a local day starts (the first instant after a gap when midnight itself does not
/// exist there).
fn local_midnight(tz: Tz, date: NaiveDate) -> Option<DateTime<Utc>> {
    let naive = date.and_hms_opt(0, 0, 0)?;
    (0..=3)
        .find_map(|h| {
            tz.from_local_datetime(&(naive + Duration::hours(h)))
                .earliest()
        })
        .map(|d| d.with_timezone(&Utc))
}

/// Parses one field into a bit set; the flag says it was unrestricted (`*` or `?`, no step).
fn parse_field(expr: &str, f: &Field) -> Result<(u64, bool), String> {
    let mut bits = 0u64;
    let mut star = false;
    // Empty list items are skipped rather than refused ("1,,2" is "1,2"), as in robfig/cron.
    for part in expr.split(',').filter(|p| !p.is_empty()) {
        let (b, s) = parse_range(part, f)?;
        bits |= b;
        star |= s;
    }
    Ok((bits, star))
}

/// One list item: `*`, `?`, `N`, `N-M`, each with an optional `/STEP`.
fn parse_range(part: &str, f: &Field) -> Result<(u64, bool), String> {
    let name = f.name;
    let (range, step) = match part.split('/').collect::<Vec<_>>()[..] {
        [range] => (range, None),
        [range, step] => {
            let step = go_atoi(step).map_err(|e| format!("{name}: step in {part:?}: {e}"))?;
            (range, Some(step))
        }
        _ => return Err(format!("{name}: too many slashes in {part:?}")),
    };
    let bounds: Vec<&str> = range.split('-').collect();
    let (lo, hi, mut star) = if bounds[0] == "*" || bounds[0] == "?" {
        // robfig/cron ignores whatever follows a hyphen after a star ("*-5" means "*").
        (f.min, f.max, true)
    } else {
        let lo = value(bounds[0], part, f)?;
        let hi = match bounds[1..] {
            [] if step.is_some() => f.max, // "N/STEP" runs from N to the field's maximum
            [] => lo,
            [hi] => value(hi, part, f)?,
            _ => return Err(format!("{name}: too many hyphens in {part:?}")),
        };
        (lo, hi, false)
    };
    if step.is_some_and(|s| s > 1) {
        star = false;
    }
    for v in [lo, hi] {
        if v < f.min || v > f.max {
            let hint = if f.name == DOW.name && v == 7 {
                " (Sunday is 0)"
            } else {
                ""
            };
            return Err(format!(
                "{name}: {v} is out of range {}-{} in {part:?}{hint}",
                f.min, f.max
            ));
        }
    }
    if lo > hi {
        return Err(format!("{name}: range {part:?} runs backwards"));
    }
    let step = step.unwrap_or(1);
    if step == 0 {
        return Err(format!("{name}: step 0 in {part:?}"));
    }
    let mut bits = 0u64;
    let mut v = lo;
    while v <= hi {
        bits |= 1 << v;
        // robfig/cron accepts steps up to 2^63 - 1; one past the range keeps the first value.
        v = v.saturating_add(step);
    }
    Ok((bits, star))
}

fn value(s: &str, part: &str, f: &Field) -> Result<u64, String> {
    // Each character lowercased on its own, as Go's strings.ToLower does ("FRİ" is "fri").
    let lower: String = s
        .chars()
        .map(|c| c.to_lowercase().next().unwrap_or(c))
        .collect();
    if let Some(i) = f.names.iter().position(|n| *n == lower) {
        return Ok(i as u64 + f.min);
    }
    go_atoi(s).map_err(|_| format!("{}: {s:?} is not a number or name in {part:?}", f.name))
}

/// A non-negative number as Go's `strconv.Atoi` reads it: optional sign, decimal digits, at
/// most 2^63 - 1.
fn go_atoi(s: &str) -> Result<u64, String> {
    let n: i64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number (0 to 2^63-1)"))?;
    u64::try_from(n).map_err(|_| format!("{s:?} is negative"))
}

/// The most nanoseconds a Go duration may hold before its sign: 2^63.
const GO_DURATION_LIMIT: u64 = 1 << 63;

/// Go's `time.ParseDuration`, in nanoseconds: a signed sequence of decimal numbers, each with
/// an optional fraction and a unit among ns, us, µs, μs, ms, s, m, h.
fn go_duration(text: &str) -> Result<i64, String> {
    let invalid = || format!("invalid duration {text:?} (e.g. 90s, 1h30m)");
    let mut s = text.as_bytes();
    let mut neg = false;
    if let Some((&c, rest)) = s.split_first()
        && (c == b'-' || c == b'+')
    {
        neg = c == b'-';
        s = rest;
    }
    if s == b"0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    while !s.is_empty() {
        if !(s[0] == b'.' || s[0].is_ascii_digit()) {
            return Err(invalid());
        }
        let (mut v, pre) = leading_int(s).ok_or_else(invalid)?;
        s = &s[pre..];
        let (mut frac, mut scale, mut post) = (0u64, 1f64, 0);
        if let Some((b'.', rest)) = s.split_first() {
            (frac, scale, post) = leading_fraction(rest);
            s = &rest[post..];
        }
        if pre == 0 && post == 0 {
            return Err(invalid());
        }
        let (unit, rest) = duration_unit(s, text)?;
        s = rest;
        if v > GO_DURATION_LIMIT / unit {
            return Err(invalid());
        }
        v *= unit;
        if frac > 0 {
            v += (frac as f64 * (unit as f64 / scale)) as u64;
            if v > GO_DURATION_LIMIT {
                return Err(invalid());
            }
        }
        // Both terms are at most 2^63, so only exactly 2^64 wraps (to 0), as it does in Go.
        total = total.wrapping_add(v);
        if total > GO_DURATION_LIMIT {
            return Err(invalid());
        }
    }
    if neg {
        return Ok((total as i64).wrapping_neg());
    }
    i64::try_from(total).map_err(|_| invalid())
}

/// Go's `leadingInt`: the leading decimal digits' value and count; `None` past 2^63.
fn leading_int(s: &[u8]) -> Option<(u64, usize)> {
    let digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut v: u64 = 0;
    for &c in &s[..digits] {
        if v > GO_DURATION_LIMIT / 10 {
            return None;
        }
        v = v * 10 + u64::from(c - b'0');
        if v > GO_DURATION_LIMIT {
            return None;
        }
    }
    Some((v, digits))
}

/// Go's `leadingFraction`: the digits after a `.` as `frac / scale`, and how many there were.
fn leading_fraction(s: &[u8]) -> (u64, f64, usize) {
    let digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
    let (mut frac, mut scale) = (0u64, 1f64);
    // Digits past what fits only stop adding precision; they are not an error.
    let mut overflow = false;
    for &c in &s[..digits] {
        if overflow || frac > (GO_DURATION_LIMIT - 1) / 10 {
            overflow = true;
            continue;
        }
        let next = frac * 10 + u64::from(c - b'0');
        if next > GO_DURATION_LIMIT {
            overflow = true;
            continue;
        }
        frac = next;
        scale *= 10.0;
    }
    (frac, scale, digits)
}

/// The unit that starts `s`, in nanoseconds, and what follows it; `text` is for the error.
fn duration_unit<'a>(s: &'a [u8], text: &str) -> Result<(u64, &'a [u8]), String> {
    const UNITS: [(&str, u64); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("\u{b5}s", 1_000),
        ("\u{3bc}s", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let unit_len = s
        .iter()
        .take_while(|c| !(**c == b'.' || c.is_ascii_digit()))
        .count();
    if unit_len == 0 {
        return Err(format!(
            "missing unit in duration {text:?} (ns, us, ms, s, m or h)"
        ));
    }
    let (name, rest) = s.split_at(unit_len);
    let Some(&(_, unit)) = UNITS.iter().find(|(u, _)| u.as_bytes() == name) else {
        return Err(format!(
            "unknown unit {:?} in duration {text:?} (ns, us, ms, s, m or h)",
            String::from_utf8_lossy(name)
        ));
    };
    Ok((unit, rest))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(spec: &str, after: &str, tz: Tz) -> String {
        Schedule::parse(spec)
            .unwrap()
            .next_after(utc(after), tz)
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn the_books_hrdump_schedule() {
        // "1 * * * *": one minute past every hour.
        assert_eq!(
            next("1 * * * *", "2026-11-23T10:01:00Z", Tz::UTC),
            "2026-11-23T11:01:00+00:00"
        );
        assert_eq!(
            next("1 * * * *", "2026-11-23T10:00:59Z", Tz::UTC),
            "2026-11-23T10:01:00+00:00"
        );
    }

    #[test]
    fn macros_steps_lists_names() {
        assert_eq!(
            next("@hourly", "2026-01-01T00:00:00Z", Tz::UTC),
            "2026-01-01T01:00:00+00:00"
        );
        assert_eq!(
            next("@daily", "2026-01-01T00:00:00Z", Tz::UTC),
            "2026-01-02T00:00:00+00:00"
        );
        assert_eq!(
            next("@weekly", "2026-01-01T00:00:00Z", Tz::UTC),
            "2026-01-04T00:00:00+00:00"
        ); // a Sunday
        assert_eq!(
            next("@monthly", "2026-01-15T00:00:00Z", Tz::UTC),
            "2026-02-01T00:00:00+00:00"
        );
        assert_eq!(
            next("@yearly", "2026-01-15T00:00:00Z", Tz::UTC),
            "2027-01-01T00:00:00+00:00"
        );
        assert_eq!(
            next("*/15 * * * *", "2026-01-01T00:16:00Z", Tz::UTC),
            "2026-01-01T00:30:00+00:00"
        );
        assert_eq!(
            next("5/20 * * * *", "2026-01-01T00:06:00Z", Tz::UTC),
            "2026-01-01T00:25:00+00:00"
        );
        assert_eq!(
            next("0 9-17/4 * * MON-FRI", "2026-01-02T13:00:00Z", Tz::UTC),
            "2026-01-02T17:00:00+00:00"
        );
        assert_eq!(
            next("0 0 * JAN,jul *", "2026-02-01T00:00:00Z", Tz::UTC),
            "2026-07-01T00:00:00+00:00"
        );
        assert!(
            Schedule::parse("0 0 * * 7").is_err(),
            "7 is not Sunday for Kubernetes (day of week is 0-6)"
        );
    }

    #[test]
    fn day_of_month_or_day_of_week() {
        // Both restricted: the 13th OR a Friday.
        assert_eq!(
            next("0 0 13 * 5", "2026-02-06T00:00:00Z", Tz::UTC),
            "2026-02-13T00:00:00+00:00"
        ); // Fri 13th
        assert_eq!(
            next("0 0 13 * 5", "2026-02-07T00:00:00Z", Tz::UTC),
            "2026-02-13T00:00:00+00:00"
        );
        assert_eq!(
            next("0 0 10 * 5", "2026-02-06T00:00:00Z", Tz::UTC),
            "2026-02-10T00:00:00+00:00"
        );
        // Day of week unrestricted: only the 13th.
        assert_eq!(
            next("0 0 13 * *", "2026-02-06T00:00:00Z", Tz::UTC),
            "2026-02-13T00:00:00+00:00"
        );
        // A stepped star is a restriction (robfig): the odd days OR Mondays.
        assert_eq!(
            next("0 0 */2 * 1", "2026-02-01T00:00:00Z", Tz::UTC),
            "2026-02-02T00:00:00+00:00"
        );
    }

    #[test]
    fn time_zones_and_daylight_saving() {
        let ny: Tz = "America/New_York".parse().unwrap();
        assert_eq!(
            next("0 9 * * *", "2026-06-01T00:00:00Z", ny),
            "2026-06-01T13:00:00+00:00"
        );
        // Spring forward (2026-03-08, 02:00 → 03:00): 02:30 does not exist that day: skipped.
        assert_eq!(
            next("30 2 * * *", "2026-03-07T08:00:00Z", ny),
            "2026-03-09T06:30:00+00:00"
        );
        // Fall back (2026-11-01, 02:00 → 01:00): 01:30 exists twice and runs twice.
        let first = next("30 1 * * *", "2026-11-01T04:00:00Z", ny);
        assert_eq!(first, "2026-11-01T05:30:00+00:00");
        assert_eq!(next("30 1 * * *", &first, ny), "2026-11-01T06:30:00+00:00");
        assert_eq!(
            next("30 1 * * *", "2026-11-01T06:30:00Z", ny),
            "2026-11-02T06:30:00+00:00"
        );
    }

    #[test]
    fn impossible_dates_end() {
        let s = Schedule::parse("0 0 30 2 *").unwrap();
        assert_eq!(
            s.next_after(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(), Tz::UTC),
            None
        );
        let leap = Schedule::parse("0 0 29 2 *").unwrap();
        assert_eq!(
            leap.next_after(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(), Tz::UTC)
                .map(|t| t.to_rfc3339()),
            Some("2028-02-29T00:00:00+00:00".into())
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("* * * *", "expected 5 fields"),
            ("60 * * * *", "minute: 60 is out of range 0-59"),
            ("* 24 * * *", "hour: 24"),
            ("* * 0 * *", "day of month: 0"),
            ("* * * 13 *", "month: 13"),
            ("* * * * 8", "day of week: 8"),
            ("*/0 * * * *", "step 0"),
            ("5-1 * * * *", "backwards"),
            ("* * * FOO *", "month: \"FOO\""),
            ("@reboot", "unknown macro"),
            ("TZ=UTC 0 * * * *", "spec.timeZone"),
        ];
        for (spec, expect) in cases {
            let e = Schedule::parse(spec).unwrap_err().to_string();
            assert!(e.contains(expect), "{spec}: {e}");
        }
    }

    /// What a schedule must parse to, or why it must fail.
    enum Want {
        /// The same schedule as this other expression.
        Same(&'static str),
        /// `@every` with this delay in seconds.
        Every(i64),
        /// Refused; the reason contains this.
        Fails(&'static str),
    }

    fn kind(spec: &str) -> Kind {
        Schedule::parse(spec)
            .unwrap_or_else(|e| panic!("{spec:?} should parse: {e}"))
            .kind
    }

    #[test]
    fn robfig_parse_standard_table() {
        use Want::*;
        let cases: &[(&str, Want)] = &[
            // parser_test.go TestRange, the bounds moved onto a real field.
            ("5 * * * *", Same("5 * * * *")),
            ("0 * * * *", Same("0 * * * *")),
            ("7 * * * *", Same("7 * * * *")),
            ("5-5 * * * *", Same("5 * * * *")),
            ("5-6 * * * *", Same("5,6 * * * *")),
            ("5-7 * * * *", Same("5,6,7 * * * *")),
            ("5-6/2 * * * *", Same("5 * * * *")),
            ("5-7/2 * * * *", Same("5,7 * * * *")),
            ("5-7/1 * * * *", Same("5,6,7 * * * *")),
            ("0 0 * * *", Same("0 0 * * *")),
            ("0 0 */2 * *", Same("0 0 1-31/2 * *")),
            ("5--5 * * * *", Fails("too many hyphens")),
            (
                "* * * jan-x *",
                Fails("month: \"x\" is not a number or name"),
            ),
            ("* 2-x * * *", Fails("hour: \"x\" is not a number or name")),
            ("*/-12 * * * *", Fails("negative")),
            ("*//2 * * * *", Fails("too many slashes")),
            ("* * 0 * *", Fails("day of month: 0 is out of range 1-31")),
            ("* * * * 7", Fails("day of week: 7 is out of range 0-6")),
            ("* 5-3 * * *", Fails("hour: range \"5-3\" runs backwards")),
            ("*/0 * * * *", Fails("minute: step 0")),
            // TestField.
            ("5,6 * * * *", Same("5-6 * * * *")),
            ("5,6,7 * * * *", Same("5-7 * * * *")),
            ("1,5-7/2,3 * * * *", Same("1,3,5,7 * * * *")),
            // TestParseScheduleErrors, with the standard parser's five fields.
            ("* 5 j * * *", Fails("expected 5 fields")),
            ("5 j * * *", Fails("hour: \"j\" is not a number or name")),
            ("@every Xm", Fails("invalid duration \"Xm\"")),
            ("@unrecognized", Fails("unknown macro")),
            ("* * * *", Fails("expected 5 fields")),
            ("", Fails("empty schedule")),
            // TestParseSchedule and TestStandardSpecSchedule. robfig accepts the TZ= and
            // CRON_TZ= forms; Kubernetes refuses them on creation, and so does Shoal.
            ("5 * * * *", Same("5 0-23 * 1-12 *")),
            ("CRON_TZ=UTC  5 * * * *", Fails("spec.timeZone")),
            ("TZ=UTC  @midnight", Fails("spec.timeZone")),
            ("@every 5m", Every(300)),
            ("@midnight", Same("0 0 * * *")),
            ("@yearly", Same("0 0 1 1 *")),
            ("@annually", Same("0 0 1 1 *")),
            ("5 j * * *", Fails("is not a number or name")),
            // What parser.go does beyond its tests: the rest of the descriptors...
            ("@monthly", Same("0 0 1 * *")),
            ("@weekly", Same("0 0 * * 0")),
            ("@daily", Same("0 0 * * *")),
            ("@hourly", Same("0 * * * *")),
            // ...matched exactly: no other case, no whitespace around them.
            ("@HOURLY", Fails("unknown macro")),
            ("@Daily", Fails("unknown macro")),
            (" @hourly", Fails("expected 5 fields")),
            ("@hourly ", Fails("unknown macro")),
            ("@every", Fails("unknown macro")),
            // Day of week is 0-6 (spec.go's bounds), in ranges too.
            ("0 0 * * 5-7", Fails("day of week: 7 is out of range 0-6")),
            ("0 0 * * 0,7", Fails("day of week: 7")),
            ("0 0 * * 0-6", Same("0 0 * * SUN-SAT")),
            ("0 0 * * sun,Mon,TUE", Same("0 0 * * 0-2")),
            ("0 0 * jan,FEB,Dec *", Same("0 0 * 1,2,12 *")),
            ("? ? ? ? ?", Same("* * * * *")),
            ("5/15 * * * *", Same("5,20,35,50 * * * *")),
            ("0 0 * * 3/2", Same("0 0 * * 3,5")),
            ("0 0 * jul/3 *", Same("0 0 * 7,10 *")),
            ("*/1 * * * *", Same("* * * * *")),
            // Whatever follows "*-" is ignored, empty list items are skipped, signs and steps
            // up to 2^63 - 1 read as strconv.Atoi reads them.
            ("*-5 * * * *", Same("* * * * *")),
            ("0 0 ?-x-y * *", Same("0 0 * * *")),
            ("1,,2 * * * *", Same("1,2 * * * *")),
            (",5, * * * *", Same("5 * * * *")),
            ("+5 * * * *", Same("5 * * * *")),
            ("05 * * * *", Same("5 * * * *")),
            ("*/4294967296 * * * *", Same("0 * * * *")),
            ("*/9223372036854775807 * * * *", Same("0 * * * *")),
            ("*/9223372036854775808 * * * *", Fails("minute: step")),
            ("-5 * * * *", Fails("minute: \"\" is not a number or name")),
            ("5- * * * *", Fails("is not a number or name")),
            ("60 * * * *", Fails("minute: 60 is out of range 0-59")),
            ("70/5 * * * *", Fails("minute: 70 is out of range")),
            ("0 0 32 * *", Fails("day of month: 32")),
            ("0 0 * 0 *", Fails("month: 0")),
            ("0 0 * * MON/0", Fails("step 0")),
            ("0 0 * * FOO", Fails("day of week: \"FOO\"")),
            ("0 0 * MON *", Fails("month: \"MON\"")),
            ("* * * * * *", Fails("found 6 field(s)")),
            ("\t1  2\n3 4 5 ", Same("1 2 3 4 5")),
            // @every takes Go's duration syntax; under a second is one second, fractions of a
            // second are dropped (constantdelay.go).
            ("@every 1h30m", Every(5400)),
            ("@every 10s", Every(10)),
            ("@every 1.5h", Every(5400)),
            ("@every 2h45m30.9s", Every(9930)),
            ("@every 100ms", Every(1)),
            ("@every 1500ms", Every(1)),
            ("@every 2500000us", Every(2)),
            ("@every 0", Every(1)),
            ("@every 0s", Every(1)),
            ("@every -5m", Every(1)),
            ("@every +90s", Every(90)),
            ("@every .5m", Every(30)),
            ("@every 5.m", Every(300)),
            ("@every 2562047h", Every(2_562_047 * 3600)),
            ("@every 2562048h", Fails("invalid duration")),
            ("@every 5", Fails("missing unit")),
            ("@every 1d", Fails("unknown unit \"d\"")),
            ("@every 5M", Fails("unknown unit \"M\"")),
            ("@every .s", Fails("invalid duration")),
            ("@every ", Fails("invalid duration")),
            ("@every  5m", Fails("invalid duration")),
            ("@every 5m ", Fails("unknown unit \"m \"")),
        ];
        let mut wrong = Vec::new();
        for (spec, want) in cases {
            let got = Schedule::parse(spec);
            let ok = match (want, &got) {
                (Same(other), Ok(s)) => s.kind == kind(other),
                (Every(secs), Ok(s)) => s.kind == Kind::Every(Duration::seconds(*secs)),
                (Fails(reason), Err(e)) => e.reason.contains(reason),
                _ => false,
            };
            if !ok {
                wrong.push(format!("{spec:?}: got {got:?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));

        // TestAll: what "*" sets in each field.
        let Kind::Fields(all) = kind("* * * * *") else {
            panic!("fields")
        };
        assert_eq!(all.minutes, 0xfff_ffff_ffff_ffff);
        assert_eq!(all.hours, 0xff_ffff);
        assert_eq!(all.days_of_month, 0xffff_fffe);
        assert_eq!(all.months, 0x1ffe);
        assert_eq!(all.days_of_week, 0x7f);
        assert!(all.dom_star && all.dow_star);

        // constantdelay_test.go TestConstantDelayNext (UTC for its local times).
        let delays = [
            ("2012-07-09T14:45:00Z", "15m50ns", "2012-07-09T15:00:00Z"),
            ("2012-07-09T14:59:00Z", "15m", "2012-07-09T15:14:00Z"),
            ("2012-07-09T14:59:59Z", "15m", "2012-07-09T15:14:59Z"),
            ("2012-07-09T15:45:00Z", "35m", "2012-07-09T16:20:00Z"),
            ("2012-07-09T23:46:00Z", "14m", "2012-07-10T00:00:00Z"),
            ("2012-07-09T23:45:00Z", "35m", "2012-07-10T00:20:00Z"),
            ("2012-07-09T23:35:51Z", "44m24s", "2012-07-10T00:20:15Z"),
            ("2012-07-09T23:35:51Z", "25h44m24s", "2012-07-11T01:20:15Z"),
            ("2012-07-09T23:35:00Z", "2184h25m", "2012-10-09T00:00:00Z"),
            ("2012-12-31T23:59:45Z", "15s", "2013-01-01T00:00:00Z"),
            ("2012-07-09T14:45:00Z", "15ms", "2012-07-09T14:45:01Z"),
            ("2012-07-09T14:45:00.005Z", "15m", "2012-07-09T15:00:00Z"),
            (
                "2012-07-09T14:45:00.005Z",
                "15m50ns",
                "2012-07-09T15:00:00Z",
            ),
        ];
        let ny: Tz = "America/New_York".parse().unwrap();
        for (after, delay, expected) in delays {
            for tz in [Tz::UTC, ny] {
                assert_eq!(
                    next(&format!("@every {delay}"), after, tz),
                    utc(expected).to_rfc3339(),
                    "@every {delay} after {after} in {tz}"
                );
            }
        }
    }

    #[test]
    fn names_fold_case_per_character() {
        // U+0130 lowercases to a plain "i" character by character, so "FRİ" is Friday.
        assert_eq!(kind("0 0 * * FR\u{130}"), kind("0 0 * * 5"));
        assert!(Schedule::parse("0 0 * * FRI\u{307}").is_err());
    }

    #[test]
    fn fields_that_list_nothing_never_run() {
        let after = utc("2026-01-01T00:00:00Z");
        for spec in [", * * * *", "0 , * * *", "0 0 * , *", "0 0 , * *"] {
            let s = Schedule::parse(spec).unwrap();
            assert_eq!(s.next_after(after, Tz::UTC), None, "{spec}");
        }
        // An empty day of month is no restriction to OR with: only the listed weekdays run.
        assert_eq!(
            next("0 0 , * MON", "2026-01-01T00:00:00Z", Tz::UTC),
            "2026-01-05T00:00:00+00:00"
        );
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        const MONTHS: [&str; 12] = [
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ];
        const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

        /// One list item of a field, kept as numbers so the test knows what it means.
        #[derive(Debug, Clone)]
        enum Item {
            Star { question: bool, step: Option<u64> },
            One(u64),
            Range(u64, u64, Option<u64>),
            From(u64, u64),
        }

        fn item(min: u64, max: u64) -> impl Strategy<Value = Item> {
            prop_oneof![
                (any::<bool>(), proptest::option::of(1u64..70))
                    .prop_map(|(question, step)| Item::Star { question, step }),
                (min..=max).prop_map(Item::One),
                (min..=max, min..=max, proptest::option::of(1u64..70))
                    .prop_map(|(a, b, s)| Item::Range(a.min(b), a.max(b), s)),
                (min..=max, 1u64..70).prop_map(|(a, s)| Item::From(a, s)),
            ]
        }

        /// A field as text, the values it allows and whether it is unrestricted.
        #[derive(Debug, Clone)]
        struct Gen {
            text: String,
            bits: u64,
            star: bool,
        }

        fn field(min: u64, max: u64, names: &'static [&'static str]) -> impl Strategy<Value = Gen> {
            proptest::collection::vec((item(min, max), any::<u8>()), 1..4).prop_map(move |items| {
                let show = |v: u64, style: u8| -> String {
                    let Some(name) = names.get((v - min) as usize) else {
                        return v.to_string();
                    };
                    match style % 4 {
                        0 => v.to_string(),
                        1 => name.to_string(),
                        2 => name.to_uppercase(),
                        _ => name[..1].to_uppercase() + &name[1..],
                    }
                };
                let mut g = Gen {
                    text: String::new(),
                    bits: 0,
                    star: false,
                };
                let mut texts = Vec::new();
                for (it, style) in items {
                    let (lo, hi, step, text) = match it {
                        Item::Star { question, step } => {
                            g.star |= step.is_none_or(|s| s == 1);
                            let base = if question { "?" } else { "*" };
                            let text = match step {
                                Some(s) => format!("{base}/{s}"),
                                None => base.to_string(),
                            };
                            (min, max, step.unwrap_or(1), text)
                        }
                        Item::One(v) => (v, v, 1, show(v, style)),
                        Item::Range(a, b, s) => {
                            let mut text = format!("{}-{}", show(a, style), show(b, style / 4));
                            if let Some(s) = s {
                                text += &format!("/{s}");
                            }
                            (a, b, s.unwrap_or(1), text)
                        }
                        Item::From(a, s) => (a, max, s, format!("{}/{s}", show(a, style))),
                    };
                    let mut v = lo;
                    while v <= hi {
                        g.bits |= 1 << v;
                        v += step;
                    }
                    texts.push(text);
                }
                g.text = texts.join(",");
                g
            })
        }

        #[derive(Debug, Clone)]
        struct Spec {
            fields: [Gen; 5],
        }

        impl Spec {
            fn text(&self) -> String {
                self.fields
                    .iter()
                    .map(|f| f.text.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            }

            fn day_ok(&self, date: NaiveDate) -> bool {
                let [_, _, dom, month, dow] = &self.fields;
                let d = dom.bits & (1 << date.day()) != 0;
                let w = dow.bits & (1 << date.weekday().num_days_from_sunday()) != 0;
                let day = if dom.star || dow.star { d && w } else { d || w };
                day && month.bits & (1 << date.month()) != 0
            }

            fn matches(&self, t: DateTime<Utc>, tz: Tz) -> bool {
                let local = t.with_timezone(&tz);
                let [minute, hour, ..] = &self.fields;
                minute.bits & (1 << local.minute()) != 0
                    && hour.bits & (1 << local.hour()) != 0
                    && self.day_ok(local.date_naive())
            }
        }

        fn spec() -> impl Strategy<Value = Spec> {
            (
                field(0, 59, &[]),
                field(0, 23, &[]),
                field(1, 31, &[]),
                field(1, 12, &MONTHS),
                field(0, 6, &DAYS),
            )
                .prop_map(|(a, b, c, d, e)| Spec {
                    fields: [a, b, c, d, e],
                })
        }

        fn instant() -> impl Strategy<Value = DateTime<Utc>> {
            // 2000-01-01 to 2100-01-01, with a fraction of a second.
            (946_684_800i64..4_102_444_800, 0u32..1_000_000_000)
                .prop_map(|(s, ns)| Utc.timestamp_opt(s, ns).unwrap())
        }

        fn zone() -> impl Strategy<Value = Tz> {
            prop_oneof![
                Just(Tz::UTC),
                Just(Tz::America__New_York),
                Just(Tz::Europe__Berlin),
                Just(Tz::Australia__Lord_Howe),
            ]
        }

        proptest! {
            #[test]
            fn valid_fields_parse_and_next_is_the_first_match(
                spec in spec(),
                after in instant(),
                tz in zone(),
            ) {
                let text = spec.text();
                let schedule = Schedule::parse(&text)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                match schedule.next_after(after, tz) {
                    Some(next) => {
                        prop_assert!(next > after, "{text}: {next} not after {after}");
                        prop_assert_eq!(next.second(), 0);
                        prop_assert_eq!(next.nanosecond(), 0);
                        prop_assert!(spec.matches(next, tz), "{text}: {next} does not match");
                        if next - after <= Duration::days(1) {
                            let mut t = after.with_second(0).unwrap().with_nanosecond(0).unwrap()
                                + Duration::minutes(1);
                            while t < next {
                                prop_assert!(!spec.matches(t, tz), "{text}: {t} came before {next}");
                                t += Duration::minutes(1);
                            }
                        }
                    }
                    None => {
                        let start = after.with_timezone(&tz).date_naive();
                        for d in start.iter_days().take(4 * 366) {
                            prop_assert!(!spec.day_ok(d), "{text}: None, but {d} matches");
                        }
                    }
                }
            }

            #[test]
            fn every_adds_whole_seconds(
                h in 0u64..100,
                m in 0u64..100,
                s in 0u64..100,
                ms in 0u64..1000,
                after in instant(),
            ) {
                let text = format!("@every {h}h{m}m{s}s{ms}ms");
                let schedule = Schedule::parse(&text)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let secs = (h * 3600 + m * 60 + s).max(1) as i64;
                prop_assert_eq!(
                    schedule.next_after(after, Tz::Europe__Berlin),
                    Some(after.with_nanosecond(0).unwrap() + Duration::seconds(secs))
                );
            }

            #[test]
            fn anything_parses_or_fails_without_panicking(
                text in prop_oneof![
                    any::<String>(),
                    "[0-9*?/,a-zA-Z -]{0,30}",
                    "@every [-+]?[0-9.]{0,12}(ns|us|\u{b5}s|\u{3bc}s|ms|s|m|h|d|x| )?[0-9.]{0,6}[smh]?",
                    "@[a-z]{0,10}",
                ],
                after in instant(),
            ) {
                if let Ok(schedule) = Schedule::parse(&text)
                    && let Some(next) = schedule.next_after(after, Tz::America__New_York)
                {
                    prop_assert!(next > after, "{text:?}: {next} not after {after}");
                }
            }
        }
    }
}
