// Fused kernels' Q/K/V as vec4 arrays: one vectorised load per 4 elements. Used when
// head_dim % 4 == 0 (so rows start on a vec4) and the planner aligns binding windows to
// 16 bytes (so the window bases are multiples of 4 elements). Zeros past head_dim, past the
// binding (a wrong window base wraps to a huge u32, which wgpu would clamp silently) or when
// `ok` is false.

@group(0) @binding(1) var<storage, read> q: array<vec4<elem>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<elem>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<elem>>;

fn load_q4(row_base: u32, d0: u32, ok: bool) -> vec4<f32> {
    let at = (row_base + d0 - params.q_base) / 4u;
    if (!ok || d0 >= params.head_dim || at >= arrayLength(&q)) {
        return vec4<f32>(0.0);
    }
    return vec4<f32>(q[at]);
}

fn load_k4(row_base: u32, d0: u32, ok: bool) -> vec4<f32> {
    let at = (row_base + d0 - params.kv_base) / 4u;
    if (!ok || d0 >= params.head_dim || at >= arrayLength(&k)) {
        return vec4<f32>(0.0);
    }
    return vec4<f32>(k[at]);
}

fn load_v4(row_base: u32, d0: u32, ok: bool) -> vec4<f32> {
    let at = (row_base + d0 - params.kv_base) / 4u;
    if (!ok || d0 >= params.head_dim || at >= arrayLength(&v)) {
        return vec4<f32>(0.0);
    }
    return vec4<f32>(v[at]);
}
