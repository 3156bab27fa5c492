//! The engine's error paths, call by call. The pool runs on `FaultFs` (a
//! filesystem in memory, `engine/io/fault.rs`); one workload (writes, FUA,
//! flushes, trims, snapshots, clones of snapshots and of volumes, deletes,
//! a fold, a merge, an expansion) is run once to count the filesystem
//! calls it makes, then once per call N:
//!
//! - **error**: call N fails (EIO; ENOSPC where the call allocates), the
//!   workload goes on as a client would, then the power goes;
//! - **power cut**: the power goes at call N (every write no fsync made
//!   durable, every name no directory fsync made durable, is gone);
//!
//! and the pool is opened again from what is left. Then: it opens; every
//! volume and snapshot whose creation was acknowledged (and not its
//! deletion) is there, and nothing whose deletion was; every block reads
//! what the last write acknowledged by a flush wrote, or a later write
//! (acknowledged or failed), never anything else (each write has its own
//! pattern, so data of another block, volume or time is caught); `pool
//! check` is clean except for what it says was lost; and the pool takes
//! writes again.
//!
//! `STRATA_FAULT_STRIDE=k` tries every k-th call only (for a quick look);
//! `STRATA_SOAK_STEPS` multiplies the workload (longer, more calls).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use strata::engine::io::fault::{Fail, FaultFs, Op};
use strata::engine::{
    BlockRange, ErrorKind, JobConfig, Pool, PoolOptions, SnapshotId, VolumeId, ZeroFlags,
    check::check_pool_on,
};

const POOL: &str = "/data/pool";
const RUN: &str = "/run/strata";
const BLOCK: u64 = 4096;

/// A write's contents: its tag in every 4-byte word (tag 0: zeros).
fn pattern(tag: u32) -> Vec<u8> {
    tag.to_le_bytes().repeat((BLOCK / 4) as usize)
}

fn tag_of(block: &[u8]) -> Option<u32> {
    let tag = u32::from_le_bytes(block[..4].try_into().unwrap());
    (block == pattern(tag)).then_some(tag)
}

/// What a block may read: the tags flushed writes left (`durable`: more
/// than one when a write failed around the flush) and those of every write
/// since (acknowledged or not).
#[derive(Debug, Clone)]
struct Block {
    durable: BTreeSet<u32>,
    since: Vec<(u32, bool)>,
}

impl Block {
    fn zero() -> Self {
        Block {
            durable: BTreeSet::from([0]),
            since: Vec::new(),
        }
    }

    fn allows(&self, tag: u32) -> bool {
        self.durable.contains(&tag) || self.since.iter().any(|(t, _)| *t == tag)
    }

    /// A flush that returned success: every acknowledged write is durable.
    fn flushed(&mut self) {
        match self.since.iter().rposition(|(_, acked)| *acked) {
            Some(last) => {
                self.durable = self.since[last..].iter().map(|(t, _)| *t).collect();
            }
            None => self.durable.extend(self.since.iter().map(|(t, _)| *t)),
        }
        self.since.clear();
    }

    /// Exactly what a reader of the live volume may see now: the last
    /// acknowledged write, or failed ones after it.
    fn now(&self) -> Block {
        let mut b = self.clone();
        b.flushed();
        b
    }
}

#[derive(Debug, Clone)]
struct VolModel {
    /// Its creation was acknowledged (else it may or may not exist).
    sure: bool,
    /// Its size in blocks: at least the first, at most the second (an
    /// expansion that failed may or may not have happened).
    blocks: (u64, u64),
    data: Vec<Block>,
}

#[derive(Debug, Default)]
struct Model {
    volumes: BTreeMap<u128, VolModel>,
    /// Volumes whose deletion was acknowledged.
    gone: BTreeSet<u128>,
    snapshots: BTreeMap<u128, VolModel>,
    gone_snapshots: BTreeSet<u128>,
    next_tag: u32,
    /// Errors the workload saw (for the summary).
    errors: usize,
    /// Errors of a kind no filesystem failure may turn into.
    wrong: Vec<String>,
}

impl Model {
    fn tag(&mut self) -> u32 {
        self.next_tag += 1;
        self.next_tag
    }
}

