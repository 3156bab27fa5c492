//! Crash test: a child process runs a random write / flush / snapshot /
//! clone / delete workload and is SIGKILLed at a random moment, many times
//! in a row on the same pool. After each kill the parent reopens the pool
//! and checks every block of every volume and snapshot:
//!
//! - a block whose last write was followed by a completed flush (or a
//!   snapshot) holds exactly that write;
//! - any other block holds a value that was written there at some point
//!   (or zeros where it was discarded or never written): never garbage,
//!   never another volume's data.
//!
//! Every block written carries a header naming its volume, block number
//! and generation, with a CRC, so "some value written there" is checked
//! exactly. The child reports what it does on stdout: a line *before* each
//! write (it may or may not land) and a line *after* each flush, snapshot
//! or clone returns (it has happened).
//!
//! The child is this test binary re-run with `STRATA_CRASH_CHILD` set; the
//! same test without that variable runs the workload to the end in-process
//! and checks it, so the checker itself is tested without kills.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Rng;
use strata::engine::{BLOCK_SIZE, JobConfig, Pool, PoolOptions, SnapshotId, VolumeId, ZeroFlags};

const VOLUME_BLOCKS: u64 = 1024;
const MAGIC: u64 = 0x5354_5241_5441_4b31;

fn tag(v: VolumeId) -> u64 {
    v.as_u128() as u64
}

/// The content of a written block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    Zero,
    Data {
        tag: u64,
        block: u64,
        generation: u64,
    },
}

fn block_bytes(tag: u64, block: u64, generation: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&tag.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    b[24..32].copy_from_slice(&generation.to_le_bytes());
    Rng::new(tag ^ block.rotate_left(17) ^ generation.rotate_left(40)).fill(&mut b[32..4092]);
    let crc = crc32fast::hash(&b[..4092]);
    b[4092..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn parse_block(b: &[u8]) -> Result<Val, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(Val::Zero);
    }
    let crc = u32::from_le_bytes(b[4092..].try_into().unwrap());
    let magic = u64::from_le_bytes(b[0..8].try_into().unwrap());
    if magic != MAGIC || crc32fast::hash(&b[..4092]) != crc {
        return Err("garbage (bad magic or checksum)".into());
    }
    let f = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap());
    Ok(Val::Data {
        tag: f(8..16),
        block: f(16..24),
        generation: f(24..32),
    })
}

// ---------------------------------------------------------------- child

fn say(out: &mut dyn Write, line: std::fmt::Arguments<'_>) {
    writeln!(out, "@@ {line}").unwrap();
    out.flush().unwrap();
}

/// Pool options of the workload and of the parent: short chains, so merges
/// run (and get killed) all the time.
fn options() -> PoolOptions {
    PoolOptions {
        jobs: JobConfig {
            default_max_chain_depth: 3,
            ..JobConfig::default()
        },
        ..PoolOptions::default()
    }
}

/// Runs the workload: `ops` operations, or forever (until killed).
fn workload(dir: &Path, seed: u64, gen0: u64, ops: Option<u64>, out: &mut dyn Write) {
    let pool = Pool::open(dir, options()).unwrap();
    let mut rng = Rng::new(seed);
    let mut vols: Vec<VolumeId> = pool.list_volumes().unwrap().iter().map(|v| v.id).collect();
    let mut snaps: Vec<SnapshotId> = pool
        .list_snapshots()
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    let mut generation = gen0;
    let mut n = 0;
    while ops.is_none_or(|o| n < o) {
        n += 1;
        let op = rng.below(100);
        if vols.is_empty() || (op < 3 && vols.len() < 5) {
            let v = pool.create_volume(VOLUME_BLOCKS * BLOCK_SIZE).unwrap().id;
            say(out, format_args!("V {v}"));
            vols.push(v);
            continue;
        }
        let v = vols[rng.below(vols.len() as u64) as usize];
        let vol = pool.volume(v).unwrap();
        match op {
            3..=52 => {
                let start = rng.below(VOLUME_BLOCKS - 8);
                let blocks = 1 + rng.below(8);
                generation += 1;
                let fua = rng.chance(5);
                say(out, format_args!("W {v} {start} {blocks} {generation}"));
                let mut data = Vec::new();
                for b in start..start + blocks {
                    data.extend(block_bytes(tag(v), b, generation));
                }
                vol.write(start * BLOCK_SIZE, &data, fua).unwrap();
                if fua {
                    say(out, format_args!("F {v}"));
                }
            }
            53..=62 => {
                let start = rng.below(VOLUME_BLOCKS - 16);
                let blocks = 1 + rng.below(16);
                say(out, format_args!("T {v} {start} {blocks}"));
                let (off, len) = (start * BLOCK_SIZE, blocks * BLOCK_SIZE);
                match rng.below(3) {
                    0 => vol.trim(off, len).unwrap(),
                    k => vol
                        .write_zeroes(
                            off,
                            len,
                            ZeroFlags {
                                no_hole: k == 1,
                                fast: false,
                            },
                        )
                        .unwrap(),
                }
            }
            63..=79 => {
                vol.flush().unwrap();
                say(out, format_args!("F {v}"));
            }
            80..=86 if snaps.len() < 8 => {
                let s = pool.create_snapshot(v).unwrap().id;
                say(out, format_args!("S {v} {s}"));
                snaps.push(s);
            }
            87..=90 if !snaps.is_empty() && vols.len() < 6 => {
                let s = snaps[rng.below(snaps.len() as u64) as usize];
                let c = pool.clone_snapshot(s, None).unwrap().id;
                say(out, format_args!("C {s} {c}"));
                vols.push(c);
            }
            91..=94 if !snaps.is_empty() => {
                let i = rng.below(snaps.len() as u64) as usize;
                let s = snaps.swap_remove(i);
                say(out, format_args!("DS {s}"));
                pool.delete_snapshot(s).unwrap();
                say(out, format_args!("DSOK {s}"));
            }
            // Merges and flattens change no contents: no report needed.
            97 => {
                pool.merge(v, 1 + rng.below(3) as u32).unwrap();
            }
            98 => {
                pool.flatten(v).unwrap();
            }
            95..=96 if vols.len() > 2 => {
                vols.retain(|x| *x != v);
                drop(vol);
                say(out, format_args!("DV {v}"));
                pool.delete_volume(v).unwrap();
                say(out, format_args!("DVOK {v}"));
            }
            _ => {}
        }
    }
    pool.close().unwrap();
}

