// MRA coarse remainder (Zeng et al. 2022), folded per query-block row by the host
// (patterns::mra::MraRemainder::row_terms) or on the GPU (mra_lowres.wgsl's row_terms): row vrow = slice * q_blocks + qb holds
// [r, S, N_0 .. N_{d-1}] at vrow * (head_dim + 2), with r = max over the non-selected blocks of
// L_IJ, S = sum c_J exp(L_IJ - r), N = sum c_J exp(L_IJ - r) V̂_J. The binding `mra_rem` is
// declared by the host (its number depends on the kernel). Merging (r, S, N) into an online
// softmax equals merging every block term one by one.

fn mra_row(vrow: u32) -> vec2<f32> {
    let at = vrow * (params.head_dim + 2u);
    if (vrow >= params.row_base + params.row_count || at + 1u >= arrayLength(&mra_rem)) {
        return vec2<f32>(NEG_BIG, 0.0);
    }
    return vec2<f32>(mra_rem[at], mra_rem[at + 1u]);
}

// N_col of row vrow (0 past head_dim).
fn mra_value(vrow: u32, col: u32) -> f32 {
    let at = vrow * (params.head_dim + 2u) + 2u + col;
    if (col >= params.head_dim || at >= arrayLength(&mra_rem)) {
        return 0.0;
    }
    return mra_rem[at];
}
