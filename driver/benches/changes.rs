//! Changed-block tracking from the presence maps (`Pool::snapshot_ranges`,
//! what CSI GetMetadataAllocated and GetMetadataDelta answer from),
//! measured in one run and printed side by side; asserts nothing.
//!
//!     cargo bench -p strata --bench changes
//!
//! Two snapshots of a volume with E single-block writes between them, at
//! random places: the delta between them (every page, 1024 ranges a page,
//! the median of 9 runs) on a 1 TiB sparse volume and on a 1 GiB one with
//! the same E, and with 10x E on the 1 TiB one. The peer is what a backup
//! tool does without changed-block tracking: read both snapshots whole
//! and compare them, on the 1 GiB volume only (on 1 TiB it would read
//! 2 TiB).

use std::time::{Duration, Instant};

use strata::engine::{Pool, PoolOptions, SnapshotId};

const B: u64 = 4096;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A volume of `size` bytes, snapshotted, `extents` blocks written at
/// random, snapshotted again: (base, target).
fn setup(pool: &Pool, size: u64, extents: u64, seed: u64) -> (SnapshotId, SnapshotId) {
    let v = pool.create_volume(size).unwrap().id;
    let vol = pool.volume(v).unwrap();
    let mut rng = Rng(seed);
    let block = vec![0xa5u8; B as usize];
    for _ in 0..extents {
        vol.write(rng.below(size / B) * B, &block, false).unwrap();
    }
    let base = pool.create_snapshot(v).unwrap().id;
    for _ in 0..extents {
        vol.write(rng.below(size / B) * B, &block, false).unwrap();
    }
    let target = pool.create_snapshot(v).unwrap().id;
    (base, target)
}

/// Every page of the delta: (ranges, bytes), and the median time of 9.
fn delta(pool: &Pool, base: SnapshotId, target: SnapshotId) -> (usize, u64, Duration) {
    let mut times = Vec::new();
    let mut found = (0, 0);
    for _ in 0..9 {
        let started = Instant::now();
        let (mut ranges, mut bytes, mut from) = (0, 0, 0);
        loop {
            let page = pool
                .snapshot_ranges(target, Some(base), from, 1024)
                .unwrap();
            ranges += page.ranges.len();
            bytes += page.ranges.iter().map(|r| r.1).sum::<u64>();
            if page.next >= page.size {
                break;
            }
            from = page.next;
        }
        times.push(started.elapsed());
        found = (ranges, bytes);
    }
    times.sort();
    (found.0, found.1, times[times.len() / 2])
}

/// Reads both snapshots whole and counts the 4 KiB blocks that differ.
fn read_and_compare(pool: &Pool, base: SnapshotId, target: SnapshotId) -> (u64, Duration) {
    let started = Instant::now();
    let (a, b) = (
        pool.open_snapshot(base).unwrap(),
        pool.open_snapshot(target).unwrap(),
    );
    let chunk = 4 << 20;
    let (mut x, mut y) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut differ = 0;
    let mut at = 0;
    while at < a.size() {
        let n = chunk.min((a.size() - at) as usize);
        a.read(at, &mut x[..n]).unwrap();
        b.read(at, &mut y[..n]).unwrap();
        differ += x[..n]
            .chunks(B as usize)
            .zip(y[..n].chunks(B as usize))
            .filter(|(p, q)| p != q)
            .count() as u64;
        at += n as u64;
    }
    (differ, started.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let (tib, gib) = (1u64 << 40, 1u64 << 30);
    let e = 1000;
    let big = setup(&pool, tib, e, 7);
    let small = setup(&pool, gib, e, 7);
    let many = setup(&pool, tib, 10 * e, 9);

    println!(
        "changed-block tracking: the delta between two snapshots, E blocks written at random between them"
    );
    println!(
        "{:<44} {:>8} {:>10} {:>12} {:>8}",
        "case", "ranges", "MiB", "time", "ratio"
    );
    let (r_small, b_small, t_small) = delta(&pool, small.0, small.1);
    let row = |what: &str, r: usize, b: u64, t: Duration| {
        println!(
            "{:<44} {:>8} {:>10.2} {:>12} {:>7.2}x",
            what,
            r,
            b as f64 / (1 << 20) as f64,
            ms(t),
            t.as_secs_f64() / t_small.as_secs_f64()
        );
    };
    row("delta, 1 GiB volume, E = 1000", r_small, b_small, t_small);
    let (r, b, t) = delta(&pool, big.0, big.1);
    row("delta, 1 TiB sparse volume, E = 1000", r, b, t);
    let (r, b, t) = delta(&pool, many.0, many.1);
    row("delta, 1 TiB sparse volume, E = 10000", r, b, t);
    let (differ, t) = read_and_compare(&pool, small.0, small.1);
    row(
        "peer: read both and compare, 1 GiB, E = 1000",
        differ as usize,
        differ * B,
        t,
    );
    println!(
        "(ratio: against the delta on the 1 GiB volume; the peer's ranges are differing blocks)"
    );
}
