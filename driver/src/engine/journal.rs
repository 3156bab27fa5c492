//! The per-volume presence journal: the commit path of writes.
//!
//! A flush makes acknowledged writes durable in one of two ways:
//! - **Logged** (few bytes written since the last flush, at most
//!   `PoolOptions::sync_log_bytes`, and a batch to append anyway): one
//!   batch holding the presence changes *and the written blocks' data* is
//!   appended to the volume's journal (`journal/<volume>.wal`) and
//!   `fdatasync`ed. One durable write: the layer files are written back
//!   later (the kernel is asked to start at once; the next checkpoint
//!   syncs them).
//! - **Synced** (more bytes, a change whose data the volume did not keep:
//!   a merge's moved blocks, zeroes kept allocated; or only overwrites of
//!   blocks the top holds, one fdatasync either way): `fdatasync` of the
//!   layer files written, then, if there are presence changes or layers
//!   with earlier logged data, one batch with the changes and the IDs of
//!   those layers, appended and `fdatasync`ed.
//!
//! A crash before the append completes leaves a torn or missing batch,
//! which replay ignores: the new data is invisible and the blocks read as
//! before the writes. Every volume has its own journal, so flushes of
//! different volumes never wait for each other and the filesystem commits
//! their fsyncs together (group commit); nothing on this path touches the
//! catalog.
//!
//! Logged data is the journal's until its layer file is synced: after a
//! power cut, replay writes every logged block back into its layer file,
//! newest version first wins, except blocks of a layer that a later batch
//! synced (the file already had them, or newer ones). After a process
//! crash in the same boot, the page cache holds the data, as new or newer
//! (a write reaches the layer file before its flush logs it), so replay
//! only syncs the files: writing the logged version back would undo
//! acknowledged overwrites that came after it. Each batch records the page
//! cache it was written under (the boot ID with the mount ID of the pool's
//! filesystem folded in: a filesystem unmounted after an error, or a disk
//! that went away, loses its page cache without a reboot) to tell the two
//! apart; after a failed write-back the page cache is not trusted either.
//!
//! Batches are folded into the catalog's presence records by a *checkpoint*
//! (when the journal grows past a threshold, when a merge needs the frozen
//! layers' presence, when the volume is deleted and when the pool opens or
//! closes): one catalog transaction applies the batches and records the last
//! folded sequence number in the volume record; only then, and only once
//! every layer file with logged data is synced, is the journal replaced by
//! an empty one. A crash between the two replays batches already folded;
//! replay skips the presence of every batch whose sequence number the volume
//! record already covers (their logged data still counts), so this is
//! harmless.
//!
//! ```text
//! header (64 bytes): magic "STRJNL01" | version u32 (2) | reserved u32 |
//!                    volume u128 | base_seq u64 | crc32 u32 | zero padding
//! batch (56 bytes):  magic u32 "SJB2" | seq u64 | records u32 | synced u32 |
//!                    extents u32 | data blocks u32 | cache id [16] |
//!                    crc32 u32 | zero padding (8)
//!                    then records × 32 | synced × layer u128 |
//!                    extents × 32 | data blocks × 4096
//! record (32 bytes): layer u128 | first block u64 | blocks u32 | state u8 |
//!                    zero padding (3)
//! extent (32 bytes): layer u128 | first block u64 | blocks u32 | zero u32
//! ```
//! Batch `seq`s are consecutive from `base_seq + 1`; the CRC covers the
//! batch header's bytes 4..44 and everything after the header. Replay
//! stops at the first batch that is short, has a bad magic or CRC, or
//! breaks the sequence, and truncates the file there (zeros the journal
//! was extended with ahead of its appends are not torn data and stay).
//! Version-1 journals (batches `"SJB1" | count u32 | seq u64 | crc32 u32 |
//! reserved u32 | records`, without data) are still read; the pool's open
//! replaces them with version-2 ones.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{Error, Result, io_error};
use super::geometry::BLOCK_SIZE;
use super::ids::{LayerId, VolumeId};
use super::io::{File, Fs, Open, read_all};
use super::layer::sync_dir;
use super::presence::BlockState;

