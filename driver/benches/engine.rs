//! Engine benchmark: prints tables, asserts nothing.
//!
//!     cargo bench -p strata --bench engine [-- SECTION...]
//!
//! Sections: reads, snapshots, memory, flush, syncwrite, open (default:
//! all). The pool
//! lives in `$STRATA_BENCH_DIR` (default: a temporary directory under
//! /var/tmp, so on the machine's disk, not tmpfs).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::engine::{BLOCK_SIZE, Pool, PoolOptions, VolumeId, ZeroFlags};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let base = std::env::var("STRATA_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("strata-bench-")
        .tempdir_in(base)
        .unwrap();
    let path = dir.path().join(name);
    (dir, path)
}

fn fast() -> PoolOptions {
    PoolOptions {
        sync: false,
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// fdatasync latency of the disk under `dir` (4 KiB overwrite + fdatasync).
fn fsync_latency(dir: &Path) -> (Duration, Duration) {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync-probe");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(MIB).unwrap();
    let mut times = Vec::new();
    for i in 0..200u64 {
        f.write_all_at(&[i as u8; 4096], (i % 16) * 4096).unwrap();
        let t = Instant::now();
        f.sync_data().unwrap();
        times.push(t.elapsed());
    }
    std::fs::remove_file(path).unwrap();
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

// ------------------------------------------------------------------ reads

/// A volume of `size` whose data is spread over `depth` layers in runs of
/// `run` blocks: run r is written in layer `r % depth`, so every 16 MiB
/// chunk mixes the layers (with `run = 1`, neighbouring blocks always come
/// from different layers: the most scattered layout there is).
fn spread_volume(pool: &Pool, size: u64, depth: u64, run: u64) -> VolumeId {
    let id = pool.create_volume(size).unwrap().id;
    let vol = pool.volume(id).unwrap();
    let blocks = size / BLOCK_SIZE;
    let mut buf = vec![0u8; (run * BLOCK_SIZE) as usize];
    for layer in 0..depth {
        let mut r = layer;
        while r * run < blocks {
            for k in 0..run {
                let b = r * run + k;
                buf[(k * BLOCK_SIZE) as usize..][..8].copy_from_slice(&b.to_le_bytes());
            }
            vol.write(r * run * BLOCK_SIZE, &buf, false).unwrap();
            r += depth;
        }
        if layer + 1 < depth {
            pool.create_snapshot(id).unwrap();
        }
    }
    vol.flush().unwrap();
    assert_eq!(vol.depth() as u64, depth);
    id
}

/// User and system CPU time of the calling thread.
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// Index lookups/s: random 4 KiB block-status queries, which resolve a block
/// through the index exactly as a read does, without the pread.
fn random_lookups(pool: &Pool, id: VolumeId, ops: u64, seed: u64) -> f64 {
    let vol = pool.volume(id).unwrap();
    let blocks = vol.size() / BLOCK_SIZE;
    let mut rng = Rng(seed);
    let t = Instant::now();
    for _ in 0..ops {
        let b = rng.next() % blocks;
        assert_eq!(
            vol.block_status(b * BLOCK_SIZE, BLOCK_SIZE).unwrap().len(),
            1
        );
    }
    ops as f64 / t.elapsed().as_secs_f64()
}

/// Reads/s, and user and system CPU microseconds per read.
fn random_reads(pool: &Pool, id: VolumeId, ops: u64, seed: u64) -> (f64, f64, f64) {
    let vol = pool.volume(id).unwrap();
    let blocks = vol.size() / BLOCK_SIZE;
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let (u0, s0) = thread_cpu();
    let t = Instant::now();
    for _ in 0..ops {
        let b = rng.next() % blocks;
        vol.read(b * BLOCK_SIZE, &mut buf).unwrap();
        debug_assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), b);
    }
    let elapsed = t.elapsed();
    let (u1, s1) = thread_cpu();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / ops as f64;
    (
        ops as f64 / elapsed.as_secs_f64(),
        per(u1 - u0),
        per(s1 - s0),
    )
}

fn bench_reads() {
    println!("\n## 4 KiB random reads through the engine, by chain depth");
    println!("256 MiB volume whose data is spread over `depth` layers in runs: run r lives");
    println!("in layer r % depth (with 1 MiB runs, each layer holds its own region). Data");
    println!("is in the page cache, so this measures CPU per read: the engine's part (user");
    println!("time: index lookup, locking) and the kernel's (system time: pread, page-cache");
    println!("lookup in the layer file). One thread; 300 000 reads per run; median of 5");
    println!("alternated runs.\n");
    let (_t, dir) = scratch("reads");
    let pool = Pool::open(&dir, fast()).unwrap();
    let depths = [1u64, 16, 64, 256];
    println!(
        "| runs of | depth | reads/s | vs depth 1 | user µs/read | system µs/read | index lookups/s | vs depth 1 |"
    );
    println!(
        "|--------:|------:|--------:|-----------:|-------------:|---------------:|----------------:|-----------:|"
    );
    for run in [256u64, 16, 1] {
        let vols: Vec<VolumeId> = depths
            .iter()
            .map(|&d| spread_volume(&pool, 256 * MIB, d, run))
            .collect();
        let mut results: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); depths.len()];
        let mut lookups: Vec<Vec<f64>> = vec![Vec::new(); depths.len()];
        for round in 0..5 {
            for (i, id) in vols.iter().enumerate() {
                results[i].push(random_reads(&pool, *id, 300_000, 0x5eed + round));
                lookups[i].push(random_lookups(&pool, *id, 300_000, 0x5eed + round));
            }
        }
        for l in lookups.iter_mut() {
            l.sort_by(f64::total_cmp);
        }
        let med: Vec<(f64, f64, f64)> = results
            .iter_mut()
            .map(|r| {
                r.sort_by(|a, b| a.0.total_cmp(&b.0));
                r[2]
            })
            .collect();
        for (i, d) in depths.iter().enumerate() {
            println!(
                "| {} KiB | {d} | {:.0} | {:.2}x | {:.3} | {:.3} | {:.0} | {:.2}x |",
                run * 4,
                med[i].0,
                med[i].0 / med[0].0,
                med[i].1,
                med[i].2,
                lookups[i][2],
                lookups[i][2] / lookups[0][2]
            );
        }
        for id in vols {
            pool.delete_volume(id).unwrap();
        }
    }
}

