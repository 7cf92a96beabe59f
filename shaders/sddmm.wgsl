// Sparse QKᵀ (SDDMM): one workgroup per stored block (tile) of the chunk; each computes the
// BQ×BK tile of `scale · q·k` into the scores buffer. Masks are applied by the normaliser.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<elem>;
@group(0) @binding(2) var<storage, read> k: array<elem>;
@group(0) @binding(3) var<storage, read> pat: array<u32>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;

const WG: u32 = 256u;
const TPR: u32 = WG / BQ;      // threads per tile row
const CPT: u32 = BK / TPR;     // tile columns per thread
const DC: u32 = 8u;            // head_dim slice staged per step

var<workgroup> q_s: array<f32, BQ * DC>;
var<workgroup> k_s: array<f32, BK * DC>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let w = linear_workgroup(wid, nwg);
    if (w >= params.tile_count) {
        return;
    }
    let tile = params.tile_base + w;
    var b = tile;
    if (params.shared_pattern == 1u) {
        b = tile % params.nnz_per_slice;
    }
    let prow = pat_word(params.off_blk_row + b);
    let qb = prow % params.q_blocks;
    let slice = select(prow / params.q_blocks, tile / params.nnz_per_slice, params.shared_pattern == 1u);
    let kb = pat_word(params.off_col_idx + b);
    let d = params.head_dim;
    let q_row0 = slice * params.seq_q + qb * BQ;              // global row of Q
    let k_row0 = kv_slice_of(slice) * params.seq_kv + kb * BK; // global row of K

    let row = lid / TPR;
    let lane = lid % TPR;
    var acc: array<f32, CPT>;
    for (var j = 0u; j < CPT; j++) {
        acc[j] = 0.0;
    }
    for (var d0 = 0u; d0 < d; d0 += DC) {
        for (var idx = lid; idx < BQ * DC; idx += WG) {
            let r = idx / DC;
            let dd = d0 + idx % DC;
            var x = 0.0;
            // Each index is also checked against its binding (a wrong window base wraps to a huge
            // u32, which wgpu would clamp silently).
            let at = (q_row0 + r) * d + dd - params.q_base;
            if (qb * BQ + r < params.seq_q && dd < d && at < arrayLength(&q)) {
                x = f32(q[at]);
            }
            q_s[idx] = x;
        }
        for (var idx = lid; idx < BK * DC; idx += WG) {
            let c = idx / DC;
            let dd = d0 + idx % DC;
            var x = 0.0;
            let at = (k_row0 + c) * d + dd - params.kv_base;
            if (kb * BK + c < params.seq_kv && dd < d && at < arrayLength(&k)) {
                x = f32(k[at]);
            }
            k_s[idx] = x;
        }
        workgroupBarrier();
        for (var dd = 0u; dd < DC; dd++) {
            let qv = q_s[row * DC + dd];
            for (var j = 0u; j < CPT; j++) {
                acc[j] += qv * k_s[(lane + j * TPR) * DC + dd];
            }
        }
        workgroupBarrier();
    }
    let out0 = tile * (BQ * BK) + row * BK - params.scores_base;
    for (var j = 0u; j < CPT; j++) {
        let at = out0 + lane + j * TPR;
        if (at < arrayLength(&scores)) {
            scores[at] = acc[j] * params.scale;
        }
    }
}
