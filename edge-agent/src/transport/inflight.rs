//! Which sent batches await their acknowledgement, and how far the spool may be trimmed.
//!
//! Over gRPC acks come back in order; over MQTT a batch can be lost (broker restart) or
//! redelivered while a later one is acked. So an ack names its batch (`first_seq..=up_to_seq`)
//! and the spool is trimmed only across the oldest batches that are all acknowledged: a lost
//! batch holds the trim back until it is resent and acked.

use std::collections::VecDeque;
use std::time::Instant;

#[derive(Debug)]
struct Batch {
    first: u64,
    last: u64,
    sent_at: Instant,
    acked: bool,
}

#[derive(Debug, Default)]
pub struct InFlight {
    batches: VecDeque<Batch>,
}

impl InFlight {
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    pub fn sent(&mut self, first: u64, last: u64, now: Instant) {
        self.batches.push_back(Batch {
            first,
            last,
            sent_at: now,
            acked: false,
        });
    }

    /// Records the ack of batch `first..=last`; returns the seq the spool may now be trimmed
    /// to, when the oldest batches are all acknowledged.
    pub fn acked(&mut self, first: u64, last: u64) -> Option<u64> {
        if let Some(b) = self
            .batches
            .iter_mut()
            .find(|b| b.first == first && b.last == last)
        {
            b.acked = true;
        }
        let mut trim = None;
        while self.batches.front().is_some_and(|b| b.acked) {
            trim = self.batches.pop_front().map(|b| b.last);
        }
        trim
    }

    /// When the oldest unacknowledged batch was sent.
    pub fn oldest_unacked(&self) -> Option<Instant> {
        self.batches.iter().find(|b| !b.acked).map(|b| b.sent_at)
    }

    /// Forget everything (a reconnect resends from the spool's trim point).
    pub fn clear(&mut self) {
        self.batches.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_acks_trim_each_batch() {
        let now = Instant::now();
        let mut f = InFlight::default();
        f.sent(1, 10, now);
        f.sent(11, 20, now);
        assert_eq!(f.acked(1, 10), Some(10));
        assert_eq!(f.acked(11, 20), Some(20));
        assert!(f.is_empty());
    }

    #[test]
    fn a_lost_batch_holds_back_the_trim() {
        let now = Instant::now();
        let mut f = InFlight::default();
        f.sent(1, 10, now);
        f.sent(11, 20, now);
        f.sent(21, 30, now);
        assert_eq!(f.acked(11, 20), None, "batch 1..=10 is not acked yet");
        assert_eq!(f.acked(21, 30), None);
        assert_eq!(f.len(), 3);
        assert_eq!(f.oldest_unacked(), Some(now));
        assert_eq!(
            f.acked(1, 10),
            Some(30),
            "once the gap is acked, all three trim"
        );
        assert!(f.oldest_unacked().is_none());
    }

    #[test]
    fn unknown_or_repeated_acks_change_nothing() {
        let now = Instant::now();
        let mut f = InFlight::default();
        f.sent(5, 9, now);
        assert_eq!(f.acked(1, 4), None);
        assert_eq!(f.acked(5, 9), Some(9));
        assert_eq!(f.acked(5, 9), None);
    }
}
