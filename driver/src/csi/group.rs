//! The CSI GroupController service: group snapshots, a snapshot of each of
//! several volumes cut at one instant (CreateVolumeGroupSnapshot,
//! GetVolumeGroupSnapshot, DeleteVolumeGroupSnapshot), for the
//! external-snapshotter's VolumeGroupSnapshots.
//!
//! The cut is crash-consistent across the members, also when they live on
//! different nodes: every node holding members first holds their writes
//! (agent HoldGroup, all nodes at once, each with a deadline), and only
//! when every node answered are they cut (CutGroup, which ends each hold).
//! A write acknowledged after any member's cut was made after every hold
//! was in place, so it is in no member's snapshot; anything a member's
//! snapshot holds was acknowledged before every cut. Members are usable on
//! their own: they are ordinary snapshots (restore, clone, delete, changed
//! blocks) that name their group. Filesystems are not frozen for a group:
//! `freezeFilesystem` is refused.
//!
//! A group has no record of its own: its members' snapshot records name
//! it (ID and CSI name). They are written, as Creating, before any node is
//! held; a create that fails deletes what it made, and one interrupted by a
//! crash is found by the next call of the same name, which deletes the
//! half-made group and cuts it again; groups left half made that no call
//! comes back for (the VolumeGroupSnapshot was deleted meanwhile) are
//! deleted once they are ten minutes old ([`sweep_forever`]). One group is
//! held and cut at a time: two at once could each take one node's hold
//! and wait for the other's until both deadlines passed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use csi_proto::agent::v1 as agent;
use csi_proto::csi::v1::group_controller_server::GroupController;
use csi_proto::csi::v1::group_controller_service_capability::{self as gcap, rpc};
use csi_proto::csi::v1::*;
use tonic::{Request, Response, Status};

use super::controller::{ControllerService, now_ns, snapshot_message, timestamp};
use super::params;
use crate::agent::volume_id as parse_volume_id;
use crate::cluster::records::{GroupRef, RecordState, SnapshotRecord};
use crate::engine::SnapshotId;
use csi_proto::agent::v1::agent_server::Agent;

/// How long a node holds its members' writes at most: the longest a
/// controller that dies between the hold and the cut stalls them. Every
/// node must be held, and cut, within it.
const HOLD_DEADLINE: Duration = Duration::from_secs(3);

/// How old a half-made group must be before it is swept: far older than
/// any create that is still running (the sidecar's timeout is a minute).
const HALF_MADE_AGE: Duration = Duration::from_secs(600);