fn opts(disk: &FaultFs) -> PoolOptions {
    PoolOptions {
        fs: disk.process(),
        unflushed_dir: Some(Path::new(RUN).join("unflushed")),
        reserve_bytes: Some(0),
        journal_checkpoint_bytes: 2048,
        // Flushes of one or two blocks log their data in the journal;
        // larger ones sync the layer files: the workload runs both.
        sync_log_bytes: 8192,
        jobs: JobConfig {
            background: false,
            job_bytes_per_sec: 1 << 40,
            node_bytes_per_sec: 1 << 40,
            step_bytes: 16 << 10,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A disk with `/data` (where the pool goes) and `/run` (a tmpfs) made
/// durably, as a booted system has them.
fn new_disk() -> FaultFs {
    let disk = FaultFs::new();
    let fs = disk.process();
    for d in ["/data", RUN] {
        fs.create_dir_all(Path::new(d)).unwrap();
    }
    for d in ["/", "/run"] {
        fs.sync_dir(Path::new(d)).unwrap();
    }
    disk.volatile(Path::new(RUN));
    disk
}

/// Counts an error, and notes one of a kind no filesystem failure may
/// turn into.
fn failed(m: &mut Model, what: &str, e: strata::engine::Error) {
    m.errors += 1;
    if !matches!(
        e.kind(),
        ErrorKind::Io | ErrorKind::NoSpace | ErrorKind::Corrupt | ErrorKind::NotFound
    ) {
        m.wrong.push(format!(
            "{what}: an I/O failure came back as {:?}: {e}",
            e.kind()
        ));
    }
}

fn vid(n: u128) -> VolumeId {
    VolumeId::from_u128(n)
}

/// Writes `tag` to blocks `first..first+n` of volume `v`.
fn write(pool: &Pool, m: &mut Model, v: u128, first: u64, n: u64, fua: bool) {
    let tag = m.tag();
    let data: Vec<u8> = (0..n).flat_map(|_| pattern(tag)).collect();
    let r = pool
        .volume(vid(v))
        .and_then(|vol| vol.write(first * BLOCK, &data, fua));
    let acked = r.is_ok();
    let vm = m.volumes.get_mut(&v).expect("modelled");
    for b in first..first + n {
        vm.data[b as usize].since.push((tag, acked));
        if acked && fua {
            vm.data[b as usize].flushed();
        }
    }
    if fua && acked {
        // FUA flushes everything acknowledged before.
        for b in &mut vm.data {
            b.flushed();
        }
    }
    if let Err(e) = r {
        failed(m, "write", e);
    }
}

fn zero(pool: &Pool, m: &mut Model, v: u128, first: u64, n: u64, trim: bool) {
    let r = pool.volume(vid(v)).and_then(|vol| {
        if trim {
            vol.trim(first * BLOCK, n * BLOCK)
        } else {
            vol.write_zeroes(first * BLOCK, n * BLOCK, ZeroFlags::default())
        }
    });
    let acked = r.is_ok();
    let vm = m.volumes.get_mut(&v).expect("modelled");
    for b in first..first + n {
        vm.data[b as usize].since.push((0, acked));
    }
    if let Err(e) = r {
        failed(m, "zero", e);
    }
}

fn flush(pool: &Pool, m: &mut Model, v: u128) {
    match pool.volume(vid(v)).and_then(|vol| vol.flush()) {
        Ok(()) => {
            for b in &mut m.volumes.get_mut(&v).expect("modelled").data {
                b.flushed();
            }
        }
        Err(e) => failed(m, "flush", e),
    }
}

fn create(pool: &Pool, m: &mut Model, v: u128, blocks: u64) {
    let r = pool.create_volume_as(vid(v), blocks * BLOCK);
    m.volumes.insert(
        v,
        VolModel {
            sure: r.is_ok(),
            blocks: (blocks, blocks),
            data: vec![Block::zero(); blocks as usize],
        },
    );
    if let Err(e) = r {
        failed(m, "create", e);
    }
}

/// What a snapshot or a clone of volume `v` holds: its live contents (a
/// snapshot flushes first).
fn frozen(vm: &VolModel, sure: bool) -> VolModel {
    VolModel {
        sure,
        blocks: vm.blocks,
        data: vm.data.iter().map(Block::now).collect(),
    }
}

fn snapshot(pool: &Pool, m: &mut Model, v: u128, s: u128) {
    let r = pool.create_snapshot_as(vid(v), SnapshotId::from_u128(s));
    let vm = m.volumes.get_mut(&v).expect("modelled");
    let snap = frozen(vm, r.is_ok());
    if r.is_ok() {
        for b in &mut vm.data {
            b.flushed();
        }
    }
    m.snapshots.insert(s, snap);
    if let Err(e) = r {
        failed(m, "snapshot", e);
    }
}

fn clone_snapshot(pool: &Pool, m: &mut Model, s: u128, v: u128) {
    let r = pool.clone_snapshot_as(SnapshotId::from_u128(s), vid(v), None);
    let mut clone = m.snapshots[&s].clone();
    clone.sure = r.is_ok() && clone.sure;
    m.volumes.insert(v, clone);
    if let Err(e) = r {
        failed(m, "clone snapshot", e);
    }
}

fn clone_volume(pool: &Pool, m: &mut Model, from: u128, v: u128) {
    let r = pool.clone_volume_as(vid(from), vid(v), None);
    let vm = m.volumes.get_mut(&from).expect("modelled");
    let clone = frozen(vm, r.is_ok());
    if r.is_ok() {
        for b in &mut vm.data {
            b.flushed();
        }
    }
    m.volumes.insert(v, clone);
    if let Err(e) = r {
        failed(m, "clone volume", e);
    }
}

fn delete_volume(pool: &Pool, m: &mut Model, v: u128) {
    match pool.delete_volume(vid(v)) {
        Ok(()) => {
            m.volumes.remove(&v);
            m.gone.insert(v);
        }
        Err(e) => {
            m.volumes.get_mut(&v).expect("modelled").sure = false;
            failed(m, "delete volume", e);
        }
    }
}

fn delete_snapshot(pool: &Pool, m: &mut Model, s: u128) {
    match pool.delete_snapshot(SnapshotId::from_u128(s)) {
        Ok(()) => {
            m.snapshots.remove(&s);
            m.gone_snapshots.insert(s);
        }
        Err(e) => {
            m.snapshots.get_mut(&s).expect("modelled").sure = false;
            failed(m, "delete snapshot", e);
        }
    }
}

fn grow(pool: &Pool, m: &mut Model, v: u128, blocks: u64) {
    let r = pool.resize_volume(vid(v), blocks * BLOCK);
    let vm = m.volumes.get_mut(&v).expect("modelled");
    vm.blocks.1 = blocks;
    if r.is_ok() {
        vm.blocks.0 = blocks;
    }
    vm.data.resize(blocks as usize, Block::zero());
    if let Err(e) = r {
        failed(m, "grow", e);
    }
}

/// Copies blocks `first..first+n` of volume `from` to block `to` of
/// volume `dst` by reference (a pin, then landing it), where the model
/// knows exactly what `from` holds there (else skips).
fn copy_pinned(pool: &Pool, m: &mut Model, from: u128, first: u64, n: u64, dst: u128, to: u64) {
    let Some(tags) = (first..first + n)
        .map(|b| {
            let now = m.volumes[&from].data[b as usize].now();
            (now.durable.len() == 1).then(|| *now.durable.first().expect("one"))
        })
        .collect::<Option<Vec<u32>>>()
    else {
        return;
    };
    let range = [BlockRange { first, blocks: n }];
    let pins = match pool.pin(vid(from), &range) {
        Ok(p) => p,
        Err(e) => return failed(m, "pin", e),
    };
    let r = pool
        .volume(vid(dst))
        .and_then(|vol| vol.write_pinned(to, &pins[0], 0, n, false));
    let acked = r.is_ok();
    let vm = m.volumes.get_mut(&dst).expect("modelled");
    for (i, tag) in tags.into_iter().enumerate() {
        vm.data[(to + i as u64) as usize].since.push((tag, acked));
    }
    if let Err(e) = r {
        failed(m, "write pinned", e);
    }
}

fn run_jobs(pool: &Pool, m: &mut Model) {
    if let Err(e) = pool.run_jobs_here() {
        failed(m, "jobs", e);
    }
}

/// The workload: deterministic, so call N is the same call in every run.
fn workload(pool: &Pool, m: &mut Model, rounds: u64) {
    let mut rng = common::Rng::new(7);
    const A: u128 = 0xa;
    const B: u128 = 0xb;
    create(pool, m, A, 24);
    create(pool, m, B, 24);
    for round in 0..rounds {
        let (c, d, e) = (
            0xc0 + round as u128,
            0xd0 + round as u128,
            0xe0 + round as u128,
        );
        let (s1, s2) = (0x51 + 2 * round as u128, 0x52 + 2 * round as u128);
        for i in 0..6 {
            let b = rng.below(20);
            write(pool, m, A, b, 1 + rng.below(3), i == 3);
        }
        flush(pool, m, A);
        snapshot(pool, m, A, s1);
        write(pool, m, A, rng.below(24), 1, false);
        zero(pool, m, A, rng.below(20), 2, true);
        zero(pool, m, A, rng.below(20), 1, false);
        flush(pool, m, A);
        // By reference: A's top is frozen under a hidden snapshot, the
        // blocks land in B, the frozen layer folds away at the next jobs.
        if m.volumes[&B].sure {
            copy_pinned(pool, m, A, rng.below(16), 4, B, rng.below(20));
            flush(pool, m, B);
        }
        clone_snapshot(pool, m, s1, c);
        if m.volumes[&c].sure {
            write(pool, m, c, rng.below(20), 2, true);
        }
        snapshot(pool, m, A, s2);
        clone_volume(pool, m, A, d);
        if m.volumes[&d].sure {
            write(pool, m, d, 1, 1, false);
            flush(pool, m, d);
        }
        write(pool, m, A, rng.below(24), 1, false);
        // s1 has a child (s2's layer) and a clone: nothing folds yet.
        delete_snapshot(pool, m, s1);
        if m.volumes[&c].sure {
            delete_volume(pool, m, c);
        }
        // s1's layer now has one child: a fold into the frozen s2 layer.
        run_jobs(pool, m);
        flush(pool, m, A);
        delete_snapshot(pool, m, s2);
        // A merge folds what is left into A's top.
        match pool.merge(vid(A), 1) {
            Ok(_) => run_jobs(pool, m),
            Err(err) => failed(m, "merge", err),
        }
        let blocks = m.volumes[&A].blocks.1;
        grow(pool, m, A, blocks + 8);
        if m.volumes[&A].blocks.0 == blocks + 8 {
            write(pool, m, A, blocks + 4, 2, true);
        }
        create(pool, m, e, 8);
        if m.volumes[&e].sure {
            write(pool, m, e, 3, 1, false);
        }
        if m.volumes[&d].sure {
            delete_volume(pool, m, d);
        }
        flush(pool, m, A);
    }
}

fn read_block(
    read: &dyn Fn(u64, &mut [u8]) -> strata::engine::Result<()>,
    b: u64,
) -> Result<u32, String> {
    let mut buf = vec![0u8; BLOCK as usize];
    read(b * BLOCK, &mut buf).map_err(|e| format!("block {b}: read failed: {e}"))?;
    tag_of(&buf).ok_or_else(|| format!("block {b} holds bytes no write wrote"))
}

/// Every check after the pool opened again; `Err` says what is wrong.
fn check(pool: &Pool, m: &Model) -> Result<(), String> {
    let volumes: BTreeSet<u128> = pool
        .list_volumes()
        .map_err(|e| format!("list volumes: {e}"))?
        .iter()
        .map(|v| v.id.as_u128())
        .collect();
    let snapshots: BTreeSet<u128> = pool
        .list_snapshots()
        .map_err(|e| format!("list snapshots: {e}"))?
        .iter()
        .map(|s| s.id.as_u128())
        .collect();
    for v in &m.gone {
        if volumes.contains(v) {
            return Err(format!(
                "volume {v:x} is back after its deletion was acknowledged"
            ));
        }
    }
    for s in &m.gone_snapshots {
        if snapshots.contains(s) {
            return Err(format!(
                "snapshot {s:x} is back after its deletion was acknowledged"
            ));
        }
    }
    let known: BTreeSet<u128> = m.volumes.keys().chain(m.gone.iter()).copied().collect();
    if let Some(v) = volumes.iter().find(|v| !known.contains(v)) {
        return Err(format!("volume {v:x} was never created"));
    }
    for (id, vm) in &m.volumes {
        if !volumes.contains(id) {
            if vm.sure {
                return Err(format!("volume {id:x}, acknowledged, is gone"));
            }
            continue;
        }
        let vol = pool
            .volume(vid(*id))
            .map_err(|e| format!("volume {id:x}: {e}"))?;
        let blocks = vol.size() / BLOCK;
        if blocks < vm.blocks.0 || blocks > vm.blocks.1 {
            return Err(format!(
                "volume {id:x} has {blocks} blocks, not {:?}",
                vm.blocks
            ));
        }
        let read = |o: u64, buf: &mut [u8]| vol.read(o, buf);
        for b in 0..blocks {
            let tag = read_block(&read, b).map_err(|e| format!("volume {id:x} {e}"))?;
            if !vm.data[b as usize].allows(tag) {
                return Err(format!(
                    "volume {id:x} block {b} reads write {tag}; allowed: {:?}",
                    vm.data[b as usize]
                ));
            }
        }
    }
    for (id, sm) in &m.snapshots {
        if !snapshots.contains(id) {
            if sm.sure {
                return Err(format!("snapshot {id:x}, acknowledged, is gone"));
            }
            continue;
        }
        let snap = pool
            .open_snapshot(SnapshotId::from_u128(*id))
            .map_err(|e| format!("snapshot {id:x}: {e}"))?;
        let read = |o: u64, buf: &mut [u8]| snap.read(o, buf);
        for b in 0..snap.size() / BLOCK {
            let tag = read_block(&read, b).map_err(|e| format!("snapshot {id:x} {e}"))?;
            if !sm.data[b as usize].allows(tag) {
                return Err(format!(
                    "snapshot {id:x} block {b} reads write {tag}; allowed: {:?}",
                    sm.data[b as usize]
                ));
            }
        }
    }
    // The pool takes writes again (after an operator acknowledges a loss).
    for id in &volumes {
        let vol = pool
            .volume(vid(*id))
            .map_err(|e| format!("volume {id:x}: {e}"))?;
        if vol.fault().is_some() {
            pool.acknowledge_loss(vid(*id))
                .map_err(|e| format!("acknowledge {id:x}: {e}"))?;
        }
        vol.write(0, &pattern(u32::MAX), true)
            .map_err(|e| format!("volume {id:x} takes no write after reopening: {e}"))?;
    }
    Ok(())
}

/// `pool check`: clean but for what it says was lost.
fn checked(disk: &FaultFs) -> Result<(), String> {
    let report = check_pool_on(&disk.process(), Path::new(POOL), false)
        .map_err(|e| format!("pool check: {e}"))?;
    let bad: Vec<&str> = report
        .findings
        .iter()
        .map(|f| f.message.as_str())
        .filter(|m| !m.contains("lost data") && !m.contains("beyond saving"))
        .collect();
    if !bad.is_empty() {
        return Err(format!("pool check: {bad:?}"));
    }
    Ok(())
}

fn rounds() -> u64 {
    std::env::var("STRATA_SOAK_STEPS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(1, |n| (n / 1000).clamp(1, 20))
}

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The power goes: only what was made durable is left.
    PowerCut,
    /// The process is killed: what it wrote stays (the page cache), and
    /// so must every acknowledged write (the unflushed log).
    Kill,
}

/// One run: the workload with `arm` set up after the pool opened, then
/// `end`, a reopen and the checks. `Err` names what broke.
fn run(arm: &dyn Fn(&FaultFs), end: End) -> Result<Model, String> {
    let disk = new_disk();
    let mut m = Model::default();
    {
        let pool =
            Pool::open(Path::new(POOL), opts(&disk)).map_err(|e| format!("first open: {e}"))?;
        arm(&disk);
        workload(&pool, &mut m, rounds());
        match end {
            End::PowerCut => disk.power_cut(),
            End::Kill => disk.kill_process(),
        }
        drop(pool);
    }

    if !m.wrong.is_empty() {
        return Err(m.wrong.join("; "));
    }
    disk.fail(None);
    disk.power_cut_at(None);
    let pool = Pool::open(Path::new(POOL), opts(&disk)).map_err(|e| format!("reopen: {e}"))?;
    let faulted: BTreeSet<u128> = pool
        .faults()
        .map_err(|e| format!("faults: {e}"))?
        .iter()
        .map(|(v, _)| v.as_u128())
        .collect();
    if end == End::Kill {
        // What a killed process acknowledged is all there after a restart,
        // unless a write-back failed (the volume then says its data was
        // lost, and only what earlier flushes made durable is sure).
        for (id, vm) in &mut m.volumes {
            if !faulted.contains(id) {
                for b in &mut vm.data {
                    *b = b.now();
                }
            }
        }
    }
    check(&pool, &m)?;
    drop(pool);
    checked(&disk)?;
    Ok(m)
}

/// Calls the workload makes after the pool is open.
fn count_calls() -> u64 {
    let disk = new_disk();
    let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
    let before = disk.calls();
    let mut m = Model::default();
    workload(&pool, &mut m, rounds());
    assert_eq!(m.errors, 0, "the workload fails without faults");
    disk.calls() - before
}

fn stride() -> u64 {
    std::env::var("STRATA_FAULT_STRIDE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Runs with `arm_at(disk, n)` for every call n (by the stride); fails
/// with every broken run's story.
fn every_call(what: &str, end: End, arm_at: fn(&FaultFs, u64)) {
    let calls = count_calls();
    assert!(calls > 200, "the workload makes only {calls} calls");
    let started = std::time::Instant::now();
    let mut broken = Vec::new();
    let mut errors = 0;
    let mut n = 1;
    while n <= calls {
        match run(&|disk| arm_at(disk, n), end) {
            Ok(m) => errors += m.errors,
            Err(e) => broken.push(format!("{what} at call {n}: {e}")),
        }
        n += stride();
    }
    eprintln!(
        "{what}: {} fault points of {calls} calls in {:.1} s; the workload saw {errors} errors",
        calls.div_ceil(stride()),
        started.elapsed().as_secs_f64()
    );
    assert!(
        broken.is_empty(),
        "{} runs broke:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn the_workload_is_deterministic_and_passes_its_own_checks() {
    let a = count_calls();
    let b = count_calls();
    assert_eq!(a, b, "the same workload made {a} and then {b} calls");
    run(&|_| {}, End::PowerCut).unwrap();
    run(&|_| {}, End::Kill).unwrap();
}

#[test]
fn an_eio_at_any_call_then_a_power_cut_loses_nothing_flushed() {
    every_call("EIO, power cut", End::PowerCut, eio_at);
}

#[test]
fn an_eio_at_any_call_then_a_kill_loses_nothing_acknowledged() {
    every_call("EIO, kill -9", End::Kill, eio_at);
}

fn eio_at(disk: &FaultFs, n: u64) {
    disk.fail(Some(Fail {
        at: n,
        op: None,
        errno: libc::EIO,
        sticky: false,
    }))
}

#[test]
fn a_power_cut_at_any_call_loses_nothing_flushed() {
    every_call("power cut", End::PowerCut, |disk, n| {
        disk.power_cut_at(Some(n))
    });
}

/// A disk that fills up at the Nth write and stays full, for every N
/// (every other write, by default, to keep CI short).
#[test]
fn a_disk_that_fills_up_at_any_write_loses_nothing_acknowledged() {
    // How many writes the workload makes: a fault that never fires counts
    // the calls it matches.
    let writes = {
        let disk = new_disk();
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        disk.fail(Some(Fail {
            at: u64::MAX,
            op: Some(Op::Write),
            errno: libc::ENOSPC,
            sticky: false,
        }));
        let mut m = Model::default();
        workload(&pool, &mut m, rounds());
        disk.matched()
    };
    assert!(writes > 50, "{writes} writes");
    let mut broken = Vec::new();
    let step = 2 * stride();
    let mut n = 1;
    while n <= writes {
        let arm = move |disk: &FaultFs| {
            disk.fail(Some(Fail {
                at: n,
                op: Some(Op::Write),
                errno: libc::ENOSPC,
                sticky: true,
            }))
        };
        if let Err(e) = run(&arm, End::PowerCut) {
            broken.push(format!("full at write {n}: {e}"));
        }
        n += step;
    }
    assert!(
        broken.is_empty(),
        "{} runs broke:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// A pool on a new disk with volume A (24 blocks) and `n` acknowledged,
/// unflushed one-block writes to it; then the process is killed. Returns
/// the disk and what each block must read.
fn unflushed_writes(n: u64) -> (FaultFs, Vec<u32>) {
    let disk = new_disk();
    let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
    pool.create_volume_as(vid(0xa), 24 * BLOCK).unwrap();
    let vol = pool.volume(vid(0xa)).unwrap();
    let mut want = vec![0u32; 24];
    for i in 0..n {
        let (b, tag) = ((i * 5) % 24, 100 + i as u32);
        vol.write(b * BLOCK, &pattern(tag), false).unwrap();
        want[b as usize] = tag;
    }
    disk.kill_process();
    drop(vol);
    drop(pool);
    (disk, want)
}

fn reads(pool: &Pool, v: u128, want: &[u32]) -> Result<(), String> {
    let vol = pool.volume(vid(v)).map_err(|e| e.to_string())?;
    let read = |o: u64, buf: &mut [u8]| vol.read(o, buf);
    for (b, tag) in want.iter().enumerate() {
        let got = read_block(&read, b as u64)?;
        if got != *tag {
            return Err(format!("block {b} reads {got}, not {tag}"));
        }
    }
    Ok(())
}

/// Writes a killed process acknowledged are made durable by the next
/// open; an EIO at any call of that open (which then fails, or not) loses
/// none of them: the log of unflushed writes is emptied only once they are
/// in the catalog.
#[test]
fn an_eio_while_recovering_unflushed_writes_loses_none_of_them() {
    let (disk, want) = unflushed_writes(12);
    let calls = {
        let d = disk.fork();
        let pool = Pool::open(Path::new(POOL), opts(&d)).unwrap();
        reads(&pool, 0xa, &want).unwrap();
        d.calls()
    };
    assert!(calls > 10, "{calls}");
    let mut broken = Vec::new();
    for n in 1..=calls {
        let d = disk.fork();
        d.fail(Some(Fail {
            at: n,
            op: None,
            errno: libc::EIO,
            sticky: false,
        }));
        if let Ok(pool) = Pool::open(Path::new(POOL), opts(&d)) {
            // Loading the volume is part of recovering it.
            let _ = pool.volume(vid(0xa));
            d.kill_process();
            drop(pool);
        }
        d.fail(None);
        // A failed write-back loses them (Linux drops the pages): then the
        // volume must say so.
        let again = Pool::open(Path::new(POOL), opts(&d)).map_err(|e| e.to_string());
        let checked = again.and_then(|pool| {
            let lost = pool.faults().map_err(|e| e.to_string())?;
            if lost.iter().any(|(v, _)| *v == vid(0xa)) {
                Ok(())
            } else {
                reads(&pool, 0xa, &want)
            }
        });
        if let Err(e) = checked {
            broken.push(format!("EIO at call {n} of the recovery: {e}"));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// Writes beyond saving (the tmpfs cannot grow the log) are reported by a
/// flush after every restart until one reports it and the next succeeds.
#[test]
fn lost_unflushed_writes_are_reported_after_any_number_of_restarts() {
    let disk = new_disk();
    {
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        pool.create_volume_as(vid(0xa), 8192 * BLOCK).unwrap();
        let vol = pool.volume(vid(0xa)).unwrap();
        // The log's first 64 KiB hold 2046 records; it cannot grow.
        disk.fail(Some(Fail {
            at: 1,
            op: Some(Op::Fallocate),
            errno: libc::ENOSPC,
            sticky: true,
        }));
        for i in 0..2100u64 {
            vol.write(2 * i * BLOCK, &pattern(1 + i as u32), false)
                .unwrap();
        }
        disk.kill_process();
    }
    disk.fail(None);
    for restart in 0..3 {
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        let vol = pool.volume(vid(0xa)).unwrap();
        let e = vol.flush().unwrap_err();
        assert!(
            matches!(e, strata::engine::Error::UnflushedLost(_)),
            "restart {restart}: {e}"
        );
        disk.kill_process();
    }
    let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
    let vol = pool.volume(vid(0xa)).unwrap();
    assert!(
        vol.flush().is_err(),
        "reported once more after the last kill"
    );
    vol.flush().unwrap();
    vol.flush().unwrap();
    drop(vol);
    drop(pool);
    checked(&disk).unwrap();
}

/// The first open makes the pool: a power cut or a kill at any of its
/// calls leaves a directory the next open finishes making.
#[test]
fn a_crash_while_making_a_pool_leaves_one_the_next_open_makes() {
    let calls = {
        let disk = new_disk();
        let before = disk.calls();
        Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        disk.calls() - before
    };
    for n in 1..=calls {
        for kill in [false, true] {
            let disk = new_disk();
            if kill {
                disk.fail(Some(Fail {
                    at: n,
                    op: None,
                    errno: libc::EIO,
                    sticky: true,
                }));
            } else {
                disk.power_cut_at(Some(n));
            }
            let _ = Pool::open(Path::new(POOL), opts(&disk));
            if kill {
                disk.kill_process();
            }
            disk.fail(None);
            let pool = Pool::open(Path::new(POOL), opts(&disk))
                .unwrap_or_else(|e| panic!("crash at call {n} (kill: {kill}): {e}"));
            pool.create_volume_as(vid(1), 8 * BLOCK).unwrap();
        }
    }
}

/// A pool whose catalog.redb is gone is refused, not made again (which
/// would delete every layer as an orphan), and its files stay.
#[test]
fn a_pool_without_its_catalog_is_refused_and_keeps_its_files() {
    let disk = new_disk();
    {
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        pool.create_volume_as(vid(1), 8 * BLOCK).unwrap();
        pool.volume(vid(1))
            .unwrap()
            .write(0, &pattern(5), true)
            .unwrap();
    }
    let fs = disk.process();
    let pool = Path::new(POOL);
    fs.remove_file(&pool.join("catalog.redb")).unwrap();
    let layers = fs.read_dir(&pool.join("layers")).unwrap();
    assert_eq!(layers.len(), 1);
    let e = Pool::open(pool, opts(&disk)).unwrap_err();
    assert!(matches!(e, strata::engine::Error::CatalogMissing(_)), "{e}");
    assert!(e.to_string().contains("restore catalog.redb"), "{e}");
    assert_eq!(fs.read_dir(&pool.join("layers")).unwrap(), layers);
}

/// Creates of one volume ID at once (a retried CreateVolume): one makes
/// it, the others find it; none touches its files, so what it flushed is
/// still there after a power cut.
#[test]
fn overlapping_creates_of_one_id_never_clobber_the_live_volume() {
    for round in 0..20u32 {
        let disk = new_disk();
        let pool = Arc::new(Pool::open(Path::new(POOL), opts(&disk)).unwrap());
        let made: Vec<_> = (0..4)
            .map(|t| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let r = pool.create_volume_as(vid(7), 16 * BLOCK);
                    if r.is_ok() {
                        let vol = pool.volume(vid(7)).unwrap();
                        vol.write(0, &pattern(1000 + t), true).unwrap();
                    }
                    r.map_err(|e| e.kind())
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        let winners = made.iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "round {round}: {made:?}");
        assert!(
            made.iter()
                .all(|r| r.is_ok() || *r == Err(ErrorKind::AlreadyExists))
        );
        let tag = 1000 + made.iter().position(|r| r.is_ok()).unwrap() as u32;
        disk.power_cut();
        drop(pool);
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        reads(&pool, 7, &[tag]).unwrap();
    }
}

/// fsyncgate: a failed fdatasync of a layer loses the pages it did not
/// write (Linux marks them clean), so no later flush may succeed over
/// them: the volume refuses writes and flushes, says why, and survives a
/// restart that way, until an operator acknowledges the loss. What earlier
/// flushes made durable stays. (Flushes that sync the layer files.)
#[test]
fn a_failed_write_back_stops_the_volume_until_acknowledged() {
    let disk = new_disk();
    let opts = |disk: &FaultFs| PoolOptions {
        sync_log_bytes: 0,
        ..opts(disk)
    };
    {
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        pool.create_volume_as(vid(1), 8 * BLOCK).unwrap();
        let vol = pool.volume(vid(1)).unwrap();
        vol.write(0, &pattern(1), true).unwrap();
        vol.write(BLOCK, &pattern(2), false).unwrap();
        disk.fail(Some(Fail {
            at: 1,
            op: Some(Op::Sync),
            errno: libc::EIO,
            sticky: false,
        }));
        let e = vol.flush().unwrap_err();
        assert!(matches!(e, strata::engine::Error::DataLost { .. }), "{e}");
        // The disk works again, but the data is gone: no success now.
        for _ in 0..2 {
            assert!(matches!(
                vol.flush().unwrap_err(),
                strata::engine::Error::DataLost { .. }
            ));
            assert!(vol.write(2 * BLOCK, &pattern(3), false).is_err());
        }
        assert!(vol.fault().unwrap().contains("write-back"));
        disk.power_cut();
    }
    let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
    assert_eq!(pool.faults().unwrap().len(), 1);
    let vol = pool.volume(vid(1)).unwrap();
    assert!(vol.flush().is_err(), "still refused after a restart");
    let report = check_pool_on(&disk.process(), Path::new(POOL), false);
    assert!(report.is_err(), "the pool is open: check refuses it");
    reads(&pool, 1, &[1]).unwrap();
    pool.acknowledge_loss(vid(1)).unwrap();
    vol.write(BLOCK, &pattern(4), true).unwrap();
    reads(&pool, 1, &[1, 4]).unwrap();
    assert!(pool.faults().unwrap().is_empty());
    drop(vol);
    drop(pool);
    checked(&disk).unwrap();
}

/// The source of a fetching volume: blocks tagged 1, 2, ...
#[derive(Debug)]
struct Tagged(u64);

impl strata::engine::Backing for Tagged {
    fn size(&self) -> u64 {
        self.0 * BLOCK
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> strata::engine::Result<()> {
        for (i, b) in buf.chunks_mut(BLOCK as usize).enumerate() {
            let tag = (offset / BLOCK + i as u64 + 1) as u32;
            b.copy_from_slice(&pattern(tag)[..b.len()]);
        }
        Ok(())
    }
}

/// fsyncgate on a fetching volume: the blocks a failed write-back lost
/// (copied by a fill or kept by a read) are fetched again from the source
/// once the loss is acknowledged (the source's copy is whole), not kept as
/// what the failed write-back left on disk, which a power cut then shows.
/// (Flushes that may log data.)
#[test]
fn a_fetching_volume_fetches_again_what_a_failed_write_back_lost() {
    let disk = new_disk();
    {
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        pool.create_fetching_volume(vid(1), 8 * BLOCK, b"r")
            .unwrap();
        let vol = pool.volume(vid(1)).unwrap();
        vol.connect_backing(Arc::new(Tagged(8))).unwrap();
        assert_eq!(vol.fill(0, 4 * BLOCK).unwrap(), 4 * BLOCK);
        vol.flush().unwrap();
        // One block kept by a read: its flush syncs the layer (never logs
        // the data, small enough to log, which only the sync would then
        // make durable).
        let mut one = vec![0u8; BLOCK as usize];
        vol.read(4 * BLOCK, &mut one).unwrap();
        assert_eq!(vol.absent_bytes(0, 5 * BLOCK).unwrap(), 0);
        disk.fail(Some(Fail {
            at: 1,
            op: Some(Op::Sync),
            errno: libc::EIO,
            sticky: false,
        }));
        let e = vol.flush().unwrap_err();
        assert!(matches!(e, strata::engine::Error::DataLost { .. }), "{e}");
        let walked = vol.refetches();
        pool.acknowledge_loss(vid(1)).unwrap();
        // A fill that began before cannot end the fetch: it walks again.
        let e = pool.finish_fetch(&vol, walked).unwrap_err();
        assert!(matches!(e, strata::engine::Error::Fetching { .. }), "{e}");
        // The flushed half stays; the lost block is fetched again, with
        // the rest.
        assert_eq!(vol.absent_bytes(0, 4 * BLOCK).unwrap(), 0);
        assert_eq!(vol.fill(0, 8 * BLOCK).unwrap(), 4 * BLOCK);
        vol.flush().unwrap();
        pool.finish_fetch(&vol, vol.refetches()).unwrap();
        disk.power_cut();
    }
    let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
    assert!(!pool.volume(vid(1)).unwrap().fetching());
    reads(&pool, 1, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    drop(pool);
    checked(&disk).unwrap();
}

/// The same with a restart between the failed write-back and the
/// acknowledgement: the restarted process does not make the changes of
/// the lost flush durable as the disk has them; the blocks they made data
/// stay absent and are fetched again.
#[test]
fn a_fetching_volume_fetches_again_what_a_failed_write_back_lost_before_a_restart() {
    let disk = new_disk();
    {
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        pool.create_fetching_volume(vid(1), 10 * BLOCK, b"r")
            .unwrap();
        let vol = pool.volume(vid(1)).unwrap();
        vol.connect_backing(Arc::new(Tagged(10))).unwrap();
        assert_eq!(vol.fill(0, 4 * BLOCK).unwrap(), 4 * BLOCK);
        vol.flush().unwrap();
        assert_eq!(vol.fill(4 * BLOCK, 4 * BLOCK).unwrap(), 4 * BLOCK);
        // A write to a block not fetched yet, and a discard.
        vol.write(8 * BLOCK, &pattern(99), false).unwrap();
        vol.trim(9 * BLOCK, BLOCK).unwrap();
        disk.fail(Some(Fail {
            at: 1,
            op: Some(Op::Sync),
            errno: libc::EIO,
            sticky: false,
        }));
        let e = vol.flush().unwrap_err();
        assert!(matches!(e, strata::engine::Error::DataLost { .. }), "{e}");
        disk.kill_process();
        drop(vol);
        drop(pool);
    }
    {
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        let vol = pool.volume(vid(1)).unwrap();
        assert!(vol.fetching());
        vol.connect_backing(Arc::new(Tagged(10))).unwrap();
        pool.acknowledge_loss(vid(1)).unwrap();
        assert_eq!(vol.absent_bytes(0, 4 * BLOCK).unwrap(), 0);
        assert_eq!(vol.absent_bytes(4 * BLOCK, 6 * BLOCK).unwrap(), 5 * BLOCK);
        assert_eq!(vol.fill(0, 10 * BLOCK).unwrap(), 5 * BLOCK);
        vol.flush().unwrap();
        pool.finish_fetch(&vol, vol.refetches()).unwrap();
        disk.power_cut();
    }
    // The lost write reads as the source's block; the discard stays.
    let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
    reads(&pool, 1, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]).unwrap();
    drop(pool);
    checked(&disk).unwrap();
}

/// A fold of a deleted snapshot's layer L into its only child C (a frozen
/// layer of an empty snapshot) whose volume and snapshot are deleted while
/// the job builds C's new file: the new file is never installed as the
/// file of a layer the catalog no longer has. (A reader of the first
/// snapshot keeps L's file open throughout.)
#[cfg(feature = "failpoints")]
#[test]
fn a_fold_whose_layers_go_meanwhile_leaves_no_file_behind() {
    let disk = new_disk();
    let (pool, vol) = volume_1(&disk);
    for b in 0..4 {
        vol.write(b * BLOCK, &pattern(10 + b as u32), false)
            .unwrap();
    }
    drop(vol);
    let (s1, s2) = (SnapshotId::from_u128(0x51), SnapshotId::from_u128(0x52));
    pool.create_snapshot_as(vid(1), s1).unwrap();
    pool.create_snapshot_as(vid(1), s2).unwrap();
    let reader = pool.open_snapshot(s1).unwrap();
    pool.delete_snapshot(s1).unwrap();
    let meanwhile = pool.clone();
    strata::engine::jobs::on_failpoint("engine::merge::fold_frozen::planned", move || {
        meanwhile.delete_volume(vid(1)).unwrap();
        meanwhile.delete_snapshot(s2).unwrap();
    });
    pool.run_jobs_here().unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    reader.read(0, &mut buf).unwrap();
    assert_eq!(tag_of(&buf), Some(10));
    drop(reader);
    assert!(pool.list_volumes().unwrap().is_empty());
    drop(pool);
    checked(&disk).unwrap();
    let left = disk
        .process()
        .read_dir(&Path::new(POOL).join("layers"))
        .unwrap();
    assert!(left.is_empty(), "layer files left: {left:?}");
}

/// fdatasync calls `f` makes (counted by a fault that never fires).
fn syncs_of(disk: &FaultFs, f: impl FnOnce()) -> u64 {
    disk.fail(Some(Fail {
        at: u64::MAX,
        op: Some(Op::Sync),
        errno: libc::EIO,
        sticky: false,
    }));
    f();
    let n = disk.matched();
    disk.fail(None);
    n
}

/// A flush of a block or two logs the data in the journal: one fdatasync.
/// After a power cut the journal writes the logged blocks back, except
/// where a later flush that synced the layer file made newer data durable
/// (the overwrite of block 0 has no presence change of its own to say so).
#[test]
fn logged_flushes_are_one_fsync_and_survive_a_power_cut_under_later_synced_ones() {
    let disk = new_disk();
    {
        let (_pool, vol) = volume_1(&disk);
        vol.write(0, &pattern(1), false).unwrap();
        assert_eq!(syncs_of(&disk, || vol.flush().unwrap()), 1, "logged");
        // Overwrite block 0 and write three more: 16 KiB, synced files.
        let mut four = pattern(2);
        for t in 3..6 {
            four.extend(pattern(t));
        }
        vol.write(0, &four, false).unwrap();
        assert_eq!(syncs_of(&disk, || vol.flush().unwrap()), 2, "synced");
        let stats = vol.stats();
        assert_eq!((stats.flushes_logged, stats.flushes_synced), (1, 1));
        vol.write(BLOCK, &pattern(6), true).unwrap();
        vol.write(5 * BLOCK, &pattern(7), false).unwrap();
        disk.power_cut();
    }
    let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
    reads(&pool, 1, &[2, 6, 4, 5, 0, 0]).unwrap();
    drop(pool);
    checked(&disk).unwrap();
}

/// After a kill (same boot), the page cache has what the journal logged,
/// or newer acknowledged overwrites that nothing else records: replay must
/// not write the logged version back over them. Then a power cut: the
/// open made them durable.
#[test]
fn a_restart_keeps_overwrites_acknowledged_after_a_logged_flush() {
    let disk = new_disk();
    {
        let (_pool, vol) = volume_1(&disk);
        vol.write(0, &pattern(1), true).unwrap();
        vol.write(0, &pattern(2), false).unwrap();
        disk.kill_process();
    }
    {
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        reads(&pool, 1, &[2]).unwrap();
        disk.power_cut();
    }
    let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
    reads(&pool, 1, &[2]).unwrap();
}

/// A logged flush whose journal fdatasync fails reports the error and
/// keeps the changes: the next flush (which syncs the layer file) makes
/// them durable.
#[test]
fn a_failed_logged_flush_is_retried_by_the_next() {
    let disk = new_disk();
    {
        let (_pool, vol) = volume_1(&disk);
        vol.write(0, &pattern(1), false).unwrap();
        eio_once(&disk, Op::Sync, 1);
        let e = vol.flush().unwrap_err();
        assert!(!matches!(e, strata::engine::Error::DataLost { .. }), "{e}");
        disk.fail(None);
        vol.flush().unwrap();
        disk.power_cut();
    }
    let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
    reads(&pool, 1, &[1]).unwrap();
    assert!(pool.faults().unwrap().is_empty());
}

/// A pool on `disk` with volume 1 of 8 blocks.
fn volume_1(disk: &FaultFs) -> (Pool, Arc<strata::engine::Volume>) {
    let pool = Pool::open(Path::new(POOL), opts(disk)).unwrap();
    pool.create_volume_as(vid(1), 8 * BLOCK).unwrap();
    let vol = pool.volume(vid(1)).unwrap();
    (pool, vol)
}

fn eio_once(disk: &FaultFs, op: Op, at: u64) {
    disk.fail(Some(Fail {
        at,
        op: Some(op),
        errno: libc::EIO,
        sticky: false,
    }));
}

/// Block 0 is written and flushed (logged) as 1; `between` then runs with
/// the pool (a failed journal reset, a kill); block 0 is overwritten with
/// 2 and flushed, which syncs the layer file and needs no batch; a power
/// cut. Replay must not bring the logged 1 back over the synced 2,
/// whatever became of the journal that logged it.
fn logged_then_synced_overwrite(between: impl FnOnce(&FaultFs, Pool) -> Pool) {
    let disk = new_disk();
    {
        let (pool, vol) = volume_1(&disk);
        vol.write(0, &pattern(1), true).unwrap();
        drop(vol);
        let pool = between(&disk, pool);
        let vol = pool.volume(vid(1)).unwrap();
        vol.write(0, &pattern(2), false).unwrap();
        vol.flush().unwrap();
        disk.power_cut();
    }
    let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
    reads(&pool, 1, &[2]).unwrap();
}

/// A checkpoint (forced by `snapshot_frees`) whose journal reset fails at
/// its `op`.
fn failed_reset(disk: &FaultFs, pool: &Pool, op: Op) {
    eio_once(disk, op, 1);
    let _ = pool.snapshot_frees(SnapshotId::from_u128(99));
    assert_eq!(disk.matched(), 1, "the {op:?} of the reset failed");
    disk.fail(None);
}

#[test]
fn replay_never_writes_logged_data_over_a_later_synced_overwrite() {
    // The new journal is not renamed into place: the old one stays.
    logged_then_synced_overwrite(|disk, pool| {
        failed_reset(disk, &pool, Op::Rename);
        pool
    });
    // Renamed, but the directory fsync fails: a power cut can bring back
    // the old journal.
    logged_then_synced_overwrite(|disk, pool| {
        failed_reset(disk, &pool, Op::SyncDir);
        pool
    });
    // The same, and the process is killed: the next one does not know.
    logged_then_synced_overwrite(|disk, pool| {
        failed_reset(disk, &pool, Op::SyncDir);
        disk.kill_process();
        drop(pool);
        Pool::open(Path::new(POOL), opts(disk)).unwrap()
    });
    // A power cut, then an open whose journal reset fails at any of its
    // directory fsyncs.
    for k in 1..=4 {
        logged_then_synced_overwrite(|disk, pool| {
            disk.power_cut();
            drop(pool);
            eio_once(disk, Op::SyncDir, k);
            let pool = Pool::open(Path::new(POOL), opts(disk));
            disk.fail(None);
            pool.unwrap_or_else(|_| Pool::open(Path::new(POOL), opts(disk)).unwrap())
        });
    }
}

/// A checkpoint whose fdatasync of a layer with logged data fails: the
/// volume reports lost data, keeps its journal, and the next open writes
/// the logged data back (the failed pages are clean, a sync alone would
/// succeed over them), in this boot and after a power cut.
#[test]
fn a_failed_checkpoint_sync_keeps_the_logged_data_for_the_next_open() {
    for power_cut in [false, true] {
        // The checkpoint's catalog commit syncs first: find the layer's.
        let disk = (1..=6)
            .find_map(|k| {
                let disk = new_disk();
                let (pool, vol) = volume_1(&disk);
                vol.write(0, &pattern(1), true).unwrap();
                eio_once(&disk, Op::Sync, k);
                let e = pool.snapshot_frees(SnapshotId::from_u128(99));
                disk.fail(None);
                if !e.is_err_and(|e| e.to_string().contains("journal logged")) {
                    return None;
                }
                assert!(vol.fault().is_some());
                drop(vol);
                disk.kill_process();
                Some(disk)
            })
            .expect("a checkpoint syncs the layer with logged data");
        {
            let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
            assert_eq!(pool.faults().unwrap().len(), 1);
            reads(&pool, 1, &[1]).unwrap();
            if power_cut {
                disk.power_cut();
            } else {
                drop(pool);
                disk.kill_process();
            }
        }
        let pool = Pool::open(Path::new(POOL), opts(&disk)).unwrap();
        reads(&pool, 1, &[1]).unwrap();
    }
}
