//! Strata: a Kubernetes CSI driver for layered block volumes.
//!
//! - [`engine`]: pools, layers, volumes, snapshots and clones, the on-disk
//!   format and its crash safety. No gRPC, no Kubernetes.
//! - [`cli`]: the `strata` command line.

pub mod cli;
pub mod engine;
