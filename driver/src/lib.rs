//! Strata: a Kubernetes CSI driver for layered block volumes.
//!
//! - [`engine`]: pools, layers, volumes, snapshots and clones, the on-disk
//!   format and its crash safety. No gRPC, no Kubernetes.
//! - [`frontend`]: serves volumes and snapshots to clients and kernels
//!   (NBD, and FUSE for loop devices).
//! - [`peer`]: the data path between nodes (a volume attached on a node
//!   that does not hold it), and the grants that authorise it.
//! - [`node`]: volumes attached to this node's kernel, filesystems made
//!   and mounted, restart safety.
//! - [`tls`]: the cluster's mutual TLS files.
//! - [`metrics`]: Prometheus metrics and the `/metrics` endpoint.
//! - [`rpc`]: what the gRPC services share (the started core, errors as
//!   status codes).
//! - [`csi`]: the CSI services (Identity, Controller, Node); [`admin`]:
//!   Strata's own API beside them (jobs); [`cluster`]: records of what was
//!   created.
//! - [`standalone`]: everything in one process.
//! - [`cli`]: the `strata` command line.

/// The driver name Kubernetes knows Strata by (CSIDriver, StorageClass
/// provisioner, events' reporting component).
pub const DRIVER_NAME: &str = "csi.strata.dev";

pub mod admin;
pub mod agent;
pub mod cli;
pub mod cluster;
pub mod controller;
pub mod csi;
pub mod endpoint;
pub mod engine;
pub mod frontend;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod rpc;
pub mod standalone;
pub mod tls;
