//! Compiles `proto/shoal/v1/*.proto` and `proto/inference/predict_v2.proto` with protox (a protobuf compiler written in Rust), so a
//! fresh machine needs no system `protoc`.
//!
//! Shoal's own services use [`codec::SmallCodec`](src/codec.rs) (small per-stream buffers: a
//! hub holds one ingest stream per device); the inference service keeps tonic's codec.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shoal = [
        "proto/shoal/v1/telemetry.proto",
        "proto/shoal/v1/ingest.proto",
        "proto/shoal/v1/enroll.proto",
        "proto/shoal/v1/platform.proto",
    ];
    let inference = ["proto/inference/predict_v2.proto"];
    for f in shoal.iter().chain(&inference) {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .type_attribute(".shoal.v1", "#[derive(serde::Serialize)]")
        .codec_path("crate::codec::SmallCodec")
        .compile_fds(protox::compile(shoal, ["proto"])?)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(protox::compile(inference, ["proto"])?)?;
    Ok(())
}