/// Directory of journals inside a pool.
pub(crate) const JOURNAL_DIR: &str = "journal";

const HEADER_MAGIC: &[u8; 8] = b"STRJNL01";
const HEADER_LEN: u64 = 64;
const HEADER_VERSION: u32 = 2;
const V1_BATCH_MAGIC: u32 = u32::from_le_bytes(*b"SJB1");
const V1_BATCH_HEADER_LEN: usize = 24;
const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"SJB2");
const BATCH_HEADER_LEN: usize = 56;
/// Where the CRC sits in a batch header.
const BATCH_CRC: std::ops::Range<usize> = 44..48;
pub(crate) const RECORD_LEN: usize = 32;
const LAYER_ID_LEN: usize = 16;
const EXTENT_LEN: usize = 32;
const BLOCK: usize = BLOCK_SIZE as usize;

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

/// How a journal writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JournalOpts {
    /// `fdatasync` appends (off only for benchmark setup).
    pub sync: bool,
    /// The file is extended with zeros this many bytes at a time, ahead of
    /// the appends: an append then overwrites blocks the filesystem has
    /// already allocated and written, so its `fdatasync` commits no
    /// metadata (measured on ext4 here: 70 µs against 97 µs for appends
    /// that grow the file).
    pub prealloc: u64,
}

/// Whole blocks written to a layer, logged with their data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Logged {
    pub layer: LayerId,
    pub start: u64,
    /// A whole number of blocks.
    pub data: Vec<u8>,
}

/// One batch found by replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    pub seq: u64,
    pub records: Vec<Record>,
    /// Layers whose files were synced before this batch was written: every
    /// block logged for them in earlier batches was durable in the file.
    pub synced: Vec<LayerId>,
    pub logged: Vec<Logged>,
    /// The page cache the batch was written under (`Fs::page_cache_id`;
    /// zeros in version-1 journals).
    pub boot: [u8; 16],
}

/// Batches found by [`JournalFile::open`].
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// In order.
    pub batches: Vec<Batch>,
    /// Bytes of torn or invalid tail that were cut off.
    pub truncated_bytes: u64,
    /// The journal's format version.
    pub version: u32,
}

/// What replay does with the logged data (see the module docs).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Restore<'a> {
    /// Blocks to write back into their layer files: `(layer, block, data)`,
    /// the newest logged version of each, for blocks logged under another
    /// page cache.
    pub writes: Vec<(LayerId, u64, &'a [u8])>,
    /// Layers whose files must be synced before the journal goes (written
    /// back now, or holding the data in this page cache).
    pub sync: BTreeSet<LayerId>,
}

impl Replay {
    /// What makes the logged data of this journal durable in the layer
    /// files, under page cache `boot`. A block's newest logged version
    /// counts unless a later batch synced its layer; older versions never
    /// do.
    pub(crate) fn restore(&self, boot: [u8; 16]) -> Restore<'_> {
        let mut out = Restore::default();
        let mut synced_later = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for batch in self.batches.iter().rev() {
            for l in &batch.logged {
                if synced_later.contains(&l.layer) {
                    continue;
                }
                for (i, data) in l.data.chunks_exact(BLOCK).enumerate() {
                    let block = l.start + i as u64;
                    if !seen.insert((l.layer, block)) {
                        continue;
                    }
                    out.sync.insert(l.layer);
                    if batch.boot != boot {
                        out.writes.push((l.layer, block, data));
                    }
                }
            }
            // A batch's synced layers cover the data logged before it.
            synced_later.extend(batch.synced.iter().copied());
        }
        out
    }
}

