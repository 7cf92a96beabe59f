//! Trainable top-k token selection (Pietruszka et al. 2022, "Sparsifying Transformer Models with
//! Trainable Representation Pooling"), as an attention pattern.
//!
//! A scorer gives every key position a score; each query then attends to
//! - the `k` best-scored keys (ties broken by the lower position),
//! - a local window of `window` keys around it (symmetric, as [`crate::patterns::Window`]:
//!   `i−⌊(w−1)/2⌋ ..= i+⌊w/2⌋`, positions aligned so the last query meets the last key),
//! - the first `first` and last `last` keys.
//!
//! Scorers ([`Scorer`]), per head, on the head's key vectors `x = k_j`:
//! - [`Scorer::MeanQuery`] (training-free default): the score the mean query gives each key,
//!   `s_j = (1/n Σ_i q_i)·k_j / sqrt(d)`, i.e. the key's mean attention logit over the queries;
//! - [`Scorer::Linear`]: `s_j = sigmoid(w·k_j + b)` with one `(w, b)` per head, loaded from a
//!   JSON file ([`LinearScorerModel`]): `{"format": "sparse-attn-topk-linear", "version": 1,
//!   "head_dim": d, "layers": [[{"w": [d floats], "b": float}, …per head], …per layer]}`. The
//!   paper trains this scorer jointly with the model (through the soft top-k of
//!   [`crate::pooling`]); training is out of scope here, a fitted scorer is loaded.
//!
//! Every pattern is built in `O(nnz blocks · block words)`; no `n × m` matrix is formed.

use crate::error::{Error, Result};
use crate::pattern::{BlockMask, BlockPattern, PatternAccumulator, PatternGeometry};
use crate::patterns::DEFAULT_BLOCK;
use ndarray::ArrayView4;
use std::path::Path;

/// Format tag of [`LinearScorerModel`] files.
pub const LINEAR_FORMAT: &str = "sparse-attn-topk-linear";

/// One head's linear scorer `sigmoid(w·x + b)`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinearScorer {
    pub w: Vec<f32>,
    pub b: f32,
}

impl LinearScorer {
    pub fn score(&self, x: &[f32]) -> f32 {
        let z: f32 = self.w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + self.b;
        if z >= 0.0 {
            1.0 / (1.0 + (-z).exp())
        } else {
            let e = z.exp();
            e / (1.0 + e)
        }
    }
}

/// Linear scorers of a model, `layers[layer][head]` (JSON, see the module doc).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinearScorerModel {
    pub format: String,
    pub version: u32,
    pub head_dim: usize,
    pub layers: Vec<Vec<LinearScorer>>,
}

impl LinearScorerModel {
    pub fn new(head_dim: usize, layers: Vec<Vec<LinearScorer>>) -> Self {
        Self { format: LINEAR_FORMAT.into(), version: 1, head_dim, layers }
    }

