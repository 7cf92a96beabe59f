// Workgroup reductions for the normalisers through workgroup memory (tree, log2(NT) barriers).
// Used when the adapter has no SUBGROUP feature or SPARSE_ATTN_NO_SUBGROUPS is set.

var<workgroup> red: array<vec4<f32>, NT>;

// Sum over the workgroup; every thread gets the (uniform) total.
fn reduce_sum(lid: u32, x: vec4<f32>) -> vec4<f32> {
    red[lid] = x;
    workgroupBarrier();
    for (var s = NT / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&red[0]);
    workgroupBarrier();
    return total;
}

// (max, count) over the workgroup.
fn reduce_max_count(lid: u32, m: f32, n: f32) -> vec2<f32> {
    red[lid] = vec4<f32>(m, n, 0.0, 0.0);
    workgroupBarrier();
    for (var s = NT / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let a = red[lid];
            let b = red[lid + s];
            red[lid] = vec4<f32>(max(a.x, b.x), a.y + b.y, 0.0, 0.0);
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&red[0]);
    workgroupBarrier();
    return total.xy;
}

