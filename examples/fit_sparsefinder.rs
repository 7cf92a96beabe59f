//! Fits the Sparsefinder model on the MiniLM Q/K data and writes it as JSON.
//!
//! ```text
//! cargo run --release --example fit_sparsefinder -- [--data FILE] [--texts a,b,c] [--alpha 1.5]
//!     [--out models/sparsefinder_minilm.json] [--epochs N] [--rank R] [--seed S]
//! ```
//! Defaults: the full data (`../shared/data/minilm_qkv.safetensors` or `$SPARSE_ATTN_DATA`),
//! texts apache2, git_relnotes, json_decoder_py (gpl3 is held out), α = 1.5, the paper's config.

use sparse_attn::data::default_data_path;
use sparse_attn::patterns::sparsefinder::{fit_from_data, SparsefinderConfig, SparsefinderModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut data = default_data_path();
    let mut texts = "apache2,git_relnotes,json_decoder_py".to_string();
    let mut alpha = 1.5f64;
    let mut out = SparsefinderModel::shipped_path();
    let mut config = SparsefinderConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--data" => data = value()?.into(),
            "--texts" => texts = value()?,
            "--alpha" => alpha = value()?.parse()?,
            "--out" => out = value()?.into(),
            "--epochs" => config.epochs = value()?.parse()?,
            "--rank" => config.rank = value()?.parse()?,
            "--seed" => config.seed = value()?.parse()?,
            "--negatives" => config.negatives_per_positive = value()?.parse()?,
            "--positives" => config.positives_per_query = value()?.parse()?,
            "--absolute" => config.absolute_weight = value()?.parse()?,
            "--radius" => config.radius = value()?.parse()?,
            "--no-quantization-projection" => config.quantization_min_distance = false,
            "--batch" => config.batch_queries = value()?.parse()?,
            "--lr" => config.learning_rate = value()?.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let texts: Vec<&str> = texts.split(',').filter(|t| !t.is_empty()).collect();
    let model = fit_from_data(&data, &texts, alpha, &config)?;
    model.save(&out)?;
    let heads = model.head_models();
    let loss = heads.iter().map(|h| h.final_loss).sum::<f64>() / heads.len() as f64;
    let support = heads.iter().map(|h| h.mean_support).sum::<f64>() / heads.len() as f64;
    println!(
        "fitted {} layers x {} heads (head_dim {}, rank {}) on {:?} in {:.1} s; mean final hinge loss {loss:.4}; mean gold support {support:.1} keys/query; wrote {}",
        model.layers(),
        model.heads(),
        model.head_dim(),
        model.rank(),
        texts,
        model.fit_info().fit_seconds,
        out.display()
    );
    Ok(())
}
