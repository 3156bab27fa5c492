//! The per-volume presence journal: the commit path of writes.
//!
//! A flush makes acknowledged writes durable in two steps, in this order:
//! 1. `fdatasync` of the layer files the writes went to (the data), then
//! 2. one *batch* appended to the volume's journal (`journal/<volume>.wal`)
//!    and `fdatasync`ed: the presence changes that make the data visible.
//!
//! A crash before 2 completes leaves a torn or missing batch, which replay
//! ignores: the new data is invisible and the blocks read as before the
//! writes. Every volume has its own journal, so flushes of different
//! volumes never wait for each other and the filesystem commits their
//! fsyncs together (group commit); nothing on this path touches the catalog.
//!
//! Batches are folded into the catalog's presence records by a *checkpoint*
//! (when the journal grows past a threshold, when the volume is deleted and
//! when the pool opens or closes): one catalog transaction applies the
//! batches and records the last folded sequence number in the volume record;
//! only then is the journal replaced by an empty one. A crash between the two
//! replays batches already folded; replay skips every batch whose sequence
//! number the volume record already covers, so this is harmless.
//!
//! ```text
//! header (64 bytes): magic "STRJNL01" | version u32 | reserved u32 |
//!                    volume u128 | base_seq u64 | crc32 u32 | zero padding
//! batch:             magic u32 "SJB1" | count u32 | seq u64 | crc32 u32 |
//!                    reserved u32 | count × record
//! record (32 bytes): layer u128 | first block u64 | blocks u32 | state u8 |
//!                    zero padding (3)
//! ```
//! Batch `seq`s are consecutive from `base_seq + 1`; the CRC covers count,
//! seq and the records. Replay stops at the first batch that is short, has
//! a bad magic or CRC, or breaks the sequence, and truncates the file there.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{Error, Result, io_error};
use super::ids::{LayerId, VolumeId};
use super::io::{File, Fs, Open, read_all};
use super::layer::sync_dir;
use super::presence::BlockState;

/// Directory of journals inside a pool.
pub(crate) const JOURNAL_DIR: &str = "journal";

const HEADER_MAGIC: &[u8; 8] = b"STRJNL01";
const HEADER_LEN: u64 = 64;
const HEADER_VERSION: u32 = 1;
const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"SJB1");
const BATCH_HEADER_LEN: usize = 24;
pub(crate) const RECORD_LEN: usize = 32;

/// Path of a volume's journal.
pub(crate) fn journal_path(pool: &Path, volume: VolumeId) -> PathBuf {
    pool.join(JOURNAL_DIR).join(format!("{volume}.wal"))
}

/// One presence change: `blocks` blocks of `layer` from `start` are now
/// `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub layer: LayerId,
    pub start: u64,
    pub blocks: u32,
    pub state: BlockState,
}

impl Record {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.layer.0.to_le_bytes());
        out.extend_from_slice(&self.start.to_le_bytes());
        out.extend_from_slice(&self.blocks.to_le_bytes());
        out.push(self.state as u8);
        out.extend_from_slice(&[0; 3]);
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Record> {
        Some(Record {
            layer: LayerId(u128::from_le_bytes(b[0..16].try_into().ok()?)),
            start: u64::from_le_bytes(b[16..24].try_into().ok()?),
            blocks: u32::from_le_bytes(b[24..28].try_into().ok()?),
            state: BlockState::from_u8(b[28]).ok()?,
        })
    }
}

/// Appends `rec` to `records`, merging it into the last record when it
/// continues it (sequential writes become one record).
pub(crate) fn push_coalesced(records: &mut Vec<Record>, rec: Record) {
    if let Some(last) = records.last_mut()
        && last.layer == rec.layer
        && last.state == rec.state
        && last.start + u64::from(last.blocks) == rec.start
        && last.blocks.checked_add(rec.blocks).is_some()
    {
        last.blocks += rec.blocks;
        return;
    }
    records.push(rec);
}

