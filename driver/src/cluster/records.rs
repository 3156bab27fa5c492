//! Cluster records and their embedded backend.
//!
//! CSI identifies what it asks for by *name* (for idempotency) and then by
//! the *ID* the plugin returned. The records map one to the other and keep
//! what a repeated request must be compared against (size, parameters,
//! source). A record is written in state `Creating` with the ID chosen
//! *before* the engine creates anything, so a create interrupted by a crash
//! is finished by the next identical request instead of leaking a volume.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// What can go wrong with the records store.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("records store: {0}")]
    Store(String),
    #[error("records store holds a record it cannot read: {0}")]
    Corrupt(String),
}

type Result<T> = std::result::Result<T, RecordsError>;

/// Whether the object behind a record exists yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RecordState {
    /// The ID is chosen; the engine object may not exist yet.
    Creating,
    /// The engine object exists.
    Ready,
}

/// Where a volume's initial contents came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// A volume as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    pub name: String,
    pub volume_id: String,
    pub capacity_bytes: u64,
    pub parameters: BTreeMap<String, String>,
    pub source: Option<ContentSource>,
    /// The node that owns the volume.
    pub node: String,
    /// Every node that attaches other nodes' volumes may attach it; false
    /// pins it to `node` (StorageClass `locality: node`, a standalone
    /// Strata, or a record older than remote attachments).
    #[serde(default)]
    pub anywhere: bool,
    pub state: RecordState,
    pub created_unix_ns: u64,
    /// A move to another node under way (see [`super::moves`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<super::moves::Move>,
    /// The PVC it was made for, which Events are about (from the
    /// provisioner's `--extra-create-metadata`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<super::ClaimRef>,
    /// The node its data was lost with (`strata node forget
    /// --abandon-data`); for good, also if a node of that name registers
    /// again (see `cluster::moves::lost_volume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_with: Option<String>,
}

/// A snapshot as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    pub name: String,
    pub snapshot_id: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub node: String,
    pub state: RecordState,
    pub created_unix_ns: u64,
    /// The group snapshot it was cut with, if any (see `csi::group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupRef>,
    /// A move to another node under way (a drain's; see
    /// `cluster::snapshots`): only `from`, `to`, `phase`, `message` and
    /// `started_unix_ns` mean anything for a snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<super::moves::Move>,
    /// The node it was lost with, as [`VolumeRecord::lost_with`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_with: Option<String>,
}

/// A group snapshot a member snapshot belongs to: its ID and CSI name.
/// A group has no record of its own: its members' records are it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupRef {
    pub id: String,
    pub name: String,
}

/// Whether the controller hears from a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NodeState {
    /// It answered its last heartbeat.
    Ready,
    /// It has not answered for longer than the stale timeout: no new
    /// volume is placed on it, and calls for its volumes are UNAVAILABLE.
    Stale,
}

/// A node as the control plane knows it: how to reach its agent and what
/// room it reported last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub node_id: String,
    /// `host:port` of its agent; empty for the controller's own node
    /// (standalone mode).
    pub agent_address: String,
    pub version: String,
    pub capacity_bytes: u64,
    pub available_bytes: u64,
    pub provisioned_bytes: u64,
    pub max_volumes: u32,
    pub volumes: u32,
    pub state: NodeState,
    /// Why it is stale (the last error), or empty.
    pub message: String,
    pub last_seen_unix_ns: u64,
    /// Being drained (`strata node drain`): no new volume is placed on it.
    #[serde(default)]
    pub draining: bool,
}

