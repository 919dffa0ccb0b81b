//! Compiles the gRPC protos with protox (pure Rust): no `protoc` install needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/scheduler.proto",
        "proto/dfdaemon.proto",
        "proto/manager.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Small per-call buffers: see src/grpc_codec.rs.
        .codec_path("crate::grpc_codec::SmallBufferCodec")
        // Carries a secret: its Debug (src/lib.rs) redacts it.
        .skip_debug([".damselfly.dfdaemon.v1.ObjectStorage"])
        .compile_fds(fds)?;
    Ok(())
}
