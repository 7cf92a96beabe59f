//! SBM-Transformer edges (Cho et al. 2022, "Transformers meet Stochastic Block Models").
//!
//! Per head, a mixed-membership stochastic block model decides which (query, key) pairs are
//! computed:
//!
//! - cluster embeddings `C ∈ R^{k×d}` (paper: `k = 128`), a two-layer MLP `φ(x) = relu(x·W1 + b1)·W2 + b2`
//!   (`d → d → d`) shared by the heads of a layer;
//! - memberships `Q̂ = sigmoid(s·φ(Q)·Cᵀ)` `[n×k]`, `K̂ = sigmoid(s·φ(K)·Cᵀ)` `[m×k]`;
//! - block matrix `S = softmax(s·C·Cᵀ)` over all `k²` entries;
//! - expected adjacency `E[A] = Q̂·S·K̂ᵀ` (every entry lies in `[0, 1]`).
//!
//! `s` is a logit scale: 1 in the paper and for loaded models without a `logit_scale` tensor;
//! the training-free initialisation uses `1/sqrt(d)` (see below). A graph is sampled from the
//! model and used as the attention mask: the kernels then normalise (softmax or entmax) over each
//! query's sampled edges, and a query without edges outputs 0.
//!
//! ## Sampling (fastRG)
//!
//! [`SbmSampler`] never forms `E[A]`: with `a = 1ᵀQ̂`, `b = 1ᵀK̂` and the density scale `ρ`, it
//! 1. draws the edge count `N ~ Poisson(ρ · Σ_uv a_u S_uv b_v)`;
//! 2. splits the `N` edges over cluster pairs `(u, v)` in proportion to `a_u S_uv b_v` (an alias
//!    table over the `k²` pairs);
//! 3. draws each edge's query from column `u` of `Q̂` normalised and its key from column `v` of
//!    `K̂` normalised (inverse CDF, one column's cumulative sums at a time);
//! 4. drops duplicates.
//!
//! The multigraph has `E[count_ij] = ρ·E[A]_ij` (Poisson per pair), so after dropping duplicates
//! pair `(i, j)` is an edge with probability `1 − exp(−ρ·E[A]_ij)` (≈ `ρ·E[A]_ij` for small
//! values). Time and memory are `O(N + (n + m)·k + k²)`; the memberships are the `(n+m)·k` term.
//! The density knob ([`Density`]) either scales the expected mass (`Scale(ρ)`) or sets `ρ` so
//! the expected number of sampled edges is a given number per query (`EdgesPerQuery(e)`).
//! Sampling is seeded: slice `t` uses `ChaCha8Rng::seed_from_u64(seed)` on stream `t`, so a
//! pattern is a pure function of the inputs, the model and the seed.
//!
//! ## Parameters
//!
//! [`SbmModel::load`] reads safetensors (F32, F16 or BF16) with, for layer `L` and head `H`:
//!
//! | tensor | shape | |
//! |---|---|---|
//! | `layer{L}.head{H}.clusters` | `[k, d]` | cluster embeddings `C` of head `H` (required) |
//! | `layer{L}.phi.w1`, `layer{L}.phi.w2` | `[d, d]` | `φ` weights, `x·W` convention (optional) |
//! | `layer{L}.phi.b1`, `layer{L}.phi.b2` | `[d]` | `φ` biases (optional, with the weights) |
//! | `layer{L}.logit_scale` | `[1]` | `s` (optional, default 1) |
//!
//! Layers are numbered `0..L` without gaps, heads `0..H` without gaps; `φ` absent = identity.
//! [`SbmModel::save`] writes the same layout (F32).
//!
//! The training-free initialisation ([`SbmLayer::from_keys`]) sets `C` to the k-means centroids
//! of each head's keys (k-means++ then Lloyd, on at most `kmeans_sample` keys), `φ` = identity
//! and `s = 1/sqrt(d)` (the attention scale, so that memberships are sigmoids of
//! attention-like logits instead of saturating), so it runs on any model.
//!
//! Out of scope: training. The paper back-propagates through the sampled graph with a
//! straight-through estimator; that is a training-time device and needs a backward pass, which
//! this crate does not have.

mod random;

use crate::error::{Error, Result};
use crate::pattern::{BlockMask, BlockPattern, PatternAccumulator, PatternGeometry};
use crate::patterns::DEFAULT_BLOCK;
use ndarray::{Array2, ArrayView2, ArrayView4};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::Path;

