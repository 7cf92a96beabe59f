// Fused block-sparse softmax attention (FlashAttention-style online softmax), register-tiled:
// no scores buffer, exp once per score, O written once.
//
// A workgroup owns TQ query rows of one query block (or, with split-K, one range of the row's
// stored blocks). Its WG threads form TY = TQ/RQ row groups × TX lanes. Per chunk of KC keys
// (K and V staged in workgroup memory), thread (ty, tx) scores RQ rows × NK keys (keys tx,
// tx+TX, …: consecutive lanes read consecutive rows of the padded K tile, so no bank
// conflicts), the row maxima meet in `red`, p = exp(s − m) goes to `p_tile`, and the thread
// accumulates RQ rows × NC vec4 output columns (tx, tx+TX, …) in registers. Each Q/K value read
// from workgroup memory feeds RQ or NK multiply-adds instead of one. Loops marked `@unroll` are
// unrolled by the host (src/gpu/unroll.rs) so the register tiles stay in registers. Sums run in
// a fixed order, so results are deterministic.

const TY: u32 = TQ / RQ;
const TX: u32 = WG / TY;
const NK: u32 = KC / TX;
const NC: u32 = (DP4 + TX - 1u) / TX;
const KS: u32 = DP4 + 1u; // padded row stride (vec4s) of q_tile and k_tile
const PS: u32 = KC + 1u;  // padded row stride of p_tile

