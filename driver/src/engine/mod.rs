//! The storage engine: pools, layers, volumes, snapshots and clones.
//! It knows nothing of gRPC, NBD or Kubernetes.
//!
//! ```text
//!            Pool (pool.rs) ─ catalog/ (redb: volumes, layers, snapshots, presence)
//!             │
//!   Volume (volume.rs) ── live View ──▶ Index (index/) ──▶ layer slots ──▶ Layer files (layer.rs)
//!             │               ▲ base View (as of the topmost frozen layer, shared)
//!             └─ journal.rs (presence changes; the flush path)
//!   SnapshotReader (snapshot.rs) ── View as of a frozen layer
//!
//!   chain:  [base layer] ◀─parent─ [frozen] ◀─parent─ [frozen] ◀─parent─ [top, writable]
//!                                      ▲                  ▲
//!                                  snapshot S1        snapshot S2 ◀─parent─ [clone's top]
//! ```
//!
//! The on-disk format and the commit protocol are in `FORMAT.md`.

pub(crate) mod catalog;
pub mod check;
pub mod error;
pub mod geometry;
mod group;
pub mod ids;
pub(crate) mod index;
pub mod io;
pub mod jobs;
pub(crate) mod journal;
pub(crate) mod layer;
mod moving;
pub mod pinned;
pub mod pool;
pub(crate) mod presence;
pub mod qos;
pub(crate) mod rangelock;
pub mod ranges;
pub mod snapshot;
pub(crate) mod space;
pub(crate) mod sys;
pub(crate) mod unflushed;
pub mod view;
pub mod volume;

pub use catalog::FORMAT_VERSION;
pub use catalog::{Attachment, JobKind, JobReason, JobState, VolumePolicy};
pub use error::{Error, ErrorKind, Result};
pub use geometry::BLOCK_SIZE;
pub use ids::{FamilyId, JobId, LayerId, SnapshotId, VolumeId};
pub use index::MAX_LAYERS_PER_FAMILY;
pub use jobs::{JobConfig, JobInfo, JobObserver, Method};
pub use pinned::{BlockRange, Landed, Pinned};
pub use pool::{Pool, PoolOptions, PoolSpace, SnapshotInfo, VolumeInfo};
pub use qos::Limits;
pub use ranges::RangePage;
pub use snapshot::SnapshotReader;
pub use view::{DepthExtent, Extent};
pub use volume::{Backing, Fetched, Volume, VolumeStats, ZeroFlags};