use random::{poisson, Alias};
use crate::patterns::sparsefinder::kmeans::kmeans;

/// How many edges to sample.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Density {
    /// Multiply the model's expected mass `Σ E[A]` by this factor (1 = the model as is).
    Scale(f64),
    /// Scale the mass so that the expected number of sampled edges (before duplicates are
    /// dropped) is this many per query.
    EdgesPerQuery(f64),
}

/// Sampling and initialisation settings; defaults follow the paper where it says (k = 128).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SbmConfig {
    /// Clusters `k` of the training-free initialisation.
    pub clusters: usize,
    /// The density knob.
    pub density: Density,
    /// Seed of the sampler (and of k-means in the initialisation).
    pub seed: u64,
    pub block_q: u32,
    pub block_k: u32,
    /// Lloyd iterations of the initialisation's k-means.
    pub kmeans_iterations: usize,
    /// At most this many keys (evenly strided) feed the initialisation's k-means.
    pub kmeans_sample: usize,
}

impl Default for SbmConfig {
    fn default() -> Self {
        Self {
            clusters: 128,
            density: Density::Scale(1.0),
            seed: 0,
            block_q: DEFAULT_BLOCK,
            block_k: DEFAULT_BLOCK,
            kmeans_iterations: 10,
            kmeans_sample: 4096,
        }
    }
}

impl SbmConfig {
    pub fn with_density(mut self, density: Density) -> Self {
        self.density = density;
        self
    }
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn with_clusters(mut self, clusters: usize) -> Self {
        self.clusters = clusters;
        self
    }
    pub fn with_blocks(mut self, block_q: u32, block_k: u32) -> Self {
        (self.block_q, self.block_k) = (block_q, block_k);
        self
    }
    fn validate(&self) -> Result<()> {
        if self.clusters == 0 {
            return Err(Error::ZeroSize("sbm clusters"));
        }
        match self.density {
            Density::Scale(x) | Density::EdgesPerQuery(x) if x.is_finite() && x >= 0.0 => Ok(()),
            d => Err(Error::Data(format!("sbm density must be finite and non-negative, got {d:?}"))),
        }
    }
}

/// The MLP `φ(x) = relu(x·W1 + b1)·W2 + b2`; weights `[d, d]` row-major (`x·W` convention).
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp {
    pub dim: usize,
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
}

impl Mlp {
    fn validate(&self) -> Result<()> {
        let d = self.dim;
        if self.w1.len() != d * d || self.w2.len() != d * d || self.b1.len() != d || self.b2.len() != d {
            return Err(Error::Shape(format!(
                "sbm φ: d = {d} needs w1/w2 of {} and b1/b2 of {d} values, got {}, {}, {}, {}",
                d * d,
                self.w1.len(),
                self.w2.len(),
                self.b1.len(),
                self.b2.len()
            )));
        }
        Ok(())
    }

    /// `φ(x)` into `out` (both length `dim`).
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        let d = self.dim;
        let mut h = self.b1.clone();
        for (i, &xi) in x.iter().enumerate().take(d) {
            for (o, hv) in h.iter_mut().enumerate() {
                *hv += xi * self.w1[i * d + o];
            }
        }
        out.copy_from_slice(&self.b2);
        for (i, &hi) in h.iter().enumerate() {
            let hi = hi.max(0.0);
            if hi != 0.0 {
                for (o, ov) in out.iter_mut().enumerate() {
                    *ov += hi * self.w2[i * d + o];
                }
            }
        }
    }
}

/// One head's cluster embeddings `C` `[k, d]`.
#[derive(Clone, Debug, PartialEq)]
pub struct SbmHead {
    pub clusters: Array2<f32>,
}

/// One layer: `φ` (None = identity), the logit scale `s`, and each head's clusters.
#[derive(Clone, Debug, PartialEq)]
pub struct SbmLayer {
    pub phi: Option<Mlp>,
    pub logit_scale: f32,
    pub heads: Vec<SbmHead>,
}

