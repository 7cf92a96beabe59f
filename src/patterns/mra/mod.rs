//! Multi-resolution block attention (Zeng et al. 2022, "Multi Resolution Analysis (MRA) for
//! Approximate Self-Attention"), training-free, for any softmax model.
//!
//! Per (batch, head) slice, with block size `b` (paper: 32):
//! 1. block means `Q̂_I`, `K̂_J`, `V̂_J` over the valid tokens of each block (`c_J` = number of
//!    valid keys of key block `J`, so ragged tails are weighted correctly);
//! 2. low-resolution scores `L_IJ = scale · Q̂_I·K̂_J` and row maxima `r_I = max_J L_IJ`;
//! 3. selection: the priors (diagonal band `|I − J| < diagonal_band`, and with
//!    `first_block_prior` the first block row and column) are always kept; the rest of a
//!    per-slice budget of `blocks_per_row × q_blocks` blocks is filled with the largest
//!    `L_IJ − r_I` over the whole slice (a global budget, ties to the lower `(I, J)`);
//! 4. the selected blocks are computed exactly. In [`MraMode::Full`] (MRA-2) every other block
//!    adds its low-resolution estimate to the same softmax: for query `i` in block `I`,
//!    numerator += `Σ_{J∉sel} exp(L_IJ − m_i)·c_J·V̂_J`, denominator += `Σ exp(L_IJ − m_i)·c_J`
//!    with `m_i` the max shared with the exact part. [`MraMode::SparseOnly`] (MRA-2-s) keeps only
//!    the selected blocks (ordinary block-sparse attention; any normaliser).
//!
//! Memory per slice is `O((n/b)² + nnz)`: the low-resolution scores of the non-selected blocks
//! are kept in a CSR-like complement of the pattern ([`MraRemainder`]); nothing `n × n` is formed.

pub mod gpu;
pub mod reference;

use crate::error::{Error, Result};
use crate::pattern::{BlockMask, BlockPattern, PatternAccumulator, PatternGeometry};
use crate::patterns::DEFAULT_BLOCK;
use crate::AttentionShape;
use ndarray::ArrayView4;

/// What happens to the blocks outside the selection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MraMode {
    /// MRA-2: non-selected blocks contribute their low-resolution estimate (softmax only).
    #[default]
    Full,
    /// MRA-2-s: only the selected blocks count (any normaliser).
    SparseOnly,
}

/// MRA settings. Defaults follow the paper's RoBERTa-512 setting: `b = 32`, 8 blocks per row
/// (about half of the 16×16 blocks), the diagonal block and the first block row/column kept.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MraConfig {
    /// Block size `b` (query and key blocks).
    pub block: u32,
    /// Budget: `blocks_per_row × q_blocks` blocks per slice, chosen globally over the slice.
    pub blocks_per_row: u32,
    /// Always keep blocks with `|I − J| < diagonal_band` (0: none, 1: the diagonal, 2: tri-diagonal…).
    pub diagonal_band: u32,
    /// Always keep the first block row (`I = 0`) and the first block column (`J = 0`).
    pub first_block_prior: bool,
    pub mode: MraMode,
    /// Score scale; `None` = `1/sqrt(head_dim)`. Must equal the attention call's scale.
    pub scale: Option<f32>,
}

impl Default for MraConfig {
    fn default() -> Self {
        Self { block: DEFAULT_BLOCK, blocks_per_row: 8, diagonal_band: 1, first_block_prior: true, mode: MraMode::Full, scale: None }
    }
}

