//! One index chunk: the entries of [`CHUNK_BLOCKS`] consecutive blocks,
//! stored in the smallest of three encodings.
//!
//! - `Uniform(v)`: every entry is `v` (no heap at all). A freshly created,
//!   fully written or fully trimmed chunk is uniform.
//! - `Packed`: a palette of up to 256 distinct entries plus 1, 2, 4 or 8 bits
//!   per block pointing into it. A chunk mixing a handful of layers (the
//!   common case after snapshots and random writes) costs 1/16 to 1/2 of a
//!   dense chunk.
//! - `Dense`: the 16-bit entry itself for every block, used only when more
//!   than 256 distinct entries share one 16 MiB chunk. This is the worst
//!   case: 2 bytes per block.
//!
//! Packed chunks keep a use count per palette entry, so overwritten entries
//! are recycled without re-encoding and a chunk that becomes uniform again
//! (a sequential rewrite) drops back to `Uniform`.

use super::CHUNK;

/// Bits per entry a packed chunk may use.
const PACKED_WIDTHS: [u32; 4] = [1, 2, 4, 8];

#[derive(Clone, Debug)]
pub(crate) enum Chunk {
    Uniform(u16),
    Packed(Packed),
    Dense(Box<[u16]>),
}

#[derive(Clone, Debug)]
pub(crate) struct Packed {
    bits: u32,
    palette: Vec<u16>,
    /// `counts[i]`: how many entries point at `palette[i]`.
    counts: Vec<u16>,
    words: Box<[u64]>,
}

impl Packed {
    fn new(bits: u32) -> Self {
        let words = vec![0u64; CHUNK * bits as usize / 64].into_boxed_slice();
        Packed {
            bits,
            palette: Vec::new(),
            counts: Vec::new(),
            words,
        }
    }

    fn per_word(&self) -> usize {
        64 / self.bits as usize
    }

    fn mask(&self) -> u64 {
        (1u64 << self.bits) - 1
    }

    fn index_at(&self, i: usize) -> usize {
        let per = self.per_word();
        let shift = (i % per) as u32 * self.bits;
        ((self.words[i / per] >> shift) & self.mask()) as usize
    }

    fn set_index(&mut self, i: usize, p: usize) {
        let per = self.per_word();
        let shift = (i % per) as u32 * self.bits;
        let mask = self.mask();
        let w = &mut self.words[i / per];
        *w = (*w & !(mask << shift)) | ((p as u64) << shift);
    }

    /// Points entries `lo..hi` at palette index `p`, keeping counts exact.
    fn fill(&mut self, lo: usize, hi: usize, p: usize) {
        for i in lo..hi {
            let old = self.index_at(i);
            self.counts[old] -= 1;
        }
        self.counts[p] += (hi - lo) as u16;
        let per = self.per_word();
        let mut i = lo;
        while i < hi && !i.is_multiple_of(per) {
            self.set_index(i, p);
            i += 1;
        }
        let mut pattern = 0u64;
        for k in 0..per {
            pattern |= (p as u64) << (k as u32 * self.bits);
        }
        while i + per <= hi {
            self.words[i / per] = pattern;
            i += per;
        }
        while i < hi {
            self.set_index(i, p);
            i += 1;
        }
    }

    /// [`Chunk::runs`] of a packed chunk: a word whose entries all equal
    /// the current run's is passed over whole, so a chunk with a few
    /// written blocks costs its words, not its entries. (A value is at
    /// one palette index only, so equal indices are equal values.)
    fn runs(&self, lo: usize, hi: usize, mut f: impl FnMut(usize, usize, u16)) {
        let per = self.per_word();
        // `ones * idx`: a word of `per` entries all `idx`.
        let ones = (0..per).fold(0u64, |w, k| w | 1 << (k as u32 * self.bits));
        let mut start = lo;
        let mut cur = self.index_at(lo);
        let mut i = lo + 1;
        while i < hi {
            if i.is_multiple_of(per) && i + per <= hi && self.words[i / per] == ones * cur as u64 {
                i += per;
                continue;
            }
            let idx = self.index_at(i);
            if idx != cur {
                f(start, i - start, self.palette[cur]);
                start = i;
                cur = idx;
            }
            i += 1;
        }
        f(start, hi - start, self.palette[cur]);
    }

