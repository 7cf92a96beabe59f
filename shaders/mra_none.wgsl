// MRA coarse remainder hooks, no-op version (kernels without a remainder).
fn mra_row(vrow: u32) -> vec2<f32> {
    return vec2<f32>(NEG_BIG, 0.0);
}

fn mra_value(vrow: u32, col: u32) -> f32 {
    return 0.0;
}

fn mra_store_weight(gi: u32, wt: f32) {
}

fn mra_weighted(vrow: u32, r: u32, col: u32) -> f32 {
    return 0.0;
}