/// The coarse remainder of an MRA pattern: block means, key-block counts and the
/// low-resolution scores of every non-selected block, per slice.
///
/// A remainder built on the GPU ([`MraConfig::build_with_engine`]) also carries its row terms
/// (see [`MraRemainder::row_terms`]), folded on the GPU, so attention does not fold them again on
/// the CPU. They are a cache derived from the other fields: `==` ignores them, and
/// [`MraRemainder::clear_precomputed_row_terms`] drops them after editing the public fields.
#[derive(Clone, Debug)]
pub struct MraRemainder {
    pub block: u32,
    pub shape: AttentionShape,
    pub q_blocks: u32,
    pub k_blocks: u32,
    /// The scale the low-resolution scores were computed with.
    pub scale: f32,
    /// `Q̂`: `[slices][q_blocks][head_dim]`.
    pub q_means: Vec<f32>,
    /// `K̂`: `[batch·kv_heads][k_blocks][head_dim]`.
    pub k_means: Vec<f32>,
    /// `V̂`: `[batch·kv_heads][k_blocks][head_dim]`; empty when built without V.
    pub v_means: Vec<f32>,
    /// `c_J`: valid keys of each key block.
    pub counts: Vec<u32>,
    /// Non-selected blocks of row `slice·q_blocks + I`: `rest_col[rest_ptr[row]..rest_ptr[row+1]]`.
    pub rest_ptr: Vec<u32>,
    pub rest_col: Vec<u32>,
    /// `L_IJ` of each non-selected block (aligned with `rest_col`).
    pub rest_logit: Vec<f32>,
    /// Row terms folded on the GPU (`[slices·q_blocks][head_dim + 2]`), when built there.
    precomputed_rows: Option<Vec<f32>>,
}

impl PartialEq for MraRemainder {
    /// Compares everything but the precomputed row terms (a cache of the other fields).
    fn eq(&self, o: &Self) -> bool {
        self.block == o.block
            && self.shape == o.shape
            && self.q_blocks == o.q_blocks
            && self.k_blocks == o.k_blocks
            && self.scale == o.scale
            && self.q_means == o.q_means
            && self.k_means == o.k_means
            && self.v_means == o.v_means
            && self.counts == o.counts
            && self.rest_ptr == o.rest_ptr
            && self.rest_col == o.rest_col
            && self.rest_logit == o.rest_logit
    }
}

/// A built MRA pattern: the exact part and its coarse remainder.
#[derive(Clone, Debug, PartialEq)]
pub struct Mra {
    pub pattern: BlockPattern,
    pub remainder: MraRemainder,
    pub mode: MraMode,
}

impl Mra {
    /// MRA-2 merges the coarse remainder into a softmax and has no entmax form: any other
    /// normaliser in `Full` mode is `Unsupported`. (Shared by the reference and the engine.)
    pub fn check_normalizer(&self, normalizer: crate::Normalizer) -> crate::Result<()> {
        if self.mode == MraMode::Full && normalizer != crate::Normalizer::Softmax {
            return Err(crate::Error::Unsupported(format!(
                "MRA-2 (full mode) merges the coarse remainder into a softmax; {normalizer:?} has no such form (use MraMode::SparseOnly)"
            )));
        }
        Ok(())
    }
}

impl MraRemainder {
    /// Whether V̂ was computed (needed by MRA-2).
    pub fn has_values(&self) -> bool {
        !self.v_means.is_empty()
    }

    /// Number of non-selected blocks over all slices.
    pub fn len(&self) -> usize {
        self.rest_col.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rest_col.is_empty()
    }

    /// Floats per row of [`MraRemainder::row_terms`]: `head_dim + 2`.
    pub fn row_stride(&self) -> usize {
        self.shape.head_dim + 2
    }

    /// The remainder folded per query-block row, as the GPU kernels read it: for row
    /// `slice·q_blocks + I`, `[r, S, N_0 … N_{d−1}]` with `r = max_{J∉sel} L_IJ` (or the
    /// `-3e38` sentinel when nothing is left), `S = Σ c_J·exp(L_IJ − r)` and
    /// `N = Σ c_J·exp(L_IJ − r)·V̂_J`. Merging `(r, S, N)` into an online softmax equals merging
    /// every `(L_IJ, c_J, V̂_J)` one by one. The GPU-folded terms when the remainder was built
    /// on the GPU (f32), else [`MraRemainder::row_terms_cpu`].
    pub fn row_terms(&self) -> Result<Vec<f32>> {
        match self.precomputed_row_terms() {
            Some(rows) => Ok(rows.to_vec()),
            None => self.row_terms_cpu(),
        }
    }

