//! The MQTT transport: QoS 1 publishes on a persistent session, trimmed only on the hub's own
//! acknowledgement (never on the broker's PUBACK, which says nothing about storage).
//!
//! Topics and broker URLs are part of the contract: [`shoal_proto::mqtt`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use prost::Message;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use shoal_proto::mqtt::client::{no_delay, options};
use shoal_proto::mqtt::{kind, parse_broker, topic};
use shoal_proto::v1::{IngestResponse, ingest_response};
use tokio::sync::watch;

use super::inflight::InFlight;
use super::{Backoff, Sender, Stopped, TransportError, WINDOW};
use crate::ErrorKind;

impl Sender {
    pub(super) async fn run_mqtt(mut self, mut shutdown: watch::Receiver<bool>) -> Stopped {
        let device_id = self.hello.device_id.clone();
        let opts = match self.mqtt_options(&device_id) {
            Ok(o) => o,
            Err(e) => {
                self.stats.record_error(ErrorKind::Connect, &e);
                tracing::error!(error = %e, "cannot reach the MQTT broker");
                return Stopped::Shutdown;
            }
        };
        let (client, mut events) = AsyncClient::new(opts, 64);
        no_delay(&mut events);
        let acks_topic = topic(&device_id, kind::ACKS);
        let telemetry_topic = topic(&device_id, kind::TELEMETRY);

        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut connected = false;
        let mut in_flight = InFlight::default();
        let mut last_sent = self.spool.lock().expect("spool lock").acked_seq();
        loop {
            if connected {
                if let Err(e) =
                    self.fill_window(&client, &telemetry_topic, &mut in_flight, &mut last_sent)
                {
                    self.stats.connected.store(false, Ordering::Relaxed);
                    self.stats.record_error(e.kind(), &e);
                    tracing::error!(error = %e, "cannot read the spool");
                    return Stopped::Shutdown;
                }
                if in_flight.is_empty() && self.drained() {
                    self.stats.connected.store(false, Ordering::Relaxed);
                    let _ = client.try_disconnect();
                    return Stopped::Drained;
                }
            }
            let ack_deadline = in_flight
                .oldest_unacked()
                .filter(|_| connected)
                .map(|t| tokio::time::Instant::from_std(t + self.ack_timeout));
            tokio::select! {
                _ = shutdown.changed() => {
                    self.stats.connected.store(false, Ordering::Relaxed);
                    let _ = client.try_disconnect();
                    return Stopped::Shutdown;
                }
                _ = self.new_data.notified() => {}
                _ = self.sampling_done.changed() => {}
                _ = async { tokio::time::sleep_until(ack_deadline.expect("set")).await }, if ack_deadline.is_some() => {
                    let e = TransportError::AckTimeout(self.ack_timeout);
                    self.stats.record_error(e.kind(), &e);
                    tracing::warn!(timeout = ?self.ack_timeout, "the hub has not acknowledged; resending from the spool");
                    in_flight.clear();
                    last_sent = self.spool.lock().expect("spool lock").acked_seq();
                }
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        backoff.reset();
                        self.on_connected(&client, &acks_topic);
                        // Whatever was in flight may be lost with the old connection: resend.
                        in_flight.clear();
                        last_sent = self.spool.lock().expect("spool lock").acked_seq();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == acks_topic => {
                        if let Err(e) = self.on_response(&p.payload, &mut in_flight) {
                            self.stats.record_error(e.kind(), &e);
                            tracing::warn!(error = %e, "ignored a message on the acks topic");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        connected = false;
                        let delay = self.on_connection_lost(&e, &mut backoff);
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.changed() => return Stopped::Shutdown,
                        }
                    }
                },
            }
        }
    }

    /// The client's settings: the broker from the hub URL, a persistent session under the
    /// device id, the contract's packet size, credentials.
    fn mqtt_options(&self, device_id: &str) -> Result<rumqttc::MqttOptions, String> {
        let mut opts =
            parse_broker(&self.hub).and_then(|addr| options(device_id, &addr, self.tls.clone()))?;
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(false);
        opts.set_max_packet_size(
            shoal_proto::DEFAULT_MAX_MESSAGE_BYTES,
            shoal_proto::DEFAULT_MAX_MESSAGE_BYTES,
        );
        if let Some((user, pass)) = &self.mqtt_credentials {
            opts.set_credentials(user.clone(), pass.clone());
        }
        Ok(opts)
    }

    /// On CONNACK: subscribes to the device's acks and says hello.
    fn on_connected(&self, client: &AsyncClient, acks_topic: &str) {
        self.stats.connected.store(true, Ordering::Relaxed);
        tracing::info!(broker = %self.hub, "connected to the MQTT broker");
        let mut hello = self.hello.clone();
        hello.last_written_seq = self.spool.lock().expect("spool lock").last_written_seq();
        let _ = client.try_subscribe(acks_topic, QoS::AtLeastOnce);
        let _ = client.try_publish(
            topic(&hello.device_id, kind::HELLO),
            QoS::AtLeastOnce,
            false,
            hello.encode_to_vec(),
        );
    }

    /// Counts and logs a lost (or refused) connection; returns how long to wait.
    fn on_connection_lost(&self, e: &rumqttc::ConnectionError, backoff: &mut Backoff) -> Duration {
        self.stats.connected.store(false, Ordering::Relaxed);
        self.stats.record_error(
            ErrorKind::Connect,
            &format_args!("MQTT connection to {}: {e}", self.hub),
        );
        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        let delay = backoff.next_delay();
        tracing::warn!(broker = %self.hub, error = %e, retry_in = ?delay, "MQTT connection failed");
        delay
    }

    /// Publishes batches from the spool until the window is full.
    fn fill_window(
        &self,
        client: &AsyncClient,
        telemetry_topic: &str,
        in_flight: &mut InFlight,
        last_sent: &mut u64,
    ) -> Result<(), TransportError> {
        while in_flight.len() < WINDOW {
            let Some((first, last, batch)) = self.next_batch(*last_sent)? else {
                return Ok(());
            };
            let n = batch.samples.len() as u64;
            let payload = batch.encode_to_vec();
            if client
                .try_publish(telemetry_topic, QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                // The client's queue is full; the next loop turn tries again.
                return Ok(());
            }
            self.stats.samples_sent.fetch_add(n, Ordering::Relaxed);
            *last_sent = last;
            in_flight.sent(first, last, Instant::now());
        }
        Ok(())
    }

    fn on_response(&self, payload: &[u8], in_flight: &mut InFlight) -> Result<(), TransportError> {
        let msg =
            IngestResponse::decode(payload).map_err(|e| TransportError::Protocol(e.to_string()))?;
        match msg.msg {
            Some(ingest_response::Msg::Welcome(w)) => self.on_welcome(&w)?,
            Some(ingest_response::Msg::Ack(ack)) => self.on_ack(&ack, in_flight)?,
            None => return Err(TransportError::Protocol("empty response".into())),
        }
        Ok(())
    }
}
