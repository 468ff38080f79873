//! Generates the tonic/prost code for `proto/raftblk.proto`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/raftblk.proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/raftblk.proto"], &["proto"])?;
    Ok(())
}
