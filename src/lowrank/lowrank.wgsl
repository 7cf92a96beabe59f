// Low-rank attention (Bhojanapalli et al. 2021) in three entry points sharing one layout:
//   subset_scores: exact[row, p] = scale * q_row . k_{S_p}          (one invocation per (row, p))
//   reconstruct:   c = A (exact_row - mu_S); scores[row, j] = mu_j + U_j . c, or the exact score
//                  where j is in S                                     (one workgroup per row)
//   normalize_pv:  softmax or alpha-entmax (bisection on tau) over the full row, then O = P V
//                                                                     (one workgroup per row)
// `data` packs q, k, v, mu, U (n x r) and A (r x m) at the offsets in Params. `subset` holds the
// m positions of S followed by, for each of the n positions, its slot in S or NO_SLOT.
// Every index is guarded; f32 throughout; no float atomics; no infinities.

const WG: u32 = 64u;
const MAX_RANK: u32 = 128u;
const NO_SLOT: u32 = 0xffffffffu;
const NEG: f32 = -3.0e38;

struct Params {
    rows: u32,
    seq_q: u32,
    heads: u32,
    kv_heads: u32,
    group: u32,
    n: u32,
    d: u32,
    m: u32,
    r: u32,
    kind: u32,
    iters: u32,
    pad0: u32,
    alpha: f32,
    scale: f32,
    pad1: u32,
    pad2: u32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    mu_off: u32,
    u_off: u32,
    a_off: u32,
    pad3: u32,
    pad4: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> data: array<f32>;
@group(0) @binding(2) var<storage, read> subset: array<u32>;
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;
@group(0) @binding(4) var<storage, read_write> exact: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, 64>;
var<workgroup> coef: array<f32, 128>;

fn ld(i: u32) -> f32 {
    if (i < arrayLength(&data)) {
        return data[i];
    }
    return 0.0;
}

fn ld_subset(i: u32) -> u32 {
    if (i < arrayLength(&subset)) {
        return subset[i];
    }
    return NO_SLOT;
}

fn ld_exact(i: u32) -> f32 {
    if (i < arrayLength(&exact)) {
        return exact[i];
    }
    return 0.0;
}

fn ld_score(i: u32) -> f32 {
    if (i < arrayLength(&scores)) {
        return scores[i];
    }
    return NEG;
}

// Offset (in elements, before k_off / v_off) of key j of the kv slice that `row` reads.
fn kv_base(row: u32, j: u32) -> u32 {
    let slice = row / max(P.seq_q, 1u);
    let b = slice / max(P.heads, 1u);
    let h = slice % max(P.heads, 1u);
    let kvs = b * P.kv_heads + h / max(P.group, 1u);
    return (kvs * P.n + j) * P.d;
}

fn reduce_sum(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

fn reduce_max(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    return m;
}

@compute @workgroup_size(64)
fn subset_scores(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * WG;
    if (idx >= P.rows * P.m) {
        return;
    }
    let row = idx / P.m;
    let p = idx % P.m;
    let j = ld_subset(p);
    if (j >= P.n) {
        return;
    }
    let qb = P.q_off + row * P.d;
    let kb = P.k_off + kv_base(row, j);
    var acc = 0.0;
    for (var c = 0u; c < P.d; c = c + 1u) {
        acc = acc + ld(qb + c) * ld(kb + c);
    }
    if (idx < arrayLength(&exact)) {
        exact[idx] = P.scale * acc;
    }
}

@compute @workgroup_size(64)
fn reconstruct(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= P.rows) {
        return;
    }
    let r = min(P.r, MAX_RANK);
    for (var t = lid; t < r; t = t + WG) {
        var c = 0.0;
        for (var p = 0u; p < P.m; p = p + 1u) {
            let j = ld_subset(p);
            let y = ld_exact(row * P.m + p) - ld(P.mu_off + j);
            c = c + ld(P.a_off + t * P.m + p) * y;
        }
        coef[t] = c;
    }
    workgroupBarrier();
    for (var j = lid; j < P.n; j = j + WG) {
        let slot = ld_subset(P.m + j);
        var s = 0.0;
        if (slot < P.m) {
            s = ld_exact(row * P.m + slot);
        } else {
            s = ld(P.mu_off + j);
            for (var c = 0u; c < r; c = c + 1u) {
                s = s + ld(P.u_off + j * P.r + c) * coef[c];
            }
        }
        let o = row * P.n + j;
        if (o < arrayLength(&scores)) {
            scores[o] = s;
        }
    }
}

@compute @workgroup_size(64)
fn normalize_pv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= P.rows) {
        return;
    }
    let base = row * P.n;
    var mx = NEG;
    for (var j = lid; j < P.n; j = j + WG) {
        mx = max(mx, ld_score(base + j));
    }
    mx = reduce_max(mx, lid);
    if (P.kind == 0u) {
        var part = 0.0;
        for (var j = lid; j < P.n; j = j + WG) {
            part = part + exp(ld_score(base + j) - mx);
        }
        let total = reduce_sum(part, lid);
        let inv = 1.0 / max(total, 1.0e-30);
        for (var j = lid; j < P.n; j = j + WG) {
            let o = base + j;
            if (o < arrayLength(&scores)) {
                scores[o] = exp(scores[o] - mx) * inv;
            }
        }
    } else {
        // p_j = [(alpha - 1)(s_j - max) - tau]_+^(1/(alpha - 1)); sum p(tau = -1) >= 1, sum p(0) = 0.
        let am1 = P.alpha - 1.0;
        let e = 1.0 / am1;
        var lo = -1.0;
        var hi = 0.0;
        for (var it = 0u; it < P.iters; it = it + 1u) {
            let tau = 0.5 * (lo + hi);
            var part = 0.0;
            for (var j = lid; j < P.n; j = j + WG) {
                let x = am1 * (ld_score(base + j) - mx) - tau;
                if (x > 0.0) {
                    part = part + pow(x, e);
                }
            }
            let total = reduce_sum(part, lid);
            let above = total >= 1.0;
            lo = select(lo, tau, above);
            hi = select(tau, hi, above);
        }
        // Normalise at tau = lo (sum >= 1 there, so the row keeps at least its maximum).
        var part = 0.0;
        for (var j = lid; j < P.n; j = j + WG) {
            let x = am1 * (ld_score(base + j) - mx) - lo;
            if (x > 0.0) {
                part = part + pow(x, e);
            }
        }
        let total = reduce_sum(part, lid);
        let inv = 1.0 / max(total, 1.0e-30);
        for (var j = lid; j < P.n; j = j + WG) {
            let o = base + j;
            if (o < arrayLength(&scores)) {
                let x = am1 * (scores[o] - mx) - lo;
                var p = 0.0;
                if (x > 0.0) {
                    p = pow(x, e) * inv;
                }
                scores[o] = p;
            }
        }
    }
    storageBarrier();
    for (var c = lid; c < P.d; c = c + WG) {
        var acc = 0.0;
        for (var j = 0u; j < P.n; j = j + 1u) {
            let p = ld_score(base + j);
            if (p > 0.0) {
                acc = acc + p * ld(P.v_off + kv_base(row, j) + c);
            }
        }
        let o = row * P.d + c;
        if (o < arrayLength(&out)) {
            out[o] = acc;
        }
    }
}
