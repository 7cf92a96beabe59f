//! Shader sources, explicit bind-group layouts, and the pipeline cache (one compile per key).

use super::plan::DType;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const COMMON: &str = include_str!("../../shaders/common.wgsl");
const COMMON_PATTERN: &str = include_str!("../../shaders/common_pattern.wgsl");
const NORMALIZE_COMMON: &str = include_str!("../../shaders/normalize_common.wgsl");
const REDUCE_WORKGROUP: &str = include_str!("../../shaders/reduce_workgroup.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../../shaders/reduce_subgroup.wgsl");
const FUSED_LANES_SUBGROUP: &str = include_str!("../../shaders/fused_lanes_subgroup.wgsl");
const FUSED_LANES_WORKGROUP: &str = include_str!("../../shaders/fused_lanes_workgroup.wgsl");
const FUSED_COMMON: &str = include_str!("../../shaders/fused_common.wgsl");
const FUSED_TILES: &str = include_str!("../../shaders/fused_tiles.wgsl");
const FUSED_ENTMAX_COMMON: &str = include_str!("../../shaders/fused_entmax_common.wgsl");
const FUSED_IO_SCALAR: &str = include_str!("../../shaders/fused_io_scalar.wgsl");
const FUSED_IO_VEC4: &str = include_str!("../../shaders/fused_io_vec4.wgsl");
const MRA_NONE: &str = include_str!("../../shaders/mra_none.wgsl");
const MRA_ROWS: &str = include_str!("../../shaders/mra_rows.wgsl");
const MRA_WEIGHT_STORE: &str = include_str!("../../shaders/mra_weight_store.wgsl");
const MRA_WEIGHT_LOAD: &str = include_str!("../../shaders/mra_weight_load.wgsl");

/// The kernels of the three-kernel path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelKind {
    Sddmm,
    NormalizeSoftmax,
    NormalizeEntmax,
    Spmm,
    FusedSoftmax,
    FusedEntmax,
    /// Fused entmax for rows whose scores all fit on chip (tile `rc` > 0).
    FusedEntmaxCached,
    /// Batched `x·W + b` (Sparsefinder projections).
    Project,
    /// Fused softmax that also folds the MRA coarse remainder of each query block row.
    FusedSoftmaxMra,
    /// Softmax normaliser with the MRA remainder in its max and sum; writes each row's
    /// remainder weight.
    NormalizeSoftmaxMra,
    /// SpMM that adds each row's weighted MRA remainder.
    SpmmMra,
    /// Combines the fused softmax's key splits (split-K) into O.
    MergeSplits,
}

/// How a binding is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Uniform,
    Read,
    ReadWrite,
}

impl KernelKind {
    pub const ALL: [KernelKind; 12] = [
        KernelKind::Sddmm,
        KernelKind::NormalizeSoftmax,
        KernelKind::NormalizeEntmax,
        KernelKind::Spmm,
        KernelKind::FusedSoftmax,
        KernelKind::FusedEntmax,
        KernelKind::FusedEntmaxCached,
        KernelKind::Project,
        KernelKind::FusedSoftmaxMra,
        KernelKind::NormalizeSoftmaxMra,
        KernelKind::SpmmMra,
        KernelKind::MergeSplits,
    ];

    pub fn is_fused(self) -> bool {
        matches!(self, KernelKind::FusedSoftmax | KernelKind::FusedEntmax | KernelKind::FusedEntmaxCached | KernelKind::FusedSoftmaxMra)
    }

    /// Kernels that read the MRA remainder.
    pub fn is_mra(self) -> bool {
        matches!(self, KernelKind::FusedSoftmaxMra | KernelKind::NormalizeSoftmaxMra | KernelKind::SpmmMra)
    }

    /// Binding number of the MRA remainder rows (kernels that read them).
    fn mra_binding(self) -> Option<u32> {
        match self {
            KernelKind::FusedSoftmaxMra => Some(6),
            KernelKind::NormalizeSoftmaxMra => Some(4),
            KernelKind::SpmmMra => Some(5),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Sddmm => "sddmm",
            KernelKind::NormalizeSoftmax => "normalize_softmax",
            KernelKind::NormalizeEntmax => "normalize_entmax",
            KernelKind::Spmm => "spmm",
            KernelKind::FusedSoftmax => "fused_softmax",
            KernelKind::FusedEntmax => "fused_entmax",
            KernelKind::FusedEntmaxCached => "fused_entmax_cached",
            KernelKind::Project => "project",
            KernelKind::FusedSoftmaxMra => "fused_softmax_mra",
            KernelKind::NormalizeSoftmaxMra => "normalize_softmax_mra",
            KernelKind::SpmmMra => "spmm_mra",
            KernelKind::MergeSplits => "merge_splits",
        }
    }

