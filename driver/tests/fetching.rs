//! Fetching volumes: volumes whose contents arrive from a backing (another
//! node's copy, in a cluster) while they are in use. Reads, partial
//! writes, discards and block status see the backing until a fill copies
//! it in; a write racing a fill wins; a restart keeps the volume fetching
//! and loses nothing; once finished, the volume never reads its backing
//! again.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use strata::engine::{Backing, Error, Fetched, Pool, PoolOptions, VolumeId, ZeroFlags};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

/// A backing in memory that counts its reads and can be made to fail.
#[derive(Debug)]
struct Mem {
    data: Vec<u8>,
    reads: AtomicU64,
    broken: AtomicBool,
    /// The next read waits until `gate` opens.
    hold_next: AtomicBool,
    held: AtomicBool,
    gate: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    /// The source was deleted: reads fail.
    gone: AtomicBool,
}

impl Mem {
    fn new(seed: u64, len: usize) -> Arc<Self> {
        let mut data = vec![0u8; len];
        common::Rng::new(seed).fill(&mut data);
        Arc::new(Mem {
            data,
            reads: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            hold_next: AtomicBool::new(false),
            held: AtomicBool::new(false),
            gate: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            gone: AtomicBool::new(false),
        })
    }
}

impl Backing for Mem {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> strata::engine::Result<()> {
        if self.hold_next.swap(false, Ordering::AcqRel) {
            self.held.store(true, Ordering::Release);
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        if self.gone.load(Ordering::Acquire) {
            return Err(strata::engine::Error::VolumeNotFound(VolumeId::new_random()));
        }
        assert!(
            !self.broken.load(Ordering::Relaxed),
            "read a backing after the fetch finished"
        );
        self.reads.fetch_add(1, Ordering::Relaxed);
        let at = offset as usize;
        buf.copy_from_slice(&self.data[at..at + buf.len()]);
        Ok(())
    }
}

fn pool(dir: &std::path::Path) -> Pool {
    Pool::open(dir, PoolOptions::default()).expect("open pool")
}

fn read_all(p: &Pool, vid: VolumeId, len: usize) -> strata::engine::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    p.volume(vid)?.read(0, &mut buf)?;
    Ok(buf)
}

