// Fused kernels' Q/K/V as scalar arrays: 4-wide loads element by element, each guarded
// (any head_dim).

@group(0) @binding(1) var<storage, read> q: array<elem>;
@group(0) @binding(2) var<storage, read> k: array<elem>;
@group(0) @binding(3) var<storage, read> v: array<elem>;

// Elements d0..d0+3 of the row starting at global index `row_base`; zeros past head_dim, past
// the binding (a wrong window base wraps to a huge u32, which wgpu would clamp silently) or
// when `ok` is false.
fn load_q4(row_base: u32, d0: u32, ok: bool) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let at = row_base + d0 + c - params.q_base;
        if (ok && d0 + c < params.head_dim && at < arrayLength(&q)) {
            x[c] = f32(q[at]);
        }
    }
    return x;
}

fn load_k4(row_base: u32, d0: u32, ok: bool) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let at = row_base + d0 + c - params.kv_base;
        if (ok && d0 + c < params.head_dim && at < arrayLength(&k)) {
            x[c] = f32(k[at]);
        }
    }
    return x;
}

fn load_v4(row_base: u32, d0: u32, ok: bool) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let at = row_base + d0 + c - params.kv_base;
        if (ok && d0 + c < params.head_dim && at < arrayLength(&v)) {
            x[c] = f32(v[at]);
        }
    }
    return x;
}
