//! One client connection of the embedded broker: CONNECT and authentication, then packets in
//! both directions until the client leaves, its keep-alive lapses, or the broker stops.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::mqttbytes::valid_filter;
use rumqttc::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, Subscribe,
    SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot::error::RecvError;
use tokio::sync::watch;

use super::Handle;
use super::acl::{Identity, Role, may_publish, may_subscribe};
use super::state::{self, Inbox, Inflight, Kick, Link, Outgoing};
use crate::admission::{self, Admission, Slot};
use crate::auth::PeerCert;
use crate::metrics::StreamReject;

/// Largest packet read at all; payloads over the hub's message limit are refused (and counted)
/// after reading, so the connection survives them.
const MAX_PACKET: usize = 64 * 1024 * 1024;

/// A connection's read buffer to begin with. Devices publish a batch of a few hundred bytes now
/// and then, and the hub holds one buffer per device; it doubles for larger packets.
const READ_BUFFER: usize = 1024;

/// How long a connection taking over a client id waits for the old one to hand its session
/// back; the old one is interrupted at once, so this only bounds a stuck lock or task.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed MQTT: {0}")]
    Codec(String),
    #[error("{0}")]
    Refused(String),
}

async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Packet>, ConnError> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(ConnError::Codec(e.to_string())),
        }
        if r.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn write_packet<W: AsyncWrite + Unpin>(w: &mut W, p: Packet) -> Result<(), ConnError> {
    let mut out = BytesMut::new();
    p.write(&mut out, MAX_PACKET)
        .map_err(|e| ConnError::Codec(e.to_string()))?;
    w.write_all(&out).await?;
    Ok(())
}

pub(super) async fn run<S>(
    stream: S,
    peer: SocketAddr,
    cert: Option<PeerCert>,
    handle: Handle,
    admission: &Admission,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if let Err(e) = serve(stream, peer, cert, &handle, admission, shutdown).await {
        tracing::debug!(%peer, error = %e, "MQTT connection ended");
    }
}

/// One connection's life: CONNECT, its session, packets both ways, its messages handed back.
async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    cert: Option<PeerCert>,
    handle: &Handle,
    admission: &Admission,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut rbuf = BytesMut::with_capacity(READ_BUFFER);
    // The opening takes one of the hub's admission slots, until the client's first delivery
    // (an agent's welcome) or the slot's hold runs out.
    let mut slot = Some(admission.slot().await);
    let opening = admission::holding(&mut slot, async {
        let connect = read_connect(&mut rd, &mut rbuf, peer, handle).await?;
        let identity = match cert {
            Some(cert) => certified(handle, cert, peer, &mut wr).await?,
            None => authenticate(handle, &connect, peer, &mut wr).await?,
        };
        let client_id = choose_client_id(&connect, peer, &mut wr).await?;
        own_client_id(handle, &identity, &client_id, peer, &mut wr).await?;
        take_over(handle, &client_id).await;
        let (outbox, link) = state::new_link();
        let connected = handle
            .shared
            .sessions
            .lock()
            .expect("sessions lock")
            .connect(&client_id, connect.clean_session, outbox);
        Ok::<_, ConnError>((connect, identity, client_id, connected, link))
    });
    // Boxed: what opening holds is not part of every connection's task for its whole life.
    let (connect, identity, client_id, connected, link) = Box::pin(opening).await?;
    let Link {
        inbox,
        mut kicked,
        alive,
    } = link;
    let (conn_id, session_present) = (connected.conn_id, connected.session_present);
    let mut conn = Conn {
        handle,
        peer,
        identity,
        client_id,
        rd,
        rbuf,
        wr,
        inflight: Inflight::default(),
        // What waited for this session goes first, before anything routed to it from now on.
        backlog: connected.queued.into(),
        inbox,
        slot,
    };
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive)).mul_f32(1.5);
    let heard = LastHeard::new();
    // A kick, the keep-alive or shutdown interrupts even a write to a client that stopped
    // reading.
    let result: Result<(), ConnError> = tokio::select! {
        r = conn.exchange(session_present, &heard) => r,
        _ = heard.silence(keep_alive) => Err(ConnError::Refused("keep-alive expired".into())),
        why = &mut kicked => Err(conn.kicked(why)),
        _ = shutdown.changed() => Ok(()),
    };
    conn.hand_back(conn_id);
    drop(alive);
    result
}

