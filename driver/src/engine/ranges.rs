//! Which bytes of a snapshot hold data, and which changed since an older
//! snapshot of the same volume: answered from the presence maps alone,
//! never by reading data (changed-block tracking for backups).
//!
//! A snapshot's chain is its layer and the frozen layers under it. Of an
//! older snapshot `base` of the same volume, the layer is in that chain,
//! and a block changed since `base` exactly when some layer above it
//! defines the block (data, or zeros over what did not read as zeros at
//! `base`). Merges never fold a layer a visible snapshot is on, and a fold
//! gives the child the union of both presence maps, so the answer does not
//! change when the layers between two snapshots are folded. A block
//! written again with the bytes it held counts as changed, as with every
//! changed-block tracking that does not compare data.
//!
//! The address space is walked a window at a time: a page costs the index
//! directories of the windows it covers plus its extents, so a sparse
//! volume is cheap whatever its size, and a page's memory is bounded by
//! one window's extents.

use std::collections::HashMap;
use std::sync::Arc;

use super::catalog::LayerRecord;
use super::error::{Error, Result};
use super::geometry::BLOCK_SIZE;
use super::ids::{LayerId, SnapshotId, VolumeId};
use super::pool::{Pool, Shared};
use super::view::{self, View};
use crate::engine::catalog::SnapshotState;

/// The address space looked at per step (at most 131072 extents).
const WINDOW: u64 = 1 << 30;

/// One page of a snapshot's ranges (see [`Pool::snapshot_ranges`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePage {
    /// The snapshot's size in bytes.
    pub size: u64,
    /// `(offset, length)` in bytes: ascending, apart, whole blocks.
    pub ranges: Vec<(u64, u64)>,
    /// Where the next page starts; `size` after the last page.
    pub next: u64,
}

/// What the changes since snapshot `base` are computed against: the chain
/// under a layer (top first), and how many of its layers lie above
/// `base`'s.
pub(crate) struct Since {
    chain: Vec<LayerRecord>,
    above: u32,
    /// Views of lower layers, built once per call (zero records are
    /// resolved with them).
    views: HashMap<LayerId, Arc<View>>,
}

impl Shared {
    /// [`Since`] `base` for the chain under `top` (`of` names it for
    /// errors): `base` must be in that chain's history, a snapshot of the
    /// same volume or of one it was cloned from (a snapshot moved to
    /// another node is a clone's there). The caller holds the shape lock.
    pub(crate) fn since(
        &self,
        top: LayerId,
        base: SnapshotId,
        of: &dyn Fn() -> String,
    ) -> Result<Since> {
        let txn = self.catalog.read()?;
        let b = match txn.snapshot(base)? {
            Some(r) if r.state == SnapshotState::Ready => r,
            _ => return Err(Error::SnapshotNotFound(base)),
        };
        let refuse = |why| Error::NotComparable {
            base,
            of: of(),
            why,
        };
        let mut chain = txn.chain(top)?;
        chain.reverse();
        match chain.iter().position(|l| l.id == b.layer) {
            Some(k) => Ok(Since {
                chain,
                above: k as u32,
                views: HashMap::new(),
            }),
            None if txn.chain(b.layer)?.iter().any(|l| l.id == top) => Err(refuse("it is newer")),
            None => Err(refuse(
                "it is not in its history (a snapshot of another volume)",
            )),
        }
    }

    /// Appends to `out` the runs of `at..at+len` of `view` (the view of
    /// `since.chain`) that the layers above the base define.
    pub(crate) fn changed_runs(
        &self,
        view: &View,
        since: &mut Since,
        at: u64,
        len: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        let views = &mut since.views;
        let below = |layer| match views.get(&layer) {
            Some(v) => Ok(Arc::clone(v)),
            None => {
                let v = self.view_of(layer)?;
                views.insert(layer, Arc::clone(&v));
                Ok(v)
            }
        };
        let mut pos = at;
        for e in view::allocation_depth(view, &since.chain, below, at, len)? {
            if (1..=since.above).contains(&e.depth) {
                push(out, pos, e.len);
            }
            pos += e.len;
        }
        Ok(())
    }
}

