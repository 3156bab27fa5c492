//! What a volume does for a live move to another node (the controller's
//! side: `cluster::moves`): while the target copies it, the volume records
//! which blocks change ([`Volume::track_changes`], [`Volume::take_changes`]);
//! for the last delta it holds new writes and drains those in flight
//! ([`Volume::hold_writes`], with a deadline after which it lets them go on
//! by itself); and once the target has everything, it is *retired*: every
//! later call fails with [`Error::Moved`], which the node's frontends wait
//! out until the attachment follows the new owner.
//!
//! While changes are recorded, writes draw on an allowance that the copy
//! replenishes with half the bytes it takes: under a write flood, writes
//! wait (at most 50 ms each) so every round is smaller than the last, and
//! the move converges whatever the write rate.
//!
//! A block is marked changed after its new contents are in the index, so a
//! copy that read the block before the mark reads it again in a later
//! round. Everything here is in memory: a restarted source knows of no
//! move, and the target's copy starts over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::error::{Error, Result};
use super::geometry::BLOCK_SIZE;
use super::jobs::throttle::Allowance;
use super::volume::Volume;

/// A volume's live-move state.
#[derive(Debug)]
pub(crate) struct MoveState {
    tracking: AtomicBool,
    /// What writes may do while a move copies: half of what the copy took
    /// (see `jobs::throttle`), so its rounds shrink whatever the write
    /// rate.
    pub(crate) allowance: Allowance,
    changed: Mutex<Option<ChangeMap>>,
    hold: Mutex<Hold>,
    released: Condvar,
    retired: AtomicBool,
    moved_to: Mutex<String>,
}

impl Default for MoveState {
    fn default() -> Self {
        MoveState {
            tracking: AtomicBool::new(false),
            allowance: Allowance::new(16 << 20, 2, 64 << 10),
            changed: Mutex::default(),
            hold: Mutex::default(),
            released: Condvar::new(),
            retired: AtomicBool::new(false),
            moved_to: Mutex::default(),
        }
    }
}

#[derive(Debug, Default)]
struct Hold {
    /// When the current hold was asked for (`None`: writes flow).
    since: Option<Instant>,
    /// The hold's thread owns the gate: every write that passed it has
    /// finished, and none can start.
    held: bool,
}

/// One bit per block: changed since the last [`Volume::take_changes`].
#[derive(Debug)]
struct ChangeMap {
    blocks: u64,
    /// The last batch handed out (runs of blocks) and its number: put back
    /// unless the next take confirms it (a lost answer loses nothing).
    batch: u64,
    out: Vec<(u64, u64)>,
    bits: Vec<u64>,
    /// No bit is set below this word (where the next take starts looking).
    first: usize,
}

impl ChangeMap {
    fn new(blocks: u64) -> Self {
        ChangeMap {
            blocks,
            batch: 0,
            out: Vec::new(),
            bits: vec![0; blocks.div_ceil(64) as usize],
            first: usize::MAX,
        }
    }

    fn mark(&mut self, first: u64, end: u64) {
        let end = end.min(self.blocks);
        let mut b = first;
        if b < end {
            self.first = self.first.min((b / 64) as usize);
        }
        // A word at a time.
        while b < end {
            let (w, bit) = ((b / 64) as usize, b % 64);
            let n = (64 - bit).min(end - b);
            let ones = if n == 64 { u64::MAX } else { (1 << n) - 1 };
            self.bits[w] |= ones << bit;
            b += n;
        }
    }

    /// Whether every change was handed out and confirmed.
    fn drained(&self) -> bool {
        self.first == usize::MAX && self.out.is_empty()
    }

    /// Confirms batch `confirmed` (or puts the last batch back), then
    /// clears and returns up to `max` runs of changed blocks, in order, as
    /// the next batch.
    fn next_batch(&mut self, confirmed: u64, max: usize) -> (u64, Vec<(u64, u64)>) {
        for (b, n) in std::mem::take(&mut self.out) {
            if confirmed != self.batch {
                self.mark(b, b + n);
            }
        }
        self.out = self.take(max);
        self.batch += 1;
        (self.batch, self.out.clone())
    }

