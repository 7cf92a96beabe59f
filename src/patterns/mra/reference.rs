//! Naive dense f64 CPU reference for MRA-2 and MRA-2-s.
//!
//! MRA-2 recomputes the block means from Q, K, V itself (it trusts only the pattern's
//! selection) and, for every query `i` in block `I`, forms one softmax over the exact scores of
//! the selected blocks and the low-resolution logits `L_IJ` of the other blocks, each weighted
//! by `c_J`: `o_i = (Σ_sel e^{s_ij−m}·v_j + Σ_{J∉sel} e^{L_IJ−m}·c_J·V̂_J) / (Σ_sel e^{s_ij−m} +
//! Σ_{J∉sel} e^{L_IJ−m}·c_J)`, `m` the max over both parts. MRA-2-s is the ordinary reference on
//! the selected pattern.

use super::{Mra, MraMode};
use crate::error::{Error, Result};
use crate::shape::validate_qkv;
use crate::Normalizer;
use ndarray::{Array4, ArrayView4, Axis};

/// Reference MRA attention (`scale` None = `1/sqrt(head_dim)`). MRA-2 with an entmax
/// normaliser is `Unsupported` (the coarse remainder has no entmax form).
pub fn attention<'a>(
    q: impl Into<ArrayView4<'a, f32>>,
    k: impl Into<ArrayView4<'a, f32>>,
    v: impl Into<ArrayView4<'a, f32>>,
    mra: &Mra,
    normalizer: Normalizer,
    scale: Option<f32>,
) -> Result<Array4<f32>> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    match mra.mode {
        MraMode::SparseOnly => crate::reference::attention_scaled(q, k, v, &mra.pattern, normalizer, scale),
        MraMode::Full => {
            mra.check_normalizer(normalizer)?;
            full(&q, &k, &v, mra, scale)
        }
    }
}

fn full(q: &ArrayView4<f32>, k: &ArrayView4<f32>, v: &ArrayView4<f32>, mra: &Mra, scale: Option<f32>) -> Result<Array4<f32>> {
    let shape = validate_qkv(q, k, v)?;
    let pattern = &mra.pattern;
    pattern.check_fits(&shape)?;
    if pattern.block_q() != pattern.block_k() {
        return Err(Error::Shape("MRA needs square blocks".into()));
    }
    let scale = scale.unwrap_or_else(|| shape.default_scale()) as f64;
    let b = pattern.block_q() as usize;
    let (n, m, d) = (shape.seq_q, shape.seq_kv, shape.head_dim);
    let (qn, kn) = (n.div_ceil(b), m.div_ceil(b));
    let mut o = Array4::<f32>::zeros((shape.batch, shape.heads, n, d));
    for slice in 0..shape.slices() {
        let (bi, h) = (slice / shape.heads, slice % shape.heads);
        let kvh = h / shape.group();
        let qs = q.index_axis(Axis(0), bi).index_axis_move(Axis(0), h);
        let ks = k.index_axis(Axis(0), bi).index_axis_move(Axis(0), kvh);
        let vs = v.index_axis(Axis(0), bi).index_axis_move(Axis(0), kvh);
        let mean = |x: &ndarray::ArrayView2<f32>, blk: usize, len: usize| -> Vec<f64> {
            let (lo, hi) = (blk * b, ((blk + 1) * b).min(len));
            (0..d).map(|c| (lo..hi).map(|r| x[[r, c]] as f64).sum::<f64>() / (hi - lo) as f64).collect()
        };
        let k_hat: Vec<Vec<f64>> = (0..kn).map(|j| mean(&ks, j, m)).collect();
        let v_hat: Vec<Vec<f64>> = (0..kn).map(|j| mean(&vs, j, m)).collect();
        let counts: Vec<f64> = (0..kn).map(|j| (((j + 1) * b).min(m) - j * b) as f64).collect();
        let mask = pattern.to_dense_mask(pattern.pattern_slice(slice));
        let ps = pattern.pattern_slice(slice);
        for qb in 0..qn {
            let q_hat = mean(&qs, qb, n);
            let sel: Vec<bool> = {
                let mut s = vec![false; kn];
                for blk in pattern.row_blocks(ps, qb) {
                    s[pattern.col_idx()[blk] as usize] = true;
                }
                s
            };
            // (logit, weight, value) of every term of this block row's softmax.
            let coarse: Vec<(f64, f64, usize)> = (0..kn)
                .filter(|&j| !sel[j])
                .map(|j| (scale * q_hat.iter().zip(&k_hat[j]).map(|(a, c)| a * c).sum::<f64>(), counts[j], j))
                .collect();
            for i in qb * b..((qb + 1) * b).min(n) {
                let exact: Vec<(f64, usize)> = (0..m)
                    .filter(|&j| mask[[i, j]])
                    .map(|j| (scale * (0..d).map(|c| qs[[i, c]] as f64 * ks[[j, c]] as f64).sum::<f64>(), j))
                    .collect();
                let mx = exact.iter().map(|e| e.0).chain(coarse.iter().map(|e| e.0)).fold(f64::NEG_INFINITY, f64::max);
                if mx == f64::NEG_INFINITY {
                    continue; // empty row: zeros
                }
                let mut den = 0.0;
                let mut num = vec![0.0f64; d];
                for &(s, j) in &exact {
                    let w = (s - mx).exp();
                    den += w;
                    for c in 0..d {
                        num[c] += w * vs[[j, c]] as f64;
                    }
                }
                for &(l, cnt, j) in &coarse {
                    let w = (l - mx).exp() * cnt;
                    den += w;
                    for c in 0..d {
                        num[c] += w * v_hat[j][c];
                    }
                }
                for c in 0..d {
                    o[[bi, h, i, c]] = (num[c] / den) as f32;
                }
            }
        }
    }
    Ok(o)
}
