//! A group snapshot's cut on one node: the writes to several volumes are
//! held at once ([`Pool::hold_group`]), and a snapshot of each is taken
//! under that one hold ([`Pool::cut_group`]). The controller holds every
//! member on every node before it cuts any (`csi::group`), so no member's
//! snapshot holds a write that was acknowledged after another member's
//! cut: a write that depends on another member's earlier write is either
//! in both snapshots or in neither.
//!
//! The hold is a thread that owns the pool's shape lock and then every
//! member's gate (in volume order, the order snapshots take them in), so
//! no write, discard or zeroing passes, plain reads go on, and no
//! snapshot, clone, merge switch, snapshot opening or changed-block query
//! of this pool runs meanwhile (they wait the few milliseconds of the
//! hold). It ends at the cut, at a release, or by itself at its deadline:
//! a controller that died between the two steps stalls the members'
//! writes for that long at most. A hold that is not in place by its
//! deadline is given up: the thread lets go as soon as it holds the gate
//! it waits for (a write in flight on it finishes), and it does not wait
//! for a gate that a live move's hold owns. The IDs of holds that ended
//! are remembered, so a late or repeated request cannot start one again.
//!
//! Members' data is flushed before the hold, and their new top layer
//! files are made before the cut takes the hold's lock, so the cut costs
//! a flush of what was written in between and a catalog commit per member.
//! Everything here is in memory: a restarted node holds nothing, and a
//! cut after it is refused.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::error::{Error, Result};
use super::ids::{LayerId, SnapshotId, VolumeId};
use super::layer::{create_layer_file, layer_path, remove_quietly};
use super::pool::{Pool, SnapshotInfo, refuse_fetching};
use super::volume::Volume;
use super::{JobKind, JobReason};

/// The group holds of a pool, by the caller's hold ID.
#[derive(Debug, Default)]
pub(crate) struct Holds(Mutex<HoldMap>);

#[derive(Debug, Default)]
struct HoldMap {
    live: HashMap<u64, Arc<Hold>>,
    /// IDs of holds that ended (cut, released, past their deadline), the
    /// latest [`ENDED_KEPT`]: a late or retried call for one is refused,
    /// so it cannot start a hold that nobody will cut.
    ended: VecDeque<u64>,
}

/// How many ended hold IDs a pool remembers.
const ENDED_KEPT: usize = 4096;

impl HoldMap {
    fn mark_ended(&mut self, id: u64) {
        if !self.ended.contains(&id) {
            if self.ended.len() == ENDED_KEPT {
                self.ended.pop_front();
            }
            self.ended.push_back(id);
        }
    }
}

#[derive(Debug)]
struct Hold {
    /// Sorted by ID, no two the same.
    volumes: Vec<Arc<Volume>>,
    phase: Mutex<Phase>,
    changed: Condvar,
}

#[derive(Debug)]
struct Phase {
    asked: Instant,
    /// When every member's writes stopped (the hold's thread owns the
    /// gates from then on, until `ended`).
    held: Option<Instant>,
    ended: bool,
}

impl Pool {
    /// Holds the writes, discards and zeroings of `volumes` (reads go on)
    /// under hold `id`, after flushing them, and answers whether every
    /// write in flight finished within `deadline`; if not, the hold is
    /// given up. Asking again for hold `id` while it is being taken or in
    /// place (a retried call) waits for it likewise; asking for a hold
    /// that ended, or was released before it began, is
    /// [`Error::NotHeld`]. Refused for a volume that is being fetched from
    /// another node or whose writes a move holds, and for a list that
    /// names a volume twice or other volumes than the hold `id` in place.
    pub fn hold_group(&self, id: u64, volumes: &[VolumeId], deadline: Duration) -> Result<bool> {
        let mut sorted = volumes.to_vec();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != volumes.len() || sorted.is_empty() {
            return Err(Error::InvalidGroup(
                "a group hold needs one or more volumes, each named once".into(),
            ));
        }
        let existing = {
            let holds = self.inner().groups.0.lock().expect("holds");
            if holds.ended.contains(&id) {
                return Err(Error::NotHeld(id));
            }
            holds.live.get(&id).cloned()
        };
        let hold = match existing {
            Some(hold) => {
                if hold
                    .volumes
                    .iter()
                    .map(|v| v.id())
                    .ne(sorted.iter().copied())
                {
                    return Err(Error::InvalidGroup(format!(
                        "group hold {id:#x} holds other volumes"
                    )));
                }
                hold
            }
            None => self.start_hold(id, sorted, deadline)?,
        };
        let mut p = hold.phase.lock().expect("hold");
        loop {
            if p.held.is_some() || p.ended {
                return Ok(p.held.is_some() && !p.ended);
            }
            let left = (p.asked + deadline).saturating_duration_since(Instant::now());
            if left.is_zero() {
                p.ended = true;
                hold.changed.notify_all();
                return Ok(false);
            }
            p = hold.changed.wait_timeout(p, left).expect("hold").0;
        }
    }

