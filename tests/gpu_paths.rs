//! GPU paths beyond the suite matrix: forced chunking, optional outputs, the buffer-level API,
//! determinism, extreme inputs, and typed errors.

mod common;

use common::{assert_close, engine, own_engine, random4, random_qkv, tolerance};
use sparse_attn::gpu::plan::PlanLimits;
use sparse_attn::patterns::{Dense, RandomBlocks, Window};
use sparse_attn::gpu::plan::Plan;
use sparse_attn::{reference, AttentionBuffers, AttentionOptions, AttentionShape, BlockPattern, DType, Engine, Error, ExecPath, Normalizer};
use wgpu::util::DeviceExt;

#[test]
fn pass_timer_flags_passes_it_could_not_time() {
    let Some(engine) = engine() else { return };
    // Adapters without TIMESTAMP_QUERY have no timer (runs are wall-clock timed).
    let Some(mut timer) = sparse_attn::gpu::timing::PassTimer::new(engine.device(), engine.queue(), 1) else {
        eprintln!("skipped: no TIMESTAMP_QUERY on this adapter");
        return;
    };
    assert!(timer.pass_writes("first").is_some());
    assert!(!timer.incomplete());
    // Room for one pass only: the second runs untimed, and the timer says so rather than
    // letting the first pass's time stand for both.
    assert!(timer.pass_writes("second").is_none());
    assert!(timer.incomplete());
}

