//! The target's side of a move between nodes (`agent.proto`, Import). The
//! source's copy is read over the data path ([`crate::peer::RemoteVolume`],
//! with the move's read-only grant); it does not change during the move
//! (published to no node but this one, read-only, then sealed). Two ways:
//!
//! - **Copy first** (`lazy` unset): the volume is made here, every data
//!   extent of the source is written into it, then flushed; only then does
//!   the controller switch. Copying again is always right, so a copy not
//!   seen to finish in this process (a restart, a failure) starts over on
//!   a fresh volume: nothing a failed attempt wrote survives.
//! - **Switch first** (`lazy`): the volume is made here at once as a
//!   *fetching* volume (see `engine::volume`), whose blocks not yet here
//!   are read from the source; the controller switches right away, and a
//!   background fill copies the source's data extents in (skipping what
//!   was written here meanwhile), then ends the fetch. The volume's record
//!   in the pool keeps the source (a [`Fetching`]), so a restarted node
//!   connects the source again before it serves the volume
//!   ([`Imports::connect_fetching`]) and resumes the fill ([`Imports::resume`]).
//!
//! Both run in the background; the controller polls the same call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use csi_proto::agent::v1::{ImportReply, ImportRequest};
use tonic::Status;

use serde::{Deserialize, Serialize};

use crate::engine::jobs::throttle::Bucket;
use crate::engine::qos::exempt;
use crate::engine::{Backing, Error, Pool, SnapshotId, VolumeId, VolumePolicy, ZeroFlags};
use crate::peer::{MAX_IO, MAX_MAP, Peers, RemoteVolume, Target};
use crate::rpc::{Core, Started, status};

/// Where a fetching volume's data comes from: its record in the pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fetching {
    pub source: Target,
    pub size_bytes: u64,
    /// Bytes per second the fill reads (0: no limit).
    pub rate_bytes_per_second: u64,
}

/// The copies of this process, and the sources of its fetching volumes
/// (one per volume, shared by its reads and its fill, so both follow the
/// source when it is reached anew).
#[derive(Debug, Default)]
pub struct Imports {
    copies: Mutex<HashMap<VolumeId, Copy>>,
    sources: Mutex<HashMap<VolumeId, Arc<RemoteVolume>>>,
    live: Mutex<HashMap<VolumeId, Arc<Live>>>,
}

/// A live move's copy (see [`Imports::poll_live`]).
#[derive(Debug, Default)]
struct Live {
    grant: String,
    copied: AtomicU64,
    /// Bytes the last round of changes held.
    pending: AtomicU64,
    /// A round found less than [`CONVERGED`] changed.
    converged: AtomicBool,
    /// The newest hold the controller asked a final round for, and the
    /// newest one a round found nothing changed under (then flushed).
    asked: AtomicU64,
    synced: AtomicU64,
    failed: Mutex<Option<Status>>,
    stop: Stop,
    finished: AtomicBool,
}

/// Set to stop a copy: a DeleteVolume of its volume here, or a newer copy
/// of it. The copy's source sees it too ([`crate::peer::Peers::open_until`]),
/// so a copy retrying a source that is away stops at its next attempt, not
/// after [`crate::peer::RETRY_FOR`] (a request already sent still waits
/// for its answer or its timeout).
type Stop = Arc<AtomicBool>;

/// ABORTED once `stop` is set.
fn stopped(stop: &AtomicBool) -> Result<(), Status> {
    if stop.load(Ordering::Acquire) {
        return Err(Status::aborted(
            "the copy was stopped (its volume is being deleted here, or copied anew)",
        ));
    }
    Ok(())
}

/// Changes below this are copied under the hold (at worst 128 separate
/// blocks, each a request)...
const CONVERGED: u64 = 512 << 10;

/// ... if a round took less than this (the hold lasts at most a second).
const CONVERGED_ROUND: std::time::Duration = std::time::Duration::from_millis(200);

/// Changed ranges closer than a gap are read as one (fewer requests; the
/// blocks between are read as they are now, which is right too). The gap
/// is what the link carries in the time a request costs ([`REQUEST_COST`],
/// at the rate of the first full copy), between these bounds: a slow link
/// sends few bytes more than changed, a fast one few requests.
const GAP_MIN: u64 = 4 << 10;
const GAP_MAX: u64 = 64 << 10;

/// About what one read request costs beside its bytes (both nodes' gRPC,
/// TLS and engine work, on these machines).
const REQUEST_COST: std::time::Duration = std::time::Duration::from_micros(200);

/// The coalescing gap for a link that carried `bytes` in `took`.
fn coalesce_gap(bytes: u64, took: std::time::Duration) -> u64 {
    // Too little to measure: a small volume copies quickly either way.
    if bytes < (8 << 20) || took.is_zero() {
        return GAP_MAX;
    }
    let rate = bytes as f64 / took.as_secs_f64();
    ((rate * REQUEST_COST.as_secs_f64()) as u64).clamp(GAP_MIN, GAP_MAX) / 4096 * 4096
}

