//! MRA quality on the real MiniLM data vs block density, against a window of about the same
//! block density.
//!
//! ```text
//! cargo run --release --example mra_quality -- [--data FILE] [--layers N]
//! ```
//! For blocks_per_row in 1, 2, 4, 8 (block 32, priors: diagonal + first block row/column), prints
//! a markdown table averaged over every text × layer × head: block density, recall of the exact
//! entmax-1.5 support, and the output error ‖O − O_exact‖/‖O_exact‖ against exact dense softmax
//! attention for MRA-2 (remainder merged), MRA-2-s (selected blocks only) and a window of
//! `32·blocks_per_row` keys. Attention runs on the GPU engine (exact dense softmax too); the
//! pattern build (CPU) time per layer is reported separately.

use sparse_attn::data::{default_data_path, AttentionData};
use sparse_attn::metrics::{block_sparsity, gold_support, output_errors, recall};
use sparse_attn::patterns::mra::{Mra, MraConfig, MraMode};
use sparse_attn::patterns::{Dense, Window};
use sparse_attn::{AttentionOptions, AttentionShape, BlockPattern, Engine, Normalizer};
use std::time::Instant;

#[derive(Default, Clone)]
struct Row {
    density: f64,
    recall: f64,
    err_full: f64,
    err_sparse: f64,
    w_density: f64,
    w_recall: f64,
    w_err: f64,
    build_ms: f64,
    heads: usize,
    layers: usize,
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn main() -> sparse_attn::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let path = arg("--data").map(std::path::PathBuf::from).unwrap_or_else(default_data_path);
    let data = AttentionData::open(&path)?;
    let max_layers = arg("--layers").and_then(|s| s.parse().ok()).unwrap_or(data.layers());
    let engine = Engine::new()?;
    eprintln!("data {} ({} texts, {} layers, {} heads, seq {}), adapter {}", path.display(), data.texts().len(), data.layers(), data.heads(), data.seq(), engine.adapter_info().name);
    let budgets = [1u32, 2, 4, 8];
    let mut rows = vec![Row::default(); budgets.len()];
    for text in data.texts().to_vec() {
        for layer in 0..max_layers.min(data.layers()) {
            let (q, k, v) = data.layer(&text, layer)?;
            let shape = AttentionShape::new(1, data.heads(), data.seq(), data.head_dim());
            let scale = shape.default_scale() as f64;
            let dense = Dense::new().build(&shape)?;
            let exact = engine.attention(&q, &k, &v, &dense, Normalizer::Softmax)?;
            let golds: Vec<_> = (0..shape.heads)
                .map(|h| gold_support(&q.slice(ndarray::s![0, h, .., ..]), &k.slice(ndarray::s![0, h, .., ..]), scale, 1.5, false).expect("gold support"))
                .collect();
            let quality = |p: &BlockPattern| -> (f64, f64) {
                let d: Vec<f64> = (0..shape.heads).map(|h| 1.0 - block_sparsity(p, p.pattern_slice(h), false)).collect();
                let r: Vec<f64> = (0..shape.heads).map(|h| recall(p, p.pattern_slice(h), &golds[h])).collect();
                (mean(&d), mean(&r))
            };
            for (row, &bpr) in rows.iter_mut().zip(&budgets) {
                let t0 = Instant::now();
                let m = MraConfig::new(32, bpr).build(&q.view(), &k.view(), Some(&v.view()), &shape)?;
                row.build_ms += t0.elapsed().as_secs_f64() * 1e3;
                let full = engine.attention_mra(&q, &k, &v, &m, &AttentionOptions::new(Normalizer::Softmax))?.o;
                let sparse = Mra { mode: MraMode::SparseOnly, ..m.clone() };
                let so = engine.attention_mra(&q, &k, &v, &sparse, &AttentionOptions::new(Normalizer::Softmax))?.o;
                let (d, r) = quality(&m.pattern);
                let window = Window::new(32 * bpr).with_blocks(32, 32).build(&shape)?;
                let wo = engine.attention(&q, &k, &v, &window, Normalizer::Softmax)?;
                let (wd, wr) = quality(&window);
                let h = shape.heads as f64;
                row.density += d * h;
                row.recall += r * h;
                row.err_full += output_errors(&full, &exact)?.iter().sum::<f64>();
                row.err_sparse += output_errors(&so, &exact)?.iter().sum::<f64>();
                row.w_density += wd * h;
                row.w_recall += wr * h;
                row.w_err += output_errors(&wo, &exact)?.iter().sum::<f64>();
                row.heads += shape.heads;
                row.layers += 1;
            }
            eprintln!("{text} layer {layer} done");
        }
    }
    println!("| blocks/row | MRA block density | MRA recall | MRA-2 error | MRA-2-s error | window block density | window recall | window error | MRA build ms/layer |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (row, bpr) in rows.iter().zip(budgets) {
        let n = row.heads.max(1) as f64;
        println!(
            "| {bpr} | {:.3} | {:.3} | {:.4} | {:.4} | {:.3} | {:.3} | {:.4} | {:.2} |",
            row.density / n,
            row.recall / n,
            row.err_full / n,
            row.err_sparse / n,
            row.w_density / n,
            row.w_recall / n,
            row.w_err / n,
            row.build_ms / row.layers.max(1) as f64
        );
    }
    Ok(())
}