/// The records interface. Implementations must make each `put_*` and
/// `delete_*` atomic (name and ID maps change together).
pub trait Records: Send + Sync + std::fmt::Debug {
    fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>>;
    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>>;
    fn put_volume(&self, rec: &VolumeRecord) -> Result<()>;
    /// Changes the record of volume `id` as it is stored now (no other
    /// write in between; `change` may run again after a conflict) and
    /// writes it, unless `change` answers false or there is no record
    /// (one deleted since a writer read it is not brought back); whether
    /// it wrote.
    fn update_volume(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut VolumeRecord) -> bool,
    ) -> Result<bool>;
    fn delete_volume(&self, id: &str) -> Result<()>;
    fn snapshot_by_name(&self, name: &str) -> Result<Option<SnapshotRecord>>;
    fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>>;
    fn put_snapshot(&self, rec: &SnapshotRecord) -> Result<()>;
    /// As [`Self::update_volume`].
    fn update_snapshot(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut SnapshotRecord) -> bool,
    ) -> Result<bool>;
    fn delete_snapshot(&self, id: &str) -> Result<()>;
    /// Every volume, sorted by ID.
    fn volumes(&self) -> Result<Vec<VolumeRecord>>;
    /// Every snapshot, sorted by ID.
    fn snapshots(&self) -> Result<Vec<SnapshotRecord>>;
    fn node(&self, id: &str) -> Result<Option<NodeRecord>>;
    /// Every node, sorted by ID.
    fn nodes(&self) -> Result<Vec<NodeRecord>>;
    /// Writes a node's record; an existing record keeps its `draining`
    /// flag, which only [`Records::set_node_draining`] changes (a report
    /// made before a drain began must not end it).
    fn put_node(&self, rec: &NodeRecord) -> Result<()>;
    /// Sets node `id`'s `draining` flag in its record as it is now;
    /// false if there is no record.
    fn set_node_draining(&self, id: &str, draining: bool) -> Result<bool>;
    /// Forgets a node (`strata node forget`); forgetting one that is not
    /// there is a success.
    fn delete_node(&self, id: &str) -> Result<()>;
}

/// A record that can be lost with a forgotten node.
trait Losable: Clone + Serialize + serde::de::DeserializeOwned {
    fn lost_with_mut(&mut self) -> &mut Option<String>;
}

impl Losable for VolumeRecord {
    fn lost_with_mut(&mut self) -> &mut Option<String> {
        &mut self.lost_with
    }
}

impl Losable for SnapshotRecord {
    fn lost_with_mut(&mut self) -> &mut Option<String> {
        &mut self.lost_with
    }
}

/// `rec` as a put writes it over `old` (the record stored, serialized):
/// a loss is never taken back, whoever writes (a writer that read the
/// record before `strata node forget` marked it does not unmark it).
fn keep_loss<R: Losable>(rec: &R, old: Option<&[u8]>) -> R {
    let mut rec = rec.clone();
    if rec.lost_with_mut().is_none() {
        *rec.lost_with_mut() = old
            .and_then(|v| serde_json::from_slice::<R>(v).ok())
            .and_then(|mut o| o.lost_with_mut().take());
    }
    rec
}

/// `change` applied to the record `old` (serialized), serialized again;
/// `None` if there is none or `change` answers false.
fn changed<R: Losable>(
    old: Option<&[u8]>,
    change: &mut dyn FnMut(&mut R) -> bool,
) -> Option<Vec<u8>> {
    let mut rec: R = serde_json::from_slice(old?).ok()?;
    change(&mut rec).then(|| json(&rec))
}

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const VOLUME_NAMES: TableDefinition<&str, &str> = TableDefinition::new("volume_names");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const SNAPSHOT_NAMES: TableDefinition<&str, &str> = TableDefinition::new("snapshot_names");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");

/// Records in a local redb file (standalone mode).
#[derive(Debug)]
pub struct EmbeddedRecords {
    db: Database,
}

fn store<E: std::fmt::Display>(e: E) -> RecordsError {
    RecordsError::Store(e.to_string())
}