/// Merges ranges (in order) closer than `gap`, up to [`MAX_IO`] each.
fn coalesce(ranges: Vec<(u64, u64)>, gap: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (o, l) in ranges {
        match out.last_mut() {
            Some((po, pl))
                if o >= *po + *pl && o - (*po + *pl) <= gap && o + l - *po <= MAX_IO as u64 =>
            {
                *pl = o + l - *po;
            }
            _ => out.push((o, l)),
        }
    }
    out
}

/// Ranges one round of changes asks for at most.
const ROUND_RANGES: u32 = 1 << 14;

/// A copy, with the grant it reads the source under: a copy made under
/// another attachment of the source (an older move, fenced off since) is
/// never taken for this one's.
#[derive(Debug)]
struct Copy {
    grant: String,
    state: CopyState,
    /// Stops it while it runs (a copy first; a fill just stops).
    stop: Stop,
}

#[derive(Debug)]
enum CopyState {
    /// Bytes copied so far; whether it is a fill (switch first).
    Running(Arc<AtomicU64>, bool),
    Done(u64),
    Failed(Status),
}

impl Imports {
    /// Starts the copy `req` asks for unless it runs or finished; its
    /// progress. A failed copy's error is answered once, and the next call
    /// starts over.
    pub fn poll(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        req: ImportRequest,
    ) -> Result<ImportReply, Status> {
        let mut copies = self.copies.lock().expect("imports");
        let lazy = req.lazy;
        let reply = |copied_bytes, done| ImportReply {
            copied_bytes,
            done,
            fetching: lazy,
            pending_bytes: 0,
        };
        if let Some(c) = copies.get(&vid) {
            // A resumed fill reads under the grant its record keeps.
            let same = req.resume || c.grant == req.grant;
            match (&c.state, same) {
                (CopyState::Running(n, _), true) => {
                    return Ok(reply(n.load(Ordering::Relaxed), false));
                }
                (CopyState::Running(..), false) => {
                    return Err(Status::unavailable(format!(
                        "a copy of volume {vid} under an older grant is still running; retry"
                    )));
                }
                (CopyState::Done(n), true) => return Ok(reply(*n, true)),
                // Answered once; the next call starts over.
                (CopyState::Failed(s), true) => {
                    let s = s.clone();
                    copies.remove(&vid);
                    return Err(s);
                }
                // An outcome under another grant: start over.
                (_, false) => {}
            }
        }
        let progress = Arc::new(AtomicU64::new(0));
        let stop = Stop::default();
        copies.insert(
            vid,
            Copy {
                grant: req.grant.clone(),
                state: CopyState::Running(Arc::clone(&progress), req.lazy),
                stop: Arc::clone(&stop),
            },
        );
        drop(copies);
        let grant = req.grant.clone();
        let imports = Arc::clone(self);
        self.spawn(started, vid, grant, progress, move |core, progress| {
            if req.lazy {
                imports.fill(core, vid, progress)
            } else {
                copy(core, vid, &req, progress, &stop)
            }
        });
        Ok(reply(0, false))
    }

    /// Runs `work` in the background and keeps its outcome.
    fn spawn(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        grant: String,
        progress: Arc<AtomicU64>,
        work: impl FnOnce(&Core, &AtomicU64) -> Result<u64, Status> + Send + 'static,
    ) {
        let (imports, started) = (Arc::clone(self), started.clone());
        tokio::task::spawn_blocking(move || {
            let outcome = started.get().and_then(|core| work(core, &progress));
            let state = match outcome {
                Ok(n) => CopyState::Done(n),
                Err(s) => {
                    tracing::warn!(volume = %vid, error = %s.message(), "copying a moving volume failed");
                    CopyState::Failed(s)
                }
            };
            let stop = Stop::default();
            imports
                .copies
                .lock()
                .expect("imports")
                .insert(vid, Copy { grant, state, stop });
        });
    }