    /// Clears and returns up to `max` runs of changed blocks, in order.
    fn take(&mut self, max: usize) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut w = self.first;
        while w < self.bits.len() {
            let word = std::mem::take(&mut self.bits[w]);
            let mut rest = word;
            while rest != 0 {
                let bit = u64::from(rest.trailing_zeros());
                let b = w as u64 * 64 + bit;
                let full = runs.len() == max;
                match runs.last_mut() {
                    Some((s, n)) if *s + *n == b => *n += 1,
                    _ if full => {
                        // Put back what this take does not return.
                        self.bits[w] = rest;
                        self.first = w;
                        return runs;
                    }
                    _ => runs.push((b, 1)),
                }
                rest &= rest - 1;
            }
            w += 1;
        }
        self.first = usize::MAX;
        runs
    }
}

impl MoveState {
    /// Called by every change of blocks `first..end`, after the index
    /// shows it.
    pub(crate) fn changed(&self, first: u64, end: u64) {
        if self.tracking.load(Ordering::Acquire)
            && let Some(map) = self.changed.lock().expect("changes").as_mut()
        {
            map.mark(first, end);
        }
    }

    /// Fails a call on a volume that moved to another node.
    pub(crate) fn check(&self, volume: super::ids::VolumeId) -> Result<()> {
        if self.retired.load(Ordering::Acquire) {
            return Err(Error::Moved {
                volume,
                node: self.moved_to.lock().expect("moved to").clone(),
            });
        }
        Ok(())
    }
}

impl Volume {
    /// Starts recording which blocks change (a no-op if it records
    /// already); the copy that relies on it starts after this returns.
    pub fn track_changes(&self) {
        let mut map = self.moving.changed.lock().expect("changes");
        if map.is_none() {
            *map = Some(ChangeMap::new(self.size().div_ceil(BLOCK_SIZE)));
            self.moving.tracking.store(true, Ordering::Release);
            self.moving.allowance.start();
        }
    }

    /// Stops recording changes and forgets them.
    pub fn untrack_changes(&self) {
        let mut map = self.moving.changed.lock().expect("changes");
        self.moving.tracking.store(false, Ordering::Release);
        self.moving.allowance.stop();
        *map = None;
    }

    /// The next batch of byte ranges changed (at most `max`), after the
    /// batch `confirmed` (the caller copied it; any other number puts the
    /// last batch back): its number and ranges, cleared from the record.
    /// `None` if changes are not recorded.
    pub fn take_changes(&self, confirmed: u64, max: usize) -> Option<(u64, Vec<(u64, u64)>)> {
        let mut map = self.moving.changed.lock().expect("changes");
        let (batch, runs) = map.as_mut()?.next_batch(confirmed, max);
        let ranges: Vec<(u64, u64)> = runs
            .into_iter()
            .map(|(b, n)| {
                let start = b * BLOCK_SIZE;
                (start, (n * BLOCK_SIZE).min(self.size() - start))
            })
            .collect();
        self.moving
            .allowance
            .replenish(ranges.iter().map(|r| r.1).sum());
        Some((batch, ranges))
    }

    /// Holds every new write, discard and zeroing (reads go on) and waits
    /// until those in flight finished; whether that happened within
    /// `deadline` (a hold asked for already is waited for, not asked
    /// again). The hold ends by itself `deadline` after it was asked for,
    /// unless [`Volume::retire_held`] or [`Volume::release_writes`] ended
    /// it first.
    pub fn hold_writes(self: &Arc<Self>, deadline: Duration) -> bool {
        let mut h = self.moving.hold.lock().expect("hold");
        if h.since.is_none() {
            h.held = false;
            let (vol, since) = (Arc::clone(self), Instant::now());
            h.since = Some(since);
            std::thread::spawn(move || vol.hold_thread(since, deadline));
        }
        let since = h.since.expect("asked");
        loop {
            if h.held || h.since != Some(since) {
                return h.held;
            }
            let left = (since + deadline).saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            h = self.moving.released.wait_timeout(h, left).expect("hold").0;
        }
    }

