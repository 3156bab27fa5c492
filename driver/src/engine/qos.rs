//! Per-volume I/O limits: operations and bytes per second, reads and
//! writes apart, enforced where every frontend's I/O enters the engine
//! (NBD, iSCSI, FUSE, and other nodes' requests, which their owner serves
//! through the same [`super::Volume`]), so one limit holds whatever
//! reaches the volume.
//!
//! Each limit is a GCRA (virtual-scheduling) bucket: a request reserves its
//! cost under the volume's throttle lock and learns when it may go; it
//! waits outside the lock, on its own thread, and requests go in the order
//! they reserved (the volume's queue). A burst of up to [`BURST`] of the
//! rate goes at once after an idle spell. Changing the limits applies to
//! requests that reserve from then on. What the waits add up to is counted
//! per direction, for metrics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The limits of one volume; 0 is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub read_iops: u64,
    pub write_iops: u64,
    pub read_bytes_per_sec: u64,
    pub write_bytes_per_sec: u64,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }
}

/// How far ahead of its rate a volume may run after an idle spell.
pub const BURST: Duration = Duration::from_millis(100);

/// Which way a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// One rate: when the next request would be due at exactly the rate.
#[derive(Debug, Default)]
struct Bucket {
    due: Option<Instant>,
}

impl Bucket {
    /// Reserves `cost` at `rate` per second (0: none): when the request
    /// may go.
    fn reserve(&mut self, now: Instant, cost: u64, rate: u64) -> Instant {
        if rate == 0 {
            return now;
        }
        let due = self.due.map_or(now, |d| d.max(now));
        self.due = Some(due + Duration::from_secs_f64(cost as f64 / rate as f64));
        due.checked_sub(BURST).map_or(now, |t| t.max(now))
    }
}

#[derive(Debug, Default)]
struct State {
    limits: Limits,
    /// Reads: operations, bytes; writes: operations, bytes.
    buckets: [Bucket; 4],
}

/// A volume's limits and its throttle.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    state: Mutex<State>,
    /// Nanoseconds requests waited: reads, writes.
    waited: [AtomicU64; 2],
}

impl Throttle {
    pub(crate) fn limits(&self) -> Limits {
        self.state.lock().expect("throttle").limits
    }

    /// New limits, for requests that reserve from now on.
    pub(crate) fn set(&self, limits: Limits) {
        let mut st = self.state.lock().expect("throttle");
        *st = State {
            limits,
            buckets: Default::default(),
        };
    }

    /// Waits until a request of `bytes` in `direction` may go.
    pub(crate) fn wait(&self, direction: Direction, bytes: u64) {
        let go = {
            let mut st = self.state.lock().expect("throttle");
            if st.limits.is_unlimited() {
                return;
            }
            let l = st.limits;
            let (i, ops, bps) = match direction {
                Direction::Read => (0, l.read_iops, l.read_bytes_per_sec),
                Direction::Write => (2, l.write_iops, l.write_bytes_per_sec),
            };
            let now = Instant::now();
            let a = st.buckets[i].reserve(now, 1, ops);
            let b = st.buckets[i + 1].reserve(now, bytes, bps);
            a.max(b)
        };
        let now = Instant::now();
        if go > now {
            let d = go - now;
            std::thread::sleep(d);
            self.waited[direction as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// Time requests waited: reads, writes.
    pub(crate) fn waited(&self) -> [Duration; 2] {
        [0, 1].map(|i| Duration::from_nanos(self.waited[i].load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 200 writes at 1000 IOPS take about 0.2 s less the burst; bytes
    /// limit as well; reads are apart; no limit waits for nothing; new
    /// limits apply at once.
    #[test]
    fn requests_keep_to_their_rates() {
        let t = Throttle::default();
        let run = |n: u64, bytes: u64, d: Direction| {
            let started = Instant::now();
            for _ in 0..n {
                t.wait(d, bytes);
            }
            started.elapsed()
        };
        assert!(run(1000, 4096, Direction::Write) < Duration::from_millis(50));
        t.set(Limits {
            write_iops: 1000,
            ..Limits::default()
        });
        let took = run(200, 4096, Direction::Write);
        assert!(
            took >= Duration::from_millis(90) && took < Duration::from_millis(400),
            "{took:?}"
        );
        assert!(run(200, 4096, Direction::Read) < Duration::from_millis(50));
        t.set(Limits {
            read_bytes_per_sec: 10 << 20,
            ..Limits::default()
        });
        // 2 MiB at 10 MiB/s: 0.2 s, less the burst's 0.1 s.
        let took = run(32, 64 << 10, Direction::Read);
        assert!(
            took >= Duration::from_millis(90) && took < Duration::from_millis(400),
            "{took:?}"
        );
        let [r, w] = t.waited();
        assert!(r > Duration::ZERO && w > Duration::ZERO, "{r:?} {w:?}");
        t.set(Limits::default());
        assert!(run(1000, 4096, Direction::Read) < Duration::from_millis(50));
    }
}
