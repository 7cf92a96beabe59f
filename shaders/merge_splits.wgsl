// Merges the key splits of the fused softmax kernel: for each query row, the splits'
// (m_s, l_s, O_s) combine as M = max m_s, L = Σ l_s·exp(m_s − M), O = Σ O_s·exp(m_s − M) / L,
// in split order (deterministic). One workgroup per query row; splits with l = 0 (no keys)
// drop out, and a row with no keys at all gives 0.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> partial: array<f32>;
@group(0) @binding(2) var<storage, read_write> o: array<elem>;

const MERGE_WG: u32 = 64u;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let w = linear_workgroup(wid, nwg); // chunk-local query row: local virtual row · BQ + row
    if (w >= params.row_count * BQ) {
        return;
    }
    let vrow = params.row_base + w / BQ;
    let i = (vrow % params.q_blocks) * BQ + w % BQ;
    if (i >= params.seq_q) {
        return;
    }
    let splits = max(params.key_splits, 1u);
    let stride = params.head_dim + 2u;
    let base = w * splits * stride;
    if (base + splits * stride > arrayLength(&partial)) {
        return;
    }
    var mx = NEG_BIG;
    for (var s = 0u; s < splits; s++) {
        if (partial[base + s * stride + 1u] > 0.0) {
            mx = max(mx, partial[base + s * stride]);
        }
    }
    var total = 0.0;
    for (var s = 0u; s < splits; s++) {
        let l = partial[base + s * stride + 1u];
        if (l > 0.0) {
            total += l * exp(partial[base + s * stride] - mx);
        }
    }
    let inv = select(0.0, 1.0 / total, total > 0.0);
    let out = (slice_of_row(vrow) * params.seq_q + i) * params.head_dim - params.o_base;
    for (var c = lid; c < params.head_dim; c += MERGE_WG) {
        if (out + c >= arrayLength(&o)) {
            break;
        }
        var acc = 0.0;
        for (var s = 0u; s < splits; s++) {
            let l = partial[base + s * stride + 1u];
            if (l > 0.0) {
                acc += partial[base + s * stride + 2u + c] * exp(partial[base + s * stride] - mx);
            }
        }
        o[out + c] = elem(acc * inv);
    }
}
