// Fused block-sparse α-entmax attention, no scores buffer. Scores and p·V use the
// register-tiled layout of fused_tiles.wgsl; the per-score work between them (pooling, moments,
// p) reads the chunk's scores from p_tile with TPR threads per query row, so each thread there
// serves one row and that work exists once in the code (compile time on llvmpipe grows fast
// with every copy).
//
// Pass 1 walks the row's key blocks once and, per (row, lane), appends the scores that may
// still have p > 0, with their key indices, to a pool of CAPL slots on chip; a full pool keeps
// its CAPL largest and records the largest score it dropped. Scores more than 1/(α-1) below the
// lane's running max never enter: their p is 0 whatever τ is. Before a chunk in which a lane
// might fill up, all rows shrink their pools: a few Newton steps on the row's pooled scores
// give a floor below the row's threshold, and pooled scores under it leave (see `shrink`).
// τ is then solved per row over the pooled scores (exact or Halley steps inside a bracket,
// bisection fallback, rows in lockstep). The pool is a subset of the row, so that τ is a lower
// bound of the true τ, and it is the true τ when no dropped score reaches it. Then every key
// with p > 0 is in the pool, and O = Σ p·v / Σ p is gathered from the pool's keys: V rows of
// zero-p keys are never read and no score is computed twice.
// Rows where a lane's share of the support overflowed its slots take a collect walk: every key
// above that lower bound goes into the row's whole pool (all lanes' slots, in key order), then
// τ (again a lower bound, from more keys) and the gather as before; a pool that overflows again
// raises the bound for the next collect, up to COLLECT_WALKS. Only a row still overflowing makes
// its workgroup recompute: the search continues from the bound with one walk per iteration, and
// a last walk accumulates p·V over the chunks that hold a p > 0.
// Sums run in a fixed order: deterministic.

const CAPL: u32 = CAP / TPR; // pool slots per (row, lane)
// Most collecting walks before a workgroup falls back to recomputing searches.
const COLLECT_WALKS: u32 = 3u;

var<workgroup> pool_kept: array<u32, WG>; // slots used per (row, lane)
// fused_tiles.wgsl's `red` (RQ·WG floats, unused otherwise here) holds, at different times,
// each lane's count of keys collected from the current chunk ([0, WG), phase 1) and the rows'
// Σp after phase 3 ([0, TQ)).

// Pool slot `c` of (tile row `row`, lane `lane`): (score, key) share a vec2 of kv_tile from
// VO, where no pass stages V until the fallback's last walk. Keys are kept as f32, exact below 2^24
// (the planner's limit for this kernel).
fn pool_slot(row: u32, lane: u32, c: u32) -> u32 {
    return (row * TPR + lane) * CAPL + c;
}

fn pool_set(i: u32, s: f32, key: u32) {
    pair_set(VO, i, s, f32(key));
}

fn pool_score(i: u32) -> f32 {
    return pair_get(VO, i).x;
}

fn pool_key(i: u32) -> u32 {
    return u32(pair_get(VO, i).y);
}

// Moments at τ of a lane's first `kept` pooled scores (solve_tau's per-lane sum).
fn lane_moments(row: u32, lane: u32, kept: u32, m: f32, tau: f32) -> vec4<f32> {
    var sums = vec4<f32>(0.0);
    for (var c = 0u; c < kept; c++) {
        sums += moments(pool_score(pool_slot(row, lane, c)), m, tau);
    }
    return sums;
}

// One lane's view of one row during pass 1.
struct LanePool {
    m: f32,       // largest score seen
    n: f32,       // allowed keys seen
    dropped: f32, // largest score not kept that may still matter
    floor: f32,   // scores at or below it have p = 0 in the row (a lower bound of its threshold)
    kept: u32,    // slots used
}

// Newton steps per shrink of the row pools.
const SHRINK_STEPS: u32 = 2u;

