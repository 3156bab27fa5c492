//! Block geometry shared by every part of the engine: the 4 KiB block, the
//! index chunk, and the checks that turn a byte range into a block range.

use super::error::{Error, Result};

/// Bytes per block: the unit of presence maps, of the index and of the
/// sector size every frontend advertises.
pub const BLOCK_SIZE: u64 = 4096;
/// `log2(BLOCK_SIZE)`.
pub const BLOCK_SHIFT: u32 = 12;

/// Blocks covered by one index chunk (16 MiB of volume). A chunk is the unit
/// of copy-on-write between a volume, its snapshots and its clones, and the
/// unit of the presence records in the catalog; 4096 entries keep a dense
/// chunk at 8 KiB, so the first write after a snapshot copies at most that.
pub const CHUNK_BLOCKS: u64 = 4096;

/// Largest volume the engine accepts: 2^50 bytes (1 PiB), so block numbers
/// fit comfortably in the journal's and catalog's integer fields.
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;

/// Rounds a byte count up to whole blocks.
pub fn blocks_for(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK_SIZE)
}

/// Checks that `size` is a valid volume size: non-zero, whole blocks, at most
/// [`MAX_VOLUME_BYTES`].
pub fn check_volume_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) || size > MAX_VOLUME_BYTES {
        return Err(Error::InvalidSize { size });
    }
    Ok(())
}

/// Checks that `offset..offset + len` lies inside a volume of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// The blocks a byte range touches: `first..end` (end exclusive).
pub fn touched_blocks(offset: u64, len: u64) -> (u64, u64) {
    (offset >> BLOCK_SHIFT, (offset + len).div_ceil(BLOCK_SIZE))
}

/// The whole blocks a byte range covers completely (may be empty).
pub fn covered_blocks(offset: u64, len: u64) -> (u64, u64) {
    let first = offset.div_ceil(BLOCK_SIZE);
    let end = (offset + len) >> BLOCK_SHIFT;
    (first, end.max(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_and_covered_blocks_of_unaligned_range() {
        assert_eq!(touched_blocks(100, 5000), (0, 2));
        assert_eq!(covered_blocks(100, 5000), (1, 1));
        assert_eq!(covered_blocks(4096, 8192), (1, 3));
        assert_eq!(touched_blocks(4096, 8192), (1, 3));
    }

    #[test]
    fn check_range_rejects_overflow_and_out_of_bounds() {
        assert!(check_range(0, 4096, 4096).is_ok());
        assert!(check_range(1, 4096, 4096).is_err());
        assert!(check_range(u64::MAX, 2, 4096).is_err());
    }

    #[test]
    fn volume_size_must_be_whole_blocks() {
        assert!(check_volume_size(4096).is_ok());
        assert!(check_volume_size(0).is_err());
        assert!(check_volume_size(4097).is_err());
        assert!(check_volume_size(MAX_VOLUME_BYTES + BLOCK_SIZE).is_err());
    }
}
