//! One simulated device's connection to the hub (gRPC stream, or MQTT through a broker), and
//! connecting the way the agent does: retries with its backoff, up to a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shoal_agent::transport::Backoff;
use shoal_proto::v1::ingest_client::IngestClient;
use shoal_proto::v1::{
    Ack, DeviceHello, IngestRequest, IngestResponse, Sample, TelemetryBatch, ingest_request,
    ingest_response,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::Transport;

/// How long one connection attempt (TCP, TLS, stream, hello, welcome) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an MQTT device waits for its ack.
const MQTT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how devices connect.
#[derive(Clone)]
pub struct Target {
    pub transport: Transport,
    /// The hub's gRPC URL, or the broker's `mqtt://HOST:PORT`.
    pub url: String,
    /// MQTT to the broker alone, no hub: connected at CONNACK, acked at PUBACK.
    pub broker_only: bool,
}

/// What an MQTT device's event loop hands over.
pub enum MqttIn {
    ConnAck,
    PubAck,
    Answer(ingest_response::Msg),
}

pub enum Link {
    Grpc {
        tx: mpsc::Sender<IngestRequest>,
        answers: tonic::Streaming<IngestResponse>,
    },
    Mqtt {
        client: AsyncClient,
        topic: String,
        broker_only: bool,
        incoming: mpsc::UnboundedReceiver<MqttIn>,
    },
}

impl Link {
    /// Connects once; returns the link and the seq the hub says it has stored up to.
    pub async fn connect(
        target: &Target,
        id: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<(Self, u64)> {
        let hello = DeviceHello {
            device_id: id.to_string(),
            ..Default::default()
        };
        match target.transport {
            Transport::Grpc => {
                let channel = match tls {
                    Some(tls) => shoal_agent::identity::channel(&target.url, tls).await?,
                    None => {
                        tonic::transport::Endpoint::from_shared(target.url.clone())?
                            .connect_timeout(ATTEMPT_TIMEOUT)
                            .tcp_nodelay(true)
                            .connect()
                            .await?
                    }
                };
                let mut client = IngestClient::new(channel);
                let (tx, rx) = mpsc::channel(2);
                tx.send(IngestRequest {
                    msg: Some(ingest_request::Msg::Hello(hello)),
                })
                .await?;
                let mut answers = client.stream(ReceiverStream::new(rx)).await?.into_inner();
                let welcome = answers.message().await?.context("no welcome")?;
                let Some(ingest_response::Msg::Welcome(w)) = welcome.msg else {
                    bail!("expected the hub's welcome, got {welcome:?}");
                };
                Ok((Link::Grpc { tx, answers }, w.stored_up_to_seq))
            }
            Transport::Mqtt => {
                let (host, port) = mqtt_addr(&target.url)?;
                let mut opts = MqttOptions::new(id, host, port);
                opts.set_keep_alive(Duration::from_secs(60));
                opts.set_max_packet_size(16 << 20, 16 << 20);
                let (client, mut events) = AsyncClient::new(opts, 16);
                let mut net = events.network_options();
                net.set_tcp_nodelay(true);
                net.set_connection_timeout(ATTEMPT_TIMEOUT.as_secs());
                events.set_network_options(net);
                let acks_topic = format!("shoal/v1/devices/{id}/acks");
                let (in_tx, mut incoming) = mpsc::unbounded_channel();
                let topic = acks_topic.clone();
                // The event loop ends at the first error, which closes `incoming`: the device
                // then reconnects with a fresh client, as the agent does.
                tokio::spawn(async move {
                    loop {
                        let got = match events.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => MqttIn::ConnAck,
                            Ok(Event::Incoming(Packet::PubAck(_))) => MqttIn::PubAck,
                            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                                match IngestResponse::decode(p.payload.as_ref()) {
                                    Ok(IngestResponse { msg: Some(m) }) => MqttIn::Answer(m),
                                    _ => continue,
                                }
                            }
                            Ok(_) => continue,
                            Err(_) => return,
                        };
                        if in_tx.send(got).is_err() {
                            return;
                        }
                    }
                });
                let stored = if target.broker_only {
                    loop {
                        match incoming.recv().await {
                            Some(MqttIn::ConnAck) => break 0,
                            Some(_) => {}
                            None => bail!("the broker closed the connection"),
                        }
                    }
                } else {
                    client.subscribe(acks_topic, QoS::AtLeastOnce).await?;
                    client
                        .publish(
                            format!("shoal/v1/devices/{id}/hello"),
                            QoS::AtLeastOnce,
                            false,
                            hello.encode_to_vec(),
                        )
                        .await?;
                    loop {
                        match incoming.recv().await {
                            Some(MqttIn::Answer(ingest_response::Msg::Welcome(w))) => {
                                break w.stored_up_to_seq;
                            }
                            Some(_) => {}
                            None => bail!("the connection closed before the hub's welcome"),
                        }
                    }
                };
                Ok((
                    Link::Mqtt {
                        client,
                        topic: format!("shoal/v1/devices/{id}/telemetry"),
                        broker_only: target.broker_only,
                        incoming,
                    },
                    stored,
                ))
            }
        }
    }

    /// Sends a batch and waits for its ack (from the broker alone with `broker_only`: an ack
    /// then covers the batch as sent).
    pub async fn send(&mut self, samples: Vec<Sample>) -> anyhow::Result<Ack> {
        match self {
            Link::Grpc { tx, answers } => {
                tx.send(IngestRequest {
                    msg: Some(ingest_request::Msg::Batch(TelemetryBatch { samples })),
                })
                .await?;
                let ack = answers.message().await?.context("the stream ended")?;
                let Some(ingest_response::Msg::Ack(ack)) = ack.msg else {
                    bail!("expected an ack")
                };
                Ok(ack)
            }
            Link::Mqtt {
                client,
                topic,
                broker_only,
                incoming,
            } => {
                let (first, last, n) = (
                    samples.first().map_or(0, |s| s.seq),
                    samples.last().map_or(0, |s| s.seq),
                    samples.len() as u32,
                );
                let payload = TelemetryBatch { samples }.encode_to_vec();
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await?;
                let wait = async {
                    loop {
                        match incoming.recv().await {
                            Some(MqttIn::PubAck) if *broker_only => {
                                return Ok(Ack {
                                    up_to_seq: last,
                                    first_seq: first,
                                    accepted: n,
                                    ..Default::default()
                                });
                            }
                            Some(MqttIn::Answer(ingest_response::Msg::Ack(ack))) => return Ok(ack),
                            Some(MqttIn::Answer(other)) => bail!("expected an ack, got {other:?}"),
                            Some(_) => {}
                            None => bail!("the MQTT connection ended"),
                        }
                    }
                };
                match tokio::time::timeout(MQTT_ACK_TIMEOUT, wait).await {
                    Ok(r) => r,
                    Err(_) => bail!("no ack within {}s", MQTT_ACK_TIMEOUT.as_secs()),
                }
            }
        }
    }

    /// Resolves when the connection has ended (the hub went away).
    pub async fn closed(&mut self) {
        match self {
            Link::Grpc { answers, .. } => {
                // Nothing is due between batches: anything here is the stream ending.
                let _ = answers.message().await;
            }
            Link::Mqtt { incoming, .. } => while incoming.recv().await.is_some() {},
        }
    }
}

