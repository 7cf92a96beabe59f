//! Quality measures of a sparse-attention method (DESIGN.md, "Quality measures"): sparsity of a
//! pattern, recall of the exact α-entmax support, and output error against exact attention.
//!
//! Everything here works on one slice at a time and never holds an `n × n` matrix: the gold
//! support is computed row by row, and pattern measures walk the stored blocks.

use crate::error::{Error, Result};
use crate::pattern::{BlockPattern, FULL};
use crate::reference;
use ndarray::{Array4, ArrayView2, Axis};

/// The exact α-entmax support of the dense scores of one slice: for each query row, the sorted
/// key indices whose probability is strictly positive. Stored as CSR.
#[derive(Clone, Debug, PartialEq)]
pub struct GoldSupport {
    row_ptr: Vec<usize>,
    keys: Vec<u32>,
    seq_kv: usize,
}

impl GoldSupport {
    /// Query rows.
    pub fn rows(&self) -> usize {
        self.row_ptr.len().saturating_sub(1)
    }
    /// Key count of the scored problem.
    pub fn seq_kv(&self) -> usize {
        self.seq_kv
    }
    /// Support of query `i`, ascending key indices (empty for `i >= rows()`).
    pub fn row(&self, i: usize) -> &[u32] {
        match (self.row_ptr.get(i), self.row_ptr.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.keys[a..b],
            _ => &[],
        }
    }
    /// Support size over all rows.
    pub fn total(&self) -> usize {
        self.keys.len()
    }
    /// Mean support size per query row (0 for no rows).
    pub fn mean_support(&self) -> f64 {
        if self.rows() == 0 {
            0.0
        } else {
            self.total() as f64 / self.rows() as f64
        }
    }
}

/// Exact α-entmax support of one slice's dense scores `scale · q·k` (f64, CPU).
///
/// `q` is `[seq_q, head_dim]`, `k` is `[seq_kv, head_dim]`. With `causal`, query `i` only
/// scores keys `j <= i + (seq_kv - seq_q)`. `alpha == 1.5` uses [`reference::entmax15`],
/// `alpha == 2` [`reference::sparsemax`], any other `alpha > 1` [`reference::entmax_bisect`];
/// `alpha <= 1` (softmax) keeps every scored key. Rows are computed one at a time (O(seq_kv)
/// memory besides the result). `q` and `k` must agree in `head_dim` and hold finite values, and
/// `scale` and `alpha` must be finite (typed errors otherwise).
pub fn gold_support(q: &ArrayView2<f32>, k: &ArrayView2<f32>, scale: f64, alpha: f64, causal: bool) -> Result<GoldSupport> {
    if q.ncols() != k.ncols() {
        return Err(Error::Shape(format!("gold support: q has head_dim {}, k has {}", q.ncols(), k.ncols())));
    }
    crate::shape::check_finite_values("q", q)?;
    crate::shape::check_finite_values("k", k)?;
    if !scale.is_finite() {
        return Err(Error::NonFinite { tensor: "scale", index: 0, value: scale as f32 });
    }
    if !alpha.is_finite() {
        return Err(Error::Normalizer(format!("gold support: alpha must be finite, got {alpha}")));
    }
    let (seq_q, seq_kv) = (q.nrows(), k.nrows());
    let offset = seq_kv as i64 - seq_q as i64;
    let mut row_ptr = Vec::with_capacity(seq_q + 1);
    row_ptr.push(0);
    let mut keys = Vec::new();
    let mut scores = Vec::with_capacity(seq_kv);
    for (i, qi) in q.outer_iter().enumerate() {
        let n = if causal { (i as i64 + offset + 1).clamp(0, seq_kv as i64) as usize } else { seq_kv };
        scores.clear();
        scores.extend(k.outer_iter().take(n).map(|kj| scale * qi.iter().zip(kj.iter()).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()));
        if alpha <= 1.0 {
            keys.extend(0..n as u32);
        } else {
            let p = if alpha == 1.5 {
                reference::entmax15(&scores)
            } else if alpha == 2.0 {
                reference::sparsemax(&scores)
            } else {
                reference::entmax_bisect(&scores, alpha)
            };
            keys.extend(p.iter().enumerate().filter(|&(_, &x)| x > 0.0).map(|(j, _)| j as u32));
        }
        row_ptr.push(keys.len());
    }
    Ok(GoldSupport { row_ptr, keys, seq_kv })
}

