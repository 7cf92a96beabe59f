//! The GPU correctness suite: every kernel path against the CPU reference, instantiated by
//! macro over normaliser × pattern × dtype × block size. Each case runs a list of shapes
//! covering ragged sequences, a single block, batch > 1, GQA/MQA and seq_q ≠ seq_kv.

mod common;

use common::{assert_close, engine, random4, random_qkv, tolerance};
use ndarray::Array4;
use sparse_attn::pattern::{BlockMask, PatternAccumulator, PatternGeometry};
use sparse_attn::patterns::{Causal, Dense, GlobalTokens, RandomBlocks, Window};
use sparse_attn::{reference, AttentionOptions, AttentionShape, BlockPattern, DType, Error, ExecPath, Normalizer};

/// Shapes every case runs: (batch, heads, kv_heads, seq_q, seq_kv, head_dim).
const SHAPES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (1, 2, 2, 100, 100, 32), // ragged: 100 is no multiple of any block size
    (2, 4, 2, 50, 90, 32),   // batch > 1, GQA, seq_q != seq_kv
    (1, 1, 1, 13, 13, 16),   // a single (partial) block
    (1, 3, 1, 40, 40, 64),   // MQA
];

fn shape_of(s: (usize, usize, usize, usize, usize, usize)) -> AttentionShape {
    AttentionShape { batch: s.0, heads: s.1, kv_heads: s.2, seq_q: s.3, seq_kv: s.4, head_dim: s.5 }
}

/// A pattern with whole empty query blocks and element-level empty rows.
fn with_empty_rows(shape: &AttentionShape, bq: u32, bk: u32) -> BlockPattern {
    let g = PatternGeometry { block_q: bq, block_k: bk, seq_q: shape.seq_q as u32, seq_kv: shape.seq_kv as u32, slices: 1 };
    let mut acc = PatternAccumulator::new(g).expect("geometry");
    let words = g.mask_words();
    let wpr = bk.div_ceil(32) as usize;
    for qb in 0..g.q_blocks() {
        if qb % 2 == 1 {
            acc.push_row(std::iter::empty()); // every row of this block is empty
            continue;
        }
        // Even rows see keys 0..3 of the first block; odd rows see nothing.
        let mut bits = vec![0u32; words];
        for r in (0..bq as usize).step_by(2) {
            bits[r * wpr] = 0b111;
        }
        let mut row = vec![(0, BlockMask::Bits(bits))];
        row.extend((1..g.k_blocks()).filter(|kb| kb % 2 == 0).map(|kb| (kb, BlockMask::Full)));
        acc.push_row(row);
    }
    acc.finish().expect("valid pattern")
}

fn build_pattern(kind: &str, shape: &AttentionShape, bq: u32, bk: u32) -> BlockPattern {
    let p = match kind {
        "dense" => Dense::new().with_blocks(bq, bk).build(shape),
        "causal" => Causal::new().with_blocks(bq, bk).build(shape),
        "window" => Window::new(24).with_blocks(bq, bk).build(shape),
        "global_window" => GlobalTokens::new(3, 2)
            .with_blocks(bq, bk)
            .build(shape)
            .and_then(|g| Ok(g.union(&Window::causal(9).with_blocks(bq, bk).build(shape)?)?)),
        "random" => RandomBlocks::new(0.5, 7).with_partial(0.5).per_slice(true).with_blocks(bq, bk).build(shape),
        "empty_rows" => Ok(with_empty_rows(shape, bq, bk)),
        other => panic!("unknown pattern kind {other}"),
    };
    p.unwrap_or_else(|e| panic!("building {kind} for {shape:?}: {e}"))
}

/// Rounds through f16 so the reference sees exactly what f16 storage holds.
fn as_stored(a: &Array4<f32>, dtype: DType) -> Array4<f32> {
    match dtype {
        DType::F32 => a.clone(),
        DType::F16 => a.mapv(|x| half::f16::from_f32(x).to_f32()),
    }
}

