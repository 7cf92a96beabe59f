//! Low-rank reconstruction (Bhojanapalli et al. 2021): exact recovery of rank-r + μ scores from
//! m >= r spread positions, m = n returns the exact scores, save/load round trip, typed errors,
//! subset selection, principal angles, the pattern predictor, WGSL validation with naga, and the
//! GPU path against the CPU reference on the real-data fixture.

mod common;

use common::assert_close;
use ndarray::{s, Array4};
use sparse_attn::data::{fixture_path, AttentionData};
use sparse_attn::lowrank::{
    self, eigenspace_overlap, fit, GpuLowRank, LowRankConfig, LowRankFitter, LowRankModel,
    LowRankPattern, Selection, SHADER,
};
use sparse_attn::pattern::BlockPattern;
use sparse_attn::patterns::Dense;
use sparse_attn::{reference, AttentionShape, Error, Normalizer};
use wgpu::naga;

/// Exact scores `[b, h, n_q, n_kv]` in f64.
fn exact_scores(q: &Array4<f32>, k: &Array4<f32>) -> Array4<f64> {
    let (b, h, nq, d) = q.dim();
    let nk = k.dim().2;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = Array4::<f64>::zeros((b, h, nq, nk));
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..nq {
                for j in 0..nk {
                    out[[bb, hh, i, j]] = scale
                        * (0..d)
                            .map(|c| q[[bb, hh, i, c]] as f64 * k[[bb, hh, j, c]] as f64)
                            .sum::<f64>();
                }
            }
        }
    }
    out
}

/// Keys of head_dim `d` make every score row lie in a d-dimensional subspace (the span of K's
/// columns), mean included: score rows are exactly rank d + μ.
fn low_rank_problem(
    heads: usize,
    n: usize,
    d: usize,
    seed: u64,
) -> (Array4<f32>, Array4<f32>, Array4<f32>) {
    let q = common::random4((1, heads, n, d), seed, 2.0);
    let mut k = common::random4((1, heads, n, d), seed + 1, 2.0);
    // Share K across heads so one basis serves every row.
    for h in 1..heads {
        let k0 = k.slice(s![0, 0, .., ..]).to_owned();
        k.slice_mut(s![0, h, .., ..]).assign(&k0);
    }
    let v = common::random4((1, heads, n, d), seed + 2, 1.0);
    (q, k, v)
}

