//! Low-rank reconstruction of skipped attention scores (Bhojanapalli et al. 2021, "Eigen Analysis
//! of Self-Attention and its Reconstruction from Partial Computation").
//!
//! Pre-normalisation score rows `s ∈ Rⁿ` (`s_j = scale·q·k_j`, indexed by key position) vary
//! mostly inside a low-dimensional eigenspace. The method, per sequence length `n`:
//!
//! 1. [`LowRankFitter`] / [`fit`]: collect calibration score rows, compute their mean `μ` and the
//!    top-`r` principal directions `U ∈ R^{n×r}` (eigenvectors of the covariance, by the
//!    hand-written solver in [`linalg`]) → a serialisable [`LowRankModel`] with one
//!    [`LengthBasis`] per length. [`LengthBasis::explained_variance`] and
//!    [`eigenspace_overlap`] (principal angles between two bases) measure the paper's claims.
//! 2. Inference ([`LowRankPlan`], built once per `(model, config, n)`): exact scores `s_S` on a
//!    subset `S` of `m = samples` key positions ([`Selection`]); coefficients
//!    `c = argmin ‖U_S c − (s_S − μ_S)‖² + λ‖c‖²` through the precomputed operator
//!    `A = (U_SᵀU_S + λI)⁻¹U_Sᵀ`; `ŝ = μ + U c` with the exact scores kept on `S`; the normaliser
//!    over the full row and `O = P·V`. [`attention`] is the naive f64 CPU reference;
//!    [`GpuLowRank`] runs the same on the GPU (subset scores, reconstruction, normalisation and
//!    P·V in `lowrank.wgsl`).
//! 3. Pattern predictor ([`LowRankPattern`]): per query-block row, the key blocks where the
//!    softmax of the reconstructed rows holds the most mass, at a given block density → a
//!    [`BlockPattern`] that the engine then computes exactly.
//!
//! Scores use the default scale `1/sqrt(head_dim)`, for fitting and inference alike.

mod gpu;
pub mod linalg;

pub use gpu::{GpuLowRank, LowRankOutput, SHADER};

use crate::error::{Error, Result};
use crate::pattern::{BlockMask, BlockPattern, PatternAccumulator, PatternGeometry};
use crate::shape::validate_qkv;
use crate::{reference, Normalizer};
use ndarray::{Array4, ArrayView2, ArrayView4};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Version written by [`LowRankModel::save`]; `load` accepts only this one.
pub const MODEL_VERSION: u32 = 1;
/// The `format` metadata of a saved model.
pub const MODEL_FORMAT: &str = "sparse-attn-lowrank";

/// How the exactly computed key positions `S` are chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Selection {
    /// The first `first` positions (attention sinks such as `[CLS]`), plus the remaining
    /// `m − first` positions evenly spaced over `[first, n − 1]`, both ends included.
    Spread { first: usize },
    /// Explicit positions (each `< n`); sorted and deduplicated. Their count must equal `samples`.
    Explicit(Vec<usize>),
}

impl Default for Selection {
    fn default() -> Self {
        Selection::Spread { first: 2 }
    }
}

impl Selection {
    /// The `m` positions for a row of length `n`, ascending.
    pub fn positions(&self, n: usize, m: usize) -> Result<Vec<usize>> {
        if n == 0 {
            return Err(Error::ZeroSize("lowrank row length"));
        }
        if m == 0 {
            return Err(Error::ZeroSize("lowrank samples"));
        }
        if m > n {
            return Err(Error::Shape(format!(
                "lowrank: {m} samples exceed the row length {n}"
            )));
        }
        match self {
            Selection::Spread { first } => {
                let f = (*first).min(m).min(n);
                let mut out: Vec<usize> = (0..f).collect();
                let rest = m - f;
                if rest == 1 {
                    out.push(n - 1);
                } else if rest >= 2 {
                    let span = n - 1 - f;
                    let steps = rest - 1;
                    out.extend((0..rest).map(|j| f + (j * span + steps / 2) / steps));
                }
                out.dedup();
                if out.len() != m {
                    return Err(Error::Shape(format!(
                        "lowrank: could not spread {m} distinct positions over {n}"
                    )));
                }
                Ok(out)
            }
            Selection::Explicit(p) => {
                let mut out = p.clone();
                out.sort_unstable();
                out.dedup();
                if let Some(&bad) = out.iter().find(|&&j| j >= n) {
                    return Err(Error::Shape(format!(
                        "lowrank: explicit position {bad} is outside a row of length {n}"
                    )));
                }
                if out.len() != m {
                    return Err(Error::Shape(format!(
                        "lowrank: {} distinct explicit positions but samples = {m}",
                        out.len()
                    )));
                }
                Ok(out)
            }
        }
    }
}