/// Recall: the share of the gold support (|gold ∩ pattern| / |gold|) that pattern slice
/// `pattern_slice` allows; 1.0 when the gold support is empty. Gold rows or keys past the
/// pattern's `seq_q` / `seq_kv` count as missed. Each gold key is looked up by binary search in
/// its query-block row; the dense mask is never built.
pub fn recall(pattern: &BlockPattern, pattern_slice: usize, gold: &GoldSupport) -> f64 {
    if gold.total() == 0 {
        return 1.0;
    }
    let (bq, bk) = (pattern.block_q() as usize, pattern.block_k() as usize);
    let slice_ok = pattern_slice < pattern.slices() as usize;
    let mut hit = 0usize;
    for i in 0..gold.rows().min(pattern.seq_q() as usize) {
        if !slice_ok {
            break;
        }
        let (qb, r) = (i / bq, (i % bq) as u32);
        let range = pattern.row_blocks(pattern_slice, qb);
        let start = range.start;
        let cols = &pattern.col_idx()[range];
        hit += gold
            .row(i)
            .iter()
            .filter(|&&j| {
                let (kb, c) = (j / bk as u32, j % bk as u32);
                cols.binary_search(&kb).is_ok_and(|p| pattern.block_allows(start + p, qb as u32, r, c))
            })
            .count();
    }
    hit as f64 / gold.total() as f64
}

/// Valid (row, col) extents of block `(qb, kb)` (the last block row/column may be ragged).
fn block_extent(pattern: &BlockPattern, qb: u32, kb: u32) -> (u32, u32) {
    let rows = (pattern.seq_q() - qb * pattern.block_q()).min(pattern.block_q());
    let cols = (pattern.seq_kv() - kb * pattern.block_k()).min(pattern.block_k());
    (rows, cols)
}

/// Element sparsity: `1 − allowed pairs / all pairs` of one pattern slice.
///
/// With `causal`, the denominator is the causally allowed pairs (`j <= i + seq_kv − seq_q`) and
/// only pattern pairs that are causal are counted, so a causal pattern has sparsity 0.
pub fn element_sparsity(pattern: &BlockPattern, pattern_slice: usize, causal: bool) -> f64 {
    let (seq_q, seq_kv) = (pattern.seq_q() as i64, pattern.seq_kv() as i64);
    if pattern_slice >= pattern.slices() as usize {
        return 1.0;
    }
    if !causal {
        let all = (seq_q * seq_kv) as f64;
        return if all > 0.0 { 1.0 - pattern.allowed_pairs(pattern_slice) as f64 / all } else { 0.0 };
    }
    let offset = seq_kv - seq_q;
    // Keys of query i allowed by causality: min(seq_kv, i + offset + 1), at least 0.
    let causal_keys = |i: i64| (i + offset + 1).clamp(0, seq_kv);
    let all: i64 = (0..seq_q).map(causal_keys).sum();
    let (bq, bk) = (pattern.block_q(), pattern.block_k());
    let mut kept = 0i64;
    for qb in 0..pattern.q_blocks() {
        for block in pattern.row_blocks(pattern_slice, qb as usize) {
            let kb = pattern.col_idx()[block];
            let (rows, cols) = block_extent(pattern, qb, kb);
            for r in 0..rows {
                let i = (qb * bq + r) as i64;
                // Columns c of this block with j = kb*bk + c <= i + offset.
                let limit = (i + offset - (kb * bk) as i64 + 1).clamp(0, cols as i64);
                kept += if pattern.mask_of()[block] == FULL {
                    limit
                } else {
                    (0..limit as u32).filter(|&c| pattern.block_allows(block, qb, r, c)).count() as i64
                };
            }
        }
    }
    if all > 0 {
        1.0 - kept as f64 / all as f64
    } else {
        0.0
    }
}

