//! The engine's side of a live move (`engine::moving`): the change record,
//! the hold of writes with its deadline, and the retirement of a copy that
//! moved away, also across a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::engine::{Attachment, Error, Pool, PoolOptions, ZeroFlags};

fn pool(dir: &std::path::Path) -> Pool {
    Pool::open(dir, PoolOptions::default()).unwrap()
}

/// Only changes made while tracked are reported, in order and merged into
/// runs; writes, discards and zeroing all count; a take of at most N runs
/// leaves the rest for the next; a batch the next take does not confirm
/// comes back.
#[test]
fn changes_are_reported_once_and_only_while_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let v = p.volume(p.create_volume(1 << 20).unwrap().id).unwrap();
    v.write(0, &[1u8; 8192], false).unwrap();
    assert_eq!(v.take_changes(0, 10), None, "not tracked");
    v.track_changes();
    let (b, taken) = v.take_changes(0, 10).unwrap();
    assert_eq!(taken, vec![], "earlier writes are the copy's");
    v.write(4096, &[2u8; 4096], false).unwrap();
    v.write(8192, &[3u8; 10], false).unwrap();
    v.trim(65536, 8192).unwrap();
    v.write_zeroes(
        131072,
        4096,
        ZeroFlags {
            no_hole: true,
            fast: false,
        },
    )
    .unwrap();
    let (b, taken) = v.take_changes(b, 2).unwrap();
    assert_eq!(
        taken,
        vec![(4096, 8192), (65536, 8192)],
        "a partial block counts whole"
    );
    // Not confirmed (its answer was lost): handed out again.
    let (_, again) = v.take_changes(b - 1, 10).unwrap();
    assert_eq!(again, vec![(4096, 8192), (65536, 8192), (131072, 4096)]);
    let (b, _) = v.take_changes(0, 10).unwrap();
    let (b, taken) = v.take_changes(b, 10).unwrap();
    assert_eq!(taken, vec![]);
    v.untrack_changes();
    v.write(0, &[4u8; 4096], false).unwrap();
    assert_eq!(v.take_changes(b, 10), None);
}

/// A hold lets writes in flight finish, keeps new ones waiting (reads go
/// on), and ends by itself at its deadline: then the held write lands and
/// a seal is refused (the target may lack it).
#[test]
fn a_hold_ends_by_itself_at_its_deadline_and_a_late_seal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path());
    let v = p.volume(p.create_volume(1 << 20).unwrap().id).unwrap();
    v.track_changes();
    let deadline = Duration::from_millis(300);
    let start = Instant::now();
    assert!(v.hold_writes(deadline));
    assert!(v.writes_held());
    let mut buf = [0u8; 4096];
    v.read(0, &mut buf).unwrap();
    assert!(start.elapsed() < deadline, "reads are not held");
    let w = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || {
            v.write(0, &[7u8; 4096], false).unwrap();
            Instant::now()
        })
    };
    let landed = w.join().unwrap();
    assert!(
        landed.duration_since(start) >= deadline,
        "the write waited for the hold's deadline"
    );
    assert!(!v.writes_held());
    let sealed = v.retire_held("n2", || Ok(())).unwrap();
    assert!(sealed.is_err(), "the hold ended: no seal");
    v.read(0, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 4096]);
    assert_eq!(v.take_changes(0, 10).unwrap().1, vec![(0, 4096)]);
}