/// The method's knobs. `rank` is the number of principal directions (kept by `fit`, used by
/// inference: at most the model's rank), `samples` the number `m >= rank` of exact scores per
/// row, `selection` which positions, `ridge` a multiplier on the regulariser.
///
/// The regulariser is the Gaussian prior of the fit (MAP estimate): `c_k ~ N(0, λ_k)` with `λ_k`
/// the k-th eigenvalue, residual noise `σ²` = the variance outside the top `r` directions per
/// coordinate (`Σ_{k>r} λ_k / n`), so the penalty on `c_k` is `ridge · σ² / λ_k`. `ridge = 0` is
/// plain least squares; `ridge = 1` (default) the posterior mean. A floor of `1e-12` relative to
/// the largest diagonal keeps the system positive definite unless `ridge = 0`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LowRankConfig {
    pub rank: usize,
    pub samples: usize,
    pub selection: Selection,
    pub ridge: f64,
}

impl Default for LowRankConfig {
    fn default() -> Self {
        Self {
            rank: 32,
            samples: 64,
            selection: Selection::default(),
            ridge: 1.0,
        }
    }
}

impl LowRankConfig {
    pub fn new(rank: usize, samples: usize) -> Self {
        Self {
            rank,
            samples,
            ..Self::default()
        }
    }

    pub fn with_selection(mut self, selection: Selection) -> Self {
        self.selection = selection;
        self
    }

    pub fn with_ridge(mut self, ridge: f64) -> Self {
        self.ridge = ridge;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::ZeroSize("lowrank rank"));
        }
        if self.samples < self.rank {
            return Err(Error::Shape(format!(
                "lowrank: samples ({}) must be at least the rank ({})",
                self.samples, self.rank
            )));
        }
        if !(self.ridge >= 0.0 && self.ridge.is_finite()) {
            return Err(Error::Data(format!(
                "lowrank ridge must be finite and >= 0, got {}",
                self.ridge
            )));
        }
        Ok(())
    }
}

/// Mean row and principal directions for one row length.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LengthBasis {
    /// Row length `n`.
    pub length: usize,
    /// Number of directions kept in `basis`.
    pub rank: usize,
    /// Calibration rows the statistics came from.
    pub rows: u64,
    /// `μ`, `n` values.
    pub mean: Vec<f64>,
    /// `U`, `n × rank` row-major, orthonormal columns, by decreasing eigenvalue.
    pub basis: Vec<f64>,
    /// Every eigenvalue of the covariance (`n`, descending, clamped at 0).
    pub eigenvalues: Vec<f64>,
}

impl LengthBasis {
    /// Share of the total variance in the top `r` directions (`r` may exceed `rank`).
    pub fn explained_variance(&self, r: usize) -> f64 {
        let total: f64 = self.eigenvalues.iter().sum();
        if total <= 0.0 {
            return 1.0;
        }
        self.eigenvalues.iter().take(r).sum::<f64>() / total
    }