#[test]
fn forced_chunking_splits_bindings_and_dispatches() {
    let Some(mut small) = own_engine() else { return };
    // 32 KiB bindings and 7 workgroups per dimension force many chunks and 2-D grids.
    small.set_plan_limits(PlanLimits { max_binding_bytes: 32 * 1024, max_workgroups_per_dim: 7, binding_alignment: 256, max_buffer_bytes: u64::MAX });
    let shape = AttentionShape::new(2, 3, 150, 32).with_kv_heads(1);
    let (q, k, v) = random_qkv((2, 3, 150, 32), (2, 1, 150, 32), 1, 2.0);
    for (pattern, normalizer) in [
        (Dense::new().with_blocks(16, 16).build(&shape).unwrap(), Normalizer::Softmax),
        (RandomBlocks::new(0.6, 5).with_partial(0.3).per_slice(true).with_blocks(16, 32).build(&shape).unwrap(), Normalizer::ENTMAX15),
    ] {
        let plan = small.plan(&shape, &pattern, &AttentionOptions::new(normalizer)).expect("plan");
        assert!(plan.chunks.len() > 4, "expected the limits to force chunking, got {} chunks", plan.chunks.len());
        assert!(plan.chunks.iter().any(|c| c.sddmm.y > 1 || c.normalize.y > 1), "expected a 2-D grid somewhere");
        let got = small.attention(&q, &k, &v, &pattern, normalizer).expect("gpu");
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
        assert_close("chunked", got.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
    }
}

#[test]
fn tensors_past_one_buffer_run_in_batch_kv_head_or_query_head_groups() {
    let Some(mut small) = own_engine() else { return };
    // One batch entry's Q is 2 x 40 x 16 f32 = 5 KiB: 12 KiB buffers hold two of the three.
    let buffers_of = |max_buffer_bytes| PlanLimits { max_binding_bytes: 4096, max_workgroups_per_dim: 65535, binding_alignment: 256, max_buffer_bytes };
    small.set_plan_limits(buffers_of(12 * 1024));
    let shape = AttentionShape::new(3, 2, 40, 16).with_kv_heads(1);
    let (q, k, v) = random_qkv((3, 2, 40, 16), (3, 1, 40, 16), 71, 2.0);
    let per_slice = RandomBlocks::new(0.6, 3).with_partial(0.3).per_slice(true).with_blocks(16, 16).build(&shape).unwrap();
    let shared = Window::new(12).with_blocks(16, 16).build(&shape).unwrap();
    for (pattern, normalizer, path) in [
        (&per_slice, Normalizer::Softmax, ExecPath::Auto),
        (&per_slice, Normalizer::ENTMAX15, ExecPath::Auto),
        (&shared, Normalizer::ENTMAX15, ExecPath::ThreeKernel),
    ] {
        let whole = small.plan(&shape, pattern, &AttentionOptions { path, ..AttentionOptions::new(normalizer) });
        assert!(matches!(whole, Err(Error::Limit { .. })), "one plan for all three batch entries must not fit");
        let opts = AttentionOptions { path, ..AttentionOptions::new(normalizer) };
        let got = small.attention_with(&q, &k, &v, pattern, &opts).expect("grouped call");
        let want = reference::attention(&q, &k, &v, pattern, normalizer).unwrap();
        assert_close("batch groups", got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
    }
    // One batch entry past a buffer (4 heads x 40 x 16 f32 = 10 KiB in 6 KiB buffers): its kv
    // heads run in groups, each with its 2 query heads (GQA), a per-slice pattern cut to them.
    small.set_plan_limits(buffers_of(6 * 1024));
    let gqa = AttentionShape::new(2, 4, 40, 16).with_kv_heads(2);
    let (qg, kg, vg) = random_qkv((2, 4, 40, 16), (2, 2, 40, 16), 81, 2.0);
    let pg = RandomBlocks::new(0.6, 4).with_partial(0.3).per_slice(true).with_blocks(16, 16).build(&gqa).unwrap();
    for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15] {
        assert!(matches!(small.plan(&gqa, &pg, &AttentionOptions::new(normalizer)), Err(Error::Limit { .. })));
        let got = small.attention(&qg, &kg, &vg, &pg, normalizer).expect("grouped heads");
        let want = reference::attention(&qg, &kg, &vg, &pg, normalizer).unwrap();
        assert_close("head groups", got.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
    }
    // Probabilities past a buffer, the tensors not (Q is 20 KiB, the probabilities 8 slices x
    // 9 tiles x 1 KiB): groups of batch entries (36 KiB each) in 40 KiB buffers, of kv heads
    // (18 KiB) in 20 KiB ones, of query heads (9 KiB) in 16 KiB ones; the groups'
    // probabilities and row stats join into the whole call's, the same as one call on an
    // engine whose buffers hold everything.
    let p_dense = Dense::new().with_blocks(16, 16).build(&gqa).unwrap();
    let Some(big) = engine() else { return };
    for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15] {
        let outputs = AttentionOptions { return_probabilities: true, return_row_stats: true, ..AttentionOptions::new(normalizer) };
        let want = big.attention_with(&qg, &kg, &vg, &p_dense, &outputs).expect("one call");
        for kib in [40, 20, 16] {
            small.set_plan_limits(buffers_of(kib * 1024));
            if kib >= 20 {
                small.plan(&gqa, &p_dense, &outputs).expect("the tensors fit one buffer each");
            }
            let got = small.attention_with(&qg, &kg, &vg, &p_dense, &outputs).expect("grouped by probabilities");
            assert_same_outputs(&format!("{} probabilities in {kib} KiB buffers", normalizer.label()), &got, &want);
        }
        // Not even one query head's probabilities fit: a Limit naming them.
        small.set_plan_limits(buffers_of(8 * 1024));
        match small.attention_with(&qg, &kg, &vg, &p_dense, &outputs) {
            Err(Error::Limit { limit, required, .. }) => assert!(limit.contains("probabilities of one query head") && required == 9 * 1024, "{limit}: {required}"),
            other => panic!("expected Limit, got {:?}", other.map(|o| o.o.len())),
        }
    }
    small.set_plan_limits(buffers_of(6 * 1024));
    // A NaN is reported at its index in the caller's tensor, not in a group's slice.
    let mut q_nan = qg.clone();
    q_nan[[1, 3, 7, 2]] = f32::NAN;
    match small.attention(&q_nan, &kg, &vg, &pg, Normalizer::Softmax) {
        Err(Error::NonFinite { tensor: "q", index, .. }) => assert_eq!(index, ((4 + 3) * 40 + 7) * 16 + 2),
        other => panic!("expected NonFinite, got {:?}", other.map(|o| o.len())),
    }
    // One kv head with its 2 query heads (Q 5 KiB) past 4 KiB buffers: its query heads run one
    // by one (2.5 KiB each), each with the kv head.
    small.set_plan_limits(buffers_of(4096));
    for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15] {
        let got = small.attention(&q, &k, &v, &per_slice, normalizer).expect("query-head groups");
        let want = reference::attention(&q, &k, &v, &per_slice, normalizer).unwrap();
        assert_close("query-head groups", got.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
    }
    // Not even one query head with its kv head fits (Q, O, K and V are 2.5 KiB each): the
    // typed Limit error naming the first, not a partial run.
    small.set_plan_limits(buffers_of(2048));
    match small.attention(&q, &k, &v, &per_slice, Normalizer::Softmax) {
        Err(Error::Limit { limit, required, .. }) => assert!(limit.contains("Q and O of one query head") && required == 2560, "{limit}: {required}"),
        other => panic!("expected Limit, got {:?}", other.map(|o| o.len())),
    }
}

/// A grouped call's outputs against one call's: O within f32 tolerance, probabilities too,
/// row stats (support sizes, iteration counts) equal.
fn assert_same_outputs(what: &str, got: &sparse_attn::AttentionOutput, want: &sparse_attn::AttentionOutput) {
    assert_close(&format!("{what}: O"), got.o.as_slice().unwrap(), want.o.as_slice().unwrap(), tolerance(DType::F32));
    let (gp, wp) = (got.probabilities.as_ref().expect("probabilities"), want.probabilities.as_ref().expect("probabilities"));
    assert_eq!(gp.tiles.len(), wp.tiles.len(), "{what}: probability tiles");
    assert_close(&format!("{what}: probabilities"), &gp.tiles, &wp.tiles, tolerance(DType::F32));
    let (gs, ws) = (got.row_stats.as_ref().expect("row stats"), want.row_stats.as_ref().expect("row stats"));
    assert_eq!(gs.support, ws.support, "{what}: support sizes");
    assert_eq!(gs.iterations, ws.iterations, "{what}: iterations");
}

#[test]
fn per_slice_patterns_past_one_binding_run_in_slice_groups() {
    // A per-slice pattern is bound whole: 8 slices of 4 x 4 blocks of 16 x 16, every kept block
    // with a bitmask (8 words each), pack to ~4.7 KiB, past 4 KiB bindings; one slice's ~0.6
    // KiB fits (and one row's three-kernel scores, 4 KiB at most), so the call runs in groups
    // of slices, each with its cut of the pattern.
    let Some(mut small) = own_engine() else { return };
    let limits = small.plan_limits();
    small.set_plan_limits(PlanLimits { max_binding_bytes: 4096, ..limits });
    let shape = AttentionShape::new(2, 4, 64, 4);
    let (q, k, v) = random_qkv((2, 4, 64, 4), (2, 4, 64, 4), 95, 2.0);
    let pattern = RandomBlocks::new(0.8, 6).with_partial(1.0).per_slice(true).with_blocks(16, 16).build(&shape).unwrap();
    for (normalizer, path) in [(Normalizer::Softmax, ExecPath::Fused), (Normalizer::ENTMAX15, ExecPath::Fused), (Normalizer::ENTMAX15, ExecPath::ThreeKernel)] {
        let opts = AttentionOptions { path, ..AttentionOptions::new(normalizer) };
        match small.plan(&shape, &pattern, &opts) {
            Err(Error::Limit { limit, .. }) => assert!(limit.contains("packed pattern"), "{limit}"),
            other => panic!("one plan must not fit: {:?}", other.map(|p| p.path)),
        }
        let got = small.attention_with(&q, &k, &v, &pattern, &opts).unwrap_or_else(|e| panic!("{normalizer:?} {path:?}: {e}"));
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
        assert_close(&format!("{} {path:?} slice groups", normalizer.label()), got.o.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
    }
}

#[test]
fn probabilities_and_row_stats_match_reference() {
    let Some(engine) = engine() else { return };
    let shape = AttentionShape::new(1, 2, 90, 32);
    let (q, k, v) = random_qkv((1, 2, 90, 32), (1, 2, 90, 32), 4, 3.0);
    let pattern = RandomBlocks::new(0.7, 9).with_partial(0.4).with_blocks(16, 32).build(&shape).unwrap();
    for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.7 }] {
        let opts = AttentionOptions { return_probabilities: true, return_row_stats: true, ..AttentionOptions::new(normalizer) };
        let out = engine.attention_with(&q, &k, &v, &pattern, &opts).expect("gpu");
        let probs = out.probabilities.expect("probabilities requested");
        let stats = out.row_stats.expect("row stats requested");
        for slice in 0..2 {
            let mask = pattern.to_dense_mask(0);
            let qs = q.slice(ndarray::s![0, slice, .., ..]);
            let ks = k.slice(ndarray::s![0, slice, .., ..]);
            let want = reference::probabilities(&qs, &ks, &mask, shape.default_scale() as f64, normalizer);
            let got = probs.to_dense(&pattern, slice).expect("dense probabilities");
            let want32: Vec<f32> = want.iter().map(|&x| x as f32).collect();
            assert_close(&format!("P {} slice {slice}", normalizer.label()), got.as_slice().unwrap(), &want32, (1e-4, 1e-6));
            for i in 0..90 {
                let support = want.row(i).iter().filter(|&&p| p > 1e-9).count() as i64;
                let ties = want.row(i).iter().filter(|&&p| p > 0.0 && p <= 1e-9).count() as i64;
                let g = stats.support[[slice, i]] as i64;
                assert!(g >= support && g <= support + ties, "row {i}: GPU support {g}, reference {support} (+{ties} tiny)");
                let it = stats.iterations[[slice, i]];
                match normalizer {
                    Normalizer::Softmax => assert_eq!(it, 0),
                    _ if mask.row(i).iter().any(|&m| m) => assert!((1..=opts.max_iterations).contains(&it), "row {i}: {it} iterations"),
                    _ => assert_eq!(it, 0, "empty row {i} should not iterate"),
                }
            }
        }
    }
}

