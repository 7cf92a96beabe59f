//! Fused-path specifics: every candidate tile is correct (the tuner may pick any), the entmax
//! candidate overflow fallback, tuning and its caches, the real-data fixture, and split-K.

mod common;

use common::{assert_close, engine, own_engine, random4, random_qkv, storage_dtypes, tolerance};
use sparse_attn::data::{fixture_path, AttentionData};
use sparse_attn::gpu::plan::PlanLimits;
use sparse_attn::gpu::tiles;
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
        let (q, k, v) = random_qkv((1, 2, 70, d), (1, 2, 90, d), 1, 2.0);
        let pattern = RandomBlocks::new(0.7, 4).with_partial(0.4).with_blocks(block, block).build(&shape).unwrap();
        for &normalizer in normalizers {
            let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
            let tiles = engine.fused_tile_candidates_for(&pattern, d, normalizer);
            assert!(!tiles.is_empty(), "no fused tile fits this adapter");
            if normalizer.alpha().is_some() {
                assert!(tiles.iter().any(|t| t.rc > 0) && tiles.iter().any(|t| t.cap > 0), "both entmax kernels should have tiles here: {tiles:?}");
            }
            for tile in tiles {
                let opts = AttentionOptions { path: ExecPath::Fused, fused_tile: Some(tile), ..AttentionOptions::new(normalizer) };
                let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap_or_else(|e| panic!("{tile:?}: {e}"));
                assert_close(&format!("{} block {block} d {d} tile {tile:?}", normalizer.label()), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
            }
        }
    }
}