impl EmbeddedRecords {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_waiting(path, std::time::Duration::ZERO)
    }

    /// Opens the store, waiting up to `wait` while another process has it
    /// open: a controller that just gave up the lead (its lock file) still
    /// holds the store until it has exited.
    pub fn open_waiting(path: &Path, wait: std::time::Duration) -> Result<Self> {
        if !path.exists() {
            Self::create(path)?;
        }
        let deadline = std::time::Instant::now() + wait;
        let db = loop {
            match Database::create(path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                opened => break opened.map_err(store)?,
            }
        };
        Self::tables(&db)?;
        Ok(EmbeddedRecords { db })
    }

    /// Makes a new store at `path` atomically: built under a name of its
    /// own, then linked into place, so a process killed while creating it
    /// leaves no half-made store for the next start to choke on, and two
    /// creating at once end with one store (the link fails if `path` is
    /// there already).
    fn create(path: &Path) -> Result<()> {
        let new = path.with_extension(format!("new.{}", std::process::id()));
        let _ = std::fs::remove_file(&new);
        {
            let db = Database::create(&new).map_err(store)?;
            Self::tables(&db)?;
        }
        let linked = std::fs::hard_link(&new, path);
        let _ = std::fs::remove_file(&new);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(store(format!("install {}: {e}", path.display()))),
        }
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| store(format!("sync {}: {e}", dir.display())))?;
        }
        Ok(())
    }

    /// Creates the tables a store has (those it lacks, in an older one).
    fn tables(db: &Database) -> Result<()> {
        let txn = db.begin_write().map_err(store)?;
        for t in [VOLUMES, SNAPSHOTS, NODES] {
            txn.open_table(t).map_err(store)?;
        }
        for t in [VOLUME_NAMES, SNAPSHOT_NAMES] {
            txn.open_table(t).map_err(store)?;
        }
        txn.commit().map_err(store)
    }

    fn get<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        id: &str,
    ) -> Result<Option<T>> {
        let txn = self.db.begin_read().map_err(store)?;
        let t = txn.open_table(table).map_err(store)?;
        match t.get(id).map_err(store)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| RecordsError::Corrupt(e.to_string())),
            None => Ok(None),
        }
    }

    fn all<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>> {
        let txn = self.db.begin_read().map_err(store)?;
        let t = txn.open_table(table).map_err(store)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(store)? {
            let (_, v) = entry.map_err(store)?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| RecordsError::Corrupt(e.to_string()))?,
            );
        }
        Ok(out)
    }

    fn id_by_name(&self, table: TableDefinition<&str, &str>, name: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read().map_err(store)?;
        let t = txn.open_table(table).map_err(store)?;
        Ok(t.get(name).map_err(store)?.map(|v| v.value().to_string()))
    }

    /// Writes what `value` makes of the record stored.
    fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        names: TableDefinition<&str, &str>,
        id: &str,
        name: &str,
        value: impl FnOnce(Option<&[u8]>) -> Vec<u8>,
    ) -> Result<()> {
        let txn = self.db.begin_write().map_err(store)?;
        {
            let mut t = txn.open_table(table).map_err(store)?;
            let value = value(t.get(id).map_err(store)?.as_ref().map(|v| v.value()));
            t.insert(id, value.as_slice()).map_err(store)?;
        }
        txn.open_table(names)
            .map_err(store)?
            .insert(name, id)
            .map_err(store)?;
        txn.commit().map_err(store)
    }

    /// Writes what `value` makes of the record stored, in the same
    /// transaction (`None`: nothing); whether it wrote. The name stays.
    fn update(
        &self,
        table: TableDefinition<&str, &[u8]>,
        id: &str,
        value: impl FnOnce(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<bool> {
        let txn = self.db.begin_write().map_err(store)?;
        {
            let mut t = txn.open_table(table).map_err(store)?;
            let value = value(t.get(id).map_err(store)?.as_ref().map(|v| v.value()));
            let Some(value) = value else {
                return Ok(false);
            };
            t.insert(id, value.as_slice()).map_err(store)?;
        }
        txn.commit().map_err(store)?;
        Ok(true)
    }

    /// Writes what `change` makes of node `id`'s record as stored (`None`
    /// when there is none or it does not decode), in one transaction
    /// (`None`: nothing); whether it wrote.
    fn change_node(
        &self,
        id: &str,
        change: impl FnOnce(Option<&NodeRecord>) -> Option<NodeRecord>,
    ) -> Result<bool> {
        self.update(NODES, id, |cur| {
            let cur: Option<NodeRecord> = cur.and_then(|v| serde_json::from_slice(v).ok());
            change(cur.as_ref()).map(|n| json(&n))
        })
    }

    fn delete(
        &self,
        table: TableDefinition<&str, &[u8]>,
        names: TableDefinition<&str, &str>,
        id: &str,
        name_of: impl Fn(&[u8]) -> Option<String>,
    ) -> Result<()> {
        let txn = self.db.begin_write().map_err(store)?;
        let name = {
            let mut t = txn.open_table(table).map_err(store)?;
            let removed = t.remove(id).map_err(store)?;
            removed.and_then(|v| name_of(v.value()))
        };
        if let Some(name) = name {
            txn.open_table(names)
                .map_err(store)?
                .remove(name.as_str())
                .map_err(store)?;
        }
        txn.commit().map_err(store)
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

impl Records for EmbeddedRecords {
    fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        match self.id_by_name(VOLUME_NAMES, name)? {
            Some(id) => self.volume(&id),
            None => Ok(None),
        }
    }
    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>> {
        self.get(VOLUMES, id)
    }
    fn put_volume(&self, rec: &VolumeRecord) -> Result<()> {
        self.put(VOLUMES, VOLUME_NAMES, &rec.volume_id, &rec.name, |old| {
            json(&keep_loss(rec, old))
        })
    }
    fn update_volume(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut VolumeRecord) -> bool,
    ) -> Result<bool> {
        self.update(VOLUMES, id, |old| changed(old, change))
    }
    fn delete_volume(&self, id: &str) -> Result<()> {
        self.delete(VOLUMES, VOLUME_NAMES, id, |v| {
            serde_json::from_slice::<VolumeRecord>(v)
                .ok()
                .map(|r| r.name)
        })
    }
    fn snapshot_by_name(&self, name: &str) -> Result<Option<SnapshotRecord>> {
        match self.id_by_name(SNAPSHOT_NAMES, name)? {
            Some(id) => self.snapshot(&id),
            None => Ok(None),
        }
    }
    fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        self.get(SNAPSHOTS, id)
    }
    fn put_snapshot(&self, rec: &SnapshotRecord) -> Result<()> {
        self.put(
            SNAPSHOTS,
            SNAPSHOT_NAMES,
            &rec.snapshot_id,
            &rec.name,
            |old| json(&keep_loss(rec, old)),
        )
    }
    fn update_snapshot(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut SnapshotRecord) -> bool,
    ) -> Result<bool> {
        self.update(SNAPSHOTS, id, |old| changed(old, change))
    }
    fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.delete(SNAPSHOTS, SNAPSHOT_NAMES, id, |v| {
            serde_json::from_slice::<SnapshotRecord>(v)
                .ok()
                .map(|r| r.name)
        })
    }
    fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.all(VOLUMES)
    }
    fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.all(SNAPSHOTS)
    }
    fn node(&self, id: &str) -> Result<Option<NodeRecord>> {
        self.get(NODES, id)
    }
    fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.all(NODES)
    }
    fn put_node(&self, rec: &NodeRecord) -> Result<()> {
        self.change_node(&rec.node_id, |cur| {
            let draining = cur.is_some_and(|c| c.draining);
            Some(NodeRecord {
                draining,
                ..rec.clone()
            })
        })
        .map(|_| ())
    }
    fn set_node_draining(&self, id: &str, draining: bool) -> Result<bool> {
        self.change_node(id, |cur| {
            cur.map(|c| NodeRecord {
                draining,
                ..c.clone()
            })
        })
    }
    fn delete_node(&self, id: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(store)?;
        txn.open_table(NODES)
            .map_err(store)?
            .remove(id)
            .map_err(store)?;
        txn.commit().map_err(store)
    }
}

