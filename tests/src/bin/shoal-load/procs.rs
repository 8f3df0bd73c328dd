//! Memory and CPU of the hub (and a broker) during the run, sampled from /proc.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One reading of a process.
#[derive(Clone, Copy)]
pub struct Reading {
    /// ms from the run's start.
    pub at_ms: u32,
    pub pid: u32,
    pub rss_kib: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
}

/// Samples a process every 200 ms on a thread of its own; the pid may change (a restarted hub).
pub struct Watch {
    pub pid: Arc<AtomicU32>,
    readings: Arc<Mutex<Vec<Reading>>>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    pub fn start(pid: u32, t0: Instant) -> Self {
        let pid = Arc::new(AtomicU32::new(pid));
        let readings = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (pid, readings, done) = (pid.clone(), readings.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    let p = pid.load(Ordering::Relaxed);
                    if let Some((rss_kib, cpu_ticks)) = read(p) {
                        let at_ms = t0.elapsed().as_millis() as u32;
                        readings.lock().expect("readings").push(Reading {
                            at_ms,
                            pid: p,
                            rss_kib,
                            cpu_ticks,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        Self {
            pid,
            readings,
            done,
            thread: Some(thread),
        }
    }

    pub fn readings(&self) -> Vec<Reading> {
        self.readings.lock().expect("readings").clone()
    }

    /// The last reading at or before `ms`.
    pub fn rss_at(&self, ms: u32) -> Option<u64> {
        self.readings()
            .iter()
            .rev()
            .find(|r| r.at_ms <= ms)
            .map(|r| r.rss_kib)
    }

    pub fn peak_rss(&self) -> u64 {
        self.readings().iter().map(|r| r.rss_kib).max().unwrap_or(0)
    }

    /// CPU used between `from` and `to` (ms from the run's start), as a share of one core.
    pub fn cpu_between(&self, from: u32, to: u32) -> Option<f64> {
        let tick = rustix::param::clock_ticks_per_second() as f64;
        let rs: Vec<Reading> = self
            .readings()
            .into_iter()
            .filter(|r| r.at_ms >= from && r.at_ms <= to)
            .collect();
        let (first, last) = (rs.first()?, rs.last()?);
        if last.at_ms <= first.at_ms {
            return None;
        }
        // Summed per process, so a restart in between does not count backwards.
        let ticks: u64 = rs
            .windows(2)
            .filter(|w| w[0].pid == w[1].pid)
            .map(|w| w[1].cpu_ticks.saturating_sub(w[0].cpu_ticks))
            .sum();
        Some(ticks as f64 / tick / (f64::from(last.at_ms - first.at_ms) / 1000.0))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// (resident KiB, utime + stime ticks) of `pid`.
fn read(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields count from after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((rss, ticks))
}
