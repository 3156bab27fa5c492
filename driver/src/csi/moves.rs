//! The `strata.cluster.v1.Cluster` service of a controller replica (moves
//! and drains, [`crate::cluster::moves`]), beside CSI on its socket and on
//! its peer port. Like the Controller service, a replica that does not
//! lead forwards each call to the leader.

use std::sync::Arc;

use csi_proto::cluster::v1::cluster_client::ClusterClient;
use csi_proto::cluster::v1::cluster_server::Cluster;
use csi_proto::cluster::v1::*;
use tonic::{Request, Response, Status};

use super::controller::MovesReady;
use super::replica::{Replica, Route, onward};
use crate::cluster::moves::{Moves, SnapshotsMoved};

/// The Cluster service of one replica.
#[derive(Debug, Clone)]
pub struct ClusterService {
    replica: Replica,
    /// Set once this replica leads.
    moves: MovesReady,
}

impl ClusterService {
    pub fn new(replica: Replica, moves: MovesReady) -> Self {
        ClusterService { replica, moves }
    }

    fn moves(&self) -> Result<&Arc<Moves>, Status> {
        self.moves
            .get()
            .ok_or_else(|| Status::unavailable("Strata's controller is starting; retry"))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn move_volume(
        &self,
        req: Request<MoveVolumeRequest>,
    ) -> Result<Response<MoveVolumeReply>, Status> {
        if let Route::Leader(channel) = self.replica.route(req.metadata())? {
            return ClusterClient::new(channel).move_volume(onward(req)).await;
        }
        let req = req.into_inner();
        crate::agent::volume_id(&req.volume_id)?;
        let to = (!req.node_id.is_empty()).then_some(req.node_id);
        let moves = Arc::clone(self.moves()?);
        // A task of its own: a client that goes away (or its deadline)
        // does not stop the move between its snapshots and the volume.
        let (carried, snapshots) = tokio::spawn(async move {
            let mut snapshots = SnapshotsMoved::default();
            let carried = moves
                .carry(&req.volume_id, None, to.as_deref(), &mut snapshots)
                .await;
            (carried, snapshots)
        })
        .await
        .map_err(super::status::join)?;
        let reply = match carried {
            Ok(r) => r,
            // Its snapshots that went first stay where they went.
            Err(e) if !snapshots.moved.is_empty() => {
                let moved: Vec<String> = snapshots
                    .moved
                    .iter()
                    .map(|m| format!("{} to node {}", m.snapshot_id, m.to_node))
                    .collect();
                return Err(Status::new(
                    e.code(),
                    format!(
                        "{}; its snapshots moved already: {}",
                        e.message(),
                        moved.join(", ")
                    ),
                ));
            }
            Err(e) => return Err(e),
        };
        Ok(Response::new(MoveVolumeReply {
            moved_snapshots: snapshots.moved,
            stayed_snapshots: stayed(snapshots.stayed).collect(),
            ..reply
        }))
    }

    async fn drain_node(
        &self,
        req: Request<DrainNodeRequest>,
    ) -> Result<Response<DrainNodeReply>, Status> {
        if let Route::Leader(channel) = self.replica.route(req.metadata())? {
            return ClusterClient::new(channel).drain_node(onward(req)).await;
        }
        let req = req.into_inner();
        let node = req.node_id;
        if node.is_empty() {
            return Err(Status::invalid_argument("node_id is required"));
        }
        let moves = self.moves()?;
        if req.undo {
            moves.undrain(&node).await?;
            return Ok(Response::new(DrainNodeReply::default()));
        }
        let d = moves.drain(&node).await?;
        let volumes = d.stayed.into_iter().map(|(volume_id, why)| Stayed {
            volume_id,
            why,
            ..Default::default()
        });
        Ok(Response::new(DrainNodeReply {
            moved: d.moved,
            stayed: volumes.chain(stayed(d.snapshots.stayed)).collect(),
            moved_snapshots: d.snapshots.moved,
        }))
    }

    async fn forget_node(
        &self,
        req: Request<ForgetNodeRequest>,
    ) -> Result<Response<ForgetNodeReply>, Status> {
        if let Route::Leader(channel) = self.replica.route(req.metadata())? {
            return ClusterClient::new(channel).forget_node(onward(req)).await;
        }
        let req = req.into_inner();
        if req.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id is required"));
        }
        // A task of its own: once it began, a client that goes away does
        // not stop it half-way.
        let moves = Arc::clone(self.moves()?);
        let reply = tokio::spawn(async move { moves.forget(&req.node_id, req.abandon_data).await })
            .await
            .map_err(super::status::join)??;
        Ok(Response::new(reply))
    }
}

/// Snapshots that stay, with why.
fn stayed(snapshots: Vec<(String, String)>) -> impl Iterator<Item = Stayed> {
    snapshots.into_iter().map(|(snapshot_id, why)| Stayed {
        snapshot_id,
        why,
        ..Default::default()
    })
}