    /// Starts the fill of every fetching volume of this node (after a
    /// restart); the controller's polls find them running.
    pub fn resume(self: &Arc<Self>, started: &Started) {
        let Ok(core) = started.get() else { return };
        let fetching = match core.pool.fetching_volumes() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "listing fetching volumes");
                return;
            }
        };
        for (vid, bytes) in fetching {
            // Under the grant it was made with, so the controller's polls
            // of the same move find it.
            let grant = serde_json::from_slice::<Fetching>(&bytes)
                .map(|f| f.source.grant)
                .unwrap_or_default();
            let progress = Arc::new(AtomicU64::new(0));
            let mut copies = self.copies.lock().expect("imports");
            if copies.contains_key(&vid) {
                continue;
            }
            copies.insert(
                vid,
                Copy {
                    grant: grant.clone(),
                    state: CopyState::Running(Arc::clone(&progress), true),
                    stop: Stop::default(),
                },
            );
            drop(copies);
            tracing::info!(volume = %vid, "resuming the fetch of a volume");
            let imports = Arc::clone(self);
            self.spawn(started, vid, grant, progress, move |core, progress| {
                imports.fill(core, vid, progress)
            });
        }
    }

    /// A live move's copy (`agent.proto`, Import with `live`): started
    /// unless it runs under this grant; its progress.
    pub fn poll_live(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        req: ImportRequest,
    ) -> Result<ImportReply, Status> {
        let mut lives = self.live.lock().expect("live copies");
        if let Some(l) = lives.get(&vid).cloned() {
            if l.grant == req.grant {
                let failed = l.failed.lock().expect("failure").take();
                if let Some(s) = failed {
                    lives.remove(&vid);
                    return Err(s);
                }
                l.asked.fetch_max(req.final_hold, Ordering::AcqRel);
                let done = if req.final_hold > 0 {
                    l.synced.load(Ordering::Acquire) >= req.final_hold
                } else {
                    l.converged.load(Ordering::Acquire)
                };
                return Ok(ImportReply {
                    copied_bytes: l.copied.load(Ordering::Relaxed),
                    done,
                    fetching: false,
                    pending_bytes: l.pending.load(Ordering::Relaxed),
                });
            }
            l.stop.store(true, Ordering::Release);
            if !l.finished.load(Ordering::Acquire) {
                return Err(Status::unavailable(format!(
                    "a copy of volume {vid} under an older grant is still stopping; retry"
                )));
            }
        }
        let live = Arc::new(Live {
            grant: req.grant.clone(),
            ..Live::default()
        });
        lives.insert(vid, Arc::clone(&live));
        drop(lives);
        let started = started.clone();
        tokio::task::spawn_blocking(move || {
            let outcome = started
                .get()
                .and_then(|core| copy_live(core, vid, &req, &live));
            if let Err(s) = outcome {
                // Once the move sealed the source, its grant ends; a stop
                // (a delete, a newer copy) ends it too: both expected.
                if live.synced.load(Ordering::Acquire) == 0 && !live.stop.load(Ordering::Acquire) {
                    tracing::warn!(volume = %vid, error = %s.message(), "a live move's copy failed");
                }
                *live.failed.lock().expect("failure") = Some(s);
            }
            live.finished.store(true, Ordering::Release);
        });
        Ok(ImportReply::default())
    }

    /// Whether a live copy into `vid` runs.
    pub fn live_running(&self, vid: VolumeId) -> bool {
        self.live
            .lock()
            .expect("live copies")
            .get(&vid)
            .is_some_and(|l| !l.finished.load(Ordering::Acquire))
    }

    /// Stops the copies into `vid`: a live one, and a copy first (both
    /// at their next step, or their source's next attempt).
    pub fn stop_copies(&self, vid: VolumeId) {
        if let Some(l) = self.live.lock().expect("live copies").get(&vid) {
            l.stop.store(true, Ordering::Release);
        }
        if let Some(c) = self.copies.lock().expect("imports").get(&vid) {
            c.stop.store(true, Ordering::Release);
        }
    }

    /// Forgets a volume's copy (it was deleted).
    pub fn forget(&self, vid: VolumeId) {
        if let Some(l) = self.live.lock().expect("live copies").remove(&vid) {
            l.stop.store(true, Ordering::Release);
        }
        self.sources.lock().expect("sources").remove(&vid);
        let mut copies = self.copies.lock().expect("imports");
        if !matches!(
            copies.get(&vid).map(|c| &c.state),
            Some(CopyState::Running(..))
        ) {
            copies.remove(&vid);
        }
    }

    /// Whether a copy-first copy into `vid` runs (the volume must not be
    /// deleted under it; a fill just stops).
    pub fn copying(&self, vid: VolumeId) -> bool {
        matches!(
            self.copies
                .lock()
                .expect("imports")
                .get(&vid)
                .map(|c| &c.state),
            Some(CopyState::Running(_, false))
        )
    }
}

fn check_request(
    req: &ImportRequest,
) -> Result<&csi_proto::agent::v1::CreateVolumeRequest, Status> {
    let create = req
        .volume
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("the volume to import is required"))?;
    if create.source.is_some() {
        return Err(Status::invalid_argument(
            "an imported volume has no source on this node",
        ));
    }
    Ok(create)
}

/// The snapshot of this node a copy starts from (`base_snapshot_id`),
/// if any; `ranges` are what it copies then, and only then.
fn base_of(req: &ImportRequest) -> Result<Option<SnapshotId>, Status> {
    if req.base_snapshot_id.is_empty() {
        if !req.ranges.is_empty() {
            return Err(Status::invalid_argument(
                "ranges are copied only onto a base snapshot",
            ));
        }
        return Ok(None);
    }
    if req.lazy {
        return Err(Status::invalid_argument(
            "a switch-first copy has no base snapshot",
        ));
    }
    req.base_snapshot_id
        .parse()
        .map(Some)
        .map_err(|_| Status::invalid_argument("base_snapshot_id is not a snapshot ID"))
}

/// The source of an import, asked for its size (which checks the grant).
fn open_source(
    core: &Core,
    vid: VolumeId,
    req: &ImportRequest,
    stop: Option<&Stop>,
) -> Result<Arc<RemoteVolume>, Status> {
    let node = core.node.as_ref().ok_or_else(|| {
        Status::failed_precondition("this process serves no node: it cannot copy volumes")
    })?;
    let target = Target {
        volume_id: vid.to_string(),
        owner: req.owner.clone(),
        address: req.address.clone(),
        grant: req.grant.clone(),
    };
    node.peers()
        .map_err(status::node)?
        .open_until(&target, None, stop.cloned())
        .map_err(status::engine)
}