/// Why records could not be copied.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Records(#[from] RecordsError),
    #[error(
        "{kind} {name:?} is {from_id} in the source but {to_id} in the destination; nothing was copied"
    )]
    Conflict {
        kind: &'static str,
        name: String,
        from_id: String,
        to_id: String,
    },
}

/// The records of `recs` that the destination lacks or holds otherwise;
/// counts the equal ones in `unchanged`. A name that the destination
/// gives another ID is a conflict.
fn to_write<'a, R: PartialEq>(
    kind: &'static str,
    recs: &'a [R],
    name_and_id: impl Fn(&R) -> (&String, &String),
    existing: impl Fn(&str) -> Result<Option<R>>,
    unchanged: &mut usize,
) -> std::result::Result<Vec<&'a R>, CopyError> {
    let mut out = Vec::new();
    for r in recs {
        let (name, id) = name_and_id(r);
        match existing(name)? {
            Some(t) if name_and_id(&t).1 != id => {
                return Err(CopyError::Conflict {
                    kind,
                    name: name.clone(),
                    from_id: id.clone(),
                    to_id: name_and_id(&t).1.clone(),
                });
            }
            Some(t) if &t == r => *unchanged += 1,
            _ => out.push(r),
        }
    }
    Ok(out)
}

/// What [`copy_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    pub volumes: usize,
    pub snapshots: usize,
    /// Records the destination already held, equal.
    pub unchanged: usize,
}

