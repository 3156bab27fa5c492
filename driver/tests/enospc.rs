//! A full pool: writes fail with a no-space error, nothing flushed before
//! is lost, and the pool reopens cleanly. Runs on a 48 MiB ext4 loop image
//! with no root reserve (root; skipped with a message outside CI).

mod common;

use common::{LoopFs, Rng};
use strata::engine::{ErrorKind, Pool, PoolOptions};

const CHUNK: usize = 256 << 10;

#[test]
fn full_pool_fails_writes_with_no_space_and_keeps_flushed_data() {
    let Ok(fs) = LoopFs::new(&["mkfs.ext4", "-q", "-F", "-m", "0"], 48) else {
        return;
    };
    let dir = fs.path().join("pool");
    let mut rng = Rng::from_env("enospc");
    let pool = Pool::open(&dir, PoolOptions::default()).unwrap();
    let id = pool.create_volume(256 << 20).unwrap().id;
    let vol = pool.volume(id).unwrap();

    // Fill sequentially, flushing every 4 chunks, until the disk is full.
    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut flushed = 0;
    let err = loop {
        let mut chunk = vec![0u8; CHUNK];
        rng.fill(&mut chunk);
        let off = (written.len() * CHUNK) as u64;
        if off + CHUNK as u64 > vol.size() {
            panic!("the volume is larger than the filesystem; it never filled");
        }
        if let Err(e) = vol.write(off, &chunk, false) {
            break e;
        }
        written.push(chunk);
        if written.len().is_multiple_of(4) {
            if let Err(e) = vol.flush() {
                break e;
            }
            flushed = written.len();
        }
    };
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert!(
        flushed > 16,
        "only {flushed} chunks fit before the disk was full"
    );

    // Everything flushed reads back while the disk is still full.
    let mut buf = vec![0u8; CHUNK];
    for (i, want) in written.iter().take(flushed).enumerate() {
        vol.read((i * CHUNK) as u64, &mut buf).unwrap();
        assert!(buf == *want, "flushed chunk {i} changed after ENOSPC");
    }
    // Other operations fail cleanly too, or succeed; none may panic.
    let _ = pool.create_snapshot(id);
    let _ = pool.create_volume(1 << 20);
    drop(vol);
    let _ = pool.close();

    // The pool reopens on the still-full disk and keeps every flushed chunk.
    let pool = Pool::open(&dir, PoolOptions::default()).expect("reopen a full pool");
    let vol = pool.volume(id).unwrap();
    for (i, want) in written.iter().take(flushed).enumerate() {
        vol.read((i * CHUNK) as u64, &mut buf).unwrap();
        assert!(buf == *want, "flushed chunk {i} lost across reopen");
    }
    // After freeing space (deleting the volume), the pool works again.
    drop(vol);
    pool.delete_volume(id).unwrap();
    let again = pool.create_volume(1 << 20).unwrap();
    pool.volume(again.id)
        .unwrap()
        .write(0, &[1u8; 4096], true)
        .unwrap();
    pool.close().unwrap();
    let report = strata::engine::check::check_pool(&dir, false).unwrap();
    assert!(report.is_clean(), "{:?}", report.findings);
}

/// The logs of unflushed writes live on the node's state tmpfs. When it is
/// full: a volume that cannot get its log is refused with a clear error
/// (before, the process died of SIGBUS at its first store into a sparse
/// mapping), and a volume whose log cannot grow keeps taking writes (their
/// loss at a crash is then reported, `tests/faults.rs`).
#[test]
fn a_full_state_tmpfs_is_an_error_not_a_crash() {
    if common::require(common::is_root(), "needs root to mount a tmpfs").is_err() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    // Room for the first 64 KiB of two logs and a little more.
    common::run_ok(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=160k",
            "tmpfs",
            run.to_str().unwrap(),
        ],
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(run.clone());
    let opts = PoolOptions {
        unflushed_dir: Some(run.join("unflushed")),
        ..Default::default()
    };
    let pool = Pool::open(&dir.path().join("pool"), opts).unwrap();
    let mut made = Vec::new();
    let refused = loop {
        match pool.create_volume(64 << 20) {
            Ok(v) => made.push(v.id),
            Err(e) => break e,
        }
        assert!(made.len() < 10, "the tmpfs never filled");
    };
    assert_eq!(refused.kind(), ErrorKind::NoSpace, "{refused}");
    assert!(refused.to_string().contains("state directory"), "{refused}");
    // A volume whose log must grow past its first 64 KiB on the full
    // tmpfs: every write still succeeds.
    let vol = pool.volume(made[0]).unwrap();
    for i in 0..3000u64 {
        vol.write(2 * i * 4096, &[7u8; 4096], false).unwrap();
    }
    vol.flush().unwrap();
    let mut buf = [0u8; 4096];
    vol.read(2 * 2999 * 4096, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 4096]);
}
