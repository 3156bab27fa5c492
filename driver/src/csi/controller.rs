//! CSI Controller: volumes and snapshots, following the spec's rules for
//! required fields, idempotency by name, error codes and pagination. The
//! same code serves standalone mode (one node, in process) and
//! `strata controller` (many nodes, each reached through its agent over
//! mutual TLS): it decides *where* (placement, from the accessibility
//! requirements and the nodes' room) and keeps the cluster records; the
//! node's agent does the engine work.
//!
//! Creates are idempotent across crashes: the record (name → chosen ID and
//! node, state `Creating`) is written first, then the agent creates the
//! object with that ID, then the record becomes `Ready`. A repeated request
//! finds the record and finishes (or just returns) the same object on the
//! same node.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use csi_proto::agent::v1 as agent;
use csi_proto::agent::v1::agent_server::Agent;
use csi_proto::csi::v1::controller_server::Controller;
use csi_proto::csi::v1::controller_service_capability::{self as ccap, rpc};
use csi_proto::csi::v1::volume_capability::{AccessType, access_mode::Mode};
use csi_proto::csi::v1::volume_content_source::{self, SnapshotSource, VolumeSource};
use csi_proto::csi::v1::*;
use tonic::{Request, Response, Status};

use super::node::context as node_context;
use super::params;
use super::{InFlight, status};
use crate::agent::{snapshot_id as parse_snapshot_id, volume_id as parse_volume_id};
use crate::cluster::moves::{MovePhase, Moves, SnapshotClaim, check_not_moving};
use crate::cluster::records::{ContentSource, RecordState, Records, SnapshotRecord, VolumeRecord};
use crate::cluster::{ClaimRef, Cluster, EventKind};
use crate::engine::{SnapshotId, VolumeId};
use crate::peer::grant;

/// Topology key naming the node that owns a volume.
pub const TOPOLOGY_KEY: &str = "topology.strata.dev/node";

/// Topology key of the nodes that attach other nodes' volumes (cluster
/// mode); a volume any node may attach is accessible from
/// `ATTACH_KEY: ATTACH_ANYWHERE`.
pub const ATTACH_KEY: &str = "topology.strata.dev/attach";
pub const ATTACH_ANYWHERE: &str = "anywhere";
/// Size of a volume created without a capacity range: 1 GiB.
const DEFAULT_SIZE: u64 = 1 << 30;

/// The [`Cluster`] the controller works on, set once it is open.
#[derive(Debug, Clone, Default)]
pub struct ClusterReady(Arc<OnceLock<Arc<Cluster>>>);

impl ClusterReady {
    /// Makes the controller ready. Only the first call has an effect.
    pub fn set(&self, cluster: Arc<Cluster>) {
        let _ = self.0.set(cluster);
    }

    fn get(&self) -> Result<Arc<Cluster>, Status> {
        self.0
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("Strata's controller is starting; retry"))
    }
}

/// The controller's moves between nodes, set once it leads (cluster mode).
pub type MovesReady = Arc<OnceLock<Arc<Moves>>>;

/// The Controller service.
#[derive(Debug, Clone)]
pub struct ControllerService {
    cluster: ClusterReady,
    pub(super) inflight: InFlight,
    moves: MovesReady,
    /// One group snapshot is cut at a time (`group.rs`): two at once could
    /// each hold one node's pool and wait for the other's.
    pub(super) cutting: Arc<tokio::sync::Mutex<()>>,
}

impl ControllerService {
    /// `inflight` is shared with the Node service of the same process
    /// (standalone), so that, say, a delete and a stage of one volume
    /// never overlap.
    pub fn new(cluster: ClusterReady, inflight: InFlight) -> Self {
        ControllerService {
            cluster,
            inflight,
            moves: MovesReady::default(),
            cutting: Arc::default(),
        }
    }

    /// Restores and clones for a pod on another node than their source's
    /// are moved there with `moves` (switch first).
    pub fn with_moves(mut self, moves: MovesReady) -> Self {
        self.moves = moves;
        self
    }

    /// Where a new restore or clone `rec` should live: the node its pod
    /// will run on (the first preferred node, or the only allowed one), if
    /// that is another ready node than its source's, not draining, with
    /// room, and the volume may be attached anywhere.
    fn pod_node(
        &self,
        rec: &VolumeRecord,
        allowed: Option<&Vec<String>>,
        preferred: &[String],
    ) -> Option<String> {
        if rec.source.is_none() || !rec.anywhere {
            return None;
        }
        let want = preferred
            .first()
            .or(allowed.filter(|a| a.len() == 1).and_then(|a| a.first()))?;
        let nodes = &self.cluster.get().ok()?.nodes;
        let n = nodes
            .list()
            .ok()?
            .into_iter()
            .find(|n| &n.node_id == want)?;
        (n.node_id != rec.node
            && n.state == crate::cluster::records::NodeState::Ready
            && !n.draining
            && nodes.room(&n) >= rec.capacity_bytes)
            .then_some(n.node_id)
    }

