//! The catalog's records and their encodings (layouts in `FORMAT.md`).

use super::codec::{Reader, Writer};
use crate::engine::error::{Error, Result};
use crate::engine::ids::{FamilyId, JobId, LayerId, SnapshotId, VolumeId};
use crate::engine::qos::Limits;

const VOLUME_V: u8 = 1;
const JOB_V: u8 = 1;
const POLICY_V: u8 = 1;
const FAULT_V: u8 = 1;
const LAYER_V: u8 = 1;
const SNAPSHOT_V: u8 = 1;
const FAMILY_V: u8 = 1;
const ATTACHMENT_V: u8 = 1;

/// A volume: the top of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeRecord {
    pub id: VolumeId,
    /// Logical size in bytes (whole blocks).
    pub size: u64,
    /// The writable layer on top of the chain.
    pub top: LayerId,
    /// Fencing epoch of the owner; bumped when ownership moves between
    /// nodes (reserved for volume moves; 1 for a volume that never moved).
    pub owner_epoch: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Last journal batch folded into the catalog (see `journal.rs`).
    pub journal_seq: u64,
}

impl VolumeRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VOLUME_V)
            .u128(self.id.0)
            .u64(self.size)
            .u128(self.top.0)
            .u64(self.owner_epoch)
            .u64(self.created_ns)
            .u64(self.journal_seq);
        w.0
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, "volume");
        r.version(VOLUME_V)?;
        Ok(VolumeRecord {
            id: VolumeId(r.u128()?),
            size: r.u64()?,
            top: LayerId(r.u128()?),
            owner_epoch: r.u64()?,
            created_ns: r.u64()?,
            journal_seq: r.u64()?,
        })
    }
}

/// A layer: a data file plus the presence map stored under its ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayerRecord {
    pub id: LayerId,
    pub family: FamilyId,
    /// The entry value naming this layer in the index (unique in the family).
    pub slot: u16,
    /// The layer below; `None` for a base layer.
    pub parent: Option<LayerId>,
    /// Frozen layers never change again.
    pub frozen: bool,
    /// The volume size this layer was written at.
    pub size: u64,
    /// References: volumes whose top it is, ready snapshots on it, and
    /// child layers. Zero references means the layer is deleted.
    pub refs: u32,
    /// The snapshot that froze this layer, if any (ready or deleted).
    pub snapshot: Option<SnapshotId>,
    pub created_ns: u64,
}

impl LayerRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(LAYER_V)
            .u128(self.id.0)
            .u128(self.family.0)
            .u16(self.slot)
            .opt_u128(self.parent.map(|p| p.0))
            .u8(u8::from(self.frozen))
            .u64(self.size)
            .u32(self.refs)
            .opt_u128(self.snapshot.map(|s| s.0))
            .u64(self.created_ns);
        w.0
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, "layer");
        r.version(LAYER_V)?;
        Ok(LayerRecord {
            id: LayerId(r.u128()?),
            family: FamilyId(r.u128()?),
            slot: r.u16()?,
            parent: r.opt_u128()?.map(LayerId),
            frozen: r.u8()? != 0,
            size: r.u64()?,
            refs: r.u32()?,
            snapshot: r.opt_u128()?.map(SnapshotId),
            created_ns: r.u64()?,
        })
    }
}

/// Whether a snapshot is visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SnapshotState {
    /// Visible, readable, clonable; holds a reference on its layer.
    Ready,
    /// Deleted by the user while other layers still build on its layer.
    /// Invisible and holds no reference; it records that the layer is now
    /// only an intermediate (a merge candidate) and goes when the layer goes.
    Deleted,
}

/// A snapshot: a name for a frozen layer and the size at snapshot time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotRecord {
    pub id: SnapshotId,
    /// The volume it was taken from (which may since have been deleted).
    pub volume: VolumeId,
    pub layer: LayerId,
    pub size: u64,
    pub created_ns: u64,
    pub state: SnapshotState,
}

impl SnapshotRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(SNAPSHOT_V)
            .u128(self.id.0)
            .u128(self.volume.0)
            .u128(self.layer.0)
            .u64(self.size)
            .u64(self.created_ns)
            .u8(match self.state {
                SnapshotState::Ready => 1,
                SnapshotState::Deleted => 2,
            });
        w.0
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, "snapshot");
        r.version(SNAPSHOT_V)?;
        Ok(SnapshotRecord {
            id: SnapshotId(r.u128()?),
            volume: VolumeId(r.u128()?),
            layer: LayerId(r.u128()?),
            size: r.u64()?,
            created_ns: r.u64()?,
            state: match r.u8()? {
                1 => SnapshotState::Ready,
                2 => SnapshotState::Deleted,
                s => return Err(Error::Corrupt(format!("snapshot state {s}"))),
            },
        })
    }
}

