//! gRPC ingest: the `shoal.v1.Ingest` service over the [`Ingestor`], and the port's accept loop.
//!
//! The accept loop is hand-rolled (rather than tonic's `Server`) so that every
//! connection that ends in an error — garbage bytes, a broken HTTP/2 session — is counted in
//! `/metrics`, and so that shutdown drains open streams with a deadline. HTTP/1 requests (and
//! bytes that are not HTTP/2) get an HTTP/1 `400 Bad Request` instead of a silent close.
//!
//! With device authentication on, the port speaks TLS only: each connection's handshake runs
//! in its own task (a slow client holds up no one), and the client certificate it presented
//! (a [`PeerCert`]) rides on every request of that connection, where `Ingest` and `Renew` check
//! it. The `Enrollment` service shares the port.

use std::sync::Arc;

use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use shoal_proto::v1::enrollment_server::EnrollmentServer;
use shoal_proto::v1::ingest_server::{Ingest, IngestServer};
use shoal_proto::v1::{
    DeviceHello, IngestRequest, IngestResponse, Welcome, ingest_request, ingest_response,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status, Streaming};

use super::enroll::EnrollmentService;
use super::{DRAIN_GRACE, HelloError, Ingestor};
use crate::admission::Admission;
use crate::auth::audit::{AuditEntry, AuditLog, Outcome};
use crate::auth::{DeviceAuthority, PeerCert};
use crate::metrics::{Metrics, StreamReject};

/// How long a client gets to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Adds services to the port's routes.
pub type AddRoutes = Box<dyn FnOnce(tonic::service::Routes) -> tonic::service::Routes + Send>;

/// How the gRPC port takes connections.
pub struct Door {
    /// TLS settings; with device authentication, they ask clients for a device certificate.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Opening slots, shared with the embedded broker.
    pub admission: Admission,
}

pub async fn serve(
    listener: TcpListener,
    service: IngestService,
    enrollment: Option<EnrollmentService>,
    other: Option<AddRoutes>,
    door: Door,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let Door { tls, admission } = door;
    let max_bytes = service.ingestor.limits().max_message_bytes;
    let svc = IngestServer::new(service)
        .max_decoding_message_size(max_bytes)
        .max_encoding_message_size(max_bytes);
    let mut routes = tonic::service::Routes::new(svc);
    if let Some(e) = enrollment {
        routes = routes.add_service(EnrollmentServer::new(e));
    }
    // Services that are not ingest's (the model server), with their own authentication.
    if let Some(add) = other {
        routes = add(routes);
    }
    let routes = routes.prepare();
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
    let graceful = GracefulShutdown::new();
    // What every connection needs, shared: a connection's task then holds a pointer, not
    // copies of the HTTP settings.
    let door = Arc::new(Shared {
        builder,
        routes,
        admission,
        metrics: metrics.clone(),
    });
    // Every connection's task, so that those still open after the drain deadline (a device
    // streaming on, which GOAWAY does not end) can be closed: without this they would keep
    // the hub's store open after it said it stopped.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                metrics.grpc_connections.inc();
                let conn = Conn {
                    door: door.clone(),
                    watcher: graceful.watcher(),
                    peer,
                };
                // Two kinds of task, so that a plaintext connection's is not as large as one
                // with TLS.
                match &tls {
                    None => {
                        conns.spawn(conn.plain(stream));
                    }
                    Some(acceptor) => {
                        conns.spawn(conn.over_tls(acceptor.clone(), stream));
                    }
                }
            }
            _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => break,
        }
    }
    drop(door);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_GRACE) => {
            tracing::warn!(open = conns.len(), "ingest connections still open after the drain deadline; closing them");
            conns.abort_all();
        }
    }
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// What every connection of the port shares.
struct Shared {
    builder: Builder<TokioExecutor>,
    routes: tonic::service::Routes,
    admission: Admission,
    metrics: Arc<Metrics>,
}

/// One accepted connection, before and after its TLS handshake.
struct Conn {
    door: Arc<Shared>,
    watcher: hyper_util::server::graceful::Watcher,
    peer: std::net::SocketAddr,
}

impl Conn {
    /// HTTP/2 once the peer has sent something: a socket that never speaks holds no admission
    /// slot.
    async fn plain(self, stream: tokio::net::TcpStream) {
        if crate::admission::first_bytes(&stream).await {
            self.serve(stream, None).await
        }
    }

    /// TLS, then HTTP/2, once the peer has sent something; the handshake takes an admission
    /// slot of its own, before the HTTP/2 opening.
    async fn over_tls(self, acceptor: tokio_rustls::TlsAcceptor, stream: tokio::net::TcpStream) {
        if crate::admission::first_bytes(&stream).await {
            self.handshake(acceptor, stream).await
        }
    }