// -------------------------------------------------------------- snapshots

fn fill(pool: &Pool, id: VolumeId, bytes: u64) {
    let vol = pool.volume(id).unwrap();
    let chunk = vec![0xabu8; (4 * MIB) as usize];
    let mut off = 0;
    while off < bytes {
        vol.write(off, &chunk, false).unwrap();
        off += chunk.len() as u64;
    }
    vol.flush().unwrap();
}

fn op_latencies(pool: &Pool, id: VolumeId, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let vol = pool.volume(id).unwrap();
    let (mut snaps, mut clones) = (Vec::new(), Vec::new());
    for i in 0..n {
        // Something changed since the last snapshot, as in real life.
        vol.write((i as u64 % 16) * BLOCK_SIZE, &[i as u8; 4096], false)
            .unwrap();
        let t = Instant::now();
        let s = pool.create_snapshot(id).unwrap();
        snaps.push(t.elapsed());
        let t = Instant::now();
        let c = pool.clone_snapshot(s.id, None).unwrap();
        clones.push(t.elapsed());
        pool.delete_volume(c.id).unwrap();
        pool.delete_snapshot(s.id).unwrap();
    }
    snaps.sort();
    clones.sort();
    (snaps, clones)
}

fn bench_snapshots() {
    println!("\n## Snapshot and clone latency vs data written (durable pool)");
    let (_t, dir) = scratch("snaps");
    let (f50, f99) = fsync_latency(dir.parent().unwrap());
    println!(
        "This disk's fdatasync (4 KiB overwrite): p50 {}, p99 {}.",
        ms(f50),
        ms(f99)
    );
    println!("Each snapshot follows a 4 KiB write (so it has a flush to do); each clone is");
    println!("of that snapshot. 50 of each per volume.\n");
    let pool = Pool::open(&dir, PoolOptions::default()).unwrap();
    let small = pool.create_volume(4 * GIB).unwrap().id;
    let big = pool.create_volume(4 * GIB).unwrap().id;
    fill(&pool, small, 64 * MIB);
    let t = Instant::now();
    fill(&pool, big, 4 * GIB);
    println!(
        "(wrote and flushed 4 GiB in {:.1} s)\n",
        t.elapsed().as_secs_f64()
    );
    let (s_small, c_small) = op_latencies(&pool, small, 50);
    let (s_big, c_big) = op_latencies(&pool, big, 50);
    println!("| operation | 64 MiB written p50 | p99 | 4 GiB written p50 | p99 | p50 ratio |");
    println!("|-----------|-------------------:|----:|------------------:|----:|----------:|");
    for (name, a, b) in [("snapshot", &s_small, &s_big), ("clone", &c_small, &c_big)] {
        let (a50, b50) = (percentile(a, 0.5), percentile(b, 0.5));
        println!(
            "| {name} | {} | {} | {} | {} | {:.2}x |",
            ms(a50),
            ms(percentile(a, 0.99)),
            ms(b50),
            ms(percentile(b, 0.99)),
            b50.as_secs_f64() / a50.as_secs_f64()
        );
    }
}

