//! The Kubernetes backend of the cluster records: [`KubeRecords`] keeps
//! volumes, snapshots and nodes as Strata's custom resources ([`crd`]),
//! [`lease`] elects the one controller that may act, and [`events`] tells
//! users on their PVCs.
//!
//! Writes use optimistic concurrency: a put reads the object, replaces it
//! with the resourceVersion it read, then replaces the status subresource
//! with the version that write returned; a 409 Conflict (someone wrote in
//! between) starts the put again, a few times. Reads are plain GETs and
//! LISTs: no watches, no caches that could be stale.
//!
//! The [`Records`] trait is synchronous (the embedded store is). Its
//! callers run it on blocking threads; this backend drives its requests on
//! the runtime handle it was made with.

pub mod crd;
pub mod events;
pub mod lease;

use std::fmt::Debug;

use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::core::object::{HasSpec, HasStatus};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::runtime::Handle;

use self::crd::*;
use super::ClaimRef;
use super::moves::{Move, MovePhase};
use super::records::*;

/// Label on volume and snapshot objects: a hash of the CSI name (names may
/// be longer than a label value), so a lookup by name lists one object.
pub const NAME_HASH_LABEL: &str = "strata.dev/csi-name-hash";
/// How many times a put starts again after a conflict.
const CONFLICT_RETRIES: usize = 5;

/// Records as custom resources through the Kubernetes API.
#[derive(Clone)]
pub struct KubeRecords {
    client: Client,
    rt: Handle,
}

impl Debug for KubeRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRecords").finish_non_exhaustive()
    }
}

