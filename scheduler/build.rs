fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `Source` carries a credential: its Debug (in lib.rs) leaves it out.
    tonic_prost_build::configure()
        .skip_debug(["damselfly.scheduler.v1.Source"])
        .compile_protos(&["proto/scheduler.proto"], &["proto"])?;
    Ok(())
}
