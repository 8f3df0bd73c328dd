//! The embedded broker and clients that fall behind: a subscriber that never reads costs the
//! hub bounded memory and slows neither publishers nor ingest (what it misses is counted),
//! and a persistent session's unacknowledged QoS 1 messages come back with DUP set and their
//! original packet ids (MQTT 3.1.1 §4.4). The clients here speak MQTT over plain sockets, so
//! a test decides exactly what is read and acknowledged.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::{
    ConnectReturnCode, Packet, PubAck, Publish, QoS, Subscribe, SubscribeReasonCode,
    mqttbytes::Error as CodecError,
};
use shoal_e2e::{Hub, agent_with, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// One raw MQTT 3.1.1 connection.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    /// Connects as `id`; the answer says whether the hub had a session for it.
    async fn connect(port: u16, id: &str, clean: bool) -> (Self, bool) {
        Self::connect_with(port, id, clean, None, 60).await
    }

    /// `recv_buffer`: the socket's receive buffer, small for a client meant to fall behind.
    async fn connect_with(
        port: u16,
        id: &str,
        clean: bool,
        recv_buffer: Option<u32>,
        keep_alive: u16,
    ) -> (Self, bool) {
        let socket = TcpSocket::new_v4().expect("TCP socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let stream = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .unwrap_or_else(|e| panic!("connect to the broker on port {port}: {e}"));
        let mut client = Self {
            stream,
            buf: BytesMut::new(),
        };
        let mut connect = rumqttc::Connect::new(id);
        connect.clean_session = clean;
        connect.keep_alive = keep_alive;
        client.send(Packet::Connect(connect)).await;
        match client.recv().await {
            Some(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => {
                (client, a.session_present)
            }
            other => panic!("{id}: expected a successful CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX).expect("encode MQTT packet");
        self.stream.write_all(&out).await.expect("write to broker");
    }

    /// The next packet; `None` once the hub closed the connection.
    async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match Packet::read(&mut self.buf, usize::MAX) {
                    Ok(p) => return Some(p),
                    Err(CodecError::InsufficientBytes(_)) => {}
                    Err(e) => panic!("malformed MQTT from the hub: {e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the hub answered within 10 s")
    }

    async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let mut s = Subscribe::new(filter, qos);
        s.pkid = 1;
        self.send(Packet::Subscribe(s)).await;
        match self.recv().await {
            Some(Packet::SubAck(a)) if a.return_codes == [SubscribeReasonCode::Success(qos)] => {}
            other => {
                panic!("subscribe {filter}: expected a SUBACK granting {qos:?}, got {other:?}")
            }
        }
    }

    /// A QoS 1 publish, waiting for its PUBACK.
    async fn publish(&mut self, topic: &str, payload: &str, pkid: u16) {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
        match self.recv().await {
            Some(Packet::PubAck(a)) if a.pkid == pkid => {}
            other => panic!("publish {pkid}: expected its PUBACK, got {other:?}"),
        }
    }

    async fn ack(&mut self, pkid: u16) {
        self.send(Packet::PubAck(PubAck::new(pkid))).await;
    }

    /// A PINGREQ round trip: everything sent before it has been handled by the hub.
    async fn sync(&mut self) {
        self.send(Packet::PingReq).await;
        match self.recv().await {
            Some(Packet::PingResp) => {}
            other => panic!("expected a PINGRESP, got {other:?}"),
        }
    }

    /// Sends a PINGREQ and reads past what was queued for this client up to the PINGRESP;
    /// false if the connection ends first.
    async fn answers_a_ping(&mut self) -> bool {
        self.send(Packet::PingReq).await;
        loop {
            match self.recv().await {
                Some(Packet::PingResp) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    }

    /// Reads everything the hub still sends; true once it closed the connection.
    async fn closed_within(&mut self, timeout: Duration) -> bool {
        let mut scratch = vec![0u8; 1 << 20];
        tokio::time::timeout(timeout, async {
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }
}

async fn hub_with_broker(dir: &Path, mqtt: u16) -> Hub {
    let addr = format!("127.0.0.1:{mqtt}");
    Hub::start_on(dir, free_port(), free_port(), &["--mqtt-listen", &addr]).await
}

/// A `/proc/PID/status` field in bytes (`VmRSS`: resident now, `VmHWM`: the peak so far).
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_costs_bounded_memory_and_slows_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let mqtt = free_port();
    let hub = hub_with_broker(&dir.path().join("hub"), mqtt).await;
    let pid = hub.proc.child.id();

    // Observers of everything, at QoS 0 and at QoS 1, that read nothing after their SUBACK.
    // Small receive buffers keep what the kernel holds for them small.
    let (mut stuck0, _) = Client::connect_with(mqtt, "stuck-qos0", true, Some(64 << 10), 60).await;
    stuck0.subscribe("#", QoS::AtMostOnce).await;
    let (mut stuck1, _) = Client::connect_with(mqtt, "stuck-qos1", true, Some(64 << 10), 60).await;
    stuck1.subscribe("#", QoS::AtLeastOnce).await;
    let rss_before = memory(pid, "VmRSS");

    // A device sends telemetry throughout, while a publisher pushes 256 MiB past the observers
    // in rounds that span the device's run: four times what the hub may grow by below, so a
    // queue that keeps everything fails it.
    let mut agent = agent_with(
        &format!("mqtt://127.0.0.1:{mqtt}"),
        "bp-dev",
        &dir.path().join("spool"),
        "10ms",
        Some(200),
        &[],
    );
    let (mut publisher, _) = Client::connect(mqtt, "bulk-pub", true).await;
    const ROUNDS: u16 = 8;
    const PER_ROUND: u16 = 512;
    const SIZE: usize = 64 * 1024;
    let body = vec![b'x'; SIZE];
    let mut took = Duration::ZERO;
    for round in 0..ROUNDS {
        let started = Instant::now();
        for i in 1..=PER_ROUND {
            let mut p = Publish::new("bulk/load", QoS::AtLeastOnce, body.clone());
            p.pkid = round * PER_ROUND + i;
            publisher.send(Packet::Publish(p)).await;
        }
        for _ in 1..=PER_ROUND {
            assert!(
                matches!(publisher.recv().await, Some(Packet::PubAck(_))),
                "every publish is acknowledged"
            );
        }
        took += started.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_after = memory(pid, "VmRSS");
    let peak = memory(pid, "VmHWM");
    eprintln!(
        "pushed {} MiB in {took:?}; hub RSS {} MiB before, {} MiB after, peak {} MiB",
        u64::from(ROUNDS * PER_ROUND) * SIZE as u64 / MIB,
        rss_before / MIB,
        rss_after / MIB,
        peak / MIB
    );
    assert!(
        peak.saturating_sub(rss_before) < 64 * MIB,
        "the hub grew from {} MiB to a peak of {} MiB behind subscribers that never read",
        rss_before / MIB,
        peak / MIB
    );
    assert!(
        took < Duration::from_secs(20),
        "the publisher was slowed down: {took:?} for its messages"
    );

    // Ingest is unaffected: every sample is stored.
    assert!(agent.wait(Duration::from_secs(30)).await.success());
    assert_eq!(
        hub.stored_seqs("bp-dev").await,
        (1..=200).collect::<Vec<_>>()
    );

    // The QoS 0 observer lost messages (counted) and stays connected; the QoS 1 one was cut.
    assert!(
        hub.metric("shoal_mqtt_dropped_total{reason=\"queue_full_qos0\"}")
            .await
            > 0.0
    );
    assert!(hub.metric("shoal_mqtt_slow_disconnects_total").await >= 1.0);
    assert!(
        hub.metric("shoal_mqtt_dropped_total{reason=\"slow_subscriber_qos1\"}")
            .await
            > 0.0
    );
    assert!(
        stuck1.closed_within(Duration::from_secs(10)).await,
        "the QoS 1 observer that fell behind was disconnected"
    );
    assert!(
        stuck0.answers_a_ping().await,
        "the QoS 0 observer stays connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_qos1_comes_back_with_dup_and_its_packet_id() {
    let dir = tempfile::tempdir().unwrap();
    let mqtt = free_port();
    let _hub = hub_with_broker(&dir.path().join("hub"), mqtt).await;
    let (mut publisher, _) = Client::connect(mqtt, "dup-pub", true).await;

    let (mut obs, present) = Client::connect(mqtt, "dup-obs", false).await;
    assert!(!present);
    obs.subscribe("dup/t", QoS::AtLeastOnce).await;
    for (pkid, body) in [(1, "a"), (2, "b"), (3, "c")] {
        publisher.publish("dup/t", body, pkid).await;
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = obs.recv_publish().await;
        assert_eq!((p.qos, p.dup), (QoS::AtLeastOnce, false));
        got.push(p);
    }
    assert_eq!(
        got.iter().map(|p| p.payload.as_ref()).collect::<Vec<_>>(),
        [b"a", b"b", b"c"]
    );
    // "a" and "b" are acknowledged, "c" is not; then the client leaves.
    obs.ack(got[0].pkid).await;
    obs.ack(got[1].pkid).await;
    obs.sync().await;
    obs.send(Packet::Disconnect).await;
    drop(obs);

    let (mut obs, present) = Client::connect(mqtt, "dup-obs", false).await;
    assert!(present, "the persistent session was kept");
    let again = obs.recv_publish().await;
    assert_eq!(
        (again.payload.as_ref(), again.pkid, again.dup, again.qos),
        (&b"c"[..], got[2].pkid, true, QoS::AtLeastOnce),
        "resent under its original packet id with DUP"
    );
    obs.ack(again.pkid).await;

    // The same when the client comes back before the hub noticed it left (a network cut):
    // the new connection takes over the old one, and its unacknowledged message with it.
    publisher.publish("dup/t", "d", 4).await;
    let d = obs.recv_publish().await;
    assert_eq!((d.payload.as_ref(), d.dup), (&b"d"[..], false));
    obs.sync().await;
    let (mut obs2, present) = Client::connect(mqtt, "dup-obs", false).await;
    assert!(present);
    let again = obs2.recv_publish().await;
    assert_eq!(
        (again.payload.as_ref(), again.pkid, again.dup),
        (&b"d"[..], d.pkid, true)
    );
    assert!(
        obs.closed_within(Duration::from_secs(5)).await,
        "the old connection was closed"
    );

    // Acknowledged, it is not sent again.
    obs2.ack(again.pkid).await;
    obs2.sync().await;
    obs2.send(Packet::Disconnect).await;
    drop(obs2);
    let (mut obs3, present) = Client::connect(mqtt, "dup-obs", false).await;
    assert!(present);
    // A resent message would arrive before the PINGRESP.
    obs3.sync().await;
    publisher.publish("dup/t", "e", 5).await;
    let e = obs3.recv_publish().await;
    assert_eq!(
        (e.payload.as_ref(), e.dup),
        (&b"e"[..], false),
        "nothing acknowledged comes back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_let_go_after_its_keep_alive_while_messages_flow_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let mqtt = free_port();
    let _hub = hub_with_broker(&dir.path().join("hub"), mqtt).await;
    // Keep-alive 1 s: the hub lets it go after 1.5 s without a packet from it.
    let (mut silent, _) = Client::connect_with(mqtt, "silent", true, None, 1).await;
    silent.subscribe("flow/#", QoS::AtMostOnce).await;
    let (mut publisher, _) = Client::connect(mqtt, "flow-pub", true).await;
    let flow = tokio::spawn(async move {
        for pkid in 1..=100 {
            publisher.publish("flow/t", "tick", pkid).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let started = Instant::now();
    assert!(
        silent.closed_within(Duration::from_secs(4)).await,
        "messages sent to a client do not keep it alive"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "not before its keep-alive"
    );
    flow.abort();
}
