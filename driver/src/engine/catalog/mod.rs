//! The catalog: the pool's metadata store (redb, one file
//! `catalog.redb`). It holds every volume, layer, snapshot and family
//! record, the presence maps of layers (checkpointed from the journals),
//! and reserved tables for background jobs. Each change to the shape of a
//! chain (create, snapshot, clone, delete, resize) is one ACID transaction.
//!
//! This module knows records and their invariants (reference counts, slot
//! allocation, cascading deletes); it does no data I/O. See `FORMAT.md`.

mod codec;
pub(crate) mod records;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};

pub use self::records::{
    Attachment, FaultKind, FaultRecord, JobKind, JobReason, JobState, VolumePolicy,
};
pub(crate) use self::records::{
    FamilyRecord, JobRecord, LayerRecord, SnapshotRecord, SnapshotState, VolumeRecord,
};
use super::error::{Error, Result, catalog_error};
use super::geometry::CHUNK_BLOCKS;
use super::ids::{FamilyId, JobId, LayerId, SnapshotId, VolumeId};
use super::index::{FIRST_SLOT, MAX_LAYERS_PER_FAMILY};
use super::io::{CatalogFile, Entry, Fs, Open};
use super::journal::Record;
use super::presence::{self, BlockState, Run};

/// The on-disk format this build writes and reads. A pool with a larger
/// number is refused (never misread); see `FORMAT.md` for the history.
pub const FORMAT_VERSION: u32 = 1;

/// File name of the catalog inside a pool directory.
pub(crate) const CATALOG_FILE: &str = "catalog.redb";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOLUMES: TableDefinition<u128, &[u8]> = TableDefinition::new("volumes");
const LAYERS: TableDefinition<u128, &[u8]> = TableDefinition::new("layers");
const SNAPSHOTS: TableDefinition<u128, &[u8]> = TableDefinition::new("snapshots");
const FAMILIES: TableDefinition<u128, &[u8]> = TableDefinition::new("families");
/// Presence maps: (layer, chunk) → runs.
const PRESENCE: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("presence");
/// Background jobs (merges, flattens; later moves).
const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs");
/// Per-volume merge policy (absent: the pool's defaults). Created on first
/// use, so pools made before it existed open unchanged.
const POLICIES: TableDefinition<u128, &[u8]> = TableDefinition::new("policies");
/// Volume id → [`Attachment`] (made on first use).
const ATTACHMENTS: TableDefinition<u128, &[u8]> = TableDefinition::new("attachments");
/// Volume id → what the volume is fetched from (opaque to the engine; see
/// `FORMAT.md`, "Fetching volumes"). Made on first use.
const BACKINGS: TableDefinition<u128, &[u8]> = TableDefinition::new("backings");
/// Volumes whose data a failure lost (see `FORMAT.md`, "Faults"). Created
/// on first use, like `policies`.
const FAULTS: TableDefinition<u128, &[u8]> = TableDefinition::new("faults");

/// The metadata store of one pool.
pub(crate) struct Catalog {
    db: Database,
    durable: bool,
    /// A commit failed: whether it took effect is unknown until the pool is
    /// opened again (redb itself refuses every later call), so the pool
    /// takes no more changes.
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

impl Catalog {
    /// Opens the catalog of the pool in `dir`, creating it if `create` and
    /// the pool is new. `durable: false` skips fsync on commit (for
    /// benchmarks and test setup only).
    ///
    /// A catalog is made whole or not at all: initialised as
    /// `catalog.redb.new`, synced, renamed into place and the directory
    /// synced, so an interrupted creation leaves no catalog (and is simply
    /// done again). A pool that has layer files or journals but no catalog
    /// is refused: making a new one would turn every layer into an orphan.
    pub(crate) fn open(fs: &Arc<dyn Fs>, dir: &Path, create: bool, durable: bool) -> Result<Self> {
        let path = dir.join(CATALOG_FILE);
        let io = |op| move |e| super::error::io_error(op, dir, e);
        if fs.entry(&path).map_err(io("look for the catalog in"))? != Some(Entry::File) {
            if has_pool_files(&**fs, dir)? {
                return Err(Error::CatalogMissing(dir.into()));
            }
            if !create {
                return Err(Error::NotAPool {
                    path: dir.into(),
                    why: format!("no {CATALOG_FILE}"),
                });
            }
            Self::create(fs, dir, durable)?;
        }
        let file = fs
            .open(&path, Open::ReadWrite)
            .map_err(|e| super::error::io_error("open catalog", &path, e))?;
        let db = Database::builder()
            .create_with_backend(CatalogFile(file))
            .map_err(|e| catalog_error("open catalog", e))?;
        let catalog = Catalog {
            db,
            durable,
            failed: Default::default(),
        };
        catalog.check_format(dir)?;
        // Tables newer than the pool.
        let txn = catalog.write()?;
        for def in [POLICIES, FAULTS, ATTACHMENTS, BACKINGS] {
            txn.0
                .open_table(def)
                .map_err(|e| catalog_error("create tables", e))?;
        }
        txn.commit()?;
        Ok(catalog)
    }