/// Slot allocation within a family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FamilyRecord {
    /// The lowest slot never handed out (65536 once all have been).
    pub next_slot: u32,
    /// Slots handed out and released since.
    pub free: Vec<u16>,
}

impl FamilyRecord {
    pub(crate) fn live(&self) -> u32 {
        self.next_slot - u32::from(crate::engine::index::FIRST_SLOT) - self.free.len() as u32
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(FAMILY_V)
            .u32(self.next_slot)
            .u32(self.free.len() as u32);
        for s in &self.free {
            w.u16(*s);
        }
        w.0
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, "family");
        r.version(FAMILY_V)?;
        let next_slot = r.u32()?;
        let n = r.u32()?;
        let free = (0..n).map(|_| r.u16()).collect::<Result<Vec<_>>>()?;
        Ok(FamilyRecord { next_slot, free })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let l = LayerRecord {
            id: LayerId(1),
            family: FamilyId(2),
            slot: 3,
            parent: Some(LayerId(4)),
            frozen: true,
            size: 8192,
            refs: 2,
            snapshot: None,
            created_ns: 5,
        };
        assert_eq!(LayerRecord::decode(&l.encode()).unwrap(), l);
        let s = SnapshotRecord {
            id: SnapshotId(1),
            volume: VolumeId(2),
            layer: LayerId(3),
            size: 4096,
            created_ns: 9,
            state: SnapshotState::Deleted,
        };
        assert_eq!(SnapshotRecord::decode(&s.encode()).unwrap(), s);
        let f = FamilyRecord {
            next_slot: 9,
            free: vec![3, 4],
        };
        assert_eq!(FamilyRecord::decode(&f.encode()).unwrap(), f);
        assert_eq!(f.live(), 5);
    }

    /// A policy written before limits existed reads as having none; one
    /// with limits round-trips and starts as the older one did (which an
    /// older build reads, ignoring the limits); another version is
    /// refused.
    #[test]
    fn policies_with_and_without_limits_are_read() {
        let v1 = [1u8, 7, 0, 0, 0];
        assert_eq!(
            VolumePolicy::decode(&v1).unwrap(),
            VolumePolicy {
                max_chain_depth: 7,
                limits: Limits::default()
            }
        );
        let p = VolumePolicy {
            max_chain_depth: 3,
            limits: Limits {
                read_iops: 1,
                write_iops: 2,
                read_bytes_per_sec: 3 << 20,
                write_bytes_per_sec: 4 << 20,
            },
        };
        assert_eq!(VolumePolicy::decode(&p.encode()).unwrap(), p);
        assert_eq!(p.encode()[..5], [1u8, 3, 0, 0, 0]);
        assert!(VolumePolicy::decode(&[3u8, 7, 0, 0, 0]).is_err());
    }

    #[test]
    fn attachments_round_trip_and_old_records_are_read_write() {
        for flags in 0..64 {
            let a = Attachment {
                node: "node-b".into(),
                epoch: 7,
                read_only: flags & 1 != 0,
                moved: flags & 2 != 0,
                for_move: flags & 4 != 0,
                live: flags & 8 != 0,
                repointed: flags & 16 != 0,
                sealed_boot: if flags & 32 != 0 {
                    "boot-1".into()
                } else {
                    String::new()
                },
            };
            assert_eq!(Attachment::decode(&a.encode()).unwrap(), a);
        }
        // As written before the flags byte existed.
        let mut w = Writer::default();
        w.u8(ATTACHMENT_V).u64(3).str("n");
        let old = Attachment::decode(&w.0).unwrap();
        assert_eq!((old.epoch, old.read_only), (3, false));
        for extra in [[0x80].as_slice(), &[1, 0], &[32, 9, 0, b'x']] {
            let mut bad = w.0.clone();
            bad.extend_from_slice(extra);
            assert!(matches!(Attachment::decode(&bad), Err(Error::Corrupt(_))));
        }
    }

    #[test]
    fn record_of_unknown_version_is_refused() {
        let mut bytes = VolumeRecord {
            id: VolumeId(1),
            size: 4096,
            top: LayerId(2),
            owner_epoch: 1,
            created_ns: 0,
            journal_seq: 0,
        }
        .encode();
        bytes[0] = 9;
        assert!(matches!(
            VolumeRecord::decode(&bytes),
            Err(Error::Corrupt(_))
        ));
    }
}

