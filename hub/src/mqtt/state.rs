//! The embedded broker's sessions and routing, without I/O: connections register a bounded
//! queue, and routing a publish does nothing but push messages into those queues (or keep them
//! for offline persistent sessions). Routing never waits, so a subscriber that stops reading
//! slows neither its publishers nor the hub's ingest; what it cannot take is dropped or cuts
//! its connection, and counted (see [`Sessions::route`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttc::mqttbytes::has_wildcards;
use rumqttc::{Publish, QoS, matches};
use tokio::sync::{Notify, oneshot, watch};

use crate::metrics::{Metrics, MqttDrop};

/// Messages one connection's queue holds at most. A subscriber that keeps up holds a handful;
/// 1,024 absorbs a burst (a fleet flushing its spools after an outage reaches an observer of
/// every device's telemetry at once) without cutting a healthy client, while one that stopped
/// reading pins this many messages instead of everything published since.
pub const QUEUE_MESSAGES: usize = 1024;

/// Bytes of topics and payloads one connection's queue holds at most: a message may be as
/// large as the hub's message limit (4 MiB by default), and 1,024 of those would be 4 GiB.
/// 8 MiB is tens of seconds of a large fleet's telemetry.
pub const QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// QoS 1 messages sent to one connection and not yet acknowledged, at most. With a full
/// window the connection takes nothing more from its queue until PUBACKs arrive, so a client
/// that reads but never acknowledges fills its queue and is cut like one that does not read;
/// 128 keeps a link with a long round trip busy. Also well below the 65,535 packet ids, so an
/// id is never reused while its message is unacknowledged.
pub const MAX_INFLIGHT: usize = 128;

/// Bytes of unacknowledged QoS 1 messages one connection holds at most (same reason as
/// [`QUEUE_BYTES`]).
pub const MAX_INFLIGHT_BYTES: usize = 8 * 1024 * 1024;

/// QoS 1 messages kept for one persistent session while it is offline (or being cut), at
/// most; beyond it the oldest are dropped, and counted.
pub const MAX_QUEUED: usize = 10_000;

/// Bytes of topics and payloads kept for one persistent session, at most (same policy).
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// A message for one subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// The packet id this QoS 1 message was last sent with and not acknowledged under (0:
    /// never sent). A persistent session's next connection resends it under the same id, with
    /// DUP set (MQTT 3.1.1 §4.4).
    pub pkid: u16,
}

impl Outgoing {
    pub fn new(topic: &str, payload: Bytes, qos: QoS) -> Self {
        Self {
            topic: topic.to_string(),
            payload,
            qos,
            pkid: 0,
        }
    }

    /// What the message weighs against the byte limits.
    fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

/// Why a connection is told to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Another connection took over its client id.
    TakenOver,
    /// Its queue was full when a QoS 1 message came for it.
    TooSlow,
}

/// One connection's queue. It allocates nothing until a message comes and gives its room back
/// once emptied after a burst: most of a fleet's connections are devices that publish and
/// never receive, and each holds one of these.
#[derive(Debug, Default)]
struct Mailbox {
    state: Mutex<Mail>,
    /// Wakes the connection task when a message arrives or the session lets go of it.
    ready: Notify,
}

#[derive(Debug, Default)]
struct Mail {
    messages: VecDeque<Outgoing>,
    /// Topic and payload bytes in `messages`.
    bytes: usize,
    /// The connection stopped taking messages, or its session let go of it.
    closed: bool,
}

/// Room a queue keeps after it empties; beyond it, the room goes back.
const QUEUE_KEEP: usize = 16;

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Mail> {
        self.state.lock().expect("queue lock")
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }
}

impl Mail {
    fn pop(&mut self) -> Option<Outgoing> {
        let m = self.messages.pop_front()?;
        self.bytes -= m.size();
        if self.messages.is_empty() && self.messages.capacity() > QUEUE_KEEP {
            self.messages = VecDeque::new();
        }
        Some(m)
    }
}

