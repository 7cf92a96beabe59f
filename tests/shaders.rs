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
