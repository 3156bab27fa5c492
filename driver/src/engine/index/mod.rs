//! The block index: for every 4 KiB block of a volume (or of a snapshot as
//! of its layer), which layer holds it.
//!
//! ```text
//!  Index ──Arc──▶ [Dir 0, Dir 1, …]          one Dir per 512 chunks (8 GiB)
//!                   │
//!                   ├─ Uniform(entry)         whole Dir has one entry
//!                   └─ Chunks ──Arc──▶ [Arc<Chunk>; ≤512]
//!                                         │
//!                                         └─ Uniform / Packed / Dense   (chunk.rs)
//! ```
//!
//! Entries are 16 bits: [`ABSENT`] (no layer defines the block: reads as
//! zeros), [`ZERO`] (the topmost layer that defines it recorded zeros), or
//! a layer *slot* (2..=65535), a small number that names a layer uniquely
//! within its family. Entries name layers, not chain positions, so a later
//! merge rewrites only the entries of the merged layer, and the width caps a
//! family at [`MAX_LAYERS_PER_FAMILY`] live layers (and so a chain at that
//! depth; Longhorn's one-byte entry caps it at 250).
//!
//! Every level is reference counted and copied on write: cloning an `Index`
//! is O(1) and shares everything; the first write into a chunk afterwards
//! copies that chunk (at most 8 KiB) and the pointer arrays above it. That is
//! how a snapshot or a clone takes the index in O(1), and why ten clones of
//! one image cost one index plus the chunks they change.
//!
//! Lookups are O(1) regardless of chain depth: a read never walks layers.

mod chunk;

use std::collections::HashSet;
use std::sync::Arc;

use self::chunk::Chunk;
use super::geometry::CHUNK_BLOCKS;

/// No layer defines the block.
pub(crate) const ABSENT: u16 = 0;
/// The topmost defining layer recorded zeros.
pub(crate) const ZERO: u16 = 1;
/// The first layer slot.
pub(crate) const FIRST_SLOT: u16 = 2;
/// Live layers one family can have: every 16-bit value but the two markers.
pub const MAX_LAYERS_PER_FAMILY: u32 = u16::MAX as u32 + 1 - FIRST_SLOT as u32;

const CHUNK: usize = CHUNK_BLOCKS as usize;
const DIR_CHUNKS: usize = 512;
const DIR_BLOCKS: u64 = (DIR_CHUNKS * CHUNK) as u64;

#[derive(Clone, Debug)]
enum Dir {
    Uniform(u16),
    Chunks(Arc<Vec<Arc<Chunk>>>),
}

/// A copy-on-write map from block number to entry. See the module docs.
#[derive(Clone, Debug)]
pub(crate) struct Index {
    dirs: Arc<Vec<Dir>>,
    blocks: u64,
}

impl Index {
    /// An index of `blocks` blocks, all [`ABSENT`].
    pub(crate) fn new(blocks: u64) -> Self {
        let ndirs = blocks.div_ceil(DIR_BLOCKS) as usize;
        Index {
            dirs: Arc::new(vec![Dir::Uniform(ABSENT); ndirs]),
            blocks,
        }
    }

    /// The entry of `block` (blocks past the end are [`ABSENT`]).
    #[cfg(test)]
    pub(crate) fn get(&self, block: u64) -> u16 {
        if block >= self.blocks {
            return ABSENT;
        }
        match &self.dirs[(block / DIR_BLOCKS) as usize] {
            Dir::Uniform(v) => *v,
            Dir::Chunks(chunks) => {
                let c = ((block % DIR_BLOCKS) / CHUNK_BLOCKS) as usize;
                chunks[c].get((block % CHUNK_BLOCKS) as usize)
            }
        }
    }

