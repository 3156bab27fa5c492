//! Read-only access to a snapshot (what an NBD snapshot export serves).

use std::sync::{Arc, Weak};

use super::error::{Error, Result};
use super::geometry::{BLOCK_SIZE, check_range, touched_blocks};
use super::ids::{LayerId, SnapshotId};
use super::pinned::{BlockRange, Pinned};
use super::pool::Shared;
use super::view::{self, DepthExtent, Extent, View, read_segments};

/// Reads a snapshot as of its layer. Holds (pins) the layers it reads, so
/// it keeps working after the snapshot is deleted.
#[derive(Debug, Clone)]
pub struct SnapshotReader {
    id: SnapshotId,
    size: u64,
    view: Arc<View>,
    /// The snapshot's layer, and the pool (not kept open by a reader), for
    /// [`Self::allocation_depth`].
    layer: LayerId,
    shared: Weak<Shared>,
}

impl SnapshotReader {
    pub(crate) fn new(
        id: SnapshotId,
        size: u64,
        view: Arc<View>,
        layer: LayerId,
        shared: Weak<Shared>,
    ) -> Self {
        SnapshotReader {
            id,
            size,
            view,
            layer,
            shared,
        }
    }

    /// The snapshot's ID.
    pub fn id(&self) -> SnapshotId {
        self.id
    }

    /// Size in bytes (the volume's size when the snapshot was taken).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Pins `ranges` of the snapshot (see [`Pinned`]): nothing to freeze,
    /// its layers are.
    pub fn pin(&self, ranges: &[BlockRange]) -> Result<Vec<Pinned>> {
        ranges
            .iter()
            .map(|r| {
                check_range(
                    r.first.saturating_mul(BLOCK_SIZE),
                    r.blocks.saturating_mul(BLOCK_SIZE),
                    self.size,
                )?;
                Ok(Pinned::new(
                    *r,
                    self.view.segments(r.first, r.first + r.blocks)?,
                ))
            })
            .collect()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (first, end) = touched_blocks(offset, buf.len() as u64);
        read_segments(&self.view.segments(first, end)?, offset, buf)
    }

    /// Allocation state of `offset..offset+len`.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        Ok(view::block_status(&self.view, offset, len, false))
    }

    /// The runs of `offset..offset+len` (whole blocks, `(offset, length)`)
    /// that changed since `base`, an older snapshot of the same volume
    /// (see `ranges.rs`).
    pub fn changed_since(
        &self,
        base: SnapshotId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>> {
        check_range(offset, len, self.size)?;
        let shared = self
            .shared
            .upgrade()
            .ok_or(Error::SnapshotNotFound(self.id))?;
        let _shape = shared.shape.lock().expect("shape lock");
        if shared.catalog.read()?.snapshot(self.id)?.is_none() {
            return Err(Error::SnapshotNotFound(self.id));
        }
        let mut since = shared.since(self.layer, base, &|| format!("snapshot {}", self.id))?;
        // The view as the catalog has it now: a fold since this reader
        // opened may have renamed the slots its own view names.
        let view = shared.view_of(self.layer)?;
        let mut out = Vec::new();
        shared.changed_runs(&view, &mut since, offset, len, &mut out)?;
        Ok(out)
    }

    /// How deep in the snapshot's chain each part of `offset..offset+len`
    /// resolves (see [`DepthExtent`]). Fails if a merge folded the
    /// snapshot's layers since it was opened (its chain is gone from the
    /// catalog; open it again).
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        check_range(offset, len, self.size)?;
        let shared = self
            .shared
            .upgrade()
            .ok_or(Error::SnapshotNotFound(self.id))?;
        let _shape = shared.shape.lock().expect("shape lock");
        shared.allocation_depth(&self.view, self.layer, offset, len)
    }
}
