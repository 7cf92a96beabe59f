//! SBM and top-k pattern quality on the real MiniLM data, and build times.
//!
//! ```text
//! cargo run --release --example sbm_topk_quality -- [--data FILE] [--texts a,b] [--layers 0,3] [--no-timing] [--logit-scale S]
//! ```
//! For each method along its knob (SBM: expected sampled edges per query, training-free model:
//! k = 128 k-means clusters of the layer's keys, φ = identity; top-k: k with the mean-query
//! scorer, window 11 and the first/last token), prints a markdown table averaged over every
//! text × layer × head: recall of the exact entmax-1.5 support, element sparsity, block sparsity
//! at block 32, output error ‖O − O_exact‖/‖O_exact‖ of entmax-1.5 attention on the pattern
//! against exact dense entmax-1.5 (CPU reference), and the build time per layer (12 heads).
//! `--logit-scale` overrides the initialisation's SBM logit scale `s` (default `1/sqrt(d)`).
//! Then build times at seq 512 (real) and 16 384 (synthetic, 4 heads × 32 dims).

use ndarray::{s, Array4};
use rand::{Rng, SeedableRng};
use sparse_attn::data::{default_data_path, fixture_path, AttentionData};
use sparse_attn::metrics::{block_sparsity, element_sparsity, gold_support, output_errors, recall};
use sparse_attn::patterns::sbm::{Density, Sbm, SbmConfig, SbmLayer};
use sparse_attn::patterns::topk::{Scorer, TopK};
use sparse_attn::patterns::{Dense, Window};
use sparse_attn::{reference, AttentionShape, BlockPattern, Normalizer};
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
enum Method {
    Sbm(f64),
    SbmWindow(f64),
    TopK(usize),
}

impl Method {
    fn label(&self) -> (&'static str, &'static str, String) {
        match self {
            Method::Sbm(e) => ("sbm", "edges/query", e.to_string()),
            Method::SbmWindow(e) => ("sbm+window11", "edges/query", e.to_string()),
            Method::TopK(k) => ("topk", "k", k.to_string()),
        }
    }
}

#[derive(Default, Clone)]
struct Acc {
    recall: f64,
    elem: f64,
    block: f64,
    error: f64,
    build_ms: f64,
    heads: usize,
    builds: usize,
}