    /// Flushes `volumes` and starts the thread of hold `id` over them.
    fn start_hold(&self, id: u64, sorted: Vec<VolumeId>, deadline: Duration) -> Result<Arc<Hold>> {
        let mut vols = Vec::with_capacity(sorted.len());
        for v in sorted {
            let vol = self.volume(v)?;
            refuse_fetching(&vol)?;
            vol.check_live()?;
            // Flushed before the hold, so the cut has little to flush.
            vol.flush()?;
            vols.push(vol);
        }
        let hold = Arc::new(Hold {
            volumes: vols,
            phase: Mutex::new(Phase {
                asked: Instant::now(),
                held: None,
                ended: false,
            }),
            changed: Condvar::new(),
        });
        let mut holds = self.inner().groups.0.lock().expect("holds");
        if holds.ended.contains(&id) {
            // Released while this call flushed.
            return Err(Error::NotHeld(id));
        }
        if holds.live.contains_key(&id) {
            return Err(Error::InvalidGroup(format!(
                "group hold {id:#x} was asked for twice at once"
            )));
        }
        holds.live.insert(id, Arc::clone(&hold));
        drop(holds);
        let pool = Pool::internal(Arc::clone(self.inner()));
        let h = Arc::clone(&hold);
        let started = std::thread::Builder::new()
            .name("strata-group-hold".into())
            .spawn(move || pool.keep_hold(id, &h, deadline));
        if let Err(e) = started {
            self.inner()
                .groups
                .0
                .lock()
                .expect("holds")
                .live
                .remove(&id);
            return Err(Error::Io {
                op: "start a group hold",
                path: self.shared().dir.clone(),
                source: e,
            });
        }
        Ok(hold)
    }

