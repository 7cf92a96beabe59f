//! Fixed patterns: dense, causal, sliding window, global tokens, and seeded random blocks.

use super::DEFAULT_BLOCK;
use crate::error::Result;
use crate::pattern::{BlockMask, BlockPattern, PatternAccumulator, PatternGeometry};
use crate::AttentionShape;
use rand::{Rng, SeedableRng};

fn geometry(shape: &AttentionShape, block_q: u32, block_k: u32, slices: u32) -> Result<PatternGeometry> {
    shape.validate()?;
    let g = PatternGeometry { block_q, block_k, seq_q: shape.seq_q as u32, seq_kv: shape.seq_kv as u32, slices };
    g.validate()?;
    Ok(g)
}

/// Builds a shared-slice pattern allowing keys `j` with `lo <= j - (i + offset) <= hi`, where
/// `offset = seq_kv - seq_q` aligns the last query with the last key (decoder convention).
fn band(shape: &AttentionShape, block_q: u32, block_k: u32, lo: i64, hi: i64) -> Result<BlockPattern> {
    let g = geometry(shape, block_q, block_k, 1)?;
    let offset = g.seq_kv as i64 - g.seq_q as i64;
    let mut acc = PatternAccumulator::new(g)?;
    for qb in 0..g.q_blocks() {
        let first_i = (qb * g.block_q) as i64;
        let last_i = ((qb + 1) * g.block_q).min(g.seq_q) as i64 - 1;
        let j_lo = (first_i + offset).saturating_add(lo).max(0);
        let j_hi = (last_i + offset).saturating_add(hi).min(g.seq_kv as i64 - 1);
        if j_lo > j_hi {
            acc.push_row(std::iter::empty());
            continue;
        }
        let candidates = (j_lo / g.block_k as i64) as u32..=(j_hi / g.block_k as i64) as u32;
        acc.push_row_where(qb, candidates, |i, j| {
            let d = j as i64 - (i as i64 + offset);
            d >= lo && d <= hi
        });
    }
    Ok(acc.finish()?)
}

/// Every query sees every key.
#[derive(Clone, Copy, Debug)]
pub struct Dense {
    pub block_q: u32,
    pub block_k: u32,
}

impl Default for Dense {
    fn default() -> Self {
        Self { block_q: DEFAULT_BLOCK, block_k: DEFAULT_BLOCK }
    }
}

impl Dense {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with_blocks(mut self, block_q: u32, block_k: u32) -> Self {
        (self.block_q, self.block_k) = (block_q, block_k);
        self
    }
    pub fn build(&self, shape: &AttentionShape) -> Result<BlockPattern> {
        band(shape, self.block_q, self.block_k, i64::MIN / 4, i64::MAX / 4)
    }
}

/// Query `i` sees keys `j <= i + (seq_kv - seq_q)`.
#[derive(Clone, Copy, Debug)]
pub struct Causal {
    pub block_q: u32,
    pub block_k: u32,
}

impl Default for Causal {
    fn default() -> Self {
        Self { block_q: DEFAULT_BLOCK, block_k: DEFAULT_BLOCK }
    }
}

impl Causal {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with_blocks(mut self, block_q: u32, block_k: u32) -> Self {
        (self.block_q, self.block_k) = (block_q, block_k);
        self
    }
    pub fn build(&self, shape: &AttentionShape) -> Result<BlockPattern> {
        band(shape, self.block_q, self.block_k, i64::MIN / 4, 0)
    }
}

/// Sliding window of `width` keys per query. Symmetric: keys `i-⌊(w-1)/2⌋ ..= i+⌊w/2⌋`;
/// causal: keys `i-w+1 ..= i` (positions aligned as in [`Causal`]).
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub width: u32,
    pub causal: bool,
    pub block_q: u32,
    pub block_k: u32,
}

impl Window {
    pub fn new(width: u32) -> Self {
        Self { width, causal: false, block_q: DEFAULT_BLOCK, block_k: DEFAULT_BLOCK }
    }
    pub fn causal(width: u32) -> Self {
        Self { causal: true, ..Self::new(width) }
    }
    pub fn with_blocks(mut self, block_q: u32, block_k: u32) -> Self {
        (self.block_q, self.block_k) = (block_q, block_k);
        self
    }
    pub fn build(&self, shape: &AttentionShape) -> Result<BlockPattern> {
        if self.width == 0 {
            return Err(crate::Error::ZeroSize("window width"));
        }
        let w = self.width as i64;
        let (lo, hi) = if self.causal { (-(w - 1), 0) } else { (-((w - 1) / 2), w / 2) };
        band(shape, self.block_q, self.block_k, lo, hi)
    }
}

