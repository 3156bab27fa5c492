//! Per-volume I/O limits against a noisy neighbour, in the engine (where
//! every frontend's I/O enters), measured in one run; asserts nothing.
//!
//!     cargo bench -p strata --bench qos
//!
//! Two volumes of one pool (on the machine's disk, ext4 here): a noisy
//! one, written by 4 threads as fast as they go (4 KiB random writes with
//! FUA, each durable when it returns), and a quiet one, written by 1
//! thread that measures each 4 KiB random FUA write. Three phases of 3 s:
//! the quiet volume alone, with the noisy one unlimited, and with the
//! noisy one limited to 200 write IOPS. Printed: what the noisy volume
//! achieved against its limit, and the quiet one's latency (p50, p99) and
//! throughput in each phase.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use strata::engine::{Limits, Pool, PoolOptions, VolumePolicy};

const B: u64 = 4096;
const SIZE: u64 = 256 << 20;
const PHASE: Duration = Duration::from_secs(3);

struct Rng(u64);

impl Rng {
    fn block(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % (SIZE / B)) * B
    }
}

/// The quiet volume's FUA write latencies for one phase.
fn quiet(pool: &Pool, v: strata::engine::VolumeId) -> Vec<Duration> {
    let vol = pool.volume(v).unwrap();
    let mut rng = Rng(99);
    let data = vec![5u8; B as usize];
    let mut lat = Vec::new();
    let end = Instant::now() + PHASE;
    while Instant::now() < end {
        let at = rng.block();
        let t = Instant::now();
        vol.write(at, &data, true).unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

fn main() {
    // On the disk, where durable writes contend (not a tmpfs).
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let noisy = pool.create_volume(SIZE).unwrap().id;
    let calm = pool.create_volume(SIZE).unwrap().id;
    // Every block of the quiet volume allocated first, so that no phase
    // pays for first writes the others do not.
    let vol = pool.volume(calm).unwrap();
    for at in (0..SIZE).step_by(1 << 20) {
        vol.write(at, &vec![1u8; 1 << 20], false).unwrap();
    }
    vol.flush().unwrap();
    let limit = 200;
    println!(
        "noisy neighbour: 4 FUA writer threads on one volume, 1 measured FUA writer on another"
    );
    println!(
        "{:<34} {:>12} {:>10} {:>10} {:>12}",
        "phase", "noisy IOPS", "quiet p50", "quiet p99", "quiet ops/s"
    );
    for (phase, noise, limited) in [
        ("quiet volume alone", false, false),
        ("noisy volume unlimited", true, false),
        ("noisy volume at 200 write IOPS", true, true),
    ] {
        let policy = VolumePolicy {
            limits: Limits {
                write_iops: if limited { limit } else { 0 },
                ..Limits::default()
            },
            ..pool.policy(noisy).unwrap()
        };
        pool.set_policy(noisy, policy).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..if noise { 4 } else { 0 })
            .map(|i| {
                let (pool, stop, done) = (pool.clone(), Arc::clone(&stop), Arc::clone(&done));
                std::thread::spawn(move || {
                    let vol = pool.volume(noisy).unwrap();
                    let mut rng = Rng(i + 1);
                    let data = vec![9u8; B as usize];
                    while !stop.load(Ordering::Relaxed) {
                        vol.write(rng.block(), &data, true).unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let started = Instant::now();
        let lat = quiet(&pool, calm);
        let secs = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        let noisy_iops = done.load(Ordering::Relaxed) as f64 / secs;
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
        println!(
            "{:<34} {:>12} {:>8.2}ms {:>8.2}ms {:>12.0}",
            phase,
            if noise {
                format!("{noisy_iops:.0}")
            } else {
                "-".into()
            },
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            lat.len() as f64 / secs
        );
        if limited {
            println!(
                "(the noisy volume got {:.0} write IOPS against its limit of {limit}: {:.3}x)",
                noisy_iops,
                noisy_iops / limit as f64
            );
        }
    }
}