/// Copies every volume and snapshot record from `from` into `to` (from
/// the embedded store into custom resources, when a controller moves into
/// Kubernetes). Node records are not copied: nodes register again. Runs
/// again safely: equal records are left alone. A name that means another
/// ID in `to` stops the copy before anything is written.
pub fn copy_all(from: &dyn Records, to: &dyn Records) -> std::result::Result<Copied, CopyError> {
    let volumes = from.volumes()?;
    let snapshots = from.snapshots()?;
    let mut copied = Copied::default();
    let volume_puts = to_write(
        "volume",
        &volumes,
        |v| (&v.name, &v.volume_id),
        |name| to.volume_by_name(name),
        &mut copied.unchanged,
    )?;
    let snapshot_puts = to_write(
        "snapshot",
        &snapshots,
        |s| (&s.name, &s.snapshot_id),
        |name| to.snapshot_by_name(name),
        &mut copied.unchanged,
    )?;
    for v in volume_puts {
        to.put_volume(v)?;
        copied.volumes += 1;
    }
    for sn in snapshot_puts {
        to.put_snapshot(sn)?;
        copied.snapshots += 1;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(name: &str, id: &str) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            volume_id: id.into(),
            capacity_bytes: 4096,
            parameters: BTreeMap::new(),
            source: Some(ContentSource::Snapshot("s".into())),
            node: "n".into(),
            anywhere: false,
            state: RecordState::Creating,
            created_unix_ns: 1,
            moving: None,
            lost_with: None,
            claim: None,
        }
    }

    /// A store is made whole before it has its name: a half-made one
    /// left by a killed creation (under its temporary name) is ignored,
    /// and creating where a store already is never replaces it.
    #[test]
    fn a_store_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.redb");
        let leftover = path.with_extension(format!("new.{}", std::process::id()));
        std::fs::write(&leftover, b"half a database").unwrap();
        let r = EmbeddedRecords::open(&path).unwrap();
        assert!(!leftover.exists());
        r.put_volume(&volume("pvc-1", "id-1")).unwrap();
        drop(r);
        EmbeddedRecords::create(&path).unwrap();
        let r = EmbeddedRecords::open(&path).unwrap();
        assert!(
            r.volume("id-1").unwrap().is_some(),
            "the store was replaced"
        );
    }

    #[test]
    fn names_and_ids_map_both_ways_and_delete_together() {
        let dir = tempfile::tempdir().unwrap();
        let r = EmbeddedRecords::open(&dir.path().join("records.redb")).unwrap();
        r.put_volume(&volume("pvc-1", "id-1")).unwrap();
        assert_eq!(
            r.volume_by_name("pvc-1").unwrap().unwrap().volume_id,
            "id-1"
        );
        assert_eq!(r.volume("id-1").unwrap().unwrap().name, "pvc-1");
        r.delete_volume("id-1").unwrap();
        assert!(r.volume_by_name("pvc-1").unwrap().is_none());
        r.delete_volume("id-1").expect("deleting twice is fine");
    }

    /// A writer that read a record before `strata node forget` marked it
    /// lost writes it back without the mark: the mark stays.
    #[test]
    fn a_put_never_takes_a_loss_back() {
        let dir = tempfile::tempdir().unwrap();
        let r = EmbeddedRecords::open(&dir.path().join("records.redb")).unwrap();
        let read_before = volume("pvc-1", "id-1");
        let mut marked = read_before.clone();
        marked.lost_with = Some("n".into());
        r.put_volume(&marked).unwrap();
        let mut moved = read_before;
        moved.node = "m".into();
        r.put_volume(&moved).unwrap();
        let now = r.volume("id-1").unwrap().unwrap();
        assert_eq!(
            (now.node.as_str(), now.lost_with.as_deref()),
            ("m", Some("n"))
        );
        let read_before = snapshot("snap-1", "s-1");
        let mut marked = read_before.clone();
        marked.lost_with = Some("n".into());
        r.put_snapshot(&marked).unwrap();
        r.put_snapshot(&read_before).unwrap();
        let now = r.snapshot("s-1").unwrap().unwrap();
        assert_eq!(now.lost_with.as_deref(), Some("n"));
    }

    #[test]
    fn an_update_never_brings_back_a_deleted_record() {
        let dir = tempfile::tempdir().unwrap();
        let r = EmbeddedRecords::open(&dir.path().join("records.redb")).unwrap();
        let to_m = &mut |v: &mut VolumeRecord| {
            v.node = "m".into();
            true
        };
        assert!(!r.update_volume("id-1", to_m).unwrap());
        assert!(r.volume("id-1").unwrap().is_none());
        assert!(r.volume_by_name("pvc-1").unwrap().is_none());
        // Applied to the record stored, not to what the writer read: a
        // size written meanwhile stays.
        let mut v = volume("pvc-1", "id-1");
        v.capacity_bytes = 8192;
        r.put_volume(&v).unwrap();
        assert!(r.update_volume("id-1", to_m).unwrap());
        let now = r.volume("id-1").unwrap().unwrap();
        assert_eq!((now.node.as_str(), now.capacity_bytes), ("m", 8192));
        assert!(!r.update_volume("id-1", &mut |_| false).unwrap());
        assert!(!r.update_snapshot("s-1", &mut |_| true).unwrap());
        assert!(r.snapshot("s-1").unwrap().is_none());
    }

    fn snapshot(name: &str, id: &str) -> SnapshotRecord {
        SnapshotRecord {
            name: name.into(),
            snapshot_id: id.into(),
            source_volume_id: "id-1".into(),
            size_bytes: 4096,
            node: "n".into(),
            state: RecordState::Ready,
            created_unix_ns: 2,
            group: None,
            moving: None,
            lost_with: None,
        }
    }

    #[test]
    fn copies_run_again_safely_and_refuse_a_name_that_means_another_id() {
        let dir = tempfile::tempdir().unwrap();
        let from = EmbeddedRecords::open(&dir.path().join("from.redb")).unwrap();
        let to = EmbeddedRecords::open(&dir.path().join("to.redb")).unwrap();
        from.put_volume(&volume("pvc-1", "id-1")).unwrap();
        from.put_volume(&volume("pvc-2", "id-2")).unwrap();
        from.put_snapshot(&snapshot("snap-1", "s-1")).unwrap();
        let done = copy_all(&from, &to).unwrap();
        assert_eq!((done.volumes, done.snapshots, done.unchanged), (2, 1, 0));
        assert_eq!(to.volumes().unwrap(), from.volumes().unwrap());
        assert_eq!(to.snapshots().unwrap(), from.snapshots().unwrap());
        // Again: nothing to do. A changed record is copied over.
        assert_eq!(copy_all(&from, &to).unwrap().unchanged, 3);
        let mut grown = volume("pvc-2", "id-2");
        grown.capacity_bytes = 8192;
        from.put_volume(&grown).unwrap();
        let done = copy_all(&from, &to).unwrap();
        assert_eq!((done.volumes, done.unchanged), (1, 2));
        assert_eq!(to.volume("id-2").unwrap().unwrap().capacity_bytes, 8192);
        // The destination knows pvc-3 as another volume: refused, and
        // nothing else is written either.
        to.put_volume(&volume("pvc-3", "other")).unwrap();
        from.put_volume(&volume("pvc-3", "id-3")).unwrap();
        from.put_snapshot(&snapshot("snap-2", "s-2")).unwrap();
        let e = copy_all(&from, &to).unwrap_err();
        assert!(
            matches!(e, CopyError::Conflict { kind: "volume", .. }),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("\"pvc-3\" is id-3 in the source but other"),
            "{e}"
        );
        assert!(to.snapshot("s-2").unwrap().is_none());
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.redb");
        EmbeddedRecords::open(&path)
            .unwrap()
            .put_volume(&volume("a", "1"))
            .unwrap();
        let r = EmbeddedRecords::open(&path).unwrap();
        assert_eq!(r.volume("1").unwrap(), Some(volume("a", "1")));
    }

    /// A new leader waits for the old one to let go of the store.
    #[test]
    fn a_store_held_open_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.redb");
        let held = EmbeddedRecords::open(&path).unwrap();
        assert!(
            EmbeddedRecords::open(&path).is_err(),
            "held: refused at once"
        );
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        EmbeddedRecords::open_waiting(&path, std::time::Duration::from_secs(10)).unwrap();
        releaser.join().unwrap();
    }
}
