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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
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

/// The smallest bytes-per-second limit (0 is none): a largest request
/// (32 MiB) waits at most half a minute.
pub const MIN_BYTES_PER_SEC: u64 = 1 << 20;

impl Limits {
    /// Why these limits cannot be set, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        for (what, v) in [
            ("read bytes per second", self.read_bytes_per_sec),
            ("write bytes per second", self.write_bytes_per_sec),
        ] {
            if v != 0 && v < MIN_BYTES_PER_SEC {
                return Err(format!(
                    "{what} {v}: at least {MIN_BYTES_PER_SEC} (or 0: no limit)"
                ));
            }
        }
        Ok(())
    }
}

/// Which way a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

thread_local! {
    static EXEMPT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` without charging its I/O to any volume's limits: work the
/// node does on its own behalf (a move's or a restore's copy, the parts of
/// one request the engine splits), which a user's limit must not slow.
pub fn exempt<T>(f: impl FnOnce() -> T) -> T {
    let was = EXEMPT.with(|e| e.replace(true));
    let out = f();
    EXEMPT.with(|e| e.set(was));
    out
}

/// One rate: when the next request would be due at exactly the rate.
#[derive(Debug, Default)]
struct Bucket {
    due: Option<Instant>,
}

impl Bucket {
    /// When a request may go by this rate (0: none) at `now`.
    fn go(&self, now: Instant, rate: u64) -> Instant {
        match self.due {
            Some(due) if rate > 0 => due.checked_sub(BURST).map_or(now, |t| t.max(now)),
            _ => now,
        }
    }

    /// Charges `cost` of a request that goes at `at`.
    fn charge(&mut self, at: Instant, cost: u64, rate: u64) {
        if rate > 0 {
            let due = self.due.map_or(at, |d| d.max(at));
            self.due = Some(due + Duration::from_secs_f64(cost as f64 / rate as f64));
        }
    }
}

#[derive(Debug, Default)]
struct State {
    limits: Limits,
    /// Reads: operations, bytes; writes: operations, bytes.
    buckets: [Bucket; 4],
    /// Counts changes of the limits: a waiting request reserves again.
    generation: u64,
}

/// A volume's limits and its throttle.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    state: Mutex<State>,
    changed: Condvar,
    /// Whether any limit is set: the I/O of a volume without one never
    /// takes the lock.
    limited: AtomicBool,
    /// Nanoseconds requests waited: reads, writes.
    waited: [AtomicU64; 2],
}

impl Throttle {
    pub(crate) fn limits(&self) -> Limits {
        self.state.lock().expect("throttle").limits
    }

    /// New limits, for waiting requests and those to come (the same ones
    /// again change nothing).
    pub(crate) fn set(&self, limits: Limits) {
        let mut st = self.state.lock().expect("throttle");
        if st.limits == limits {
            return;
        }
        st.limits = limits;
        self.limited
            .store(!limits.is_unlimited(), Ordering::Release);
        st.buckets = Default::default();
        st.generation += 1;
        self.changed.notify_all();
    }

    /// Waits until a request of `bytes` in `direction` may go (at once
    /// inside [`exempt`]); whether it waited.
    pub(crate) fn wait(&self, direction: Direction, bytes: u64) -> bool {
        if !self.limited.load(Ordering::Acquire) || EXEMPT.with(|e| e.get()) {
            return false;
        }
        let started = Instant::now();
        let mut st = self.state.lock().expect("throttle");
        loop {
            let l = st.limits;
            let (i, ops, bps) = match direction {
                Direction::Read => (0, l.read_iops, l.read_bytes_per_sec),
                Direction::Write => (2, l.write_iops, l.write_bytes_per_sec),
            };
            let now = Instant::now();
            let go = st.buckets[i]
                .go(now, ops)
                .max(st.buckets[i + 1].go(now, bps));
            st.buckets[i].charge(go, 1, ops);
            st.buckets[i + 1].charge(go, bytes, bps);
            let generation = st.generation;
            // Until it may go, or the limits change (then it asks again).
            loop {
                let now = Instant::now();
                if now >= go {
                    drop(st);
                    if go <= started {
                        return false;
                    }
                    self.waited[direction as usize]
                        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    return true;
                }
                st = self.changed.wait_timeout(st, go - now).expect("throttle").0;
                if st.generation != generation {
                    break;
                }
            }
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
        // Exempt work is not charged.
        t.set(Limits {
            write_iops: 10,
            ..Limits::default()
        });
        let started = Instant::now();
        exempt(|| {
            for _ in 0..100 {
                t.wait(Direction::Write, 4096);
            }
        });
        assert!(started.elapsed() < Duration::from_millis(50));
        assert!(
            Limits {
                read_bytes_per_sec: 1000,
                ..Limits::default()
            }
            .check()
            .is_err()
        );
        assert!(
            Limits {
                read_bytes_per_sec: 1 << 20,
                ..Limits::default()
            }
            .check()
            .is_ok()
        );
    }

    /// A request waiting for a low limit goes as soon as the limit is
    /// lifted, not when its old turn comes.
    #[test]
    fn lifting_a_limit_frees_the_waiting_requests() {
        let t = std::sync::Arc::new(Throttle::default());
        t.set(Limits {
            write_iops: 1,
            ..Limits::default()
        });
        t.wait(Direction::Write, 0);
        let waiter = {
            let t = std::sync::Arc::clone(&t);
            std::thread::spawn(move || {
                let started = Instant::now();
                for _ in 0..3 {
                    t.wait(Direction::Write, 0);
                }
                started.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        t.set(Limits::default());
        let took = waiter.join().unwrap();
        assert!(took < Duration::from_millis(600), "{took:?}");
    }
}
