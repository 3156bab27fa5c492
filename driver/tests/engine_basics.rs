//! Focused behaviour of the engine's public API: one behaviour per test.

mod common;

use strata::engine::{
    BlockRange, Error, ErrorKind, JobConfig, Pool, PoolOptions, VolumePolicy, ZeroFlags,
};

const MIB: u64 = 1 << 20;

fn pool(dir: &std::path::Path) -> Pool {
    Pool::open(dir, PoolOptions::default()).expect("open pool")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

#[test]
fn new_volume_reads_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let v = p.volume(p.create_volume(4 * MIB).unwrap().id).unwrap();
    let mut buf = vec![1u8; 8192];
    v.read(MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn write_then_read_returns_the_data_at_unaligned_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let v = p.volume(p.create_volume(4 * MIB).unwrap().id).unwrap();
    let data = pattern(7, 10_000);
    v.write(4093, &data, false).unwrap();
    let mut buf = vec![0u8; 10_000];
    v.read(4093, &mut buf).unwrap();
    assert_eq!(buf, data);
    let mut around = vec![9u8; 20];
    v.read(4080, &mut around).unwrap();
    assert_eq!(&around[..13], &[0u8; 13]);
    assert_eq!(&around[13..], &data[..7]);
}

#[test]
fn snapshot_keeps_old_data_while_volume_changes() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let id = p.create_volume(4 * MIB).unwrap().id;
    let v = p.volume(id).unwrap();
    v.write(0, &pattern(1, 8192), false).unwrap();
    let snap = p.create_snapshot(id).unwrap();
    v.write(0, &pattern(2, 4096), false).unwrap();
    let reader = p.open_snapshot(snap.id).unwrap();
    let mut buf = vec![0u8; 8192];
    reader.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, 8192));
    v.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &pattern(2, 4096)[..]);
    assert_eq!(&buf[4096..], &pattern(1, 8192)[4096..]);
}

#[test]
fn clone_of_snapshot_sees_snapshot_data_and_diverges() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let id = p.create_volume(4 * MIB).unwrap().id;
    let v = p.volume(id).unwrap();
    v.write(MIB, &pattern(3, 4096), false).unwrap();
    let snap = p.create_snapshot(id).unwrap();
    let c = p.clone_snapshot(snap.id, Some(8 * MIB)).unwrap();
    assert_eq!(c.size_bytes, 8 * MIB);
    let cv = p.volume(c.id).unwrap();
    cv.write(MIB, &pattern(4, 4096), false).unwrap();
    let mut buf = vec![0u8; 4096];
    v.read(MIB, &mut buf).unwrap();
    assert_eq!(buf, pattern(3, 4096));
    cv.read(MIB, &mut buf).unwrap();
    assert_eq!(buf, pattern(4, 4096));
    cv.read(7 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn deleting_source_volume_and_snapshot_keeps_clone_intact() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let id = p.create_volume(4 * MIB).unwrap().id;
    p.volume(id)
        .unwrap()
        .write(0, &pattern(5, 4096), false)
        .unwrap();
    let snap = p.create_snapshot(id).unwrap();
    let clone = p.clone_snapshot(snap.id, None).unwrap();
    p.delete_volume(id).unwrap();
    p.delete_snapshot(snap.id).unwrap();
    drop(p);
    let p = pool(dir.path());
    let mut buf = vec![0u8; 4096];
    p.volume(clone.id).unwrap().read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(5, 4096));
    p.delete_volume(clone.id).unwrap();
    drop(p);
    let layers = std::fs::read_dir(dir.path().join("layers"))
        .unwrap()
        .count();
    assert_eq!(
        layers, 0,
        "every layer file is gone once nothing references it"
    );
}

#[test]
fn open_snapshot_reader_survives_snapshot_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let id = p.create_volume(MIB).unwrap().id;
    p.volume(id)
        .unwrap()
        .write(0, &pattern(6, 4096), false)
        .unwrap();
    let snap = p.create_snapshot(id).unwrap();
    let reader = p.open_snapshot(snap.id).unwrap();
    p.delete_snapshot(snap.id).unwrap();
    p.volume(id)
        .unwrap()
        .write(0, &pattern(7, 4096), false)
        .unwrap();
    let mut buf = vec![0u8; 4096];
    reader.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(6, 4096));
    assert!(matches!(
        p.open_snapshot(snap.id),
        Err(Error::SnapshotNotFound(_))
    ));
}