// ----------------------------------------------------------------- memory

fn reopen(pool: Pool, dir: &Path) -> Pool {
    pool.close().unwrap();
    Pool::open(dir, fast()).unwrap()
}

/// Index bytes per GiB of one volume, loaded alone after a reopen.
fn per_gib(dir: &Path, build: impl FnOnce(&Pool) -> VolumeId) -> f64 {
    let pool = Pool::open(dir, fast()).unwrap();
    let id = build(&pool);
    let size = pool.volume(id).unwrap().size();
    let pool = reopen(pool, dir);
    pool.volume(id).unwrap();
    pool.index_memory_bytes() as f64 / (size as f64 / GIB as f64)
}

fn bench_memory() {
    println!("\n## Index memory");
    println!("Measured after a restart with only the volume loaded; every shared chunk");
    println!("counted once. 1 GiB = 262 144 blocks; 2 bytes/block = 512 KiB per GiB.\n");
    println!("| 1 GiB volume written as | index bytes per GiB | bytes per block |");
    println!("|-------------------------|--------------------:|----------------:|");
    type Build = Box<dyn Fn(&Pool) -> VolumeId>;
    let cases: Vec<(&str, Build)> = vec![
        (
            "one layer, fully written",
            Box::new(|p: &Pool| spread_volume(p, GIB, 1, 1)),
        ),
        (
            "full base + 4 snapshots of 1% random 4 KiB writes",
            Box::new(|p: &Pool| {
                let id = spread_volume(p, GIB, 1, 1);
                let vol = p.volume(id).unwrap();
                let mut rng = Rng(7);
                for _ in 0..4 {
                    p.create_snapshot(id).unwrap();
                    for _ in 0..(GIB / BLOCK_SIZE / 100) {
                        vol.write(
                            (rng.next() % (GIB / BLOCK_SIZE)) * BLOCK_SIZE,
                            &[1; 4096],
                            false,
                        )
                        .unwrap();
                    }
                }
                id
            }),
        ),
        (
            "alternate blocks from 2 layers",
            Box::new(|p: &Pool| spread_volume(p, GIB, 2, 1)),
        ),
        (
            "blocks round-robin over 256 layers",
            Box::new(|p: &Pool| spread_volume(p, GIB, 256, 1)),
        ),
        (
            "blocks round-robin over 300 layers (worst)",
            Box::new(|p: &Pool| spread_volume(p, GIB, 300, 1)),
        ),
    ];
    for (name, build) in cases {
        let (_t, dir) = scratch("mem");
        let b = per_gib(&dir, build);
        println!(
            "| {name} | {:.0} | {:.4} |",
            b,
            b / (GIB / BLOCK_SIZE) as f64
        );
    }

    println!("\nOne 16 GiB volume, fully written (its 16 MiB chunks each mix 4 layers:");
    println!("1 MiB extents written round-robin by 4 layers, via write-zeroes with NO_HOLE,");
    println!("which allocates without moving data), then 10 snapshots (1 MiB written");
    println!("between them) and 10 clones of them (each writes 4 MiB), all loaded and the");
    println!("10 snapshots open for reading:\n");
    let (_t, dir) = scratch("mem16");
    let pool = Pool::open(&dir, fast()).unwrap();
    let id = pool.create_volume(16 * GIB).unwrap().id;
    let vol = pool.volume(id).unwrap();
    for layer in 0..4u64 {
        let mut e = layer;
        while e < 16 * 1024 {
            vol.write_zeroes(
                e * MIB,
                MIB,
                ZeroFlags {
                    no_hole: true,
                    fast: false,
                },
            )
            .unwrap();
            e += 4;
        }
        pool.create_snapshot(id).unwrap();
    }
    drop(vol);
    let pool = reopen(pool, &dir);
    pool.volume(id).unwrap();
    let alone = pool.index_memory_bytes();
    let vol = pool.volume(id).unwrap();
    let mut snaps = Vec::new();
    for i in 0..10u64 {
        vol.write(i * 97 * MIB, &vec![2u8; MIB as usize], false)
            .unwrap();
        snaps.push(pool.create_snapshot(id).unwrap().id);
    }
    let readers: Vec<_> = snaps
        .iter()
        .map(|s| pool.open_snapshot(*s).unwrap())
        .collect();
    for (i, s) in snaps.iter().enumerate() {
        let c = pool.clone_snapshot(*s, None).unwrap();
        pool.volume(c.id)
            .unwrap()
            .write(i as u64 * 1531 * MIB, &vec![3u8; 4 * MIB as usize], false)
            .unwrap();
    }
    let all = pool.index_memory_bytes();
    println!("| volume alone | volume + 10 snapshots + 10 clones | ratio |");
    println!("|-------------:|----------------------------------:|------:|");
    println!(
        "| {} KiB | {} KiB | {:.2}x |",
        alone / 1024,
        all / 1024,
        all as f64 / alone as f64
    );
    drop(readers);
}

