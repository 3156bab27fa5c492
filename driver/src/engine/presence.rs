//! Presence maps: which blocks a layer defines, and how.
//!
//! A block of a layer is *absent* (look below), *data* (the layer's file
//! holds it) or *zero* (the layer records zeros: a discard or write-zeroes
//! over data that lower layers define, so older data never shows through).
//!
//! Stored sparsely, per 16 MiB chunk, as runs: a chunk in which a layer
//! defines nothing has no record at all; a fully written chunk is one run.

use super::error::{Error, Result};
use super::geometry::CHUNK_BLOCKS;

const CHUNK: usize = CHUNK_BLOCKS as usize;
const PRESENCE_V: u8 = 1;

/// The state of one block in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum BlockState {
    Absent = 0,
    Data = 1,
    Zero = 2,
}

impl BlockState {
    pub(crate) fn from_u8(v: u8) -> Result<Self> {
        match v {
            0 => Ok(BlockState::Absent),
            1 => Ok(BlockState::Data),
            2 => Ok(BlockState::Zero),
            _ => Err(Error::Corrupt(format!("block state {v}"))),
        }
    }
}

/// A run of blocks with one state, relative to the chunk start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: u16,
    pub len: u16,
    pub state: BlockState,
}

/// Decodes a chunk's presence record into its runs (data and zero only).
pub(crate) fn decode(buf: &[u8]) -> Result<Vec<Run>> {
    let corrupt = |why: &str| Error::Corrupt(format!("presence record: {why}"));
    let (&version, rest) = buf.split_first().ok_or_else(|| corrupt("empty"))?;
    if version != PRESENCE_V {
        return Err(corrupt("unknown version"));
    }
    if rest.len() < 2 {
        return Err(corrupt("truncated"));
    }
    let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
    let body = &rest[2..];
    if body.len() != n * 5 {
        return Err(corrupt("length mismatch"));
    }
    let mut runs = Vec::with_capacity(n);
    let mut end = 0usize;
    for r in body.chunks_exact(5) {
        let start = u16::from_le_bytes([r[0], r[1]]);
        let len = u16::from_le_bytes([r[2], r[3]]);
        let state = BlockState::from_u8(r[4])?;
        if len == 0 || (start as usize) < end || start as usize + len as usize > CHUNK {
            return Err(corrupt("runs overlap or leave the chunk"));
        }
        if state == BlockState::Absent {
            return Err(corrupt("absent run stored"));
        }
        end = start as usize + len as usize;
        runs.push(Run { start, len, state });
    }
    Ok(runs)
}

/// Expands runs into one state per block of the chunk.
pub(crate) fn expand(runs: &[Run]) -> Vec<BlockState> {
    let mut states = vec![BlockState::Absent; CHUNK];
    for r in runs {
        states[r.start as usize..(r.start + r.len) as usize].fill(r.state);
    }
    states
}

/// Encodes per-block states; `None` if the chunk defines nothing.
pub(crate) fn encode(states: &[BlockState]) -> Option<Vec<u8>> {
    debug_assert_eq!(states.len(), CHUNK);
    let mut body = Vec::new();
    let mut n: u16 = 0;
    let mut i = 0;
    while i < CHUNK {
        let s = states[i];
        let mut j = i + 1;
        while j < CHUNK && states[j] == s {
            j += 1;
        }
        if s != BlockState::Absent {
            body.extend_from_slice(&(i as u16).to_le_bytes());
            body.extend_from_slice(&((j - i) as u16).to_le_bytes());
            body.push(s as u8);
            n += 1;
        }
        i = j;
    }
    if n == 0 {
        return None;
    }
    let mut out = Vec::with_capacity(3 + body.len());
    out.push(PRESENCE_V);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_runs() {
        let mut states = vec![BlockState::Absent; CHUNK];
        states[0..10].fill(BlockState::Data);
        states[10..12].fill(BlockState::Zero);
        states[4000..CHUNK].fill(BlockState::Data);
        let bytes = encode(&states).expect("not empty");
        assert_eq!(bytes.len(), 3 + 3 * 5);
        assert_eq!(expand(&decode(&bytes).unwrap()), states);
    }

    #[test]
    fn empty_chunk_has_no_record() {
        assert!(encode(&vec![BlockState::Absent; CHUNK]).is_none());
    }

    #[test]
    fn overlapping_runs_are_corruption() {
        let bytes = [PRESENCE_V, 2, 0, 0, 0, 5, 0, 1, 2, 0, 5, 0, 1];
        assert!(decode(&bytes).is_err());
    }
}
