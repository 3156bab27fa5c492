//! Moving snapshots to another node (a drain's second half). A snapshot is
//! immutable, so its move needs no hold and no seal; the steps, recorded in
//! its [`SnapshotRecord`] (`moving`, phases `copying`, `removing`,
//! `aborting`), are:
//!
//! 1. **Record** `moving` (phase `copying`). Each step claims the snapshot
//!    ([`Moves::claim_snapshot`]), and so does a delete, which first rolls
//!    back a move that did not switch and finishes one that did.
//! 2. **Carrier**: the source makes a volume of the snapshot (an index copy,
//!    no data; its ID is derived from the snapshot's, see [`carrier`]).
//! 3. **Copy**: the target copies the carrier over the data path (the
//!    agent's Import, as a copy-first volume move does, with a read-only
//!    grant). If an older snapshot of the same volume moved to the target
//!    before and the source still has it (its move is in phase `removing`),
//!    the target's copy starts as a clone of that one there and only the
//!    ranges changed between the two (the source's presence maps, as
//!    GetMetadataDelta reads them) are copied: the layers the two share
//!    here are shared there too. Otherwise every data extent is copied.
//! 4. **Snapshot**: the target takes a snapshot of its copy with the
//!    snapshot's ID, then deletes the copy (the snapshot keeps its layers).
//! 5. **Switch**: the record names the target (phase `removing`); restores
//!    go there from now on.
//! 6. **Remove** the source's snapshot and carrier; `moving` ends. A drain
//!    removes a snapshot's source copy only once the next snapshot of its
//!    volume moved (step 3 reads the changed ranges against it).
//!
//! Each step can run again, so a crash of any party is finished by the
//! next drain or by the leading controller's resume. A refusal before the
//! switch (a target without room, a snapshot the source does not have)
//! rolls back (phase `aborting`): the target's copy and snapshot and the
//! source's carrier are deleted, and the snapshot stays where it was.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use csi_proto::agent::v1 as agent;
use csi_proto::cluster::v1::MovedSnapshot;
use tonic::{Code, Request, Status};

use super::{Move, MovePhase, Moves, POLL, failpoint, refused, waiting};
use crate::cluster::nodes::now_ns;
use crate::cluster::records::{RecordState, SnapshotRecord};
use crate::engine::{SnapshotId, VolumeId};

/// The failpoints of a snapshot's move, in order.
pub const SNAPSHOT_FAILPOINTS: [&str; 4] = [
    "cluster::snapshot_move::recorded",
    "cluster::snapshot_move::copied",
    "cluster::snapshot_move::made",
    "cluster::snapshot_move::switched",
];

/// At most this many changed ranges go in one copy request (about 200
/// KB); more are merged across their smallest gaps (the blocks between
/// are copied as they are, which is right too).
const MAX_DELTA_RANGES: usize = 1 << 14;

/// The volume a snapshot's move copies from (on the source) and into (on
/// the target): its ID is the snapshot's with a fixed pattern mixed in, so
/// every retry names the same one and nothing else does.
pub fn carrier(snapshot: SnapshotId) -> VolumeId {
    VolumeId::from_u128(snapshot.as_u128() ^ 0x5354_5241_5441_2d53_4e41_502d_4d4f_5645)
}

/// Whether [`Moves::move_snapshot`] may start a move, or only go on with
/// one the record names (the leader's resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    New,
    FinishOnly,
}

