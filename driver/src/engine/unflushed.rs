//! Presence changes acknowledged but not yet flushed, mirrored in a small
//! memory-mapped file (`journal/<volume>.unflushed`) so that they survive
//! a crash of the *process*.
//!
//! Why: a node restarts its serving process while the kernel keeps the
//! volume attached (the fd holder keeps a FUSE connection, the nbd driver
//! waits for new sockets). The kernel then sends requests it had in flight
//! again, FLUSH among them. A write the dead process acknowledged has its
//! data in the layer file (the page cache outlives the process), but its
//! presence record lived only in that process's memory; without this
//! mirror the new process would answer the resent FLUSH with success and
//! the write would be gone. With it, opening the pool makes those writes
//! durable before anything is served.
//!
//! The logs live in the pool's `journal/` directory unless the pool is
//! opened with `unflushed_dir`: a tmpfs (the node's state directory under
//! `/run`) is best, because stores to a mapping of a file on ext4 or XFS
//! can wait for the filesystem's journal when they dirty a page.
//!
//! A machine crash loses the page cache, so the mirror must not outlive
//! the page cache it was written under: its header carries the page
//! cache's ID (the boot ID with the pool filesystem's mount ID folded in:
//! an unmount loses the page cache too), and a mirror of another is
//! ignored (block semantics allow losing unflushed writes then, and their
//! data may be gone).
//!
//! ```text
//! header (64)  "STRUNF01" | boot id [16] | volume u128 | head u64 | tail u64 | overflowed u8 | 0…
//! slots        CAPACITY × 32-byte records (the journal's record format), a ring:
//!              slots tail..head are not yet durable
//! ```
//!
//! Stores into the mapping are plain memory writes: a killed process
//! loses none it has made. A record is stored before `head` covers it,
//! and `tail` moves only after the journal batch holding it is durable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{Error, Result, io_error};
use super::ids::VolumeId;
use super::io::{File, Fs, Mapping, Open};
use super::journal::{JOURNAL_DIR, RECORD_LEN, Record};

const MAGIC: &[u8; 8] = b"STRUNF01";
const HEADER_LEN: usize = 64;
const HEAD_AT: usize = 40;
const TAIL_AT: usize = 48;
const OVERFLOWED_AT: usize = 56;
/// Records the ring holds. A flush is forced long before (at 65 536
/// pending records); the rest absorbs writes that arrive during a flush.
pub(crate) const CAPACITY: u64 = 1 << 17;
const FILE_LEN: usize = HEADER_LEN + CAPACITY as usize * RECORD_LEN;
/// The log's space is allocated this much at a time, before the ring
/// first reaches it: a quiet volume's log takes 64 KiB of the tmpfs, not
/// all 4 MiB, and a store never lands on an unallocated page (which, on a
/// full tmpfs, kills the process with SIGBUS).
const ALLOC_STEP: u64 = 64 << 10;

/// Where the pool keeps unflushed logs unless told otherwise.
pub(crate) fn default_dir(pool: &Path) -> PathBuf {
    pool.join(JOURNAL_DIR)
}

/// The log of `volume` in the directory `dir`.
pub(crate) fn unflushed_path(dir: &Path, volume: VolumeId) -> PathBuf {
    dir.join(format!("{volume}.unflushed"))
}

/// What a previous process of this boot left unflushed.
#[derive(Debug, Default)]
pub(crate) struct Leftover {
    pub records: Vec<Record>,
    /// The mirror could not hold every record: some acknowledged writes
    /// may be lost, and the next flush must say so.
    pub incomplete: bool,
}

/// The mapped mirror of one volume.
#[derive(Debug)]
pub(crate) struct UnflushedLog {
    map: Mapping,
    path: PathBuf,
    /// The ID of the page cache of the pool's layer files
    /// (`Fs::page_cache_id`: the boot and the mount; zeros if unknown:
    /// then no mirror is ever trusted across processes).
    boot: [u8; 16],
    file: File,
    /// Bytes from the start known to be allocated.
    allocated: u64,
}