    /// Makes a new, initialised catalog in `dir` atomically.
    fn create(fs: &Arc<dyn Fs>, dir: &Path, durable: bool) -> Result<()> {
        let path = dir.join(CATALOG_FILE);
        let new = dir.join(format!("{CATALOG_FILE}.new"));
        let file = fs
            .open(&new, Open::Truncate)
            .map_err(|e| super::error::io_error("create catalog", &new, e))?;
        let db = Database::builder()
            .create_with_backend(CatalogFile(file))
            .map_err(|e| catalog_error("create catalog", e))?;
        Catalog {
            db,
            durable,
            failed: Default::default(),
        }
        .initialise()?;
        fs.rename(&new, &path)
            .map_err(|e| super::error::io_error("install catalog", &path, e))?;
        if durable {
            super::layer::sync_dir(&**fs, dir)?;
        }
        Ok(())
    }

    fn initialise(&self) -> Result<()> {
        let mut txn = self.write()?;
        {
            let t = &mut txn.0;
            let mut meta = t
                .open_table(META)
                .map_err(|e| catalog_error("create tables", e))?;
            meta.insert("format_version", FORMAT_VERSION.to_le_bytes().as_slice())
                .map_err(|e| catalog_error("create tables", e))?;
            let pool_id = uuid::Uuid::new_v4().as_u128().to_le_bytes();
            meta.insert("pool_id", pool_id.as_slice())
                .map_err(|e| catalog_error("create tables", e))?;
        }
        for def in [VOLUMES, LAYERS, SNAPSHOTS, FAMILIES, JOBS] {
            txn.0
                .open_table(def)
                .map_err(|e| catalog_error("create tables", e))?;
        }
        txn.0
            .open_table(PRESENCE)
            .map_err(|e| catalog_error("create tables", e))?;
        txn.commit()
    }

