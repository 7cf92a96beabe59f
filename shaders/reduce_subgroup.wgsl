// Workgroup reductions for the normalisers with subgroup operations: reduce within each
// subgroup (no barriers), one lane per subgroup publishes its partial, and every thread sums
// the NT slots in index order (deterministic; two barriers instead of log2(NT)). Makes no
// assumption about the subgroup size or how subgroups map onto invocation indices.

var<workgroup> red: array<vec4<f32>, NT>;

fn reduce_sum(lid: u32, x: vec4<f32>) -> vec4<f32> {
    let s = subgroupAdd(x);
    let first = subgroupExclusiveAdd(1u) == 0u;
    red[lid] = select(vec4<f32>(0.0), s, first);
    workgroupBarrier();
    var total = vec4<f32>(0.0);
    for (var j = 0u; j < NT; j++) {
        total += red[j];
    }
    workgroupBarrier();
    return total;
}

fn reduce_max_count(lid: u32, m: f32, n: f32) -> vec2<f32> {
    let sm = subgroupMax(m);
    let sn = subgroupAdd(n);
    let first = subgroupExclusiveAdd(1u) == 0u;
    red[lid] = select(vec4<f32>(NEG_BIG, 0.0, 0.0, 0.0), vec4<f32>(sm, sn, 0.0, 0.0), first);
    workgroupBarrier();
    var total = vec2<f32>(NEG_BIG, 0.0);
    for (var j = 0u; j < NT; j++) {
        total = vec2<f32>(max(total.x, red[j].x), total.y + red[j].y);
    }
    workgroupBarrier();
    return total;
}