/// The sending side of one connection, held by its session.
#[derive(Debug)]
pub struct Outbox {
    queue: Arc<Mailbox>,
    kick: Option<oneshot::Sender<Kick>>,
    /// Why the connection was told to go, once it was.
    kicked: Option<Kick>,
    /// Closes when the connection task has ended.
    alive: watch::Receiver<()>,
}

/// The connection task's side: its queue, the kick, and a guard that tells a connection
/// taking over the client id when this one has handed its messages back.
pub struct Link {
    pub inbox: Inbox,
    pub kicked: oneshot::Receiver<Kick>,
    pub alive: watch::Sender<()>,
}

/// The receiving end of one connection's queue.
pub struct Inbox {
    queue: Arc<Mailbox>,
}

/// A new connection's queue: the [`Outbox`] goes to [`Sessions::connect`], the [`Link`] stays
/// with the connection task.
pub fn new_link() -> (Outbox, Link) {
    let queue = Arc::new(Mailbox::default());
    let (kick_tx, kick_rx) = oneshot::channel();
    let (alive_tx, alive_rx) = watch::channel(());
    (
        Outbox {
            queue: queue.clone(),
            kick: Some(kick_tx),
            kicked: None,
            alive: alive_rx,
        },
        Link {
            inbox: Inbox { queue },
            kicked: kick_rx,
            alive: alive_tx,
        },
    )
}

impl Outbox {
    /// Queues `m` unless the queue is full (by count or bytes) or closed; never waits.
    fn try_send(&self, m: Outgoing) -> Result<(), Outgoing> {
        let size = m.size();
        let mut q = self.queue.lock();
        // One message larger than the byte limit still goes to an empty queue.
        if q.closed
            || q.messages.len() >= QUEUE_MESSAGES
            || (q.bytes > 0 && q.bytes + size > QUEUE_BYTES)
        {
            return Err(m);
        }
        q.bytes += size;
        q.messages.push_back(m);
        drop(q);
        self.queue.ready.notify_one();
        Ok(())
    }

    fn kick(&mut self, why: Kick) {
        if let Some(tx) = self.kick.take() {
            self.kicked = Some(why);
            let _ = tx.send(why);
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.queue.close();
    }
}

impl Inbox {
    /// The next message; `None` once the queue is closed and empty.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            {
                let mut q = self.queue.lock();
                if let Some(m) = q.pop() {
                    return Some(m);
                }
                if q.closed {
                    return None;
                }
            }
            // A message pushed since the check left a permit: this returns at once.
            self.queue.ready.notified().await;
        }
    }

    /// The next message if one is queued.
    #[cfg(test)]
    fn try_recv(&mut self) -> Option<Outgoing> {
        self.queue.lock().pop()
    }

    /// Closes the queue and returns what it still held. Call it with the sessions locked, so
    /// nothing is routed into it meanwhile.
    pub fn drain(&mut self) -> Vec<Outgoing> {
        let mut q = self.queue.lock();
        q.closed = true;
        q.bytes = 0;
        std::mem::take(&mut q.messages).into()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// One connection's QoS 1 messages sent and not yet acknowledged, in the order sent.
#[derive(Debug, Default)]
pub struct Inflight {
    sent: VecDeque<Outgoing>,
    bytes: usize,
    last_pkid: u16,
}

impl Inflight {
    /// May another message be sent before some are acknowledged?
    pub fn has_room(&self) -> bool {
        self.sent.len() < MAX_INFLIGHT && self.bytes < MAX_INFLIGHT_BYTES
    }

    /// The PUBLISH packet that sends `m`; a QoS 1 message is kept until acknowledged. One sent
    /// before (to an earlier connection of a persistent session) goes with DUP set and, as
    /// MQTT 3.1.1 §4.4 requires, under its original packet id.
    pub fn publish(&mut self, mut m: Outgoing) -> Publish {
        let mut p = Publish::from_bytes(m.topic.clone(), m.qos, m.payload.clone());
        if m.qos == QoS::AtMostOnce {
            return p;
        }
        p.dup = m.pkid != 0;
        // The original id is taken only if some other message of this connection holds it
        // (a session resumed after an earlier connection's leftovers); the message then goes
        // under a new one, still marked DUP.
        if m.pkid == 0 || self.in_use(m.pkid) {
            m.pkid = self.free_pkid();
        }
        p.pkid = m.pkid;
        self.bytes += m.size();
        self.sent.push_back(m);
        p
    }

    /// A PUBACK for `pkid`; false if nothing was waiting for it.
    pub fn ack(&mut self, pkid: u16) -> bool {
        let Some(i) = self.sent.iter().position(|m| m.pkid == pkid) else {
            return false;
        };
        if let Some(m) = self.sent.remove(i) {
            self.bytes -= m.size();
        }
        true
    }

    /// The messages still unacknowledged, oldest first, each with the packet id it went with.
    pub fn into_unacked(self) -> Vec<Outgoing> {
        self.sent.into()
    }

    fn in_use(&self, pkid: u16) -> bool {
        self.sent.iter().any(|m| m.pkid == pkid)
    }

    fn free_pkid(&mut self) -> u16 {
        // At most MAX_INFLIGHT ids are in use, so this ends within MAX_INFLIGHT + 1 steps.
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            if !self.in_use(self.last_pkid) {
                return self.last_pkid;
            }
        }
    }
}

