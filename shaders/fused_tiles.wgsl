// Register-tiled layout of the fused kernels (softmax and entmax). A workgroup's WG threads form
// TY = TQ/RQ row groups × TX lanes; per chunk of KC keys (K and V staged in
// workgroup memory) thread (ty, tx) scores RQ rows × NK keys (keys tx, tx+TX, …: consecutive
// lanes read consecutive rows of the padded K tile, so no bank conflicts) and accumulates RQ
// rows × NC vec4 output columns (tx, tx+TX, …) in registers. Each Q/K value read from
// workgroup memory feeds RQ or NK multiply-adds. Loops marked `@unroll` are unrolled by the
// host (src/gpu/unroll.rs) so the register tiles stay in registers.

const TY: u32 = TQ / RQ;
const TX: u32 = WG / TY;
const NK: u32 = KC / TX;
const NC: u32 = (DP4 + TX - 1u) / TX;
const KS: u32 = DP4 + 1u; // padded row stride (vec4s) of q_tile and the K chunk
// PS (host constant): padded row stride of p_tile, KC + 1, or for the score-caching entmax
// kernel RC + 1.

var<workgroup> q_tile: array<vec4<f32>, TQ * KS>;
// K chunks (row stride KS) from kv_tile[0], V chunks (row stride DP4) from kv_tile[VO] (host
// constants, KVT >= VO + KC·DP4): VO >= KC·KS when K and V are live together; 0 in the
// score-caching entmax kernel, whose pass 1 reads only K and pass 2 only V, so its score cache
// gets the room. The entmax kernels also keep their row reductions from kv_tile[0] and the
// pooling kernel its candidate pool from kv_tile[VO] between walks over the row.
var<workgroup> kv_tile: array<vec4<f32>, KVT>;
var<workgroup> p_tile: array<f32, TQ * PS>;
var<workgroup> red: array<f32, TQ * TX>;

fn stage_q(t: Tile, lid: u32) {
    for (var idx = lid; idx < TQ * DP4; idx += WG) {
        let r = idx / DP4;
        let i = t.qb * BQ + t.row0 + r;
        q_tile[r * KS + idx % DP4] = load_q4((t.slice * params.seq_q + i) * params.head_dim, (idx % DP4) * 4u, i < params.seq_q);
    }
}

// K (and V) of keys key0 .. key0 + KC of the tile's kv slice.
fn stage_k(t: Tile, key0: u32, lid: u32) {
    for (var idx = lid; idx < KC * DP4; idx += WG) {
        let key = key0 + idx / DP4;
        kv_tile[(idx / DP4) * KS + idx % DP4] = load_k4((t.kv_row0 + key) * params.head_dim, (idx % DP4) * 4u, key < params.seq_kv);
    }
}

fn stage_v(t: Tile, key0: u32, lid: u32) {
    for (var idx = lid; idx < KC * DP4; idx += WG) {
        let key = key0 + idx / DP4;
        kv_tile[VO + idx] = load_v4((t.kv_row0 + key) * params.head_dim, (idx % DP4) * 4u, key < params.seq_kv);
    }
}

fn stage_kv(t: Tile, key0: u32, lid: u32) {
    stage_k(t, key0, lid);
    stage_v(t, key0, lid);
}