    /// The hold's thread: owns the shape lock and the members' gates
    /// until the hold ends. Between two gates it looks whether the hold
    /// ended meanwhile (its deadline, a release) and lets go at once; it
    /// does not take the gate of a volume whose writes a live move holds
    /// (that hold may last seconds).
    fn keep_hold(&self, id: u64, hold: &Hold, deadline: Duration) {
        'hold: {
            let _shape = self.shared().shape.lock().expect("shape lock");
            let mut gates = Vec::with_capacity(hold.volumes.len());
            for v in &hold.volumes {
                if hold.phase.lock().expect("hold").ended {
                    break 'hold;
                }
                if v.writes_hold_asked() {
                    tracing::warn!(
                        hold = format!("{id:#x}"),
                        volume = %v.id(),
                        "a group snapshot's hold gives way to a live move's"
                    );
                    hold.end();
                    break 'hold;
                }
                gates.push(v.gate.write().expect("volume gate"));
            }
            let mut p = hold.phase.lock().expect("hold");
            if !p.ended {
                p.held = Some(Instant::now());
                hold.changed.notify_all();
            }
            while !p.ended {
                let left = (p.asked + deadline).saturating_duration_since(Instant::now());
                if left.is_zero() {
                    tracing::warn!(
                        hold = format!("{id:#x}"),
                        deadline_ms = deadline.as_millis() as u64,
                        "a group snapshot's hold reached its deadline: writes go on"
                    );
                    p.ended = true;
                    break;
                }
                p = hold.changed.wait_timeout(p, left).expect("hold").0;
            }
        }
        hold.end();
        let mut holds = self.inner().groups.0.lock().expect("holds");
        if holds
            .live
            .get(&id)
            .is_some_and(|h| std::ptr::eq(&**h, hold))
        {
            holds.live.remove(&id);
        }
        holds.mark_ended(id);
    }

    /// Takes snapshot `snap` of each member `(volume, snap)` of hold `id`
    /// under that hold, then ends it; the snapshots, and how long the
    /// writes were held. Nothing is taken ([`Error::NotHeld`]) if the hold
    /// is not in place; a member the hold does not cover is
    /// [`Error::InvalidGroup`]. The hold ends on any error too; snapshots
    /// taken before a failing member stay (the caller deletes them, as it
    /// deletes a group it could not finish).
    pub fn cut_group(
        &self,
        id: u64,
        members: &[(VolumeId, SnapshotId)],
    ) -> Result<(Vec<SnapshotInfo>, Duration)> {
        let hold = self
            .inner()
            .groups
            .0
            .lock()
            .expect("holds")
            .live
            .get(&id)
            .cloned();
        let Some(hold) = hold.filter(|h| !h.phase.lock().expect("hold").ended) else {
            return Err(Error::NotHeld(id));
        };
        let mut named: Vec<VolumeId> = members.iter().map(|m| m.0).collect();
        named.sort();
        if hold
            .volumes
            .iter()
            .map(|v| v.id())
            .ne(named.iter().copied())
        {
            hold.end();
            return Err(Error::InvalidGroup(format!(
                "a cut of group hold {id:#x} names each of its volumes once, and no other"
            )));
        }
        let vols: Vec<Arc<Volume>> = members
            .iter()
            .filter_map(|&(v, _)| hold.volumes.iter().find(|h| h.id() == v).cloned())
            .collect();
        let sh = self.shared();
        let mut tops: Vec<LayerId> = Vec::with_capacity(members.len());
        let made = vols.iter().try_for_each(|vol| {
            let top = LayerId::new_random();
            create_layer_file(&*sh.fs, &sh.dir, top, vol.size(), sh.opts.sync)?;
            tops.push(top);
            Ok(())
        });
        let mut p = hold.phase.lock().expect("hold");
        let mut used = 0;
        let result = match (made, p.held.filter(|_| !p.ended)) {
            (Err(e), _) => Err(e),
            (Ok(()), None) => Err(Error::NotHeld(id)),
            (Ok(()), Some(held)) => {
                let mut infos = Vec::with_capacity(members.len());
                let mut failed = None;
                for ((vol, &(_, snap)), &top) in vols.iter().zip(members).zip(&tops) {
                    // The hold's thread owns the shape lock and the gate.
                    match self.freeze_top_gated(vol, top, snap, false) {
                        Ok((info, _)) => {
                            infos.push(info);
                            used += 1;
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    None => Ok((infos, held.elapsed())),
                    Some(e) => Err(e),
                }
            }
        };
        p.ended = true;
        hold.changed.notify_all();
        drop(p);
        // Top files no snapshot took (unless the catalog failed, when
        // whether the last commit landed is unknown: the next open sweeps).
        if !sh.catalog.failed() {
            for top in &tops[used..] {
                remove_quietly(&*sh.fs, &layer_path(&sh.dir, *top));
            }
        }
        let out = result?;
        for vol in &vols {
            // Past the depth limit: shorten the chain in the background
            // (the snapshots are taken: a failure here is only logged).
            let queued = self.max_chain_depth(vol.id()).and_then(|limit| {
                if vol.depth() as u32 > limit {
                    self.enqueue(JobKind::Merge, vol.id().0, 0, JobReason::DepthPolicy)?;
                }
                Ok(())
            });
            if let Err(e) = queued {
                tracing::warn!(volume = %vol.id(), error = %e, "queueing a merge after a group snapshot");
            }
        }
        Ok(out)
    }

    /// Ends hold `id` without a cut; whether it was in place. A hold
    /// that has not begun yet (its HoldGroup is still on its way) never
    /// will.
    pub fn release_group(&self, id: u64) -> bool {
        let hold = {
            let mut holds = self.inner().groups.0.lock().expect("holds");
            let hold = holds.live.get(&id).cloned();
            if hold.is_none() {
                holds.mark_ended(id);
            }
            hold
        };
        hold.is_some_and(|h| h.end())
    }
}

impl Hold {
    /// Ends the hold; whether it was in place.
    fn end(&self) -> bool {
        let mut p = self.phase.lock().expect("hold");
        let was = p.held.is_some() && !p.ended;
        p.ended = true;
        self.changed.notify_all();
        was
    }
}