    fn body(self) -> &'static str {
        match self {
            KernelKind::Sddmm => include_str!("../../shaders/sddmm.wgsl"),
            KernelKind::FusedSoftmaxMra => include_str!("../../shaders/fused_softmax.wgsl"),
            KernelKind::NormalizeSoftmaxMra => include_str!("../../shaders/normalize_softmax.wgsl"),
            KernelKind::SpmmMra => include_str!("../../shaders/spmm.wgsl"),
            KernelKind::NormalizeSoftmax => include_str!("../../shaders/normalize_softmax.wgsl"),
            KernelKind::NormalizeEntmax => include_str!("../../shaders/normalize_entmax.wgsl"),
            KernelKind::Spmm => include_str!("../../shaders/spmm.wgsl"),
            KernelKind::FusedSoftmax => include_str!("../../shaders/fused_softmax.wgsl"),
            KernelKind::FusedEntmax => include_str!("../../shaders/fused_entmax.wgsl"),
            KernelKind::FusedEntmaxCached => include_str!("../../shaders/fused_entmax_cached.wgsl"),
            KernelKind::Project => include_str!("../../shaders/project.wgsl"),
            KernelKind::MergeSplits => include_str!("../../shaders/merge_splits.wgsl"),
        }
    }

    /// The bindings, in order, as the shader declares them.
    pub fn bindings(self) -> &'static [Access] {
        use Access::*;
        match self {
            // params, q, k, pattern, scores
            KernelKind::Sddmm => &[Uniform, Read, Read, Read, ReadWrite],
            // params, pattern, scores, stats
            KernelKind::NormalizeSoftmax | KernelKind::NormalizeEntmax => &[Uniform, Read, ReadWrite, ReadWrite],
            // params, v, pattern, scores, o
            KernelKind::Spmm => &[Uniform, Read, Read, Read, ReadWrite],
            // params, q, k, v, pattern, o, path counts
            KernelKind::FusedEntmax | KernelKind::FusedEntmaxCached => &[Uniform, Read, Read, Read, Read, ReadWrite, ReadWrite],
            // params, q, k, v, pattern, o, key-split partials
            KernelKind::FusedSoftmax => &[Uniform, Read, Read, Read, Read, ReadWrite, ReadWrite],
            // params, x, w, b, y
            KernelKind::Project => &[Uniform, Read, Read, Read, ReadWrite],
            // fused softmax's first six, the MRA remainder rows, then the key-split partials
            KernelKind::FusedSoftmaxMra => &[Uniform, Read, Read, Read, Read, ReadWrite, Read, ReadWrite],
            // normaliser's, then the remainder rows and the per-row remainder weights
            KernelKind::NormalizeSoftmaxMra => &[Uniform, Read, ReadWrite, ReadWrite, Read, ReadWrite],
            // SpMM's, then the remainder rows and the per-row remainder weights
            KernelKind::SpmmMra => &[Uniform, Read, Read, Read, ReadWrite, Read, Read],
            // params, key-split partials, o
            KernelKind::MergeSplits => &[Uniform, Read, ReadWrite],
        }
    }
}

/// Everything that changes a compiled pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub kind: KernelKind,
    pub dtype: DType,
    pub block_q: u32,
    pub block_k: u32,
    /// SpMM output columns per workgroup (unused elsewhere; 0).
    pub d_chunk: u32,
    /// Fused kernels' tile (None for the three-kernel path).
    pub fused: Option<super::tiles::FusedTile>,
    /// Normalisers, and the fused kernels across a row's lanes, reduce with subgroup
    /// operations (SUBGROUP present and not switched off; for the fused kernels also a tile
    /// whose rows' lanes fit the adapter's smallest subgroup).
    pub subgroups: bool,
    /// Fused kernels load Q/K/V as vec4 (head_dim % 4 == 0).
    pub vec4: bool,
}