/// Refuses to replace a volume of this node that is in use here.
fn check_unused(core: &Core, vid: VolumeId) -> Result<(), Status> {
    if core.node.as_ref().is_some_and(|n| n.is_staged_locally(vid)) {
        return Err(Status::failed_precondition(format!(
            "volume {vid} is staged on this node: it is in use here, not a move's copy"
        )));
    }
    match core.pool.attachment(vid) {
        Ok(a) if !a.node.is_empty() => Err(Status::failed_precondition(format!(
            "volume {vid} is published to node {} from this node: it lives here, it is not a \
             move's copy",
            a.node
        ))),
        Ok(_) | Err(Error::VolumeNotFound(_)) => Ok(()),
        Err(e) => Err(status::engine(e)),
    }
}

/// Gives a volume the policy and limits its request names (again: both
/// are idempotent).
pub(super) fn settle(
    pool: &Pool,
    vid: VolumeId,
    create: &csi_proto::agent::v1::CreateVolumeRequest,
) -> Result<(), Status> {
    if create.max_chain_depth != 0 {
        let policy = VolumePolicy {
            max_chain_depth: create.max_chain_depth,
            ..pool.policy(vid).map_err(status::engine)?
        };
        pool.set_policy(vid, policy).map_err(status::engine)?;
    }
    if let Some(l) = create.limits {
        super::set_limits(pool, vid, super::limits_of(l))?;
    }
    Ok(())
}

