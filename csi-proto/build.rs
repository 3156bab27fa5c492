//! Compiles `proto/csi.proto` and Strata's own `proto/strata/*.proto` with protox (a
//! pure-Rust protobuf compiler), so building Strata never needs a system
//! `protoc` or network access.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/csi.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("csi_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    for own in [
        "proto/strata/admin.proto",
        "proto/strata/agent.proto",
        "proto/strata/cluster.proto",
        "proto/strata/peer.proto",
    ] {
        println!("cargo:rerun-if-changed={own}");
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(protox::compile([own], ["proto"])?)?;
    }
    Ok(())
}