/// Full WGSL for a key: element alias, tile constants, the common prelude, the kernel.
pub fn shader_source(key: &KernelKey) -> String {
    if key.kind == KernelKind::Project {
        // Self-contained: f32 only, no pattern.
        return key.kind.body().to_string();
    }
    let mut s = String::new();
    let normalize = matches!(key.kind, KernelKind::NormalizeSoftmax | KernelKind::NormalizeEntmax | KernelKind::NormalizeSoftmaxMra);
    // No `enable subgroups;`: naga 30 does not parse that directive yet; subgroup builtins
    // are gated by the device's SUBGROUP feature instead.
    match key.dtype {
        DType::F32 => s.push_str("alias elem = f32;\n"),
        DType::F16 => s.push_str("enable f16;\nalias elem = f16;\n"),
    }
    s.push_str(&format!(
        "const BQ: u32 = {}u;\nconst BK: u32 = {}u;\nconst DCH: u32 = {}u;\n",
        key.block_q,
        key.block_k,
        key.d_chunk.max(16)
    ));
    if let Some(t) = key.fused {
        s.push_str(&format!(
            "const DP: u32 = {}u;\nconst TQ: u32 = {}u;\nconst KC: u32 = {}u;\nconst WG: u32 = {}u;\nconst CAP: u32 = {}u;\nconst RQ: u32 = {}u;\nconst KVT: u32 = {}u;\nconst VO: u32 = {}u;\nconst PS: u32 = {}u;\nconst RC: u32 = {}u;\nconst SUPPORT_SLOTS: u32 = {}u;\n",
            t.dp,
            t.tq,
            t.kc,
            t.wg,
            t.cap.max(1),
            t.rq.max(1),
            t.kv_tile_len(),
            t.v_offset(),
            t.p_stride(),
            t.rc.max(t.kc),
            t.support_slots()
        ));
    }
    s.push_str(COMMON);
    if key.kind != KernelKind::MergeSplits {
        s.push_str(COMMON_PATTERN);
    }
    if normalize {
        s.push_str(if key.subgroups { REDUCE_SUBGROUP } else { REDUCE_WORKGROUP });
        s.push_str(NORMALIZE_COMMON);
    }
    if key.kind.is_fused() {
        s.push_str(if key.vec4 { FUSED_IO_VEC4 } else { FUSED_IO_SCALAR });
        s.push_str(FUSED_COMMON);
        if let Some(t) = key.fused {
            s.push_str(&super::unroll::unroll(FUSED_TILES, &t.unroll_counts()));
        }
        s.push_str(if key.subgroups { FUSED_LANES_SUBGROUP } else { FUSED_LANES_WORKGROUP });
        if matches!(key.kind, KernelKind::FusedEntmax | KernelKind::FusedEntmaxCached) {
            // The branch counters' word indices, from the host's one list.
            for (i, name) in super::engine::EntmaxPaths::NAMES.iter().enumerate() {
                s.push_str(&format!("const PATH_{}: u32 = {i}u;\n", name.to_uppercase()));
            }
            s.push_str(FUSED_ENTMAX_COMMON);
        }
    }
    // MRA remainder hooks: real for the MRA kinds, no-ops for the plain kernels that call them.
    match key.kind.mra_binding() {
        Some(binding) => {
            s.push_str(&format!("@group(0) @binding({binding}) var<storage, read> mra_rem: array<f32>;\n"));
            s.push_str(MRA_ROWS);
            match key.kind {
                KernelKind::NormalizeSoftmaxMra => s.push_str(MRA_WEIGHT_STORE),
                KernelKind::SpmmMra => s.push_str(MRA_WEIGHT_LOAD),
                _ => {}
            }
        }
        None if matches!(key.kind, KernelKind::FusedSoftmax | KernelKind::NormalizeSoftmax | KernelKind::Spmm) => s.push_str(MRA_NONE),
        None => {}
    }
    if matches!(key.kind, KernelKind::FusedSoftmax | KernelKind::FusedSoftmaxMra) {
        let binding = key.kind.bindings().len() - 1;
        s.push_str(&format!("@group(0) @binding({binding}) var<storage, read_write> partial: array<f32>;\n"));
    }
    match key.fused {
        Some(t) if key.kind.is_fused() => s.push_str(&super::unroll::unroll(key.kind.body(), &t.unroll_counts())),
        _ => s.push_str(key.kind.body()),
    }
    s
}

/// A compiled pipeline with its bind-group layout.
#[derive(Debug)]
pub struct Kernel {
    pub key: KernelKey,
    pub layout: wgpu::BindGroupLayout,
    pub pipeline: wgpu::ComputePipeline,
}

/// Pipelines compiled once per key.
#[derive(Debug, Default)]
pub struct KernelCache {
    map: Mutex<HashMap<KernelKey, Arc<Kernel>>>,
}