    fn validate(&self) -> Result<()> {
        if self.format != LINEAR_FORMAT || self.version != 1 {
            return Err(Error::Data(format!("top-k scorer: format `{}` v{}, expected `{LINEAR_FORMAT}` v1", self.format, self.version)));
        }
        for (l, heads) in self.layers.iter().enumerate() {
            for (h, s) in heads.iter().enumerate() {
                if s.w.len() != self.head_dim || !s.b.is_finite() || s.w.iter().any(|x| !x.is_finite()) {
                    return Err(Error::Data(format!(
                        "top-k scorer layer {l} head {h}: w has {} values (head_dim {}) or a non-finite value",
                        s.w.len(),
                        self.head_dim
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let model: Self = serde_json::from_str(&text).map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
        model.validate().map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
        Ok(model)
    }

    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Data(format!("serialise top-k scorer: {e}")))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    /// The scorer of one layer.
    pub fn scorer(&self, layer: usize) -> Result<Scorer> {
        self.layers
            .get(layer)
            .map(|h| Scorer::Linear(h.clone()))
            .ok_or_else(|| Error::Data(format!("top-k scorer has {} layers, asked for layer {layer}", self.layers.len())))
    }
}

/// How key positions are scored (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub enum Scorer {
    MeanQuery,
    /// One scorer per query head (or per kv head).
    Linear(Vec<LinearScorer>),
}

/// Key scores per (batch, head) slice: `q` `[batch, heads, n, d]`, `k` `[batch, kv_heads, m, d]`.
pub fn scores(q: &ArrayView4<f32>, k: &ArrayView4<f32>, scorer: &Scorer) -> Result<Vec<Vec<f32>>> {
    let (batch, heads, n, d) = q.dim();
    let (kb, kv_heads, m, dk) = k.dim();
    if kb != batch || dk != d || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::Shape(format!("top-k: q {:?} and k {:?} do not fit", q.dim(), k.dim())));
    }
    if n == 0 || m == 0 || d == 0 {
        return Err(Error::ZeroSize("top-k q/k"));
    }
    let group = heads / kv_heads;
    let mut out = Vec::with_capacity(batch * heads);
    for b in 0..batch {
        for h in 0..heads {
            let ks = k.slice(ndarray::s![b, h / group, .., ..]);
            let s: Vec<f32> = match scorer {
                Scorer::MeanQuery => {
                    let qs = q.slice(ndarray::s![b, h, .., ..]);
                    let mut mean = vec![0f64; d];
                    for qi in qs.outer_iter() {
                        mean.iter_mut().zip(qi.iter()).for_each(|(a, &x)| *a += x as f64);
                    }
                    let f = 1.0 / (n as f64 * (d as f64).sqrt());
                    ks.outer_iter().map(|kj| (kj.iter().zip(&mean).map(|(&x, &mq)| x as f64 * mq).sum::<f64>() * f) as f32).collect()
                }
                Scorer::Linear(per_head) => {
                    let lin = if per_head.len() == heads {
                        &per_head[h]
                    } else if per_head.len() == kv_heads {
                        &per_head[h / group]
                    } else {
                        return Err(Error::Shape(format!("top-k: {} linear scorers for {heads} heads (kv {kv_heads})", per_head.len())));
                    };
                    if lin.w.len() != d {
                        return Err(Error::Shape(format!("top-k: linear scorer has {} weights, head_dim is {d}", lin.w.len())));
                    }
                    let mut row = vec![0f32; d];
                    ks.outer_iter()
                        .map(|kj| {
                            row.iter_mut().zip(kj.iter()).for_each(|(r, &x)| *r = x);
                            lin.score(&row)
                        })
                        .collect()
                }
            };
            out.push(s);
        }
    }
    Ok(out)
}

/// Positions of the `k` highest scores (ties: lower position first), ascending.
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(scores.len());
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]).then(a.cmp(b));
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// The top-k pattern builder.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TopK {
    /// Best-scored keys every query sees.
    pub k: usize,
    /// Local window width in tokens (0 = none).
    pub window: u32,
    /// Leading keys every query sees.
    pub first: u32,
    /// Trailing keys every query sees.
    pub last: u32,
    pub block_q: u32,
    pub block_k: u32,
}

