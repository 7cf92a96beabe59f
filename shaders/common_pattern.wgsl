// Pattern lookups shared by every kernel that walks a BlockPattern; each such kernel declares
// the packed pattern binding `pat`.

// Word `i` of the packed pattern, 0 past its end. The host validates every pattern and the plan
// checks the one bound matches its own, so this guard never fires on a checked call; it keeps
// a bad offset from reading a clamped neighbour (0 reads as an empty row or an empty mask word).
fn pat_word(i: u32) -> u32 {
    if (i >= arrayLength(&pat)) {
        return 0u;
    }
    return pat[i];
}

// First and one-past-last stored block (pattern-local index) of virtual row `row`.
fn row_block_range(row: u32) -> vec2<u32> {
    let slice = slice_of_row(row);
    let qb = row % params.q_blocks;
    let prow = select(slice * params.q_blocks + qb, qb, params.shared_pattern == 1u);
    return vec2<u32>(pat_word(params.off_row_ptr + prow), pat_word(params.off_row_ptr + prow + 1u));
}

// Global score-tile index of pattern-local block `b` used by `slice`.
fn tile_of(slice: u32, b: u32) -> u32 {
    return select(b, slice * params.nnz_per_slice + b, params.shared_pattern == 1u);
}

// Whether element (r, c) of stored block `b` (query block qb) is an allowed pair.
fn allowed(b: u32, qb: u32, r: u32, c: u32) -> bool {
    let i = qb * BQ + r;
    let j = pat_word(params.off_col_idx + b) * BK + c;
    if (i >= params.seq_q || j >= params.seq_kv) {
        return false;
    }
    let m = pat_word(params.off_mask_of + b);
    if (m == FULL_BLOCK) {
        return true;
    }
    let words_per_row = (BK + 31u) / 32u;
    let word = pat_word(params.off_masks + m + r * words_per_row + c / 32u);
    return ((word >> (c % 32u)) & 1u) == 1u;
}