    async fn handshake(self, acceptor: tokio_rustls::TlsAcceptor, stream: tokio::net::TcpStream) {
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
        match Box::pin(self.door.admission.open(handshake)).await {
            Ok(Ok(tls)) => {
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|der| PeerCert::from_der(der));
                self.serve(tls, cert).await;
            }
            Ok(Err(e)) => {
                self.door.metrics.grpc_tls_failures.inc();
                tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                self.door.metrics.grpc_tls_failures.inc();
                tracing::debug!(peer = %self.peer, "TLS handshake timed out");
            }
        }
    }

    /// Serves HTTP/2 on `io`; every request carries the connection's client certificate.
    async fn serve<IO>(self, io: IO, cert: Option<PeerCert>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use tower::ServiceExt;
        let connect_info = tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(self.peer),
        };
        let svc = self.door.routes.clone().map_request(
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(connect_info.clone());
                if let Some(c) = &cert {
                    req.extensions_mut().insert(c.clone());
                }
                req
            },
        );
        // The opening (HTTP/2 handshake, up to the answer to the first request, the device's
        // welcome) holds an admission slot; the connection then goes on without it.
        let answered = Arc::new(tokio::sync::Notify::new());
        let svc = svc.map_future({
            let answered = answered.clone();
            move |response| {
                let answered = answered.clone();
                async move {
                    let response = response.await;
                    answered.notify_one();
                    response
                }
            }
        });
        let conn = self
            .door
            .builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
        let mut conn = std::pin::pin!(self.watcher.watch(conn));
        // Boxed: what opening holds is not part of every connection's task for its whole life.
        let ended = Box::pin(self.door.admission.open(async {
            tokio::select! {
                ended = &mut conn => Some(ended),
                _ = answered.notified() => None,
            }
        }))
        .await;
        let ended = match ended {
            Some(ended) => ended,
            None => conn.await,
        };
        if let Err(e) = ended {
            self.door.metrics.grpc_connection_errors.inc();
            tracing::debug!(peer = %self.peer, error = %e, "gRPC connection ended with an error");
        }
    }
}

/// The gRPC face of the [`Ingestor`]; with a [`DeviceAuthority`], every stream must come from
/// the enrolled device it names.
pub struct IngestService {
    ingestor: Ingestor,
    devices: Option<Arc<DeviceAuthority>>,
    audit: Option<Arc<AuditLog>>,
}

impl IngestService {
    pub fn new(ingestor: Ingestor) -> Self {
        Self {
            ingestor,
            devices: None,
            audit: None,
        }
    }

    /// Streams must present the certificate of the device they name.
    pub fn with_devices(mut self, devices: Arc<DeviceAuthority>, audit: Arc<AuditLog>) -> Self {
        self.devices = Some(devices);
        self.audit = Some(audit);
        self
    }

    /// Refuses, counts and audits a stream whose certificate does not fit `claimed`.
    fn authorize(&self, cert: Option<&PeerCert>, claimed: &str, from: &str) -> Result<(), Status> {
        let Some(devices) = &self.devices else {
            return Ok(());
        };
        let Err(e) = devices.authorize(cert, claimed) else {
            return Ok(());
        };
        self.ingestor.metrics().deny_device(e.reason());
        tracing::info!(device_id = %claimed, %from, reason = e.reason(), error = %e, "ingest stream refused");
        if let Some(audit) = &self.audit {
            let entry = AuditEntry {
                time_ms: crate::now_ms(),
                actor: cert.map_or_else(
                    || "unauthenticated".into(),
                    |c| format!("device:{}", c.device_id),
                ),
                role: None,
                action: "gRPC shoal.v1.Ingest/Stream".into(),
                object: claimed.into(),
                from: Some(from.into()),
                outcome: Outcome::Denied,
                status: 403,
                reason: Some(e.to_string()),
            };
            if let Err(err) = audit.append(&entry, false) {
                tracing::error!(error = %err, "cannot append to the audit log");
            }
        }
        Err(super::enroll::status_of(&e))
    }
}

/// Keeps the active-stream gauge right however a stream ends.
struct ActiveStream(Arc<Metrics>);

