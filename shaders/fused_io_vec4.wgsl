// Fused kernels' Q/K/V as vec4 arrays: one vectorised load per 4 elements. Used when
// head_dim % 4 == 0 (so rows start on a vec4) and the planner aligns binding windows to
// 16 bytes (so the window bases are multiples of 4 elements).

@group(0) @binding(1) var<storage, read> q: array<vec4<elem>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<elem>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<elem>>;

fn load_q4(row_base: u32, d0: u32, ok: bool) -> vec4<f32> {
    if (!ok || d0 >= params.head_dim) {
        return vec4<f32>(0.0);
    }
    return vec4<f32>(q[(row_base + d0 - params.q_base) / 4u]);
}

fn load_k4(row_base: u32, d0: u32, ok: bool) -> vec4<f32> {
    if (!ok || d0 >= params.head_dim) {
        return vec4<f32>(0.0);
    }
    return vec4<f32>(k[(row_base + d0 - params.kv_base) / 4u]);
}

fn load_v4(row_base: u32, d0: u32, ok: bool) -> vec4<f32> {
    if (!ok || d0 >= params.head_dim) {
        return vec4<f32>(0.0);
    }
    return vec4<f32>(v[(row_base + d0 - params.kv_base) / 4u]);
}
