//! The embedded broker's sessions and routing, without I/O: connections register a channel,
//! and routing a publish returns nothing but messages pushed into those channels (or queued for
//! offline persistent sessions).

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;
use rumqttc::mqttbytes::has_wildcards;
use rumqttc::{QoS, matches};
use tokio::sync::mpsc;

/// What a connection task is told to send to its client.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
    },
    /// Another connection took over this client id.
    Kick,
}

/// Messages queued for one offline persistent session, at most.
pub const MAX_QUEUED: usize = 10_000;

#[derive(Debug)]
struct Session {
    subscriptions: Vec<(String, QoS)>,
    conn: Option<(u64, mpsc::UnboundedSender<Outgoing>)>,
    queued: VecDeque<Outgoing>,
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
    /// Messages dropped from full offline queues.
    pub dropped: u64,
}

/// The result of a CONNECT.
pub struct Connected {
    pub conn_id: u64,
    pub session_present: bool,
    /// Messages that waited for this persistent session.
    pub queued: Vec<Outgoing>,
}

impl Sessions {
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

    /// Binds `client_id` to a new connection, kicking any older one.
    pub fn connect(
        &mut self,
        client_id: &str,
        clean: bool,
        tx: mpsc::UnboundedSender<Outgoing>,
    ) -> Connected {
        self.next_conn += 1;
        let conn_id = self.next_conn;
        if clean
            && let Some(old) = self.remove(client_id)
            && let Some((_, old_tx)) = old.conn
        {
            let _ = old_tx.send(Outgoing::Kick);
        }
        let present = self.sessions.contains_key(client_id);
        let session = self
            .sessions
            .entry(client_id.to_string())
            .or_insert_with(|| Session {
                subscriptions: Vec::new(),
                conn: None,
                queued: VecDeque::new(),
                clean,
            });
        if let Some((_, old_tx)) = session.conn.take() {
            let _ = old_tx.send(Outgoing::Kick);
        }
        session.clean = clean;
        session.conn = Some((conn_id, tx));
        Connected {
            conn_id,
            session_present: present,
            queued: session.queued.drain(..).collect(),
        }
    }

    /// The connection ended; `unacked` QoS 1 messages wait for the next connection of a
    /// persistent session.
    pub fn disconnect(&mut self, client_id: &str, conn_id: u64, unacked: Vec<Outgoing>) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if session.conn.as_ref().is_some_and(|(id, _)| *id == conn_id) {
            session.conn = None;
            if session.clean {
                self.remove(client_id);
            } else {
                for m in unacked.into_iter().rev() {
                    session.queued.push_front(m);
                }
            }
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

    /// Delivers a publish to every matching subscription (at the lower of the two QoS).
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
            let msg = Outgoing::Publish {
                topic: topic.to_string(),
                payload: payload.clone(),
                qos,
            };
            match &session.conn {
                Some((_, tx)) => {
                    let _ = tx.send(msg);
                }
                None if !session.clean && qos != QoS::AtMostOnce => {
                    if session.queued.len() >= MAX_QUEUED {
                        session.queued.pop_front();
                        self.dropped += 1;
                    }
                    session.queued.push_back(msg);
                }
                None => {}
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

    #[test]
    fn routes_to_matching_subscriptions() {
        let mut s = Sessions::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.connect("obs", true, tx);
        s.subscribe("obs", "shoal/v1/devices/+/telemetry", QoS::AtLeastOnce);
        s.route(
            "shoal/v1/devices/d1/telemetry",
            &payload("x"),
            QoS::AtLeastOnce,
        );
        s.route("shoal/v1/devices/d1/hello", &payload("y"), QoS::AtLeastOnce);
        let Ok(Outgoing::Publish { topic, qos, .. }) = rx.try_recv() else {
            panic!("delivered")
        };
        assert_eq!(
            (topic.as_str(), qos),
            ("shoal/v1/devices/d1/telemetry", QoS::AtLeastOnce)
        );
        assert!(rx.try_recv().is_err(), "hello does not match");
    }

    #[test]
    fn unsubscribe_stops_delivery() {
        let mut s = Sessions::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.connect("obs", true, tx);
        s.subscribe("obs", "a/b", QoS::AtLeastOnce);
        s.subscribe("obs", "a/+", QoS::AtMostOnce);
        s.route("a/b", &payload("1"), QoS::AtLeastOnce);
        let Ok(Outgoing::Publish { qos, .. }) = rx.try_recv() else {
            panic!("delivered")
        };
        assert_eq!(qos, QoS::AtLeastOnce, "once, at the best matching QoS");
        assert!(rx.try_recv().is_err());
        s.unsubscribe("obs", "a/b");
        s.unsubscribe("obs", "a/+");
        s.route("a/b", &payload("2"), QoS::AtLeastOnce);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn persistent_sessions_queue_while_offline() {
        let mut s = Sessions::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let c = s.connect("dev", false, tx);
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
        let (tx, _rx) = mpsc::unbounded_channel();
        let c = s.connect("dev", false, tx);
        assert!(c.session_present);
        assert_eq!(c.queued.len(), 1, "QoS 1 is kept, QoS 0 is not");
    }

    #[test]
    fn clean_sessions_are_forgotten_and_takeover_kicks() {
        let mut s = Sessions::default();
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let c1 = s.connect("c", true, tx1);
        s.subscribe("c", "#", QoS::AtLeastOnce);
        let (tx2, _rx2) = mpsc::unbounded_channel();
        let c2 = s.connect("c", true, tx2);
        assert!(matches!(rx1.try_recv(), Ok(Outgoing::Kick)));
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
}
