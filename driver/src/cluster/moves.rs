//! Moving a volume to another node: the controller's side. An unused
//! volume's data is copied while no node has it published, so its contents
//! do not change (one in use moves live, below); the move's steps are recorded in its [`VolumeRecord`] (`moving`),
//! so a crash of the controller, the source or the target at any step is
//! finished (or rolled back) by the next call or by the next leader.
//!
//! 1. **Record** `moving` (phase `copying`, from, to). From here until the
//!    switch, publishing, expanding and deleting the volume are UNAVAILABLE
//!    (the sidecars retry).
//! 2. **Attach for the move**: the source records a read-only attachment
//!    to the target, refused if any node has the volume published. A
//!    publish that slipped in before step 1 replaces it, and so fails
//!    step 4.
//! 3. **Copy**: the target creates the volume and copies every data
//!    extent from the source over the data path, with a grant for that
//!    attachment, then flushes (the agent's Import; polled, resumable).
//!    In a drain, whose snapshots of the volume went to the target first
//!    (see `snapshots`), the target's copy starts as a clone of the
//!    newest of them, and only the ranges changed since it are copied.
//! 4. **Seal**: the source marks its copy moved if the move's attachment
//!    is still current; it never attaches that copy again.
//! 5. **Switch**: the record names the target (phase `removing`).
//! 6. **Remove** the source's copy; the record drops `moving`.
//!
//! A refusal at step 2, 3 or 4, or a move back to the source (a cancel),
//! rolls back (phase `aborting`): the source's copy is made the volume
//! again (its move attachment and seal undone: the target served nothing
//! yet), then the target's copy is deleted, when the target answers. Any
//! other failure (a node away) leaves the record where it is, to resume.
//! Snapshots stay on the source node (their layers are the source's);
//! a drain moves them afterwards (see `snapshots`).
//!
//! **Live** ([`Move::live`], a volume some node has published, found out
//! at step 2 by the source's Track, which also starts its change record):
//! at step 3 the target copies the volume and then, in rounds, the ranges
//! the source recorded as changed, while writes are throttled to half of
//! what each round took; once a round is small, the source holds writes,
//! the target copies the last changes, and step 4 seals the source's copy
//! while the hold lasts (a hold past its deadline ends by itself, the seal
//! is refused, and the rounds go on). After the switch (phase `following`)
//! the volume is published on the target to the node that uses it, and
//! that node follows it there (`agent.proto`, Follow). Which node that is
//! the record says (`published_to`): an unpublish during the copy clears
//! it, and a publish while it is clear sets it (the publish goes to the
//! source; [`Moves::unpublished`], [`Moves::publishing`]). A live move is
//! never rolled back once sealed (a cancel then is refused), unless its
//! target is forgotten (`strata node forget`) before the switch: never
//! switched to, that target took none of its writes, so the source
//! undoes its seal and the node that uses the volume is pointed at it
//! again (`Moves::abort`).
//!
//! **Switch first** ([`Move::lazy`], restores and clones for a pod on
//! another node) runs the same steps in another order: at step 3 the target
//! makes a *fetching* volume that reads what it has not copied from the
//! source, and answers at once; the seal and the switch follow, and the
//! copy runs after the switch (phase `fetching`) while the target serves
//! the volume; then the source's copy is removed. The controller's polls of
//! the fetch carry where the source is now, so the target follows it. No
//! rollback after the switch: the target may hold writes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_proto::agent::v1 as agent;
use csi_proto::agent::v1::agent_server::Agent;
use csi_proto::cluster::v1::{ForgetNodeReply, MoveVolumeReply};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::{Code, Request, Status};

use super::nodes::{Nodes, now_ns};
use super::records::{NodeState, RecordState, Records, RecordsError, VolumeRecord};
use super::{Cluster, EventKind};
use crate::metrics::Metrics;
use crate::peer::grant;

mod snapshots;
use snapshots::Delta;
pub use snapshots::{SNAPSHOT_FAILPOINTS, SnapshotClaim, SnapshotsMoved, carrier};

/// A move of a volume under way, as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Move {
    pub from: String,
    pub to: String,
    /// Switch first (a restore or clone for a pod on another node): the
    /// target serves the volume at once and fetches it behind.
    #[serde(default)]
    pub lazy: bool,
    /// Live: the volume is in use (published) while it moves; the source
    /// records its changes, and the last delta is copied while its writes
    /// are held.
    #[serde(default)]
    pub live: bool,
    /// Live: the node the volume was published to when the move began, and
    /// how; its attachment follows the volume after the switch.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub published_to: String,
    #[serde(default)]
    pub read_only: bool,
    /// Live: the boot ID the source sealed the volume under, for the node
    /// it is published to ("": not known; see `agent.proto`, Follow).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sealed_boot: String,
    pub phase: MovePhase,
    /// What the move waits for, or how far the copy is.
    #[serde(default)]
    pub message: String,
    pub started_unix_ns: u64,
}

/// Where a move is (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MovePhase {
    /// Steps 2 to 4: the source still owns the volume.
    Copying,
    /// Switch first, after the switch: the target owns the volume and
    /// copies in the blocks it does not have yet, reading them from the
    /// source meanwhile.
    Fetching,
    /// Live, after the switch: the node the volume is published to is
    /// told to reach it on the target.
    Following,
    /// Step 6: the target owns it; the source's copy is removed.
    Removing,
    /// Rolling back: the source's copy is the volume again (it may be
    /// published); the target's copy is removed.
    Aborting,
    /// Written by a newer controller: left alone.
    Unknown,
}

impl MovePhase {
    pub fn label(self) -> &'static str {
        match self {
            MovePhase::Copying => "copying",
            MovePhase::Fetching => "fetching",
            MovePhase::Following => "following",
            MovePhase::Removing => "removing",
            MovePhase::Aborting => "aborting",
            MovePhase::Unknown => "unknown",
        }
    }

    pub fn from_label(s: &str) -> Option<Self> {
        [
            MovePhase::Copying,
            MovePhase::Fetching,
            MovePhase::Following,
            MovePhase::Removing,
            MovePhase::Aborting,
        ]
        .into_iter()
        .find(|p| p.label() == s)
    }
}

/// The failpoints of a move (see `engine::jobs::failpoint`), in order.
pub const FAILPOINTS: [&str; 5] = [
    "cluster::move::recorded",
    "cluster::move::attached",
    "cluster::move::copied",
    "cluster::move::sealed",
    "cluster::move::switched",
];

fn failpoint(name: &str) {
    crate::engine::jobs::failpoint::hit(name);
}

/// How often the copy's progress is asked.
const POLL: Duration = Duration::from_millis(100);

/// How often a live move's last delta is asked about.
const HOLD_POLL: Duration = Duration::from_millis(2);

/// How long a switch-first move is waited for before its caller rolls it
/// back.
const SWITCH_FIRST_WAIT: Duration = Duration::from_secs(30);

/// How long a live move may hold the volume's writes.
const HOLD_DEADLINE: Duration = Duration::from_secs(1);

/// How long a live move waits for its rounds of changes to get small
/// before it tries a hold anyway.
const CONVERGE_WAIT: Duration = Duration::from_secs(120);

/// Holds a live move tries before it gives up.
const HOLD_TRIES: usize = 5;

/// The metrics label of a move's kind.
fn kind(m: &Move) -> &'static str {
    if m.lazy {
        "switch_first"
    } else if m.live {
        "live"
    } else {
        "copy_first"
    }
}

/// How often the copy's progress is written to the record.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The controller's moves: at most one per volume at a time; a second
/// call for the same volume waits for the first one's outcome.
#[derive(Debug)]
pub struct Moves {
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    /// Bytes per second a copy may read from its source (0: no limit).
    rate: u64,
    running: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
    /// Running moves asked to stop copying (a move back to the source).
    cancelled: Mutex<HashSet<String>>,
    /// Held while snapshots move (one volume's at a time; see `snapshots`).
    snapshot_moves: tokio::sync::Mutex<()>,
    /// Snapshots a move step or a delete works on now.
    snapshot_claims: Mutex<HashSet<String>>,
    /// Volumes dataLocality is moving (with their snapshots) now.
    following: Mutex<HashSet<String>>,
    /// Volumes whose snapshots move ahead of them, and where.
    carrying: Mutex<HashMap<String, String>>,
}

/// A volume dataLocality moves; let go when dropped.
struct Following {
    moves: Arc<Moves>,
    id: String,
}

/// A volume whose snapshots [`Moves::carry`] moves ahead of it, and
/// where; let go when dropped.
struct Carrying {
    moves: Arc<Moves>,
    id: String,
}

impl Carrying {
    fn new(moves: &Arc<Moves>, id: &str, to: &str) -> Self {
        moves
            .carrying
            .lock()
            .expect("carrying")
            .insert(id.to_string(), to.to_string());
        Carrying {
            moves: Arc::clone(moves),
            id: id.to_string(),
        }
    }
}