    /// Runs a records call on the blocking pool (the store may do I/O).
    pub(super) async fn records<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Records) -> Result<T, crate::cluster::records::RecordsError>
        + Send
        + 'static,
    ) -> Result<T, Status> {
        let cluster = self.cluster.get()?;
        tokio::task::spawn_blocking(move || f(cluster.records.as_ref()).map_err(status::records))
            .await
            .map_err(status::join)?
    }

    /// The agent of `node`; FAILED_PRECONDITION for a node forgotten
    /// with what it held (`strata node forget --abandon-data`).
    pub(super) fn agent(&self, node: &str) -> Result<Arc<dyn Agent>, Status> {
        let nodes = &self.cluster.get()?.nodes;
        if nodes.forgotten(node) {
            return Err(crate::cluster::nodes::lost(node));
        }
        nodes.agent(node)
    }

    /// [`Self::agent`] for a delete: `None` when `node` was forgotten,
    /// so there is nothing left to delete but the record.
    pub(super) fn agent_to_delete(&self, node: &str) -> Result<Option<Arc<dyn Agent>>, Status> {
        let nodes = &self.cluster.get()?.nodes;
        match nodes.forgotten(node) {
            true => Ok(None),
            false => nodes.agent(node).map(Some),
        }
    }

    /// A volume's record, and the node that holds it: the record's, or
    /// (standalone) this process's node for a volume without a record.
    /// `None`: unknown.
    async fn holder(&self, id: &str) -> Result<(Option<VolumeRecord>, Option<String>), Status> {
        let key = id.to_string();
        let rec = self.records(move |r| r.volume(&key)).await?;
        let node = match &rec {
            Some(r) => Some(r.node.clone()),
            None => self.cluster.get().ok().and_then(|c| c.nodes.local_id()),
        };
        Ok((rec, node))
    }

    /// Why volume `rec` is lost with a forgotten node, if it is.
    fn lost_volume(&self, rec: &VolumeRecord) -> Result<Option<Status>, Status> {
        Ok(crate::cluster::moves::lost_volume(
            &self.cluster.get()?.nodes,
            rec,
        ))
    }

    /// The node that holds a volume ([`Self::holder`]); FAILED_PRECONDITION
    /// for one lost with a forgotten node.
    async fn volume_node(&self, id: &str) -> Result<Option<String>, Status> {
        let (rec, node) = self.holder(id).await?;
        if let Some(rec) = &rec
            && let Some(e) = self.lost_volume(rec)?
        {
            return Err(e);
        }
        Ok(node)
    }

    /// [`Self::volume_node`] for calls that change the volume or who
    /// reaches it: UNAVAILABLE while it moves between nodes (the sidecars
    /// retry).
    pub(super) async fn settled_node(&self, id: &str) -> Result<Option<String>, Status> {
        let key = id.to_string();
        if let Some(rec) = self.records(move |r| r.volume(&key)).await? {
            if let Some(e) = self.lost_volume(&rec)? {
                return Err(e);
            }
            check_not_moving(&rec)?;
        }
        self.volume_node(id).await
    }

    /// Before snapshot `id` is deleted: claims it against moves (see
    /// [`Moves::claim_snapshot`]); a move that switched already has its
    /// source copy removed first; one that did not is rolled back.
    pub(super) async fn settle_snapshot_move(
        &self,
        id: &str,
    ) -> Result<Option<SnapshotClaim>, Status> {
        let key = id.to_string();
        let moving = self
            .records(move |r| r.snapshot(&key))
            .await?
            .and_then(|r| r.moving);
        let Some(moves) = self.moves.get() else {
            // Standalone, or a controller that does not lead yet.
            return match moving {
                Some(_) => Err(Status::unavailable(format!(
                    "snapshot {id} is moving between nodes and the controller is starting; retry"
                ))),
                None => Ok(None),
            };
        };
        let busy = |m: crate::cluster::moves::Move| {
            Status::unavailable(format!(
                "snapshot {id} is moving from node {} to node {}; retry when the move is done \
                 ({})",
                m.from, m.to, m.message
            ))
        };
        match moving {
            Some(m) if m.phase == MovePhase::Removing => moves.finish_snapshot(id).await?,
            // Not moved yet: rolled back (UNAVAILABLE while a drain moves
            // it, or while its target does not answer).
            Some(m) if matches!(m.phase, MovePhase::Copying | MovePhase::Aborting) => {
                moves.roll_back_snapshot(id).await?
            }
            Some(m) => return Err(busy(m)),
            None => {}
        }
        let claim = moves.claim_snapshot(id)?;
        // A move that began meanwhile.
        let key = id.to_string();
        if let Some(m) = self
            .records(move |r| r.snapshot(&key))
            .await?
            .and_then(|r| r.moving)
        {
            return Err(busy(m));
        }
        Ok(Some(claim))
    }

    /// The node that holds snapshot `id` (as [`Self::holder`] for a
    /// volume); FAILED_PRECONDITION for one lost with a forgotten node.
    pub(super) async fn snapshot_node(&self, id: &str) -> Result<Option<String>, Status> {
        self.snapshot_holder(id, false).await
    }

    /// [`Self::snapshot_node`], also for a snapshot lost with a forgotten
    /// node (`deleting`; else FAILED_PRECONDITION).
    async fn snapshot_holder(&self, id: &str, deleting: bool) -> Result<Option<String>, Status> {
        let key = id.to_string();
        let rec = self.records(move |r| r.snapshot(&key)).await?;
        if let Some(with) = rec.as_ref().and_then(|r| r.lost_with.as_ref())
            && !deleting
        {
            return Err(crate::cluster::nodes::lost(with));
        }
        Ok(rec
            .map(|r| r.node)
            .or_else(|| self.cluster.get().ok()?.nodes.local_id()))
    }

    /// DeleteVolume's work, the caller holding the volume's in-flight
    /// claim.
    async fn remove_volume(&self, id: String) -> Result<(), Status> {
        // A volume lost with a forgotten node goes at once (what is left
        // of it on the nodes there are goes too); the others wait for
        // their move.
        let (rec, node) = self.holder(&id).await?;
        if let Some(rec) = &rec
            && self.lost_volume(rec)?.is_none()
        {
            check_not_moving(rec)?;
        }
        if let Some(node) = node
            && let Some(agent) = self.agent_to_delete(&node)?
        {
            agent
                .delete_volume(Request::new(agent::DeleteVolumeRequest {
                    volume_id: id.clone(),
                }))
                .await?;
        }
        // A volume in a move has a second copy on the other node (the
        // source's, while the target fetches or after the switch; the
        // target's, while a rollback waits): it goes too, unless that
        // node was forgotten (`strata node forget`).
        let key = id.clone();
        if let Some(rec) = self.records(move |r| r.volume(&key)).await?
            && let Some(m) = &rec.moving
            && let Some(agent) =
                self.agent_to_delete(if m.from == rec.node { &m.to } else { &m.from })?
        {
            agent
                .delete_volume(Request::new(agent::DeleteVolumeRequest {
                    volume_id: id.clone(),
                }))
                .await?;
        }
        self.records(move |r| r.delete_volume(&id)).await
    }

    /// DeleteSnapshot's work, the caller holding the snapshot's in-flight
    /// claim.
    async fn remove_snapshot(&self, id: String) -> Result<(), Status> {
        let _claim = self.settle_snapshot_move(&id).await?;
        if let Some(node) = self.snapshot_holder(&id, true).await?
            && let Some(agent) = self.agent_to_delete(&node)?
        {
            agent
                .delete_snapshot(Request::new(agent::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                }))
                .await?;
        }
        self.records(move |r| r.delete_snapshot(&id)).await
    }
}

