//! Generates the gRPC code of every contract under `proto/` with the vendored protoc, so a fresh
//! machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "agent/batch/v1/batch_service.proto",
        "agent/request/v1/request_service.proto",
        "agent/template/v1/template_service.proto",
        "agent/config/v1/preference_service.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // The descriptor set serves gRPC server reflection.
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .compile_with_config(
            config,
            &files.map(|f| root.join(f)),
            std::slice::from_ref(&root),
        )?;
    Ok(())
}