impl Imports {
    /// Switch first, before the switch: makes the fetching volume and connects
    /// its source, unless an earlier call of the same move (the same grant)
    /// made it. Returns at once; [`fill`] copies. (After the switch the
    /// controller only polls, with `resume`: the volume may hold writes then,
    /// and is never made again.)
    pub fn prepare_fetch(
        &self,
        core: &Core,
        vid: VolumeId,
        req: &ImportRequest,
    ) -> Result<(), Status> {
        let create = check_request(req)?;
        let pool = &core.pool;
        let made = pool
            .fetching_volumes()
            .map_err(status::engine)?
            .into_iter()
            .find_map(|(v, b)| (v == vid).then_some(b));
        match (made, pool.volume(vid)) {
            // Made by an earlier call of this move (this attachment).
            (Some(b), Ok(vol))
                if serde_json::from_slice::<Fetching>(&b)
                    .is_ok_and(|f| f.source.grant == req.grant) =>
            {
                // (Also what a crash between its making and its settings
                // left unset.)
                settle(pool, vid, create)?;
                if !vol.backing_connected() {
                    self.connect(&vol, open_source(core, vid, req, None)?)?;
                }
                return Ok(());
            }
            // Fetched whole by an earlier call of this move (the
            // controller restarted before the switch): the poll says done.
            (None, Ok(_)) if self.fetched(vid, &req.grant) => {
                return settle(pool, vid, create);
            }
            // Made under an older attachment of the source, fenced off since,
            // or finished under another grant: this is called only before
            // the switch, so nothing was written to it; it is made again,
            // and what was known of the old one's fill goes with it.
            (_, Ok(_)) => {
                check_unused(core, vid)?;
                pool.delete_volume(vid).map_err(status::engine)?;
                self.forget_finished(vid);
            }
            (_, Err(Error::VolumeNotFound(_))) => self.forget_finished(vid),
            (_, Err(e)) => return Err(status::engine(e)),
        }
        let source = open_source(core, vid, req, None)?;
        let size = Backing::size(source.as_ref());
        if size != create.size_bytes {
            return Err(Status::failed_precondition(format!(
                "volume {vid} is {size} bytes on node {}, not {} as its record says",
                req.owner, create.size_bytes
            )));
        }
        let record = Fetching {
            source: source.target(),
            size_bytes: size,
            rate_bytes_per_second: req.rate_bytes_per_second,
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?;
        pool.create_fetching_volume(vid, size, &bytes)
            .map_err(status::engine)?;
        settle(pool, vid, create)?;
        let vol = pool.volume(vid).map_err(status::engine)?;
        self.connect(&vol, source)
    }

    /// Whether the fill of `vid` under `grant` ended here, or is ending
    /// (asked when the volume no longer fetches: its record went last).
    fn fetched(&self, vid: VolumeId, grant: &str) -> bool {
        let copies = self.copies.lock().expect("imports");
        copies.get(&vid).is_some_and(|c| {
            c.grant == grant && matches!(c.state, CopyState::Done(_) | CopyState::Running(_, true))
        })
    }

    /// Forgets the outcome of an ended copy of `vid` (its volume is made
    /// again: a poll must not answer for the old one).
    fn forget_finished(&self, vid: VolumeId) {
        let mut copies = self.copies.lock().expect("imports");
        if copies
            .get(&vid)
            .is_some_and(|c| !matches!(c.state, CopyState::Running(..)))
        {
            copies.remove(&vid);
        }
    }

    /// After the switch (the controller's `resume` polls): if the source is
    /// reached at another address now (its node's pod was made again), or with
    /// another grant (a new agent key), the record and the connection follow.
    pub fn retarget(&self, core: &Core, vid: VolumeId, req: &ImportRequest) -> Result<(), Status> {
        let pool = &core.pool;
        let Some(bytes) = pool
            .fetching_volumes()
            .map_err(status::engine)?
            .into_iter()
            .find_map(|(v, b)| (v == vid).then_some(b))
        else {
            // Not fetching (finished), or not here: the poll says which.
            return pool.volume_info(vid).map(drop).map_err(status::engine);
        };
        let mut record: Fetching = serde_json::from_slice(&bytes)
            .map_err(|e| Status::internal(format!("volume {vid}: fetch record: {e}")))?;
        if record.source.address == req.address && record.source.grant == req.grant {
            return Ok(());
        }
        // Opened first: it checks the new address and grant.
        let fresh = open_source(core, vid, req, None)?;
        record.source = fresh.target();
        let bytes = serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?;
        pool.set_fetch_record(vid, &bytes).map_err(status::engine)?;
        let known = self.sources.lock().expect("sources").get(&vid).cloned();
        match known {
            // Reads and the running fill go there from now on.
            Some(source) => source.retarget(&record.source).map_err(status::engine)?,
            None => self.connect(&pool.volume(vid).map_err(status::engine)?, fresh)?,
        }
        tracing::info!(volume = %vid, address = %req.address, "a fetching volume reaches its source anew");
        Ok(())
    }

    /// Connects every fetching volume of `pool` to its source (at start,
    /// before staged volumes are served again: a read of a block not yet here
    /// must not fail). The owner is not called: reads wait for it as remote
    /// I/O does.
    pub fn connect_fetching(&self, pool: &Pool, peers: &Peers) {
        let fetching = match pool.fetching_volumes() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "listing fetching volumes");
                return;
            }
        };
        for (vid, bytes) in fetching {
            let connected = serde_json::from_slice::<Fetching>(&bytes)
                .map_err(|e| format!("its record is unreadable: {e}"))
                .and_then(|f| {
                    let source = peers
                        .open(&f.source, Some(f.size_bytes))
                        .map_err(|e| e.to_string())?;
                    let vol = pool.volume(vid).map_err(|e| e.to_string())?;
                    self.connect(&vol, source)
                        .map_err(|e| e.message().to_string())
                });
            if let Err(e) = connected {
                tracing::error!(volume = %vid, error = %e, "a fetching volume cannot reach its source: reads of blocks not yet here fail");
            }
        }
    }

    /// Switch first: copies the source's data extents into the fetching
    /// volume (what was written here meanwhile stays), then ends the fetch;
    /// the bytes copied.
    fn fill(&self, core: &Core, vid: VolumeId, copied: &AtomicU64) -> Result<u64, Status> {
        let pool = &core.pool;
        let Some(bytes) = pool
            .fetching_volumes()
            .map_err(status::engine)?
            .into_iter()
            .find_map(|(v, b)| (v == vid).then_some(b))
        else {
            // Finished before (a repeated poll after a restart).
            return Ok(0);
        };
        let record: Fetching = serde_json::from_slice(&bytes)
            .map_err(|e| Status::internal(format!("volume {vid}: fetch record: {e}")))?;
        let volume = pool.volume(vid).map_err(status::engine)?;
        let known = self.sources.lock().expect("sources").get(&vid).cloned();
        let source = match known {
            Some(s) if volume.backing_connected() => s,
            // Connected whatever happened before (a failed connect at start).
            _ => {
                let node = core.node.as_ref().ok_or_else(|| {
                    Status::failed_precondition(
                        "this process serves no node: it cannot copy volumes",
                    )
                })?;
                let source = node
                    .peers()
                    .map_err(status::node)?
                    .open(&record.source, Some(record.size_bytes))
                    .map_err(status::engine)?;
                self.connect(&volume, Arc::clone(&source))?;
                source
            }
        };
        let bucket =
            (record.rate_bytes_per_second > 0).then(|| Bucket::new(record.rate_bytes_per_second));
        // Again if an acknowledged loss made blocks behind the walk absent.
        let mut refetches = volume.refetches();
        loop {
            each_data_chunk(&source, record.size_bytes, |at, n, _| {
                // Charged for what it reads: a fill taken up again after a
                // restart walks what is here already at full speed.
                let absent = volume.absent_bytes(at, n as u64).map_err(status::engine)?;
                throttle(pool, bucket.as_ref(), absent as usize, None)?;
                let filled = volume.fill(at, n as u64).map_err(status::engine)?;
                copied.fetch_add(filled, Ordering::Relaxed);
                crate::engine::jobs::failpoint::hit("agent::import::after_chunk");
                Ok(())
            })?;
            let now = volume.refetches();
            if now == refetches {
                break;
            }
            refetches = now;
        }
        pool.finish_fetch(&volume, refetches)
            .map_err(status::engine)?;
        self.sources.lock().expect("sources").remove(&vid);
        let bytes = copied.load(Ordering::Relaxed);
        tracing::info!(volume = %vid, bytes, "the fetch of a volume ended: it is whole here");
        Ok(bytes)
    }

    /// Reads the fetching volume's blocks not yet here from `source`.
    fn connect(
        &self,
        vol: &Arc<crate::engine::Volume>,
        source: Arc<RemoteVolume>,
    ) -> Result<(), Status> {
        vol.connect_backing(Arc::clone(&source) as Arc<dyn Backing>)
            .map_err(status::engine)?;
        self.sources
            .lock()
            .expect("sources")
            .insert(vol.id(), source);
        Ok(())
    }
}