impl Default for TopK {
    fn default() -> Self {
        Self { k: 64, window: 11, first: 1, last: 1, block_q: DEFAULT_BLOCK, block_k: DEFAULT_BLOCK }
    }
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self { k, ..Self::default() }
    }
    pub fn with_window(mut self, window: u32) -> Self {
        self.window = window;
        self
    }
    pub fn with_globals(mut self, first: u32, last: u32) -> Self {
        (self.first, self.last) = (first, last);
        self
    }
    pub fn with_blocks(mut self, block_q: u32, block_k: u32) -> Self {
        (self.block_q, self.block_k) = (block_q, block_k);
        self
    }

    /// Scores with `scorer`, then [`Self::build_from_scores`]; one pattern slice per (batch, head).
    pub fn build(&self, q: &ArrayView4<f32>, k: &ArrayView4<f32>, scorer: &Scorer) -> Result<BlockPattern> {
        let s = scores(q, k, scorer)?;
        self.build_from_scores(q.dim().2, k.dim().2, &s)
    }

    /// One pattern slice per entry of `scores` (each of length `seq_kv`).
    pub fn build_from_scores(&self, seq_q: usize, seq_kv: usize, scores: &[Vec<f32>]) -> Result<BlockPattern> {
        let g = PatternGeometry {
            block_q: self.block_q,
            block_k: self.block_k,
            seq_q: u32::try_from(seq_q).map_err(|_| Error::Shape(format!("seq_q {seq_q} too large")))?,
            seq_kv: u32::try_from(seq_kv).map_err(|_| Error::Shape(format!("seq_kv {seq_kv} too large")))?,
            slices: u32::try_from(scores.len()).map_err(|_| Error::Shape("too many slices".into()))?,
        };
        let mut acc = PatternAccumulator::new(g)?;
        for (t, s) in scores.iter().enumerate() {
            if s.len() != seq_kv {
                return Err(Error::Shape(format!("top-k: slice {t} has {} scores, seq_kv is {seq_kv}", s.len())));
            }
            if let Some(j) = s.iter().position(|x| !x.is_finite()) {
                return Err(Error::Data(format!("top-k: slice {t} score {j} is {}", s[j])));
            }
            let mut kept = top_k(s, self.k);
            kept.extend((0..self.first.min(g.seq_kv)).chain(g.seq_kv.saturating_sub(self.last)..g.seq_kv));
            kept.sort_unstable();
            kept.dedup();
            self.push_slice(&mut acc, &kept);
        }
        Ok(acc.finish()?)
    }

    fn push_slice(&self, acc: &mut PatternAccumulator, kept: &[u32]) {
        let g = acc.geometry();
        let wpr = g.block_k.div_ceil(32) as usize;
        // Column bits of the kept keys, per key block.
        let mut col: Vec<(u32, Vec<u32>)> = Vec::new();
        for &j in kept {
            let kb = j / g.block_k;
            if col.last().is_none_or(|(b, _)| *b != kb) {
                col.push((kb, vec![0u32; wpr]));
            }
            if let Some((_, bits)) = col.last_mut() {
                let c = (j % g.block_k) as usize;
                bits[c / 32] |= 1 << (c % 32);
            }
        }
        let w = self.window as i64;
        let (lo, hi) = (-((w - 1) / 2), w / 2);
        let offset = g.seq_kv as i64 - g.seq_q as i64;
        for qb in 0..g.q_blocks() {
            let first_i = (qb * g.block_q) as i64;
            let rows = (g.seq_q - qb * g.block_q).min(g.block_q);
            let last_i = first_i + rows as i64 - 1;
            let win = if w > 0 {
                let j_lo = (first_i + offset + lo).max(0);
                let j_hi = (last_i + offset + hi).min(g.seq_kv as i64 - 1);
                (j_lo <= j_hi).then(|| ((j_lo / g.block_k as i64) as u32, (j_hi / g.block_k as i64) as u32))
            } else {
                None
            };
            let mut kbs: Vec<u32> = col.iter().map(|(kb, _)| *kb).collect();
            if let Some((a, b)) = win {
                kbs.extend(a..=b);
                kbs.sort_unstable();
                kbs.dedup();
            }
            let mut row = Vec::with_capacity(kbs.len());
            for kb in kbs {
                let mut bits = vec![0u32; g.mask_words()];
                if let Ok(p) = col.binary_search_by_key(&kb, |(b, _)| *b) {
                    for r in 0..rows as usize {
                        bits[r * wpr..(r + 1) * wpr].copy_from_slice(&col[p].1);
                    }
                }
                if win.is_some_and(|(a, b)| (a..=b).contains(&kb)) {
                    let base = (kb * g.block_k) as i64;
                    for r in 0..rows as i64 {
                        let i = first_i + r + offset;
                        let c_lo = (i + lo - base).max(0);
                        let c_hi = (i + hi - base).min(g.block_k as i64 - 1);
                        for c in c_lo..=c_hi {
                            bits[r as usize * wpr + c as usize / 32] |= 1 << (c % 32);
                        }
                    }
                }
                row.push((kb, BlockMask::Bits(bits)));
            }
            acc.push_row(row);
        }
    }
}
