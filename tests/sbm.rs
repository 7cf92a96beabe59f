//! SBM-Transformer edges: the sampler's law against E[A], linear memory at n = 65 536,
//! determinism, persistence, the pattern = the edges, and GPU attention on SBM patterns.

mod common;

use common::{assert_close, engine};
use ndarray::{Array2, Array4};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_attn::data::{fixture_path, AttentionData};
use sparse_attn::patterns::sbm::{Density, Mlp, Sbm, SbmConfig, SbmHead, SbmLayer, SbmModel, SbmSampler};
use sparse_attn::{reference, Error, Normalizer};
use std::time::Instant;

fn normal(rng: &mut impl Rng) -> f32 {
    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

fn randn(shape: (usize, usize), rng: &mut impl Rng, s: f32) -> Array2<f32> {
    Array2::from_shape_simple_fn(shape, || s * normal(rng))
}

fn random_layer(d: usize, k: usize, heads: usize, rng: &mut impl Rng) -> SbmLayer {
    let v = |len: usize, rng: &mut ChaCha8Rng| (0..len).map(|_| 0.5 * normal(rng)).collect::<Vec<f32>>();
    let mut r = ChaCha8Rng::seed_from_u64(rng.random());
    let phi = Mlp { dim: d, w1: v(d * d, &mut r), b1: v(d, &mut r), w2: v(d * d, &mut r), b2: v(d, &mut r) };
    let heads = (0..heads).map(|_| SbmHead { clusters: randn((k, d), &mut r, 0.7) }).collect();
    SbmLayer { phi: Some(phi), logit_scale: 1.0, heads }
}

/// Empirical edge frequencies over many seeded draws match the law of fastRG with duplicates
/// dropped, P(edge ij) = 1 − exp(−ρ·E[A]_ij), per pair within 4.5 binomial standard deviations
/// (120 pairs: a false alarm has probability < 1e-3, and the seed is fixed).
#[test]
fn edge_frequencies_match_expected_adjacency() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (n, m, d, k) = (12, 10, 4, 3);
    let layer = random_layer(d, k, 1, &mut rng);
    let q = randn((n, d), &mut rng, 1.0);
    let kk = randn((m, d), &mut rng, 1.0);
    // ρ such that the mean λ_ij is 0.4: the pairs' probabilities spread over (0, 1).
    let sampler = SbmSampler::new(&q.view(), &kk.view(), layer.phi.as_ref(), &layer.heads[0], 1.0, Density::EdgesPerQuery(0.4 * m as f64)).unwrap();
    let rho = sampler.rho();
    let ea = sampler.expected_adjacency();
    assert!(ea.iter().all(|&x| (0.0..=1.0).contains(&x)), "E[A] entries must be probabilities");
    assert!((ea.sum() - sampler.mass()).abs() < 1e-9 * sampler.mass(), "Σ E[A] = {} vs mass {}", ea.sum(), sampler.mass());
    let draws = 6000usize;
    let mut counts = Array2::<f64>::zeros((n, m));
    let mut total_edges = 0usize;
    for _ in 0..draws {
        let e = sampler.sample(&mut rng);
        total_edges += e.count();
        for i in 0..n {
            let row = e.row(i);
            assert!(row.windows(2).all(|w| w[0] < w[1]), "row keys sorted and unique");
            for &j in row {
                counts[[i, j as usize]] += 1.0;
            }
        }
    }
    let mut worst = 0f64;
    let mut expected_total = 0.0;
    for i in 0..n {
        for j in 0..m {
            let p = 1.0 - (-rho * ea[[i, j]]).exp();
            expected_total += p;
            let sd = (draws as f64 * p * (1.0 - p)).sqrt();
            let z = (counts[[i, j]] - draws as f64 * p) / sd.max(1e-9);
            worst = worst.max(z.abs());
            assert!(z.abs() < 4.5, "pair ({i},{j}): {} edges in {draws} draws, expected p = {p:.4} (E[A] = {:.4}), z = {z:.2}", counts[[i, j]], ea[[i, j]]);
        }
    }
    // The mean edge count per draw: sum of independent Bernoullis.
    let var: f64 = ea.iter().map(|&a| (1.0 - (-rho * a).exp()) * (-rho * a).exp()).sum();
    let mean = total_edges as f64 / draws as f64;
    let z = (mean - expected_total) / (var / draws as f64).sqrt();
    assert!(z.abs() < 4.5, "mean edges {mean} vs {expected_total} (z {z:.2})");
    let (pmin, pmax) = ea.iter().fold((1f64, 0f64), |(a, b), &x| (a.min(1.0 - (-rho * x).exp()), b.max(1.0 - (-rho * x).exp())));
    assert!(pmin < 0.15 && pmax > 0.5, "the test should cover small and large probabilities: {pmin}..{pmax}");
    eprintln!("worst per-pair |z| = {worst:.2}, mean edges {mean:.2} vs {expected_total:.2}, p in {pmin:.3}..{pmax:.3}");
}