/// Waits (briefly) for the client's CONNECT; a malformed one is counted.
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    handle: &Handle,
) -> Result<Connect, ConnError> {
    match tokio::time::timeout(Duration::from_secs(10), read_packet(rd, rbuf)).await {
        Ok(Ok(Some(Packet::Connect(c)))) => Ok(c),
        Ok(Err(e)) => {
            handle.shared.ingestor.refuse(
                StreamReject::Malformed,
                &peer.to_string(),
                &e.to_string(),
            );
            Err(e)
        }
        _ => Err(ConnError::Refused("no CONNECT".into())),
    }
}

/// A client that showed a device certificate is that device, if the hub still lets it act.
async fn certified<W: AsyncWrite + Unpin>(
    handle: &Handle,
    cert: PeerCert,
    peer: SocketAddr,
    wr: &mut W,
) -> Result<Identity, ConnError> {
    let devices = handle
        .shared
        .devices
        .as_ref()
        .expect("certificates need the authority");
    match devices.authorize(Some(&cert), &cert.device_id) {
        Ok(()) => Ok(Identity {
            name: cert.device_id,
            role: Role::Device,
            authenticated: true,
            by_certificate: true,
        }),
        Err(e) => {
            handle.shared.ingestor.metrics().deny_device(e.reason());
            let refuse = Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false));
            write_packet(wr, refuse).await?;
            Err(ConnError::Refused(format!("{peer}: {e}")))
        }
    }
}

/// Checks the CONNECT's login against the broker's users; a refusal is counted and answered.
async fn authenticate<W: AsyncWrite + Unpin>(
    handle: &Handle,
    connect: &Connect,
    peer: SocketAddr,
    wr: &mut W,
) -> Result<Identity, ConnError> {
    let ingestor = &handle.shared.ingestor;
    let refuse = |code| Packet::ConnAck(ConnAck::new(code, false));
    match (&handle.shared.users, &connect.login) {
        (Some(users), Some(login)) => match users.check(&login.username, &login.password) {
            Some(role) => Ok(Identity {
                name: login.username.clone(),
                role,
                authenticated: true,
                by_certificate: false,
            }),
            None => {
                ingestor.refuse(
                    StreamReject::BadCredentials,
                    &peer.to_string(),
                    &format!("user {:?}", login.username),
                );
                write_packet(wr, refuse(ConnectReturnCode::BadUserNamePassword)).await?;
                Err(ConnError::Refused(format!(
                    "bad credentials for {:?}",
                    login.username
                )))
            }
        },
        (Some(_), None) => {
            ingestor.refuse(
                StreamReject::BadCredentials,
                &peer.to_string(),
                "no user name",
            );
            write_packet(wr, refuse(ConnectReturnCode::NotAuthorized)).await?;
            Err(ConnError::Refused("anonymous client".into()))
        }
        (None, _) if handle.shared.require_identity => {
            handle
                .shared
                .ingestor
                .metrics()
                .deny_device("no_certificate");
            write_packet(wr, refuse(ConnectReturnCode::NotAuthorized)).await?;
            Err(ConnError::Refused(
                "no device certificate: this broker takes only enrolled devices".into(),
            ))
        }
        (None, _) => Ok(Identity {
            name: connect.client_id.clone(),
            role: Role::Device,
            authenticated: false,
            by_certificate: false,
        }),
    }
}

/// The session's client id: the CONNECT's, or one made up for a clean session without one.
async fn choose_client_id<W: AsyncWrite + Unpin>(
    connect: &Connect,
    peer: SocketAddr,
    wr: &mut W,
) -> Result<String, ConnError> {
    if connect.client_id.is_empty() && !connect.clean_session {
        let refuse = Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadClientId, false));
        write_packet(wr, refuse).await?;
        return Err(ConnError::Refused(
            "persistent session without a client id".into(),
        ));
    }
    Ok(if connect.client_id.is_empty() {
        format!("anonymous-{peer}")
    } else {
        connect.client_id.clone()
    })
}