    fn check_format(&self, dir: &Path) -> Result<()> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| catalog_error("read catalog", e))?;
        let not_a_pool = |why: &str| Error::NotAPool {
            path: PathBuf::from(dir),
            why: why.into(),
        };
        let meta = txn
            .open_table(META)
            .map_err(|_| not_a_pool("catalog has no meta table"))?;
        let v = meta
            .get("format_version")
            .map_err(|e| catalog_error("read format version", e))?
            .ok_or_else(|| not_a_pool("catalog has no format version"))?;
        let bytes: [u8; 4] = v
            .value()
            .try_into()
            .map_err(|_| not_a_pool("bad format version"))?;
        let found = u32::from_le_bytes(bytes);
        if found > FORMAT_VERSION {
            return Err(Error::FormatTooNew {
                path: dir.into(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        if found < 1 {
            return Err(not_a_pool("format version 0"));
        }
        Ok(())
    }

    /// Whether a commit failed (see `failed`).
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn read(&self) -> Result<ReadTxn> {
        self.db
            .begin_read()
            .map(ReadTxn)
            .map_err(|e| catalog_error("begin read", e))
    }

    pub(crate) fn write(&self) -> Result<WriteTxn> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| catalog_error("begin write", e))?;
        if !self.durable {
            txn.set_durability(Durability::None)
                .map_err(|e| catalog_error("begin write", e))?;
        }
        Ok(WriteTxn(txn, Arc::clone(&self.failed)))
    }
}

/// Whether `dir` has layer files or journals (a pool, with or without its
/// catalog).
fn has_pool_files(fs: &dyn Fs, dir: &Path) -> Result<bool> {
    for (sub, ext) in [
        (super::layer::LAYERS_DIR, ".data"),
        (super::journal::JOURNAL_DIR, ".wal"),
    ] {
        let d = dir.join(sub);
        match fs.read_dir(&d) {
            Ok(names) => {
                if names.iter().any(|n| n.to_string_lossy().ends_with(ext)) {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(super::error::io_error("list", &d, e)),
        }
    }
    Ok(false)
}

fn get_rec<T, R>(
    table: &T,
    id: u128,
    decode: fn(&[u8]) -> Result<R>,
    op: &'static str,
) -> Result<Option<R>>
where
    T: ReadableTable<u128, &'static [u8]>,
{
    match table.get(id).map_err(|e| catalog_error(op, e))? {
        Some(v) => Ok(Some(decode(v.value())?)),
        None => Ok(None),
    }
}

fn all_recs<T, R>(table: &T, decode: fn(&[u8]) -> Result<R>, op: &'static str) -> Result<Vec<R>>
where
    T: ReadableTable<u128, &'static [u8]>,
{
    let mut out = Vec::new();
    for entry in table.iter().map_err(|e| catalog_error(op, e))? {
        let (_, v) = entry.map_err(|e| catalog_error(op, e))?;
        out.push(decode(v.value())?);
    }
    Ok(out)
}

/// Every record of a table, with its key as an ID.
fn keyed_recs<T, K, R>(
    table: &T,
    id: fn(u128) -> K,
    decode: fn(&[u8]) -> Result<R>,
    op: &'static str,
) -> Result<Vec<(K, R)>>
where
    T: ReadableTable<u128, &'static [u8]>,
{
    let mut out = Vec::new();
    for entry in table.iter().map_err(|e| catalog_error(op, e))? {
        let (k, v) = entry.map_err(|e| catalog_error(op, e))?;
        out.push((id(k.value()), decode(v.value())?));
    }
    Ok(out)
}

fn presence_of<T>(table: &T, layer: LayerId) -> Result<Vec<(u32, Vec<Run>)>>
where
    T: ReadableTable<(u128, u32), &'static [u8]>,
{
    let op = "read presence";
    let mut out = Vec::new();
    for entry in table
        .range((layer.0, 0)..=(layer.0, u32::MAX))
        .map_err(|e| catalog_error(op, e))?
    {
        let (k, v) = entry.map_err(|e| catalog_error(op, e))?;
        out.push((k.value().1, presence::decode(v.value())?));
    }
    Ok(out)
}

/// A consistent read-only view of the catalog.
pub(crate) struct ReadTxn(ReadTransaction);

macro_rules! read_table {
    ($txn:expr, $def:expr, $op:expr) => {
        $txn.open_table($def).map_err(|e| catalog_error($op, e))?
    };
}

impl ReadTxn {
    pub(crate) fn volume(&self, id: VolumeId) -> Result<Option<VolumeRecord>> {
        let t = read_table!(self.0, VOLUMES, "read volume");
        get_rec(&t, id.0, VolumeRecord::decode, "read volume")
    }
    pub(crate) fn layer(&self, id: LayerId) -> Result<Option<LayerRecord>> {
        let t = read_table!(self.0, LAYERS, "read layer");
        get_rec(&t, id.0, LayerRecord::decode, "read layer")
    }
    pub(crate) fn snapshot(&self, id: SnapshotId) -> Result<Option<SnapshotRecord>> {
        let t = read_table!(self.0, SNAPSHOTS, "read snapshot");
        get_rec(&t, id.0, SnapshotRecord::decode, "read snapshot")
    }
    pub(crate) fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        all_recs(
            &read_table!(self.0, VOLUMES, "list volumes"),
            VolumeRecord::decode,
            "list volumes",
        )
    }
    pub(crate) fn layers(&self) -> Result<Vec<LayerRecord>> {
        all_recs(
            &read_table!(self.0, LAYERS, "list layers"),
            LayerRecord::decode,
            "list layers",
        )
    }
    pub(crate) fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let t = read_table!(self.0, SNAPSHOTS, "list snapshots");
        all_recs(&t, SnapshotRecord::decode, "list snapshots")
    }
    pub(crate) fn families(&self) -> Result<Vec<(FamilyId, FamilyRecord)>> {
        let op = "list families";
        keyed_recs(
            &read_table!(self.0, FAMILIES, op),
            FamilyId,
            FamilyRecord::decode,
            op,
        )
    }
    /// The layers (with any presence) that have presence records, for checks.
    pub(crate) fn presence_layers(&self) -> Result<Vec<(LayerId, u32)>> {
        let op = "list presence";
        let t = read_table!(self.0, PRESENCE, op);
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| catalog_error(op, e))? {
            let (k, _) = entry.map_err(|e| catalog_error(op, e))?;
            let (l, c) = k.value();
            out.push((LayerId(l), c));
        }
        Ok(out)
    }
    pub(crate) fn presence(&self, layer: LayerId) -> Result<Vec<(u32, Vec<Run>)>> {
        presence_of(&read_table!(self.0, PRESENCE, "read presence"), layer)
    }
    pub(crate) fn layer_required(&self, id: LayerId) -> Result<LayerRecord> {
        self.layer(id)?
            .ok_or_else(|| Error::Corrupt(format!("layer {id} is missing")))
    }
    pub(crate) fn jobs(&self) -> Result<Vec<JobRecord>> {
        all_recs(
            &read_table!(self.0, JOBS, "list jobs"),
            JobRecord::decode,
            "list jobs",
        )
    }
    pub(crate) fn policy(&self, volume: VolumeId) -> Result<VolumePolicy> {
        let t = read_table!(self.0, POLICIES, "read policy");
        Ok(get_rec(&t, volume.0, VolumePolicy::decode, "read policy")?.unwrap_or_default())
    }
    pub(crate) fn attachment(&self, volume: VolumeId) -> Result<Option<Attachment>> {
        let t = read_table!(self.0, ATTACHMENTS, "read attachment");
        get_rec(&t, volume.0, Attachment::decode, "read attachment")
    }
    pub(crate) fn backing(&self, volume: VolumeId) -> Result<Option<Vec<u8>>> {
        let t = read_table!(self.0, BACKINGS, "read backing");
        get_rec(&t, volume.0, |b| Ok(b.to_vec()), "read backing")
    }
    pub(crate) fn backings(&self) -> Result<Vec<(VolumeId, Vec<u8>)>> {
        let op = "list backings";
        keyed_recs(
            &read_table!(self.0, BACKINGS, op),
            VolumeId,
            |b| Ok(b.to_vec()),
            op,
        )
    }
    pub(crate) fn fault(&self, volume: VolumeId) -> Result<Option<FaultRecord>> {
        let t = read_table!(self.0, FAULTS, "read fault");
        get_rec(&t, volume.0, FaultRecord::decode, "read fault")
    }
    pub(crate) fn faults(&self) -> Result<Vec<(VolumeId, FaultRecord)>> {
        let op = "list faults";
        keyed_recs(
            &read_table!(self.0, FAULTS, op),
            VolumeId,
            FaultRecord::decode,
            op,
        )
    }
    /// The layers whose parent is `layer`.
    pub(crate) fn children(&self, layer: LayerId) -> Result<Vec<LayerRecord>> {
        Ok(self
            .layers()?
            .into_iter()
            .filter(|l| l.parent == Some(layer))
            .collect())
    }

    /// The chain under (and including) `top`, base first.
    pub(crate) fn chain(&self, top: LayerId) -> Result<Vec<LayerRecord>> {
        let t = read_table!(self.0, LAYERS, "read chain");
        let mut chain = Vec::new();
        let mut next = Some(top);
        while let Some(id) = next {
            let rec = get_rec(&t, id.0, LayerRecord::decode, "read chain")?
                .ok_or_else(|| Error::Corrupt(format!("layer {id} of a chain is missing")))?;
            if chain.len() > MAX_LAYERS_PER_FAMILY as usize {
                return Err(Error::Corrupt(format!(
                    "chain under layer {top} has a cycle"
                )));
            }
            next = rec.parent;
            chain.push(rec);
        }
        chain.reverse();
        Ok(chain)
    }
}

/// A write transaction; nothing is visible to others (or durable) until
/// [`WriteTxn::commit`].
pub(crate) struct WriteTxn(WriteTransaction, Arc<std::sync::atomic::AtomicBool>);

macro_rules! rw_table {
    ($self:expr, $def:expr, $op:expr) => {
        $self
            .0
            .open_table($def)
            .map_err(|e| catalog_error($op, e))?
    };
}

impl WriteTxn {
    pub(crate) fn commit(self) -> Result<()> {
        self.0.commit().map_err(|e| {
            self.1.store(true, std::sync::atomic::Ordering::Release);
            catalog_error("commit", e)
        })
    }
    pub(crate) fn job(&self, id: JobId) -> Result<Option<JobRecord>> {
        let t = rw_table!(self, JOBS, "read job");
        get_rec(&t, id.0, JobRecord::decode, "read job")
    }
    pub(crate) fn put_job(&mut self, rec: &JobRecord) -> Result<()> {
        let mut t = rw_table!(self, JOBS, "write job");
        t.insert(rec.id.0, rec.encode().as_slice())
            .map_err(|e| catalog_error("write job", e))?;
        Ok(())
    }
    pub(crate) fn remove_job(&mut self, id: JobId) -> Result<()> {
        let mut t = rw_table!(self, JOBS, "remove job");
        t.remove(id.0).map_err(|e| catalog_error("remove job", e))?;
        Ok(())
    }
    pub(crate) fn put_policy(&mut self, volume: VolumeId, p: &VolumePolicy) -> Result<()> {
        let mut t = rw_table!(self, POLICIES, "write policy");
        t.insert(volume.0, p.encode().as_slice())
            .map_err(|e| catalog_error("write policy", e))?;
        Ok(())
    }
    pub(crate) fn backing(&self, volume: VolumeId) -> Result<Option<Vec<u8>>> {
        let t = rw_table!(self, BACKINGS, "read backing");
        get_rec(&t, volume.0, |b| Ok(b.to_vec()), "read backing")
    }
    pub(crate) fn fault(&self, volume: VolumeId) -> Result<Option<FaultRecord>> {
        let t = rw_table!(self, FAULTS, "read fault");
        get_rec(&t, volume.0, FaultRecord::decode, "read fault")
    }
    pub(crate) fn put_fault(&mut self, volume: VolumeId, f: &FaultRecord) -> Result<()> {
        let mut t = rw_table!(self, FAULTS, "write fault");
        t.insert(volume.0, f.encode().as_slice())
            .map_err(|e| catalog_error("write fault", e))?;
        Ok(())
    }
    pub(crate) fn remove_fault(&mut self, volume: VolumeId) -> Result<()> {
        let mut t = rw_table!(self, FAULTS, "remove fault");
        t.remove(volume.0)
            .map_err(|e| catalog_error("remove fault", e))?;
        Ok(())
    }
    pub(crate) fn put_attachment(&mut self, volume: VolumeId, a: &Attachment) -> Result<()> {
        let mut t = rw_table!(self, ATTACHMENTS, "write attachment");
        t.insert(volume.0, a.encode().as_slice())
            .map_err(|e| catalog_error("write attachment", e))?;
        Ok(())
    }
    pub(crate) fn put_backing(&mut self, volume: VolumeId, record: &[u8]) -> Result<()> {
        let mut t = rw_table!(self, BACKINGS, "write backing");
        t.insert(volume.0, record)
            .map_err(|e| catalog_error("write backing", e))?;
        Ok(())
    }
    pub(crate) fn remove_backing(&mut self, volume: VolumeId) -> Result<()> {
        let mut t = rw_table!(self, BACKINGS, "remove backing");
        t.remove(volume.0)
            .map_err(|e| catalog_error("remove backing", e))?;
        Ok(())
    }
    pub(crate) fn remove_attachment(&mut self, volume: VolumeId) -> Result<()> {
        let mut t = rw_table!(self, ATTACHMENTS, "remove attachment");
        t.remove(volume.0)
            .map_err(|e| catalog_error("remove attachment", e))?;
        Ok(())
    }
    pub(crate) fn remove_policy(&mut self, volume: VolumeId) -> Result<()> {
        let mut t = rw_table!(self, POLICIES, "remove policy");
        t.remove(volume.0)
            .map_err(|e| catalog_error("remove policy", e))?;
        Ok(())
    }
    /// Removes `layer`'s record and presence (no reference counting: the
    /// caller has moved what depended on it), freeing its slot.
    pub(crate) fn remove_layer(&mut self, rec: &LayerRecord) -> Result<()> {
        {
            let mut t = rw_table!(self, LAYERS, "remove layer");
            t.remove(rec.id.0)
                .map_err(|e| catalog_error("remove layer", e))?;
        }
        self.remove_presence(rec.id)?;
        self.free_slot(rec.family, rec.slot)
    }