// Scaled scores of the staged chunk (offset kc inside stored block b, first key key0) for
// this thread's RQ rows × NK keys; disallowed pairs get NEG_BIG. Full blocks skip the mask.
fn chunk_scores(t: Tile, b: u32, kc: u32, key0: u32, ty: u32, tx: u32) -> array<f32, RQ * NK> {
    let full = pat_word(params.off_mask_of + b) == FULL_BLOCK;
    var s: array<f32, RQ * NK>;
    for (var d4 = 0u; d4 < DP4; d4++) {
        var kv: array<vec4<f32>, NK>;
        for (var j = 0u; j < NK; j++) { // @unroll
            kv[j] = kv_tile[(tx + j * TX) * KS + d4];
        }
        for (var r = 0u; r < RQ; r++) { // @unroll
            let qv = q_tile[(ty * RQ + r) * KS + d4];
            for (var j = 0u; j < NK; j++) { // @unroll
                s[r * NK + j] += dot(qv, kv[j]);
            }
        }
    }
    for (var r = 0u; r < RQ; r++) { // @unroll
        let rr = t.row0 + ty * RQ + r;
        let row_ok = t.qb * BQ + rr < params.seq_q;
        for (var j = 0u; j < NK; j++) { // @unroll
            let kk = tx + j * TX;
            var ok = row_ok && key0 + kk < params.seq_kv;
            if (ok && !full) {
                ok = allowed(b, t.qb, rr, kc + kk);
            }
            s[r * NK + j] = select(NEG_BIG, s[r * NK + j] * params.scale, ok);
        }
    }
    return s;
}

// O += P·V over the staged chunk: p_tile rows of this thread's row group (from column p0) ×
// the staged V.
fn accumulate_pv(ty: u32, tx: u32, p0: u32, acc: ptr<function, array<vec4<f32>, RQ * NC>>) {
    for (var kk = 0u; kk < KC; kk++) {
        accumulate_key_pv(tx, kk, row_group_p(ty, p0 + kk), acc);
    }
}

// p_tile column `col` of this thread's RQ rows.
fn row_group_p(ty: u32, col: u32) -> array<f32, RQ> {
    var p: array<f32, RQ>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        p[r] = p_tile[(ty * RQ + r) * PS + col];
    }
    return p;
}

// O += p·v of staged key kk for this thread's RQ rows and NC output columns.
fn accumulate_key_pv(tx: u32, kk: u32, p: array<f32, RQ>, acc: ptr<function, array<vec4<f32>, RQ * NC>>) {
    var vv: array<vec4<f32>, NC>;
    for (var c = 0u; c < NC; c++) { // @unroll
        let col = tx + c * TX;
        if (col < DP4) {
            vv[c] = kv_tile[VO + kk * DP4 + col];
        }
    }
    for (var r = 0u; r < RQ; r++) { // @unroll
        for (var c = 0u; c < NC; c++) { // @unroll
            (*acc)[r * NC + c] += p[r] * vv[c];
        }
    }
}

// Sum of each row's per-lane values `x` over its TX lanes, in lane order (the same on every
// lane of the row). Barriers inside: call from uniform control flow.
fn row_sums(ty: u32, tx: u32, x: array<f32, RQ>) -> array<f32, RQ> {
    workgroupBarrier();
    for (var r = 0u; r < RQ; r++) { // @unroll
        red[(ty * RQ + r) * TX + tx] = x[r];
    }
    workgroupBarrier();
    var total: array<f32, RQ>;
    for (var r = 0u; r < RQ; r++) { // @unroll
        for (var u = 0u; u < TX; u++) {
            total[r] += red[(ty * RQ + r) * TX + u];
        }
    }
    return total;
}

// O = acc / total of row ty·RQ + r, columns owned by this lane.
fn store_rows(t: Tile, ty: u32, tx: u32, acc: ptr<function, array<vec4<f32>, RQ * NC>>, total: array<f32, RQ>) {
    for (var r = 0u; r < RQ; r++) { // @unroll
        let inv = select(0.0, 1.0 / total[r], total[r] > 0.0);
        let i = t.qb * BQ + t.row0 + ty * RQ + r;
        if (i < params.seq_q) {
            let base = (t.slice * params.seq_q + i) * params.head_dim - params.o_base;
            for (var c = 0u; c < NC; c++) { // @unroll
                let c0 = (tx + c * TX) * 4u;
                for (var e = 0u; e < 4u; e++) { // @unroll
                    if (c0 + e < params.head_dim && base + c0 + e < arrayLength(&o)) {
                        o[base + c0 + e] = elem((*acc)[r * NC + c][e] * inv);
                    }
                }
            }
        }
    }
}
