//! A view: an index plus the layer handles its entries name. A view is
//! what a reader resolves blocks through; a volume has a live view that it
//! changes, and every frozen layer has (when needed) an immutable view "as
//! of" that layer, shared by its snapshot, its clones and the volume above.

use std::collections::HashMap;
use std::sync::Arc;

use super::error::{Error, Result};
use super::geometry::{BLOCK_SHIFT, BLOCK_SIZE, CHUNK_BLOCKS};
use super::ids::LayerId;
use super::index::{ABSENT, FIRST_SLOT, Index, ZERO};
use super::layer::Layer;
use super::presence::{BlockState, Run};

/// Layer handles by slot.
pub(crate) type LayerTable = Vec<Option<Arc<Layer>>>;

/// See the module docs.
#[derive(Clone, Debug)]
pub(crate) struct View {
    pub(crate) index: Index,
    pub(crate) layers: Arc<LayerTable>,
}

/// Where a run of blocks comes from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// Reads as zeros: a zero record.
    Zero,
    /// No layer defines it: zeros, or a fetching volume's backing.
    Absent,
    /// The data is in this layer's file at the same offset.
    Layer(Arc<Layer>),
}

/// A run of blocks with one source.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub start: u64,
    pub blocks: u64,
    pub source: Source,
}

/// Allocation state of a byte range, for block status queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// The range reads as zeros, and no storage of this volume holds it
    /// (Strata never keeps allocated zeros apart from data).
    pub zero: bool,
}

/// How deep in its chain a run of bytes resolves, for NBD's
/// `qemu:allocation-depth`: 0 if no layer defines it (it reads as zeros),
/// 1 if the top layer does (a volume's writable top, or a snapshot's own
/// layer), 2 for the layer under it, and so on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthExtent {
    /// Length in bytes.
    pub len: u64,
    pub depth: u32,
}

impl View {
    /// A view of `blocks` blocks in which nothing is defined.
    pub(crate) fn empty(blocks: u64) -> Self {
        View {
            index: Index::new(blocks),
            layers: Arc::new(Vec::new()),
        }
    }

    /// Adds a layer handle to the table (copy on write).
    pub(crate) fn add_layer(&mut self, layer: Arc<Layer>) {
        let slot = layer.slot as usize;
        let table = Arc::make_mut(&mut self.layers);
        if table.len() <= slot {
            table.resize(slot + 1, None);
        }
        table[slot] = Some(layer);
    }

    /// Whether the view's table holds exactly this layer handle.
    pub(crate) fn holds(&self, layer: &Arc<Layer>) -> bool {
        self.layers
            .get(layer.slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|l| Arc::ptr_eq(l, layer))
    }

    /// Blocks whose entry is `slot`.
    pub(crate) fn count_slot(&self, slot: u16) -> u64 {
        let mut n = 0;
        self.index.runs(0, u64::MAX, |_, len, v| {
            n += if v == slot { len } else { 0 }
        });
        n
    }

    /// Entries naming `from` name slot `to` instead, and `from` leaves the
    /// table (a fold moved its blocks into the layer at `to`).
    pub(crate) fn rename_slot(&mut self, from: &Arc<Layer>, to: u16) {
        let mut runs = Vec::new();
        self.index.runs(0, u64::MAX, |s, l, v| {
            if v == from.slot {
                runs.push((s, s + l));
            }
        });
        for (s, e) in runs {
            self.index.set_range(s, e, to);
        }
        self.remove_layer(from);
    }

    /// `layer` leaves the table (no entry names it any more).
    pub(crate) fn remove_layer(&mut self, layer: &Arc<Layer>) {
        if self.holds(layer) {
            Arc::make_mut(&mut self.layers)[layer.slot as usize] = None;
        }
    }

    /// Number of layers the view names (its chain depth).
    pub(crate) fn depth(&self) -> usize {
        self.layers.iter().filter(|l| l.is_some()).count()
    }

    /// Applies one chunk of a layer's presence map on top of the view.
    pub(crate) fn apply(&mut self, slot: u16, chunk: u32, runs: &[Run]) {
        let entry = |r: &Run| match r.state {
            BlockState::Data => Some(slot),
            BlockState::Zero => Some(ZERO),
            BlockState::Absent => None,
        };
        if let [r] = runs {
            let start = u64::from(chunk) * CHUNK_BLOCKS + u64::from(r.start);
            if let Some(v) = entry(r) {
                self.index.set_range(start, start + u64::from(r.len), v);
            }
            return;
        }
        self.index.rewrite_chunk(u64::from(chunk), |entries| {
            for r in runs {
                if let Some(v) = entry(r) {
                    entries[r.start as usize..(r.start + r.len) as usize].fill(v);
                }
            }
        });
    }

    /// The sources of blocks `start..end`, as maximal runs.
    pub(crate) fn segments(&self, start: u64, end: u64) -> Result<Vec<Segment>> {
        let mut out: Vec<Segment> = Vec::new();
        let mut missing = None;
        self.index.runs(start, end, |s, l, v| {
            let source = if v == ABSENT {
                Source::Absent
            } else if v < FIRST_SLOT {
                Source::Zero
            } else {
                match self.layers.get(v as usize).and_then(Option::as_ref) {
                    Some(layer) => Source::Layer(Arc::clone(layer)),
                    None => {
                        missing = Some(v);
                        Source::Zero
                    }
                }
            };
            out.push(Segment {
                start: s,
                blocks: l,
                source,
            });
        });
        if let Some(slot) = missing {
            return Err(Error::Corrupt(format!(
                "index names slot {slot}, which has no layer"
            )));
        }
        // Blocks past the index (a grown volume's new space) are absent.
        let covered = out.last().map_or(start, |s| s.start + s.blocks);
        if covered < end {
            out.push(Segment {
                start: covered,
                blocks: end - covered,
                source: Source::Absent,
            });
        }
        Ok(out)
    }