fn build(method: Method, q: &Array4<f32>, k: &Array4<f32>, layer: &SbmLayer) -> sparse_attn::Result<BlockPattern> {
    match method {
        Method::Sbm(e) | Method::SbmWindow(e) => {
            let p = Sbm::new(SbmConfig::default().with_density(Density::EdgesPerQuery(e))).build(layer, &q.view(), &k.view())?;
            if matches!(method, Method::SbmWindow(_)) {
                let shape = AttentionShape::new(1, q.dim().1, q.dim().2, q.dim().3);
                Ok(p.union(&Window::new(11).build(&shape)?)?)
            } else {
                Ok(p)
            }
        }
        Method::TopK(kk) => TopK::new(kk).build(&q.view(), &k.view(), &Scorer::MeanQuery),
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() -> sparse_attn::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = arg(&args, "--data").map(std::path::PathBuf::from).unwrap_or_else(|| {
        let p = default_data_path();
        if p.exists() {
            p
        } else {
            eprintln!("{} not found, using the fixture", p.display());
            fixture_path()
        }
    });
    let data = AttentionData::open(&path)?;
    let texts: Vec<String> = arg(&args, "--texts").map(|t| t.split(',').map(String::from).collect()).unwrap_or_else(|| data.texts().to_vec());
    let layers: Vec<usize> = match arg(&args, "--layers") {
        Some(l) => l.split(',').filter_map(|x| x.parse().ok()).collect(),
        None => (0..data.layers()).collect(),
    };
    let methods: Vec<Method> = [8.0, 16.0, 32.0, 64.0, 128.0]
        .iter()
        .map(|&e| Method::Sbm(e))
        .chain([8.0, 32.0, 128.0].iter().map(|&e| Method::SbmWindow(e)))
        .chain([8, 16, 32, 64, 128].iter().map(|&k| Method::TopK(k)))
        .collect();
    let mut acc = vec![Acc::default(); methods.len()];
    let mut init_ms = Vec::new();
    let mut gold_mean = 0.0;
    let mut gold_n = 0;
    println!("data: {} ({} texts × {} layers × {} heads × {} tokens); texts {texts:?}, layers {layers:?}\n", path.display(), data.texts().len(), data.layers(), data.heads(), data.seq());
    for text in &texts {
        for &l in &layers {
            let (q, k, v) = data.layer(text, l)?;
            let (_, heads, n, d) = q.dim();
            let scale = 1.0 / (d as f64).sqrt();
            let shape = AttentionShape::new(1, heads, n, d);
            let exact = reference::attention(&q, &k, &v, &Dense::new().build(&shape)?, Normalizer::ENTMAX15)?;
            let golds: Vec<_> = (0..heads).map(|h| gold_support(&q.slice(s![0, h, .., ..]), &k.slice(s![0, h, .., ..]), scale, 1.5, false).expect("gold support")).collect();
            for g in &golds {
                gold_mean += g.mean_support();
                gold_n += 1;
            }
            let t = Instant::now();
            let mut layer = SbmLayer::from_keys(&k.view(), &SbmConfig::default())?;
            if let Some(x) = arg(&args, "--logit-scale").and_then(|x| x.parse::<f32>().ok()) {
                layer.logit_scale = x;
            }
            init_ms.push(t.elapsed().as_secs_f64() * 1e3);
            for (mi, &m) in methods.iter().enumerate() {
                let t = Instant::now();
                let p = build(m, &q, &k, &layer)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let o = reference::attention(&q, &k, &v, &p, Normalizer::ENTMAX15)?;
                let errs = output_errors(&o, &exact)?;
                let a = &mut acc[mi];
                a.build_ms += ms;
                a.builds += 1;
                for h in 0..heads {
                    a.recall += recall(&p, h, &golds[h]);
                    a.elem += element_sparsity(&p, h, false);
                    a.block += block_sparsity(&p, h, false);
                    a.error += errs[h];
                    a.heads += 1;
                }
            }
            eprintln!("done {text} layer {l}");
        }
    }
    println!("exact entmax-1.5 support: {:.1} keys per query on average\n", gold_mean / gold_n.max(1) as f64);
    println!("SBM k-means init (k = 128, per layer of {} heads): {:.1} ms mean\n", data.heads(), init_ms.iter().sum::<f64>() / init_ms.len().max(1) as f64);
    println!("| method | knob | value | recall | element sparsity | block sparsity @32 | output error | build ms/layer |");
    println!("|---|---|---|---|---|---|---|---|");
    for (m, a) in methods.iter().zip(&acc) {
        let (name, knob, value) = m.label();
        let h = a.heads.max(1) as f64;
        println!(
            "| {name} | {knob} | {value} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |",
            a.recall / h,
            a.elem / h,
            a.block / h,
            a.error / h,
            a.build_ms / a.builds.max(1) as f64
        );
    }
    if args.iter().any(|a| a == "--no-timing") {
        return Ok(());
    }
    println!("\n## Build times\n");
    println!("| seq | heads | method | setting | init ms | build ms | nnz blocks |");
    println!("|---|---|---|---|---|---|---|");
    let (q, k, _) = data.layer(&texts[0], layers[0])?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let n_long = 16_384;
    let ql = Array4::from_shape_simple_fn((1, 4, n_long, 32), || rng.random::<f32>() * 2.0 - 1.0);
    let kl = Array4::from_shape_simple_fn((1, 4, n_long, 32), || rng.random::<f32>() * 2.0 - 1.0);
    for (q, k) in [(&q, &k), (&ql, &kl)] {
        let (_, heads, n, _) = q.dim();
        let t = Instant::now();
        let layer = SbmLayer::from_keys(&k.view(), &SbmConfig::default())?;
        let init = t.elapsed().as_secs_f64() * 1e3;
        for e in [16.0, 64.0] {
            let t = Instant::now();
            let p = Sbm::new(SbmConfig::default().with_density(Density::EdgesPerQuery(e))).build(&layer, &q.view(), &k.view())?;
            println!("| {n} | {heads} | sbm | {e} edges/query | {init:.1} | {:.1} | {} |", t.elapsed().as_secs_f64() * 1e3, p.nnz());
        }
        for kk in [64, 256] {
            let t = Instant::now();
            let p = TopK::new(kk).build(&q.view(), &k.view(), &Scorer::MeanQuery)?;
            println!("| {n} | {heads} | topk | k = {kk} | – | {:.1} | {} |", t.elapsed().as_secs_f64() * 1e3, p.nnz());
        }
    }
    Ok(())
}
