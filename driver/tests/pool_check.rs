//! `strata pool check`, run as a user would: the real binary on a real pool.

use std::path::Path;
use std::process::Command;

use strata::engine::{Pool, PoolOptions};

fn check(dir: &Path, repair: bool) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(["pool", "check"]);
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.arg(dir).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap(), text)
}

fn populated_pool(dir: &Path) -> strata::engine::VolumeInfo {
    let pool = Pool::open(dir, PoolOptions::default()).unwrap();
    let v = pool.create_volume(8 << 20).unwrap();
    pool.volume(v.id)
        .unwrap()
        .write(0, &[7u8; 65536], false)
        .unwrap();
    let s = pool.create_snapshot(v.id).unwrap();
    pool.clone_snapshot(s.id, None).unwrap();
    pool.create_snapshot(v.id).unwrap();
    pool.delete_snapshot(s.id).unwrap();
    pool.close().unwrap();
    v
}

#[test]
fn healthy_pool_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    populated_pool(dir.path());
    let (code, out) = check(dir.path(), false);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK: the pool is consistent"), "{out}");
    assert!(out.contains("2 volumes, 1 snapshots, 4 layers"), "{out}");
}

#[test]
fn orphans_are_reported_and_repair_removes_only_them() {
    let dir = tempfile::tempdir().unwrap();
    populated_pool(dir.path());
    let stray_layer = dir
        .path()
        .join("layers/0d2f7c1e-5b8a-4a44-9d3e-1f2a3b4c5d6e.data");
    let stray_journal = dir
        .path()
        .join("journal/0d2f7c1e-5b8a-4a44-9d3e-1f2a3b4c5d6e.wal");
    std::fs::write(&stray_layer, b"x").unwrap();
    std::fs::write(&stray_journal, b"y").unwrap();
    let (code, out) = check(dir.path(), false);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.matches("orphan:").count(), 2, "{out}");
    let (code, out) = check(dir.path(), true);
    assert_eq!(code, 0, "{out}");
    assert!(!stray_layer.exists() && !stray_journal.exists());
    let (code, out) = check(dir.path(), false);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn missing_layer_file_is_damage_that_repair_does_not_touch() {
    let dir = tempfile::tempdir().unwrap();
    populated_pool(dir.path());
    let victim = std::fs::read_dir(dir.path().join("layers"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&victim).unwrap();
    let (code, out) = check(dir.path(), true);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("PROBLEM") && out.contains("is missing"),
        "{out}"
    );
}

#[test]
fn pool_in_use_cannot_be_checked() {
    let dir = tempfile::tempdir().unwrap();
    let _pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let (code, out) = check(dir.path(), false);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("in use by another process"), "{out}");
}