/// QoS 1 messages kept for a persistent session, bounded by [`MAX_QUEUED`] and
/// [`MAX_QUEUED_BYTES`]: the oldest go first.
#[derive(Debug, Default)]
struct Queue {
    messages: VecDeque<Outgoing>,
    bytes: usize,
}

impl Queue {
    /// Adds `m` at the back; returns how many old messages were dropped for it.
    fn push(&mut self, m: Outgoing) -> u64 {
        self.bytes += m.size();
        self.messages.push_back(m);
        self.trim()
    }

    /// Puts `older` (oldest first) before everything queued; returns how many were dropped.
    fn prepend(&mut self, older: Vec<Outgoing>) -> u64 {
        for m in older.into_iter().rev() {
            self.bytes += m.size();
            self.messages.push_front(m);
        }
        self.trim()
    }

    fn trim(&mut self) -> u64 {
        let mut dropped = 0;
        while self.messages.len() > MAX_QUEUED
            || (self.bytes > MAX_QUEUED_BYTES && self.messages.len() > 1)
        {
            let Some(m) = self.messages.pop_front() else {
                break;
            };
            self.bytes -= m.size();
            dropped += 1;
        }
        dropped
    }

    fn take(&mut self) -> Vec<Outgoing> {
        self.bytes = 0;
        self.messages.drain(..).collect()
    }
}

#[derive(Debug)]
struct Session {
    subscriptions: Vec<(String, QoS)>,
    conn: Option<(u64, Outbox)>,
    queued: Queue,
    clean: bool,
}

#[derive(Debug, Default)]
pub struct Sessions {
    sessions: HashMap<String, Session>,
    /// Which clients hold each filter, so routing looks up candidates instead of scanning
    /// every session: exact topics (a device's acks) by key, wildcard filters in a short list.
    exact: HashMap<String, HashSet<String>>,
    wildcard: HashMap<String, HashSet<String>>,
    next_conn: u64,
    /// Where dropped messages and cut subscribers are counted.
    metrics: Arc<Metrics>,
}

/// The result of a CONNECT.
pub struct Connected {
    pub conn_id: u64,
    pub session_present: bool,
    /// Messages that waited for this persistent session, oldest first: first those an earlier
    /// connection left unacknowledged (with their packet ids), then those it never got.
    pub queued: Vec<Outgoing>,
}

impl Sessions {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    fn index(&mut self, filter: &str) -> &mut HashMap<String, HashSet<String>> {
        if has_wildcards(filter) {
            &mut self.wildcard
        } else {
            &mut self.exact
        }
    }

    fn unindex(&mut self, client_id: &str, filter: &str) {
        let index = self.index(filter);
        if let Some(clients) = index.get_mut(filter) {
            clients.remove(client_id);
            if clients.is_empty() {
                index.remove(filter);
            }
        }
    }

