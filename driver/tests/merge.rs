//! Background merges and flattens: each kind of fold, checked block for
//! block against what the volume and its snapshots held before, with
//! foreground writes running beside them, on the default filesystem and on
//! XFS with reflink (where the bytes must move by pointer).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Rng;
use strata::engine::{
    BLOCK_SIZE, JobKind, JobState, Method, Pool, PoolOptions, SnapshotId, VolumeId, VolumePolicy,
};

const BLOCKS: u64 = 256;

fn open(dir: &std::path::Path) -> Pool {
    Pool::open(dir, PoolOptions::default()).unwrap()
}

fn read_all(pool: &Pool, v: VolumeId) -> Vec<u8> {
    let vol = pool.volume(v).unwrap();
    let mut buf = vec![0u8; vol.size() as usize];
    vol.read(0, &mut buf).unwrap();
    buf
}

fn read_snapshot(pool: &Pool, s: SnapshotId) -> Vec<u8> {
    let r = pool.open_snapshot(s).unwrap();
    let mut buf = vec![0u8; r.size() as usize];
    r.read(0, &mut buf).unwrap();
    buf
}

/// Writes `n` random blocks (and a discard) into `v`, mirrored in `model`.
fn scribble(pool: &Pool, v: VolumeId, model: &mut [u8], rng: &mut Rng, n: u64) {
    scribble_from(pool, v, model, rng, n, 0);
}

/// Writes `n` random blocks at or above block `first`.
fn scribble_from(pool: &Pool, v: VolumeId, model: &mut [u8], rng: &mut Rng, n: u64, first: u64) {
    let vol = pool.volume(v).unwrap();
    for _ in 0..n {
        let b = first + rng.below(BLOCKS - first);
        let mut data = vec![0u8; BLOCK_SIZE as usize];
        rng.fill(&mut data);
        vol.write(b * BLOCK_SIZE, &data, false).unwrap();
        model[(b * BLOCK_SIZE) as usize..((b + 1) * BLOCK_SIZE) as usize].copy_from_slice(&data);
    }
    let b = rng.below(BLOCKS - 4);
    vol.trim(b * BLOCK_SIZE, 3 * BLOCK_SIZE).unwrap();
    model[(b * BLOCK_SIZE) as usize..((b + 3) * BLOCK_SIZE) as usize].fill(0);
}

fn settle(pool: &Pool) {
    assert!(
        pool.wait_for_jobs(Duration::from_secs(60)).unwrap(),
        "jobs did not finish: {:#?}",
        pool.jobs().unwrap()
    );
    for j in pool.jobs().unwrap() {
        assert_ne!(j.state, JobState::Failed, "job failed: {j:?}");
    }
}

fn layer_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("layers"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".data")
        })
        .count()
}

fn each_filesystem(f: impl Fn(&str, &std::path::Path)) {
    for (fs, scratch) in common::filesystems() {
        f(fs, scratch.path());
    }
}

#[test]
fn deleting_snapshots_folds_their_layers_away_into_the_top_and_into_frozen_children() {
    each_filesystem(|fs, dir| {
        let pool = open(dir);
        let mut rng = Rng::new(1);
        let v = pool.create_volume(BLOCKS * BLOCK_SIZE).unwrap().id;
        let mut model = vec![0u8; (BLOCKS * BLOCK_SIZE) as usize];
        let mut snaps = Vec::new();
        for _ in 0..4 {
            scribble(&pool, v, &mut model, &mut rng, 80);
            let s = pool.create_snapshot(v).unwrap().id;
            snaps.push((s, model.clone()));
        }
        scribble(&pool, v, &mut model, &mut rng, 40);
        assert_eq!(pool.volume(v).unwrap().depth(), 5);
        let files = layer_files(dir);
        // The oldest (under a frozen layer) and the newest (under the top).
        let freed_estimate = pool.snapshot_frees(snaps[0].0).unwrap();
        assert!(freed_estimate > 0, "{fs}: overridden blocks are counted");
        pool.delete_snapshot(snaps[0].0).unwrap();
        pool.delete_snapshot(snaps[3].0).unwrap();
        settle(&pool);
        assert_eq!(
            pool.volume(v).unwrap().depth(),
            3,
            "{fs}: two layers folded away"
        );
        assert_eq!(layer_files(dir), files - 2, "{fs}: their files are gone");
        assert!(read_all(&pool, v) == model, "{fs}: the volume is unchanged");
        for (s, want) in &snaps[1..3] {
            assert!(
                read_snapshot(&pool, *s) == *want,
                "{fs}: snapshot {s} is unchanged"
            );
        }
        let jobs = pool.jobs().unwrap();
        assert!(jobs.iter().filter(|j| j.kind == JobKind::Fold).count() >= 2);
        let moved: u64 = jobs.iter().map(|j| j.reflink_bytes + j.copy_bytes).sum();
        assert!(moved > 0);
        if fs == "xfs-reflink" {
            assert!(
                jobs.iter().all(|j| j.copy_bytes == 0),
                "on XFS with reflink nothing is byte-copied: {jobs:?}"
            );
        }
        // And after a restart.
        drop(pool);
        let pool = open(dir);
        assert!(read_all(&pool, v) == model);
        for (s, want) in &snaps[1..3] {
            assert!(read_snapshot(&pool, *s) == *want);
        }
    });
}