    /// Allocation state of blocks `start..end` (see [`Extent`]), in blocks;
    /// absent blocks count as data when `absent_is_data` (a fetching
    /// volume's, whose backing may hold data there).
    pub(crate) fn status_runs(
        &self,
        start: u64,
        end: u64,
        absent_is_data: bool,
        mut f: impl FnMut(u64, u64, bool),
    ) {
        let mut last = start;
        let mut pending: Option<(u64, u64, bool)> = None;
        self.index.runs(start, end, |s, l, v| {
            let zero = (v == ABSENT && !absent_is_data) || v == ZERO;
            match &mut pending {
                Some((_, pl, pz)) if *pz == zero => *pl += l,
                _ => {
                    if let Some((ps, pl, pz)) = pending.replace((s, l, zero)) {
                        f(ps, pl, pz);
                    }
                }
            }
            last = s + l;
        });
        if let Some((ps, pl, pz)) = pending {
            f(ps, pl, pz);
        }
        if last < end {
            f(last, end - last, !absent_is_data);
        }
    }
}

/// The depth (see [`DepthExtent`]) of `offset..offset+len` in `view`, the
/// view of `chain` (top first). The index tells which layer holds a data
/// block, but a zero record only that the topmost defining layer recorded
/// zeros: such runs are resolved with `below(layer)`, the view as of a
/// lower layer, going down while it still reads as a zero record. So a zero
/// record over an identical zero record of a lower layer (a discard over a
/// discard) is reported at the lower layer's depth.
pub(crate) fn allocation_depth(
    view: &View,
    chain: &[super::catalog::LayerRecord],
    mut below: impl FnMut(LayerId) -> Result<Arc<View>>,
    offset: u64,
    len: u64,
) -> Result<Vec<DepthExtent>> {
    let end = offset + len;
    let (first, last) = (offset >> BLOCK_SHIFT, end.div_ceil(BLOCK_SIZE));
    let depth_of: HashMap<u16, u32> = chain
        .iter()
        .enumerate()
        .map(|(i, r)| (r.slot, i as u32 + 1))
        .collect();
    // (first block, blocks, depth), in no particular order until sorted.
    let mut runs: Vec<(u64, u64, u32)> = Vec::new();
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    let mut stray = None;
    let mut covered = first;
    view.index.runs(first, last, |s, l, v| {
        match v {
            ABSENT => runs.push((s, l, 0)),
            ZERO => zeros.push((s, l)),
            slot => match depth_of.get(&slot) {
                Some(d) => runs.push((s, l, *d)),
                None => stray = Some(slot),
            },
        }
        covered = s + l;
    });
    if let Some(slot) = stray {
        return Err(Error::Corrupt(format!(
            "the index names layer slot {slot}, which is not in its chain"
        )));
    }
    if covered < last {
        runs.push((covered, last - covered, 0));
    }
    // Zero records defined at depth `level` or deeper.
    let mut level = 1u32;
    while !zeros.is_empty() {
        let Some(lower) = chain.get(level as usize) else {
            runs.extend(zeros.drain(..).map(|(s, l)| (s, l, level)));
            break;
        };
        let lower = below(lower.id)?;
        let mut deeper = Vec::new();
        for (s, l) in zeros {
            let mut at = s;
            lower.index.runs(s, s + l, |bs, bl, v| {
                if v == ZERO {
                    deeper.push((bs, bl));
                } else {
                    runs.push((bs, bl, level));
                }
                at = bs + bl;
            });
            if at < s + l {
                runs.push((at, s + l - at, level));
            }
        }
        zeros = deeper;
        level += 1;
    }
    runs.sort_unstable_by_key(|r| r.0);
    let mut out: Vec<DepthExtent> = Vec::new();
    for (s, l, depth) in runs {
        let bs = (s << BLOCK_SHIFT).max(offset);
        let be = ((s + l) << BLOCK_SHIFT).min(end);
        if be <= bs {
            continue;
        }
        match out.last_mut() {
            Some(e) if e.depth == depth => e.len += be - bs,
            _ => out.push(DepthExtent {
                len: be - bs,
                depth,
            }),
        }
    }
    Ok(out)
}

/// Reads the bytes `offset..offset + buf.len()` through `segments`.
pub(crate) fn read_segments(segments: &[Segment], offset: u64, buf: &mut [u8]) -> Result<()> {
    let end = offset + buf.len() as u64;
    for seg in segments {
        let s = (seg.start << BLOCK_SHIFT).max(offset);
        let e = ((seg.start + seg.blocks) << BLOCK_SHIFT).min(end);
        if s >= e {
            continue;
        }
        let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
        match &seg.source {
            Source::Zero | Source::Absent => dst.fill(0),
            Source::Layer(layer) => layer.read_at(dst, s)?,
        }
    }
    Ok(())
}

/// Block status of the bytes `offset..offset+len` of `view` (see
/// [`View::status_runs`] for `absent_is_data`).
pub(crate) fn block_status(
    view: &View,
    offset: u64,
    len: u64,
    absent_is_data: bool,
) -> Vec<Extent> {
    let end = offset + len;
    let mut out = Vec::new();
    let (first, last) = (offset >> BLOCK_SHIFT, end.div_ceil(BLOCK_SIZE));
    view.status_runs(first, last, absent_is_data, |s, l, zero| {
        let bs = (s << BLOCK_SHIFT).max(offset);
        let be = ((s + l) << BLOCK_SHIFT).min(end);
        if be > bs {
            out.push(Extent { len: be - bs, zero });
        }
    });
    out
}
