//! The CSI services (tonic): Identity and Controller now, Node next. Errors
//! become gRPC codes only in `status.rs`.

pub mod controller;
mod guard;
pub mod identity;
mod params;
mod status;

use std::path::Path;

use tokio::net::UnixListener;

/// Binds the CSI unix socket, replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::frontend::nbd::bind_unix(path)
}
