// Fused block-sparse α-entmax attention on the register-tiled layout of fused_tiles.wgsl:
// two walks over the row's key blocks, no scores buffer.
// Pass 1 computes each score once and keeps, per (row, lane), the row's count, the CL largest
// scores in registers (a sorted list) and the largest score it dropped. τ is then found per row
// over the kept candidates (Halley's method inside a bracket, bisection fallback, rows in
// lockstep). Because the candidates are a subset, that τ is a lower bound of the true τ, and it
// is exact when nothing dropped lies above it (z_dropped ≤ τ). Rows where that fails continue
// from the bound, recomputing their scores block by block on each iteration (exact for any row
// length). Pass 2 recomputes the scores, forms p = [z − τ]₊^e, stages V only for chunks with
// some p > 0, accumulates O in f32 and divides by Σp. Sums run in a fixed order:
// deterministic.

var<workgroup> red4: array<vec4<f32>, TQ * TX>;
var<workgroup> flag_acc: atomic<u32>;
var<workgroup> uniform_word: u32;

// z − τ of one score (z = (α−1)(s − m)); ≤ 0 outside the support.
fn excess(s: f32, m: f32, tau: f32) -> f32 {
    return select(-1.0, (params.alpha - 1.0) * (s - m) - tau, s > NEG_BIG);
}

// (Σ x^e, Σ x^(e-1), Σ x^(e-2)) contribution of one score at threshold tau.
fn moments(s: f32, m: f32, tau: f32) -> vec4<f32> {
    let x = excess(s, m, tau);
    if (x <= 0.0) {
        return vec4<f32>(0.0);
    }
    let px = pow_e(x);
    return vec4<f32>(px, px / x, px / (x * x), 0.0);
}

// Whether any thread's `a` is set, as a workgroup-uniform value (barriers inside).
fn any_flag(lid: u32, a: bool) -> bool {
    if (a) {
        atomicOr(&flag_acc, 1u);
    }
    workgroupBarrier();
    if (lid == 0u) {
        uniform_word = atomicExchange(&flag_acc, 0u);
    }
    return workgroupUniformLoad(&uniform_word) != 0u;
}

// Per-row sums of per-lane moments over the row's TX lanes, in lane order.
fn row_moments(ty: u32, tx: u32, x: array<vec4<f32>, RQ>) -> array<vec4<f32>, RQ> {
    workgroupBarrier();
    for (var r = 0u; r < RQ; r++) { // @unroll
        red4[(ty * RQ + r) * TX + tx] = x[r];
    }
    workgroupBarrier();
    var total: array<vec4<f32>, RQ>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        for (var u = 0u; u < TX; u++) {
            total[r] += red4[(ty * RQ + r) * TX + u];
        }
    }
    return total;
}

struct Search {
    tau: f32,
    lo: f32,
    hi: f32,
    searching: bool,
}

