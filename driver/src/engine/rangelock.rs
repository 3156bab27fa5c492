//! Locks on ranges of blocks.
//!
//! Every mutation of a volume (write, discard, write-zeroes) locks the
//! blocks it touches for the time it takes to change data and index, so
//! that a read-modify-write of a partial block and any other change to the
//! same block never interleave, and so that the order in which changes to a
//! block reach the index is the order in which they reach the journal.
//! Non-overlapping ranges never wait for each other; reads take no lock.
//! Background jobs (merges, moves) will take the same locks.

use std::sync::{Condvar, Mutex};

/// A set of locked block ranges.
#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    held: Mutex<Held>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct Held {
    ranges: Vec<(u64, u64)>,
    /// Threads waiting for a range: releases wake them only if there are
    /// any (an uncontended lock costs no futex call).
    waiters: usize,
}

/// Holds `start..end` until dropped.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Waits until no held range overlaps `start..end`, then holds it.
    pub(crate) fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().expect("range lock");
        while held.ranges.iter().any(|&(s, e)| s < end && start < e) {
            held.waiters += 1;
            held = self.released.wait(held).expect("range lock");
            held.waiters -= 1;
        }
        held.ranges.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().expect("range lock");
        if let Some(i) = held.ranges.iter().position(|r| *r == self.range) {
            held.ranges.swap_remove(i);
        }
        let wake = held.waiters > 0;
        drop(held);
        if wake {
            self.lock.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let lock = Arc::new(RangeLock::default());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (lock, inside) = (Arc::clone(&lock), Arc::clone(&inside));
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = lock.lock(i, i + 10);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn disjoint_ranges_are_held_together() {
        let lock = RangeLock::default();
        let _a = lock.lock(0, 10);
        let _b = lock.lock(10, 20);
    }
}
