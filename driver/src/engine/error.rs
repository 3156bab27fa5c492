//! The engine's one error type. Variants name what went wrong in words a
//! user can act on; [`Error::kind`] sorts them into the few classes that the
//! edges (gRPC, NBD, CLI) map to their own codes.

use std::io;
use std::path::PathBuf;

use super::ids::{SnapshotId, VolumeId};

/// An error and its causes on one line: "open pool lock /x: No such file".
/// Every layer that prints an error (logs, gRPC messages, the CLI) uses it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the engine reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No volume with this ID (never existed, or deleted).
    #[error("volume {0} not found")]
    VolumeNotFound(VolumeId),
    /// No snapshot with this ID (never existed, or deleted).
    #[error("snapshot {0} not found")]
    SnapshotNotFound(SnapshotId),
    /// An object with the requested ID already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// I/O limits that cannot be set.
    #[error("invalid I/O limits: {0}")]
    InvalidLimits(String),
    /// The changes since snapshot `base` were asked of something (`of`, a
    /// newer snapshot or the volume) that `base` is not older than.
    #[error("snapshot {base} is not an older snapshot of {of}: {why}")]
    NotComparable {
        base: SnapshotId,
        of: String,
        why: &'static str,
    },
    /// A byte range that does not lie inside the volume.
    #[error("range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the volume.
        size: u64,
    },
    /// A volume size that is zero, not whole 4 KiB blocks, or too large.
    #[error(
        "invalid volume size {size}: sizes are whole 4096-byte blocks, from 4096 bytes to 1 PiB"
    )]
    InvalidSize {
        /// The size asked for.
        size: u64,
    },
    /// The pool's filesystem cannot hold a layer file of the volume's size.
    #[error(
        "the pool's filesystem cannot hold a {size}-byte volume ({path}): ext4 stops at 16 TiB per file; \
         use XFS for larger volumes"
    )]
    TooLargeForFilesystem {
        /// The size asked for.
        size: u64,
        /// The layer file.
        path: PathBuf,
    },
    /// Writes acknowledged before the serving process died could not all
    /// be recovered (reported once, by the next flush).
    #[error(
        "volume {0}: writes acknowledged before the previous Strata process stopped were lost; \
         the data since the last completed flush is not intact"
    )]
    UnflushedLost(VolumeId),
    /// A write-back of the volume's data failed. Linux then marks the data
    /// clean in the page cache, so no retry can make it durable: the
    /// volume refuses writes and flushes until an operator acknowledges
    /// the loss.
    #[error(
        "volume {volume} lost data: {why}. Linux drops data whose write-back failed, so what was \
         acknowledged since the last good flush may be gone; the volume refuses writes and \
         flushes until `strata volume acknowledge-loss {volume}` (check the data first, e.g. \
         fsck a filesystem on it)"
    )]
    DataLost {
        /// The volume.
        volume: VolumeId,
        /// What failed, and when.
        why: String,
    },
    /// The state directory (a tmpfs) cannot hold a volume's log of
    /// unflushed writes.
    #[error(
        "volume {volume}: the state directory {dir} has no room for its {bytes}-byte log of \
         unflushed writes; free space there (or give it more) and try again"
    )]
    StateDirFull {
        /// The volume.
        volume: VolumeId,
        /// Where the logs live.
        dir: PathBuf,
        /// What one log needs.
        bytes: u64,
    },
    /// A catalog commit failed: whether it took effect is unknown until the
    /// pool is opened again, so the pool takes no more changes.
    #[error(
        "the pool at {0} is suspended: a metadata commit failed and its outcome is unknown; it \
         takes no writes until Strata is restarted (which opens the pool again)"
    )]
    PoolSuspended(PathBuf),
    /// A pool whose catalog is gone.
    #[error(
        "the pool at {0} has layer files or journals but no catalog.redb: its catalog is lost. \
         Strata will not make a new one (every layer would then be an orphan to delete); restore \
         catalog.redb from a backup, or move the directory away to start an empty pool"
    )]
    CatalogMissing(PathBuf),
    /// Volumes only grow.
    #[error("cannot shrink a volume from {from} to {to} bytes: volumes only grow")]
    ShrinkRefused {
        /// Current size.
        from: u64,
        /// Requested size.
        to: u64,
    },
    /// The 16-bit index entry names at most this many layers per family.
    #[error(
        "the layer family is full: it already has {limit} live layers, the most a 16-bit index \
         entry can name; delete snapshots or clones of this volume (or flatten them) first"
    )]
    LayerLimit {
        /// The limit.
        limit: u32,
    },
    /// Pinning would freeze the writable top of a volume whose chain is
    /// already at its depth limit (merges shorten it in the background).
    #[error(
        "volume {volume} is {depth} layers deep, its limit is {limit}: its top is not frozen again          until merges shorten the chain"
    )]
    ChainAtLimit {
        volume: VolumeId,
        depth: usize,
        limit: u32,
    },
    /// A zeroing asked to be fast would have written zeroes as data; nothing
    /// was changed.
    #[error(
        "zeroing {len} bytes at {offset} would write zeroes as data, and fast zeroing was asked"
    )]
    SlowZero {
        /// Where the zeroing started.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// A write to something read-only (a snapshot).
    #[error("{0} is read-only")]
    ReadOnly(String),

    /// A fetching volume (being copied from another node) cannot do this
    /// yet.
    #[error("volume {volume} is still being copied from another node: {why}")]
    Fetching { volume: VolumeId, why: String },
    /// The volume moved to another node: this node's copy serves nothing
    /// (the caller goes to the new owner).
    #[error("volume {volume} moved to node {node}")]
    Moved { volume: VolumeId, node: String },
    /// A group snapshot's cut found no hold of its members' writes (it
    /// reached its deadline, was released, or the node restarted):
    /// nothing was taken.
    #[error("group hold {0:#x} is not in place (it reached its deadline or was released)")]
    NotHeld(u64),
    /// A group snapshot's request names a volume twice, or one it does not
    /// hold.
    #[error("{0}")]
    InvalidGroup(String),
    /// The pool's filesystem is full.
    #[error("no space left in the pool while trying to {op}")]
    NoSpace {
        /// What was being done.
        op: &'static str,
        /// The underlying error (ENOSPC or EDQUOT).
        #[source]
        source: io::Error,
    },
    /// The pool was written by a newer Strata.
    #[error(
        "the pool at {path} has format version {found}, newer than this build understands \
         ({supported}); upgrade Strata, do not downgrade a pool"
    )]
    FormatTooNew {
        /// Pool directory.
        path: PathBuf,
        /// Version found on disk.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },
    /// The directory holds something that is not a Strata pool.
    #[error("{path} is not a Strata pool: {why}")]
    NotAPool {
        /// Pool directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Another process has the pool open.
    #[error("the pool at {0} is in use by another process")]
    PoolLocked(PathBuf),
    /// Metadata that contradicts itself. Run `strata pool check`.
    #[error("pool metadata is inconsistent: {0} (run `strata pool check` on the pool)")]
    Corrupt(String),
    /// A filesystem call failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The metadata store failed.
    #[error("metadata store: {op}")]
    Catalog {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: Box<redb::Error>,
    },
}

/// The classes of [`Error`] that the edges map to their own codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The named object does not exist.
    NotFound,
    /// An object with this ID already exists.
    AlreadyExists,
    /// The request itself is wrong (size, range, shrink).
    InvalidArgument,
    /// The request is outside the device (NBD: EINVAL; CSI: OUT_OF_RANGE).
    OutOfRange,
    /// A limit of the pool or format was reached.
    LimitReached,
    /// Writing to something read-only.
    ReadOnly,
    /// The pool is full.
    NoSpace,
    /// The pool is busy (locked by another process).
    Busy,
    /// The volume moved to another node.
    Moved,
    /// The pool cannot be used by this build or is damaged.
    Corrupt,
    /// An I/O or store failure.
    Io,
    /// Not done this way: asked to fail rather than take the slow path.
    NotSupported,
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::VolumeNotFound(_) | Error::SnapshotNotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::InvalidSize { .. }
            | Error::ShrinkRefused { .. }
            | Error::NotComparable { .. }
            | Error::InvalidLimits(_)
            | Error::InvalidGroup(_) => ErrorKind::InvalidArgument,
            Error::OutOfRange { .. } | Error::TooLargeForFilesystem { .. } => ErrorKind::OutOfRange,
            Error::LayerLimit { .. } | Error::ChainAtLimit { .. } => ErrorKind::LimitReached,
            Error::ReadOnly(_) => ErrorKind::ReadOnly,
            Error::SlowZero { .. } => ErrorKind::NotSupported,
            Error::NoSpace { .. } | Error::StateDirFull { .. } => ErrorKind::NoSpace,
            Error::PoolLocked(_) | Error::Fetching { .. } | Error::NotHeld(_) => ErrorKind::Busy,
            Error::Moved { .. } => ErrorKind::Moved,
            Error::FormatTooNew { .. }
            | Error::NotAPool { .. }
            | Error::Corrupt(_)
            | Error::CatalogMissing(_) => ErrorKind::Corrupt,
            Error::Io { .. }
            | Error::Catalog { .. }
            | Error::UnflushedLost(_)
            | Error::DataLost { .. }
            | Error::PoolSuspended(_) => ErrorKind::Io,
        }
    }

    /// A short, stable label for metrics (`error="no_space"`).
    pub fn metric_label(&self) -> &'static str {
        match self.kind() {
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::LimitReached => "limit_reached",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Busy => "busy",
            ErrorKind::Moved => "moved",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Io => "io",
            ErrorKind::NotSupported => "not_supported",
        }
    }
}

pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

/// Wraps an `io::Error` from a filesystem call on `path`, turning ENOSPC
/// and EDQUOT into [`Error::NoSpace`].
pub(crate) fn io_error(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
    if is_no_space(&source) {
        Error::NoSpace { op, source }
    } else {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Wraps an error of the metadata store, turning a full disk into
/// [`Error::NoSpace`].
pub(crate) fn catalog_error(op: &'static str, source: impl Into<redb::Error>) -> Error {
    let source: redb::Error = source.into();
    if let redb::Error::Io(io) = &source
        && is_no_space(io)
    {
        let io = io::Error::new(io.kind(), io.to_string());
        return Error::NoSpace { op, source: io };
    }
    Error::Catalog {
        op,
        source: Box::new(source),
    }
}
