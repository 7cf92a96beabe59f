// Fused block-sparse α-entmax attention, two passes over the row's key blocks, no scores
// buffer.
// Pass 1 computes scores once, keeps each row's max and count, and stores in workgroup memory
// the candidates s > m - 1/(α-1) (the only entries that can be in the support, since τ ≥ -1
// once z = (α-1)(s - m)); each of a row's TPR threads owns CAP/TPR slots, compacted against
// its running max when full. Then τ is found per row by Halley's method inside a bracket with
// a bisection fallback, all rows in lockstep; rows whose candidates overflowed instead
// recompute their scores block by block on each iteration.
// Pass 2 recomputes the scores, forms p = [z - τ]₊^e, skips V for chunks where every p is 0,
// accumulates O in f32 and divides by Σp. Sums run in a fixed order: deterministic.

const CAPL: u32 = CAP / TPR;

var<workgroup> cand: array<f32, TQ * CAP>;
var<workgroup> part: array<vec4<f32>, WG>;
var<workgroup> flags: array<u32, WG>;
var<workgroup> uniform_word: vec2<u32>;

fn pow_e(x: f32) -> f32 {
    if (params.exponent == 1.0) {
        return x;
    }
    if (params.exponent == 2.0) {
        return x * x;
    }
    return exp2(params.exponent * log2(x));
}

// Sum of part[] over the row's TPR threads, in lane order.
fn row_total(row: u32) -> vec4<f32> {
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < TPR; j++) {
        s += part[row * TPR + j];
    }
    return s;
}