impl SbmLayer {
    /// Training-free initialisation from keys `[batch, kv_heads, seq, d]`: per kv head, `C` =
    /// k-means centroids (`config.clusters`, seeded) of that head's keys over the batch; `φ` =
    /// identity, `s = 1/sqrt(d)`.
    pub fn from_keys(k: &ArrayView4<f32>, config: &SbmConfig) -> Result<Self> {
        config.validate()?;
        let (batch, heads, seq, d) = k.dim();
        if batch == 0 || heads == 0 || seq == 0 || d == 0 {
            return Err(Error::ZeroSize("sbm keys"));
        }
        let total = batch * seq;
        let stride = total.div_ceil(config.kmeans_sample.max(1)).max(1);
        let mut out = Vec::with_capacity(heads);
        for h in 0..heads {
            let mut points = Vec::with_capacity(total.div_ceil(stride) * d);
            for t in (0..total).step_by(stride) {
                points.extend(k.slice(ndarray::s![t / seq, h, t % seq, ..]).iter().map(|&x| x as f64));
            }
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            rng.set_stream(h as u64);
            let c = kmeans(&points, d, config.clusters, config.kmeans_iterations, 1, &mut rng);
            let clusters = Array2::from_shape_vec((config.clusters, d), c.into_iter().map(|x| x as f32).collect())
                .map_err(|e| Error::Shape(format!("sbm clusters: {e}")))?;
            out.push(SbmHead { clusters });
        }
        Ok(Self { phi: None, logit_scale: 1.0 / (d as f32).sqrt(), heads: out })
    }

    fn validate(&self, d: usize) -> Result<()> {
        if self.heads.is_empty() {
            return Err(Error::ZeroSize("sbm layer heads"));
        }
        if !self.logit_scale.is_finite() {
            return Err(Error::Data(format!("sbm logit_scale is {}", self.logit_scale)));
        }
        if let Some(phi) = &self.phi {
            phi.validate()?;
            if phi.dim != d {
                return Err(Error::Shape(format!("sbm φ has d = {}, the inputs have head_dim {d}", phi.dim)));
            }
        }
        for (h, head) in self.heads.iter().enumerate() {
            let (k, hd) = head.clusters.dim();
            if k == 0 {
                return Err(Error::ZeroSize("sbm clusters"));
            }
            if hd != d {
                return Err(Error::Shape(format!("sbm head {h}: clusters are [{k}, {hd}], the inputs have head_dim {d}")));
            }
            if head.clusters.iter().any(|x| !x.is_finite()) {
                return Err(Error::Data(format!("sbm head {h}: non-finite cluster embedding")));
            }
        }
        Ok(())
    }
}

/// SBM parameters of a model: one [`SbmLayer`] per layer.
#[derive(Clone, Debug, PartialEq)]
pub struct SbmModel {
    pub layers: Vec<SbmLayer>,
}

