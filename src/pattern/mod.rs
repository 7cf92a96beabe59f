//! `BlockPattern`: the one exchange format between pattern builders and kernels.
//!
//! Block-compressed sparse rows per slice (a slice is one (batch, head) pair, or one slice
//! shared by all). A stored block is either computed whole (`FULL`) or carries a bitmask of
//! `block_q * ceil(block_k / 32)` words in the `masks` pool. Rows or columns past `seq_q` /
//! `seq_kv` (the ragged last block) are never allowed, whatever the mask says.

mod accumulate;
mod ops;

pub use accumulate::{BlockMask, PatternAccumulator};

/// `mask_of` value for a block computed whole.
pub const FULL: u32 = u32::MAX;

/// Which BlockPattern invariant failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("block_{which} = {value} must be a power of two in 16..=128")]
    BlockSize { which: &'static str, value: u32 },
    #[error("`{0}` must be at least 1")]
    ZeroSize(&'static str),
    #[error("row_ptr has {got} entries, expected slices * q_blocks + 1 = {expected}")]
    RowPtrLength { got: usize, expected: usize },
    #[error("row_ptr[0] = {0}, must be 0")]
    RowPtrStart(u32),
    #[error("row_ptr decreases at row {row}: {prev} then {next}")]
    RowPtrNotMonotone { row: usize, prev: u32, next: u32 },
    #[error("row_ptr ends at {end} but col_idx has {nnz} entries")]
    RowPtrEnd { end: u32, nnz: usize },
    #[error("col_idx[{position}] = {col} in row {row} is out of range (k_blocks = {k_blocks})")]
    ColOutOfRange { row: usize, position: usize, col: u32, k_blocks: u32 },
    #[error("col_idx not strictly increasing in row {row} at position {position}: {prev} then {col}")]
    ColNotIncreasing { row: usize, position: usize, prev: u32, col: u32 },
    #[error("block ({row}, {col}) has a bitmask of {got} words, expected block_q * ceil(block_k / 32) = {expected}")]
    MaskWords { row: usize, col: u32, got: usize, expected: usize },
    #[error("mask_of has {got} entries, col_idx has {nnz}")]
    MaskOfLength { got: usize, nnz: usize },
    #[error("mask_of[{position}] = {offset}: mask of {words} words overruns the pool of {pool} words")]
    MaskOutOfRange { position: usize, offset: u32, words: usize, pool: usize },
    #[error("the pattern has {got} u32 entries, past the u32 index range")]
    TooLarge { got: usize },
    #[error("pattern does not fit the problem: {0}")]
    ShapeMismatch(String),
    #[error("patterns cannot be combined: {0}")]
    Incompatible(String),
}

/// Block-sparse attention pattern (BSR + element masks). Construct with [`BlockPattern::new_checked`]
/// or a builder in [`crate::patterns`]; fields are read through accessors so invariants hold.
/// Deserialising goes through `new_checked` too, so a stored pattern is checked like a built one.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "StoredPattern")]
pub struct BlockPattern {
    block_q: u32,
    block_k: u32,
    seq_q: u32,
    seq_kv: u32,
    slices: u32,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    mask_of: Vec<u32>,
    masks: Vec<u32>,
}

/// `BlockPattern`'s fields as serialised, before `new_checked` has seen them.
#[derive(serde::Deserialize)]
struct StoredPattern {
    block_q: u32,
    block_k: u32,
    seq_q: u32,
    seq_kv: u32,
    slices: u32,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    mask_of: Vec<u32>,
    masks: Vec<u32>,
}

impl TryFrom<StoredPattern> for BlockPattern {
    type Error = PatternError;
    fn try_from(p: StoredPattern) -> Result<Self, PatternError> {
        let geometry = PatternGeometry { block_q: p.block_q, block_k: p.block_k, seq_q: p.seq_q, seq_kv: p.seq_kv, slices: p.slices };
        BlockPattern::new_checked(geometry, p.row_ptr, p.col_idx, p.mask_of, p.masks)
    }
}

/// Sizes that fix a pattern's grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PatternGeometry {
    pub block_q: u32,
    pub block_k: u32,
    pub seq_q: u32,
    pub seq_kv: u32,
    pub slices: u32,
}

