// Successive-halving soft top-k pooling (Pietruszka et al. 2022), one workgroup per sequence.
// Buffers: emb [batch, 2, n, dim] and score [batch, 2, n] hold two regions (ping-pong: step s
// reads region s % 2 and writes region 1 - s % 2); order [batch, n] is the sort scratch.
// Each step: bitonic sort of positions by (score desc, position asc); pair the i-th best with
// the i-th worst; weights = softmax of base^score over the pair; weighted sums.

struct Params {
    batch: u32,
    n: u32,
    dim: u32,
    depth: u32,
    ln_base: f32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> emb: array<f32>;
@group(0) @binding(2) var<storage, read_write> score: array<f32>;
@group(0) @binding(3) var<storage, read_write> order: array<u32>;

const WG: u32 = 256u;

fn score_at(i: u32) -> f32 {
    if (i < arrayLength(&score)) {
        return score[i];
    }
    return 0.0;
}

fn emb_at(i: u32) -> f32 {
    if (i < arrayLength(&emb)) {
        return emb[i];
    }
    return 0.0;
}

fn order_at(i: u32) -> u32 {
    if (i < arrayLength(&order)) {
        return order[i];
    }
    return 0u;
}

// Whether position a ranks before position b (higher score; ties: lower position).
fn before(sbase: u32, a: u32, b: u32) -> bool {
    let sa = score_at(sbase + a);
    let sb = score_at(sbase + b);
    return sa > sb || (sa == sb && a < b);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    if (row >= params.batch) {
        return;
    }
    let n = params.n;
    let dim = params.dim;
    let obase = row * n;
    for (var s = 0u; s < params.depth; s = s + 1u) {
        let len = n >> s;
        let src = s & 1u;
        let dst = 1u - src;
        let src_s = (row * 2u + src) * n;
        let dst_s = (row * 2u + dst) * n;
        let src_e = src_s * dim;
        let dst_e = dst_s * dim;
        for (var t = lid; t < len; t = t + WG) {
            if (obase + t < arrayLength(&order)) {
                order[obase + t] = t;
            }
        }
        storageBarrier();
        for (var k = 2u; k <= len; k = k << 1u) {
            for (var j = k >> 1u; j > 0u; j = j >> 1u) {
                for (var t = lid; t < len; t = t + WG) {
                    let p = t ^ j;
                    if (p > t && p < len) {
                        let a = order_at(obase + t);
                        let b = order_at(obase + p);
                        var swap = before(src_s, a, b);
                        if ((t & k) == 0u) {
                            swap = before(src_s, b, a);
                        }
                        if (swap && obase + p < arrayLength(&order)) {
                            order[obase + t] = b;
                            order[obase + p] = a;
                        }
                    }
                }
                storageBarrier();
            }
        }
        let half = len >> 1u;
        for (var t = lid; t < half * dim; t = t + WG) {
            let i = t / dim;
            let c = t % dim;
            let a = order_at(obase + i);
            let b = order_at(obase + len - 1u - i);
            let sa = score_at(src_s + a);
            let sb = score_at(src_s + b);
            // sa >= sb after the sort, so the exponent is <= 0.
            let wa = 1.0 / (1.0 + exp(min((sb - sa) * params.ln_base, 0.0)));
            let wb = 1.0 - wa;
            let out = dst_e + i * dim + c;
            if (out < arrayLength(&emb)) {
                emb[out] = wa * emb_at(src_e + a * dim + c) + wb * emb_at(src_e + b * dim + c);
            }
            if (c == 0u && dst_s + i < arrayLength(&score)) {
                score[dst_s + i] = wa * sa + wb * sb;
            }
        }
        storageBarrier();
    }
}