fn tensor_f32(view: &TensorView<'_>, name: &str) -> Result<Vec<f32>> {
    let data = view.data();
    let (size, convert): (usize, fn(&[u8]) -> f32) = match view.dtype() {
        Dtype::F16 => (2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::BF16 => (2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        other => return Err(Error::Data(format!("sbm `{name}`: expected F32/F16/BF16, found {other:?}"))),
    };
    Ok(data.chunks_exact(size).map(convert).collect())
}

impl SbmModel {
    /// Reads the safetensors layout documented in the module.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
        let get = |name: &str| -> Result<Option<(Vec<usize>, Vec<f32>)>> {
            match st.tensor(name) {
                Ok(v) => Ok(Some((v.shape().to_vec(), tensor_f32(&v, name)?))),
                Err(safetensors::SafeTensorError::TensorNotFound(_)) => Ok(None),
                Err(e) => Err(Error::Data(format!("{}: `{name}`: {e}", path.display()))),
            }
        };
        let mut layers = Vec::new();
        for l in 0.. {
            let mut heads = Vec::new();
            for h in 0.. {
                let name = format!("layer{l}.head{h}.clusters");
                let Some((shape, data)) = get(&name)? else { break };
                let [k, d] = shape[..] else {
                    return Err(Error::Data(format!("{}: `{name}` has shape {shape:?}, expected [k, d]", path.display())));
                };
                let clusters = Array2::from_shape_vec((k, d), data).map_err(|e| Error::Data(format!("`{name}`: {e}")))?;
                heads.push(SbmHead { clusters });
            }
            if heads.is_empty() {
                break;
            }
            let d = heads[0].clusters.ncols();
            let phi = match get(&format!("layer{l}.phi.w1"))? {
                None => None,
                Some((_, w1)) => {
                    let part = |p: &str| -> Result<Vec<f32>> {
                        get(&format!("layer{l}.phi.{p}"))?
                            .map(|(_, v)| v)
                            .ok_or_else(|| Error::Data(format!("{}: layer {l} has phi.w1 but no phi.{p}", path.display())))
                    };
                    Some(Mlp { dim: d, w1, b1: part("b1")?, w2: part("w2")?, b2: part("b2")? })
                }
            };
            let logit_scale = match get(&format!("layer{l}.logit_scale"))? {
                None => 1.0,
                Some((_, v)) => *v.first().ok_or_else(|| Error::Data(format!("layer{l}.logit_scale is empty")))?,
            };
            let layer = SbmLayer { phi, logit_scale, heads };
            layer.validate(d).map_err(|e| Error::Data(format!("{}: layer {l}: {e}", path.display())))?;
            layers.push(layer);
        }
        if layers.is_empty() {
            return Err(Error::Data(format!("{}: no `layer0.head0.clusters` tensor", path.display())));
        }
        Ok(Self { layers })
    }

    /// Writes the safetensors layout documented in the module (F32).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (l, layer) in self.layers.iter().enumerate() {
            for (h, head) in layer.heads.iter().enumerate() {
                let c: Vec<f32> = head.clusters.iter().copied().collect();
                tensors.insert(format!("layer{l}.head{h}.clusters"), (head.clusters.shape().to_vec(), bytes(&c)));
            }
            if let Some(phi) = &layer.phi {
                let d = phi.dim;
                for (p, v, shape) in [("w1", &phi.w1, vec![d, d]), ("b1", &phi.b1, vec![d]), ("w2", &phi.w2, vec![d, d]), ("b2", &phi.b2, vec![d])] {
                    tensors.insert(format!("layer{l}.phi.{p}"), (shape, bytes(v)));
                }
            }
            tensors.insert(format!("layer{l}.logit_scale"), (vec![1], bytes(&[layer.logit_scale])));
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, (shape, data))| {
                TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (name.clone(), v)).map_err(|e| Error::Data(format!("`{name}`: {e}")))
            })
            .collect::<Result<_>>()?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "sparse-attn-sbm".to_string());
        let out = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Data(format!("serialise sbm model: {e}")))?;
        std::fs::write(path, out).map_err(|e| Error::io(path, e))
    }
}

/// Sampled edges of one slice as CSR: query `i`'s keys are `keys[row_ptr[i]..row_ptr[i+1]]`,
/// ascending and unique.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edges {
    pub row_ptr: Vec<u32>,
    pub keys: Vec<u32>,
}

impl Edges {
    pub fn count(&self) -> usize {
        self.keys.len()
    }
    pub fn row(&self, i: usize) -> &[u32] {
        match (self.row_ptr.get(i), self.row_ptr.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.keys[a as usize..b as usize],
            _ => &[],
        }
    }
}