/// Waits for the byte budgets of a copy's `n` bytes: the move's own (the
/// controller's `--move-rate`) and this node's, which merges share
/// (`--node-job-rate`); ABORTED if `stop` is set meanwhile.
fn throttle(
    pool: &Pool,
    bucket: Option<&Bucket>,
    n: usize,
    stop: Option<&AtomicBool>,
) -> Result<(), Status> {
    let own = bucket.map_or(std::time::Duration::ZERO, |b| b.charge(n as u64));
    let until = std::time::Instant::now() + own.max(pool.charge_node_budget(n as u64));
    loop {
        if let Some(stop) = stop {
            stopped(stop)?;
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
    }
}

/// Pieces of a copy in flight at once: each a request to the source
/// (its own data lane) and a buffer of [`MAX_IO`] bytes. One at a time, a
/// copy waited for every read's round trip and every write here in turn.
const COPIERS: usize = 4;

/// Calls `f(offset, len, buf)` for every piece (at most [`MAX_IO`] bytes)
/// of the source's data extents, [`COPIERS`] at a time (see
/// [`in_parallel`]).
fn each_data_chunk(
    source: &RemoteVolume,
    size: u64,
    f: impl Fn(u64, usize, &mut Vec<u8>) -> Result<(), Status> + Sync,
) -> Result<(), Status> {
    in_parallel(|piece| walk(source, size, piece), f)
}

/// Calls `f(offset, len, buf)` for every piece `pieces` hands out, on up
/// to [`COPIERS`] threads of their own, started as pieces come (`buf` is
/// the thread's, empty at first); the first error ends the walk, once the
/// pieces under way are done.
fn in_parallel(
    pieces: impl FnOnce(&mut dyn FnMut(u64, usize) -> Result<(), Status>) -> Result<(), Status>,
    f: impl Fn(u64, usize, &mut Vec<u8>) -> Result<(), Status> + Sync,
) -> Result<(), Status> {
    let failed: Mutex<Option<Status>> = Mutex::default();
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, usize)>(COPIERS);
    let rx = Mutex::new(rx);
    let copier = || {
        let mut buf = Vec::new();
        loop {
            let Ok((at, n)) = rx.lock().expect("pieces").recv() else {
                return;
            };
            // After a failure the rest is only drained, so the walk never
            // waits on a full queue.
            if failed.lock().expect("failed").is_some() {
                continue;
            }
            // A panic fails the copy like an error (it must not end the
            // copier, or the walk could wait on a full queue for good).
            let done =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(at, n, &mut buf)))
                    .unwrap_or_else(|_| Err(Status::internal("a copy of a piece panicked")));
            if let Err(e) = done {
                failed.lock().expect("failed").get_or_insert(e);
            }
        }
    };
    let walked = std::thread::scope(|scope| {
        let mut copiers = 0;
        let walked = pieces(&mut |at, n| {
            if let Some(e) = failed.lock().expect("failed").as_ref() {
                return Err(e.clone());
            }
            if copiers < COPIERS {
                scope.spawn(copier);
                copiers += 1;
            }
            tx.send((at, n))
                .map_err(|_| Status::internal("copy: every copier ended"))
        });
        drop(tx);
        walked
    });
    match failed.into_inner().expect("failed") {
        Some(e) => Err(e),
        None => walked,
    }
}

/// Calls `f(offset, len)` for each piece of at most [`MAX_IO`] bytes of
/// the range, in order.
fn split(
    offset: u64,
    length: u64,
    f: &mut dyn FnMut(u64, usize) -> Result<(), Status>,
) -> Result<(), Status> {
    let end = offset + length;
    let mut at = offset;
    while at < end {
        let n = ((end - at) as usize).min(MAX_IO);
        f(at, n)?;
        at += n as u64;
    }
    Ok(())
}

/// Calls `f(offset, len)` for every piece (at most [`MAX_IO`] bytes) of the
/// source's data extents, in order.
fn walk(
    source: &RemoteVolume,
    size: u64,
    f: &mut dyn FnMut(u64, usize) -> Result<(), Status>,
) -> Result<(), Status> {
    let mut window = 0;
    while window < size {
        let len = (size - window).min(MAX_MAP);
        for (offset, length) in source.map(window, len).map_err(status::engine)? {
            split(offset, length, f)?;
        }
        window += len;
    }
    Ok(())
}

