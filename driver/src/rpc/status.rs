//! The one place engine and node errors become gRPC status codes (the
//! controller's records errors: `csi/status.rs`).

use tonic::{Code, Status};

use crate::engine::{Error, ErrorKind};
use crate::node::Error as NodeError;

/// The gRPC code for an engine error. Exhaustive: a new error kind must be
/// given its code here.
pub(crate) fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::LimitReached | ErrorKind::NoSpace => Code::ResourceExhausted,
        ErrorKind::ReadOnly => Code::FailedPrecondition,
        ErrorKind::Busy | ErrorKind::Moved => Code::Unavailable,
        ErrorKind::Corrupt | ErrorKind::Io => Code::Internal,
        ErrorKind::NotSupported => Code::Unimplemented,
    }
}

/// An engine error as a gRPC status (message: the error and its causes).
pub(crate) fn engine(e: Error) -> Status {
    Status::new(code(e.kind()), crate::engine::error::chain(&e))
}

/// A node error as a gRPC status. Exhaustive, like [`code`].
pub(crate) fn node(e: NodeError) -> Status {
    let code = match &e {
        NodeError::InvalidArgument(_) => Code::InvalidArgument,
        NodeError::NotFound(_) => Code::NotFound,
        NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
        NodeError::AlreadyExists(_) => Code::AlreadyExists,
        NodeError::OutOfRange(_) => Code::OutOfRange,
        NodeError::Unavailable(_) => Code::Unavailable,
        NodeError::Engine(inner) => code(inner.kind()),
        NodeError::Io { .. } | NodeError::Tool { .. } | NodeError::State { .. } => Code::Internal,
    };
    Status::new(code, crate::engine::error::chain(&e))
}

/// A blocking task that panicked or was cancelled.
pub(crate) fn join(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("internal error: {e}"))
}
