//! Adapter choice, explicit features and limits, and the capabilities the kernels may use.

use crate::error::{Error, Result};

/// Optional features this device has and the engine will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// `SHADER_F16`: f16 storage for Q, K, V, O.
    pub f16: bool,
    /// `SUBGROUP`: subgroup reductions.
    pub subgroups: bool,
    /// The adapter's smallest subgroup (invocations; 0 without `subgroups`): the fused
    /// kernels use subgroups only for tiles whose rows' lanes fit it.
    pub subgroup_min_size: u32,
    /// `TIMESTAMP_QUERY`: GPU-side timing.
    pub timestamps: bool,
}

/// Env switch forcing the f32 fallback even when SHADER_F16 is present.
pub const ENV_NO_F16: &str = "SPARSE_ATTN_NO_F16";
/// Env switch forcing the workgroup-memory reductions even when SUBGROUP is present.
pub const ENV_NO_SUBGROUPS: &str = "SPARSE_ATTN_NO_SUBGROUPS";
/// Env variable choosing the adapter: a backend name or a substring of the adapter name.
pub const ENV_ADAPTER: &str = "SPARSE_ATTN_ADAPTER";

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Limits below which no kernel can run: required, and checked before the device request.
pub fn required_limits_check(l: &wgpu::Limits) -> Result<()> {
    let checks: [(&'static str, u64, u64); 6] = [
        ("max_compute_invocations_per_workgroup", 256, l.max_compute_invocations_per_workgroup as u64),
        ("max_compute_workgroup_size_x", 256, l.max_compute_workgroup_size_x as u64),
        ("max_compute_workgroup_storage_size", 16384, l.max_compute_workgroup_storage_size as u64),
        ("max_storage_buffers_per_shader_stage", 4, l.max_storage_buffers_per_shader_stage as u64),
        ("max_compute_workgroups_per_dimension", 1, l.max_compute_workgroups_per_dimension as u64),
        ("max_uniform_buffer_binding_size", 128, l.max_uniform_buffer_binding_size),
    ];
    for (limit, required, available) in checks {
        if available < required {
            return Err(Error::Limit { limit, required, available });
        }
    }
    Ok(())
}

/// Optional features wanted from an adapter, minus those switched off by env.
pub fn wanted_features(available: wgpu::Features) -> wgpu::Features {
    let mut f = wgpu::Features::empty();
    if available.contains(wgpu::Features::SHADER_F16) && !env_flag(ENV_NO_F16) {
        f |= wgpu::Features::SHADER_F16;
    }
    if available.contains(wgpu::Features::SUBGROUP) && !env_flag(ENV_NO_SUBGROUPS) {
        f |= wgpu::Features::SUBGROUP;
    }
    if available.contains(wgpu::Features::TIMESTAMP_QUERY) {
        f |= wgpu::Features::TIMESTAMP_QUERY;
    }
    f
}

pub fn capabilities(enabled: wgpu::Features, info: &wgpu::AdapterInfo) -> Capabilities {
    let subgroups = enabled.contains(wgpu::Features::SUBGROUP) && !env_flag(ENV_NO_SUBGROUPS);
    Capabilities {
        f16: enabled.contains(wgpu::Features::SHADER_F16) && !env_flag(ENV_NO_F16),
        subgroups,
        subgroup_min_size: if subgroups { info.subgroup_min_size } else { 0 },
        timestamps: enabled.contains(wgpu::Features::TIMESTAMP_QUERY),
    }
}

pub fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle().with_env())
}

/// All adapters wgpu can see.
pub fn enumerate_adapters() -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// Whether `filter` (a backend name, or a case-insensitive substring of the name) picks `info`.
pub fn adapter_matches(info: &wgpu::AdapterInfo, filter: &str) -> bool {
    let f = filter.to_ascii_lowercase();
    let backend = info.backend.to_str().to_ascii_lowercase();
    backend == f || info.name.to_ascii_lowercase().contains(&f)
}

/// Picks the best adapter: discrete, then integrated, virtual, CPU; `filter` narrows the choice.
pub fn choose_adapter(filter: Option<&str>) -> Result<wgpu::Adapter> {
    let adapters = enumerate_adapters();
    if adapters.is_empty() {
        return Err(Error::NoAdapter(
            "wgpu found no adapter (on Linux without a GPU, install Mesa's lavapipe: mesa-vulkan-drivers)".into(),
        ));
    }
    let names: Vec<String> = adapters.iter().map(|a| format!("{} ({:?})", a.get_info().name, a.get_info().backend)).collect();
    let mut candidates: Vec<wgpu::Adapter> = adapters
        .into_iter()
        .filter(|a| filter.is_none_or(|f| adapter_matches(&a.get_info(), f)))
        .filter(|a| a.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS))
        .collect();
    candidates.sort_by_key(|a| rank(a.get_info().device_type));
    candidates.into_iter().next().ok_or_else(|| {
        Error::NoAdapter(format!(
            "no compute-capable adapter matches {ENV_ADAPTER}={:?}; available: {}",
            filter.unwrap_or(""),
            names.join(", ")
        ))
    })
}
