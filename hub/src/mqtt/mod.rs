//! The embedded MQTT 3.1.1 broker, so `shoal up` needs no Mosquitto: QoS 0 and 1, persistent
//! sessions, wildcard subscriptions, per-device credentials and a topic rule that a device may
//! publish only under its own topic. Device messages go straight to the hub's ingest
//! ([`crate::ingest::mqtt::Dispatcher`]) and to any other subscriber (e.g. `mosquitto_sub`).
//! Every subscriber has a bounded queue: one that falls behind loses QoS 0 messages or, for
//! QoS 1, its connection (counted), and never slows publishers or ingest
//! ([`state::Sessions::route`]).
//!
//! Packets are encoded and decoded with rumqttc's MQTT codec; [`state`] holds sessions and
//! routing without I/O; [`conn`] runs one client connection.

pub mod acl;
mod conn;
pub mod state;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttc::QoS;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use self::acl::Users;
use self::state::Sessions;
use crate::admission::Admission;
use crate::ingest::Ingestor;
use crate::ingest::mqtt::{Dispatcher, Replier};

/// Shared by every connection of the embedded broker.
struct Shared {
    sessions: Mutex<Sessions>,
    /// `None` once the broker is shutting down (this also breaks the reference cycle
    /// dispatcher → replier → handle → dispatcher).
    dispatcher: Mutex<Option<Dispatcher>>,
    users: Option<Users>,
    /// Checks device certificates (TLS clients that show one).
    devices: Option<Arc<crate::auth::DeviceAuthority>>,
    /// Refuse clients with neither a certificate nor (with a users file) a password.
    require_identity: bool,
    ingestor: Ingestor,
    /// Subscribers cut for being slow are logged once a minute per client id.
    slow_log: crate::metrics::LogLimiter,
}

/// A cheap handle to the embedded broker.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Publishes from the hub itself (acks), QoS 1.
    pub fn publish(&self, topic: &str, payload: Bytes) {
        self.shared.sessions.lock().expect("sessions lock").route(
            topic,
            &payload,
            QoS::AtLeastOnce,
        );
    }
}

/// Who may connect to the embedded broker.
pub struct Access {
    /// `None` lets anyone connect (client id = device id) unless `require_identity`; `Some`
    /// requires a user name and password from the list (or a device certificate).
    pub users: Option<Users>,
    /// TLS settings; with `devices`, they ask clients for a device certificate.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub devices: Option<Arc<crate::auth::DeviceAuthority>>,
    /// Refuse anonymous clients: a certificate or a password is needed.
    pub require_identity: bool,
}

/// How long a client gets to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves MQTT on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    access: Access,
    json_topic: String,
    ingestor: Ingestor,
    admission: Admission,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = access.tls.map(tokio_rustls::TlsAcceptor::from);
    let shared = Arc::new(Shared {
        sessions: Mutex::new(Sessions::new(ingestor.metrics().clone())),
        dispatcher: Mutex::new(None),
        users: access.users,
        devices: access.devices,
        require_identity: access.require_identity,
        ingestor: ingestor.clone(),
        slow_log: crate::metrics::LogLimiter::new(std::time::Duration::from_secs(60)),
    });
    let handle = Handle {
        shared: shared.clone(),
    };
    *shared.dispatcher.lock().expect("dispatcher lock") = Some(Dispatcher::new(
        ingestor,
        Replier::Embedded({
            let handle = handle.clone();
            Arc::new(move |topic: &str, payload: Bytes| handle.publish(topic, payload))
        }),
        json_topic,
    ));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (handle, shutdown) = (handle.clone(), shutdown.clone());
                    // Two kinds of task, so that a plaintext connection's is not as large as
                    // one with TLS.
                    match acceptor.clone() {
                        None => {
                            tasks.spawn(plain(stream, peer, handle, admission.clone(), shutdown));
                        }
                        Some(acceptor) => {
                            tasks.spawn(over_tls(stream, peer, acceptor, handle, admission.clone(), shutdown));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    shared.dispatcher.lock().expect("dispatcher lock").take();
    let _ = tokio::time::timeout(crate::ingest::DRAIN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
}

/// A plaintext client, once it has sent something: a socket that never speaks holds no
/// admission slot.
async fn plain(
    stream: TcpStream,
    peer: SocketAddr,
    handle: Handle,
    admission: Admission,
    shutdown: watch::Receiver<bool>,
) {
    if !crate::admission::first_bytes(&stream).await {
        return;
    }
    conn::run(stream, peer, None, handle, &admission, shutdown).await
}

/// A client over TLS, once it has sent something; the handshake takes an admission slot of
/// its own, before the MQTT opening.
async fn over_tls(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    handle: Handle,
    admission: Admission,
    shutdown: watch::Receiver<bool>,
) {
    if !crate::admission::first_bytes(&stream).await {
        return;
    }
    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    match Box::pin(admission.open(handshake)).await {
        Ok(Ok(tls)) => {
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| crate::auth::PeerCert::from_der(der));
            conn::run(tls, peer, cert, handle, &admission, shutdown).await
        }
        Ok(Err(e)) => {
            let why = format!("TLS handshake: {e}");
            handle.shared.ingestor.refuse(
                crate::metrics::StreamReject::Malformed,
                &peer.to_string(),
                &why,
            );
        }
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}
