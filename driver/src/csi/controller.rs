//! CSI Controller: volumes and snapshots, following the spec's rules for
//! required fields, idempotency by name, error codes and pagination.
//!
//! Creates are idempotent across crashes: the record (name → chosen ID,
//! state `Creating`) is written first, then the engine object is created
//! with that ID, then the record becomes `Ready`. A repeated request finds
//! the record and finishes (or just returns) the same object.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use csi_proto::csi::v1::controller_server::Controller;
use csi_proto::csi::v1::controller_service_capability::{self as ccap, rpc};
use csi_proto::csi::v1::volume_capability::{AccessType, access_mode::Mode};
use csi_proto::csi::v1::volume_content_source::{self, SnapshotSource, VolumeSource};
use csi_proto::csi::v1::*;
use tonic::{Request, Response, Status};

use super::params;
use super::{InFlight, Started, status};
use crate::cluster::records::{ContentSource, RecordState, Records, SnapshotRecord, VolumeRecord};
use crate::engine::{Error, JobKind, JobReason, Pool, SnapshotId, VolumeId, VolumePolicy};
use crate::metrics::Metrics;
use crate::node::Node;

/// Topology key naming the node that owns a volume.
pub const TOPOLOGY_KEY: &str = "topology.strata.dev/node";
/// Size of a volume created without a capacity range: 1 GiB.
const DEFAULT_SIZE: u64 = 1 << 30;

/// The Controller service of a node that also holds the volumes
/// (standalone mode).
#[derive(Debug, Clone)]
pub struct ControllerService {
    started: Started,
    metrics: Arc<Metrics>,
    node_id: String,
    inflight: InFlight,
}

impl ControllerService {
    /// `inflight` is shared with the Node service of the same process, so
    /// that, say, a delete and a stage of one volume never overlap.
    pub fn new(
        started: Started,
        metrics: Arc<Metrics>,
        node_id: String,
        inflight: InFlight,
    ) -> Self {
        ControllerService {
            started,
            metrics,
            node_id,
            inflight,
        }
    }

    /// Runs engine work on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Pool, &dyn Records) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let core = self.started.get()?;
        let (pool, records) = (core.pool.clone(), Arc::clone(&core.records));
        tokio::task::spawn_blocking(move || f(&pool, records.as_ref()))
            .await
            .map_err(status::join)?
    }

    /// The node side of this process, if it has one.
    fn node(&self) -> Option<Arc<Node>> {
        self.started.get().ok().and_then(|c| c.node.clone())
    }

    fn topology(&self) -> Vec<Topology> {
        vec![Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_string(), self.node_id.clone())]),
        }]
    }

    fn volume_message(&self, rec: &VolumeRecord) -> Volume {
        let mut context = HashMap::new();
        if let Some(fs) = rec.parameters.get("fsType") {
            context.insert("fsType".to_string(), fs.clone());
        }
        Volume {
            capacity_bytes: rec.capacity_bytes as i64,
            volume_id: rec.volume_id.clone(),
            volume_context: context,
            content_source: rec.source.as_ref().map(|s| VolumeContentSource {
                r#type: Some(match s {
                    ContentSource::Snapshot(id) => {
                        volume_content_source::Type::Snapshot(SnapshotSource {
                            snapshot_id: id.clone(),
                        })
                    }
                    ContentSource::Volume(id) => {
                        volume_content_source::Type::Volume(VolumeSource {
                            volume_id: id.clone(),
                        })
                    }
                }),
            }),
            accessible_topology: self.topology(),
        }
    }
}

fn timestamp(ns: u64) -> prost_types::Timestamp {
    let d = Duration::from_nanos(ns);
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Checks the requested capabilities: single-node access modes, block or a
/// mount with a filesystem Strata can make.
pub(crate) fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    for cap in caps {
        let mode = cap
            .access_mode
            .as_ref()
            .map(|m| m.mode())
            .unwrap_or(Mode::Unknown);
        match mode {
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter => {}
            Mode::Unknown => {
                return Err(Status::invalid_argument(
                    "volume capability without access_mode",
                ));
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "access mode {other:?} is not supported: Strata volumes are attached to one node"
                )));
            }
        }
        match &cap.access_type {
            Some(AccessType::Block(_)) => {}
            Some(AccessType::Mount(m)) => {
                if !m.fs_type.is_empty() && !params::FS_TYPES.contains(&m.fs_type.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "fs_type {:?} is not supported; use one of {:?}",
                        m.fs_type,
                        params::FS_TYPES
                    )));
                }
            }
            None => {
                return Err(Status::invalid_argument(
                    "volume capability without access_type",
                ));
            }
        }
    }
    Ok(())
}