/// With a small density the law is ≈ ρ·E[A] itself (first order).
#[test]
fn small_density_frequencies_are_proportional_to_expected_adjacency() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (n, m, d, k) = (8, 8, 4, 4);
    let layer = random_layer(d, k, 1, &mut rng);
    let q = randn((n, d), &mut rng, 1.0);
    let kk = randn((m, d), &mut rng, 1.0);
    let rho = 0.05;
    let sampler = SbmSampler::new(&q.view(), &kk.view(), layer.phi.as_ref(), &layer.heads[0], 1.0, Density::Scale(rho)).unwrap();
    let ea = sampler.expected_adjacency();
    let draws = 40_000usize;
    let mut counts = Array2::<f64>::zeros((n, m));
    for _ in 0..draws {
        let e = sampler.sample(&mut rng);
        for i in 0..n {
            for &j in e.row(i) {
                counts[[i, j as usize]] += 1.0;
            }
        }
    }
    for ((i, j), &c) in counts.indexed_iter() {
        let p = rho * ea[[i, j]];
        let sd = (draws as f64 * p * (1.0 - p)).sqrt();
        // Bias of the first-order law: ρE − (1 − e^{−ρE}) <= (ρE)²/2 per draw.
        let bias = draws as f64 * p * p / 2.0;
        assert!((c - draws as f64 * p).abs() < 4.5 * sd + bias, "pair ({i},{j}): {c} vs {}", draws as f64 * p);
    }
}

#[test]
fn pattern_holds_exactly_the_sampled_edges() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (b, h, n, m, d) = (2, 2, 70, 90, 8);
    let q = Array4::from_shape_simple_fn((b, h, n, d), || normal(&mut rng));
    let k = Array4::from_shape_simple_fn((b, 1, m, d), || normal(&mut rng)); // MQA
    let config = SbmConfig::default().with_clusters(6).with_blocks(16, 32).with_density(Density::EdgesPerQuery(9.0)).with_seed(5);
    let layer = SbmLayer::from_keys(&k.view(), &config).unwrap();
    assert_eq!(layer.heads.len(), 1);
    let (pattern, stats) = Sbm::new(config.clone()).build_with_stats(&layer, &q.view(), &k.view()).unwrap();
    assert_eq!(pattern.slices(), 4);
    for slice in 0..4 {
        let (bi, hi) = (slice / h, slice % h);
        let sampler = SbmSampler::new(
            &q.slice(ndarray::s![bi, hi, .., ..]),
            &k.slice(ndarray::s![bi, 0, .., ..]),
            None,
            &layer.heads[0],
            layer.logit_scale,
            config.density,
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(slice as u64);
        let edges = sampler.sample(&mut rng);
        assert_eq!(edges.count(), stats.edges[slice]);
        let dense = pattern.to_dense_mask(slice);
        for i in 0..n {
            let want: Vec<usize> = edges.row(i).iter().map(|&j| j as usize).collect();
            let got: Vec<usize> = (0..m).filter(|&j| dense[[i, j]]).collect();
            assert_eq!(got, want, "slice {slice} row {i}");
        }
        assert!((stats.expected_edges[slice] - 9.0 * n as f64).abs() < 1e-6 * 9.0 * n as f64);
    }
}

