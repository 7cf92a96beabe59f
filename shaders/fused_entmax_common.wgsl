// Shared by the fused entmax kernels (fused_entmax.wgsl: pooled candidates;
// fused_entmax_cached.wgsl: every score cached): the per-score layout (TPR threads per query
// row), the row reductions, the workgroup vote and the threshold search over on-chip scores.
// Each kernel defines `lane_moments`: the moments at τ of one (row, lane)'s share of the
// scores it keeps on chip.

const TPR: u32 = WG / TQ; // threads per query row in the per-score work

var<workgroup> vote: atomic<u32>;

// Which branches the call's workgroups took (read back as `EntmaxPaths`; the host clears it
// before each call and declares the word indices `PATH_*`). Integer counts, one atomic per
// workgroup and event: deterministic.
@group(0) @binding(6) var<storage, read_write> path_counts: array<atomic<u32>>;

// Counts one event of the workgroup (call from uniform control flow: thread 0 counts).
fn count_path(lid: u32, which: u32) {
    if (lid == 0u && which < arrayLength(&path_counts)) {
        atomicAdd(&path_counts[which], 1u);
    }
}

// (a, b) pair `i` of kv_tile from vec4 `base` (two pairs per vec4): the entmax kernels keep
// (score or p, key) lists there while no K or V chunk is staged.
fn pair_set(base: u32, i: u32, a: f32, b: f32) {
    let o = (i & 1u) * 2u;
    kv_tile[base + (i >> 1u)][o] = a;
    kv_tile[base + (i >> 1u)][o + 1u] = b;
}

fn pair_get(base: u32, i: u32) -> vec2<f32> {
    let v = kv_tile[base + (i >> 1u)];
    return select(v.xy, v.zw, (i & 1u) == 1u);
}

// (Σ x^e, Σ x^(e-1), Σ x^(e-2)) contribution of one score at threshold tau (shifted by the row
// max m); 0 for disallowed entries and those at or below τ.
fn moments(s: f32, m: f32, tau: f32) -> vec4<f32> {
    let x = (params.alpha - 1.0) * (s - m) - tau;
    if (s <= NEG_BIG || x <= 0.0) {
        return vec4<f32>(0.0);
    }
    return vec4<f32>(moment_terms(x), 0.0);
}

// Sum of kv_tile's entries of this thread's row over its TPR lanes, in lane order; `at` is this
// thread's entry (lid, plus an offset that is a multiple of WG).
fn lane_total(at: u32) -> vec4<f32> {
    let first = (at / TPR) * TPR;
    var a = kv_tile[first];
    for (var u = 1u; u < TPR; u++) {
        a += kv_tile[first + u];
    }
    return a;
}

// This thread's row's per-lane values combined over its TPR lanes: sums, or with `maxes`
// (max, sum, max, sum) by component. By subgroup shuffles where the rows' lanes share
// subgroups (fused_lanes_*.wgsl), else in lane order through kv_tile, so call it between
// chunks, from uniform control flow. Starts with a barrier either way: callers rely on it to
// order their workgroup-memory accesses before and after the call.
fn row_reduce(lid: u32, x: vec4<f32>, maxes: bool) -> vec4<f32> {
    if (barrier_then_lanes_in_subgroups()) {
        return lanes_reduce4(x, TPR, maxes);
    }
    kv_tile[lid] = x;
    workgroupBarrier();
    let first = (lid / TPR) * TPR;
    var a = kv_tile[first];
    for (var u = 1u; u < TPR; u++) {
        let b = kv_tile[first + u];
        if (maxes) {
            a = vec4<f32>(max(a.x, b.x), a.y + b.y, max(a.z, b.z), a.w + b.w);
        } else {
            a += b;
        }
    }
    workgroupBarrier();
    return a;
}

// Whether `a` holds on any thread, as a uniform value. `tick` is the same on every thread and
// grows with every call, so the vote word never needs resetting.
fn any_thread(a: bool, tick: u32) -> bool {
    if (a) {
        atomicMax(&vote, tick);
    }
    return workgroupUniformLoad(&vote) == tick;
}

// τ per row over the scores each (row, lane) keeps on chip (`count` of them, as
// `lane_moments` reads them), from `start`, rows in lockstep (a row of one thread searches
// alone). Each iteration's moments and the vote on whether any row still searches share one
// uniform load (its barriers publish both). The moments alternate between two halves of
// kv_tile, so the next iteration's writes never meet this one's reads and no third barrier is
// needed. The loop leaves only through that load, after its last scratch access: the score
// cache's support lists, written next, share [WG, 2·WG). Call from uniform control flow.
fn solve_tau(lid: u32, row: u32, lane: u32, count: u32, m: f32, start: Search, tick: ptr<function, u32>) -> Search {
    var st = start;
    var iterations = 0u;
    if (TPR == 1u) {
        // One thread per row: nothing to combine, so each row searches on its own, without
        // barriers or votes, and stops when it converges (a SIMD group waits for its slowest
        // row, not the workgroup for the slowest of all). With more lanes per row, one lane
        // searching alone would idle the others in its SIMD group: slower on llvmpipe.
        loop {
            if (!st.searching || iterations >= params.max_iterations) {
                break;
            }
            iterations++;
            st = search_update(st, lane_moments(row, lane, count, m, st.tau));
        }
        return st;
    }
    loop {
        var sums = vec4<f32>(0.0);
        if (st.searching) {
            sums = lane_moments(row, lane, count, m, st.tau);
            atomicMax(&vote, *tick + 1u);
        }
        let half = (iterations % 2u) * WG;
        kv_tile[half + lid] = sums;
        *tick += 1u;
        if (workgroupUniformLoad(&vote) != *tick || iterations >= params.max_iterations) {
            break;
        }
        iterations++;
        if (st.searching) {
            st = search_update(st, lane_total(half + lid));
        }
    }
    return st;
}

// A tile of a query block row without stored blocks: every row is empty, so O = 0, written
// without staging Q or searching τ (such rows are common in sparse patterns: at block density
// 0.04 over 16 key blocks, half of them). Counted as `gathered` (its support, none, was
// gathered). `t` is uniform: call from uniform control flow, and return after it.
fn store_empty_tile(t: Tile, lid: u32, gathered: u32) {
    count_path(lid, gathered);
    var zero: array<vec4<f32>, RQ * NC>;
    var none: array<f32, RQ>;
    store_rows(t, lid / TX, lid % TX, &zero, none);
}
