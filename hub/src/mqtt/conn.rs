//! One client connection of the embedded broker: CONNECT and authentication, then packets in
//! both directions until the client leaves, its keep-alive lapses, or the broker stops.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::mqttbytes::valid_filter;
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::Handle;
use super::acl::{Identity, Role, may_publish, may_subscribe};
use super::state::{self, Inflight, Kick, Link, Outgoing};
use crate::metrics::StreamReject;

/// Largest packet read at all; payloads over the hub's message limit are refused (and counted)
/// after reading, so the connection survives them.
const MAX_PACKET: usize = 64 * 1024 * 1024;

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
    handle: Handle,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if let Err(e) = serve(stream, peer, &handle, shutdown).await {
        tracing::debug!(%peer, error = %e, "MQTT connection ended");
    }
}

async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    handle: &Handle,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let shared = &handle.shared;
    let ingestor = &shared.ingestor;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut rbuf = BytesMut::with_capacity(8 * 1024);
    let connect = match tokio::time::timeout(
        Duration::from_secs(10),
        read_packet(&mut rd, &mut rbuf),
    )
    .await
    {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Err(e)) => {
            ingestor.refuse(StreamReject::Malformed, &peer.to_string(), &e.to_string());
            return Err(e);
        }
        _ => return Err(ConnError::Refused("no CONNECT".into())),
    };
    let refuse = |code| Packet::ConnAck(ConnAck::new(code, false));
    let identity = match (&shared.users, &connect.login) {
        (Some(users), Some(login)) => match users.check(&login.username, &login.password) {
            Some(role) => Identity {
                name: login.username.clone(),
                role,
                authenticated: true,
            },
            None => {
                ingestor.refuse(
                    StreamReject::BadCredentials,
                    &peer.to_string(),
                    &format!("user {:?}", login.username),
                );
                write_packet(&mut wr, refuse(ConnectReturnCode::BadUserNamePassword)).await?;
                return Err(ConnError::Refused(format!(
                    "bad credentials for {:?}",
                    login.username
                )));
            }
        },
        (Some(_), None) => {
            ingestor.refuse(
                StreamReject::BadCredentials,
                &peer.to_string(),
                "no user name",
            );
            write_packet(&mut wr, refuse(ConnectReturnCode::NotAuthorized)).await?;
            return Err(ConnError::Refused("anonymous client".into()));
        }
        (None, _) => Identity {
            name: connect.client_id.clone(),
            role: Role::Device,
            authenticated: false,
        },
    };
    if connect.client_id.is_empty() && !connect.clean_session {
        write_packet(&mut wr, refuse(ConnectReturnCode::BadClientId)).await?;
        return Err(ConnError::Refused(
            "persistent session without a client id".into(),
        ));
    }
    let client_id = if connect.client_id.is_empty() {
        format!("anonymous-{peer}")
    } else {
        connect.client_id.clone()
    };

    // A client id still connected elsewhere is taken over: that connection is told to go,
    // and this one waits (briefly) until it has handed its unacknowledged messages back to
    // the session, so that they are resent here.
    let previous = shared
        .sessions
        .lock()
        .expect("sessions lock")
        .take_over(&client_id);
    if let Some(mut gone) = previous {
        let _ = tokio::time::timeout(TAKEOVER_WAIT, gone.changed()).await;
    }
    let (outbox, link) = state::new_link();
    let Link {
        mut inbox,
        mut kicked,
        alive,
    } = link;
    let connected = shared.sessions.lock().expect("sessions lock").connect(
        &client_id,
        connect.clean_session,
        outbox,
    );
    let (conn_id, session_present) = (connected.conn_id, connected.session_present);
    let mut inflight = Inflight::default();
    // What waited for this session goes first, before anything routed to it from now on.
    let mut backlog: VecDeque<Outgoing> = connected.queued.into();
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive)).mul_f32(1.5);
    // When the client was last heard from, in milliseconds since `started`: keep-alive counts
    // only what the client sends, so one that went silent is let go even while messages
    // still flow to it (or wait for a socket it no longer reads).
    let started = Instant::now();
    let last_heard = AtomicU64::new(0);
    let silence = async {
        if keep_alive.is_zero() {
            std::future::pending::<()>().await;
        }
        loop {
            let heard = started + Duration::from_millis(last_heard.load(Ordering::Relaxed));
            if heard.elapsed() >= keep_alive {
                return;
            }
            tokio::time::sleep_until((heard + keep_alive).into()).await;
        }
    };
    let exchange = async {
        write_packet(
            &mut wr,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, session_present)),
        )
        .await?;
        tracing::debug!(%peer, client_id = %client_id, "MQTT client connected");
        loop {
            // Send what the window allows; the queue waits while it is full, and fills.
            while inflight.has_room()
                && let Some(m) = backlog.pop_front()
            {
                deliver(&mut wr, m, &mut inflight).await?;
            }
            tokio::select! {
                packet = read_packet(&mut rd, &mut rbuf) => {
                    let Some(packet) = packet? else { return Ok(()) };
                    last_heard.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    match packet {
                        Packet::Publish(p) => on_publish(handle, &identity, &mut wr, p).await?,
                        Packet::PubAck(a) => {
                            inflight.ack(a.pkid);
                        }
                        Packet::Subscribe(s) => {
                            let mut codes = Vec::with_capacity(s.filters.len());
                            for f in &s.filters {
                                if valid_filter(&f.path) && may_subscribe(&identity, &f.path) {
                                    let qos = if f.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                                    shared.sessions.lock().expect("sessions lock").subscribe(&client_id, &f.path, qos);
                                    codes.push(SubscribeReasonCode::Success(qos));
                                } else {
                                    ingestor.refuse(StreamReject::ForeignTopic, &identity.name, &format!("subscribe {}", f.path));
                                    codes.push(SubscribeReasonCode::Failure);
                                }
                            }
                            write_packet(&mut wr, Packet::SubAck(SubAck::new(s.pkid, codes))).await?;
                        }
                        Packet::Unsubscribe(u) => {
                            for f in &u.topics {
                                shared.sessions.lock().expect("sessions lock").unsubscribe(&client_id, f);
                            }
                            write_packet(&mut wr, Packet::UnsubAck(UnsubAck::new(u.pkid))).await?;
                        }
                        Packet::PingReq => write_packet(&mut wr, Packet::PingResp).await?,
                        Packet::Disconnect => return Ok(()),
                        Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                            return Err(ConnError::Refused("QoS 2 is not supported; use QoS 0 or 1".into()));
                        }
                        _ => {}
                    }
                }
                out = inbox.recv(), if backlog.is_empty() && inflight.has_room() => match out {
                    Some(m) => deliver(&mut wr, m, &mut inflight).await?,
                    // The session is gone (a clean takeover); the kick says why.
                    None => std::future::pending().await,
                },
            }
        }
    };
    // A kick, the keep-alive or shutdown interrupts even a write to a client that stopped
    // reading.
    let result: Result<(), ConnError> = tokio::select! {
        r = exchange => r,
        _ = silence => Err(ConnError::Refused("keep-alive expired".into())),
        why = &mut kicked => Err(match why {
            Ok(Kick::TooSlow) => {
                if shared.slow_log.allow(&client_id) {
                    tracing::warn!(%peer, client_id = %client_id, "disconnected a subscriber too slow to take its messages");
                }
                ConnError::Refused("too slow: its queue was full".into())
            }
            Ok(Kick::TakenOver) | Err(_) => ConnError::Refused("taken over by a new connection with the same client id".into()),
        }),
        _ = shutdown.changed() => Ok(()),
    };
    // Oldest first: sent and unacknowledged, waiting from an earlier connection, queued.
    let mut unsent = inflight.into_unacked();
    unsent.extend(backlog);
    {
        let mut sessions = shared.sessions.lock().expect("sessions lock");
        unsent.extend(inbox.drain());
        sessions.disconnect(&client_id, conn_id, unsent);
    }
    drop(alive);
    result
}

async fn deliver<W: AsyncWrite + Unpin>(
    wr: &mut W,
    m: Outgoing,
    inflight: &mut Inflight,
) -> Result<(), ConnError> {
    let p = inflight.publish(m);
    write_packet(wr, Packet::Publish(p)).await
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