#[test]
fn deterministic_per_seed() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let q = Array4::from_shape_simple_fn((1, 3, 200, 16), || normal(&mut rng));
    let k = Array4::from_shape_simple_fn((1, 3, 200, 16), || normal(&mut rng));
    let config = SbmConfig::default().with_clusters(16).with_density(Density::EdgesPerQuery(6.0));
    let layer = SbmLayer::from_keys(&k.view(), &config).unwrap();
    let a = Sbm::new(config.clone()).build(&layer, &q.view(), &k.view()).unwrap();
    let b = Sbm::new(config.clone()).build(&layer, &q.view(), &k.view()).unwrap();
    assert_eq!(a, b);
    let layer2 = SbmLayer::from_keys(&k.view(), &config).unwrap();
    assert_eq!(layer, layer2, "k-means initialisation is seeded");
    let c = Sbm::new(config.with_seed(1)).build(&layer, &q.view(), &k.view()).unwrap();
    assert_ne!(a, c, "another seed samples another graph");
}

/// n = 65 536: the build holds O(edges + (n+m)·k) and the pattern is proportional to its edges
/// (one stored block per touched (query block, key block), one mask per stored block).
#[test]
fn long_sequence_memory_proportional_to_edges() {
    let (n, d) = (65_536usize, 16usize);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let q = Array4::from_shape_simple_fn((1, 1, n, d), || normal(&mut rng));
    let k = Array4::from_shape_simple_fn((1, 1, n, d), || normal(&mut rng));
    let config = SbmConfig::default().with_density(Density::EdgesPerQuery(4.0)).with_seed(2);
    assert_eq!(config.clusters, 128, "paper default k");
    let t = Instant::now();
    let layer = SbmLayer::from_keys(&k.view(), &config).unwrap();
    let t_init = t.elapsed();
    let t = Instant::now();
    let (pattern, stats) = Sbm::new(config.clone()).build_with_stats(&layer, &q.view(), &k.view()).unwrap();
    let t_build = t.elapsed();
    let edges = stats.edges[0];
    let expected = stats.expected_edges[0];
    eprintln!("n = {n}: init {t_init:?}, build {t_build:?}, {edges} edges (expected {expected:.0} before dedup), nnz {} blocks, {} mask words", pattern.nnz(), pattern.masks().len());
    // Poisson count within 5 sd; duplicates only lower it.
    assert!((edges as f64) < expected + 5.0 * expected.sqrt());
    assert!((edges as f64) > 0.9 * expected, "too many duplicates: {edges} of {expected}");
    let words = pattern.geometry().mask_words();
    assert!(pattern.nnz() <= edges, "nnz {} > edges {edges}", pattern.nnz());
    assert!(pattern.masks().len() <= words * edges, "mask words {} > {words}·edges", pattern.masks().len());
    // And far from dense: the dense pattern would hold n²/32² = 4.2M blocks.
    assert!(pattern.nnz() < 2 * edges && pattern.nnz() < 1_000_000);
    let allowed = pattern.allowed_pairs(0);
    assert_eq!(allowed as usize, edges, "every edge is one allowed pair");
}

