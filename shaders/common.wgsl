// Shared prelude, prepended to every kernel by the host (src/gpu/kernels.rs) together with
// the element alias (`alias elem = f32;` or `enable f16; alias elem = f16;`) and the tile
// constants BQ, BK.
//
// Indexing model: a "virtual row" is one query block of one (batch, head) slice,
// row = slice * q_blocks + qb. A dispatch chunk covers rows [row_base, row_base + row_count)
// and score tiles [tile_base, tile_base + tile_count). Every tensor is bound as a window whose
// first element has global index *_base, so a global index g lives at g - *_base.

struct Params {
    seq_q: u32,
    seq_kv: u32,
    head_dim: u32,
    heads: u32,
    kv_heads: u32,
    q_blocks: u32,
    k_blocks: u32,
    shared_pattern: u32,
    nnz_per_slice: u32,
    row_base: u32,
    row_count: u32,
    tile_base: u32,
    tile_count: u32,
    q_base: u32,
    kv_base: u32,
    o_base: u32,
    scores_base: u32,
    stats_base: u32,
    off_row_ptr: u32,
    off_col_idx: u32,
    off_mask_of: u32,
    off_blk_row: u32,
    off_masks: u32,
    d_chunks: u32,
    scale: f32,
    alpha: f32,
    exponent: f32,
    tolerance: f32,
    max_iterations: u32,
    key_splits: u32,
    min_row_blocks: u32,
    max_row_blocks: u32,
}

const FULL_BLOCK: u32 = 0xffffffffu;
// Finite sentinel for "no score yet" (no ±inf literals in WGSL).
const NEG_BIG: f32 = -3.0e38;

// Linear workgroup id of a 2D dispatch (x is capped at the adapter's per-dimension limit).
fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

fn slice_of_row(row: u32) -> u32 {
    return row / params.q_blocks;
}

fn kv_slice_of(slice: u32) -> u32 {
    let group = params.heads / params.kv_heads;
    return (slice / params.heads) * params.kv_heads + (slice % params.heads) / group;
}

// x^e for the entmax exponent e = 1/(α-1), x > 0; exact fast paths for sparsemax (e = 1) and
// 1.5-entmax (e = 2).
fn pow_e(x: f32) -> f32 {
    if (params.exponent == 1.0) {
        return x;
    }
    if (params.exponent == 2.0) {
        return x * x;
    }
    return exp2(params.exponent * log2(x));
}

// (x^e, x^(e-1), x^(e-2)) for x > 0: the terms of Σp and of the threshold step's moments
// (`tau_step`). 1.5-entmax (e = 2) and sparsemax (e = 1) take them without a division or a
// power (the search's inner loop runs this per cached score; a division costs many
// multiply-adds), other α one reciprocal and one exp2/log2. Sparsemax's third term is 0:
// Michelot's step reads only the count, and the Halley fallback runs only on an empty support.
fn moment_terms(x: f32) -> vec3<f32> {
    if (params.exponent == 2.0) {
        return vec3<f32>(x * x, x, 1.0);
    }
    if (params.exponent == 1.0) {
        return vec3<f32>(x, 1.0, 0.0);
    }
    let inv = 1.0 / x;
    let px = exp2(params.exponent * log2(x));
    return vec3<f32>(px, px * inv, px * inv * inv);
}

// Top of the entmax threshold bracket for n allowed scores at most the row max (shifted space):
// Σp <= n·(-τ)^e, which is 1 at τ = -(1/n)^(α-1).
fn tau_top(n: f32) -> f32 {
    return -exp2((params.alpha - 1.0) * log2(1.0 / max(n, 1.0)));
}

// One step of the entmax threshold search from the row's moments at `tau` over its current
// support (x = z - τ > 0): f = Σx^e - 1, s1 = Σx^(e-1), s2 = Σx^(e-2). For 1.5-entmax Σp is
// exactly quadratic in τ while the support stays (s1 = Σx, s2 = the count) and for sparsemax
// linear (s1 = the count), so those steps go to the root over the current support (Michelot's
// step for sparsemax); other α take Halley's step. Returns (next τ, 1) when the step lands
// strictly inside (lo, hi), else (bisection midpoint, 0).
fn tau_step(tau: f32, lo: f32, hi: f32, f: f32, s1: f32, s2: f32) -> vec2<f32> {
    let e = params.exponent;
    var t = 0.0;
    var ok = false;
    if (e == 2.0 && s2 > 0.0) {
        t = tau + (s1 - sqrt(max(s1 * s1 - s2 * f, 0.0))) / s2;
        ok = true;
    } else if (e == 1.0 && s1 > 0.0) {
        t = tau + f / s1;
        ok = true;
    } else {
        // f' = -e Σx^(e-1), f'' = e(e-1) Σx^(e-2); Halley: τ - 2ff'/(2f'² - ff'').
        let d1 = -e * s1;
        let d2 = e * (e - 1.0) * s2;
        let denom = 2.0 * d1 * d1 - f * d2;
        if (denom > 0.0 && denom < 3.0e38) {
            t = tau - 2.0 * f * d1 / denom;
            ok = true;
        }
    }
    if (ok && t > lo && t < hi) {
        return vec2<f32>(t, 1.0);
    }
    return vec2<f32>(0.5 * (lo + hi), 0.0);
}

// One row's threshold search: the iterate, its bracket, and whether it still runs.
struct Search {
    tau: f32,
    lo: f32,
    hi: f32,
    searching: bool,
}

// One threshold-search step from the row's moments at st.tau (`tau_step`: exact over the
// current support for 1.5-entmax and sparsemax, Halley otherwise, bisection when a step leaves
// the bracket). Stops on |Σp - 1| <= tolerance, a tiny step or a tiny bracket.
fn search_update(st: Search, total: vec4<f32>) -> Search {
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
    let next = tau_step(st.tau, r.lo, r.hi, f, total.y, total.z);
    let step = abs(next.x - st.tau);
    r.tau = next.x;
    if ((next.y > 0.0 && step <= 1e-7) || r.hi - r.lo <= 1e-7) {
        r.searching = false;
    }
    return r;
}
