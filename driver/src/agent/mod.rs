//! The node agent (`strata.agent.v1.Agent`): the only way the controller
//! changes a node's volumes. [`AgentService`] does the engine work of the
//! CSI Controller calls on the node that holds the volume: create (empty,
//! from a snapshot, from a volume), delete, expand, snapshot (with the
//! filesystem frozen if asked), and reports the node's room and volume
//! health.
//!
//! The generated [`Agent`] trait is the controller's view of a node. It
//! has two implementations: [`AgentService`] itself, called in process by
//! standalone mode, and [`client::RemoteAgent`], which forwards each call
//! over mutual TLS ([`crate::tls`]) to the `strata node` that serves it. So
//! standalone and cluster mode run the same controller code.
//!
//! The same port serves the data path other nodes use for volumes of this
//! node that they attached ([`peer`]), and its data lanes ([`lane`]).
//!
//! Every call is idempotent on its IDs. Engine and node errors become gRPC
//! codes in `csi/status.rs`; the controller passes them on unchanged.

pub mod client;
pub mod import;
pub mod lane;
pub mod peer;

use csi_proto::agent::v1::agent_server::Agent;
use csi_proto::agent::v1::create_volume_request::Source;
use csi_proto::agent::v1::*;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::engine::{
    Error, JobKind, JobReason, SnapshotId, SnapshotInfo, VolumeId, VolumeInfo, VolumePolicy,
};
use crate::metrics::Metrics;
use crate::rpc::{Core, Started, status};

/// The agent of this node's engine.
#[derive(Debug, Clone)]
pub struct AgentService {
    started: Started,
    metrics: Arc<Metrics>,
    node_id: String,
    max_volumes: u32,
    attachments: Arc<peer::Attachments>,
    imports: Arc<import::Imports>,
}

impl AgentService {
    /// `attachments` is shared with this node's Peer service.
    pub fn new(
        started: Started,
        metrics: Arc<Metrics>,
        node_id: String,
        max_volumes: u32,
        attachments: Arc<peer::Attachments>,
    ) -> Self {
        AgentService {
            started,
            metrics,
            node_id,
            max_volumes,
            attachments,
            imports: Arc::default(),
        }
    }

    /// Connects every fetching volume of `pool` to its source (at start,
    /// before staged volumes are served again).
    pub fn connect_fetching(&self, pool: &crate::engine::Pool, peers: &crate::peer::Peers) {
        self.imports.connect_fetching(pool, peers);
    }

    /// Resumes the fill of the fetching volumes (after a restart).
    pub fn resume_fetches(&self) {
        self.imports.resume(&self.started);
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Core) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let started = self.started.clone();
        tokio::task::spawn_blocking(move || f(started.get()?))
            .await
            .map_err(status::join)?
    }
}

pub(crate) fn volume_id(id: &str) -> Result<VolumeId, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("volume_id is required"));
    }
    id.parse()
        .map_err(|_| Status::not_found(format!("volume {id:?} does not exist")))
}

pub(crate) fn snapshot_id(id: &str) -> Result<SnapshotId, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("snapshot_id is required"));
    }
    id.parse()
        .map_err(|_| Status::not_found(format!("snapshot {id:?} does not exist")))
}

/// The engine's limits from their message.
pub(crate) fn limits_of(l: Limits) -> crate::engine::Limits {
    crate::engine::Limits {
        read_iops: l.read_iops,
        write_iops: l.write_iops,
        read_bytes_per_sec: l.read_bytes_per_sec,
        write_bytes_per_sec: l.write_bytes_per_sec,
    }
}

pub(crate) fn limits_message(l: crate::engine::Limits) -> Limits {
    Limits {
        read_iops: l.read_iops,
        write_iops: l.write_iops,
        read_bytes_per_sec: l.read_bytes_per_sec,
        write_bytes_per_sec: l.write_bytes_per_sec,
    }
}

