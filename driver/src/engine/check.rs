//! `strata pool check`: verifies a pool offline and reports in plain words.
//!
//! It takes the pool lock (so it never races a running node), then checks
//! the catalog against itself (chains, reference counts, slots, snapshots,
//! presence rows) and against the files (every layer has its file, every
//! volume its journal, nothing is left over). With `repair`, it removes
//! orphans only: files and presence rows no record refers to. It never
//! changes a record that something refers to.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use super::catalog::{CATALOG_FILE, Catalog, LayerRecord, SnapshotState};
use super::error::{Error, Result};
use super::geometry::{BLOCK_SIZE, CHUNK_BLOCKS};
use super::ids::{FamilyId, LayerId, VolumeId};
use super::io::{Entry, Fs, RealFs};
use super::journal::{JOURNAL_DIR, JournalFile, journal_path};
use super::layer::{LAYERS_DIR, layer_path};
use super::pool::lock_pool;

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Repairable findings are orphans that `--repair` removes.
    pub repairable: bool,
    /// What is wrong, in words.
    pub message: String,
}

/// What a check found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Counts of what was checked, for the summary line.
    pub volumes: usize,
    pub layers: usize,
    pub snapshots: usize,
    pub presence_chunks: usize,
    /// Informational notes (not problems), e.g. journal batches that the
    /// next open will replay.
    pub notes: Vec<String>,
    /// Problems.
    pub findings: Vec<Finding>,
    /// What `repair` removed.
    pub repaired: Vec<String>,
}