/// The model of one head on given queries and keys, ready to sample: memberships (column-major),
/// their column sums, `S`, and the alias table over cluster pairs. `O((n+m)·k + k²)` memory.
#[derive(Clone, Debug)]
pub struct SbmSampler {
    n: usize,
    m: usize,
    k: usize,
    qhat: Vec<f32>,
    khat: Vec<f32>,
    s: Vec<f64>,
    mass: f64,
    rho: f64,
    cells: Option<Alias>,
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Column-major memberships `[k][rows]` = sigmoid(s·φ(x)·Cᵀ).
fn memberships(x: &ArrayView2<f32>, phi: Option<&Mlp>, clusters: &Array2<f32>, scale: f32) -> Vec<f32> {
    let (rows, d) = x.dim();
    let k = clusters.nrows();
    let mut out = vec![0f32; k * rows];
    let mut buf = vec![0f32; d];
    let mut row = vec![0f32; d];
    let c: Vec<f32> = clusters.iter().copied().collect();
    for (i, xi) in x.outer_iter().enumerate() {
        row.iter_mut().zip(xi.iter()).for_each(|(r, &v)| *r = v);
        let y: &[f32] = match phi {
            Some(phi) => {
                phi.apply(&row, &mut buf);
                &buf
            }
            None => &row,
        };
        for (u, cu) in c.chunks_exact(d).enumerate() {
            let dot: f32 = y.iter().zip(cu).map(|(a, b)| a * b).sum();
            out[u * rows + i] = sigmoid(scale * dot);
        }
    }
    out
}

impl SbmSampler {
    /// `q` `[n, d]`, `k` `[m, d]` of one slice; `phi`, `head` and `logit_scale` from the layer.
    pub fn new(q: &ArrayView2<f32>, k: &ArrayView2<f32>, phi: Option<&Mlp>, head: &SbmHead, logit_scale: f32, density: Density) -> Result<Self> {
        let (n, d) = q.dim();
        let (m, dk) = k.dim();
        if d != dk || d != head.clusters.ncols() {
            return Err(Error::Shape(format!("sbm: q has d = {d}, k has d = {dk}, clusters have d = {}", head.clusters.ncols())));
        }
        if n == 0 || m == 0 {
            return Err(Error::ZeroSize("sbm sequence"));
        }
        // A NaN would make memberships NaN, which the alias table drops silently.
        use crate::shape::check_finite_values;
        check_finite_values("sbm q", q)?;
        check_finite_values("sbm k", k)?;
        check_finite_values("sbm clusters", &head.clusters)?;
        check_finite_values("sbm logit_scale", [&logit_scale])?;
        if let Some(phi) = phi {
            for (tensor, values) in [("sbm φ w1", &phi.w1), ("sbm φ b1", &phi.b1), ("sbm φ w2", &phi.w2), ("sbm φ b2", &phi.b2)] {
                check_finite_values(tensor, values)?;
            }
        }
        let kc = head.clusters.nrows();
        let qhat = memberships(q, phi, &head.clusters, logit_scale);
        let khat = memberships(k, phi, &head.clusters, logit_scale);
        // S = softmax over all k² entries of s·C·Cᵀ (max-shifted, f64).
        let mut s = vec![0f64; kc * kc];
        for u in 0..kc {
            for v in 0..kc {
                let dot: f64 = head.clusters.row(u).iter().zip(head.clusters.row(v)).map(|(&a, &b)| a as f64 * b as f64).sum();
                s[u * kc + v] = logit_scale as f64 * dot;
            }
        }
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        s.iter_mut().for_each(|x| *x = (*x - max).exp());
        let z: f64 = s.iter().sum();
        s.iter_mut().for_each(|x| *x /= z);
        let a: Vec<f64> = qhat.chunks_exact(n).map(|c| c.iter().map(|&x| x as f64).sum()).collect();
        let b: Vec<f64> = khat.chunks_exact(m).map(|c| c.iter().map(|&x| x as f64).sum()).collect();
        let weights: Vec<f64> = (0..kc * kc).map(|c| a[c / kc] * s[c] * b[c % kc]).collect();
        let mass: f64 = weights.iter().sum();
        let rho = match density {
            Density::Scale(x) => x,
            Density::EdgesPerQuery(e) => {
                if mass > 0.0 {
                    e * n as f64 / mass
                } else {
                    0.0
                }
            }
        };
        // Past 8 draws per (query, key) pair every pair is drawn with probability > 0.9996:
        // more only costs memory (8 bytes a draw) and time, and past u32 the counts overflow.
        let most = (8.0 * n as f64 * m as f64).min(u32::MAX as f64);
        if rho * mass > most {
            return Err(Error::Data(format!("sbm density {density:?} asks for {:.3e} expected edges over {n} x {m} pairs; at most {most:.3e} (8 per pair) are drawn", rho * mass)));
        }
        Ok(Self { n, m, k: kc, qhat, khat, s, mass, rho, cells: Alias::new(&weights) })
    }

    /// `Σ_ij E[A]_ij` of the model (before the density scale).
    pub fn mass(&self) -> f64 {
        self.mass
    }
    /// The density scale `ρ` in use.
    pub fn rho(&self) -> f64 {
        self.rho
    }
    /// Expected number of sampled edges before duplicates are dropped: `ρ·Σ E[A]`.
    pub fn expected_edges(&self) -> f64 {
        self.rho * self.mass
    }

