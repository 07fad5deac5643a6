//! Generates Rust code for the three gRPC APIs. `protox` parses the .proto
//! files in pure Rust, so a fresh machine needs no `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "discovery/v0/discovery.proto",
    "deviceplugin/v1beta1/api.proto",
    "podresources/v1/api.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): cargo keys a build script's binary on
    // the workspace-relative path, so a target dir shared between clones at
    // different paths reuses it, and a compiled-in path would point at the
    // clone that built it first.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        // BTreeMap makes the encoding of map fields deterministic, so the same
        // device list always produces the same bytes (and the same diff).
        .btree_map(".")
        // Small stream buffers: kubelet holds a stream open to every device-plugin server.
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