#[test]
fn the_depth_policy_shortens_chains_and_keeps_every_snapshot() {
    each_filesystem(|fs, dir| {
        let pool = open(dir);
        let mut rng = Rng::new(2);
        let v = pool.create_volume(BLOCKS * BLOCK_SIZE).unwrap().id;
        pool.set_policy(
            v,
            VolumePolicy {
                max_chain_depth: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let mut model = vec![0u8; (BLOCKS * BLOCK_SIZE) as usize];
        let mut snaps = Vec::new();
        for _ in 0..6 {
            scribble(&pool, v, &mut model, &mut rng, 30);
            snaps.push((pool.create_snapshot(v).unwrap().id, model.clone()));
            settle(&pool);
        }
        let depth = pool.volume(v).unwrap().depth();
        assert!(depth <= 3, "{fs}: depth {depth} after the policy's merges");
        assert!(read_all(&pool, v) == model);
        for (s, want) in &snaps {
            assert!(read_snapshot(&pool, *s) == *want, "{fs}: snapshot {s}");
        }
    });
}

#[test]
fn flattening_a_clone_frees_it_from_its_source() {
    each_filesystem(|fs, dir| {
        let pool = open(dir);
        let mut rng = Rng::new(3);
        let src = pool.create_volume(BLOCKS * BLOCK_SIZE).unwrap().id;
        let mut model = vec![0u8; (BLOCKS * BLOCK_SIZE) as usize];
        scribble(&pool, src, &mut model, &mut rng, 120);
        let s = pool.create_snapshot(src).unwrap().id;
        let c = pool.clone_snapshot(s, None).unwrap().id;
        let mut cmodel = model.clone();
        scribble(&pool, c, &mut cmodel, &mut rng, 30);
        assert_eq!(pool.volume(c).unwrap().depth(), 2);
        pool.flatten(c).unwrap();
        settle(&pool);
        assert_eq!(pool.volume(c).unwrap().depth(), 1, "{fs}: flat");
        assert!(read_all(&pool, c) == cmodel);
        // The source and its snapshot can go; the clone keeps its data.
        pool.delete_snapshot(s).unwrap();
        pool.delete_volume(src).unwrap();
        settle(&pool);
        assert!(
            read_all(&pool, c) == cmodel,
            "{fs}: the clone after its source went"
        );
        assert_eq!(layer_files(dir), 1, "{fs}: only the clone's layer is left");
    });
}

#[test]
fn a_layer_with_several_children_is_not_folded_and_the_job_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path());
    let v = pool.create_volume(BLOCKS * BLOCK_SIZE).unwrap().id;
    pool.volume(v)
        .unwrap()
        .write(0, &[5u8; 4096], false)
        .unwrap();
    let s = pool.create_snapshot(v).unwrap().id;
    let c = pool.clone_snapshot(s, None).unwrap().id;
    pool.delete_snapshot(s).unwrap();
    pool.merge(v, 0).unwrap();
    settle(&pool);
    let merge = pool
        .jobs()
        .unwrap()
        .into_iter()
        .find(|j| j.kind == JobKind::Merge)
        .unwrap();
    assert!(merge.message.contains("2 children"), "{merge:?}");
    assert_eq!(pool.volume(v).unwrap().depth(), 2);
    assert_eq!(read_all(&pool, c)[..4096], [5u8; 4096]);
}

#[test]
fn foreground_writes_during_merges_are_never_lost_or_overwritten() {
    each_filesystem(|fs, dir| {
        let pool = open(dir);
        let mut rng = Rng::new(4);
        let v = pool.create_volume(BLOCKS * BLOCK_SIZE).unwrap().id;
        let model = Arc::new(std::sync::Mutex::new(vec![
            0u8;
            (BLOCKS * BLOCK_SIZE) as usize
        ]));
        for round in 0..6 {
            scribble(&pool, v, &mut model.lock().unwrap(), &mut rng, 200);
            let s = pool.create_snapshot(v).unwrap().id;
            // Writer and merge at once. The writer covers the whole volume
            // for its first 64 blocks, then only the upper half, so the
            // merge has blocks of the snapshot to move however late it
            // starts.
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writer = {
                let (pool, model, stop) = (pool.clone(), Arc::clone(&model), Arc::clone(&stop));
                let mut rng = Rng::new(100 + round);
                std::thread::spawn(move || {
                    let mut written = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let mut m = model.lock().unwrap();
                        let first = if written < 64 { 0 } else { BLOCKS / 2 };
                        scribble_from(&pool, v, &mut m, &mut rng, 4, first);
                        written += 4;
                    }
                })
            };
            if round % 2 == 0 {
                pool.delete_snapshot(s).unwrap();
            } else {
                pool.flatten(v).unwrap();
            }
            settle(&pool);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            writer.join().unwrap();
            let want = model.lock().unwrap().clone();
            assert!(read_all(&pool, v) == want, "{fs}: round {round}");
        }
        // What the merges left is what a restart finds.
        let want = model.lock().unwrap().clone();
        let jobs = pool.jobs().unwrap();
        pool.close().unwrap();
        let pool = open(dir);
        assert!(read_all(&pool, v) == want, "{fs}: after reopening");
        // What moves, moves by pointer on XFS. (Whether anything moves
        // depends on how far the writer got first: the deterministic
        // test above checks that data moves.)
        if fs == "xfs-reflink" {
            assert!(
                jobs.iter().all(|j| j.copy_bytes == 0),
                "on XFS with reflink nothing is byte-copied: {jobs:#?}"
            );
        }
        let _ = Method::Copy;
    });
}