/// An authenticated device connects under its own id only: another client id would take over
/// that device's connection and persistent session (its queued acks). Refused and counted.
async fn own_client_id<W: AsyncWrite + Unpin>(
    handle: &Handle,
    identity: &Identity,
    client_id: &str,
    peer: SocketAddr,
    wr: &mut W,
) -> Result<(), ConnError> {
    if !identity.authenticated || identity.role != Role::Device || client_id == identity.name {
        return Ok(());
    }
    handle.shared.ingestor.refuse(
        StreamReject::ForeignClientId,
        &peer.to_string(),
        &format!("user {:?} as client id {client_id:?}", identity.name),
    );
    let refuse = Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false));
    write_packet(wr, refuse).await?;
    Err(ConnError::Refused(format!(
        "{:?} may connect only as client id {:?}, not {client_id:?}",
        identity.name, identity.name
    )))
}

/// Tells a connection still holding `client_id` to go, and waits until it has left.
async fn take_over(handle: &Handle, client_id: &str) {
    // That connection hands its unacknowledged messages back to the session before it goes,
    // so that they are resent here; the wait is bounded.
    let previous = handle
        .shared
        .sessions
        .lock()
        .expect("sessions lock")
        .take_over(client_id);
    if let Some(mut gone) = previous {
        let _ = tokio::time::timeout(TAKEOVER_WAIT, gone.changed()).await;
    }
}

/// When the client was last heard from. Keep-alive counts only what the client sends, so one
/// that went silent is let go even while messages still flow to it (or wait for a socket it
/// no longer reads).
struct LastHeard {
    started: Instant,
    /// Milliseconds since `started`.
    millis: AtomicU64,
}

