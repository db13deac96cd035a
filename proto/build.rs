//! Compiles the .proto files with protox, so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/mailvault/v1/mailbox.proto",
        "proto/mailvault/v1/errors.proto",
        "proto/mailvault/v1/cluster.proto",
        "proto/mailvault/v1/tenants.proto",
        "proto/mailvault/v1/access.proto",
        "proto/mailvault/v1/audit.proto",
        "proto/mailvault/v1/backups.proto",
        "proto/mailvault/v1/operations.proto",
        "proto/mailvault/raft/v1/raft.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // What the client port serves, for reflection: everything but the peer
    // protocol, which only the Raft port serves.
    let mut client_api = fds.clone();
    client_api.file.retain(|f| f.package() != "mailvault.raft.v1");
    std::fs::write(
        out.join("mailvault_client_api.bin"),
        prost::Message::encode_to_vec(&client_api),
    )?;
    let services: Vec<String> = client_api
        .file
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| format!("{:?}", format!("{}.{}", f.package(), s.name())))
        })
        .collect();
    std::fs::write(
        out.join("mailvault_client_services.rs"),
        format!("&[{}]", services.join(", ")),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // etcd's API (the calls the benchmark makes), client only, kept out of
    // the descriptor set mailvault serves for reflection.
    let etcd = "proto/etcd/bench.proto";
    println!("cargo:rerun-if-changed={etcd}");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(protox::compile([etcd], ["proto"])?)?;
    Ok(())
}
