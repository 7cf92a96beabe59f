//! MRA (Zeng et al. 2022): the builder's selection and remainder, the f64 reference's meaning
//! (full budget = dense softmax; block-constant K, V = exact low-resolution estimate), typed
//! errors, and GPU = reference for both paths across block sizes, ragged lengths, GQA, batch.

mod common;

use common::{assert_close, engine, random4};
use ndarray::Array4;
use sparse_attn::patterns::mra::{self, MraConfig, MraMode};
use sparse_attn::patterns::Dense;
use sparse_attn::{reference, AttentionOptions, AttentionShape, Error, ExecPath, Normalizer};

fn qkv(shape: &AttentionShape, seed: u64) -> (Array4<f32>, Array4<f32>, Array4<f32>) {
    let s = shape;
    (
        random4((s.batch, s.heads, s.seq_q, s.head_dim), seed, 2.0),
        random4((s.batch, s.kv_heads, s.seq_kv, s.head_dim), seed + 1, 2.0),
        random4((s.batch, s.kv_heads, s.seq_kv, s.head_dim), seed + 2, 1.0),
    )
}

fn max_abs_diff(a: &Array4<f32>, b: &Array4<f32>) -> f32 {
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn defaults_are_the_papers() {
    let c = MraConfig::default();
    assert_eq!((c.block, c.blocks_per_row, c.mode), (32, 8, MraMode::Full));
}

#[test]
fn selection_budget_priors_and_remainder_partition_the_blocks() {
    let shape = AttentionShape::new(2, 3, 200, 16).with_kv_heads(1);
    let (q, k, v) = qkv(&shape, 10);
    let cfg = MraConfig::new(16, 4);
    let m = cfg.build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
    let (qn, kn) = (13usize, 13usize);
    let rem = &m.remainder;
    assert_eq!(rem.counts.last().copied(), Some(200 - 12 * 16));
    for slice in 0..shape.slices() {
        let mut seen = vec![0u8; qn * kn];
        for qb in 0..qn {
            for b in m.pattern.row_blocks(slice, qb) {
                seen[qb * kn + m.pattern.col_idx()[b] as usize] += 1;
            }
            let row = slice * qn + qb;
            for e in rem.rest_ptr[row] as usize..rem.rest_ptr[row + 1] as usize {
                seen[qb * kn + rem.rest_col[e] as usize] += 1;
            }
            // Priors: the diagonal and the first block column / row.
            let cols: Vec<u32> = m.pattern.row_blocks(slice, qb).map(|b| m.pattern.col_idx()[b]).collect();
            assert!(cols.contains(&(qb as u32)) && cols.contains(&0));
            if qb == 0 {
                assert_eq!(cols.len(), kn);
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "pattern and remainder must partition the blocks");
        // Priors: kn diagonal + (2kn − 1) first row/column − 1 shared corner = 3kn − 2 = 37 ≤ budget 52.
        assert_eq!(m.pattern.slice_nnz(slice), 4 * qn);
    }
}

#[test]
fn full_budget_equals_dense_softmax() {
    let shape = AttentionShape::new(1, 2, 70, 8).with_seq_kv(90);
    let (q, k, v) = qkv(&shape, 20);
    let m = MraConfig::new(16, 100).build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
    assert!(m.remainder.is_empty());
    let got = mra::reference::attention(&q, &k, &v, &m, Normalizer::Softmax, None).unwrap();
    let dense = Dense::new().build(&shape).unwrap();
    let want = reference::attention(&q, &k, &v, &dense, Normalizer::Softmax).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-5);
}

/// Q, K and V constant inside each block (ragged tails included): every score of block (I, J)
/// equals L_IJ and every value V̂_J, so the low-resolution estimate (weighted by c_J) is each
/// block's exact contribution and MRA-2 = dense softmax at any budget.
#[test]
fn block_constant_keys_and_values_make_the_estimate_exact() {
    for b in [16u32, 32] {
        let shape = AttentionShape::new(1, 2, 50, 8).with_seq_kv(75);
        let kb = random4((1, 2, 75usize.div_ceil(b as usize), 8), 31, 2.0);
        let vb = random4((1, 2, 75usize.div_ceil(b as usize), 8), 32, 1.0);
        let k = Array4::from_shape_fn((1, 2, 75, 8), |(x, h, j, c)| kb[[x, h, j / b as usize, c]]);
        let v = Array4::from_shape_fn((1, 2, 75, 8), |(x, h, j, c)| vb[[x, h, j / b as usize, c]]);
        let dense = Dense::new().build(&shape).unwrap();
        let qb = random4((1, 2, 50usize.div_ceil(b as usize), 8), 33, 2.0);
        let q = Array4::from_shape_fn((1, 2, 50, 8), |(x, h, i, c)| qb[[x, h, i / b as usize, c]]);
        let m = MraConfig::new(b, 1).with_priors(0, false).build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
        assert!(!m.remainder.is_empty());
        let got = mra::reference::attention(&q, &k, &v, &m, Normalizer::Softmax, None).unwrap();
        let want = reference::attention(&q, &k, &v, &dense, Normalizer::Softmax).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5, "b={b}: {}", max_abs_diff(&got, &want));
        // And dropping the remainder (MRA-2-s) is not exact here.
        let sparse = mra::Mra { mode: MraMode::SparseOnly, ..m.clone() };
        let got_s = mra::reference::attention(&q, &k, &v, &sparse, Normalizer::Softmax, None).unwrap();
        assert!(max_abs_diff(&got_s, &want) > 1e-3);
    }
}

