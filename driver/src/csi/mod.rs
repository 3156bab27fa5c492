//! The CSI services (tonic): Identity, Controller and Node. They are
//! served from the moment the socket is bound; until the engine is open
//! (and staged volumes are served again) Probe says not ready and every
//! other call is UNAVAILABLE. Errors become gRPC codes only in
//! `rpc/status.rs` (and `status.rs` for the records). `replica.rs` routes
//! a controller replica's Controller calls: served here when it leads,
//! forwarded to the leader otherwise; `moves.rs` serves Strata's Cluster
//! service (moves between nodes) beside them, routed the same way;
//! `metadata.rs` the SnapshotMetadata service (changed blocks), and
//! `group.rs` the GroupController service (group snapshots).

pub mod controller;
pub mod group;
mod guard;
pub mod identity;
pub mod metadata;
pub mod moves;
pub mod node;
mod params;
pub mod replica;
pub(crate) mod status;

pub use crate::rpc::{Core, Started};
pub use guard::InFlight;
