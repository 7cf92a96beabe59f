//! The successive-halving soft top-k pooling operator: a hand-computed two-step example,
//! padding, near-hard top-k with well-separated scores, typed errors, WGSL validation with naga,
//! and the GPU kernel against the CPU reference.

mod common;

use common::{assert_close, engine, own_engine};
use ndarray::{array, Array2, Array3};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_attn::pooling::{pool, pooled_len, PAD_SCORE, PAPER_BASE, SHADER};
use sparse_attn::Error;
use wgpu::naga;

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

/// Base 2, four tokens (score; embedding): t0 (3; 9,0), t1 (1; 0,3), t2 (2; 3,3), t3 (0; 0,9).
/// Step 1: order t0, t2, t1, t3. Pair (t0, t3): w = 2³/(2³+2⁰) = 8/9 → e = (8, 1), s = 8/3.
/// Pair (t2, t1): w = 2²/(2²+2¹) = 2/3 → e = (2, 3), s = 5/3.
/// Step 2: pair (A, B): w = 2^{8/3}/(2^{8/3}+2^{5/3}) = 2/3 → e = (6, 5/3), s = 16/9 + 5/9 = 7/3.
#[test]
fn hand_computed_two_steps() {
    let e = array![[[9.0f32, 0.0], [0.0, 3.0], [3.0, 3.0], [0.0, 9.0]]];
    let s = array![[3.0f32, 1.0, 2.0, 0.0]];
    let one = pool(&e.view(), &s.view(), 1, 2.0).unwrap();
    let want1 = [(8.0, 1.0, 8.0 / 3.0), (2.0, 3.0, 5.0 / 3.0)];
    for (i, &(x, y, sc)) in want1.iter().enumerate() {
        assert!(close(one.embeddings[[0, i, 0]], x) && close(one.embeddings[[0, i, 1]], y) && close(one.scores[[0, i]], sc), "step 1 token {i}: {:?}", one);
    }
    let two = pool(&e.view(), &s.view(), 2, 2.0).unwrap();
    assert_eq!(two.embeddings.dim(), (1, 1, 2));
    assert!(close(two.embeddings[[0, 0, 0]], 6.0) && close(two.embeddings[[0, 0, 1]], 5.0 / 3.0), "{two:?}");
    assert!(close(two.scores[[0, 0]], 7.0 / 3.0), "{two:?}");
    // depth 0 is the identity.
    let zero = pool(&e.view(), &s.view(), 0, 2.0).unwrap();
    assert_eq!(zero.embeddings, e);
}

/// Three tokens pad to four with a zero embedding scored 1e-5.
#[test]
fn pads_to_a_power_of_two() {
    let e = array![[[1.0f32], [2.0], [4.0]]];
    let s = array![[0.5f32, -1.0, 2.0]];
    let got = pool(&e.view(), &s.view(), 1, PAPER_BASE).unwrap();
    assert_eq!(pooled_len(3, 1), 2);
    // Order: t2 (2), t0 (0.5), pad (1e-5), t1 (-1). Pairs (t2, t1), (t0, pad).
    let w = |a: f32, b: f32| 1.0 / (1.0 + PAPER_BASE.powf(b - a));
    let (w1, w2) = (w(2.0, -1.0), w(0.5, PAD_SCORE));
    assert!(close(got.embeddings[[0, 0, 0]], w1 * 4.0 + (1.0 - w1) * 2.0));
    assert!(close(got.embeddings[[0, 1, 0]], w2 * 1.0));
    assert!(close(got.scores[[0, 1]], w2 * 0.5 + (1.0 - w2) * PAD_SCORE));
}

/// Well-separated scores: the 16 best of 64 tokens score 10 + t, the rest at most 1; after two
/// halvings (k = 16) the pooled embeddings are the best tokens' embeddings, best first.
#[test]
fn well_separated_scores_pool_to_the_top_k() {
    let (n, d, k) = (64, 8, 16);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let e = Array3::from_shape_simple_fn((2, n, d), || rng.random::<f32>() * 2.0 - 1.0);
    let mut s = Array2::from_shape_simple_fn((2, n), || rng.random::<f32>());
    let mut best = vec![Vec::new(); 2];
    for b in 0..2 {
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = rng.random_range(i..n);
            idx.swap(i, j);
        }
        for (r, &t) in idx[..k].iter().enumerate() {
            s[[b, t]] = 10.0 + (k - r) as f32; // rank r: higher is better
        }
        best[b] = idx[..k].to_vec();
    }
    let got = pool(&e.view(), &s.view(), 2, PAPER_BASE).unwrap();
    assert_eq!(got.embeddings.dim(), (2, k, d));
    for b in 0..2 {
        for (r, &t) in best[b].iter().enumerate() {
            for c in 0..d {
                assert!((got.embeddings[[b, r, c]] - e[[b, t, c]]).abs() < 1e-5, "batch {b} rank {r}");
            }
            assert!((got.scores[[b, r]] - s[[b, t]]).abs() < 1e-4);
        }
    }
}