impl Drop for Carrying {
    fn drop(&mut self) {
        self.moves
            .carrying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.moves
            .following
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

type Outcome = Result<MoveVolumeReply, (Code, String)>;

/// What a drain did: the moves, and the volumes and snapshots that stay
/// on the node, each with why.
#[derive(Debug)]
pub struct Drained {
    pub moved: Vec<MoveVolumeReply>,
    pub stayed: Vec<(String, String)>,
    pub snapshots: SnapshotsMoved,
}

fn records_err(e: RecordsError) -> Status {
    Status::internal(e.to_string())
}

/// The reply of a move asked to go to `to`: ABORTED if it went elsewhere
/// (it was moving there already).
fn arrived(reply: MoveVolumeReply, to: &str) -> Result<MoveVolumeReply, Status> {
    if reply.to_node != to {
        return Err(Status::aborted(format!(
            "volume {} was moving to node {} already; it is there now",
            reply.volume_id, reply.to_node
        )));
    }
    Ok(reply)
}

/// NOT_FOUND if volume `rec` is not on node `from` (when given) any more,
/// nor moving.
fn left(rec: &VolumeRecord, from: Option<&str>) -> Result<(), Status> {
    match from {
        Some(f) if rec.node != f && rec.moving.is_none() => Err(Status::not_found(format!(
            "volume {} is not on node {f} any more",
            rec.volume_id
        ))),
        _ => Ok(()),
    }
}

/// Whether a volume's calls must wait for its move: publishing,
/// unpublishing, expanding or deleting a volume that is being copied would
/// race the copy, and a live move's attachment must not change until it
/// follows the volume.
pub fn check_not_moving(rec: &VolumeRecord) -> Result<(), Status> {
    match &rec.moving {
        Some(m)
            if matches!(
                m.phase,
                MovePhase::Copying | MovePhase::Following | MovePhase::Unknown
            ) =>
        {
            Err(Status::unavailable(format!(
                "volume {} is moving from node {} to node {}; retry when the move is done ({})",
                rec.volume_id, m.from, m.to, m.message
            )))
        }
        _ => Ok(()),
    }
}

/// Why volume `rec` is lost with a forgotten node (`strata node forget
/// --abandon-data`), if it is: it is on one (a move out of it that had not
/// switched yet is rolled back; the copy a move that had switched into it
/// left on its source stays until the volume is deleted), or it still
/// fetched from one (its blocks not fetched yet are gone, and what it
/// fetched cannot be told apart from them).
pub fn lost_volume(nodes: &Nodes, rec: &VolumeRecord) -> Option<Status> {
    let with = match &rec.lost_with {
        Some(node) => node,
        None if nodes.forgotten(&rec.node) => &rec.node,
        None => match &rec.moving {
            Some(m) if m.phase == MovePhase::Fetching && nodes.forgotten(&m.from) => &m.from,
            _ => return None,
        },
    };
    Some(match with == &rec.node {
        true => super::nodes::lost(with),
        false => Status::failed_precondition(format!(
            "volume {} was still fetching from node {with}, which was forgotten (strata node \
             forget --abandon-data): its data is lost; delete it",
            rec.volume_id
        )),
    })
}

/// Whether the leader still has work on volume `rec`, lost with a
/// forgotten node: rolling back a move out of that node that had not
/// switched yet. Otherwise its record waits for DeleteVolume as it is.
fn rolls_back(rec: &VolumeRecord) -> bool {
    rec.moving.as_ref().is_some_and(|m| {
        m.from == rec.node && matches!(m.phase, MovePhase::Copying | MovePhase::Aborting)
    })
}

impl Moves {
    pub fn new(cluster: Arc<Cluster>, metrics: Arc<Metrics>, rate: u64) -> Arc<Self> {
        Arc::new(Moves {
            cluster,
            metrics,
            rate,
            running: Mutex::default(),
            cancelled: Mutex::default(),
            snapshot_moves: tokio::sync::Mutex::default(),
            snapshot_claims: Mutex::default(),
            following: Mutex::default(),
            carrying: Mutex::default(),
        })
    }

    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Records) -> Result<T, RecordsError> + Send + 'static,
    ) -> Result<T, Status> {
        let records = Arc::clone(&self.cluster.records);
        tokio::task::spawn_blocking(move || f(records.as_ref()).map_err(records_err))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
    }

    async fn record(&self, id: &str) -> Result<VolumeRecord, Status> {
        let key = id.to_string();
        self.store(move |r| r.volume(&key))
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {id:?} does not exist")))
    }

    /// Writes `change` to the stored record of `rec`'s volume, only if its
    /// move is still the one `rec` has (the same source, target and start,
    /// and in `phase` if given; `rec` without a move: none is stored), so a
    /// step decided on a record read earlier never lands over another
    /// controller's or a forget's (a switch and a rollback never both land,
    /// and what another step wrote meanwhile stays): ABORTED then, and
    /// NOT_FOUND if the volume was deleted. `rec` becomes the stored record.
    /// Only what `change` touches is written: a concurrent expansion keeps
    /// its size, and a loss is never taken back. `change` may refuse too
    /// (false).
    async fn update_move(
        &self,
        rec: &mut VolumeRecord,
        phase: Option<MovePhase>,
        mut change: impl FnMut(&mut VolumeRecord) -> bool + Send + 'static,
    ) -> Result<(), Status> {
        let id = rec.volume_id.clone();
        let expected = rec
            .moving
            .as_ref()
            .map(|m| (m.from.clone(), m.to.clone(), m.started_unix_ns));
        let is_expected = move |current: &VolumeRecord| match (&expected, &current.moving) {
            (None, None) => true,
            (Some((from, to, started)), Some(m)) => {
                m.from == *from
                    && m.to == *to
                    && m.started_unix_ns == *started
                    && phase.is_none_or(|p| p == m.phase)
            }
            _ => false,
        };
        let (key, key2) = (id.clone(), id.clone());
        let (written, after) = self
            .store(move |r| {
                let mut after = None;
                let written = r.update_volume(&key, &mut |current| {
                    let changed = is_expected(current) && change(current);
                    after = Some(current.clone());
                    changed
                })?;
                Ok((written, after))
            })
            .await?;
        if let (true, Some(after)) = (written, after) {
            *rec = after;
            return Ok(());
        }
        // Refused: what is stored now (a store may find the record gone
        // only at its write).
        match self.store(move |r| r.volume(&key2)).await? {
            Some(now) => Err(Status::aborted(format!(
                "the move of volume {id} changed meanwhile (now: {}): not taken further here",
                now.moving.as_ref().map_or("none".to_string(), |m| format!(
                    "{} from node {} to node {}",
                    m.phase.label(),
                    m.from,
                    m.to
                ))
            ))),
            None => Err(Status::not_found(format!(
                "volume {id} was deleted during its move"
            ))),
        }
    }

    /// Moves volume `id` to node `to` (`None`: the node with the most room
    /// that can take it), or finishes the move its record names. Waits
    /// for a move of the same volume that is already running.
    pub async fn move_volume(
        self: &Arc<Self>,
        id: &str,
        to: Option<&str>,
    ) -> Result<MoveVolumeReply, Status> {
        // A move back to the source of a running copy stops the copy; the
        // move then rolls back and this call finishes the rollback.
        let cancel = match to {
            Some(t) => self.cancel_back(id, t).await?,
            None => false,
        };
        let reply = match self.start(id, to, false).await {
            Ok(r) => r,
            // The rollback asked for.
            Err(_) if cancel => {
                let rec = self.record(id).await?;
                if rec.moving.is_some() {
                    return Err(Status::unavailable(format!(
                        "volume {id}: its move's rollback waits ({})",
                        rec.moving.map(|m| m.message).unwrap_or_default()
                    )));
                }
                MoveVolumeReply {
                    volume_id: id.to_string(),
                    from_node: rec.node.clone(),
                    to_node: rec.node,
                    ..Default::default()
                }
            }
            Err(e) => return Err(e),
        };
        match to {
            Some(to) => arrived(reply, to),
            None => Ok(reply),
        }
    }

    /// Whether a move of `id` to `t` stops the copy running: one from `t`
    /// (a move back to its source). The run stopped is the one whose
    /// record this looked at; if that run ended meanwhile, its successor
    /// (a resumed move) is looked at in turn.
    async fn cancel_back(&self, id: &str, t: &str) -> Result<bool, Status> {
        loop {
            let Some(run) = self.running.lock().expect("moves").get(id).cloned() else {
                return Ok(false);
            };
            let rec = self.record(id).await?;
            let back = match rec.moving {
                Some(m) => m.phase == MovePhase::Copying && m.from == t,
                // Launched, not recorded yet: it comes from where it is.
                None => rec.node == t,
            };
            let running = self.running.lock().expect("moves");
            if running.get(id).is_some_and(|r| r.same_channel(&run)) {
                if back {
                    self.cancelled.lock().expect("moves").insert(id.to_string());
                }
                return Ok(back);
            }
        }
    }

    /// Finishes the move volume `id`'s record names (or joins the one
    /// running); begins none: one that ended meanwhile leaves the volume
    /// where it is.
    pub async fn finish(self: &Arc<Self>, id: &str) -> Result<MoveVolumeReply, Status> {
        self.outcome(self.launch(id, None, false, true)).await
    }