/// Batches found by [`JournalFile::open`].
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// `(seq, records)` in order.
    pub batches: Vec<(u64, Vec<Record>)>,
    /// Bytes of torn or invalid tail that were cut off.
    pub truncated_bytes: u64,
}

/// An open journal file, positioned for appending.
#[derive(Debug)]
pub(crate) struct JournalFile {
    fs: Arc<dyn Fs>,
    path: PathBuf,
    file: File,
    len: u64,
    last_seq: u64,
    sync: bool,
    /// The file was renamed into place but the directory fsync that makes
    /// its name durable failed: the next append does it first (a batch in
    /// a file whose name a power cut can take back is not durable).
    name_pending: bool,
}

fn header(volume: VolumeId, base_seq: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(HEADER_MAGIC);
    h.extend_from_slice(&HEADER_VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&volume.0.to_le_bytes());
    h.extend_from_slice(&base_seq.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h.resize(HEADER_LEN as usize, 0);
    h
}

impl JournalFile {
    /// Writes a new, empty journal for `volume` whose first batch will be
    /// `base_seq + 1`, replacing any existing one atomically (write a
    /// temporary file, fsync, rename, fsync the directory). If only the
    /// directory fsync fails, the new journal is in place and returned: its
    /// first append makes its name durable before anything else.
    pub(crate) fn create(
        fs: &Arc<dyn Fs>,
        pool: &Path,
        volume: VolumeId,
        base_seq: u64,
        sync: bool,
    ) -> Result<Self> {
        let path = journal_path(pool, volume);
        let tmp = path.with_extension("wal.tmp");
        let file = fs
            .open(&tmp, Open::Truncate)
            .map_err(|e| io_error("create journal", &tmp, e))?;
        file.write_all_at(&header(volume, base_seq), 0)
            .map_err(|e| io_error("write journal header", &tmp, e))?;
        if sync {
            file.sync_all()
                .map_err(|e| io_error("sync journal", &tmp, e))?;
        }
        fs.rename(&tmp, &path)
            .map_err(|e| io_error("install journal", &path, e))?;
        let mut journal = JournalFile {
            fs: Arc::clone(fs),
            path,
            file,
            len: HEADER_LEN,
            last_seq: base_seq,
            sync,
            name_pending: sync,
        };
        if let Err(e) = journal.make_name_durable() {
            tracing::warn!(error = %e, "journal installed; its directory entry is made durable at the first append");
        }
        Ok(journal)
    }

    fn make_name_durable(&mut self) -> Result<()> {
        if self.name_pending {
            let dir = self.path.parent().expect("a journal is in a directory");
            sync_dir(&*self.fs, dir)?;
            self.name_pending = false;
        }
        Ok(())
    }

    /// Opens the journal of `volume`, returns the valid batches in it and
    /// cuts off any torn tail.
    pub(crate) fn open(
        fs: &Arc<dyn Fs>,
        pool: &Path,
        volume: VolumeId,
        sync: bool,
    ) -> Result<(Self, Replay)> {
        let path = journal_path(pool, volume);
        let file = fs
            .open(&path, Open::ReadWrite)
            .map_err(|e| io_error("open journal", &path, e))?;
        let bytes = read_all(&*file).map_err(|e| io_error("read journal", &path, e))?;
        let (replay, valid, last_seq) = parse(&bytes, volume, &path)?;
        if replay.truncated_bytes > 0 {
            file.set_len(valid)
                .map_err(|e| io_error("truncate journal", &path, e))?;
            if sync {
                file.sync_data()
                    .map_err(|e| io_error("sync journal", &path, e))?;
            }
        }
        Ok((
            JournalFile {
                fs: Arc::clone(fs),
                path,
                file,
                len: valid,
                last_seq,
                sync,
                name_pending: false,
            },
            replay,
        ))
    }

    /// Reads the journal of `volume` without changing it (for checks).
    pub(crate) fn inspect(fs: &dyn Fs, pool: &Path, volume: VolumeId) -> Result<Replay> {
        let path = journal_path(pool, volume);
        let bytes = fs
            .open(&path, Open::Read)
            .and_then(|f| read_all(&*f))
            .map_err(|e| io_error("read journal", &path, e))?;
        parse(&bytes, volume, &path).map(|(replay, _, _)| replay)
    }

    /// Sequence number of the last batch written.
    pub(crate) fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Bytes in the file.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends one batch and makes it durable. On failure the file is cut
    /// back to its previous length, so a failed append never leaves
    /// garbage that would hide later batches.
    pub(crate) fn append(&mut self, records: &[Record]) -> Result<u64> {
        self.make_name_durable()?;
        let seq = self.last_seq + 1;
        let mut body = Vec::with_capacity(records.len() * RECORD_LEN);
        for r in records {
            r.encode(&mut body);
        }
        let count =
            u32::try_from(records.len()).map_err(|_| Error::Corrupt("batch too large".into()))?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&count.to_le_bytes());
        crc.update(&seq.to_le_bytes());
        crc.update(&body);
        let mut buf = Vec::with_capacity(BATCH_HEADER_LEN + body.len());
        buf.extend_from_slice(&BATCH_MAGIC.to_le_bytes());
        buf.extend_from_slice(&count.to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&crc.finalize().to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&body);
        let written = self.file.write_all_at(&buf, self.len).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            if let Err(cut) = self.file.set_len(self.len) {
                tracing::error!(path = %self.path.display(), error = %cut, "cannot cut back a failed journal append");
            }
            return Err(io_error("append to journal", &self.path, e));
        }
        self.len += buf.len() as u64;
        self.last_seq = seq;
        Ok(seq)
    }
}