impl PatternGeometry {
    pub fn q_blocks(&self) -> u32 {
        self.seq_q.div_ceil(self.block_q)
    }
    pub fn k_blocks(&self) -> u32 {
        self.seq_kv.div_ceil(self.block_k)
    }
    /// u32 words per partial-block bitmask.
    pub fn mask_words(&self) -> usize {
        self.block_q as usize * self.block_k.div_ceil(32) as usize
    }
    pub fn validate(&self) -> Result<(), PatternError> {
        for (which, value) in [("q", self.block_q), ("k", self.block_k)] {
            if !(16..=128).contains(&value) || !value.is_power_of_two() {
                return Err(PatternError::BlockSize { which, value });
            }
        }
        for (name, v) in [("seq_q", self.seq_q), ("seq_kv", self.seq_kv), ("slices", self.slices)] {
            if v == 0 {
                return Err(PatternError::ZeroSize(name));
            }
        }
        Ok(())
    }
}

impl BlockPattern {
    /// Builds a pattern and checks every invariant, naming the first one violated.
    #[allow(clippy::too_many_arguments)]
    pub fn new_checked(
        geometry: PatternGeometry,
        row_ptr: Vec<u32>,
        col_idx: Vec<u32>,
        mask_of: Vec<u32>,
        masks: Vec<u32>,
    ) -> Result<Self, PatternError> {
        geometry.validate()?;
        let rows = geometry.slices as usize * geometry.q_blocks() as usize;
        if row_ptr.len() != rows + 1 {
            return Err(PatternError::RowPtrLength { got: row_ptr.len(), expected: rows + 1 });
        }
        if row_ptr[0] != 0 {
            return Err(PatternError::RowPtrStart(row_ptr[0]));
        }
        for row in 0..rows {
            if row_ptr[row + 1] < row_ptr[row] {
                return Err(PatternError::RowPtrNotMonotone { row, prev: row_ptr[row], next: row_ptr[row + 1] });
            }
        }
        if row_ptr[rows] as usize != col_idx.len() {
            return Err(PatternError::RowPtrEnd { end: row_ptr[rows], nnz: col_idx.len() });
        }
        let k_blocks = geometry.k_blocks();
        for row in 0..rows {
            let (a, b) = (row_ptr[row] as usize, row_ptr[row + 1] as usize);
            for position in a..b {
                let col = col_idx[position];
                if col >= k_blocks {
                    return Err(PatternError::ColOutOfRange { row, position, col, k_blocks });
                }
                if position > a && col <= col_idx[position - 1] {
                    return Err(PatternError::ColNotIncreasing { row, position, prev: col_idx[position - 1], col });
                }
            }
        }
        if mask_of.len() != col_idx.len() {
            return Err(PatternError::MaskOfLength { got: mask_of.len(), nnz: col_idx.len() });
        }
        let words = geometry.mask_words();
        for (position, &offset) in mask_of.iter().enumerate() {
            if offset != FULL && offset as usize + words > masks.len() {
                return Err(PatternError::MaskOutOfRange { position, offset, words, pool: masks.len() });
            }
        }
        let total = row_ptr.len() + 3 * col_idx.len() + masks.len();
        if total >= u32::MAX as usize {
            return Err(PatternError::TooLarge { got: total });
        }
        Ok(Self {
            block_q: geometry.block_q,
            block_k: geometry.block_k,
            seq_q: geometry.seq_q,
            seq_kv: geometry.seq_kv,
            slices: geometry.slices,
            row_ptr,
            col_idx,
            mask_of,
            masks,
        })
    }

    pub fn geometry(&self) -> PatternGeometry {
        PatternGeometry {
            block_q: self.block_q,
            block_k: self.block_k,
            seq_q: self.seq_q,
            seq_kv: self.seq_kv,
            slices: self.slices,
        }
    }
    pub fn block_q(&self) -> u32 {
        self.block_q
    }
    pub fn block_k(&self) -> u32 {
        self.block_k
    }
    pub fn seq_q(&self) -> u32 {
        self.seq_q
    }
    pub fn seq_kv(&self) -> u32 {
        self.seq_kv
    }
    /// 1 when one slice is shared by every (batch, head).
    pub fn slices(&self) -> u32 {
        self.slices
    }
    pub fn q_blocks(&self) -> u32 {
        self.geometry().q_blocks()
    }
    pub fn k_blocks(&self) -> u32 {
        self.geometry().k_blocks()
    }
    pub fn row_ptr(&self) -> &[u32] {
        &self.row_ptr
    }
    pub fn col_idx(&self) -> &[u32] {
        &self.col_idx
    }
    pub fn mask_of(&self) -> &[u32] {
        &self.mask_of
    }
    pub fn masks(&self) -> &[u32] {
        &self.masks
    }
    /// Stored blocks over all slices.
    pub fn nnz(&self) -> usize {
        self.col_idx.len()
    }
    /// Stored blocks of one pattern slice. Indexes like a slice: `slice` must be below
    /// `slices()` (panics otherwise, as `[]` does).
    pub fn slice_nnz(&self, slice: usize) -> usize {
        let qb = self.q_blocks() as usize;
        (self.row_ptr[(slice + 1) * qb] - self.row_ptr[slice * qb]) as usize
    }