fn parse_volume_id(id: &str) -> Result<VolumeId, Status> {
    id.parse()
        .map_err(|_| Status::not_found(format!("volume {id:?} does not exist")))
}

fn parse_snapshot_id(id: &str) -> Result<SnapshotId, Status> {
    id.parse()
        .map_err(|_| Status::not_found(format!("snapshot {id:?} does not exist")))
}

/// Pagination over a list sorted by ID: a token is the last ID of the
/// previous page (stable while entries come and go). A token that is not
/// an ID is ABORTED, as the spec asks.
fn page<T>(
    items: Vec<T>,
    id: impl Fn(&T) -> String,
    max: i32,
    token: &str,
) -> Result<(Vec<T>, String), Status> {
    if max < 0 {
        return Err(Status::invalid_argument("max_entries must not be negative"));
    }
    let start = if token.is_empty() {
        0
    } else if token.parse::<VolumeId>().is_err() {
        return Err(Status::aborted(format!(
            "starting_token {token:?} is not a token this plugin issued"
        )));
    } else {
        items
            .iter()
            .position(|i| id(i).as_str() > token)
            .unwrap_or(items.len())
    };
    let max = if max == 0 { usize::MAX } else { max as usize };
    let mut rest: Vec<T> = items.into_iter().skip(start).collect();
    let next = if rest.len() > max {
        id(&rest[max - 1])
    } else {
        String::new()
    };
    rest.truncate(max);
    Ok((rest, next))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        check_capabilities(&req.volume_capabilities)?;
        let vparams = params::volume_params(&req.parameters)?;
        let fs_type = params::fs_type(&vparams, &req.volume_capabilities);
        let defining = params::defining(&req.parameters);
        let source = match req.volume_content_source.and_then(|s| s.r#type) {
            Some(volume_content_source::Type::Snapshot(s)) => {
                Some(ContentSource::Snapshot(s.snapshot_id))
            }
            Some(volume_content_source::Type::Volume(v)) => {
                Some(ContentSource::Volume(v.volume_id))
            }
            None => None,
        };
        let range = req.capacity_range.unwrap_or_default();
        let _guard = self.inflight.claim(&format!("volume name {}", req.name))?;
        let node = self.node_id.clone();
        let name = req.name.clone();
        let rec = self
            .blocking(move |pool, records| {
                // The source's size is the default (and the minimum).
                let source_size = match &source {
                    Some(ContentSource::Snapshot(id)) => {
                        let sid = parse_snapshot_id(id)?;
                        Some(pool.snapshot_info(sid).map_err(status::engine)?.size_bytes)
                    }
                    Some(ContentSource::Volume(id)) => {
                        let vid = parse_volume_id(id)?;
                        Some(pool.volume_info(vid).map_err(status::engine)?.size_bytes)
                    }
                    None => None,
                };
                let size = params::size_for(range.required_bytes, range.limit_bytes, source_size.unwrap_or(DEFAULT_SIZE))?;
                if let Some(min) = source_size.filter(|m| size < *m) {
                    return Err(Status::out_of_range(format!(
                        "the source is {min} bytes; a volume made from it cannot be smaller ({size} bytes asked)"
                    )));
                }
                if let Some((fs, min)) = fs_type
                    .as_deref()
                    .and_then(|fs| Some((fs, crate::node::mount::min_size(fs)?)))
                    .filter(|(_, min)| size < *min)
                {
                    return Err(Status::out_of_range(format!(
                        "{fs} needs a volume of at least {min} bytes ({} MiB); {size} bytes asked",
                        min >> 20
                    )));
                }
                let existing = records.volume_by_name(&name).map_err(status::records)?;
                let mut rec = match existing {
                    Some(rec) => {
                        if rec.capacity_bytes != size || rec.parameters != defining || rec.source != source {
                            return Err(Status::already_exists(format!(
                                "volume {name:?} exists with another size, parameters or source \
                                 ({} bytes, {:?}, {:?})",
                                rec.capacity_bytes, rec.parameters, rec.source
                            )));
                        }
                        rec
                    }
                    None => {
                        let rec = VolumeRecord {
                            name: name.clone(),
                            volume_id: VolumeId::new_random().to_string(),
                            capacity_bytes: size,
                            parameters: defining,
                            source: source.clone(),
                            node,
                            state: RecordState::Creating,
                            created_unix_ns: now_ns(),
                        };
                        records.put_volume(&rec).map_err(status::records)?;
                        rec
                    }
                };
                if rec.state == RecordState::Creating {
                    let vid = parse_volume_id(&rec.volume_id)?;
                    let created = match &rec.source {
                        None => pool.create_volume_as(vid, size).map(drop),
                        Some(ContentSource::Snapshot(id)) => {
                            pool.clone_snapshot_as(parse_snapshot_id(id)?, vid, Some(size)).map(drop)
                        }
                        Some(ContentSource::Volume(id)) => {
                            pool.clone_volume_as(parse_volume_id(id)?, vid, Some(size)).map(drop)
                        }
                    };
                    match created {
                        Ok(()) | Err(Error::AlreadyExists(_)) => {}
                        Err(e) => {
                            // Nothing was created: forget the name so a
                            // retry with other arguments is not refused.
                            let _ = records.delete_volume(&rec.volume_id);
                            return Err(status::engine(e));
                        }
                    }
                    let vid = parse_volume_id(&rec.volume_id)?;
                    if let Some(d) = vparams.max_chain_depth {
                        pool.set_policy(vid, VolumePolicy { max_chain_depth: d })
                            .map_err(status::engine)?;
                    }
                    if vparams.flatten_clones && rec.source.is_some() {
                        pool.enqueue(JobKind::Flatten, vid.as_u128(), 0, JobReason::ClonePolicy)
                            .map_err(status::engine)?;
                    }
                    rec.state = RecordState::Ready;
                    records.put_volume(&rec).map_err(status::records)?;
                }
                Ok(rec)
            })
            .await?;
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(self.volume_message(&rec)),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let _guard = self.inflight.claim(&format!("volume {id}"))?;
        let Ok(vid) = id.parse::<VolumeId>() else {
            // Never a volume of ours: deleting it is a success.
            return Ok(Response::new(DeleteVolumeResponse {}));
        };
        if self.node().is_some_and(|n| n.is_staged(vid)) {
            return Err(Status::failed_precondition(format!(
                "volume {vid} is staged on node {}; unstage it (delete the pods using it) first",
                self.node_id
            )));
        }
        self.blocking(move |pool, records| {
            match pool.delete_volume(vid) {
                Ok(()) | Err(Error::VolumeNotFound(_)) => {}
                Err(e) => return Err(status::engine(e)),
            }
            records
                .delete_volume(&vid.to_string())
                .map_err(status::records)
        })
        .await?;
        self.metrics.forget_export(&vid.to_string());
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Strata volumes are node-local: there is no ControllerPublishVolume",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Strata volumes are node-local: there is no ControllerUnpublishVolume",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let vid = parse_volume_id(&req.volume_id)?;
        self.blocking(move |pool, _| pool.volume_info(vid).map_err(status::engine))
            .await?;
        if let Err(unsupported) = check_capabilities(&req.volume_capabilities) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: unsupported.message().to_string(),
            }));
        }
        if let Err(bad) = params::volume_params(&req.parameters) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: bad.message().to_string(),
            }));
        }
        Ok(Response::new(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = req.into_inner();
        let (vols, records) = self
            .blocking(|pool, records| {
                let vols = pool.list_volumes().map_err(status::engine)?;
                let recs = vols
                    .iter()
                    .map(|v| records.volume(&v.id.to_string()).map_err(status::records))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((vols, recs))
            })
            .await?;
        let items: Vec<_> = vols.into_iter().zip(records).collect();
        let (items, next_token) = page(
            items,
            |(v, _)| v.id.to_string(),
            req.max_entries,
            &req.starting_token,
        )?;
        let entries = items
            .into_iter()
            .map(|(v, rec)| {
                let rec = rec.unwrap_or_else(|| VolumeRecord {
                    name: String::new(),
                    volume_id: v.id.to_string(),
                    capacity_bytes: v.size_bytes,
                    parameters: Default::default(),
                    source: None,
                    node: self.node_id.clone(),
                    state: RecordState::Ready,
                    created_unix_ns: v.created_unix_ns,
                });
                let mut volume = self.volume_message(&rec);
                volume.capacity_bytes = v.size_bytes as i64;
                list_volumes_response::Entry {
                    volume: Some(volume),
                    status: None,
                }
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        _: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let space = self
            .blocking(|pool, _| pool.space().map_err(status::engine))
            .await?;
        let available = space.free_bytes.saturating_sub(space.reserved_bytes);
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available as i64,
            maximum_volume_size: None,
            minimum_volume_size: Some(4096),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::CloneVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::ListVolumes,
            rpc::Type::ListSnapshots,
            rpc::Type::GetCapacity,
            rpc::Type::GetVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::GetSnapshot,
            rpc::Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(ccap::Type::Rpc(ccap::Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        if req.source_volume_id.is_empty() {
            return Err(Status::invalid_argument("source_volume_id is required"));
        }
        let sparams = params::snapshot_params(&req.parameters)?;
        let _guard = self
            .inflight
            .claim(&format!("snapshot name {}", req.name))?;
        let node = self.node_id.clone();
        let node_side = self.node().filter(|_| sparams.freeze);
        let rec = self
            .blocking(move |pool, records| {
                let vid = parse_volume_id(&req.source_volume_id)?;
                let mut rec = match records
                    .snapshot_by_name(&req.name)
                    .map_err(status::records)?
                {
                    Some(rec) if rec.source_volume_id != req.source_volume_id => {
                        return Err(Status::already_exists(format!(
                            "snapshot {:?} exists for another volume ({})",
                            req.name, rec.source_volume_id
                        )));
                    }
                    Some(rec) => rec,
                    None => {
                        let size = pool.volume_info(vid).map_err(status::engine)?.size_bytes;
                        let rec = SnapshotRecord {
                            name: req.name.clone(),
                            snapshot_id: SnapshotId::new_random().to_string(),
                            source_volume_id: req.source_volume_id.clone(),
                            size_bytes: size,
                            node,
                            state: RecordState::Creating,
                            created_unix_ns: now_ns(),
                        };
                        records.put_snapshot(&rec).map_err(status::records)?;
                        rec
                    }
                };
                if rec.state == RecordState::Creating {
                    let sid = parse_snapshot_id(&rec.snapshot_id)?;
                    // Thawed when dropped: after the snapshot, or on any error.
                    let _frozen = match &node_side {
                        Some(n) => n.freeze(vid).map_err(status::node)?,
                        None => None,
                    };
                    match pool.create_snapshot_as(vid, sid) {
                        Ok(info) => {
                            rec.size_bytes = info.size_bytes;
                            rec.created_unix_ns = info.created_unix_ns;
                        }
                        Err(Error::AlreadyExists(_)) => {}
                        Err(e) => {
                            let _ = records.delete_snapshot(&rec.snapshot_id);
                            return Err(status::engine(e));
                        }
                    }
                    rec.state = RecordState::Ready;
                    records.put_snapshot(&rec).map_err(status::records)?;
                }
                Ok(rec)
            })
            .await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshot_message(&rec)),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let id = req.into_inner().snapshot_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("snapshot_id is required"));
        }
        let _guard = self.inflight.claim(&format!("snapshot {id}"))?;
        let Ok(sid) = id.parse::<SnapshotId>() else {
            return Ok(Response::new(DeleteSnapshotResponse {}));
        };
        self.blocking(move |pool, records| {
            match pool.delete_snapshot(sid) {
                Ok(()) | Err(Error::SnapshotNotFound(_)) => {}
                Err(e) => return Err(status::engine(e)),
            }
            records
                .delete_snapshot(&sid.to_string())
                .map_err(status::records)
        })
        .await?;
        self.metrics.forget_export(&sid.to_string());
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = req.into_inner();
        let snaps = self
            .blocking(|pool, _| pool.list_snapshots().map_err(status::engine))
            .await?;
        let snaps: Vec<_> = snaps
            .into_iter()
            .filter(|s| req.snapshot_id.is_empty() || s.id.to_string() == req.snapshot_id)
            .filter(|s| {
                req.source_volume_id.is_empty() || s.volume.to_string() == req.source_volume_id
            })
            .collect();
        let (snaps, next_token) = page(
            snaps,
            |s| s.id.to_string(),
            req.max_entries,
            &req.starting_token,
        )?;
        let entries = snaps
            .into_iter()
            .map(|s| list_snapshots_response::Entry {
                snapshot: Some(Snapshot {
                    size_bytes: s.size_bytes as i64,
                    snapshot_id: s.id.to_string(),
                    source_volume_id: s.volume.to_string(),
                    creation_time: Some(timestamp(s.created_unix_ns)),
                    ready_to_use: true,
                    group_snapshot_id: String::new(),
                }),
            })
            .collect();
        Ok(Response::new(ListSnapshotsResponse {
            entries,
            next_token,
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let Some(range) = req.capacity_range else {
            return Err(Status::invalid_argument("capacity_range is required"));
        };
        let _guard = self.inflight.claim(&format!("volume {}", req.volume_id))?;
        let vid = parse_volume_id(&req.volume_id)?;
        let block = matches!(
            req.volume_capability.and_then(|c| c.access_type),
            Some(AccessType::Block(_))
        );
        let size = self
            .blocking(move |pool, records| {
                let current = pool.volume_info(vid).map_err(status::engine)?.size_bytes;
                let want = params::size_for(range.required_bytes, range.limit_bytes, current)?;
                if want <= current {
                    return Ok(current);
                }
                let info = pool.resize_volume(vid, want).map_err(status::engine)?;
                if let Some(mut rec) = records.volume(&vid.to_string()).map_err(status::records)? {
                    rec.capacity_bytes = info.size_bytes;
                    records.put_volume(&rec).map_err(status::records)?;
                }
                Ok(info.size_bytes)
            })
            .await?;
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let vid = parse_volume_id(&id)?;
        let (info, rec) = self
            .blocking(move |pool, records| {
                let info = pool.volume_info(vid).map_err(status::engine)?;
                Ok((
                    info,
                    records.volume(&vid.to_string()).map_err(status::records)?,
                ))
            })
            .await?;
        let rec = rec.unwrap_or_else(|| VolumeRecord {
            name: String::new(),
            volume_id: id.clone(),
            capacity_bytes: info.size_bytes,
            parameters: Default::default(),
            source: None,
            node: self.node_id.clone(),
            state: RecordState::Ready,
            created_unix_ns: info.created_unix_ns,
        });
        let mut volume = self.volume_message(&rec);
        volume.capacity_bytes = info.size_bytes as i64;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(volume),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(match self.node().and_then(|n| n.condition(vid)) {
                    Some(c) => VolumeCondition {
                        abnormal: c.abnormal,
                        message: c.message,
                    },
                    None => VolumeCondition {
                        abnormal: false,
                        message: "healthy (not staged on any node)".into(),
                    },
                }),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Strata has no mutable volume parameters",
        ))
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let id = req.into_inner().snapshot_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("snapshot_id is required"));
        }
        let sid = parse_snapshot_id(&id)?;
        let info = self
            .blocking(move |pool, _| pool.snapshot_info(sid).map_err(status::engine))
            .await?;
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(Snapshot {
                size_bytes: info.size_bytes as i64,
                snapshot_id: info.id.to_string(),
                source_volume_id: info.volume.to_string(),
                creation_time: Some(timestamp(info.created_unix_ns)),
                ready_to_use: true,
                group_snapshot_id: String::new(),
            }),
        }))
    }
}

fn snapshot_message(rec: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: rec.size_bytes as i64,
        snapshot_id: rec.snapshot_id.clone(),
        source_volume_id: rec.source_volume_id.clone(),
        creation_time: Some(timestamp(rec.created_unix_ns)),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}