// Makes room in the row's lane pools (all rows at once, from uniform control flow; kv_tile is
// the scratch, so call it between a chunk's scoring and the next chunk's staging). In score
// space the row's threshold θ (p_i > 0 iff x_i > θ) is at least the threshold of any subset of
// the row, and Newton's method from the left on a convex decreasing function of t whose root
// is the pool's threshold never passes that root. So every iterate bounds θ from
// below, and kept scores at or below it leave the pool (which keeps its order).
fn shrink(lid: u32, row: u32, lane: u32, reach: f32, before: LanePool) -> LanePool {
    var lp = before;
    let am1 = params.alpha - 1.0;
    // Both bound θ: the row's max less 1/(α-1) (τ >= -1), and the floor of earlier shrinks.
    let start = row_reduce(lid, vec4<f32>(max(lp.floor, lp.m - reach), 0.0, NEG_BIG, 0.0), true).x;
    // A row without allowed keys so far (or a padding row) keeps its floor; every thread
    // still takes part in the reductions.
    let live = start > 0.5 * NEG_BIG;
    var t = am1 * select(0.0, start, live);
    for (var it = 0u; it < SHRINK_STEPS; it++) {
        // Absolute scores: moments at max 0 and threshold t give (Σp, Σp/z, ...) at t.
        var fg = vec4<f32>(0.0);
        for (var c = 0u; c < lp.kept; c++) {
            fg += moments(pool_score(pool_slot(row, lane, c)), 0.0, t);
        }
        fg = row_reduce(lid, fg, false);
        // Newton on h = f^(1/e) = ‖((α-1)·x - t)_+‖_e, also convex and decreasing but close to
        // linear (exact in one step on equal scores), so it gets near the root in few steps:
        // t += (h - 1) / -h' = (f - f^(1 - 1/e)) / Σ(...)^(e-1). Right of the pool's root
        // (possible only while a lane's max was dropped), stay.
        if (fg.x > 1.0 && fg.y > 0.0) {
            t += (fg.x - exp2((2.0 - params.alpha) * log2(fg.x))) / fg.y;
        }
    }
    // A margin for rounding: what leaves the pool lies strictly below θ.
    if (live) {
        lp.floor = max(lp.floor, (t - 1e-5 * (1.0 + abs(t))) / am1);
    }
    var n = 0u;
    for (var c = 0u; c < lp.kept; c++) {
        let i = pool_slot(row, lane, c);
        let x = pool_score(i);
        if (x > lp.floor) {
            pool_set(pool_slot(row, lane, n), x, pool_key(i));
            n++;
        }
    }
    lp.kept = n;
    return lp;
}

// Whether pass 1 keeps score `x` against a lane's running max `m` and floor: scores more than
// 1/(α-1) below the max, or at or below the floor, have p = 0.
fn may_keep(x: f32, m: f32, floor: f32, reach: f32) -> bool {
    return x > NEG_BIG && x > m - reach && x > floor;
}

