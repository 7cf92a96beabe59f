// MRA low-resolution stage (Zeng et al. 2022) for one chunk of query slices
// [slice_base, slice_base + slices) and the kv slices they read [kv_base, kv_base + kv_slices):
//   block_means:  Q̂, K̂, V̂ over the valid rows of each block (ragged tails use the valid count)
//                 into `means` = [Q̂ (slices·qn·d) | K̂ (kv_slices·kn·d) | V̂ (same, if has_v)]
//                                                           (one invocation per (block, column))
//   block_scores: L_IJ = scale·Q̂_I·K̂_J and the row max r_I over all J
//                 (one workgroup per 4 query-block rows of a slice, lanes of a vec4)
//   select_blocks: the priors, then the `want` largest keys (L_IJ − r_I) among the other blocks,
//                 ties to the lower flat index I·kn + J (one workgroup per slice): the keys are
//                 order-preserving u32s; a 4-pass radix select (256-bin histograms, integer
//                 atomics in workgroup memory) finds the want-th largest key T, then every key
//                 above T and the first (want − #above) keys equal to T in index order (a
//                 workgroup prefix scan per tile) are taken. sel[...] = 1 selected, 0 not.
//   row_terms:    per query-block row, over the non-selected blocks: [r, S, N_0..N_{d-1}] with
//                 r = max L_IJ (NEG_BIG when none), S = Σ c_J·exp(L_IJ − r),
//                 N = Σ c_J·exp(L_IJ − r)·V̂_J      (one workgroup per 4 rows, like block_scores)
// The selection's tie ranks come from one exclusive scan over per-thread runs of indices.
// Every index is guarded; f32 accumulation in a fixed order (deterministic); no float atomics;
// no infinities (NEG_BIG is the finite "no score" sentinel).

const NEG_BIG: f32 = -3.0e38;
const WG: u32 = 64u;
const SWG: u32 = 256u;
const ROWS: u32 = 4u;

struct LowResParams {
    slices: u32,
    kv_slices: u32,
    slice_base: u32,
    kv_base: u32,
    heads: u32,
    kv_heads: u32,
    group: u32,
    head_dim: u32,
    seq_q: u32,
    seq_kv: u32,
    block: u32,
    q_blocks: u32,
    k_blocks: u32,
    diagonal_band: u32,
    first_block_prior: u32,
    want: u32,
    has_v: u32,
    scale: f32,
    k_means_off: u32,
    v_means_off: u32,
}

@group(0) @binding(0) var<uniform> lp: LowResParams;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> means: array<f32>;
@group(0) @binding(5) var<storage, read_write> logits: array<f32>;
@group(0) @binding(6) var<storage, read_write> rowmax: array<f32>;
@group(0) @binding(7) var<storage, read_write> sel: array<u32>;
@group(0) @binding(8) var<storage, read_write> rows: array<f32>;

var<workgroup> red4: array<vec4<f32>, WG>;
var<workgroup> wts4: array<vec4<f32>, WG>;
var<workgroup> hist: array<atomic<u32>, SWG>;
var<workgroup> scan: array<u32, SWG>;
var<workgroup> pick: vec2<u32>;

fn ld_q(i: u32) -> f32 {
    if (i < arrayLength(&q)) {
        return q[i];
    }
    return 0.0;
}

fn ld_k(i: u32) -> f32 {
    if (i < arrayLength(&k)) {
        return k[i];
    }
    return 0.0;
}

fn ld_v(i: u32) -> f32 {
    if (i < arrayLength(&v)) {
        return v[i];
    }
    return 0.0;
}

fn ld_mean(i: u32) -> f32 {
    if (i < arrayLength(&means)) {
        return means[i];
    }
    return 0.0;
}

fn ld_logit(i: u32) -> f32 {
    if (i < arrayLength(&logits)) {
        return logits[i];
    }
    return NEG_BIG;
}

fn ld_rowmax(i: u32) -> f32 {
    if (i < arrayLength(&rowmax)) {
        return rowmax[i];
    }
    return NEG_BIG;
}

fn ld_sel(i: u32) -> u32 {
    if (i < arrayLength(&sel)) {
        return sel[i];
    }
    return 1u;
}

// Local kv slice (in this chunk) read by local query slice `ls`.
fn kv_local(ls: u32) -> u32 {
    let s = lp.slice_base + ls;
    let kv = (s / max(lp.heads, 1u)) * lp.kv_heads + (s % max(lp.heads, 1u)) / max(lp.group, 1u);
    return kv - min(kv, lp.kv_base);
}

// Valid keys of key block j.
fn key_count(j: u32) -> u32 {
    let lo = j * lp.block;
    return min(lo + lp.block, lp.seq_kv) - min(lo, lp.seq_kv);
}

