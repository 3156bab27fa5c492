//! A pool: one directory holding layer files, per-volume journals and the
//! catalog. The pool owns the operations that change the shape of chains:
//! create, snapshot, clone, resize and delete. Each is one catalog
//! transaction; the files it needs are created (and synced) before the
//! transaction and removed after it, so a crash at any point leaves either
//! the old state or the new one plus orphan files that the next open
//! removes. `FORMAT.md` lists every step and why a crash there is safe.
//!
//! ```text
//! <pool>/catalog.redb          metadata (catalog/)
//! <pool>/layers/<id>.data      one sparse file per layer (layer.rs)
//! <pool>/journal/<id>.wal      one presence journal per volume (journal.rs)
//! <pool>/strata.lock           held (flock) while a process has the pool open
//! ```

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::catalog::{
    Attachment, FaultKind, FaultRecord, JobKind, JobReason, JobState, VolumePolicy,
};
use super::catalog::{Catalog, LayerRecord, SnapshotRecord, SnapshotState, VolumeRecord};
use super::error::{Error, Result, io_error};
use super::geometry::{BLOCK_SIZE, blocks_for, check_volume_size};
use super::ids::{LayerId, SnapshotId, VolumeId};
use super::io::{Entry, Fs, Open, RealFs};
use super::jobs::{self, JobConfig, Jobs};
use super::journal::{JOURNAL_DIR, JournalFile, JournalOpts, Record, journal_path};
use super::layer::sync_dir;
use super::layer::{FdCache, LAYERS_DIR, Layer, create_layer_file, layer_path, remove_quietly};
use super::pinned::{BlockRange, Pinned};
use super::presence::BlockState;
use super::snapshot::SnapshotReader;
use super::space::SpaceGuard;
use super::sys;
use super::unflushed::{self, UnflushedLog, unflushed_path};
use super::view::{self, DepthExtent, View};
use super::volume::{Fetch, VolState, Volume, VolumeStats};

const LOCK_FILE: &str = "strata.lock";

/// How to open a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Create the pool if the directory holds none.
    pub create: bool,
    /// fsync data, journals and catalog commits. Turning this off voids
    /// every durability promise; it exists for benchmark and test setup.
    pub sync: bool,
    /// Most layer files kept open at once (0: derive from RLIMIT_NOFILE).
    pub max_open_files: usize,
    /// A volume's journal is folded into the catalog once its presence
    /// changes grow past this many bytes (or its logged data past 4
    /// times as many: the disk space a volume's journal may take).
    pub journal_checkpoint_bytes: u64,
    /// A flush logs the data written since the previous one in the
    /// journal, with one durable write, when it is at most this many bytes;
    /// larger flushes sync the layer files first (see `journal.rs`). 0:
    /// never log.
    pub sync_log_bytes: u64,
    /// Free space kept for metadata: data writes fail with `NoSpace` below
    /// it. `None`: 1% of the filesystem, between 16 MiB and 256 MiB.
    pub reserve_bytes: Option<u64>,
    /// Where the per-volume logs of unflushed changes live (see
    /// `unflushed.rs`); best a tmpfs. `None`: the pool's `journal/`.
    pub unflushed_dir: Option<PathBuf>,
    /// Background merges and flattens.
    pub jobs: JobConfig,
    /// The filesystem: the real one, or a test's (`io::fault`).
    pub fs: Arc<dyn Fs>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            create: true,
            sync: true,
            max_open_files: 0,
            journal_checkpoint_bytes: 4 << 20,
            sync_log_bytes: 256 << 10,
            reserve_bytes: None,
            unflushed_dir: None,
            jobs: JobConfig::default(),
            fs: RealFs::shared(),
        }
    }
}

impl PoolOptions {
    pub(crate) fn journal(&self) -> JournalOpts {
        JournalOpts {
            sync: self.sync,
            prealloc: (self.journal_checkpoint_bytes / 4).clamp(4096, 1 << 20),
        }
    }
}

/// The frozen layer a new volume is cloned from.
struct CloneSource {
    /// The snapshot that must still be there (none for an implicit one).
    snapshot: Option<SnapshotId>,
    layer: LayerId,
    view: Arc<View>,
}

/// What a volume looks like from the outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub size_bytes: u64,
    /// Layers in its chain, top included.
    pub chain_depth: usize,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_ns: u64,
}

/// Space of the filesystem that holds the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpace {
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// Kept free for metadata; data writes stop when free space reaches it.
    pub reserved_bytes: u64,
}

/// What a snapshot looks like from the outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    /// The volume it was taken from (which may since have been deleted).
    pub volume: VolumeId,
    /// The volume's size when the snapshot was taken.
    pub size_bytes: u64,
    pub created_unix_ns: u64,
}

impl From<&SnapshotRecord> for SnapshotInfo {
    fn from(r: &SnapshotRecord) -> Self {
        SnapshotInfo {
            id: r.id,
            volume: r.volume,
            size_bytes: r.size,
            created_unix_ns: r.created_ns,
        }
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What volumes and snapshot readers share with the pool.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) fs: Arc<dyn Fs>,
    /// Where unflushed logs live.
    unflushed_dir: PathBuf,
    pub(crate) catalog: Catalog,
    pub(crate) opts: PoolOptions,
    pub(crate) space: SpaceGuard,
    fds: Arc<FdCache>,
    layers: Mutex<HashMap<LayerId, Weak<Layer>>>,
    views: Mutex<HashMap<LayerId, Weak<View>>>,
    /// Held by everything that changes which layers chains use and which
    /// views can be extended (snapshot, clone, delete, the switch of a
    /// merge), so that a merge never frees a slot some view still names.
    pub(crate) shape: Mutex<()>,
    _lock: Box<dyn Any + Send + Sync>,
}

impl Shared {
    /// The one handle of a layer.
    pub(crate) fn layer(&self, id: LayerId, slot: u16) -> Arc<Layer> {
        let mut map = self.layers.lock().expect("layer registry");
        if let Some(l) = map.get(&id).and_then(Weak::upgrade) {
            return l;
        }
        if map.len() > 1024 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let l = Arc::new(Layer::new(
            Arc::clone(&self.fs),
            &self.dir,
            id,
            slot,
            Arc::clone(&self.fds),
        ));
        map.insert(id, Arc::downgrade(&l));
        l
    }

    /// Remembers `view` as the view "as of" frozen layer `layer`.
    pub(crate) fn remember_view(&self, layer: LayerId, view: &Arc<View>) {
        let mut map = self.views.lock().expect("view cache");
        if map.len() > 1024 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        map.insert(layer, Arc::downgrade(view));
    }

    fn cached_view(&self, layer: LayerId) -> Option<Arc<View>> {
        self.views
            .lock()
            .expect("view cache")
            .get(&layer)
            .and_then(Weak::upgrade)
    }

    /// The view of the chain up to and including frozen layer `layer`:
    /// from the cache if some volume, clone or reader still holds it,
    /// otherwise built from the nearest cached ancestor (or from nothing)
    /// by applying the presence maps of the layers above it.
    pub(crate) fn view_of(&self, layer: LayerId) -> Result<Arc<View>> {
        if let Some(v) = self.cached_view(layer) {
            return Ok(v);
        }
        let txn = self.catalog.read()?;
        let chain = txn.chain(layer)?;
        let mut from = 0;
        let mut view = View::empty(0);
        for i in (0..chain.len().saturating_sub(1)).rev() {
            if let Some(v) = self.cached_view(chain[i].id) {
                view = (*v).clone();
                from = i + 1;
                break;
            }
        }
        for rec in &chain[from..] {
            self.apply_layer(&txn, &mut view, rec)?;
        }
        let view = Arc::new(view);
        self.remember_view(layer, &view);
        Ok(view)
    }