#[test]
fn prepared_fused_calls_refuse_outputs_they_do_not_compute() {
    // The fused kernels write no probabilities or row stats: asking a prepared fused call for
    // them is a typed error, not the workspace's zeros; a three-kernel one returns them.
    let Some(engine) = engine() else { return };
    let shape = AttentionShape::new(1, 2, 64, 32);
    let (q, k, v) = random_qkv((1, 2, 64, 32), (1, 2, 64, 32), 7, 3.0);
    let pattern = Dense::new().with_blocks(32, 32).build(&shape).unwrap();
    let fused = AttentionOptions { path: ExecPath::Fused, ..AttentionOptions::new(Normalizer::ENTMAX15) };
    let prepared = engine.prepare_attention(&q, &k, &v, &pattern, &fused).expect("prepare fused");
    for (probabilities, row_stats) in [(false, true), (true, false)] {
        match prepared.run_and_read(probabilities, row_stats) {
            Err(Error::Unsupported(msg)) => assert!(msg.contains("fused"), "{msg}"),
            other => panic!("fused run_and_read({probabilities}, {row_stats}): expected Unsupported, got {:?}", other.map(|o| o.row_stats.is_some())),
        }
    }
    assert!(prepared.run_and_read(false, false).is_ok());
    let three = AttentionOptions { path: ExecPath::ThreeKernel, ..fused };
    let prepared = engine.prepare_attention(&q, &k, &v, &pattern, &three).expect("prepare three-kernel");
    let stats = prepared.run_and_read(false, true).expect("three-kernel row stats").row_stats.expect("row stats");
    assert!(stats.support.iter().all(|&n| (1..=64).contains(&n)), "every dense row has a support: {:?}", stats.support);
    assert!(stats.iterations.iter().all(|&n| n >= 1), "every entmax row searched");
}

