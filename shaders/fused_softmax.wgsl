// Fused block-sparse softmax attention (FlashAttention-style online softmax) on the
// register-tiled layout of fused_tiles.wgsl: no scores buffer, exp once per score, O written
// once. A workgroup owns TQ query rows of one query block, or with split-K one share of the
// row's stored blocks, whose (m, l, unnormalised O) merge_splits.wgsl combines. Row max and
// sum across a row group's lanes use subgroup shuffles where the lanes share a subgroup
// (fused_lanes_*.wgsl), else workgroup memory. Sums run in a fixed order, so results are
// deterministic.

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        ids: LaneIds) {
    let lid = ids.lid;
    // Before the early return: every thread takes part in the check's vote.
    let in_subgroups = row_lanes_in_subgroups(ids, TX);
    let w = linear_workgroup(wid, nwg);
    let splits = max(params.key_splits, 1u);
    if (w >= params.row_count * (BQ / TQ) * splits) {
        return;
    }
    // Split-K: split `split` of `splits` walks its share of the row's stored blocks.
    var t = tile_of_workgroup(w / splits);
    let split = w % splits;
    let n_blocks = t.last - t.first;
    t.last = t.first + n_blocks * (split + 1u) / splits;
    t.first = t.first + n_blocks * split / splits;
    let ty = lid / TX;
    let tx = lid % TX;
    // A share without stored blocks reads no Q (its rows are empty, or MRA's remainder only).
    if (t.first < t.last) {
        stage_q(t, lid);
    }
    var m: array<f32, RQ>;
    var l: array<f32, RQ>;
    var acc: array<vec4<f32>, RQ * NC>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        m[r] = NEG_BIG;
    }
    for (var b = t.first; b < t.last; b++) {
        let kb = pat_word(params.off_col_idx + b);
        for (var kc = 0u; kc < BK; kc += KC) {
            let key0 = kb * BK + kc;
            if (key0 >= params.seq_kv) {
                break; // the rest of a ragged last block holds no keys
            }
            stage_kv(t, key0, lid);
            workgroupBarrier();
            let s = chunk_scores(t, b, kc, key0, ty, tx);
            // The chunk's max of each row over its TX lanes (the same on every lane).
            var chunk_max: array<f32, RQ>;
            for (var r = 0u; r < RQ; r++) { // @unroll
                chunk_max[r] = NEG_BIG;
                for (var j = 0u; j < NK; j++) { // @unroll
                    chunk_max[r] = max(chunk_max[r], s[r * NK + j]);
                }
            }
            if (in_subgroups) {
                for (var r = 0u; r < RQ; r++) { // @unroll
                    chunk_max[r] = lanes_max(chunk_max[r], TX);
                }
            } else {
                for (var r = 0u; r < RQ; r++) { // @unroll
                    red[(ty * RQ + r) * TX + tx] = chunk_max[r];
                }
                workgroupBarrier();
                for (var r = 0u; r < RQ; r++) { // @unroll
                    for (var u = 0u; u < TX; u++) {
                        chunk_max[r] = max(chunk_max[r], red[(ty * RQ + r) * TX + u]);
                    }
                }
            }
            // Online softmax: p once per score, each lane's share of the row sum, and the
            // rescaled accumulators.
            for (var r = 0u; r < RQ; r++) { // @unroll
                let row = ty * RQ + r;
                let m_new = max(m[r], chunk_max[r]);
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
            accumulate_pv(ty, tx, 0u, &acc);
            workgroupBarrier();
        }
    }
    // MRA: fold the query block row's coarse remainder (r, S, N) into the same running max,
    // sum (lane 0 takes S) and accumulators (mra_none.wgsl makes this a no-op). With split-K
    // it joins the softmax once, through split 0.
    let vrow = t.slice * params.q_blocks + t.qb;
    var rem = mra_row(vrow);
    if (split != 0u) {
        rem.y = 0.0;
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
    // Each lane held its share of the row sum.
    var total = l;
    if (in_subgroups) {
        for (var r = 0u; r < RQ; r++) { // @unroll
            total[r] = lanes_sum(l[r], TX);
        }
    } else {
        total = row_sums(ty, tx, l);
    }
    if (splits == 1u) {
        store_rows(t, ty, tx, &acc, total);
        return;
    }
    // Partial of (query row, split): [m, l, O_0 … O_{d−1}] (O not yet divided by l).
    for (var r = 0u; r < RQ; r++) { // @unroll
        let at = (((vrow - params.row_base) * BQ + t.row0 + ty * RQ + r) * splits + split) * (params.head_dim + 2u);
        if (tx == 0u && at + 1u < arrayLength(&partial)) {
            partial[at] = m[r];
            partial[at + 1u] = total[r];
        }
        for (var c = 0u; c < NC; c++) { // @unroll
            let c0 = (tx + c * TX) * 4u;
            for (var e = 0u; e < 4u; e++) { // @unroll
                if (c0 + e < params.head_dim && at + 2u + c0 + e < arrayLength(&partial)) {
                    partial[at + 2u + c0 + e] = acc[r * NC + c][e];
                }
            }
        }
    }
}
