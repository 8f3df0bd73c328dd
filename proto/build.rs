//! Compiles `proto/shoal/v1/*.proto` and `proto/inference/predict_v2.proto` with protox (a protobuf compiler written in Rust), so a
//! fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/shoal/v1/telemetry.proto",
        "proto/shoal/v1/ingest.proto",
        "proto/shoal/v1/enroll.proto",
        "proto/shoal/v1/platform.proto",
        "proto/inference/predict_v2.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .type_attribute(".shoal.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