#[test]
fn trim_over_snapshot_data_reads_zeros_and_snapshot_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let id = p.create_volume(MIB).unwrap().id;
    let v = p.volume(id).unwrap();
    v.write(0, &pattern(8, 16384), false).unwrap();
    let snap = p.create_snapshot(id).unwrap();
    v.trim(4096, 8192).unwrap();
    let mut buf = vec![1u8; 16384];
    v.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &pattern(8, 16384)[..4096]);
    assert!(buf[4096..12288].iter().all(|&b| b == 0));
    let status = v.block_status(0, 16384).unwrap();
    assert_eq!(
        status.iter().map(|e| (e.len, e.zero)).collect::<Vec<_>>(),
        vec![(4096, false), (8192, true), (4096, false)]
    );
    p.open_snapshot(snap.id).unwrap().read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(8, 16384));
}

#[test]
fn write_zeroes_with_no_hole_keeps_blocks_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let v = p.volume(p.create_volume(MIB).unwrap().id).unwrap();
    v.write(0, &pattern(9, 8192), false).unwrap();
    v.write_zeroes(
        100,
        8000,
        ZeroFlags {
            no_hole: true,
            fast: false,
        },
    )
    .unwrap();
    let mut buf = vec![1u8; 8192];
    v.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..100], &pattern(9, 8192)[..100]);
    assert!(buf[100..8100].iter().all(|&b| b == 0));
    assert_eq!(&buf[8100..], &pattern(9, 8192)[8100..]);
}

#[test]
fn flushed_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id;
    {
        let p = pool(dir.path());
        id = p.create_volume(MIB).unwrap().id;
        let v = p.volume(id).unwrap();
        v.write(8192, &pattern(10, 4096), true).unwrap();
    }
    let p = pool(dir.path());
    let mut buf = vec![0u8; 4096];
    p.volume(id).unwrap().read(8192, &mut buf).unwrap();
    assert_eq!(buf, pattern(10, 4096));
}

#[test]
fn out_of_range_io_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let v = p.volume(p.create_volume(MIB).unwrap().id).unwrap();
    let err = v.write(MIB - 10, &[0u8; 20], false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfRange);
    let err = v.read(u64::MAX - 1, &mut [0u8; 4]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfRange);
    v.write(MIB, &[], false)
        .expect("zero length at the end is a no-op");
}

#[test]
fn resize_grows_and_refuses_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let id = p.create_volume(MIB).unwrap().id;
    assert_eq!(p.resize_volume(id, 2 * MIB).unwrap().size_bytes, 2 * MIB);
    let v = p.volume(id).unwrap();
    v.write(2 * MIB - 4096, &pattern(11, 4096), false).unwrap();
    assert!(matches!(
        p.resize_volume(id, MIB),
        Err(Error::ShrinkRefused { .. })
    ));
    assert_eq!(
        p.resize_volume(id, 3 * MIB + 1).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn operations_on_deleted_volume_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let id = p.create_volume(MIB).unwrap().id;
    let v = p.volume(id).unwrap();
    p.delete_volume(id).unwrap();
    assert!(matches!(
        v.write(0, &[1u8; 4096], false),
        Err(Error::VolumeNotFound(_))
    ));
    assert!(matches!(
        v.read(0, &mut [0u8; 4096]),
        Err(Error::VolumeNotFound(_))
    ));
    assert!(matches!(
        p.create_snapshot(id),
        Err(Error::VolumeNotFound(_))
    ));
    assert!(matches!(p.delete_volume(id), Err(Error::VolumeNotFound(_))));
}

#[test]
fn second_process_cannot_open_a_pool_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _p = pool(dir.path());
    assert!(matches!(
        Pool::open(dir.path(), PoolOptions::default()),
        Err(Error::PoolLocked(_))
    ));
}

#[test]
fn clone_volume_copies_current_contents() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let id = p.create_volume(MIB).unwrap().id;
    p.volume(id)
        .unwrap()
        .write(0, &pattern(12, 4096), false)
        .unwrap();
    let c = p.clone_volume(id, None).unwrap();
    assert!(
        p.list_snapshots().unwrap().is_empty(),
        "the implicit snapshot is not visible"
    );
    let mut buf = vec![0u8; 4096];
    p.volume(c.id).unwrap().read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(12, 4096));
}

#[test]
fn volumes_beyond_the_filesystem_file_limit_get_a_clear_error() {
    let dir = tempfile::tempdir().unwrap(); // ext4 here: 16 TiB per file
    let p = pool(dir.path());
    match p.create_volume(20 << 40) {
        Err(e @ Error::TooLargeForFilesystem { .. }) => assert_eq!(e.kind(), ErrorKind::OutOfRange),
        Ok(_) => eprintln!("this filesystem holds 20 TiB files; nothing to check"),
        Err(e) => panic!("unexpected error {e}"),
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("layers"))
            .unwrap()
            .count(),
        0,
        "no file left behind"
    );
}

