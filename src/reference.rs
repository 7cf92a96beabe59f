//! The CPU oracle: naive, dense, f64. Independent of the GPU code by construction — it expands
//! the pattern to a dense mask and normalises each row with textbook formulas.

use crate::error::{Error, Result};
use crate::pattern::BlockPattern;
use crate::shape::validate_qkv;
use crate::Normalizer;
use ndarray::{Array2, Array4, ArrayView2, ArrayView4, Axis};

/// Softmax over `z` (already the allowed entries of one row). Empty in, empty out.
pub fn softmax(z: &[f64]) -> Vec<f64> {
    let Some(m) = z.iter().copied().reduce(f64::max) else { return Vec::new() };
    let e: Vec<f64> = z.iter().map(|&x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn sorted_desc(z: &[f64]) -> Vec<f64> {
    let mut s = z.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

/// Sparsemax (α = 2), exact by sorting (Martins & Astudillo 2016).
pub fn sparsemax(s: &[f64]) -> Vec<f64> {
    let Some(m) = s.iter().copied().reduce(f64::max) else { return Vec::new() };
    let z: Vec<f64> = s.iter().map(|&x| x - m).collect();
    let sorted = sorted_desc(&z);
    let (mut cum, mut tau) = (0.0, 0.0);
    for (k, &zk) in sorted.iter().enumerate() {
        cum += zk;
        let t = (cum - 1.0) / (k + 1) as f64;
        if zk > t {
            tau = t;
        } else {
            break;
        }
    }
    z.iter().map(|&x| (x - tau).max(0.0)).collect()
}

/// 1.5-entmax, exact by sorting (Peters, Niculae & Martins 2019).
pub fn entmax15(s: &[f64]) -> Vec<f64> {
    let Some(m) = s.iter().copied().reduce(f64::max) else { return Vec::new() };
    // (α - 1) s with the maximum shifted to 0.
    let z: Vec<f64> = s.iter().map(|&x| (x - m) / 2.0).collect();
    let sorted = sorted_desc(&z);
    let (mut cum, mut cum_sq, mut tau) = (0.0, 0.0, f64::NEG_INFINITY);
    for (k, &zk) in sorted.iter().enumerate() {
        let n = (k + 1) as f64;
        cum += zk;
        cum_sq += zk * zk;
        let mean = cum / n;
        let delta = (1.0 - n * (cum_sq / n - mean * mean)) / n;
        let t = mean - delta.max(0.0).sqrt();
        if t <= zk {
            tau = t;
        } else {
            break;
        }
    }
    z.iter().map(|&x| (x - tau).max(0.0).powi(2)).collect()
}

/// α-entmax for any α in (1, 2] by bisection on τ in f64, to |Σp − 1| < 1e-12.
pub fn entmax_bisect(s: &[f64], alpha: f64) -> Vec<f64> {
    let Some(m) = s.iter().copied().reduce(f64::max) else { return Vec::new() };
    let z: Vec<f64> = s.iter().map(|&x| (alpha - 1.0) * (x - m)).collect();
    let e = 1.0 / (alpha - 1.0);
    let p_at = |tau: f64| z.iter().map(|&x| (x - tau).max(0.0).powf(e)).collect::<Vec<f64>>();
    // Σp(−1) ≥ 1 (the maximum alone gives 1) and Σp(0) = 0.
    let (mut lo, mut hi) = (-1.0f64, 0.0f64);
    let mut tau = lo;
    for _ in 0..2000 {
        tau = 0.5 * (lo + hi);
        let sum: f64 = p_at(tau).iter().sum();
        if (sum - 1.0).abs() < 1e-12 || hi - lo <= f64::EPSILON * 4.0 {
            break;
        }
        if sum > 1.0 {
            lo = tau;
        } else {
            hi = tau;
        }
    }
    p_at(tau)
}

/// Normalises one row's allowed scores with `normalizer`; closed forms for α = 1.5 and 2.
pub fn normalize(s: &[f64], normalizer: Normalizer) -> Vec<f64> {
    match normalizer.alpha() {
        None => softmax(s),
        Some(2.0) => sparsemax(s),
        Some(1.5) => entmax15(s),
        Some(a) => entmax_bisect(s, a),
    }
}

/// Dense probabilities `[seq_q, seq_kv]` of one slice: scores `scale·q·k` on the mask, normalised
/// per row; masked entries and empty rows are 0.
pub fn probabilities(
    q: &ArrayView2<f32>,
    k: &ArrayView2<f32>,
    mask: &Array2<bool>,
    scale: f64,
    normalizer: Normalizer,
) -> Array2<f64> {
    let (n, m) = (q.nrows(), k.nrows());
    let mut p = Array2::<f64>::zeros((n, m));
    for i in 0..n {
        let keys: Vec<usize> = (0..m).filter(|&j| mask[[i, j]]).collect();
        let s: Vec<f64> = keys
            .iter()
            .map(|&j| scale * q.row(i).iter().zip(k.row(j)).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>())
            .collect();
        for (&j, pj) in keys.iter().zip(normalize(&s, normalizer)) {
            p[[i, j]] = pj;
        }
    }
    p
}

/// Reference attention with the default scale `1/sqrt(head_dim)`.
pub fn attention<'a>(
    q: impl Into<ArrayView4<'a, f32>>,
    k: impl Into<ArrayView4<'a, f32>>,
    v: impl Into<ArrayView4<'a, f32>>,
    pattern: &BlockPattern,
    normalizer: Normalizer,
) -> Result<Array4<f32>> {
    attention_scaled(q, k, v, pattern, normalizer, None)
}

/// Reference attention: O = P·V per slice, with an explicit scale (None = `1/sqrt(head_dim)`).
pub fn attention_scaled<'a>(
    q: impl Into<ArrayView4<'a, f32>>,
    k: impl Into<ArrayView4<'a, f32>>,
    v: impl Into<ArrayView4<'a, f32>>,
    pattern: &BlockPattern,
    normalizer: Normalizer,
    scale: Option<f32>,
) -> Result<Array4<f32>> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    let shape = validate_qkv(&q, &k, &v)?;
    normalizer.validate()?;
    pattern.check_fits(&shape)?;
    let scale = scale.unwrap_or_else(|| shape.default_scale());
    if !scale.is_finite() {
        return Err(Error::NonFinite { tensor: "scale", index: 0, value: scale });
    }
    let scale = scale as f64;
    let mut o = Array4::<f32>::zeros((shape.batch, shape.heads, shape.seq_q, shape.head_dim));
    let mut shared_mask = None;
    for slice in 0..shape.slices() {
        let (b, h) = (slice / shape.heads, slice % shape.heads);
        let kvh = h / shape.group();
        let mask = if pattern.slices() == 1 {
            shared_mask.get_or_insert_with(|| pattern.to_dense_mask(0)).clone()
        } else {
            pattern.to_dense_mask(slice)
        };
        let qs = q.index_axis(Axis(0), b).index_axis_move(Axis(0), h);
        let ks = k.index_axis(Axis(0), b).index_axis_move(Axis(0), kvh);
        let vs = v.index_axis(Axis(0), b).index_axis_move(Axis(0), kvh);
        let p = probabilities(&qs, &ks, &mask, scale, normalizer);
        for i in 0..shape.seq_q {
            for c in 0..shape.head_dim {
                let acc: f64 = (0..shape.seq_kv).map(|j| p[[i, j]] * vs[[j, c]] as f64).sum();
                o[[b, h, i, c]] = acc as f32;
            }
        }
    }
    Ok(o)
}
