//! The CronJob controller's decision, as a pure function of the schedule, the job's settings,
//! its last scheduled time, the clock and what is running — following the Kubernetes
//! documentation point by point:
//!
//! - the start considered is the **most recent** missed schedule time since the last one (or
//!   since the job was created); older missed starts are not run one by one;
//! - with `startingDeadlineSeconds`, only schedule times within that many seconds of now count,
//!   and a start found later than its deadline is skipped and recorded as missed;
//! - more than 100 missed schedule times in that window: the job is not started, with the
//!   documented error (set or decrease `startingDeadlineSeconds`). Shoal's opt-in
//!   [`MissedStarts::RunLatest`] instead runs the most recent one and records the count — the
//!   Kubernetes rule leaves a job that was paused or down for long never running again;
//! - `concurrencyPolicy`: `Allow` starts beside active runs, `Forbid` skips while one is
//!   active, `Replace` stops the active runs and starts the new one;
//! - `suspend`: no new starts; active runs go on.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;

use super::cron::Schedule;

/// Kubernetes allows at most this many missed start times before refusing.
pub const MAX_MISSED: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrency {
    #[default]
    Allow,
    Forbid,
    Replace,
}

/// What to do with more than [`MAX_MISSED`] missed starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissedStarts {
    /// Kubernetes: do not start; record the error.
    #[default]
    Refuse,
    /// Shoal (annotation `shoal.dev/missed-starts: run-latest`): start the most recent one.
    RunLatest,
}

#[derive(Debug, Clone)]
pub struct JobPolicy {
    pub schedule: Schedule,
    pub time_zone: Tz,
    pub concurrency: Concurrency,
    pub starting_deadline: Option<Duration>,
    pub suspend: bool,
    pub missed_starts: MissedStarts,
}

/// What the controller does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is due.
    Wait,
    /// Start a run for `scheduled`; with `replace`, stop the active runs first.
    Start {
        scheduled: DateTime<Utc>,
        replace: bool,
        missed: usize,
    },
    /// The start for `scheduled` is not made, and why (recorded in the run history).
    Skip {
        scheduled: DateTime<Utc>,
        reason: String,
    },
    /// More than 100 missed starts: nothing starts (Kubernetes' rule).
    TooManyMissed { missed: usize },
}

/// The most recent schedule time in `(earliest, now]` and how many there were (counting stops
/// past [`MAX_MISSED`] + 1).
fn most_recent(
    p: &JobPolicy,
    earliest: DateTime<Utc>,
    now: DateTime<Utc>,
) -> (Option<DateTime<Utc>>, usize) {
    let mut last = None;
    let mut count = 0;
    let mut t = earliest;
    while let Some(next) = p.schedule.next_after(t, p.time_zone) {
        if next > now {
            break;
        }
        count += 1;
        last = Some(next);
        t = next;
        if count > MAX_MISSED && p.missed_starts == MissedStarts::Refuse {
            break;
        }
    }
    if count > MAX_MISSED && p.missed_starts == MissedStarts::RunLatest {
        // Jump to the latest directly instead of walking every missed minute further.
        last = latest_before(p, now);
    }
    (last, count)
}

/// The last schedule time at or before `now`, found by stepping back in growing windows.
fn latest_before(p: &JobPolicy, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut window = Duration::hours(1);
    while window <= Duration::days(366 * 5) {
        let mut t = now - window;
        let mut last = None;
        while let Some(next) = p.schedule.next_after(t, p.time_zone) {
            if next > now {
                break;
            }
            last = Some(next);
            t = next;
        }
        if last.is_some() {
            return last;
        }
        window = window * 4;
    }
    None
}

/// Decides at `now`. `last_scheduled`: the schedule time of the last start (or the job's
/// creation time when it never ran); `active`: runs still going.
pub fn decide(
    p: &JobPolicy,
    last_scheduled: DateTime<Utc>,
    now: DateTime<Utc>,
    active: usize,
) -> Decision {
    if p.suspend {
        return Decision::Wait;
    }
    let window_start = match p.starting_deadline {
        Some(deadline) => last_scheduled.max(now - deadline),
        None => last_scheduled,
    };
    let (scheduled, missed) = most_recent(p, window_start, now);
    if missed > MAX_MISSED && p.missed_starts == MissedStarts::Refuse {
        return Decision::TooManyMissed { missed };
    }
    let Some(scheduled) = scheduled else {
        // Nothing within the deadline; a start that fell before it was missed: say so once
        // (the caller records it as the last schedule time).
        if let Some(deadline) = p.starting_deadline
            && let Some(missed_at) = latest_before(p, window_start).filter(|t| *t > last_scheduled)
        {
            return Decision::Skip {
                scheduled: missed_at,
                reason: format!(
                    "missed its starting deadline of {}s",
                    deadline.num_seconds()
                ),
            };
        }
        return Decision::Wait;
    };
    match (p.concurrency, active) {
        (Concurrency::Forbid, n) if n > 0 => Decision::Skip {
            scheduled,
            reason: format!("concurrencyPolicy Forbid and {n} run(s) still active"),
        },
        (Concurrency::Replace, n) => Decision::Start {
            scheduled,
            replace: n > 0,
            missed,
        },
        _ => Decision::Start {
            scheduled,
            replace: false,
            missed,
        },
    }
}