    /// Sets blocks `start..end` to `v`.
    pub(crate) fn set_range(&mut self, start: u64, end: u64, v: u16) {
        let end = end.min(self.blocks);
        let mut full: Option<Arc<Chunk>> = None;
        let mut b = start;
        while b < end {
            let d = (b / DIR_BLOCKS) as usize;
            let dir_start = d as u64 * DIR_BLOCKS;
            let dir_end = dir_start + DIR_BLOCKS;
            let seg_end = end.min(dir_end);
            let dirs = Arc::make_mut(&mut self.dirs);
            if b == dir_start && seg_end == dir_end {
                dirs[d] = Dir::Uniform(v);
                b = seg_end;
                continue;
            }
            if let Dir::Uniform(u) = dirs[d] {
                if u == v {
                    b = seg_end;
                    continue;
                }
                let n = dir_chunks(self.blocks, d);
                // All chunks share one uniform chunk until written.
                let shared = Arc::new(Chunk::Uniform(u));
                dirs[d] = Dir::Chunks(Arc::new(vec![shared; n]));
            }
            let Dir::Chunks(chunks) = &mut dirs[d] else {
                unreachable!("expanded above")
            };
            let chunks = Arc::make_mut(chunks);
            while b < seg_end {
                let c = ((b - dir_start) / CHUNK_BLOCKS) as usize;
                let chunk_start = dir_start + c as u64 * CHUNK_BLOCKS;
                let hi = seg_end.min(chunk_start + CHUNK_BLOCKS);
                let chunk = &mut chunks[c];
                if b == chunk_start && hi == chunk_start + CHUNK_BLOCKS {
                    // Whole chunks written in one call share one allocation.
                    *chunk = Arc::clone(full.get_or_insert_with(|| Arc::new(Chunk::Uniform(v))));
                } else if !matches!(**chunk, Chunk::Uniform(u) if u == v) {
                    let (lo_in, hi_in) = ((b - chunk_start) as usize, (hi - chunk_start) as usize);
                    Arc::make_mut(chunk).set_range(lo_in, hi_in, v);
                }
                b = hi;
            }
        }
    }

    /// Rewrites the entries of chunk `chunk` with `f` and stores the result
    /// in its smallest encoding. Cheaper than many `set_range` calls when a
    /// chunk is rebuilt from a presence record with many runs, and it never
    /// leaves a wider encoding than the final entries need.
    pub(crate) fn rewrite_chunk(&mut self, chunk: u64, f: impl FnOnce(&mut [u16])) {
        let start = chunk * CHUNK_BLOCKS;
        if start >= self.blocks {
            return;
        }
        let d = (start / DIR_BLOCKS) as usize;
        let dirs = Arc::make_mut(&mut self.dirs);
        if let Dir::Uniform(u) = dirs[d] {
            let shared = Arc::new(Chunk::Uniform(u));
            dirs[d] = Dir::Chunks(Arc::new(vec![shared; dir_chunks(self.blocks, d)]));
        }
        let Dir::Chunks(chunks) = &mut dirs[d] else {
            unreachable!("expanded above")
        };
        let slot = &mut Arc::make_mut(chunks)[((start % DIR_BLOCKS) / CHUNK_BLOCKS) as usize];
        let mut entries = slot.entries();
        f(&mut entries);
        *slot = Arc::new(Chunk::from_entries(&entries));
    }