    /// [`view::allocation_depth`] of `view`, the view of the chain under
    /// (and including) `top`. The caller holds the shape lock.
    pub(crate) fn allocation_depth(
        &self,
        view: &View,
        top: LayerId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<DepthExtent>> {
        let mut chain = self.catalog.read()?.chain(top)?;
        chain.reverse();
        view::allocation_depth(view, &chain, |layer| self.view_of(layer), offset, len)
    }

    /// Stacks one layer (handle and presence) on top of `view`.
    fn apply_layer(
        &self,
        txn: &super::catalog::ReadTxn,
        view: &mut View,
        rec: &LayerRecord,
    ) -> Result<()> {
        view.index.grow(blocks_for(rec.size));
        view.add_layer(self.layer(rec.id, rec.slot));
        for (chunk, runs) in txn.presence(rec.id)? {
            view.apply(rec.slot, chunk, &runs);
        }
        Ok(())
    }

    /// Forgets every cached view that names `layer` (a merge removed it
    /// from the chains): views built from now on come from the catalog.
    pub(crate) fn purge_views_holding(&self, layer: &Arc<Layer>) {
        self.views
            .lock()
            .expect("view cache")
            .retain(|_, w| w.upgrade().is_some_and(|v| !v.holds(layer)));
    }

    /// Deletes the files of layers the catalog no longer has; a layer still
    /// read through an open handle goes when its last handle does.
    pub(crate) fn discard_layers(&self, freed: &[LayerId]) {
        let map = self.layers.lock().expect("layer registry");
        for id in freed {
            match map.get(id).and_then(Weak::upgrade) {
                Some(layer) => layer.mark_removed(),
                None => remove_quietly(&*self.fs, &layer_path(&self.dir, *id)),
            }
        }
    }

    /// Opens a volume's journal and unflushed log, folds into the catalog
    /// the journal batches it lacks and the changes a previous process of
    /// this boot acknowledged but never flushed (their data is in the page
    /// cache of the layer files: synced first), and returns both ready for
    /// use. Logged data is made durable in the layer files first (written
    /// back after a power cut, synced after a process crash; see
    /// `journal.rs`). The unflushed log is emptied only once its records
    /// are durable in the catalog: a failure before that leaves them for
    /// the next try. Changes beyond saving are recorded in the catalog (a
    /// fault the next flush reports), so no restart can forget them.
    fn recover_journal(&self, rec: &VolumeRecord) -> Result<(JournalFile, UnflushedLog)> {
        let jopts = self.opts.journal();
        let (mut log, leftover) =
            UnflushedLog::open(&self.fs, &self.unflushed_dir, rec.id, &self.dir)?;
        let mut lost = leftover.incomplete;
        let journal_exists = self
            .fs
            .entry(&journal_path(&self.dir, rec.id))
            .map_err(|e| io_error("look for the journal of", &self.dir, e))?
            .is_some();
        let (file, mut records) = if journal_exists {
            let (file, replay) = JournalFile::open(&self.fs, &self.dir, rec.id, jopts)?;
            if replay.truncated_bytes > 0 {
                tracing::info!(volume = %rec.id, bytes = replay.truncated_bytes, "cut a torn journal tail (writes that were never flushed)");
            }
            self.restore_logged(rec.id, &replay)?;
            let records: Vec<Record> = replay
                .batches
                .into_iter()
                .filter(|b| b.seq > rec.journal_seq)
                .flat_map(|b| b.records)
                .collect();
            (file, records)
        } else {
            (
                JournalFile::create(&self.fs, &self.dir, rec.id, rec.journal_seq, jopts)?,
                Vec::new(),
            )
        };
        // A fetching volume whose write-back failed: the blocks its
        // unflushed changes made data (copies, kept reads, and writes to
        // blocks it had not fetched) stay absent, and are fetched again
        // from the source (whose copy is whole) rather than kept as what
        // the failed write-back left on disk (see `Volume::refetch_lost`;
        // such a write is lost either way, and reads as the source's).
        let refetch = {
            let txn = self.catalog.read()?;
            txn.fault(rec.id)?
                .is_some_and(|f| f.kind == FaultKind::DataLost)
                && txn.backing(rec.id)?.is_some()
        };
        let (mut saved, mut dropped, mut refetched) = (Vec::new(), 0usize, 0usize);
        for r in leftover.records {
            // Only the top can have had unflushed changes.
            if r.layer != rec.top {
                dropped += 1;
            } else if refetch && r.state == BlockState::Data {
                refetched += 1;
            } else {
                saved.push(r);
            }
        }
        if refetched > 0 {
            tracing::warn!(volume = %rec.id, changes = refetched, "a fetching volume lost a write-back: the blocks its unflushed changes made data stay absent and are fetched again (writes among them are lost)");
        }
        if dropped > 0 {
            tracing::warn!(volume = %rec.id, dropped, "unflushed changes of a layer that is not the top were dropped");
            lost = true;
        }
        if !saved.is_empty() {
            tracing::info!(volume = %rec.id, changes = saved.len(), "making writes acknowledged by the previous process durable");
            if self.opts.sync
                && let Err(e) = self.layer_file(rec.top)?.sync_data()
            {
                // Their pages may now be marked clean without having
                // been written: nothing can make them durable.
                let why = format!("recovery could not write back its writes: {e}");
                self.record_fault(rec.id, FaultKind::DataLost, &why)?;
                saved.clear();
            }
            records.extend(saved);
        }
        if lost {
            self.record_fault(
                rec.id,
                FaultKind::UnflushedLost,
                "writes acknowledged by the previous process were beyond saving",
            )?;
        }
        if records.is_empty() && file.is_empty() && !file.is_old() {
            log.start(rec.id);
            return Ok((file, log));
        }
        let mut seq = file.last_seq();
        if !records.is_empty() {
            let mut txn = self.catalog.write()?;
            txn.apply_presence(&records)?;
            let mut updated = txn.volume(rec.id)?.ok_or(Error::VolumeNotFound(rec.id))?;
            updated.journal_seq = seq;
            txn.put_volume(&updated)?;
            txn.commit()?;
        }
        seq = seq.max(rec.journal_seq);
        log.start(rec.id);
        let file = JournalFile::create(&self.fs, &self.dir, rec.id, seq, jopts)?;
        Ok((file, log))
    }

    fn layer_file(&self, layer: LayerId) -> Result<super::io::File> {
        let path = layer_path(&self.dir, layer);
        self.fs
            .open(&path, Open::ReadWrite)
            .map_err(|e| io_error("open", &path, e))
    }

    /// Makes the data a journal logged durable in the layer files: writes
    /// back the newest logged version of each block the page cache may
    /// lack (all of them after a power cut or a remount, and after a
    /// failed write-back, when the page cache is not to be trusted), then
    /// syncs the files that hold logged data. Layers the catalog no longer
    /// has (their files are gone) are skipped; a layer of another family,
    /// or a block past a layer's end, is corruption. A failed write fails
    /// the open (the journal still has the data for the next try). A
    /// failed sync marks the pages it could not write clean (fsyncgate):
    /// every logged block is written again and synced once more, which
    /// keeps the flushed data but may undo overwrites acknowledged after
    /// the last flush (reported as lost unflushed writes); a second
    /// failure is a data loss.
    fn restore_logged(&self, volume: VolumeId, replay: &super::journal::Replay) -> Result<()> {
        // Every block's newest version, and those this page cache lacks.
        let all = replay.restore([0; 16]);
        if all.sync.is_empty() {
            return Ok(());
        }
        let cached = replay.restore(self.fs.page_cache_id(&self.dir));
        let (distrust, layers) = {
            let txn = self.catalog.read()?;
            let distrust = txn
                .fault(volume)?
                .is_some_and(|f| f.kind == FaultKind::DataLost);
            let family = match txn.volume(volume)? {
                Some(v) => txn.layer(v.top)?.map(|l| l.family),
                None => None,
            };
            let mut layers = Vec::new();
            for &id in &all.sync {
                let Some(l) = txn.layer(id)? else { continue };
                if Some(l.family) != family {
                    return Err(Error::Corrupt(format!(
                        "journal of volume {volume} logged data for layer {id} of another family"
                    )));
                }
                layers.push(l);
            }
            (distrust, layers)
        };
        let writes = if distrust {
            &all.writes
        } else {
            &cached.writes
        };
        if !writes.is_empty() {
            tracing::info!(%volume, blocks = writes.len(), "writing back data the journal logged (the page cache that held it is gone)");
        }
        for layer in layers {
            let path = layer_path(&self.dir, layer.id);
            let file = self.layer_file(layer.id)?;
            let write_back = |writes: &[(LayerId, u64, &[u8])]| -> Result<()> {
                for (_, block, data) in writes.iter().filter(|w| w.0 == layer.id) {
                    let offset = block
                        .checked_mul(BLOCK_SIZE)
                        .filter(|o| *o < layer.size)
                        .ok_or_else(|| {
                            Error::Corrupt(format!(
                                "journal of volume {volume} logged block {block} past the end of layer {}",
                                layer.id
                            ))
                        })?;
                    file.write_all_at(data, offset)
                        .map_err(|e| io_error("write back logged data to", &path, e))?;
                }
                Ok(())
            };
            write_back(writes)?;
            if !self.opts.sync {
                continue;
            }
            if let Err(first) = file.sync_data() {
                write_back(&all.writes)?;
                let (kind, why) = match file.sync_data() {
                    Ok(()) => (
                        FaultKind::UnflushedLost,
                        format!(
                            "recovery rewrote the data its journal logged after a failed write-back ({first}); writes acknowledged after the last flush may be lost"
                        ),
                    ),
                    Err(e) => (
                        FaultKind::DataLost,
                        format!("recovery could not write back the data its journal logged: {e}"),
                    ),
                };
                self.record_fault(volume, kind, &why)?;
            }
        }
        Ok(())
    }

    /// Writes (or with `None`, removes) the fault record of `volume`.
    pub(crate) fn put_fault(&self, volume: VolumeId, fault: Option<&FaultRecord>) -> Result<()> {
        let mut txn = self.catalog.write()?;
        match fault {
            Some(f) => txn.put_fault(volume, f)?,
            None => txn.remove_fault(volume)?,
        }
        txn.commit()
    }

    /// Removes `volume`'s fault record if it is of `kind` (a flush that
    /// ends a reported unflushed loss leaves a data loss recorded meanwhile
    /// by a failing flush in place).
    pub(crate) fn remove_fault_of(&self, volume: VolumeId, kind: FaultKind) -> Result<()> {
        let mut txn = self.catalog.write()?;
        if txn.fault(volume)?.is_some_and(|f| f.kind == kind) {
            txn.remove_fault(volume)?;
            txn.commit()?;
        }
        Ok(())
    }

    /// Records a fault of `volume` in the catalog (replacing a milder one).
    pub(crate) fn record_fault(&self, volume: VolumeId, kind: FaultKind, why: &str) -> Result<()> {
        let mut txn = self.catalog.write()?;
        if txn
            .fault(volume)?
            .is_some_and(|f| f.kind == FaultKind::DataLost)
        {
            return Ok(());
        }
        txn.put_fault(
            volume,
            &FaultRecord {
                kind,
                since_ns: now_ns(),
                message: why.to_string(),
            },
        )?;
        txn.commit()
    }
}

#[derive(Debug)]
pub(crate) struct PoolInner {
    shared: Arc<Shared>,
    volumes: Mutex<HashMap<VolumeId, Arc<Volume>>>,
    /// Serialises the slow path of opening a volume.
    opening: Mutex<()>,
    /// Volume IDs a create is working on: a second create of the same ID
    /// (a retried CreateVolume) waits for the first, then finds it.
    creating: Mutex<HashSet<VolumeId>>,
    created: std::sync::Condvar,
    pub(crate) jobs: Arc<Jobs>,
    /// Group snapshots' holds of writes (see `group.rs`).
    pub(crate) groups: super::group::Holds,
}

/// A storage pool. Cheap to clone; all clones are the same pool. When the
/// last clone goes, jobs stop (at their next piece), every volume is
/// flushed and its journal folded.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Shared by the clones users hold (not by the job threads' handles):
    /// when the last goes, the jobs are stopped and joined. (Declared
    /// first: dropped before `inner`.)
    _user: Option<Arc<UserHandles>>,
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct UserHandles(Weak<PoolInner>);

/// The right to create volume `id`; see [`PoolInner::creating`].
struct Claim<'a> {
    inner: &'a PoolInner,
    id: VolumeId,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.inner
            .creating
            .lock()
            .expect("creating")
            .remove(&self.id);
        self.inner.created.notify_all();
    }
}