/// An open journal file, positioned for appending.
#[derive(Debug)]
pub(crate) struct JournalFile {
    fs: Arc<dyn Fs>,
    path: PathBuf,
    file: File,
    len: u64,
    /// Bytes of the file (zeros past `len`).
    allocated: u64,
    last_seq: u64,
    opts: JournalOpts,
    version: u32,
    boot: [u8; 16],
    /// Bytes of logged data appended to this file.
    data_bytes: u64,
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

fn u32_of(n: usize) -> Result<[u8; 4]> {
    u32::try_from(n)
        .map(u32::to_le_bytes)
        .map_err(|_| Error::Corrupt("journal batch too large".into()))
}

fn batch_crc(batch: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&batch[4..BATCH_CRC.start]);
    h.update(&batch[BATCH_HEADER_LEN..]);
    h.finalize()
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
        opts: JournalOpts,
    ) -> Result<Self> {
        let path = journal_path(pool, volume);
        let tmp = path.with_extension("wal.tmp");
        let file = fs
            .open(&tmp, Open::Truncate)
            .map_err(|e| io_error("create journal", &tmp, e))?;
        file.write_all_at(&header(volume, base_seq), 0)
            .map_err(|e| io_error("write journal header", &tmp, e))?;
        if opts.sync {
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
            allocated: HEADER_LEN,
            last_seq: base_seq,
            opts,
            version: HEADER_VERSION,
            boot: fs.page_cache_id(pool),
            data_bytes: 0,
            name_pending: opts.sync,
        };
        if let Err(e) = journal.make_name_durable() {
            tracing::warn!(error = %e, "journal installed; its directory entry is made durable at the first append");
        }
        Ok(journal)
    }

    /// Makes the file's name durable if its directory fsync failed when
    /// it was installed (a no-op otherwise).
    pub(crate) fn make_name_durable(&mut self) -> Result<()> {
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
        opts: JournalOpts,
    ) -> Result<(Self, Replay)> {
        let path = journal_path(pool, volume);
        let file = fs
            .open(&path, Open::ReadWrite)
            .map_err(|e| io_error("open journal", &path, e))?;
        let bytes = read_all(&*file).map_err(|e| io_error("read journal", &path, e))?;
        let (replay, valid, last_seq) = parse(&bytes, volume, &path)?;
        let mut allocated = bytes.len() as u64;
        if replay.truncated_bytes > 0 {
            file.set_len(valid)
                .map_err(|e| io_error("truncate journal", &path, e))?;
            if opts.sync {
                file.sync_data()
                    .map_err(|e| io_error("sync journal", &path, e))?;
            }
            allocated = valid;
        }
        let data_bytes = replay
            .batches
            .iter()
            .flat_map(|b| &b.logged)
            .map(|l| l.data.len() as u64)
            .sum();
        let version = replay.version;
        Ok((
            JournalFile {
                fs: Arc::clone(fs),
                path,
                file,
                len: valid,
                allocated,
                last_seq,
                opts,
                version,
                boot: fs.page_cache_id(pool),
                data_bytes,
                // Whether its directory entry was made durable is not
                // known (a process that renamed it into place may have
                // died before): the first append or flush makes sure.
                name_pending: opts.sync,
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

    /// Bytes of batches in the file.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Bytes of logged data in the file.
    pub(crate) fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// The file has no batch.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    /// Appends may log data: the file is of the current version and the
    /// page cache is known (replay tells a power cut from a process crash
    /// by it).
    pub(crate) fn can_log(&self) -> bool {
        self.version == HEADER_VERSION && self.boot != [0; 16]
    }

    /// The file is of an older version: it is read, never appended to.
    pub(crate) fn is_old(&self) -> bool {
        self.version != HEADER_VERSION
    }

    /// Appends one batch and makes it durable: presence changes, the layers
    /// synced just before it, and logged blocks with their data. On failure
    /// the file is cut back to its previous length, so a failed append
    /// never leaves garbage that would hide later batches.
    pub(crate) fn append(
        &mut self,
        records: &[Record],
        synced: &[LayerId],
        logged: &[Logged],
    ) -> Result<u64> {
        if self.is_old() {
            return Err(Error::Corrupt(format!(
                "journal {}: a version-{} journal takes no appends",
                self.path.display(),
                self.version
            )));
        }
        self.make_name_durable()?;
        let seq = self.last_seq + 1;
        let data_len: usize = logged.iter().map(|l| l.data.len()).sum();
        let mut buf = Vec::with_capacity(
            BATCH_HEADER_LEN
                + records.len() * RECORD_LEN
                + synced.len() * LAYER_ID_LEN
                + logged.len() * EXTENT_LEN
                + data_len,
        );
        buf.extend_from_slice(&BATCH_MAGIC.to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        for n in [records.len(), synced.len(), logged.len(), data_len / BLOCK] {
            buf.extend_from_slice(&u32_of(n)?);
        }
        buf.extend_from_slice(&self.boot);
        buf.resize(BATCH_HEADER_LEN, 0);
        for r in records {
            r.encode(&mut buf);
        }
        for l in synced {
            buf.extend_from_slice(&l.0.to_le_bytes());
        }
        for l in logged {
            debug_assert!(l.data.len().is_multiple_of(BLOCK) && !l.data.is_empty());
            buf.extend_from_slice(&l.layer.0.to_le_bytes());
            buf.extend_from_slice(&l.start.to_le_bytes());
            buf.extend_from_slice(&u32_of(l.data.len() / BLOCK)?);
            buf.extend_from_slice(&0u32.to_le_bytes());
        }
        for l in logged {
            buf.extend_from_slice(&l.data);
        }
        let crc = batch_crc(&buf);
        buf[BATCH_CRC].copy_from_slice(&crc.to_le_bytes());
        let batch_len = buf.len() as u64;
        let end = self.len + batch_len;
        if end > self.allocated {
            let ahead = end.next_multiple_of(self.opts.prealloc.max(1));
            buf.resize((ahead - self.len) as usize, 0);
        }
        let written = self.file.write_all_at(&buf, self.len).and_then(|()| {
            if self.opts.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            if let Err(cut) = self.file.set_len(self.len) {
                tracing::error!(path = %self.path.display(), error = %cut, "cannot cut back a failed journal append");
            }
            self.allocated = self.len;
            return Err(io_error("append to journal", &self.path, e));
        }
        self.allocated = self.allocated.max(self.len + buf.len() as u64);
        self.len = end;
        self.last_seq = seq;
        self.data_bytes += data_len as u64;
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
    let parse_one = match version {
        1 => parse_v1_batch,
        HEADER_VERSION => parse_batch,
        _ => return Err(bad(&format!("unknown journal version {version}"))),
    };
    if u128::from_le_bytes(field(16..32).try_into().expect("16 bytes")) != volume.0 {
        return Err(bad("journal belongs to another volume"));
    }
    let base_seq = u64::from_le_bytes(field(32..40).try_into().expect("8 bytes"));
    let mut replay = Replay {
        version,
        ..Replay::default()
    };
    let mut pos = HEADER_LEN as usize;
    let mut expect = base_seq + 1;
    while let Some((batch, len)) = parse_one(&bytes[pos..]) {
        if batch.seq != expect {
            break;
        }
        replay.batches.push(batch);
        pos += len;
        expect += 1;
    }
    // Zeros the file was extended with ahead of the appends are no tear.
    if bytes[pos..].iter().any(|&b| b != 0) {
        replay.truncated_bytes = (bytes.len() - pos) as u64;
    }
    Ok((replay, pos as u64, expect - 1))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn layer_at(b: &[u8], at: usize) -> Option<LayerId> {
    Some(LayerId(u128::from_le_bytes(
        b.get(at..at + 16)?.try_into().ok()?,
    )))
}

fn parse_v1_batch(b: &[u8]) -> Option<(Batch, usize)> {
    if b.len() < V1_BATCH_HEADER_LEN || u32_at(b, 0)? != V1_BATCH_MAGIC {
        return None;
    }
    let count = u32_at(b, 4)? as usize;
    let seq = u64_at(b, 8)?;
    let crc = u32_at(b, 16)?;
    let len = V1_BATCH_HEADER_LEN.checked_add(count.checked_mul(RECORD_LEN)?)?;
    let body = b.get(V1_BATCH_HEADER_LEN..len)?;
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
    Some((
        Batch {
            seq,
            records,
            ..Batch::default()
        },
        len,
    ))
}

fn parse_batch(b: &[u8]) -> Option<(Batch, usize)> {
    if b.len() < BATCH_HEADER_LEN || u32_at(b, 0)? != BATCH_MAGIC {
        return None;
    }
    let seq = u64_at(b, 4)?;
    let [records, synced, extents, blocks] =
        [12, 16, 20, 24].map(|at| u32_at(b, at).map(|n| n as usize));
    let (records, synced, extents, blocks) = (records?, synced?, extents?, blocks?);
    let rec_at = BATCH_HEADER_LEN;
    let synced_at = rec_at.checked_add(records.checked_mul(RECORD_LEN)?)?;
    let ext_at = synced_at.checked_add(synced.checked_mul(LAYER_ID_LEN)?)?;
    let data_at = ext_at.checked_add(extents.checked_mul(EXTENT_LEN)?)?;
    let len = data_at.checked_add(blocks.checked_mul(BLOCK)?)?;
    let batch = b.get(..len)?;
    if batch_crc(batch) != u32_at(b, BATCH_CRC.start)? {
        return None;
    }
    let records = batch[rec_at..synced_at]
        .chunks_exact(RECORD_LEN)
        .map(Record::decode)
        .collect::<Option<Vec<_>>>()?;
    let synced = (0..synced)
        .map(|i| layer_at(batch, synced_at + i * LAYER_ID_LEN))
        .collect::<Option<Vec<_>>>()?;
    let mut logged = Vec::with_capacity(extents);
    let mut data = data_at;
    for i in 0..extents {
        let at = ext_at + i * EXTENT_LEN;
        let n = u32_at(batch, at + 24)? as usize;
        let bytes = batch.get(data..data.checked_add(n.checked_mul(BLOCK)?)?)?;
        let start = u64_at(batch, at + 16)?;
        if n == 0
            || start
                .checked_add(n as u64)?
                .checked_mul(BLOCK_SIZE)
                .is_none()
        {
            return None;
        }
        logged.push(Logged {
            layer: layer_at(batch, at)?,
            start,
            data: bytes.to_vec(),
        });
        data += bytes.len();
    }
    if data != len {
        return None;
    }
    let boot = batch[28..44].try_into().ok()?;
    Some((
        Batch {
            seq,
            records,
            synced,
            logged,
            boot,
        },
        len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::io::RealFs;
    use std::os::unix::fs::FileExt;

    const OPTS: JournalOpts = JournalOpts {
        sync: true,
        prealloc: 4096,
    };

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

    fn logged(layer: u128, start: u64, fill: &[u8]) -> Logged {
        Logged {
            layer: LayerId(layer),
            start,
            data: fill.iter().flat_map(|&b| [b; BLOCK]).collect(),
        }
    }

    fn pool() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(JOURNAL_DIR)).unwrap();
        dir
    }

    fn seqs_and_records(replay: &Replay) -> Vec<(u64, Vec<Record>)> {
        replay
            .batches
            .iter()
            .map(|b| (b.seq, b.records.clone()))
            .collect()
    }

    #[test]
    fn batches_replay_in_order_with_their_synced_layers_and_data() {
        let dir = pool();
        let v = VolumeId(1);
        let mut j = JournalFile::create(&fs(), dir.path(), v, 10, OPTS).unwrap();
        assert_eq!(j.append(&[rec(1), rec(5)], &[LayerId(9)], &[]).unwrap(), 11);
        let data = [logged(9, 7, b"ab"), logged(4, 0, b"c")];
        assert_eq!(j.append(&[rec(7)], &[], &data).unwrap(), 12);
        assert_eq!(j.data_bytes(), 3 * BLOCK as u64);
        let (j2, replay) = JournalFile::open(&fs(), dir.path(), v, OPTS).unwrap();
        assert_eq!(
            seqs_and_records(&replay),
            vec![(11, vec![rec(1), rec(5)]), (12, vec![rec(7)])]
        );
        assert_eq!(replay.batches[0].synced, vec![LayerId(9)]);
        assert_eq!(replay.batches[1].logged, data);
        assert_eq!(replay.batches[1].boot, fs().page_cache_id(dir.path()));
        assert_eq!(replay.truncated_bytes, 0);
        assert_eq!(j2.last_seq(), 12);
        assert_eq!(j2.data_bytes(), 3 * BLOCK as u64);
    }

    #[test]
    fn appends_overwrite_zeros_the_file_was_extended_with() {
        let dir = pool();
        let v = VolumeId(1);
        let mut j = JournalFile::create(&fs(), dir.path(), v, 0, OPTS).unwrap();
        j.append(&[rec(1)], &[], &[]).unwrap();
        let path = journal_path(dir.path(), v);
        let size = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(size(), 4096, "extended ahead to the prealloc step");
        j.append(&[rec(2)], &[], &[]).unwrap();
        assert_eq!(size(), 4096, "the second append fits in the zeros");
        j.append(&[], &[], &[logged(9, 0, b"x")]).unwrap();
        assert_eq!(size(), 8192);
        let (mut j, replay) = JournalFile::open(&fs(), dir.path(), v, OPTS).unwrap();
        assert_eq!(replay.batches.len(), 3);
        assert_eq!(replay.truncated_bytes, 0, "zeros are not a torn tail");
        assert_eq!(size(), 8192, "and stay");
        j.append(&[rec(4)], &[], &[]).unwrap();
        let (_, replay) = JournalFile::open(&fs(), dir.path(), v, OPTS).unwrap();
        assert_eq!(replay.batches.len(), 4);
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue_after_it() {
        let dir = pool();
        let v = VolumeId(1);
        let mut j = JournalFile::create(&fs(), dir.path(), v, 0, OPTS).unwrap();
        j.append(&[rec(1)], &[], &[]).unwrap();
        let good = j.len();
        j.append(&[rec(2), rec(3)], &[], &[logged(9, 2, b"y")])
            .unwrap();
        // A crash in the middle of the second batch.
        let path = journal_path(dir.path(), v);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(good + 30)
            .unwrap();
        let (mut j, replay) = JournalFile::open(&fs(), dir.path(), v, OPTS).unwrap();
        assert_eq!(seqs_and_records(&replay), vec![(1, vec![rec(1)])]);
        assert_eq!(replay.truncated_bytes, 30);
        j.append(&[rec(4)], &[], &[]).unwrap();
        let (_, replay) = JournalFile::open(&fs(), dir.path(), v, OPTS).unwrap();
        assert_eq!(
            seqs_and_records(&replay),
            vec![(1, vec![rec(1)]), (2, vec![rec(4)])]
        );
    }

    #[test]
    fn a_corrupted_batch_or_its_data_stops_replay() {
        for at in [30, BATCH_HEADER_LEN + RECORD_LEN + EXTENT_LEN + 100] {
            let dir = pool();
            let v = VolumeId(1);
            let mut j = JournalFile::create(&fs(), dir.path(), v, 0, OPTS).unwrap();
            j.append(&[rec(1)], &[], &[]).unwrap();
            let second = j.len();
            j.append(&[rec(2)], &[], &[logged(9, 2, b"z")]).unwrap();
            let path = journal_path(dir.path(), v);
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&[0xff], second + at as u64).unwrap();
            let (_, replay) = JournalFile::open(&fs(), dir.path(), v, OPTS).unwrap();
            assert_eq!(replay.batches.len(), 1, "corrupted at {at}");
        }
    }

    #[test]
    fn absurd_counts_in_a_batch_header_are_a_torn_batch() {
        let mut b = vec![0u8; BATCH_HEADER_LEN];
        b[..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        for at in [12, 16, 20, 24] {
            b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(parse_batch(&b).is_none());
        }
    }

    #[test]
    fn a_version_1_journal_is_read_and_never_appended_to() {
        let dir = pool();
        let v = VolumeId(3);
        let mut bytes = header(v, 5);
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..40]);
        bytes[40..44].copy_from_slice(&crc.to_le_bytes());
        let mut body = Vec::new();
        rec(3).encode(&mut body);
        let mut h = crc32fast::Hasher::new();
        h.update(&1u32.to_le_bytes());
        h.update(&6u64.to_le_bytes());
        h.update(&body);
        bytes.extend_from_slice(&V1_BATCH_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&6u64.to_le_bytes());
        bytes.extend_from_slice(&h.finalize().to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&body);
        std::fs::write(journal_path(dir.path(), v), &bytes).unwrap();
        let (mut j, replay) = JournalFile::open(&fs(), dir.path(), v, OPTS).unwrap();
        assert_eq!(replay.version, 1);
        assert_eq!(seqs_and_records(&replay), vec![(6, vec![rec(3)])]);
        assert!(j.is_old() && !j.can_log());
        assert!(j.append(&[rec(4)], &[], &[]).is_err());
    }

    #[test]
    fn replay_restores_the_newest_logged_version_unless_a_later_batch_synced_the_layer() {
        let (old_boot, now) = ([1; 16], [2; 16]);
        let batch = |seq, boot, synced: &[u128], logged: Vec<Logged>| Batch {
            seq,
            boot,
            synced: synced.iter().map(|&l| LayerId(l)).collect(),
            logged,
            ..Batch::default()
        };
        let replay = Replay {
            batches: vec![
                // Layer 7's blocks 0, 1; layer 8's block 0.
                batch(
                    1,
                    old_boot,
                    &[],
                    vec![logged(7, 0, b"ab"), logged(8, 0, b"p")],
                ),
                // Block 1 again: its newer version wins.
                batch(2, old_boot, &[], vec![logged(7, 1, b"B")]),
                // Layer 8 was synced after: its older block needs nothing.
                batch(3, old_boot, &[8], vec![]),
            ],
            ..Replay::default()
        };
        let r = replay.restore(now);
        let writes: Vec<(u128, u64, u8)> =
            r.writes.iter().map(|(l, b, d)| (l.0, *b, d[0])).collect();
        assert_eq!(writes, vec![(7, 1, b'B'), (7, 0, b'a')]);
        assert_eq!(r.sync, BTreeSet::from([LayerId(7)]));
        // In the boot that wrote them, the page cache has them, or newer
        // data: nothing is written back, the files are synced.
        let r = replay.restore(old_boot);
        assert!(r.writes.is_empty());
        assert_eq!(r.sync, BTreeSet::from([LayerId(7)]));
    }

    #[test]
    fn journal_of_another_volume_is_refused() {
        let dir = pool();
        JournalFile::create(&fs(), dir.path(), VolumeId(1), 0, OPTS).unwrap();
        std::fs::rename(
            journal_path(dir.path(), VolumeId(1)),
            journal_path(dir.path(), VolumeId(2)),
        )
        .unwrap();
        assert!(JournalFile::open(&fs(), dir.path(), VolumeId(2), OPTS).is_err());
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