// One Halley step from the row's moments at st.tau; bisection when the step leaves the
// bracket or is not finite. Stops on |Σp - 1| <= tolerance, a tiny step or a tiny bracket.
fn halley_update(st: Search, total: vec4<f32>) -> Search {
    var r = st;
    let f = total.x - 1.0;
    if (abs(f) <= params.tolerance) {
        r.searching = false;
        return r;
    }
    if (f > 0.0) {
        r.lo = st.tau;
    } else {
        r.hi = st.tau;
    }
    let e = params.exponent;
    let d1 = -e * total.y;
    let d2 = e * (e - 1.0) * total.z;
    let denom = 2.0 * d1 * d1 - f * d2;
    var next = 0.5 * (r.lo + r.hi);
    var halley = false;
    if (denom > 0.0 && denom < 3.0e38) {
        let t = st.tau - 2.0 * f * d1 / denom;
        if (t > r.lo && t < r.hi) {
            next = t;
            halley = true;
        }
    }
    let step = abs(next - st.tau);
    r.tau = next;
    if ((halley && step <= 1e-7) || r.hi - r.lo <= 1e-7) {
        r.searching = false;
    }
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let w = linear_workgroup(wid, nwg);
    if (w >= params.row_count * (BQ / TQ)) {
        return;
    }
    let t = tile_of_workgroup(w);
    let ty = lid / TX;
    let tx = lid % TX;
    let am1 = params.alpha - 1.0;
    stage_q(t, lid);

    // ---- pass 1: scores once; per (row, lane) count, top CL candidates, largest dropped ----
    var cand: array<f32, RQ * CL>;
    var dropped: array<f32, RQ>;
    var count: array<f32, RQ>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        dropped[r] = NEG_BIG;
        for (var i = 0u; i < CL; i++) { // @unroll
            cand[r * CL + i] = NEG_BIG;
        }
    }
    for (var b = t.first; b < t.last; b++) {
        let kb = pat[params.off_col_idx + b];
        for (var kc = 0u; kc < BK; kc += KC) {
            let key0 = kb * BK + kc;
            if (key0 >= params.seq_kv) {
                break;
            }
            stage_kv(t, key0, lid, true, false);
            workgroupBarrier();
            let s = chunk_scores(t, b, kc, key0, ty, tx);
            for (var r = 0u; r < RQ; r++) { // @unroll
                for (var j = 0u; j < NK; j++) { // @unroll
                    var x = s[r * NK + j];
                    count[r] += select(0.0, 1.0, x > NEG_BIG);
                    // Insert into the descending list; x leaves as the value pushed out.
                    if (x > cand[r * CL + CL - 1u]) {
                        for (var i = 0u; i < CL; i++) { // @unroll
                            let keep = max(cand[r * CL + i], x);
                            x = min(cand[r * CL + i], x);
                            cand[r * CL + i] = keep;
                        }
                    }
                    dropped[r] = max(dropped[r], x);
                }
            }
            workgroupBarrier();
        }
    }
    // Row max (the best candidate of any lane), count and largest dropped score.
    var mine: array<vec4<f32>, RQ>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        mine[r] = vec4<f32>(cand[r * CL], count[r], dropped[r], 0.0);
    }
    workgroupBarrier();
    for (var r = 0u; r < RQ; r++) { // @unroll
        red4[(ty * RQ + r) * TX + tx] = mine[r];
    }
    workgroupBarrier();
    var m: array<f32, RQ>;
    var n: array<f32, RQ>;
    var row_dropped: array<f32, RQ>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        m[r] = NEG_BIG;
        row_dropped[r] = NEG_BIG;
        for (var u = 0u; u < TX; u++) {
            let x = red4[(ty * RQ + r) * TX + u];
            m[r] = max(m[r], x.x);
            n[r] += x.y;
            row_dropped[r] = max(row_dropped[r], x.z);
        }
    }

    // ---- τ over the candidates (all rows in lockstep) ------------------------------------
    var st: array<Search, RQ>;
    var hi0: array<f32, RQ>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        hi0[r] = -exp2(am1 * log2(1.0 / max(n[r], 1.0)));
        st[r] = Search(-1.0, -1.0, hi0[r], n[r] > 0.0);
    }
    var iterations = 0u;
    loop {
        var searching = false;
        for (var r = 0u; r < RQ; r++) { // @unroll
            searching = searching || st[r].searching;
        }
        if (!any_flag(lid, searching) || iterations >= params.max_iterations) {
            break;
        }
        iterations++;
        var sums: array<vec4<f32>, RQ>;
        for (var r = 0u; r < RQ; r++) { // @unroll
            if (st[r].searching) {
                for (var i = 0u; i < CL; i++) { // @unroll
                    sums[r] += moments(cand[r * CL + i], m[r], st[r].tau);
                }
            }
        }
        let total = row_moments(ty, tx, sums);
        for (var r = 0u; r < RQ; r++) { // @unroll
            if (st[r].searching) {
                st[r] = halley_update(st[r], total[r]);
            }
        }
    }

    // ---- rows whose dropped scores may reach the support: exact search by recomputing -----
    var recompute: array<bool, RQ>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        recompute[r] = n[r] > 0.0 && row_dropped[r] > NEG_BIG && am1 * (row_dropped[r] - m[r]) - st[r].tau > 0.0;
        if (recompute[r]) {
            // The candidate τ is a lower bound of the true τ; the candidates' upper bound is
            // not one for the whole row, so the bracket's top goes back to the row's own bound.
            st[r].lo = st[r].tau;
            st[r].hi = hi0[r];
            st[r].searching = true;
        }
    }
    iterations = 0u;
    loop {
        var searching = false;
        for (var r = 0u; r < RQ; r++) { // @unroll
            searching = searching || (recompute[r] && st[r].searching);
        }
        if (!any_flag(lid, searching) || iterations >= params.max_iterations) {
            break;
        }
        iterations++;
        var sums: array<vec4<f32>, RQ>;
        for (var b = t.first; b < t.last; b++) {
            let kb = pat[params.off_col_idx + b];
            for (var kc = 0u; kc < BK; kc += KC) {
                let key0 = kb * BK + kc;
                if (key0 >= params.seq_kv) {
                    break;
                }
                stage_kv(t, key0, lid, true, false);
                workgroupBarrier();
                let s = chunk_scores(t, b, kc, key0, ty, tx);
                for (var r = 0u; r < RQ; r++) { // @unroll
                    if (recompute[r] && st[r].searching) {
                        for (var j = 0u; j < NK; j++) { // @unroll
                            sums[r] += moments(s[r * NK + j], m[r], st[r].tau);
                        }
                    }
                }
                workgroupBarrier();
            }
        }
        let total = row_moments(ty, tx, sums);
        for (var r = 0u; r < RQ; r++) { // @unroll
            if (recompute[r] && st[r].searching) {
                st[r] = halley_update(st[r], total[r]);
            }
        }
    }

    // ---- pass 2: p = [z − τ]₊^e, O = Σ p v / Σ p; chunks with no p > 0 skip V ------------
    var l: array<f32, RQ>;
    var acc: array<vec4<f32>, RQ * NC>;
    for (var b = t.first; b < t.last; b++) {
        let kb = pat[params.off_col_idx + b];
        for (var kc = 0u; kc < BK; kc += KC) {
            let key0 = kb * BK + kc;
            if (key0 >= params.seq_kv) {
                break;
            }
            stage_kv(t, key0, lid, true, false);
            workgroupBarrier();
            let s = chunk_scores(t, b, kc, key0, ty, tx);
            var any_p = false;
            for (var r = 0u; r < RQ; r++) { // @unroll
                for (var j = 0u; j < NK; j++) { // @unroll
                    let x = excess(s[r * NK + j], m[r], st[r].tau);
                    let p = select(0.0, pow_e(max(x, 1e-30)), x > 0.0);
                    any_p = any_p || p > 0.0;
                    l[r] += p;
                    p_tile[(ty * RQ + r) * PS + tx + j * TX] = p;
                }
            }
            if (any_flag(lid, any_p)) {
                stage_kv(t, key0, lid, false, true);
                workgroupBarrier();
                accumulate_pv(ty, tx, &acc);
            }
            workgroupBarrier();
        }
    }
    store_rows(t, ty, tx, &acc, row_sums(ty, tx, l));
}