macro_rules! byte_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $v:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant = $v),+
        }

        impl $name {
            fn from_u8(v: u8) -> Result<Self> {
                match v {
                    $($v => Ok($name::$variant),)+
                    _ => Err(Error::Corrupt(format!("{} {v}", stringify!($name)))),
                }
            }
        }
    };
}

byte_enum!(
    /// What a job does.
    JobKind {
        /// Shorten a volume's chain: fold layers nothing else needs, then
        /// (past the depth limit) absorb parents into the top.
        Merge = 1,
        /// Make a volume independent of every layer under its top.
        Flatten = 2,
        /// Fold one layer that nothing needs on its own any more (its
        /// snapshot was deleted) into its only child.
        Fold = 3,
    }
);

byte_enum!(
    /// Why a job exists.
    JobReason {
        Request = 1,
        SnapshotDeleted = 2,
        DepthPolicy = 3,
        ClonePolicy = 4,
    }
);

byte_enum!(
    /// Where a job is.
    JobState {
        Queued = 1,
        Running = 2,
        Done = 3,
        Failed = 4,
    }
);

impl JobKind {
    pub fn label(self) -> &'static str {
        match self {
            JobKind::Merge => "merge",
            JobKind::Flatten => "flatten",
            JobKind::Fold => "fold",
        }
    }
}

impl JobReason {
    pub fn label(self) -> &'static str {
        match self {
            JobReason::Request => "requested",
            JobReason::SnapshotDeleted => "snapshot deleted",
            JobReason::DepthPolicy => "chain too deep",
            JobReason::ClonePolicy => "clone flattened by policy",
        }
    }
}

impl JobState {
    pub fn label(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }
}

/// A job, as the catalog keeps it (progress within a step is in memory:
/// after a crash the job is planned again from the chain, and every step
/// is idempotent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobRecord {
    pub id: JobId,
    pub kind: JobKind,
    /// A volume (merge, flatten) or a layer (fold).
    pub target: u128,
    /// Merge: the depth to shorten to (0: the volume's policy).
    pub max_depth: u32,
    pub reason: JobReason,
    pub state: JobState,
    pub created_ns: u64,
    pub finished_ns: u64,
    pub reflink_bytes: u64,
    pub copy_bytes: u64,
    /// Why it failed, or what it found (e.g. a layer it could not fold).
    pub message: String,
}

impl JobRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(JOB_V)
            .u128(self.id.0)
            .u8(self.kind as u8)
            .u128(self.target)
            .u32(self.max_depth)
            .u8(self.reason as u8)
            .u8(self.state as u8)
            .u64(self.created_ns)
            .u64(self.finished_ns)
            .u64(self.reflink_bytes)
            .u64(self.copy_bytes)
            .str(&self.message);
        w.0
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, "job");
        r.version(JOB_V)?;
        Ok(JobRecord {
            id: JobId(r.u128()?),
            kind: JobKind::from_u8(r.u8()?)?,
            target: r.u128()?,
            max_depth: r.u32()?,
            reason: JobReason::from_u8(r.u8()?)?,
            state: JobState::from_u8(r.u8()?)?,
            created_ns: r.u64()?,
            finished_ns: r.u64()?,
            reflink_bytes: r.u64()?,
            copy_bytes: r.u64()?,
            message: r.str()?,
        })
    }
}

/// A volume's merge policy and I/O limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VolumePolicy {
    /// Longest chain before a merge is queued (0: the pool's default).
    pub max_chain_depth: u32,
    /// I/O limits (none by default).
    pub limits: Limits,
}

impl VolumePolicy {
    /// Version 1, with the limits after it only when there are some: a
    /// build from before limits existed reads the record (and ignores
    /// them).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        let l = &self.limits;
        w.u8(POLICY_V).u32(self.max_chain_depth);
        if !l.is_unlimited() {
            w.u64(l.read_iops)
                .u64(l.write_iops)
                .u64(l.read_bytes_per_sec)
                .u64(l.write_bytes_per_sec);
        }
        w.0
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, "policy");
        r.version(POLICY_V)?;
        let max_chain_depth = r.u32()?;
        let limits = if r.is_empty() {
            Limits::default()
        } else {
            Limits {
                read_iops: r.u64()?,
                write_iops: r.u64()?,
                read_bytes_per_sec: r.u64()?,
                write_bytes_per_sec: r.u64()?,
            }
        };
        Ok(VolumePolicy {
            max_chain_depth,
            limits,
        })
    }
}