// ------------------------------------------------------------------ flush

/// 4 KiB write + flush in a loop until `until`. `fresh`: every write goes
/// to a block never written before (each flush appends to the journal);
/// otherwise writes cycle over 1024 blocks (after the first pass every
/// write overwrites a block the top layer holds, and the flush is one
/// fdatasync of the data).
fn flush_loop(vol: &strata::engine::Volume, until: Instant, fresh: bool) -> u64 {
    let mut n = 0;
    let buf = vec![5u8; 4096];
    let blocks = vol.size() / BLOCK_SIZE;
    while Instant::now() < until {
        let b = if fresh { n % blocks } else { n % 1024 };
        vol.write(b * BLOCK_SIZE, &buf, false).unwrap();
        vol.flush().unwrap();
        n += 1;
    }
    n
}

fn bench_flush() {
    println!("\n## Flush throughput (group commit)");
    println!("Each writer: 4 KiB write then flush, in a loop, on its own volume, for 3 s.");
    println!("`new blocks`: every write allocates (flush = data fdatasync + journal append);");
    println!("`overwrites`: writes cycle over 1024 blocks the top already holds (flush =");
    println!("one data fdatasync, no presence change).\n");
    println!("| writes | flushes/s, 1 volume | flushes/s, 8 volumes in parallel | ratio |");
    println!("|--------|--------------------:|---------------------------------:|------:|");
    for fresh in [true, false] {
        let (_t, dir) = scratch("flush");
        let pool = Pool::open(&dir, PoolOptions::default()).unwrap();
        let vols: Vec<Arc<strata::engine::Volume>> = (0..8)
            .map(|_| pool.volume(pool.create_volume(GIB).unwrap().id).unwrap())
            .collect();
        let secs = Duration::from_secs(3);
        let single = flush_loop(&vols[0], Instant::now() + secs, fresh) as f64 / secs.as_secs_f64();
        let until = Instant::now() + secs;
        let threads: Vec<_> = vols
            .iter()
            .map(|v| {
                let v = Arc::clone(v);
                std::thread::spawn(move || flush_loop(&v, until, fresh))
            })
            .collect();
        let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let parallel = total as f64 / secs.as_secs_f64();
        let name = if fresh { "new blocks" } else { "overwrites" };
        println!(
            "| {name} | {single:.0} | {parallel:.0} | {:.2}x |",
            parallel / single
        );
    }
}

