// Fused block-sparse softmax attention (FlashAttention-style online softmax): no scores
// buffer. Each thread keeps its row's running max m (identical across the row's TPR threads),
// its share of the running sum l, and CPT output columns; exp is taken once per score; O is
// written once.

var<workgroup> share: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let w = linear_workgroup(wid, nwg);
    if (w >= params.row_count * (BQ / TQ)) {
        return;
    }
    let t = tile_of_workgroup(w);
    let row = lid / TPR;
    let lane = lid % TPR;
    load_q_tile(t, lid);
    var m = NEG_BIG;
    var l = 0.0;
    var acc: array<f32, CPT>;
    for (var j = 0u; j < CPT; j++) {
        acc[j] = 0.0;
    }
    for (var b = t.first; b < t.last; b++) {
        let kb = pat[params.off_col_idx + b];
        for (var kc = 0u; kc < BK; kc += KC) {
            if (kb * BK + kc >= params.seq_kv) {
                break; // the rest of a ragged last block holds no keys
            }
            load_k_chunk(t, kb, kc, lid);
            load_v_chunk(t, kb, kc, lid);
            workgroupBarrier();
            share[lid] = score_chunk(t, b, kc, lid);
            workgroupBarrier();
            // Chunk max over the row from the lanes' maxima, then each lane turns its own
            // entries into p once (in place: no lane reads another's entries here); the row's
            // lanes share m, so their partial sums of p add up to l.
            var m_new = m;
            for (var j = 0u; j < TPR; j++) {
                m_new = max(m_new, share[row * TPR + j]);
            }
            let corr = exp(m - m_new);
            var l_chunk = 0.0;
            for (var kk = lane; kk < KC; kk += TPR) {
                let s = s_tile[row * KC + kk];
                var p = 0.0;
                if (s > NEG_BIG) {
                    p = exp(s - m_new);
                }
                l_chunk += p;
                s_tile[row * KC + kk] = p;
            }
            l = l * corr + l_chunk;
            m = m_new;
            workgroupBarrier();
            for (var j = 0u; j < CPT; j++) {
                acc[j] *= corr;
            }
            for (var kk = 0u; kk < KC; kk++) {
                let p = s_tile[row * KC + kk];
                if (p > 0.0) {
                    for (var j = 0u; j < CPT; j++) {
                        acc[j] += p * v_tile[kk * DP + lane + j * TPR];
                    }
                }
            }
            workgroupBarrier();
        }
    }
    // MRA: fold the query block row's coarse remainder (r, S, N) into the same running max,
    // sum (lane 0 takes S) and accumulator (mra_none.wgsl makes this a no-op).
    let rem = mra_row(t.slice * params.q_blocks + t.qb);
    if (rem.y > 0.0) {
        let m_new = max(m, rem.x);
        let corr = exp(m - m_new);
        let wr = exp(rem.x - m_new);
        l = l * corr + select(0.0, rem.y * wr, lane == 0u);
        for (var j = 0u; j < CPT; j++) {
            acc[j] = acc[j] * corr + wr * mra_value(t.slice * params.q_blocks + t.qb, lane + j * TPR);
        }
        m = m_new;
    }
    // l held each lane's share of the row sum: add the row's lanes in lane order.
    workgroupBarrier();
    share[lid] = l;
    workgroupBarrier();
    var total = 0.0;
    for (var j = 0u; j < TPR; j++) {
        total += share[row * TPR + j];
    }
    store_output(t, row, lane, &acc, select(0.0, 1.0 / total, total > 0.0));
}
