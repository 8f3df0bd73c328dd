//! How many new connections do their opening work at once.
//!
//! A hub restart, or a network coming back, is a storm: thousands of devices reconnecting
//! within a second or two. Each opening (a TLS handshake, the HTTP/2 or MQTT handshake, the
//! device's hello) is a few tasks' worth of work. Spawned as they are accepted, all of them
//! sit in the runtime's run queue at once, ahead of the acks of the devices that were already
//! connected, which then wait for most of the storm.
//!
//! [`Admission`] lets a fixed number of openings run at a time. The rest wait for a slot in
//! arrival order, outside the run queue, so a connected device's work waits behind at most
//! that many openings. It is not a rate: when the machine has time, openings go as fast as
//! before.
//!
//! A connection asks for a slot only once its peer has sent something (see
//! [`first_bytes`]), so sockets that never speak hold none. A slot goes back when the opening
//! is done, or after [`HOLD`] in any case, so a peer that speaks and then stalls holds one for
//! at most that long. Done is when the device has its welcome: on gRPC the answer to the
//! connection's first request; on MQTT the first message the broker delivers to the client,
//! which for an agent is the hub's welcome. A TLS handshake takes a slot of its own first.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Openings under way at once, over every door. Small enough that a connected device's ack
/// waits behind little; large enough to cover the round trips an opening waits on.
pub const SLOTS: usize = 64;

/// The longest one opening keeps its slot. A slow opening goes on without it.
pub const HOLD: Duration = Duration::from_secs(1);

/// How long an accepted connection may stay silent before it is dropped, unadmitted.
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(10);

/// The slots, shared by every door of one hub.
#[derive(Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
}

/// One opening's slot; dropping it frees the slot.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    /// When [`HOLD`] runs out (boxed: a connection keeps its slot only while it opens).
    hold: Pin<Box<Sleep>>,
}

impl Admission {
    pub fn new(slots: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots.max(1))),
        }
    }

    /// Waits for a free slot, in arrival order.
    pub async fn slot(&self) -> Slot {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the admission semaphore is never closed");
        Slot {
            _permit: permit,
            hold: Box::pin(tokio::time::sleep(HOLD)),
        }
    }

    /// Runs `opening` once a slot is free, and frees it when `opening` completes or after
    /// [`HOLD`], whichever comes first.
    pub async fn open<F: Future>(&self, opening: F) -> F::Output {
        let mut slot = Some(self.slot().await);
        holding(&mut slot, opening).await
    }

    /// Slots free right now.
    pub fn free(&self) -> usize {
        self.slots.available_permits()
    }
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(SLOTS)
    }
}

/// Runs `work`; should `slot` still be held when its [`HOLD`] runs out, frees it and lets
/// `work` go on without it.
pub async fn holding<F: Future>(slot: &mut Option<Slot>, work: F) -> F::Output {
    let mut work = pin!(work);
    tokio::select! {
        out = &mut work => return out,
        _ = hold_over(slot) => {}
    }
    *slot = None;
    work.await
}

/// Completes when a held slot's [`HOLD`] has run out; never while none is held.
pub async fn hold_over(slot: &mut Option<Slot>) {
    match slot {
        Some(s) => s.hold.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Waits until `stream`'s peer has sent its first bytes (or closed), for at most
/// [`FIRST_BYTES_WITHIN`]; false (logged) when it stayed silent that long, and the caller
/// drops it.
pub async fn first_bytes(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    let spoke = matches!(
        tokio::time::timeout(FIRST_BYTES_WITHIN, stream.peek(&mut first)).await,
        Ok(Ok(_))
    );
    if !spoke {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::debug!(%peer, "client sent nothing; dropped");
    }
    spoke
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_more_openings_run_at_once_than_there_are_slots() {
        let admission = Admission::new(2);
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (admission, running, most) = (admission.clone(), running.clone(), most.clone());
            tasks.spawn(async move {
                admission
                    .open(async {
                        use std::sync::atomic::Ordering::SeqCst;
                        let now = running.fetch_add(1, SeqCst) + 1;
                        most.fetch_max(now, SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        running.fetch_sub(1, SeqCst);
                    })
                    .await
            });
        }
        while tasks.join_next().await.is_some() {}
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(admission.free(), 2);
    }

    #[tokio::test]
    async fn a_stalled_opening_gives_its_slot_back_after_the_hold() {
        let admission = Admission::new(1);
        let stalled = tokio::spawn({
            let admission = admission.clone();
            async move {
                admission.open(tokio::time::sleep(HOLD * 3)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            admission.free(),
            0,
            "the stalled opening holds the only slot"
        );
        let started = std::time::Instant::now();
        admission.open(async {}).await;
        let waited = started.elapsed();
        assert!(
            waited < HOLD * 2,
            "the next opening waited {waited:?}, not about HOLD"
        );
        assert!(!stalled.is_finished(), "the stalled opening itself goes on");
        stalled.abort();
    }

    #[tokio::test]
    async fn a_silent_socket_is_not_admitted_and_one_that_speaks_is() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut speaker = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let waiting = tokio::spawn(async move { first_bytes(&accepted).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "nothing sent yet");
        speaker.write_all(b"\x10").await.unwrap();
        assert!(waiting.await.unwrap());
    }
}