    /// A palette index for `v`: an existing one, a recycled unused one, or a
    /// new one if the width allows. `None` if the palette is full.
    fn slot_for(&mut self, v: u16) -> Option<usize> {
        if let Some(p) = self.palette.iter().position(|&x| x == v) {
            return Some(p);
        }
        if let Some(p) = self.counts.iter().position(|&c| c == 0) {
            self.palette[p] = v;
            return Some(p);
        }
        if self.palette.len() < (1usize << self.bits) {
            self.palette.push(v);
            self.counts.push(0);
            return Some(self.palette.len() - 1);
        }
        None
    }
}

impl Chunk {
    pub(crate) fn get(&self, i: usize) -> u16 {
        match self {
            Chunk::Uniform(v) => *v,
            Chunk::Packed(p) => p.palette[p.index_at(i)],
            Chunk::Dense(d) => d[i],
        }
    }

    /// Sets entries `lo..hi` (within the chunk) to `v`.
    pub(crate) fn set_range(&mut self, lo: usize, hi: usize, v: u16) {
        debug_assert!(lo < hi && hi <= CHUNK);
        if lo == 0 && hi == CHUNK {
            *self = Chunk::Uniform(v);
            return;
        }
        match self {
            Chunk::Uniform(u) if *u == v => {}
            Chunk::Uniform(u) => {
                let mut p = Packed::new(1);
                p.palette = vec![*u, v];
                p.counts = vec![CHUNK as u16, 0];
                p.fill(lo, hi, 1);
                *self = Chunk::Packed(p);
            }
            Chunk::Packed(p) => match p.slot_for(v) {
                Some(idx) => {
                    p.fill(lo, hi, idx);
                    if p.counts[idx] as usize == CHUNK {
                        *self = Chunk::Uniform(v);
                    }
                }
                None => {
                    let mut entries = self.entries();
                    entries[lo..hi].fill(v);
                    *self = Chunk::from_entries(&entries);
                }
            },
            Chunk::Dense(d) => d[lo..hi].fill(v),
        }
    }

    /// All entries, decoded.
    pub(crate) fn entries(&self) -> Vec<u16> {
        (0..CHUNK).map(|i| self.get(i)).collect()
    }

    /// The smallest encoding of `entries` (exactly `CHUNK` of them).
    pub(crate) fn from_entries(entries: &[u16]) -> Chunk {
        debug_assert_eq!(entries.len(), CHUNK);
        let mut palette: Vec<u16> = Vec::new();
        for &e in entries {
            if !palette.contains(&e) {
                palette.push(e);
                if palette.len() > 256 {
                    return Chunk::Dense(entries.to_vec().into_boxed_slice());
                }
            }
        }
        if palette.len() == 1 {
            return Chunk::Uniform(palette[0]);
        }
        let bits = PACKED_WIDTHS
            .into_iter()
            .find(|&b| palette.len() <= 1usize << b)
            .expect("at most 256 distinct entries");
        let mut p = Packed::new(bits);
        p.counts = vec![0; palette.len()];
        for (i, &e) in entries.iter().enumerate() {
            let idx = palette.iter().position(|&x| x == e).expect("in palette");
            p.set_index(i, idx);
            p.counts[idx] += 1;
        }
        palette.shrink_to_fit();
        p.palette = palette;
        Chunk::Packed(p)
    }

    /// Calls `f(first, len, value)` for each run of equal entries in `lo..hi`.
    pub(crate) fn runs(&self, lo: usize, hi: usize, mut f: impl FnMut(usize, usize, u16)) {
        match self {
            Chunk::Uniform(v) => f(lo, hi - lo, *v),
            Chunk::Packed(p) => p.runs(lo, hi, f),
            Chunk::Dense(d) => {
                let mut start = lo;
                for i in lo + 1..hi {
                    if d[i] != d[start] {
                        f(start, i - start, d[start]);
                        start = i;
                    }
                }
                f(start, hi - start, d[start]);
            }
        }
    }

    /// Entries for which `pred` holds, counted from the palette counts
    /// (no per-entry decoding except for dense chunks).
    pub(crate) fn count(&self, pred: impl Fn(u16) -> bool) -> usize {
        match self {
            Chunk::Uniform(v) => {
                if pred(*v) {
                    CHUNK
                } else {
                    0
                }
            }
            Chunk::Packed(p) => p
                .palette
                .iter()
                .zip(&p.counts)
                .filter(|(v, _)| pred(**v))
                .map(|(_, c)| *c as usize)
                .sum(),
            Chunk::Dense(d) => d.iter().filter(|v| pred(**v)).count(),
        }
    }