/// Block sparsity: `1 − stored blocks / (q_blocks · k_blocks)` of one pattern slice.
///
/// With `causal`, the denominator is the blocks whose area holds at least one causal pair
/// (`j <= i + seq_kv − seq_q`), and only stored blocks whose area holds a causal pair are
/// counted (blocks wholly above the diagonal would be dropped by intersecting with causal).
pub fn block_sparsity(pattern: &BlockPattern, pattern_slice: usize, causal: bool) -> f64 {
    if pattern_slice >= pattern.slices() as usize {
        return 1.0;
    }
    let (qbs, kbs) = (pattern.q_blocks() as i64, pattern.k_blocks() as i64);
    if !causal {
        let all = (qbs * kbs) as f64;
        return if all > 0.0 { 1.0 - pattern.slice_nnz(pattern_slice) as f64 / all } else { 0.0 };
    }
    let offset = pattern.seq_kv() as i64 - pattern.seq_q() as i64;
    let (bq, bk) = (pattern.block_q() as i64, pattern.block_k() as i64);
    // Key blocks kb with kb*bk <= last query of the block row + offset hold a causal pair.
    let causal_kbs = |qb: i64| {
        let last_i = ((qb + 1) * bq).min(pattern.seq_q() as i64) - 1;
        let j = last_i + offset;
        if j < 0 {
            0
        } else {
            (j / bk + 1).min(kbs)
        }
    };
    let mut all = 0i64;
    let mut kept = 0i64;
    for qb in 0..qbs {
        let n = causal_kbs(qb);
        all += n;
        kept += pattern.col_idx()[pattern.row_blocks(pattern_slice, qb as usize)].iter().filter(|&&kb| (kb as i64) < n).count() as i64;
    }
    if all > 0 {
        1.0 - kept as f64 / all as f64
    } else {
        0.0
    }
}

/// Relative output error of one slice: `‖O − O_exact‖_F / ‖O_exact‖_F`, accumulated in f64.
///
/// 0 when both are zero; when `O_exact` is zero and `O` is not, the absolute norm `‖O‖_F`.
/// The two must have the same shape; otherwise the result is NaN (see [`output_errors`] for a
/// checked version).
pub fn output_error(o: &ArrayView2<f32>, o_exact: &ArrayView2<f32>) -> f64 {
    if o.shape() != o_exact.shape() {
        return f64::NAN;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in o.iter().zip(o_exact.iter()) {
        let d = a as f64 - b as f64;
        num += d * d;
        den += b as f64 * b as f64;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// [`output_error`] of every (batch, head) slice of `[batch, heads, seq, head_dim]` outputs, in
/// order `b * heads + h`. Different shapes → [`Error::Shape`].
pub fn output_errors(o: &Array4<f32>, o_exact: &Array4<f32>) -> Result<Vec<f64>> {
    if o.shape() != o_exact.shape() {
        return Err(Error::Shape(format!("output is {:?} but the exact output is {:?}", o.shape(), o_exact.shape())));
    }
    let mut errors = Vec::with_capacity(o.shape()[0] * o.shape()[1]);
    for (ob, eb) in o.axis_iter(Axis(0)).zip(o_exact.axis_iter(Axis(0))) {
        for (oh, eh) in ob.axis_iter(Axis(0)).zip(eb.axis_iter(Axis(0))) {
            errors.push(output_error(&oh, &eh));
        }
    }
    Ok(errors)
}