// -------------------------------------------------------------- syncwrite

/// Latencies of `op(block)` on random blocks of `blocks` for `secs`.
fn timed_ops(blocks: u64, secs: Duration, seed: u64, mut op: impl FnMut(u64)) -> Vec<Duration> {
    let mut rng = Rng(seed);
    let mut lat = Vec::new();
    let until = Instant::now() + secs;
    while Instant::now() < until {
        let t = Instant::now();
        op(rng.next() % blocks);
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

/// A database committing every write: 4 KiB random write then flush, one
/// at a time, on a volume whose flushes log the data in the journal (one
/// fdatasync), on one whose flushes sync the layer file first (two), and
/// on a raw file (pwrite + fdatasync, what qemu-nbd does on a raw image),
/// alternated in rounds.
fn bench_syncwrite() {
    let rounds = 3;
    let secs = Duration::from_secs(3);
    println!("\n## Sync writes: 4 KiB random write + flush, queue depth 1");
    println!(
        "{rounds} alternated rounds of {} s each; `new blocks`: a fresh 1 GiB volume/sparse file;",
        secs.as_secs()
    );
    println!("`overwrites`: 256 MiB written and flushed before. Medians of the rounds' figures.\n");
    println!("| writes | target | ops/s | p50 | p99 | max | vs raw file |");
    println!("|--------|--------|------:|----:|----:|----:|------------:|");
    let buf = vec![7u8; BLOCK_SIZE as usize];
    for fresh in [true, false] {
        let (_t, dir) = scratch("syncwrite");
        let size = if fresh { GIB } else { 256 * MIB };
        let blocks = size / BLOCK_SIZE;
        let mut vols = Vec::new();
        for (name, log) in [("strata, logged", 256 << 10), ("strata, synced", 0)] {
            let pool = Pool::open(
                &dir.join(name.replace([',', ' '], "")),
                PoolOptions {
                    sync_log_bytes: log,
                    ..Default::default()
                },
            )
            .unwrap();
            let vol = pool.volume(pool.create_volume(size).unwrap().id).unwrap();
            if !fresh {
                vol.write(0, &vec![1u8; size as usize], false).unwrap();
                vol.flush().unwrap();
            }
            vols.push((name, pool, vol));
        }
        let raw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("raw.img"))
            .unwrap();
        raw.set_len(size).unwrap();
        if !fresh {
            use std::os::unix::fs::FileExt;
            raw.write_all_at(&vec![1u8; size as usize], 0).unwrap();
            raw.sync_all().unwrap();
        }
        // Per target, per round: ops/s, p50, p99 and max (seconds).
        let mut runs: Vec<(&str, Vec<[f64; 4]>)> = Vec::new();
        for round in 0..rounds {
            let mut figures = |name, lat: Vec<Duration>| {
                let f = [
                    lat.len() as f64 / secs.as_secs_f64(),
                    percentile(&lat, 0.5).as_secs_f64(),
                    percentile(&lat, 0.99).as_secs_f64(),
                    lat.last().unwrap().as_secs_f64(),
                ];
                match runs.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, v)) => v.push(f),
                    None => runs.push((name, vec![f])),
                }
            };
            // Each round starts with another target, so none always
            // follows the same one.
            for t in (0..=vols.len()).map(|i| (i + round as usize) % (vols.len() + 1)) {
                let seed = 11 + round;
                if let Some((name, _, vol)) = vols.get(t) {
                    let lat = timed_ops(blocks, secs, seed, |b| {
                        vol.write(b * BLOCK_SIZE, &buf, false).unwrap();
                        vol.flush().unwrap();
                    });
                    figures(name, lat);
                } else {
                    let lat = timed_ops(blocks, secs, seed, |b| {
                        use std::os::unix::fs::FileExt;
                        raw.write_all_at(&buf, b * BLOCK_SIZE).unwrap();
                        raw.sync_data().unwrap();
                    });
                    figures("raw file", lat);
                }
            }
        }
        let median = |v: &[[f64; 4]], i: usize| -> f64 {
            let mut x: Vec<f64> = v.iter().map(|f| f[i]).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let raw_ops = median(&runs.iter().find(|r| r.0 == "raw file").unwrap().1, 0);
        let writes = if fresh { "new blocks" } else { "overwrites" };
        for (name, v) in &runs {
            let ops = median(v, 0);
            let d = |i| ms(Duration::from_secs_f64(median(v, i)));
            println!(
                "| {writes} | {name} | {ops:.0} | {} | {} | {} | {:.2}x |",
                d(1),
                d(2),
                d(3),
                ops / raw_ops
            );
        }
    }
}