fn api_err(e: kube::Error) -> RecordsError {
    RecordsError::Store(format!("Kubernetes API: {e}"))
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

fn name_hash(name: &str) -> String {
    format!("{:08x}", crc32fast::hash(name.as_bytes()))
}

fn state_label(s: RecordState) -> String {
    match s {
        RecordState::Creating => "Creating".into(),
        RecordState::Ready => "Ready".into(),
    }
}

fn record_state(status: Option<&RecordStatus>) -> RecordState {
    match status.map(|s| s.state.as_str()) {
        Some("Ready") => RecordState::Ready,
        // No status yet: the create was cut short before it was set.
        _ => RecordState::Creating,
    }
}

fn volume_object(r: &VolumeRecord) -> StrataVolume {
    let mut o = StrataVolume::new(
        &r.volume_id,
        StrataVolumeSpec {
            csi_name: r.name.clone(),
            capacity_bytes: r.capacity_bytes,
            parameters: r.parameters.clone(),
            source: r.source.as_ref().map(|s| match s {
                ContentSource::Snapshot(id) => SourceSpec {
                    snapshot: Some(id.clone()),
                    volume: None,
                },
                ContentSource::Volume(id) => SourceSpec {
                    snapshot: None,
                    volume: Some(id.clone()),
                },
            }),
            node: r.node.clone(),
            anywhere: r.anywhere,
            created_unix_ns: r.created_unix_ns,
            moving: r.moving.as_ref().map(move_spec),
            claim: r.claim.as_ref().map(|c| ClaimSpec {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
            }),
            lost_with: r.lost_with.clone(),
        },
    );
    o.labels_mut()
        .insert(NAME_HASH_LABEL.into(), name_hash(&r.name));
    o.status = Some(RecordStatus {
        state: state_label(r.state),
    });
    o
}

fn volume_record(o: &StrataVolume) -> VolumeRecord {
    let s = &o.spec;
    VolumeRecord {
        name: s.csi_name.clone(),
        volume_id: o.name_any(),
        capacity_bytes: s.capacity_bytes,
        parameters: s.parameters.clone(),
        source: s
            .source
            .as_ref()
            .and_then(|src| match (&src.snapshot, &src.volume) {
                (Some(id), _) => Some(ContentSource::Snapshot(id.clone())),
                (None, Some(id)) => Some(ContentSource::Volume(id.clone())),
                (None, None) => None,
            }),
        node: s.node.clone(),
        anywhere: s.anywhere,
        state: record_state(o.status.as_ref()),
        created_unix_ns: s.created_unix_ns,
        moving: s.moving.as_ref().map(move_of),
        claim: s.claim.as_ref().map(|c| ClaimRef {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
        }),
        lost_with: s.lost_with.clone(),
    }
}

fn move_spec(m: &Move) -> MoveSpec {
    MoveSpec {
        from: m.from.clone(),
        to: m.to.clone(),
        lazy: m.lazy,
        live: m.live,
        published_to: m.published_to.clone(),
        read_only: m.read_only,
        sealed_boot: m.sealed_boot.clone(),
        phase: m.phase.label().into(),
        message: m.message.clone(),
        started_unix_ns: m.started_unix_ns,
    }
}

fn move_of(m: &MoveSpec) -> Move {
    Move {
        from: m.from.clone(),
        to: m.to.clone(),
        lazy: m.lazy,
        live: m.live,
        published_to: m.published_to.clone(),
        read_only: m.read_only,
        sealed_boot: m.sealed_boot.clone(),
        // A newer controller's phase is left alone.
        phase: MovePhase::from_label(&m.phase).unwrap_or(MovePhase::Unknown),
        message: m.message.clone(),
        started_unix_ns: m.started_unix_ns,
    }
}

fn snapshot_object(r: &SnapshotRecord) -> StrataSnapshot {
    let mut o = StrataSnapshot::new(
        &r.snapshot_id,
        StrataSnapshotSpec {
            csi_name: r.name.clone(),
            source_volume: r.source_volume_id.clone(),
            size_bytes: r.size_bytes,
            node: r.node.clone(),
            created_unix_ns: r.created_unix_ns,
            group_id: r.group.as_ref().map(|g| g.id.clone()),
            group_name: r.group.as_ref().map(|g| g.name.clone()),
            moving: r.moving.as_ref().map(move_spec),
            lost_with: r.lost_with.clone(),
        },
    );
    o.labels_mut()
        .insert(NAME_HASH_LABEL.into(), name_hash(&r.name));
    o.status = Some(RecordStatus {
        state: state_label(r.state),
    });
    o
}

fn snapshot_record(o: &StrataSnapshot) -> SnapshotRecord {
    let s = &o.spec;
    SnapshotRecord {
        name: s.csi_name.clone(),
        snapshot_id: o.name_any(),
        source_volume_id: s.source_volume.clone(),
        size_bytes: s.size_bytes,
        node: s.node.clone(),
        state: record_state(o.status.as_ref()),
        created_unix_ns: s.created_unix_ns,
        group: s.group_id.clone().map(|id| GroupRef {
            id,
            name: s.group_name.clone().unwrap_or_default(),
        }),
        moving: s.moving.as_ref().map(move_of),
        lost_with: s.lost_with.clone(),
    }
}

fn node_object(r: &NodeRecord) -> StrataNode {
    let mut o = StrataNode::new(
        &r.node_id,
        StrataNodeSpec {
            agent_address: r.agent_address.clone(),
            draining: r.draining,
        },
    );
    o.status = Some(StrataNodeStatus {
        version: r.version.clone(),
        capacity_bytes: r.capacity_bytes,
        available_bytes: r.available_bytes,
        provisioned_bytes: r.provisioned_bytes,
        max_volumes: r.max_volumes,
        volumes: r.volumes,
        state: match r.state {
            NodeState::Ready => "Ready".into(),
            NodeState::Stale => "Stale".into(),
        },
        message: r.message.clone(),
        last_seen_unix_ns: r.last_seen_unix_ns,
    });
    o
}

fn node_record(o: &StrataNode) -> NodeRecord {
    let st = o.status.clone().unwrap_or_default();
    NodeRecord {
        node_id: o.name_any(),
        agent_address: o.spec.agent_address.clone(),
        version: st.version,
        capacity_bytes: st.capacity_bytes,
        available_bytes: st.available_bytes,
        provisioned_bytes: st.provisioned_bytes,
        max_volumes: st.max_volumes,
        volumes: st.volumes,
        state: if st.state == "Stale" {
            NodeState::Stale
        } else {
            NodeState::Ready
        },
        message: st.message,
        last_seen_unix_ns: st.last_seen_unix_ns,
        draining: o.spec.draining,
    }
}

/// What the generic put needs of a resource type.
trait Object:
    Resource<DynamicType = ()>
    + HasSpec<Spec: PartialEq>
    + HasStatus<Status: PartialEq + Clone>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
{
}

impl<K> Object for K where
    K: Resource<DynamicType = ()>
        + HasSpec<Spec: PartialEq>
        + HasStatus<Status: PartialEq + Clone>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
{
}

/// Writes `want` (spec, labels and status) with optimistic concurrency;
/// `keep` takes what must survive from the object there into the spec to
/// write.
async fn put<K: Object>(
    api: &Api<K>,
    want: &K,
    keep: impl Fn(&K, &mut K),
) -> Result<(), RecordsError> {
    let name = want.name_any();
    for _ in 0..CONFLICT_RETRIES {
        let cur = api.get_opt(&name).await.map_err(api_err)?;
        match write(api, want, cur, &keep).await? {
            Attempt::Written => return Ok(()),
            Attempt::Conflict => {}
            Attempt::Gone => {
                return Err(RecordsError::Store(format!(
                    "{name}: deleted while it was written"
                )));
            }
        }
    }
    Err(RecordsError::Store(format!(
        "{name}: still conflicting after {CONFLICT_RETRIES} attempts"
    )))
}

/// Changes the object `name` as it is now (`change` gets its record, and
/// runs again after a conflict) and writes it with optimistic concurrency,
/// unless there is none or `change` answers false; whether it wrote.
async fn update<K: Object, R>(
    api: &Api<K>,
    name: &str,
    record: fn(&K) -> R,
    object: fn(&R) -> K,
    change: &mut dyn FnMut(&mut R) -> bool,
) -> Result<bool, RecordsError> {
    for _ in 0..CONFLICT_RETRIES {
        let Some(cur) = api.get_opt(name).await.map_err(api_err)? else {
            return Ok(false);
        };
        let mut rec = record(&cur);
        if !change(&mut rec) {
            return Ok(false);
        }
        match write(api, &object(&rec), Some(cur), &|_, _| {}).await? {
            Attempt::Written => return Ok(true),
            Attempt::Conflict => {}
            Attempt::Gone => return Ok(false),
        }
    }
    Err(RecordsError::Store(format!(
        "{name}: still conflicting after {CONFLICT_RETRIES} attempts"
    )))
}

/// What one attempt at a write came to.
enum Attempt {
    Written,
    /// Someone wrote in between: read again.
    Conflict,
    /// Deleted since it was read.
    Gone,
}

/// One attempt at writing `want` over `cur`, the object read (`None`:
/// there was none, and it is created): its spec and labels at the
/// resourceVersion read, then its status at the version that write made.
async fn write<K: Object>(
    api: &Api<K>,
    want: &K,
    cur: Option<K>,
    keep: &dyn Fn(&K, &mut K),
) -> Result<Attempt, RecordsError> {
    let name = want.name_any();
    let pp = PostParams::default();
    let written = match cur {
        None => match api.create(&pp, want).await {
            Ok(o) => o,
            Err(e) => return refused(e),
        },
        Some(cur) => {
            let mut next = want.clone();
            keep(&cur, &mut next);
            if cur.spec() == next.spec() && cur.labels() == next.labels() {
                cur
            } else {
                next.meta_mut().resource_version = cur.resource_version();
                match api.replace(&name, &pp, &next).await {
                    Ok(o) => o,
                    Err(e) => return refused(e),
                }
            }
        }
    };
    if written.status() == want.status() {
        return Ok(Attempt::Written);
    }
    let mut next = written.clone();
    *next.status_mut() = want.status().cloned();
    match api.replace_status(&name, &pp, &next).await {
        Ok(_) => Ok(Attempt::Written),
        Err(e) => refused(e),
    }
}

/// A write the API server refused: a conflict (409, also a create that
/// found the object made meanwhile), gone (404), or an error.
fn refused(e: kube::Error) -> Result<Attempt, RecordsError> {
    match code(&e) {
        Some(409) => Ok(Attempt::Conflict),
        Some(404) => Ok(Attempt::Gone),
        _ => Err(api_err(e)),
    }
}

/// A loss is never taken back (as the embedded store's puts): a writer
/// that read the record before `strata node forget` marked it does not
/// unmark it; the replace conflicts if the mark lands after this read.
fn keep_loss(cur: &Option<String>, next: &mut Option<String>) {
    if next.is_none() {
        next.clone_from(cur);
    }
}

async fn delete<K: Object>(api: &Api<K>, name: &str) -> Result<(), RecordsError> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(e) if code(&e) == Some(404) => Ok(()),
        Err(e) => Err(api_err(e)),
    }
}

