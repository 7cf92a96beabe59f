// Fused block-sparse α-entmax attention, two passes over the row's key blocks, no scores
// buffer.
// Pass 1 computes each score once and keeps, per row, its max, its count, and on chip the
// largest scores: each of a row's TPR threads keeps the top CAP/TPR of its own entries and the
// largest value it dropped. τ is then found per row over the kept candidates (Halley's method
// inside a bracket, bisection fallback, rows in lockstep). Because the candidates are a subset,
// that τ is a lower bound of the true τ, and it is exact when nothing dropped lies above it
// (z_dropped ≤ τ). Rows where that fails continue from the bound, recomputing their scores
// block by block on each iteration (exact for any row length).
// Pass 2 recomputes the scores, forms p = [z - τ]₊^e, skips V for chunks where every p is 0,
// accumulates O in f32 and divides by Σp. Sums run in a fixed order: deterministic.

const CAPL: u32 = CAP / TPR;

var<workgroup> cand: array<f32, TQ * CAP>;
var<workgroup> part: array<vec4<f32>, WG>;
var<workgroup> flags: array<u32, WG>;
var<workgroup> uniform_word: u32;

// (Σ x^e, Σ x^(e-1), Σ x^(e-2)) contribution of one score at threshold tau.
fn moments(s: f32, m: f32, tau: f32) -> vec4<f32> {
    let x = (params.alpha - 1.0) * (s - m) - tau;
    if (s <= NEG_BIG || x <= 0.0) {
        return vec4<f32>(0.0);
    }
    let px = pow_e(x);
    return vec4<f32>(px, px / x, px / (x * x), 0.0);
}

// Stages K of chunk kc of stored block b (key block kb) and scores it into s_tile; all three
// passes walk the row this way (V is staged only in pass 2, where needed).
fn stage_scores(t: Tile, b: u32, kb: u32, kc: u32, lid: u32) {
    load_k_chunk(t, kb, kc, lid);
    workgroupBarrier();
    _ = score_chunk(t, b, kc, lid);
    workgroupBarrier();
}

// Sum of part[] over the row's TPR threads, in lane order.
fn row_total(row: u32) -> vec4<f32> {
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < TPR; j++) {
        s += part[row * TPR + j];
    }
    return s;
}