impl ActiveStream {
    fn new(m: Arc<Metrics>) -> Self {
        m.streams_active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(m)
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0
            .streams_active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Classifies a receive error: the client sent something unacceptable (counted, answered
/// with a clear status) or simply went away.
fn classify(status: &Status, max_bytes: usize) -> Option<(StreamReject, Status)> {
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => Some((
            StreamReject::Oversized,
            Status::out_of_range(format!(
                "{}; the hub accepts messages up to {max_bytes} bytes: send smaller batches",
                status.message()
            )),
        )),
        Code::Internal if status.message().contains("decode") => Some((
            StreamReject::Malformed,
            Status::invalid_argument(format!(
                "message is not a valid shoal.v1.IngestRequest: {}",
                status.message()
            )),
        )),
        _ => None,
    }
}

/// A stream's replies: the welcome, then one ack per batch; an error ends it.
type Replies =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<IngestResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = Replies;

    async fn stream(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let ingestor = self.ingestor.clone();
        let max_bytes = ingestor.limits().max_message_bytes;
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown peer".to_string(), |a| a.to_string());
        let cert = request.extensions().get::<PeerCert>().cloned();
        let mut inbound = request.into_inner();
        let hello = first_hello(&ingestor, &mut inbound, &peer, max_bytes).await?;
        self.authorize(cert.as_ref(), &hello.device_id, &peer)?;
        let (device_id, welcome) = open(&ingestor, hello).await?;
        tracing::debug!(device_id = %device_id, stored_up_to_seq = welcome.stored_up_to_seq, "device connected");

        let welcome = IngestResponse {
            msg: Some(ingest_response::Msg::Welcome(welcome)),
        };
        let batches = Batches {
            _active: ActiveStream::new(ingestor.metrics().clone()),
            ingestor,
            device_id,
            inbound,
            max_bytes,
            devices: self.devices.clone(),
            ended: false,
        };
        // The batches are read as the replies are sent, in the task that sends them: no task
        // and no channel of its own per device.
        let replies = futures::stream::once(std::future::ready(Ok(welcome)))
            .chain(futures::stream::unfold(batches, Batches::next));
        Ok(Response::new(Box::pin(replies)))
    }
}

/// Reads the stream's first message, which must be a hello; what is refused is counted.
async fn first_hello(
    ingestor: &Ingestor,
    inbound: &mut Streaming<IngestRequest>,
    peer: &str,
    max_bytes: usize,
) -> Result<DeviceHello, Status> {
    let first = match inbound.message().await {
        Ok(m) => m,
        Err(status) => {
            return Err(match classify(&status, max_bytes) {
                Some((why, answer)) => {
                    ingestor.refuse(why, peer, status.message());
                    answer
                }
                None => status,
            });
        }
    };
    let hello = match first.and_then(|m| m.msg) {
        Some(ingest_request::Msg::Hello(h)) => h,
        _ => {
            ingestor.refuse(StreamReject::NoHello, peer, "first message is not a hello");
            return Err(Status::invalid_argument(
                "the first message of an ingest stream must be a hello",
            ));
        }
    };
    Ok(hello)
}

/// Registers the hello's device; the welcome says how far the hub has its samples.
async fn open(ingestor: &Ingestor, hello: DeviceHello) -> Result<(String, Welcome), Status> {
    let device_id = hello.device_id.clone();
    let welcome = ingestor.hello(hello).await.map_err(|e| match &e {
        HelloError::InvalidId { .. } => Status::invalid_argument(e.to_string()),
        HelloError::Store(se) => store_status(e.to_string(), se),
    })?;
    Ok((device_id, welcome))
}

/// The batches that follow the hello, stored and acked one by one until the stream ends or
/// fails.
struct Batches {
    ingestor: Ingestor,
    device_id: String,
    inbound: Streaming<IngestRequest>,
    max_bytes: usize,
    devices: Option<Arc<DeviceAuthority>>,
    /// An error was replied: nothing more follows.
    ended: bool,
    _active: ActiveStream,
}

impl Batches {
    /// Stores the next batch and gives its ack; `None` once the device ended the stream or an
    /// error was replied.
    async fn next(mut self) -> Option<(Result<IngestResponse, Status>, Self)> {
        if self.ended {
            return None;
        }
        let reply = self.ingest_one().await?;
        self.ended = reply.is_err();
        Some((reply, self))
    }

    async fn ingest_one(&mut self) -> Option<Result<IngestResponse, Status>> {
        let ingestor = &self.ingestor;
        let device_id = &self.device_id;
        let msg = match self.inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return None,
            Err(status) => {
                let (why, answer) = classify(&status, self.max_bytes)?;
                ingestor.refuse(why, device_id, status.message());
                return Some(Err(answer));
            }
        };
        let Some(ingest_request::Msg::Batch(batch)) = msg.msg else {
            ingestor.refuse(StreamReject::Malformed, device_id, "a second hello");
            return Some(Err(Status::invalid_argument(
                "after the hello only batches may follow",
            )));
        };
        if self
            .devices
            .as_ref()
            .is_some_and(|d| d.is_revoked(device_id))
        {
            ingestor.metrics().deny_device("revoked");
            return Some(Err(Status::permission_denied(format!(
                "device {device_id:?} was revoked; enroll it again to let it back in"
            ))));
        }
        // Boxed: what storing holds while it waits is not part of every idle stream.
        Some(
            match Box::pin(ingestor.batch(device_id, batch.samples)).await {
                Ok(ack) => Ok(IngestResponse {
                    msg: Some(ingest_response::Msg::Ack(ack)),
                }),
                Err(e) => Err(store_status(format!("hub store unavailable: {e}"), &e)),
            },
        )
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        tracing::debug!(device_id = %self.device_id, "device stream ended");
    }
}

/// UNAVAILABLE for a store that cannot take the data now; with a refusal that passes by itself
/// (a full disk, a reopen), the `grpc-retry-pushback-ms` trailer tells the agent when to come
/// back.
fn store_status(message: String, e: &crate::store::StoreError) -> Status {
    let mut status = Status::unavailable(message);
    if let Some(after) = e.retry_after()
        && let Ok(v) = after.as_millis().to_string().parse()
    {
        status.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    status
}