/// Parses a whole journal: the valid batches, the length of the valid
/// prefix, and the last valid sequence number.
fn parse(bytes: &[u8], volume: VolumeId, path: &Path) -> Result<(Replay, u64, u64)> {
    let bad = |why: &str| Error::Corrupt(format!("journal {}: {why}", path.display()));
    if bytes.len() < HEADER_LEN as usize || &bytes[..8] != HEADER_MAGIC {
        return Err(bad("missing or damaged header"));
    }
    let field = |r: std::ops::Range<usize>| -> &[u8] { &bytes[r] };
    let crc = u32::from_le_bytes(field(40..44).try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..40]) != crc {
        return Err(bad("header checksum mismatch"));
    }
    let version = u32::from_le_bytes(field(8..12).try_into().expect("4 bytes"));
    if version != HEADER_VERSION {
        return Err(bad(&format!("unknown journal version {version}")));
    }
    if u128::from_le_bytes(field(16..32).try_into().expect("16 bytes")) != volume.0 {
        return Err(bad("journal belongs to another volume"));
    }
    let base_seq = u64::from_le_bytes(field(32..40).try_into().expect("8 bytes"));
    let mut replay = Replay::default();
    let mut pos = HEADER_LEN as usize;
    let mut expect = base_seq + 1;
    while let Some((seq, records, len)) = parse_batch(&bytes[pos..]) {
        if seq != expect {
            break;
        }
        replay.batches.push((seq, records));
        pos += len;
        expect += 1;
    }
    replay.truncated_bytes = (bytes.len() - pos) as u64;
    Ok((replay, pos as u64, expect - 1))
}