#[test]
fn a_forced_tile_that_does_not_fit_is_an_error_on_auto_too() {
    // A forced tile asks for the fused path; on Auto it must not fall back silently to the
    // three-kernel path, and the error lists the tiles that would fit.
    let Some(engine) = engine() else { return };
    let shape = AttentionShape::new(1, 2, 64, 32);
    let pattern = Dense::new().with_blocks(32, 32).build(&shape).unwrap();
    let entmax = AttentionOptions { path: ExecPath::Fused, ..AttentionOptions::new(Normalizer::ENTMAX15) };
    let entmax_tile = engine.plan(&shape, &pattern, &entmax).expect("entmax plan").fused.expect("fused tile");
    // The entmax pool tile is no softmax tile (its pool makes it an entmax tile).
    for path in [ExecPath::Auto, ExecPath::Fused] {
        let softmax = AttentionOptions { path, fused_tile: Some(entmax_tile), ..AttentionOptions::new(Normalizer::Softmax) };
        match engine.plan(&shape, &pattern, &softmax) {
            Err(Error::Unsupported(msg)) => assert!(msg.contains("softmax tiles") && msg.contains("FusedTile {"), "{path:?}: {msg}"),
            other => panic!("{path:?}: expected Unsupported, got {:?}", other.map(|p| p.path)),
        }
    }
    // The tile itself runs where it fits, on Auto as on Fused.
    let auto = AttentionOptions { path: ExecPath::Auto, fused_tile: Some(entmax_tile), ..entmax };
    let plan = engine.plan(&shape, &pattern, &auto).expect("forced tile on Auto");
    assert_eq!((plan.path, plan.fused), (ExecPath::Fused, Some(entmax_tile)));
}

/// A buffer holding `data`.
fn upload(engine: &Engine, data: &[f32], usage: wgpu::BufferUsages) -> wgpu::Buffer {
    engine.device().create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some("test input"), contents: bytemuck::cast_slice(data), usage })
}

/// Records `plan` through the buffer-level API into the test's own encoder, submits it and reads
/// O (all of `buffers.o`, which needs COPY_SRC) back.
fn encode_and_read_o(engine: &Engine, plan: &Plan, pattern: &BlockPattern, buffers: AttentionBuffers<'_>) -> Vec<f32> {
    let dev = engine.device();
    let bytes = buffers.o.size();
    let read = dev.create_buffer(&wgpu::BufferDescriptor { label: Some("test read"), size: bytes, usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ, mapped_at_creation: false });
    let (gp, ws) = (engine.upload_pattern(pattern), engine.create_workspace(plan));
    let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("test encode") });
    engine.encode(&mut enc, plan, buffers, &gp, &ws, None, None).expect("encode");
    enc.copy_buffer_to_buffer(buffers.o, 0, &read, 0, bytes);
    engine.queue().submit([enc.finish()]);
    engine.read_buffer(&read).expect("read O back")
}

