//! Builds Rust types, the gRPC service's server side and a descriptor set
//! from `proto/model_config.proto`, `proto/grpc_service.proto` (Triton's
//! `inference` package) and `proto/health.proto` (`grpc.health.v1`) with protox (pure Rust, no `protoc` needed) and
//! prost / tonic's code generators.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/model_config.proto");
    println!("cargo:rerun-if-changed=proto/grpc_service.proto");
    println!("cargo:rerun-if-changed=proto/health.proto");
    let fds =
        protox::compile(["proto/model_config.proto", "proto/grpc_service.proto", "proto/health.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("model_config.bin"), prost::Message::encode_to_vec(&fds))?;
    // Calls tandem does not serve yet answer UNIMPLEMENTED (the generated default).
    // Raw input tensors stay slices of the received message (no copy per tensor).
    tonic_prost_build::configure()
        .build_client(false)
        .generate_default_stubs(true)
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        // Decoding is bounded in what it allocates (src/grpc_codec.rs).
        .codec_path("crate::grpc_codec::BoundedCodec")
        .compile_fds(fds)?;
    Ok(())
}