    /// The row terms folded on the GPU by [`MraConfig::build_with_engine`], if any.
    pub fn precomputed_row_terms(&self) -> Option<&[f32]> {
        self.precomputed_rows.as_deref().filter(|_| self.has_values())
    }

    /// Drops the GPU-folded row terms (call after editing the public fields).
    pub fn clear_precomputed_row_terms(&mut self) {
        self.precomputed_rows = None;
    }

    /// [`MraRemainder::row_terms`] folded on the CPU in f64 (the oracle), ignoring any
    /// precomputed terms.
    pub fn row_terms_cpu(&self) -> Result<Vec<f32>> {
        if !self.has_values() {
            return Err(Error::Shape("the MRA remainder was built without V; MRA-2 needs V̂".into()));
        }
        let d = self.shape.head_dim;
        let stride = self.row_stride();
        let rows = self.shape.slices() * self.q_blocks as usize;
        let mut out = vec![0f32; rows * stride];
        let kb = self.k_blocks as usize;
        for row in 0..rows {
            let slice = row / self.q_blocks as usize;
            let kvs = self.shape.kv_slice(slice);
            let dst = &mut out[row * stride..(row + 1) * stride];
            let range = self.rest_ptr[row] as usize..self.rest_ptr[row + 1] as usize;
            if range.is_empty() {
                dst[0] = NEG_BIG;
                continue;
            }
            let r = self.rest_logit[range.clone()].iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
            let mut s = 0f64;
            let mut n = vec![0f64; d];
            for e in range {
                let j = self.rest_col[e] as usize;
                let w = self.counts[j] as f64 * (self.rest_logit[e] as f64 - r).exp();
                s += w;
                let vm = &self.v_means[(kvs * kb + j) * d..][..d];
                for (acc, &x) in n.iter_mut().zip(vm) {
                    *acc += w * x as f64;
                }
            }
            dst[0] = r as f32;
            dst[1] = s as f32;
            for (o, x) in dst[2..].iter_mut().zip(&n) {
                *o = *x as f32;
            }
        }
        Ok(out)
    }
}

/// The kernels' "no score" sentinel (finite; WGSL has no ±inf literals).
pub const NEG_BIG: f32 = -3.0e38;

/// Means over the valid rows of each block of `x` (`[n, d]` slice view): `[blocks][d]`.
fn block_means(x: &ndarray::ArrayView2<f32>, block: usize, blocks: usize, out: &mut Vec<f32>) {
    let (n, d) = (x.nrows(), x.ncols());
    for bi in 0..blocks {
        let lo = bi * block;
        let hi = ((bi + 1) * block).min(n);
        let mut acc = vec![0f64; d];
        for i in lo..hi {
            for (a, &v) in acc.iter_mut().zip(x.row(i)) {
                *a += v as f64;
            }
        }
        let c = (hi - lo).max(1) as f64;
        out.extend(acc.iter().map(|a| (a / c) as f32));
    }
}

impl MraConfig {
    pub fn new(block: u32, blocks_per_row: u32) -> Self {
        Self { block, blocks_per_row, ..Self::default() }
    }

    pub fn with_mode(mut self, mode: MraMode) -> Self {
        self.mode = mode;
        self
    }

