// Row α-entmax over the pattern's allowed entries: p_i = [z_i - τ]₊^e with z = (α-1)(s - max),
// e = 1/(α-1), Σp = 1. τ is found inside a maintained bracket [-1, -(1/n)^(α-1)] by steps
// that are exact over the current support for 1.5-entmax and sparsemax and Halley's otherwise
// (`tau_step`), falling back to bisection when a step leaves the bracket or is not finite;
// stops on |Σp - 1| <= tolerance, a step or bracket below 1e-7, or max_iterations.
// The final p is renormalised by its sum. Masked entries and empty rows are 0.

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
    let m = mc.x;
    let n = mc.y;
    let am1 = params.alpha - 1.0;

    var st = Search(-1.0, -1.0, tau_top(n), n > 0.0);
    var iterations = 0u;
    while (st.searching) {
        var s0 = 0.0;
        var s1 = 0.0;
        var s2 = 0.0;
        for (var el = lid; el < ctx.len; el += NT) {
            if (element_allowed(ctx, el)) {
                let x = am1 * (score_get(score_index(ctx, el)) - m) - st.tau;
                if (x > 0.0) {
                    let t = moment_terms(x);
                    s0 += t.x;
                    s1 += t.y;
                    s2 += t.z;
                }
            }
        }
        let sums = reduce_sum(lid, vec4<f32>(s0, s1, s2, 0.0));
        iterations += 1u;
        if (iterations >= params.max_iterations) {
            break;
        }
        st = search_update(st, sums);
    }
    let tau = st.tau;
    // Final probabilities, renormalised so Σp = 1 despite τ's last-ulp error.
    var s = 0.0;
    for (var el = lid; el < ctx.len; el += NT) {
        if (element_allowed(ctx, el)) {
            let x = am1 * (score_get(score_index(ctx, el)) - m) - tau;
            if (x > 0.0) {
                s += pow_e(x);
            }
        }
    }
    let total = reduce_sum(lid, vec4<f32>(s, 0.0, 0.0, 0.0)).x;
    var support = 0.0;
    for (var el = lid; el < ctx.len; el += NT) {
        let at = score_index(ctx, el);
        var p = 0.0;
        if (element_allowed(ctx, el) && total > 0.0) {
            let x = am1 * (score_get(at) - m) - tau;
            if (x > 0.0) {
                p = pow_e(x) / total;
            }
        }
        support += select(0.0, 1.0, p > 0.0);
        score_set(at, p);
    }
    let cnt = reduce_sum(lid, vec4<f32>(support, 0.0, 0.0, 0.0)).x;
    write_stats(w, lid, u32(cnt), iterations);
}
