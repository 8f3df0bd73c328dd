//! Cron schedules as Kubernetes CronJobs read them: the standard 5-field syntax and the
//! `@hourly`-style macros, with the semantics of the parser Kubernetes uses (robfig/cron):
//!
//! - fields: minute 0-59, hour 0-23, day of month 1-31, month 1-12 or JAN-DEC, day of week 0-6
//!   or SUN-SAT (7 is Sunday too); `*`, `?`, lists, ranges, steps (`*/15`, `1-30/2`, `5/10`);
//! - day of month and day of week: when both are restricted a day matching **either** runs (as
//!   in Vixie cron); a field starting with `*` or `?` without a step counts as unrestricted;
//! - time zones (`spec.timeZone`): the next time is searched in absolute time while fields
//!   are read in local time, so on a daylight-saving change a time that does not exist is
//!   skipped (spring forward) and a time that exists twice runs twice (fall back) — exactly
//!   what Kubernetes does.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    days_of_week: u64,
    /// Day-of-month or day-of-week is unrestricted: both must match (AND), else either (OR).
    dom_star: bool,
    dow_star: bool,
    source: String,
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
    min: u32,
    max: u32,
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
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

impl Schedule {
    pub fn parse(spec: &str) -> Result<Self, CronError> {
        let err = |reason: String| CronError {
            schedule: spec.to_string(),
            reason,
        };
        let trimmed = spec.trim();
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_string(),
            "@monthly" => "0 0 1 * *".to_string(),
            "@weekly" => "0 0 * * 0".to_string(),
            "@daily" | "@midnight" => "0 0 * * *".to_string(),
            "@hourly" => "0 * * * *".to_string(),
            m if m.starts_with('@') => {
                return Err(err(format!(
                    "unknown macro {trimmed:?} (use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly)"
                )));
            }
            _ if trimmed.starts_with("TZ=") || trimmed.starts_with("CRON_TZ=") => {
                return Err(err(
                    "a time zone in the schedule is not allowed; use spec.timeZone".into(),
                ));
            }
            _ => trimmed.to_string(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), found {}",
                fields.len()
            )));
        }
        let (minutes, _) = parse_field(fields[0], &MINUTE).map_err(&err)?;
        let (hours, _) = parse_field(fields[1], &HOUR).map_err(&err)?;
        let (days_of_month, dom_star) = parse_field(fields[2], &DOM).map_err(&err)?;
        let (months, _) = parse_field(fields[3], &MONTH).map_err(&err)?;
        let (mut days_of_week, dow_star) = parse_field(fields[4], &DOW).map_err(&err)?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & !(1 << 7)) | 1;
        }
        Ok(Self {
            minutes,
            hours,
            days_of_month,
            months,
            days_of_week,
            dom_star,
            dow_star,
            source: trimmed.to_string(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let dom = self.days_of_month & (1 << date.day()) != 0;
        let dow = self.days_of_week & (1 << date.weekday().num_days_from_sunday()) != 0;
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first activation strictly after `after`, read in `tz`; `None` when there is none
    /// within five years (e.g. February 30th).
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
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
    for part in expr.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("{}: bad step {s:?} in {part:?}", f.name))?;
                if step == 0 {
                    return Err(format!("{}: step 0 in {part:?}", f.name));
                }
                (r, Some(step))
            }
            None => (part, None),
        };
        let (lo, hi) = if range == "*" || range == "?" {
            if step.is_none_or(|s| s == 1) {
                star = true;
            }
            (
                f.min,
                f.max.min(if f.name == "day of week" { 6 } else { f.max }),
            )
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a, f)?, value(b, f)?)
        } else {
            let v = value(range, f)?;
            // "N/step" means from N to the field's maximum.
            (v, if step.is_some() { f.max } else { v })
        };
        if lo > hi {
            return Err(format!("{}: range {range:?} runs backwards", f.name));
        }
        let step = step.unwrap_or(1);
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, star))
}

fn value(s: &str, f: &Field) -> Result<u32, String> {
    let lower = s.to_ascii_lowercase();
    if let Some(i) = f.names.iter().position(|n| *n == lower) {
        return Ok(i as u32 + if f.name == "month" { 1 } else { 0 });
    }
    let v: u32 = s
        .parse()
        .map_err(|_| format!("{}: {s:?} is not a number or name", f.name))?;
    if v < f.min || v > f.max {
        return Err(format!(
            "{}: {v} is out of range {}-{}",
            f.name, f.min, f.max
        ));
    }
    Ok(v)
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
        assert_eq!(
            next("0 0 * * 7", "2026-01-01T00:00:00Z", Tz::UTC),
            "2026-01-04T00:00:00+00:00",
            "7 is Sunday"
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
            ("@every 5m", "unknown macro"),
            ("TZ=UTC 0 * * * *", "spec.timeZone"),
        ];
        for (spec, expect) in cases {
            let e = Schedule::parse(spec).unwrap_err().to_string();
            assert!(e.contains(expect), "{spec}: {e}");
        }
    }
}