impl Pool {
    /// The ranges of snapshot `target` that hold data (`base` None: zeros
    /// never written, or discarded, do not), or that changed since `base`,
    /// an older snapshot in its history (of the same volume, or of one
    /// that volume was cloned from); from byte `from` (rounded down to a
    /// block), at most `max` of them (at least 1).
    ///
    /// Errors: a snapshot that does not exist is not found; `from` at or
    /// past the end is out of range; a `base` newer than `target` or not in
    /// its history is [`Error::NotComparable`].
    pub fn snapshot_ranges(
        &self,
        target: SnapshotId,
        base: Option<SnapshotId>,
        from: u64,
        max: usize,
    ) -> Result<RangePage> {
        let sh = self.shared();
        // No merge, snapshot or delete changes the chains meanwhile.
        let _shape = sh.shape.lock().expect("shape lock");
        let t = match sh.catalog.read()?.snapshot(target)? {
            Some(r) if r.state == SnapshotState::Ready => r,
            _ => return Err(Error::SnapshotNotFound(target)),
        };
        let mut since = base
            .map(|b| sh.since(t.layer, b, &|| format!("snapshot {target}")))
            .transpose()?;
        if from >= t.size {
            return Err(Error::OutOfRange {
                offset: from,
                len: 0,
                size: t.size,
            });
        }
        let view = sh.view_of(t.layer)?;
        let max = max.max(1);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut at = from - from % BLOCK_SIZE;
        while at < t.size {
            let len = WINDOW.min(t.size - at);
            match &mut since {
                None => {
                    let mut pos = at;
                    for e in view::block_status(&view, at, len, false) {
                        if !e.zero {
                            push(&mut ranges, pos, e.len);
                        }
                        pos += e.len;
                    }
                }
                Some(since) => sh.changed_runs(&view, since, at, len, &mut ranges)?,
            }
            at += len;
            // One range past the page tells that the page's last range is
            // whole (it does not go on into the next window).
            if ranges.len() > max {
                ranges.truncate(max);
                let (o, l) = ranges[max - 1];
                return Ok(RangePage {
                    size: t.size,
                    ranges,
                    next: o + l,
                });
            }
        }
        Ok(RangePage {
            size: t.size,
            ranges,
            next: t.size,
        })
    }
}

impl Pool {
    /// The ranges of volume `vid` changed since `base`, a snapshot in its
    /// history, writes not flushed yet included; paged as
    /// [`Pool::snapshot_ranges`] pages.
    pub fn volume_changes(
        &self,
        vid: VolumeId,
        base: SnapshotId,
        from: u64,
        max: usize,
    ) -> Result<RangePage> {
        let vol = self.volume(vid)?;
        let size = vol.size();
        if from >= size {
            return Err(Error::OutOfRange {
                offset: from,
                len: 0,
                size,
            });
        }
        let max = max.max(1);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut at = from - from % BLOCK_SIZE;
        while at < size {
            let len = WINDOW.min(size - at);
            for (o, l) in vol.changed_since(base, at, len)? {
                push(&mut ranges, o, l);
            }
            at += len;
            if ranges.len() > max {
                ranges.truncate(max);
                let (o, l) = ranges[max - 1];
                return Ok(RangePage {
                    size,
                    ranges,
                    next: o + l,
                });
            }
        }
        Ok(RangePage {
            size,
            ranges,
            next: size,
        })
    }
}

