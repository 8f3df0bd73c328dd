//! One client connection of the embedded broker: CONNECT and authentication, then packets in
//! both directions until the client leaves, its keep-alive lapses, or the broker stops.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::mqttbytes::valid_filter;
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::Handle;
use super::acl::{Identity, Role, may_publish, may_subscribe};
use super::state::Outgoing;
use crate::metrics::StreamReject;

/// Largest packet read at all; payloads over the hub's message limit are refused (and counted)
/// after reading, so the connection survives them.
const MAX_PACKET: usize = 64 * 1024 * 1024;

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

    let (tx, mut rx) = mpsc::unbounded_channel();
    let connected = shared.sessions.lock().expect("sessions lock").connect(
        &client_id,
        connect.clean_session,
        tx,
    );
    write_packet(
        &mut wr,
        Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            connected.session_present,
        )),
    )
    .await?;
    tracing::debug!(%peer, client_id = %client_id, "MQTT client connected");

    let mut inflight: BTreeMap<u16, Outgoing> = BTreeMap::new();
    let mut next_pkid: u16 = 0;
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive)).mul_f32(1.5);
    let result: Result<(), ConnError> = async {
        for m in connected.queued {
            deliver(&mut wr, m, &mut inflight, &mut next_pkid).await?;
        }
        loop {
            let idle = async {
                if keep_alive.is_zero() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(keep_alive).await;
            };
            tokio::select! {
                packet = read_packet(&mut rd, &mut rbuf) => {
                    let Some(packet) = packet? else { return Ok(()) };
                    match packet {
                        Packet::Publish(p) => on_publish(handle, &identity, &mut wr, p).await?,
                        Packet::PubAck(a) => {
                            inflight.remove(&a.pkid);
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
                out = rx.recv() => match out {
                    Some(Outgoing::Kick) | None => return Ok(()),
                    Some(m) => deliver(&mut wr, m, &mut inflight, &mut next_pkid).await?,
                },
                _ = idle => return Err(ConnError::Refused("keep-alive expired".into())),
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
    .await;
    let unacked = inflight.into_values().collect();
    shared.sessions.lock().expect("sessions lock").disconnect(
        &client_id,
        connected.conn_id,
        unacked,
    );
    result
}

async fn deliver<W: AsyncWrite + Unpin>(
    wr: &mut W,
    m: Outgoing,
    inflight: &mut BTreeMap<u16, Outgoing>,
    next_pkid: &mut u16,
) -> Result<(), ConnError> {
    let Outgoing::Publish {
        topic,
        payload,
        qos,
    } = &m
    else {
        return Ok(());
    };
    let mut p = Publish::new(topic.clone(), *qos, payload.to_vec());
    if *qos != QoS::AtMostOnce {
        *next_pkid = next_pkid.checked_add(1).unwrap_or(1).max(1);
        p.pkid = *next_pkid;
        inflight.insert(p.pkid, m.clone());
    }
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