/// How long ListVolumes waits for a node's volume conditions.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

impl ControllerService {
    /// The condition of each volume in `recs`, as its node reports it: one
    /// agent call per node, all at once, each given [`LIST_TIMEOUT`]. A
    /// node that cannot answer makes its volumes abnormal, with its error.
    async fn conditions(&self, recs: &[VolumeRecord]) -> HashMap<String, VolumeCondition> {
        let mut nodes: Vec<&str> = recs.iter().map(|r| r.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut asks = tokio::task::JoinSet::new();
        for node in nodes {
            let (node, agent) = (node.to_string(), self.agent(node));
            asks.spawn(async move {
                let reply = match agent {
                    Ok(agent) => {
                        let ask = agent.list_volumes(Request::new(agent::ListVolumesRequest {}));
                        match tokio::time::timeout(LIST_TIMEOUT, ask).await {
                            Ok(r) => r.map(|r| r.into_inner().volumes),
                            Err(_) => Err(Status::deadline_exceeded(format!(
                                "no answer in {LIST_TIMEOUT:?}"
                            ))),
                        }
                    }
                    Err(e) => Err(e),
                };
                (node, reply)
            });
        }
        let mut out = HashMap::new();
        while let Some(joined) = asks.join_next().await {
            let Ok((node, reply)) = joined else {
                continue;
            };
            match reply {
                Ok(volumes) => out.extend(volumes.into_iter().map(|v| {
                    let condition = VolumeCondition {
                        abnormal: v.abnormal,
                        message: v.condition,
                    };
                    (v.volume_id, condition)
                })),
                Err(e) => out.extend(recs.iter().filter(|r| r.node == node).map(|r| {
                    let condition = VolumeCondition {
                        abnormal: true,
                        message: format!("node {node} did not answer: {}", e.message()),
                    };
                    (r.volume_id.clone(), condition)
                })),
            }
        }
        // Lost with a forgotten node: what its node says no longer counts.
        for rec in recs {
            if let Ok(Some(e)) = self.lost_volume(rec) {
                let condition = VolumeCondition {
                    abnormal: true,
                    message: e.message().to_string(),
                };
                out.insert(rec.volume_id.clone(), condition);
            }
        }
        out
    }

    /// Events on the claim of a volume just created: where it went, and
    /// the background flatten it will get.
    fn tell(&self, claim: Option<&ClaimRef>, rec: &VolumeRecord, flatten: bool) {
        let (Some(claim), Ok(cluster)) = (claim, self.cluster.get()) else {
            return;
        };
        let Some(events) = &cluster.events else {
            return;
        };
        let why = if rec.source.is_some() {
            "where its source's layers are"
        } else {
            "chosen from the accessibility requirements and the nodes' room"
        };
        let message = format!(
            "volume {} ({} bytes) is on node {}, {why}",
            rec.volume_id, rec.capacity_bytes, rec.node
        );
        events.emit(claim, EventKind::Normal, "Placed", &message);
        if flatten && rec.source.is_some() {
            let message = format!(
                "volume {} is being flattened in the background so it stops sharing layers \
                 with its source; `strata jobs` on node {} shows progress",
                rec.volume_id, rec.node
            );
            events.emit(claim, EventKind::Normal, "FlattenQueued", &message);
        }
    }
}

/// Where a volume can be attached: its node, or every node that attaches
/// other nodes' volumes.
fn topology(rec: &VolumeRecord) -> Vec<Topology> {
    let (key, value) = if rec.anywhere {
        (ATTACH_KEY, ATTACH_ANYWHERE)
    } else {
        (TOPOLOGY_KEY, rec.node.as_str())
    };
    vec![Topology {
        segments: HashMap::from([(key.to_string(), value.to_string())]),
    }]
}

fn volume_message(rec: &VolumeRecord) -> Volume {
    let mut context = HashMap::new();
    for key in ["fsType", "frontend"] {
        if let Some(v) = rec.parameters.get(key) {
            context.insert(key.to_string(), v.clone());
        }
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
                ContentSource::Volume(id) => volume_content_source::Type::Volume(VolumeSource {
                    volume_id: id.clone(),
                }),
            }),
        }),
        accessible_topology: topology(rec),
    }
}

