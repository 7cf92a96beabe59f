// MRA, three-kernel path, normaliser side: the weight exp(r - m) / total of each query row's
// folded remainder, for the SpMM to add weight * N (global row gi = vrow * BQ + r).
@group(0) @binding(5) var<storage, read_write> mra_w: array<f32>;

fn mra_store_weight(gi: u32, wt: f32) {
    if (gi < arrayLength(&mra_w)) {
        mra_w[gi] = wt;
    }
}