/// Copy first: makes the volume afresh and copies the source's data into
/// it; the bytes copied.
fn copy(
    core: &Core,
    vid: VolumeId,
    req: &ImportRequest,
    copied: &AtomicU64,
    stop: &Stop,
) -> Result<u64, Status> {
    let create = check_request(req)?;
    let base = base_of(req)?;
    check_unused(core, vid)?;
    let source = open_source(core, vid, req, Some(stop))?;
    let size = Backing::size(source.as_ref());
    if size != create.size_bytes {
        return Err(Status::failed_precondition(format!(
            "volume {vid} is {size} bytes on node {}, not {} as its record says (expanded \
             during the move?)",
            req.owner, create.size_bytes
        )));
    }
    if let Some(r) = req
        .ranges
        .iter()
        .find(|r| r.offset.checked_add(r.length).is_none_or(|end| end > size))
    {
        return Err(Status::invalid_argument(format!(
            "range {}+{} is past the end of volume {vid} ({size} bytes)",
            r.offset, r.length
        )));
    }
    let pool = &core.pool;
    // Whatever an earlier attempt left is not trusted.
    match pool.delete_volume(vid) {
        Ok(()) | Err(Error::VolumeNotFound(_)) => {}
        Err(e) => return Err(status::engine(e)),
    }
    match base {
        Some(b) => pool.clone_snapshot_as(b, vid, Some(size)),
        None => pool.create_volume_as(vid, size),
    }
    .map_err(status::engine)?;
    settle(pool, vid, create)?;
    let volume = pool.volume(vid).map_err(status::engine)?;
    let bucket = (req.rate_bytes_per_second > 0).then(|| Bucket::new(req.rate_bytes_per_second));
    if base.is_some() {
        let ranges = req.ranges.iter().map(|r| (r.offset, r.length)).collect();
        let n = copy_ranges(
            pool,
            &source,
            &volume,
            ranges,
            GAP_MAX,
            Some(bucket.as_ref()),
            stop,
        )?;
        copied.fetch_add(n, Ordering::Relaxed);
        crate::engine::jobs::failpoint::hit("agent::import::after_chunk");
    } else {
        each_data_chunk(&source, size, |at, n, buf| {
            throttle(pool, bucket.as_ref(), n, Some(stop))?;
            buf.resize(n, 0);
            Backing::read(source.as_ref(), at, buf).map_err(status::engine)?;
            exempt(|| volume.write(at, buf, false)).map_err(status::engine)?;
            copied.fetch_add(n as u64, Ordering::Relaxed);
            crate::engine::jobs::failpoint::hit("agent::import::after_chunk");
            Ok(())
        })?;
    }
    volume.flush().map_err(status::engine)?;
    Ok(copied.load(Ordering::Relaxed))
}