#[test]
fn model_round_trips_through_safetensors() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let model = SbmModel { layers: vec![random_layer(8, 5, 3, &mut rng), SbmLayer { phi: None, logit_scale: 0.25, heads: random_layer(8, 5, 3, &mut rng).heads }] };
    let dir = std::env::temp_dir().join(format!("sparse-attn-sbm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sbm.safetensors");
    model.save(&path).unwrap();
    let back = SbmModel::load(&path).unwrap();
    assert_eq!(back, model);
    std::fs::write(&path, b"not safetensors").unwrap();
    assert!(matches!(SbmModel::load(&path), Err(Error::Data(_))));
    assert!(matches!(SbmModel::load(dir.join("missing.safetensors")), Err(Error::Io { .. })));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn typed_errors() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let q = Array4::from_shape_simple_fn((1, 2, 40, 8), || normal(&mut rng));
    let k = q.clone();
    let layer = random_layer(8, 4, 3, &mut rng); // 3 heads for 2
    assert!(matches!(Sbm::default().build(&layer, &q.view(), &k.view()), Err(Error::Shape(_))));
    let layer = random_layer(4, 4, 2, &mut rng); // d = 4 for 8
    assert!(matches!(Sbm::default().build(&layer, &q.view(), &k.view()), Err(Error::Shape(_))));
    let bad = Sbm::new(SbmConfig::default().with_density(Density::Scale(f64::NAN)));
    assert!(matches!(bad.build(&random_layer(8, 4, 2, &mut rng), &q.view(), &k.view()), Err(Error::Data(_))));
    assert!(matches!(SbmLayer::from_keys(&k.view(), &SbmConfig::default().with_clusters(0)), Err(Error::ZeroSize(_))));
    // Non-finite inputs or weights are named, not sampled into an empty pattern.
    let layer = random_layer(8, 4, 2, &mut rng);
    let mut q_nan = q.clone();
    q_nan[[0, 1, 3, 2]] = f32::NAN;
    assert!(matches!(Sbm::default().build(&layer, &q_nan.view(), &k.view()), Err(Error::NonFinite { tensor: "sbm q", .. })));
    let mut phi_inf = layer.clone();
    phi_inf.phi.as_mut().unwrap().w2[5] = f32::INFINITY;
    assert!(matches!(Sbm::default().build(&phi_inf, &q.view(), &k.view()), Err(Error::NonFinite { tensor: "sbm φ w2", index: 5, .. })));
    // A density far past the complete graph (40 x 40 pairs) is refused before allocating.
    let dense = Sbm::new(SbmConfig::default().with_clusters(4).with_density(Density::EdgesPerQuery(1e12)));
    match dense.build(&layer, &q.view(), &k.view()) {
        Err(Error::Data(msg)) => assert!(msg.contains("expected edges"), "{msg}"),
        other => panic!("expected a Data error, got {:?}", other.map(|p| p.nnz())),
    }
    assert!(Sbm::new(SbmConfig::default().with_clusters(4).with_density(Density::EdgesPerQuery(40.0))).build(&layer, &q.view(), &k.view()).is_ok());
}

/// End to end on real keys (the fixture): the GPU kernels equal the CPU reference on the SBM
/// pattern, softmax and 1.5-entmax; queries without edges output 0 on both.
#[test]
fn gpu_attention_on_sbm_pattern_matches_reference() {
    let Some(engine) = engine() else { return };
    let data = AttentionData::open(fixture_path()).unwrap();
    let text = data.texts()[0].clone();
    let (q, k, v) = data.layer(&text, 1).unwrap();
    for (density, blocks) in [(Density::EdgesPerQuery(24.0), (32, 32)), (Density::EdgesPerQuery(1.0), (16, 64))] {
        let config = SbmConfig::default().with_density(density).with_blocks(blocks.0, blocks.1);
        let layer = SbmLayer::from_keys(&k.view(), &config).unwrap();
        let (pattern, stats) = Sbm::new(config).build_with_stats(&layer, &q.view(), &k.view()).unwrap();
        let empty_rows: usize = (0..pattern.slices() as usize).map(|s| (0..q.dim().2).filter(|&i| pattern.row_keys(s, i).is_empty()).count()).sum();
        eprintln!("{density:?}: edges {:?}, empty rows {empty_rows}", stats.edges);
        if matches!(density, Density::EdgesPerQuery(x) if x < 2.0) {
            assert!(empty_rows > 0, "a sparse graph leaves some queries without edges");
        }
        for normalizer in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
            let got = engine.attention(&q, &k, &v, &pattern, normalizer).unwrap();
            let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
            assert_close(&format!("sbm {density:?} {normalizer:?}"), got.as_slice().unwrap(), want.as_slice().unwrap(), (1e-4, 1e-5));
            for s in 0..pattern.slices() as usize {
                for i in 0..q.dim().2 {
                    if pattern.row_keys(s, i).is_empty() {
                        assert!(got.slice(ndarray::s![0, s, i, ..]).iter().all(|&x| x == 0.0), "empty row {i} must output 0");
                    }
                }
            }
        }
    }
}
