//! Errors of the node side. They become gRPC codes only in `csi/status.rs`.

use std::path::PathBuf;

/// What went wrong staging, publishing or serving a volume on this node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong (bad path, unsupported capability).
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume (or path) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what is already there: staged elsewhere,
    /// a filesystem of another type on the device, not staged yet.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Staged at this path already, but with an incompatible capability.
    #[error("{0}")]
    AlreadyExists(String),
    /// A size the device or filesystem cannot take.
    #[error("{0}")]
    OutOfRange(String),
    /// This node cannot do it now (no fd holder, no attach backend).
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Engine(#[from] crate::engine::Error),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An external tool (mkfs, resize2fs, blkid...) failed.
    #[error("{command} failed ({status}): {stderr}")]
    Tool {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("state record {path}: {why}")]
    State { path: PathBuf, why: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// An I/O error with what was being done and to which path.
pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}
