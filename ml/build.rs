//! Compiles the ONNX subset shoal-ml writes with protox (no system `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/onnx/onnx-subset.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
