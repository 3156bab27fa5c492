//! Frontends: how volumes and snapshots reach clients and kernels. Every
//! frontend serves [`Export`]s, a uniform face over a writable volume, a
//! read-only snapshot and a volume another node holds ([`RemoteDevice`],
//! reached through the data path between nodes):
//! - `nbd`: the NBD server (for tools, and the kernel's nbd client);
//! - `fuse`: a volume as one file in a FUSE filesystem (for a loop device,
//!   where the kernel has no nbd driver);
//! - `iscsi`: the iSCSI target (for initiators, and the kernel's iSCSI
//!   initiator).

pub mod fuse;
pub mod iscsi;
pub mod nbd;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::engine::{
    DepthExtent, Error, Extent, Pool, Result, SnapshotId, SnapshotReader, Volume, VolumeId,
    ZeroFlags,
};
use crate::metrics::{Metrics, OpMetrics};

/// Per-operation metric handles of one export, resolved once per
/// connection so the I/O path never builds label sets.
#[derive(Debug)]
pub(crate) struct IoMetrics {
    pub read: OpMetrics,
    pub write: OpMetrics,
    pub flush: OpMetrics,
    pub trim: OpMetrics,
    pub zero: OpMetrics,
    pub status: OpMetrics,
    pub cache: OpMetrics,
}

impl IoMetrics {
    pub(crate) fn new(metrics: &Metrics, export: &str) -> Self {
        IoMetrics {
            read: metrics.op(export, "read"),
            write: metrics.op(export, "write"),
            flush: metrics.op(export, "flush"),
            trim: metrics.op(export, "trim"),
            zero: metrics.op(export, "write_zeroes"),
            status: metrics.op(export, "block_status"),
            cache: metrics.op(export, "cache"),
        }
    }
}

/// `PR_SET_IO_FLUSHER` (Linux 5.6): not in the libc crate.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks the calling thread as one that completes I/O the kernel may be
/// waiting on to reclaim memory (a server of a mounted volume): its own
/// allocations then never recurse into filesystem writeback, which would
/// deadlock on itself. Needs CAP_SYS_RESOURCE; without it, warns once.
pub(crate) fn mark_io_flusher() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    // SAFETY: prctl with an integer option and integer arguments.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc != 0 && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot mark I/O threads PR_SET_IO_FLUSHER (needs CAP_SYS_RESOURCE); \
             under memory pressure a mounted volume may stall"
        );
    }
}

/// A volume another node holds, as this node's frontends see it: every
/// call goes to the owner and returns once the owner answered (a FLUSH or
/// FUA write once it is durable there).
pub trait RemoteDevice: std::fmt::Debug + Send + Sync {
    /// The volume's ID.
    fn name(&self) -> String;
    fn size(&self) -> u64;
    /// Published read-only: writes are refused.
    fn read_only(&self) -> bool;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    fn flush(&self) -> Result<()>;
    fn trim(&self, offset: u64, len: u64) -> Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;
}

/// Something a frontend serves: a volume (read-write), a snapshot
/// (read-only; it pins the layers it reads while open), or a volume held
/// by another node.
#[derive(Debug, Clone)]
pub enum Export {
    Volume(Arc<Volume>),
    Snapshot(SnapshotReader),
    Remote(Arc<dyn RemoteDevice>),
}

/// What a server can open by name: the pool's volumes and snapshots, and
/// the volumes of other nodes attached here.
#[derive(Debug, Clone)]
pub struct Exports {
    pool: Pool,
    remote: Arc<Mutex<HashMap<String, Arc<dyn RemoteDevice>>>>,
}