pub(super) fn snapshot_message(rec: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: rec.size_bytes as i64,
        snapshot_id: rec.snapshot_id.clone(),
        source_volume_id: rec.source_volume_id.clone(),
        creation_time: Some(timestamp(rec.created_unix_ns)),
        // One lost with a forgotten node is not (`strata node forget`).
        ready_to_use: rec.state == RecordState::Ready && rec.lost_with.is_none(),
        group_snapshot_id: rec.group.as_ref().map(|g| g.id.clone()).unwrap_or_default(),
    }
}

/// The Strata node a CSI topology names, if it names one.
fn topology_node(t: &Topology) -> Option<&str> {
    t.segments.get(TOPOLOGY_KEY).map(String::as_str)
}

/// Which nodes the accessibility requirements allow, and which they
/// prefer (in order).
fn requirements(req: Option<&TopologyRequirement>) -> (Option<Vec<String>>, Vec<String>) {
    let Some(req) = req else {
        return (None, Vec::new());
    };
    let requisite: Vec<String> = req
        .requisite
        .iter()
        .filter_map(topology_node)
        .map(str::to_string)
        .collect();
    let preferred = req
        .preferred
        .iter()
        .filter_map(topology_node)
        .map(str::to_string)
        .collect();
    let allowed = (!req.requisite.is_empty()).then_some(requisite);
    (allowed, preferred)
}