// (any flag.x set, any flag.y set) over the workgroup, as a uniform value.
fn any_flags(lid: u32, a: bool, b: bool) -> vec2<u32> {
    flags[lid] = select(0u, 1u, a) | select(0u, 2u, b);
    workgroupBarrier();
    if (lid == 0u) {
        var acc = 0u;
        for (var j = 0u; j < WG; j++) {
            acc |= flags[j];
        }
        uniform_word = vec2<u32>(acc & 1u, (acc >> 1u) & 1u);
    }
    let r = workgroupUniformLoad(&uniform_word);
    workgroupBarrier();
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
    let reach = 1.0 / am1; // entries below m - reach can never be in the support
    load_q_tile(t, lid);

    // ---- pass 1: scores once; max, count, candidates -------------------------------------
    var m_lane = NEG_BIG;
    var n_lane = 0.0;
    var count = 0u;
    var overflow = false;
    let slot0 = row * CAP + lane * CAPL;
    for (var b = t.first; b < t.last; b++) {
        let kb = pat[params.off_col_idx + b];
        for (var kc = 0u; kc < BK; kc += KC) {
            if (kb * BK + kc >= params.seq_kv) {
                break;
            }
            load_k_chunk(t, kb, kc, lid);
            workgroupBarrier();
            _ = score_chunk(t, b, kc, lid);
            workgroupBarrier();
            for (var kk = lane; kk < KC; kk += TPR) {
                let s = s_tile[row * KC + kk];
                if (s > NEG_BIG) {
                    n_lane += 1.0;
                    m_lane = max(m_lane, s);
                    if (!overflow && s > m_lane - reach) {
                        if (count == CAPL) {
                            // Compact against the running max before declaring overflow.
                            var kept = 0u;
                            for (var c = 0u; c < CAPL; c++) {
                                let x = cand[slot0 + c];
                                if (x > m_lane - reach) {
                                    cand[slot0 + kept] = x;
                                    kept++;
                                }
                            }
                            count = kept;
                        }
                        if (count < CAPL) {
                            cand[slot0 + count] = s;
                            count++;
                        } else {
                            overflow = true;
                        }
                    }
                }
            }
            workgroupBarrier();
        }
    }
    // Row max, row count and overflow over the row's lanes.
    part[lid] = vec4<f32>(m_lane, n_lane, select(0.0, 1.0, overflow), 0.0);
    workgroupBarrier();
    var m = NEG_BIG;
    var n = 0.0;
    var row_overflow = false;
    for (var j = 0u; j < TPR; j++) {
        let x = part[row * TPR + j];
        m = max(m, x.x);
        n += x.y;
        row_overflow = row_overflow || x.z > 0.0;
    }
    workgroupBarrier();

    // ---- τ search: Halley in [lo, hi] with bisection fallback, rows in lockstep ----------
    var lo = -1.0;
    var hi = -exp2(am1 * log2(1.0 / max(n, 1.0)));
    var tau = lo;
    var searching = n > 0.0;
    var iterations = 0u;
    var state = any_flags(lid, searching, searching && row_overflow);
    loop {
        if (state.x == 0u || iterations >= params.max_iterations) {
            break;
        }
        iterations++;
        var sums = vec4<f32>(0.0);
        if (searching && !row_overflow) {
            for (var c = 0u; c < count; c++) {
                let x = am1 * (cand[slot0 + c] - m) - tau;
                if (x > 0.0) {
                    let px = pow_e(x);
                    sums += vec4<f32>(px, px / x, px / (x * x), 0.0);
                }
            }
        }
        if (state.y == 1u) {
            // Overflowed rows: recompute their scores block by block.
            for (var b = t.first; b < t.last; b++) {
                let kb = pat[params.off_col_idx + b];
                for (var kc = 0u; kc < BK; kc += KC) {
                    if (kb * BK + kc >= params.seq_kv) {
                        break;
                    }
                    load_k_chunk(t, kb, kc, lid);
                    workgroupBarrier();
                    _ = score_chunk(t, b, kc, lid);
                    workgroupBarrier();
                    if (searching && row_overflow) {
                        for (var kk = lane; kk < KC; kk += TPR) {
                            let s = s_tile[row * KC + kk];
                            let x = am1 * (s - m) - tau;
                            if (s > NEG_BIG && x > 0.0) {
                                let px = pow_e(x);
                                sums += vec4<f32>(px, px / x, px / (x * x), 0.0);
                            }
                        }
                    }
                    workgroupBarrier();
                }
            }
        }
        part[lid] = sums;
        workgroupBarrier();
        let total = row_total(row);
        workgroupBarrier();
        if (searching) {
            let f = total.x - 1.0;
            if (abs(f) <= params.tolerance) {
                searching = false;
            } else {
                if (f > 0.0) {
                    lo = tau;
                } else {
                    hi = tau;
                }
                let e = params.exponent;
                let d1 = -e * total.y;
                let d2 = e * (e - 1.0) * total.z;
                let denom = 2.0 * d1 * d1 - f * d2;
                var next = 0.5 * (lo + hi);
                var halley = false;
                if (denom > 0.0 && denom < 3.0e38) {
                    let cand_tau = tau - 2.0 * f * d1 / denom;
                    if (cand_tau > lo && cand_tau < hi) {
                        next = cand_tau;
                        halley = true;
                    }
                }
                let step = abs(next - tau);
                tau = next;
                if ((halley && step <= 1e-7) || hi - lo <= 1e-7) {
                    searching = false;
                }
            }
        }
        state = any_flags(lid, searching, searching && row_overflow);
    }

    // ---- pass 2: p = [z - τ]₊^e, O = Σ p v / Σ p; chunks with no p > 0 skip V ----------
    var l = 0.0;
    var acc: array<f32, CPT>;
    for (var j = 0u; j < CPT; j++) {
        acc[j] = 0.0;
    }
    for (var b = t.first; b < t.last; b++) {
        let kb = pat[params.off_col_idx + b];
        for (var kc = 0u; kc < BK; kc += KC) {
            if (kb * BK + kc >= params.seq_kv) {
                break;
            }
            load_k_chunk(t, kb, kc, lid);
            workgroupBarrier();
            _ = score_chunk(t, b, kc, lid);
            workgroupBarrier();
            // Each row's lanes turn their own entries into p in place.
            var any_p = false;
            for (var kk = lane; kk < KC; kk += TPR) {
                let s = s_tile[row * KC + kk];
                let x = am1 * (s - m) - tau;
                var p = 0.0;
                if (s > NEG_BIG && x > 0.0) {
                    p = pow_e(x);
                    any_p = true;
                }
                s_tile[row * KC + kk] = p;
            }
            let needed = any_flags(lid, any_p, false);
            if (needed.x == 1u) {
                load_v_chunk(t, kb, kc, lid);
                workgroupBarrier();
                for (var kk = 0u; kk < KC; kk++) {
                    let p = s_tile[row * KC + kk];
                    if (p > 0.0) {
                        l += p;
                        for (var j = 0u; j < CPT; j++) {
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
