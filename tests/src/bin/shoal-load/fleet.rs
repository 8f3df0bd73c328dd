//! What one simulated device does, and what it keeps of how it went.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shoal_proto::v1::Sample;
use tokio::sync::{Notify, watch};

use crate::link::{Target, connect_retrying};

/// What every device shares: the run's clock, the stop signal, and how many have settled
/// (connected, or given up).
pub struct Ctx {
    pub t0: Instant,
    pub stop: watch::Receiver<bool>,
    pub settled: AtomicUsize,
    pub settled_changed: Notify,
}

impl Ctx {
    pub fn ms(&self) -> u32 {
        self.t0.elapsed().as_millis().min(u32::MAX as u128) as u32
    }

    fn settle(&self) {
        self.settled.fetch_add(1, Ordering::AcqRel);
        self.settled_changed.notify_waiters();
    }

    /// Waits until `n` devices have settled.
    pub async fn wait_settled(&self, n: usize) {
        loop {
            let changed = self.settled_changed.notified();
            if self.settled.load(Ordering::Acquire) >= n {
                return;
            }
            changed.await;
        }
    }
}

/// What one simulated device does.
pub struct Plan {
    pub target: Target,
    pub id: String,
    pub batch: usize,
    pub pause: Duration,
    /// When it starts connecting, from the run's start.
    pub start_at: Duration,
    /// Delay after connecting before the first batch, so devices do not send in lockstep.
    pub offset: Duration,
    pub deadline: Duration,
    /// The device's own certificate (with --tls).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub template: Sample,
    /// Samples a minute apart over this long before now, sent first (the first device only,
    /// with --history).
    pub history: Option<Duration>,
}

/// One acknowledged batch.
#[derive(Clone, Copy)]
pub struct AckRec {
    /// When the batch was sent, ms from the run's start.
    pub sent_ms: u32,
    pub latency_us: u32,
    pub samples: u32,
}

#[derive(Default)]
pub struct DeviceLog {
    /// From its first connection attempt to the hub's welcome, retries included.
    pub connect_ms: Option<u32>,
    pub attempts: u32,
    /// Why it stopped trying (connecting or reconnecting past the deadline, or a wrong ack).
    pub failed: Option<String>,
    pub acks: Vec<AckRec>,
    pub last_acked: u64,
    /// Samples resent after a lost connection that the hub already had (stored once).
    pub already_stored: u64,
    /// Acked samples the hub did not have when the device reconnected.
    pub lost: u64,
    /// When it lost its connection and when it had its next ack, ms from the run's start.
    pub outages: Vec<(u32, Option<u32>)>,
}

impl DeviceLog {
    pub fn delivered(&self) -> bool {
        self.failed.is_none() && !self.acks.is_empty() && self.lost == 0
    }
}

