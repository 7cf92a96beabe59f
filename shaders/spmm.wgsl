// P·V (SpMM): one workgroup per (query block row, chunk of DCH output columns). Walks the
// row's stored blocks, stages V in workgroup memory, and writes O once. A row with no blocks
// writes zeros.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> v: array<elem>;
@group(0) @binding(2) var<storage, read> pat: array<u32>;
@group(0) @binding(3) var<storage, read> scores: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<elem>;

const WG: u32 = 256u;
const TPR: u32 = WG / BQ;      // threads per output row
const CPT: u32 = DCH / TPR;    // output columns per thread
const KC: u32 = 16u;           // keys staged per step

var<workgroup> v_s: array<f32, KC * DCH>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let w = linear_workgroup(wid, nwg);
    if (w >= params.row_count * params.d_chunks) {
        return;
    }
    let vrow = params.row_base + w / params.d_chunks;
    let col0 = (w % params.d_chunks) * DCH;
    let slice = slice_of_row(vrow);
    let qb = vrow % params.q_blocks;
    let d = params.head_dim;
    let v_slice0 = kv_slice_of(slice) * params.seq_kv;
    let blocks = row_block_range(vrow);

    let row = lid / TPR;
    let lane = lid % TPR;
    var acc: array<f32, CPT>;
    for (var j = 0u; j < CPT; j++) {
        acc[j] = 0.0;
    }
    for (var b = blocks.x; b < blocks.y; b++) {
        let kb = pat_word(params.off_col_idx + b);
        let p0 = tile_of(slice, b) * (BQ * BK) + row * BK - params.scores_base;
        for (var kc = 0u; kc < BK; kc += KC) {
            for (var idx = lid; idx < KC * DCH; idx += WG) {
                let key = kb * BK + kc + idx / DCH;
                let col = col0 + idx % DCH;
                var x = 0.0;
                // Each index is also checked against its binding (a wrong window base wraps to a
                // huge u32, which wgpu would clamp silently).
                let at = (v_slice0 + key) * d + col - params.kv_base;
                if (key < params.seq_kv && col < d && at < arrayLength(&v)) {
                    x = f32(v[at]);
                }
                v_s[idx] = x;
            }
            workgroupBarrier();
            for (var kk = 0u; kk < KC; kk++) {
                var p = 0.0;
                if (p0 + kc + kk < arrayLength(&scores)) {
                    p = scores[p0 + kc + kk];
                }
                if (p != 0.0) {
                    for (var j = 0u; j < CPT; j++) {
                        acc[j] += p * v_s[kk * DCH + lane + j * TPR];
                    }
                }
            }
            workgroupBarrier();
        }
    }
    let i = qb * BQ + row;
    if (i < params.seq_q) {
        let out0 = (slice * params.seq_q + i) * d - params.o_base;
        for (var j = 0u; j < CPT; j++) {
            let col = col0 + lane + j * TPR;
            if (col < d && out0 + col < arrayLength(&o)) {
                // MRA: + weight * N of the row's folded remainder (0 without one).
                o[out0 + col] = elem(acc[j] + mra_weighted(vrow, row, col));
            }
        }
    }
}