    /// Switch first (see [`Move::lazy`]): moves the volume `id`, which no
    /// node has published yet, to `to`, answering once `to` serves it;
    /// the copy goes on in the background.
    pub async fn switch_first(self: &Arc<Self>, id: &str, to: &str) -> Result<(), Status> {
        if self.running.lock().expect("moves").contains_key(id) {
            return Err(Status::aborted(format!("volume {id} is moving already")));
        }
        let rx = self.launch(id, Some(to), true, false);
        // Answer at the switch, or at the move's end if it ends first;
        // given up well within the CO's own timeout (the provisioner's is
        // 60 s in the chart), so that the caller's rollback runs.
        let deadline = Instant::now() + SWITCH_FIRST_WAIT;
        loop {
            if let Some(outcome) = rx.borrow().clone() {
                return outcome
                    .map(drop)
                    .map_err(|(code, message)| Status::new(code, message));
            }
            if self.record(id).await?.node == to {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!(
                    "volume {id} is not on node {to} after {} s; it may still get there",
                    SWITCH_FIRST_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs the move of `id` (or joins the one running) and waits for its
    /// outcome.
    async fn start(
        self: &Arc<Self>,
        id: &str,
        to: Option<&str>,
        lazy: bool,
    ) -> Result<MoveVolumeReply, Status> {
        let rx = self.launch(id, to, lazy, false);
        self.outcome(rx).await
    }

    /// Waits for the outcome of a move [`Moves::launch`] started.
    async fn outcome(
        &self,
        mut rx: watch::Receiver<Option<Outcome>>,
    ) -> Result<MoveVolumeReply, Status> {
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Status::internal("the move ended without an outcome"))?
            .clone()
            .expect("some");
        outcome.map_err(|(code, message)| Status::new(code, message))
    }

    /// Starts the move of `id` in the background unless one runs; where
    /// its outcome will be. With `finish_only`, only the move its record
    /// names is finished: none is begun.
    fn launch(
        self: &Arc<Self>,
        id: &str,
        to: Option<&str>,
        lazy: bool,
        finish_only: bool,
    ) -> watch::Receiver<Option<Outcome>> {
        let mut running = self.running.lock().expect("moves");
        if let Some(rx) = running.get(id) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        running.insert(id.to_string(), rx.clone());
        let (moves, id, to) = (Arc::clone(self), id.to_string(), to.map(str::to_string));
        // The move goes on when the caller gives up waiting.
        tokio::spawn(async move {
            let outcome = moves
                .run(&id, to.as_deref(), lazy, finish_only)
                .await
                .map_err(|s| (s.code(), s.message().to_string()));
            // Both at once: a cancel of the next run is not cleared here.
            let mut running = moves.running.lock().expect("moves");
            running.remove(&id);
            moves.cancelled.lock().expect("moves").remove(&id);
            drop(running);
            let _ = tx.send(Some(outcome));
        });
        rx
    }

    /// Starts finishing every move the records name that is not running
    /// (a new leader's first work, then a retry every 30 s).
    pub async fn resume(self: &Arc<Self>) {
        let moves = Arc::clone(self);
        tokio::spawn(async move { moves.resume_snapshots().await });
        let volumes = match self.store(|r| r.volumes()).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e.message(), "reading volume records to resume moves");
                return;
            }
        };
        let nodes = &self.cluster.nodes;
        for rec in volumes
            .into_iter()
            .filter(|r| r.moving.is_some())
            .filter(|r| lost_volume(nodes, r).is_none() || rolls_back(r))
        {
            // Running, or its snapshots go ahead of it (it follows them).
            if self
                .running
                .lock()
                .expect("moves")
                .contains_key(&rec.volume_id)
                || self
                    .carrying
                    .lock()
                    .expect("carrying")
                    .contains_key(&rec.volume_id)
            {
                continue;
            }
            let moves = Arc::clone(self);
            // Not waited for: a fetch may take hours.
            tokio::spawn(async move {
                match moves.finish(&rec.volume_id).await {
                    Ok(r) => {
                        tracing::info!(volume = %r.volume_id, from = %r.from_node, to = %r.to_node, "move finished after a restart")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %rec.volume_id, error = %e.message(), "move not finished")
                    }
                }
            });
        }
    }

    /// Moves volume `id` to `to` (`None`: where its recorded move goes,
    /// else the node with the most room that can take it), its snapshots
    /// on its node first, oldest first, to the same node, so that the
    /// layers they share stay shared there: each sends only what changed
    /// since the one before it, and the volume's copy starts from the
    /// newest of them (see `snapshots`). A call that joins or cancels a
    /// move that runs, or names another node than the one a recorded move
    /// goes to, and one for a volume without snapshots there, is
    /// [`Moves::move_volume`] alone. `snapshots` gets what moved and what
    /// stayed (also when the volume's move then fails). With `from`:
    /// NOT_FOUND if the volume left that node meanwhile.
    pub async fn carry(
        self: &Arc<Self>,
        id: &str,
        from: Option<&str>,
        to: Option<&str>,
        snapshots: &mut SnapshotsMoved,
    ) -> Result<MoveVolumeReply, Status> {
        if let Some(t) = self.carrying.lock().expect("carrying").get(id) {
            return Err(Status::unavailable(format!(
                "volume {id}: its snapshots are moving to node {t} ahead of it; retry to join \
                 or cancel its move once it copies"
            )));
        }
        // Decided without the lock first: only a move with snapshots to
        // take along waits for another one's.
        let rec = self.record(id).await?;
        left(&rec, from)?;
        if lost_volume(&self.cluster.nodes, &rec).is_some() {
            // Refused, or its rollback finished.
            return self.move_volume(id, to).await;
        }
        let Some((target, counted)) = self.carry_target(&rec, to) else {
            return self.move_volume(id, to).await;
        };
        // `place` counted it against the target, and the move checks the
        // target's room again: counted once.
        if counted {
            self.cluster.nodes.unplace(&target, rec.capacity_bytes);
        }
        if self.snapshots_on(&rec.node, Some(id)).await?.is_empty() {
            return self.move_volume(id, Some(&target)).await;
        }
        // Again under the lock: another drain may have made a node
        // draining meanwhile, or another move moved the volume.
        let one = self.snapshot_moves.lock().await;
        let rec = self.record(id).await?;
        left(&rec, from)?;
        let Some((target, counted)) = self.carry_target(&rec, to) else {
            drop(one);
            return self.move_volume(id, to).await;
        };
        let mark = Carrying::new(self, id, &target);
        // Room kept for the volume while its snapshots go.
        let last = self
            .move_snapshots_of(id, &rec.node, &target, snapshots)
            .await;
        if counted {
            self.cluster.nodes.unplace(&target, rec.capacity_bytes);
        }
        // That base stays on both nodes while the volume moves: a delete,
        // or the leader's resume, waits for it.
        let base = last.as_ref().and_then(|l| self.claim_snapshot(l).ok());
        drop(one);
        // Marked until the move is running: a call meanwhile is told to
        // retry, then joins or cancels it.
        let moved = self.start_marked(id, &target, mark).await;
        drop(base);
        if let Some(last) = last {
            self.finish_logged(&last).await;
        }
        moved
    }

    /// [`Moves::move_volume`] of `id` to `to`, its [`Carrying`] mark let go
    /// once the move runs (no await between).
    async fn start_marked(
        self: &Arc<Self>,
        id: &str,
        to: &str,
        mark: Carrying,
    ) -> Result<MoveVolumeReply, Status> {
        let rx = self.launch(id, Some(to), false, false);
        drop(mark);
        arrived(self.outcome(rx).await?, to)
    }

    /// Where [`Moves::carry`] takes volume `rec` and its snapshots, if it
    /// takes its snapshots along (and whether that node was counted for
    /// it, as [`Nodes::place`] does): not for a move that runs (joined or
    /// cancelled), one past its copy, one that goes elsewhere than `to`,
    /// nor when `rec` cannot move there (the move says why).
    fn carry_target(&self, rec: &VolumeRecord, to: Option<&str>) -> Option<(String, bool)> {
        if self
            .running
            .lock()
            .expect("moves")
            .contains_key(&rec.volume_id)
        {
            return None;
        }
        match &rec.moving {
            // Not switched yet, so its snapshots are where it is.
            Some(m)
                if m.phase == MovePhase::Copying
                    && m.from == rec.node
                    && to.is_none_or(|t| t == m.to) =>
            {
                Some((m.to.clone(), false))
            }
            Some(_) => None,
            None if to == Some(rec.node.as_str()) => None,
            None => Some((self.target_for(rec, to).ok()?, to.is_none())),
        }
    }

    /// Drains `node`: no new volume is placed on it from now on, and
    /// every volume of it that can move goes, one at a time, each to the
    /// ready node with the most room, then its snapshots (see
    /// `snapshots`); the moves, and what stays with why.
    pub async fn drain(self: &Arc<Self>, node: &str) -> Result<Drained, Status> {
        self.cluster.nodes.set_draining(node, true).await?;
        // Moves into the node that began before it drained: each is
        // cancelled (rolled back before its switch), or, a sealed live move,
        // switches; one that lands here is listed below and moved away again.
        let key = node.to_string();
        let incoming = self
            .store(move |r| {
                Ok(r.volumes()?
                    .into_iter()
                    .filter_map(|v| {
                        let m = v.moving.as_ref()?;
                        (m.to == key && m.phase == MovePhase::Copying)
                            .then(|| (v.volume_id.clone(), m.from.clone()))
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
        let mut stayed = Vec::new();
        for (id, from) in incoming {
            if let Some(t) = self.carrying.lock().expect("carrying").get(&id) {
                let why = format!(
                    "moving to node {node}: its snapshots go to node {t} ahead of it; drain again"
                );
                stayed.push((id, why));
                continue;
            }
            let ended = match self.move_volume(&id, Some(&from)).await {
                Ok(_) => Ok(()),
                Err(_) => self.finish(&id).await.map(drop),
            };
            // Still recorded as moving here: it stays (the drain says so).
            if let Err(e) = ended
                && let Ok(r) = self.record(&id).await
                && r.moving.as_ref().is_some_and(|m| m.to == node)
            {
                stayed.push((id, format!("moving to node {node}: {}", e.message())));
            }
        }
        let key = node.to_string();
        let volumes = self
            .store(move |r| {
                Ok(r.volumes()?
                    .into_iter()
                    .filter(|v| v.node == key)
                    .collect::<Vec<_>>())
            })
            .await?;
        let mut moved = Vec::new();
        let mut snapshots = SnapshotsMoved::default();
        for rec in volumes {
            let id = rec.volume_id;
            let e = match self.carry(&id, Some(node), None, &mut snapshots).await {
                // An earlier move into the node, finished now.
                Ok(r) if r.to_node == node => Status::unavailable(format!(
                    "an earlier move brought it to node {node}; drain again"
                )),
                Ok(r) => {
                    moved.push(r);
                    continue;
                }
                Err(e) => e,
            };
            // Deleted, or gone from the node meanwhile: not the drain's.
            if e.code() == Code::NotFound {
                match self.record(&id).await {
                    Err(gone) if gone.code() == Code::NotFound => continue,
                    Ok(r) if r.node != node && r.moving.is_none() => continue,
                    _ => {}
                }
            }
            stayed.push((id, e.message().to_string()));
        }
        // Those of volumes that stay, or are gone.
        self.drain_snapshots(node, &mut snapshots).await;
        Ok(Drained {
            moved,
            stayed,
            snapshots,
        })
    }

    /// `dataLocality: best-effort`: every volume of that StorageClass that
    /// a node other than its owner has had published for `after` (seen at
    /// each call, as the owners' agents report it) moves there live, if
    /// that node is ready, not draining and has room. `seen` keeps when
    /// each was first seen so between calls. Called every few seconds by
    /// the leader.
    pub async fn follow_pods(
        self: &Arc<Self>,
        after: Duration,
        seen: &mut HashMap<String, (String, Instant)>,
    ) {
        let volumes = match self.store(|r| r.volumes()).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e.message(), "reading volume records for dataLocality");
                return;
            }
        };
        let wanted: Vec<VolumeRecord> = volumes
            .into_iter()
            .filter(|r| {
                r.anywhere
                    && r.state == RecordState::Ready
                    && r.moving.is_none()
                    && r.lost_with.is_none()
                    && r.parameters.get("dataLocality").map(String::as_str) == Some("best-effort")
            })
            .collect();
        let mut owners: HashMap<String, HashMap<String, String>> = HashMap::new();
        let mut still = HashMap::new();
        for rec in wanted {
            if !owners.contains_key(&rec.node) {
                let published = match self.cluster.nodes.agent(&rec.node) {
                    Ok(a) => a
                        .list_volumes(Request::new(agent::ListVolumesRequest {}))
                        .await
                        .map(|r| {
                            r.into_inner()
                                .volumes
                                .into_iter()
                                .map(|v| (v.volume_id, v.published_to))
                                .collect()
                        })
                        .unwrap_or_default(),
                    Err(_) => HashMap::new(),
                };
                owners.insert(rec.node.clone(), published);
            }
            let Some(user) = owners[&rec.node].get(&rec.volume_id) else {
                continue;
            };
            if user.is_empty() || *user == rec.node {
                continue;
            }
            let since = match seen.get(&rec.volume_id) {
                Some((n, t)) if n == user => *t,
                _ => Instant::now(),
            };
            still.insert(rec.volume_id.clone(), (user.clone(), since));
            if since.elapsed() < after || self.target_for(&rec, Some(user)).is_err() {
                continue;
            }
            let draining = self
                .cluster
                .nodes
                .list()
                .map(|l| l.iter().any(|n| n.node_id == *user && n.draining))
                .unwrap_or(true);
            if draining {
                continue;
            }
            let (moves, id, from, to) = (
                Arc::clone(self),
                rec.volume_id.clone(),
                rec.node.clone(),
                user.clone(),
            );
            // Its snapshots go with it; marked until it is done, since
            // its record shows no move while they go.
            if !self.following.lock().expect("following").insert(id.clone()) {
                continue;
            }
            tracing::info!(volume = %rec.volume_id, from = %rec.node, to = %user, "dataLocality: the volume moves to the node that uses it");
            let mark = Following {
                moves: Arc::clone(self),
                id: id.clone(),
            };
            tokio::spawn(async move {
                let _mark = mark;
                let mut snapshots = SnapshotsMoved::default();
                if let Err(e) = moves
                    .carry(&id, Some(&from), Some(&to), &mut snapshots)
                    .await
                {
                    tracing::warn!(volume = %id, %to, error = %e.message(), "dataLocality: the volume stays");
                }
                for (snapshot, why) in snapshots.stayed {
                    tracing::warn!(volume = %id, %snapshot, %why, "dataLocality: a snapshot of the volume stays");
                }
            });
            still.remove(&rec.volume_id);
        }
        *seen = still;
    }

    /// `strata node forget`: forgets `node`, a node that is gone for good
    /// (not ready), once no volume or snapshot is there and none fetches
    /// from it (FAILED_PRECONDITION names them). With `abandon`, the
    /// volumes and snapshots there, and the volumes still fetching from
    /// it, are lost (their records stay until they are
    /// deleted, see [`lost_volume`] and the CSI controller; each lost
    /// volume's claim gets a `VolumeLost` Event), but a snapshot whose
    /// move there switched stays where it came from if it is still there
    /// (`finish_snapshot`). The moves that still had a copy
    /// to remove there, or waited for it to roll back, then finish
    /// without it, and one still copying out of it or into it rolls back
    /// (the leader's resume goes on at once; a live move into it whose
    /// source sealed its copy too, since it never switched: see `abort`);
    /// what stays on the node is garbage to it.
    pub async fn forget(
        self: &Arc<Self>,
        node: &str,
        abandon: bool,
    ) -> Result<ForgetNodeReply, Status> {
        self.cluster.nodes.forgettable(node)?;
        let key = node.to_string();
        let (volumes, fetching, into, snapshots, kept) = self
            .store(move |r| {
                let (mut volumes, mut fetching, mut into) = (Vec::new(), Vec::new(), Vec::new());
                for v in r.volumes()? {
                    // A switch-first move still fetches from its source.
                    let moving = v.moving.as_ref();
                    if v.node == key {
                        volumes.push(v);
                    } else if moving
                        .is_some_and(|m| m.from == key && m.phase == MovePhase::Fetching)
                    {
                        fetching.push(v);
                    } else if moving.is_some_and(|m| m.to == key && m.phase == MovePhase::Copying) {
                        into.push(v);
                    }
                }
                // A snapshot whose move into it switched already is still
                // held by its source, unless its removal there began.
                let (kept, snapshots): (Vec<_>, Vec<_>) = r
                    .snapshots()?
                    .into_iter()
                    .filter(|s| s.node == key)
                    .partition(|s| {
                        s.moving
                            .as_ref()
                            .is_some_and(|m| m.phase == MovePhase::Removing && m.from != key)
                    });
                let ids = |s: Vec<super::records::SnapshotRecord>| {
                    s.into_iter().map(|s| s.snapshot_id).collect::<Vec<_>>()
                };
                Ok((volumes, fetching, into, ids(snapshots), ids(kept)))
            })
            .await?;
        let list = |what: &str, ids: &[String]| {
            let more = ids.len().saturating_sub(5);
            let shown = ids.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
            match more {
                0 => format!("{} {what} ({shown})", ids.len()),
                _ => format!("{} {what} ({shown} and {more} more)", ids.len()),
            }
        };
        let ids =
            |recs: &[VolumeRecord]| recs.iter().map(|v| v.volume_id.clone()).collect::<Vec<_>>();
        let (lost, holed) = (ids(&volumes), ids(&fetching));
        let mut why = Vec::new();
        let all_snapshots: Vec<String> = snapshots.iter().chain(&kept).cloned().collect();
        let held: Vec<String> = [("volumes", &lost), ("snapshots", &all_snapshots)]
            .into_iter()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(what, ids)| list(what, ids))
            .collect();
        if !abandon && !held.is_empty() {
            why.push(format!(
                "it still holds {}: move them (strata node drain {node}) or delete them first, \
                 or give their data up (--abandon-data)",
                held.join(" and ")
            ));
        }
        if !abandon && !holed.is_empty() {
            why.push(format!(
                "{} still fetch from it: they need the node back, or their blocks not fetched \
                 yet given up (--abandon-data)",
                list("volumes", &holed)
            ));
        }
        if !why.is_empty() {
            return Err(Status::failed_precondition(format!(
                "node {node} cannot be forgotten: {}",
                why.join("; ")
            )));
        }
        let gone = self.cluster.nodes.confirm_gone(node).await?;
        // Moves into it that did not switch roll back, recorded before it
        // is forgotten, so none of them switches to it from here on (a
        // live one's source may have sealed its copy: `abort` undoes that).
        let mut recorded = Vec::new();
        for mut rec in into {
            let m = rec.moving.clone().expect("moving");
            let why = format!("its target node {node} is forgotten");
            if let Err(e) = self.rolling_back(&mut rec, &m, &why).await {
                return Err(Status::unavailable(format!(
                    "node {node} was not forgotten: the move of volume {} into it: {}; try \
                     again (the moves into it of {} roll back already)",
                    rec.volume_id,
                    e.message(),
                    if recorded.is_empty() {
                        "no volume".to_string()
                    } else {
                        list("volumes", &recorded)
                    }
                )));
            }
            recorded.push(rec.volume_id);
        }
        // Lost for good, also if a node of that name registers again.
        for id in lost.iter().chain(&holed) {
            let (id, with) = (id.clone(), node.to_string());
            self.store(move |r| {
                r.update_volume(&id, &mut |v| {
                    v.lost_with.get_or_insert_with(|| with.clone());
                    true
                })
                .map(drop)
            })
            .await?;
        }
        self.mark_lost(&snapshots, node).await?;
        self.cluster.nodes.forget(&gone).await?;
        // Snapshots in a move with it: settled now (a move into it that
        // switched stays where it came from, one out of it whose copy is
        // complete where it went), so the reply says what became of them.
        for id in &kept {
            if let Err(e) = self.finish_snapshot(id).await {
                tracing::warn!(snapshot = %id, error = %e.message(), "a snapshot moved to a forgotten node; the leader tries again");
            }
        }
        for id in &snapshots {
            if let Err(e) = self.roll_back_snapshot(id).await {
                tracing::warn!(snapshot = %id, error = %e.message(), "a snapshot moving out of a forgotten node; the leader tries again");
            }
        }
        let (mut lost_snapshots, mut kept_snapshots) = (Vec::new(), Vec::new());
        for id in snapshots.into_iter().chain(kept) {
            let key = id.clone();
            match self.store(move |r| r.snapshot(&key)).await? {
                Some(s) if s.lost_with.is_none() && s.node != node => kept_snapshots.push(id),
                Some(_) => lost_snapshots.push(id),
                None => {}
            }
        }
        tracing::warn!(
            node,
            lost_volumes = ?lost,
            lost_snapshots = ?lost_snapshots,
            holed_volumes = ?holed,
            kept_snapshots = ?kept_snapshots,
            "node forgotten: what is left on it is garbage to the controller"
        );
        for v in &volumes {
            self.tell(
                v,
                EventKind::Warning,
                "VolumeLost",
                format!(
                    "node {node} was forgotten with the data of volume {}: it is lost; delete it",
                    v.volume_id
                ),
            );
        }
        for v in &fetching {
            self.tell(
                v,
                EventKind::Warning,
                "VolumeLost",
                format!(
                    "node {node} was forgotten while volume {} still fetched from it: it is \
                     lost; delete it",
                    v.volume_id
                ),
            );
        }
        self.resume().await;
        Ok(ForgetNodeReply {
            lost_volumes: lost,
            lost_snapshots,
            holed_volumes: holed,
            kept_snapshots,
        })
    }

    /// Ends the drain of `node`: new volumes may be placed on it again.
    pub async fn undrain(&self, node: &str) -> Result<(), Status> {
        self.cluster.nodes.set_draining(node, false).await
    }

    async fn run(
        &self,
        id: &str,
        to: Option<&str>,
        lazy: bool,
        finish_only: bool,
    ) -> Result<MoveVolumeReply, Status> {
        let start = Instant::now();
        let mut rec = self.record(id).await?;
        if let Some(e) = lost_volume(&self.cluster.nodes, &rec)
            && !rolls_back(&rec)
        {
            return Err(e);
        }
        let mut copied = 0;
        let stay = |node: &str| MoveVolumeReply {
            volume_id: id.to_string(),
            from_node: node.to_string(),
            to_node: node.to_string(),
            ..Default::default()
        };
        match (&rec.moving, to) {
            (None, Some(t)) if t == rec.node => return Ok(stay(&rec.node)),
            // Its move ended meanwhile (finished, cancelled, rolled back).
            (None, _) if finish_only => return Ok(stay(&rec.node)),
            (None, _) => {
                let to = self.target_for(&rec, to)?;
                let m = Move {
                    from: rec.node.clone(),
                    to,
                    lazy,
                    live: false,
                    published_to: String::new(),
                    read_only: false,
                    sealed_boot: String::new(),
                    phase: MovePhase::Copying,
                    message: "attaching the source for the copy".into(),
                    started_unix_ns: now_ns(),
                };
                let from = rec.node.clone();
                self.update_move(&mut rec, None, move |current| {
                    // Not if the volume moved meanwhile.
                    let here = current.node == from;
                    if here {
                        current.moving = Some(m.clone());
                    }
                    here
                })
                .await?;
                let m = rec.moving.as_ref().expect("moving");
                self.tell(
                    &rec,
                    EventKind::Normal,
                    "Moving",
                    format!(
                        "volume {id} is moving from node {} to node {}; its record shows how \
                         far (kubectl get svol {id})",
                        m.from, m.to
                    ),
                );
                failpoint(FAILPOINTS[0]);
            }
            // Moved back to where it is before the switch: a cancel.
            (Some(m), Some(t))
                if t == m.from && matches!(m.phase, MovePhase::Copying | MovePhase::Aborting) =>
            {
                let from = m.from.clone();
                if m.live && m.phase == MovePhase::Copying && self.sealed_live(&rec, m).await? {
                    return Err(Status::failed_precondition(format!(
                        "volume {id} is switching to node {} (its copy there is complete); move \
                         it back once that is done",
                        m.to
                    )));
                }
                if m.phase == MovePhase::Copying {
                    let message = format!(
                        "the move of volume {id} to node {} was cancelled; it stays on node \
                         {from}",
                        m.to
                    );
                    self.set_phase(&mut rec, MovePhase::Aborting, "cancelled")
                        .await?;
                    self.tell(&rec, EventKind::Normal, "MoveCancelled", message);
                }
                self.abort(&mut rec).await?;
                return Ok(stay(&from));
            }
            // Past the switch: a move back waits for this one.
            (Some(m), Some(t)) if t == m.from => {
                return Err(Status::aborted(format!(
                    "volume {id} switched to node {} already ({}); move it back once that is \
                     done",
                    m.to, m.message
                )));
            }
            (Some(m), Some(t)) if t != m.to => {
                return Err(Status::aborted(format!(
                    "volume {id} is moving from node {} to node {} ({}); to cancel, move it \
                     to node {}",
                    m.from, m.to, m.message, m.from
                )));
            }
            (Some(m), _) if m.phase == MovePhase::Unknown => {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is in a move phase this controller does not know (written by \
                     a newer one?): {}",
                    m.message
                )));
            }
            (Some(_), _) => {}
        }
        // Out of a node lost for good: rolled back, never finished (also
        // if a node of that name answers again).
        if let Some(m) = rec.moving.clone()
            && rec.lost_with.is_some()
            && m.phase == MovePhase::Copying
        {
            let why = format!("node {} was forgotten with its data", m.from);
            self.rolling_back(&mut rec, &m, &why).await?;
        }
        let mut m = rec.moving.clone().expect("moving");
        if m.phase == MovePhase::Copying {
            match self.copy(&mut rec, &m).await {
                Ok(n) => {
                    copied = n;
                    // The copy found out whether the volume is in use.
                    m = rec.moving.clone().expect("moving");
                }
                // Refused before the switch (or its target forgotten):
                // nothing was written to the target's copy, so the
                // source's is the volume again. Its source forgotten
                // (with its data): the target's partial copy goes.
                Err(e)
                    if refused(&e)
                        || self.cluster.nodes.forgotten(&m.to)
                        || self.cluster.nodes.forgotten(&m.from) =>
                {
                    self.rolling_back(&mut rec, &m, e.message()).await?;
                    self.abort(&mut rec).await?;
                    return Err(Status::failed_precondition(format!(
                        "the move of volume {id} to node {} was rolled back: {}",
                        m.to,
                        e.message()
                    )));
                }
                Err(e) => {
                    self.note(&mut rec, &format!("waiting: {}", e.message()))
                        .await;
                    return Err(waiting(e));
                }
            }
            failpoint(FAILPOINTS[3]);
            // Forgotten while it copied, or draining since (a drain that
            // began after this move was checked against it lists only the
            // node's volumes): never switched to. A sealed live move
            // switches; the drain waits for it, then moves it away.
            let gone = if self.cluster.nodes.forgotten(&m.to) {
                Some("was forgotten")
            } else if !m.live && self.cluster.nodes.draining(&m.to) {
                Some("is draining")
            } else {
                None
            };
            if let Some(gone) = gone {
                let why = format!("its target {gone}");
                self.rolling_back(&mut rec, &m, &why).await?;
                self.abort(&mut rec).await?;
                return Err(Status::failed_precondition(format!(
                    "the move of volume {id} to node {} was rolled back: that node {gone}",
                    m.to
                )));
            }
            // The switch: from here the target owns the volume. Only from
            // `copying` (a rollback recorded meanwhile wins).
            if rec.moving.as_ref().map(|m| m.phase) != Some(MovePhase::Copying) {
                return Err(Status::aborted(format!(
                    "the move of volume {id} to node {} is rolled back meanwhile",
                    m.to
                )));
            }
            rec.node = m.to.clone();
            if m.lazy {
                self.set_phase(&mut rec, MovePhase::Fetching, "fetching")
                    .await?;
            } else if rec.moving.as_ref().is_some_and(|m| m.live) {
                self.set_phase(&mut rec, MovePhase::Following, "re-pointing the attachment")
                    .await?;
            } else {
                self.set_phase(&mut rec, MovePhase::Removing, "removing the source's copy")
                    .await?;
            }
            failpoint(FAILPOINTS[4]);
        }
        if rec.moving.as_ref().map(|m| m.phase) == Some(MovePhase::Fetching) {
            copied = self.fetch(&mut rec, &m).await?;
            self.set_phase(&mut rec, MovePhase::Removing, "removing the source's copy")
                .await?;
        }
        if rec.moving.as_ref().map(|m| m.phase) == Some(MovePhase::Following) {
            let live = rec.moving.clone().expect("moving");
            if let Err(e) = self.follow(&rec, &live).await {
                self.note(
                    &mut rec,
                    &format!("re-pointing the attachment, waiting: {}", e.message()),
                )
                .await;
                return Err(waiting(e));
            }
            self.set_phase(&mut rec, MovePhase::Removing, "removing the source's copy")
                .await?;
        }
        match rec.moving.as_ref().map(|m| m.phase) {
            Some(MovePhase::Removing) => {
                let nodes = &self.cluster.nodes;
                let removed = match nodes.agent(&m.from) {
                    Ok(source) => source
                        .delete_volume(Request::new(agent::DeleteVolumeRequest {
                            volume_id: id.to_string(),
                        }))
                        .await
                        .map(drop),
                    // Forgotten: its old copy stays there as garbage.
                    Err(_) if nodes.forgotten(&m.from) => Ok(()),
                    Err(e) => Err(e),
                };
                removed.inspect_err(|e| {
                    tracing::warn!(volume = id, node = %m.from, error = %e.message(), "removing a moved volume's old copy")
                })?;
                self.update_move(&mut rec, Some(MovePhase::Removing), |current| {
                    current.moving = None;
                    true
                })
                .await?;
            }
            Some(MovePhase::Aborting) => {
                self.abort(&mut rec).await?;
                return Err(Status::failed_precondition(format!(
                    "the move of volume {id} to node {} was rolled back",
                    m.to
                )));
            }
            _ => {}
        }
        tracing::info!(volume = id, from = %m.from, to = %m.to, copied, "volume moved");
        self.metrics.volume_moved(kind(&m), true, copied);
        let how = if m.live {
            ", while in use (its writes paused for the switch)"
        } else {
            ""
        };
        // A move another controller began and this one finished knows
        // only what it copied itself.
        let bytes = if copied > 0 {
            format!(": {copied} bytes copied")
        } else {
            String::new()
        };
        self.tell(
            &rec,
            EventKind::Normal,
            "Moved",
            format!(
                "volume {id} moved from node {} to node {}{how}{bytes}",
                m.from, m.to
            ),
        );
        Ok(MoveVolumeReply {
            volume_id: id.to_string(),
            from_node: m.from,
            to_node: m.to,
            copied_bytes: copied,
            seconds: start.elapsed().as_secs_f64(),
            ..Default::default()
        })
    }

    /// Where a new move of `rec` goes: `to`, if it is a ready node with
    /// room, or the ready node with the most room.
    fn target_for(&self, rec: &VolumeRecord, to: Option<&str>) -> Result<String, Status> {
        let id = &rec.volume_id;
        if rec.state != RecordState::Ready {
            return Err(Status::failed_precondition(format!(
                "volume {id} is still being created"
            )));
        }
        if !rec.anywhere {
            return Err(Status::failed_precondition(format!(
                "volume {id} is pinned to node {} (StorageClass locality: node, or made before \
                 volumes could be attached remotely): its PersistentVolume names that node, so \
                 it cannot move",
                rec.node
            )));
        }
        let nodes = &self.cluster.nodes;
        let Some(t) = to else {
            return nodes.place(rec.capacity_bytes, |n| n != rec.node, &[]);
        };
        let n = nodes
            .list()?
            .into_iter()
            .find(|n| n.node_id == t)
            .ok_or_else(|| Status::not_found(format!("node {t:?} is not known")))?;
        let why = if n.state != NodeState::Ready {
            format!("is not ready ({})", n.message)
        } else if n.draining {
            "is draining".to_string()
        } else if n.max_volumes != 0 && n.volumes >= n.max_volumes {
            format!("has {} volumes, its maximum", n.volumes)
        } else if nodes.room(&n) < rec.capacity_bytes {
            format!(
                "has {} bytes of room; the volume needs {}",
                nodes.room(&n),
                rec.capacity_bytes
            )
        } else {
            return Ok(t.to_string());
        };
        Err(Status::failed_precondition(format!(
            "volume {id} cannot move to node {t}: it {why}"
        )))
    }

    /// Polls the target's copy until it is done; the bytes copied.
    ///
    /// A base and its ranges go with the first call only: a later one
    /// that starts the copy anew (the first one failed, and its answer
    /// was lost) must copy everything, since the ranges were computed
    /// before writes that a live move's failed copy already took from the
    /// source's change record.
    async fn until_copied(
        &self,
        rec: &mut VolumeRecord,
        target: &dyn Agent,
        import: &mut agent::ImportRequest,
        poll: Duration,
    ) -> Result<u64, Status> {
        let mut told = Instant::now();
        loop {
            let ask = import.clone();
            import.base_snapshot_id.clear();
            import.ranges.clear();
            let r = target.import(Request::new(ask)).await?.into_inner();
            if r.done {
                return Ok(r.copied_bytes);
            }
            // Its target began draining: rolled back, as at the switch (a
            // drain's cancel ends here too, and says why).
            if let Some(m) = &rec.moving
                && !m.live
                && self.cluster.nodes.draining(&m.to)
            {
                return Err(Status::failed_precondition(format!(
                    "node {} is draining",
                    m.to
                )));
            }
            if self
                .cancelled
                .lock()
                .expect("moves")
                .contains(&rec.volume_id)
            {
                return Err(Status::failed_precondition("the move was cancelled"));
            }
            // A party forgotten meanwhile (`strata node forget`) never
            // finishes it.
            if let Some(m) = &rec.moving
                && let Some(gone) = [&m.from, &m.to]
                    .into_iter()
                    .find(|n| self.cluster.nodes.forgotten(n))
            {
                return Err(super::nodes::lost(gone));
            }
            if told.elapsed() >= PROGRESS_EVERY {
                told = Instant::now();
                self.note(rec, &format!("copied {} MiB", r.copied_bytes >> 20))
                    .await;
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Switch first, after the switch: waits for the target's fetch (which
    /// a restarted target resumes on its own), retrying while a node is
    /// away; the bytes fetched. Stops when the volume is deleted.
    async fn fetch(&self, rec: &mut VolumeRecord, m: &Move) -> Result<u64, Status> {
        let mut pause = Duration::from_secs(1);
        loop {
            // Where the source is now, so the target follows it (its
            // node's address may have changed); empty while it is away.
            let (address, grant) = self
                .source_grant(&rec.volume_id, m)
                .await
                .unwrap_or_default();
            let mut request = agent::ImportRequest {
                volume: Some(agent::CreateVolumeRequest {
                    volume_id: rec.volume_id.clone(),
                    size_bytes: rec.capacity_bytes,
                    ..Default::default()
                }),
                owner: m.from.clone(),
                address,
                grant,
                lazy: true,
                resume: true,
                rate_bytes_per_second: self.rate,
                ..Default::default()
            };
            let polled = match self.cluster.nodes.agent(&m.to) {
                Ok(target) => self.until_copied(rec, &*target, &mut request, POLL).await,
                Err(e) => Err(e),
            };
            match polled {
                Ok(n) => return Ok(n),
                Err(e) => {
                    // Deleted meanwhile, or lost with a forgotten node:
                    // nothing left to wait for.
                    if let Some(lost) =
                        lost_volume(&self.cluster.nodes, &self.record(&rec.volume_id).await?)
                    {
                        return Err(lost);
                    }
                    self.note(rec, &format!("fetching, waiting: {}", e.message()))
                        .await;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Step 2: the source's attachment for the move (made, or the one it
    /// has: a sealed copy answers its epoch too); the source's data path
    /// address and the move's read-only grant.
    async fn source_grant(&self, id: &str, m: &Move) -> Result<(String, String), Status> {
        let nodes = &self.cluster.nodes;
        let epoch = nodes
            .agent(&m.from)?
            .attach(Request::new(agent::AttachRequest {
                volume_id: id.to_string(),
                node_id: m.to.clone(),
                read_only: true,
                for_move: true,
                ..Default::default()
            }))
            .await?
            .into_inner()
            .epoch;
        let (address, tls) = nodes.peer(&m.from)?.ok_or_else(|| {
            Status::failed_precondition("a standalone Strata has one node: nothing to move to")
        })?;
        let grant = grant::issue(tls, id, &m.to, epoch, true).map_err(crate::rpc::status::grant)?;
        Ok((address, grant))
    }

    /// Steps 2 to 4; the bytes copied.
    async fn copy(&self, rec: &mut VolumeRecord, m: &Move) -> Result<u64, Status> {
        let id = rec.volume_id.clone();
        let nodes = &self.cluster.nodes;
        let source = nodes.agent(&m.from)?;
        let target = nodes.agent(&m.to)?;
        if !m.lazy && (m.live || self.in_use(rec, m).await?) {
            return self.copy_live(rec).await;
        }
        let (address, grant) = self.source_grant(&rec.volume_id, m).await?;
        let epoch = grant::decode(&id, &grant).map_or(0, |g| g.epoch);
        failpoint(FAILPOINTS[1]);
        // A drain moved its snapshots there first: only what changed since
        // the newest of them is copied (the source's copy does not change
        // from here on).
        let (base, ranges) = if m.lazy {
            Default::default()
        } else {
            self.delta(&id, None, m, source.as_ref(), Delta::Volume(&id))
                .await?
        };
        // Checked when the volume was created.
        let max_chain_depth = rec
            .parameters
            .get("maxChainDepth")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let import = agent::ImportRequest {
            volume: Some(agent::CreateVolumeRequest {
                volume_id: id.clone(),
                size_bytes: rec.capacity_bytes,
                source: None,
                max_chain_depth,
                flatten: false,
                limits: limits_of(source.as_ref(), &id).await?,
            }),
            owner: m.from.clone(),
            address,
            grant,
            rate_bytes_per_second: self.rate,
            lazy: m.lazy,
            base_snapshot_id: base,
            ranges,
            ..Default::default()
        };
        let copied = if m.lazy {
            // Made there, reading from here: the copy goes on after the
            // switch.
            let made = target.import(Request::new(import)).await?.into_inner();
            if !made.fetching {
                return Err(Status::failed_precondition(format!(
                    "node {}'s agent cannot fetch a volume behind a switch (an older version?)",
                    m.to
                )));
            }
            if self.cancelled.lock().expect("moves").contains(&id) {
                return Err(Status::failed_precondition("the move was cancelled"));
            }
            0
        } else {
            let mut import = import;
            self.until_copied(rec, &*target, &mut import, POLL).await?
        };
        failpoint(FAILPOINTS[2]);
        source
            .seal(Request::new(agent::SealRequest {
                volume_id: id,
                node_id: m.to.clone(),
                epoch,
            }))
            .await?;
        Ok(copied)
    }

    /// Whether the volume is published (a live move, recorded so in the
    /// move before anything is copied), or not (a copy-first move).
    async fn in_use(&self, rec: &mut VolumeRecord, m: &Move) -> Result<bool, Status> {
        let source = self.cluster.nodes.agent(&m.from)?;
        let tracked = source
            .track(Request::new(agent::TrackRequest {
                volume_id: rec.volume_id.clone(),
                node_id: m.to.clone(),
                peek: false,
            }))
            .await;
        let t = match tracked {
            Ok(t) => t.into_inner(),
            // An agent without live moves.
            Err(e) if e.code() == Code::Unimplemented => return Ok(false),
            Err(e) => return Err(e),
        };
        if t.copy_first {
            return Ok(false);
        }
        if t.published_to.is_empty() && !t.sealed {
            // Unused: copied first (the live move's record ends).
            source
                .detach(Request::new(agent::AttachRequest {
                    volume_id: rec.volume_id.clone(),
                    node_id: m.to.clone(),
                    for_move: true,
                    ..Default::default()
                }))
                .await?;
            return Ok(false);
        }
        let (published_to, read_only) = (t.published_to, t.read_only);
        self.update_move(rec, Some(MovePhase::Copying), move |current| {
            if let Some(m) = current.moving.as_mut() {
                m.live = true;
                m.published_to.clone_from(&published_to);
                m.read_only = read_only;
                m.message = "copying while in use".into();
            }
            true
        })
        .await?;
        Ok(true)
    }

    /// ControllerPublishVolume to `node` while a live move copies the
    /// volume and no node uses it (its user was unpublished, or this is a
    /// retry): the move records that `node` uses it (its attachment
    /// follows the volume after the switch, as the first user's would),
    /// and the publish goes to the source. Whether it was so (`None`: the
    /// publish waits for the move, as before), and whether this call
    /// recorded it (`false`: a retry found it recorded).
    pub async fn publishing(
        &self,
        id: &str,
        node: &str,
        read_only: bool,
    ) -> Result<Option<bool>, Status> {
        let mut rec = self.record(id).await?;
        let node = node.to_string();
        let open = move |m: &Move, node: &str| {
            m.phase == MovePhase::Copying
                && m.live
                && (m.published_to.is_empty()
                    || (m.published_to == node && m.read_only == read_only))
        };
        match rec.moving.as_ref() {
            Some(m) if open(m, &node) && m.published_to == node => return Ok(Some(false)),
            Some(m) if open(m, &node) => {}
            _ => return Ok(None),
        }
        let written = self
            .update_move(
                &mut rec,
                Some(MovePhase::Copying),
                move |current| match current.moving.as_mut() {
                    Some(m) if open(m, &node) => {
                        m.published_to.clone_from(&node);
                        m.read_only = read_only;
                        true
                    }
                    _ => false,
                },
            )
            .await;
        // Changed meanwhile (switched, or another node published): the
        // publish waits.
        Ok(written.is_ok().then_some(true))
    }

    /// ControllerUnpublishVolume of `node` while a live move copies the
    /// volume or re-points its attachment: there is nothing to follow for
    /// it any more (the record says so; the move reads it before
    /// following), and the move goes on as one of an unused volume (the
    /// source's seal does not need the attachment). Whether it was so.
    pub async fn unpublished(&self, id: &str, node: &str) -> Result<bool, Status> {
        let mut rec = self.record(id).await?;
        match rec.moving.as_ref() {
            // Not (or no longer) the node that uses it: nothing to follow
            // for it (an earlier try cleared it, and its detach failed; or
            // another node was published since).
            Some(m)
                if matches!(m.phase, MovePhase::Copying | MovePhase::Following)
                    && m.live
                    && m.published_to != node
                    && !node.is_empty() =>
            {
                Ok(true)
            }
            // ("": from every node.)
            Some(m)
                if matches!(
                    m.phase,
                    MovePhase::Copying | MovePhase::Following | MovePhase::Aborting
                ) && m.live
                    && (m.published_to == node || node.is_empty()) =>
            {
                let phase = m.phase;
                self.update_move(&mut rec, Some(phase), |current| {
                    if let Some(m) = current.moving.as_mut() {
                        m.published_to.clear();
                    }
                    true
                })
                .await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether the source sealed its copy for a live move (the switch
    /// must go on).
    async fn sealed_live(&self, rec: &VolumeRecord, m: &Move) -> Result<bool, Status> {
        Ok(self.peek(&rec.volume_id, m).await.map_err(waiting)?.sealed)
    }

    /// What the source of move `m` of volume `id` says of it (Track, with
    /// `peek`).
    async fn peek(&self, id: &str, m: &Move) -> Result<agent::TrackReply, Status> {
        let reply = self
            .cluster
            .nodes
            .agent(&m.from)?
            .track(Request::new(agent::TrackRequest {
                volume_id: id.to_string(),
                node_id: m.to.clone(),
                peek: true,
            }))
            .await?;
        Ok(reply.into_inner())
    }

    /// Live, steps 2 to 4: the target copies the volume and then its
    /// changes in rounds while it serves; once a round is small, the
    /// source holds writes, the target copies the last delta, and the
    /// source seals its copy while the hold lasts. A hold that reaches
    /// its deadline first lets writes go on, and the rounds continue;
    /// after [`HOLD_TRIES`] such holds the move is refused (rolled back).
    async fn copy_live(&self, rec: &mut VolumeRecord) -> Result<u64, Status> {
        let m = rec.moving.clone().expect("moving");
        let id = rec.volume_id.clone();
        let nodes = &self.cluster.nodes;
        let (source, target) = (nodes.agent(&m.from)?, nodes.agent(&m.to)?);
        let t = source
            .track(Request::new(agent::TrackRequest {
                volume_id: id.clone(),
                node_id: m.to.clone(),
                peek: false,
            }))
            .await?
            .into_inner();
        if t.sealed {
            if let Some(m) = rec.moving.as_mut() {
                m.sealed_boot = t.sealed_boot;
            }
            return Ok(0);
        }
        let (address, tls) = nodes.peer(&m.from)?.ok_or_else(|| {
            Status::failed_precondition("a standalone Strata has one node: nothing to move to")
        })?;
        let grant =
            grant::issue(tls, &id, &m.to, t.epoch, true).map_err(crate::rpc::status::grant)?;
        failpoint(FAILPOINTS[1]);
        // As a copy first does; what changes from here on is tracked.
        let (base, ranges) = self
            .delta(&id, None, &m, source.as_ref(), Delta::Volume(&id))
            .await?;
        let mut import = agent::ImportRequest {
            volume: Some(agent::CreateVolumeRequest {
                volume_id: id.clone(),
                size_bytes: rec.capacity_bytes,
                max_chain_depth: rec
                    .parameters
                    .get("maxChainDepth")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                limits: limits_of(source.as_ref(), &id).await?,
                ..Default::default()
            }),
            owner: m.from.clone(),
            address,
            grant,
            rate_bytes_per_second: self.rate,
            live: true,
            base_snapshot_id: base,
            ranges,
            ..Default::default()
        };
        for _ in 0..HOLD_TRIES {
            // Rounds that never get small (writes outrunning the copy):
            // the holds decide.
            let rounds = self.until_copied(rec, &*target, &mut import, POLL);
            if let Ok(r) = tokio::time::timeout(CONVERGE_WAIT, rounds).await {
                r?;
            }
            tracing::info!(volume = %id, from = %m.from, to = %m.to, "a live move's copy converged: holding writes for the last delta");
            let hold = now_ns();
            let held = source
                .hold(Request::new(agent::HoldRequest {
                    volume_id: id.clone(),
                    node_id: m.to.clone(),
                    epoch: t.epoch,
                    deadline_ms: HOLD_DEADLINE.as_millis() as u32,
                }))
                .await;
            match held {
                Ok(_) => {}
                // Writes in flight did not drain in time: try again.
                Err(e)
                    if e.code() == Code::FailedPrecondition && e.message().contains("deadline") =>
                {
                    self.note(rec, &format!("copying on: {}", e.message()))
                        .await;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let mut last = agent::ImportRequest {
                final_hold: hold,
                ..import.clone()
            };
            let copied = tokio::time::timeout(
                HOLD_DEADLINE,
                self.until_copied(rec, &*target, &mut last, HOLD_POLL),
            )
            .await;
            let copied = match copied {
                Ok(r) => r?,
                Err(_) => {
                    self.note(rec, "the last delta missed the hold's deadline: copying on")
                        .await;
                    continue;
                }
            };
            failpoint(FAILPOINTS[2]);
            let sealed = source
                .seal(Request::new(agent::SealRequest {
                    volume_id: id.clone(),
                    node_id: m.to.clone(),
                    epoch: t.epoch,
                }))
                .await;
            match sealed {
                Ok(r) => {
                    if let Some(m) = rec.moving.as_mut() {
                        m.sealed_boot = r.into_inner().boot;
                    }
                    return Ok(copied);
                }
                Err(e) if e.code() == Code::FailedPrecondition => {
                    self.note(rec, &format!("copying on: {}", e.message()))
                        .await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Status::failed_precondition(format!(
            "volume {id}'s last delta did not fit in a {} ms hold of its writes {HOLD_TRIES} \
             times: it is written faster than node {} copies",
            HOLD_DEADLINE.as_millis(),
            m.to
        )))
    }

    /// Live, after the switch: the node the volume is published to reaches
    /// it on the target from now on (an attachment made there, and the
    /// node told to follow).
    async fn follow(&self, rec: &VolumeRecord, m: &Move) -> Result<(), Status> {
        let id = &rec.volume_id;
        // Who uses it now: an unpublish meanwhile (a node gone, its
        // volumes force-detached) ends what there is to follow, a publish
        // during the copy begins it.
        let now = self.record(id).await?;
        let (x, read_only) = match now.moving.as_ref() {
            Some(n) if !n.published_to.is_empty() => (&n.published_to, n.read_only),
            _ => return Ok(()),
        };
        let epoch = self
            .cluster
            .nodes
            .agent(&m.to)?
            .attach(Request::new(agent::AttachRequest {
                volume_id: id.clone(),
                node_id: x.clone(),
                read_only,
                ..Default::default()
            }))
            .await?
            .into_inner()
            .epoch;
        // Unpublished between the read above and that attach: the
        // unpublish's Detach found nothing there yet, so it is detached
        // here (an unpublish from now on finds the attachment).
        let now = self.record(id).await?.moving.map(|n| n.published_to);
        if now.is_some_and(|now| now != *x) {
            self.cluster
                .nodes
                .agent(&m.to)?
                .detach(Request::new(agent::AttachRequest {
                    volume_id: id.clone(),
                    node_id: x.clone(),
                    ..Default::default()
                }))
                .await?;
            return Ok(());
        }
        // Not recorded (the switch was an older controller's): the source
        // keeps it with its seal until its copy is removed.
        let mut sealed_boot = m.sealed_boot.clone();
        if sealed_boot.is_empty()
            && let Ok(t) = self.peek(id, m).await
        {
            sealed_boot = t.sealed_boot;
        }
        self.point(id, x, (&m.to, epoch), (&m.from, &sealed_boot), read_only)
            .await
    }

    /// Tells node `x`, which uses volume `id`, to reach it on `owner`,
    /// attached to `x` there under `epoch` (away from `previous`, sealed
    /// under `sealed_boot`).
    async fn point(
        &self,
        id: &str,
        x: &str,
        (owner, epoch): (&str, u64),
        (previous, sealed_boot): (&str, &str),
        read_only: bool,
    ) -> Result<(), Status> {
        let nodes = &self.cluster.nodes;
        let (address, grant) = if x == owner {
            Default::default()
        } else {
            let (address, tls) = nodes
                .peer(owner)?
                .ok_or_else(|| Status::failed_precondition("a standalone Strata has one node"))?;
            let g =
                grant::issue(tls, id, x, epoch, read_only).map_err(crate::rpc::status::grant)?;
            (address, g)
        };
        let r = nodes
            .agent(x)?
            .follow(Request::new(agent::FollowRequest {
                volume_id: id.to_string(),
                owner: owner.to_string(),
                address,
                grant,
                previous_owner: previous.to_string(),
                sealed_boot: sealed_boot.to_string(),
            }))
            .await?
            .into_inner();
        tracing::info!(volume = %id, node = %x, staged = r.staged, owner, "the volume's attachment follows it");
        Ok(())
    }

    /// After a live move's seal was undone (its target forgotten before
    /// the switch), the source attached the volume again to the node it is
    /// published to, under a new epoch: that node is told to follow it
    /// there (again: each try of a rollback does, until the record goes).
    /// Nothing to do if the source's attachment is not such a one of that
    /// node (the seal was never undone, or a publish replaced it since).
    async fn point_back(&self, rec: &VolumeRecord, m: &Move) -> Result<(), Status> {
        let nodes = &self.cluster.nodes;
        if nodes.forgotten(&m.from) {
            return Ok(());
        }
        let id = &rec.volume_id;
        let t = self.peek(id, m).await?;
        if !t.repointed {
            return Ok(());
        }
        // Unpublished meanwhile (the record says so now): detached again.
        // Nothing if the rollback is no longer recorded (finished by
        // another controller).
        let x = match self.record(id).await?.moving {
            Some(n)
                if (&n.from, &n.to, n.started_unix_ns) == (&m.from, &m.to, m.started_unix_ns) =>
            {
                n.published_to
            }
            _ => return Ok(()),
        };
        if t.published_to != x || nodes.forgotten(&x) {
            if t.published_to.is_empty() {
                return Ok(());
            }
            nodes
                .agent(&m.from)?
                .detach(Request::new(agent::AttachRequest {
                    volume_id: id.clone(),
                    node_id: t.published_to,
                    ..Default::default()
                }))
                .await?;
            return Ok(());
        }
        // With the epoch the source attached it under: an unpublish
        // meanwhile leaves that grant fenced off, never an attachment.
        self.point(
            id,
            &x,
            (&m.from, t.attachment_epoch),
            (&m.to, ""),
            m.read_only,
        )
        .await
    }

    /// Rolls a move back (before its switch): the source's copy is made
    /// the volume again (its attachment for the move ended, its seal
    /// undone), then the target's copy goes and the record forgets the
    /// move. While the target is away, the record stays `aborting` (the
    /// volume is usable meanwhile) and a later round deletes it.
    async fn abort(&self, rec: &mut VolumeRecord) -> Result<(), Status> {
        let m = rec.moving.clone().expect("moving");
        let id = rec.volume_id.clone();
        let nodes = &self.cluster.nodes;
        let detached = match nodes.agent(&m.from) {
            Ok(source) => source
                .detach(Request::new(agent::AttachRequest {
                    volume_id: id.clone(),
                    node_id: m.to.clone(),
                    for_move: true,
                    ..Default::default()
                }))
                .await
                .map(drop),
            // Forgotten with its data (`--abandon-data`): nothing to detach.
            Err(_) if nodes.forgotten(&m.from) => Ok(()),
            Err(e) => Err(e),
        };
        let detached = match detached {
            // Sealed by a live move whose target was forgotten since: it
            // was never switched to, so it served no write, and the
            // source's copy is the volume again.
            Err(e)
                if m.live
                    && e.code() == Code::FailedPrecondition
                    && nodes.forgotten(&m.to)
                    && self.sealed_live(rec, &m).await? =>
            {
                // Only for a rollback still recorded (no switch can land
                // any more); attached again to the node it is published
                // to, if any.
                let now = self.record(&id).await?;
                let x = match now.moving {
                    Some(n)
                        if n.phase == MovePhase::Aborting
                            && (&n.from, &n.to, n.started_unix_ns)
                                == (&m.from, &m.to, m.started_unix_ns) =>
                    {
                        n.published_to
                    }
                    _ => {
                        return Err(Status::aborted(format!(
                            "the rollback of the move of volume {id} is no longer recorded: not \
                             taken further here"
                        )));
                    }
                };
                let reattach = Some(x).filter(|x| *x != m.to && !nodes.forgotten(x));
                nodes
                    .agent(&m.from)?
                    .detach(Request::new(agent::AttachRequest {
                        volume_id: id.clone(),
                        node_id: m.to.clone(),
                        for_move: true,
                        unseal: true,
                        reattach: reattach.unwrap_or_default(),
                        read_only: m.read_only,
                    }))
                    .await
                    .map(drop)
            }
            r => r,
        };
        if let Err(e) = detached {
            // Sealed by a live move meanwhile: it goes on, not back.
            if m.live && e.code() == Code::FailedPrecondition && self.sealed_live(rec, &m).await? {
                self.set_phase(rec, MovePhase::Copying, "sealed: switching")
                    .await?;
                self.tell(
                    rec,
                    EventKind::Normal,
                    "Moving",
                    format!(
                        "volume {id} was sealed for node {} before its rollback: the move goes on",
                        m.to
                    ),
                );
                return Err(Status::unavailable(format!(
                    "volume {id} was sealed for node {} before the rollback: the move goes on",
                    m.to
                )));
            }
            return Err(e);
        }
        if m.live {
            self.point_back(rec, &m).await?;
        }
        let deleted = match nodes.agent(&m.to) {
            Ok(target) => target
                .delete_volume(Request::new(agent::DeleteVolumeRequest { volume_id: id }))
                .await
                .map(drop),
            // `strata node forget`: its copy is garbage there, for good.
            Err(_) if nodes.forgotten(&m.to) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = deleted {
            return Err(Status::new(
                e.code(),
                format!(
                    "the move is rolled back (the volume is usable on node {}); its copy on node \
                     {} is deleted once that node answers: {}",
                    m.from,
                    m.to,
                    e.message()
                ),
            ));
        }
        let lost_with = nodes.forgotten(&rec.node).then(|| rec.node.clone());
        self.update_move(rec, Some(MovePhase::Aborting), move |current| {
            current.moving = None;
            if current.lost_with.is_none() {
                current.lost_with.clone_from(&lost_with);
            }
            true
        })
        .await?;
        self.metrics.volume_moved(kind(&m), false, 0);
        Ok(())
    }

    /// An Event on the claim of the volume of `rec`, if it has one.
    fn tell(&self, rec: &VolumeRecord, kind: EventKind, reason: &str, message: String) {
        if let (Some(events), Some(claim)) = (&self.cluster.events, &rec.claim) {
            events.emit(claim, kind, reason, &message);
        }
    }

    /// Records that the move `m` of `rec` rolls back (phase Aborting),
    /// and why, and tells its claim.
    async fn rolling_back(
        &self,
        rec: &mut VolumeRecord,
        m: &Move,
        why: &str,
    ) -> Result<(), Status> {
        self.set_phase(rec, MovePhase::Aborting, why).await?;
        let stays = match &rec.lost_with {
            Some(node) => format!("its data was lost with node {node}"),
            None => format!("it stays on node {}", m.from),
        };
        let message = format!(
            "the move of volume {} to node {} is rolled back ({why}); {stays}",
            rec.volume_id, m.to
        );
        self.tell(rec, EventKind::Warning, "MoveRolledBack", message);
        Ok(())
    }

    /// Moves the move on to `phase` (and the volume to `rec.node`: the
    /// switch), only from the phase the stored record still has (as `rec`
    /// says): see [`Self::update_move`].
    async fn set_phase(
        &self,
        rec: &mut VolumeRecord,
        phase: MovePhase,
        message: &str,
    ) -> Result<(), Status> {
        let was = rec.moving.as_ref().map(|m| m.phase);
        let (node, message) = (rec.node.clone(), message.to_string());
        // The seal's boot, learnt by this controller (the switch records it).
        let sealed = rec.moving.as_ref().map(|m| m.sealed_boot.clone());
        let sealed = sealed.filter(|b| !b.is_empty());
        self.update_move(rec, was, move |current| {
            current.node.clone_from(&node);
            if let Some(m) = current.moving.as_mut() {
                m.phase = phase;
                m.message.clone_from(&message);
                if let Some(b) = &sealed {
                    m.sealed_boot.clone_from(b);
                }
            }
            true
        })
        .await
    }

    /// Says in the record what the move waits for (best effort).
    /// Only in the phase `rec` has: a note never carries a step's record
    /// past another controller's or a forget's.
    async fn note(&self, rec: &mut VolumeRecord, message: &str) {
        let message = message.to_string();
        let phase = rec.moving.as_ref().map(|m| m.phase);
        let written = self
            .update_move(rec, phase, move |current| {
                if let Some(m) = current.moving.as_mut() {
                    m.message.clone_from(&message);
                }
                true
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(volume = %rec.volume_id, error = %e.message(), "recording a move's progress");
        }
    }
}

/// A failure of a node that did not answer (refused, reset or timed-out
/// connections come as several codes) as UNAVAILABLE: the move waits for
/// it, and a repeated call resumes.
fn waiting(e: Status) -> Status {
    match e.code() {
        Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => Status::unavailable(format!(
            "the move waits for a node that did not answer: {}",
            e.message()
        )),
        _ => e,
    }
}

/// A refusal that retrying cannot change: the move is rolled back.
fn refused(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::OutOfRange
            | Code::ResourceExhausted
            | Code::AlreadyExists
    )
}

/// The I/O limits of volume `id` on its node, for the copy a move makes.
async fn limits_of(
    source: &dyn csi_proto::agent::v1::agent_server::Agent,
    id: &str,
) -> Result<Option<agent::Limits>, Status> {
    let reply = source
        .get_volume(Request::new(agent::GetVolumeRequest {
            volume_id: id.to_string(),
        }))
        .await?;
    Ok(reply.into_inner().limits)
}