impl Drop for UserHandles {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.jobs.shutdown();
        }
    }
}

impl Pool {
    /// Opens (or with `opts.create`, creates) the pool in `dir`: takes the
    /// pool lock, checks the format, folds every journal into the catalog,
    /// and removes files a crash left behind. Volumes are loaded lazily, on
    /// first use.
    pub fn open(dir: &Path, opts: PoolOptions) -> Result<Pool> {
        let fs = Arc::clone(&opts.fs);
        let is_dir = |p: &Path| -> Result<bool> {
            Ok(fs.entry(p).map_err(|e| io_error("open pool", p, e))? == Some(Entry::Dir))
        };
        let complete = is_dir(&dir.join(LAYERS_DIR))? && is_dir(&dir.join(JOURNAL_DIR))?;
        if !complete && !opts.create {
            return Err(Error::NotAPool {
                path: dir.into(),
                why: "missing layers/ or journal/".into(),
            });
        }
        if !complete {
            create_dirs(&*fs, dir, opts.sync)?;
        }
        let lock = lock_pool(&*fs, dir)?;
        let catalog = Catalog::open(&fs, dir, opts.create, opts.sync)?;
        let nofile = sys::raise_nofile_limit().unwrap_or(1024);
        let max_open = match opts.max_open_files {
            0 => (nofile / 2).clamp(64, 65_536) as usize,
            n => n,
        };
        let unflushed_dir = opts
            .unflushed_dir
            .clone()
            .unwrap_or_else(|| unflushed::default_dir(dir));
        fs.create_dir_all(&unflushed_dir)
            .map_err(|e| io_error("create", &unflushed_dir, e))?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            space: SpaceGuard::new(Arc::clone(&fs), dir, opts.reserve_bytes)?,
            fs,
            unflushed_dir,
            catalog,
            fds: FdCache::new(max_open),
            layers: Mutex::new(HashMap::new()),
            views: Mutex::new(HashMap::new()),
            shape: Mutex::new(()),
            opts,
            _lock: lock,
        });
        for rec in shared.catalog.read()?.volumes()? {
            shared.recover_journal(&rec)?;
        }
        sweep_orphans(&shared)?;
        let jobs = Arc::new(Jobs::new(shared.opts.jobs.clone()));
        let inner = Arc::new(PoolInner {
            shared,
            volumes: Mutex::new(HashMap::new()),
            opening: Mutex::new(()),
            creating: Mutex::new(HashSet::new()),
            created: std::sync::Condvar::new(),
            jobs,
            groups: Default::default(),
        });
        let pool = Pool {
            _user: Some(Arc::new(UserHandles(Arc::downgrade(&inner)))),
            inner,
        };
        pool.requeue_jobs()?;
        if pool.shared().opts.jobs.background {
            Jobs::start(&pool.inner);
        }
        Ok(pool)
    }

    /// A handle for the job threads (it does not keep jobs running).
    pub(crate) fn internal(inner: Arc<PoolInner>) -> Pool {
        Pool { inner, _user: None }
    }

    pub(crate) fn inner(&self) -> &Arc<PoolInner> {
        &self.inner
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// Every volume loaded in memory.
    pub(crate) fn loaded_volumes(&self) -> Vec<Arc<Volume>> {
        self.inner
            .volumes
            .lock()
            .expect("volume map")
            .values()
            .cloned()
            .collect()
    }

    /// Folds the journal of every loaded volume into the catalog: the
    /// presence of layers frozen since a volume's last checkpoint may be
    /// only in its journal, and jobs plan from the catalog.
    pub(crate) fn checkpoint_loaded(&self) -> Result<()> {
        self.each_loaded(Volume::flush_and_checkpoint)
    }

    /// Makes the presence of every frozen layer complete in the catalog
    /// (what jobs on frozen layers plan from), checkpointing only the
    /// loaded volumes that froze a layer since their last checkpoint
    /// ([`Volume::checkpoint_frozen`]). Under the shape lock: a freeze
    /// commits its layer as frozen before its volume records the frozen
    /// view, and must not be seen half done.
    pub(crate) fn checkpoint_frozen(&self) -> Result<()> {
        let _shape = self.shared().shape.lock().expect("shape lock");
        self.each_loaded(Volume::checkpoint_frozen)
    }

    fn each_loaded(&self, f: impl Fn(&Volume) -> Result<()>) -> Result<()> {
        for v in self.loaded_volumes() {
            match f(&v) {
                Ok(()) | Err(Error::VolumeNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// At open: jobs a crash interrupted are queued again, and every layer
    /// nothing needs on its own (a deleted snapshot's, whose fold never
    /// got queued or finished) gets a fold.
    fn requeue_jobs(&self) -> Result<()> {
        let sh = self.shared();
        let (jobs, foldable) = {
            let txn = sh.catalog.read()?;
            let mut foldable = Vec::new();
            for l in txn.layers()? {
                if l.snapshot.is_some() && jobs::plan_foldable(&txn, &l)? {
                    foldable.push(l.id);
                }
            }
            (txn.jobs()?, foldable)
        };
        let interrupted: Vec<_> = jobs
            .iter()
            .filter(|j| j.state == JobState::Running)
            .collect();
        if !interrupted.is_empty() {
            let mut txn = sh.catalog.write()?;
            for j in interrupted {
                let mut j = j.clone();
                j.state = JobState::Queued;
                txn.put_job(&j)?;
            }
            txn.commit()?;
        }
        for l in foldable {
            self.enqueue(JobKind::Fold, l.0, 0, JobReason::SnapshotDeleted)?;
        }
        Ok(())
    }

    /// The chain depth past which a merge of `volume` is queued.
    pub fn max_chain_depth(&self, volume: VolumeId) -> Result<u32> {
        let p = self.shared().catalog.read()?.policy(volume)?;
        Ok(match p.max_chain_depth {
            0 => self.shared().opts.jobs.default_max_chain_depth,
            d => d,
        })
    }

    /// Sets `volume`'s merge policy and I/O limits (the limits apply at
    /// once, to the volume in use too).
    pub fn set_policy(&self, volume: VolumeId, policy: VolumePolicy) -> Result<()> {
        policy.limits.check().map_err(Error::InvalidLimits)?;
        // A volume loading meanwhile reads the new policy, or is in the
        // map when it is applied below.
        let _opening = self.inner.opening.lock().expect("volume open lock");
        let mut txn = self.shared().catalog.write()?;
        if txn.volume(volume)?.is_none() {
            return Err(Error::VolumeNotFound(volume));
        }
        txn.put_policy(volume, &policy)?;
        txn.commit()?;
        // A volume not loaded takes them from the record when it loads.
        if let Some(v) = self.inner.volumes.lock().expect("volume map").get(&volume) {
            v.set_limits(policy.limits);
        }
        Ok(())
    }

    /// `volume`'s merge policy and I/O limits.
    pub fn policy(&self, volume: VolumeId) -> Result<VolumePolicy> {
        let txn = self.shared().catalog.read()?;
        if txn.volume(volume)?.is_none() {
            return Err(Error::VolumeNotFound(volume));
        }
        txn.policy(volume)
    }

    /// Who may reach `volume` from another node (see [`Attachment`]).
    pub fn attachment(&self, volume: VolumeId) -> Result<Attachment> {
        let read = self.shared().catalog.read()?;
        if read.volume(volume)?.is_none() {
            return Err(Error::VolumeNotFound(volume));
        }
        Ok(read.attachment(volume)?.unwrap_or_default())
    }

    /// Records durably who may reach `volume` from another node.
    /// A volume open in this process is retired or made usable again to
    /// match (see [`Volume::retire`]).
    pub fn set_attachment(&self, volume: VolumeId, a: &Attachment) -> Result<()> {
        let mut txn = self.shared().catalog.write()?;
        if txn.volume(volume)?.is_none() {
            return Err(Error::VolumeNotFound(volume));
        }
        txn.put_attachment(volume, a)?;
        txn.commit()?;
        let open = self
            .inner
            .volumes
            .lock()
            .expect("volume map")
            .get(&volume)
            .cloned();
        if let Some(vol) = open {
            if a.moved && a.live {
                vol.retire(&a.node);
            } else {
                vol.unretire();
            }
        }
        Ok(())
    }

    /// Creates an empty volume of `size_bytes` (whole 4 KiB blocks) with a
    /// new random ID.
    pub fn create_volume(&self, size_bytes: u64) -> Result<VolumeInfo> {
        self.create_volume_as(VolumeId::new_random(), size_bytes)
    }

    /// Creates an empty volume with the given ID (`AlreadyExists` if the
    /// ID is taken), so a caller can record the ID before creating and
    /// finish an interrupted create idempotently.
    pub fn create_volume_as(&self, vid: VolumeId, size_bytes: u64) -> Result<VolumeInfo> {
        check_volume_size(size_bytes)?;
        let _claim = self.claim(vid)?;
        self.new_volume(vid, size_bytes, None, None)
    }

    /// Creates an empty *fetching* volume (see [`Volume`]'s docs): one
    /// whose contents arrive from another node. `record` (opaque here)
    /// says where from; it is committed with the volume, so a restarted
    /// process knows the volume fetches before it serves a read. Reads of
    /// blocks not yet copied fail until [`Volume::connect_backing`].
    pub fn create_fetching_volume(
        &self,
        vid: VolumeId,
        size_bytes: u64,
        record: &[u8],
    ) -> Result<VolumeInfo> {
        check_volume_size(size_bytes)?;
        let _claim = self.claim(vid)?;
        self.new_volume(vid, size_bytes, None, Some(record))
    }

    /// Replaces a fetching volume's record (its source moved); NotFound if
    /// the volume does not fetch.
    pub fn set_fetch_record(&self, vid: VolumeId, record: &[u8]) -> Result<()> {
        let mut txn = self.shared().catalog.write()?;
        if txn.backing(vid)?.is_none() {
            return Err(Error::VolumeNotFound(vid));
        }
        txn.put_backing(vid, record)?;
        txn.commit()
    }

    /// Takes `bytes` for a copy between nodes from this node's byte budget
    /// for background copies (`JobConfig::node_bytes_per_sec`, which merges
    /// draw on too): how long the caller must wait before it uses them.
    pub fn charge_node_budget(&self, bytes: u64) -> Duration {
        self.inner.jobs.node_bucket.charge(bytes)
    }

    /// Fetching volumes and their records.
    pub fn fetching_volumes(&self) -> Result<Vec<(VolumeId, Vec<u8>)>> {
        self.shared().catalog.read()?.backings()
    }

    /// Ends the fetching of `vol` once every block its backing holds data
    /// for was copied in ([`Volume::fill`], which the caller ran over the
    /// backing's data): the copy is made durable, then the record goes,
    /// and absent blocks read as zeros again. `walked`: the volume's
    /// [`Volume::refetches`] when the caller's fill began; refused if it
    /// changed since (blocks were made absent again: the fill walks
    /// again). Refused while no backing is connected (nothing can have
    /// been filled), and for a volume that is no longer the pool's
    /// (deleted, or made again under its ID).
    pub fn finish_fetch(&self, vol: &Arc<Volume>, walked: u64) -> Result<()> {
        let vid = vol.id();
        if !Arc::ptr_eq(&self.volume(vid)?, vol) {
            return Err(Error::VolumeNotFound(vid));
        }
        if !vol.fetching() {
            return Ok(());
        }
        if !vol.backing_connected() {
            return Err(Error::Fetching {
                volume: vid,
                why: "its source is not connected: nothing was filled".into(),
            });
        }
        vol.flush()?;
        // Under the fetch lock, which `Volume::refetch_lost` holds while
        // it makes blocks absent again.
        vol.end_fetch(walked, || {
            let mut txn = self.shared().catalog.write()?;
            txn.remove_backing(vid)?;
            txn.commit()
        })
    }

    /// Claims the creation of `vid` (waiting while another create of it
    /// runs); `AlreadyExists` if it exists. Files named after `vid` (its
    /// journal, its unflushed log) are touched only under a claim, so two
    /// creates of one ID never clobber each other's files or the live
    /// volume's.
    fn claim(&self, vid: VolumeId) -> Result<Claim<'_>> {
        let inner = &*self.inner;
        let mut creating = inner.creating.lock().expect("creating");
        while creating.contains(&vid) {
            creating = inner.created.wait(creating).expect("creating");
        }
        creating.insert(vid);
        drop(creating);
        let claim = Claim { inner, id: vid };
        if self.shared().catalog.read()?.volume(vid)?.is_some() {
            return Err(Error::AlreadyExists(format!("volume {vid}")));
        }
        Ok(claim)
    }

    /// Creates volume `vid` of `size` bytes: a new writable top layer, in a
    /// new family (an empty volume) or over the frozen layer of a snapshot
    /// whose view is given (a clone). Files first, then one catalog
    /// transaction; the files are removed if it fails. The caller holds
    /// the claim of `vid`.
    fn new_volume(
        &self,
        vid: VolumeId,
        size: u64,
        source: Option<CloneSource>,
        backing: Option<&[u8]>,
    ) -> Result<VolumeInfo> {
        let sh = self.shared();
        let (lid, created) = (LayerId::new_random(), now_ns());
        create_layer_file(&*sh.fs, &sh.dir, lid, size, sh.opts.sync)?;
        let committed =
            JournalFile::create(&sh.fs, &sh.dir, vid, 0, sh.opts.journal()).and_then(|journal| {
                let (mut log, _) = UnflushedLog::open(&sh.fs, &sh.unflushed_dir, vid, &sh.dir)?;
                log.start(vid);
                let mut txn = sh.catalog.write()?;
                if txn.volume(vid)?.is_some() {
                    return Err(Error::AlreadyExists(format!("volume {vid}")));
                }
                let (family, parent) = match &source {
                    None => (txn.new_family()?, None),
                    Some(src) => {
                        // Re-check inside the transaction: the snapshot may have gone.
                        if let Some(snap) = src.snapshot
                            && !txn
                                .snapshot(snap)?
                                .is_some_and(|r| r.state == SnapshotState::Ready)
                        {
                            return Err(Error::SnapshotNotFound(snap));
                        }
                        let parent = txn.retain_layer(src.layer)?;
                        (parent.family, Some(parent.id))
                    }
                };
                let slot = txn.alloc_slot(family)?;
                txn.put_layer(&LayerRecord {
                    id: lid,
                    family,
                    slot,
                    parent,
                    frozen: false,
                    size,
                    refs: 1,
                    snapshot: None,
                    created_ns: created,
                })?;
                txn.put_volume(&VolumeRecord {
                    id: vid,
                    size,
                    top: lid,
                    owner_epoch: 1,
                    created_ns: created,
                    journal_seq: 0,
                })?;
                if let Some(b) = backing {
                    txn.put_backing(vid, b)?;
                }
                txn.commit()?;
                Ok((slot, journal, log))
            });
        let (slot, journal, log) = match committed {
            Ok(x) => x,
            Err(e) => {
                // After a failed commit the volume may exist after all:
                // its files stay, for the next open to use or sweep.
                if !sh.catalog.failed() {
                    remove_quietly(&*sh.fs, &layer_path(&sh.dir, lid));
                    remove_quietly(&*sh.fs, &journal_path(&sh.dir, vid));
                    remove_quietly(&*sh.fs, &unflushed_path(&sh.unflushed_dir, vid));
                }
                return Err(e);
            }
        };
        let top = sh.layer(lid, slot);
        let base = source.map_or_else(|| Arc::new(View::empty(0)), |src| src.view);
        let mut view = (*base).clone();
        view.index.grow(blocks_for(size));
        view.add_layer(Arc::clone(&top));
        let info = VolumeInfo {
            id: vid,
            size_bytes: size,
            chain_depth: view.depth(),
            created_unix_ns: created,
        };
        let vol = Volume::new(
            vid,
            Arc::clone(sh),
            VolState::new(view, base, top),
            size,
            (journal, log),
            None,
        );
        if backing.is_some() {
            vol.set_fetch(Some(Fetch::Waiting));
        }
        self.inner
            .volumes
            .lock()
            .expect("volume map")
            .insert(vid, Arc::new(vol));
        Ok(info)
    }

    /// The volume `id`, loading it on first use.
    pub fn volume(&self, id: VolumeId) -> Result<Arc<Volume>> {
        if let Some(v) = self.inner.volumes.lock().expect("volume map").get(&id) {
            return Ok(Arc::clone(v));
        }
        let _opening = self.inner.opening.lock().expect("volume open lock");
        if let Some(v) = self.inner.volumes.lock().expect("volume map").get(&id) {
            return Ok(Arc::clone(v));
        }
        let vol = Arc::new(self.load_volume(id)?);
        self.inner
            .volumes
            .lock()
            .expect("volume map")
            .insert(id, Arc::clone(&vol));
        Ok(vol)
    }

    fn load_volume(&self, id: VolumeId) -> Result<Volume> {
        let sh = self.shared();
        // A merge's switch must see every view that names the layers it
        // removes: none may be built from the catalog meanwhile.
        let _shape = sh.shape.lock().expect("shape lock");
        let rec = sh
            .catalog
            .read()?
            .volume(id)?
            .ok_or(Error::VolumeNotFound(id))?;
        let journal = sh.recover_journal(&rec)?;
        let rec = sh
            .catalog
            .read()?
            .volume(id)?
            .ok_or(Error::VolumeNotFound(id))?;
        let txn = sh.catalog.read()?;
        let top = txn.layer(rec.top)?.ok_or_else(|| {
            Error::Corrupt(format!("top layer {} of volume {id} is missing", rec.top))
        })?;
        let base = match top.parent {
            Some(parent) => sh.view_of(parent)?,
            None => Arc::new(View::empty(0)),
        };
        let path = layer_path(&sh.dir, top.id);
        if sh
            .fs
            .entry(&path)
            .map_err(|e| io_error("look for", &path, e))?
            != Some(Entry::File)
        {
            return Err(Error::Corrupt(format!(
                "data file of layer {} (volume {id}) is missing",
                top.id
            )));
        }
        let mut view = (*base).clone();
        sh.apply_layer(&txn, &mut view, &top)?;
        view.index.grow(blocks_for(rec.size));
        let top = sh.layer(top.id, top.slot);
        let mut state = VolState::new(view, base, top);
        state.release_costly_base();
        let fault = txn.fault(id)?;
        let limits = txn.policy(id)?.limits;
        let vol = Volume::new(id, Arc::clone(sh), state, rec.size, journal, fault);
        vol.set_limits(limits);
        if txn.backing(id)?.is_some() {
            vol.set_fetch(Some(Fetch::Waiting));
        }
        // A copy a live move left behind serves nothing, also after a
        // restart (its staged attachment waits to follow the new owner).
        if let Some(a) = txn.attachment(id)?
            && a.moved
            && a.live
        {
            vol.retire(&a.node);
        }
        Ok(vol)
    }

    /// Deletes a volume. Its snapshots and clones stay readable: layers
    /// they share live on until nothing references them.
    pub fn delete_volume(&self, id: VolumeId) -> Result<()> {
        let vol = self.volume(id)?;
        let _shape = self.shared().shape.lock().expect("shape lock");
        vol.mark_deleted();
        let _gate = vol.gate.write().expect("volume gate");
        {
            // Frozen layers' presence may still be only in this journal.
            let mut journal = vol.journal.lock().expect("journal");
            vol.checkpoint_locked(&mut journal, true)?;
        }
        let sh = self.shared();
        let mut txn = sh.catalog.write()?;
        let rec = txn.volume(id)?.ok_or(Error::VolumeNotFound(id))?;
        txn.remove_volume(id)?;
        txn.remove_policy(id)?;
        txn.remove_fault(id)?;
        txn.remove_attachment(id)?;
        txn.remove_backing(id)?;
        let freed = txn.release_layer(rec.top)?;
        txn.commit()?;
        self.inner.volumes.lock().expect("volume map").remove(&id);
        remove_quietly(&*sh.fs, &journal_path(&sh.dir, id));
        remove_quietly(&*sh.fs, &unflushed_path(&sh.unflushed_dir, id));
        sh.discard_layers(&freed);
        Ok(())
    }

    /// What the catalog records as lost of volume `id`'s data, if
    /// anything (for its condition).
    pub fn volume_fault(&self, id: VolumeId) -> Result<Option<String>> {
        Ok(self.shared().catalog.read()?.fault(id)?.map(|f| f.message))
    }

    /// Volumes whose data a failure lost and no operator has acknowledged
    /// yet, with what happened.
    pub fn faults(&self) -> Result<Vec<(VolumeId, String)>> {
        Ok(self
            .shared()
            .catalog
            .read()?
            .faults()?
            .into_iter()
            .filter(|(_, f)| f.kind == FaultKind::DataLost)
            .map(|(v, f)| (v, f.message))
            .collect())
    }

    /// An operator has looked at volume `id` after a data loss
    /// ([`Error::DataLost`]): writes and flushes work again. What the
    /// failed write-back lost stays lost.
    pub fn acknowledge_loss(&self, id: VolumeId) -> Result<()> {
        let vol = self.volume(id)?;
        vol.acknowledge(|| self.shared().put_fault(id, None))?;
        tracing::warn!(volume = %id, "data loss acknowledged; the volume takes writes again");
        Ok(())
    }

    /// Grows a volume. Shrinking is refused.
    pub fn resize_volume(&self, id: VolumeId, size_bytes: u64) -> Result<VolumeInfo> {
        check_volume_size(size_bytes)?;
        let vol = self.volume(id)?;
        let _gate = vol.gate.write().expect("volume gate");
        vol.check_live()?;
        let (current, top) = {
            let st = vol.state.read().expect("volume state");
            (vol.size(), Arc::clone(&st.top))
        };
        if size_bytes < current {
            return Err(Error::ShrinkRefused {
                from: current,
                to: size_bytes,
            });
        }
        if size_bytes > current {
            top.set_len(size_bytes)?;
            let mut txn = self.shared().catalog.write()?;
            let mut rec = txn.volume(id)?.ok_or(Error::VolumeNotFound(id))?;
            let mut layer = txn.layer_required(rec.top)?;
            rec.size = size_bytes;
            layer.size = size_bytes;
            txn.put_volume(&rec)?;
            txn.put_layer(&layer)?;
            txn.commit()?;
            vol.grow(size_bytes);
        }
        self.volume_info(id)
    }

    /// Takes a snapshot: everything acknowledged before the call, frozen.
    /// Costs one flush of what changed since the last flush, one new
    /// (empty) layer file and one catalog commit; it does not depend on the
    /// volume's size or on how much was written.
    pub fn create_snapshot(&self, volume: VolumeId) -> Result<SnapshotInfo> {
        self.create_snapshot_as(volume, SnapshotId::new_random())
    }

    /// [`Pool::create_snapshot`] with the given snapshot ID
    /// (`AlreadyExists` if taken).
    pub fn create_snapshot_as(&self, volume: VolumeId, snap: SnapshotId) -> Result<SnapshotInfo> {
        let sh = self.shared();
        if sh.catalog.read()?.snapshot(snap)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {snap}")));
        }
        let vol = self.volume(volume)?;
        refuse_fetching(&vol)?;
        // Flush outside the hold, so the hold only covers the tail.
        vol.flush()?;
        let new_top = LayerId::new_random();
        let size = vol.size();
        create_layer_file(&*sh.fs, &sh.dir, new_top, size, sh.opts.sync)?;
        let result = {
            let _shape = sh.shape.lock().expect("shape lock");
            self.freeze_top(&vol, new_top, snap, false)
                .map(|(info, _)| info)
        };
        if result.is_err() && !sh.catalog.failed() {
            remove_quietly(&*sh.fs, &layer_path(&sh.dir, new_top));
        }
        let info = result?;
        // Past the depth limit: shorten the chain in the background.
        if vol.depth() as u32 > self.max_chain_depth(volume)? {
            self.enqueue(JobKind::Merge, volume.0, 0, JobReason::DepthPolicy)?;
        }
        Ok(info)
    }

    /// Queues the fold of a frozen layer that only its child holds (a
    /// hidden snapshot's, see [`Pool::freeze_top`]); a failure to queue it
    /// is logged (the next open folds it).
    fn fold_away(&self, layer: LayerId) {
        let foldable = self
            .shared()
            .catalog
            .read()
            .and_then(|txn| match txn.layer(layer)? {
                Some(l) => jobs::plan_foldable(&txn, &l),
                None => Ok(false),
            });
        if foldable.unwrap_or(false)
            && let Err(e) = self.enqueue(JobKind::Fold, layer.0, 0, JobReason::SnapshotDeleted)
        {
            tracing::warn!(%layer, error = %e, "queueing the fold of a hidden snapshot's layer");
        }
    }

    /// Pins `ranges` of a volume as they are now (see [`Pinned`]). Free
    /// when the volume's writable top holds none of their blocks;
    /// otherwise the top is frozen first, as for a snapshot (one flush, one
    /// new empty layer, one catalog commit), under a hidden snapshot that
    /// holds no reference, and the frozen layer is folded away in the
    /// background (the pins keep its file). A freeze is refused
    /// (`ChainAtLimit`) while the chain is at its depth limit, so pins
    /// made faster than merges fold them cannot deepen it without bound;
    /// refused too while the volume fetches from another node.
    pub fn pin(&self, volume: VolumeId, ranges: &[BlockRange]) -> Result<Vec<Pinned>> {
        let vol = self.volume(volume)?;
        refuse_fetching(&vol)?;
        if let Some(pins) = vol.pin_frozen(ranges)? {
            return Ok(pins);
        }
        let limit = self.max_chain_depth(volume)?;
        if vol.depth() >= limit as usize {
            return Err(Error::ChainAtLimit {
                volume,
                depth: vol.depth(),
                limit,
            });
        }
        let sh = self.shared();
        // Flush outside the hold, so the hold only covers the tail.
        vol.flush()?;
        let new_top = LayerId::new_random();
        create_layer_file(&*sh.fs, &sh.dir, new_top, vol.size(), sh.opts.sync)?;
        let (view, frozen) = {
            let _shape = sh.shape.lock().expect("shape lock");
            self.freeze_hidden(&vol, new_top)?
        };
        self.fold_away(frozen);
        ranges
            .iter()
            .map(|r| Ok(Pinned::new(*r, view.segments(r.first, r.first + r.blocks)?)))
            .collect()
    }

    /// Freezes `vol`'s top under a hidden (`implicit`) snapshot onto
    /// `new_top`, an empty file already made (removed again if the freeze
    /// fails). Returns the frozen view and layer. The caller holds the
    /// shape lock.
    fn freeze_hidden(&self, vol: &Volume, new_top: LayerId) -> Result<(Arc<View>, LayerId)> {
        let sh = self.shared();
        let (info, view) = match self.freeze_top(vol, new_top, SnapshotId::new_random(), true) {
            Ok(x) => x,
            Err(e) => {
                if !sh.catalog.failed() {
                    remove_quietly(&*sh.fs, &layer_path(&sh.dir, new_top));
                }
                return Err(e);
            }
        };
        let layer = sh
            .catalog
            .read()?
            .snapshot(info.id)?
            .ok_or(Error::SnapshotNotFound(info.id))?
            .layer;
        Ok((view, layer))
    }

    /// Freezes `vol`'s top under snapshot `snap` and puts `new_top` (an
    /// empty file already made) on it. An `implicit` snapshot is recorded
    /// as deleted from the start and holds no reference: it exists only so
    /// that a clone can be made of the frozen layer in the same hold of
    /// the shape lock (a crash in between leaves a layer that nothing
    /// holds but the new top, which the next open folds away). Returns the
    /// snapshot and the frozen layer's view.
    fn freeze_top(
        &self,
        vol: &Volume,
        new_top: LayerId,
        snap: SnapshotId,
        implicit: bool,
    ) -> Result<(SnapshotInfo, Arc<View>)> {
        let _gate = vol.gate.write().expect("volume gate");
        self.freeze_top_gated(vol, new_top, snap, implicit)
    }

    /// [`Pool::freeze_top`] for a caller that keeps I/O out of the volume
    /// already (a group hold owns its gate, see `group.rs`).
    pub(crate) fn freeze_top_gated(
        &self,
        vol: &Volume,
        new_top: LayerId,
        snap: SnapshotId,
        implicit: bool,
    ) -> Result<(SnapshotInfo, Arc<View>)> {
        let sh = self.shared();
        vol.check_live()?;
        vol.flush()?;
        let created = now_ns();
        let mut txn = sh.catalog.write()?;
        if txn.snapshot(snap)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {snap}")));
        }
        let mut rec = txn
            .volume(vol.id())?
            .ok_or(Error::VolumeNotFound(vol.id()))?;
        let mut old = txn.layer_required(rec.top)?;
        let slot = txn.alloc_slot(old.family)?;
        // The old top loses the volume's reference and gains the new top's
        // (as parent) and the snapshot's.
        old.frozen = true;
        old.snapshot = Some(snap);
        if !implicit {
            old.refs += 1;
        }
        txn.put_layer(&old)?;
        txn.put_layer(&LayerRecord {
            id: new_top,
            family: old.family,
            slot,
            parent: Some(old.id),
            frozen: false,
            size: rec.size,
            refs: 1,
            snapshot: None,
            created_ns: created,
        })?;
        let srec = SnapshotRecord {
            id: snap,
            volume: vol.id(),
            layer: old.id,
            size: rec.size,
            created_ns: created,
            state: if implicit {
                SnapshotState::Deleted
            } else {
                SnapshotState::Ready
            },
        };
        txn.put_snapshot(&srec)?;
        rec.top = new_top;
        txn.put_volume(&rec)?;
        txn.commit()?;
        let top = sh.layer(new_top, slot);
        let frozen = {
            let mut st = vol.state.write().expect("volume state");
            let frozen = Arc::new(st.view.clone());
            st.base_weak = Arc::downgrade(&frozen);
            st.base = Some(Arc::clone(&frozen));
            st.view.add_layer(Arc::clone(&top));
            st.top = top;
            frozen
        };
        sh.remember_view(old.id, &frozen);
        vol.journal
            .lock()
            .expect("journal")
            .frozen_views
            .push(Arc::clone(&frozen));
        Ok((SnapshotInfo::from(&srec), frozen))
    }

    /// Deletes a snapshot. Succeeds even if clones were made from it; the
    /// layer lives on while they (or an open reader) need it.
    pub fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        let sh = self.shared();
        let _shape = sh.shape.lock().expect("shape lock");
        let mut txn = sh.catalog.write()?;
        let mut rec = match txn.snapshot(id)? {
            Some(r) if r.state == SnapshotState::Ready => r,
            _ => return Err(Error::SnapshotNotFound(id)),
        };
        rec.state = SnapshotState::Deleted;
        txn.put_snapshot(&rec)?;
        // Frees the layer (and removes this record) if nothing else holds it.
        let freed = txn.release_layer(rec.layer)?;
        txn.commit()?;
        sh.discard_layers(&freed);
        // Still there: if only its child needs it now, fold it away.
        if !freed.contains(&rec.layer) {
            let txn = sh.catalog.read()?;
            if let Some(l) = txn.layer(rec.layer)?
                && jobs::plan_foldable(&txn, &l)?
            {
                drop(txn);
                self.enqueue(JobKind::Fold, rec.layer.0, 0, JobReason::SnapshotDeleted)?;
            }
        }
        Ok(())
    }

    /// Bytes that deleting snapshot `id` would free, as far as the catalog
    /// knows now: the blocks of its layer that the layer above overrides
    /// (its other blocks move up when the layer is folded away), or all of
    /// it, and of layers under it, when nothing else needs them. 0 when
    /// other clones or snapshots are built on its layer.
    pub fn snapshot_frees(&self, id: SnapshotId) -> Result<u64> {
        self.checkpoint_loaded()?;
        let txn = self.shared().catalog.read()?;
        let snap = match txn.snapshot(id)? {
            Some(r) if r.state == SnapshotState::Ready => r,
            _ => return Err(Error::SnapshotNotFound(id)),
        };
        let mut freed = 0u64;
        let mut layer = Some(snap.layer);
        while let Some(l) = layer {
            let rec = txn.layer_required(l)?;
            // The snapshot's reference, then each freed child's, goes.
            let left = rec.refs.saturating_sub(1);
            if left == 0 {
                freed += count_blocks(&txn.presence(l)?, None);
                layer = rec.parent;
                continue;
            }
            let children = txn.children(l)?;
            if let [child] = children.as_slice()
                && left == 1
            {
                // Folded into its one child: what the child overrides goes.
                freed += count_blocks(&txn.presence(l)?, Some(&txn.presence(child.id)?));
            }
            break;
        }
        Ok(freed * BLOCK_SIZE)
    }

    /// A new volume whose contents are the snapshot's; `size_bytes` may be
    /// larger than the snapshot (the rest reads as zeros).
    pub fn clone_snapshot(&self, id: SnapshotId, size_bytes: Option<u64>) -> Result<VolumeInfo> {
        self.clone_snapshot_as(id, VolumeId::new_random(), size_bytes)
    }

    /// [`Pool::clone_snapshot`] with the given ID for the new volume
    /// (`AlreadyExists` if taken).
    pub fn clone_snapshot_as(
        &self,
        id: SnapshotId,
        vid: VolumeId,
        size_bytes: Option<u64>,
    ) -> Result<VolumeInfo> {
        let sh = self.shared();
        let _claim = self.claim(vid)?;
        let snap = match sh.catalog.read()?.snapshot(id)? {
            Some(r) if r.state == SnapshotState::Ready => r,
            _ => return Err(Error::SnapshotNotFound(id)),
        };
        let size = size_bytes.unwrap_or(snap.size);
        check_volume_size(size)?;
        if size < snap.size {
            return Err(Error::ShrinkRefused {
                from: snap.size,
                to: size,
            });
        }
        let info = {
            let _shape = sh.shape.lock().expect("shape lock");
            let base = sh.view_of(snap.layer)?;
            let source = CloneSource {
                snapshot: Some(id),
                layer: snap.layer,
                view: base,
            };
            self.new_volume(vid, size, Some(source), None)?
        };
        // A clone of a deep chain is as deep, plus its own top.
        if info.chain_depth as u32 > self.max_chain_depth(vid)? {
            self.enqueue(JobKind::Merge, vid.0, 0, JobReason::DepthPolicy)?;
        }
        Ok(info)
    }

    /// A new volume with the contents `volume` has now: its top is frozen
    /// (an implicit snapshot, never listed) and the clone is made on it,
    /// in one hold of the shape lock. The frozen layer is shared by both
    /// volumes.
    pub fn clone_volume(&self, volume: VolumeId, size_bytes: Option<u64>) -> Result<VolumeInfo> {
        self.clone_volume_as(volume, VolumeId::new_random(), size_bytes)
    }

    /// [`Pool::clone_volume`] with the given ID for the new volume.
    pub fn clone_volume_as(
        &self,
        volume: VolumeId,
        vid: VolumeId,
        size_bytes: Option<u64>,
    ) -> Result<VolumeInfo> {
        let sh = self.shared();
        let _claim = self.claim(vid)?;
        let vol = self.volume(volume)?;
        refuse_fetching(&vol)?;
        let from = vol.size();
        let size = size_bytes.unwrap_or(from);
        check_volume_size(size)?;
        if size < from {
            return Err(Error::ShrinkRefused { from, to: size });
        }
        // Flush outside the hold, so the hold only covers the tail.
        vol.flush()?;
        let new_top = LayerId::new_random();
        create_layer_file(&*sh.fs, &sh.dir, new_top, from, sh.opts.sync)?;
        let (frozen, made) = {
            let _shape = sh.shape.lock().expect("shape lock");
            let (view, layer) = self.freeze_hidden(&vol, new_top)?;
            let source = CloneSource {
                snapshot: None,
                layer,
                view,
            };
            (layer, self.new_volume(vid, size, Some(source), None))
        };
        // Failed: the frozen layer is held only by the volume's new top;
        // fold it away.
        let info = made.inspect_err(|_| self.fold_away(frozen))?;
        for v in [volume, vid] {
            if self.volume(v)?.depth() as u32 > self.max_chain_depth(v)? {
                self.enqueue(JobKind::Merge, v.0, 0, JobReason::DepthPolicy)?;
            }
        }
        Ok(info)
    }

    /// Opens a snapshot for reading. The reader pins the layers it reads:
    /// deleting the snapshot meanwhile succeeds and the reader keeps
    /// returning the snapshot's data until it is dropped.
    pub fn open_snapshot(&self, id: SnapshotId) -> Result<SnapshotReader> {
        let sh = self.shared();
        let _shape = sh.shape.lock().expect("shape lock");
        let snap = match sh.catalog.read()?.snapshot(id)? {
            Some(r) if r.state == SnapshotState::Ready => r,
            _ => return Err(Error::SnapshotNotFound(id)),
        };
        let view = sh.view_of(snap.layer)?;
        Ok(SnapshotReader::new(
            id,
            snap.size,
            view,
            snap.layer,
            Arc::downgrade(sh),
        ))
    }

    /// Every volume, in ID order.
    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let txn = self.shared().catalog.read()?;
        txn.volumes()?
            .iter()
            .map(|r| volume_info(&txn, r))
            .collect()
    }

    /// One volume's info.
    pub fn volume_info(&self, id: VolumeId) -> Result<VolumeInfo> {
        let txn = self.shared().catalog.read()?;
        let rec = txn.volume(id)?.ok_or(Error::VolumeNotFound(id))?;
        volume_info(&txn, &rec)
    }

    /// Every (visible) snapshot, in ID order.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self
            .shared()
            .catalog
            .read()?
            .snapshots()?
            .iter()
            .filter(|s| s.state == SnapshotState::Ready)
            .map(SnapshotInfo::from)
            .collect())
    }

    /// One snapshot's info.
    pub fn snapshot_info(&self, id: SnapshotId) -> Result<SnapshotInfo> {
        match self.shared().catalog.read()?.snapshot(id)? {
            Some(r) if r.state == SnapshotState::Ready => Ok(SnapshotInfo::from(&r)),
            _ => Err(Error::SnapshotNotFound(id)),
        }
    }

    /// Capacity and free space of the pool's filesystem.
    pub fn space(&self) -> Result<PoolSpace> {
        let sh = self.shared();
        let (capacity_bytes, free_bytes) = sh
            .fs
            .space(&sh.dir)
            .map_err(|e| io_error("read free space", &sh.dir, e))?;
        Ok(PoolSpace {
            capacity_bytes,
            free_bytes,
            reserved_bytes: sh.space.reserve(),
        })
    }

    /// Stats of every volume (loading those not yet loaded).
    pub fn volume_stats(&self) -> Result<Vec<VolumeStats>> {
        let ids: Vec<VolumeId> = self
            .shared()
            .catalog
            .read()?
            .volumes()?
            .iter()
            .map(|v| v.id)
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.volume(id) {
                Ok(v) => out.push(v.stats()),
                Err(Error::VolumeNotFound(_)) => {} // deleted meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Bytes of memory held by the block indexes of every loaded volume and
    /// cached view, each shared chunk counted once.
    pub fn index_memory_bytes(&self) -> usize {
        let mut seen = HashSet::new();
        let mut total = 0;
        for vol in self.inner.volumes.lock().expect("volume map").values() {
            let st = vol.state.read().expect("volume state");
            total += st.view.index.memory(&mut seen);
            if let Some(base) = &st.base {
                total += base.index.memory(&mut seen);
            }
        }
        let cached: Vec<Arc<View>> = self
            .shared()
            .views
            .lock()
            .expect("view cache")
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for v in cached {
            total += v.index.memory(&mut seen);
        }
        total
    }

    /// Flushes every loaded volume and folds its journal into the catalog.
    /// The pool stays locked while any [`Volume`] or snapshot reader handle
    /// obtained from it is alive: drop those before reopening.
    pub fn close(self) -> Result<()> {
        let flushed = self.inner.flush_all();
        // A freed layer's file goes when the last holder of the layer lets
        // go; a holder that outlives the pool (a serving thread the
        // process exits under) would leave it behind. Nothing new reads
        // it after close, so it goes now.
        let layers = self.shared().layers.lock().expect("layer registry");
        for layer in layers.values().filter_map(Weak::upgrade) {
            layer.remove_if_freed();
        }
        flushed
    }
}

impl PoolInner {
    fn flush_all(&self) -> Result<()> {
        let volumes: Vec<Arc<Volume>> = self
            .volumes
            .lock()
            .expect("volume map")
            .values()
            .cloned()
            .collect();
        let mut first_error = None;
        for v in volumes {
            if let Err(e) = v.flush_and_checkpoint() {
                tracing::error!(volume = %v.id(), error = %e, "flush at pool close failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let _ = self.flush_all();
    }
}

fn volume_info(txn: &super::catalog::ReadTxn, r: &VolumeRecord) -> Result<VolumeInfo> {
    Ok(VolumeInfo {
        id: r.id,
        size_bytes: r.size,
        chain_depth: txn.chain(r.top)?.len(),
        created_unix_ns: r.created_ns,
    })
}

/// Takes the pool's lock file; held until the returned value is dropped.
/// A fetching volume's layers do not hold all its data yet: no snapshot or
/// clone of it until they do.
pub(crate) fn refuse_fetching(vol: &Volume) -> Result<()> {
    if vol.fetching() {
        return Err(Error::Fetching {
            volume: vol.id(),
            why: "its snapshots and clones wait until all of it is here".into(),
        });
    }
    Ok(())
}

pub(crate) fn lock_pool(fs: &dyn Fs, dir: &Path) -> Result<Box<dyn Any + Send + Sync>> {
    let lock_path = dir.join(LOCK_FILE);
    fs.lock(&lock_path)
        .map_err(|e| io_error("lock pool", &lock_path, e))?
        .ok_or_else(|| Error::PoolLocked(dir.into()))
}

/// Makes a new pool's directories, durably: each one's entry in its parent
/// is synced, so a power cut cannot take back a directory whose files a
/// later fsync made durable.
fn create_dirs(fs: &dyn Fs, dir: &Path, sync: bool) -> Result<()> {
    for sub in [LAYERS_DIR, JOURNAL_DIR] {
        fs.create_dir_all(&dir.join(sub))
            .map_err(|e| io_error("create pool", dir, e))?;
    }
    if sync {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(fs, parent)?;
        }
        sync_dir(fs, dir)?;
    }
    Ok(())
}

/// Removes files no catalog record refers to: layer files and journals of
/// operations a crash interrupted, and temporary journals.
fn sweep_orphans(shared: &Shared) -> Result<()> {
    let fs = &*shared.fs;
    let txn = shared.catalog.read()?;
    let layers: HashSet<LayerId> = txn.layers()?.iter().map(|l| l.id).collect();
    let volumes: HashSet<VolumeId> = txn.volumes()?.iter().map(|v| v.id).collect();
    for (sub, ext) in [(LAYERS_DIR, "data"), (JOURNAL_DIR, "wal")] {
        let dir = shared.dir.join(sub);
        let names = fs
            .read_dir(&dir)
            .map_err(|e| io_error("list pool", &dir, e))?;
        for name in names {
            let name = name.to_string_lossy();
            let orphan = match name.strip_suffix(&format!(".{ext}")) {
                Some(id) if sub == LAYERS_DIR => id.parse().is_ok_and(|id| !layers.contains(&id)),
                Some(id) => id.parse().is_ok_and(|id| !volumes.contains(&id)),
                // A new layer file a merge was building when it stopped.
                None => name.ends_with(".wal.tmp") || name.ends_with(".data.merge"),
            };
            if orphan {
                let path = dir.join(&*name);
                tracing::info!(file = %path.display(), "removing a file left by an interrupted operation");
                remove_quietly(fs, &path);
            }
        }
    }
    // Unflushed logs of volumes that are gone.
    let dir = &shared.unflushed_dir;
    let names = fs
        .read_dir(dir)
        .map_err(|e| io_error("list pool", dir, e))?;
    for name in names {
        let orphan = name
            .to_string_lossy()
            .strip_suffix(".unflushed")
            .is_some_and(|id| id.parse().is_ok_and(|id| !volumes.contains(&id)));
        if orphan {
            remove_quietly(fs, &dir.join(name));
        }
    }
    Ok(())
}

type BlockStateRun = super::presence::Run;

/// Data blocks in `layer`'s presence; with `over`, only those `over` also
/// defines (data or zero).
fn count_blocks(
    layer: &[(u32, Vec<BlockStateRun>)],
    over: Option<&[(u32, Vec<BlockStateRun>)]>,
) -> u64 {
    use super::presence::{BlockState, expand};
    let mut n = 0;
    for (chunk, runs) in layer {
        let mine = expand(runs);
        let theirs = over.map(|o| {
            o.iter()
                .find(|(c, _)| c == chunk)
                .map_or_else(Vec::new, |(_, r)| expand(r))
        });
        for (i, s) in mine.iter().enumerate() {
            let counted = *s == BlockState::Data
                && match &theirs {
                    None => true,
                    Some(t) => t.get(i).is_some_and(|x| *x != BlockState::Absent),
                };
            n += u64::from(counted);
        }
    }
    n
}