#[test]
fn buffer_level_call_records_into_callers_encoder() {
    let Some(engine) = engine() else { return };
    let shape = AttentionShape::new(1, 2, 64, 32);
    let (q, k, v) = random_qkv((1, 2, 64, 32), (1, 2, 64, 32), 7, 2.0);
    let pattern = Window::new(20).with_blocks(16, 16).build(&shape).unwrap();
    let opts = AttentionOptions::new(Normalizer::ENTMAX15);
    let plan = engine.plan(&shape, &pattern, &opts).expect("plan");
    let dev = engine.device();
    let input = |a: &ndarray::Array4<f32>| upload(engine, a.as_slice().unwrap(), wgpu::BufferUsages::STORAGE);
    let (qb, kb, vb) = (input(&q), input(&k), input(&v));
    let ob = upload(engine, &[0.0; 2 * 64 * 32], wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC);
    let got = encode_and_read_o(engine, &plan, &pattern, AttentionBuffers { q: &qb, k: &kb, v: &vb, o: &ob });
    let want = reference::attention(&q, &k, &v, &pattern, Normalizer::ENTMAX15).unwrap();
    assert_close("buffer-level", &got, want.as_slice().unwrap(), tolerance(DType::F32));

    // Another pattern of exactly the same size (one full block per row: the diagonal, then the
    // anti-diagonal) is refused by an encode planned for the first: it would walk other keys.
    let g = sparse_attn::pattern::PatternGeometry { block_q: 16, block_k: 16, seq_q: 64, seq_kv: 64, slices: 1 };
    let one_block_per_row = |col: fn(u32) -> u32| {
        sparse_attn::BlockPattern::new_checked(g, (0..=4).collect(), (0..4).map(col).collect(), vec![sparse_attn::pattern::FULL; 4], vec![]).unwrap()
    };
    let (diagonal, anti) = (one_block_per_row(|r| r), one_block_per_row(|r| 3 - r));
    let three = AttentionOptions { path: ExecPath::ThreeKernel, ..AttentionOptions::new(Normalizer::Softmax) };
    let plan = engine.plan(&shape, &diagonal, &three).expect("plan");
    let ws = engine.create_workspace(&plan);
    let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("test encode") });
    let buffers = AttentionBuffers { q: &qb, k: &kb, v: &vb, o: &ob };
    match engine.encode(&mut enc, &plan, buffers, &engine.upload_pattern(&anti), &ws, None, None) {
        Err(Error::Shape(msg)) => assert!(msg.contains("not the one the plan"), "{msg}"),
        other => panic!("a same-sized other pattern: expected a Shape error, got {other:?}"),
    }
    // A probabilities buffer one tile short, or without COPY_DST, is refused before recording.
    let gp = engine.upload_pattern(&diagonal);
    let need = 2 * 4 * 16 * 16 * 4; // 2 slices x 4 stored blocks x 16 x 16 f32
    for (size, usage) in [(need - 16 * 16 * 4, wgpu::BufferUsages::COPY_DST), (need, wgpu::BufferUsages::MAP_READ)] {
        let probs = dev.create_buffer(&wgpu::BufferDescriptor { label: Some("test probabilities"), size, usage, mapped_at_creation: false });
        match engine.encode(&mut enc, &plan, buffers, &gp, &ws, Some(&probs), None) {
            Err(Error::Shape(msg)) => assert!(msg.contains("probabilities buffer"), "{msg}"),
            other => panic!("probabilities of {size} bytes, {usage:?}: expected a Shape error, got {other:?}"),
        }
    }
    let probs = dev.create_buffer(&wgpu::BufferDescriptor { label: Some("test probabilities"), size: need, usage: wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
    engine.encode(&mut enc, &plan, buffers, &gp, &ws, Some(&probs), None).expect("the right pattern and buffers encode");
}

#[test]
fn repeated_calls_are_bitwise_deterministic_and_reuse_pipelines() {
    // Its own engine: the shared one compiles pipelines for tests running beside this one.
    let Some(engine) = own_engine() else { return };
    let shape = AttentionShape::new(1, 2, 80, 32);
    let (q, k, v) = random_qkv((1, 2, 80, 32), (1, 2, 80, 32), 11, 2.0);
    let pattern = Dense::new().with_blocks(32, 16).build(&shape).unwrap();
    let a = engine.attention(&q, &k, &v, &pattern, Normalizer::ENTMAX15).unwrap();
    let compiled = engine.compiled_pipelines();
    let b = engine.attention(&q, &k, &v, &pattern, Normalizer::ENTMAX15).unwrap();
    assert_eq!(engine.compiled_pipelines(), compiled, "second identical call compiled a pipeline");
    let bits = |x: &ndarray::Array4<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b), "two identical calls differ");
}

