//! MRA (Zeng et al. 2022): the builder's selection and remainder, the f64 reference's meaning
//! (full budget = dense softmax; block-constant K, V = exact low-resolution estimate), typed
//! errors, and GPU = reference for both paths across block sizes, ragged lengths, GQA, batch.

mod common;

use common::{assert_close, engine, own_engine, random4, random_qkv};
use ndarray::Array4;
use sparse_attn::patterns::mra::{self, MraConfig, MraMode};
use sparse_attn::patterns::Dense;
use sparse_attn::{reference, AttentionOptions, AttentionShape, Error, ExecPath, Normalizer};

fn qkv(s: &AttentionShape, seed: u64) -> (Array4<f32>, Array4<f32>, Array4<f32>) {
    random_qkv((s.batch, s.heads, s.seq_q, s.head_dim), (s.batch, s.kv_heads, s.seq_kv, s.head_dim), seed, 2.0)
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

// ---- GPU low-resolution stage (`MraConfig::build_with_engine`) against the CPU oracle ----

/// Q, K, V with a random per-block offset plus smaller token noise: the low-resolution scores
/// spread widely, so f32 (GPU) vs f64 (CPU) rounding cannot reorder the budget's boundary
/// (checked per case by `assert_boundary_separated`).
fn block_structured(shape: &AttentionShape, b: usize, seed: u64) -> (Array4<f32>, Array4<f32>, Array4<f32>) {
    let s = shape;
    let one = |heads: usize, n: usize, seed: u64, range: f32| {
        let base = random4((s.batch, heads, n.div_ceil(b), s.head_dim), seed, 2.0 * range);
        let noise = random4((s.batch, heads, n, s.head_dim), seed + 100, 0.3 * range);
        Array4::from_shape_fn((s.batch, heads, n, s.head_dim), |(x, h, i, c)| base[[x, h, i / b, c]] + noise[[x, h, i, c]])
    };
    (one(s.heads, s.seq_q, seed, 1.0), one(s.kv_heads, s.seq_kv, seed + 1, 1.0), one(s.kv_heads, s.seq_kv, seed + 2, 0.5))
}

/// The test's premise: in every slice the budget-th and the next candidate key (L_IJ − r_I,
/// recomputed in f64 from the CPU means) differ by more than f32 rounding could move them.
fn assert_boundary_separated(what: &str, cfg: &MraConfig, cpu: &mra::Mra) {
    let rem = &cpu.remainder;
    let (qn, kn, d) = (rem.q_blocks as usize, rem.k_blocks as usize, rem.shape.head_dim);
    for slice in 0..rem.shape.slices() {
        let kvs = rem.shape.kv_slice(slice);
        let l = |i: usize, j: usize| {
            let (qm, km) = (&rem.q_means[(slice * qn + i) * d..][..d], &rem.k_means[(kvs * kn + j) * d..][..d]);
            rem.scale as f64 * qm.iter().zip(km).map(|(&a, &c)| a as f64 * c as f64).sum::<f64>()
        };
        let prior = |i: usize, j: usize| (i as i64 - j as i64).unsigned_abs() < cfg.diagonal_band as u64 || (cfg.first_block_prior && (i == 0 || j == 0));
        let mut keys = Vec::new();
        let mut taken = 0;
        for i in 0..qn {
            let r = (0..kn).map(|j| l(i, j)).fold(f64::NEG_INFINITY, f64::max);
            for j in 0..kn {
                if prior(i, j) {
                    taken += 1;
                } else {
                    keys.push(l(i, j) - r);
                }
            }
        }
        keys.sort_by(|a, b| b.total_cmp(a));
        let want = (cfg.blocks_per_row as usize * qn).saturating_sub(taken).min(keys.len());
        if want > 0 && want < keys.len() {
            // Exact ties are safe only at 0 (each row's maximum, L − r = 0 exactly, ordered by
            // index on both sides) when no other block comes close to its row's maximum.
            let (gap, at) = match keys[want - 1] == 0.0 && keys[want] == 0.0 {
                true => (-keys.iter().copied().find(|&x| x != 0.0).unwrap_or(-1.0), "row maxima"),
                false => (keys[want - 1] - keys[want], "the budget boundary"),
            };
            assert!(gap > 1e-5, "{what}: slice {slice}: keys at {at} differ by only {gap:e}; pick another seed");
        }
    }
}

/// GPU build == CPU build: the same selection and remainder layout, means/scores/row terms
/// within f32 tolerance.
fn assert_same_build(what: &str, gpu: &mra::Mra, cpu: &mra::Mra) {
    let (g, c) = (&gpu.pattern, &cpu.pattern);
    assert_eq!(gpu.mode, cpu.mode, "{what}: mode");
    assert_eq!((g.slices(), g.q_blocks()), (c.slices(), c.q_blocks()), "{what}: pattern geometry");
    for slice in 0..c.slices() as usize {
        for qb in 0..c.q_blocks() as usize {
            let got: Vec<u32> = g.row_blocks(slice, qb).map(|b| g.col_idx()[b]).collect();
            let want: Vec<u32> = c.row_blocks(slice, qb).map(|b| c.col_idx()[b]).collect();
            assert_eq!(got, want, "{what}: selected blocks of slice {slice} row {qb}: got (left) vs expected (right)");
        }
    }
    assert_eq!(g, c, "{what}: whole pattern");
    let (gr, cr) = (&gpu.remainder, &cpu.remainder);
    assert_eq!((gr.block, gr.shape, gr.q_blocks, gr.k_blocks, gr.scale), (cr.block, cr.shape, cr.q_blocks, cr.k_blocks, cr.scale), "{what}: remainder header");
    assert_eq!(gr.counts, cr.counts, "{what}: counts");
    for (name, got, want) in [("rest_ptr", &gr.rest_ptr, &cr.rest_ptr), ("rest_col", &gr.rest_col, &cr.rest_col)] {
        assert_eq!(got.len(), want.len(), "{what}: {name} length");
        if let Some(i) = got.iter().zip(want.iter()).position(|(a, b)| a != b) {
            panic!("{what}: {name}[{i}]: got {}, expected {}", got[i], want[i]);
        }
    }
    let tol = (1e-4, 1e-5);
    assert_close(&format!("{what}: q_means"), &gr.q_means, &cr.q_means, tol);
    assert_close(&format!("{what}: k_means"), &gr.k_means, &cr.k_means, tol);
    assert_close(&format!("{what}: v_means"), &gr.v_means, &cr.v_means, tol);
    assert_close(&format!("{what}: rest_logit"), &gr.rest_logit, &cr.rest_logit, tol);
    assert!(cr.precomputed_row_terms().is_none(), "{what}: the CPU build precomputes nothing");
    if cr.has_values() {
        let rows = gr.precomputed_row_terms().unwrap_or_else(|| panic!("{what}: the GPU build carries no row terms"));
        assert_close(&format!("{what}: row terms"), rows, &cr.row_terms_cpu().unwrap(), tol);
        assert_eq!(gr.row_terms().unwrap(), rows, "{what}: row_terms() returns the GPU terms");
    } else {
        assert!(gr.precomputed_row_terms().is_none() && matches!(gr.row_terms(), Err(Error::Shape(_))), "{what}: no V, no row terms");
    }
}

#[test]
fn gpu_build_matches_cpu_build_across_blocks_ragged_gqa_batch_modes() {
    let Some(engine) = engine() else { return };
    let cases = [
        (16u32, AttentionShape::new(2, 4, 100, 16).with_kv_heads(2).with_seq_kv(83), 3u32, (1u32, true)),
        (32, AttentionShape::new(1, 2, 150, 24).with_seq_kv(230), 2, (1, true)),
        (64, AttentionShape::new(2, 2, 200, 32).with_kv_heads(1), 2, (2, false)),
        (16, AttentionShape::new(1, 3, 70, 40).with_kv_heads(1).with_seq_kv(50), 2, (0, false)),
        (32, AttentionShape::new(2, 4, 300, 16).with_kv_heads(2).with_seq_kv(257), 3, (1, true)),
        // 19 × 18 = 342 blocks per slice: the selection's scan spans two 256-block tiles.
        (16, AttentionShape::new(1, 2, 300, 16).with_seq_kv(280), 6, (1, true)),
    ];
    for (ci, (b, shape, bpr, (band, first))) in cases.into_iter().enumerate() {
        let (q, k, v) = block_structured(&shape, b as usize, 200 + ci as u64 * 5);
        for mode in [MraMode::Full, MraMode::SparseOnly] {
            let cfg = MraConfig::new(b, bpr).with_mode(mode).with_priors(band, first);
            let what = format!("case {ci} b={b} {mode:?}");
            let cpu = cfg.build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
            assert_boundary_separated(&what, &cfg, &cpu);
            let gpu = cfg.build_with_engine(engine, &q.view(), &k.view(), Some(&v.view()), &shape).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_same_build(&what, &gpu, &cpu);
            // Deterministic: a second build is bitwise equal, row terms included.
            let again = cfg.build_with_engine(engine, &q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
            assert!(again == gpu && again.remainder.precomputed_row_terms() == gpu.remainder.precomputed_row_terms(), "{what}: repeated GPU build differs");
        }
        // Without V: the same selection, no V̂ and no row terms.
        let cfg = MraConfig::new(b, bpr).with_mode(MraMode::SparseOnly).with_priors(band, first);
        let cpu = cfg.build(&q.view(), &k.view(), None, &shape).unwrap();
        let gpu = cfg.build_with_engine(engine, &q.view(), &k.view(), None, &shape).unwrap();
        assert_same_build(&format!("case {ci} without V"), &gpu, &cpu);
    }
}

#[test]
fn gpu_build_breaks_ties_to_the_lowest_index_like_the_cpu() {
    let Some(engine) = engine() else { return };
    // Constant K: every L_IJ of a row equals r_I, so every candidate key is exactly 0 and the
    // budget takes the lowest off-diagonal flat indices I·kn + J. 320 tokens: 400 blocks per
    // slice, so the tie scan runs over two 256-block tiles.
    for (seq, bpr) in [(128usize, 3u32), (320, 16)] {
        let shape = AttentionShape::new(1, 2, seq, 16).with_kv_heads(1);
        let (q, _, v) = qkv(&shape, 300);
        let k = Array4::from_elem((1, 1, seq, 16), 0.5f32);
        let cfg = MraConfig::new(16, bpr).with_priors(1, false);
        let cpu = cfg.build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
        let gpu = cfg.build_with_engine(engine, &q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
        assert_same_build(&format!("constant K, seq {seq}"), &gpu, &cpu);
        let n = seq / 16;
        let mut left = bpr as usize * n - n; // budget minus the diagonal priors
        let mut want = vec![Vec::new(); n];
        for (i, row) in want.iter_mut().enumerate() {
            for j in 0..n as u32 {
                if i == j as usize {
                    row.push(j);
                } else if left > 0 {
                    row.push(j);
                    left -= 1;
                }
            }
        }
        for slice in 0..2 {
            for (qb, want) in want.iter().enumerate() {
                let got: Vec<u32> = gpu.pattern.row_blocks(slice, qb).map(|b| gpu.pattern.col_idx()[b]).collect();
                assert_eq!(&got, want, "seq {seq} slice {slice} row {qb}: got (left) vs expected (right)");
            }
        }
    }
}

#[test]
fn gpu_build_with_a_budget_covering_everything_leaves_no_remainder() {
    let Some(engine) = engine() else { return };
    let shape = AttentionShape::new(2, 2, 90, 8).with_seq_kv(70);
    let (q, k, v) = qkv(&shape, 310);
    let cfg = MraConfig::new(16, 100);
    let cpu = cfg.build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
    let gpu = cfg.build_with_engine(engine, &q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
    assert!(gpu.remainder.is_empty(), "{} blocks left", gpu.remainder.len());
    assert_same_build("full budget", &gpu, &cpu);
    let rows = gpu.remainder.precomputed_row_terms().unwrap();
    for (row, r) in rows.chunks(gpu.remainder.row_stride()).enumerate() {
        assert!(r[0] == mra::NEG_BIG && r[1..].iter().all(|&x| x == 0.0), "row {row}: got {r:?}, expected the empty-row sentinel");
    }
}

#[test]
fn gpu_built_mra_attention_matches_the_reference() {
    let Some(engine) = engine() else { return };
    let shape = AttentionShape::new(2, 4, 100, 16).with_kv_heads(2).with_seq_kv(83);
    let (q, k, v) = block_structured(&shape, 16, 320);
    for mode in [MraMode::Full, MraMode::SparseOnly] {
        let m = MraConfig::new(16, 2).with_mode(mode).build_with_engine(engine, &q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
        let want = mra::reference::attention(&q, &k, &v, &m, Normalizer::Softmax, None).unwrap();
        for path in [ExecPath::Fused, ExecPath::ThreeKernel] {
            let opts = AttentionOptions { path, ..AttentionOptions::new(Normalizer::Softmax) };
            let got = engine.attention_mra(&q, &k, &v, &m, &opts).unwrap_or_else(|e| panic!("{mode:?} {path:?}: {e}")).o;
            assert_close(&format!("gpu-built {mode:?} {path:?}"), got.as_slice().unwrap(), want.as_slice().unwrap(), (1e-4, 2e-5));
        }
    }
}

#[test]
fn mra_attention_past_one_buffer_runs_in_groups() {
    // Q of one batch entry is 4 x 100 x 16 f32 = 25 KiB: 30 KiB buffers take one entry per
    // group, 16 KiB ones one kv head with its 2 query heads (GQA), each group with its slices'
    // MRA row terms (CPU-folded, or GPU-folded when built on the engine).
    let Some(mut small) = own_engine() else { return };
    let limits = small.plan_limits();
    let shape = AttentionShape::new(2, 4, 100, 16).with_kv_heads(2).with_seq_kv(83);
    let (q, k, v) = qkv(&shape, 410);
    for mode in [MraMode::Full, MraMode::SparseOnly] {
        let cfg = MraConfig::new(16, 2).with_mode(mode);
        let cpu = cfg.build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
        let gpu = cfg.build_with_engine(&small, &q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
        let want = mra::reference::attention(&q, &k, &v, &cpu, Normalizer::Softmax, None).unwrap();
        for kib in [30, 16] {
            small.set_plan_limits(sparse_attn::gpu::plan::PlanLimits { max_buffer_bytes: kib * 1024, ..limits });
            for path in [ExecPath::Fused, ExecPath::ThreeKernel] {
                let opts = AttentionOptions { path, ..AttentionOptions::new(Normalizer::Softmax) };
                assert!(matches!(small.plan(&shape, &cpu.pattern, &opts), Err(Error::Limit { .. })), "one plan must not fit {kib} KiB");
                for (built, m) in [("cpu", &cpu), ("gpu", &gpu)] {
                    let got = small.attention_mra(&q, &k, &v, m, &opts).unwrap_or_else(|e| panic!("{mode:?} {path:?} {kib} KiB {built}: {e}")).o;
                    assert_close(&format!("{mode:?} {path:?} {kib} KiB {built}-built"), got.as_slice().unwrap(), want.as_slice().unwrap(), (1e-4, 2e-5));
                }
            }
        }
        small.set_plan_limits(limits);
    }
}

#[test]
fn gpu_build_chunks_under_lowered_plan_limits() {
    let Some(mut small) = own_engine() else { return };
    let limits = small.plan_limits();
    // One slice of Q is 100·16·4 = 6400 bytes: 8 KiB bindings and 4×4 grids force one or two
    // slices per chunk (GQA: chunks start inside a kv head's group).
    small.set_plan_limits(sparse_attn::gpu::plan::PlanLimits { max_binding_bytes: 8 * 1024, max_workgroups_per_dim: 4, ..limits });
    let shape = AttentionShape::new(2, 4, 100, 16).with_kv_heads(2).with_seq_kv(83);
    let (q, k, v) = block_structured(&shape, 16, 330);
    for mode in [MraMode::Full, MraMode::SparseOnly] {
        let cfg = MraConfig::new(16, 3).with_mode(mode);
        let cpu = cfg.build(&q.view(), &k.view(), Some(&v.view()), &shape).unwrap();
        assert_boundary_separated("chunked", &cfg, &cpu);
        let gpu = cfg.build_with_engine(&small, &q.view(), &k.view(), Some(&v.view()), &shape).unwrap_or_else(|e| panic!("chunked {mode:?}: {e}"));
        assert_same_build(&format!("chunked {mode:?}"), &gpu, &cpu);
    }
    // A binding too small for one slice is a typed Limit error.
    small.set_plan_limits(sparse_attn::gpu::plan::PlanLimits { max_binding_bytes: 4096, ..limits });
    let err = MraConfig::new(16, 3).build_with_engine(&small, &q.view(), &k.view(), Some(&v.view()), &shape).unwrap_err();
    assert!(matches!(err, Error::Limit { .. }), "{err}");
}

#[test]
fn gpu_build_rejects_bad_inputs_like_the_cpu_build() {
    let Some(engine) = engine() else { return };
    let shape = AttentionShape::new(1, 2, 64, 8);
    let (q, k, v) = qkv(&shape, 340);
    let cfg = MraConfig::new(16, 2);
    let gpu = |cfg: MraConfig, shape: &AttentionShape, v: Option<&Array4<f32>>| {
        let v = v.map(|v| v.view());
        cfg.build_with_engine(engine, &q.view(), &k.view(), v.as_ref(), shape).map(|_| ())
    };
    for (what, err) in [
        ("seq_kv mismatch", gpu(cfg, &shape.with_seq_kv(65), Some(&v))),
        ("V shape", gpu(cfg, &shape, Some(&v.slice(ndarray::s![.., .., ..32, ..]).to_owned()))),
    ] {
        assert!(matches!(err, Err(Error::Shape(_))), "{what}: {err:?}");
    }
    assert!(matches!(gpu(cfg.with_scale(f32::NAN), &shape, Some(&v)), Err(Error::NonFinite { tensor: "scale", .. })));
    assert!(matches!(gpu(MraConfig::new(0, 2), &shape, Some(&v)), Err(Error::ZeroSize("block"))));
    assert!(matches!(gpu(cfg, &AttentionShape::new(1, 2, 0, 8), Some(&v)), Err(Error::ZeroSize(_) | Error::Shape(_))));
    // CPU and GPU agree on each of these.
    let cpu = cfg.with_scale(f32::INFINITY).build(&q.view(), &k.view(), Some(&v.view()), &shape);
    assert!(matches!(cpu, Err(Error::NonFinite { tensor: "scale", .. })));
}