    /// Calls `f(first_block, len, entry)` for maximal runs of equal entries
    /// in `start..end`.
    pub(crate) fn runs(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64, u16)) {
        let end = end.min(self.blocks);
        let mut pending: Option<(u64, u64, u16)> = None;
        let mut emit = |s: u64, l: u64, v: u16| match &mut pending {
            Some((_, pl, pv)) if *pv == v => *pl += l,
            _ => {
                if let Some((ps, pl, pv)) = pending.replace((s, l, v)) {
                    f(ps, pl, pv);
                }
            }
        };
        let mut b = start;
        while b < end {
            let d = (b / DIR_BLOCKS) as usize;
            let dir_start = d as u64 * DIR_BLOCKS;
            let seg_end = end.min(dir_start + DIR_BLOCKS);
            match &self.dirs[d] {
                Dir::Uniform(v) => emit(b, seg_end - b, *v),
                Dir::Chunks(chunks) => {
                    while b < seg_end {
                        let c = ((b - dir_start) / CHUNK_BLOCKS) as usize;
                        let chunk_start = dir_start + c as u64 * CHUNK_BLOCKS;
                        let hi = seg_end.min(chunk_start + CHUNK_BLOCKS);
                        chunks[c].runs(
                            (b - chunk_start) as usize,
                            (hi - chunk_start) as usize,
                            |s, l, v| emit(chunk_start + s as u64, l as u64, v),
                        );
                        b = hi;
                    }
                }
            }
            b = seg_end;
        }
        if let Some((s, l, v)) = pending {
            f(s, l, v);
        }
    }

    /// Blocks whose entry names a layer (blocks backed by data).
    pub(crate) fn count_data(&self) -> u64 {
        let data = |v: u16| v >= FIRST_SLOT;
        let mut n = 0u64;
        for (d, dir) in self.dirs.iter().enumerate() {
            n += match dir {
                Dir::Uniform(v) if data(*v) => {
                    let start = d as u64 * DIR_BLOCKS;
                    self.blocks.min(start + DIR_BLOCKS) - start
                }
                Dir::Uniform(_) => 0,
                Dir::Chunks(chunks) => chunks.iter().map(|c| c.count(data) as u64).sum(),
            };
        }
        n
    }

    /// Grows the index to `blocks`; new blocks are [`ABSENT`].
    pub(crate) fn grow(&mut self, blocks: u64) {
        if blocks <= self.blocks {
            return;
        }
        let old_chunks = self.blocks.div_ceil(CHUNK_BLOCKS) as usize;
        let new_chunks = blocks.div_ceil(CHUNK_BLOCKS) as usize;
        let new_dirs = blocks.div_ceil(DIR_BLOCKS) as usize;
        let dirs = Arc::make_mut(&mut self.dirs);
        if let Some(last) = dirs.last_mut() {
            let d = dirs_len_before(old_chunks);
            let have = old_chunks - d * DIR_CHUNKS;
            let want = (new_chunks - d * DIR_CHUNKS).min(DIR_CHUNKS);
            if want > have {
                match last {
                    // A uniform ABSENT dir stays correct as it grows.
                    Dir::Uniform(ABSENT) => {}
                    Dir::Uniform(u) => {
                        let (old, new) = (
                            Arc::new(Chunk::Uniform(*u)),
                            Arc::new(Chunk::Uniform(ABSENT)),
                        );
                        let mut v = vec![old; have];
                        v.resize(want, new);
                        *last = Dir::Chunks(Arc::new(v));
                    }
                    Dir::Chunks(chunks) => {
                        Arc::make_mut(chunks).resize(want, Arc::new(Chunk::Uniform(ABSENT)));
                    }
                }
            }
        }
        dirs.resize(new_dirs, Dir::Uniform(ABSENT));
        self.blocks = blocks;
    }

    /// Bytes of memory this index holds that `seen` does not already
    /// account for (shared parts are counted once across calls).
    pub(crate) fn memory(&self, seen: &mut HashSet<usize>) -> usize {
        const ARC_HEADER: usize = 2 * size_of::<usize>();
        let mut bytes = 0;
        if seen.insert(Arc::as_ptr(&self.dirs) as usize) {
            bytes += ARC_HEADER + size_of::<Vec<Dir>>() + self.dirs.capacity() * size_of::<Dir>();
        }
        for dir in self.dirs.iter() {
            if let Dir::Chunks(chunks) = dir {
                if seen.insert(Arc::as_ptr(chunks) as usize) {
                    bytes += ARC_HEADER
                        + size_of::<Vec<Arc<Chunk>>>()
                        + chunks.capacity() * size_of::<Arc<Chunk>>();
                }
                for chunk in chunks.iter() {
                    if seen.insert(Arc::as_ptr(chunk) as usize) {
                        bytes += ARC_HEADER + size_of::<Chunk>() + chunk.heap_bytes();
                    }
                }
            }
        }
        bytes
    }
}

/// Chunks in dir `d` of an index of `blocks` blocks (the last dir may be
/// short).
fn dir_chunks(blocks: u64, d: usize) -> usize {
    (blocks.div_ceil(CHUNK_BLOCKS) as usize - d * DIR_CHUNKS).min(DIR_CHUNKS)
}

