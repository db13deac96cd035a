//! Test harness: starts real `mailvault-node` processes on loopback, each with
//! its own temp directory, and talks to them over the real gRPC API.
//!
//! Each cluster picks a random `127.a.b.0/24`-style base address so clusters of
//! concurrently running tests never share a port; every process is killed and
//! every directory removed when the [`Cluster`] is dropped.

pub mod bench;
pub mod checker;
mod client;
mod cluster;
pub mod disk;
pub mod history;
pub mod linearizable;
pub mod net;
pub mod operation_faults;
pub mod s3;
pub mod scenario;

pub use client::*;
pub use cluster::{
    admin_binary, libfaketime, node_binary, test_modes_node_binary, Cluster, ClusterOptions, ADMIN, ADMIN2,
    FRONTEND,
};