#[test]
fn reads_writes_and_discards_see_the_backing_until_it_is_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let vid = VolumeId::new_random();
    // The volume is larger than its backing (it grew): the rest is zeros.
    let backing = Mem::new(3, MIB as usize);
    p.create_fetching_volume(vid, 2 * MIB, b"where from")
        .unwrap();
    assert_eq!(
        p.fetching_volumes().unwrap(),
        [(vid, b"where from".to_vec())]
    );
    let v = p.volume(vid).unwrap();
    assert!(v.fetching());
    // Nothing connected yet: reads of what is not here fail, never zeros.
    let e = read_all(&p, vid, BLOCK).unwrap_err();
    assert!(matches!(e, Error::Fetching { .. }), "{e:?}");
    v.connect_backing(backing.clone()).unwrap();
    let mut model = backing.data.clone();
    model.resize(2 * MIB as usize, 0);
    // Read from the backing once, then kept: the next read stays here.
    // Past the backing, zeros (nothing to keep).
    let head = 16 * BLOCK;
    let read_at = |at: usize, len: usize| {
        let mut buf = vec![0u8; len];
        v.read(at as u64, &mut buf).unwrap();
        buf
    };
    assert!(read_at(0, head) == model[..head]);
    let reads = backing.reads.load(Ordering::Relaxed);
    assert!(reads > 0);
    assert!(read_at(0, head) == model[..head]);
    assert!(read_at(MIB as usize, MIB as usize) == model[MIB as usize..]);
    assert_eq!(
        backing.reads.load(Ordering::Relaxed),
        reads,
        "read the backing again"
    );
    // A read with partial blocks at its ends keeps the whole ones only.
    assert!(read_at(head + 100, 2 * BLOCK) == model[head + 100..head + 100 + 2 * BLOCK]);
    assert!(read_at(head + BLOCK, BLOCK) == model[head + BLOCK..head + 2 * BLOCK]);
    assert_eq!(backing.reads.load(Ordering::Relaxed), reads + 1);
    // As the metrics show them (`strata_volume_fetched_bytes_total`).
    let fetched = |read: usize, kept: usize, copied: u64| Fetched {
        read: read as u64,
        kept: kept as u64,
        copied,
    };
    assert_eq!(
        v.stats().fetched,
        fetched(head + 2 * BLOCK, head + BLOCK, 0)
    );

    // A partial write keeps the backing's bytes around it; a discard
    // reads as zeros, not as the backing; zeroes likewise.
    v.write(100, &[7u8; 50], false).unwrap();
    model[100..150].fill(7);
    v.trim(5 * BLOCK as u64, 2 * BLOCK as u64).unwrap();
    model[5 * BLOCK..7 * BLOCK].fill(0);
    let flags = ZeroFlags {
        no_hole: false,
        fast: false,
    };
    v.write_zeroes(9 * BLOCK as u64 + 10, BLOCK as u64, flags)
        .unwrap();
    model[9 * BLOCK + 10..10 * BLOCK + 10].fill(0);
    assert!(read_at(0, head) == model[..head]);
    // Block status: what may hold data is data, the discard is zero.
    let status = v.block_status(0, 2 * MIB).unwrap();
    let zero: Vec<(u64, bool)> = status.iter().map(|e| (e.len, e.zero)).collect();
    assert_eq!(
        zero,
        [
            (5 * BLOCK as u64, false),
            (2 * BLOCK as u64, true),
            (2 * MIB - 7 * BLOCK as u64, false)
        ]
    );
    // No snapshot or clone of it until it is all here.
    for e in [
        p.create_snapshot(vid).map(drop).unwrap_err(),
        p.clone_volume(vid, None).map(drop).unwrap_err(),
    ] {
        assert!(matches!(e, Error::Fetching { .. }), "{e:?}");
    }

    // The fill copies only what no layer defines, in the backing's range
    // (what a fill charges its budget for up front).
    let absent = v.absent_bytes(0, MIB).unwrap();
    let copied = v.fill(0, 2 * MIB).unwrap();
    assert_eq!(copied, absent);
    // Not the 17 blocks read before (nor the writes among them).
    assert_eq!(copied, MIB - (head + BLOCK) as u64);
    assert_eq!(
        v.stats().fetched,
        fetched(head + 2 * BLOCK, head + BLOCK, copied)
    );
    assert_eq!(
        v.fill(0, 2 * MIB).unwrap(),
        0,
        "a second fill copies nothing"
    );
    p.finish_fetch(&v, v.refetches()).unwrap();
    assert!(!v.fetching());
    assert!(p.fetching_volumes().unwrap().is_empty());
    backing.broken.store(true, Ordering::Relaxed);
    assert!(read_all(&p, vid, model.len()).unwrap() == model);
    p.create_snapshot(vid).unwrap();
    // After a reopen too.
    drop(v);
    p.close().unwrap();
    let p = pool(dir.path());
    assert!(!p.volume(vid).unwrap().fetching());
    assert!(read_all(&p, vid, model.len()).unwrap() == model);
}

#[test]
fn a_restart_keeps_the_volume_fetching_and_every_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let backing = Mem::new(5, 4 * MIB as usize);
    let vid = VolumeId::new_random();
    let mut model = backing.data.clone();
    {
        let p = pool(dir.path());
        p.create_fetching_volume(vid, 4 * MIB, b"r").unwrap();
        let v = p.volume(vid).unwrap();
        v.connect_backing(backing.clone()).unwrap();
        v.fill(0, MIB).unwrap();
        v.write(3 * MIB + 1, &[9u8; 10_000], false).unwrap();
        model[3 * MIB as usize + 1..3 * MIB as usize + 10_001].fill(9);
        v.flush().unwrap();
        drop(v);
        p.close().unwrap();
    }
    let p = pool(dir.path());
    let v = p.volume(vid).unwrap();
    assert!(v.fetching());
    assert!(matches!(
        read_all(&p, vid, model.len()).unwrap_err(),
        Error::Fetching { .. }
    ));
    // What was filled and written before is here without the backing.
    let mut first = vec![0u8; MIB as usize];
    v.read(0, &mut first).unwrap();
    assert!(first == model[..MIB as usize]);
    v.connect_backing(backing.clone()).unwrap();
    let mut second = vec![0u8; MIB as usize];
    v.read(MIB, &mut second).unwrap();
    assert!(second == model[MIB as usize..2 * MIB as usize]);
    let before = backing.reads.load(Ordering::Relaxed);
    let copied = v.fill(0, 4 * MIB).unwrap();
    // Neither the first MiB (filled) nor the second (read, so kept).
    assert!(copied < 2 * MIB, "filled again what was here: {copied}");
    assert!(backing.reads.load(Ordering::Relaxed) > before);
    p.finish_fetch(&v, v.refetches()).unwrap();
    backing.broken.store(true, Ordering::Relaxed);
    assert!(read_all(&p, vid, model.len()).unwrap() == model);
    // Deleting a fetching volume forgets its record.
    let other = VolumeId::new_random();
    p.create_fetching_volume(other, MIB, b"x").unwrap();
    p.delete_volume(other).unwrap();
    assert!(p.fetching_volumes().unwrap().is_empty());
}