pub async fn device(plan: Plan, ctx: Arc<Ctx>) -> DeviceLog {
    let mut log = DeviceLog::default();
    let mut stop = ctx.stop.clone();
    tokio::time::sleep_until((ctx.t0 + plan.start_at).into()).await;
    let began = Instant::now();
    let (link, how) =
        connect_retrying(&plan.target, &plan.id, &plan.tls, plan.deadline, &mut stop).await;
    log.attempts = how.attempts;
    let Some((link, stored)) = link else {
        log.failed = Some(
            how.first_error
                .unwrap_or_else(|| "stopped before connecting".into()),
        );
        ctx.settle();
        return log;
    };
    log.connect_ms = Some(began.elapsed().as_millis() as u32);
    log.last_acked = stored;
    ctx.settle();

    let mut link = Some(link);
    let mut seq = stored;
    if let (Some(span), Some(current)) = (plan.history, link.as_mut()) {
        match send_history(current, &plan.template, span, plan.batch, seq).await {
            Ok(up_to) => {
                log.last_acked = up_to;
                seq = up_to;
            }
            Err(e) => {
                log.failed = Some(format!("sending history: {e}"));
                return log;
            }
        }
    }
    let mut pending: Option<Vec<Sample>> = None;
    tokio::select! {
        _ = tokio::time::sleep(plan.offset) => {}
        Ok(_) = stop.wait_for(|s| *s) => return log,
    }
    loop {
        let Some(current) = link.as_mut() else {
            // The hub went away: reconnect as the agent would, then resend what was not acked.
            let (again, how) =
                connect_retrying(&plan.target, &plan.id, &plan.tls, plan.deadline, &mut stop).await;
            log.attempts += how.attempts;
            match again {
                Some((l, stored)) => {
                    log.lost += log.last_acked.saturating_sub(stored);
                    link = Some(l);
                    continue;
                }
                None if *stop.borrow() && pending.is_none() => break,
                None => {
                    log.failed = Some(format!(
                        "reconnecting: {}",
                        how.first_error.unwrap_or_else(|| "stopped".into())
                    ));
                    break;
                }
            }
        };
        if pending.is_none() {
            if *stop.borrow() {
                break;
            }
            let ts = crate::now_ms();
            pending = Some(
                (0..plan.batch)
                    .map(|_| {
                        seq += 1;
                        Sample {
                            seq,
                            timestamp_ms: ts,
                            ..plan.template.clone()
                        }
                    })
                    .collect(),
            );
        }
        let batch = pending.clone().unwrap_or_default();
        let sent = Instant::now();
        let sent_ms = ctx.ms();
        match current.send(batch).await {
            Err(_) => {
                log.outages.push((ctx.ms(), None));
                link = None;
                continue;
            }
            Ok(ack) if ack.up_to_seq != seq => {
                log.failed = Some(format!(
                    "the ack up to {} does not cover the batch up to {seq}",
                    ack.up_to_seq
                ));
                break;
            }
            Ok(ack) => {
                log.already_stored += (plan.batch as u64).saturating_sub(u64::from(ack.accepted));
                log.acks.push(AckRec {
                    sent_ms,
                    latency_us: sent.elapsed().as_micros().min(u32::MAX as u128) as u32,
                    samples: plan.batch as u32,
                });
                if let Some(last) = log.outages.last_mut()
                    && last.1.is_none()
                {
                    last.1 = Some(ctx.ms());
                }
                log.last_acked = seq;
                pending = None;
            }
        }
        if *stop.borrow() {
            break;
        }
        if !plan.pause.is_zero() {
            let closed = tokio::select! {
                _ = tokio::time::sleep(plan.pause) => false,
                _ = current.closed() => true,
                Ok(_) = stop.wait_for(|s| *s) => break,
            };
            if closed {
                log.outages.push((ctx.ms(), None));
                link = None;
            }
        }
    }
    log
}

/// Sends samples a minute apart over the `span` before now, with readings that wander like a
/// working machine's (a daily cycle and some noise), in batches of at least 500; returns the
/// last seq acked.
async fn send_history(
    link: &mut crate::link::Link,
    template: &Sample,
    span: Duration,
    batch: usize,
    after_seq: u64,
) -> Result<u64, String> {
    let now = crate::now_ms();
    let n = span.as_secs() / 60;
    let mut seq = after_seq;
    let mut i = 0u64;
    while i < n {
        let samples: Vec<Sample> = (i..(i + batch.max(500) as u64).min(n))
            .map(|k| {
                seq += 1;
                let ts = now - ((n - k) * 60_000) as i64;
                let day = (ts as f64 / 86_400_000.0) * std::f64::consts::TAU;
                let wobble = ((k * 7919) % 100) as f64 / 100.0;
                let mut s = Sample {
                    seq,
                    timestamp_ms: ts,
                    ..template.clone()
                };
                if let Some(c) = s.cpu.as_mut() {
                    c.total_percent = 35.0 + 25.0 * day.sin() + 10.0 * wobble;
                }
                if let Some(l) = s.load.as_mut() {
                    l.one = 1.5 + day.sin() + wobble;
                }
                if let Some(m) = s.memory.as_mut() {
                    m.used_bytes = ((8.0 + 3.0 * day.cos() + wobble) * (1u64 << 30) as f64) as u64;
                }
                for t in &mut s.temperatures {
                    t.celsius = 50.0 + 8.0 * day.sin() + 3.0 * wobble;
                }
                for n in &mut s.networks {
                    n.rx_bytes_per_second = 20_000.0 * (1.0 + day.sin()) + 5_000.0 * wobble;
                }
                s
            })
            .collect();
        i += samples.len() as u64;
        let ack = link.send(samples).await.map_err(|e| e.to_string())?;
        if ack.up_to_seq != seq {
            return Err(format!(
                "the ack up to {} does not cover {seq}",
                ack.up_to_seq
            ));
        }
    }
    Ok(seq)
}