#[test]
fn extreme_scores_stay_finite_and_correct() {
    let Some(engine) = engine() else { return };
    let shape = AttentionShape::new(1, 2, 48, 16);
    // |scores| up to ~1e4: a naive exp or a τ bracket without the max shift would overflow.
    let (q, k, v) = random_qkv((1, 2, 48, 16), (1, 2, 48, 16), 14, 100.0);
    let pattern = RandomBlocks::new(0.8, 3).with_partial(0.5).with_blocks(16, 16).build(&shape).unwrap();
    for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.1 }] {
        let got = engine.attention(&q, &k, &v, &pattern, normalizer).unwrap();
        assert!(got.iter().all(|x| x.is_finite()), "{}: non-finite output", normalizer.label());
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
        assert_close(&format!("extreme {}", normalizer.label()), got.as_slice().unwrap(), want.as_slice().unwrap(), (1e-3, 1e-4));
    }
    if engine.capabilities().f16 {
        // f16-range inputs (|x| near 6e4) in f16 storage.
        let qh = random4((1, 2, 48, 16), 17, 60000.0).mapv(|x| half::f16::from_f32(x).to_f32());
        let opts = AttentionOptions { dtype: DType::F16, ..AttentionOptions::new(Normalizer::ENTMAX15) };
        let got = engine.attention_with(&qh, &k, &v, &pattern, &opts).unwrap().o;
        assert!(got.iter().all(|x| x.is_finite()), "f16-range inputs gave non-finite output");
        let kh = k.mapv(|x| half::f16::from_f32(x).to_f32());
        let vh = v.mapv(|x| half::f16::from_f32(x).to_f32());
        let want = reference::attention(&qh, &kh, &vh, &pattern, Normalizer::ENTMAX15).unwrap();
        assert_close("f16-range", got.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F16));
    }
}

#[test]
fn bad_inputs_are_typed_errors_before_gpu_work() {
    let Some(engine) = engine() else { return };
    let shape = AttentionShape::new(1, 2, 32, 16);
    let (q, k, v) = random_qkv((1, 2, 32, 16), (1, 2, 32, 16), 1, 1.0);
    let pattern = Dense::new().with_blocks(16, 16).build(&shape).unwrap();
    let msg = |r: Result<ndarray::Array4<f32>, Error>| r.expect_err("expected an error").to_string();

    let k_bad = random4((1, 2, 32, 8), 2, 1.0);
    assert!(msg(engine.attention(&q, &k_bad, &k_bad, &pattern, Normalizer::Softmax)).contains("head_dim"));
    let v_bad = random4((1, 2, 31, 16), 2, 1.0);
    assert!(msg(engine.attention(&q, &k, &v_bad, &pattern, Normalizer::Softmax)).contains("V is"));
    let zero = ndarray::Array4::<f32>::zeros((1, 2, 0, 16));
    assert!(matches!(engine.attention(&zero, &k, &v, &pattern, Normalizer::Softmax), Err(Error::ZeroSize("seq_q"))));
    let mut q_nan = q.clone();
    q_nan[[0, 1, 3, 4]] = f32::NAN;
    match engine.attention(&q_nan, &k, &v, &pattern, Normalizer::Softmax) {
        Err(Error::NonFinite { tensor: "q", index, .. }) => assert_eq!(index, 32 * 16 + 3 * 16 + 4),
        other => panic!("expected NonFinite, got {other:?}"),
    }
    let k3 = random4((1, 3, 32, 16), 2, 1.0);
    assert!(msg(engine.attention(&q, &k3, &k3, &pattern, Normalizer::Softmax)).contains("multiple of kv_heads"));
    let other = Dense::new().with_blocks(16, 16).build(&AttentionShape::new(1, 2, 48, 16)).unwrap();
    assert!(matches!(engine.attention(&q, &k, &v, &other, Normalizer::Softmax), Err(Error::Pattern(_))));
    assert!(msg(engine.attention(&q, &k, &v, &pattern, Normalizer::Entmax { alpha: 1.0 })).contains("Softmax"));
    assert!(msg(engine.attention(&q, &k, &v, &pattern, Normalizer::Entmax { alpha: 2.5 })).contains("(1, 2]"));
    assert!(matches!(engine.attention(&q, &k, &v, &pattern, Normalizer::Entmax { alpha: f32::NAN }), Err(Error::Normalizer(_))));
    let wide = AttentionShape::new(1, 1, 16, 300);
    let qw = random4((1, 1, 16, 300), 1, 1.0);
    let pw = Dense::new().with_blocks(16, 16).build(&wide).unwrap();
    assert!(msg(engine.attention(&qw, &qw, &qw, &pw, Normalizer::Softmax)).contains("256"));
    // Finite inputs whose scores could overflow f32. The kernels scale after the f32 dot
    // product, so a tiny scale does not save a dot product that overflows (q 1e38 · k ~1) ...
    let mut q_huge = q.clone();
    q_huge[[0, 0, 5, 1]] = 1e38;
    let tiny = AttentionOptions { scale: Some(1e-30), ..AttentionOptions::new(Normalizer::Softmax) };
    assert!(msg(engine.attention_with(&q_huge, &k, &v, &pattern, &tiny).map(|o| o.o)).contains("scores could reach"));
    // ... while a large scale can overflow a finite dot product (q 1e18 · k 1e10 · 16 · 1e10).
    let mut q_big = q.clone();
    q_big[[0, 0, 5, 1]] = 1e18;
    let k_big = k.mapv(|x| x * 1e10);
    let large = AttentionOptions { scale: Some(1e10), ..AttentionOptions::new(Normalizer::Softmax) };
    assert!(msg(engine.attention_with(&q_big, &k_big, &v, &pattern, &large).map(|o| o.o)).contains("scores could reach"));
    let out = engine.attention(&q_big, &k_big, &v, &pattern, Normalizer::Softmax).expect("the default scale keeps these scores finite");
    assert!(out.iter().all(|x| x.is_finite()), "finite scores give a finite output");
    for scale in [f32::NAN, f32::INFINITY] {
        let opts = AttentionOptions { scale: Some(scale), ..AttentionOptions::new(Normalizer::Softmax) };
        assert!(matches!(engine.attention_with(&q, &k, &v, &pattern, &opts), Err(Error::NonFinite { tensor: "scale", .. })), "scale {scale}");
        assert!(matches!(reference::attention_scaled(&q, &k, &v, &pattern, Normalizer::Softmax, Some(scale)), Err(Error::NonFinite { tensor: "scale", .. })), "reference, scale {scale}");
    }
    // Reference rejects the same inputs.
    assert!(reference::attention(&q_nan, &k, &v, &pattern, Normalizer::Softmax).is_err());
}

