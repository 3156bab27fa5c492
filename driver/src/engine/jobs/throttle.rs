//! How jobs share the machine with foreground I/O.
//!
//! - [`Bucket`]: a token bucket of bytes per second. Every job has one and
//!   the node has one; a step waits on both before it runs, so neither one
//!   job nor all jobs together exceed their budget. A reflinked byte moves
//!   no data, so it costs 1/32 of a copied one.
//! - [`Allowance`]: what keeps a merge from starving when the volume is
//!   never idle. While a job works on a volume, the job yields to
//!   foreground I/O (it sleeps between steps when the volume was busy), but
//!   foreground writes draw on an allowance of bytes that only the job's
//!   progress replenishes. Under a write flood the allowance runs out, the
//!   job stops yielding, and writes wait (at most [`Allowance::MAX_WAIT`]
//!   each) until the next step adds to it: the merge always finishes, at the
//!   price of slower writes while it runs.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Cost of a reflinked byte relative to a copied one.
pub(crate) const REFLINK_COST_DIVISOR: u64 = 32;

/// A token bucket of bytes per second (burst: one second's worth).
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub(crate) fn new(bytes_per_sec: u64) -> Self {
        Bucket {
            rate: bytes_per_sec.max(1),
            state: Mutex::new((bytes_per_sec as f64, Instant::now())),
        }
    }

    /// Takes `cost` bytes, sleeping until the bucket has them; returns how
    /// long it waited.
    pub(crate) fn take(&self, cost: u64) -> Duration {
        let wait = self.charge(cost);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        wait
    }

    /// Takes `cost` bytes without waiting: how long the caller must wait
    /// before it uses them.
    pub(crate) fn charge(&self, cost: u64) -> Duration {
        let mut s = self.state.lock().expect("bucket");
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate as f64;
        s.0 = (s.0 + refill).min(self.rate as f64);
        s.1 = now;
        s.0 -= cost as f64;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate as f64)
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Allowance {
    active: AtomicBool,
    bytes: AtomicI64,
    lock: Mutex<()>,
    replenished: Condvar,
    /// Credit at the start, bytes of writes allowed per 4 bytes of
    /// progress, and the least credit a step of progress adds.
    initial: i64,
    quarters: i64,
    floor: i64,
}

impl Default for Allowance {
    fn default() -> Self {
        Self::new(Self::INITIAL, Self::RATIO * 4, 1 << 20)
    }
}

impl Allowance {
    /// Longest a write waits for the job to replenish the allowance.
    pub(crate) const MAX_WAIT: Duration = Duration::from_millis(50);
    /// What writes may do before the job has made any progress.
    const INITIAL: i64 = 64 << 20;
    /// Bytes of writes allowed per byte of job progress.
    pub(crate) const RATIO: i64 = 4;

    /// An allowance of `initial` bytes, then `quarters / 4` bytes of writes
    /// per byte of progress, at least `floor` per step (a live move's ratio
    /// is below 1, so the changes it copies shrink round after round).
    pub(crate) fn new(initial: i64, quarters: i64, floor: i64) -> Self {
        Allowance {
            active: AtomicBool::new(false),
            bytes: AtomicI64::new(0),
            lock: Mutex::new(()),
            replenished: Condvar::new(),
            initial,
            quarters,
            floor,
        }
    }

    /// A job starts working on the volume.
    pub(crate) fn start(&self) {
        self.bytes.store(self.initial, Ordering::Release);
        self.active.store(true, Ordering::Release);
    }

    /// The job is done: writes no longer draw on anything.
    pub(crate) fn stop(&self) {
        self.active.store(false, Ordering::Release);
        let _l = self.lock.lock().expect("allowance");
        self.replenished.notify_all();
    }

    /// A foreground write of `bytes`: free unless a job is running and the
    /// allowance is spent, then it waits for the job (bounded).
    pub(crate) fn consume(&self, bytes: u64) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        if self.bytes.fetch_sub(bytes as i64, Ordering::AcqRel) > 0 {
            return;
        }
        let deadline = Instant::now() + Self::MAX_WAIT;
        let mut l = self.lock.lock().expect("allowance");
        while self.active.load(Ordering::Acquire) && self.bytes.load(Ordering::Acquire) <= 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            l = self.replenished.wait_timeout(l, left).expect("allowance").0;
        }
    }

    /// The job made `bytes` of progress.
    pub(crate) fn replenish(&self, bytes: u64) {
        let add = (bytes as i64).saturating_mul(self.quarters) / 4;
        let add = add.max(self.floor);
        let before = self.bytes.fetch_add(add, Ordering::AcqRel);
        if before <= 0 {
            let _l = self.lock.lock().expect("allowance");
            self.replenished.notify_all();
        }
    }

    /// Whether writes still have credit (so the job may keep yielding).
    pub(crate) fn has_credit(&self) -> bool {
        self.bytes.load(Ordering::Acquire) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_to_its_rate() {
        let b = Bucket::new(10 << 20);
        let t = Instant::now();
        // The first second's worth is a burst; the next 5 MiB take ~0.5 s.
        b.take(10 << 20);
        b.take(5 << 20);
        let e = t.elapsed();
        assert!(
            e >= Duration::from_millis(400) && e < Duration::from_secs(2),
            "{e:?}"
        );
    }

    #[test]
    fn writes_wait_only_when_a_job_runs_and_the_allowance_is_spent() {
        let a = Allowance::default();
        let t = Instant::now();
        a.consume(1 << 30);
        assert!(t.elapsed() < Duration::from_millis(20), "no job: free");
        a.start();
        a.consume(64 << 20);
        assert!(!a.has_credit());
        let t = Instant::now();
        a.consume(4096);
        let waited = t.elapsed();
        assert!(
            waited >= Allowance::MAX_WAIT,
            "spent: the write waits ({waited:?})"
        );
        a.replenish(1 << 20);
        assert!(a.has_credit());
        a.stop();
        let t = Instant::now();
        a.consume(1 << 30);
        assert!(t.elapsed() < Duration::from_millis(20));
    }
}