/// A live move's copy: the whole volume as [`copy`] does, then rounds of
/// the source's changes (each range read and written here, zeros as
/// zeros) until stopped or the source ends the move's grant.
fn copy_live(core: &Core, vid: VolumeId, req: &ImportRequest, l: &Live) -> Result<(), Status> {
    let started = std::time::Instant::now();
    let bytes = copy(core, vid, req, &l.copied, &l.stop)?;
    let gap = coalesce_gap(bytes, started.elapsed());
    tracing::info!(volume = %vid, bytes, gap, "a live move copied the volume: now its changes");
    let source = open_source(core, vid, req, Some(&l.stop))?;
    let volume = core.pool.volume(vid).map_err(status::engine)?;
    let bucket = (req.rate_bytes_per_second > 0).then(|| Bucket::new(req.rate_bytes_per_second));
    // The last batch copied and flushed here.
    let mut confirmed = 0;
    while !l.stop.load(Ordering::Acquire) {
        let want = l.asked.load(Ordering::Acquire);
        let round = std::time::Instant::now();
        let (batch, ranges) = source
            .changes(confirmed, ROUND_RANGES)
            .map_err(status::engine)?;
        let empty = ranges.is_empty();
        // The last delta (a final round asked for) is not throttled.
        let throttled = want <= l.synced.load(Ordering::Acquire);
        let budget = throttled.then_some(bucket.as_ref());
        let bytes = copy_ranges(&core.pool, &source, &volume, ranges, gap, budget, &l.stop)?;
        // Confirmed (with the next take) only once durable here: the
        // source seals only when it handed out every change and heard
        // each was confirmed.
        if !empty {
            volume.flush().map_err(status::engine)?;
            crate::engine::jobs::failpoint::hit("agent::import::after_batch");
        }
        confirmed = batch;
        l.copied.fetch_add(bytes, Ordering::Relaxed);
        l.pending.store(bytes, Ordering::Relaxed);
        tracing::debug!(volume = %vid, bytes, want, "a live move's round of changes");
        // Nothing changed since the hold: everything is here, durable,
        // and confirmed with the next take (the source checks that too).
        if empty && want > 0 {
            crate::engine::jobs::failpoint::hit("agent::import::synced");
            l.synced.fetch_max(want, Ordering::AcqRel);
        }
        // Small enough to copy under a hold: few bytes, and a round
        // quick enough on this link and these machines.
        let quick = bytes < CONVERGED && round.elapsed() < CONVERGED_ROUND;
        l.converged.store(quick, Ordering::Release);
        if bytes < CONVERGED && l.asked.load(Ordering::Acquire) == want {
            // Few changes: ask again a little later (a final round, asked
            // meanwhile, at once).
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    Ok(())
}

/// Copies `ranges` (in order) of the source into `volume`: read where
/// the source holds data (ranges closer than `gap` read as one), zeroed
/// here elsewhere, zeros as zeros. Throttled by `budget` (the move's
/// bucket, and this node's) unless it is `None`; ABORTED once `stop` is
/// set. The bytes read.
fn copy_ranges(
    pool: &Pool,
    source: &RemoteVolume,
    volume: &crate::engine::Volume,
    ranges: Vec<(u64, u64)>,
    gap: u64,
    budget: Option<Option<&Bucket>>,
    stop: &AtomicBool,
) -> Result<u64, Status> {
    let ranges = coalesce(data_of(source, volume, ranges)?, gap);
    let bytes = ranges.iter().map(|(_, length)| length).sum::<u64>();
    in_parallel(
        |piece| {
            ranges
                .into_iter()
                .try_for_each(|(offset, length)| split(offset, length, piece))
        },
        |at, n, buf| {
            match budget {
                Some(bucket) => throttle(pool, bucket, n, Some(stop))?,
                None => stopped(stop)?,
            }
            buf.resize(n, 0);
            Backing::read(source, at, buf).map_err(status::engine)?;
            if buf.iter().all(|&b| b == 0) {
                exempt(|| volume.write_zeroes(at, n as u64, ZeroFlags::default()))
                    .map_err(status::engine)?;
            } else {
                exempt(|| volume.write(at, buf, false)).map_err(status::engine)?;
            }
            Ok(())
        },
    )?;
    Ok(bytes)
}

/// Changed ranges of at least this many bytes are mapped first: their
/// holes are zeroed here without reading them.
const MAP_FROM: u64 = 1 << 20;

/// The parts of `ranges` to read from the source: small ranges whole,
/// large ones only where the source holds data (the rest is zeroed in
/// `volume` at once).
fn data_of(
    source: &RemoteVolume,
    volume: &crate::engine::Volume,
    ranges: Vec<(u64, u64)>,
) -> Result<Vec<(u64, u64)>, Status> {
    let mut out = Vec::with_capacity(ranges.len());
    for (offset, length) in ranges {
        if length < MAP_FROM {
            out.push((offset, length));
            continue;
        }
        let end = offset + length;
        let mut window = offset;
        while window < end {
            let len = (end - window).min(MAX_MAP);
            let mut at = window;
            for (o, l) in source.map(window, len).map_err(status::engine)? {
                if o > at {
                    exempt(|| volume.write_zeroes(at, o - at, ZeroFlags::default()))
                        .map_err(status::engine)?;
                }
                out.push((o, l));
                at = o + l;
            }
            if at < window + len {
                exempt(|| volume.write_zeroes(at, window + len - at, ZeroFlags::default()))
                    .map_err(status::engine)?;
            }
            window += len;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{GAP_MAX, GAP_MIN, coalesce, coalesce_gap, in_parallel, split};
    use crate::peer::MAX_IO;
    use std::sync::Mutex;
    use std::time::Duration;
    use tonic::{Code, Status};

    /// 40 pieces of a 40 MiB range through `in_parallel`; the pieces done.
    fn run(
        f: impl Fn(u64) -> Result<(), Status> + Sync,
    ) -> (Result<(), Status>, Vec<(u64, usize)>) {
        let done = Mutex::new(Vec::new());
        let r = in_parallel(
            |piece| split(0, 40 * MAX_IO as u64, piece),
            |at, n, buf| {
                buf.resize(n, 0);
                f(at)?;
                done.lock().unwrap().push((at, n));
                Ok(())
            },
        );
        let mut done = done.into_inner().unwrap();
        done.sort_unstable();
        (r, done)
    }

    #[test]
    fn every_piece_is_copied_once_and_the_first_failure_ends_the_copy() {
        let (r, done) = run(|_| Ok(()));
        r.unwrap();
        let all: Vec<_> = (0..40).map(|i| ((i * MAX_IO) as u64, MAX_IO)).collect();
        assert_eq!(done, all);

        let bad = 5 * MAX_IO as u64;
        let (r, done) = run(|at| {
            if at == bad {
                return Err(Status::data_loss("bad piece"));
            }
            Ok(())
        });
        assert_eq!(r.unwrap_err().code(), Code::DataLoss);
        assert!(done.len() < 39, "the copy went on: {} pieces", done.len());

        // A copier that panics fails the copy, and every copier panicking
        // does not leave the walk waiting on a full queue.
        let (r, _) = run(|at| {
            if at >= bad {
                panic!("a bug");
            }
            Ok(())
        });
        assert_eq!(r.unwrap_err().code(), Code::Internal);
    }

    #[test]
    fn close_ranges_are_read_as_one_but_never_more_than_one_request_holds() {
        let g = 16 << 10;
        assert_eq!(
            coalesce(
                vec![(0, 4096), (4096 + g, 4096), (3 * g + 8192 + 1, 4096)],
                g
            ),
            vec![(0, g + 8192), (3 * g + 8193, 4096)]
        );
        let big = MAX_IO as u64;
        assert_eq!(
            coalesce(vec![(0, big - 4096), (big, 4096)], g),
            vec![(0, big - 4096), (big, 4096)]
        );
    }

    #[test]
    fn the_gap_is_what_the_link_carries_while_a_request_costs() {
        let s = Duration::from_secs(1);
        // 100 Mbit/s: 2.5 KB in 200 us, so the least.
        assert_eq!(coalesce_gap(12_500_000, s), GAP_MIN);
        // 100 MB/s: 20 KB, whole blocks.
        assert_eq!(coalesce_gap(100_000_000, s), 16 << 10);
        // Loopback: the most.
        assert_eq!(coalesce_gap(2_000_000_000, s), GAP_MAX);
        assert_eq!(coalesce_gap(1 << 20, s), GAP_MAX, "too little to tell");
    }
}
