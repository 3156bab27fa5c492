//! CSI Node: validates requests the way the spec asks (required fields,
//! codes, idempotency) and hands them to [`crate::node::Node`], on the
//! blocking pool. One operation per volume at a time (ABORTED otherwise),
//! shared with the Controller service of the same process.

use std::collections::HashMap;
use std::path::PathBuf;

use csi_proto::csi::v1::node_server::Node as NodeRpc;
use csi_proto::csi::v1::node_service_capability::{self as ncap, rpc};
use csi_proto::csi::v1::volume_capability::{AccessType, access_mode::Mode};
use csi_proto::csi::v1::volume_usage::Unit;
use csi_proto::csi::v1::*;
use tonic::{Request, Response, Status};

use super::controller::{ATTACH_ANYWHERE, ATTACH_KEY, TOPOLOGY_KEY, check_capabilities};
use super::{InFlight, Started, params, status};
use crate::engine::VolumeId;
use crate::node::state::Access;
use crate::node::{self, Node};

/// The Node service of this process.
#[derive(Debug, Clone)]
pub struct NodeService {
    started: Started,
    node_id: String,
    max_volumes: u32,
    /// This node attaches other nodes' volumes (cluster mode).
    attaches_remote: bool,
    inflight: InFlight,
}

impl NodeService {
    pub fn new(
        started: Started,
        node_id: String,
        max_volumes: u32,
        attaches_remote: bool,
        inflight: InFlight,
    ) -> Self {
        NodeService {
            started,
            node_id,
            max_volumes,
            attaches_remote,
            inflight,
        }
    }

    /// Runs node work on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Node) -> node::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let node = self
            .started
            .get()?
            .node
            .clone()
            .ok_or_else(|| Status::unimplemented("this process does not serve CSI Node"))?;
        tokio::task::spawn_blocking(move || f(&node).map_err(status::node))
            .await
            .map_err(status::join)?
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

fn volume_id(id: &str) -> Result<VolumeId, Status> {
    id.parse()
        .map_err(|_| Status::not_found(format!("volume {id:?} does not exist")))
}

fn path(p: &str, field: &str) -> Result<PathBuf, Status> {
    let p = PathBuf::from(required(p, field)?);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{field} must be an absolute path, not {}",
            p.display()
        )));
    }
    Ok(p)
}

/// The capability as the node stores it, and its access mode.
fn access(
    cap: Option<VolumeCapability>,
    context: &HashMap<String, String>,
) -> Result<(Access, Option<Mode>), Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    check_capabilities(std::slice::from_ref(&cap))?;
    let mode = cap.access_mode.as_ref().map(|m| m.mode());
    let access = match cap.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => Access::Mount {
            fs_type: if !m.fs_type.is_empty() {
                m.fs_type
            } else {
                context
                    .get("fsType")
                    .cloned()
                    .unwrap_or_else(|| params::DEFAULT_FS_TYPE.to_string())
            },
            mount_flags: m.mount_flags,
        },
        None => {
            return Err(Status::invalid_argument(
                "volume capability without access_type",
            ));
        }
    };
    Ok((access, mode))
}

/// The keys of the publish context ControllerPublishVolume answers.
pub(crate) mod context {
    /// The node that holds the volume.
    pub const OWNER: &str = "strata.dev/owner";
    /// Its agent address (when it is not the node asked to stage).
    pub const ADDRESS: &str = "strata.dev/address";
    /// The grant that lets this node use it (`peer::grant::encode`).
    pub const GRANT: &str = "strata.dev/grant";
}

/// Where the volume is, if the publish context names another node.
fn remote_target(
    volume_id: &str,
    node_id: &str,
    ctx: &HashMap<String, String>,
) -> Result<Option<crate::peer::Target>, Status> {
    let Some(owner) = ctx.get(context::OWNER).filter(|o| *o != node_id) else {
        return Ok(None);
    };
    let get = |key: &str| {
        ctx.get(key).cloned().ok_or_else(|| {
            Status::invalid_argument(format!(
                "publish_context names owner {owner} but has no {key}"
            ))
        })
    };
    Ok(Some(crate::peer::Target {
        volume_id: volume_id.to_string(),
        owner: owner.clone(),
        address: get(context::ADDRESS)?,
        grant: get(context::GRANT)?,
    }))
}

