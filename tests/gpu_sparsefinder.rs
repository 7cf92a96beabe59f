//! Sparsefinder projections on the GPU equal the CPU path; long sequences build through them.

mod common;

use common::{assert_close, engine, random4};
use sparse_attn::patterns::sparsefinder::{Sparsefinder, SparsefinderModel, Variant, GPU_PROJECTION_MIN_SEQ};
use sparse_attn::patterns::sparsefinder::Threshold;

#[test]
fn gpu_projection_matches_cpu_and_feeds_the_builder() {
    let Some(engine) = engine() else { return };
    let model = SparsefinderModel::load(SparsefinderModel::shipped_path()).expect("shipped model");
    let n = GPU_PROJECTION_MIN_SEQ + 37;
    let q = random4((1, model.heads(), n, model.head_dim()), 1, 1.5);
    let k = random4((1, model.heads(), n, model.head_dim()), 2, 1.5);
    let variant = Variant::Distance { threshold: Threshold::MeanRecall(0.95) };
    let cpu = model.project(2, &q, &k, &variant).unwrap();
    let gpu = model.project_gpu(engine, 2, &q, &k, &variant).unwrap();
    for s in 0..model.heads() {
        assert_close(&format!("q' slice {s}"), gpu.q[s].as_slice().unwrap(), cpu.q[s].as_slice().unwrap(), (1e-4, 1e-5));
        assert_close(&format!("k' slice {s}"), gpu.k[s].as_slice().unwrap(), cpu.k[s].as_slice().unwrap(), (1e-4, 1e-5));
    }
    let spec = Sparsefinder::new(Variant::CLUSTERING_DEFAULT).with_blocks(32, 32);
    let via_gpu = model.build_with_engine(engine, 2, &q, &k, &spec).unwrap();
    let via_cpu = model.build(2, &q, &k, &spec).unwrap();
    // Rounding can move a pair across a cluster boundary; the patterns agree almost everywhere.
    let (a, b) = (via_gpu.allowed_pairs(0) as f64, via_cpu.allowed_pairs(0) as f64);
    assert!((a - b).abs() <= 0.01 * b, "GPU-projected pattern has {a} pairs, CPU {b}");
    // Wrong layer is still a typed error on the GPU path.
    assert!(model.project_gpu(engine, 99, &q, &k, &variant).is_err());
}