#[test]
fn typed_errors() {
    let e = Array3::<f32>::zeros((1, 5, 2));
    let s = Array2::<f32>::zeros((1, 5));
    assert!(matches!(pool(&e.view(), &s.view(), 4, 20.0), Err(Error::Shape(_)))); // 8 >> 4 = 0
    assert!(matches!(pool(&e.view(), &s.view(), 1, 1.0), Err(Error::Data(_))));
    assert!(matches!(pool(&e.view(), &Array2::zeros((1, 4)).view(), 1, 20.0), Err(Error::Shape(_))));
    let mut bad = s.clone();
    bad[[0, 2]] = f32::NAN;
    assert!(matches!(pool(&e.view(), &bad.view(), 1, 20.0), Err(Error::NonFinite { .. })));
    assert!(matches!(pool(&Array3::zeros((1, 0, 2)).view(), &Array2::zeros((1, 0)).view(), 0, 20.0), Err(Error::ZeroSize(_))));
}

#[test]
fn shader_parses_and_validates() {
    let module = naga::front::wgsl::parse_str(SHADER).unwrap_or_else(|e| panic!("pooling.wgsl: {}", e.emit_to_string(SHADER)));
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("pooling.wgsl: {}", e.emit_to_string(SHADER)));
}

#[test]
fn gpu_matches_cpu() {
    let Some(engine) = engine() else { return };
    let pooler = engine.pooling().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (batch, n, d, depth) in [(1, 4, 2, 2), (3, 300, 24, 3), (2, 4096, 32, 4), (1, 1, 3, 0), (2, 7, 5, 3), (1, 1000, 1, 1)] {
        let e = Array3::from_shape_simple_fn((batch, n, d), || rng.random::<f32>() * 2.0 - 1.0);
        let s = Array2::from_shape_simple_fn((batch, n), || rng.random::<f32>() * 3.0 - 1.0);
        let want = pool(&e.view(), &s.view(), depth, PAPER_BASE).unwrap();
        let got = pooler.pool(engine, &e.view(), &s.view(), depth, PAPER_BASE).unwrap();
        let what = format!("batch {batch} n {n} d {d} depth {depth}");
        assert_eq!(got.embeddings.dim(), want.embeddings.dim(), "{what}");
        assert_close(&format!("{what} embeddings"), got.embeddings.as_slice().unwrap(), want.embeddings.as_slice().unwrap(), (1e-4, 1e-5));
        assert_close(&format!("{what} scores"), got.scores.as_slice().unwrap(), want.scores.as_slice().unwrap(), (1e-4, 1e-5));
    }
    // The hand-computed example on the GPU.
    let e = array![[[9.0f32, 0.0], [0.0, 3.0], [3.0, 3.0], [0.0, 9.0]]];
    let s = array![[3.0f32, 1.0, 2.0, 0.0]];
    let got = pooler.pool(engine, &e.view(), &s.view(), 2, 2.0).unwrap();
    assert!(close(got.embeddings[[0, 0, 0]], 6.0) && close(got.embeddings[[0, 0, 1]], 5.0 / 3.0) && close(got.scores[[0, 0]], 7.0 / 3.0), "{got:?}");
}

#[test]
fn gpu_batches_past_one_dispatch_or_buffer_run_in_chunks() {
    // Five sequences of 100 tokens (padded to 128) x 8 dims: 8 KiB each, twice over. Two
    // workgroups per dimension, or 20 KiB buffers (two sequences), force chunks of sequences;
    // the result is the CPU's either way.
    let Some(mut small) = own_engine() else { return };
    let limits = small.plan_limits();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let e = Array3::from_shape_simple_fn((5, 100, 8), || rng.random::<f32>() * 2.0 - 1.0);
    let s = Array2::from_shape_simple_fn((5, 100), || rng.random::<f32>() * 3.0 - 1.0);
    let want = pool(&e.view(), &s.view(), 3, PAPER_BASE).unwrap();
    for lowered in [
        sparse_attn::gpu::plan::PlanLimits { max_workgroups_per_dim: 2, ..limits },
        sparse_attn::gpu::plan::PlanLimits { max_binding_bytes: 20 * 1024, ..limits },
    ] {
        small.set_plan_limits(lowered);
        let got = small.pooling().unwrap().pool(&small, &e.view(), &s.view(), 3, PAPER_BASE).unwrap();
        assert_close(&format!("{lowered:?} embeddings"), got.embeddings.as_slice().unwrap(), want.embeddings.as_slice().unwrap(), (1e-4, 1e-5));
        assert_close(&format!("{lowered:?} scores"), got.scores.as_slice().unwrap(), want.scores.as_slice().unwrap(), (1e-4, 1e-5));
    }
    // One sequence past a buffer: a typed Limit, not a partial result.
    small.set_plan_limits(sparse_attn::gpu::plan::PlanLimits { max_binding_bytes: 4096, ..limits });
    match small.pooling().unwrap().pool(&small, &e.view(), &s.view(), 3, PAPER_BASE) {
        Err(Error::Limit { required, .. }) => assert_eq!(required, 2 * 128 * 8 * 4),
        other => panic!("expected Limit, got {other:?}"),
    }
}