/// Index of the dir that holds chunk `chunks - 1` (the last one).
fn dirs_len_before(chunks: usize) -> usize {
    chunks.saturating_sub(1) / DIR_CHUNKS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    fn collect(index: &Index, start: u64, end: u64) -> Vec<u16> {
        let mut out = Vec::new();
        index.runs(start, end, |_, l, v| {
            out.extend(std::iter::repeat_n(v, l as usize))
        });
        out
    }

    #[test]
    fn random_sets_across_chunk_and_dir_boundaries_match_a_plain_array() {
        let blocks = DIR_BLOCKS + 3 * CHUNK_BLOCKS + 17;
        let mut index = Index::new(blocks);
        let mut model = vec![ABSENT; blocks as usize];
        let mut seed = 42u64;
        for i in 0..3000 {
            let len = match i % 4 {
                0 => 1,
                1 => rng(&mut seed) % 64 + 1,
                2 => rng(&mut seed) % (3 * CHUNK_BLOCKS) + 1,
                _ => rng(&mut seed) % (DIR_BLOCKS + CHUNK_BLOCKS) + 1,
            };
            let start = rng(&mut seed) % blocks;
            let end = (start + len).min(blocks);
            let v = (rng(&mut seed) % 6) as u16;
            index.set_range(start, end, v);
            model[start as usize..end as usize].fill(v);
        }
        for _ in 0..2000 {
            let b = rng(&mut seed) % blocks;
            assert_eq!(index.get(b), model[b as usize], "block {b}");
        }
        assert_eq!(collect(&index, 0, blocks), model);
    }

    #[test]
    fn count_data_counts_blocks_naming_a_layer() {
        let mut index = Index::new(DIR_BLOCKS + 100);
        index.set_range(0, DIR_BLOCKS, 2);
        index.set_range(DIR_BLOCKS, DIR_BLOCKS + 10, 3);
        index.set_range(5, 9, ZERO);
        assert_eq!(index.count_data(), DIR_BLOCKS + 10 - 4);
    }

    #[test]
    fn clone_is_isolated_from_later_writes() {
        let mut index = Index::new(10 * CHUNK_BLOCKS);
        index.set_range(0, 10 * CHUNK_BLOCKS, 2);
        let snapshot = index.clone();
        index.set_range(5, 6, 3);
        assert_eq!(snapshot.get(5), 2);
        assert_eq!(index.get(5), 3);
    }

    #[test]
    fn clone_shares_all_but_the_written_chunk() {
        let mut index = Index::new(64 * CHUNK_BLOCKS);
        for c in 0..64 {
            index.set_range(c * CHUNK_BLOCKS, c * CHUNK_BLOCKS + 1, 2);
        }
        let mut seen = HashSet::new();
        let alone = index.memory(&mut seen);
        let mut clone = index.clone();
        clone.set_range(7, 8, 3);
        let extra = clone.memory(&mut seen);
        assert!(extra < alone / 8, "clone added {extra} bytes to {alone}");
    }

    #[test]
    fn grow_keeps_entries_and_adds_absent_blocks() {
        let mut index = Index::new(CHUNK_BLOCKS + 5);
        index.set_range(0, CHUNK_BLOCKS + 5, 9);
        index.grow(DIR_BLOCKS + 2 * CHUNK_BLOCKS);
        assert_eq!(index.get(CHUNK_BLOCKS + 4), 9);
        assert_eq!(index.get(CHUNK_BLOCKS + 5), ABSENT);
        assert_eq!(index.get(DIR_BLOCKS + 1), ABSENT);
        let mut full = Index::new(DIR_BLOCKS);
        full.set_range(0, DIR_BLOCKS, 4);
        full.grow(DIR_BLOCKS + 10);
        assert_eq!(full.get(DIR_BLOCKS - 1), 4);
        assert_eq!(full.get(DIR_BLOCKS + 3), ABSENT);
    }

    #[test]
    fn partially_filled_last_dir_grows_without_leaking_entries() {
        // A last dir with fewer than 512 chunks, set uniformly over its
        // whole length, must not make the grown tail inherit the entry.
        let blocks = 2 * CHUNK_BLOCKS;
        let mut index = Index::new(blocks);
        index.set_range(0, blocks, 5);
        index.grow(4 * CHUNK_BLOCKS);
        assert_eq!(index.get(blocks - 1), 5);
        assert_eq!(index.get(blocks), ABSENT);
    }

    #[test]
    fn rewritten_chunk_gets_the_narrowest_encoding() {
        let mut index = Index::new(2 * CHUNK_BLOCKS);
        index.rewrite_chunk(1, |e| {
            for (i, x) in e.iter_mut().enumerate() {
                *x = 2 + (i % 2) as u16;
            }
        });
        assert_eq!(index.get(CHUNK_BLOCKS), 2);
        assert_eq!(index.get(CHUNK_BLOCKS + 1), 3);
        assert_eq!(index.get(0), ABSENT);
        // One bit per block plus headers; two bits would be CHUNK / 4.
        let bytes = index.memory(&mut HashSet::new());
        assert!(bytes < CHUNK / 4, "{bytes} bytes");
    }

    #[test]
    fn fully_written_volume_index_is_tiny() {
        let mut index = Index::new(1 << 18); // 1 GiB
        index.set_range(0, 1 << 18, 2);
        // 64 chunk pointers sharing one uniform chunk.
        assert!(index.memory(&mut HashSet::new()) < 1024);
    }
}
