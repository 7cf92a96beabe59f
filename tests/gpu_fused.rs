//! Fused-path specifics: every candidate tile is correct (the tuner may pick any), the entmax
//! candidate overflow fallback, tuning and its caches, the real-data fixture, and split-K.

mod common;

use common::{assert_close, engine, random4, tolerance};
use sparse_attn::data::{fixture_path, AttentionData};
use sparse_attn::gpu::plan::PlanLimits;
use sparse_attn::patterns::mra::MraConfig;
use sparse_attn::patterns::{Causal, Dense, RandomBlocks, Window};
use sparse_attn::{reference, AttentionOptions, AttentionShape, DType, Engine, ExecPath, Normalizer};

#[test]
fn every_candidate_tile_matches_reference() {
    let Some(engine) = engine() else { return };
    // Block 32 for both kernels; block 64 with head_dim 72 reaches the softmax kernel's 64-row
    // tiles and lanes that own a second, partial vec4 column (18 vec4 columns over 16 lanes).
    for (block, d, normalizers) in [(32u32, 40usize, &[Normalizer::Softmax, Normalizer::ENTMAX15][..]), (64, 72, &[Normalizer::Softmax][..])] {
        let shape = AttentionShape::new(1, 2, 70, d).with_seq_kv(90);
        let q = random4((1, 2, 70, d), 1, 2.0);
        let k = random4((1, 2, 90, d), 2, 2.0);
        let v = random4((1, 2, 90, d), 3, 1.0);
        let pattern = RandomBlocks::new(0.7, 4).with_partial(0.4).with_blocks(block, block).build(&shape).unwrap();
        for &normalizer in normalizers {
            let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
            let tiles = engine.fused_tile_candidates(block, block, d, normalizer);
            assert!(!tiles.is_empty(), "no fused tile fits this adapter");
            for tile in tiles {
                let opts = AttentionOptions { path: ExecPath::Fused, fused_tile: Some(tile), ..AttentionOptions::new(normalizer) };
                let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap_or_else(|e| panic!("{tile:?}: {e}"));
                assert_close(&format!("{} block {block} d {d} tile {tile:?}", normalizer.label()), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
            }
        }
    }
}

#[test]
fn entmax_rows_with_more_candidates_than_fit_on_chip_recompute() {
    let Some(engine) = engine() else { return };
    // Near-uniform scores: every key is within 1/(α-1) of the row max, so rows of 300 keys
    // overflow the 64 on-chip candidates and take the recompute path.
    let shape = AttentionShape::new(1, 2, 40, 16).with_seq_kv(300);
    let q = random4((1, 2, 40, 16), 5, 0.3);
    let k = random4((1, 2, 300, 16), 6, 0.3);
    let v = random4((1, 2, 300, 16), 7, 1.0);
    let pattern = Dense::new().with_blocks(16, 64).build(&shape).unwrap();
    for normalizer in [Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.3 }] {
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
        let opts = AttentionOptions { path: ExecPath::Fused, ..AttentionOptions::new(normalizer) };
        let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap();
        assert_close(&format!("overflow {}", normalizer.label()), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
    }
}

#[test]
fn tuning_picks_a_candidate_and_caches_it_in_memory_and_on_disk() {
    if engine().is_none() {
        return;
    }
    let cache = std::env::temp_dir().join(format!("sparse-attn-tiles-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&cache);
    // The env var is read by the cache at use; this test is the only one in this binary
    // that sets it, and the other tests pin their tiles or disable tuning.
    std::env::set_var(sparse_attn::gpu::tiles::ENV_TUNE_CACHE, &cache);
    let mut engine = Engine::new().unwrap();
    engine.set_autotune(true);
    let shape = AttentionShape::new(1, 2, 64, 32);
    let q = random4((1, 2, 64, 32), 8, 1.0);
    let pattern = Window::new(16).with_blocks(16, 16).build(&shape).unwrap();
    let opts = AttentionOptions { path: ExecPath::Fused, ..AttentionOptions::new(Normalizer::Softmax) };
    let plan = engine.plan(&shape, &pattern, &opts).unwrap();
    let tile = plan.fused.expect("fused plan has a tile");
    assert!(engine.fused_tile_candidates(16, 16, 32, Normalizer::Softmax).contains(&tile));
    assert_eq!(engine.tuned_tiles(), 1);
    let text = std::fs::read_to_string(&cache).expect("tile cache written");
    assert!(text.contains(&format!("\"tq\": {}", tile.tq)), "{text}");
    // A second engine reads the choice from disk without tuning.
    let mut again = Engine::new().unwrap();
    again.set_autotune(false);
    assert_eq!(again.plan(&shape, &pattern, &opts).unwrap().fused, Some(tile));
    let got = engine.attention_with(&q, &q, &q, &pattern, &opts).unwrap().o;
    let want = reference::attention(&q, &q, &q, &pattern, Normalizer::Softmax).unwrap();
    assert_close("tuned", got.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
    std::env::remove_var(sparse_attn::gpu::tiles::ENV_TUNE_CACHE);
    let _ = std::fs::remove_file(&cache);
}

#[test]
fn real_fixture_dense_and_window_on_both_paths() {
    let Some(engine) = engine() else { return };
    let data = AttentionData::open(fixture_path()).expect("bundled fixture");
    for text in data.texts() {
        for layer in [0, data.layers() - 1] {
            let (q, k, v) = data.layer(text, layer).unwrap();
            let shape = AttentionShape::new(1, data.heads(), data.seq(), data.head_dim());
            for pattern in [Dense::new().build(&shape).unwrap(), Window::new(32).with_blocks(16, 16).build(&shape).unwrap()] {
                for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15] {
                    let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
                    for path in [ExecPath::Fused, ExecPath::ThreeKernel] {
                        let opts = AttentionOptions { path, ..AttentionOptions::new(normalizer) };
                        let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap().o;
                        assert_close(&format!("{text} layer {layer} {} {path:?}", normalizer.label()), got.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
                    }
                }
            }
        }
    }
}

#[test]
fn real_fixture_entmax_support_matches_reference_exactly_away_from_tau() {
    let Some(engine) = engine() else { return };
    let data = AttentionData::open(fixture_path()).expect("bundled fixture");
    let (q, k, v) = data.layer("gpl3", 1).unwrap();
    let shape = AttentionShape::new(1, data.heads(), data.seq(), data.head_dim());
    let pattern = Dense::new().build(&shape).unwrap();
    let scale = shape.default_scale() as f64;
    let opts = AttentionOptions { return_probabilities: true, ..AttentionOptions::new(Normalizer::ENTMAX15) };
    let out = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap();
    let probs = out.probabilities.unwrap();
    let mask = pattern.to_dense_mask(0);
    let (mut compared, mut near_tau) = (0usize, 0usize);
    for h in 0..data.heads() {
        let qs = q.slice(ndarray::s![0, h, .., ..]);
        let ks = k.slice(ndarray::s![0, h, .., ..]);
        let want = reference::probabilities(&qs, &ks, &mask, scale, Normalizer::ENTMAX15);
        let got = probs.to_dense(&pattern, h);
        for ((i, j), &p) in want.indexed_iter() {
            compared += 1;
            let (in_ref, in_gpu) = (p > 0.0, got[[i, j]] > 0.0);
            if in_ref != in_gpu {
                // Only entries within 1e-6 of τ may differ: for α = 1.5, p = (z − τ)² < 1e-12.
                assert!(p < 1e-12 && got[[i, j]] < 1e-12, "head {h} ({i}, {j}): reference p {p}, GPU p {}", got[[i, j]]);
                near_tau += 1;
            }
        }
    }
    eprintln!("support compared on {compared} entries; {near_tau} differ within 1e-6 of tau");
}

#[test]
fn key_splits_match_reference_including_empty_rows_gqa_and_mra() {
    let Some(engine) = engine() else { return };
    // Batch 2, GQA 4→2, ragged lengths, a partial random pattern with empty query-block rows:
    // splits past the row length leave empty splits, which the merge must drop.
    let shape = AttentionShape::new(2, 4, 75, 32).with_kv_heads(2).with_seq_kv(200);
    let q = random4((2, 4, 75, 32), 21, 2.0);
    let k = random4((2, 2, 200, 32), 22, 2.0);
    let v = random4((2, 2, 200, 32), 23, 1.0);
    let pattern = RandomBlocks::new(0.6, 9).with_partial(0.5).with_blocks(16, 16).build(&shape).unwrap();
    let want = reference::attention(&q, &k, &v, &pattern, Normalizer::Softmax).unwrap();
    for splits in [1u32, 2, 3, 7, 32] {
        let opts = AttentionOptions { path: ExecPath::Fused, key_splits: Some(splits), ..AttentionOptions::new(Normalizer::Softmax) };
        assert_eq!(engine.plan(&shape, &pattern, &opts).unwrap().key_splits, splits);
        let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap();
        assert_close(&format!("{splits} key splits"), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
    }
    // MRA-2: the coarse remainder joins through split 0 only.
    let mra = MraConfig::new(16, 3).build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
    let want = sparse_attn::patterns::mra::reference::attention(&q, &k, &v, &mra, Normalizer::Softmax, None).unwrap();
    let opts = AttentionOptions { path: ExecPath::Fused, key_splits: Some(4), ..AttentionOptions::new(Normalizer::Softmax) };
    let got = engine.attention_mra(&q, &k, &v, &mra, &opts).unwrap();
    assert_close("MRA-2 with 4 key splits", got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
}

#[test]
fn key_splits_with_chunked_bindings_match_reference() {
    if engine().is_none() {
        return;
    }
    // Partials of 3 splits × (32 + 2) floats per query row: 32 KiB bindings force several chunks.
    let mut engine = Engine::new().expect("engine");
    engine.set_autotune(false);
    engine.set_plan_limits(PlanLimits { max_binding_bytes: 32 << 10, ..engine.plan_limits() });
    let shape = AttentionShape::new(1, 3, 200, 32);
    let q = random4((1, 3, 200, 32), 31, 2.0);
    let k = random4((1, 3, 200, 32), 32, 2.0);
    let v = random4((1, 3, 200, 32), 33, 1.0);
    let pattern = Causal::new().with_blocks(32, 32).build(&shape).unwrap();
    let opts = AttentionOptions { path: ExecPath::Fused, key_splits: Some(3), ..AttentionOptions::new(Normalizer::Softmax) };
    let plan = engine.plan(&shape, &pattern, &opts).unwrap();
    assert!(plan.chunks.len() > 1, "expected several chunks, got {}", plan.chunks.len());
    assert!(plan.partial_bytes <= 32 << 10, "partials {} exceed the binding", plan.partial_bytes);
    let want = reference::attention(&q, &k, &v, &pattern, Normalizer::Softmax).unwrap();
    let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap();
    assert_close("chunked key splits", got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
}