/// `mqtt://HOST:PORT` → (host, port).
fn mqtt_addr(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .context("an MQTT hub URL starts with mqtt://")?;
    let (host, port) = rest.rsplit_once(':').context("mqtt://HOST:PORT")?;
    Ok((host.to_string(), port.parse()?))
}

/// How connecting went: the attempts it took and, when it gave up, the first error.
pub struct Connecting {
    pub attempts: u32,
    pub first_error: Option<String>,
}

/// Connects as the agent does: on failure it waits the agent's backoff (100 ms doubling to
/// 30 s, jittered) and tries again, until `deadline` has passed since it began or `stop`.
pub async fn connect_retrying(
    target: &Target,
    id: &str,
    tls: &Option<Arc<rustls::ClientConfig>>,
    deadline: Duration,
    stop: &mut watch::Receiver<bool>,
) -> (Option<(Link, u64)>, Connecting) {
    let began = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    let mut state = Connecting {
        attempts: 0,
        first_error: None,
    };
    loop {
        state.attempts += 1;
        let error =
            match tokio::time::timeout(ATTEMPT_TIMEOUT, Link::connect(target, id, tls.clone()))
                .await
            {
                Ok(Ok(link)) => return (Some(link), state),
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!("no welcome within {}s", ATTEMPT_TIMEOUT.as_secs()),
            };
        state.first_error.get_or_insert(error);
        let wait = backoff.next_delay();
        if began.elapsed() + wait > deadline || *stop.borrow() {
            return (None, state);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // A dropped sender is no stop signal.
            Ok(_) = stop.wait_for(|s| *s) => return (None, state),
        }
    }
}
