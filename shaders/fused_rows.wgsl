// Row-per-lanes layout of the fused entmax kernel: each query row is served by TPR threads;
// the Q tile stays in workgroup memory and scores live only in the TQ×KC tile `s_tile`.

const TPR: u32 = WG / TQ;             // threads per query row
const CPT: u32 = (DP + TPR - 1u) / TPR; // output columns per thread

var<workgroup> q_tile: array<vec4<f32>, TQ * DP4>;
var<workgroup> k_tile: array<vec4<f32>, KC * DP4>;
var<workgroup> v_tile: array<f32, KC * DP>;
var<workgroup> s_tile: array<f32, TQ * KC>;

fn load_q_tile(t: Tile, lid: u32) {
    for (var idx = lid; idx < TQ * DP4; idx += WG) {
        let r = idx / DP4;
        let i = t.qb * BQ + t.row0 + r;
        let base = (t.slice * params.seq_q + i) * params.head_dim;
        q_tile[idx] = load_q4(base, (idx % DP4) * 4u, i < params.seq_q);
    }
}

fn load_k_chunk(t: Tile, kb: u32, kc: u32, lid: u32) {
    for (var idx = lid; idx < KC * DP4; idx += WG) {
        let key = kb * BK + kc + idx / DP4;
        let base = (t.kv_row0 + key) * params.head_dim;
        k_tile[idx] = load_k4(base, (idx % DP4) * 4u, key < params.seq_kv);
    }
}

fn load_v_chunk(t: Tile, kb: u32, kc: u32, lid: u32) {
    for (var idx = lid; idx < KC * DP4; idx += WG) {
        let key = kb * BK + kc + idx / DP4;
        let d0 = (idx % DP4) * 4u;
        let x = load_v4((t.kv_row0 + key) * params.head_dim, d0, key < params.seq_kv);
        let at = (idx / DP4) * DP + d0;
        v_tile[at] = x.x;
        v_tile[at + 1u] = x.y;
        v_tile[at + 2u] = x.z;
        v_tile[at + 3u] = x.w;
    }
}

// Scores of the staged chunk into s_tile; disallowed pairs get NEG_BIG. Each thread scores
// its own row's keys lane, lane + TPR, ... (so it can turn exactly those into p afterwards)
// and returns the largest of them. Full blocks skip the mask lookup.
fn score_chunk(t: Tile, b: u32, kc: u32, lid: u32) -> f32 {
    let full = pat[params.off_mask_of + b] == FULL_BLOCK;
    let kb = pat[params.off_col_idx + b];
    let r = lid / TPR;
    let rr = t.row0 + r;
    let row_ok = t.qb * BQ + rr < params.seq_q;
    var m = NEG_BIG;
    for (var kk = lid % TPR; kk < KC; kk += TPR) {
        var acc = 0.0;
        for (var d4 = 0u; d4 < DP4; d4++) {
            acc += dot(q_tile[r * DP4 + d4], k_tile[kk * DP4 + d4]);
        }
        var ok = row_ok && kb * BK + kc + kk < params.seq_kv;
        if (ok && !full) {
            ok = allowed(b, t.qb, rr, kc + kk);
        }
        let s = select(NEG_BIG, acc * params.scale, ok);
        s_tile[r * KC + kk] = s;
        m = max(m, s);
    }
    return m;
}

fn store_output(t: Tile, row: u32, lane: u32, acc: ptr<function, array<f32, CPT>>, inv: f32) {
    let i = t.qb * BQ + t.row0 + row;
    if (i < params.seq_q) {
        let base = (t.slice * params.seq_q + i) * params.head_dim - params.o_base;
        for (var j = 0u; j < CPT; j++) { // @unroll
            let col = lane + j * TPR;
            if (col < params.head_dim) {
                o[base + col] = elem((*acc)[j] * inv);
            }
        }
    }
}