fn max_abs_diff(a: &Array4<f32>, b: &Array4<f64>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn exact_rank_r_scores_are_reconstructed_from_spread_positions() {
    let (n, d) = (96, 6);
    let (q, k, _) = low_rank_problem(2, n, d, 7);
    let model = fit(&LowRankConfig::new(d, d), &[(q.view(), k.view())]).unwrap();
    let basis = model.basis(n).unwrap();
    // Everything past rank d is numerically zero.
    assert!(
        basis.explained_variance(d) > 1.0 - 1e-10,
        "{:?}",
        &basis.eigenvalues[..d + 2]
    );
    // New queries (same keys): reconstruct from m = d, d + 2, 3d well-spread positions.
    let q2 = common::random4((1, 2, 40, d), 99, 2.0);
    let k2 = k.clone();
    let want = exact_scores(&q2, &k2);
    for m in [d, d + 2, 3 * d] {
        for selection in [
            Selection::Spread { first: 0 },
            Selection::Spread { first: 2 },
        ] {
            let cfg = LowRankConfig::new(d, m)
                .with_selection(selection.clone())
                .with_ridge(0.0);
            let plan = model.plan(&cfg, n).unwrap();
            assert_eq!(plan.subset().len(), m);
            let got = lowrank::reconstruct_scores(&plan, &q2.view(), &k2.view()).unwrap();
            let err = max_abs_diff(&got, &want);
            let scale = want.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            assert!(
                err <= 1e-5 * scale,
                "m {m} {selection:?}: max error {err} (scores up to {scale})"
            );
        }
    }
    // A basis of lower rank than the data cannot: the error is visible.
    let plan = model
        .plan(&LowRankConfig::new(d - 2, 3 * d).with_ridge(0.0), n)
        .unwrap();
    let got = lowrank::reconstruct_scores(&plan, &q2.view(), &k2.view()).unwrap();
    assert!(max_abs_diff(&got, &want) > 1e-2);
}

#[test]
fn all_positions_return_the_exact_scores_and_attention() {
    let (n, d) = (64, 8);
    let q = common::random4((1, 2, n, d), 3, 2.0);
    let k = common::random4((1, 2, n, d), 4, 2.0);
    let v = common::random4((1, 2, n, d), 5, 1.0);
    let model = fit(&LowRankConfig::new(4, 4), &[(q.view(), k.view())]).unwrap();
    let plan = model.plan(&LowRankConfig::new(4, n), n).unwrap();
    assert_eq!(plan.subset(), (0..n).collect::<Vec<_>>().as_slice());
    let got = lowrank::reconstruct_scores(&plan, &q.view(), &k.view()).unwrap();
    let want = exact_scores(&q, &k);
    assert!(max_abs_diff(&got, &want) < 1e-6);
    let dense = Dense::new()
        .build(&AttentionShape::new(1, 2, n, d))
        .unwrap();
    for norm in [
        Normalizer::Softmax,
        Normalizer::ENTMAX15,
        Normalizer::Sparsemax,
    ] {
        let o = lowrank::attention(&plan, &q.view(), &k.view(), &v.view(), norm).unwrap();
        let o_ref = reference::attention(&q, &k, &v, &dense, norm).unwrap();
        assert_close(
            &format!("m = n attention {norm:?}"),
            o.as_slice().unwrap(),
            o_ref.as_slice().unwrap(),
            (1e-5, 1e-6),
        );
    }
}

#[test]
fn save_load_round_trip_and_file_errors() {
    let (q, k, v) = low_rank_problem(2, 48, 8, 11);
    let (q2, k2, _) = low_rank_problem(1, 32, 8, 12);
    let mut fitter = LowRankFitter::new(6).unwrap();
    fitter.add_scores(&q.view(), &k.view(), 1).unwrap();
    fitter.add_scores(&q2.view(), &k2.view(), 2).unwrap();
    let model = fitter.finish().unwrap();
    assert_eq!(model.lengths(), vec![32, 48]);
    assert_eq!(model.basis(32).unwrap().rows, 16);
    let dir = std::env::temp_dir().join(format!("sparse-attn-lowrank-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    model.save(&path).unwrap();
    let back = LowRankModel::load(&path).unwrap();
    assert!(back == model, "safetensors round trip is not bit-exact");
    // JSON too (readable, equal to within rounding).
    let js = LowRankModel::from_json(&model.to_json().unwrap()).unwrap();
    assert_eq!((js.rank, js.lengths()), (model.rank, model.lengths()));
    for (a, b) in js.buckets.iter().zip(&model.buckets) {
        assert!(a
            .basis
            .iter()
            .zip(&b.basis)
            .chain(a.mean.iter().zip(&b.mean))
            .all(|(x, y)| (x - y).abs() <= 1e-15 * (1.0 + y.abs())));
    }
    let cfg = LowRankConfig::new(6, 12);
    let a = lowrank::attention(
        &model.plan(&cfg, 48).unwrap(),
        &q.view(),
        &k.view(),
        &v.view(),
        Normalizer::ENTMAX15,
    )
    .unwrap();
    let b = lowrank::attention(
        &back.plan(&cfg, 48).unwrap(),
        &q.view(),
        &k.view(),
        &v.view(),
        Normalizer::ENTMAX15,
    )
    .unwrap();
    assert_eq!(a, b);
    // Wrong version, truncated file, missing file.
    let json = model
        .to_json()
        .unwrap()
        .replacen("\"version\":1", "\"version\":99", 1);
    assert!(
        matches!(LowRankModel::from_json(&json), Err(Error::Data(m)) if m.contains("version 99"))
    );
    let mut wrong = model.clone();
    wrong.version = 2;
    assert!(matches!(wrong.save(&path), Err(Error::Data(_))));
    let bytes = model.to_safetensors().unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(LowRankModel::load(&path), Err(Error::Data(_))));
    assert!(matches!(
        LowRankModel::load(dir.join("missing.json")),
        Err(Error::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn typed_errors() {
    let (q, k, v) = low_rank_problem(1, 48, 8, 21);
    let model = fit(&LowRankConfig::new(4, 4), &[(q.view(), k.view())]).unwrap();
    // A length without a basis names the lengths the model has.
    match model.plan(&LowRankConfig::new(4, 8), 64) {
        Err(Error::Unsupported(m)) => assert!(m.contains("64") && m.contains("[48]"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let plan = model.plan(&LowRankConfig::new(4, 8), 48).unwrap();
    let (q3, k3, v3) = low_rank_problem(1, 32, 8, 22);
    assert!(matches!(
        lowrank::attention(
            &plan,
            &q3.view(),
            &k3.view(),
            &v3.view(),
            Normalizer::Softmax
        ),
        Err(Error::Shape(_))
    ));
    // samples < rank, rank above the model's, samples above n, zero rank.
    assert!(matches!(
        model.plan(&LowRankConfig::new(4, 3), 48),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        model.plan(&LowRankConfig::new(5, 8), 48),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        model.plan(&LowRankConfig::new(4, 49), 48),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        model.plan(&LowRankConfig::new(0, 8), 48),
        Err(Error::ZeroSize(_))
    ));
    // Explicit positions out of range or with the wrong count.
    let bad = LowRankConfig::new(2, 2).with_selection(Selection::Explicit(vec![0, 48]));
    assert!(matches!(model.plan(&bad, 48), Err(Error::Shape(_))));
    let bad = LowRankConfig::new(2, 3).with_selection(Selection::Explicit(vec![0, 5]));
    assert!(matches!(model.plan(&bad, 48), Err(Error::Shape(_))));
    // A rank-deficient subset without ridge is a typed error, not a NaN: duplicated keys make
    // the rows of U at those positions equal, so U_S has rank one.
    let mut kd = k.clone();
    let k0 = kd.slice(s![0, 0, 0, ..]).to_owned();
    for j in 1..8 {
        kd.slice_mut(s![0, 0, j, ..]).assign(&k0);
    }
    let md = fit(&LowRankConfig::new(4, 4), &[(q.view(), kd.view())]).unwrap();
    let cfg = LowRankConfig::new(4, 4)
        .with_selection(Selection::Explicit(vec![0, 1, 2, 3]))
        .with_ridge(0.0);
    assert!(matches!(md.plan(&cfg, 48), Err(Error::Data(_))));
    // Non-finite input.
    let mut qn = q.clone();
    qn[[0, 0, 3, 1]] = f32::NAN;
    assert!(matches!(
        lowrank::attention(&plan, &qn.view(), &k.view(), &v.view(), Normalizer::Softmax),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(LowRankFitter::new(0), Err(Error::ZeroSize(_))));
    assert!(matches!(
        LowRankFitter::new(1).unwrap().finish(),
        Err(Error::Data(_))
    ));
}

#[test]
fn spread_selection() {
    let p = Selection::Spread { first: 2 }.positions(100, 10).unwrap();
    assert_eq!(p.len(), 10);
    assert_eq!(&p[..3], &[0, 1, 2]);
    assert_eq!(*p.last().unwrap(), 99);
    assert!(p.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        Selection::Spread { first: 3 }.positions(5, 5).unwrap(),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(
        Selection::Spread { first: 0 }.positions(9, 3).unwrap(),
        vec![0, 4, 8]
    );
    assert_eq!(
        Selection::Spread { first: 4 }.positions(9, 2).unwrap(),
        vec![0, 1]
    );
    assert!(matches!(
        Selection::Spread { first: 0 }.positions(4, 5),
        Err(Error::Shape(_))
    ));
    assert_eq!(
        Selection::Explicit(vec![5, 1, 3]).positions(6, 3).unwrap(),
        vec![1, 3, 5]
    );
}

#[test]
fn principal_angles_and_explained_variance() {
    let (q, k, _) = low_rank_problem(2, 64, 8, 31);
    let a = fit(&LowRankConfig::new(8, 8), &[(q.view(), k.view())]).unwrap();
    let (q2, _, _) = low_rank_problem(2, 64, 8, 32);
    // Different queries, same keys: same 8-dim subspace.
    let b = fit(&LowRankConfig::new(8, 8), &[(q2.view(), k.view())]).unwrap();
    let ov = eigenspace_overlap(a.basis(64).unwrap(), b.basis(64).unwrap(), 8).unwrap();
    assert!(ov.cosines.iter().all(|&c| c > 1.0 - 1e-6), "{ov:?}");
    assert!((ov.mean_cos2 - 1.0).abs() < 1e-6);
    // Other keys: a different subspace (8 of 64 dims: expected mean cos² ≈ 8/64 at random).
    let (_, k3, _) = low_rank_problem(2, 64, 8, 33);
    let c = fit(&LowRankConfig::new(8, 8), &[(q.view(), k3.view())]).unwrap();
    let ov = eigenspace_overlap(a.basis(64).unwrap(), c.basis(64).unwrap(), 8).unwrap();
    assert!(ov.mean_cos2 < 0.6, "{ov:?}");
    assert!(ov.cosines.windows(2).all(|w| w[0] >= w[1]));
    let curve = a.basis(64).unwrap().explained_variance_curve();
    assert_eq!(curve.len(), 64);
    assert!(curve.windows(2).all(|w| w[1] >= w[0] - 1e-12));
    assert!((curve[63] - 1.0).abs() < 1e-9);
    assert!(matches!(
        eigenspace_overlap(a.basis(64).unwrap(), c.basis(64).unwrap(), 9),
        Err(Error::Shape(_))
    ));
}

#[test]
fn pattern_predictor_keeps_the_heavy_blocks() {
    let (n, d) = (128, 8);
    let (q, mut k, _) = low_rank_problem(2, n, d, 41);
    let q = q.mapv(|x| x * 0.1);
    // Keys 70..74 (block 4 of 16) point along e_0, which every query shares with a large weight.
    for j in 70..74 {
        for c in 0..d {
            k[[0, 0, j, c]] = 0.0;
            k[[0, 1, j, c]] = 0.0;
        }
    }
    let mut q = q;
    for h in 0..2 {
        for i in 0..n {
            q[[0, h, i, 0]] = 3.0;
        }
        for j in 70..74 {
            k[[0, h, j, 0]] = 4.0;
        }
    }
    let model = fit(&LowRankConfig::new(d, d), &[(q.view(), k.view())]).unwrap();
    let plan = model.plan(&LowRankConfig::new(d, 2 * d), n).unwrap();
    let pred = LowRankPattern::new(0.25).with_blocks(16, 16);
    let pattern: BlockPattern = pred.build(&plan, &q.view(), &k.view()).unwrap();
    assert_eq!(pattern.slices(), 2);
    assert_eq!(pred.blocks_per_row(8), 2);
    for slice in 0..2 {
        for qb in 0..8 {
            let cols = &pattern.col_idx()[pattern.row_blocks(slice, qb)];
            assert_eq!(cols.len(), 2);
            assert!(cols.contains(&4), "slice {slice} row {qb}: {cols:?}");
        }
    }
    // Density 1 is dense.
    let full = LowRankPattern::new(1.0)
        .with_blocks(16, 16)
        .build(&plan, &q.view(), &k.view())
        .unwrap();
    assert_eq!(full.nnz(), 2 * 8 * 8);
    assert!(matches!(
        LowRankPattern::new(0.0).build(&plan, &q.view(), &k.view()),
        Err(Error::Data(_))
    ));
}

#[test]
fn wgsl_validates_with_naga() {
    let module = naga::front::wgsl::parse_str(SHADER)
        .unwrap_or_else(|e| panic!("lowrank.wgsl: parse error:\n{}", e.emit_to_string(SHADER)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("lowrank.wgsl: validation error: {e:?}"));
    for entry in ["subset_scores", "reconstruct", "normalize_pv"] {
        assert!(
            module.entry_points.iter().any(|e| e.name == entry),
            "missing entry point {entry}"
        );
    }
}

/// Fit on one fixture text, run the other on the GPU and the CPU reference.
#[test]
fn gpu_matches_cpu_reference_on_real_data() {
    let Some(engine) = common::engine() else {
        return;
    };
    let data = AttentionData::open(fixture_path()).unwrap();
    let texts = data.texts().to_vec();
    let (train, test) = (&texts[1], &texts[0]);
    let mut fitter = LowRankFitter::new(16).unwrap();
    for layer in 0..data.layers() {
        let (q, k, _) = data.layer(train, layer).unwrap();
        fitter.add_scores(&q.view(), &k.view(), 2).unwrap();
    }
    let model = fitter.finish().unwrap();
    let n = data.seq();
    let gpu = engine.lowrank().unwrap();
    let (q, k, v) = data.layer(test, 1).unwrap();
    for (rank, m) in [(16, 32), (8, 8)] {
        let plan = model.plan(&LowRankConfig::new(rank, m), n).unwrap();
        let s_ref = lowrank::reconstruct_scores(&plan, &q.view(), &k.view()).unwrap();
        for norm in [Normalizer::Softmax, Normalizer::ENTMAX15] {
            let got = gpu
                .attention(engine, &plan, &q.view(), &k.view(), &v.view(), norm, true)
                .unwrap();
            let o_ref = lowrank::attention(&plan, &q.view(), &k.view(), &v.view(), norm).unwrap();
            let scores = got.scores.unwrap();
            assert_close(
                &format!("r {rank} m {m} scores"),
                scores.as_slice().unwrap(),
                s_ref.as_slice().unwrap(),
                (1e-4, 1e-4),
            );
            assert_close(
                &format!("r {rank} m {m} {norm:?} output"),
                got.o.as_slice().unwrap(),
                o_ref.as_slice().unwrap(),
                (2e-3, 2e-4),
            );
        }
    }
    // GQA: two query heads per kv head.
    let (q, k, v) = data.layer(test, 0).unwrap();
    let k2 = k.slice(s![.., 0..2, .., ..]).to_owned();
    let v2 = v.slice(s![.., 0..2, .., ..]).to_owned();
    let plan = model.plan(&LowRankConfig::new(8, 16), n).unwrap();
    let got = gpu
        .attention(
            engine,
            &plan,
            &q.view(),
            &k2.view(),
            &v2.view(),
            Normalizer::Softmax,
            false,
        )
        .unwrap();
    let o_ref = lowrank::attention(
        &plan,
        &q.view(),
        &k2.view(),
        &v2.view(),
        Normalizer::Softmax,
    )
    .unwrap();
    assert!(got.scores.is_none());
    assert_close(
        "GQA output",
        got.o.as_slice().unwrap(),
        o_ref.as_slice().unwrap(),
        (2e-3, 2e-4),
    );
}

/// Work past one binding is split into query-row chunks (and batch items), not refused.
#[test]
fn gpu_path_chunks_work_past_one_binding() {
    let Some(mut engine) = common::own_engine() else { return };
    let data = AttentionData::open(fixture_path()).unwrap();
    let texts = data.texts().to_vec();
    let mut fitter = LowRankFitter::new(8).unwrap();
    let (q1, k1, _) = data.layer(&texts[1], 0).unwrap();
    fitter.add_scores(&q1.view(), &k1.view(), 2).unwrap();
    let model = fitter.finish().unwrap();
    let n = data.seq();
    let plan = model.plan(&LowRankConfig::new(8, 16), n).unwrap();
    let (q, k, v) = data.layer(&texts[0], 1).unwrap();
    // Batch 2: the same layer twice, second copy scaled so the batches differ.
    let cat = |a: &ndarray::Array4<f32>| ndarray::concatenate(ndarray::Axis(0), &[a.view(), a.mapv(|x| 0.5 * x).view()]).unwrap();
    let (q, k, v) = (cat(&q), cat(&k), cat(&v));
    let want = lowrank::attention(&plan, &q.view(), &k.view(), &v.view(), Normalizer::Softmax).unwrap();
    // 2 × 4 heads × 256 rows × 256 keys of scores (2 MiB) against 512 KiB bindings.
    let limits = engine.plan_limits();
    engine.set_plan_limits(sparse_attn::gpu::plan::PlanLimits { max_binding_bytes: 512 * 1024, ..limits });
    let gpu = GpuLowRank::new(&engine).unwrap();
    let got = gpu.attention(&engine, &plan, &q.view(), &k.view(), &v.view(), Normalizer::Softmax, true).unwrap();
    assert_eq!(got.scores.as_ref().map(|s| s.dim()), Some((2, 4, n, n)));
    assert_close("chunked lowrank output", got.o.as_slice().unwrap(), want.as_slice().unwrap(), (2e-3, 2e-4));
    // A binding too small for even one row with its K/V is a typed Limit error.
    engine.set_plan_limits(sparse_attn::gpu::plan::PlanLimits { max_binding_bytes: 4096, ..limits });
    assert!(matches!(
        gpu.attention(&engine, &plan, &q.view(), &k.view(), &v.view(), Normalizer::Softmax, false),
        Err(sparse_attn::Error::Limit { .. })
    ));
}