    /// `E[A] = Q̂·S·K̂ᵀ` as a dense `[n, m]` matrix (f64). For tests on small problems only: this
    /// is the `n × m` object the sampler avoids.
    pub fn expected_adjacency(&self) -> Array2<f64> {
        let (n, m, k) = (self.n, self.m, self.k);
        let mut qs = vec![0f64; n * k]; // Q̂·S, row-major
        for i in 0..n {
            for u in 0..k {
                let qu = self.qhat[u * n + i] as f64;
                if qu != 0.0 {
                    for v in 0..k {
                        qs[i * k + v] += qu * self.s[u * k + v];
                    }
                }
            }
        }
        Array2::from_shape_fn((n, m), |(i, j)| (0..k).map(|v| qs[i * k + v] * self.khat[v * m + j] as f64).sum())
    }

    /// Draws one graph (fastRG, duplicates dropped), `O(N + (n+m)·k)`.
    pub fn sample(&self, rng: &mut impl rand::Rng) -> Edges {
        let (n, m, k) = (self.n, self.m, self.k);
        let empty = Edges { row_ptr: vec![0; n + 1], keys: Vec::new() };
        let Some(cells) = &self.cells else { return empty };
        let total = poisson(self.rho * self.mass, rng) as usize;
        if total == 0 {
            return empty;
        }
        // Split over cluster pairs, then lay the edges out cell by cell (u-major).
        let mut counts = vec![0u32; k * k];
        for _ in 0..total {
            counts[cells.sample(rng)] += 1;
        }
        let mut offset = vec![0usize; k * k + 1];
        for c in 0..k * k {
            offset[c + 1] = offset[c] + counts[c] as usize;
        }
        let mut qi = vec![0u32; total];
        let mut kj = vec![0u32; total];
        let mut cum = Vec::with_capacity(n.max(m));
        let draw = |cum: &Vec<f64>, rng: &mut dyn rand::RngCore| -> u32 {
            let last = cum.last().copied().unwrap_or(0.0);
            let x = rand::Rng::random::<f64>(rng) * last;
            cum.partition_point(|&c| c <= x).min(cum.len().saturating_sub(1)) as u32
        };
        let fill_cum = |col: &[f32], cum: &mut Vec<f64>| {
            cum.clear();
            let mut acc = 0.0;
            cum.extend(col.iter().map(|&x| {
                acc += x as f64;
                acc
            }));
        };
        for u in 0..k {
            if offset[u * k + k] == offset[u * k] {
                continue;
            }
            fill_cum(&self.qhat[u * n..(u + 1) * n], &mut cum);
            for slot in &mut qi[offset[u * k]..offset[u * k + k]] {
                *slot = draw(&cum, rng);
            }
        }
        for v in 0..k {
            if (0..k).all(|u| counts[u * k + v] == 0) {
                continue;
            }
            fill_cum(&self.khat[v * m..(v + 1) * m], &mut cum);
            for u in 0..k {
                for slot in &mut kj[offset[u * k + v]..offset[u * k + v + 1]] {
                    *slot = draw(&cum, rng);
                }
            }
        }
        drop(cum);
        // Counting sort by query, then sort + dedup each row.
        let mut row_ptr = vec![0u32; n + 1];
        for &i in &qi {
            row_ptr[i as usize + 1] += 1;
        }
        for i in 0..n {
            row_ptr[i + 1] += row_ptr[i];
        }
        let mut next: Vec<u32> = row_ptr[..n].to_vec();
        let mut keys = vec![0u32; total];
        for (&i, &j) in qi.iter().zip(&kj) {
            keys[next[i as usize] as usize] = j;
            next[i as usize] += 1;
        }
        drop((qi, kj, next));
        let mut write = 0usize;
        let mut start = 0usize;
        for i in 0..n {
            let end = row_ptr[i + 1] as usize;
            let row = &mut keys[start..end];
            row.sort_unstable();
            let mut last = None;
            let mut w = write;
            for t in start..end {
                let j = keys[t];
                if last != Some(j) {
                    keys[w] = j;
                    w += 1;
                    last = Some(j);
                }
            }
            start = end;
            write = w;
            row_ptr[i + 1] = write as u32;
        }
        keys.truncate(write);
        keys.shrink_to_fit();
        Edges { row_ptr, keys }
    }
}

/// Statistics of one build.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SbmStats {
    /// Distinct sampled edges per slice.
    pub edges: Vec<usize>,
    /// Expected sampled edges (before duplicates) per slice.
    pub expected_edges: Vec<f64>,
}

/// The SBM pattern builder.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sbm {
    pub config: SbmConfig,
}

