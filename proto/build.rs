//! Compiles `scheduler.proto` with protox, a protobuf compiler written in Rust, so that a
//! machine with only a Rust toolchain builds the project (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=scheduler.proto");
    let descriptors = protox::compile(["scheduler.proto"], ["."])?;
    // `Source` carries a credential: its Debug (in lib.rs) leaves it out.
    tonic_prost_build::configure().skip_debug(["damselfly.scheduler.v1.Source"]).compile_fds(descriptors)?;
    Ok(())
}
