//! Group snapshots in the engine: how long a cut holds the members'
//! writes, and what the writers see, against snapshotting the members one
//! after another (not consistent, the peer a driver without group
//! snapshots offers); measured in one run, asserts nothing.
//!
//!     cargo bench -p strata --bench group
//!
//! M volumes (2 and 8) of one pool on the machine's disk, each written by
//! its own thread as fast as it goes (4 KiB random writes with FUA, each
//! durable when it returns). 40 times, 50 ms apart: a group cut
//! (`Pool::hold_group` then `Pool::cut_group`), or M single snapshots in
//! a row. Printed: how long the writes were held (from the moment every
//! write in flight had finished to the end of the cut; for the peer,
//! from the first snapshot's start to the last one's end, the window in
//! which the members' points in time lie), the time of the hold call (a
//! flush of each member, then waiting for the pool's shape lock, which
//! background folds take for their switches, and for the writes in
//! flight) and of the whole group, and the writers' p99 and worst latency
//! over the phase.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use strata::engine::{Pool, PoolOptions, SnapshotId, VolumeId};

const B: u64 = 4096;
const SIZE: u64 = 64 << 20;
const CUTS: usize = 40;

fn pct(v: &[Duration], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3
}

fn main() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    println!("one FUA writer thread per volume; {CUTS} cuts 50 ms apart; times in ms");
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "case", "held p50", "held p99", "hold p50", "all p50", "all p99", "write p99", "write max"
    );
    for members in [2usize, 8] {
        let vols: Vec<VolumeId> = (0..members)
            .map(|_| pool.create_volume(SIZE).unwrap().id)
            .collect();
        for group in [true, false] {
            let stop = Arc::new(AtomicBool::new(false));
            let writers: Vec<_> = vols
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let (pool, stop) = (pool.clone(), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        let vol = pool.volume(v).unwrap();
                        let mut x = i as u64 * 7919 + 1;
                        let data = vec![3u8; B as usize];
                        let mut lat = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let t = Instant::now();
                            vol.write((x % (SIZE / B)) * B, &data, true).unwrap();
                            lat.push(t.elapsed());
                        }
                        lat
                    })
                })
                .collect();
            let (mut held, mut holding, mut call) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..CUTS {
                std::thread::sleep(Duration::from_millis(50));
                let ids: Vec<(VolumeId, SnapshotId)> = vols
                    .iter()
                    .map(|&v| (v, SnapshotId::new_random()))
                    .collect();
                let t = Instant::now();
                if group {
                    let hold = round as u64 + members as u64 * 1000;
                    let only: Vec<VolumeId> = vols.clone();
                    assert!(
                        pool.hold_group(hold, &only, Duration::from_secs(5))
                            .unwrap()
                    );
                    holding.push(t.elapsed());
                    let (_, h) = pool.cut_group(hold, &ids).unwrap();
                    held.push(h);
                } else {
                    for &(v, s) in &ids {
                        pool.create_snapshot_as(v, s).unwrap();
                    }
                    held.push(t.elapsed());
                }
                call.push(t.elapsed());
                for &(_, s) in &ids {
                    pool.delete_snapshot(s).unwrap();
                }
            }
            stop.store(true, Ordering::Relaxed);
            let mut lat: Vec<Duration> = writers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect();
            lat.sort();
            held.sort();
            holding.sort();
            call.sort();
            println!(
                "{:<28} {:>9.2} {:>9.2} {:>9} {:>9.2} {:>9.2} {:>10.2} {:>10.2}",
                format!(
                    "{members} volumes, {}",
                    if group { "group cut" } else { "one by one" }
                ),
                pct(&held, 0.5),
                pct(&held, 0.99),
                if group {
                    format!("{:.2}", pct(&holding, 0.5))
                } else {
                    "-".into()
                },
                pct(&call, 0.5),
                pct(&call, 0.99),
                pct(&lat, 0.99),
                lat.last().unwrap().as_secs_f64() * 1e3
            );
        }
    }
}
