//! Helpers shared by the GPU tests: engine acquisition (fail in CI, skip elsewhere), seeded data,
//! and per-dtype comparisons that print index, got and expected.
#![allow(dead_code)]

use ndarray::Array4;
use rand::{Rng, SeedableRng};
use sparse_attn::gpu::plan::Plan;
use sparse_attn::{BlockPattern, DType, Engine};
use std::sync::OnceLock;

/// The shared engine, or None with a one-line reason (a failure when CI=true).
pub fn engine() -> Option<&'static Engine> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    let e = ENGINE.get_or_init(|| {
        // Tuning is covered by its own test; the suite runs the default tiles (and every
        // candidate tile in `fused_tiles`).
        let e = Engine::new().map(|mut e| {
            e.set_autotune(false);
            e
        });
        let e = e.map_err(|e| e.to_string());
        if let Ok(e) = &e {
            let info = e.adapter_info();
            eprintln!("GPU tests on adapter `{}` ({:?}, driver {} {}), caps {:?}", info.name, info.backend, info.driver, info.driver_info, e.capabilities());
        }
        e
    });
    match e {
        Ok(e) => Some(e),
        Err(reason) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but no GPU adapter: {reason}");
            }
            eprintln!("skipping GPU test: {reason}");
            None
        }
    }
}

/// A fresh engine of the test's own (limits, fallbacks or pipeline counts it changes stay out
/// of the shared one), on the default tiles like the shared one; None where the shared one
/// would skip (a failure when CI=true).
pub fn own_engine() -> Option<Engine> {
    engine()?;
    let mut e = Engine::new().expect("a second engine on the adapter the shared one found");
    e.set_autotune(false);
    Some(e)
}

/// Seeded normal-ish data in [-range, range].
pub fn random4(shape: (usize, usize, usize, usize), seed: u64, range: f32) -> Array4<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Array4::from_shape_simple_fn(shape, || {
        let x: f32 = (0..3).map(|_| rng.random::<f32>() * 2.0 - 1.0).sum::<f32>() / 3.0;
        x * range
    })
}

/// Q of `q_dims` and K, V of `kv_dims` from seeds `seed`, `seed + 1`, `seed + 2`: Q and K in
/// [-qk_range, qk_range] (the scores' spread), V in [-1, 1].
pub fn random_qkv(q_dims: (usize, usize, usize, usize), kv_dims: (usize, usize, usize, usize), seed: u64, qk_range: f32) -> (Array4<f32>, Array4<f32>, Array4<f32>) {
    (random4(q_dims, seed, qk_range), random4(kv_dims, seed + 1, qk_range), random4(kv_dims, seed + 2, 1.0))
}

/// Storage types this engine runs: f32, and f16 where the adapter has SHADER_F16.
pub fn storage_dtypes(engine: &Engine) -> Vec<DType> {
    let mut dtypes = vec![DType::F32];
    if engine.capabilities().f16 {
        dtypes.push(DType::F16);
    }
    dtypes
}

/// Workgroups a fused entmax call of `plan` runs to the end: per query-block row of every
/// problem slice, block_q / tq of the tile of the row class its length falls in. Each ends in
/// exactly one of `EntmaxPaths`' terminal paths.
pub fn entmax_tiles(plan: &Plan, pattern: &BlockPattern) -> u64 {
    let repeat = if pattern.slices() == 1 { plan.shape.slices() as u64 } else { 1 };
    let per_row: u64 = pattern
        .row_ptr()
        .windows(2)
        .map(|w| {
            let blocks = w[1] - w[0];
            let class = plan.row_classes.iter().find(|c| blocks <= c.max_blocks).expect("every row length has a class");
            (plan.block_q / class.tile.tq) as u64
        })
        .sum();
    per_row * repeat
}

/// (rel, abs) tolerance per dtype.
pub fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-4, 1e-5),
        DType::F16 => (1e-2, 2e-3),
    }
}

/// Asserts |got − want| <= abs + rel·|want| elementwise; NaN positions must match.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], (rel, abs): (f32, f32)) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let mut worst: Option<(usize, f32, f32, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.is_nan() || w.is_nan() {
            assert!(g.is_nan() && w.is_nan(), "{what}: NaN mismatch at index {i}: got {g}, expected {w}");
            continue;
        }
        let err = (g - w).abs();
        let excess = err - (abs + rel * w.abs());
        if excess > 0.0 && worst.is_none_or(|(_, _, _, e)| excess > e) {
            worst = Some((i, g, w, excess));
        }
    }
    if let Some((i, g, w, _)) = worst {
        panic!("{what}: worst mismatch at index {i}: got {g}, expected {w} (rel {rel}, abs {abs})");
    }
}
