//! Bad input to the ingest port: a clear error to the sender, a counted rejection, nothing
//! stored, and the hub keeps serving.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shoal_e2e::Hub;
use shoal_proto::v1::ingest_client::IngestClient;
use shoal_proto::v1::{
    DeviceHello, Disk, IngestRequest, IngestResponse, Sample, TelemetryBatch, ingest_request,
    ingest_response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn hello(id: &str) -> IngestRequest {
    IngestRequest {
        msg: Some(ingest_request::Msg::Hello(DeviceHello {
            device_id: id.into(),
            ..Default::default()
        })),
    }
}

fn batch(samples: Vec<Sample>) -> IngestRequest {
    IngestRequest {
        msg: Some(ingest_request::Msg::Batch(TelemetryBatch { samples })),
    }
}

fn sample(seq: u64, ts: i64) -> Sample {
    Sample {
        seq,
        timestamp_ms: ts,
        uptime_seconds: Some(1),
        ..Default::default()
    }
}

/// Opens a stream, sends `msgs`, and returns the hub's answers (or the error that ended it).
async fn exchange(
    hub: &Hub,
    msgs: Vec<IngestRequest>,
) -> Result<Vec<IngestResponse>, tonic::Status> {
    let mut client = IngestClient::connect(hub.grpc_url())
        .await
        .expect("connect")
        .max_encoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(16);
    let expected = msgs.len();
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let mut stream = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let mut out = Vec::new();
    while out.len() < expected {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an answer in time")?
        {
            Some(m) => out.push(m),
            None => break,
        }
    }
    drop(tx);
    Ok(out)
}

/// A well-behaved device still gets through.
async fn assert_still_serving(hub: &Hub, id: &str) {
    let answers = exchange(hub, vec![hello(id), batch(vec![sample(1, now_ms())])])
        .await
        .expect("a good stream works");
    let Some(ingest_response::Msg::Ack(ack)) = &answers[1].msg else {
        panic!("expected an ack: {answers:?}")
    };
    assert_eq!((ack.up_to_seq, ack.accepted), (1, 1));
    assert_eq!(hub.get("/healthz").await["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_get_an_error_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let mut sock = tokio::net::TcpStream::connect(hub.grpc).await.unwrap();
    sock.write_all(b"\x16\x03\x01\x00\xa5garbage that is neither HTTP/2 nor HTTP/1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "the sender is told: {answer:?}"
    );
    shoal_e2e::wait_until(
        "the connection error to be counted",
        Duration::from_secs(5),
        || async { hub.metric("shoal_grpc_connection_errors_total").await >= 1.0 },
    )
    .await;
    assert_still_serving(&hub, "after-garbage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batch_is_refused_with_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let big: Vec<Sample> = (1..=600)
        .map(|seq| Sample {
            disks: vec![Disk {
                mount_point: "x".repeat(10_000),
                ..Default::default()
            }],
            ..sample(seq, now_ms())
        })
        .collect();
    let err = exchange(&hub, vec![hello("too-big"), batch(big)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("send smaller batches"),
        "{}",
        err.message()
    );
    assert_eq!(
        hub.metric("shoal_ingest_streams_rejected_total{reason=\"oversized_message\"}")
            .await,
        1.0
    );
    assert_eq!(
        hub.stored_up_to("too-big").await,
        0,
        "nothing of it was stored"
    );
    assert_still_serving(&hub, "after-oversized").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_device_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let cases = [
        ("", "device id is empty"),
        ("a/b", "'/'"),
        ("sensor #1", "' '"),
    ];
    for (id, expect) in cases {
        let err = exchange(&hub, vec![hello(id), batch(vec![sample(1, now_ms())])])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}: {err:?}");
        assert!(err.message().contains(expect), "{id:?}: {}", err.message());
    }
    assert_eq!(
        hub.metric("shoal_ingest_streams_rejected_total{reason=\"invalid_device_id\"}")
            .await,
        3.0
    );
    assert_eq!(
        hub.get("/api/v1/devices").await["devices"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "no device registered"
    );

    let err = exchange(&hub, vec![batch(vec![sample(1, now_ms())])])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("must be a hello"),
        "{}",
        err.message()
    );
    assert_still_serving(&hub, "after-bad-ids").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_future_timestamps_are_rejected_per_sample() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let now = now_ms();
    let year = 365 * 24 * 3_600_000;
    let answers = exchange(
        &hub,
        vec![
            hello("clock-skew"),
            batch(vec![
                sample(1, now),
                sample(2, now + 50 * year),
                sample(3, now),
            ]),
        ],
    )
    .await
    .unwrap();
    let Some(ingest_response::Msg::Ack(ack)) = &answers[1].msg else {
        panic!("expected an ack: {answers:?}")
    };
    assert_eq!(ack.up_to_seq, 3);
    assert_eq!(ack.accepted, 2);
    assert_eq!(ack.rejected.len(), 1);
    assert_eq!(ack.rejected[0].seq, 2);
    assert!(
        ack.rejected[0].reason.contains("ahead of the hub's clock"),
        "{}",
        ack.rejected[0].reason
    );
    assert_eq!(hub.stored_seqs("clock-skew").await, vec![1, 3]);
    assert_eq!(
        hub.metric("shoal_ingest_samples_rejected_total{reason=\"future_timestamp\"}")
            .await,
        1.0
    );
    assert_still_serving(&hub, "after-future").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_samples_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let now = now_ms();
    let first = exchange(
        &hub,
        vec![
            hello("resender"),
            batch((1..=10).map(|s| sample(s, now)).collect()),
        ],
    )
    .await
    .unwrap();
    let Some(ingest_response::Msg::Welcome(w)) = &first[0].msg else {
        panic!("welcome first")
    };
    assert_eq!(w.stored_up_to_seq, 0);
    // Reconnect and resend an overlapping window, as an agent does after losing an ack.
    let second = exchange(
        &hub,
        vec![
            hello("resender"),
            batch((5..=15).map(|s| sample(s, now)).collect()),
        ],
    )
    .await
    .unwrap();
    let Some(ingest_response::Msg::Welcome(w)) = &second[0].msg else {
        panic!("welcome first")
    };
    assert_eq!(w.stored_up_to_seq, 10, "the hub says where it is");
    let Some(ingest_response::Msg::Ack(ack)) = &second[1].msg else {
        panic!("ack")
    };
    assert_eq!((ack.accepted, ack.duplicates, ack.up_to_seq), (5, 6, 15));
    assert_eq!(
        hub.stored_seqs("resender").await,
        (1..=15).collect::<Vec<_>>()
    );
    assert_eq!(
        hub.metric("shoal_ingest_samples_duplicate_total").await,
        6.0
    );
}