/// Sweeps groups left half made ([`ControllerService::sweep_half_made_groups`])
/// at once, then every minute, for as long as the process serves.
pub async fn sweep_forever(service: ControllerService) {
    loop {
        match service.sweep_half_made_groups(HALF_MADE_AGE).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(snapshots = n, "swept group snapshots left half made"),
            Err(e) => {
                tracing::warn!(error = %e.message(), "sweeping group snapshots left half made")
            }
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

#[tonic::async_trait]
impl GroupController for ControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(GroupControllerGetCapabilitiesResponse {
            capabilities: vec![GroupControllerServiceCapability {
                r#type: Some(gcap::Type::Rpc(gcap::Rpc {
                    r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        if req.source_volume_ids.is_empty() {
            return Err(Status::invalid_argument("source_volume_ids is required"));
        }
        params::group_snapshot_params(&req.parameters)?;
        let mut wanted = req.source_volume_ids.clone();
        wanted.sort();
        wanted.dedup();
        if wanted.len() != req.source_volume_ids.len() {
            return Err(Status::invalid_argument(
                "source_volume_ids names a volume more than once",
            ));
        }
        for v in &wanted {
            parse_volume_id(v)?;
        }
        let _guard = self
            .inflight
            .claim(&format!("group snapshot name {}", req.name))?;
        let name = req.name.clone();
        let existing = self.group_members(move |g| g.name == name).await?;
        if !existing.is_empty() {
            let mut had: Vec<&str> = existing
                .iter()
                .map(|m| m.source_volume_id.as_str())
                .collect();
            had.sort_unstable();
            // A group left half made may have lost some members' records
            // already (its undo stopped half way too). One with a member
            // lost with a forgotten node is cut again, as a lost snapshot
            // asked for again is taken again (`create_snapshot`).
            let whole = existing
                .iter()
                .all(|m| m.state == RecordState::Ready && m.lost_with.is_none());
            let same = if whole {
                had == wanted
            } else {
                had.iter().all(|v| wanted.contains(&v.to_string()))
            };
            if !same {
                return Err(Status::already_exists(format!(
                    "group snapshot {:?} exists for other volumes ({})",
                    req.name,
                    had.join(", ")
                )));
            }
            if whole {
                return Ok(Response::new(CreateVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group_message(&existing)),
                }));
            }
            // An earlier call stopped half way: its cut may not be whole.
            tracing::info!(group = %req.name, "a group snapshot left half made (or with a member lost) is cut again");
            // Its lost members last: should another fail to go, the next
            // call still finds the group lost, not whole for fewer volumes.
            let (lost, others): (Vec<_>, Vec<_>) =
                existing.into_iter().partition(|m| m.lost_with.is_some());
            self.drop_members(&others).await?;
            self.drop_members(&lost).await?;
        }

        let mut by_node: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let group = GroupRef {
            id: SnapshotId::new_random().to_string(),
            name: req.name.clone(),
        };
        let mut members = Vec::with_capacity(req.source_volume_ids.len());
        for (i, v) in req.source_volume_ids.iter().enumerate() {
            let node = self
                .settled_node(v)
                .await?
                .ok_or_else(|| Status::not_found(format!("volume {v:?} does not exist")))?;
            by_node.entry(node.clone()).or_default().push(i);
            members.push(SnapshotRecord {
                name: format!("{}/{v}", req.name),
                snapshot_id: SnapshotId::new_random().to_string(),
                source_volume_id: v.clone(),
                size_bytes: 0,
                node,
                state: RecordState::Creating,
                created_unix_ns: now_ns(),
                group: Some(group.clone()),
                moving: None,
                lost_with: None,
            });
        }
        let put = members.clone();
        self.records(move |r| put.iter().try_for_each(|m| r.put_snapshot(m)))
            .await?;
        let hold = (SnapshotId::new_random().0 as u64) | 1;
        let cut = match self.cut(hold, &by_node, &members).await {
            Ok(cut) => cut,
            Err(e) => {
                if let Err(undo) = self.drop_members(&members).await {
                    tracing::warn!(group = %req.name, error = %undo.message(), "undoing a group snapshot that failed; the next call of its name does");
                }
                return Err(e);
            }
        };
        crate::engine::jobs::failpoint::hit("csi::group::cut");
        for (m, reply) in members.iter_mut().zip(cut) {
            m.size_bytes = reply.size_bytes;
            m.created_unix_ns = reply.created_unix_ns;
            m.state = RecordState::Ready;
        }
        let put = members.clone();
        self.records(move |r| put.iter().try_for_each(|m| r.put_snapshot(m)))
            .await?;
        Ok(Response::new(CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_message(&members)),
        }))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        let members = self
            .group(&req.group_snapshot_id, &req.snapshot_ids)
            .await?;
        if members.is_empty() {
            return Err(Status::not_found(format!(
                "group snapshot {:?} does not exist",
                req.group_snapshot_id
            )));
        }
        Ok(Response::new(GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_message(&members)),
        }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        let _guard = self
            .inflight
            .claim(&format!("group snapshot {}", req.group_snapshot_id))?;
        let members = self
            .group(&req.group_snapshot_id, &req.snapshot_ids)
            .await?;
        self.drop_members(&members).await?;
        Ok(Response::new(DeleteVolumeGroupSnapshotResponse {}))
    }
}

impl ControllerService {
    /// The snapshot records of the groups `which` picks.
    async fn group_members(
        &self,
        which: impl Fn(&GroupRef) -> bool + Send + 'static,
    ) -> Result<Vec<SnapshotRecord>, Status> {
        let all = self.records(|r| r.snapshots()).await?;
        Ok(all
            .into_iter()
            .filter(|s| s.group.as_ref().is_some_and(&which))
            .collect())
    }