async fn get<K: Object>(api: &Api<K>, name: &str) -> Result<Option<K>, RecordsError> {
    api.get_opt(name).await.map_err(api_err)
}

/// Every object matching `lp`, page by page, sorted by name.
async fn list<K: Object>(api: &Api<K>, lp: ListParams) -> Result<Vec<K>, RecordsError> {
    let mut lp = lp.limit(500);
    let mut out = Vec::new();
    loop {
        let page = api.list(&lp).await.map_err(api_err)?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    out.sort_by_key(|o| o.name_any());
    Ok(out)
}

fn by_hash(name: &str) -> ListParams {
    ListParams::default().labels(&format!("{NAME_HASH_LABEL}={}", name_hash(name)))
}

impl KubeRecords {
    /// Records through `client`; calls are driven on `rt`.
    pub fn new(client: Client, rt: Handle) -> Self {
        KubeRecords { client, rt }
    }

    fn api<K: Resource<Scope = kube::core::ClusterResourceScope, DynamicType = ()>>(
        &self,
    ) -> Api<K> {
        Api::all(self.client.clone())
    }

    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(f)
    }
}

impl Records for KubeRecords {
    fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>, RecordsError> {
        let all = self.block(list(&self.api::<StrataVolume>(), by_hash(name)))?;
        Ok(all
            .iter()
            .find(|o| o.spec.csi_name == name)
            .map(volume_record))
    }
    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>, RecordsError> {
        Ok(self
            .block(get(&self.api::<StrataVolume>(), id))?
            .as_ref()
            .map(volume_record))
    }
    fn put_volume(&self, rec: &VolumeRecord) -> Result<(), RecordsError> {
        self.block(put(&self.api(), &volume_object(rec), |cur, next| {
            keep_loss(&cur.spec.lost_with, &mut next.spec.lost_with)
        }))
    }
    fn update_volume(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut VolumeRecord) -> bool,
    ) -> Result<bool, RecordsError> {
        self.block(update(
            &self.api(),
            id,
            volume_record,
            volume_object,
            change,
        ))
    }
    fn delete_volume(&self, id: &str) -> Result<(), RecordsError> {
        self.block(delete(&self.api::<StrataVolume>(), id))
    }
    fn snapshot_by_name(&self, name: &str) -> Result<Option<SnapshotRecord>, RecordsError> {
        let all = self.block(list(&self.api::<StrataSnapshot>(), by_hash(name)))?;
        Ok(all
            .iter()
            .find(|o| o.spec.csi_name == name)
            .map(snapshot_record))
    }
    fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, RecordsError> {
        Ok(self
            .block(get(&self.api::<StrataSnapshot>(), id))?
            .as_ref()
            .map(snapshot_record))
    }
    fn put_snapshot(&self, rec: &SnapshotRecord) -> Result<(), RecordsError> {
        self.block(put(&self.api(), &snapshot_object(rec), |cur, next| {
            keep_loss(&cur.spec.lost_with, &mut next.spec.lost_with)
        }))
    }
    fn update_snapshot(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut SnapshotRecord) -> bool,
    ) -> Result<bool, RecordsError> {
        self.block(update(
            &self.api(),
            id,
            snapshot_record,
            snapshot_object,
            change,
        ))
    }
    fn delete_snapshot(&self, id: &str) -> Result<(), RecordsError> {
        self.block(delete(&self.api::<StrataSnapshot>(), id))
    }
    fn volumes(&self) -> Result<Vec<VolumeRecord>, RecordsError> {
        let all = self.block(list(&self.api::<StrataVolume>(), ListParams::default()))?;
        Ok(all.iter().map(volume_record).collect())
    }
    fn snapshots(&self) -> Result<Vec<SnapshotRecord>, RecordsError> {
        let all = self.block(list(&self.api::<StrataSnapshot>(), ListParams::default()))?;
        Ok(all.iter().map(snapshot_record).collect())
    }
    fn node(&self, id: &str) -> Result<Option<NodeRecord>, RecordsError> {
        Ok(self
            .block(get(&self.api::<StrataNode>(), id))?
            .as_ref()
            .map(node_record))
    }
    fn nodes(&self) -> Result<Vec<NodeRecord>, RecordsError> {
        let all = self.block(list(&self.api::<StrataNode>(), ListParams::default()))?;
        Ok(all.iter().map(node_record).collect())
    }
    fn put_node(&self, rec: &NodeRecord) -> Result<(), RecordsError> {
        let keep = |cur: &StrataNode, next: &mut StrataNode| {
            next.spec.draining = cur.spec.draining;
        };
        self.block(put(&self.api(), &node_object(rec), keep))
    }
    fn set_node_draining(&self, id: &str, draining: bool) -> Result<bool, RecordsError> {
        self.block(update(
            &self.api(),
            id,
            node_record,
            node_object,
            &mut |n: &mut NodeRecord| {
                n.draining = draining;
                true
            },
        ))
    }
    fn delete_node(&self, id: &str) -> Result<(), RecordsError> {
        self.block(delete(&self.api::<StrataNode>(), id))
    }
}

#[cfg(test)]
mod tests;