/// A seal while writes are held and every change was confirmed retires
/// the copy (not before: a change not confirmed refuses it): the held write and
/// every later call fail as moved, with the new owner's name; if the
/// durable record fails, nothing is retired and the hold goes on. A copy
/// the catalog records as moved live is retired when opened again.
#[test]
fn a_seal_under_the_hold_retires_the_copy_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let vid;
    {
        let p = pool(dir.path());
        vid = p.create_volume(1 << 20).unwrap().id;
        let v = p.volume(vid).unwrap();
        v.write(0, &[5u8; 4096], false).unwrap();
        v.track_changes();
        v.write(8192, &[5u8; 4096], false).unwrap();
        assert!(v.hold_writes(Duration::from_secs(10)));
        // A change the target has not confirmed: no seal.
        let (b, taken) = v.take_changes(0, 10).unwrap();
        assert_eq!(taken, vec![(8192, 4096)]);
        assert!(v.retire_held("n2", || Ok(())).unwrap().is_err());
        let (_, taken) = v.take_changes(b, 10).unwrap();
        assert!(taken.is_empty());
        let w = {
            let v = Arc::clone(&v);
            std::thread::spawn(move || v.write(4096, &[6u8; 4096], false))
        };
        std::thread::sleep(Duration::from_millis(50));
        let failed = v.retire_held("n2", || Err(Error::Corrupt("disk says no".into())));
        assert!(matches!(failed, Err(Error::Corrupt(_))), "{failed:?}");
        assert!(v.writes_held(), "a failed seal keeps the hold");
        let sealed = v
            .retire_held("n2", || {
                p.set_attachment(
                    vid,
                    &Attachment {
                        node: "n2".into(),
                        epoch: 2,
                        read_only: true,
                        for_move: true,
                        moved: true,
                        live: true,
                        ..Attachment::default()
                    },
                )
            })
            .unwrap();
        assert!(sealed.is_ok());
        match w.join().unwrap() {
            Err(Error::Moved { node, .. }) => assert_eq!(node, "n2"),
            other => panic!("the held write: {other:?}"),
        }
        let mut buf = [0u8; 4096];
        assert!(matches!(v.read(0, &mut buf), Err(Error::Moved { .. })));
        assert!(matches!(v.flush(), Err(Error::Moved { .. })));
        assert_eq!(v.take_changes(0, 10), None, "tracking ended with the seal");
    }
    let p = pool(dir.path());
    let v = p.volume(vid).unwrap();
    let mut buf = [0u8; 4096];
    assert!(matches!(v.read(0, &mut buf), Err(Error::Moved { .. })));
    // A rollback's record makes it usable again, with its data.
    p.set_attachment(vid, &Attachment::default()).unwrap();
    v.read(0, &mut buf).unwrap();
    assert_eq!(buf, [5u8; 4096]);
}