    pub(crate) fn volume(&self, id: VolumeId) -> Result<Option<VolumeRecord>> {
        get_rec(
            &rw_table!(self, VOLUMES, "read volume"),
            id.0,
            VolumeRecord::decode,
            "read volume",
        )
    }
    pub(crate) fn layer(&self, id: LayerId) -> Result<Option<LayerRecord>> {
        get_rec(
            &rw_table!(self, LAYERS, "read layer"),
            id.0,
            LayerRecord::decode,
            "read layer",
        )
    }
    pub(crate) fn snapshot(&self, id: SnapshotId) -> Result<Option<SnapshotRecord>> {
        let t = rw_table!(self, SNAPSHOTS, "read snapshot");
        get_rec(&t, id.0, SnapshotRecord::decode, "read snapshot")
    }
    /// The layer, which must exist.
    pub(crate) fn layer_required(&self, id: LayerId) -> Result<LayerRecord> {
        self.layer(id)?
            .ok_or_else(|| Error::Corrupt(format!("layer {id} is missing")))
    }

    pub(crate) fn put_volume(&mut self, rec: &VolumeRecord) -> Result<()> {
        let mut t = rw_table!(self, VOLUMES, "write volume");
        t.insert(rec.id.0, rec.encode().as_slice())
            .map_err(|e| catalog_error("write volume", e))?;
        Ok(())
    }
    pub(crate) fn remove_volume(&mut self, id: VolumeId) -> Result<()> {
        let mut t = rw_table!(self, VOLUMES, "remove volume");
        t.remove(id.0)
            .map_err(|e| catalog_error("remove volume", e))?;
        Ok(())
    }
    pub(crate) fn put_layer(&mut self, rec: &LayerRecord) -> Result<()> {
        let mut t = rw_table!(self, LAYERS, "write layer");
        t.insert(rec.id.0, rec.encode().as_slice())
            .map_err(|e| catalog_error("write layer", e))?;
        Ok(())
    }
    pub(crate) fn put_snapshot(&mut self, rec: &SnapshotRecord) -> Result<()> {
        let mut t = rw_table!(self, SNAPSHOTS, "write snapshot");
        t.insert(rec.id.0, rec.encode().as_slice())
            .map_err(|e| catalog_error("write snapshot", e))?;
        Ok(())
    }
    pub(crate) fn remove_snapshot(&mut self, id: SnapshotId) -> Result<()> {
        let mut t = rw_table!(self, SNAPSHOTS, "remove snapshot");
        t.remove(id.0)
            .map_err(|e| catalog_error("remove snapshot", e))?;
        Ok(())
    }