    /// The members of group `id` (none if it does not exist), checking
    /// that `listed` (the caller's list of its snapshots) names no
    /// snapshot outside it (INVALID_ARGUMENT). A listed member that no
    /// longer exists (deleted on its own) is not an error.
    async fn group(&self, id: &str, listed: &[String]) -> Result<Vec<SnapshotRecord>, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("group_snapshot_id is required"));
        }
        let key = id.to_string();
        let members = self.group_members(move |g| g.id == key).await?;
        for s in listed {
            if members.iter().any(|m| &m.snapshot_id == s) {
                continue;
            }
            let key = s.clone();
            if let Some(other) = self.records(move |r| r.snapshot(&key)).await? {
                return Err(Status::invalid_argument(format!(
                    "snapshot {s} is not a member of group snapshot {id} ({})",
                    other
                        .group
                        .map_or("it belongs to no group".into(), |g| format!(
                            "its group is {}",
                            g.id
                        ))
                )));
            }
        }
        Ok(members)
    }

    /// Deletes member snapshots on their nodes, and the record of each
    /// that is gone; the first error, after trying every member.
    async fn drop_members(&self, members: &[SnapshotRecord]) -> Result<(), Status> {
        let mut failed = None;
        for m in members {
            // Not beside a move of it (a drain's).
            let _claim = match self.settle_snapshot_move(&m.snapshot_id).await {
                Ok(c) => c,
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            let node = match self.snapshot_node(&m.snapshot_id).await {
                Ok(Some(n)) => n,
                _ => m.node.clone(),
            };
            let deleted = match self.agent_to_delete(&node) {
                Ok(Some(a)) => a
                    .delete_snapshot(Request::new(agent::DeleteSnapshotRequest {
                        snapshot_id: m.snapshot_id.clone(),
                    }))
                    .await
                    .map(|_| ()),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            let id = m.snapshot_id.clone();
            let dropped = match deleted {
                Ok(()) => self.records(move |r| r.delete_snapshot(&id)).await,
                Err(e) => Err(e),
            };
            if let Err(e) = dropped {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Cuts the group: flushes every member on every node, holds the
    /// writes of every member on every node, then cuts them (each
    /// member's snapshot, in the order of `members`). One group at a time
    /// (see `cutting`). On an error, every hold is released at once (the
    /// caller deletes what was cut).
    async fn cut(
        &self,
        hold: u64,
        by_node: &BTreeMap<String, Vec<usize>>,
        members: &[SnapshotRecord],
    ) -> Result<Vec<agent::SnapshotReply>, Status> {
        let agents = by_node
            .keys()
            .map(|n| Ok((n.clone(), self.agent(n)?)))
            .collect::<Result<Vec<(String, Arc<dyn Agent>)>, Status>>()?;
        let hold_req = |node: &str, flush_only: bool| agent::HoldGroupRequest {
            hold_id: hold,
            volume_ids: by_node[node]
                .iter()
                .map(|&i| members[i].source_volume_id.clone())
                .collect(),
            deadline_ms: HOLD_DEADLINE.as_millis() as u32,
            flush_only,
        };
        let _one = self.cutting.lock().await;
        // Flushed first, so that no node holds while another flushes.
        on_every_node(&agents, Some(FLUSH_TIMEOUT), |node, a| {
            let req = hold_req(node, true);
            async move { a.hold_group(Request::new(req)).await.map(|_| ()) }
        })
        .await?;
        let started = std::time::Instant::now();
        // From here on, every hold is released unless the cut ends them,
        // also when this call is dropped (its caller gave up).
        let release = Release {
            agents: agents.clone(),
            hold,
            armed: true,
        };
        // An answer after the deadline is of no use: the hold has ended.
        let held = on_every_node(&agents, Some(HOLD_DEADLINE), |node, a| {
            let req = hold_req(node, false);
            async move { a.hold_group(Request::new(req)).await.map(|_| ()) }
        })
        .await;
        let cut = match held {
            Ok(_) => {
                on_every_node(&agents, Some(CUT_TIMEOUT), |node, a| {
                    let group = by_node[node]
                        .iter()
                        .map(|&i| agent::GroupMember {
                            volume_id: members[i].source_volume_id.clone(),
                            snapshot_id: members[i].snapshot_id.clone(),
                        })
                        .collect();
                    async move {
                        a.cut_group(Request::new(agent::CutGroupRequest {
                            hold_id: hold,
                            members: group,
                        }))
                        .await
                        .map(|r| r.into_inner())
                    }
                })
                .await
            }
            Err(e) => Err(e),
        };
        let cut = match cut {
            Ok(cut) => {
                release.disarm();
                cut
            }
            Err(e) => {
                // Holds in place end now rather than at their deadline,
                // and one whose request is still on its way never begins
                // (a cut ended its own already).
                release.now().await;
                return Err(e);
            }
        };
        let held = cut.values().map(|c| c.held_micros).max().unwrap_or(0);
        tracing::info!(
            members = members.len(),
            nodes = agents.len(),
            held_ms = held as f64 / 1000.0,
            took_ms = started.elapsed().as_millis() as u64,
            "a group snapshot was cut"
        );
        let mut replies: BTreeMap<String, agent::SnapshotReply> = cut
            .into_values()
            .flat_map(|c| c.snapshots)
            .map(|s| (s.snapshot_id.clone(), s))
            .collect();
        members
            .iter()
            .map(|m| {
                replies.remove(&m.snapshot_id).ok_or_else(|| {
                    Status::internal(format!(
                        "node {} did not answer snapshot {}",
                        m.node, m.snapshot_id
                    ))
                })
            })
            .collect()
    }

    /// Deletes groups left half made (a member still Creating) by a
    /// create that failed to undo itself or died, once such a member is
    /// older than `age`: their group's ID was never answered, so nobody
    /// else will. A group whose create is running now is left alone; one
    /// that cannot be deleted now (a node away) is tried again next time.
    /// How many snapshots were deleted.
    pub async fn sweep_half_made_groups(&self, age: Duration) -> Result<usize, Status> {
        let oldest = now_ns().saturating_sub(age.as_nanos() as u64);
        let all = self.records(|r| r.snapshots()).await?;
        let mut names: Vec<String> = all
            .iter()
            .filter(|s| s.state == RecordState::Creating && s.created_unix_ns < oldest)
            .filter_map(|s| s.group.as_ref().map(|g| g.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        let mut swept = 0;
        for name in names {
            let Ok(_guard) = self.inflight.claim(&format!("group snapshot name {name}")) else {
                continue;
            };
            // Read again under the claim: a create may have finished it.
            let key = name.clone();
            let members = self.group_members(move |g| g.name == key).await?;
            let half_made = members
                .iter()
                .any(|m| m.state == RecordState::Creating && m.created_unix_ns < oldest);
            if !half_made {
                continue;
            }
            match self.drop_members(&members).await {
                Ok(()) => {
                    tracing::info!(group = %name, members = members.len(), "deleted a group snapshot left half made");
                    swept += members.len();
                }
                Err(e) => {
                    tracing::warn!(group = %name, error = %e.message(), "deleting a group snapshot left half made (tried again later)");
                }
            }
        }
        Ok(swept)
    }
}

/// How long the flush before the hold may take on every node.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the cut may take on every node (it takes milliseconds; a
/// node that does not answer fails the group).
const CUT_TIMEOUT: Duration = Duration::from_secs(10);

/// The release of a group's holds on every node (agent ReleaseGroup): at
/// once after a failure, or, when the call that held them is dropped
/// before it cut or released, in a task of its own.
struct Release {
    agents: Vec<(String, Arc<dyn Agent>)>,
    hold: u64,
    armed: bool,
}

impl Release {
    /// Asks every node, each on its own (a node that fails or is slow
    /// does not keep the others from being asked), waiting at most
    /// [`HOLD_DEADLINE`]: holds end by then anyway.
    fn send(agents: Vec<(String, Arc<dyn Agent>)>, hold: u64) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            for (node, a) in agents {
                calls.spawn(async move {
                    let ask = a.release_group(Request::new(agent::ReleaseGroupRequest {
                        hold_id: hold,
                    }));
                    match tokio::time::timeout(HOLD_DEADLINE, ask).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!(node, error = %e.message(), "releasing a group snapshot's hold (it ends at its deadline)"),
                        Err(_) => tracing::warn!(node, "releasing a group snapshot's hold: no answer (it ends at its deadline)"),
                    }
                });
            }
            while calls.join_next().await.is_some() {}
        })
    }

    /// Releases every hold now, and waits for the answers.
    async fn now(mut self) {
        self.armed = false;
        let _ = Release::send(std::mem::take(&mut self.agents), self.hold).await;
    }

    /// The cut ended every hold: nothing to release.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.armed {
            Release::send(std::mem::take(&mut self.agents), self.hold);
        }
    }
}

