//! Top-k token selection: the pattern against a brute-force oracle, recall 1 on planted data,
//! the scorers (mean query, linear from JSON), typed errors, and GPU attention on top-k patterns.

mod common;

use common::{assert_close, engine};
use ndarray::{Array2, Array4};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_attn::data::{fixture_path, AttentionData};
use sparse_attn::metrics::{gold_support, recall};
use sparse_attn::patterns::topk::{scores, top_k, LinearScorer, LinearScorerModel, Scorer, TopK};
use sparse_attn::{reference, Error, Normalizer};

fn normal(rng: &mut impl Rng) -> f32 {
    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// Brute force: (i, j) allowed iff j is among the top k, in the window, or a global key.
fn oracle(spec: &TopK, s: &[f32], seq_q: usize) -> Array2<bool> {
    let m = s.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    let top: Vec<usize> = order[..spec.k.min(m)].to_vec();
    let offset = m as i64 - seq_q as i64;
    let w = spec.window as i64;
    Array2::from_shape_fn((seq_q, m), |(i, j)| {
        let d = j as i64 - (i as i64 + offset);
        top.contains(&j) || (w > 0 && d >= -((w - 1) / 2) && d <= w / 2) || j < spec.first as usize || j + (spec.last as usize) >= m
    })
}

#[test]
fn pattern_matches_brute_force() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (seq_q, seq_kv, spec) in [
        (100, 100, TopK::new(7)),
        (70, 130, TopK::new(20).with_window(5).with_globals(2, 3).with_blocks(16, 32)),
        (64, 64, TopK::new(0).with_window(1).with_globals(0, 0).with_blocks(16, 16)),
        (33, 300, TopK::new(300).with_window(0).with_blocks(32, 64)),
    ] {
        let s: Vec<Vec<f32>> = (0..3).map(|_| (0..seq_kv).map(|_| (rng.random_range(0..40) as f32) * 0.25).collect()).collect(); // ties
        let pattern = spec.build_from_scores(seq_q, seq_kv, &s).unwrap();
        assert_eq!(pattern.slices(), 3);
        for (t, st) in s.iter().enumerate() {
            assert_eq!(pattern.to_dense_mask(t), oracle(&spec, st, seq_q), "{spec:?} slice {t}");
        }
    }
}

#[test]
fn top_k_breaks_ties_by_position() {
    assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0, 3.0], 2), vec![1, 2]);
    assert_eq!(top_k(&[1.0, 3.0], 5), vec![0, 1]);
    assert_eq!(top_k(&[1.0, 3.0], 0), Vec::<u32>::new());
}