    /// The stored presence of one chunk of a layer.
    pub(crate) fn presence_chunk(&self, layer: LayerId, chunk: u32) -> Result<Option<Vec<Run>>> {
        let t = rw_table!(self, PRESENCE, "read presence");
        match t
            .get((layer.0, chunk))
            .map_err(|e| catalog_error("read presence", e))?
        {
            Some(v) => Ok(Some(presence::decode(v.value())?)),
            None => Ok(None),
        }
    }
    /// Chunks of `layer` in `first..=last` that have a presence row.
    fn presence_chunks(&self, layer: LayerId, first: u32, last: u32) -> Result<Vec<u32>> {
        let op = "read presence";
        let t = rw_table!(self, PRESENCE, op);
        let mut out = Vec::new();
        for entry in t
            .range((layer.0, first)..=(layer.0, last))
            .map_err(|e| catalog_error(op, e))?
        {
            let (k, _) = entry.map_err(|e| catalog_error(op, e))?;
            out.push(k.value().1);
        }
        Ok(out)
    }

    /// Stores (or with `None`, removes) the presence of one chunk.
    pub(crate) fn put_presence_chunk(
        &mut self,
        layer: LayerId,
        chunk: u32,
        encoded: Option<&[u8]>,
    ) -> Result<()> {
        let op = "write presence";
        let mut t = rw_table!(self, PRESENCE, op);
        match encoded {
            Some(bytes) => t.insert((layer.0, chunk), bytes).map(drop),
            None => t.remove((layer.0, chunk)).map(drop),
        }
        .map_err(|e| catalog_error(op, e))
    }
    /// Removes every presence record of `layer`.
    pub(crate) fn remove_presence(&mut self, layer: LayerId) -> Result<()> {
        let op = "remove presence";
        let mut t = rw_table!(self, PRESENCE, op);
        t.retain_in((layer.0, 0)..=(layer.0, u32::MAX), |_, _| false)
            .map_err(|e| catalog_error(op, e))
    }

