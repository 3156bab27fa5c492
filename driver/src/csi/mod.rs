//! The CSI services (tonic): Identity, Controller and Node. They are
//! served from the moment the socket is bound; until the engine is open
//! (and staged volumes are served again) Probe says not ready and every
//! other call is UNAVAILABLE. Errors become gRPC codes only in
//! `status.rs`. `replica.rs` routes a controller replica's Controller
//! calls: served here when it leads, forwarded to the leader otherwise.

pub mod controller;
mod guard;
pub mod identity;
pub mod node;
mod params;
pub mod replica;
pub(crate) mod status;

use std::sync::{Arc, OnceLock};

pub use guard::InFlight;
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