/// When to look again: the next schedule time after `now`.
pub fn next_wakeup(p: &JobPolicy, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    p.schedule.next_after(now, p.time_zone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn hourly() -> JobPolicy {
        JobPolicy {
            schedule: Schedule::parse("1 * * * *").unwrap(),
            time_zone: Tz::UTC,
            concurrency: Concurrency::Allow,
            starting_deadline: None,
            suspend: false,
            missed_starts: MissedStarts::Refuse,
        }
    }

    #[test]
    fn starts_when_due_and_waits_otherwise() {
        let p = hourly();
        assert_eq!(
            decide(
                &p,
                at("2026-11-23T10:01:00Z"),
                at("2026-11-23T10:30:00Z"),
                0
            ),
            Decision::Wait
        );
        assert_eq!(
            decide(
                &p,
                at("2026-11-23T10:01:00Z"),
                at("2026-11-23T11:01:00Z"),
                0
            ),
            Decision::Start {
                scheduled: at("2026-11-23T11:01:00Z"),
                replace: false,
                missed: 1
            }
        );
        assert_eq!(
            next_wakeup(&p, at("2026-11-23T11:01:00Z")),
            Some(at("2026-11-23T12:01:00Z"))
        );
    }

    #[test]
    fn after_downtime_only_the_most_recent_missed_start_runs() {
        let p = hourly();
        // The hub was down from 10:30 to 15:10: 11:01 … 15:01 were missed; one run, for 15:01.
        assert_eq!(
            decide(
                &p,
                at("2026-11-23T10:01:00Z"),
                at("2026-11-23T15:10:00Z"),
                0
            ),
            Decision::Start {
                scheduled: at("2026-11-23T15:01:00Z"),
                replace: false,
                missed: 5
            }
        );
    }

    #[test]
    fn starting_deadline_skips_a_late_start() {
        let p = JobPolicy {
            starting_deadline: Some(Duration::seconds(300)),
            ..hourly()
        };
        // 15:01 is 9 minutes old at 15:10: past the 5-minute deadline: skipped and recorded.
        assert_eq!(
            decide(
                &p,
                at("2026-11-23T10:01:00Z"),
                at("2026-11-23T15:10:00Z"),
                0
            ),
            Decision::Skip {
                scheduled: at("2026-11-23T15:01:00Z"),
                reason: "missed its starting deadline of 300s".into()
            }
        );
        // Once recorded (last schedule = 15:01), nothing more until 16:01.
        assert_eq!(
            decide(
                &p,
                at("2026-11-23T15:01:00Z"),
                at("2026-11-23T15:10:00Z"),
                0
            ),
            Decision::Wait
        );
        // Within the deadline it starts.
        assert!(matches!(
            decide(
                &p,
                at("2026-11-23T10:01:00Z"),
                at("2026-11-23T15:04:00Z"),
                0
            ),
            Decision::Start { .. }
        ));
    }

    #[test]
    fn concurrency_policies() {
        let due = (at("2026-11-23T10:01:00Z"), at("2026-11-23T11:01:30Z"));
        let forbid = JobPolicy {
            concurrency: Concurrency::Forbid,
            ..hourly()
        };
        assert!(
            matches!(decide(&forbid, due.0, due.1, 1), Decision::Skip { reason, .. } if reason.contains("Forbid"))
        );
        assert!(matches!(
            decide(&forbid, due.0, due.1, 0),
            Decision::Start { replace: false, .. }
        ));
        let replace = JobPolicy {
            concurrency: Concurrency::Replace,
            ..hourly()
        };
        assert!(matches!(
            decide(&replace, due.0, due.1, 2),
            Decision::Start { replace: true, .. }
        ));
        assert!(matches!(
            decide(&hourly(), due.0, due.1, 3),
            Decision::Start { replace: false, .. }
        ));
    }

    #[test]
    fn suspend_stops_new_starts() {
        let p = JobPolicy {
            suspend: true,
            ..hourly()
        };
        assert_eq!(
            decide(
                &p,
                at("2026-11-23T10:01:00Z"),
                at("2026-11-23T12:00:00Z"),
                1
            ),
            Decision::Wait
        );
    }

    #[test]
    fn more_than_100_missed_starts_refuse_unless_opted_in() {
        let every_minute = JobPolicy {
            schedule: Schedule::parse("* * * * *").unwrap(),
            ..hourly()
        };
        let last = at("2026-11-23T10:00:00Z");
        let now = at("2026-11-23T12:00:30Z"); // 120 missed minutes
        assert_eq!(
            decide(&every_minute, last, now, 0),
            Decision::TooManyMissed { missed: 101 }
        );
        // Kubernetes' own way out: a starting deadline narrows the window.
        let with_deadline = JobPolicy {
            starting_deadline: Some(Duration::seconds(600)),
            ..every_minute.clone()
        };
        assert!(matches!(
            decide(&with_deadline, last, now, 0),
            Decision::Start { scheduled, .. } if scheduled == at("2026-11-23T12:00:00Z")
        ));
        // Shoal's opt-in: run the latest and say how many were missed.
        let run_latest = JobPolicy {
            missed_starts: MissedStarts::RunLatest,
            ..every_minute
        };
        assert_eq!(
            decide(&run_latest, last, now, 0),
            Decision::Start {
                scheduled: at("2026-11-23T12:00:00Z"),
                replace: false,
                missed: 120
            }
        );
    }
}