// ---------------------------------------------------------------- parent

/// What each block of a volume may hold: `[durable, later writes…]`.
#[derive(Default)]
struct Model {
    volumes: HashMap<VolumeId, Vec<Vec<Val>>>,
    snapshots: HashMap<SnapshotId, Vec<Val>>,
    /// Deletions that started and may or may not have finished.
    maybe_deleted_volumes: Vec<VolumeId>,
    maybe_deleted_snapshots: Vec<SnapshotId>,
}

impl Model {
    fn apply(&mut self, line: &str) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let vid = |s: &str| s.parse::<VolumeId>().unwrap();
        let sid = |s: &str| s.parse::<SnapshotId>().unwrap();
        let num = |s: &str| s.parse::<u64>().unwrap();
        match w[0] {
            "V" => {
                self.volumes
                    .insert(vid(w[1]), vec![vec![Val::Zero]; VOLUME_BLOCKS as usize]);
            }
            "W" => {
                let v = vid(w[1]);
                let (start, blocks, generation) = (num(w[2]), num(w[3]), num(w[4]));
                let vol = self
                    .volumes
                    .get_mut(&v)
                    .unwrap_or_else(|| panic!("write to unknown volume: {line}"));
                for b in start..start + blocks {
                    vol[b as usize].push(Val::Data {
                        tag: tag(v),
                        block: b,
                        generation,
                    });
                }
            }
            "T" => {
                let vol = self.volumes.get_mut(&vid(w[1])).unwrap();
                for b in num(w[2])..num(w[2]) + num(w[3]) {
                    vol[b as usize].push(Val::Zero);
                }
            }
            "F" => {
                let vol = self.volumes.get_mut(&vid(w[1]));
                for allowed in vol.unwrap_or_else(|| panic!("flush of unknown volume: {line}")) {
                    let last = *allowed.last().unwrap();
                    *allowed = vec![last];
                }
            }
            "S" => {
                let vol = self.volumes.get_mut(&vid(w[1])).unwrap();
                for allowed in vol.iter_mut() {
                    let last = *allowed.last().unwrap();
                    *allowed = vec![last];
                }
                let exact = vol.iter().map(|a| a[0]).collect();
                self.snapshots.insert(sid(w[2]), exact);
            }
            "C" => {
                let content = &self.snapshots[&sid(w[1])];
                let vol = content.iter().map(|v| vec![*v]).collect();
                self.volumes.insert(vid(w[2]), vol);
            }
            "DS" => {
                self.snapshots.remove(&sid(w[1]));
                self.maybe_deleted_snapshots.push(sid(w[1]));
            }
            "DSOK" => self.maybe_deleted_snapshots.retain(|s| *s != sid(w[1])),
            "DV" => self.maybe_deleted_volumes.push(vid(w[1])),
            "DVOK" => {
                self.volumes.remove(&vid(w[1]));
                self.maybe_deleted_volumes.retain(|v| *v != vid(w[1]));
            }
            other => panic!("unknown report {other:?}"),
        }
    }

    /// Checks the reopened pool against the model, removes what the model
    /// cannot know (objects whose creation or deletion was cut short), and
    /// narrows every block to the value it now has.
    fn verify_and_settle(&mut self, pool: &Pool, ctx: &str) {
        let mut buf = vec![0u8; (VOLUME_BLOCKS * BLOCK_SIZE) as usize];
        for v in std::mem::take(&mut self.maybe_deleted_volumes) {
            if pool.volume(v).is_ok() {
                pool.delete_volume(v).unwrap();
            }
            self.volumes.remove(&v);
        }
        for s in std::mem::take(&mut self.maybe_deleted_snapshots) {
            if pool.snapshot_info(s).is_ok() {
                pool.delete_snapshot(s).unwrap();
            }
        }
        for info in pool.list_volumes().unwrap() {
            if !self.volumes.contains_key(&info.id) {
                pool.delete_volume(info.id).unwrap();
            }
        }
        for info in pool.list_snapshots().unwrap() {
            if !self.snapshots.contains_key(&info.id) {
                pool.delete_snapshot(info.id).unwrap();
            }
        }
        for (v, blocks) in self.volumes.iter_mut() {
            pool.volume(*v)
                .unwrap_or_else(|e| panic!("{ctx}: volume {v}: {e}"))
                .read(0, &mut buf)
                .unwrap();
            for (b, allowed) in blocks.iter_mut().enumerate() {
                let raw = &buf[b * BLOCK_SIZE as usize..(b + 1) * BLOCK_SIZE as usize];
                let got =
                    parse_block(raw).unwrap_or_else(|e| panic!("{ctx}: volume {v} block {b}: {e}"));
                assert!(
                    allowed.contains(&got),
                    "{ctx}: volume {v} block {b} holds {got:?}; allowed {allowed:?} (first is the flushed value)"
                );
                *allowed = vec![got];
            }
        }
        for (s, want) in &self.snapshots {
            pool.open_snapshot(*s).unwrap().read(0, &mut buf).unwrap();
            for (b, want) in want.iter().enumerate() {
                let raw = &buf[b * BLOCK_SIZE as usize..(b + 1) * BLOCK_SIZE as usize];
                let got = parse_block(raw)
                    .unwrap_or_else(|e| panic!("{ctx}: snapshot {s} block {b}: {e}"));
                assert_eq!(got, *want, "{ctx}: snapshot {s} block {b}");
            }
        }
    }
}