/// Fills and reads (which keep what they read from the backing) race
/// writes: the writes win.
#[test]
fn a_write_racing_a_fill_or_a_kept_read_always_wins() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let vid = VolumeId::new_random();
    let size = 8 * MIB as usize;
    let backing = Mem::new(8, size);
    p.create_fetching_volume(vid, size as u64, b"r").unwrap();
    let v = p.volume(vid).unwrap();
    v.connect_backing(backing.clone()).unwrap();
    let writer = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || {
            let mut rng = common::Rng::new(1);
            let mut mine = Vec::new();
            for i in 0..4000u32 {
                let block = rng.below(size as u64 / BLOCK as u64);
                // Half the writes are partial: they read the backing.
                let (at, len) = if i % 2 == 0 {
                    (block * BLOCK as u64, BLOCK)
                } else {
                    (block * BLOCK as u64 + 8, 16)
                };
                let byte = (i % 250) as u8 + 1;
                v.write(at, &vec![byte; len], false).unwrap();
                mine.push((at, len, byte));
            }
            mine
        })
    };
    let reader = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || {
            let mut rng = common::Rng::new(2);
            let mut buf = vec![0u8; 64 * 1024];
            for _ in 0..1000 {
                let at = rng.below(size as u64 - buf.len() as u64);
                v.read(at, &mut buf).unwrap();
            }
        })
    };
    let mut at = 0;
    while at < size as u64 {
        v.fill(at, 64 * 1024).unwrap();
        at += 64 * 1024;
    }
    let mine = writer.join().unwrap();
    reader.join().unwrap();
    let mut model = backing.data.clone();
    // The writes, in their order, over the backing.
    for (at, len, byte) in mine {
        model[at as usize..at as usize + len].fill(byte);
    }
    p.finish_fetch(&v, v.refetches()).unwrap();
    backing.broken.store(true, Ordering::Relaxed);
    let got = read_all(&p, vid, size).unwrap();
    let first = got.iter().zip(&model).position(|(a, b)| a != b);
    assert!(first.is_none(), "differs at byte {first:?}");
}

/// A fetching volume whose backing is not connected (a reload, a failed
/// connect): a fill refuses, and so does the end of the fetch (found by a
/// review: the fill answered success having copied nothing, the fetch
/// ended, and every block read as zeros).
#[test]
fn fill_without_a_connected_backing_must_not_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let vid = VolumeId::new_random();
    let backing = Mem::new(1, MIB as usize);
    p.create_fetching_volume(vid, MIB, b"r").unwrap();
    let v = p.volume(vid).unwrap();
    // Nothing is filled, and the fetch does not end, until it is connected.
    for e in [
        v.fill(0, MIB).unwrap_err(),
        p.finish_fetch(&v, v.refetches()).unwrap_err(),
    ] {
        assert!(matches!(e, Error::Fetching { .. }), "{e:?}");
    }
    v.connect_backing(backing.clone()).unwrap();
    assert_eq!(v.fill(0, MIB).unwrap(), MIB);
    p.finish_fetch(&v, v.refetches()).unwrap();
    let mut got = vec![0u8; MIB as usize];
    v.read(0, &mut got).unwrap();
    assert!(got == backing.data);
}

/// A read racing a fill and the end of the fetch never returns zeros for
/// a block the backing holds (found by a review: the read looked at the
/// fetch state after resolving its blocks).
#[test]
fn a_read_racing_the_end_of_the_fetch_never_returns_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let size = 64 * MIB as usize;
    let backing = Mem::new(7, size);
    let last = size - BLOCK;
    for round in 0..60 {
        let vid = VolumeId::new_random();
        p.create_fetching_volume(vid, size as u64, b"r").unwrap();
        let v = p.volume(vid).unwrap();
        v.connect_backing(backing.clone()).unwrap();
        // All here but the last block: reads spend their time in layer I/O.
        v.fill(0, last as u64).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (v, stop, backing) = (Arc::clone(&v), Arc::clone(&stop), backing.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; size];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) || n < 3 {
                    v.read(0, &mut buf).unwrap();
                    n += 1;
                    if buf[last..] != backing.data[last..] {
                        return Some(n);
                    }
                }
                None
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(3 + round % 7));
        v.fill(last as u64, BLOCK as u64).unwrap();
        p.finish_fetch(&v, v.refetches()).unwrap();
        stop.store(true, Ordering::Relaxed);
        if let Some(n) = reader.join().unwrap() {
            panic!("round {round}, read {n}: the last block read as zeros, not the backing's data");
        }
        p.delete_volume(vid).unwrap();
    }
}