    /// Forgets a session and its subscriptions.
    fn remove(&mut self, client_id: &str) -> Option<Session> {
        let session = self.sessions.remove(client_id)?;
        for (f, _) in &session.subscriptions {
            self.unindex(client_id, f);
        }
        Some(session)
    }

    /// Tells the connection holding `client_id`, if any, to go. The returned receiver closes
    /// once that connection has handed its unacknowledged messages back to the session, which
    /// a new connection of a persistent session waits for before [`Sessions::connect`] so that
    /// it resends them.
    pub fn take_over(&mut self, client_id: &str) -> Option<watch::Receiver<()>> {
        let (_, outbox) = self.sessions.get_mut(client_id)?.conn.as_mut()?;
        outbox.kick(Kick::TakenOver);
        Some(outbox.alive.clone())
    }

    /// Binds `client_id` to a new connection, kicking any older one.
    pub fn connect(&mut self, client_id: &str, clean: bool, outbox: Outbox) -> Connected {
        self.next_conn += 1;
        let conn_id = self.next_conn;
        if clean
            && let Some(old) = self.remove(client_id)
            && let Some((_, mut old)) = old.conn
        {
            old.kick(Kick::TakenOver);
        }
        let present = self.sessions.contains_key(client_id);
        let session = self
            .sessions
            .entry(client_id.to_string())
            .or_insert_with(|| Session {
                subscriptions: Vec::new(),
                conn: None,
                queued: Queue::default(),
                clean,
            });
        if let Some((_, mut old)) = session.conn.take() {
            old.kick(Kick::TakenOver);
        }
        session.clean = clean;
        session.conn = Some((conn_id, outbox));
        Connected {
            conn_id,
            session_present: present,
            queued: session.queued.take(),
        }
    }

