//! CPU-only: every kernel's WGSL (each dtype, several tiles) parses and validates with naga.

use sparse_attn::gpu::kernels::all_shader_sources;
use wgpu::naga;

#[test]
fn every_shader_parses_and_validates() {
    let sources = all_shader_sources();
    assert!(sources.len() >= 8, "expected every kernel in both dtypes, got {}", sources.len());
    // Standalone kernels are listed too (MRA's low-resolution stage).
    assert!(sources.iter().any(|(n, _)| n == "mra_lowres"), "mra_lowres is missing from all_shader_sources");
    for (name, src) in sources {
        let module = naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{name}: parse error:\n{}", e.emit_to_string(&src)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: validation error:\n{}", e.emit_to_string(&src)));
    }
}

#[test]
fn every_shader_file_is_used() {
    // A .wgsl added to shaders/ but not wired into kernels.rs would escape validation.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let all: String = all_shader_sources().into_iter().map(|(_, s)| s).collect();
    for entry in std::fs::read_dir(&dir).expect("shaders/ exists") {
        let path = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(&path).expect("readable shader");
        let first_line = text.lines().next().unwrap_or_default();
        assert!(all.contains(first_line), "{} is not part of any validated kernel", path.display());
    }
}

#[test]
fn fused_tiles_workgroup_memory_model_matches_the_shaders() {
    // tiles::FusedTile::workgroup_bytes decides which tiles fit an adapter; it must count what
    // the WGSL declares (a model that undercounts would compile tiles the adapter rejects, or
    // that overlap K, V and the score cache).
    use sparse_attn::gpu::kernels::{shader_source, KernelKey, KernelKind};
    use sparse_attn::gpu::plan::DType;
    use sparse_attn::gpu::tiles;
    let limits = wgpu::Limits { max_compute_workgroup_storage_size: 48 << 10, max_compute_invocations_per_workgroup: 256, max_compute_workgroup_size_x: 256, ..wgpu::Limits::default() };
    let mut checked = [0usize; 3];
    for (bq, bk) in [(16, 16), (32, 32), (64, 64)] {
        for d in [32u32, 64, 100, 256] {
            let sets = [
                (KernelKind::FusedSoftmax, tiles::candidates(bq, bk, d, false, &limits)),
                (KernelKind::FusedEntmax, tiles::candidates(bq, bk, d, true, &limits)),
                // Each cache size: the smallest bucket, a middle one and the longest that fits.
                (KernelKind::FusedEntmaxCached, [1, 8, 1024 / bk].iter().flat_map(|&rows| tiles::cached_candidates(bq, bk, d, rows, &limits)).collect()),
            ];
            for (n, (kind, set)) in sets.into_iter().enumerate() {
                // The subgroup variants declare the same workgroup memory.
                for (tile, subgroups) in set.iter().flat_map(|t| [(*t, false), (*t, true)]) {
                    let key = KernelKey { kind, dtype: DType::F32, block_q: bq, block_k: bk, d_chunk: 0, fused: Some(tile), subgroups, vec4: d % 4 == 0 };
                    let src = shader_source(&key);
                    let module = naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{tile:?}: {}", e.emit_to_string(&src)));
                    let declared: u32 = module
                        .global_variables
                        .iter()
                        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
                        .map(|(_, g)| module.types[g.ty].inner.size(module.to_ctx()))
                        .sum();
                    assert_eq!(declared, tile.workgroup_bytes(), "{} {bq}x{bk} d {d} {tile:?} subgroups {subgroups}: WGSL declares {declared} bytes", kind.name());
                    assert!(declared <= limits.max_compute_workgroup_storage_size, "{tile:?}");
                    checked[n] += 1;
                }
            }
        }
    }
    assert!(checked.iter().all(|&c| c > 0), "tiles checked per kernel: {checked:?}");
}