/// What [`Moves::delta`] asks the changes of.
#[derive(Debug, Clone, Copy)]
pub(super) enum Delta<'a> {
    Snapshot(&'a str),
    Volume(&'a str),
}

/// What a drain, or a volume's move, did with snapshots.
#[derive(Debug, Default)]
pub struct SnapshotsMoved {
    pub moved: Vec<MovedSnapshot>,
    /// Snapshot IDs, and why each stayed.
    pub stayed: Vec<(String, String)>,
    /// The snapshots either list has: each is tried once.
    handled: HashSet<String>,
}

/// A snapshot a move or a delete works on (see [`Moves::claim_snapshot`]);
/// let go when dropped.
#[derive(Debug)]
pub struct SnapshotClaim {
    moves: Arc<Moves>,
    id: String,
}

impl Drop for SnapshotClaim {
    fn drop(&mut self) {
        self.moves
            .snapshot_claims
            .lock()
            .expect("snapshot claims")
            .remove(&self.id);
    }
}

impl Moves {
    /// Claims snapshot `id` for a move step or a delete: UNAVAILABLE while
    /// the other holds it, so a delete never runs beside a move of the
    /// same snapshot (a delete that read the record before a move was
    /// recorded would leave the target's copy behind).
    pub fn claim_snapshot(self: &Arc<Self>, id: &str) -> Result<SnapshotClaim, Status> {
        if !self
            .snapshot_claims
            .lock()
            .expect("snapshot claims")
            .insert(id.to_string())
        {
            return Err(Status::unavailable(format!(
                "snapshot {id} is being moved or deleted; retry"
            )));
        }
        Ok(SnapshotClaim {
            moves: Arc::clone(self),
            id: id.to_string(),
        })
    }

    /// Moves the snapshots of volume `volume` on `node` (and finishes
    /// every snapshot move of them from it or into it) to `to`, oldest
    /// first; the last one moved keeps its source copy (so the volume's own
    /// move can copy only what changed since it): the caller removes it
    /// with [`Moves::finish_snapshot`]. The caller holds `snapshot_moves`.
    pub(super) async fn move_snapshots_of(
        self: &Arc<Self>,
        volume: &str,
        node: &str,
        to: &str,
        out: &mut SnapshotsMoved,
    ) -> Option<String> {
        self.move_chain(node, volume, Some(to), out, false).await
    }

    /// Moves every snapshot of `node` (and finishes every snapshot move
    /// from it or into it) that did not go with its volume, oldest first
    /// per volume, each volume's to
    /// one node: the node its volume is on now if it can take them, else
    /// the ready node with the most room.
    pub(super) async fn drain_snapshots(self: &Arc<Self>, node: &str, out: &mut SnapshotsMoved) {
        let _one = self.snapshot_moves.lock().await;
        let snaps = match self.snapshots_on(node, None).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(node, error = %e.message(), "reading snapshot records for a drain");
                return;
            }
        };
        let mut volumes: Vec<String> = snaps
            .into_iter()
            .filter(|s| !out.handled.contains(&s.snapshot_id))
            .map(|s| s.source_volume_id)
            .collect();
        volumes.sort_unstable();
        volumes.dedup();
        for volume in volumes {
            self.move_chain(node, &volume, None, out, true).await;
        }
    }

    /// The snapshots on `node` or moving from or into it (of `volume` only,
    /// if given), oldest first.
    pub(super) async fn snapshots_on(
        &self,
        node: &str,
        volume: Option<&str>,
    ) -> Result<Vec<SnapshotRecord>, Status> {
        let (node, volume) = (node.to_string(), volume.map(str::to_string));
        let mut snaps = self
            .store(move |r| {
                Ok(r.snapshots()?
                    .into_iter()
                    .filter(|s| volume.as_ref().is_none_or(|v| &s.source_volume_id == v))
                    .filter(|s| {
                        s.node == node
                            || s.moving
                                .as_ref()
                                .is_some_and(|m| m.from == node || m.to == node)
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
        snaps.sort_by_key(|s| (s.created_unix_ns, s.snapshot_id.clone()));
        Ok(snaps)
    }

    /// Why node `to` cannot take the snapshots of drained `node`, if so.
    fn unfit(&self, to: &str, node: &str) -> Option<String> {
        if to == node {
            return Some(format!("node {node} is the one being drained"));
        }
        match self.cluster.nodes.list() {
            Ok(nodes) => match nodes.iter().find(|n| n.node_id == to) {
                Some(n) if n.draining => Some(format!("node {to} is draining too")),
                Some(_) => None,
                None => Some(format!("node {to} is not known")),
            },
            Err(e) => Some(e.message().to_string()),
        }
    }

    /// Ends the moves of snapshot record `s` that a move off `node` cannot
    /// go on with: those into `node`, into a node that drains, or into
    /// another node than `to`, where its volume goes. A switched one's
    /// source copy is removed (the snapshot is then where its record says,
    /// and moves on from there), one still copying is rolled back.
    async fn settle(
        self: &Arc<Self>,
        s: &SnapshotRecord,
        node: &str,
        to: Option<&str>,
    ) -> Result<(), Status> {
        let Some(m) = &s.moving else { return Ok(()) };
        let why = match self.unfit(&m.to, node) {
            Some(why) => why,
            None if to.is_some_and(|t| t != m.to) => {
                format!("its volume goes to node {}", to.unwrap_or_default())
            }
            // One switched to a fit node stays a base for the next one.
            None => return Ok(()),
        };
        match m.phase {
            MovePhase::Removing => self.finish_snapshot(&s.snapshot_id).await,
            MovePhase::Copying | MovePhase::Aborting => {
                let _claim = self.claim_snapshot(&s.snapshot_id)?;
                let mut rec = self.snapshot_record(&s.snapshot_id).await?;
                self.snapshot_phase(&mut rec, MovePhase::Aborting, &why)
                    .await?;
                self.abort_snapshot(&mut rec).await
            }
            _ => Ok(()),
        }
    }

    /// Moves volume `volume`'s snapshots on drained `node` (and those
    /// moving from or into it) to `to` (else: where one of them is moving
    /// already, else the node the volume is on now if it can take them,
    /// else the ready node with the most room), oldest first, each source
    /// copy removed once the next one moved; the last one moved, whose
    /// source copy is left for the caller to remove unless `finish`.
    async fn move_chain(
        self: &Arc<Self>,
        node: &str,
        volume: &str,
        to: Option<&str>,
        out: &mut SnapshotsMoved,
        finish: bool,
    ) -> Option<String> {
        let fail = |out: &mut SnapshotsMoved, chain: Vec<SnapshotRecord>, why: &str| {
            for s in chain {
                out.stayed.push((s.snapshot_id, why.to_string()));
            }
        };
        let mut chain = match self.snapshots_on(node, Some(volume)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(node, volume, error = %e.message(), "reading snapshot records for a drain");
                return None;
            }
        };
        if to.is_none_or(|t| self.unfit(t, node).is_none()) {
            for s in &chain {
                if let Err(e) = self.settle(s, node, to).await {
                    tracing::warn!(snapshot = %s.snapshot_id, error = %e.message(), "ending an earlier move of a snapshot");
                }
            }
            chain = match self.snapshots_on(node, Some(volume)).await {
                Ok(c) => c,
                Err(e) => {
                    fail(out, chain, e.message());
                    return None;
                }
            };
        }
        chain.retain(|s| !out.handled.contains(&s.snapshot_id));
        out.handled
            .extend(chain.iter().map(|s| s.snapshot_id.clone()));
        let home = self
            .store({
                let v = volume.to_string();
                move |r| r.volume(&v)
            })
            .await
            .ok()
            .flatten()
            .map(|v| v.node)
            .filter(|n| n != node);
        let moving_to = chain
            .iter()
            .find_map(|s| s.moving.as_ref().map(|m| m.to.clone()));
        let to = match (moving_to, to) {
            (_, Some(t)) => t.to_string(),
            (Some(t), None) => t,
            (None, None) => {
                let size = chain.iter().map(|s| s.size_bytes).max().unwrap_or(0);
                let preferred: Vec<String> = home.into_iter().collect();
                match self.cluster.nodes.place(size, |n| n != node, &preferred) {
                    Ok(t) => {
                        self.cluster.nodes.unplace(&t, size);
                        t
                    }
                    Err(e) => {
                        fail(out, chain, e.message());
                        return None;
                    }
                }
            }
        };
        if let Some(why) = self.unfit(&to, node) {
            fail(out, chain, &why);
            return None;
        }
        let mut last: Option<String> = None;
        for s in chain {
            let id = s.snapshot_id.clone();
            if s.state != RecordState::Ready {
                out.stayed
                    .push((id, "it is still being created".to_string()));
                continue;
            }
            match self.move_snapshot(&id, &to, Start::New).await {
                Ok(moved) => {
                    out.moved.push(moved);
                    if let Some(prev) = last.replace(id) {
                        self.finish_logged(&prev).await;
                    }
                }
                Err(e) => out.stayed.push((id, e.message().to_string())),
            }
        }
        if finish && let Some(prev) = last.take() {
            self.finish_logged(&prev).await;
        }
        last
    }

    /// [`Moves::finish_snapshot`], its failure logged: the snapshot is on
    /// its target already; its source copy goes at the next try (the
    /// leader's resume, a drain, or a delete).
    pub(super) async fn finish_logged(self: &Arc<Self>, id: &str) {
        if let Err(e) = self.finish_snapshot(id).await {
            tracing::warn!(snapshot = id, error = %e.message(), "removing a moved snapshot's source copy");
        }
    }

    /// Finishes every snapshot move the records name (the leader's resume),
    /// unless a drain runs one: per volume and target, oldest first, each
    /// source copy removed once the next one moved (as a drain does).
    pub(super) async fn resume_snapshots(self: &Arc<Self>) {
        let Ok(_one) = self.snapshot_moves.try_lock() else {
            return;
        };
        let moving = match self
            .store(|r| {
                Ok(r.snapshots()?
                    .into_iter()
                    .filter(|s| s.moving.is_some())
                    .collect::<Vec<_>>())
            })
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e.message(), "reading snapshot records to resume moves");
                return;
            }
        };
        let mut chains: BTreeMap<(String, String), Vec<SnapshotRecord>> = BTreeMap::new();
        for s in moving {
            let to = s.moving.as_ref().map(|m| m.to.clone()).unwrap_or_default();
            chains
                .entry((s.source_volume_id.clone(), to))
                .or_default()
                .push(s);
        }
        for ((_, to), mut chain) in chains {
            chain.sort_by_key(|s| (s.created_unix_ns, s.snapshot_id.clone()));
            let mut last: Option<String> = None;
            for s in chain {
                match self
                    .move_snapshot(&s.snapshot_id, &to, Start::FinishOnly)
                    .await
                {
                    Ok(_) => {
                        if let Some(prev) = last.replace(s.snapshot_id) {
                            self.finish_logged(&prev).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(snapshot = %s.snapshot_id, error = %e.message(), "snapshot move not finished")
                    }
                }
            }
            if let Some(prev) = last {
                self.finish_logged(&prev).await;
            }
        }
    }

    async fn snapshot_record(&self, id: &str) -> Result<SnapshotRecord, Status> {
        let key = id.to_string();
        self.store(move |r| r.snapshot(&key))
            .await?
            .ok_or_else(|| Status::not_found(format!("snapshot {id:?} does not exist")))
    }

    /// Writes the record's node and move back, and its loss (never taken
    /// back), unless the snapshot was deleted meanwhile (NOT_FOUND then:
    /// the move stops).
    async fn put_snapshot(&self, rec: &SnapshotRecord) -> Result<(), Status> {
        let (id, node, moving) = (
            rec.snapshot_id.clone(),
            rec.node.clone(),
            rec.moving.clone(),
        );
        let lost_with = rec.lost_with.clone();
        let written = self
            .store(move |r| {
                r.update_snapshot(&id, &mut |current| {
                    (current.node, current.moving) = (node.clone(), moving.clone());
                    if current.lost_with.is_none() {
                        current.lost_with.clone_from(&lost_with);
                    }
                    true
                })
            })
            .await?;
        if written {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "snapshot {} was deleted during its move",
                rec.snapshot_id
            )))
        }
    }

    async fn snapshot_phase(
        &self,
        rec: &mut SnapshotRecord,
        phase: MovePhase,
        message: &str,
    ) -> Result<(), Status> {
        if let Some(m) = rec.moving.as_mut() {
            m.phase = phase;
            m.message = message.to_string();
        }
        self.put_snapshot(rec).await
    }

    /// Steps 1 to 5 of moving snapshot `id` to node `to` (or of its move
    /// under way); its source copy is removed by [`Moves::finish_snapshot`].
    async fn move_snapshot(
        self: &Arc<Self>,
        id: &str,
        to: &str,
        start: Start,
    ) -> Result<MovedSnapshot, Status> {
        let _claim = self.claim_snapshot(id)?;
        let mut rec = self.snapshot_record(id).await?;
        let moved = |rec: &SnapshotRecord, copied_bytes, base: String| MovedSnapshot {
            snapshot_id: rec.snapshot_id.clone(),
            from_node: rec
                .moving
                .as_ref()
                .map_or(rec.node.clone(), |m| m.from.clone()),
            to_node: to.to_string(),
            copied_bytes,
            base_snapshot_id: base,
        };
        match &rec.moving {
            None if rec.node == to => return Ok(moved(&rec, 0, String::new())),
            // Ended meanwhile (a delete rolled it back): not started again.
            None if start == Start::FinishOnly => {
                return Err(Status::failed_precondition(format!(
                    "snapshot {id} is not moving any more"
                )));
            }
            None => {
                rec.moving = Some(Move {
                    from: rec.node.clone(),
                    to: to.to_string(),
                    lazy: false,
                    live: false,
                    published_to: String::new(),
                    read_only: true,
                    sealed_boot: String::new(),
                    phase: MovePhase::Copying,
                    message: "copying".into(),
                    started_unix_ns: now_ns(),
                });
                self.put_snapshot(&rec).await?;
                failpoint(SNAPSHOT_FAILPOINTS[0]);
            }
            Some(m) if m.to != to => {
                return Err(Status::aborted(format!(
                    "snapshot {id} is moving from node {} to node {} ({})",
                    m.from, m.to, m.message
                )));
            }
            Some(_) => {}
        }
        let m = rec.moving.clone().expect("moving");
        match m.phase {
            MovePhase::Copying => {}
            MovePhase::Removing => return Ok(moved(&rec, 0, String::new())),
            MovePhase::Aborting => {
                self.abort_snapshot(&mut rec).await?;
                return Err(Status::failed_precondition(format!(
                    "the move of snapshot {id} to node {} was rolled back",
                    m.to
                )));
            }
            _ => {
                return Err(Status::failed_precondition(format!(
                    "snapshot {id} is in a move phase this controller does not know: {}",
                    m.message
                )));
            }
        }
        let (copied, base) = match self.copy_snapshot(&rec, &m).await {
            Ok(c) => c,
            Err(e) if refused(&e) || self.cluster.nodes.forgotten(&m.to) => {
                tracing::warn!(snapshot = id, to = %m.to, error = %e.message(), "a snapshot's move is rolled back");
                self.snapshot_phase(&mut rec, MovePhase::Aborting, e.message())
                    .await?;
                self.abort_snapshot(&mut rec).await?;
                return Err(Status::failed_precondition(format!(
                    "the move of snapshot {id} to node {} was rolled back: {}",
                    m.to,
                    e.message()
                )));
            }
            Err(e) if e.code() == Code::NotFound && self.snapshot_record(id).await.is_err() => {
                // Deleted meanwhile (a delete that read the record before
                // the move was recorded): what the move made goes too.
                self.clean_after_delete(id, &m).await;
                return Err(e);
            }
            Err(e) => {
                let e = waiting(e);
                if e.code() != Code::NotFound {
                    let why = format!("waiting: {}", e.message());
                    if let Some(m) = rec.moving.as_mut() {
                        m.message = why;
                    }
                    self.put_snapshot(&rec).await.ok();
                }
                return Err(e);
            }
        };
        failpoint(SNAPSHOT_FAILPOINTS[2]);
        if self.cluster.nodes.forgotten(&m.to) {
            // Forgotten while it copied: never switched to.
            self.snapshot_phase(&mut rec, MovePhase::Aborting, "its target was forgotten")
                .await?;
            self.abort_snapshot(&mut rec).await?;
            return Err(Status::failed_precondition(format!(
                "the move of snapshot {id} to node {} was rolled back: that node was forgotten",
                m.to
            )));
        }
        rec.node = m.to.clone();
        self.snapshot_phase(&mut rec, MovePhase::Removing, "removing the source's copy")
            .await?;
        failpoint(SNAPSHOT_FAILPOINTS[3]);
        tracing::info!(snapshot = id, from = %m.from, to = %m.to, copied, base, "snapshot moved");
        self.metrics.volume_moved("snapshot", true, copied);
        Ok(moved(&rec, copied, base))
    }

    /// Steps 2 to 4: the bytes copied, and the target's snapshot the copy
    /// started from (empty: none).
    async fn copy_snapshot(&self, rec: &SnapshotRecord, m: &Move) -> Result<(u64, String), Status> {
        let id = &rec.snapshot_id;
        let sid: SnapshotId = id
            .parse()
            .map_err(|_| Status::failed_precondition(format!("{id:?} is not a snapshot ID")))?;
        let c = carrier(sid).to_string();
        let nodes = &self.cluster.nodes;
        let target = nodes.agent(&m.to)?;
        // Made there already (a crash after step 4): only its carrier goes
        // (also when the source was forgotten since: then it is saved).
        if holds_snapshot(target.as_ref(), id).await? {
            delete_volume(target.as_ref(), &c).await?;
            return Ok((0, String::new()));
        }
        // Not there, and its source forgotten: lost (rolled back).
        if nodes.forgotten(&m.from) {
            return Err(crate::cluster::nodes::lost(&m.from));
        }
        let source = nodes.agent(&m.from)?;
        source
            .create_volume(Request::new(agent::CreateVolumeRequest {
                volume_id: c.clone(),
                size_bytes: rec.size_bytes,
                source: Some(agent::create_volume_request::Source::SnapshotId(id.clone())),
                ..Default::default()
            }))
            .await
            // The snapshot is not there: nothing to move.
            .map_err(|e| match e.code() {
                Code::NotFound => Status::failed_precondition(e.message()),
                _ => e,
            })?;
        let (base, ranges) = self
            .delta(
                &rec.source_volume_id,
                Some(rec.created_unix_ns),
                m,
                source.as_ref(),
                Delta::Snapshot(id),
            )
            .await?;
        let (address, grant) = self.source_grant(&c, m).await?;
        let import = agent::ImportRequest {
            volume: Some(agent::CreateVolumeRequest {
                volume_id: c.clone(),
                size_bytes: rec.size_bytes,
                ..Default::default()
            }),
            owner: m.from.clone(),
            address,
            grant,
            rate_bytes_per_second: self.rate,
            base_snapshot_id: base.clone(),
            ranges,
            ..Default::default()
        };
        let copied = loop {
            let r = target
                .import(Request::new(import.clone()))
                .await?
                .into_inner();
            if r.done {
                break r.copied_bytes;
            }
            // Deleted meanwhile: the caller cleans up.
            self.snapshot_record(id).await?;
            tokio::time::sleep(POLL).await;
        };
        failpoint(SNAPSHOT_FAILPOINTS[1]);
        target
            .create_snapshot(Request::new(agent::CreateSnapshotRequest {
                volume_id: c.clone(),
                snapshot_id: id.clone(),
                freeze_filesystem: false,
            }))
            .await?;
        delete_volume(target.as_ref(), &c).await?;
        Ok((copied, base))
    }

    /// The newest snapshot of volume `volume` (older than `before`, if
    /// given) that both the target and the source have (moved there by
    /// this drain, its source copy not removed yet), and the ranges of
    /// `of` changed since it; none and no ranges if there is none, or the
    /// source cannot compare the two (a merge, an older agent).
    pub(super) async fn delta(
        &self,
        volume: &str,
        before: Option<u64>,
        m: &Move,
        source: &dyn agent::agent_server::Agent,
        of: Delta<'_>,
    ) -> Result<(String, Vec<agent::ByteRange>), Status> {
        let (volume, from, to) = (volume.to_string(), m.from.clone(), m.to.clone());
        let base = self
            .store(move |r| {
                Ok(r.snapshots()?
                    .into_iter()
                    .filter(|s| s.source_volume_id == volume && s.node == to)
                    .filter(|s| before.is_none_or(|b| s.created_unix_ns < b))
                    .filter(|s| {
                        s.moving
                            .as_ref()
                            .is_some_and(|m| m.from == from && m.phase == MovePhase::Removing)
                    })
                    .max_by_key(|s| s.created_unix_ns)
                    .map(|s| s.snapshot_id))
            })
            .await?;
        let Some(base) = base else {
            return Ok((String::new(), Vec::new()));
        };
        let (snapshot_id, volume_id) = match of {
            Delta::Snapshot(s) => (s.to_string(), String::new()),
            Delta::Volume(v) => (String::new(), v.to_string()),
        };
        let mut ranges = Vec::new();
        let mut at = 0;
        loop {
            let page = source
                .snapshot_ranges(Request::new(agent::SnapshotRangesRequest {
                    snapshot_id: snapshot_id.clone(),
                    volume_id: volume_id.clone(),
                    base_snapshot_id: base.clone(),
                    starting_offset: at,
                    max_results: u32::MAX,
                }))
                .await;
            let page = match page {
                Ok(p) => p.into_inner(),
                // Not comparable after all: all of it is copied.
                Err(e)
                    if matches!(
                        e.code(),
                        Code::InvalidArgument | Code::NotFound | Code::Unimplemented
                    ) =>
                {
                    tracing::info!(of = ?of, base, error = %e.message(), "copying all of it, not changes");
                    return Ok((String::new(), Vec::new()));
                }
                Err(e) => return Err(e),
            };
            ranges.extend(page.ranges);
            if page.next_offset >= page.size_bytes || page.next_offset <= at {
                break;
            }
            at = page.next_offset;
        }
        Ok((base, bounded(ranges, MAX_DELTA_RANGES)))
    }

    /// Step 6: the source's copy of a moved snapshot is removed, and its
    /// move ends.
    pub async fn finish_snapshot(self: &Arc<Self>, id: &str) -> Result<(), Status> {
        let _claim = self.claim_snapshot(id)?;
        let mut rec = self.snapshot_record(id).await?;
        let Some(m) = rec.moving.clone() else {
            return Ok(());
        };
        if m.phase != MovePhase::Removing {
            return Ok(());
        }
        let sid: SnapshotId = id
            .parse()
            .map_err(|_| Status::failed_precondition(format!("{id:?} is not a snapshot ID")))?;
        if self.cluster.nodes.forgotten(&rec.node) {
            return self.kept_at_source(&mut rec, &m, sid).await;
        }
        // The old copy goes once the node it went to is seen holding it:
        // while that node is away it may be gone for good, and this copy
        // then is the snapshot.
        let held = match self.cluster.nodes.agent(&rec.node) {
            Ok(target) => holds_snapshot(target.as_ref(), id).await.and_then(|held| {
                held.then_some(())
                    .ok_or_else(|| Status::not_found("it does not hold it"))
            }),
            Err(e) => Err(e),
        };
        if let Err(e) = held {
            return Err(Status::new(
                e.code(),
                format!(
                    "snapshot {id} moved to node {}; its old copy on node {} stays until that \
                     node is seen holding it: {}",
                    rec.node,
                    m.from,
                    e.message()
                ),
            ));
        }
        let removed = match self.cluster.nodes.agent(&m.from) {
            Ok(source) => {
                let gone = agent::DeleteSnapshotRequest {
                    snapshot_id: id.to_string(),
                };
                match source.delete_snapshot(Request::new(gone)).await {
                    Ok(_) => delete_volume(source.as_ref(), &carrier(sid).to_string()).await,
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            // A node the controller no longer knows must not keep the
            // move (and deletes of the snapshot) waiting forever.
            if !self.cluster.nodes.forgotten(&m.from) {
                return Err(Status::new(
                    e.code(),
                    format!(
                        "snapshot {id} moved to node {}; removing its old copy on node {}: {}",
                        m.to,
                        m.from,
                        e.message()
                    ),
                ));
            }
            tracing::warn!(snapshot = id, node = %m.from, error = %e.message(), "a moved snapshot's source copy is left on a node the controller no longer knows");
        }
        rec.moving = None;
        self.put_snapshot(&rec).await
    }

    /// Snapshot `rec` switched to a node forgotten since (`strata node
    /// forget --abandon-data`): its source still holds it unless its
    /// removal there began, and then it stays there (only its carrier
    /// goes). Else it is lost with that node.
    async fn kept_at_source(
        &self,
        rec: &mut SnapshotRecord,
        m: &Move,
        sid: SnapshotId,
    ) -> Result<(), Status> {
        let id = rec.snapshot_id.clone();
        let nodes = &self.cluster.nodes;
        let held = match nodes.agent(&m.from) {
            Ok(source) => {
                let held = holds_snapshot(source.as_ref(), &id).await?;
                if held {
                    delete_volume(source.as_ref(), &carrier(sid).to_string()).await?;
                }
                held
            }
            // Its source is gone for good too.
            Err(_) if nodes.forgotten(&m.from) => false,
            Err(e) => return Err(e),
        };
        if held {
            rec.node = m.from.clone();
            tracing::warn!(snapshot = %id, node = %m.from, forgotten = %m.to, "a snapshot moved to a node that was forgotten stays where it came from");
        } else {
            rec.lost_with = Some(rec.node.clone());
            tracing::warn!(snapshot = %id, node = %m.to, "a snapshot is lost with a forgotten node (its source copy is gone)");
        }
        rec.moving = None;
        self.put_snapshot(rec).await
    }

    /// Marks snapshots `ids` of `node`, about to be forgotten with what it
    /// holds, lost for good (but not one in a move out of it: its move
    /// ends it, kept where it went or rolled back and lost). A record
    /// never loses the mark again, so no claim is needed.
    pub(in crate::cluster) async fn mark_lost(
        self: &Arc<Self>,
        ids: &[String],
        node: &str,
    ) -> Result<(), Status> {
        for id in ids {
            let (id, with) = (id.clone(), node.to_string());
            self.store(move |r| {
                r.update_snapshot(&id, &mut |s| {
                    let lost = s.moving.is_none() && s.node == with;
                    if lost {
                        s.lost_with = Some(with.clone());
                    }
                    lost
                })
                .map(drop)
            })
            .await?;
        }
        Ok(())
    }

    /// Rolls back the move of snapshot `id` if it did not switch yet (a
    /// delete's first step; the snapshot is then where it was).
    pub async fn roll_back_snapshot(self: &Arc<Self>, id: &str) -> Result<(), Status> {
        let _claim = self.claim_snapshot(id)?;
        let mut rec = self.snapshot_record(id).await?;
        match rec.moving.as_ref().map(|m| m.phase) {
            Some(MovePhase::Copying | MovePhase::Aborting) => {
                self.snapshot_phase(&mut rec, MovePhase::Aborting, "rolled back for a delete")
                    .await?;
                self.abort_snapshot(&mut rec).await
            }
            _ => Ok(()),
        }
    }

    /// Best effort, after the snapshot's record was deleted during its
    /// move: the carriers and the target's snapshot go.
    async fn clean_after_delete(&self, id: &str, m: &Move) {
        let Ok(sid) = id.parse::<SnapshotId>() else {
            return;
        };
        let c = carrier(sid).to_string();
        let nodes = &self.cluster.nodes;
        if let Ok(target) = nodes.agent(&m.to) {
            delete_volume(target.as_ref(), &c).await.ok();
            let gone = agent::DeleteSnapshotRequest {
                snapshot_id: id.to_string(),
            };
            target.delete_snapshot(Request::new(gone)).await.ok();
        }
        if let Ok(source) = nodes.agent(&m.from) {
            delete_volume(source.as_ref(), &c).await.ok();
        }
    }

    /// Rolls a snapshot's move back (before its switch): the target's copy
    /// and snapshot and the source's carrier are deleted.
    async fn abort_snapshot(&self, rec: &mut SnapshotRecord) -> Result<(), Status> {
        let Some(m) = rec.moving.clone() else {
            return Ok(());
        };
        let id = rec.snapshot_id.clone();
        let c = id
            .parse::<SnapshotId>()
            .map(|s| carrier(s).to_string())
            .unwrap_or_default();
        let nodes = &self.cluster.nodes;
        // Its source gone for good: a copy complete on the target (made
        // there at the copy's end) is the snapshot now.
        if nodes.forgotten(&m.from) {
            let target = nodes.agent(&m.to)?;
            if holds_snapshot(target.as_ref(), &id).await? {
                delete_volume(target.as_ref(), &c).await?;
                rec.node = m.to.clone();
                rec.moving = None;
                tracing::warn!(snapshot = %id, node = %m.to, forgotten = %m.from, "a snapshot copied out of a forgotten node is kept where it went");
                return self.put_snapshot(rec).await;
            }
        }
        let on_target = async {
            let target = nodes.agent(&m.to)?;
            delete_volume(target.as_ref(), &c).await?;
            let gone = agent::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
            };
            target.delete_snapshot(Request::new(gone)).await.map(drop)
        };
        let on_source = async { delete_volume(nodes.agent(&m.from)?.as_ref(), &c).await };
        // As `finish_snapshot`: a forgotten node keeps its part.
        let done = |node: &str, cleaned: Result<(), Status>| match cleaned {
            Err(e) if !nodes.forgotten(node) => Err(e),
            Err(e) => {
                tracing::warn!(snapshot = %id, node = %node, error = %e.message(), "a rolled back snapshot move leaves its copy on a node the controller no longer knows");
                Ok(())
            }
            Ok(()) => Ok(()),
        };
        // The source first: while it does not answer, the target's copy
        // (maybe complete) stays.
        done(&m.from, on_source.await)?;
        done(&m.to, on_target.await)?;
        rec.moving = None;
        if nodes.forgotten(&rec.node) {
            rec.lost_with = Some(rec.node.clone());
        }
        self.put_snapshot(rec).await?;
        self.metrics.volume_moved("snapshot", false, 0);
        Ok(())
    }
}