    /// Folds journal records into the stored presence maps, in order.
    /// Records of layers that no longer exist are skipped. Works one chunk
    /// at a time, so memory stays small however many chunks the records
    /// touch.
    pub(crate) fn apply_presence(&mut self, records: &[Record]) -> Result<()> {
        // Split records at chunk boundaries; a stable sort by (layer, chunk)
        // keeps the order of changes to any one block. Making blocks absent
        // only changes chunks that define something: those with a row, or
        // written earlier in this batch; a huge discard over empty space
        // touches nothing else.
        let mut pieces: Vec<(LayerId, u32, u16, u16, BlockState)> = Vec::new();
        let mut written: BTreeSet<(LayerId, u32)> = BTreeSet::new();
        for r in records {
            let end = r.start + u64::from(r.blocks);
            let (first, last) = (
                (r.start / CHUNK_BLOCKS) as u32,
                ((end - 1) / CHUNK_BLOCKS) as u32,
            );
            let chunks: Vec<u32> = if r.state == BlockState::Absent && last - first > 64 {
                let mut c: BTreeSet<u32> = self
                    .presence_chunks(r.layer, first, last)?
                    .into_iter()
                    .collect();
                c.extend(
                    written
                        .range((r.layer, first)..=(r.layer, last))
                        .map(|(_, c)| *c),
                );
                c.into_iter().collect()
            } else {
                (first..=last).collect()
            };
            for chunk in chunks {
                let lo = r.start.max(u64::from(chunk) * CHUNK_BLOCKS);
                let hi = end.min((u64::from(chunk) + 1) * CHUNK_BLOCKS);
                let lo_in = (lo % CHUNK_BLOCKS) as u16;
                pieces.push((r.layer, chunk, lo_in, (hi - lo) as u16, r.state));
                if r.state != BlockState::Absent {
                    written.insert((r.layer, chunk));
                }
            }
        }
        pieces.sort_by_key(|p| (p.0, p.1));
        let mut i = 0;
        while i < pieces.len() {
            let (layer, chunk) = (pieces[i].0, pieces[i].1);
            let mut j = i;
            while j < pieces.len() && (pieces[j].0, pieces[j].1) == (layer, chunk) {
                j += 1;
            }
            if self.layer(layer)?.is_some() {
                let runs = self.presence_chunk(layer, chunk)?.unwrap_or_default();
                let mut states = presence::expand(&runs);
                for &(_, _, lo, len, state) in &pieces[i..j] {
                    states[lo as usize..(lo + len) as usize].fill(state);
                }
                self.put_presence_chunk(layer, chunk, presence::encode(&states).as_deref())?;
            }
            i = j;
        }
        Ok(())
    }

