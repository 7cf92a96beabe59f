//! The problem shape and the checks every entry point runs before any GPU work.

use crate::error::{Error, Result};
use ndarray::ArrayView4;

/// Shape of one attention call. Q is `[batch, heads, seq_q, head_dim]`, K and V are
/// `[batch, kv_heads, seq_kv, head_dim]`; query head `h` reads kv head `h / (heads / kv_heads)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq_q: usize,
    pub seq_kv: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Self-attention shape without GQA.
    pub fn new(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Self {
        Self { batch, heads, kv_heads: heads, seq_q: seq, seq_kv: seq, head_dim }
    }

    pub fn with_kv_heads(mut self, kv_heads: usize) -> Self {
        self.kv_heads = kv_heads;
        self
    }

    pub fn with_seq_kv(mut self, seq_kv: usize) -> Self {
        self.seq_kv = seq_kv;
        self
    }

    /// Number of (batch, head) slices.
    pub fn slices(&self) -> usize {
        self.batch * self.heads
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// The kv slice read by query slice `slice` (= b * heads + h).
    pub fn kv_slice(&self, slice: usize) -> usize {
        let (b, h) = (slice / self.heads, slice % self.heads);
        b * self.kv_heads + h / self.group()
    }

    /// Default score scale, `1/sqrt(head_dim)`.
    pub fn default_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Rejects zero sizes, non-dividing GQA groups and sizes past u32 (GPU indices are u32).
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("batch", self.batch),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("seq_q", self.seq_q),
            ("seq_kv", self.seq_kv),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(Error::ZeroSize(name));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::Shape(format!(
                "heads ({}) must be a multiple of kv_heads ({})",
                self.heads, self.kv_heads
            )));
        }
        // In u128: with huge fields the usize product itself would overflow.
        let largest = self.batch as u128 * self.heads as u128 * self.seq_q.max(self.seq_kv) as u128 * self.head_dim as u128;
        if largest > u32::MAX as u128 {
            return Err(Error::Unsupported(format!(
                "a tensor of {largest} elements exceeds the u32 element indexing of the kernels"
            )));
        }
        Ok(())
    }

    /// Derives the shape from Q, K, V views and checks they agree.
    pub fn from_qkv(q: &ArrayView4<f32>, k: &ArrayView4<f32>, v: &ArrayView4<f32>) -> Result<Self> {
        let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
        if ks != vs {
            return Err(Error::Shape(format!("K is {ks:?} but V is {vs:?}")));
        }
        if qs[0] != ks[0] {
            return Err(Error::Shape(format!("Q batch {} != K batch {}", qs[0], ks[0])));
        }
        if qs[3] != ks[3] {
            return Err(Error::Shape(format!("Q head_dim {} != K head_dim {}", qs[3], ks[3])));
        }
        let shape = AttentionShape {
            batch: qs[0],
            heads: qs[1],
            kv_heads: ks[1],
            seq_q: qs[2],
            seq_kv: ks[2],
            head_dim: qs[3],
        };
        shape.validate()?;
        Ok(shape)
    }
}

/// Finds the first NaN or ±inf, naming the tensor and flat index.
pub fn check_finite(tensor: &'static str, a: &ArrayView4<f32>) -> Result<()> {
    check_finite_values(tensor, a.iter())
}

/// [`check_finite`] over any sequence of f32 or f64 values (2-D views, weight vectors,
/// scalars), the index counted over the whole sequence (the error holds the value as f32).
pub fn check_finite_values<'a, T: Copy + Into<f64> + 'a>(tensor: &'static str, values: impl IntoIterator<Item = &'a T>) -> Result<()> {
    match values.into_iter().map(|&x| x.into()).enumerate().find(|(_, x)| !x.is_finite()) {
        Some((index, value)) => Err(Error::NonFinite { tensor, index, value: value as f32 }),
        None => Ok(()),
    }
}

/// Largest |score| the kernels accept: scores, row maxima and their differences stay finite
/// in f32 (max 3.4e38) and below the masked-entry sentinel's magnitude (3e38).
pub const MAX_SCORE_MAGNITUDE: f64 = 1e37;

/// Rejects finite Q and K whose scores could overflow f32: the kernels sum q·k in f32 and scale
/// afterwards, so both the sum and the score must stay finite (bound
/// max(1, |scale|)·head_dim·max|q|·max|k|); an infinite score turns a softmax row into NaN.
pub fn check_score_range(q: &ArrayView4<f32>, k: &ArrayView4<f32>, scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::NonFinite { tensor: "scale", index: 0, value: scale });
    }
    let largest = |a: &ArrayView4<f32>| a.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let bound = (scale as f64).abs().max(1.0) * q.shape()[3] as f64 * largest(q) * largest(k);
    if bound > MAX_SCORE_MAGNITUDE {
        return Err(Error::Unsupported(format!(
            "scores could reach {bound:.2e} (max(1, |scale|)·head_dim·max|q|·max|k|), past the {MAX_SCORE_MAGNITUDE:.0e} the f32 kernels accept; scale Q or K down"
        )));
    }
    Ok(())
}

/// Validates Q, K, V together and returns their shape.
pub fn validate_qkv(q: &ArrayView4<f32>, k: &ArrayView4<f32>, v: &ArrayView4<f32>) -> Result<AttentionShape> {
    let shape = AttentionShape::from_qkv(q, k, v)?;
    check_finite("q", q)?;
    check_finite("k", k)?;
    check_finite("v", v)?;
    Ok(shape)
}