/// Global tokens (Longformer-style): the first `first` and last `last` keys are seen by every
/// query, and the first/last queries see every key.
#[derive(Clone, Copy, Debug)]
pub struct GlobalTokens {
    pub first: u32,
    pub last: u32,
    pub block_q: u32,
    pub block_k: u32,
}

impl GlobalTokens {
    pub fn new(first: u32, last: u32) -> Self {
        Self { first, last, block_q: DEFAULT_BLOCK, block_k: DEFAULT_BLOCK }
    }
    pub fn with_blocks(mut self, block_q: u32, block_k: u32) -> Self {
        (self.block_q, self.block_k) = (block_q, block_k);
        self
    }
    pub fn build(&self, shape: &AttentionShape) -> Result<BlockPattern> {
        let g = geometry(shape, self.block_q, self.block_k, 1)?;
        let (first, last) = (self.first, self.last);
        let global_q = |i: u32| i < first || i + last >= g.seq_q;
        let global_k = |j: u32| j < first || j + last >= g.seq_kv;
        let mut acc = PatternAccumulator::new(g)?;
        for qb in 0..g.q_blocks() {
            let rows = qb * g.block_q..((qb + 1) * g.block_q).min(g.seq_q);
            let candidates: Vec<u32> = if rows.clone().any(global_q) {
                (0..g.k_blocks()).collect()
            } else {
                (0..g.k_blocks())
                    .filter(|kb| (kb * g.block_k..((kb + 1) * g.block_k).min(g.seq_kv)).any(global_k))
                    .collect()
            };
            acc.push_row_where(qb, candidates, |i, j| global_q(i) || global_k(j));
        }
        Ok(acc.finish()?)
    }
}

/// Seeded random blocks for tests: each block kept with probability `density`; a share
/// `partial` of the kept blocks get a random element mask (so rows may end up empty).
#[derive(Clone, Copy, Debug)]
pub struct RandomBlocks {
    pub density: f64,
    pub partial: f64,
    pub seed: u64,
    /// One pattern slice per (batch, head) instead of a shared one.
    pub per_slice: bool,
    pub block_q: u32,
    pub block_k: u32,
}

impl RandomBlocks {
    pub fn new(density: f64, seed: u64) -> Self {
        Self { density, partial: 0.0, seed, per_slice: false, block_q: DEFAULT_BLOCK, block_k: DEFAULT_BLOCK }
    }
    pub fn with_partial(mut self, partial: f64) -> Self {
        self.partial = partial;
        self
    }
    pub fn per_slice(mut self, per_slice: bool) -> Self {
        self.per_slice = per_slice;
        self
    }
    pub fn with_blocks(mut self, block_q: u32, block_k: u32) -> Self {
        (self.block_q, self.block_k) = (block_q, block_k);
        self
    }
    pub fn build(&self, shape: &AttentionShape) -> Result<BlockPattern> {
        for (name, p) in [("density", self.density), ("partial", self.partial)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(crate::Error::Shape(format!("RandomBlocks {name} must lie in [0, 1], got {p}")));
            }
        }
        let slices = if self.per_slice { shape.slices() as u32 } else { 1 };
        let g = geometry(shape, self.block_q, self.block_k, slices)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let mut acc = PatternAccumulator::new(g)?;
        for _ in 0..slices {
            for _ in 0..g.q_blocks() {
                let mut row = Vec::new();
                for kb in 0..g.k_blocks() {
                    if rng.random::<f64>() >= self.density {
                        continue;
                    }
                    if rng.random::<f64>() < self.partial {
                        // Sparse random bits, with some rows of the block left empty.
                        let bits = (0..g.mask_words()).map(|_| rng.random::<u32>() & rng.random::<u32>()).collect();
                        row.push((kb, BlockMask::Bits(bits)));
                    } else {
                        row.push((kb, BlockMask::Full));
                    }
                }
                acc.push_row(row);
            }
        }
        Ok(acc.finish()?)
    }
}