    /// Most stored blocks in any one query block row (0 for an empty pattern).
    pub fn max_row_blocks(&self) -> u32 {
        self.row_ptr.windows(2).map(|w| w[1].saturating_sub(w[0])).max().unwrap_or(0)
    }

    /// Block range `[start, end)` of query-block row `qb` in pattern slice `slice`. Indexes
    /// like a slice: `slice < slices()` and `qb < q_blocks()` (panics otherwise, as `[]` does).
    pub fn row_blocks(&self, slice: usize, qb: usize) -> std::ops::Range<usize> {
        let r = slice * self.q_blocks() as usize + qb;
        self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize
    }

    /// The pattern slice used by problem slice `slice` (0 when shared).
    pub fn pattern_slice(&self, slice: usize) -> usize {
        if self.slices == 1 {
            0
        } else {
            slice
        }
    }

    /// Whether element (r, c) of stored block `block` is allowed (in range and in the mask).
    pub fn block_allows(&self, block: usize, qb: u32, r: u32, c: u32) -> bool {
        let (i, j) = (qb * self.block_q + r, self.col_idx[block] * self.block_k + c);
        if i >= self.seq_q || j >= self.seq_kv {
            return false;
        }
        match self.mask_of[block] {
            FULL => true,
            off => {
                let wpr = self.block_k.div_ceil(32);
                let word = self.masks[off as usize + (r * wpr + c / 32) as usize];
                word >> (c % 32) & 1 == 1
            }
        }
    }

    /// Allowed key positions of query `i` in pattern slice `slice`, ascending. O(row blocks · block_k).
    pub fn row_keys(&self, slice: usize, i: usize) -> Vec<u32> {
        let (qb, r) = ((i / self.block_q as usize) as u32, (i % self.block_q as usize) as u32);
        let mut keys = Vec::new();
        for block in self.row_blocks(slice, qb as usize) {
            for c in 0..self.block_k {
                if self.block_allows(block, qb, r, c) {
                    keys.push(self.col_idx[block] * self.block_k + c);
                }
            }
        }
        keys
    }

    /// Dense `seq_q × seq_kv` mask of one pattern slice (tests and the reference only).
    pub fn to_dense_mask(&self, slice: usize) -> ndarray::Array2<bool> {
        let mut m = ndarray::Array2::from_elem((self.seq_q as usize, self.seq_kv as usize), false);
        for qb in 0..self.q_blocks() {
            for block in self.row_blocks(slice, qb as usize) {
                for r in 0..self.block_q {
                    for c in 0..self.block_k {
                        if self.block_allows(block, qb, r, c) {
                            let i = (qb * self.block_q + r) as usize;
                            let j = (self.col_idx[block] * self.block_k + c) as usize;
                            m[[i, j]] = true;
                        }
                    }
                }
            }
        }
        m
    }

    /// Allowed (query, key) pairs in one pattern slice.
    pub fn allowed_pairs(&self, slice: usize) -> u64 {
        let mut n = 0u64;
        let (rows_last, cols_last) = (self.seq_q - (self.q_blocks() - 1) * self.block_q, self.seq_kv - (self.k_blocks() - 1) * self.block_k);
        for qb in 0..self.q_blocks() {
            let rows = if qb + 1 == self.q_blocks() { rows_last } else { self.block_q };
            for block in self.row_blocks(slice, qb as usize) {
                let cols = if self.col_idx[block] + 1 == self.k_blocks() { cols_last } else { self.block_k };
                n += match self.mask_of[block] {
                    FULL => rows as u64 * cols as u64,
                    _ => (0..rows)
                        .map(|r| (0..cols).filter(|&c| self.block_allows(block, qb, r, c)).count() as u64)
                        .sum(),
                };
            }
        }
        n
    }

    /// Checks the pattern against a problem: sequence lengths and slice count (1 or batch·heads).
    pub fn check_fits(&self, shape: &crate::AttentionShape) -> Result<(), PatternError> {
        if self.seq_q as usize != shape.seq_q || self.seq_kv as usize != shape.seq_kv {
            return Err(PatternError::ShapeMismatch(format!(
                "pattern is {}x{} (seq_q x seq_kv), problem is {}x{}",
                self.seq_q, self.seq_kv, shape.seq_q, shape.seq_kv
            )));
        }
        if self.slices != 1 && self.slices as usize != shape.slices() {
            return Err(PatternError::ShapeMismatch(format!(
                "pattern has {} slices, problem has batch*heads = {} (or use 1 shared slice)",
                self.slices,
                shape.slices()
            )));
        }
        Ok(())
    }
}