/// Planted: every query leans on the same direction and a few "informative" keys carry it, so
/// the exact 1.5-entmax support of every query lies inside those keys; the mean-query scorer
/// finds them, and with k >= the support size recall is exactly 1 (no window, no globals).
#[test]
fn recall_is_one_when_k_covers_the_planted_support() {
    let (n, d, heads) = (256, 16, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut q = Array4::<f32>::zeros((1, heads, n, d));
    let mut k = Array4::<f32>::zeros((1, heads, n, d));
    let mut planted = vec![Vec::new(); heads];
    for h in 0..heads {
        let axis = 3 * h + 1;
        let chosen: Vec<usize> = {
            let mut idx: Vec<usize> = (0..n).collect();
            for i in 0..24 {
                let j = rng.random_range(i..n);
                idx.swap(i, j);
            }
            idx[..24].to_vec()
        };
        for i in 0..n {
            for c in 0..d {
                q[[0, h, i, c]] = 0.3 * normal(&mut rng) + if c == axis { 4.0 } else { 0.0 };
                k[[0, h, i, c]] = 0.3 * normal(&mut rng) + if c == axis && chosen.contains(&i) { 4.0 } else { 0.0 };
            }
        }
        planted[h] = chosen;
    }
    let pattern_for = |kk: usize| TopK::new(kk).with_window(0).with_globals(0, 0).build(&q.view(), &k.view(), &Scorer::MeanQuery).unwrap();
    let pattern = pattern_for(24);
    for (h, keys) in planted.iter().enumerate() {
        let gold = gold_support(&q.slice(ndarray::s![0, h, .., ..]), &k.slice(ndarray::s![0, h, .., ..]), 0.25, 1.5, false).expect("gold support");
        let max_support = (0..n).map(|i| gold.row(i).len()).max().unwrap();
        assert!(max_support <= 24 && gold.total() > n, "planted support {max_support}");
        for i in 0..n {
            assert!(gold.row(i).iter().all(|j| keys.contains(&(*j as usize))), "support outside the planted keys");
        }
        assert_eq!(recall(&pattern, h, &gold), 1.0, "head {h}");
        // Fewer keys than the support size loses recall.
        assert!(recall(&pattern_for(8), h, &gold) < 1.0);
    }
}

#[test]
fn linear_scorer_from_json() {
    let (n, d) = (50, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let q = Array4::from_shape_simple_fn((1, 2, n, d), || normal(&mut rng));
    let k = Array4::from_shape_simple_fn((1, 2, n, d), || normal(&mut rng));
    let model = LinearScorerModel::new(
        d,
        vec![vec![LinearScorer { w: vec![1.0, 0.0, 0.0, 0.0], b: 0.5 }, LinearScorer { w: vec![0.0, -2.0, 0.0, 1.0], b: 0.0 }]],
    );
    let dir = std::env::temp_dir().join(format!("sparse-attn-topk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scorer.json");
    model.save(&path).unwrap();
    let back = LinearScorerModel::load(&path).unwrap();
    assert_eq!(back, model);
    let scorer = back.scorer(0).unwrap();
    let s = scores(&q.view(), &k.view(), &scorer).unwrap();
    for j in 0..n {
        let z0 = k[[0, 0, j, 0]] + 0.5;
        let z1 = -2.0 * k[[0, 1, j, 1]] + k[[0, 1, j, 3]];
        assert!((s[0][j] - 1.0 / (1.0 + (-z0).exp())).abs() < 1e-6);
        assert!((s[1][j] - 1.0 / (1.0 + (-z1).exp())).abs() < 1e-6);
    }
    // The mean-query scorer is the mean logit over the queries.
    let mq = scores(&q.view(), &k.view(), &Scorer::MeanQuery).unwrap();
    for j in [0, 17, 49] {
        let mean: f64 = (0..n).map(|i| (0..d).map(|c| q[[0, 1, i, c]] as f64 * k[[0, 1, j, c]] as f64).sum::<f64>()).sum::<f64>() / n as f64 / 2.0;
        assert!((mq[1][j] as f64 - mean).abs() < 1e-5, "{} vs {mean}", mq[1][j]);
    }
    let pattern = TopK::new(5).build(&q.view(), &k.view(), &scorer).unwrap();
    assert_eq!(pattern.slices(), 2);
    assert!(matches!(back.scorer(3), Err(Error::Data(_))));
    std::fs::write(&path, r#"{"format":"other","version":1,"head_dim":4,"layers":[]}"#).unwrap();
    assert!(matches!(LinearScorerModel::load(&path), Err(Error::Data(_))));
    std::fs::write(&path, r#"{"format":"sparse-attn-topk-linear","version":1,"head_dim":4,"layers":[[{"w":[1.0],"b":0.0}]]}"#).unwrap();
    assert!(matches!(LinearScorerModel::load(&path), Err(Error::Data(_))));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn typed_errors() {
    let spec = TopK::new(3);
    assert!(matches!(spec.build_from_scores(10, 10, &[vec![0.0; 9]]), Err(Error::Shape(_))));
    assert!(matches!(spec.build_from_scores(10, 10, &[vec![f32::NAN; 10]]), Err(Error::Data(_))));
    assert!(matches!(spec.build_from_scores(10, 10, &[]), Err(Error::Pattern(_))));
    let q = Array4::<f32>::zeros((1, 2, 8, 4));
    let k = Array4::<f32>::zeros((1, 2, 8, 4));
    let three = Scorer::Linear(vec![LinearScorer { w: vec![0.0; 4], b: 0.0 }; 3]);
    assert!(matches!(spec.build(&q.view(), &k.view(), &three), Err(Error::Shape(_))));
    let k3 = Array4::<f32>::zeros((1, 2, 8, 3));
    assert!(matches!(spec.build(&q.view(), &k3.view(), &Scorer::MeanQuery), Err(Error::Shape(_))));
}

/// Long sequences build without an n × m matrix.
#[test]
fn long_sequence_builds() {
    let n = 16_384;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let s: Vec<Vec<f32>> = vec![(0..n).map(|_| rng.random()).collect()];
    let t = std::time::Instant::now();
    let p = TopK::new(256).build_from_scores(n, n, &s).unwrap();
    eprintln!("top-k n = {n}: {:?}, nnz {}", t.elapsed(), p.nnz());
    // Each query: the 256 top keys, a window of 11 and 2 globals, overlaps counted once.
    assert!(p.allowed_pairs(0) as usize <= n * (256 + 11 + 2));
    assert!(p.allowed_pairs(0) as usize >= n * 256);
}

#[test]
fn gpu_attention_on_topk_pattern_matches_reference() {
    let Some(engine) = engine() else { return };
    let data = AttentionData::open(fixture_path()).unwrap();
    let text = data.texts()[1].clone();
    let (q, k, v) = data.layer(&text, 2).unwrap();
    let s = scores(&q.view(), &k.view(), &Scorer::MeanQuery).unwrap();
    for spec in [TopK::new(16), TopK::new(40).with_window(0).with_globals(0, 0).with_blocks(16, 64)] {
        let pattern = spec.build_from_scores(q.dim().2, k.dim().2, &s).unwrap();
        for normalizer in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
            let got = engine.attention(&q, &k, &v, &pattern, normalizer).unwrap();
            let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
            assert_close(&format!("top-k {spec:?} {normalizer:?}"), got.as_slice().unwrap(), want.as_slice().unwrap(), (1e-4, 1e-5));
        }
    }
}