#[test]
fn forced_fallbacks_match_reference_and_refuse_f16() {
    let Some(mut fallback) = own_engine() else { return };
    fallback.force_fallbacks(true, true);
    assert!(!fallback.capabilities().f16 && !fallback.capabilities().subgroups);
    let shape = AttentionShape::new(2, 2, 75, 32).with_kv_heads(1);
    let (q, k, v) = random_qkv((2, 2, 75, 32), (2, 1, 75, 32), 21, 3.0);
    let pattern = RandomBlocks::new(0.6, 11).with_partial(0.5).with_blocks(16, 32).build(&shape).unwrap();
    for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.6 }] {
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).unwrap();
        for path in [sparse_attn::ExecPath::ThreeKernel, sparse_attn::ExecPath::Fused] {
            let opts = AttentionOptions { path, ..AttentionOptions::new(normalizer) };
            let got = fallback.attention_with(&q, &k, &v, &pattern, &opts).unwrap().o;
            assert_close(&format!("fallback {} {path:?}", normalizer.label()), got.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
        }
    }
    let f16 = AttentionOptions { dtype: DType::F16, ..AttentionOptions::new(Normalizer::Softmax) };
    assert!(matches!(fallback.attention_with(&q, &k, &v, &pattern, &f16), Err(Error::Unsupported(_))));
}

#[test]
fn rows_with_one_allowed_key_output_that_keys_value() {
    let Some(engine) = engine() else { return };
    use sparse_attn::pattern::{BlockMask, PatternAccumulator, PatternGeometry};
    // Query i sees only key (3·i) mod seq: a single allowed key per row, in a partial block.
    let (n, d) = (40usize, 16usize);
    let g = PatternGeometry { block_q: 16, block_k: 16, seq_q: n as u32, seq_kv: n as u32, slices: 1 };
    let mut acc = PatternAccumulator::new(g).unwrap();
    for qb in 0..g.q_blocks() {
        let mut rows: Vec<(u32, BlockMask)> = (0..g.k_blocks()).map(|kb| (kb, BlockMask::Bits(vec![0; g.mask_words()]))).collect();
        for r in 0..16u32 {
            let i = qb * 16 + r;
            if i as usize >= n {
                break;
            }
            let j = (3 * i) % n as u32;
            if let BlockMask::Bits(bits) = &mut rows[(j / 16) as usize].1 {
                bits[r as usize] |= 1 << (j % 16);
            }
        }
        acc.push_row(rows);
    }
    let pattern = acc.finish().unwrap();
    let (q, k, v) = random_qkv((1, 2, n, d), (1, 2, n, d), 31, 50.0);
    for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.2 }] {
        for path in [sparse_attn::ExecPath::ThreeKernel, sparse_attn::ExecPath::Fused] {
            let opts = AttentionOptions { path, ..AttentionOptions::new(normalizer) };
            let o = engine.attention_with(&q, &k, &v, &pattern, &opts).unwrap().o;
            for h in 0..2 {
                for i in 0..n {
                    let j = (3 * i) % n;
                    let got: Vec<f32> = o.slice(ndarray::s![0, h, i, ..]).to_vec();
                    let want: Vec<f32> = v.slice(ndarray::s![0, h, j, ..]).to_vec();
                    assert_close(&format!("{} {path:?} head {h} row {i}", normalizer.label()), &got, &want, tolerance(DType::F32));
                }
            }
        }
    }
}