impl Exports {
    pub fn new(pool: Pool) -> Self {
        Exports {
            pool,
            remote: Arc::default(),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Makes a volume of another node openable by its ID, until removed.
    pub fn add_remote(&self, device: Arc<dyn RemoteDevice>) {
        let mut remote = self.remote.lock().expect("remote exports");
        remote.insert(device.name(), device);
    }

    pub fn remove_remote(&self, name: &str) {
        self.remote.lock().expect("remote exports").remove(name);
    }

    /// Opens the export named `name`.
    pub fn open(&self, name: &str) -> Result<Option<Export>> {
        if let Some(r) = self.remote.lock().expect("remote exports").get(name) {
            return Ok(Some(Export::Remote(Arc::clone(r))));
        }
        Export::open(&self.pool, name)
    }

    /// The pool's exports (remote volumes are served to this node's
    /// kernel, not listed).
    pub fn list(&self) -> Result<Vec<(String, String)>> {
        Export::list(&self.pool)
    }
}

impl Export {
    /// Opens the export named `name`: a volume ID or a snapshot ID.
    pub fn open(pool: &Pool, name: &str) -> Result<Option<Export>> {
        if let Ok(id) = name.parse::<VolumeId>() {
            match pool.volume(id) {
                Ok(v) => return Ok(Some(Export::Volume(v))),
                Err(Error::VolumeNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if let Ok(id) = name.parse::<SnapshotId>() {
            match pool.open_snapshot(id) {
                Ok(s) => return Ok(Some(Export::Snapshot(s))),
                Err(Error::SnapshotNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Every export of the pool: `(name, description)`.
    pub fn list(pool: &Pool) -> Result<Vec<(String, String)>> {
        let mut out: Vec<(String, String)> = pool
            .list_volumes()?
            .into_iter()
            .map(|v| (v.id.to_string(), format!("volume, {} bytes", v.size_bytes)))
            .collect();
        out.extend(pool.list_snapshots()?.into_iter().map(|s| {
            (
                s.id.to_string(),
                format!(
                    "snapshot of volume {}, {} bytes, read-only",
                    s.volume, s.size_bytes
                ),
            )
        }));
        Ok(out)
    }

    /// The export's name (its ID).
    pub fn name(&self) -> String {
        match self {
            Export::Volume(v) => v.id().to_string(),
            Export::Snapshot(s) => s.id().to_string(),
            Export::Remote(r) => r.name(),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Export::Volume(v) => v.size(),
            Export::Snapshot(s) => s.size(),
            Export::Remote(r) => r.size(),
        }
    }

    pub fn read_only(&self) -> bool {
        match self {
            Export::Volume(_) => false,
            Export::Snapshot(_) => true,
            Export::Remote(r) => r.read_only(),
        }
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Export::Volume(v) => v.read(offset, buf),
            Export::Snapshot(s) => s.read(offset, buf),
            Export::Remote(r) => r.read(offset, buf),
        }
    }

    fn read_only_error(&self) -> Error {
        Error::ReadOnly(match self {
            Export::Snapshot(_) => format!("snapshot {}", self.name()),
            _ => format!("volume {} (published read-only)", self.name()),
        })
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        match self {
            Export::Volume(v) => v.write(offset, data, fua),
            Export::Remote(r) if !r.read_only() => r.write(offset, data, fua),
            Export::Snapshot(_) | Export::Remote(_) => Err(self.read_only_error()),
        }
    }

    /// Flush; a no-op on a snapshot (nothing to make durable).
    pub fn flush(&self) -> Result<()> {
        match self {
            Export::Volume(v) => v.flush(),
            Export::Snapshot(_) => Ok(()),
            Export::Remote(r) => r.flush(),
        }
    }

    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Export::Volume(v) => v.trim(offset, len),
            Export::Remote(r) if !r.read_only() => r.trim(offset, len),
            Export::Snapshot(_) | Export::Remote(_) => Err(self.read_only_error()),
        }
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        match self {
            Export::Volume(v) => v.write_zeroes(offset, len, flags),
            Export::Remote(r) if !r.read_only() => r.write_zeroes(offset, len, flags),
            Export::Snapshot(_) | Export::Remote(_) => Err(self.read_only_error()),
        }
    }

    /// Writes `data` at `offset` if the bytes there equal `expect`, with
    /// no write to those blocks in between: the index of the first byte
    /// that differs (nothing written), or `None` once written. Not for a
    /// volume of another node ([`Export::has_layers`] is false).
    pub fn compare_and_write(
        &self,
        offset: u64,
        expect: &[u8],
        data: &[u8],
        fua: bool,
    ) -> Result<Option<usize>> {
        match self {
            Export::Volume(v) => v.compare_and_write(offset, expect, data, fua),
            Export::Snapshot(_) => Err(self.read_only_error()),
            Export::Remote(r) => Err(Error::Io {
                op: "compare and write",
                path: format!("volume {} (held by another node)", r.name()).into(),
                source: std::io::ErrorKind::Unsupported.into(),
            }),
        }
    }

    /// Whether [`Export::allocation_depth`] can answer (not for a volume
    /// of another node: its chain is the owner's).
    pub fn has_layers(&self) -> bool {
        !matches!(self, Export::Remote(_))
    }

    /// The runs of a range written or discarded since `base`, an older
    /// snapshot of the export's volume.
    pub fn changed_since(
        &self,
        base: SnapshotId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>> {
        match self {
            Export::Volume(v) => v.changed_since(base, offset, len),
            Export::Snapshot(s) => s.changed_since(base, offset, len),
            Export::Remote(r) => Err(Error::Io {
                op: "report the changes of",
                path: format!("volume {} (held by another node)", r.name()).into(),
                source: std::io::ErrorKind::Unsupported.into(),
            }),
        }
    }

    /// How deep in its chain each part of a range resolves.
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        match self {
            Export::Volume(v) => v.allocation_depth(offset, len),
            Export::Snapshot(s) => s.allocation_depth(offset, len),
            Export::Remote(r) => Err(Error::Io {
                op: "report the allocation depth of",
                path: format!("volume {} (held by another node)", r.name()).into(),
                source: std::io::ErrorKind::Unsupported.into(),
            }),
        }
    }

    /// Allocation of a range. A remote volume reports it all as data (the
    /// owner's maps are not fetched; reads stay correct).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        match self {
            Export::Volume(v) => v.block_status(offset, len),
            Export::Snapshot(s) => s.block_status(offset, len),
            Export::Remote(r) => {
                let end = r.size();
                if offset >= end {
                    return Ok(Vec::new());
                }
                Ok(vec![Extent {
                    len: len.min(end - offset),
                    zero: false,
                }])
            }
        }
    }
}