    pub fn with_priors(mut self, diagonal_band: u32, first_block_prior: bool) -> Self {
        self.diagonal_band = diagonal_band;
        self.first_block_prior = first_block_prior;
        self
    }

    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Checks the inputs of a build (shapes, block, scale); shared by the CPU and GPU builders.
    fn setup(&self, q: &ArrayView4<f32>, k: &ArrayView4<f32>, v: Option<&ArrayView4<f32>>, shape: &AttentionShape) -> Result<Setup> {
        shape.validate()?;
        let want_q = [shape.batch, shape.heads, shape.seq_q, shape.head_dim];
        let want_kv = [shape.batch, shape.kv_heads, shape.seq_kv, shape.head_dim];
        if q.shape() != want_q {
            return Err(Error::Shape(format!("Q is {:?}, the shape says {want_q:?}", q.shape())));
        }
        if k.shape() != want_kv {
            return Err(Error::Shape(format!("K is {:?}, the shape says {want_kv:?}", k.shape())));
        }
        if let Some(v) = v {
            if v.shape() != want_kv {
                return Err(Error::Shape(format!("V is {:?}, the shape says {want_kv:?}", v.shape())));
            }
        }
        // NaN or ±inf would turn block means and logits into NaN and the selection into noise.
        crate::shape::check_finite("q", q)?;
        crate::shape::check_finite("k", k)?;
        if let Some(v) = v {
            crate::shape::check_finite("v", v)?;
        }
        if self.block == 0 {
            return Err(Error::ZeroSize("block"));
        }
        let scale = self.scale.unwrap_or_else(|| shape.default_scale());
        if !scale.is_finite() {
            return Err(Error::NonFinite { tensor: "scale", index: 0, value: scale });
        }
        let b = self.block as usize;
        let geometry = PatternGeometry {
            block_q: self.block,
            block_k: self.block,
            seq_q: u32::try_from(shape.seq_q).map_err(|_| Error::Shape("seq_q too large".into()))?,
            seq_kv: u32::try_from(shape.seq_kv).map_err(|_| Error::Shape("seq_kv too large".into()))?,
            slices: u32::try_from(shape.slices()).map_err(|_| Error::Shape("too many slices".into()))?,
        };
        let (qn, kn) = (shape.seq_q.div_ceil(b), shape.seq_kv.div_ceil(b));
        let counts = (0..kn).map(|j| (((j + 1) * b).min(shape.seq_kv) - j * b) as u32).collect();
        Ok(Setup { scale, geometry, qn, kn, counts, budget: (self.blocks_per_row as usize).saturating_mul(qn) })
    }

    /// Whether block `(i, j)` is a prior (always selected).
    fn is_prior(&self, i: usize, j: usize) -> bool {
        let band = (i as i64 - j as i64).unsigned_abs() < self.diagonal_band as u64;
        band || (self.first_block_prior && (i == 0 || j == 0))
    }

    /// Builds the pattern (one per slice) and its remainder on the CPU. `v` is needed for the
    /// MRA-2 remainder (`V̂`); without it only MRA-2-s can run. The naive oracle of
    /// [`MraConfig::build_with_engine`].
    pub fn build(
        &self,
        q: &ArrayView4<f32>,
        k: &ArrayView4<f32>,
        v: Option<&ArrayView4<f32>>,
        shape: &AttentionShape,
    ) -> Result<Mra> {
        let Setup { scale, geometry, qn, kn, counts, budget } = self.setup(q, k, v, shape)?;
        let b = self.block as usize;
        let d = shape.head_dim;
        // Block means.
        let mut q_means = Vec::with_capacity(shape.slices() * qn * d);
        for bi in 0..shape.batch {
            for h in 0..shape.heads {
                block_means(&q.slice(ndarray::s![bi, h, .., ..]), b, qn, &mut q_means);
            }
        }
        let mut k_means = Vec::with_capacity(shape.batch * shape.kv_heads * kn * d);
        let mut v_means = Vec::new();
        for bi in 0..shape.batch {
            for h in 0..shape.kv_heads {
                block_means(&k.slice(ndarray::s![bi, h, .., ..]), b, kn, &mut k_means);
                if let Some(v) = v {
                    block_means(&v.slice(ndarray::s![bi, h, .., ..]), b, kn, &mut v_means);
                }
            }
        }
        let mut rows = SelectionRows::new(geometry, shape.slices() * qn)?;
        let mut logits = vec![0f32; qn * kn];
        let mut selected = vec![false; qn * kn];
        for slice in 0..shape.slices() {
            let kvs = shape.kv_slice(slice);
            for i in 0..qn {
                let qm = &q_means[(slice * qn + i) * d..][..d];
                for j in 0..kn {
                    let km = &k_means[(kvs * kn + j) * d..][..d];
                    let dot: f64 = qm.iter().zip(km).map(|(&a, &c)| a as f64 * c as f64).sum();
                    logits[i * kn + j] = (scale as f64 * dot) as f32;
                }
            }
            // Priors first, then the best (L_IJ − r_I) until the budget is spent.
            selected.iter_mut().for_each(|s| *s = false);
            let mut taken = 0usize;
            for i in 0..qn {
                for j in 0..kn {
                    if self.is_prior(i, j) {
                        selected[i * kn + j] = true;
                        taken += 1;
                    }
                }
            }
            if taken < budget {
                let mut cand: Vec<(f32, u32)> = Vec::with_capacity(qn * kn - taken);
                for i in 0..qn {
                    let row = &logits[i * kn..(i + 1) * kn];
                    let r = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                    for (j, &l) in row.iter().enumerate() {
                        if !selected[i * kn + j] {
                            cand.push((l - r, (i * kn + j) as u32));
                        }
                    }
                }
                let want = (budget - taken).min(cand.len());
                let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
                if want > 0 && want < cand.len() {
                    cand.select_nth_unstable_by(want - 1, order);
                }
                for &(_, at) in &cand[..want] {
                    selected[at as usize] = true;
                }
            }
            for i in 0..qn {
                rows.push(&logits[i * kn..(i + 1) * kn], |j| selected[i * kn + j]);
            }
        }
        let SelectionRows { acc, rest_ptr, rest_col, rest_logit } = rows;
        let pattern = acc.finish()?;
        Ok(Mra {
            pattern,
            remainder: MraRemainder {
                block: self.block,
                shape: *shape,
                q_blocks: qn as u32,
                k_blocks: kn as u32,
                scale,
                q_means,
                k_means,
                v_means,
                counts,
                rest_ptr,
                rest_col,
                rest_logit,
                precomputed_rows: None,
            },
            mode: self.mode,
        })
    }