    /// A new family with no layers yet.
    pub(crate) fn new_family(&mut self) -> Result<FamilyId> {
        let id = FamilyId::new_random();
        self.put_family(
            id,
            &FamilyRecord {
                next_slot: u32::from(FIRST_SLOT),
                free: Vec::new(),
            },
        )?;
        Ok(id)
    }
    fn family(&self, id: FamilyId) -> Result<FamilyRecord> {
        let t = rw_table!(self, FAMILIES, "read family");
        match t.get(id.0).map_err(|e| catalog_error("read family", e))? {
            Some(v) => FamilyRecord::decode(v.value()),
            None => Err(Error::Corrupt(format!("family {id} is missing"))),
        }
    }
    fn put_family(&mut self, id: FamilyId, rec: &FamilyRecord) -> Result<()> {
        let mut t = rw_table!(self, FAMILIES, "write family");
        t.insert(id.0, rec.encode().as_slice())
            .map_err(|e| catalog_error("write family", e))?;
        Ok(())
    }
    /// Hands out a slot of `family` for a new layer.
    pub(crate) fn alloc_slot(&mut self, family: FamilyId) -> Result<u16> {
        let mut rec = self.family(family)?;
        let slot = match rec.free.pop() {
            Some(s) => s,
            None if rec.next_slot <= u32::from(u16::MAX) => {
                rec.next_slot += 1;
                (rec.next_slot - 1) as u16
            }
            None => {
                return Err(Error::LayerLimit {
                    limit: MAX_LAYERS_PER_FAMILY,
                });
            }
        };
        self.put_family(family, &rec)?;
        Ok(slot)
    }
    fn free_slot(&mut self, family: FamilyId, slot: u16) -> Result<()> {
        let mut rec = self.family(family)?;
        rec.free.push(slot);
        if rec.live() == 0 {
            let mut t = rw_table!(self, FAMILIES, "remove family");
            t.remove(family.0)
                .map_err(|e| catalog_error("remove family", e))?;
            return Ok(());
        }
        self.put_family(family, &rec)
    }