#[test]
fn fused_kernels_reduce_rows_with_subgroups_where_they_fit() {
    let Some(engine) = engine() else { return };
    // Every fused tile on this engine and on one with subgroups switched off: both variants
    // match the reference. Where a tile's row reductions span 4 lanes or more that fit the
    // adapter's subgroups, and the output depends on a reduced float sum (the softmax's row
    // sum, the score cache's Σp), the subgroup variant must really run: its butterfly sums the
    // lanes' shares in another order than the lane-by-lane sum, so some outputs differ in their
    // last bits (identical bits would mean the kernel fell back to workgroup memory). The
    // pooling kernel's reductions (row max, counts, the shrinks' floors) leave its output's
    // bits unchanged, so only its first tile runs here (each variant of each entmax tile is
    // a pipeline of its own, and they cost seconds each to compile on llvmpipe).
    let Some(mut fallback) = own_engine() else { return };
    fallback.force_fallbacks(false, true);
    let caps = engine.capabilities();
    let d = 40;
    let shape = AttentionShape::new(1, 2, 70, d).with_seq_kv(90);
    let (q, k, v) = random_qkv((1, 2, 70, d), (1, 2, 90, d), 11, 2.0);
    let pattern = RandomBlocks::new(0.7, 4).with_partial(0.4).with_blocks(32, 32).build(&shape).unwrap();
    let mut subgroup_tiles = 0;
    for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15] {
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
        let tiles = engine.fused_tile_candidates_for(&pattern, d, normalizer);
        let first_pool = tiles.iter().position(|t| t.cap > 0);
        for (i, tile) in tiles.into_iter().enumerate() {
            if tile.cap > 0 && Some(i) != first_pool {
                continue;
            }
            let opts = AttentionOptions { path: ExecPath::Fused, fused_tile: Some(tile), ..AttentionOptions::new(normalizer) };
            let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap().o;
            let plain = fallback.attention_with(&q, &k, &v, &pattern, &opts).unwrap().o;
            let what = format!("{} tile {tile:?}", normalizer.label());
            assert_close(&format!("default engine, {what}"), got.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
            assert_close(&format!("no subgroups, {what}"), plain.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
            let sums_decide = tile.cap == 0;
            if caps.subgroups && sums_decide && tile.reduction_lanes() >= 4 && tile.row_lanes_fit_subgroups(caps.subgroup_min_size) {
                subgroup_tiles += 1;
                assert!(got != plain, "{what}: same bits with and without subgroups (subgroup min size {})", caps.subgroup_min_size);
            }
        }
    }
    if caps.subgroups {
        eprintln!("{subgroup_tiles} tiles checked to reduce with subgroups (subgroup min size {})", caps.subgroup_min_size);
    }
}

#[test]
fn entmax_rows_with_more_candidates_than_fit_on_chip_recompute() {
    let Some(engine) = engine() else { return };
    // Near-uniform scores (spread in proportion to 1/(α-1), so every α has as large a
    // support): every key is within 1/(α-1) of the row max, and the supports of rows of 300
    // keys overflow the row's whole pool, so the tiles take the recompute path.
    let shape = AttentionShape::new(1, 2, 40, 16).with_seq_kv(300);
    let (q, k, v) = random_qkv((1, 2, 40, 16), (1, 2, 300, 16), 5, 0.3);
    let pattern = Dense::new().with_blocks(16, 64).build(&shape).unwrap();
    for normalizer in [Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.3 }] {
        let q = q.mapv(|x| x * (0.5 / (normalizer.alpha().unwrap() - 1.0)) as f32);
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
        // The pooling kernel (these rows would also fit a score cache, which has no fallback).
        let pooling = engine.fused_tile_candidates(16, 64, 16, normalizer)[0];
        let opts = AttentionOptions { path: ExecPath::Fused, fused_tile: Some(pooling), ..AttentionOptions::new(normalizer) };
        let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap();
        assert_close(&format!("overflow {}", normalizer.label()), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
        let paths = got.entmax_paths.unwrap();
        assert!(paths.pool_recomputed > 0 && paths.pool_recomputed as u64 == paths.tiles(), "{}: every tile recomputes: {paths:?}", normalizer.label());
    }
}

#[test]
fn entmax_pools_shrink_on_flat_rows_whose_candidates_exceed_the_pool() {
    let Some(engine) = engine() else { return };
    // Flat rows (score std 0.44 at α = 1.5, as in the speed bench): nearly all of 1000 keys lie
    // within 1/(α-1) of the row max, far more than a row's pool holds, while the support is small.
    // Pass 1 must evict pooled scores below its Newton floor many times per row; a floor above
    // the row's threshold would drop support keys without any overflow being recorded.
    let (seq_q, seq_kv, d) = (24, 1000, 16);
    let shape = AttentionShape::new(1, 2, seq_q, d).with_seq_kv(seq_kv);
    let (q, k, v) = random_qkv((1, 2, seq_q, d), (1, 2, seq_kv, d), 41, 2.0);
    let pattern = Dense::new().with_blocks(32, 32).build(&shape).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    for normalizer in [Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.3 }] {
        let reach = 1.0 / (normalizer.alpha().unwrap() - 1.0);
        // Scores spread in proportion to the reach, so every α has as many candidates.
        let q = q.mapv(|x| x * (reach / 2.0) as f32);
        // Candidates per row (keys within reach of the max): the fewest over all rows.
        let fewest = (0..2)
            .flat_map(|h| (0..seq_q).map(move |i| (h, i)))
            .map(|(h, i)| {
                let s: Vec<f64> = (0..seq_kv).map(|j| scale * (0..d).map(|c| q[[0, h, i, c]] as f64 * k[[0, h, j, c]] as f64).sum::<f64>()).collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                s.iter().filter(|&&x| x > m - reach).count()
            })
            .min()
            .unwrap();
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
        for tile in engine.fused_tile_candidates(32, 32, d, normalizer) {
            assert!(fewest > tile.cap as usize, "{}: rows have only {fewest} candidates for {tile:?}", normalizer.label());
            let opts = AttentionOptions { path: ExecPath::Fused, fused_tile: Some(tile), ..AttentionOptions::new(normalizer) };
            let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap();
            assert_close(&format!("flat {} tile {tile:?}", normalizer.label()), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
            let paths = got.entmax_paths.unwrap();
            assert!(paths.pool_shrinks > 0, "flat {} tile {tile:?}: no pool shrank: {paths:?}", normalizer.label());
        }
    }
}

#[test]
fn entmax_pool_collect_and_recompute_rows_share_a_workgroup() {
    let Some(engine) = engine() else { return };
    // Three kinds of query rows, cycling, built from separate columns of Q and K: peaked rows
    // (random scores) whose support fits each lane's pool; "lane" rows whose support is 16 more
    // near-equal keys than a lane's pool holds, all ≡ 0 mod 8 and so all on one lane (far fewer
    // than the row's pool: the collect walk); and in head 1 only, flat rows where all 700 keys
    // tie (more than the row's pool: the recompute fallback, which then recomputes its whole
    // workgroup). Head 0's tiles never recompute, so its lane rows take their output from the
    // collected pool.
    let (seq_q, seq_kv, d) = (48, 700, 16);
    let shape = AttentionShape::new(1, 2, seq_q, d).with_seq_kv(seq_kv);
    let pattern = Dense::new().with_blocks(16, 64).build(&shape).unwrap();
    // The pooling kernel's default tile (these rows would also fit a score cache).
    let tile = engine.fused_tile_candidates(16, 64, d, Normalizer::ENTMAX15)[0];
    let (lanes, per_lane, cap) = (tile.threads_per_row() as usize, tile.pool_per_lane() as usize, tile.cap as usize);
    let lane_keys = per_lane + 16;
    assert!(8 * lane_keys <= seq_kv && cap < seq_kv, "tile {tile:?} too large for this test's rows");
    let jitter = |j: usize| 1e-3 * (((j * 7919) % 101) as f32 / 101.0 - 0.5);
    let (q_random, k_random) = (random4((1, 2, seq_q, d), 31, 6.0), random4((1, 2, seq_kv, d), 32, 3.0));
    let k = ndarray::Array4::from_shape_fn((1, 2, seq_kv, d), |(_, h, j, c)| match c {
        0 if j % 8 == 0 && j < 8 * lane_keys => 1.0 + jitter(j),
        0 => -1.0,
        1 => jitter(j),
        _ => k_random[[0, h, j, c]],
    });
    let q = ndarray::Array4::from_shape_fn((1, 2, seq_q, d), |(_, h, i, c)| match (i % 3, h, c) {
        (0, _, c) if c >= 2 => q_random[[0, h, i, c]],
        (1, _, 0) | (2, 0, 0) => 40.0,
        (2, 1, 1) => 1.0,
        _ => 0.0,
    });
    let v = random4((1, 2, seq_kv, d), 33, 1.0);

    // The data reaches every path: per row, its 1.5-entmax support and its largest share on one
    // lane (lane = key mod lanes: chunks start at multiples of the keys per step).
    let mask = pattern.to_dense_mask(0);
    for (h, want_recompute) in [(0, false), (1, true)] {
        let p = reference::probabilities(&q.slice(ndarray::s![0, h, .., ..]), &k.slice(ndarray::s![0, h, .., ..]), &mask, shape.default_scale() as f64, Normalizer::ENTMAX15);
        let mut kinds = [0usize; 3];
        for row in p.rows() {
            let support = row.iter().filter(|&&x| x > 0.0).count();
            let widest = (0..lanes).map(|l| row.iter().skip(l).step_by(lanes).filter(|&&x| x > 0.0).count()).max().unwrap_or(0);
            kinds[if widest <= per_lane { 0 } else if support <= cap { 1 } else { 2 }] += 1;
        }
        assert!(kinds[0] > 0 && kinds[1] > 0 && (kinds[2] > 0) == want_recompute, "head {h}: rows fitting a lane's pool / overflowing a lane only / overflowing the row's pool: {kinds:?} (tile {tile:?})");
    }
    for normalizer in [Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.25 }] {
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
        let opts = AttentionOptions { path: ExecPath::Fused, fused_tile: Some(tile), ..AttentionOptions::new(normalizer) };
        let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap();
        assert_close(&format!("mixed rows {}", normalizer.label()), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
        if normalizer == Normalizer::ENTMAX15 {
            // The rows above were sorted for 1.5-entmax: both heads collect, head 1 recomputes.
            let paths = got.entmax_paths.unwrap();
            assert!(paths.pool_collect_walks > 0 && paths.pool_recomputed > 0 && paths.pool_gathered > 0, "mixed rows: {paths:?}");
            // Head 0 alone: its tiles end in the gather, some after collecting.
            let head0 = ndarray::s![.., 0..1, .., ..];
            let shape0 = AttentionShape::new(1, 1, seq_q, d).with_seq_kv(seq_kv);
            let pattern0 = Dense::new().with_blocks(16, 64).build(&shape0).unwrap();
            let got0 = engine.attention_with(q.slice(head0), k.slice(head0), v.slice(head0), &pattern0, &opts).unwrap();
            let paths0 = got0.entmax_paths.unwrap();
            assert!(paths0.pool_collect_walks > 0 && paths0.pool_recomputed == 0, "head 0: {paths0:?}");
            assert_eq!(paths0.pool_gathered as usize, seq_q.div_ceil(tile.tq as usize), "head 0: {paths0:?}");
        }
    }
}

#[test]
fn fused_entmax_past_f32_key_indices_is_unsupported_and_auto_takes_three_kernels() {
    let Some(engine) = engine() else { return };
    // The pool keeps key indices as f32: exact below 2^24 keys. Planning needs no data.
    let seq_kv = sparse_attn::gpu::tiles::MAX_FUSED_ENTMAX_SEQ_KV + 1;
    let shape = AttentionShape::new(1, 1, 128, 16).with_seq_kv(seq_kv);
    let pattern = Window::new(64).with_blocks(128, 128).build(&shape).unwrap();
    let fused = AttentionOptions { path: ExecPath::Fused, ..AttentionOptions::new(Normalizer::ENTMAX15) };
    match engine.plan(&shape, &pattern, &fused) {
        Err(sparse_attn::Error::Unsupported(msg)) => assert!(msg.contains("seq_kv"), "{msg}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let auto = AttentionOptions::new(Normalizer::ENTMAX15);
    assert_eq!(engine.plan(&shape, &pattern, &auto).unwrap().path, ExecPath::ThreeKernel);
    // Softmax keeps no key indices: its fused path plans.
    let softmax = AttentionOptions { path: ExecPath::Fused, ..AttentionOptions::new(Normalizer::Softmax) };
    assert_eq!(engine.plan(&shape, &pattern, &softmax).unwrap().path, ExecPath::Fused);
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
        let got = probs.to_dense(&pattern, h).expect("dense probabilities");
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
    let (q, k, v) = random_qkv((2, 4, 75, 32), (2, 2, 200, 32), 21, 2.0);
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
    // Partials of 3 splits × (32 + 2) floats per query row: 32 KiB bindings force several chunks.
    let Some(mut engine) = own_engine() else { return };
    engine.set_plan_limits(PlanLimits { max_binding_bytes: 32 << 10, ..engine.plan_limits() });
    let shape = AttentionShape::new(1, 3, 200, 32);
    let (q, k, v) = random_qkv((1, 3, 200, 32), (1, 3, 200, 32), 31, 2.0);
    let pattern = Causal::new().with_blocks(32, 32).build(&shape).unwrap();
    let opts = AttentionOptions { path: ExecPath::Fused, key_splits: Some(3), ..AttentionOptions::new(Normalizer::Softmax) };
    let plan = engine.plan(&shape, &pattern, &opts).unwrap();
    assert!(plan.chunks.len() > 1, "expected several chunks, got {}", plan.chunks.len());
    assert!(plan.partial_bytes <= 32 << 10, "partials {} exceed the binding", plan.partial_bytes);
    let want = reference::attention(&q, &k, &v, &pattern, Normalizer::Softmax).unwrap();
    let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap();
    assert_close("chunked key splits", got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
}

#[test]
fn entmax_score_cache_rows_at_capacity_empty_rows_and_skipped_chunks() {
    let Some(engine) = engine() else { return };
    // Per score-caching tile and cache size (the power-of-two buckets and the tile's most,
    // sizes as the candidates pick them): a block row that ends within the cache's last 32
    // keys (the last block ragged: 20 of 32 keys), one with no blocks, and one partial block,
    // so the longest row fills the cache and the others leave it part empty. Every query has
    // +4 in column 0 and keys 64..96 have −4 there: those scores sit far below the rest, no
    // row gives them p > 0, and pass 2 must skip that chunk (their V rows are huge, so taking
    // them in would show).
    use sparse_attn::pattern::{BlockMask, PatternAccumulator, PatternGeometry};
    let (seq_q, d) = (96, 64);
    let limits = engine.device().limits();
    let mut cases: Vec<(tiles::FusedTile, usize)> = Vec::new();
    for blocks in 3..=(tiles::ENTMAX_CACHE_MAX / 32) {
        for tile in tiles::cached_candidates(32, 32, d as u32, blocks, &limits) {
            if tile.rc - blocks * 32 < 32 && !cases.iter().any(|(t, _)| *t == tile) {
                cases.push((tile, blocks as usize));
            }
        }
    }
    assert!(!cases.is_empty(), "no score-caching tile for rows of 3 or more blocks of 32 at head_dim {d}");
    assert!(cases.iter().any(|(t, _)| t.rc > tiles::ENTMAX_CACHE_MIN), "only the smallest cache size was checked: {cases:?}");
    let short = PatternGeometry { block_q: 32, block_k: 32, seq_q: seq_q as u32, seq_kv: 96, slices: 1 };
    for &(tile, blocks) in &cases {
        let seq_kv = blocks * 32 + 20;
        let g = PatternGeometry { seq_kv: seq_kv as u32, ..short };
        let mut acc = PatternAccumulator::new(g).unwrap();
        acc.push_row((1..=blocks as u32).map(|b| (b, BlockMask::Full)));
        acc.push_row(std::iter::empty());
        let mut bits = vec![0u32; g.mask_words()];
        for r in (0..32).step_by(3) {
            bits[r] = 0x0f0f_0f0f;
        }
        acc.push_row([(2, BlockMask::Bits(bits))]);
        let pattern = acc.finish().unwrap();
        assert_eq!(pattern.max_row_blocks() as usize, blocks);
        let mut q = random4((1, 2, seq_q, d), 51, 2.0);
        let mut k = random4((1, 2, seq_kv, d), 52, 2.0);
        let mut v = random4((1, 2, seq_kv, d), 53, 1.0);
        q.slice_mut(ndarray::s![.., .., .., 0]).fill(4.0);
        for j in 64..96 {
            k.slice_mut(ndarray::s![.., .., j, 0]).fill(-4.0);
            v.slice_mut(ndarray::s![.., .., j, ..]).fill(1e4);
        }
        for normalizer in [Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.3 }] {
            let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
            let opts = AttentionOptions { path: ExecPath::Fused, fused_tile: Some(tile), ..AttentionOptions::new(normalizer) };
            let got = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap_or_else(|e| panic!("{tile:?}: {e}"));
            assert_close(&format!("score cache {} tile {tile:?}", normalizer.label()), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
        }
    }
}

#[test]
fn score_caching_tiles_refuse_rows_longer_than_their_cache_and_long_rows_pool() {
    let Some(engine) = engine() else { return };
    // Rows of 2048 keys: longer than any score cache (ENTMAX_CACHE_MAX).
    let shape = AttentionShape::new(1, 1, 64, 32).with_seq_kv(2048);
    let short = Window::new(16).with_blocks(32, 32).build(&shape).unwrap();
    let long = Dense::new().with_blocks(32, 32).build(&shape).unwrap();
    assert!(long.max_row_blocks() * 32 > sparse_attn::gpu::tiles::ENTMAX_CACHE_MAX);
    let tile = engine.fused_tile_candidates_for(&short, 32, Normalizer::ENTMAX15).into_iter().find(|t| t.rc > 0).expect("a score-caching tile");
    let entmax = AttentionOptions { path: ExecPath::Fused, fused_tile: Some(tile), ..AttentionOptions::new(Normalizer::ENTMAX15) };
    assert_eq!(engine.plan(&shape, &short, &entmax).unwrap().fused, Some(tile));
    // Through the engine the forced tile is no candidate for the long rows; the pure planner
    // names the cache.
    assert!(matches!(engine.plan(&shape, &long, &entmax), Err(sparse_attn::Error::Unsupported(_))));
    let plan_opts = sparse_attn::gpu::plan::PlanOptions {
        normalizer: Normalizer::ENTMAX15,
        scale: shape.default_scale(),
        dtype: DType::F32,
        tolerance: 1e-6,
        max_iterations: 50,
        fused: Some(tile),
        row_classes: Vec::new(),
        key_splits: None,
    };
    match sparse_attn::gpu::plan::plan(&shape, &long, &plan_opts, &engine.plan_limits()) {
        Err(sparse_attn::Error::Unsupported(msg)) => assert!(msg.contains("longest row"), "{msg}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let softmax = sparse_attn::gpu::plan::PlanOptions { normalizer: Normalizer::Softmax, ..plan_opts.clone() };
    assert!(matches!(sparse_attn::gpu::plan::plan(&shape, &short, &softmax, &engine.plan_limits()), Err(sparse_attn::Error::Unsupported(_))));
    // By default the long rows take the pooling kernel and the short ones the score cache.
    let auto = AttentionOptions { path: ExecPath::Fused, ..AttentionOptions::new(Normalizer::ENTMAX15) };
    let long_tile = engine.plan(&shape, &long, &auto).unwrap().fused.unwrap();
    assert!(long_tile.cap > 0 && long_tile.rc == 0, "{long_tile:?}");
    assert!(engine.plan(&shape, &short, &auto).unwrap().fused.unwrap().rc > 0);
}

#[test]
fn entmax_rows_of_different_lengths_run_in_row_classes_on_their_own_tiles() {
    let Some(engine) = engine() else { return };
    // Per-slice rows (batch 2 × 2 heads over 1 kv head) of 0, 2, 5, 9 and 36 stored blocks of
    // 32 keys, rotated per slice, the last query block ragged: the score-cache buckets 128,
    // 256 and 512 keys and rows longer than any cache. Flat scores give large supports.
    use sparse_attn::pattern::{BlockMask, PatternAccumulator, PatternGeometry};
    let (seq_q, seq_kv, d) = (150, 36 * 32 - 10, 32);
    let shape = AttentionShape::new(2, 2, seq_q, d).with_kv_heads(1).with_seq_kv(seq_kv);
    let g = PatternGeometry { block_q: 32, block_k: 32, seq_q: seq_q as u32, seq_kv: seq_kv as u32, slices: 4 };
    let lengths = [0u32, 2, 5, 9, 36];
    let mut acc = PatternAccumulator::new(g).unwrap();
    for slice in 0..4 {
        for qb in 0..5 {
            let blocks = lengths[(qb + slice) % 5];
            acc.push_row((0..blocks).map(|b| ((b * 7 + qb as u32) % 36, BlockMask::Full)).collect::<std::collections::BTreeMap<_, _>>());
        }
    }
    let pattern = acc.finish().unwrap();
    assert_eq!(tiles::row_class_bounds(&pattern), [2, 5, 9, 36]);
    let (q, k, v) = random_qkv((2, 2, seq_q, d), (2, 1, seq_kv, d), 61, 0.6);
    let auto = AttentionOptions { path: ExecPath::Fused, ..AttentionOptions::new(Normalizer::ENTMAX15) };
    let plan = engine.plan(&shape, &pattern, &auto).unwrap();
    let classes = &plan.row_classes;
    assert!(classes.len() >= 2, "rows of 2 to 36 blocks should split into classes: {classes:?}");
    assert!(classes[0].tile.rc > 0 && classes[0].max_blocks >= 2, "short rows take a score cache: {classes:?}");
    assert!(classes.last().is_some_and(|c| c.tile.cap > 0 && c.max_blocks == 36), "rows past every cache take the pools: {classes:?}");
    for normalizer in [Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.3 }] {
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
        for dtype in storage_dtypes(engine) {
            let opts = AttentionOptions { dtype, ..AttentionOptions::new(normalizer) };
            let fused = AttentionOptions { path: ExecPath::Fused, ..opts };
            assert_eq!(engine.plan(&shape, &pattern, &fused).unwrap().row_classes.len(), classes.len());
            let got = engine.attention_with(&q, &k, &v, &pattern, &fused).unwrap();
            assert_close(&format!("row classes {} {dtype:?}", normalizer.label()), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(dtype));
            // Both kernels ran, and every tile ran once, in its own class.
            let paths = got.entmax_paths.unwrap();
            assert!(paths.cache_gathered + paths.cache_staged > 0 && paths.pool_gathered + paths.pool_recomputed > 0, "{paths:?}");
            assert_eq!(paths.tiles(), common::entmax_tiles(&engine.plan(&shape, &pattern, &fused).unwrap(), &pattern), "{paths:?}");
        }
    }
}

#[test]
fn score_cache_gathers_small_supports_and_stages_large_ones() {
    let Some(engine) = engine() else { return };
    // Per score-caching tile, rows of 4 blocks (the last ragged): sharp scores (supports of a
    // few keys: p·V gathered from their V rows where every (row, lane)'s support fits its
    // list), equal scores (every key has p > 0, more than the support lists hold: V staged
    // chunk by chunk), and both kinds of row in every workgroup (the whole workgroup stages).
    // seq_q is ragged too: rows past it list no keys. f16 storage too, where the adapter has
    // it (V rows gathered through the f16 loads). The kernel's path counts must match what the
    // reference's supports predict, tile by tile.
    let (seq_q, seq_kv, d) = (90, 120, 64);
    let shape = AttentionShape::new(1, 2, seq_q, d).with_seq_kv(seq_kv);
    let pattern = Dense::new().with_blocks(32, 32).build(&shape).unwrap();
    let base = random4((1, 2, seq_q, d), 71, 1.0);
    let k = random4((1, 2, seq_kv, d), 72, 1.0);
    let v = random4((1, 2, seq_kv, d), 73, 1.0);
    let sharp = &base * 40.0;
    let flat = &base * 0.0;
    let mut mixed = sharp.clone();
    for i in (1..seq_q).step_by(2) {
        mixed.slice_mut(ndarray::s![.., .., i, ..]).fill(0.0);
    }
    let tiles: Vec<_> = engine.fused_tile_candidates_for(&pattern, d, Normalizer::ENTMAX15).into_iter().filter(|t| t.rc > 0).collect();
    assert!(!tiles.is_empty(), "no score-caching tile for rows of 4 blocks");
    for tile in tiles {
        for (name, q) in [("sharp", &sharp), ("flat", &flat), ("mixed", &mixed)] {
            for normalizer in [Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.3 }] {
                let want = reference::attention(q, &k, &v, &pattern, normalizer).unwrap();
                for dtype in storage_dtypes(engine) {
                    let opts = AttentionOptions { path: ExecPath::Fused, fused_tile: Some(tile), dtype, ..AttentionOptions::new(normalizer) };
                    let got = engine.attention_with(q, &k, &v, &pattern, &opts).unwrap();
                    // Tiles whose (row, lane) supports all fit: lane u lists cache positions (= keys
                    // here) u, u + lanes, …; rows past seq_q list none.
                    let stored = |a: &ndarray::Array4<f32>| if dtype == DType::F16 { a.mapv(|x| half::f16::from_f32(x).to_f32()) } else { a.clone() };
                    let (qs, ks) = (stored(q), stored(&k));
                    let (lanes, slots) = (tile.threads_per_row() as usize, tile.support_slots() as usize);
                    let mask = pattern.to_dense_mask(0);
                    let mut gathering = 0u32;
                    for h in 0..2 {
                        let p = reference::probabilities(&qs.slice(ndarray::s![0, h, .., ..]), &ks.slice(ndarray::s![0, h, .., ..]), &mask, shape.default_scale() as f64, normalizer);
                        let fits = |i: usize| i >= seq_q || (0..lanes).all(|u| p.row(i).iter().skip(u).step_by(lanes).filter(|&&x| x > 0.0).count() <= slots);
                        gathering += (0..seq_q.div_ceil(32) * 32).step_by(tile.tq as usize).filter(|&r0| (r0..r0 + tile.tq as usize).all(fits)).count() as u32;
                    }
                    assert_close(&format!("{name} rows, {} {dtype:?} tile {tile:?}", normalizer.label()), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(dtype));
                    let paths = got.entmax_paths.unwrap();
                    let tiles = (2 * seq_q.div_ceil(32) * (32 / tile.tq as usize)) as u32;
                    let what = format!("{name} rows, {} {dtype:?} tile {tile:?} ({slots} slots per lane)", normalizer.label());
                    assert_eq!((paths.cache_gathered, paths.cache_staged), (gathering, tiles - gathering), "{what}: gathered, staged tiles: {paths:?}");
                    // The data reaches both ends: sharp tiles gather, a tile with a flat row stages.
                    assert_eq!(gathering > 0, name == "sharp", "{what}: {gathering} of {tiles} tiles gather");
                }
            }
        }
    }
}
