//! One volume used by many threads at once while snapshots are taken:
//! writers each own a set of blocks and check their own reads exactly;
//! every snapshot must contain, for every block, a write that was issued
//! before the snapshot returned and no older than the last write
//! acknowledged before it was requested.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::Rng;
use strata::engine::{BLOCK_SIZE, Pool, PoolOptions};

const THREADS: u64 = 8;
const BLOCKS_PER_THREAD: u64 = 64;
const BLOCKS: u64 = THREADS * BLOCKS_PER_THREAD;

fn block(b: u64, generation: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK_SIZE as usize];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&generation.to_le_bytes());
    v[16..].fill((generation % 251) as u8);
    v
}

fn generation_of(b: u64, bytes: &[u8]) -> u64 {
    if bytes.iter().all(|&x| x == 0) {
        return 0;
    }
    assert_eq!(
        u64::from_le_bytes(bytes[..8].try_into().unwrap()),
        b,
        "block {b} holds another block's data"
    );
    let g = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    assert!(
        bytes[16..].iter().all(|&x| x == (g % 251) as u8),
        "block {b} is torn"
    );
    g
}

#[test]
fn parallel_writers_and_snapshots_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let id = pool.create_volume(BLOCKS * BLOCK_SIZE).unwrap().id;
    let vol = pool.volume(id).unwrap();
    let issued: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let seed = Rng::from_env("concurrency").next();
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (vol, issued, acked, stop) = (
                Arc::clone(&vol),
                issued.clone(),
                acked.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (t + 1));
                let mut generation = t << 40;
                let mut ops = 0;
                while !stop.load(Ordering::Relaxed) || ops < 500 {
                    ops += 1;
                    let b = t * BLOCKS_PER_THREAD + rng.below(BLOCKS_PER_THREAD);
                    if rng.chance(60) {
                        generation += 1;
                        issued[b as usize].store(generation, Ordering::SeqCst);
                        vol.write(b * BLOCK_SIZE, &block(b, generation), rng.chance(3))
                            .unwrap();
                        acked[b as usize].store(generation, Ordering::SeqCst);
                    } else if rng.chance(90) {
                        let mut buf = vec![0u8; BLOCK_SIZE as usize];
                        vol.read(b * BLOCK_SIZE, &mut buf).unwrap();
                        assert_eq!(
                            generation_of(b, &buf),
                            acked[b as usize].load(Ordering::SeqCst)
                        );
                    } else {
                        vol.flush().unwrap();
                    }
                }
                ops
            })
        })
        .collect();
    let mut snapshots = 0;
    for round in 0..40 {
        let lower: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        let snap = pool.create_snapshot(id).unwrap();
        let upper: Vec<u64> = issued.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        let reader = pool.open_snapshot(snap.id).unwrap();
        let mut buf = vec![0u8; (BLOCKS * BLOCK_SIZE) as usize];
        reader.read(0, &mut buf).unwrap();
        for b in 0..BLOCKS {
            let g = generation_of(
                b,
                &buf[(b * BLOCK_SIZE) as usize..((b + 1) * BLOCK_SIZE) as usize],
            );
            let (lo, hi) = (lower[b as usize], upper[b as usize]);
            assert!(
                g >= lo && g <= hi,
                "round {round}: snapshot block {b} holds generation {g}, outside {lo}..={hi}"
            );
        }
        if round % 3 == 0 {
            pool.delete_snapshot(snap.id).unwrap();
        }
        snapshots += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let total: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(snapshots == 40 && total >= THREADS * 500);
}

/// COMPARE AND WRITE is atomic: threads that each add to one counter by
/// compare-and-write (retrying on a miscompare) lose no increment, also
/// while plain writes hit the neighbouring bytes of the same block.
#[test]
fn compare_and_write_loses_no_update() {
    const ADDERS: u64 = 4;
    const EACH: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let vol = pool.create_volume(1 << 20).unwrap().id;
    let v = pool.volume(vol).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let neighbour = {
        let (v, stop) = (Arc::clone(&v), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u8;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(1);
                // Bytes 100..200 of the counter's block, never the counter.
                v.write(100, &[n; 100], false).unwrap();
            }
        })
    };
    let adders: Vec<_> = (0..ADDERS)
        .map(|_| {
            let v = Arc::clone(&v);
            std::thread::spawn(move || {
                let mut done = 0;
                while done < EACH {
                    let mut old = [0u8; 8];
                    v.read(0, &mut old).unwrap();
                    let new = (u64::from_le_bytes(old) + 1).to_le_bytes();
                    if v.compare_and_write(0, &old, &new, false).unwrap().is_none() {
                        done += 1;
                    }
                }
            })
        })
        .collect();
    for a in adders {
        a.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    neighbour.join().unwrap();
    let mut count = [0u8; 8];
    v.read(0, &mut count).unwrap();
    assert_eq!(u64::from_le_bytes(count), ADDERS * EACH);
    // A miscompare writes nothing and names the first differing byte.
    let differs = v.compare_and_write(0, &[0xff; 8], &[0; 8], false).unwrap();
    assert_eq!(differs, Some(0));
    v.read(0, &mut count).unwrap();
    assert_eq!(u64::from_le_bytes(count), ADDERS * EACH);
}