#[tonic::async_trait]
impl NodeRpc for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let staging_path = path(&req.staging_target_path, "staging_target_path")?;
        let (access, mode) = access(req.volume_capability, &req.volume_context)?;
        let volume = volume_id(id)?;
        let _guard = self.inflight.claim(&format!("volume {volume}"))?;
        let remote = remote_target(id, &self.node_id, &req.publish_context)?;
        // A volume of another node published read-only is staged so (its
        // owner refuses writes).
        let read_only = mode == Some(Mode::SingleNodeReaderOnly)
            || remote.as_ref().is_some_and(crate::peer::Target::read_only);
        let stage = node::Stage {
            volume,
            staging_path,
            access,
            read_only,
            remote,
            frontend: params::frontend(req.volume_context.get("frontend"))?,
            chap: params::chap_secret(&req.secrets)?,
        };
        self.blocking(move |n| n.stage(&stage)).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let staging_path = path(&req.staging_target_path, "staging_target_path")?;
        let Ok(volume) = id.parse::<VolumeId>() else {
            // Never a volume of ours: nothing is staged.
            return Ok(Response::new(NodeUnstageVolumeResponse {}));
        };
        let _guard = self.inflight.claim(&format!("volume {volume}"))?;
        self.blocking(move |n| n.unstage(volume, &staging_path))
            .await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let target_path = path(&req.target_path, "target_path")?;
        let staging_path = path(&req.staging_target_path, "staging_target_path")?;
        let (access, mode) = access(req.volume_capability, &req.volume_context)?;
        let volume = volume_id(id)?;
        let _guard = self.inflight.claim(&format!("volume {volume}"))?;
        let publish = node::Publish {
            volume,
            staging_path,
            target_path,
            block: access == Access::Block,
            read_only: req.readonly || mode == Some(Mode::SingleNodeReaderOnly),
            single_writer: mode == Some(Mode::SingleNodeSingleWriter),
        };
        self.blocking(move |n| n.publish(&publish)).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let target_path = path(&req.target_path, "target_path")?;
        let _guard = self.inflight.claim(&format!("volume {id}"))?;
        let volume = id.parse::<VolumeId>().ok();
        self.blocking(move |n| n.unpublish(volume, &target_path))
            .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        // Both fields are checked before the volume is looked up; a path
        // that is not absolute cannot be one we published: NOT_FOUND.
        let id = required(&req.volume_id, "volume_id")?;
        let volume_path = PathBuf::from(required(&req.volume_path, "volume_path")?);
        let volume = volume_id(id)?;
        if !volume_path.is_absolute() {
            return Err(Status::not_found(format!(
                "volume_path {} is not absolute, so nothing is published there",
                volume_path.display()
            )));
        }
        let usage = self
            .blocking(move |n| n.usage(volume, &volume_path))
            .await?;
        let usage_list = match usage.filesystem {
            Some(fs) => vec![
                VolumeUsage {
                    available: fs.available_bytes as i64,
                    total: fs.total_bytes as i64,
                    used: fs.used_bytes as i64,
                    unit: Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: fs.free_inodes as i64,
                    total: fs.total_inodes as i64,
                    used: fs.total_inodes.saturating_sub(fs.free_inodes) as i64,
                    unit: Unit::Inodes as i32,
                },
            ],
            None => vec![VolumeUsage {
                available: 0,
                total: usage.device_bytes as i64,
                used: 0,
                unit: Unit::Bytes as i32,
            }],
        };
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage: usage_list,
            volume_condition: Some(VolumeCondition {
                abnormal: usage.condition.abnormal,
                message: usage.condition.message,
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        let volume = volume_id(required(&req.volume_id, "volume_id")?)?;
        path(&req.volume_path, "volume_path")?;
        let range = req.capacity_range.unwrap_or_default();
        if range.required_bytes < 0 || range.limit_bytes < 0 {
            return Err(Status::invalid_argument(
                "capacity_range values must not be negative",
            ));
        }
        let _guard = self.inflight.claim(&format!("volume {volume}"))?;
        let required = range.required_bytes as u64;
        let size = self.blocking(move |n| n.expand(volume, required)).await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(ncap::Type::Rpc(ncap::Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let mut segments = HashMap::from([(TOPOLOGY_KEY.to_string(), self.node_id.clone())]);
        if self.attaches_remote {
            segments.insert(ATTACH_KEY.to_string(), ATTACH_ANYWHERE.to_string());
        }
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: i64::from(self.max_volumes),
            accessible_topology: Some(Topology { segments }),
        }))
    }
}