impl Sbm {
    pub fn new(config: SbmConfig) -> Self {
        Self { config }
    }

    /// One pattern slice per (batch, head): `q` `[batch, heads, n, d]`, `k` `[batch, kv_heads, m, d]`
    /// (query head `h` reads kv head `h / (heads / kv_heads)`). `layer.heads` has one entry per
    /// query head, or one per kv head (then query head `h` uses its kv head's clusters).
    pub fn build(&self, layer: &SbmLayer, q: &ArrayView4<f32>, k: &ArrayView4<f32>) -> Result<BlockPattern> {
        self.build_with_stats(layer, q, k).map(|(p, _)| p)
    }

    /// [`Self::build`] plus edge counts.
    pub fn build_with_stats(&self, layer: &SbmLayer, q: &ArrayView4<f32>, k: &ArrayView4<f32>) -> Result<(BlockPattern, SbmStats)> {
        self.config.validate()?;
        let (batch, heads, n, d) = q.dim();
        let (kb, kv_heads, m, dk) = k.dim();
        if kb != batch || dk != d || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(Error::Shape(format!("sbm: q {:?} and k {:?} do not fit (batch, head_dim, heads % kv_heads)", q.dim(), k.dim())));
        }
        if batch == 0 || heads == 0 || n == 0 || m == 0 || d == 0 {
            return Err(Error::ZeroSize("sbm q/k"));
        }
        layer.validate(d)?;
        let group = heads / kv_heads;
        let head_of = |h: usize| -> Result<&SbmHead> {
            if layer.heads.len() == heads {
                Ok(&layer.heads[h])
            } else if layer.heads.len() == kv_heads {
                Ok(&layer.heads[h / group])
            } else {
                Err(Error::Shape(format!("sbm layer has {} heads, the inputs have {heads} (kv {kv_heads})", layer.heads.len())))
            }
        };
        let g = PatternGeometry {
            block_q: self.config.block_q,
            block_k: self.config.block_k,
            seq_q: u32::try_from(n).map_err(|_| Error::Shape(format!("seq_q {n} too large")))?,
            seq_kv: u32::try_from(m).map_err(|_| Error::Shape(format!("seq_kv {m} too large")))?,
            slices: (batch * heads) as u32,
        };
        let mut acc = PatternAccumulator::new(g)?;
        let mut stats = SbmStats::default();
        for b in 0..batch {
            for h in 0..heads {
                let slice = b * heads + h;
                let qs = q.slice(ndarray::s![b, h, .., ..]);
                let ks = k.slice(ndarray::s![b, h / group, .., ..]);
                let sampler = SbmSampler::new(&qs, &ks, layer.phi.as_ref(), head_of(h)?, layer.logit_scale, self.config.density)?;
                let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
                rng.set_stream(slice as u64);
                let edges = sampler.sample(&mut rng);
                stats.edges.push(edges.count());
                stats.expected_edges.push(sampler.expected_edges());
                push_edges(&mut acc, &edges);
            }
        }
        Ok((acc.finish()?, stats))
    }
}

/// Appends one slice's rows built from per-query edge lists (element masks; one stored block per
/// (query block, key block) holding at least one edge, so `nnz <= edges`).
pub fn push_edges(acc: &mut PatternAccumulator, edges: &Edges) {
    let g = acc.geometry();
    let wpr = g.block_k.div_ceil(32) as usize;
    let mut items: Vec<(u32, u32, u32)> = Vec::new(); // (kb, r, c)
    for qb in 0..g.q_blocks() {
        items.clear();
        let lo = (qb * g.block_q) as usize;
        let hi = (((qb + 1) * g.block_q).min(g.seq_q)) as usize;
        for i in lo..hi {
            for &j in edges.row(i) {
                items.push((j / g.block_k, (i - lo) as u32, j % g.block_k));
            }
        }
        items.sort_unstable();
        let mut row: Vec<(u32, BlockMask)> = Vec::new();
        for &(kb, r, c) in &items {
            if row.last().is_none_or(|(last, _)| *last != kb) {
                row.push((kb, BlockMask::Bits(vec![0u32; g.mask_words()])));
            }
            if let Some((_, BlockMask::Bits(bits))) = row.last_mut() {
                bits[r as usize * wpr + c as usize / 32] |= 1 << (c % 32);
            }
        }
        acc.push_row(row);
    }
}