/// Which node may reach a volume from another node, under which epoch:
/// kept for the data path between nodes (the node agent's); the engine
/// only stores it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attachment {
    /// The node the volume is published to ("" for none).
    pub node: String,
    /// Raised at every change; grants of other epochs are refused.
    pub epoch: u64,
    /// The node may read and flush only.
    pub read_only: bool,
    /// A move copies the volume to `node` (read-only).
    pub for_move: bool,
    /// The volume's data moved to `node`: this copy is never attached
    /// again (it waits to be deleted).
    pub moved: bool,
    /// With `moved`: a live move sealed it (the volume was in use), and
    /// this copy serves nothing (see `engine::moving`).
    pub live: bool,
    /// Attached to `node` again after a live move's seal was undone (its
    /// target forgotten before the switch): older grants of `node` are
    /// answered as moved, so their I/O waits for the node to follow.
    pub repointed: bool,
    /// With `moved` and `live`: the machine's boot ID when it was sealed
    /// ("": not known), which the node that used the volume compares with
    /// the boot its writes not yet flushed were answered under.
    pub sealed_boot: String,
}

/// [`Attachment`] flags (an optional trailing byte: records written
/// before it existed are read-write).
const ATTACHMENT_READ_ONLY: u8 = 1;
const ATTACHMENT_MOVED: u8 = 2;
const ATTACHMENT_FOR_MOVE: u8 = 4;
const ATTACHMENT_LIVE: u8 = 8;
const ATTACHMENT_REPOINTED: u8 = 16;
/// A string follows the flags: the seal's boot ID.
const ATTACHMENT_SEALED_BOOT: u8 = 32;
const ATTACHMENT_FLAGS: u8 = ATTACHMENT_READ_ONLY
    | ATTACHMENT_SEALED_BOOT
    | ATTACHMENT_MOVED
    | ATTACHMENT_FOR_MOVE
    | ATTACHMENT_LIVE
    | ATTACHMENT_REPOINTED;

impl Attachment {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(ATTACHMENT_V).u64(self.epoch).str(&self.node);
        let flags = [
            (self.read_only, ATTACHMENT_READ_ONLY),
            (self.moved, ATTACHMENT_MOVED),
            (self.for_move, ATTACHMENT_FOR_MOVE),
            (self.live, ATTACHMENT_LIVE),
            (self.repointed, ATTACHMENT_REPOINTED),
            (!self.sealed_boot.is_empty(), ATTACHMENT_SEALED_BOOT),
        ]
        .iter()
        .fold(0, |f, &(set, bit)| if set { f | bit } else { f });
        if flags != 0 {
            w.u8(flags);
        }
        if !self.sealed_boot.is_empty() {
            w.str(&self.sealed_boot);
        }
        w.0
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, "attachment");
        r.version(ATTACHMENT_V)?;
        let (epoch, node) = (r.u64()?, r.str()?);
        let flags = if r.is_empty() { 0 } else { r.u8()? };
        let sealed_boot = if flags & ATTACHMENT_SEALED_BOOT != 0 {
            r.str()?
        } else {
            String::new()
        };
        if flags & !ATTACHMENT_FLAGS != 0 || !r.is_empty() {
            return Err(Error::Corrupt(format!(
                "attachment record has unknown flags {flags:#x} or trailing bytes"
            )));
        }
        Ok(Attachment {
            epoch,
            node,
            read_only: flags & ATTACHMENT_READ_ONLY != 0,
            moved: flags & ATTACHMENT_MOVED != 0,
            for_move: flags & ATTACHMENT_FOR_MOVE != 0,
            live: flags & ATTACHMENT_LIVE != 0,
            repointed: flags & ATTACHMENT_REPOINTED != 0,
            sealed_boot,
        })
    }
}

/// What went wrong with a volume's data (see `FORMAT.md`, "Faults").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Writes a previous process acknowledged could not all be saved: the
    /// first flush of every process that opens the volume fails with
    /// `UnflushedLost`, until a process flushes again after reporting it.
    UnflushedLost = 1,
    /// A write-back of the volume's data failed: writes and flushes fail
    /// with `DataLost` until an operator acknowledges the loss.
    DataLost = 2,
}

/// A volume's fault: `v=1 | kind u8 | since_ns u64 | message (u16
/// length, UTF-8)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub since_ns: u64,
    pub message: String,
}

impl FaultRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(FAULT_V)
            .u8(self.kind as u8)
            .u64(self.since_ns)
            .str(&self.message);
        w.0
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, "fault");
        r.version(FAULT_V)?;
        let kind = match r.u8()? {
            1 => FaultKind::UnflushedLost,
            2 => FaultKind::DataLost,
            k => return Err(Error::Corrupt(format!("unknown fault kind {k}"))),
        };
        Ok(FaultRecord {
            kind,
            since_ns: r.u64()?,
            message: r.str()?,
        })
    }
}
