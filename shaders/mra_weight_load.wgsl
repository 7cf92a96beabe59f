// MRA, three-kernel path, SpMM side: adds weight * N_col of the row's folded remainder.
@group(0) @binding(6) var<storage, read> mra_w: array<f32>;

fn mra_weighted(vrow: u32, r: u32, col: u32) -> f32 {
    let gi = vrow * BQ + r;
    if (gi >= arrayLength(&mra_w)) {
        return 0.0;
    }
    let wt = mra_w[gi];
    if (wt == 0.0) {
        return 0.0;
    }
    return wt * mra_value(vrow, col);
}