/// Appends `at..at+len` to `ranges`, joined to the last one if adjacent.
fn push(ranges: &mut Vec<(u64, u64)>, at: u64, len: u64) {
    match ranges.last_mut() {
        Some((o, l)) if *o + *l == at => *l += len,
        _ => ranges.push((at, len)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::*;
    use crate::engine::{ErrorKind, PoolOptions, VolumeId, ZeroFlags};

    const B: u64 = BLOCK_SIZE;

    /// Every page from 0, `max` ranges at a time, joined.
    fn all(pool: &Pool, t: SnapshotId, base: Option<SnapshotId>, max: usize) -> Vec<(u64, u64)> {
        let (mut out, mut from) = (Vec::new(), 0);
        loop {
            let page = pool.snapshot_ranges(t, base, from, max).unwrap();
            assert!(page.ranges.len() <= max.max(1));
            assert!(page.ranges.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
            out.extend(page.ranges.iter().copied());
            if page.next == page.size {
                return out;
            }
            assert!(page.next > from, "no progress");
            from = page.next;
        }
    }

    fn write(pool: &Pool, v: VolumeId, block: u64, byte: u8) {
        let vol = pool.volume(v).unwrap();
        vol.write(block * B, &vec![byte; B as usize], false)
            .unwrap();
    }

    fn discard(pool: &Pool, v: VolumeId, block: u64) {
        let vol = pool.volume(v).unwrap();
        vol.write_zeroes(block * B, B, ZeroFlags::default())
            .unwrap();
    }

    #[test]
    fn allocated_and_changed_ranges_and_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        let v = pool.create_volume(1024 * B).unwrap().id;
        for b in [0, 1, 10, 11, 700] {
            write(&pool, v, b, 7);
        }
        discard(&pool, v, 10);
        let s1 = pool.create_snapshot(v).unwrap().id;
        assert_eq!(
            all(&pool, s1, None, 100),
            [(0, 2 * B), (11 * B, B), (700 * B, B)]
        );
        // Pages of one range each, and from an offset inside a range
        // (rounded down to its block).
        assert_eq!(all(&pool, s1, None, 1), all(&pool, s1, None, 100));
        let page = pool.snapshot_ranges(s1, None, B + 5, 10).unwrap();
        assert_eq!(page.ranges[0], (B, B));

        write(&pool, v, 5, 1);
        discard(&pool, v, 0); // data at s1: a change
        discard(&pool, v, 10); // zeros at s1 already: none
        write(&pool, v, 1000, 2);
        let s2 = pool.create_snapshot(v).unwrap().id;
        assert_eq!(
            all(&pool, s2, Some(s1), 100),
            [(0, B), (5 * B, B), (1000 * B, B)]
        );
        assert_eq!(all(&pool, s2, Some(s2), 100), []);
        // The same through a snapshot reader, in a range; and the live
        // volume against its last snapshot, before any flush.
        let reader = pool.open_snapshot(s2).unwrap();
        assert_eq!(
            reader.changed_since(s1, 0, 6 * B).unwrap(),
            [(0, B), (5 * B, B)]
        );
        let vol = pool.volume(v).unwrap();
        write(&pool, v, 3, 9);
        assert_eq!(vol.changed_since(s2, 0, 1024 * B).unwrap(), [(3 * B, B)]);
        assert_eq!(
            vol.changed_since(s1, 0, 1024 * B).unwrap(),
            [(0, B), (3 * B, B), (5 * B, B), (1000 * B, B)]
        );
        assert!(reader.changed_since(s2, 0, 0).unwrap().is_empty());

        let kind = |e: Error| e.kind();
        let other = pool.create_volume(1024 * B).unwrap().id;
        let s3 = pool.create_snapshot(other).unwrap().id;
        for (t, b) in [(s1, s2), (s3, s1)] {
            let e = pool.snapshot_ranges(t, Some(b), 0, 10).unwrap_err();
            assert_eq!(kind(e), ErrorKind::InvalidArgument);
        }
        let e = pool
            .volume(other)
            .unwrap()
            .changed_since(s1, 0, B)
            .unwrap_err();
        assert!(e.to_string().contains("another volume"), "{e}");
        // A clone's snapshot compares with the snapshot it was cloned
        // from (a snapshot moved to another node is such a clone there).
        let clone = pool.clone_snapshot(s1, None).unwrap().id;
        write(&pool, clone, 7, 9);
        let s4 = pool.create_snapshot(clone).unwrap().id;
        assert_eq!(
            pool.snapshot_ranges(s4, Some(s1), 0, 10).unwrap().ranges,
            [(7 * B, B)]
        );
        let e = pool.snapshot_ranges(s1, Some(s4), 0, 10).unwrap_err();
        assert_eq!(kind(e), ErrorKind::InvalidArgument);
        // The clone itself, written since, unflushed, paged.
        write(&pool, clone, 9, 1);
        write(&pool, clone, 20, 1);
        let page = pool.volume_changes(clone, s1, 0, 2).unwrap();
        assert_eq!(page.ranges, [(7 * B, B), (9 * B, B)]);
        let page = pool.volume_changes(clone, s1, page.next, 2).unwrap();
        assert_eq!((page.ranges, page.next), (vec![(20 * B, B)], 1024 * B));
        let e = pool.volume_changes(other, s1, 0, 2).unwrap_err();
        assert_eq!(kind(e), ErrorKind::InvalidArgument);
        let gone = SnapshotId::new_random();
        assert_eq!(
            kind(pool.snapshot_ranges(gone, None, 0, 10).unwrap_err()),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(pool.snapshot_ranges(s2, Some(gone), 0, 10).unwrap_err()),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(pool.snapshot_ranges(s2, None, 1024 * B, 10).unwrap_err()),
            ErrorKind::OutOfRange
        );
    }

    /// Random writes and discards between snapshots, some of them deleted
    /// and their layers merged away: for every pair of snapshots left, the
    /// changed ranges hold every block whose contents differ, and no block
    /// nobody touched in between.
    #[test]
    fn changes_stay_exact_across_merges_against_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        const N: usize = 256;
        let v = pool.create_volume(N as u64 * B).unwrap().id;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // The contents (0: zeros), and the rounds that touched each block.
        let mut now = vec![0u8; N];
        let mut touched = vec![BTreeSet::new(); N];
        let mut snaps: Vec<(SnapshotId, Vec<u8>, usize)> = Vec::new();
        for round in 1..=8usize {
            for _ in 0..24 {
                let b = rand(N as u64) as usize;
                if rand(4) == 0 {
                    discard(&pool, v, b as u64);
                    now[b] = 0;
                } else {
                    let byte = 1 + rand(250) as u8;
                    write(&pool, v, b as u64, byte);
                    now[b] = byte;
                }
                touched[b].insert(round);
            }
            let s = pool.create_snapshot(v).unwrap().id;
            snaps.push((s, now.clone(), round));
        }
        // Delete every other snapshot and merge their layers away.
        let depth = pool.volume(v).unwrap().depth();
        for (s, _, _) in snaps.iter().skip(1).step_by(2) {
            pool.delete_snapshot(*s).unwrap();
        }
        pool.merge(v, 0).unwrap();
        assert!(pool.wait_for_jobs(Duration::from_secs(60)).unwrap());
        assert!(
            pool.volume(v).unwrap().depth() < depth,
            "nothing was merged"
        );
        let kept: Vec<_> = snaps.iter().step_by(2).collect();
        for (i, (base, at_base, rb)) in kept.iter().enumerate() {
            for (target, at_target, rt) in &kept[i + 1..] {
                let changed = all(&pool, *target, Some(*base), 7)
                    .iter()
                    .flat_map(|(o, l)| (o / B)..((o + l) / B))
                    .collect::<BTreeSet<u64>>();
                for b in 0..N {
                    let reported = changed.contains(&(b as u64));
                    if at_base[b] != at_target[b] {
                        assert!(reported, "block {b} differs between rounds {rb} and {rt}");
                    }
                    if reported {
                        assert!(
                            touched[b].range(rb + 1..=*rt).next().is_some(),
                            "block {b} reported, untouched between rounds {rb} and {rt}"
                        );
                    }
                }
            }
        }
    }
}
