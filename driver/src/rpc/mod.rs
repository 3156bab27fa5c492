//! What the node's gRPC services (CSI, the agent, the admin API) share:
//! the [`Core`] they work on once the node has started, and the one place
//! where engine and node errors become gRPC status codes ([`status`]).
//! Below `csi` and `agent`, above `engine` and `node`.

pub(crate) mod status;
pub mod unix;

use std::sync::{Arc, OnceLock};

use tokio_stream::StreamExt;
use tonic::Status;

use crate::engine::Pool;

/// What the services work on once the node has started.
#[derive(Debug)]
pub struct Core {
    pub pool: Pool,
    /// The node side, where this process also serves CSI Node.
    pub node: Option<Arc<crate::node::Node>>,
}

/// The [`Core`], set once start-up is done; shared by every service.
#[derive(Debug, Clone, Default)]
pub struct Started(Arc<OnceLock<Core>>);

impl Started {
    /// Makes the services ready. Only the first call has an effect.
    pub fn set(&self, core: Core) {
        let _ = self.0.set(core);
    }

    pub fn is_ready(&self) -> bool {
        self.0.get().is_some()
    }

    pub(crate) fn get(&self) -> Result<&Core, Status> {
        self.0.get().ok_or_else(|| {
            Status::unavailable("Strata is starting (opening the pool, reattaching volumes); retry")
        })
    }
}

/// The connections of a TCP listener for a gRPC server, with Nagle's
/// algorithm off: a small answer (a 4 KiB read, a write's acknowledgement)
/// otherwise waits for the peer's delayed ACK, which caps a connection's
/// requests at a few hundred a second.
pub fn tcp_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}