    /// Owns the gate (so writes wait) until the hold ends.
    fn hold_thread(&self, since: Instant, deadline: Duration) {
        let _gate = self.gate.write().expect("volume gate");
        let mut h = self.moving.hold.lock().expect("hold");
        if h.since != Some(since) {
            // Ended (or replaced) before the writes in flight drained.
            return;
        }
        h.held = true;
        self.moving.released.notify_all();
        while h.since == Some(since) {
            let left = (since + deadline).saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(volume = %self.id(), deadline_ms = deadline.as_millis() as u64, "a move's hold reached its deadline: writes go on");
                h.since = None;
                break;
            }
            h = self.moving.released.wait_timeout(h, left).expect("hold").0;
        }
        h.held = false;
        self.moving.released.notify_all();
    }

    /// Whether a hold of writes was asked for and has not ended (it may
    /// still wait for the writes in flight).
    pub fn writes_hold_asked(&self) -> bool {
        self.moving.hold.lock().expect("hold").since.is_some()
    }

    /// Whether writes are held now.
    pub fn writes_held(&self) -> bool {
        self.moving.hold.lock().expect("hold").held
    }

    /// Ends a hold (writes go on); how long it lasted, if there was one.
    pub fn release_writes(&self) -> Option<Duration> {
        let mut h = self.moving.hold.lock().expect("hold");
        let since = h.since.take()?;
        self.moving.released.notify_all();
        Some(since.elapsed())
    }

    /// The end of a live move: if writes are held and every change was
    /// handed out and confirmed, runs `durable` (the record that the
    /// volume moved to `node`), then retires the volume and ends the hold
    /// (the held calls fail with [`Error::Moved`]); how long the hold
    /// lasted. Otherwise nothing is done, and `Err` says why.
    pub fn retire_held(
        &self,
        node: &str,
        durable: impl FnOnce() -> Result<()>,
    ) -> Result<std::result::Result<Duration, &'static str>> {
        let mut h = self.moving.hold.lock().expect("hold");
        let Some(since) = h.since.filter(|_| h.held) else {
            return Ok(Err("writes are not held (the hold reached its deadline)"));
        };
        let drained = self
            .moving
            .changed
            .lock()
            .expect("changes")
            .as_ref()
            .is_some_and(ChangeMap::drained);
        if !drained {
            return Ok(Err("the target has not confirmed every change"));
        }
        durable()?;
        self.retire(node);
        h.since = None;
        self.moving.released.notify_all();
        drop(h);
        self.untrack_changes();
        Ok(Ok(since.elapsed()))
    }

    /// Every later call fails with [`Error::Moved`] (the volume moved to
    /// `node`); also for a copy the catalog records as moved, when opened.
    pub fn retire(&self, node: &str) {
        *self.moving.moved_to.lock().expect("moved to") = node.to_string();
        self.moving.retired.store(true, Ordering::Release);
    }

    /// Undoes [`Volume::retire`] (a move rolled back).
    pub fn unretire(&self) {
        self.moving.retired.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::ChangeMap;

    #[test]
    fn changes_come_back_as_ordered_runs_at_most_max_at_a_time_and_then_are_gone() {
        let mut m = ChangeMap::new(300);
        m.mark(3, 5);
        m.mark(63, 66);
        m.mark(200, 201);
        m.mark(299, 300);
        m.mark(4, 6);
        assert_eq!(m.take(2), vec![(3, 3), (63, 3)]);
        m.mark(0, 1);
        assert_eq!(m.take(10), vec![(0, 1), (200, 1), (299, 1)]);
        assert_eq!(m.take(10), vec![]);
        // A batch not confirmed comes back in the next one.
        m.mark(10, 12);
        let (b1, out) = m.next_batch(0, 10);
        assert_eq!(out, vec![(10, 2)]);
        m.mark(20, 21);
        assert_eq!(m.next_batch(b1 + 7, 10).1, vec![(10, 2), (20, 1)]);
        assert!(!m.drained());
        let (b3, _) = m.next_batch(0, 10);
        let (_, out) = m.next_batch(b3, 10);
        assert!(out.is_empty() && m.drained());
        // Past the end: ignored, never a panic.
        m.mark(299, 400);
        assert_eq!(m.take(10), vec![(299, 1)]);
    }
}
