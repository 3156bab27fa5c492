//! Pinned ranges: a run of a volume's or a snapshot's blocks as they were
//! at one instant, held by reference. A pin lists which frozen layer holds
//! each block (or that it reads as zeros) and keeps those layers' handles;
//! a merge or a delete meanwhile only unlinks their files, which live on
//! until the last handle goes. Making a pin copies no data: at most it
//! freezes the volume's writable top, as a snapshot would
//! ([`Pool::pin`](super::Pool::pin)). Landing one in a volume
//! ([`Volume::write_pinned`](super::Volume::write_pinned)) shares the
//! layers' extents where the filesystem can. This is what a SCSI ROD token
//! (POPULATE TOKEN, WRITE USING TOKEN) stands for. A live pin
//! ([`Volume::pin_live`](super::Volume::pin_live), for a copy made at
//! once) may name the volume's writable top instead of freezing it.

use super::error::Result;
use super::geometry::BLOCK_SIZE;
use super::view::{Segment, read_segments};

/// A range of blocks, `blocks` long from block `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub first: u64,
    pub blocks: u64,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Pinned {
    /// The first block of the range in its source.
    pub(crate) first: u64,
    pub(crate) blocks: u64,
    /// Where each run of the range comes from, in order, covering it.
    pub(crate) segments: Vec<Segment>,
}

impl Pinned {
    pub(crate) fn new(range: BlockRange, segments: Vec<Segment>) -> Self {
        Pinned {
            first: range.first,
            blocks: range.blocks,
            segments,
        }
    }

    /// Length in blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Runs of distinct sources it holds (what it costs in memory).
    pub fn runs(&self) -> usize {
        self.segments.len()
    }

    /// The runs covering blocks `at..at+blocks` of the range (counted from
    /// its start), cut to them, at their blocks in the source.
    pub(crate) fn cut(&self, at: u64, blocks: u64) -> Vec<Segment> {
        let (from, to) = (self.first + at, self.first + at + blocks);
        self.segments
            .iter()
            .filter(|s| s.start < to && s.start + s.blocks > from)
            .map(|s| {
                let start = s.start.max(from);
                Segment {
                    start,
                    blocks: (s.start + s.blocks).min(to) - start,
                    source: s.source.clone(),
                }
            })
            .collect()
    }

    /// The block in the source of block `at` of the range.
    pub(crate) fn source_block(&self, at: u64) -> u64 {
        self.first + at
    }

    /// Reads `buf.len()` bytes (whole blocks) from block `at` of the range.
    pub fn read(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        let blocks = buf.len() as u64 / BLOCK_SIZE;
        read_segments(
            &self.cut(at, blocks),
            self.source_block(at) * BLOCK_SIZE,
            buf,
        )
    }
}

/// What landing a pin wrote, in bytes by how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Landed {
    /// Shared with the source's layer files (FICLONERANGE).
    pub shared: u64,
    /// Copied (the filesystem does not share extents).
    pub copied: u64,
    /// Recorded as zeros, nothing written.
    pub zeroed: u64,
}