fn parse_batch(b: &[u8]) -> Option<(u64, Vec<Record>, usize)> {
    if b.len() < BATCH_HEADER_LEN {
        return None;
    }
    let magic = u32::from_le_bytes(b[0..4].try_into().ok()?);
    let count = u32::from_le_bytes(b[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let crc = u32::from_le_bytes(b[16..20].try_into().ok()?);
    let len = BATCH_HEADER_LEN.checked_add((count as usize).checked_mul(RECORD_LEN)?)?;
    if magic != BATCH_MAGIC || b.len() < len {
        return None;
    }
    let body = &b[BATCH_HEADER_LEN..len];
    let mut h = crc32fast::Hasher::new();
    h.update(&b[4..16]);
    h.update(body);
    if h.finalize() != crc {
        return None;
    }
    let records = body
        .chunks_exact(RECORD_LEN)
        .map(Record::decode)
        .collect::<Option<Vec<_>>>()?;
    Some((seq, records, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::io::RealFs;
    use std::os::unix::fs::FileExt;

    fn fs() -> Arc<dyn Fs> {
        RealFs::shared()
    }

    fn rec(start: u64) -> Record {
        Record {
            layer: LayerId(9),
            start,
            blocks: 1,
            state: BlockState::Data,
        }
    }

    fn pool() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(JOURNAL_DIR)).unwrap();
        dir
    }

    #[test]
    fn batches_replay_in_order() {
        let dir = pool();
        let v = VolumeId(1);
        let mut j = JournalFile::create(&fs(), dir.path(), v, 10, true).unwrap();
        assert_eq!(j.append(&[rec(1), rec(5)]).unwrap(), 11);
        assert_eq!(j.append(&[rec(7)]).unwrap(), 12);
        let (j2, replay) = JournalFile::open(&fs(), dir.path(), v, true).unwrap();
        assert_eq!(
            replay.batches,
            vec![(11, vec![rec(1), rec(5)]), (12, vec![rec(7)])]
        );
        assert_eq!(j2.last_seq(), 12);
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue_after_it() {
        let dir = pool();
        let v = VolumeId(1);
        let mut j = JournalFile::create(&fs(), dir.path(), v, 0, true).unwrap();
        j.append(&[rec(1)]).unwrap();
        let good = j.len();
        j.append(&[rec(2), rec(3)]).unwrap();
        // A crash in the middle of the second batch.
        let path = journal_path(dir.path(), v);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(good + 30)
            .unwrap();
        let (mut j, replay) = JournalFile::open(&fs(), dir.path(), v, true).unwrap();
        assert_eq!(replay.batches, vec![(1, vec![rec(1)])]);
        assert_eq!(replay.truncated_bytes, 30);
        j.append(&[rec(4)]).unwrap();
        let (_, replay) = JournalFile::open(&fs(), dir.path(), v, true).unwrap();
        assert_eq!(replay.batches, vec![(1, vec![rec(1)]), (2, vec![rec(4)])]);
    }

    #[test]
    fn corrupted_batch_stops_replay() {
        let dir = pool();
        let v = VolumeId(1);
        let mut j = JournalFile::create(&fs(), dir.path(), v, 0, true).unwrap();
        j.append(&[rec(1)]).unwrap();
        j.append(&[rec(2)]).unwrap();
        let path = journal_path(dir.path(), v);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], HEADER_LEN + 24 + 32 + 30).unwrap();
        let (_, replay) = JournalFile::open(&fs(), dir.path(), v, true).unwrap();
        assert_eq!(replay.batches.len(), 1);
    }

    #[test]
    fn journal_of_another_volume_is_refused() {
        let dir = pool();
        JournalFile::create(&fs(), dir.path(), VolumeId(1), 0, true).unwrap();
        std::fs::rename(
            journal_path(dir.path(), VolumeId(1)),
            journal_path(dir.path(), VolumeId(2)),
        )
        .unwrap();
        assert!(JournalFile::open(&fs(), dir.path(), VolumeId(2), true).is_err());
    }

    #[test]
    fn sequential_records_coalesce() {
        let mut v = Vec::new();
        push_coalesced(&mut v, rec(1));
        push_coalesced(&mut v, rec(2));
        push_coalesced(&mut v, rec(4));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].blocks, 2);
    }
}