#[test]
fn mra2_with_entmax_is_unsupported_and_mra2s_is_sparse_attention() {
    let shape = AttentionShape::new(1, 1, 64, 8);
    let (q, k, v) = qkv(&shape, 40);
    let m = MraConfig::new(16, 2).build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
    let err = mra::reference::attention(&q, &k, &v, &m, Normalizer::ENTMAX15, None).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    let s = mra::Mra { mode: MraMode::SparseOnly, ..m.clone() };
    let got = mra::reference::attention(&q, &k, &v, &s, Normalizer::ENTMAX15, None).unwrap();
    let want = reference::attention(&q, &k, &v, &m.pattern, Normalizer::ENTMAX15).unwrap();
    assert_eq!(got, want);
    if let Some(engine) = engine() {
        let err = engine.attention_mra(&q, &k, &v, &m, &AttentionOptions::new(Normalizer::ENTMAX15)).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
        let got = engine.attention_mra(&q, &k, &v, &s, &AttentionOptions::new(Normalizer::ENTMAX15)).unwrap().o;
        assert_close("mra-2-s entmax", got.as_slice().unwrap(), want.as_slice().unwrap(), (1e-4, 1e-5));
    }
}

#[test]
fn missing_values_or_wrong_scale_are_typed_errors() {
    let shape = AttentionShape::new(1, 1, 64, 8);
    let (q, k, v) = qkv(&shape, 50);
    let m = MraConfig::new(16, 2).build(&q.view(), &k.view(), None, &shape).unwrap();
    assert!(matches!(m.remainder.row_terms(), Err(Error::Shape(_))));
    let bad = MraConfig::new(16, 2).build(&q.view(), &k.view(), Some(&v.view()), &shape.with_seq_kv(65));
    assert!(matches!(bad, Err(Error::Shape(_))));
    if let Some(engine) = engine() {
        let m = MraConfig::new(16, 2).build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
        let opts = AttentionOptions { scale: Some(0.5), ..AttentionOptions::new(Normalizer::Softmax) };
        assert!(matches!(engine.attention_mra(&q, &k, &v, &m, &opts), Err(Error::Shape(_))));
    }
}

#[test]
fn gpu_matches_reference_across_blocks_ragged_gqa_batch_and_paths() {
    let Some(engine) = engine() else { return };
    let cases = [
        (16u32, AttentionShape::new(2, 4, 100, 16).with_kv_heads(2).with_seq_kv(83), 2u32),
        (32, AttentionShape::new(1, 2, 150, 24).with_seq_kv(130), 1),
        (64, AttentionShape::new(2, 2, 200, 32).with_kv_heads(1), 1),
        (16, AttentionShape::new(1, 3, 64, 40).with_kv_heads(1), 0),
    ];
    for (ci, (b, shape, bpr)) in cases.into_iter().enumerate() {
        let (q, k, v) = qkv(&shape, 60 + ci as u64 * 3);
        for mode in [MraMode::Full, MraMode::SparseOnly] {
            let cfg = MraConfig::new(b, bpr).with_mode(mode).with_priors(if bpr == 0 { 0 } else { 1 }, bpr != 0);
            let m = cfg.build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
            let want = mra::reference::attention(&q, &k, &v, &m, Normalizer::Softmax, None).unwrap();
            for path in [ExecPath::Fused, ExecPath::ThreeKernel] {
                let opts = AttentionOptions { path, ..AttentionOptions::new(Normalizer::Softmax) };
                let got = engine.attention_mra(&q, &k, &v, &m, &opts).unwrap_or_else(|e| panic!("case {ci} {mode:?} {path:?}: {e}")).o;
                assert!(got.iter().all(|x| x.is_finite()));
                assert_close(&format!("case {ci} b={b} {mode:?} {path:?}"), got.as_slice().unwrap(), want.as_slice().unwrap(), (1e-4, 2e-5));
            }
        }
    }
}

#[test]
fn gpu_full_budget_equals_dense_and_plain_attention_is_unchanged() {
    let Some(engine) = engine() else { return };
    let shape = AttentionShape::new(1, 2, 96, 16);
    let (q, k, v) = qkv(&shape, 90);
    let m = MraConfig::new(32, 3).build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
    let dense = Dense::new().with_blocks(32, 32).build(&shape).unwrap();
    let want = reference::attention(&q, &k, &v, &dense, Normalizer::Softmax).unwrap();
    for path in [ExecPath::Fused, ExecPath::ThreeKernel] {
        let opts = AttentionOptions { path, ..AttentionOptions::new(Normalizer::Softmax) };
        let got = engine.attention_mra(&q, &k, &v, &m, &opts).unwrap().o;
        assert_close(&format!("full budget {path:?}"), got.as_slice().unwrap(), want.as_slice().unwrap(), (1e-4, 1e-5));
    }
    // Fewer blocks: plain attention on the MRA pattern still equals MRA-2-s.
    let m = MraConfig::new(32, 1).with_priors(1, false).build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
    let plain = engine.attention(&q, &k, &v, &m.pattern, Normalizer::Softmax).unwrap();
    let want = reference::attention(&q, &k, &v, &m.pattern, Normalizer::Softmax).unwrap();
    assert_close("plain", plain.as_slice().unwrap(), want.as_slice().unwrap(), (1e-4, 1e-5));
}
