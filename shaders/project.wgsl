// Batched row projection y = x·W + b (Sparsefinder's low-dimensional q', k'): one thread per
// output row; x [rows, DIM] of one slice window, W [DIM, RANK] row-major, b [RANK].

struct ProjectParams {
    rows: u32,
    dim: u32,
    rank: u32,
    x_base: u32,
    w_base: u32,
    b_base: u32,
    y_base: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> pp: ProjectParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

const MAX_RANK: u32 = 32u;

// Element `i` of x, W or b, 0 past the array's end (the host sizes every binding from the
// same dims; this keeps a bad offset from reading a clamped neighbour).
fn x_at(i: u32) -> f32 {
    if (i >= arrayLength(&x)) {
        return 0.0;
    }
    return x[i];
}

fn w_at(i: u32) -> f32 {
    if (i >= arrayLength(&w)) {
        return 0.0;
    }
    return w[i];
}

fn bias_at(i: u32) -> f32 {
    if (i >= arrayLength(&bias)) {
        return 0.0;
    }
    return bias[i];
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.y * nwg.x * 64u + gid.x;
    if (row >= pp.rows || pp.rank > MAX_RANK) {
        return;
    }
    var acc: array<f32, MAX_RANK>;
    for (var c = 0u; c < pp.rank; c++) {
        acc[c] = bias_at(pp.b_base + c);
    }
    for (var a = 0u; a < pp.dim; a++) {
        let xa = x_at(pp.x_base + row * pp.dim + a);
        for (var c = 0u; c < pp.rank; c++) {
            acc[c] += xa * w_at(pp.w_base + a * pp.rank + c);
        }
    }
    for (var c = 0u; c < pp.rank; c++) {
        let i = pp.y_base + row * pp.rank + c;
        if (i < arrayLength(&y)) {
            y[i] = acc[c];
        }
    }
}