impl LastHeard {
    /// Starts the clock, as if the client had just been heard.
    fn new() -> Self {
        Self {
            started: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }

    /// Notes that the client was heard from just now.
    fn heard(&self) {
        self.millis
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Completes once the client has been silent for `keep_alive`; never when that is zero.
    async fn silence(&self, keep_alive: Duration) {
        if keep_alive.is_zero() {
            std::future::pending::<()>().await;
        }
        loop {
            let heard = self.started + Duration::from_millis(self.millis.load(Ordering::Relaxed));
            if heard.elapsed() >= keep_alive {
                return;
            }
            tokio::time::sleep_until((heard + keep_alive).into()).await;
        }
    }
}

/// A connected client: who it is, its socket, and the messages on their way to it.
struct Conn<'a, S> {
    handle: &'a Handle,
    peer: SocketAddr,
    identity: Identity,
    client_id: String,
    rd: ReadHalf<S>,
    rbuf: BytesMut,
    wr: WriteHalf<S>,
    inflight: Inflight,
    /// Waiting for room in the in-flight window, ahead of `inbox`.
    backlog: VecDeque<Outgoing>,
    inbox: Inbox,
    /// The admission slot, held until the first delivery.
    slot: Option<Slot>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<'_, S> {
    /// Sends the CONNACK, then moves packets both ways until the client leaves or fails.
    async fn exchange(
        &mut self,
        session_present: bool,
        heard: &LastHeard,
    ) -> Result<(), ConnError> {
        write_packet(
            &mut self.wr,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, session_present)),
        )
        .await?;
        let peer = self.peer;
        tracing::debug!(%peer, client_id = %self.client_id, "MQTT client connected");
        loop {
            self.send_backlog().await?;
            tokio::select! {
                packet = read_packet(&mut self.rd, &mut self.rbuf) => {
                    let Some(packet) = packet? else { return Ok(()) };
                    heard.heard();
                    // Boxed: what handling a packet holds while it waits is not part of
                    // every idle connection's task.
                    if Box::pin(self.on_packet(packet)).await?.is_break() {
                        return Ok(());
                    }
                }
                out = self.inbox.recv(), if self.backlog.is_empty() && self.inflight.has_room() => match out {
                    Some(m) => self.deliver(m).await?,
                    // The session is gone (a clean takeover); the kick says why.
                    None => std::future::pending().await,
                },
                _ = admission::hold_over(&mut self.slot) => self.slot = None,
            }
        }
    }

    /// Sends what the window allows; the backlog waits while it is full, and the queue fills.
    async fn send_backlog(&mut self) -> Result<(), ConnError> {
        while self.inflight.has_room()
            && let Some(m) = self.backlog.pop_front()
        {
            self.deliver(m).await?;
        }
        Ok(())
    }

    /// Sends one message to the client, in flight until acknowledged if it is QoS 1.
    async fn deliver(&mut self, m: Outgoing) -> Result<(), ConnError> {
        // The client has a message (an agent, first of all its welcome): it has opened.
        self.slot = None;
        let p = self.inflight.publish(m);
        write_packet(&mut self.wr, Packet::Publish(p)).await
    }

    /// Handles one packet from the client; `Break` when it disconnected.
    async fn on_packet(&mut self, packet: Packet) -> Result<ControlFlow<()>, ConnError> {
        match packet {
            Packet::Publish(p) => on_publish(self.handle, &self.identity, &mut self.wr, p).await?,
            Packet::PubAck(a) => {
                self.inflight.ack(a.pkid);
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await?,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u).await?,
            Packet::PingReq => write_packet(&mut self.wr, Packet::PingResp).await?,
            Packet::Disconnect => return Ok(ControlFlow::Break(())),
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                return Err(ConnError::Refused(
                    "QoS 2 is not supported; use QoS 0 or 1".into(),
                ));
            }
            _ => {}
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Subscribes to each filter the client may read (refusing, and counting, the rest), then
    /// answers with a SUBACK.
    async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), ConnError> {
        let shared = &self.handle.shared;
        let mut codes = Vec::with_capacity(s.filters.len());
        for f in &s.filters {
            if valid_filter(&f.path) && may_subscribe(&self.identity, &f.path) {
                let qos = if f.qos == QoS::AtMostOnce {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                shared.sessions.lock().expect("sessions lock").subscribe(
                    &self.client_id,
                    &f.path,
                    qos,
                );
                codes.push(SubscribeReasonCode::Success(qos));
            } else {
                shared.ingestor.refuse(
                    StreamReject::ForeignTopic,
                    &self.identity.name,
                    &format!("subscribe {}", f.path),
                );
                codes.push(SubscribeReasonCode::Failure);
            }
        }
        write_packet(&mut self.wr, Packet::SubAck(SubAck::new(s.pkid, codes))).await
    }

    /// Drops the client's subscriptions to the given filters, then answers with an UNSUBACK.
    async fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), ConnError> {
        for f in &u.topics {
            self.handle
                .shared
                .sessions
                .lock()
                .expect("sessions lock")
                .unsubscribe(&self.client_id, f);
        }
        write_packet(&mut self.wr, Packet::UnsubAck(UnsubAck::new(u.pkid))).await
    }

    /// Why a kicked connection ends; a subscriber cut for being slow is logged (rate-limited).
    fn kicked(&self, why: Result<Kick, RecvError>) -> ConnError {
        match why {
            Ok(Kick::TooSlow) => {
                if self.handle.shared.slow_log.allow(&self.client_id) {
                    let peer = self.peer;
                    tracing::warn!(%peer, client_id = %self.client_id, "disconnected a subscriber too slow to take its messages");
                }
                ConnError::Refused("too slow: its queue was full".into())
            }
            Ok(Kick::TakenOver) | Err(_) => {
                ConnError::Refused("taken over by a new connection with the same client id".into())
            }
        }
    }

    /// Hands every message the client did not take back to its session, oldest first.
    fn hand_back(&mut self, conn_id: u64) {
        // Oldest first: sent and unacknowledged, waiting from an earlier connection, queued.
        let mut unsent = std::mem::take(&mut self.inflight).into_unacked();
        unsent.extend(self.backlog.drain(..));
        let mut sessions = self.handle.shared.sessions.lock().expect("sessions lock");
        unsent.extend(self.inbox.drain());
        sessions.disconnect(&self.client_id, conn_id, unsent);
    }
}