// Flat workgroup index of a 2-D grid.
fn group_index(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

@compute @workgroup_size(64)
fn block_means(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let item = group_index(wg, nwg) * WG + lid;
    let d = lp.head_dim;
    let q_items = lp.slices * lp.q_blocks * d;
    let kv_items = lp.kv_slices * lp.k_blocks * d;
    var total = q_items + kv_items;
    if (lp.has_v != 0u) {
        total += kv_items;
    }
    if (item >= total || d == 0u) {
        return;
    }
    let c = item % d;
    var acc = 0.0;
    var count = 1u;
    if (item < q_items) {
        let blk = (item / d) % lp.q_blocks;
        let ls = item / (d * lp.q_blocks);
        let lo = min(blk * lp.block, lp.seq_q);
        let hi = min(lo + lp.block, lp.seq_q);
        for (var t = lo; t < hi; t++) {
            acc += ld_q((ls * lp.seq_q + t) * d + c);
        }
        count = max(hi - lo, 1u);
    } else {
        let is_v = item >= q_items + kv_items;
        var local = item - q_items;
        if (is_v) {
            local -= kv_items;
        }
        let blk = (local / d) % lp.k_blocks;
        let kvs = local / (d * lp.k_blocks);
        let lo = min(blk * lp.block, lp.seq_kv);
        let hi = min(lo + lp.block, lp.seq_kv);
        for (var t = lo; t < hi; t++) {
            let at = (kvs * lp.seq_kv + t) * d + c;
            if (is_v) {
                acc += ld_v(at);
            } else {
                acc += ld_k(at);
            }
        }
        count = max(hi - lo, 1u);
    }
    if (item < arrayLength(&means)) {
        means[item] = acc / f32(count);
    }
}

// Rows of a 4-row group (query-block rows i0..i0+3 of one local slice), as a validity mask.
struct RowGroup {
    ls: u32,
    i0: u32,
    valid: vec4<bool>,
}

fn row_group(g: u32) -> RowGroup {
    let groups = (lp.q_blocks + ROWS - 1u) / ROWS;
    let ls = g / max(groups, 1u);
    let i0 = (g % max(groups, 1u)) * ROWS;
    let live = ls < lp.slices;
    let i = vec4<u32>(i0, i0 + 1u, i0 + 2u, i0 + 3u);
    return RowGroup(ls, i0, vec4<bool>(live && i.x < lp.q_blocks, live && i.y < lp.q_blocks, live && i.z < lp.q_blocks, live && i.w < lp.q_blocks));
}

@compute @workgroup_size(64)
fn block_scores(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let grp = row_group(group_index(wg, nwg));
    let d = lp.head_dim;
    let kn = lp.k_blocks;
    let kvl = kv_local(grp.ls);
    let row0 = grp.ls * lp.q_blocks + grp.i0;
    var m = vec4<f32>(NEG_BIG);
    if (any(grp.valid)) {
        for (var j = lid; j < kn; j += WG) {
            var dot = vec4<f32>(0.0);
            for (var c = 0u; c < d; c++) {
                let qv = vec4<f32>(ld_mean(row0 * d + c), ld_mean((row0 + 1u) * d + c), ld_mean((row0 + 2u) * d + c), ld_mean((row0 + 3u) * d + c));
                dot += qv * ld_mean(lp.k_means_off + (kvl * kn + j) * d + c);
            }
            let l = lp.scale * dot;
            for (var r = 0u; r < ROWS; r++) {
                let at = (row0 + r) * kn + j;
                if (grp.valid[r] && at < arrayLength(&logits)) {
                    logits[at] = l[r];
                }
            }
            m = max(m, l);
        }
    }
    red4[lid] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red4[lid] = max(red4[lid], red4[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid < ROWS && grp.valid[lid] && row0 + lid < arrayLength(&rowmax)) {
        rowmax[row0 + lid] = red4[0][lid];
    }
}

// Order-preserving map f32 → u32 (total order: −0 below +0).
fn order_key(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x80000000u) != 0u) {
        return ~b;
    }
    return b | 0x80000000u;
}

struct Cand {
    prior: bool,
    key: u32,
}

// Block idx = I·kn + J of local slice ls: a prior, or a candidate with its key.
fn candidate(ls: u32, idx: u32) -> Cand {
    let kn = max(lp.k_blocks, 1u);
    let i = idx / kn;
    let j = idx % kn;
    let dist = max(i, j) - min(i, j);
    let prior = dist < lp.diagonal_band || (lp.first_block_prior != 0u && (i == 0u || j == 0u));
    let row = ls * lp.q_blocks + i;
    let l = ld_logit(row * lp.k_blocks + j);
    let r = ld_rowmax(row);
    return Cand(prior, order_key(l - r));
}