// ------------------------------------------------------------------- open

fn bench_open() {
    println!("\n## Pool open with 200 volumes of 256 layers each (51 200 layers)");
    let (_t, dir) = scratch("open");
    let t = Instant::now();
    let pool = Pool::open(&dir, fast()).unwrap();
    let mut ids = Vec::new();
    for v in 0..200u64 {
        let id = pool.create_volume(GIB).unwrap().id;
        let vol = pool.volume(id).unwrap();
        for l in 0..256u64 {
            vol.write(
                ((v * 7 + l * 4099) % (GIB / BLOCK_SIZE)) * BLOCK_SIZE,
                &[l as u8; 4096],
                false,
            )
            .unwrap();
            if l < 255 {
                pool.create_snapshot(id).unwrap();
            }
        }
        ids.push(id);
    }
    pool.close().unwrap();
    println!(
        "(setup, without fsync: {:.1} s)\n",
        t.elapsed().as_secs_f64()
    );
    // Drop the page cache's copy of the catalog? Not possible without root
    // privileges everywhere; the figure below is with a warm cache.
    let t = Instant::now();
    let pool = Pool::open(&dir, PoolOptions::default()).unwrap();
    let opened = t.elapsed();
    let mut buf = vec![0u8; 4096];
    for id in &ids {
        pool.volume(*id).unwrap().read(0, &mut buf).unwrap();
    }
    let serving = t.elapsed();
    println!("| step | time |");
    println!("|------|-----:|");
    println!(
        "| Pool::open (lock, catalog, journals, orphan sweep) | {} |",
        ms(opened)
    );
    println!(
        "| ... + load all 200 volumes and read a block from each | {} |",
        ms(serving)
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    println!("# Strata engine benchmark");
    println!(
        "command: cargo bench -p strata --bench engine -- {}",
        args.join(" ")
    );
    if want("reads") {
        bench_reads();
    }
    if want("snapshots") {
        bench_snapshots();
    }
    if want("memory") {
        bench_memory();
    }
    if want("flush") {
        bench_flush();
    }
    if want("syncwrite") {
        bench_syncwrite();
    }
    if want("open") {
        bench_open();
    }
}
