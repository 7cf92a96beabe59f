// Fused block-sparse α-entmax attention for rows short enough that every score of the tile
// stays on chip: p_tile is the score cache (row stride PS > RC, the cached keys per row; the
// planner picks this kernel only when the pattern's longest row fits). Pass 1 stages K chunk
// by chunk and caches the scores; τ is solved per row over the cache (solve_tau, the same
// search as the pooling kernel); the scores become p in place, and each (row, lane) lists its
// keys with p > 0 while they are few. Pass 2 then gathers p·V from those keys' V rows when
// every list held its support (peaked rows: a few keys each), else stages V only for chunks
// that hold a p > 0 and accumulates p·V in the register tile, every V load shared by the
// tile's rows. Each score is computed once. Sums run in a fixed order: deterministic.

const CHUNKS: u32 = RC / KC;

// Per cached chunk: whether any of the tile's rows has a p > 0 there.
var<workgroup> chunk_live: array<atomic<u32>, CHUNKS>;

// Support lists for the gathered p·V: each (row, lane) keeps up to SUPPORT_SLOTS (host
// constant, `FusedTile::support_slots`: even, at most an eighth of its share of the cache) (p,
// cache position) pairs in kv_tile from WG (no chunk is staged between the passes): small
// supports, where reading only their V rows beats staging every chunk that one of the tile's
// rows needs. The lists overlap the second half of solve_tau's scratch, [WG, 2·WG): safe
// because its loop leaves only through its uniform load, after its last scratch access, and
// row_reduce's scratch is [0, WG).
var<workgroup> support_count: array<u32, WG>;

fn support_slot(row: u32, lane: u32, c: u32) -> u32 {
    return (row * TPR + lane) * SUPPORT_SLOTS + c;
}

// Key of cache position `pos`: pass 1 caches whole chunks of the row's blocks in order and
// stops only at the ragged tail of the last block, so positions map back by arithmetic.
fn cached_key(t: Tile, pos: u32) -> u32 {
    let chunk = pos / KC;
    let b = t.first + chunk / (BK / KC);
    return pat_word(params.off_col_idx + b) * BK + (chunk % (BK / KC)) * KC + pos % KC;
}

// O += p·v over the support lists of this thread's RQ rows (lane by lane, in key order within
// a lane), reading V rows from memory: a row with p > 0 for a few keys reads only theirs.
fn accumulate_gathered_pv(t: Tile, ty: u32, tx: u32, acc: ptr<function, array<vec4<f32>, RQ * NC>>) {
    for (var r = 0u; r < RQ; r++) { // @unroll
        let rr = ty * RQ + r;
        for (var u = 0u; u < TPR; u++) {
            let kept = min(support_count[rr * TPR + u], SUPPORT_SLOTS);
            for (var c = 0u; c < kept; c++) {
                let pk = pair_get(WG, support_slot(rr, u, c));
                let key = cached_key(t, u32(pk.y));
                let base = (t.kv_row0 + key) * params.head_dim;
                for (var cc = 0u; cc < NC; cc++) { // @unroll
                    (*acc)[r * NC + cc] += pk.x * load_v4(base, (tx + cc * TX) * 4u, key < params.seq_kv);
                }
            }
        }
    }
}

// O += P·V over the staged chunk (p_tile columns from p0), only for keys where one of this
// thread's RQ rows has p > 0: a row keeps a few percent of its keys, so most keys cost RQ
// compares instead of NC loads and RQ·NC multiply-adds. A skipped key would add p·v = 0, so
// the sums are accumulate_pv's, in its order.
fn accumulate_support_pv(ty: u32, tx: u32, p0: u32, acc: ptr<function, array<vec4<f32>, RQ * NC>>) {
    for (var kk = 0u; kk < KC; kk++) {
        let p = row_group_p(ty, p0 + kk);
        var live = false;
        for (var r = 0u; r < RQ; r++) { // @unroll
            live = live | (p[r] > 0.0);
        }
        if (live) {
            accumulate_key_pv(tx, kk, p, acc);
        }
    }
}