var<workgroup> q_tile: array<vec4<f32>, TQ * KS>;
var<workgroup> k_tile: array<vec4<f32>, KC * KS>;
var<workgroup> v_tile: array<vec4<f32>, KC * DP4>;
var<workgroup> p_tile: array<f32, TQ * PS>;
var<workgroup> red: array<f32, TQ * TX>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let w = linear_workgroup(wid, nwg);
    let splits = max(params.key_splits, 1u);
    if (w >= params.row_count * (BQ / TQ) * splits) {
        return;
    }
    // Split-K: split `split` of `splits` walks its share of the row's stored blocks and leaves
    // (m, l, unnormalised O) for merge_splits.wgsl.
    var t = tile_of_workgroup(w / splits);
    let split = w % splits;
    let n_blocks = t.last - t.first;
    t.last = t.first + n_blocks * (split + 1u) / splits;
    t.first = t.first + n_blocks * split / splits;
    let ty = lid / TX;
    let tx = lid % TX;
    for (var idx = lid; idx < TQ * DP4; idx += WG) {
        let r = idx / DP4;
        let i = t.qb * BQ + t.row0 + r;
        q_tile[r * KS + idx % DP4] = load_q4((t.slice * params.seq_q + i) * params.head_dim, (idx % DP4) * 4u, i < params.seq_q);
    }
    var m: array<f32, RQ>;
    var l: array<f32, RQ>;
    var acc: array<vec4<f32>, RQ * NC>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        m[r] = NEG_BIG;
    }
    for (var b = t.first; b < t.last; b++) {
        let kb = pat[params.off_col_idx + b];
        let full = pat[params.off_mask_of + b] == FULL_BLOCK;
        for (var kc = 0u; kc < BK; kc += KC) {
            let key0 = kb * BK + kc;
            if (key0 >= params.seq_kv) {
                break; // the rest of a ragged last block holds no keys
            }
            for (var idx = lid; idx < KC * DP4; idx += WG) {
                let key = key0 + idx / DP4;
                let d0 = (idx % DP4) * 4u;
                let base = (t.kv_row0 + key) * params.head_dim;
                let ok = key < params.seq_kv;
                k_tile[(idx / DP4) * KS + idx % DP4] = load_k4(base, d0, ok);
                v_tile[idx] = load_v4(base, d0, ok);
            }
            workgroupBarrier();
            // Scores: RQ rows × NK keys per thread.
            var s: array<f32, RQ * NK>;
            for (var d4 = 0u; d4 < DP4; d4++) {
                var kv: array<vec4<f32>, NK>;
                for (var j = 0u; j < NK; j++) { // @unroll
                    kv[j] = k_tile[(tx + j * TX) * KS + d4];
                }
                for (var r = 0u; r < RQ; r++) { // @unroll
                    let qv = q_tile[(ty * RQ + r) * KS + d4];
                    for (var j = 0u; j < NK; j++) { // @unroll
                        s[r * NK + j] += dot(qv, kv[j]);
                    }
                }
            }
            for (var r = 0u; r < RQ; r++) { // @unroll
                let rr = t.row0 + ty * RQ + r;
                let row_ok = t.qb * BQ + rr < params.seq_q;
                var part_max = NEG_BIG;
                for (var j = 0u; j < NK; j++) { // @unroll
                    let kk = tx + j * TX;
                    var ok = row_ok && key0 + kk < params.seq_kv;
                    if (ok && !full) {
                        ok = allowed(b, t.qb, rr, kc + kk);
                    }
                    let x = select(NEG_BIG, s[r * NK + j] * params.scale, ok);
                    s[r * NK + j] = x;
                    part_max = max(part_max, x);
                }
                red[(ty * RQ + r) * TX + tx] = part_max;
            }
            workgroupBarrier();
            // Online softmax: the row's max over its TX lanes (the same on every lane), p once
            // per score, each lane's share of the row sum, and the rescaled accumulators.
            for (var r = 0u; r < RQ; r++) { // @unroll
                let row = ty * RQ + r;
                var m_new = m[r];
                for (var u = 0u; u < TX; u++) {
                    m_new = max(m_new, red[row * TX + u]);
                }
                let corr = exp(m[r] - m_new);
                var l_chunk = 0.0;
                for (var j = 0u; j < NK; j++) { // @unroll
                    let x = s[r * NK + j];
                    let p = select(0.0, exp(x - m_new), x > NEG_BIG);
                    l_chunk += p;
                    p_tile[row * PS + tx + j * TX] = p;
                }
                l[r] = l[r] * corr + l_chunk;
                m[r] = m_new;
                for (var c = 0u; c < NC; c++) { // @unroll
                    acc[r * NC + c] *= corr;
                }
            }
            workgroupBarrier();
            // O += P·V: RQ rows × NC vec4 columns per thread.
            for (var kk = 0u; kk < KC; kk++) {
                var vv: array<vec4<f32>, NC>;
                for (var c = 0u; c < NC; c++) { // @unroll
                    let col = tx + c * TX;
                    if (col < DP4) {
                        vv[c] = v_tile[kk * DP4 + col];
                    }
                }
                for (var r = 0u; r < RQ; r++) { // @unroll
                    let p = p_tile[(ty * RQ + r) * PS + kk];
                    for (var c = 0u; c < NC; c++) { // @unroll
                        acc[r * NC + c] += p * vv[c];
                    }
                }
            }
            workgroupBarrier();
        }
    }
    // MRA: fold the query block row's coarse remainder (r, S, N) into the same running max,
    // sum (lane 0 takes S) and accumulators (mra_none.wgsl makes this a no-op).
    let vrow = t.slice * params.q_blocks + t.qb;
    var rem = mra_row(vrow);
    if (split != 0u) {
        rem.y = 0.0; // the remainder joins the softmax once, through split 0
    }
    if (rem.y > 0.0) {
        for (var r = 0u; r < RQ; r++) { // @unroll
            let m_new = max(m[r], rem.x);
            let corr = exp(m[r] - m_new);
            let wr = exp(rem.x - m_new);
            l[r] = l[r] * corr + select(0.0, rem.y * wr, tx == 0u);
            for (var c = 0u; c < NC; c++) { // @unroll
                let c0 = (tx + c * TX) * 4u;
                let n = vec4<f32>(mra_value(vrow, c0), mra_value(vrow, c0 + 1u), mra_value(vrow, c0 + 2u), mra_value(vrow, c0 + 3u));
                acc[r * NC + c] = acc[r * NC + c] * corr + wr * n;
            }
            m[r] = m_new;
        }
    }
    // Each lane held its share of the row sum: add the row's lanes in lane order.
    for (var r = 0u; r < RQ; r++) { // @unroll
        red[(ty * RQ + r) * TX + tx] = l[r];
    }
    workgroupBarrier();
    for (var r = 0u; r < RQ; r++) { // @unroll
        let row = ty * RQ + r;
        var total = 0.0;
        for (var u = 0u; u < TX; u++) {
            total += red[row * TX + u];
        }
        let inv = select(0.0, 1.0 / total, total > 0.0);
        let i = t.qb * BQ + t.row0 + row;
        if (splits > 1u) {
            // Partial of (query row, split): [m, l, O_0 … O_{d−1}] (O not yet divided by l).
            let at = (((vrow - params.row_base) * BQ + t.row0 + row) * splits + split) * (params.head_dim + 2u);
            if (tx == 0u && at + 1u < arrayLength(&partial)) {
                partial[at] = m[r];
                partial[at + 1u] = total;
            }
            for (var c = 0u; c < NC; c++) { // @unroll
                let c0 = (tx + c * TX) * 4u;
                for (var e = 0u; e < 4u; e++) { // @unroll
                    if (c0 + e < params.head_dim && at + 2u + c0 + e < arrayLength(&partial)) {
                        partial[at + 2u + c0 + e] = acc[r * NC + c][e];
                    }
                }
            }
        } else if (i < params.seq_q) {
            let base = (t.slice * params.seq_q + i) * params.head_dim - params.o_base;
            for (var c = 0u; c < NC; c++) { // @unroll
                let c0 = (tx + c * TX) * 4u;
                for (var e = 0u; e < 4u; e++) { // @unroll
                    if (c0 + e < params.head_dim) {
                        o[base + c0 + e] = elem(acc[r * NC + c][e] * inv);
                    }
                }
            }
        }
    }
}
