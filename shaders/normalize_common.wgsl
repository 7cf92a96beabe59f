// Row machinery shared by the two normalisers: one workgroup of NT threads per query row,
// elements visited as (block, column) pairs of the row's stored blocks; workgroup reductions.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> pat: array<u32>;
@group(0) @binding(2) var<storage, read_write> scores: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats: array<u32>;

const NT: u32 = 64u;

// reduce_sum and reduce_max_count come from reduce_workgroup.wgsl or reduce_subgroup.wgsl.

struct RowCtx {
    slice: u32,
    qb: u32,
    r: u32,
    first: u32,
    len: u32, // stored blocks * BK elements
}

fn row_ctx(w: u32) -> RowCtx {
    let vrow = params.row_base + w / BQ;
    let blocks = row_block_range(vrow);
    return RowCtx(slice_of_row(vrow), vrow % params.q_blocks, w % BQ, blocks.x, (blocks.y - blocks.x) * BK);
}

// Index into `scores` of element e (0 <= e < len) of the row.
fn score_index(ctx: RowCtx, e: u32) -> u32 {
    let b = ctx.first + e / BK;
    return tile_of(ctx.slice, b) * (BQ * BK) + ctx.r * BK + e % BK - params.scores_base;
}

// `scores` and `stats` through guarded accessors: an index past the binding (a wrong window
// base wraps below zero to a huge u32) reads 0 and writes nothing, instead of wgpu clamping it
// onto some other row's entry.
fn score_get(at: u32) -> f32 {
    if (at < arrayLength(&scores)) {
        return scores[at];
    }
    return 0.0;
}

fn score_set(at: u32, x: f32) {
    if (at < arrayLength(&scores)) {
        scores[at] = x;
    }
}

fn element_allowed(ctx: RowCtx, e: u32) -> bool {
    return allowed(ctx.first + e / BK, ctx.qb, ctx.r, e % BK);
}

// Row max and allowed count.
fn row_max_count(ctx: RowCtx, lid: u32) -> vec2<f32> {
    var m = NEG_BIG;
    var n = 0.0;
    for (var e = lid; e < ctx.len; e += NT) {
        if (element_allowed(ctx, e)) {
            m = max(m, score_get(score_index(ctx, e)));
            n += 1.0;
        }
    }
    return reduce_max_count(lid, m, n);
}

fn write_stats(w: u32, lid: u32, support: u32, iterations: u32) {
    if (lid == 0u) {
        let at = 2u * (params.row_base * BQ + w) - params.stats_base;
        if (at + 1u < arrayLength(&stats)) {
            stats[at] = support;
            stats[at + 1u] = iterations;
        }
    }
}