// Whether any thread's flag is set, as a uniform value.
fn any_flag(lid: u32, a: bool) -> bool {
    flags[lid] = select(0u, 1u, a);
    workgroupBarrier();
    if (lid == 0u) {
        var acc = 0u;
        for (var j = 0u; j < WG; j++) {
            acc |= flags[j];
        }
        uniform_word = acc;
    }
    let r = workgroupUniformLoad(&uniform_word);
    workgroupBarrier();
    return r != 0u;
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
    let row = lid / TPR;
    let lane = lid % TPR;
    let am1 = params.alpha - 1.0;
    load_q_tile(t, lid);

    // ---- pass 1: scores once; max, count, top candidates --------------------------------
    var m_lane = NEG_BIG;
    var n_lane = 0.0;
    var count = 0u;
    var min_at = 0u;       // slot of the smallest kept candidate once full
    var dropped = NEG_BIG; // largest score not kept
    let slot0 = row * CAP + lane * CAPL;
    for (var b = t.first; b < t.last; b++) {
        let kb = pat[params.off_col_idx + b];
        for (var kc = 0u; kc < BK; kc += KC) {
            if (kb * BK + kc >= params.seq_kv) {
                break;
            }
            stage_scores(t, b, kb, kc, lid);
            for (var kk = lane; kk < KC; kk += TPR) {
                let s = s_tile[row * KC + kk];
                if (s > NEG_BIG) {
                    n_lane += 1.0;
                    m_lane = max(m_lane, s);
                    var evicted = s;
                    if (count < CAPL) {
                        cand[slot0 + count] = s;
                        count++;
                        evicted = NEG_BIG;
                    } else if (s > cand[slot0 + min_at]) {
                        evicted = cand[slot0 + min_at];
                        cand[slot0 + min_at] = s;
                    }
                    dropped = max(dropped, evicted);
                    // Re-find the smallest kept candidate only when the kept set changed.
                    if (count == CAPL && evicted != s) {
                        for (var c = 0u; c < CAPL; c++) {
                            if (cand[slot0 + c] < cand[slot0 + min_at]) {
                                min_at = c;
                            }
                        }
                    }
                }
            }
            workgroupBarrier();
        }
    }
    // Row max, count and largest dropped score over the row's lanes.
    part[lid] = vec4<f32>(m_lane, n_lane, dropped, 0.0);
    workgroupBarrier();
    var m = NEG_BIG;
    var n = 0.0;
    var row_dropped = NEG_BIG;
    for (var j = 0u; j < TPR; j++) {
        let x = part[row * TPR + j];
        m = max(m, x.x);
        n += x.y;
        row_dropped = max(row_dropped, x.z);
    }
    workgroupBarrier();

    // ---- τ over the candidates (all rows in lockstep) ------------------------------------
    let hi0 = -exp2(am1 * log2(1.0 / max(n, 1.0)));
    var st = Search(-1.0, -1.0, hi0, n > 0.0);
    var iterations = 0u;
    loop {
        if (!any_flag(lid, st.searching) || iterations >= params.max_iterations) {
            break;
        }
        iterations++;
        var sums = vec4<f32>(0.0);
        if (st.searching) {
            for (var c = 0u; c < count; c++) {
                sums += moments(cand[slot0 + c], m, st.tau);
            }
        }
        part[lid] = sums;
        workgroupBarrier();
        let total = row_total(row);
        workgroupBarrier();
        if (st.searching) {
            st = halley_update(st, total);
        }
    }

    // ---- rows whose dropped scores may reach the support: exact search by recomputing -----
    let recompute = n > 0.0 && row_dropped > NEG_BIG && am1 * (row_dropped - m) - st.tau > 0.0;
    if (recompute) {
        // The candidate τ is a lower bound of the true τ; the candidates' upper bound is not
        // one for the whole row, so the bracket's top goes back to the row's own bound.
        st.lo = st.tau;
        st.hi = hi0;
        st.searching = true;
    }
    iterations = 0u;
    loop {
        if (!any_flag(lid, recompute && st.searching) || iterations >= params.max_iterations) {
            break;
        }
        iterations++;
        var sums = vec4<f32>(0.0);
        for (var b = t.first; b < t.last; b++) {
            let kb = pat[params.off_col_idx + b];
            for (var kc = 0u; kc < BK; kc += KC) {
                if (kb * BK + kc >= params.seq_kv) {
                    break;
                }
                stage_scores(t, b, kb, kc, lid);
                if (recompute && st.searching) {
                    for (var kk = lane; kk < KC; kk += TPR) {
                        sums += moments(s_tile[row * KC + kk], m, st.tau);
                    }
                }
                workgroupBarrier();
            }
        }
        part[lid] = sums;
        workgroupBarrier();
        let total = row_total(row);
        workgroupBarrier();
        if (recompute && st.searching) {
            st = halley_update(st, total);
        }
    }
    let tau = st.tau;

    // ---- pass 2: p = [z - τ]₊^e, O = Σ p v / Σ p; chunks with no p > 0 skip V ----------
    var l = 0.0;
    var acc: array<f32, CPT>;
    for (var j = 0u; j < CPT; j++) { // @unroll
        acc[j] = 0.0;
    }
    for (var b = t.first; b < t.last; b++) {
        let kb = pat[params.off_col_idx + b];
        for (var kc = 0u; kc < BK; kc += KC) {
            if (kb * BK + kc >= params.seq_kv) {
                break;
            }
            stage_scores(t, b, kb, kc, lid);
            // Each lane turns its own entries into p in place.
            var any_p = false;
            for (var kk = lane; kk < KC; kk += TPR) {
                let p = moments(s_tile[row * KC + kk], m, tau).x;
                any_p = any_p || p > 0.0;
                s_tile[row * KC + kk] = p;
            }
            if (any_flag(lid, any_p)) {
                load_v_chunk(t, kb, kc, lid);
                workgroupBarrier();
                for (var kk = 0u; kk < KC; kk++) {
                    let p = s_tile[row * KC + kk];
                    if (p > 0.0) {
                        l += p;
                        for (var j = 0u; j < CPT; j++) { // @unroll
                            acc[j] += p * v_tile[kk * DP + lane + j * TPR];
                        }
                    }
                }
            }
            workgroupBarrier();
        }
    }
    store_output(t, row, lane, &acc, select(0.0, 1.0 / l, l > 0.0));
}
