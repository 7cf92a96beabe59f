//! Pattern algebra: union and intersection in O(nnz), like FlexAttention's or/and masks.

use super::accumulate::{BlockMask, PatternAccumulator};
use super::{BlockPattern, PatternError, FULL};

impl BlockPattern {
    /// The pattern slices `range` as a pattern of their own (a shared pattern's one slice
    /// stands for every slice, so it is returned whole): how a call too large for one buffer
    /// runs in groups of (batch, head) slices.
    pub fn select_slices(&self, range: std::ops::Range<usize>) -> Result<BlockPattern, PatternError> {
        if self.slices() == 1 {
            return Ok(self.clone());
        }
        if range.is_empty() || range.end > self.slices() as usize {
            return Err(PatternError::ShapeMismatch(format!("slices {range:?} of a pattern with {} slices", self.slices())));
        }
        let mut g = self.geometry();
        g.slices = range.len() as u32;
        let q_blocks = g.q_blocks() as usize;
        let mut acc = PatternAccumulator::new(g)?;
        for slice in range {
            for qb in 0..q_blocks {
                let blocks = self.row_blocks(slice, qb).map(|b| {
                    let mask = match self.mask_bits(b) {
                        None => BlockMask::Full,
                        Some(bits) => BlockMask::Bits(bits.to_vec()),
                    };
                    (self.col_idx[b], mask)
                });
                acc.push_row(blocks.collect::<Vec<_>>());
            }
        }
        acc.finish()
    }

    /// Block mask of stored block `block` as explicit bits (FULL expanded).
    fn mask_bits(&self, block: usize) -> Option<&[u32]> {
        match self.mask_of[block] {
            FULL => None,
            off => Some(&self.masks[off as usize..off as usize + self.geometry().mask_words()]),
        }
    }

    fn combine(&self, other: &BlockPattern, keep_one_sided: bool, op: fn(u32, u32) -> u32) -> Result<BlockPattern, PatternError> {
        let (a, b) = (self.geometry(), other.geometry());
        if (a.block_q, a.block_k, a.seq_q, a.seq_kv) != (b.block_q, b.block_k, b.seq_q, b.seq_kv) {
            return Err(PatternError::Incompatible(format!(
                "geometries differ: {a:?} vs {b:?} (block sizes and sequence lengths must match)"
            )));
        }
        if a.slices != b.slices && a.slices != 1 && b.slices != 1 {
            return Err(PatternError::Incompatible(format!(
                "slice counts {} and {} (must match, or one be a shared slice)",
                a.slices, b.slices
            )));
        }
        let mut g = a;
        g.slices = a.slices.max(b.slices);
        let mut acc = PatternAccumulator::new(g)?;
        let words = g.mask_words();
        for s in 0..g.slices as usize {
            for qb in 0..g.q_blocks() as usize {
                let ra = self.row_blocks(self.pattern_slice(s), qb);
                let rb = other.row_blocks(other.pattern_slice(s), qb);
                let (mut ia, mut ib) = (ra.start, rb.start);
                let mut row = Vec::new();
                while ia < ra.end || ib < rb.end {
                    let ca = if ia < ra.end { self.col_idx[ia] } else { u32::MAX };
                    let cb = if ib < rb.end { other.col_idx[ib] } else { u32::MAX };
                    if ca == cb {
                        let mask = match (self.mask_bits(ia), other.mask_bits(ib)) {
                            (None, None) => BlockMask::Full,
                            (ma, mb) => BlockMask::Bits(
                                (0..words)
                                    .map(|w| op(ma.map_or(u32::MAX, |m| m[w]), mb.map_or(u32::MAX, |m| m[w])))
                                    .collect(),
                            ),
                        };
                        row.push((ca, mask));
                        ia += 1;
                        ib += 1;
                    } else if ca < cb {
                        if keep_one_sided {
                            row.push((ca, self.mask_bits(ia).map_or(BlockMask::Full, |m| BlockMask::Bits(m.to_vec()))));
                        }
                        ia += 1;
                    } else {
                        if keep_one_sided {
                            row.push((cb, other.mask_bits(ib).map_or(BlockMask::Full, |m| BlockMask::Bits(m.to_vec()))));
                        }
                        ib += 1;
                    }
                }
                acc.push_row(row);
            }
        }
        acc.finish()
    }

    /// Pairs allowed by either pattern.
    pub fn union(&self, other: &BlockPattern) -> Result<BlockPattern, PatternError> {
        self.combine(other, true, |x, y| x | y)
    }

    /// Pairs allowed by both patterns (e.g. anything ∩ causal for decoders).
    pub fn intersect(&self, other: &BlockPattern) -> Result<BlockPattern, PatternError> {
        self.combine(other, false, |x, y| x & y)
    }
}
