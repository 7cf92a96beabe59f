//! Row-by-row construction of a `BlockPattern`, shared by every builder.

use super::{BlockPattern, PatternError, PatternGeometry, FULL};

/// One stored block while building: whole, or an element bitmask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockMask {
    Full,
    /// `block_q * ceil(block_k / 32)` words, row-major; bit `c % 32` of word `r * wpr + c / 32`.
    Bits(Vec<u32>),
}

/// Appends query-block rows in order (slice-major) and validates on `finish`.
/// Masks whose in-range bits are all set become `FULL`; empty masks are dropped.
#[derive(Debug)]
pub struct PatternAccumulator {
    geometry: PatternGeometry,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    mask_of: Vec<u32>,
    masks: Vec<u32>,
    /// The first malformed block pushed (reported by `finish`): a bitmask of the wrong length
    /// or a key block past the grid would otherwise be truncated or dropped silently.
    error: Option<PatternError>,
}

impl PatternAccumulator {
    pub fn new(geometry: PatternGeometry) -> Result<Self, PatternError> {
        geometry.validate()?;
        Ok(Self { geometry, row_ptr: vec![0], col_idx: Vec::new(), mask_of: Vec::new(), masks: Vec::new(), error: None })
    }

    pub fn geometry(&self) -> PatternGeometry {
        self.geometry
    }

    /// Index of the row the next `push_row` fills (slice * q_blocks + qb).
    pub fn next_row(&self) -> usize {
        self.row_ptr.len() - 1
    }

    /// Appends the next row; blocks in strictly increasing key-block order (checked in `finish`).
    pub fn push_row(&mut self, blocks: impl IntoIterator<Item = (u32, BlockMask)>) {
        let row = self.next_row();
        let qb = (row as u32) % self.geometry.q_blocks();
        let (words, k_blocks) = (self.geometry.mask_words(), self.geometry.k_blocks());
        for (kb, mask) in blocks {
            if self.error.is_none() {
                if kb >= k_blocks {
                    self.error = Some(PatternError::ColOutOfRange { row, position: self.col_idx.len(), col: kb, k_blocks });
                } else if let BlockMask::Bits(bits) = &mask {
                    if bits.len() != words {
                        self.error = Some(PatternError::MaskWords { row, col: kb, got: bits.len(), expected: words });
                    }
                }
            }
            match mask {
                BlockMask::Full => {
                    self.col_idx.push(kb);
                    self.mask_of.push(FULL);
                }
                BlockMask::Bits(bits) => {
                    let in_range = in_range_mask(&self.geometry, qb, kb);
                    let masked: Vec<u32> = bits.iter().zip(&in_range).map(|(a, b)| a & b).collect();
                    if masked.iter().all(|&w| w == 0) {
                        continue;
                    }
                    self.col_idx.push(kb);
                    if masked == in_range {
                        self.mask_of.push(FULL);
                    } else {
                        self.mask_of.push(self.masks.len() as u32);
                        self.masks.extend_from_slice(&masked);
                    }
                }
            }
        }
        self.row_ptr.push(self.col_idx.len() as u32);
    }

    /// Appends row `qb` from a predicate over absolute (query, key) positions, trying only
    /// the candidate key blocks (ascending).
    pub fn push_row_where(&mut self, qb: u32, candidates: impl IntoIterator<Item = u32>, allowed: impl Fn(u32, u32) -> bool) {
        let g = self.geometry;
        let wpr = g.block_k.div_ceil(32);
        let blocks: Vec<(u32, BlockMask)> = candidates
            .into_iter()
            .map(|kb| {
                let mut bits = vec![0u32; g.mask_words()];
                for r in 0..g.block_q {
                    let i = qb * g.block_q + r;
                    if i >= g.seq_q {
                        break;
                    }
                    for c in 0..g.block_k {
                        let j = kb * g.block_k + c;
                        if j < g.seq_kv && allowed(i, j) {
                            bits[(r * wpr + c / 32) as usize] |= 1 << (c % 32);
                        }
                    }
                }
                (kb, BlockMask::Bits(bits))
            })
            .collect();
        self.push_row(blocks);
    }

    pub fn finish(self) -> Result<BlockPattern, PatternError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        BlockPattern::new_checked(self.geometry, self.row_ptr, self.col_idx, self.mask_of, self.masks)
    }
}

/// The bits of block (qb, kb) that lie inside `seq_q × seq_kv`.
pub(crate) fn in_range_mask(g: &PatternGeometry, qb: u32, kb: u32) -> Vec<u32> {
    let wpr = g.block_k.div_ceil(32);
    let rows = g.seq_q.saturating_sub(qb * g.block_q).min(g.block_q);
    let cols = g.seq_kv.saturating_sub(kb * g.block_k).min(g.block_k);
    let mut bits = vec![0u32; g.mask_words()];
    for r in 0..rows {
        for c in 0..cols {
            bits[(r * wpr + c / 32) as usize] |= 1 << (c % 32);
        }
    }
    bits
}