    /// The connection ended. `unsent`, oldest first: what it left unacknowledged, never sent,
    /// or still had queued. A persistent session keeps the QoS 1 ones for its next connection.
    pub fn disconnect(&mut self, client_id: &str, conn_id: u64, unsent: Vec<Outgoing>) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        // A stale connection (one replaced after the take-over wait ran out) hands back nothing.
        if session.conn.as_ref().is_none_or(|(id, _)| *id != conn_id) {
            return;
        }
        let kicked = session.conn.take().and_then(|(_, outbox)| outbox.kicked);
        if session.clean {
            if kicked == Some(Kick::TooSlow) {
                let lost = unsent
                    .iter()
                    .filter(|m| m.qos == QoS::AtLeastOnce && m.pkid == 0)
                    .count();
                self.metrics
                    .drop_mqtt(MqttDrop::SlowSubscriber, lost as u64);
            }
            self.remove(client_id);
        } else {
            let kept = unsent
                .into_iter()
                .filter(|m| m.qos == QoS::AtLeastOnce)
                .collect();
            let dropped = session.queued.prepend(kept);
            self.metrics.drop_mqtt(MqttDrop::SessionQueueFull, dropped);
        }
    }

    pub fn subscribe(&mut self, client_id: &str, filter: &str, qos: QoS) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        s.subscriptions.retain(|(f, _)| f != filter);
        s.subscriptions.push((filter.to_string(), qos));
        self.index(filter)
            .entry(filter.to_string())
            .or_default()
            .insert(client_id.to_string());
    }

    pub fn unsubscribe(&mut self, client_id: &str, filter: &str) {
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.subscriptions.retain(|(f, _)| f != filter);
        }
        self.unindex(client_id, filter);
    }

    /// Delivers a publish to every matching subscription (at the lower of the two QoS),
    /// without ever waiting for a subscriber.
    ///
    /// A subscriber whose queue is full loses QoS 0 messages (nothing was promised for them).
    /// A QoS 1 message for it cuts its connection instead of being dropped: the broker
    /// accepted it for at-least-once delivery, and dropping it while the client believes it
    /// is subscribed would break that silently. Cut, the client learns it fell behind; a
    /// persistent session keeps what it missed (bounded by [`MAX_QUEUED`]) for its next
    /// connection, a clean one keeps nothing by definition. Waiting for the subscriber
    /// instead would slow every publisher, and the hub's ingest, down to the slowest reader.
    pub fn route(&mut self, topic: &str, payload: &Bytes, qos: QoS) {
        let mut candidates: Vec<String> = self
            .exact
            .get(topic)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default();
        for (filter, clients) in &self.wildcard {
            if matches(topic, filter) {
                candidates.extend(clients.iter().cloned());
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        for client_id in candidates {
            let Some(session) = self.sessions.get_mut(&client_id) else {
                continue;
            };
            let Some(sub_qos) = session
                .subscriptions
                .iter()
                .filter(|(f, _)| matches(topic, f))
                .map(|(_, q)| *q)
                .max_by_key(|q| *q as u8)
            else {
                continue;
            };
            let qos = if (sub_qos as u8) < (qos as u8) {
                sub_qos
            } else {
                qos
            };
            let msg = Outgoing::new(topic, payload.clone(), qos);
            let refused = match &mut session.conn {
                Some((_, outbox)) if outbox.kicked.is_none() => match outbox.try_send(msg) {
                    Ok(()) => continue,
                    Err(_) if qos == QoS::AtMostOnce => {
                        self.metrics.drop_mqtt(MqttDrop::QueueFullQos0, 1);
                        continue;
                    }
                    Err(msg) => {
                        outbox.kick(Kick::TooSlow);
                        self.metrics.mqtt_slow_disconnects.inc();
                        msg
                    }
                },
                // Offline, or told to go and not gone yet.
                _ => msg,
            };
            if !session.clean && qos == QoS::AtLeastOnce {
                let dropped = session.queued.push(refused);
                self.metrics.drop_mqtt(MqttDrop::SessionQueueFull, dropped);
            } else if qos == QoS::AtLeastOnce
                && session
                    .conn
                    .as_ref()
                    .is_some_and(|(_, o)| o.kicked == Some(Kick::TooSlow))
            {
                self.metrics.drop_mqtt(MqttDrop::SlowSubscriber, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    /// The next message in a connection's queue, if any.
    fn next(link: &mut Link) -> Option<Outgoing> {
        link.inbox.try_recv()
    }

    fn dropped(s: &Sessions, why: MqttDrop) -> u64 {
        s.metrics.mqtt_dropped(why)
    }

    #[test]
    fn routes_to_matching_subscriptions() {
        let mut s = Sessions::default();
        let (outbox, mut link) = new_link();
        s.connect("obs", true, outbox);
        s.subscribe("obs", "shoal/v1/devices/+/telemetry", QoS::AtLeastOnce);
        s.route(
            "shoal/v1/devices/d1/telemetry",
            &payload("x"),
            QoS::AtLeastOnce,
        );
        s.route("shoal/v1/devices/d1/hello", &payload("y"), QoS::AtLeastOnce);
        let Some(Outgoing { topic, qos, .. }) = next(&mut link) else {
            panic!("delivered")
        };
        assert_eq!(
            (topic.as_str(), qos),
            ("shoal/v1/devices/d1/telemetry", QoS::AtLeastOnce)
        );
        assert!(next(&mut link).is_none(), "hello does not match");
    }

    #[test]
    fn unsubscribe_stops_delivery() {
        let mut s = Sessions::default();
        let (outbox, mut link) = new_link();
        s.connect("obs", true, outbox);
        s.subscribe("obs", "a/b", QoS::AtLeastOnce);
        s.subscribe("obs", "a/+", QoS::AtMostOnce);
        s.route("a/b", &payload("1"), QoS::AtLeastOnce);
        let Some(Outgoing { qos, .. }) = next(&mut link) else {
            panic!("delivered")
        };
        assert_eq!(qos, QoS::AtLeastOnce, "once, at the best matching QoS");
        assert!(next(&mut link).is_none());
        s.unsubscribe("obs", "a/b");
        s.unsubscribe("obs", "a/+");
        s.route("a/b", &payload("2"), QoS::AtLeastOnce);
        assert!(next(&mut link).is_none());
    }

    #[test]
    fn persistent_sessions_queue_while_offline() {
        let mut s = Sessions::default();
        let (outbox, _link) = new_link();
        let c = s.connect("dev", false, outbox);
        assert!(!c.session_present);
        s.subscribe("dev", "shoal/v1/devices/dev/acks", QoS::AtLeastOnce);
        s.disconnect("dev", c.conn_id, vec![]);
        s.route(
            "shoal/v1/devices/dev/acks",
            &payload("ack1"),
            QoS::AtLeastOnce,
        );
        s.route(
            "shoal/v1/devices/dev/acks",
            &payload("ack0"),
            QoS::AtMostOnce,
        );
        let (outbox, _link) = new_link();
        let c = s.connect("dev", false, outbox);
        assert!(c.session_present);
        assert_eq!(c.queued.len(), 1, "QoS 1 is kept, QoS 0 is not");
    }

    #[test]
    fn clean_sessions_are_forgotten_and_takeover_kicks() {
        let mut s = Sessions::default();
        let (outbox1, mut link1) = new_link();
        let c1 = s.connect("c", true, outbox1);
        s.subscribe("c", "#", QoS::AtLeastOnce);
        let (outbox2, _link2) = new_link();
        let c2 = s.connect("c", true, outbox2);
        assert_eq!(link1.kicked.try_recv(), Ok(Kick::TakenOver));
        s.disconnect("c", c1.conn_id, vec![]);
        assert!(
            s.sessions.contains_key("c"),
            "a stale disconnect does not end the new connection"
        );
        s.disconnect("c", c2.conn_id, vec![]);
        assert!(!s.sessions.contains_key("c"));
        assert!(
            s.wildcard.is_empty(),
            "a forgotten session leaves no subscription behind"
        );
    }

    #[test]
    fn unacknowledged_qos1_is_resent_under_its_packet_id_with_dup() {
        let mut s = Sessions::default();
        let (outbox, _link) = new_link();
        let c = s.connect("obs", false, outbox);
        s.subscribe("obs", "t", QoS::AtLeastOnce);
        let mut inflight = Inflight::default();
        let sent: Vec<Publish> = ["m1", "m2", "m3"]
            .into_iter()
            .map(|m| inflight.publish(Outgoing::new("t", payload(m), QoS::AtLeastOnce)))
            .collect();
        assert_eq!(
            sent.iter().map(|p| (p.pkid, p.dup)).collect::<Vec<_>>(),
            [(1, false), (2, false), (3, false)]
        );
        assert!(inflight.ack(2));
        assert!(!inflight.ack(2), "an id is acknowledged once");
        s.disconnect("obs", c.conn_id, inflight.into_unacked());
        s.route("t", &payload("m4"), QoS::AtLeastOnce);

        let (outbox, _link) = new_link();
        let c = s.connect("obs", false, outbox);
        assert!(c.session_present);
        let mut inflight = Inflight::default();
        let resent: Vec<(u16, bool, Bytes)> = c
            .queued
            .into_iter()
            .map(|m| {
                let p = inflight.publish(m);
                (p.pkid, p.dup, p.payload)
            })
            .collect();
        assert_eq!(
            resent[..2],
            [(1, true, payload("m1")), (3, true, payload("m3"))],
            "the unacknowledged go first, under their ids, with DUP"
        );
        let (pkid, dup, body) = &resent[2];
        assert_eq!((*dup, body), (false, &payload("m4")), "never sent: no DUP");
        assert!(![1, 3].contains(pkid), "a new id, not one in flight");
        assert_eq!(resent.len(), 3);
    }

    #[test]
    fn a_resent_message_whose_id_is_taken_gets_a_free_one() {
        let mut inflight = Inflight::default();
        let first = inflight.publish(Outgoing::new("t", payload("a"), QoS::AtLeastOnce));
        let mut old = Outgoing::new("t", payload("b"), QoS::AtLeastOnce);
        old.pkid = first.pkid;
        let p = inflight.publish(old);
        assert!(p.dup);
        assert_ne!(p.pkid, first.pkid);
    }

    #[test]
    fn the_inflight_window_is_bounded_and_ids_wrap_past_zero() {
        let mut inflight = Inflight {
            last_pkid: u16::MAX - 1,
            ..Inflight::default()
        };
        let mut ids = Vec::new();
        while inflight.has_room() {
            ids.push(
                inflight
                    .publish(Outgoing::new("t", payload("x"), QoS::AtLeastOnce))
                    .pkid,
            );
        }
        assert_eq!(ids.len(), MAX_INFLIGHT);
        assert_eq!(ids[..3], [u16::MAX, 1, 2], "0 is no packet id");
        assert!(inflight.ack(1));
        assert!(inflight.has_room());
        let p = inflight.publish(Outgoing::new("t", payload("y"), QoS::AtMostOnce));
        assert_eq!((p.pkid, p.dup), (0, false), "QoS 0 takes no id");
        assert!(inflight.has_room(), "nor a place in the window");

        let mut big = Inflight::default();
        let mib = Bytes::from(vec![0u8; 1024 * 1024]);
        while big.has_room() {
            big.publish(Outgoing::new("t", mib.clone(), QoS::AtLeastOnce));
        }
        assert!(big.into_unacked().len() <= MAX_INFLIGHT_BYTES / mib.len() + 1);
    }

    #[test]
    fn a_full_queue_drops_qos0_and_counts_it() {
        let mut s = Sessions::default();
        let (outbox, mut link) = new_link();
        s.connect("obs", true, outbox);
        s.subscribe("obs", "#", QoS::AtMostOnce);
        for _ in 0..QUEUE_MESSAGES + 5 {
            s.route("a", &payload("x"), QoS::AtLeastOnce);
        }
        assert_eq!(dropped(&s, MqttDrop::QueueFullQos0), 5);
        assert!(link.kicked.try_recv().is_err(), "QoS 0 cuts nobody");
        assert_eq!(s.metrics.mqtt_slow_disconnects.get(), 0);
        assert!(next(&mut link).is_some());
        s.route("a", &payload("x"), QoS::AtMostOnce);
        assert_eq!(
            dropped(&s, MqttDrop::QueueFullQos0),
            5,
            "room again once read"
        );
    }

    #[test]
    fn a_queue_holds_no_room_until_used_and_gives_a_burst_back() {
        let mut s = Sessions::default();
        let (outbox, mut link) = new_link();
        let room = |l: &Link| l.inbox.queue.lock().messages.capacity();
        assert_eq!(
            room(&link),
            0,
            "an idle connection's queue allocates nothing"
        );
        s.connect("obs", true, outbox);
        s.subscribe("obs", "#", QoS::AtMostOnce);
        for _ in 0..100 {
            s.route("a", &payload("x"), QoS::AtMostOnce);
        }
        assert!(room(&link) >= 100);
        while next(&mut link).is_some() {}
        assert_eq!(room(&link), 0, "the burst's room goes back once read");
        s.route("a", &payload("x"), QoS::AtMostOnce);
        assert!(room(&link) <= QUEUE_KEEP);
        assert!(next(&mut link).is_some());
        assert!(room(&link) <= QUEUE_KEEP, "a little room is kept");
    }

    #[test]
    fn a_queue_is_full_by_bytes_too() {
        let mut s = Sessions::default();
        let (outbox, mut link) = new_link();
        s.connect("obs", true, outbox);
        s.subscribe("obs", "#", QoS::AtMostOnce);
        let mib = Bytes::from(vec![0u8; 1024 * 1024]);
        for _ in 0..QUEUE_BYTES / mib.len() + 3 {
            s.route("a", &mib, QoS::AtMostOnce);
        }
        assert_eq!(dropped(&s, MqttDrop::QueueFullQos0), 4);
        let mut held = 0;
        while next(&mut link).is_some() {
            held += 1;
        }
        assert_eq!(held, QUEUE_BYTES / mib.len() - 1);
        assert_eq!(link.inbox.queue.lock().bytes, 0);
    }

    #[test]
    fn a_full_queue_cuts_a_clean_qos1_subscriber_and_counts_what_it_lost() {
        let mut s = Sessions::default();
        let (outbox, mut link) = new_link();
        let c = s.connect("obs", true, outbox);
        s.subscribe("obs", "#", QoS::AtLeastOnce);
        for _ in 0..QUEUE_MESSAGES + 2 {
            s.route("a", &payload("x"), QoS::AtLeastOnce);
        }
        assert_eq!(link.kicked.try_recv(), Ok(Kick::TooSlow));
        assert_eq!(s.metrics.mqtt_slow_disconnects.get(), 1);
        assert_eq!(dropped(&s, MqttDrop::SlowSubscriber), 2);
        let left = link.inbox.drain();
        assert_eq!(left.len(), QUEUE_MESSAGES);
        s.disconnect("obs", c.conn_id, left);
        assert_eq!(
            dropped(&s, MqttDrop::SlowSubscriber),
            QUEUE_MESSAGES as u64 + 2
        );
        assert_eq!(s.metrics.mqtt_slow_disconnects.get(), 1, "cut once");
        assert!(!s.sessions.contains_key("obs"));
    }

    #[test]
    fn a_cut_persistent_session_keeps_its_messages_in_order() {
        let mut s = Sessions::default();
        let (outbox, mut link) = new_link();
        let c = s.connect("obs", false, outbox);
        s.subscribe("obs", "#", QoS::AtLeastOnce);
        s.route("a", &payload("first"), QoS::AtLeastOnce);
        let mut inflight = Inflight::default();
        let sent = inflight.publish(next(&mut link).expect("queued"));
        for _ in 0..QUEUE_MESSAGES {
            s.route("a", &payload("x"), QoS::AtLeastOnce);
        }
        s.route("a", &payload("over"), QoS::AtLeastOnce);
        s.route("a", &payload("later"), QoS::AtLeastOnce);
        assert_eq!(link.kicked.try_recv(), Ok(Kick::TooSlow));
        let mut unsent = inflight.into_unacked();
        unsent.extend(link.inbox.drain());
        s.disconnect("obs", c.conn_id, unsent);
        assert_eq!(dropped(&s, MqttDrop::SlowSubscriber), 0);

        let (outbox, _link) = new_link();
        let c = s.connect("obs", false, outbox);
        assert_eq!(c.queued.len(), QUEUE_MESSAGES + 3);
        assert_eq!(
            (c.queued[0].payload.clone(), c.queued[0].pkid),
            (payload("first"), sent.pkid)
        );
        assert_eq!(c.queued[QUEUE_MESSAGES + 1].payload, payload("over"));
        assert_eq!(c.queued[QUEUE_MESSAGES + 2].payload, payload("later"));
    }

    #[test]
    fn an_offline_queue_is_bounded_and_drops_the_oldest() {
        let mut s = Sessions::default();
        let (outbox, _link) = new_link();
        let c = s.connect("dev", false, outbox);
        s.subscribe("dev", "t", QoS::AtLeastOnce);
        s.disconnect("dev", c.conn_id, vec![]);
        for i in 0..MAX_QUEUED + 3 {
            s.route("t", &Bytes::from(i.to_string()), QoS::AtLeastOnce);
        }
        assert_eq!(dropped(&s, MqttDrop::SessionQueueFull), 3);
        let (outbox, _link) = new_link();
        let c = s.connect("dev", false, outbox);
        assert_eq!(c.queued.len(), MAX_QUEUED);
        assert_eq!(c.queued[0].payload, Bytes::from("3"));
    }

    #[test]
    fn taking_over_kicks_the_holder_and_waits_for_it() {
        let mut s = Sessions::default();
        assert!(s.take_over("dev").is_none(), "nobody to wait for");
        let (outbox, mut link) = new_link();
        s.connect("dev", false, outbox);
        let gone = s.take_over("dev").expect("connected");
        assert_eq!(link.kicked.try_recv(), Ok(Kick::TakenOver));
        assert!(gone.has_changed().is_ok(), "still running");
        drop(link);
        assert!(gone.has_changed().is_err(), "ended");
    }
}
