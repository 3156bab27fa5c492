//! How the control plane remembers what it created: cluster records (CSI
//! names → IDs, where a volume lives, what it was created from). One
//! interface, [`records::Records`], with backends: the embedded store used
//! by standalone mode and by a controller outside Kubernetes, and
//! Kubernetes custom resources ([`kube`]). The engine never sees either.
//! [`nodes`] is the controller's view of the nodes: routing, placement,
//! heartbeat. [`election`] decides which controller replica acts. [`moves`]
//! moves volumes between nodes.

pub mod election;
#[cfg(feature = "kubernetes")]
pub mod kube;
pub mod moves;
pub mod nodes;
pub mod records;

use std::sync::Arc;

/// What a build without the `kubernetes` feature says when asked for it.
pub const NO_KUBERNETES: &str =
    "this strata was built without Kubernetes support (cargo feature \"kubernetes\")";

/// What the controller works on: the records, the nodes, and where it
/// reports to users.
#[derive(Debug)]
pub struct Cluster {
    pub records: Arc<dyn records::Records>,
    pub nodes: Arc<nodes::Nodes>,
    /// Events on the PVCs volumes are made for (Kubernetes Events, or the
    /// log of a controller outside Kubernetes; none in standalone mode).
    pub events: Option<Arc<dyn Events>>,
}

/// The PVC a volume was made for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
}

impl ClaimRef {
    /// The claim named by the parameters `--extra-create-metadata` adds.
    pub fn from_parameters(p: &std::collections::HashMap<String, String>) -> Option<Self> {
        Some(ClaimRef {
            namespace: p.get("csi.storage.k8s.io/pvc/namespace")?.clone(),
            name: p.get("csi.storage.k8s.io/pvc/name")?.clone(),
        })
    }
}

/// The type of an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

/// Where the controller reports what it did to a claim. Best effort and
/// non-blocking.
pub trait Events: Send + Sync + std::fmt::Debug {
    fn emit(&self, claim: &ClaimRef, kind: EventKind, reason: &str, message: &str);
}

/// The Events of a controller outside Kubernetes: lines in its log.
#[derive(Debug)]
pub struct LogEvents;

impl Events for LogEvents {
    fn emit(&self, claim: &ClaimRef, kind: EventKind, reason: &str, message: &str) {
        let claim = format!("{}/{}", claim.namespace, claim.name);
        match kind {
            EventKind::Normal => tracing::info!(%claim, reason, "event: {message}"),
            EventKind::Warning => tracing::warn!(%claim, reason, "event: {message}"),
        }
    }
}