    /// Adds a reference to `layer`.
    pub(crate) fn retain_layer(&mut self, layer: LayerId) -> Result<LayerRecord> {
        let mut rec = self.layer_required(layer)?;
        rec.refs += 1;
        self.put_layer(&rec)?;
        Ok(rec)
    }

    /// Drops one reference to `layer`. A layer left without references is
    /// deleted with its presence, its slot and any deleted-snapshot record,
    /// and its parent loses a reference in turn. Returns the deleted layers
    /// (whose files the caller removes after commit).
    pub(crate) fn release_layer(&mut self, layer: LayerId) -> Result<Vec<LayerId>> {
        let mut freed = Vec::new();
        let mut next = Some(layer);
        while let Some(id) = next {
            let mut rec = self.layer_required(id)?;
            if rec.refs == 0 {
                return Err(Error::Corrupt(format!(
                    "layer {id} has no references to release"
                )));
            }
            rec.refs -= 1;
            if rec.refs > 0 {
                self.put_layer(&rec)?;
                break;
            }
            {
                let mut t = rw_table!(self, LAYERS, "remove layer");
                t.remove(id.0)
                    .map_err(|e| catalog_error("remove layer", e))?;
            }
            self.remove_presence(id)?;
            self.free_slot(rec.family, rec.slot)?;
            if let Some(snap) = rec.snapshot
                && self
                    .snapshot(snap)?
                    .is_some_and(|s| s.state == SnapshotState::Deleted)
            {
                self.remove_snapshot(snap)?;
            }
            freed.push(id);
            next = rec.parent;
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_of_a_newer_format_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let catalog =
            Catalog::open(&crate::engine::io::RealFs::shared(), dir.path(), true, true).unwrap();
        let txn = catalog.write().unwrap();
        {
            let mut meta = txn.0.open_table(META).unwrap();
            meta.insert(
                "format_version",
                (FORMAT_VERSION + 1).to_le_bytes().as_slice(),
            )
            .unwrap();
        }
        txn.commit().unwrap();
        drop(catalog);
        let err = Catalog::open(
            &crate::engine::io::RealFs::shared(),
            dir.path(),
            false,
            true,
        )
        .unwrap_err();
        assert!(matches!(err, Error::FormatTooNew { found, .. } if found == FORMAT_VERSION + 1));
    }

    #[test]
    fn family_beyond_the_slot_width_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(
            &crate::engine::io::RealFs::shared(),
            dir.path(),
            true,
            false,
        )
        .unwrap();
        let mut txn = catalog.write().unwrap();
        let family = txn.new_family().unwrap();
        // Pretend all but the last slot were handed out.
        txn.put_family(
            family,
            &FamilyRecord {
                next_slot: u32::from(u16::MAX),
                free: vec![],
            },
        )
        .unwrap();
        assert_eq!(txn.alloc_slot(family).unwrap(), u16::MAX);
        let err = txn.alloc_slot(family).unwrap_err();
        assert!(matches!(err, Error::LayerLimit { limit } if limit == MAX_LAYERS_PER_FAMILY));
        assert_eq!(MAX_LAYERS_PER_FAMILY, 65_534);
    }

    #[test]
    fn releasing_the_last_reference_cascades_down_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(
            &crate::engine::io::RealFs::shared(),
            dir.path(),
            true,
            false,
        )
        .unwrap();
        let mut txn = catalog.write().unwrap();
        let family = txn.new_family().unwrap();
        let mk = |id: u128, parent: Option<u128>, refs: u32, slot: u16| LayerRecord {
            id: LayerId(id),
            family,
            slot,
            parent: parent.map(LayerId),
            frozen: parent.is_none(),
            size: 4096,
            refs,
            snapshot: None,
            created_ns: 0,
        };
        for (id, parent, refs) in [(1, None, 1), (2, Some(1), 1)] {
            let slot = txn.alloc_slot(family).unwrap();
            txn.put_layer(&mk(id, parent, refs, slot)).unwrap();
        }
        let freed = txn.release_layer(LayerId(2)).unwrap();
        assert_eq!(freed, vec![LayerId(2), LayerId(1)]);
        assert!(txn.layer(LayerId(1)).unwrap().is_none());
    }
}