fn reports(output: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(output)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once("@@ ").map(|(_, r)| r))
}

fn kill_loop(dir: &Path, rng: &mut Rng, kills: u64, ctx: &str) {
    let mut model = Model::default();
    let exe = std::env::current_exe().unwrap();
    for i in 0..kills {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "workload_without_kills_matches_its_own_reports",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env("STRATA_CRASH_CHILD", dir)
            .env("STRATA_CRASH_SEED", rng.next().to_string())
            .env("STRATA_CRASH_GEN", ((i + 1) << 32).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                lines.push(line.unwrap());
            }
            lines
        });
        std::thread::sleep(Duration::from_millis(30 + rng.below(400)));
        child.kill().unwrap();
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let mut n = 0;
        if std::env::var_os("STRATA_CRASH_TRACE").is_some() {
            eprintln!(
                "--- kill {i}: known volumes {:?}",
                model.volumes.keys().collect::<Vec<_>>()
            );
            for l in &lines {
                eprintln!("{l}");
            }
        }
        // libtest may print its own text on the same line before ours.
        for line in lines
            .iter()
            .filter_map(|l| l.split_once("@@ ").map(|(_, r)| r))
        {
            model.apply(line);
            n += 1;
        }
        let pool = Pool::open(dir, options()).unwrap();
        model.verify_and_settle(&pool, &format!("{ctx}: kill {i} after {n} reports"));
        pool.close().unwrap();
    }
}

#[test]
fn workload_without_kills_matches_its_own_reports() {
    if let Ok(dir) = std::env::var("STRATA_CRASH_CHILD") {
        let seed = std::env::var("STRATA_CRASH_SEED").unwrap().parse().unwrap();
        let generation = std::env::var("STRATA_CRASH_GEN").unwrap().parse().unwrap();
        workload(
            Path::new(&dir),
            seed,
            generation,
            None,
            &mut std::io::stdout(),
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    workload(
        dir.path(),
        Rng::from_env("crash workload").next(),
        1 << 32,
        Some(3000),
        &mut out,
    );
    let mut model = Model::default();
    for line in reports(&out) {
        model.apply(line);
    }
    let pool = Pool::open(dir.path(), options()).unwrap();
    model.verify_and_settle(&pool, "clean run");
    assert!(pool.wait_for_jobs(Duration::from_secs(60)).unwrap());
    model.verify_and_settle(&pool, "clean run, after jobs");
}

#[test]
fn sigkill_at_random_moments_loses_no_flushed_data() {
    let kills = common::steps(40);
    for (fs, scratch) in common::filesystems() {
        let mut rng = Rng::from_env(&format!("crash on {fs}"));
        std::fs::create_dir_all(scratch.path()).unwrap();
        kill_loop(scratch.path(), &mut rng, kills, fs);
    }
}