    /// `explained_variance(r)` for `r = 1..=n`.
    pub fn explained_variance_curve(&self) -> Vec<f64> {
        let total: f64 = self.eigenvalues.iter().sum();
        let mut acc = 0.0;
        self.eigenvalues
            .iter()
            .map(|&x| {
                acc += x;
                if total > 0.0 {
                    acc / total
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// Component `j` of direction `k`.
    fn u(&self, j: usize, k: usize) -> f64 {
        self.basis[j * self.rank + k]
    }

    fn check(&self) -> Result<()> {
        let n = self.length;
        if n == 0 || self.rank == 0 {
            return Err(Error::Data("lowrank model: empty length bucket".into()));
        }
        if self.rank > n
            || self.mean.len() != n
            || self.basis.len() != n * self.rank
            || self.eigenvalues.len() != n
        {
            return Err(Error::Data(format!(
                "lowrank model bucket {n}: rank {}, {} mean values, {} basis values, {} eigenvalues do not agree",
                self.rank,
                self.mean.len(),
                self.basis.len(),
                self.eigenvalues.len()
            )));
        }
        use crate::shape::check_finite_values;
        check_finite_values("lowrank mean", &self.mean)?;
        check_finite_values("lowrank basis", &self.basis)?;
        check_finite_values("lowrank eigenvalues", &self.eigenvalues)?;
        Ok(())
    }
}

/// The fitted model: one basis per row length, all with the same rank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LowRankModel {
    pub version: u32,
    pub rank: usize,
    pub buckets: Vec<LengthBasis>,
}

impl LowRankModel {
    /// The row lengths the model has a basis for, ascending.
    pub fn lengths(&self) -> Vec<usize> {
        self.buckets.iter().map(|b| b.length).collect()
    }

    /// The basis for rows of length `n`; `Error::Unsupported` naming the lengths it has otherwise.
    pub fn basis(&self, n: usize) -> Result<&LengthBasis> {
        self.buckets.iter().find(|b| b.length == n).ok_or_else(|| {
            Error::Unsupported(format!(
                "lowrank model has no basis for length {n}; it has lengths {:?}",
                self.lengths()
            ))
        })
    }

    /// The inference plan for rows of length `n` under `config`.
    pub fn plan(&self, config: &LowRankConfig, n: usize) -> Result<LowRankPlan> {
        LowRankPlan::new(self.basis(n)?, config)
    }

    /// Checks version, ranks and every bucket's sizes and values.
    pub fn validate(&self) -> Result<()> {
        if self.version != MODEL_VERSION {
            return Err(Error::Data(format!(
                "lowrank model version {} (this build reads version {MODEL_VERSION})",
                self.version
            )));
        }
        if self.buckets.is_empty() {
            return Err(Error::Data("lowrank model has no length buckets".into()));
        }
        for b in &self.buckets {
            b.check()?;
            if b.rank != self.rank {
                return Err(Error::Data(format!(
                    "lowrank model: bucket {} has rank {}, the model {}",
                    b.length, b.rank, self.rank
                )));
            }
        }
        Ok(())
    }

    /// JSON (readable; floats round-trip to within an ulp or so — [`Self::save`] is exact).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Data(format!("lowrank model: {e}")))
    }

    pub fn from_json(s: &str) -> Result<Self> {
        let m: Self =
            serde_json::from_str(s).map_err(|e| Error::Data(format!("lowrank model: {e}")))?;
        m.validate()?;
        Ok(m)
    }

    /// Writes a safetensors file (bit-exact): per length `n`, f64 tensors `len{n}.mean` `[n]`,
    /// `len{n}.basis` `[n, rank]`, `len{n}.eigenvalues` `[n]`; metadata `format` =
    /// `sparse-attn-lowrank`, `version`, `rank`, `lengths` and `rows` (comma-separated).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_safetensors()?).map_err(|e| Error::io(path, e))
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_safetensors(&bytes).map_err(|e| match e {
            Error::Data(m) => Error::Data(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        use safetensors::tensor::{Dtype, TensorView};
        self.validate()?;
        let join = |xs: Vec<String>| xs.join(",");
        let metadata: std::collections::HashMap<String, String> = [
            ("format".to_string(), MODEL_FORMAT.to_string()),
            ("version".to_string(), self.version.to_string()),
            ("rank".to_string(), self.rank.to_string()),
            (
                "lengths".to_string(),
                join(self.buckets.iter().map(|b| b.length.to_string()).collect()),
            ),
            (
                "rows".to_string(),
                join(self.buckets.iter().map(|b| b.rows.to_string()).collect()),
            ),
        ]
        .into_iter()
        .collect();
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for b in &self.buckets {
            let bytes = |xs: &[f64]| xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            owned.push((
                format!("len{}.mean", b.length),
                vec![b.length],
                bytes(&b.mean),
            ));
            owned.push((
                format!("len{}.basis", b.length),
                vec![b.length, b.rank],
                bytes(&b.basis),
            ));
            owned.push((
                format!("len{}.eigenvalues", b.length),
                vec![b.length],
                bytes(&b.eigenvalues),
            ));
        }
        let mut views = Vec::new();
        for (name, shape, data) in &owned {
            let view = TensorView::new(Dtype::F64, shape.clone(), data)
                .map_err(|e| Error::Data(format!("lowrank model tensor {name}: {e}")))?;
            views.push((name.clone(), view));
        }
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::Data(format!("lowrank model: {e}")))
    }

    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        use safetensors::tensor::Dtype;
        use safetensors::SafeTensors;
        let bad = |m: String| Error::Data(format!("lowrank model: {m}"));
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |key: &str| {
            meta.get(key)
                .ok_or_else(|| bad(format!("metadata lacks `{key}`")))
        };
        if get("format")? != MODEL_FORMAT {
            return Err(bad(format!(
                "metadata format is `{}`, expected `{MODEL_FORMAT}`",
                get("format")?
            )));
        }
        let num = |key: &str, s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|e| bad(format!("metadata `{key}`: `{s}` is not a number ({e})")))
        };
        let version = u32::try_from(num("version", get("version")?)?)
            .map_err(|_| bad("version out of range".into()))?;
        if version != MODEL_VERSION {
            return Err(bad(format!(
                "version {version} (this build reads version {MODEL_VERSION})"
            )));
        }
        let rank = num("rank", get("rank")?)? as usize;
        let list = |key: &str| -> Result<Vec<u64>> {
            get(key)?
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| num(key, s))
                .collect()
        };
        let (lengths, rows) = (list("lengths")?, list("rows")?);
        if lengths.len() != rows.len() {
            return Err(bad(format!(
                "{} lengths but {} row counts",
                lengths.len(),
                rows.len()
            )));
        }
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let tensor = |name: String, want: Vec<usize>| -> Result<Vec<f64>> {
            let t = st
                .tensor(&name)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            if t.dtype() != Dtype::F64 || t.shape() != want.as_slice() {
                return Err(bad(format!(
                    "tensor `{name}` is {:?} {:?}, expected F64 {want:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect())
        };
        let mut buckets = Vec::new();
        for (&n, &r) in lengths.iter().zip(&rows) {
            let n = n as usize;
            buckets.push(LengthBasis {
                length: n,
                rank,
                rows: r,
                mean: tensor(format!("len{n}.mean"), vec![n])?,
                basis: tensor(format!("len{n}.basis"), vec![n, rank])?,
                eigenvalues: tensor(format!("len{n}.eigenvalues"), vec![n])?,
            });
        }
        let model = Self {
            version,
            rank,
            buckets,
        };
        model.validate()?;
        Ok(model)
    }
}

/// Running mean and second moment of the rows of one length.
#[derive(Clone, Debug)]
struct Moments {
    rows: u64,
    sum: Vec<f64>,
    /// Lower triangle of Σ x xᵀ, `n × n` row-major.
    cross: Vec<f64>,
    /// Pending rows, transposed (`n × pending`), flushed in blocks for cache-friendly updates.
    pending: Vec<f64>,
    count: usize,
}

const FIT_BLOCK: usize = 32;

impl Moments {
    fn new(n: usize) -> Self {
        Self {
            rows: 0,
            sum: vec![0.0; n],
            cross: vec![0.0; n * n],
            pending: vec![0.0; n * FIT_BLOCK],
            count: 0,
        }
    }

    fn add(&mut self, row: &[f64]) {
        let b = self.count;
        for (j, &x) in row.iter().enumerate() {
            self.sum[j] += x;
            self.pending[j * FIT_BLOCK + b] = x;
        }
        self.rows += 1;
        self.count += 1;
        if self.count == FIT_BLOCK {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let n = self.sum.len();
        let b = self.count;
        if b == 0 {
            return;
        }
        for i in 0..n {
            let xi = &self.pending[i * FIT_BLOCK..i * FIT_BLOCK + b];
            let row = &mut self.cross[i * n..i * n + i + 1];
            for (j, c) in row.iter_mut().enumerate() {
                let xj = &self.pending[j * FIT_BLOCK..j * FIT_BLOCK + b];
                *c += xi.iter().zip(xj).map(|(a, b)| a * b).sum::<f64>();
            }
        }
        self.count = 0;
    }
}

/// Collects calibration rows (any number of lengths) and fits a [`LowRankModel`].
#[derive(Clone, Debug)]
pub struct LowRankFitter {
    rank: usize,
    buckets: BTreeMap<usize, Moments>,
}

impl LowRankFitter {
    /// A fitter keeping `rank` principal directions per length.
    pub fn new(rank: usize) -> Result<Self> {
        if rank == 0 {
            return Err(Error::ZeroSize("lowrank rank"));
        }
        Ok(Self {
            rank,
            buckets: BTreeMap::new(),
        })
    }

    /// Adds one score row (its length picks the bucket).
    pub fn add_row(&mut self, row: &[f64]) -> Result<()> {
        if row.is_empty() {
            return Err(Error::ZeroSize("lowrank calibration row"));
        }
        crate::shape::check_finite_values("lowrank calibration row", row)?;
        self.buckets
            .entry(row.len())
            .or_insert_with(|| Moments::new(row.len()))
            .add(row);
        Ok(())
    }

    /// Adds the score rows `scale·q·kᵀ` of every slice (`q` `[batch, heads, seq_q, d]`, `k`
    /// `[batch, kv_heads, seq_kv, d]`; rows of length `seq_kv`), every `row_stride`-th query.
    pub fn add_scores(
        &mut self,
        q: &ArrayView4<f32>,
        k: &ArrayView4<f32>,
        row_stride: usize,
    ) -> Result<()> {
        if row_stride == 0 {
            return Err(Error::ZeroSize("lowrank row stride"));
        }
        let shape = validate_qkv(q, k, k)?;
        let scale = shape.default_scale() as f64;
        let mut row = vec![0f64; shape.seq_kv];
        for s in 0..shape.slices() {
            let (b, h) = (s / shape.heads, s % shape.heads);
            let kv = shape.kv_slice(s) % shape.kv_heads;
            let qs = q.slice(ndarray::s![b, h, .., ..]);
            let ks = k.slice(ndarray::s![b, kv, .., ..]);
            for i in (0..shape.seq_q).step_by(row_stride) {
                exact_row(&qs, &ks, i, scale, &mut row);
                self.add_row(&row)?;
            }
        }
        Ok(())
    }

    /// Means and principal directions of every bucket.
    pub fn finish(self) -> Result<LowRankModel> {
        if self.buckets.is_empty() {
            return Err(Error::Data("lowrank fit: no calibration rows".into()));
        }
        let mut buckets = Vec::new();
        for (n, mut mo) in self.buckets {
            mo.flush();
            if self.rank > n {
                return Err(Error::Shape(format!(
                    "lowrank fit: rank {} exceeds the row length {n}",
                    self.rank
                )));
            }
            let rows = mo.rows as f64;
            let mean: Vec<f64> = mo.sum.iter().map(|x| x / rows).collect();
            let mut cov = vec![0f64; n * n];
            for i in 0..n {
                for j in 0..=i {
                    let c = mo.cross[i * n + j] / rows - mean[i] * mean[j];
                    cov[i * n + j] = c;
                    cov[j * n + i] = c;
                }
            }
            let eig = linalg::symmetric_eigen(&cov, n)?;
            let mut basis = vec![0f64; n * self.rank];
            for j in 0..n {
                basis[j * self.rank..(j + 1) * self.rank]
                    .copy_from_slice(&eig.vectors[j * n..j * n + self.rank]);
            }
            // Sign convention: each direction's largest-magnitude component is positive.
            for c in 0..self.rank {
                let big = (0..n)
                    .map(|j| basis[j * self.rank + c])
                    .fold(0.0f64, |a, x| if x.abs() > a.abs() { x } else { a });
                if big < 0.0 {
                    for j in 0..n {
                        basis[j * self.rank + c] = -basis[j * self.rank + c];
                    }
                }
            }
            let eigenvalues = eig.values.iter().map(|&x| x.max(0.0)).collect();
            buckets.push(LengthBasis {
                length: n,
                rank: self.rank,
                rows: mo.rows,
                mean,
                basis,
                eigenvalues,
            });
        }
        Ok(LowRankModel {
            version: MODEL_VERSION,
            rank: self.rank,
            buckets,
        })
    }
}

/// Fits a model with `config.rank` directions on the score rows of every `(q, k)` pair.
pub fn fit(
    config: &LowRankConfig,
    calibration: &[(ArrayView4<f32>, ArrayView4<f32>)],
) -> Result<LowRankModel> {
    let mut f = LowRankFitter::new(config.rank)?;
    for (q, k) in calibration {
        f.add_scores(q, k, 1)?;
    }
    f.finish()
}

/// Principal angles between the top-`r` subspaces of two bases (same length).
#[derive(Clone, Debug, PartialEq)]
pub struct Overlap {
    /// Cosines of the principal angles, descending (1 = shared direction).
    pub cosines: Vec<f64>,
    /// `Σ cos² / r = ‖U_aᵀU_b‖²_F / r` (1 = same subspace, ≈ r/n for random subspaces).
    pub mean_cos2: f64,
}

/// Principal angles between span(U_a[:, :r]) and span(U_b[:, :r]): the singular values of
/// `M = U_aᵀU_b`, as square roots of the eigenvalues of `MᵀM` (the hand-written solver).
pub fn eigenspace_overlap(a: &LengthBasis, b: &LengthBasis, r: usize) -> Result<Overlap> {
    if a.length != b.length {
        return Err(Error::Shape(format!(
            "eigenspace overlap: lengths {} and {} differ",
            a.length, b.length
        )));
    }
    if r == 0 {
        return Err(Error::ZeroSize("overlap rank"));
    }
    if r > a.rank || r > b.rank {
        return Err(Error::Shape(format!(
            "eigenspace overlap: rank {r} exceeds the bases' ranks {} and {}",
            a.rank, b.rank
        )));
    }
    let n = a.length;
    let mut m = vec![0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            m[i * r + j] = (0..n).map(|t| a.u(t, i) * b.u(t, j)).sum();
        }
    }
    let mut mtm = vec![0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            mtm[i * r + j] = (0..r).map(|t| m[t * r + i] * m[t * r + j]).sum();
        }
    }
    let eig = linalg::symmetric_eigen(&mtm, r)?;
    let cosines: Vec<f64> = eig
        .values
        .iter()
        .map(|&x| x.clamp(0.0, 1.0).sqrt())
        .collect();
    let mean_cos2 = cosines.iter().map(|c| c * c).sum::<f64>() / r as f64;
    Ok(Overlap { cosines, mean_cos2 })
}

/// Everything inference needs for rows of one length: the subset, `μ`, `U` (truncated to the
/// config's rank) and the least-squares operator `A = (U_SᵀU_S + λI)⁻¹U_Sᵀ` (`r × m`).
#[derive(Clone, Debug)]
pub struct LowRankPlan {
    length: usize,
    rank: usize,
    subset: Vec<usize>,
    mean: Vec<f64>,
    basis: Vec<f64>,
    operator: Vec<f64>,
}

impl LowRankPlan {
    pub fn new(basis: &LengthBasis, config: &LowRankConfig) -> Result<Self> {
        config.validate()?;
        basis.check()?;
        let (n, r) = (basis.length, config.rank);
        if r > basis.rank {
            return Err(Error::Shape(format!(
                "lowrank: rank {r} exceeds the model's rank {}",
                basis.rank
            )));
        }
        let subset = config.selection.positions(n, config.samples)?;
        let m = subset.len();
        let mut u = vec![0f64; n * r];
        for j in 0..n {
            for c in 0..r {
                u[j * r + c] = basis.u(j, c);
            }
        }
        let mut us = vec![0f64; m * r];
        for (p, &j) in subset.iter().enumerate() {
            us[p * r..(p + 1) * r].copy_from_slice(&u[j * r..(j + 1) * r]);
        }
        let tail: f64 = basis.eigenvalues.iter().skip(r).sum::<f64>() / n as f64;
        let top = basis
            .eigenvalues
            .first()
            .copied()
            .unwrap_or(0.0)
            .max(f64::MIN_POSITIVE);
        let penalty: Vec<f64> = (0..r)
            .map(|k| {
                if config.ridge == 0.0 {
                    0.0
                } else {
                    let lk = basis.eigenvalues[k].max(1e-12 * top);
                    config.ridge * (tail / lk).max(1e-12 * m as f64 / n as f64)
                }
            })
            .collect();
        let operator = linalg::ridge_operator_diag(&us, m, r, &penalty)?;
        Ok(Self {
            length: n,
            rank: r,
            subset,
            mean: basis.mean.clone(),
            basis: u,
            operator,
        })
    }

    pub fn length(&self) -> usize {
        self.length
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// The exactly computed key positions `S`, ascending.
    pub fn subset(&self) -> &[usize] {
        &self.subset
    }
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }
    /// `U`, `n × rank` row-major.
    pub fn basis(&self) -> &[f64] {
        &self.basis
    }
    /// `A`, `rank × m` row-major.
    pub fn operator(&self) -> &[f64] {
        &self.operator
    }

    /// `c = A·(s_S − μ_S)` for the exact subset scores `s_S` (in `subset()` order).
    pub fn coefficients(&self, exact: &[f64]) -> Result<Vec<f64>> {
        let m = self.subset.len();
        if exact.len() != m {
            return Err(Error::Shape(format!(
                "lowrank: {} subset scores for {m} positions",
                exact.len()
            )));
        }
        let centred: Vec<f64> = exact
            .iter()
            .zip(&self.subset)
            .map(|(s, &j)| s - self.mean[j])
            .collect();
        Ok((0..self.rank)
            .map(|i| {
                self.operator[i * m..(i + 1) * m]
                    .iter()
                    .zip(&centred)
                    .map(|(a, y)| a * y)
                    .sum()
            })
            .collect())
    }

    /// The full row `ŝ = μ + U c`, with the exact scores kept on `S`.
    pub fn reconstruct_row(&self, exact: &[f64]) -> Result<Vec<f64>> {
        let c = self.coefficients(exact)?;
        let r = self.rank;
        let mut row: Vec<f64> = (0..self.length)
            .map(|j| {
                self.mean[j]
                    + self.basis[j * r..(j + 1) * r]
                        .iter()
                        .zip(&c)
                        .map(|(u, c)| u * c)
                        .sum::<f64>()
            })
            .collect();
        for (&j, &s) in self.subset.iter().zip(exact) {
            row[j] = s;
        }
        Ok(row)
    }

    fn check_shape(
        &self,
        q: &ArrayView4<f32>,
        k: &ArrayView4<f32>,
        v: &ArrayView4<f32>,
    ) -> Result<crate::AttentionShape> {
        let shape = validate_qkv(q, k, v)?;
        if shape.seq_kv != self.length {
            return Err(Error::Shape(format!(
                "lowrank plan is for rows of length {}, the keys have {}",
                self.length, shape.seq_kv
            )));
        }
        Ok(shape)
    }
}

/// Exact scores of row `i` against every key: `out[j] = scale·q_i·k_j` (f64).
fn exact_row(q: &ArrayView2<f32>, k: &ArrayView2<f32>, i: usize, scale: f64, out: &mut [f64]) {
    let qi = q.row(i);
    for (o, kj) in out.iter_mut().zip(k.outer_iter()) {
        *o = scale
            * qi.iter()
                .zip(kj.iter())
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>();
    }
}

/// Exact scores of row `i` on the plan's subset.
fn subset_row(
    plan: &LowRankPlan,
    q: &ArrayView2<f32>,
    k: &ArrayView2<f32>,
    i: usize,
    scale: f64,
) -> Vec<f64> {
    let qi = q.row(i);
    plan.subset
        .iter()
        .map(|&j| {
            scale
                * qi.iter()
                    .zip(k.row(j).iter())
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
        })
        .collect()
}

/// Calls `f(slice, query, reconstructed row)` for every query row of every slice.
fn for_each_row(
    plan: &LowRankPlan,
    q: &ArrayView4<f32>,
    k: &ArrayView4<f32>,
    v: &ArrayView4<f32>,
    mut f: impl FnMut(usize, usize, &[f64]),
) -> Result<crate::AttentionShape> {
    let shape = plan.check_shape(q, k, v)?;
    let scale = shape.default_scale() as f64;
    for s in 0..shape.slices() {
        let (b, h) = (s / shape.heads, s % shape.heads);
        let kv = shape.kv_slice(s) % shape.kv_heads;
        let qs = q.slice(ndarray::s![b, h, .., ..]);
        let ks = k.slice(ndarray::s![b, kv, .., ..]);
        for i in 0..shape.seq_q {
            let row = plan.reconstruct_row(&subset_row(plan, &qs, &ks, i, scale))?;
            f(s, i, &row);
        }
    }
    Ok(shape)
}

/// Reconstructed scores `[batch, heads, seq_q, seq_kv]` (f64 arithmetic; a dense reference for
/// measuring, O(n²) memory).
pub fn reconstruct_scores(
    plan: &LowRankPlan,
    q: &ArrayView4<f32>,
    k: &ArrayView4<f32>,
) -> Result<Array4<f32>> {
    let shape = plan.check_shape(q, k, k)?;
    let mut out = Array4::<f32>::zeros((shape.batch, shape.heads, shape.seq_q, shape.seq_kv));
    for_each_row(plan, q, k, k, |s, i, row| {
        let (b, h) = (s / shape.heads, s % shape.heads);
        for (o, &x) in out.slice_mut(ndarray::s![b, h, i, ..]).iter_mut().zip(row) {
            *o = x as f32;
        }
    })?;
    Ok(out)
}

/// The CPU reference of low-rank attention: reconstructed rows, `normalizer` over the full row,
/// `O = P·V`, all in f64.
pub fn attention(
    plan: &LowRankPlan,
    q: &ArrayView4<f32>,
    k: &ArrayView4<f32>,
    v: &ArrayView4<f32>,
    normalizer: Normalizer,
) -> Result<Array4<f32>> {
    normalizer.validate()?;
    let shape = plan.check_shape(q, k, v)?;
    let d = shape.head_dim;
    let mut out = Array4::<f32>::zeros((shape.batch, shape.heads, shape.seq_q, d));
    for_each_row(plan, q, k, v, |s, i, row| {
        let (b, h) = (s / shape.heads, s % shape.heads);
        let kv = shape.kv_slice(s) % shape.kv_heads;
        let p = reference::normalize(row, normalizer);
        let mut o = vec![0f64; d];
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                for (c, oc) in o.iter_mut().enumerate() {
                    *oc += pj * v[[b, kv, j, c]] as f64;
                }
            }
        }
        for (c, &x) in o.iter().enumerate() {
            out[[b, h, i, c]] = x as f32;
        }
    })?;
    Ok(out)
}