// Pass 1 for one score `x` of key `key`: the running max and count, the pool, the drop record.
fn consider(row: u32, lane: u32, x: f32, key: u32, reach: f32, before: LanePool) -> LanePool {
    var lp = before;
    lp.m = max(lp.m, x);
    lp.n += select(0.0, 1.0, x > NEG_BIG);
    if (may_keep(x, lp.m, lp.floor, reach)) {
        if (lp.kept < CAPL) {
            pool_set(pool_slot(row, lane, lp.kept), x, key);
            lp.kept++;
        } else {
            // Full until the next shrink: keep the CAPL largest (a scan, only in this case).
            var low = 0u;
            var low_x = pool_score(pool_slot(row, lane, 0u));
            for (var c = 1u; c < CAPL; c++) {
                let y = pool_score(pool_slot(row, lane, c));
                if (y < low_x) {
                    low_x = y;
                    low = c;
                }
            }
            lp.dropped = max(lp.dropped, min(x, low_x));
            if (x > low_x) {
                pool_set(pool_slot(row, lane, low), x, key);
            }
        }
    }
    return lp;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        ids: LaneIds) {
    let lid = ids.lid;
    // Before the early returns: every thread takes part in the layout check's vote.
    _ = row_lanes_in_subgroups(ids, TPR);
    let w = linear_workgroup(wid, nwg);
    if (w >= params.row_count * (BQ / TQ)) {
        return;
    }
    let t = tile_of_workgroup(w);
    if (!in_row_class(t)) {
        return;
    }
    if (t.first == t.last) {
        store_empty_tile(t, lid, PATH_POOL_GATHERED);
        return;
    }
    let ty = lid / TX; // register-tile layout
    let tx = lid % TX;
    let row = lid / TPR; // per-score layout
    let lane = lid % TPR;
    let am1 = params.alpha - 1.0;
    let reach = 1.0 / am1;
    stage_q(t, lid);
    var lp = LanePool(NEG_BIG, 0.0, NEG_BIG, NEG_BIG, 0u);
    var m = NEG_BIG;
    var hi0 = 0.0;
    var st = Search(-1.0, -1.0, 0.0, false);
    var walking = true; // this row takes part in the current walk
    var fill = 0u;     // phase 1: keys collected into the row's pool so far
    var collects = 0u;
    var acc: array<vec4<f32>, RQ * NC>;
    var sums = vec4<f32>(0.0);
    var tick = 0u;
    var iterations = 0u;
    // One walk over the row's chunks per step (one copy of the scoring code): phase 0 pools
    // candidates per lane (pass 1), phase 1 collects a row's keys above its bound, phase 2 is
    // one recomputing search iteration, phase 3 accumulates p·V.
    var phase = 0u;
    loop {
        if (phase == 2u) {
            tick++;
            if (!any_thread(st.searching, tick) || iterations >= params.max_iterations) {
                phase = 3u;
            } else {
                iterations++;
            }
        }
        sums = vec4<f32>(0.0);
        for (var b = t.first; b < t.last; b++) {
            let kb = pat_word(params.off_col_idx + b);
            for (var kc = 0u; kc < BK; kc += KC) {
                let key0 = kb * BK + kc;
                if (key0 >= params.seq_kv) {
                    break; // the rest of a ragged last block holds no keys
                }
                stage_k(t, key0, lid);
                workgroupBarrier();
                let s = chunk_scores(t, b, kc, key0, ty, tx);
                for (var r = 0u; r < RQ; r++) { // @unroll
                    for (var j = 0u; j < NK; j++) { // @unroll
                        p_tile[(ty * RQ + r) * PS + tx + j * TX] = s[r * NK + j];
                    }
                }
                // Pass 1: shrink the pools when a lane might fill up in this chunk. The vote's
                // uniform load is also the barrier that publishes p_tile.
                let might_fill = phase == 0u && lp.kept + KC / TPR > CAPL;
                if (might_fill) {
                    atomicMax(&vote, tick + 1u);
                }
                tick++;
                if (workgroupUniformLoad(&vote) == tick) {
                    // Shrink only if some lane would fill up with what this chunk really offers
                    // (counted against the max before the chunk: a superset of what `consider`
                    // keeps). A pool that holds mostly support (flat rows) gains little from a
                    // shrink, and re-shrinking it every chunk cost more than the scoring.
                    var fills = false;
                    if (might_fill) {
                        var offered = 0u;
                        for (var kk = lane; kk < KC; kk += TPR) {
                            offered += select(0u, 1u, may_keep(p_tile[row * PS + kk], lp.m, lp.floor, reach));
                        }
                        fills = lp.kept + offered > CAPL;
                    }
                    tick++;
                    if (any_thread(fills, tick)) {
                        count_path(lid, PATH_POOL_SHRINKS);
                        lp = shrink(lid, row, lane, reach, lp);
                    } else {
                        count_path(lid, PATH_POOL_SHRINKS_DECLINED);
                    }
                }
                var any_p = false;
                var count = 0u;
                // Keys lane, lane + TPR, ...: a trip count the compiler cannot see, so it keeps
                // one copy of this body (unrolled copies cost llvmpipe seconds of compile each).
                for (var kk = lane; kk < KC; kk += TPR) {
                    let x = p_tile[row * PS + kk];
                    if (phase == 0u) {
                        lp = consider(row, lane, x, key0 + kk, reach, lp);
                    } else if (phase == 1u) {
                        count += select(0u, 1u, walking && am1 * (x - m) > st.tau);
                    } else if (st.searching || phase == 3u) {
                        let mo = moments(x, m, st.tau);
                        sums += mo;
                        any_p = any_p || mo.x > 0.0;
                        p_tile[row * PS + kk] = mo.x;
                    }
                }
                if (phase == 1u) {
                    // Slots in key order: the row's earlier chunks, then lower lanes, then j.
                    red[lid] = f32(count);
                    workgroupBarrier();
                    var at = fill;
                    for (var u = 0u; u < TPR; u++) {
                        let c = u32(red[row * TPR + u]);
                        at += select(0u, c, u < lane);
                        fill += c;
                    }
                    // Even slots, then odd: neighbouring lanes' slots can share a vec4, and
                    // WGSL lets a write to one component of a vector write all of it.
                    for (var parity = 0u; parity < 2u; parity++) {
                        var slot = at;
                        for (var kk = lane; kk < KC; kk += TPR) {
                            let x = p_tile[row * PS + kk];
                            if (walking && am1 * (x - m) > st.tau) {
                                if (slot >= CAP) {
                                    lp.dropped = max(lp.dropped, x);
                                } else if ((slot & 1u) == parity) {
                                    pool_set(row * CAP + slot, x, key0 + kk);
                                }
                                slot++;
                            }
                        }
                        if (parity == 0u) {
                            workgroupBarrier();
                        }
                    }
                }
                if (phase == 3u) {
                    // V overwrites the pool, which is no longer needed.
                    tick++;
                    if (any_thread(any_p, tick)) {
                        stage_v(t, key0, lid);
                        workgroupBarrier();
                        accumulate_pv(ty, tx, 0u, &acc);
                    }
                }
                // No barrier here: the next chunk's first one orders its writes after these reads.
            }
        }
        if (phase == 3u) {
            break;
        }
        if (phase == 2u) {
            let total = row_reduce(lid, sums, false);
            if (st.searching) {
                st = search_update(st, total);
            }
            continue;
        }

        // ---- after pooling (phase 0) or collecting (phase 1): τ over the pool -------------
        if (phase == 1u && walking) {
            // Lane u's slots of the row's pool hold collected keys u·CAPL ..
            lp.kept = min(fill - min(fill, lane * CAPL), CAPL);
        }
        let rs = row_reduce(lid, vec4<f32>(lp.m, lp.n, lp.dropped, f32(lp.kept)), true);
        pool_kept[lid] = lp.kept;
        // The pool's own top counts its K scores (the row's top counts all n keys).
        let pool_hi = tau_top(rs.w);
        if (phase == 0u) {
            m = rs.x;
            hi0 = tau_top(rs.y);
            // The shrinks' floor (the same on the row's lanes) bounds τ from below too.
            let lo = select(-1.0, min(max(-1.0, am1 * (lp.floor - m)), pool_hi), rs.y > 0.0);
            st = Search(lo, lo, pool_hi, rs.y > 0.0);
        } else {
            // A collecting row's bound is the lower end of its bracket.
            st = Search(st.tau, st.tau, max(pool_hi, st.tau), walking && rs.y > 0.0);
        }
        st = solve_tau(lid, row, lane, lp.kept, m, st, &tick);
        // Exact unless a dropped score lies above τ; then τ is a lower bound for what follows.
        let inexact = walking && rs.y > 0.0 && rs.z > NEG_BIG && am1 * (rs.z - m) - st.tau > 0.0;
        tick++;
        if (any_thread(inexact, tick)) {
            if (collects < COLLECT_WALKS) {
                // Each collect raises the bound: its pool's τ counts more of the row's keys.
                count_path(lid, PATH_POOL_COLLECT_WALKS);
                collects++;
                phase = 1u;
                walking = inexact;
                fill = 0u;
                lp.dropped = NEG_BIG;
            } else {
                // The search goes on over the whole row in [bound, the row's own top].
                count_path(lid, PATH_POOL_RECOMPUTED);
                phase = 2u;
                st = Search(st.tau, st.tau, hi0, inexact);
                iterations = 0u;
            }
            continue;
        }
        // ---- O = Σ p·v / Σ p over each row's pooled keys (its whole support) ----------------
        count_path(lid, PATH_POOL_GATHERED);
        // Each lane turns its slots into (p, key) and packs those with p > 0 to the front, in
        // order (writes never pass reads), so the gather visits only the support.
        var nonzero = 0u;
        for (var c = 0u; c < lp.kept; c++) {
            let i = pool_slot(row, lane, c);
            let p = moments(pool_score(i), m, st.tau).x;
            if (p > 0.0) {
                pool_set(pool_slot(row, lane, nonzero), p, pool_key(i));
                nonzero++;
            }
        }
        pool_kept[lid] = nonzero;
        workgroupBarrier();
        var total: array<f32, RQ>;
        for (var r = 0u; r < RQ; r++) { // @unroll
            let rr = ty * RQ + r;
            // One loop over (lane u, slot c) with a data-dependent trip count, so compilers
            // keep one copy of the body.
            var u = 0u;
            var c = 0u;
            loop {
                if (u >= TPR) {
                    break;
                }
                if (c >= min(pool_kept[rr * TPR + u], CAPL)) {
                    u++;
                    c = 0u;
                    continue;
                }
                let i = pool_slot(rr, u, c);
                let p = pool_score(i);
                total[r] += p;
                // Keys come from workgroup memory: still checked, like every V load.
                let key = pool_key(i);
                let base = (t.kv_row0 + key) * params.head_dim;
                for (var cc = 0u; cc < NC; cc++) { // @unroll
                    acc[r * NC + cc] += p * load_v4(base, (tx + cc * TX) * 4u, key < params.seq_kv);
                }
                c++;
            }
        }
        store_rows(t, ty, tx, &acc, total);
        return;
    }
    // Phase 3: Σp over the row's lanes, handed to the register-tile layout.
    let lsum = row_reduce(lid, sums, false);
    if (lane == 0u) {
        red[row] = lsum.x;
    }
    workgroupBarrier();
    var total: array<f32, RQ>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        total[r] = red[ty * RQ + r];
    }
    store_rows(t, ty, tx, &acc, total);
}