impl CheckReport {
    fn damage(&mut self, message: String) {
        self.findings.push(Finding {
            repairable: false,
            message,
        });
    }
    fn orphan(&mut self, message: String) {
        self.findings.push(Finding {
            repairable: true,
            message,
        });
    }
    /// No problem found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Checks the pool in `dir`; with `repair`, removes orphans afterwards.
pub fn check_pool(dir: &Path, repair: bool) -> Result<CheckReport> {
    check_pool_on(&RealFs::shared(), dir, repair)
}

/// [`check_pool`] on the filesystem `fs`.
pub fn check_pool_on(fs: &Arc<dyn Fs>, dir: &Path, repair: bool) -> Result<CheckReport> {
    let exists = |p: &Path| -> Result<Option<Entry>> {
        fs.entry(p)
            .map_err(|e| super::error::io_error("look at", p, e))
    };
    if exists(&dir.join(CATALOG_FILE))? != Some(Entry::File) {
        return Err(Error::NotAPool {
            path: dir.into(),
            why: format!("no {CATALOG_FILE}"),
        });
    }
    let _lock = lock_pool(&**fs, dir)?;
    let catalog = Catalog::open(fs, dir, false, true)?;
    let mut report = CheckReport::default();
    let txn = catalog.read()?;
    // What failures lost, as the engine recorded it.
    for (v, f) in txn.faults()? {
        let what = match f.kind {
            super::catalog::FaultKind::DataLost => format!(
                "volume {v} lost data: {}; it refuses writes until `strata volume acknowledge-loss {v}`",
                f.message
            ),
            super::catalog::FaultKind::UnflushedLost => {
                format!("volume {v}: {}; its next flush reports it", f.message)
            }
        };
        report.damage(what);
    }
    let volumes = txn.volumes()?;
    let layers: HashMap<LayerId, LayerRecord> =
        txn.layers()?.into_iter().map(|l| (l.id, l)).collect();
    let snapshots = txn.snapshots()?;
    let families: HashMap<FamilyId, _> = txn.families()?.into_iter().collect();
    report.volumes = volumes.len();
    report.layers = layers.len();
    report.snapshots = snapshots
        .iter()
        .filter(|s| s.state == SnapshotState::Ready)
        .count();

    // Expected reference counts, from every referrer.
    let mut expected: HashMap<LayerId, u32> = layers.keys().map(|k| (*k, 0)).collect();
    let mut tops: HashSet<LayerId> = HashSet::new();
    for v in &volumes {
        if v.size == 0 || v.size % BLOCK_SIZE != 0 {
            report.damage(format!("volume {} has invalid size {}", v.id, v.size));
        }
        match layers.get(&v.top) {
            None => report.damage(format!(
                "volume {}: its top layer {} does not exist",
                v.id, v.top
            )),
            Some(top) => {
                if top.frozen {
                    report.damage(format!(
                        "volume {}: its top layer {} is frozen",
                        v.id, v.top
                    ));
                }
                if !tops.insert(v.top) {
                    report.damage(format!(
                        "layer {} is the top of more than one volume",
                        v.top
                    ));
                }
                *expected.entry(v.top).or_default() += 1;
                if let Err(e) = txn.chain(v.top) {
                    report.damage(format!("volume {}: {e}", v.id));
                }
            }
        }
    }
    for s in &snapshots {
        match layers.get(&s.layer) {
            None if s.state == SnapshotState::Ready => report.damage(format!(
                "snapshot {}: its layer {} does not exist",
                s.id, s.layer
            )),
            None => report.damage(format!(
                "deleted snapshot {} outlived its layer {} (should have gone with it)",
                s.id, s.layer
            )),
            Some(l) => {
                if !l.frozen {
                    report.damage(format!(
                        "snapshot {}: its layer {} is not frozen",
                        s.id, s.layer
                    ));
                }
                if s.state == SnapshotState::Ready {
                    *expected.entry(s.layer).or_default() += 1;
                }
            }
        }
    }
    let mut slots: HashMap<(FamilyId, u16), LayerId> = HashMap::new();
    let mut family_members: HashMap<FamilyId, u32> = HashMap::new();
    for l in layers.values() {
        if let Some(p) = l.parent {
            match layers.get(&p) {
                Some(parent) => {
                    *expected.entry(p).or_default() += 1;
                    if !parent.frozen {
                        report.damage(format!(
                            "layer {} sits on layer {p}, which is not frozen",
                            l.id
                        ));
                    }
                    if parent.family != l.family {
                        report.damage(format!(
                            "layer {} and its parent {p} are in different families",
                            l.id
                        ));
                    }
                    if parent.size > l.size {
                        report.damage(format!("layer {} is smaller than its parent {p}", l.id));
                    }
                }
                None => report.damage(format!("layer {}: its parent {p} does not exist", l.id)),
            }
        }
        if let Some(other) = slots.insert((l.family, l.slot), l.id) {
            report.damage(format!(
                "layers {} and {other} share slot {} of their family",
                l.id, l.slot
            ));
        }
        *family_members.entry(l.family).or_default() += 1;
        match families.get(&l.family) {
            None => report.damage(format!(
                "layer {}: its family {} does not exist",
                l.id, l.family
            )),
            Some(f) => {
                if u32::from(l.slot) >= f.next_slot || f.free.contains(&l.slot) {
                    report.damage(format!(
                        "layer {} uses slot {}, which its family has not handed out",
                        l.id, l.slot
                    ));
                }
            }
        }
        if exists(&layer_path(dir, l.id))?.is_none() {
            report.damage(format!(
                "layer {}: its data file {} is missing",
                l.id,
                layer_path(dir, l.id).display()
            ));
        }
    }
    for (id, want) in &expected {
        let have = layers[id].refs;
        if have != *want {
            report.damage(format!(
                "layer {id} records {have} references but {want} things refer to it"
            ));
        }
        if *want == 0 {
            report.damage(format!("layer {id} is referred to by nothing (a leak)"));
        }
    }
    for (id, f) in &families {
        let members = family_members.get(id).copied().unwrap_or(0);
        if f.live() != members {
            report.damage(format!(
                "family {id} counts {} live layers but has {members}",
                f.live()
            ));
        }
    }

    // Presence rows.
    let mut orphan_presence: HashSet<LayerId> = HashSet::new();
    for (layer, chunk) in txn.presence_layers()? {
        report.presence_chunks += 1;
        match layers.get(&layer) {
            None => {
                orphan_presence.insert(layer);
            }
            Some(l) => {
                if u64::from(chunk) * CHUNK_BLOCKS * BLOCK_SIZE >= l.size.max(1) {
                    report.damage(format!(
                        "layer {layer} has presence beyond its size (chunk {chunk})"
                    ));
                }
            }
        }
    }
    for l in &orphan_presence {
        report.orphan(format!("presence rows of layer {l}, which does not exist"));
    }
    for l in layers.values() {
        if let Err(e) = txn.presence(l.id) {
            report.damage(format!("layer {}: {e}", l.id));
        }
    }

    // Journals.
    let volume_ids: HashSet<VolumeId> = volumes.iter().map(|v| v.id).collect();
    for v in &volumes {
        if exists(&journal_path(dir, v.id))?.is_none() {
            report.notes.push(format!(
                "volume {} has no journal; the next open creates one",
                v.id
            ));
            continue;
        }
        match JournalFile::inspect(&**fs, dir, v.id) {
            Ok(replay) => {
                let pending = replay
                    .batches
                    .iter()
                    .filter(|b| b.seq > v.journal_seq)
                    .count();
                if pending > 0 {
                    report.notes.push(format!(
                        "volume {}: {pending} flushed journal batches will be folded in at the next open",
                        v.id
                    ));
                }
                let logged: u64 = replay
                    .batches
                    .iter()
                    .flat_map(|b| &b.logged)
                    .map(|l| l.data.len() as u64)
                    .sum();
                if logged > 0 {
                    report.notes.push(format!(
                        "volume {}: its journal logged {logged} bytes of flushed data that the next open makes durable in the layer files",
                        v.id
                    ));
                }
                if replay.truncated_bytes > 0 {
                    report.notes.push(format!(
                        "volume {}: the journal ends in {} bytes of an interrupted (never acknowledged) flush",
                        v.id, replay.truncated_bytes
                    ));
                }
            }
            Err(e) => report.damage(format!("volume {}: {e}", v.id)),
        }
    }
    drop(txn);

    // Files nothing refers to.
    let mut orphan_files = Vec::new();
    for (sub, ext) in [(LAYERS_DIR, ".data"), (JOURNAL_DIR, ".wal")] {
        let Ok(entries) = fs.read_dir(&dir.join(sub)) else {
            report.damage(format!("the pool has no {sub}/ directory"));
            continue;
        };
        for entry in entries {
            let name = entry.to_string_lossy().into_owned();
            // A volume's unflushed log sits next to its journal.
            let volume_file = name.strip_suffix(ext).or_else(|| {
                (sub == JOURNAL_DIR)
                    .then(|| name.strip_suffix(".unflushed"))
                    .flatten()
            });
            let known = match volume_file {
                Some(id) if sub == LAYERS_DIR => {
                    id.parse().is_ok_and(|id: LayerId| layers.contains_key(&id))
                }
                Some(id) => id
                    .parse()
                    .is_ok_and(|id: VolumeId| volume_ids.contains(&id)),
                None => false,
            };
            if !known {
                report.orphan(format!("{sub}/{name} belongs to no volume or layer"));
                orphan_files.push(dir.join(sub).join(&name));
            }
        }
    }

    if repair {
        for path in orphan_files {
            match fs.remove_file(&path) {
                Ok(()) => report.repaired.push(format!("removed {}", path.display())),
                Err(e) => report.damage(format!("could not remove {}: {e}", path.display())),
            }
        }
        if !orphan_presence.is_empty() {
            let mut txn = catalog.write()?;
            for l in &orphan_presence {
                txn.remove_presence(*l)?;
            }
            txn.commit()?;
            for l in orphan_presence {
                report
                    .repaired
                    .push(format!("removed presence rows of layer {l}"));
            }
        }
        report.findings.retain(|f| !f.repairable);
    }
    Ok(report)
}