/// Pattern predictor: per query-block row, keep the `ceil(density · k_blocks)` key blocks (at
/// least one) where the softmax of the reconstructed rows holds the most mass (summed over the
/// block's queries); ties go to the lower block. The kept blocks are computed exactly by the
/// engine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowRankPattern {
    /// Share of key blocks kept per query-block row, in (0, 1].
    pub density: f64,
    pub block_q: u32,
    pub block_k: u32,
}

impl LowRankPattern {
    pub fn new(density: f64) -> Self {
        Self {
            density,
            block_q: 32,
            block_k: 32,
        }
    }

    pub fn with_blocks(mut self, block_q: u32, block_k: u32) -> Self {
        (self.block_q, self.block_k) = (block_q, block_k);
        self
    }

    /// Key blocks kept per query-block row for `k_blocks` blocks.
    pub fn blocks_per_row(&self, k_blocks: u32) -> u32 {
        ((self.density * k_blocks as f64).ceil() as u32).clamp(1, k_blocks.max(1))
    }

    /// One pattern slice per (batch, head) slice of `q`.
    pub fn build(
        &self,
        plan: &LowRankPlan,
        q: &ArrayView4<f32>,
        k: &ArrayView4<f32>,
    ) -> Result<BlockPattern> {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(Error::Data(format!(
                "lowrank pattern density must be in (0, 1], got {}",
                self.density
            )));
        }
        let shape = plan.check_shape(q, k, k)?;
        let to_u32 = |x: usize, what: &str| {
            u32::try_from(x)
                .map_err(|_| Error::Shape(format!("lowrank pattern: {what} {x} exceeds u32")))
        };
        let geometry = PatternGeometry {
            block_q: self.block_q,
            block_k: self.block_k,
            seq_q: to_u32(shape.seq_q, "seq_q")?,
            seq_kv: to_u32(shape.seq_kv, "seq_kv")?,
            slices: to_u32(shape.slices(), "slices")?,
        };
        let mut acc = PatternAccumulator::new(geometry)?;
        let (q_blocks, k_blocks) = (geometry.q_blocks() as usize, geometry.k_blocks() as usize);
        let keep = self.blocks_per_row(k_blocks as u32) as usize;
        let (bq, bk) = (self.block_q as usize, self.block_k as usize);
        let mut mass = vec![0f64; slices_len(shape.slices(), q_blocks, k_blocks)?];
        for_each_row(plan, q, k, k, |s, i, row| {
            let p = reference::softmax(row);
            let base = (s * q_blocks + i / bq) * k_blocks;
            for (j, pj) in p.iter().enumerate() {
                mass[base + j / bk] += pj;
            }
        })?;
        for row in mass.chunks_exact(k_blocks) {
            let mut order: Vec<usize> = (0..k_blocks).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let mut kept: Vec<u32> = order[..keep].iter().map(|&x| x as u32).collect();
            kept.sort_unstable();
            acc.push_row(kept.into_iter().map(|kb| (kb, BlockMask::Full)));
        }
        Ok(acc.finish()?)
    }
}

fn slices_len(slices: usize, q_blocks: usize, k_blocks: usize) -> Result<usize> {
    slices
        .checked_mul(q_blocks)
        .and_then(|x| x.checked_mul(k_blocks))
        .ok_or_else(|| Error::Shape("lowrank pattern: block grid overflows".into()))
}