    /// [`MraConfig::build`] with the low-resolution stage (block means, scores, selection and
    /// the remainder's row terms) on `engine`'s GPU; the same [`Mra`], with the row terms folded
    /// on the GPU so attention uploads them as they are. The selection follows the CPU rule
    /// exactly (priors, then the largest `L_IJ − r_I`, ties to the lower index); means and
    /// scores are accumulated in f32. Work past one binding or one grid is split into chunks
    /// of slices. The pipelines are compiled once per engine.
    pub fn build_with_engine(
        &self,
        engine: &crate::Engine,
        q: &ArrayView4<f32>,
        k: &ArrayView4<f32>,
        v: Option<&ArrayView4<f32>>,
        shape: &AttentionShape,
    ) -> Result<Mra> {
        engine.mra_lowres()?.build(engine, self, q, k, v, shape)
    }
}

/// Turns per-slice block selections into the pattern and the remainder's CSR complement; one
/// query-block row at a time, in slice-major order (shared by the CPU and GPU builds).
struct SelectionRows {
    acc: PatternAccumulator,
    rest_ptr: Vec<u32>,
    rest_col: Vec<u32>,
    rest_logit: Vec<f32>,
}

impl SelectionRows {
    fn new(geometry: PatternGeometry, rows: usize) -> Result<Self> {
        let mut rest_ptr = Vec::with_capacity(rows + 1);
        rest_ptr.push(0u32);
        Ok(Self { acc: PatternAccumulator::new(geometry)?, rest_ptr, rest_col: Vec::new(), rest_logit: Vec::new() })
    }

    /// Row with low-resolution scores `logits` (one per key block) and `selected(j)` per block.
    fn push(&mut self, logits: &[f32], selected: impl Fn(usize) -> bool) {
        self.acc.push_row((0..logits.len()).filter(|&j| selected(j)).map(|j| (j as u32, BlockMask::Full)));
        for (j, &l) in logits.iter().enumerate() {
            if !selected(j) {
                self.rest_col.push(j as u32);
                self.rest_logit.push(l);
            }
        }
        self.rest_ptr.push(self.rest_col.len() as u32);
    }
}

/// What a build needs after validation.
struct Setup {
    scale: f32,
    geometry: PatternGeometry,
    qn: usize,
    kn: usize,
    counts: Vec<u32>,
    budget: usize,
}