@compute @workgroup_size(256)
fn select_blocks(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let ls = group_index(wg, nwg);
    let live = ls < lp.slices;
    let total = lp.q_blocks * lp.k_blocks;
    // Radix select of the want-th largest key, 8 bits per pass from the top.
    var prefix = 0u;
    var mask = 0u;
    var rank = lp.want;
    for (var digit_pass = 0u; digit_pass < 4u; digit_pass++) {
        let shift = 24u - 8u * digit_pass;
        atomicStore(&hist[lid], 0u);
        workgroupBarrier();
        if (live && lp.want > 0u) {
            for (var idx = lid; idx < total; idx += SWG) {
                let c = candidate(ls, idx);
                if (!c.prior && (c.key & mask) == prefix) {
                    atomicAdd(&hist[(c.key >> shift) & 255u], 1u);
                }
            }
        }
        workgroupBarrier();
        if (lid == 0u) {
            var above = 0u;
            var digit = 0u;
            var left = rank;
            for (var t = 0u; t < SWG; t++) {
                let bin = SWG - 1u - t;
                let h = atomicLoad(&hist[bin]);
                if (above + h >= rank) {
                    digit = bin;
                    left = rank - above;
                    break;
                }
                above += h;
            }
            pick = vec2<u32>(digit, left);
        }
        let p = workgroupUniformLoad(&pick);
        prefix |= p.x << shift;
        mask |= 255u << shift;
        rank = p.y;
    }
    // `prefix` is the threshold key T; `rank` keys equal to T are still wanted (lowest indices).
    // Each thread walks a contiguous run of indices: count its ties, scan the counts across
    // the workgroup (exclusive), then walk the run again handing out tie ranks in index order.
    let per = (total + SWG - 1u) / SWG;
    let lo = min(lid * per, total);
    let hi = min(lo + per, total);
    var ties = 0u;
    if (live && lp.want > 0u) {
        for (var idx = lo; idx < hi; idx++) {
            let c = candidate(ls, idx);
            if (!c.prior && c.key == prefix) {
                ties += 1u;
            }
        }
    }
    scan[lid] = ties;
    workgroupBarrier();
    for (var off = 1u; off < SWG; off <<= 1u) {
        var x = 0u;
        if (lid >= off) {
            x = scan[lid - off];
        }
        workgroupBarrier();
        scan[lid] += x;
        workgroupBarrier();
    }
    var before = scan[lid] - ties;
    if (live) {
        for (var idx = lo; idx < hi; idx++) {
            let c = candidate(ls, idx);
            var flag = 0u;
            if (c.prior) {
                flag = 1u;
            } else if (lp.want > 0u && c.key > prefix) {
                flag = 1u;
            } else if (lp.want > 0u && c.key == prefix) {
                if (before < rank) {
                    flag = 1u;
                }
                before += 1u;
            }
            let at = ls * total + idx;
            if (at < arrayLength(&sel)) {
                sel[at] = flag;
            }
        }
    }
}

@compute @workgroup_size(64)
fn row_terms(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let grp = row_group(group_index(wg, nwg));
    let d = lp.head_dim;
    let kn = lp.k_blocks;
    let kvl = kv_local(grp.ls);
    let row0 = grp.ls * lp.q_blocks + grp.i0;
    // r per row: the max over its non-selected blocks (NEG_BIG when none).
    var m = vec4<f32>(NEG_BIG);
    for (var j = lid; j < kn; j += WG) {
        for (var r = 0u; r < ROWS; r++) {
            let at = (row0 + r) * kn + j;
            if (grp.valid[r] && ld_sel(at) == 0u) {
                m[r] = max(m[r], ld_logit(at));
            }
        }
    }
    red4[lid] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red4[lid] = max(red4[lid], red4[lid + s]);
        }
        workgroupBarrier();
    }
    let rmax = red4[0];
    let stride = d + 2u;
    if (lid < ROWS && grp.valid[lid] && (row0 + lid) * stride < arrayLength(&rows)) {
        rows[(row0 + lid) * stride] = max(rmax[lid], NEG_BIG);
    }
    // Column c < d: N_c; column d: S. The weights c_J·exp(L_IJ − r) of a tile of 64 key blocks
    // (4 rows each) are staged in workgroup memory; each column sums over J in order.
    for (var c0 = 0u; c0 <= d; c0 += WG) {
        let c = c0 + lid;
        var acc = vec4<f32>(0.0);
        for (var j0 = 0u; j0 < kn; j0 += WG) {
            let j = j0 + lid;
            var w = vec4<f32>(0.0);
            if (j < kn) {
                let cnt = f32(key_count(j));
                for (var r = 0u; r < ROWS; r++) {
                    let at = (row0 + r) * kn + j;
                    if (grp.valid[r] && rmax[r] > NEG_BIG && ld_sel(at) == 0u) {
                        w[r] = cnt * exp(ld_logit(at) - rmax[r]);
                    }
                }
            }
            wts4[lid] = w;
            workgroupBarrier();
            let n = min(WG, kn - j0);
            if (c < d) {
                for (var t = 0u; t < n; t++) {
                    acc += wts4[t] * ld_mean(lp.v_means_off + (kvl * kn + j0 + t) * d + c);
                }
            } else if (c == d) {
                for (var t = 0u; t < n; t++) {
                    acc += wts4[t];
                }
            }
            workgroupBarrier();
        }
        for (var r = 0u; r < ROWS; r++) {
            var at = (row0 + r) * stride + 2u + c;
            if (c == d) {
                at = (row0 + r) * stride + 1u;
            }
            if (grp.valid[r] && c <= d && at < arrayLength(&rows)) {
                rows[at] = acc[r];
            }
        }
    }
}