/// A group snapshot's cut: with the writes of two volumes held, a writer
/// that writes A then B (each after the last was acknowledged) is stopped
/// between two writes, so the snapshots never hold a B newer than A; the
/// cut ends the hold; a cut after the hold's deadline, after a release, or
/// of a volume the hold does not cover takes nothing.
#[test]
fn a_group_cut_is_consistent_across_volumes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use strata::engine::SnapshotId;
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(pool(dir.path()));
    let a = p.create_volume(1 << 20).unwrap().id;
    let b = p.create_volume(1 << 20).unwrap().id;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (p, stop) = (Arc::clone(&p), Arc::clone(&stop));
        std::thread::spawn(move || {
            let (va, vb) = (p.volume(a).unwrap(), p.volume(b).unwrap());
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                va.write(0, &n.to_le_bytes(), false).unwrap();
                vb.write(0, &n.to_le_bytes(), false).unwrap();
            }
            n
        })
    };
    let counter = |id: SnapshotId| {
        let mut buf = [0u8; 8];
        p.open_snapshot(id).unwrap().read(0, &mut buf).unwrap();
        u64::from_le_bytes(buf)
    };
    let (mut between, mut longest) = (0, Duration::ZERO);
    for round in 0..40u64 {
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            p.hold_group(round, &[b, a], Duration::from_secs(5))
                .unwrap()
        );
        let (sa, sb) = (SnapshotId::new_random(), SnapshotId::new_random());
        let (infos, held) = p.cut_group(round, &[(a, sa), (b, sb)]).unwrap();
        assert_eq!(infos.iter().map(|i| i.id).collect::<Vec<_>>(), [sa, sb]);
        longest = longest.max(held);
        let (na, nb) = (counter(sa), counter(sb));
        assert!(
            nb == na || nb + 1 == na,
            "round {round}: A holds write {na}, B holds write {nb}"
        );
        between += usize::from(nb + 1 == na);
        p.delete_snapshot(sa).unwrap();
        p.delete_snapshot(sb).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 40, "the writer ran ({written} writes)");
    eprintln!(
        "{between} of 40 cuts fell between a write to A and its write to B; longest hold {longest:?}"
    );

    let late = SnapshotId::new_random();
    // Reached its deadline: the cut takes nothing, and writes go on. (A
    // deadline long enough for the hold's thread to take it on a loaded
    // machine: 50 ms was not.)
    assert!(p.hold_group(100, &[a], Duration::from_millis(500)).unwrap());
    std::thread::sleep(Duration::from_millis(800));
    p.volume(a).unwrap().write(0, &[7u8; 8], false).unwrap();
    assert!(matches!(
        p.cut_group(100, &[(a, late)]),
        Err(Error::NotHeld(100))
    ));
    // Released: likewise.
    assert!(p.hold_group(101, &[a, b], Duration::from_secs(30)).unwrap());
    assert!(p.release_group(101));
    p.volume(b).unwrap().write(0, &[7u8; 8], false).unwrap();
    assert!(matches!(
        p.cut_group(101, &[(b, late)]),
        Err(Error::NotHeld(_))
    ));
    // A member the hold does not cover; a volume named twice.
    assert!(p.hold_group(102, &[a], Duration::from_secs(30)).unwrap());
    assert!(matches!(
        p.cut_group(102, &[(b, late)]),
        Err(Error::InvalidGroup(_))
    ));
    assert!(!p.release_group(102), "the refused cut ended the hold");
    assert!(matches!(
        p.hold_group(103, &[a, a], Duration::from_secs(1)),
        Err(Error::InvalidGroup(_))
    ));
    assert!(matches!(
        p.open_snapshot(late),
        Err(Error::SnapshotNotFound(_))
    ));
    // A hold that ended is not started again by a late or repeated call;
    // nor is one released before it began.
    assert!(matches!(
        p.hold_group(100, &[a], Duration::from_secs(1)),
        Err(Error::NotHeld(100))
    ));
    assert!(!p.release_group(104));
    assert!(matches!(
        p.hold_group(104, &[a], Duration::from_secs(1)),
        Err(Error::NotHeld(104))
    ));
    // A retried call for a hold in place names the same volumes.
    assert!(p.hold_group(105, &[a, b], Duration::from_secs(30)).unwrap());
    assert!(p.hold_group(105, &[b, a], Duration::from_secs(30)).unwrap());
    assert!(matches!(
        p.hold_group(105, &[a], Duration::from_secs(30)),
        Err(Error::InvalidGroup(_))
    ));
    // A cut names every held volume once.
    let other = SnapshotId::new_random();
    assert!(matches!(
        p.cut_group(105, &[(a, late), (b, other), (a, SnapshotId::new_random())]),
        Err(Error::InvalidGroup(_))
    ));
    assert!(matches!(
        p.open_snapshot(other),
        Err(Error::SnapshotNotFound(_))
    ));
    // A live move's hold of a member: the group's gives way at once.
    let va = p.volume(a).unwrap();
    assert!(va.hold_writes(Duration::from_secs(30)));
    let t = Instant::now();
    assert!(!p.hold_group(106, &[a, b], Duration::from_secs(5)).unwrap());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    va.release_writes();
    p.volume(b).unwrap().write(0, &[8u8; 8], false).unwrap();
    drop(va);
    // No top file is left behind by the refused cuts.
    drop(p);
    let report = strata::engine::check::check_pool(dir.path(), false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}
