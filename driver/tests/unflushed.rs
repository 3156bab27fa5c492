//! Writes a process acknowledged but never flushed survive the death of
//! that process (within one boot): a restarted node serves volumes whose
//! kernel attachment outlived the old process, and the FLUSH the kernel
//! sends again must cover them. The child is this test binary re-run with
//! `STRATA_UNFLUSHED_CHILD` set; it writes, says so, and waits to be
//! killed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use strata::engine::{BLOCK_SIZE, Error, Pool, PoolOptions, VolumeId};

const BLOCKS: u64 = 512;

fn pattern(block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    common::Rng::new(block + 1).fill(&mut b);
    b
}

fn child(dir: &str, vid: &str) {
    let pool = Pool::open(std::path::Path::new(dir), PoolOptions::default()).unwrap();
    let vol = pool.volume(vid.parse().unwrap()).unwrap();
    // Every other block, so the changes do not merge into one record.
    for b in (0..BLOCKS).step_by(2) {
        vol.write(b * BLOCK_SIZE, &pattern(b), false).unwrap();
    }
    vol.trim(10 * BLOCK_SIZE, 4 * BLOCK_SIZE).unwrap();
    println!("acknowledged");
    std::thread::sleep(std::time::Duration::from_secs(600));
}

/// Starts the child, waits for its writes, kills it.
fn run_child_and_kill(dir: &std::path::Path, vid: VolumeId) {
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new(exe)
        .args([
            "--exact",
            "acknowledged_unflushed_writes_survive_a_killed_process",
            "--nocapture",
        ])
        .env("STRATA_UNFLUSHED_CHILD", format!("{}|{vid}", dir.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    while !line.contains("acknowledged") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child died early"
        );
    }
    c.kill().unwrap();
    c.wait().unwrap();
}

#[test]
fn acknowledged_unflushed_writes_survive_a_killed_process() {
    if let Ok(args) = std::env::var("STRATA_UNFLUSHED_CHILD") {
        let (dir, vid) = args.split_once('|').unwrap();
        return child(dir, vid);
    }
    let dir = tempfile::tempdir().unwrap();
    let vid = {
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        let vid = pool.create_volume(BLOCKS * BLOCK_SIZE).unwrap().id;
        // Flushed data under the trim, so the trim has something to hide.
        let vol = pool.volume(vid).unwrap();
        vol.write(10 * BLOCK_SIZE, &vec![7u8; 4 * BLOCK_SIZE as usize], true)
            .unwrap();
        vid
    };
    run_child_and_kill(dir.path(), vid);

    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let vol = pool.volume(vid).unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for b in 0..BLOCKS {
        vol.read(b * BLOCK_SIZE, &mut buf).unwrap();
        let want = if (10..14).contains(&b) || b % 2 == 1 {
            vec![0u8; BLOCK_SIZE as usize]
        } else {
            pattern(b)
        };
        assert!(buf == want, "block {b} after the kill");
    }
    vol.flush().unwrap();
    drop(vol);
    drop(pool);
    // And they are durable now: a second open (no mirror left) agrees.
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let vol = pool.volume(vid).unwrap();
    vol.read(20 * BLOCK_SIZE, &mut buf).unwrap();
    assert!(buf == pattern(20));
}

/// When the mirror could not hold everything (its ring overflowed), the
/// next flush says that acknowledged writes were lost, once.
#[test]
fn an_incomplete_mirror_is_reported_by_the_next_flush() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let vid = pool.create_volume(BLOCKS * BLOCK_SIZE).unwrap().id;
    pool.volume(vid)
        .unwrap()
        .write(0, &pattern(0), false)
        .unwrap();
    // Simulate what a full ring leaves behind: the overflow flag.
    let log = dir.path().join(format!("journal/{vid}.unflushed"));
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[56] = 1;
    std::fs::write(&log, &bytes).unwrap();
    // A process that dies without closing: forget the pool, do not flush.
    std::mem::forget(pool);
    // The lock is held by the forgotten pool in this process; reopening
    // in-process needs it released, so copy the pool aside.
    let copy = tempfile::tempdir().unwrap();
    common::run_ok(
        "cp",
        &[
            "-a",
            &format!("{}/.", dir.path().display()),
            copy.path().to_str().unwrap(),
        ],
    );
    std::fs::remove_file(copy.path().join("strata.lock")).unwrap();
    let pool = Pool::open(copy.path(), PoolOptions::default()).unwrap();
    let vol = pool.volume(vid).unwrap();
    match vol.flush() {
        Err(Error::UnflushedLost(v)) => assert_eq!(v, vid),
        other => panic!("expected the loss to be reported, got {other:?}"),
    }
    vol.flush().expect("reported once");
}
