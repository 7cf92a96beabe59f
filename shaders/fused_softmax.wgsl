// Fused block-sparse softmax attention (FlashAttention-style online softmax): no scores
// buffer. Each thread keeps its row's running max m and sum l (recomputed identically by the
// TPR threads of a row from s_tile) and CPT output columns; O is written once.

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
            score_chunk(t, b, kc, lid);
            workgroupBarrier();
            var m_new = m;
            for (var kk = 0u; kk < KC; kk++) {
                m_new = max(m_new, s_tile[row * KC + kk]);
            }
            if (m_new > NEG_BIG) {
                let corr = exp(m - m_new);
                l *= corr;
                for (var j = 0u; j < CPT; j++) {
                    acc[j] *= corr;
                }
                for (var kk = 0u; kk < KC; kk++) {
                    let s = s_tile[row * KC + kk];
                    if (s > NEG_BIG) {
                        let p = exp(s - m_new);
                        l += p;
                        for (var j = 0u; j < CPT; j++) {
                            acc[j] += p * v_tile[kk * DP + lane + j * TPR];
                        }
                    }
                }
                m = m_new;
            }
            workgroupBarrier();
        }
    }
    store_output(t, row, lane, &acc, select(0.0, 1.0 / l, l > 0.0));
}