/// Runs `call` against every node's agent at once, each for at most
/// `limit`; every node's answer, or the first error (naming its node) as
/// soon as it comes (the other calls are dropped).
async fn on_every_node<T, F, Fut>(
    agents: &[(String, Arc<dyn Agent>)],
    limit: Option<Duration>,
    call: F,
) -> Result<BTreeMap<String, T>, Status>
where
    T: Send + 'static,
    F: Fn(&str, Arc<dyn Agent>) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>> + Send + 'static,
{
    let mut calls = tokio::task::JoinSet::new();
    for (node, a) in agents {
        let (node, ask) = (node.clone(), call(node, Arc::clone(a)));
        calls.spawn(async move {
            let answer = match limit {
                Some(limit) => tokio::time::timeout(limit, ask).await.unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(format!(
                        "no answer within {limit:?}"
                    )))
                }),
                None => ask.await,
            };
            (node, answer)
        });
    }
    let mut out = BTreeMap::new();
    while let Some(joined) = calls.join_next().await {
        match joined {
            Ok((node, Ok(t))) => {
                out.insert(node, t);
            }
            Ok((node, Err(e))) => {
                return Err(Status::new(
                    e.code(),
                    format!("node {node}: {}", e.message()),
                ));
            }
            Err(e) => return Err(crate::rpc::status::join(e)),
        }
    }
    Ok(out)
}

/// A group as CSI shows it: its members, when it was cut (the earliest
/// member's time), and whether every member is ready.
fn group_message(members: &[SnapshotRecord]) -> VolumeGroupSnapshot {
    VolumeGroupSnapshot {
        group_snapshot_id: members
            .first()
            .and_then(|m| m.group.as_ref())
            .map(|g| g.id.clone())
            .unwrap_or_default(),
        snapshots: members.iter().map(snapshot_message).collect(),
        creation_time: Some(timestamp(
            members.iter().map(|m| m.created_unix_ns).min().unwrap_or(0),
        )),
        ready_to_use: members
            .iter()
            .all(|m| m.state == RecordState::Ready && m.lost_with.is_none()),
    }
}