    /// Heap bytes owned by this chunk (not counting its own header).
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Chunk::Uniform(_) => 0,
            Chunk::Packed(p) => {
                p.palette.capacity() * 2 + p.counts.capacity() * 2 + p.words.len() * 8
            }
            Chunk::Dense(d) => d.len() * 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn random_range_sets_match_a_plain_array() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        for round in 0..40 {
            let distinct = [2u64, 3, 5, 17, 300][round % 5];
            let mut chunk = Chunk::Uniform(0);
            let mut model = vec![0u16; CHUNK];
            for _ in 0..300 {
                let lo = (rng(&mut seed) % CHUNK as u64) as usize;
                let len = 1 + (rng(&mut seed) % 64) as usize;
                let hi = (lo + len).min(CHUNK);
                let v = (rng(&mut seed) % distinct) as u16;
                chunk.set_range(lo, hi, v);
                model[lo..hi].fill(v);
            }
            assert_eq!(chunk.entries(), model, "round {round}");
        }
    }

    #[test]
    fn sequential_rewrite_of_whole_chunk_returns_to_uniform() {
        let mut chunk = Chunk::Uniform(0);
        for i in 0..CHUNK {
            chunk.set_range(i, i + 1, 7);
        }
        assert!(matches!(chunk, Chunk::Uniform(7)));
    }

    #[test]
    fn two_alternating_layers_cost_one_bit_per_block() {
        let entries: Vec<u16> = (0..CHUNK).map(|i| 2 + (i % 2) as u16).collect();
        let chunk = Chunk::from_entries(&entries);
        assert_eq!(chunk.heap_bytes(), CHUNK / 8 + 2 * 2 + 2 * 2);
    }

    #[test]
    fn more_than_256_distinct_entries_go_dense_at_two_bytes_per_block() {
        let entries: Vec<u16> = (0..CHUNK).map(|i| 2 + (i % 1000) as u16).collect();
        let chunk = Chunk::from_entries(&entries);
        assert!(matches!(chunk, Chunk::Dense(_)));
        assert_eq!(chunk.heap_bytes(), CHUNK * 2);
        assert_eq!(chunk.entries(), entries);
    }

    /// Runs of packed and dense chunks, of any width and any bounds, are
    /// what decoding entry by entry gives.
    #[test]
    fn runs_equal_the_entries_decoded_one_by_one() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        // 2 values: 1-bit entries; over 256: a dense chunk.
        for (distinct, fills, longest) in [
            (2, 40, 300),
            (3, 40, 300),
            (5, 40, 300),
            (16, 40, 300),
            (17, 60, 300),
            (200, 400, 300),
            (400, 1500, 4),
        ] {
            let mut entries = vec![0u16; CHUNK];
            for _ in 0..fills {
                let at = rand(CHUNK);
                let len = 1 + rand(longest).min(CHUNK - at - 1);
                let v = rand(distinct) as u16;
                entries[at..at + len].fill(v);
            }
            let chunk = Chunk::from_entries(&entries);
            if distinct == 2 {
                assert!(matches!(&chunk, Chunk::Packed(p) if p.bits == 1));
            }
            if distinct == 400 {
                assert!(matches!(chunk, Chunk::Dense(_)));
            }
            for _ in 0..50 {
                let lo = rand(CHUNK);
                let hi = lo + 1 + rand(CHUNK - lo);
                let mut got = Vec::new();
                chunk.runs(lo, hi, |s, l, v| got.push((s, l, v)));
                let mut want: Vec<(usize, usize, u16)> = Vec::new();
                for (i, &v) in entries[lo..hi].iter().enumerate() {
                    match want.last_mut() {
                        Some((_, l, w)) if *w == v => *l += 1,
                        _ => want.push((lo + i, 1, v)),
                    }
                }
                assert_eq!(got, want, "{distinct} values, {lo}..{hi}");
            }
        }
    }

    #[test]
    fn runs_merge_equal_neighbours() {
        let mut chunk = Chunk::Uniform(0);
        chunk.set_range(10, 20, 5);
        let mut runs = Vec::new();
        chunk.runs(0, 30, |s, l, v| runs.push((s, l, v)));
        assert_eq!(runs, vec![(0, 10, 0), (10, 10, 5), (20, 10, 0)]);
    }
}