/// A read that waited on the source while the fetch ended, and whose
/// source was deleted meanwhile (as the controller does once the fetch is
/// done), reads what was filled in instead of failing (found in the VM
/// stage: kernel nbd reads of a restored volume failed with EIO).
#[test]
fn a_read_whose_source_went_away_after_the_fetch_ended_reads_what_was_filled() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let size = 4 * MIB as usize;
    let backing = Mem::new(11, size);
    let vid = VolumeId::new_random();
    p.create_fetching_volume(vid, size as u64, b"r").unwrap();
    let v = p.volume(vid).unwrap();
    v.connect_backing(backing.clone()).unwrap();
    backing.hold_next.store(true, Ordering::Release);
    let reader = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; size];
            v.read(0, &mut buf).map(|()| buf)
        })
    };
    while !backing.held.load(Ordering::Acquire) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    v.fill(0, size as u64).unwrap();
    p.finish_fetch(&v, v.refetches()).unwrap();
    backing.gone.store(true, Ordering::Release);
    *backing.gate.lock().unwrap() = true;
    backing.opened.notify_all();
    let got = reader.join().unwrap().expect("the read");
    assert!(got == backing.data, "the read differs from the source");
}

/// A read that got blocks from the source while the fetch ended, and a
/// discard of them came after the end: the read does not keep them (the
/// discard's zeros stay).
#[test]
fn a_read_that_outlives_the_fetch_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let size = 4 * MIB as usize;
    let backing = Mem::new(13, size);
    let vid = VolumeId::new_random();
    p.create_fetching_volume(vid, size as u64, b"r").unwrap();
    let v = p.volume(vid).unwrap();
    v.connect_backing(backing.clone()).unwrap();
    backing.hold_next.store(true, Ordering::Release);
    let reader = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; BLOCK];
            v.read(0, &mut buf).map(|()| buf)
        })
    };
    while !backing.held.load(Ordering::Acquire) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    v.fill(0, size as u64).unwrap();
    p.finish_fetch(&v, v.refetches()).unwrap();
    // After the fetch, a discard records the block absent (zeros).
    v.trim(0, BLOCK as u64).unwrap();
    *backing.gate.lock().unwrap() = true;
    backing.opened.notify_all();
    reader.join().unwrap().expect("the read");
    assert!(
        read_all(&p, vid, BLOCK).unwrap() == vec![0u8; BLOCK],
        "the discard was undone"
    );
}

/// Reads of the source's holes keep them as zeros, allocating nothing;
/// an acknowledgement of a loss that did not happen changes nothing.
#[test]
fn kept_holes_allocate_nothing_and_a_needless_acknowledgement_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let size = MIB as usize;
    let mut backing = Mem::new(17, size);
    Arc::get_mut(&mut backing).unwrap().data[4 * BLOCK..12 * BLOCK].fill(0);
    let vid = VolumeId::new_random();
    p.create_fetching_volume(vid, size as u64, b"r").unwrap();
    let v = p.volume(vid).unwrap();
    v.connect_backing(backing.clone()).unwrap();
    assert!(read_all(&p, vid, size).unwrap() == backing.data);
    assert_eq!(v.absent_bytes(0, size as u64).unwrap(), 0, "not kept");
    let status: Vec<(u64, bool)> = v
        .block_status(0, size as u64)
        .unwrap()
        .iter()
        .map(|e| (e.len, e.zero))
        .collect();
    let b = BLOCK as u64;
    assert_eq!(
        status,
        [(4 * b, false), (8 * b, true), (size as u64 - 12 * b, false)]
    );
    // Unflushed, and no loss recorded: the acknowledgement keeps them.
    p.acknowledge_loss(vid).unwrap();
    assert_eq!(
        v.absent_bytes(0, size as u64).unwrap(),
        0,
        "made absent again"
    );
    v.flush().unwrap();
    p.finish_fetch(&v, v.refetches()).unwrap();
    backing.broken.store(true, Ordering::Relaxed);
    assert!(read_all(&p, vid, size).unwrap() == backing.data);
}