fn run_case(normalizer: Normalizer, kind: &str, dtype: DType, bq: u32, bk: u32) {
    let Some(engine) = engine() else { return };
    for (n, &s) in SHAPES.iter().enumerate() {
        let shape = shape_of(s);
        let q = as_stored(&random4((s.0, s.1, s.3, s.5), 10 + n as u64, 3.0), dtype);
        let k = as_stored(&random4((s.0, s.2, s.4, s.5), 20 + n as u64, 3.0), dtype);
        let v = as_stored(&random4((s.0, s.2, s.4, s.5), 30 + n as u64, 1.0), dtype);
        let pattern = build_pattern(kind, &shape, bq, bk);
        let want = reference::attention(&q, &k, &v, &pattern, normalizer).expect("reference");
        // Entmax has two fused kernels: the default here (every suite row fits a score cache)
        // caches scores, and the pooling kernel (any row length) runs with its first tile.
        let entmax = normalizer.alpha().is_some();
        let pooling = entmax.then(|| engine.fused_tile_candidates(bq, bk, s.5, normalizer)[0]);
        let mut runs = vec![(ExecPath::ThreeKernel, None), (ExecPath::Fused, None)];
        if entmax {
            runs.push((ExecPath::Fused, pooling));
        }
        for (path, fused_tile) in runs {
            // Odd shapes run the fused softmax split along keys (3 splits + merge); entmax never splits.
            let key_splits = (n % 2 == 1).then_some(3);
            let opts = AttentionOptions { dtype, path, key_splits, fused_tile, ..AttentionOptions::new(normalizer) };
            if entmax && path == ExecPath::Fused && fused_tile.is_none() && (dtype == DType::F32 || engine.capabilities().f16) {
                let tile = engine.plan(&shape, &pattern, &opts).expect("plan").fused.expect("fused tile");
                assert!(tile.rc > 0, "{kind} {shape:?}: rows this short should take the score-caching kernel, got {tile:?}");
            }
            let got = engine.attention_with(&q, &k, &v, &pattern, &opts);
            if dtype == DType::F16 && !engine.capabilities().f16 {
                assert!(matches!(got, Err(Error::Unsupported(_))), "f16 without SHADER_F16 must be Unsupported, got {got:?}");
                continue;
            }
            let got = got.unwrap_or_else(|e| panic!("{kind} {path:?} {shape:?}: {e}"));
            // The fused entmax kernels count their tiles' paths: every tile of every row class
            // runs to exactly one end (no tile skipped or run by two classes).
            if entmax && path == ExecPath::Fused {
                let plan = engine.plan(&shape, &pattern, &opts).expect("plan");
                let paths = got.entmax_paths.unwrap_or_else(|| panic!("{kind} {shape:?}: fused entmax returned no path counts"));
                assert_eq!(paths.tiles(), common::entmax_tiles(&plan, &pattern), "{kind} {shape:?} tile {fused_tile:?}: tiles by path {paths:?}");
            } else {
                assert!(got.entmax_paths.is_none(), "{kind} {path:?}: path counts are the fused entmax kernels'");
            }
            assert_close(
                &format!("{kind} {} {path:?} tile {fused_tile:?} {dtype:?} {bq}x{bk} shape {shape:?}", normalizer.label()),
                got.o.as_slice().expect("contiguous"),
                want.as_slice().expect("contiguous"),
                tolerance(dtype),
            );
        }
    }
}

macro_rules! blocks {
    ($norm:expr, $kind:expr) => {
        #[test]
        fn f32_b16x16() {
            run_case($norm, $kind, DType::F32, 16, 16)
        }
        #[test]
        fn f32_b32x64() {
            run_case($norm, $kind, DType::F32, 32, 64)
        }
        #[test]
        fn f32_b64x32() {
            run_case($norm, $kind, DType::F32, 64, 32)
        }
        #[test]
        fn f16_b16x16() {
            run_case($norm, $kind, DType::F16, 16, 16)
        }
        #[test]
        fn f16_b32x64() {
            run_case($norm, $kind, DType::F16, 32, 64)
        }
    };
}

macro_rules! patterns {
    ($norm:expr) => {
        mod dense {
            use super::*;
            blocks!($norm, "dense");
        }
        mod causal {
            use super::*;
            blocks!($norm, "causal");
        }
        mod window {
            use super::*;
            blocks!($norm, "window");
        }
        mod global_window {
            use super::*;
            blocks!($norm, "global_window");
        }
        mod random {
            use super::*;
            blocks!($norm, "random");
        }
        mod empty_rows {
            use super::*;
            blocks!($norm, "empty_rows");
        }
    };
}

macro_rules! suite {
    ($($name:ident => $norm:expr),* $(,)?) => {
        $(mod $name {
            use super::*;
            patterns!($norm);
        })*
    };
}

suite! {
    softmax => Normalizer::Softmax,
    entmax15 => Normalizer::ENTMAX15,
    sparsemax => Normalizer::Sparsemax,
    entmax_1_25 => Normalizer::Entmax { alpha: 1.25 },
}

/// Head dims 16..=256 (the largest supported) on a dense and a random pattern.
#[test]
fn head_dims() {
    let Some(engine) = engine() else { return };
    // 7 and 30 are not multiples of 4: the fused kernels take their scalar-load variant.
    for d in [7, 16, 30, 32, 48, 64, 128, 256] {
        let shape = AttentionShape::new(1, 2, 70, d);
        let (q, k, v) = random_qkv((1, 2, 70, d), (1, 2, 70, d), 1, 2.0);
        for (kind, normalizer) in [("dense", Normalizer::ENTMAX15), ("random", Normalizer::Softmax)] {
            let pattern = build_pattern(kind, &shape, 32, 32);
            let want = reference::attention(&q, &k, &v, &pattern, normalizer).expect("reference");
            for path in [ExecPath::ThreeKernel, ExecPath::Fused] {
                let opts = AttentionOptions { path, ..AttentionOptions::new(normalizer) };
                let got = engine.attention_with(&q, &k, &v, &pattern, &opts).expect("gpu").o;
                assert_close(&format!("head_dim {d} {kind} {path:?}"), got.as_slice().unwrap(), want.as_slice().unwrap(), tolerance(DType::F32));
            }
        }
    }
}