async fn on_publish<W: AsyncWrite + Unpin>(
    handle: &Handle,
    who: &Identity,
    wr: &mut W,
    p: Publish,
) -> Result<(), ConnError> {
    let shared = &handle.shared;
    let ingestor = &shared.ingestor;
    match p.qos {
        QoS::AtLeastOnce => write_packet(wr, Packet::PubAck(PubAck::new(p.pkid))).await?,
        QoS::ExactlyOnce => {
            return Err(ConnError::Refused(
                "QoS 2 is not supported; use QoS 0 or 1".into(),
            ));
        }
        QoS::AtMostOnce => {}
    }
    let max = ingestor.limits().max_message_bytes;
    if p.payload.len() > max {
        ingestor.refuse(
            StreamReject::Oversized,
            &who.name,
            &format!(
                "{} bytes on {}, the limit is {max}",
                p.payload.len(),
                p.topic
            ),
        );
        return Ok(());
    }
    let json_topic = shared
        .dispatcher
        .lock()
        .expect("dispatcher lock")
        .as_ref()
        .is_some_and(|d| d.is_json(&p.topic));
    if who.by_certificate
        && shared
            .devices
            .as_ref()
            .is_some_and(|d| d.is_revoked(&who.name))
    {
        ingestor.metrics().deny_device("revoked");
        return Err(ConnError::Refused(format!(
            "device {:?} was revoked",
            who.name
        )));
    }
    if let Err(reason) = may_publish(who, &p.topic, json_topic) {
        ingestor.refuse(StreamReject::ForeignTopic, &who.name, &reason);
        return Ok(());
    }
    shared
        .sessions
        .lock()
        .expect("sessions lock")
        .route(&p.topic, &p.payload, p.qos);
    if let Some(d) = shared.dispatcher.lock().expect("dispatcher lock").as_mut()
        && d.wants(&p.topic)
    {
        d.dispatch(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reads every packet a client could send in `bytes`, as a connection does.
    fn read_all(bytes: &[u8]) -> Result<usize, ConnError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut reader = bytes;
            let mut buf = BytesMut::new();
            let mut n = 0;
            while read_packet(&mut reader, &mut buf).await?.is_some() {
                n += 1;
            }
            Ok(n)
        })
    }

    /// A CONNECT, a PUBLISH and a SUBSCRIBE as a device sends them.
    fn valid_stream() -> Vec<u8> {
        let mut out = BytesMut::new();
        let mut connect = rumqttc::mqttbytes::v4::Connect::new("pi-1");
        connect.keep_alive = 30;
        let mut publish = rumqttc::mqttbytes::v4::Publish::new(
            "shoal/v1/devices/pi-1/telemetry",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            vec![1u8, 2, 3],
        );
        publish.pkid = 1;
        let mut subscribe = rumqttc::mqttbytes::v4::Subscribe::new(
            "shoal/v1/devices/pi-1/acks",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
        );
        subscribe.pkid = 2;
        for p in [
            Packet::Connect(connect),
            Packet::Publish(publish),
            Packet::Subscribe(subscribe),
        ] {
            p.write(&mut out, MAX_PACKET).expect("packet encodes");
        }
        out.to_vec()
    }

    #[test]
    fn a_valid_stream_reads_as_its_packets() {
        assert_eq!(read_all(&valid_stream()).unwrap(), 3);
    }

    proptest! {
        /// Whatever bytes a client sends, the broker's reader answers packets, an error or the
        /// end of the stream: it never panics or hangs.
        #[test]
        fn any_bytes_read_as_packets_or_an_error(
            bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..256),
                (any::<prop::sample::Index>(), any::<u8>(), 0usize..64).prop_map(|(i, x, cut)| {
                    let mut b = valid_stream();
                    let at = i.index(b.len());
                    b[at] ^= x;
                    b.truncate(b.len() - cut.min(b.len()));
                    b
                }),
            ],
        ) {
            let _ = read_all(&bytes);
        }
    }
}