#[test]
fn discarding_more_than_16_tib_at_once_is_recorded_in_pieces() {
    // Needs a filesystem with files beyond 16 TiB: XFS on a loop image.
    let Ok(fs) = common::LoopFs::xfs_reflink(512) else {
        return;
    };
    let dir = fs.path().join("pool");
    let p = pool(&dir);
    let size = 20u64 << 40; // 20 TiB, thin
    let id = p.create_volume(size).unwrap().id;
    let v = p.volume(id).unwrap();
    v.write(size - 4096, &pattern(13, 4096), false).unwrap();
    p.create_snapshot(id).unwrap();
    v.trim(0, size).unwrap();
    v.flush().unwrap();
    drop(v);
    drop(p);
    let p = pool(&dir);
    let mut buf = vec![1u8; 4096];
    p.volume(id).unwrap().read(size - 4096, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "the discard reached the last block"
    );
}

#[test]
fn a_layer_freed_while_still_held_has_no_file_left_after_close() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let v = p.create_volume(1 << 20).unwrap().id;
    let vol = p.volume(v).unwrap();
    vol.write(0, &pattern(3, 4096), false).unwrap();
    // A holder that outlives the pool (a serving thread at exit).
    let held = p.volume(v).unwrap();
    p.delete_volume(v).unwrap();
    drop(vol);
    p.close().unwrap();
    let layers: Vec<_> = std::fs::read_dir(dir.path().join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(layers.is_empty(), "left behind: {layers:?}");
    drop(held);
}

/// `allocation_depth` names the layer each run resolves to, counted from
/// the top: data by its layer, a zero record by the layer that made it
/// (a discard over a discard by the lower one), nothing as 0; the same for
/// a snapshot as of its own layer, after a reopen, and after a merge
/// folded the chain.
#[test]
fn allocation_depth_names_the_layer_each_block_resolves_to() {
    const B: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let depths = |e: Vec<strata::engine::DepthExtent>| -> Vec<(u64, u32)> {
        e.iter().map(|e| (e.len, e.depth)).collect()
    };
    let (vid, s2) = {
        let p = pool(dir.path());
        let vid = p.create_volume(4 * MIB).unwrap().id;
        let v = p.volume(vid).unwrap();
        // Layer 3 (the base): blocks 0..2 and 4..6.
        v.write(0, &pattern(1, 2 * B as usize), false).unwrap();
        v.write(4 * B, &pattern(2, 2 * B as usize), false).unwrap();
        p.create_snapshot(vid).unwrap();
        // Layer 2: blocks 2..4, and zeros over block 4.
        v.write(2 * B, &pattern(3, 2 * B as usize), false).unwrap();
        v.trim(4 * B, B).unwrap();
        let s2 = p.create_snapshot(vid).unwrap().id;
        // Layer 1 (the top): block 0, zeros over block 5 and again over 4.
        v.write(0, &pattern(4, B as usize), false).unwrap();
        v.trim(5 * B, B).unwrap();
        v.trim(4 * B, B).unwrap();
        // (Blocks 2..4 and 4 are both at depth 2: one run.)
        let want = vec![(B, 1), (B, 3), (3 * B, 2), (B, 1), (4 * MIB - 6 * B, 0)];
        assert_eq!(depths(v.allocation_depth(0, 4 * MIB).unwrap()), want);
        // Unaligned: cut to the range asked.
        assert_eq!(
            depths(v.allocation_depth(100, 2 * B).unwrap()),
            vec![(B - 100, 1), (B, 3), (100, 2)]
        );
        let snap = p.open_snapshot(s2).unwrap();
        assert_eq!(
            depths(snap.allocation_depth(0, 8 * B).unwrap()),
            vec![(2 * B, 2), (3 * B, 1), (B, 2), (2 * B, 0)]
        );
        assert_eq!(
            v.allocation_depth(4 * MIB, 1).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        (vid, s2)
    };
    // From the catalog and journal after a reopen; then the middle
    // snapshot goes and a merge folds its layer: two layers are left.
    let p = pool(dir.path());
    let v = p.volume(vid).unwrap();
    assert_eq!(
        depths(v.allocation_depth(0, 6 * B).unwrap()),
        vec![(B, 1), (B, 3), (3 * B, 2), (B, 1)]
    );
    p.delete_snapshot(s2).unwrap();
    p.merge(vid, 0).unwrap();
    assert!(p.wait_for_jobs(std::time::Duration::from_secs(60)).unwrap());
    // The snapshot's layer went into the top: what it held is at depth 1.
    assert_eq!(v.depth(), 2);
    assert_eq!(
        depths(v.allocation_depth(0, 6 * B).unwrap()),
        vec![(B, 1), (B, 2), (4 * B, 1)]
    );
    let mut buf = vec![0u8; 6 * B as usize];
    v.read(0, &mut buf).unwrap();
    assert_eq!(buf[..B as usize], pattern(4, B as usize)[..]);
}

#[test]
fn a_pin_keeps_its_instant_and_lands_in_another_volume() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let a = p.volume(p.create_volume(4 * MIB).unwrap().id).unwrap();
    let b = p.volume(p.create_volume(4 * MIB).unwrap().id).unwrap();
    let old = pattern(1, 64 << 10);
    a.write(0, &old, false).unwrap();
    // Blocks 16..24 read as zeros, written over in b first.
    let range = [BlockRange {
        first: 0,
        blocks: 24,
    }];
    // The top holds the range: pinning freezes it (one layer more).
    let depth = a.depth();
    let pins = p.pin(a.id(), &range).unwrap();
    assert_eq!(a.depth(), depth + 1);
    // Later writes, and the source's deletion, do not reach the pin.
    a.write(0, &pattern(2, 64 << 10), false).unwrap();
    b.write(0, &pattern(3, 24 * 4096), false).unwrap();
    let landed = b.write_pinned(8, &pins[0], 0, 24, true).unwrap();
    assert_eq!(landed.shared + landed.copied, 64 << 10);
    assert_eq!(landed.zeroed, 8 * 4096);
    p.delete_volume(a.id()).unwrap();
    p.run_jobs_here().unwrap();
    let mut got = vec![0u8; 32 * 4096];
    b.read(0, &mut got).unwrap();
    assert_eq!(&got[..8 * 4096], &pattern(3, 24 * 4096)[..8 * 4096]);
    assert_eq!(&got[8 * 4096..24 * 4096], &old[..]);
    assert!(got[24 * 4096..].iter().all(|&x| x == 0));

    // Durable (FUA) and independent of the source: still there after a
    // reopen.
    let id = b.id();
    drop((a, b, pins));
    p.close().unwrap();
    let p = pool(dir.path());
    let b = p.volume(id).unwrap();
    let mut again = vec![0u8; 32 * 4096];
    b.read(0, &mut again).unwrap();
    assert_eq!(again, got);
}

