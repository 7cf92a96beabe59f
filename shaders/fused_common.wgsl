// Shared by the fused kernels: one workgroup per TQ query rows of one query block; key blocks
// are walked in chunks of KC keys staged in workgroup memory.
// Host-provided constants: BQ, BK, DP (head_dim padded to a multiple of 4), TQ, KC, WG, RQ,
// CAP (entmax candidates per row), KVT and VO (kv_tile's length and where V starts in it, vec4s),
// PS and RC (see fused_tiles.wgsl, fused_entmax_cached.wgsl).

// Q, K, V bindings and their 4-wide loads come from fused_io_scalar.wgsl or
// fused_io_vec4.wgsl (vectorised, when head_dim % 4 == 0).
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(4) var<storage, read> pat: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<elem>;

const DP4: u32 = DP / 4u;
struct Tile {
    slice: u32,
    qb: u32,
    row0: u32,    // first row of this tile inside the query block
    first: u32,   // first stored block of the row
    last: u32,    // one past the last stored block
    kv_row0: u32, // global K/V row of the kv slice's key 0
}

// Whether the tile's query-block row belongs to this dispatch's row class (the fused entmax
// path may run short and long rows on different tiles, one dispatch each): a uniform test,
// so a workgroup of another class returns before its first barrier.
fn in_row_class(t: Tile) -> bool {
    let blocks = t.last - t.first;
    return blocks >= params.min_row_blocks && blocks <= params.max_row_blocks;
}

fn tile_of_workgroup(w: u32) -> Tile {
    let per_block = BQ / TQ;
    let vrow = params.row_base + w / per_block;
    let blocks = row_block_range(vrow);
    let slice = slice_of_row(vrow);
    return Tile(slice, vrow % params.q_blocks, (w % per_block) * TQ, blocks.x, blocks.y,
                kv_slice_of(slice) * params.seq_kv);
}