/// Sets `vid`'s I/O limits, keeping the rest of its policy.
pub(crate) fn set_limits(
    pool: &crate::engine::Pool,
    vid: VolumeId,
    limits: crate::engine::Limits,
) -> Result<(), Status> {
    let policy = VolumePolicy {
        limits,
        ..pool.policy(vid).map_err(status::engine)?
    };
    pool.set_policy(vid, policy).map_err(status::engine)
}

fn volume_reply(v: &VolumeInfo) -> VolumeReply {
    VolumeReply {
        volume_id: v.id.to_string(),
        size_bytes: v.size_bytes,
        created_unix_ns: v.created_unix_ns,
        abnormal: false,
        condition: String::new(),
        published_to: String::new(),
        limits: None,
    }
}

/// A volume with its health as this node sees it.
fn volume_health(core: &Core, v: &VolumeInfo) -> VolumeReply {
    let mut reply = volume_reply(v);
    match core.node.as_ref().and_then(|n| n.condition(v.id)) {
        Some(c) => (reply.abnormal, reply.condition) = (c.abnormal, c.message),
        None => reply.condition = "healthy (not staged on any node)".into(),
    }
    if let Ok(Some(lost)) = core.pool.volume_fault(v.id) {
        (reply.abnormal, reply.condition) = (true, lost);
    }
    if let Ok(a) = core.pool.attachment(v.id)
        && !a.for_move
        && !a.moved
    {
        reply.published_to = a.node;
    }
    reply
}

fn snapshot_reply(s: &SnapshotInfo) -> SnapshotReply {
    SnapshotReply {
        snapshot_id: s.id.to_string(),
        volume_id: s.volume.to_string(),
        size_bytes: s.size_bytes,
        created_unix_ns: s.created_unix_ns,
    }
}

/// The longest hold of a volume's writes a live move may ask for.
const MAX_HOLD_MS: u32 = 10_000;

/// The most ranges one SnapshotRanges reply carries (24 bytes each at
/// most, so a reply stays far below gRPC's 4 MiB message limit).
pub const MAX_RANGES_PER_PAGE: usize = 65536;

/// Which node of a live move a failpoint kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveParty {
    Source,
    Target,
}

/// The failpoints (see `engine::jobs::failpoint`) of a live move on its
/// source and target nodes, in the order a move reaches them.
pub const LIVE_MOVE_FAILPOINTS: [(MoveParty, &str); 8] = [
    // Recording changes, nothing copied yet.
    (MoveParty::Source, "agent::track::started"),
    // Part of the volume copied.
    (MoveParty::Target, "agent::import::after_chunk"),
    // A batch of changes handed out (the change record dies with the
    // source).
    (MoveParty::Source, "agent::changes::taken"),
    // A batch of changes copied and flushed, not yet confirmed.
    (MoveParty::Target, "agent::import::after_batch"),
    // Writes held, the last delta not yet copied.
    (MoveParty::Source, "agent::hold::held"),
    // Writes held, the last delta copied: the hold must end by its
    // deadline.
    (MoveParty::Target, "agent::import::synced"),
    // Sealed durably, the answer lost.
    (MoveParty::Source, "agent::seal::sealed"),
    // Switched: the attachment for the node that follows recorded on the
    // new owner (which holds the only current copy), the answer lost.
    (MoveParty::Target, "agent::attach::recorded"),
];