pub(super) fn timestamp(ns: u64) -> prost_types::Timestamp {
    let d = Duration::from_nanos(ns);
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub(super) fn now_ns() -> u64 {
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

/// Whether an agent's error says it made nothing (a refusal), not that
/// what it did is unknown (no answer, a connection that broke, an
/// internal error).
fn made_nothing(e: &Status) -> bool {
    use tonic::Code::*;
    matches!(
        e.code(),
        InvalidArgument
            | NotFound
            | AlreadyExists
            | PermissionDenied
            | FailedPrecondition
            | ResourceExhausted
            | OutOfRange
            | Unimplemented
    )
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
        params::limits(&req.mutable_parameters, Default::default())?;
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
        let (allowed, preferred) = requirements(req.accessibility_requirements.as_ref());
        let claim = ClaimRef::from_parameters(&req.parameters);
        let _guard = self.inflight.claim(&format!("volume name {}", req.name))?;

        // A retry of a create that was answered (the answer lost): the
        // same answer, whatever became of its source since (deleted,
        // grown, or on a node that is away).
        let name = req.name.clone();
        let mut existing = self.records(move |r| r.volume_by_name(&name)).await?;
        if let Some(rec) = &existing
            && rec.state == RecordState::Ready
            && rec.lost_with.is_none()
            && rec.source == source
            && rec.parameters == defining
            && params::size_for(range.required_bytes, range.limit_bytes, rec.capacity_bytes)
                .is_ok_and(|size| size == rec.capacity_bytes)
        {
            return Ok(Response::new(CreateVolumeResponse {
                volume: Some(volume_message(rec)),
            }));
        }

        // A source lives on one node; its size is the default (and the
        // minimum) of the new volume.
        let source_at =
            match &source {
                Some(ContentSource::Snapshot(id)) => {
                    parse_snapshot_id(id)?;
                    let node = self.snapshot_node(id).await?.ok_or_else(|| {
                        Status::not_found(format!("snapshot {id:?} does not exist"))
                    })?;
                    let reply = self
                        .agent(&node)?
                        .get_snapshot(Request::new(agent::GetSnapshotRequest {
                            snapshot_id: id.clone(),
                        }))
                        .await?;
                    Some((node, reply.into_inner().size_bytes))
                }
                Some(ContentSource::Volume(id)) => {
                    parse_volume_id(id)?;
                    let node = self.volume_node(id).await?.ok_or_else(|| {
                        Status::not_found(format!("volume {id:?} does not exist"))
                    })?;
                    let reply = self
                        .agent(&node)?
                        .get_volume(Request::new(agent::GetVolumeRequest {
                            volume_id: id.clone(),
                        }))
                        .await?;
                    Some((node, reply.into_inner().size_bytes))
                }
                None => None,
            };
        let source_size = source_at.as_ref().map(|(_, s)| *s);
        let size = params::size_for(
            range.required_bytes,
            range.limit_bytes,
            source_size.unwrap_or(DEFAULT_SIZE),
        )?;
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

        // (`existing` was read under the name's claim, held since.)
        if let Some(rec) = existing.take_if(|rec| rec.lost_with.is_some()) {
            // Lost with a forgotten node before the CO learnt of it: a CO
            // asks again under a name only until it has the answer, so no
            // PV names this volume and nobody wrote to it. It is made
            // again (from its source, if that is still there).
            let id = rec.volume_id;
            tracing::warn!(volume = %id, name = %req.name, lost_with = ?rec.lost_with, "a volume lost with a forgotten node is asked for again by its name; making it anew");
            let _claim = self.inflight.claim(&format!("volume {id}"))?;
            self.remove_volume(id).await?;
        }
        let mut rec = match existing {
            Some(rec) => {
                if rec.capacity_bytes != size || rec.parameters != defining || rec.source != source
                {
                    return Err(Status::already_exists(format!(
                        "volume {:?} exists with another size, parameters or source \
                         ({} bytes, {:?}, {:?})",
                        req.name, rec.capacity_bytes, rec.parameters, rec.source
                    )));
                }
                rec
            }
            None => {
                let cluster = self.cluster.get()?;
                let anywhere = !vparams.node_local && cluster.nodes.attaches_remote();
                let node = match &source_at {
                    // A restore or clone is made where its source's layers
                    // are; one any node may attach serves the nodes the
                    // requirements name over the data path.
                    Some((node, _)) => {
                        if !anywhere && allowed.as_ref().is_some_and(|a| !a.contains(node)) {
                            return Err(Status::resource_exhausted(format!(
                                "the source of this volume is on node {node}, which the accessibility \
                                 requirements exclude ({:?}), and the volume is attached on its own \
                                 node only (StorageClass locality: node, or a standalone Strata): \
                                 allow that node, or use locality: anywhere in a cluster",
                                allowed.unwrap_or_default()
                            )));
                        }
                        node.clone()
                    }
                    None => cluster.nodes.place(
                        size,
                        |n| allowed.as_ref().is_none_or(|a| a.iter().any(|x| x == n)),
                        &preferred,
                    )?,
                };
                let rec = VolumeRecord {
                    name: req.name.clone(),
                    volume_id: VolumeId::new_random().to_string(),
                    capacity_bytes: size,
                    parameters: defining,
                    source: source.clone(),
                    node,
                    anywhere,
                    state: RecordState::Creating,
                    created_unix_ns: now_ns(),
                    moving: None,
                    lost_with: None,
                    claim: claim.clone(),
                };
                let put = rec.clone();
                self.records(move |r| r.put_volume(&put)).await?;
                rec
            }
        };
        if rec.state == RecordState::Creating {
            let create = agent::CreateVolumeRequest {
                volume_id: rec.volume_id.clone(),
                size_bytes: size,
                source: rec.source.as_ref().map(|s| match s {
                    ContentSource::Snapshot(id) => {
                        agent::create_volume_request::Source::SnapshotId(id.clone())
                    }
                    ContentSource::Volume(id) => {
                        agent::create_volume_request::Source::SourceVolumeId(id.clone())
                    }
                }),
                max_chain_depth: vparams.max_chain_depth.unwrap_or(0),
                flatten: vparams.flatten_clones,
                limits: (!req.mutable_parameters.is_empty())
                    .then(|| params::limits(&req.mutable_parameters, Default::default()))
                    .transpose()?
                    .map(crate::agent::limits_message),
            };
            let created = match self.agent(&rec.node) {
                Ok(a) => a.create_volume(Request::new(create)).await,
                Err(e) => Err(e),
            };
            if let Err(e) = created {
                // Nothing was created on a refusal: forget the name so a
                // retry with other arguments is not refused. A node that
                // did not answer, or whose answer broke, may have created
                // it: keep the record, so the retry finishes it there.
                if made_nothing(&e) {
                    let id = rec.volume_id.clone();
                    let _ = self.records(move |r| r.delete_volume(&id)).await;
                }
                return Err(e);
            }
            rec.state = RecordState::Ready;
            let put = rec.clone();
            self.records(move |r| r.put_volume(&put)).await?;
            self.tell(claim.as_ref(), &rec, vparams.flatten_clones);
            // Made where its source is; its pod runs elsewhere: it moves
            // there now, and is fetched behind (the source's node serves
            // what is not there yet).
            if let (Some(to), Some(moves)) = (
                self.pod_node(&rec, allowed.as_ref(), &preferred),
                self.moves.get(),
            ) {
                match moves.switch_first(&rec.volume_id, &to).await {
                    Ok(()) => {
                        tracing::info!(volume = %rec.volume_id, from = %rec.node, %to, "restored volume moved to its pod's node; fetching its data behind")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %rec.volume_id, node = %rec.node, %to, error = %e.message(), "restored volume stays on its source's node (attached remotely from there)");
                        // Rolled back (it was not switched), so the pod
                        // can attach it where it is.
                        if let Err(e) = moves.move_volume(&rec.volume_id, Some(&rec.node)).await {
                            tracing::warn!(volume = %rec.volume_id, error = %e.message(), "rolling back a restore's move; the controller retries it");
                        }
                    }
                }
            }
        }
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume_message(&rec)),
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
        if id.parse::<VolumeId>().is_err() {
            // Never a volume of ours: deleting it is a success.
            return Ok(Response::new(DeleteVolumeResponse {}));
        }
        self.remove_volume(id).await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    /// Says where the volume is: on the node asked for (it attaches it
    /// from its own pool), or on another, with the address of that node's
    /// data path and a grant for this attachment (the owner records the
    /// attachment, which fences off every earlier one of the volume).
    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if req.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id is required"));
        }
        let cap = req
            .volume_capability
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        check_capabilities(std::slice::from_ref(&cap))?;
        parse_volume_id(&req.volume_id)?;
        // One read for where it is and whether it moves.
        let (rec, owner) = self.holder(&req.volume_id).await?;
        if let Some(rec) = &rec
            && let Some(e) = self.lost_volume(rec)?
        {
            return Err(e);
        }
        let owner = owner.ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let cluster = self.cluster.get()?;
        if cluster.nodes.forgotten(&owner) {
            return Err(crate::cluster::nodes::lost(&owner));
        }
        let known = cluster.nodes.local_id().as_deref() == Some(req.node_id.as_str())
            || cluster
                .nodes
                .list()?
                .iter()
                .any(|n| n.node_id == req.node_id);
        if !known {
            return Err(Status::not_found(format!(
                "node {:?} is not known",
                req.node_id
            )));
        }
        let mut context = HashMap::from([(node_context::OWNER.to_string(), owner.clone())]);
        let remote = owner != req.node_id;
        if remote && !rec.as_ref().is_some_and(|r| r.anywhere) {
            return Err(Status::failed_precondition(format!(
                "volume {} is attached on its own node {owner} only (StorageClass \
                 locality: node, or made before volumes could be attached remotely)",
                req.volume_id
            )));
        }
        // UNAVAILABLE while it moves, unless a live move copies it and no
        // node uses it: then the move takes this node along (the publish
        // goes to the source, and the attachment follows the volume after
        // the switch). Recorded once the publish is otherwise valid.
        // (`Some(true)`: recorded by this call.)
        let mut along = None;
        if let Some(rec) = &rec
            && check_not_moving(rec).is_err()
        {
            if let Some(m) = self.moves.get() {
                along = m
                    .publishing(&req.volume_id, &req.node_id, req.readonly)
                    .await
                    .unwrap_or(None);
            }
            if along.is_none() {
                check_not_moving(rec)?;
            }
        }
        // The owner records the attachment durably (also one on the owner
        // itself, which fences off any earlier remote one) and answers its
        // epoch; the same node again gets the same epoch, so a retried
        // publish answers the same context.
        let Some((address, tls)) = cluster.nodes.peer(&owner)? else {
            if remote {
                return Err(Status::failed_precondition(format!(
                    "volume {} is on node {owner}; a standalone Strata attaches only its own",
                    req.volume_id
                )));
            }
            return Ok(Response::new(ControllerPublishVolumeResponse {
                publish_context: context,
            }));
        };
        let attached = self
            .agent(&owner)?
            .attach(Request::new(agent::AttachRequest {
                volume_id: req.volume_id.clone(),
                node_id: req.node_id.clone(),
                read_only: req.readonly,
                for_move: false,
                ..Default::default()
            }))
            .await;
        let epoch = match attached {
            Ok(r) => r.into_inner().epoch,
            Err(e) if along.is_some() => {
                // Recorded by this call: not the move's user after all (a
                // retry records it again).
                if along == Some(true)
                    && let Some(m) = self.moves.get()
                    && let Err(why) = m.unpublished(&req.volume_id, &req.node_id).await
                {
                    tracing::warn!(volume = %req.volume_id, node = %req.node_id, error = %why.message(), "a failed publish stays recorded as the moving volume's user");
                }
                // Sealed (or its copy removed) since: the move switches;
                // a retry goes to the target.
                if matches!(
                    e.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::NotFound
                ) {
                    return Err(Status::unavailable(format!(
                        "volume {} switches to its move's target: retry ({})",
                        req.volume_id,
                        e.message()
                    )));
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if remote {
            let grant = grant::issue(tls, &req.volume_id, &req.node_id, epoch, req.readonly)
                .map_err(crate::rpc::status::grant)?;
            context.insert(node_context::ADDRESS.to_string(), address);
            context.insert(node_context::GRANT.to_string(), grant);
        }
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: context,
        }))
    }

    /// The owner ends the node's attachment (its grant is refused from
    /// then on, also after restarts). Idempotent, also for volumes that are
    /// gone; UNAVAILABLE while the owner cannot be reached.
    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let cluster = self.cluster.get()?;
        if parse_volume_id(&req.volume_id).is_err() || !cluster.nodes.attaches_remote() {
            return Ok(Response::new(ControllerUnpublishVolumeResponse {}));
        }
        // Not while a move of the unused volume copies it; a live move
        // (copying or re-pointing the attachment of this node) no longer
        // re-points it.
        let following = match self.moves.get() {
            Some(m) => m
                .unpublished(&req.volume_id, &req.node_id)
                .await
                .unwrap_or(false),
            None => false,
        };
        let (rec, owner) = self.holder(&req.volume_id).await?;
        if let Some(rec) = &rec
            && !following
            && self.lost_volume(rec)?.is_none()
        {
            check_not_moving(rec)?;
        }
        // Nothing to detach on a node forgotten with what it held.
        let Some(owner) = owner else {
            return Ok(Response::new(ControllerUnpublishVolumeResponse {}));
        };
        let Some(agent) = self.agent_to_delete(&owner)? else {
            return Ok(Response::new(ControllerUnpublishVolumeResponse {}));
        };
        agent
            .detach(Request::new(agent::AttachRequest {
                volume_id: req.volume_id.clone(),
                node_id: req.node_id.clone(),
                ..Default::default()
            }))
            .await?;
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
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
        parse_volume_id(&req.volume_id)?;
        let node = self.volume_node(&req.volume_id).await?.ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        self.agent(&node)?
            .get_volume(Request::new(agent::GetVolumeRequest {
                volume_id: req.volume_id.clone(),
            }))
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
        let recs = self.records(|r| r.volumes()).await?;
        let recs: Vec<_> = recs
            .into_iter()
            .filter(|r| r.state == RecordState::Ready)
            .collect();
        let (recs, next_token) = page(
            recs,
            |r| r.volume_id.clone(),
            req.max_entries,
            &req.starting_token,
        )?;
        let conditions = self.conditions(&recs).await;
        let entries = recs
            .iter()
            .map(|rec| list_volumes_response::Entry {
                volume: Some(volume_message(rec)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(conditions.get(&rec.volume_id).cloned().unwrap_or_else(
                        || VolumeCondition {
                            abnormal: true,
                            message: format!("node {} does not report the volume", rec.node),
                        },
                    )),
                }),
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = req.into_inner();
        let cluster = self.cluster.get()?;
        let nodes = cluster.nodes.list()?;
        let wanted = req.accessible_topology.as_ref().and_then(topology_node);
        let available = nodes
            .iter()
            // A draining node takes no new volume.
            .filter(|n| n.state == crate::cluster::records::NodeState::Ready && !n.draining)
            .filter(|n| wanted.is_none_or(|w| w == n.node_id))
            .map(|n| cluster.nodes.room(n))
            .max()
            .unwrap_or(0);
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available as i64,
            // One volume lives on one node: no volume can be larger.
            maximum_volume_size: Some(available as i64),
            minimum_volume_size: Some(4096),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::PublishUnpublishVolume,
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
            rpc::Type::ModifyVolume,
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
        parse_volume_id(&req.source_volume_id)?;
        let name = req.name.clone();
        let mut existing = self.records(move |r| r.snapshot_by_name(&name)).await?;
        if let Some(rec) = existing
            .take_if(|rec| rec.lost_with.is_some() && rec.source_volume_id == req.source_volume_id)
        {
            // As a lost volume asked for again (`create_volume`): the
            // snapshotter asks again under a name only until it has the
            // answer. It is taken anew, now, and says so in its time.
            let id = rec.snapshot_id;
            tracing::warn!(snapshot = %id, name = %req.name, lost_with = ?rec.lost_with, "a snapshot lost with a forgotten node is asked for again by its name; taking it anew");
            let _claim = self.inflight.claim(&format!("snapshot {id}"))?;
            self.remove_snapshot(id).await?;
        }
        let mut rec = match existing {
            Some(rec) if rec.source_volume_id != req.source_volume_id => {
                return Err(Status::already_exists(format!(
                    "snapshot {:?} exists for another volume ({})",
                    req.name, rec.source_volume_id
                )));
            }
            Some(rec) => rec,
            None => {
                let node = self
                    .volume_node(&req.source_volume_id)
                    .await?
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "volume {:?} does not exist",
                            req.source_volume_id
                        ))
                    })?;
                let rec = SnapshotRecord {
                    name: req.name.clone(),
                    snapshot_id: SnapshotId::new_random().to_string(),
                    source_volume_id: req.source_volume_id.clone(),
                    size_bytes: 0,
                    node,
                    state: RecordState::Creating,
                    created_unix_ns: now_ns(),
                    group: None,
                    moving: None,
                    lost_with: None,
                };
                let put = rec.clone();
                self.records(move |r| r.put_snapshot(&put)).await?;
                rec
            }
        };
        if rec.state == RecordState::Creating {
            let create = agent::CreateSnapshotRequest {
                volume_id: rec.source_volume_id.clone(),
                snapshot_id: rec.snapshot_id.clone(),
                freeze_filesystem: sparams.freeze,
            };
            let created = match self.agent(&rec.node) {
                Ok(a) => a.create_snapshot(Request::new(create)).await,
                Err(e) => Err(e),
            };
            let info = match created {
                Ok(info) => info.into_inner(),
                Err(e) => {
                    if made_nothing(&e) {
                        let id = rec.snapshot_id.clone();
                        let _ = self.records(move |r| r.delete_snapshot(&id)).await;
                    }
                    return Err(e);
                }
            };
            rec.size_bytes = info.size_bytes;
            rec.created_unix_ns = info.created_unix_ns;
            rec.state = RecordState::Ready;
            let put = rec.clone();
            self.records(move |r| r.put_snapshot(&put)).await?;
        }
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
        if id.parse::<SnapshotId>().is_err() {
            return Ok(Response::new(DeleteSnapshotResponse {}));
        }
        self.remove_snapshot(id).await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = req.into_inner();
        let snaps = self.records(|r| r.snapshots()).await?;
        let snaps: Vec<_> = snaps
            .into_iter()
            .filter(|s| s.state == RecordState::Ready)
            .filter(|s| req.snapshot_id.is_empty() || s.snapshot_id == req.snapshot_id)
            .filter(|s| {
                req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id
            })
            .collect();
        let (snaps, next_token) = page(
            snaps,
            |s| s.snapshot_id.clone(),
            req.max_entries,
            &req.starting_token,
        )?;
        let entries = snaps
            .iter()
            .map(|s| list_snapshots_response::Entry {
                snapshot: Some(snapshot_message(s)),
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
        parse_volume_id(&req.volume_id)?;
        let node = self.settled_node(&req.volume_id).await?.ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let agent = self.agent(&node)?;
        let current = agent
            .get_volume(Request::new(agent::GetVolumeRequest {
                volume_id: req.volume_id.clone(),
            }))
            .await?
            .into_inner()
            .size_bytes;
        let want = params::size_for(range.required_bytes, range.limit_bytes, current)?;
        let size = agent
            .expand_volume(Request::new(agent::ExpandVolumeRequest {
                volume_id: req.volume_id.clone(),
                size_bytes: want,
            }))
            .await?
            .into_inner()
            .size_bytes;
        let id = req.volume_id.clone();
        self.records(move |r| {
            r.update_volume(&id, &mut |rec| {
                let grown = rec.capacity_bytes != size;
                rec.capacity_bytes = size;
                grown
            })
            .map(drop)
        })
        .await?;
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            // Raw block too: NodeExpandVolume is what grows the kernel's
            // device (loop or nbd), and the resizer asks kubelet for it only
            // when this says so.
            node_expansion_required: true,
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
        parse_volume_id(&id)?;
        let (rec, node) = self.holder(&id).await?;
        if let Some(rec) = &rec
            && let Some(e) = self.lost_volume(rec)?
        {
            return Ok(Response::new(ControllerGetVolumeResponse {
                volume: Some(volume_message(rec)),
                status: Some(controller_get_volume_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(VolumeCondition {
                        abnormal: true,
                        message: e.message().to_string(),
                    }),
                }),
            }));
        }
        let node =
            node.ok_or_else(|| Status::not_found(format!("volume {id:?} does not exist")))?;
        let info = self
            .agent(&node)?
            .get_volume(Request::new(agent::GetVolumeRequest {
                volume_id: id.clone(),
            }))
            .await?
            .into_inner();
        let rec = rec.unwrap_or_else(|| VolumeRecord {
            name: String::new(),
            volume_id: id.clone(),
            capacity_bytes: info.size_bytes,
            parameters: Default::default(),
            source: None,
            node,
            anywhere: false,
            state: RecordState::Ready,
            created_unix_ns: info.created_unix_ns,
            moving: None,
            lost_with: None,
            claim: None,
        });
        let mut volume = volume_message(&rec);
        volume.capacity_bytes = info.size_bytes as i64;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(volume),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(VolumeCondition {
                    abnormal: info.abnormal,
                    message: info.condition,
                }),
            }),
        }))
    }

    /// A volume's I/O limits, changed while it is in use: exactly the
    /// limits the parameters name (a VolumeAttributesClass's), the others
    /// none.
    async fn controller_modify_volume(
        &self,
        req: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if req.mutable_parameters.is_empty() {
            return Err(Status::invalid_argument(format!(
                "mutable_parameters is required: some of {:?} (\"0\": no limit)",
                params::LIMIT_KEYS
            )));
        }
        // Checked before anything is asked of the node.
        let limits = params::limits(&req.mutable_parameters, Default::default())?;
        let _guard = self.inflight.claim(&format!("volume {}", req.volume_id))?;
        parse_volume_id(&req.volume_id)?;
        // UNAVAILABLE while it moves: the copy took the limits it had.
        let node = self.settled_node(&req.volume_id).await?.ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        self.agent(&node)?
            .modify_volume(Request::new(agent::ModifyVolumeRequest {
                volume_id: req.volume_id.clone(),
                limits: Some(crate::agent::limits_message(limits)),
            }))
            .await?;
        Ok(Response::new(ControllerModifyVolumeResponse {}))
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let id = req.into_inner().snapshot_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("snapshot_id is required"));
        }
        parse_snapshot_id(&id)?;
        let node = self
            .snapshot_node(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("snapshot {id:?} does not exist")))?;
        let info = self
            .agent(&node)?
            .get_snapshot(Request::new(agent::GetSnapshotRequest {
                snapshot_id: id.clone(),
            }))
            .await?
            .into_inner();
        // The record, where there is one: on a node it moved to, the
        // engine knows it as a snapshot of the copy it was made from.
        let key = id.clone();
        let snapshot = match self.records(move |r| r.snapshot(&key)).await? {
            Some(rec) => snapshot_message(&rec),
            None => Snapshot {
                size_bytes: info.size_bytes as i64,
                snapshot_id: info.snapshot_id,
                source_volume_id: info.volume_id,
                creation_time: Some(timestamp(info.created_unix_ns)),
                ready_to_use: true,
                group_snapshot_id: String::new(),
            },
        };
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }
}