/// Whether `agent`'s node holds snapshot `id` (made there whole: a copy
/// makes the snapshot only at its end).
async fn holds_snapshot(agent: &dyn agent::agent_server::Agent, id: &str) -> Result<bool, Status> {
    let asked = agent::GetSnapshotRequest {
        snapshot_id: id.to_string(),
    };
    match agent.get_snapshot(Request::new(asked)).await {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Code::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

async fn delete_volume(agent: &dyn agent::agent_server::Agent, id: &str) -> Result<(), Status> {
    agent
        .delete_volume(Request::new(agent::DeleteVolumeRequest {
            volume_id: id.to_string(),
        }))
        .await
        .map(drop)
}

/// `ranges` (in order) merged across their smallest gaps until at most
/// `max` are left.
fn bounded(ranges: Vec<agent::ByteRange>, max: usize) -> Vec<agent::ByteRange> {
    let mut ranges = ranges;
    let mut gap = 4096;
    while ranges.len() > max {
        let mut out: Vec<agent::ByteRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                Some(p) if r.offset <= p.offset + p.length + gap => {
                    p.length = (r.offset + r.length).max(p.offset + p.length) - p.offset;
                }
                _ => out.push(r),
            }
        }
        ranges = out;
        gap *= 2;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::{bounded, carrier};
    use crate::engine::SnapshotId;
    use csi_proto::agent::v1::ByteRange;

    #[test]
    fn a_carrier_is_the_same_for_a_snapshot_and_another_for_any_other() {
        let s = SnapshotId::new_random();
        assert_eq!(carrier(s), carrier(s));
        assert_ne!(carrier(s), carrier(SnapshotId::new_random()));
        assert_ne!(carrier(s).as_u128(), s.as_u128());
    }

    #[test]
    fn too_many_ranges_are_merged_across_their_smallest_gaps() {
        let r = |offset, length| ByteRange { offset, length };
        let ranges = vec![r(0, 4096), r(8192, 4096), r(65536, 4096), r(1 << 20, 4096)];
        assert_eq!(bounded(ranges.clone(), 4), ranges);
        assert_eq!(
            bounded(ranges.clone(), 3),
            vec![r(0, 12288), r(65536, 4096), r(1 << 20, 4096)]
        );
        let one = bounded(ranges, 1);
        assert_eq!(one, vec![r(0, (1 << 20) + 4096)]);
    }
}