#[tonic::async_trait]
impl Agent for AgentService {
    async fn node_info(
        &self,
        _: Request<NodeInfoRequest>,
    ) -> Result<Response<NodeInfoReply>, Status> {
        let (node_id, max_volumes) = (self.node_id.clone(), self.max_volumes);
        let reply = self
            .blocking(move |core| {
                let space = core.pool.space().map_err(status::engine)?;
                let volumes = core.pool.list_volumes().map_err(status::engine)?;
                Ok(NodeInfoReply {
                    node_id,
                    version: env!("CARGO_PKG_VERSION").into(),
                    capacity_bytes: space.capacity_bytes,
                    available_bytes: space.free_bytes.saturating_sub(space.reserved_bytes),
                    provisioned_bytes: volumes.iter().map(|v| v.size_bytes).sum(),
                    max_volumes,
                    volumes: volumes.len() as u32,
                })
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<VolumeReply>, Status> {
        let req = req.into_inner();
        let vid = volume_id(&req.volume_id)?;
        let info = self
            .blocking(move |core| {
                let pool = &core.pool;
                let size = Some(req.size_bytes);
                let created = match &req.source {
                    None => pool.create_volume_as(vid, req.size_bytes),
                    Some(Source::SnapshotId(s)) => {
                        pool.clone_snapshot_as(snapshot_id(s)?, vid, size)
                    }
                    Some(Source::SourceVolumeId(v)) => {
                        pool.clone_volume_as(volume_id(v)?, vid, size)
                    }
                };
                match created {
                    Ok(_) | Err(Error::AlreadyExists(_)) => {}
                    Err(e) => return Err(status::engine(e)),
                }
                let settled = import::settle(pool, vid, &req).and_then(|()| {
                    if req.flatten && req.source.is_some() {
                        pool.enqueue(JobKind::Flatten, vid.as_u128(), 0, JobReason::ClonePolicy)
                            .map_err(status::engine)?;
                    }
                    Ok(())
                });
                if let Err(e) = settled {
                    // Not left half made (also by an earlier attempt,
                    // whose answer was lost: the controller asks only
                    // while its record is not ready, so no CO holds it):
                    // on a refusal the controller forgets the name, and
                    // nothing would delete it. Kept, the retry finishes it.
                    if let Err(d) = pool.delete_volume(vid) {
                        return Err(Status::internal(format!(
                            "volume {vid}: its settings failed ({}), and deleting it again \
                             failed: {d}",
                            e.message()
                        )));
                    }
                    return Err(e);
                }
                pool.volume_info(vid).map_err(status::engine)
            })
            .await?;
        Ok(Response::new(volume_reply(&info)))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteReply>, Status> {
        let id = req.into_inner().volume_id;
        let Ok(vid) = volume_id(&id) else {
            if id.is_empty() {
                return Err(Status::invalid_argument("volume_id is required"));
            }
            return Ok(Response::new(DeleteReply {}));
        };
        let node_id = self.node_id.clone();
        // A move's copy into it stops at its next step (also between its
        // source's retries).
        self.imports.stop_copies(vid);
        for _ in 0..500 {
            if !self.imports.copying(vid) && !self.imports.live_running(vid) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if self.imports.copying(vid) || self.imports.live_running(vid) {
            return Err(Status::unavailable(format!(
                "volume {vid} is being copied here by a move; retry when the copy ends"
            )));
        }
        self.blocking(move |core| {
            if core.node.as_ref().is_some_and(|n| n.is_staged_locally(vid)) {
                return Err(Status::failed_precondition(format!(
                    "volume {vid} is staged on node {node_id}; unstage it (delete the pods using it) first"
                )));
            }
            match core.pool.delete_volume(vid) {
                Ok(()) | Err(Error::VolumeNotFound(_)) => Ok(()),
                Err(e) => Err(status::engine(e)),
            }
        })
        .await?;
        self.imports.forget(vid);
        self.attachments.forget(vid).await;
        self.metrics.forget_export(&vid.to_string());
        Ok(Response::new(DeleteReply {}))
    }

    async fn get_volume(
        &self,
        req: Request<GetVolumeRequest>,
    ) -> Result<Response<VolumeReply>, Status> {
        let vid = volume_id(&req.into_inner().volume_id)?;
        let reply = self
            .blocking(move |core| {
                let info = core.pool.volume_info(vid).map_err(status::engine)?;
                let limits = core.pool.policy(vid).map_err(status::engine)?.limits;
                Ok(VolumeReply {
                    limits: Some(limits_message(limits)),
                    ..volume_health(core, &info)
                })
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn modify_volume(
        &self,
        req: Request<ModifyVolumeRequest>,
    ) -> Result<Response<VolumeReply>, Status> {
        let req = req.into_inner();
        let vid = volume_id(&req.volume_id)?;
        let limits = req
            .limits
            .map(limits_of)
            .ok_or_else(|| Status::invalid_argument("limits is required"))?;
        let info = self
            .blocking(move |core| {
                set_limits(&core.pool, vid, limits)?;
                core.pool.volume_info(vid).map_err(status::engine)
            })
            .await?;
        Ok(Response::new(volume_reply(&info)))
    }

    async fn list_volumes(
        &self,
        _: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesReply>, Status> {
        let volumes = self
            .blocking(move |core| {
                let volumes = core.pool.list_volumes().map_err(status::engine)?;
                Ok(volumes.iter().map(|v| volume_health(core, v)).collect())
            })
            .await?;
        Ok(Response::new(ListVolumesReply { volumes }))
    }

    async fn expand_volume(
        &self,
        req: Request<ExpandVolumeRequest>,
    ) -> Result<Response<VolumeReply>, Status> {
        let req = req.into_inner();
        let vid = volume_id(&req.volume_id)?;
        // No move begins or seals meanwhile.
        let _steady = self.attachments.steady().await;
        let moving = self.attachments.mover(vid).is_some();
        let info = self
            .blocking(move |core| {
                let info = core.pool.volume_info(vid).map_err(status::engine)?;
                if req.size_bytes <= info.size_bytes {
                    return Ok(info);
                }
                let a = core.pool.attachment(vid).map_err(status::engine)?;
                if a.for_move || a.moved || moving {
                    return Err(Status::failed_precondition(format!(
                        "volume {vid} is being copied to node {} by a move: it grows after the \
                         move",
                        a.node
                    )));
                }
                core.pool
                    .resize_volume(vid, req.size_bytes)
                    .map_err(status::engine)
            })
            .await?;
        Ok(Response::new(volume_reply(&info)))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<SnapshotReply>, Status> {
        let req = req.into_inner();
        let vid = volume_id(&req.volume_id)?;
        let sid = snapshot_id(&req.snapshot_id)?;
        let info = self
            .blocking(move |core| {
                // Thawed when dropped: after the snapshot, or on any error.
                let _frozen = match core.node.as_ref().filter(|_| req.freeze_filesystem) {
                    Some(n) => n.freeze(vid).map_err(status::node)?,
                    None => None,
                };
                match core.pool.create_snapshot_as(vid, sid) {
                    Ok(info) => Ok(info),
                    Err(Error::AlreadyExists(_)) => {
                        core.pool.snapshot_info(sid).map_err(status::engine)
                    }
                    Err(e) => Err(status::engine(e)),
                }
            })
            .await?;
        Ok(Response::new(snapshot_reply(&info)))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteReply>, Status> {
        let id = req.into_inner().snapshot_id;
        let Ok(sid) = snapshot_id(&id) else {
            if id.is_empty() {
                return Err(Status::invalid_argument("snapshot_id is required"));
            }
            return Ok(Response::new(DeleteReply {}));
        };
        self.blocking(move |core| match core.pool.delete_snapshot(sid) {
            Ok(()) | Err(Error::SnapshotNotFound(_)) => Ok(()),
            Err(e) => Err(status::engine(e)),
        })
        .await?;
        self.metrics.forget_export(&sid.to_string());
        Ok(Response::new(DeleteReply {}))
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<SnapshotReply>, Status> {
        let sid = snapshot_id(&req.into_inner().snapshot_id)?;
        let info = self
            .blocking(move |core| core.pool.snapshot_info(sid).map_err(status::engine))
            .await?;
        Ok(Response::new(snapshot_reply(&info)))
    }

    async fn snapshot_ranges(
        &self,
        req: Request<SnapshotRangesRequest>,
    ) -> Result<Response<SnapshotRangesReply>, Status> {
        let req = req.into_inner();
        let base = match req.base_snapshot_id.as_str() {
            "" => None,
            b => Some(snapshot_id(b)?),
        };
        let max = (req.max_results as usize).clamp(1, MAX_RANGES_PER_PAGE);
        let from = req.starting_offset;
        let page = if req.volume_id.is_empty() {
            let sid = snapshot_id(&req.snapshot_id)?;
            self.blocking(move |core| {
                core.pool
                    .snapshot_ranges(sid, base, from, max)
                    .map_err(status::engine)
            })
            .await?
        } else {
            let vid = volume_id(&req.volume_id)?;
            let base = base.ok_or_else(|| {
                Status::invalid_argument("a volume's changes need base_snapshot_id")
            })?;
            self.blocking(move |core| {
                core.pool
                    .volume_changes(vid, base, from, max)
                    .map_err(status::engine)
            })
            .await?
        };
        Ok(Response::new(SnapshotRangesReply {
            size_bytes: page.size,
            ranges: page
                .ranges
                .into_iter()
                .map(|(offset, length)| ByteRange { offset, length })
                .collect(),
            next_offset: page.next,
        }))
    }

    async fn attach(&self, req: Request<AttachRequest>) -> Result<Response<AttachReply>, Status> {
        let req = req.into_inner();
        if req.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id is required"));
        }
        let (vid, node) = (volume_id(&req.volume_id)?, req.node_id.as_str());
        let epoch = if req.for_move {
            if node == self.node_id {
                return Err(Status::invalid_argument(format!(
                    "volume {vid} is on node {node} already: nothing to move"
                )));
            }
            self.attachments
                .attach_for_move(&self.started, vid, node)
                .await?
        } else {
            let epoch = self
                .attachments
                .attach(&self.started, vid, node, req.read_only)
                .await?;
            crate::engine::jobs::failpoint::hit("agent::attach::recorded");
            epoch
        };
        Ok(Response::new(AttachReply {
            epoch,
            ..Default::default()
        }))
    }

    async fn seal(&self, req: Request<SealRequest>) -> Result<Response<AttachReply>, Status> {
        let req = req.into_inner();
        if req.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id is required"));
        }
        let vid = volume_id(&req.volume_id)?;
        let live = self.attachments.mover(vid) == Some((req.node_id.clone(), req.epoch))
            || self
                .blocking(move |core| core.pool.attachment(vid).map_err(status::engine))
                .await
                .is_ok_and(|a| a.moved && a.live);
        if live {
            let (held, boot) = self
                .attachments
                .seal_live(&self.started, vid, &req.node_id, req.epoch)
                .await?;
            if let Some(held) = held {
                self.metrics.move_hold(held);
                crate::engine::jobs::failpoint::hit("agent::seal::sealed");
            }
            return Ok(Response::new(AttachReply {
                epoch: req.epoch,
                boot,
            }));
        }
        let epoch = self
            .attachments
            .seal(&self.started, vid, &req.node_id, req.epoch)
            .await?;
        Ok(Response::new(AttachReply {
            epoch,
            ..Default::default()
        }))
    }

    async fn track(&self, req: Request<TrackRequest>) -> Result<Response<TrackReply>, Status> {
        let req = req.into_inner();
        let vid = volume_id(&req.volume_id)?;
        if req.node_id.is_empty() || req.node_id == self.node_id {
            return Err(Status::invalid_argument(format!(
                "a move of volume {vid} needs another node than this one ({:?})",
                req.node_id
            )));
        }
        let (epoch, now) = self
            .attachments
            .track(&self.started, vid, &req.node_id, req.peek)
            .await?;
        if epoch != 0 {
            crate::engine::jobs::failpoint::hit("agent::track::started");
        }
        let sealed = now.moved && now.live && now.node == req.node_id;
        Ok(Response::new(TrackReply {
            epoch,
            sealed,
            copy_first: now.for_move && !now.live,
            published_to: if now.moved || now.for_move {
                String::new()
            } else {
                now.node
            },
            read_only: now.read_only,
            repointed: now.repointed,
            attachment_epoch: now.epoch,
            sealed_boot: if sealed {
                now.sealed_boot
            } else {
                String::new()
            },
        }))
    }

    async fn hold(&self, req: Request<HoldRequest>) -> Result<Response<HoldReply>, Status> {
        let req = req.into_inner();
        let vid = volume_id(&req.volume_id)?;
        if req.deadline_ms == 0 || req.deadline_ms > MAX_HOLD_MS {
            return Err(Status::invalid_argument(format!(
                "a hold's deadline is 1 to {MAX_HOLD_MS} ms, not {}",
                req.deadline_ms
            )));
        }
        let deadline = std::time::Duration::from_millis(u64::from(req.deadline_ms));
        let held = std::time::Instant::now();
        self.attachments
            .hold(&self.started, vid, &req.node_id, req.epoch, deadline)
            .await?;
        crate::engine::jobs::failpoint::hit("agent::hold::held");
        tracing::debug!(volume = %vid, drained_ms = held.elapsed().as_millis() as u64, "writes held for a live move");
        Ok(Response::new(HoldReply {}))
    }

    async fn hold_group(
        &self,
        req: Request<HoldGroupRequest>,
    ) -> Result<Response<HoldGroupReply>, Status> {
        let req = req.into_inner();
        if req.deadline_ms == 0 || req.deadline_ms > MAX_HOLD_MS {
            return Err(Status::invalid_argument(format!(
                "a hold's deadline is 1 to {MAX_HOLD_MS} ms, not {}",
                req.deadline_ms
            )));
        }
        let vids = req
            .volume_ids
            .iter()
            .map(|v| volume_id(v))
            .collect::<Result<Vec<_>, _>>()?;
        for &vid in &vids {
            if let Some((node, _)) = self.attachments.mover(vid) {
                return Err(Status::failed_precondition(format!(
                    "volume {vid} is moving to node {node}: snapshot its group after the move"
                )));
            }
        }
        if req.flush_only {
            self.blocking(move |core| {
                for &vid in &vids {
                    core.pool
                        .volume(vid)
                        .and_then(|v| v.flush())
                        .map_err(status::engine)?;
                }
                Ok(())
            })
            .await?;
            return Ok(Response::new(HoldGroupReply {}));
        }
        let deadline = std::time::Duration::from_millis(u64::from(req.deadline_ms));
        let asked = std::time::Instant::now();
        let held = self
            .blocking(move |core| {
                core.pool
                    .hold_group(req.hold_id, &vids, deadline)
                    .map_err(status::engine)
            })
            .await?;
        if !held {
            return Err(Status::deadline_exceeded(format!(
                "the writes in flight did not finish within the hold's deadline ({} ms), \
                 or a live move holds a member's writes",
                deadline.as_millis()
            )));
        }
        crate::engine::jobs::failpoint::hit("agent::hold_group::held");
        tracing::debug!(
            hold = format!("{:#x}", req.hold_id),
            drained_ms = asked.elapsed().as_millis() as u64,
            "writes held for a group snapshot"
        );
        Ok(Response::new(HoldGroupReply {}))
    }

    async fn cut_group(
        &self,
        req: Request<CutGroupRequest>,
    ) -> Result<Response<CutGroupReply>, Status> {
        let req = req.into_inner();
        let members = req
            .members
            .iter()
            .map(|m| Ok((volume_id(&m.volume_id)?, snapshot_id(&m.snapshot_id)?)))
            .collect::<Result<Vec<_>, Status>>()?;
        let hold = req.hold_id;
        let (infos, held) = self
            .blocking(move |core| core.pool.cut_group(hold, &members).map_err(status::engine))
            .await?;
        self.metrics.group_hold(held);
        Ok(Response::new(CutGroupReply {
            snapshots: infos.iter().map(snapshot_reply).collect(),
            held_micros: held.as_micros() as u64,
        }))
    }

    async fn release_group(
        &self,
        req: Request<ReleaseGroupRequest>,
    ) -> Result<Response<DeleteReply>, Status> {
        let hold = req.into_inner().hold_id;
        self.blocking(move |core| Ok(core.pool.release_group(hold)))
            .await?;
        Ok(Response::new(DeleteReply {}))
    }

    async fn follow(&self, req: Request<FollowRequest>) -> Result<Response<FollowReply>, Status> {
        let req = req.into_inner();
        let vid = volume_id(&req.volume_id)?;
        let target = (req.owner != self.node_id).then(|| crate::peer::Target {
            volume_id: req.volume_id.clone(),
            owner: req.owner.clone(),
            address: req.address.clone(),
            grant: req.grant.clone(),
        });
        if target
            .as_ref()
            .is_some_and(|t| t.address.is_empty() || t.grant.is_empty())
        {
            return Err(Status::invalid_argument(
                "address and grant are required for another node's volume",
            ));
        }
        let staged = self
            .blocking(move |core| {
                let node = core
                    .node
                    .as_ref()
                    .ok_or_else(|| Status::failed_precondition("this process serves no node"))?;
                node.follow(vid, target, &req.previous_owner, &req.sealed_boot)
                    .map_err(status::node)
            })
            .await?;
        Ok(Response::new(FollowReply { staged }))
    }

    async fn import(&self, req: Request<ImportRequest>) -> Result<Response<ImportReply>, Status> {
        let req = req.into_inner();
        let create = req
            .volume
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume is required"))?;
        let vid = volume_id(&create.volume_id)?;
        if !req.resume && (req.owner.is_empty() || req.address.is_empty() || req.grant.is_empty()) {
            return Err(Status::invalid_argument(
                "owner, address and grant are required",
            ));
        }
        if req.owner == self.node_id {
            return Err(Status::invalid_argument(format!(
                "volume {vid} cannot be moved from node {} to itself",
                req.owner
            )));
        }
        if req.live {
            if !self.imports.live_running(vid) {
                self.attachments.forget(vid).await;
            }
            return Ok(Response::new(self.imports.poll_live(
                &self.started,
                vid,
                req,
            )?));
        }
        if req.lazy && req.resume {
            // Nothing is made: the volume fetches here (from where the
            // source is now), or finished.
            let (now, imports) = (req.clone(), Arc::clone(&self.imports));
            self.blocking(move |core| {
                if now.address.is_empty() {
                    core.pool.volume_info(vid).map(drop).map_err(status::engine)
                } else {
                    imports.retarget(core, vid, &now)
                }
            })
            .await?;
        } else if req.lazy {
            let (prepare, imports) = (req.clone(), Arc::clone(&self.imports));
            self.blocking(move |core| imports.prepare_fetch(core, vid, &prepare))
                .await?;
        } else if !self.imports.copying(vid) {
            // The volume is made afresh: no fence of an earlier copy of it
            // on this node (moved away before) may outlive that copy.
            self.attachments.forget(vid).await;
        }
        Ok(Response::new(self.imports.poll(&self.started, vid, req)?))
    }

    async fn detach(&self, req: Request<AttachRequest>) -> Result<Response<AttachReply>, Status> {
        let req = req.into_inner();
        let Ok(vid) = volume_id(&req.volume_id) else {
            return Ok(Response::new(AttachReply::default()));
        };
        if req.unseal && (!req.for_move || req.node_id.is_empty()) {
            return Err(Status::invalid_argument(
                "unseal undoes a live move's seal: it needs for_move and the move's node",
            ));
        }
        let ended = if req.unseal {
            self.attachments
                .unseal(
                    &self.started,
                    vid,
                    &req.node_id,
                    &req.reattach,
                    req.read_only,
                )
                .await
        } else {
            self.attachments
                .detach(&self.started, vid, &req.node_id, req.for_move)
                .await
        };
        match ended {
            Ok(epoch) => Ok(Response::new(AttachReply {
                epoch,
                ..Default::default()
            })),
            // Nothing to end.
            Err(s) if s.code() == tonic::Code::NotFound => {
                Ok(Response::new(AttachReply::default()))
            }
            Err(s) => Err(s),
        }
    }
}