impl UnflushedLog {
    /// Opens (creating it if needed) the mirror of `volume` in `dir`, with
    /// its first [`ALLOC_STEP`] allocated (more is allocated before the
    /// ring reaches it), and returns what a previous process left in it
    /// while the page cache of `pool` (the layer files the records point
    /// into) was the one there is now: same boot, same mount. The log is not emptied:
    /// call [`UnflushedLog::start`] once what was left is durable, so that
    /// a failure meanwhile leaves it for the next attempt.
    pub(crate) fn open(
        fs: &Arc<dyn Fs>,
        dir: &Path,
        volume: VolumeId,
        pool: &Path,
    ) -> Result<(UnflushedLog, Leftover)> {
        let path = unflushed_path(dir, volume);
        let file = fs
            .open(&path, Open::Create)
            .map_err(|e| io_error("open the unflushed log", &path, e))?;
        let full = |source: std::io::Error| {
            if super::error::is_no_space(&source) {
                Error::StateDirFull {
                    volume,
                    dir: dir.to_path_buf(),
                    bytes: FILE_LEN as u64,
                }
            } else {
                io_error("size the unflushed log", &path, source)
            }
        };
        file.set_len(FILE_LEN as u64).map_err(full)?;
        file.allocate(0, ALLOC_STEP).map_err(full)?;
        let map = file
            .map(FILE_LEN)
            .map_err(|e| io_error("map the unflushed log", &path, e))?;
        let log = UnflushedLog {
            map,
            path,
            boot: fs.page_cache_id(pool),
            file,
            allocated: ALLOC_STEP,
        };
        let leftover = log.leftover(volume);
        Ok((log, leftover))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is FILE_LEN bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), FILE_LEN) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), FILE_LEN) }
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes()[at..at + 8].try_into().expect("8 bytes"))
    }

    fn set_u64(&mut self, at: usize, v: u64) {
        self.bytes_mut()[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn leftover(&self, volume: VolumeId) -> Leftover {
        let b = self.bytes();
        if &b[0..8] != MAGIC
            || b[8..24] != self.boot
            || b[24..40] != volume.0.to_le_bytes()
            || self.boot == [0; 16]
        {
            return Leftover::default();
        }
        let (head, tail) = (self.u64_at(HEAD_AT), self.u64_at(TAIL_AT));
        let mut out = Leftover {
            records: Vec::new(),
            incomplete: b[OVERFLOWED_AT] != 0,
        };
        // An overflowed ring has gaps (slots of older, flushed changes
        // between the ones it held): replaying it could bring back data a
        // later discard removed. Report the loss instead.
        if out.incomplete || head <= tail || head - tail > CAPACITY {
            return out;
        }
        for pos in tail..head {
            let at = HEADER_LEN + (pos % CAPACITY) as usize * RECORD_LEN;
            match Record::decode(&b[at..at + RECORD_LEN]) {
                Some(r) => out.records.push(r),
                None => {
                    tracing::warn!(log = %self.path.display(), "an unreadable unflushed record");
                    out.incomplete = true;
                }
            }
        }
        out
    }

    /// Empties the mirror and stamps it with this boot and volume: from
    /// now on it mirrors this process's changes.
    pub(crate) fn start(&mut self, volume: VolumeId) {
        let boot = self.boot;
        let b = self.bytes_mut();
        b[..HEADER_LEN].fill(0);
        b[0..8].copy_from_slice(MAGIC);
        b[8..24].copy_from_slice(&boot);
        b[24..40].copy_from_slice(&volume.0.to_le_bytes());
    }

    pub(crate) fn head(&self) -> u64 {
        self.u64_at(HEAD_AT)
    }

    pub(crate) fn tail(&self) -> u64 {
        self.u64_at(TAIL_AT)
    }

    /// Whether position `pos` may be written without overwriting a record
    /// that is not durable yet.
    pub(crate) fn has_room_for(&self, pos: u64) -> bool {
        pos < self.tail() + CAPACITY
    }

    /// Stores `rec` at ring position `pos` and makes `head` cover it;
    /// `false` if its space could not be allocated (nothing was stored).
    pub(crate) fn store(&mut self, pos: u64, rec: &Record) -> bool {
        let at = HEADER_LEN + (pos % CAPACITY) as usize * RECORD_LEN;
        let end = (at + RECORD_LEN) as u64;
        if end > self.allocated {
            let grown = end.div_ceil(ALLOC_STEP) * ALLOC_STEP;
            if let Err(e) = self.file.allocate(self.allocated, grown - self.allocated) {
                tracing::warn!(log = %self.path.display(), error = %e, "cannot grow the unflushed log");
                return false;
            }
            self.allocated = grown;
        }
        let mut enc = Vec::with_capacity(RECORD_LEN);
        rec.encode(&mut enc);
        self.bytes_mut()[at..at + RECORD_LEN].copy_from_slice(&enc);
        if pos >= self.head() {
            self.set_u64(HEAD_AT, pos + 1);
        }
        true
    }

    /// Records before `pos` are durable in the journal.
    pub(crate) fn durable_up_to(&mut self, pos: u64) {
        self.set_u64(TAIL_AT, pos);
    }

    /// Nothing is pending: start again at position 0, so a quiet volume
    /// keeps using the first pages. (A crash between the two stores leaves
    /// head ≤ tail, which reads as empty.)
    pub(crate) fn rewind(&mut self) {
        self.set_u64(HEAD_AT, 0);
        self.set_u64(TAIL_AT, 0);
    }

    /// Some record could not be mirrored (the ring was full).
    pub(crate) fn mark_overflowed(&mut self) {
        self.bytes_mut()[OVERFLOWED_AT] = 1;
    }

    pub(crate) fn clear_overflowed(&mut self) {
        self.bytes_mut()[OVERFLOWED_AT] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ids::LayerId;
    use crate::engine::io::RealFs;

    fn open(dir: &Path, volume: VolumeId) -> (UnflushedLog, Leftover) {
        let (mut log, left) = UnflushedLog::open(&RealFs::shared(), dir, volume, dir).unwrap();
        log.start(volume);
        (log, left)
    }
    use crate::engine::presence::BlockState;

    fn rec(start: u64) -> Record {
        Record {
            layer: LayerId(7),
            start,
            blocks: 2,
            state: BlockState::Data,
        }
    }

    #[test]
    fn records_left_by_a_dead_process_come_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let vol = VolumeId(42);
        {
            let (mut log, left) = open(dir.path(), vol);
            assert!(left.records.is_empty() && !left.incomplete);
            for i in 0..5 {
                assert!(log.store(i, &rec(i * 10)));
            }
            log.durable_up_to(2);
            // Dropped without a flush: the process "dies" here.
        }
        let (_, left) = open(dir.path(), vol);
        assert_eq!(left.records, vec![rec(20), rec(30), rec(40)]);
        let (mut log, again) = open(dir.path(), vol);
        assert!(again.records.is_empty(), "reset after being read");
        // Rewound: empty even though positions went back.
        assert!(log.store(0, &rec(1)));
        log.durable_up_to(1);
        log.rewind();
        drop(log);
        assert!(open(dir.path(), vol).1.records.is_empty());
        // Another volume's mirror (a renamed file) is not trusted.
        let (mut log, _) = open(dir.path(), vol);
        assert!(log.store(0, &rec(5)));
        drop(log);
        std::fs::rename(
            unflushed_path(dir.path(), vol),
            unflushed_path(dir.path(), VolumeId(43)),
        )
        .unwrap();
        assert!(open(dir.path(), VolumeId(43)).1.records.is_empty());
    }

    #[test]
    fn the_ring_refuses_to_overwrite_what_is_not_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), VolumeId(1));
        assert!(log.has_room_for(CAPACITY - 1));
        assert!(!log.has_room_for(CAPACITY));
        log.durable_up_to(10);
        assert!(log.has_room_for(CAPACITY + 9));
        log.mark_overflowed();
        drop(log);
        assert!(open(dir.path(), VolumeId(1)).1.incomplete);
    }
}
