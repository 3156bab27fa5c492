//! The one place engine, node and grant errors become gRPC status codes (the
//! controller's records errors: `csi/status.rs`).

use tonic::{Code, Status};

use crate::engine::{Error, ErrorKind};
use crate::node::Error as NodeError;
use crate::peer::grant::GrantError;

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

/// A grant refused (or not made) as a gRPC status.
pub(crate) fn grant(e: GrantError) -> Status {
    let code = match &e {
        GrantError::Missing => Code::Unauthenticated,
        GrantError::OtherVolume { .. } | GrantError::BadMac => Code::PermissionDenied,
        GrantError::CannotSign | GrantError::Key(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// A blocking task that panicked or was cancelled.
pub(crate) fn join(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("internal error: {e}"))
}
