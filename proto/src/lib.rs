//! Wire types of mailvault, generated from `proto/` at build time.
//!
//! `v1` is the client API (the mailbox service and the operator services:
//! cluster, tenants, access, audit, backups, operations); `raft` is the internal
//! node-to-node protocol and must never be served on the client listener.

/// The client API, `mailvault.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("mailvault.v1");
}

/// The internal Raft peer protocol, `mailvault.raft.v1`.
pub mod raft {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("mailvault.raft.v1");
}

/// A client for the few etcd v3 calls the benchmark makes, to drive etcd
/// and mailvault from the same harness (`etcdserverpb`, wire-compatible).
pub mod etcd {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

pub mod approval;
pub mod client;

/// Encoded file descriptor set of the client API (`mailvault.v1`: every
/// service the client port serves), for gRPC server reflection. The peer
/// protocol is not in it.
pub const CLIENT_API_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mailvault_client_api.bin"));

/// The fully qualified names of the services in [`CLIENT_API_DESCRIPTOR_SET`].
pub const CLIENT_API_SERVICES: &[&str] = include!(concat!(env!("OUT_DIR"), "/mailvault_client_services.rs"));