// Moments at τ of the cached scores lane, lane + TPR, … of the row's first `len` keys.
fn lane_moments(row: u32, lane: u32, len: u32, m: f32, tau: f32) -> vec4<f32> {
    var sums = vec4<f32>(0.0);
    for (var kk = lane; kk < len; kk += TPR) {
        sums += moments(p_tile[row * PS + kk], m, tau);
    }
    return sums;
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
        store_empty_tile(t, lid, PATH_CACHE_GATHERED);
        return;
    }
    let ty = lid / TX; // register-tile layout
    let tx = lid % TX;
    let row = lid / TPR; // per-score layout
    let lane = lid % TPR;
    stage_q(t, lid);
    for (var c = lid; c < CHUNKS; c += WG) {
        atomicStore(&chunk_live[c], 0u);
    }
    // ---- pass 1: the tile's scores into the cache, one staged K chunk at a time ------------
    var len = 0u; // cached keys per row, a multiple of KC (the same on every thread)
    for (var b = t.first; b < t.last; b++) {
        let kb = pat_word(params.off_col_idx + b);
        for (var kc = 0u; kc < BK; kc += KC) {
            let key0 = kb * BK + kc;
            // A ragged last block's rest holds no keys; the cache bound is the planner's, kept
            // here so a longer row can never write past it.
            if (key0 >= params.seq_kv || len + KC > RC) {
                break;
            }
            stage_k(t, key0, lid);
            workgroupBarrier();
            let s = chunk_scores(t, b, kc, key0, ty, tx);
            for (var r = 0u; r < RQ; r++) { // @unroll
                for (var j = 0u; j < NK; j++) { // @unroll
                    p_tile[(ty * RQ + r) * PS + len + tx + j * TX] = s[r * NK + j];
                }
            }
            len += KC;
            workgroupBarrier(); // the next chunk's K overwrites what these scores read
        }
    }
    // ---- τ per row over its cached scores ---------------------------------------------------
    var mx = NEG_BIG;
    var n = 0.0;
    for (var kk = lane; kk < len; kk += TPR) {
        let x = p_tile[row * PS + kk];
        mx = max(mx, x);
        n += select(0.0, 1.0, x > NEG_BIG);
    }
    // Its first barrier publishes the cache.
    let rs = row_reduce(lid, vec4<f32>(mx, n, NEG_BIG, 0.0), true);
    let m = rs.x;
    // τ lies in [-1, the top for n scores] (shifted space: the row max has p = (-τ)^e <= 1).
    var tick = 0u;
    let st = solve_tau(lid, row, lane, len, m, Search(-1.0, -1.0, tau_top(rs.y), rs.y > 0.0), &tick);
    // ---- scores become p in place; each row's Σp; which chunks hold a p > 0; the supports ----
    var psum = 0.0;
    var support = 0u;
    // A thread walks its keys in order: it marks each live chunk once, not once per key (on a
    // GPU, stores of many threads to one atomic word serialise).
    var marked = CHUNKS;
    for (var kk = lane; kk < len; kk += TPR) {
        let p = moments(p_tile[row * PS + kk], m, st.tau).x;
        p_tile[row * PS + kk] = p;
        psum += p;
        if (p > 0.0) {
            if (kk / KC != marked) {
                marked = kk / KC;
                atomicStore(&chunk_live[marked], 1u);
            }
            if (support < SUPPORT_SLOTS) {
                pair_set(WG, support_slot(row, lane, support), p, f32(kk));
            }
            support++;
        }
    }
    support_count[lid] = support;
    let total_of_row = row_reduce(lid, vec4<f32>(psum, 0.0, 0.0, 0.0), false).x;
    // fused_tiles.wgsl's `red` hands each row's Σp to the register-tile layout.
    if (lane == 0u) {
        red[row] = total_of_row;
    }
    workgroupBarrier();
    var total: array<f32, RQ>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        total[r] = red[ty * RQ + r];
    }
    var acc: array<vec4<f32>, RQ * NC>;
    // ---- pass 2: O += P·V, gathered when every support fits its slots (the vote's uniform
    // load publishes the lists) ...
    tick++;
    if (!any_thread(support > SUPPORT_SLOTS, tick)) {
        count_path(lid, PATH_CACHE_GATHERED);
        accumulate_gathered_pv(t, ty, tx, &acc);
        store_rows(t, ty, tx, &acc, total);
        return;
    }
    // ... else over the staged chunks with a p > 0.
    count_path(lid, PATH_CACHE_STAGED);
    var at = 0u;
    for (var b = t.first; b < t.last; b++) {
        let kb = pat_word(params.off_col_idx + b);
        for (var kc = 0u; kc < BK; kc += KC) {
            let key0 = kb * BK + kc;
            if (key0 >= params.seq_kv || at + KC > RC) {
                break;
            }
            if (workgroupUniformLoad(&chunk_live[at / KC]) != 0u) {
                stage_v(t, key0, lid);
                workgroupBarrier();
                accumulate_support_pv(ty, tx, at, &acc);
                workgroupBarrier(); // the next chunk's V overwrites what this one read
            }
            at += KC;
        }
    }
    store_rows(t, ty, tx, &acc, total);
}