#[test]
fn pinning_frozen_blocks_or_a_snapshot_freezes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let a = p.volume(p.create_volume(4 * MIB).unwrap().id).unwrap();
    a.write(0, &pattern(4, 8192), false).unwrap();
    let snap = p.create_snapshot(a.id()).unwrap();
    let depth = a.depth();
    let range = [BlockRange {
        first: 0,
        blocks: 4,
    }];
    let pins = p.pin(a.id(), &range).unwrap();
    let from_snap = p.open_snapshot(snap.id).unwrap().pin(&range).unwrap();
    assert_eq!(a.depth(), depth, "nothing in the top: no freeze");
    let mut buf = vec![0u8; 4 * 4096];
    pins[0].read(0, &mut buf).unwrap();
    assert_eq!(&buf[..8192], &pattern(4, 8192)[..]);
    from_snap[0].read(0, &mut buf).unwrap();
    assert_eq!(&buf[..8192], &pattern(4, 8192)[..]);
    // Out of range, in the pin or in the volume: typed errors.
    let past = [BlockRange {
        first: 1023,
        blocks: 2,
    }];
    assert_eq!(
        p.pin(a.id(), &past).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        a.write_pinned(0, &pins[0], 2, 3, false).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        a.write_pinned(1023, &pins[0], 0, 2, false)
            .unwrap_err()
            .kind(),
        ErrorKind::OutOfRange
    );
}

#[test]
fn pins_freeze_a_chain_only_up_to_its_depth_limit() {
    let dir = tempfile::tempdir().unwrap();
    let opts = PoolOptions {
        jobs: JobConfig {
            background: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let p = Pool::open(dir.path(), opts).unwrap();
    let v = p.volume(p.create_volume(4 * MIB).unwrap().id).unwrap();
    p.set_policy(
        v.id(),
        VolumePolicy {
            max_chain_depth: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let range = [BlockRange {
        first: 0,
        blocks: 1,
    }];
    // Each pin of a block just written freezes the top: until the limit.
    let mut pins = Vec::new();
    let refused = loop {
        v.write(0, &pattern(pins.len() as u8, 4096), false).unwrap();
        match p.pin(v.id(), &range) {
            Ok(pin) => pins.push(pin),
            Err(e) => break e,
        }
        assert!(pins.len() < 10, "no limit");
    };
    assert_eq!(refused.kind(), ErrorKind::LimitReached, "{refused}");
    assert_eq!(v.depth(), 4);
    // The folds the pins queued shorten the chain; the pins still read
    // what they pinned.
    p.run_jobs_here().unwrap();
    assert!(v.depth() < 4);
    assert!(p.pin(v.id(), &range).is_ok());
    for (i, pin) in pins.iter().enumerate() {
        let mut buf = vec![0u8; 4096];
        pin[0].read(0, &mut buf).unwrap();
        assert_eq!(buf, pattern(i as u8, 4096));
    }
}
