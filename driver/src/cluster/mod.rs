//! How the control plane remembers what it created: cluster records (CSI
//! names → IDs, where a volume lives, what it was created from). One
//! interface, [`records::Records`], with backends: the embedded store used
//! by standalone mode and by a controller outside Kubernetes, and
//! Kubernetes custom resources ([`kube`]). The engine never sees either.
//! [`nodes`] is the controller's view of the nodes: routing, placement,
//! heartbeat.

pub mod kube;
pub mod nodes;
pub mod records;

use std::sync::Arc;

/// What the controller works on: the records and the nodes.
#[derive(Debug)]
pub struct Cluster {
    pub records: Arc<dyn records::Records>,
    pub nodes: Arc<nodes::Nodes>,
}
