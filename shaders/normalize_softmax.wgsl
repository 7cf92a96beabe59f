// Row softmax over the pattern's allowed entries: max subtracted, masked entries and empty
// rows written as 0 (never NaN).

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let w = linear_workgroup(wid, nwg);
    if (w >= params.row_count * BQ) {
        return;
    }
    let ctx = row_ctx(w);
    if (ctx.qb * BQ + ctx.r >= params.seq_q) {
        return;
    }
    let mc = row_max_count(ctx, lid);
    // MRA: the folded coarse remainder (r, S) of the query block row joins the max and the sum
    // (mra_none.wgsl: no remainder).
    let rem = mra_row(params.row_base + w / BQ);
    let m = select(mc.x, max(mc.x, rem.x), rem.y > 0.0);
    var sum = 0.0;
    for (var e = lid; e < ctx.len; e += NT) {
        if (element_allowed(ctx, e)) {
            sum += exp(score_get(score_index(ctx, e)) - m);
        }
    }
    var total = reduce_sum(lid, vec4<f32>(sum, 0.0, 0.0, 0.0)).x;
    if (rem.y > 0.0) {
        let wr = rem.y * exp(rem.x - m);
        total += wr;
        if (lid == 0u) {
            mra_store_weight(params.row_base * BQ + w, (wr / rem.y) / total);
        }
    }
    var support = 0.0;
    for (var e = lid; e < ctx.len; e += NT) {
        let at = score_index(ctx, e);
        var p = 0.0;
        if (element_allowed(ctx, e) && total > 0.0) {
            p = exp(score_get(at) - m) / total;
        }
        support += select(0.0, 1.0, p > 0.0);
        score_set(at, p);
    }
    let n = reduce_sum(lid, vec4<f32>(support, 0.0, 0.0, 0.0)).x;
    write_stats(w, lid, u32(n), 0u);
}