impl KernelCache {
    /// The pipeline for `key`, compiling it on first use. A shader or pipeline the driver
    /// rejects is an `Error::Gpu` naming the kernel (not wgpu's default panic).
    pub fn get(&self, device: &wgpu::Device, key: KernelKey) -> crate::Result<Arc<Kernel>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = map.get(&key) {
            return Ok(k.clone());
        }
        let label = format!(
            "sparse-attn {} {:?} {}x{} dch{} {:?} sg{} v4{}",
            key.kind.name(),
            key.dtype,
            key.block_q,
            key.block_k,
            key.d_chunk,
            key.fused,
            key.subgroups,
            key.vec4
        );
        let (layout, mut pipelines) = compile_module(device, &label, &shader_source(&key), key.kind.bindings(), &["main"])?;
        let pipeline = pipelines.pop().ok_or_else(|| crate::Error::Gpu(format!("compiling {label}: no pipeline")))?;
        let kernel = Arc::new(Kernel { key, layout, pipeline });
        map.insert(key, kernel.clone());
        Ok(kernel)
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Error scopes for every kind of wgpu error: validation, out of memory, and internal (a
/// pipeline the driver fails to compile or link is an internal error, which without a scope
/// reaches the uncaptured-error handler, whose default panics).
pub(crate) struct ErrorScopes(Vec<wgpu::ErrorScopeGuard>);

impl ErrorScopes {
    pub(crate) fn push(device: &wgpu::Device) -> Self {
        Self([wgpu::ErrorFilter::Validation, wgpu::ErrorFilter::OutOfMemory, wgpu::ErrorFilter::Internal].into_iter().map(|f| device.push_error_scope(f)).collect())
    }

    /// Pops every scope, innermost first; the first error any of them caught.
    pub(crate) fn pop(mut self) -> Option<wgpu::Error> {
        let mut first = None;
        while let Some(scope) = self.0.pop() {
            if let Some(e) = pollster::block_on(scope.pop()) {
                first.get_or_insert(e);
            }
        }
        first
    }
}

impl Drop for ErrorScopes {
    /// Scopes left by an early return close innermost first too (a Vec drops from the front).
    fn drop(&mut self) {
        while let Some(scope) = self.0.pop() {
            drop(scope);
        }
    }
}

/// Compiles one WGSL module against an explicit bind-group layout (binding `i` used as
/// `bindings[i]`): one pipeline per entry point, in order, all sharing the layout. A shader or
/// pipeline the driver rejects is an `Error::Gpu` naming `label` (not wgpu's default panic).
/// The engine's kernels and the standalone GPU stages (low-rank, pooling, MRA low resolution)
/// all compile through here.
pub(crate) fn compile_module(
    device: &wgpu::Device,
    label: &str,
    source: &str,
    bindings: &[Access],
    entry_points: &[&str],
) -> crate::Result<(wgpu::BindGroupLayout, Vec<wgpu::ComputePipeline>)> {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
        .iter()
        .enumerate()
        .map(|(i, access)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match access {
                    Access::Uniform => wgpu::BufferBindingType::Uniform,
                    Access::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    Access::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let scope = ErrorScopes::push(device);
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(label), entries: &entries });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(label),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some(label), source: wgpu::ShaderSource::Wgsl(source.into()) });
    let pipelines = entry_points
        .iter()
        .map(|entry| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&format!("{label} {entry}")),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        })
        .collect();
    if let Some(e) = scope.pop() {
        return Err(crate::Error::Gpu(format!("compiling {label}: {e}")));
    }
    Ok((layout, pipelines))
}

/// Every (kind, dtype) source at one representative tile, for offline validation with naga.
pub fn all_shader_sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for kind in KernelKind::ALL {
        if kind == KernelKind::Project {
            let key = KernelKey { kind, dtype: DType::F32, block_q: 16, block_k: 16, d_chunk: 0, fused: None, subgroups: false, vec4: false };
            out.push(("project".to_string(), shader_source(&key)));
            continue;
        }
        for dtype in [DType::F32, DType::F16] {
            for (bq, bk) in [(16, 16), (32, 64), (128, 128)] {
                let plain = super::tiles::FusedTile { tq: 16, kc: 16, wg: 64, dp: 64, cap: 0, rq: 2, rc: 0 };
                let fused = kind.is_fused().then_some(match kind {
                    KernelKind::FusedEntmax => super::tiles::FusedTile { cap: 64, ..plain },
                    KernelKind::FusedEntmaxCached => super::tiles::FusedTile { rc: 128, ..plain },
                    _ => plain,
                });
                for (subgroups, vec4) in [(false, false), (true, true)] {
                    let key = KernelKey { kind, dtype, block_q: bq, block_k: bk, d_chunk: 64, fused, subgroups, vec4 };
                    out.push((format!("{} {:?} {bq}x{bk} subgroups={subgroups} vec4={vec4}", kind.name(), dtype), shader_source(&key)));
                }
            }
        }
    }
    // Standalone kernels outside the KernelKey cache.
    out.push(("mra_lowres".to_string(), crate::patterns::mra::gpu::SHADER.to_string()));
    out
}