#[test]
fn batched_projection_matches_the_cpu_and_names_non_finite_inputs() {
    let Some(engine) = engine() else { return };
    let (slices, rows, dim, rank) = (3, 37, 12, 5);
    let x = random4((1, slices, rows, dim), 91, 1.0).index_axis_move(ndarray::Axis(0), 0);
    let w: Vec<f32> = random4((1, 1, slices * dim, rank), 92, 1.0).iter().copied().collect();
    let b: Vec<f32> = random4((1, 1, slices, rank), 93, 1.0).iter().copied().collect();
    let got = engine.project_batched(&x.view(), &w, &b, rank).expect("projection");
    let mut want = Vec::with_capacity(slices * rows * rank);
    for s in 0..slices {
        for r in 0..rows {
            for j in 0..rank {
                let dot: f64 = (0..dim).map(|c| x[[s, r, c]] as f64 * w[(s * dim + c) * rank + j] as f64).sum();
                want.push((dot + b[s * rank + j] as f64) as f32);
            }
        }
    }
    assert_close("projection", got.as_slice().unwrap(), &want, tolerance(DType::F32));
    // Each input is checked on its own: the index is the bad value's place in that input.
    let mut w_bad = w.clone();
    w_bad[17] = f32::INFINITY;
    match engine.project_batched(&x.view(), &w_bad, &b, rank) {
        Err(Error::NonFinite { tensor: "projection weights", index: 17, .. }) => {}
        other => panic!("expected NonFinite weights at 17, got {:?}", other.map(|y| y.dim())),
    }
    let mut b_bad = b.clone();
    b_bad[4] = f32::NAN;
    assert!(matches!(engine.project_batched(&x.view(), &w, &b_bad, rank), Err(Error::NonFinite { tensor: "projection biases", index: 4, .. })));
}

/// Every Q/K/V load is checked against its binding, not only against the row and head_dim
/// bounds: a plan whose Q and K/V window bases lie past every index (each index wraps below zero
/// to a huge u32) reads zeros, so every output row is exactly 0. Unguarded, wgpu clamps those
/// loads onto the bindings' last elements and the rows come out as V's last row.
#[test]
fn loads_past_a_binding_read_zeros_not_clamped_data() {
    let Some(engine) = engine() else { return };
    // head_dim 32 takes the fused kernels' vec4 loads, 30 their scalar ones.
    let cases = [
        (ExecPath::ThreeKernel, Normalizer::Softmax, 32),
        (ExecPath::ThreeKernel, Normalizer::ENTMAX15, 30),
        (ExecPath::Fused, Normalizer::Softmax, 32),
        (ExecPath::Fused, Normalizer::Softmax, 30),
        (ExecPath::Fused, Normalizer::ENTMAX15, 32),
        (ExecPath::Fused, Normalizer::ENTMAX15, 30),
    ];
    for (path, normalizer, d) in cases {
        let shape = AttentionShape::new(1, 2, 40, d);
        let (q, k, v) = random_qkv((1, 2, 40, d), (1, 2, 40, d), 11, 2.0);
        let v = v.mapv(|x| x + 2.0); // no V element is 0, so a clamped load cannot pass for a guarded one
        let pattern = Window::new(12).with_blocks(16, 16).build(&shape).unwrap();
        let opts = AttentionOptions { path, ..AttentionOptions::new(normalizer) };
        let mut plan = engine.plan(&shape, &pattern, &opts).expect("plan");
        assert_eq!(plan.path, path);
        for chunk in &mut plan.chunks {
            chunk.params.q_base = chunk.params.q_base.wrapping_add(1 << 30);
            chunk.params.kv_base = chunk.params.kv_base.wrapping_add(1 << 30);
        }
        let input = |a: &ndarray::Array4<f32>| upload(engine, a.as_slice().unwrap(), wgpu::BufferUsages::STORAGE);
        let (qb, kb, vb) = (input(&q), input(&k), input(&v));
        // O starts non-zero, so a row the kernels never write fails too.
        let ob = upload(engine, &vec![7.0f32; 2 * 40 * d], wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC);
        let got = encode_and_read_o(engine, &plan, &pattern, AttentionBuffers { q: &qb, k: &kb, v: &vb, o: &ob });
        if let Some((i, x)) = got.iter().enumerate().find(|(_, x)| **x != 0.0) {
            panic!("{path:?} {} head_dim {d}: index {i}: got {x}, expected 0 (loads past the binding must read zeros)", normalizer.label());
        }
    }
}
