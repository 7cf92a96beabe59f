//! The README's quick start: window-pattern entmax-1.5 attention on the GPU vs the CPU oracle.
//! `cargo run --release --example quickstart`

use ndarray::Array4;
use sparse_attn::{patterns::Window, AttentionShape, Engine, Normalizer};

fn main() -> Result<(), sparse_attn::Error> {
    let shape = AttentionShape::new(1, 4, 256, 32);
    let data = |seed: usize| Array4::from_shape_fn((1, 4, 256, 32), |(_, h, i, d)| (((i * 7 + d * 13 + h * 5 + seed) % 17) as f32 - 8.0) / 8.0);
    let (q, k, v) = (data(1), data(2), data(3));

    let engine = Engine::new()?; // default adapter; SPARSE_ATTN_ADAPTER picks one
    let pattern = Window::new(64).build(&shape)?;
    let o = engine.attention(&q, &k, &v, &pattern, Normalizer::Entmax { alpha: 1.5 })?;
    let o_ref = sparse_attn::reference::attention(&q, &k, &v, &pattern, Normalizer::Entmax { alpha: 1.5 })?;

    let max_err = o.iter().zip(&o_ref).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    println!("adapter: {}", engine.adapter_info().name);
    println!("pattern: {} of {} blocks stored", pattern.nnz(), pattern.q_blocks() * pattern.k_blocks());
    println!("output {:?}, max |GPU - CPU| = {max_err:.1e}", o.shape());
    Ok(())
}
