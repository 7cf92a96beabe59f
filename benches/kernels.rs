//! Kernel benchmarks (criterion). Every figure waits for the GPU: GPU timestamps where the
//! adapter has them (summed per kernel), else wall-clock from submit to idle.
//!
//! - `attention/<path>/<pattern>/<seq>`: the whole call, three-kernel vs fused, dense vs a
//!   10 %-block-density pattern, seq 1024 and 4096, head_dim 64.
//! - `normalize/<normalizer>/<pattern>/4096`: the three-kernel path's normalisation kernel
//!   alone, entmax-1.5 vs softmax (mean entmax iterations printed once).
//! - `fused/<normalizer>/<pattern>/<seq>`: fused softmax vs fused entmax-1.5.
//! - `mra_build/<cpu|gpu>/4096`: MRA's low-resolution stage (block means, scores, selection,
//!   remainder) at seq 4096, 4 heads, block 32, 16 blocks per row: `MraConfig::build` on the
//!   host vs `build_with_engine` (wall-clock, uploads and read-back included).
//!
//! `SPARSE_ATTN_BENCH_HEADS` (default 2) sets the head count; `cargo bench --bench kernels`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ndarray::Array4;
use rand::{Rng, SeedableRng};
use sparse_attn::patterns::mra::MraConfig;
use sparse_attn::patterns::{Dense, RandomBlocks};
use sparse_attn::{AttentionOptions, AttentionShape, BlockPattern, Engine, ExecPath, Normalizer, PreparedAttention};
use std::time::Duration;

const HEAD_DIM: usize = 64;
const BLOCK: u32 = 64;

fn heads() -> usize {
    std::env::var("SPARSE_ATTN_BENCH_HEADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

fn data(shape: &AttentionShape, seed: u64) -> Array4<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Array4::from_shape_simple_fn((shape.batch, shape.heads, shape.seq_q, shape.head_dim), || rng.random::<f32>() * 3.4 - 1.7)
}

fn pattern(kind: &str, shape: &AttentionShape) -> BlockPattern {
    let p = match kind {
        "dense" => Dense::new().with_blocks(BLOCK, BLOCK).build(shape),
        _ => RandomBlocks::new(0.10, 7).with_blocks(BLOCK, BLOCK).build(shape),
    };
    p.expect("pattern")
}

/// Per-iteration time: GPU ms of the `stage` kernel (or all kernels) when timestamps exist.
fn timed(prepared: &PreparedAttention<'_>, iters: u64, stage: Option<&str>) -> Duration {
    let t = prepared.time(0, iters as usize).expect("timed run");
    let ms: f64 = match (stage, t.gpu_ms.is_empty()) {
        (Some(s), false) => t.stage_runs_ms.get(s).map(|v| v.iter().sum()).unwrap_or(0.0),
        (None, false) => t.gpu_ms.iter().sum(),
        _ => t.wall_ms.iter().sum(),
    };
    Duration::from_secs_f64(ms / 1e3)
}

fn benches(c: &mut Criterion) {
    let engine = match Engine::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("no adapter, skipping kernel benches: {e}");
            return;
        }
    };
    let info = engine.adapter_info();
    eprintln!("adapter: {} ({:?}, {}), timestamps: {}", info.name, info.backend, info.driver_info, engine.capabilities().timestamps);
    let heads = heads();

    let mut g = c.benchmark_group("attention");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for seq in [1024usize, 4096] {
        let shape = AttentionShape::new(1, heads, seq, HEAD_DIM);
        let (q, k, v) = (data(&shape, 1), data(&shape, 2), data(&shape, 3));
        for kind in ["dense", "density10"] {
            let p = pattern(kind, &shape);
            for path in [ExecPath::ThreeKernel, ExecPath::Fused] {
                let opts = AttentionOptions { path, ..AttentionOptions::new(Normalizer::Softmax) };
                let prepared = engine.prepare_attention(&q, &k, &v, &p, &opts).expect("prepare");
                g.bench_function(BenchmarkId::new(format!("{}/{kind}", path.label()), seq), |b| b.iter_custom(|n| timed(&prepared, n, None)));
            }
        }
    }
    g.finish();

    let mut g = c.benchmark_group("normalize");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    let shape = AttentionShape::new(1, heads, 4096, HEAD_DIM);
    let (q, k, v) = (data(&shape, 1), data(&shape, 2), data(&shape, 3));
    for kind in ["dense", "density10"] {
        let p = pattern(kind, &shape);
        for (normalizer, stage) in [(Normalizer::Softmax, "normalize_softmax"), (Normalizer::ENTMAX15, "normalize_entmax")] {
            let opts = AttentionOptions { path: ExecPath::ThreeKernel, return_row_stats: true, ..AttentionOptions::new(normalizer) };
            if normalizer != Normalizer::Softmax {
                let stats = engine.attention_with(&q, &k, &v, &p, &opts).expect("row stats").row_stats.expect("stats");
                let it = stats.iterations.iter().map(|&x| x as f64).sum::<f64>() / stats.iterations.len() as f64;
                let support = stats.support.iter().map(|&x| x as f64).sum::<f64>() / stats.support.len() as f64;
                eprintln!("entmax-1.5 {kind} seq 4096: mean iterations {it:.2}, mean support {support:.1} keys");
            }
            let prepared = engine.prepare_attention(&q, &k, &v, &p, &AttentionOptions { return_row_stats: false, ..opts }).expect("prepare");
            g.bench_function(BenchmarkId::new(format!("{}/{kind}", normalizer.label()), 4096), |b| b.iter_custom(|n| timed(&prepared, n, Some(stage))));
        }
    }
    g.finish();

    let mut g = c.benchmark_group("fused");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for kind in ["dense", "density10"] {
        let p = pattern(kind, &shape);
        for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15] {
            let opts = AttentionOptions { path: ExecPath::Fused, ..AttentionOptions::new(normalizer) };
            let prepared = engine.prepare_attention(&q, &k, &v, &p, &opts).expect("prepare");
            g.bench_function(BenchmarkId::new(format!("{}/{kind}", normalizer.label()), 4096), |b| b.iter_custom(|n| timed(&prepared, n, None)));
        }
    }
    g.finish();
}

/// MRA's build, CPU oracle vs GPU low-resolution stage (wall-clock per build).
fn mra_build(c: &mut Criterion) {
    let engine = match Engine::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("no adapter, skipping the MRA build bench: {e}");
            return;
        }
    };
    let shape = AttentionShape::new(1, 4, 4096, HEAD_DIM);
    let (q, k, v) = (data(&shape, 1), data(&shape, 2), data(&shape, 3));
    let cfg = MraConfig::new(32, 16);
    let mut g = c.benchmark_group("mra_build");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g.bench_function(BenchmarkId::new("cpu", 4096), |b| b.iter(|| cfg.build(&q.view(), &k.view(), Some(&v.view()), &shape).expect("cpu build")));
    g.bench_function(BenchmarkId::new("gpu", 4096), |b| {
        b.iter(|| cfg.build_with_engine(&engine, &q.view(), &k.view(), Some(&v.view()), &shape).expect("gpu build"))
    });
    g.finish();
}

criterion_group!(kernels, mra_build, benches);
criterion_main!(kernels);
