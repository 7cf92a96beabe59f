//! Sparsefinder quality on a held-out text of the MiniLM data, and fit/predict timings.
//!
//! ```text
//! cargo run --release --example sparsefinder_quality -- [--data FILE] [--text gpl3]
//!     [--model models/sparsefinder_minilm.json | --fit] [--layers 0,1,...] [--no-error] [--no-timing] [--gpu]
//! ```
//! For every variant along its knob, and for the window-only baseline (window + first/last
//! tokens), prints a markdown table averaged over every layer × head of the text: recall of the
//! exact entmax-1.5 support, element sparsity, block sparsity at block 16 and 32, output error
//! ‖O − O_exact‖/‖O_exact‖ of entmax-1.5 attention on the pattern against exact dense entmax-1.5
//! (CPU reference), and the window baseline's recall at the same element sparsity.
//! `--gpu` also runs one setting per variant end to end on the GPU engine (default adapter, or
//! `SPARSE_ATTN_ADAPTER`) and compares its output with the CPU reference on the same pattern.

use ndarray::{s, Array4, Axis};
use rand::{Rng, SeedableRng};
use sparse_attn::data::{default_data_path, AttentionData};
use sparse_attn::metrics::{block_sparsity, element_sparsity, gold_support, output_errors, recall, GoldSupport};
use sparse_attn::patterns::sparsefinder::{fit_from_data, Sparsefinder, SparsefinderConfig, SparsefinderModel, Threshold, Variant};
use sparse_attn::patterns::{Dense, GlobalTokens, Window};
use sparse_attn::{reference, AttentionShape, BlockPattern, Normalizer};
use std::time::Instant;

#[derive(Clone, Copy)]
enum Method {
    Sf(Variant),
    Window(u32),
}

impl Method {
    fn label(&self) -> (String, String, String) {
        match self {
            Method::Sf(v) => {
                let (knob, value) = v.knob();
                (v.name().into(), knob.into(), value)
            }
            Method::Window(w) => ("window+global".into(), "width".into(), w.to_string()),
        }
    }
}

#[derive(Default, Clone)]
struct Row {
    recall: f64,
    elem: f64,
    block16: f64,
    block32: f64,
    error: f64,
    build_ms: f64,
    n: usize,
}

fn build(model: &SparsefinderModel, layer: usize, q: &Array4<f32>, k: &Array4<f32>, m: Method, block: u32, shape: &AttentionShape) -> sparse_attn::Result<BlockPattern> {
    match m {
        Method::Sf(v) => model.build(layer, q, k, &Sparsefinder::new(v).with_blocks(block, block)),
        Method::Window(w) => {
            let win = Window::new(w).with_blocks(block, block).build(shape)?;
            Ok(win.union(&GlobalTokens::new(1, 1).with_blocks(block, block).build(shape)?)?)
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut data_path = default_data_path();
    let mut text = "gpl3".to_string();
    let mut model_path = SparsefinderModel::shipped_path();
    let mut refit = false;
    let mut with_error = true;
    let mut timing = true;
    let mut gpu = false;
    let mut layers: Option<Vec<usize>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--data" => data_path = value()?.into(),
            "--text" => text = value()?,
            "--model" => model_path = value()?.into(),
            "--fit" => refit = true,
            "--no-error" => with_error = false,
            "--no-timing" => timing = false,
            "--gpu" => gpu = true,
            "--layers" => layers = Some(value()?.split(',').map(|x| x.parse()).collect::<Result<_, _>>()?),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let data = AttentionData::open(&data_path)?;
    let model = if refit {
        let texts: Vec<&str> = data.texts().iter().map(|s| s.as_str()).filter(|t| *t != text).collect();
        fit_from_data(&data_path, &texts, 1.5, &SparsefinderConfig::default())?
    } else {
        SparsefinderModel::load(&model_path)?
    };
    model.check_data(data.layers(), data.heads(), data.head_dim())?;
    if model.fit_info().texts.contains(&text) {
        eprintln!("warning: `{text}` was used for fitting");
    }
    let layers = layers.unwrap_or_else(|| (0..data.layers()).collect());
    let (heads, seq, d) = (data.heads(), data.seq(), data.head_dim());
    let shape = AttentionShape::new(1, heads, seq, d);
    let scale = shape.default_scale() as f64;

    let mut methods: Vec<Method> = Vec::new();
    for r in [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995] {
        methods.push(Method::Sf(Variant::Distance { threshold: Threshold::Recall(r) }));
    }
    for r in [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99] {
        methods.push(Method::Sf(Variant::Distance { threshold: Threshold::MeanRecall(r) }));
    }
    for b in [8, 16, 24, 32, 48, 64, 96, 128] {
        methods.push(Method::Sf(Variant::Quantization { bucket_size: b }));
    }
    for (c, t) in [(4, 1), (4, 2), (8, 1), (8, 2), (8, 3), (16, 1), (16, 2), (16, 3), (16, 4), (32, 2), (32, 4), (32, 6)] {
        methods.push(Method::Sf(Variant::Clustering { clusters: c, query_top: t }));
    }
    for w in [11, 21, 31, 41, 61, 81, 101, 151, 201, 301] {
        methods.push(Method::Window(w));
    }
    let mut rows = vec![Row::default(); methods.len()];
    let dense = Dense::new().with_blocks(32, 32).build(&shape)?;
    for &layer in &layers {
        let t0 = Instant::now();
        let (q, k, v) = data.layer(&text, layer)?;
        let gold: Vec<GoldSupport> = (0..heads)
            .map(|h| gold_support(&q.slice(s![0, h, .., ..]), &k.slice(s![0, h, .., ..]), scale, 1.5, false).expect("gold support"))
            .collect();
        let exact = if with_error { Some(reference::attention(&q, &k, &v, &dense, Normalizer::ENTMAX15)?) } else { None };
        for (m, row) in methods.iter().zip(rows.iter_mut()) {
            let tb = Instant::now();
            let p32 = build(&model, layer, &q, &k, *m, 32, &shape)?;
            row.build_ms += tb.elapsed().as_secs_f64() * 1e3;
            let p16 = build(&model, layer, &q, &k, *m, 16, &shape)?;
            let errors = match &exact {
                Some(exact) => output_errors(&reference::attention(&q, &k, &v, &p32, Normalizer::ENTMAX15)?, exact)?,
                None => vec![f64::NAN; heads],
            };
            for h in 0..heads {
                let ps = p32.pattern_slice(h);
                row.recall += recall(&p32, ps, &gold[h]);
                row.elem += element_sparsity(&p32, ps, false);
                row.block32 += block_sparsity(&p32, ps, false);
                row.block16 += block_sparsity(&p16, p16.pattern_slice(h), false);
                row.error += errors[h];
                row.n += 1;
            }
        }
        eprintln!("layer {layer} done in {:.1} s", t0.elapsed().as_secs_f64());
    }
    // Window curve for "recall of the window baseline at the same element sparsity".
    let mut window_curve: Vec<(f64, f64)> = methods
        .iter()
        .zip(&rows)
        .filter(|(m, _)| matches!(m, Method::Window(_)))
        .map(|(_, r)| (r.elem / r.n as f64, r.recall / r.n as f64))
        .collect();
    window_curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    let window_at = |sp: f64| -> Option<f64> {
        let i = window_curve.partition_point(|&(x, _)| x < sp);
        if i == 0 || i == window_curve.len() {
            return None;
        }
        let ((x0, y0), (x1, y1)) = (window_curve[i - 1], window_curve[i]);
        Some(y0 + (y1 - y0) * (sp - x0) / (x1 - x0))
    };

    println!(
        "\nSparsefinder on `{text}` ({} layers x {heads} heads x {seq} tokens, alpha 1.5; model fitted on {:?}, rank {})\n",
        layers.len(),
        model.fit_info().texts,
        model.rank()
    );
    println!("| variant | knob | value | recall | element sparsity | block sparsity @16 | block sparsity @32 | output error | window recall @ same sparsity | build ms (layer, 12 heads, block 32) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (m, r) in methods.iter().zip(&rows) {
        let n = r.n as f64;
        let (variant, knob, value) = m.label();
        let es = r.elem / n;
        let win = match m {
            Method::Sf(_) => window_at(es).map_or("–".to_string(), |x| format!("{x:.3}")),
            Method::Window(_) => "".into(),
        };
        println!(
            "| {variant} | {knob} | {value} | {:.3} | {:.3} | {:.3} | {:.3} | {:.4} | {win} | {:.1} |",
            r.recall / n,
            es,
            r.block16 / n,
            r.block32 / n,
            r.error / n,
            r.build_ms / layers.len() as f64
        );
    }

    if gpu {
        let engine = sparse_attn::Engine::new()?;
        let info = engine.adapter_info();
        println!("\nGPU end to end on `{}` ({:?}): predicted pattern -> SDDMM/entmax-1.5/SpMM (block 32)\n", info.name, info.backend);
        println!("| variant | knob | value | max abs diff GPU vs CPU reference, same pattern | output error vs exact dense (GPU) | GPU ms / layer (after warm-up) |");
        println!("|---|---|---|---|---|---|");
        let settings = [
            Variant::Distance { threshold: Threshold::MeanRecall(0.97) },
            Variant::Quantization { bucket_size: 32 },
            Variant::Clustering { clusters: 16, query_top: 4 },
        ];
        {
            // Warm-up: pipeline creation is not part of the per-layer time.
            let (q, k, vv) = data.layer(&text, layers[0])?;
            let p = model.build(layers[0], &q, &k, &Sparsefinder::new(settings[0]).with_blocks(32, 32))?;
            engine.attention(&q, &k, &vv, &p, Normalizer::ENTMAX15)?;
        }
        for v in settings {
            let (mut max_diff, mut err, mut ms) = (0.0f64, 0.0f64, 0.0f64);
            for &layer in &layers {
                let (q, k, vv) = data.layer(&text, layer)?;
                let p = model.build(layer, &q, &k, &Sparsefinder::new(v).with_blocks(32, 32))?;
                let t = Instant::now();
                let o = engine.attention(&q, &k, &vv, &p, Normalizer::ENTMAX15)?;
                ms += t.elapsed().as_secs_f64() * 1e3;
                let o_ref = reference::attention(&q, &k, &vv, &p, Normalizer::ENTMAX15)?;
                let exact = reference::attention(&q, &k, &vv, &dense, Normalizer::ENTMAX15)?;
                max_diff = o.iter().zip(o_ref.iter()).fold(max_diff, |m, (a, b)| m.max((a - b).abs() as f64));
                err += output_errors(&o, &exact)?.iter().sum::<f64>() / heads as f64;
            }
            let (knob, value) = v.knob();
            println!("| {} | {knob} | {value} | {max_diff:.2e} | {:.4} | {:.1} |", v.name(), err / layers.len() as f64, ms / layers.len() as f64);
        }
    }

    if timing {
        println!("\nfit time (from the model file): {:.1} s on texts {:?}", model.fit_info().fit_seconds, model.fit_info().texts);
        let (q, k, _) = data.layer(&text, 0)?;
        // seq 8192: rows of the real layer-0 Q/K of every text, resampled, plus small noise.
        let n = 8192;
        let sets: Vec<_> = data.texts().iter().map(|t| data.layer(t, 0)).collect::<Result<_, _>>()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut q8 = Array4::<f32>::zeros((1, heads, n, d));
        let mut k8 = Array4::<f32>::zeros((1, heads, n, d));
        for t in 0..n {
            let (src, row) = (rng.random_range(0..sets.len()), rng.random_range(0..seq));
            for h in 0..heads {
                for c in 0..d {
                    q8[[0, h, t, c]] = sets[src].0[[0, h, row, c]] + 0.05 * (rng.random::<f32>() - 0.5);
                    k8[[0, h, t, c]] = sets[src].1[[0, h, row, c]] + 0.05 * (rng.random::<f32>() - 0.5);
                }
            }
        }
        println!("\n| variant | knob | value | predict ms @512 (12 heads) | predict ms @8192 (12 heads) | block sparsity @8192 (block 32) | element sparsity @8192 |");
        println!("|---|---|---|---|---|---|---|");
        let timed = [
            Variant::Distance { threshold: Threshold::Recall(0.95) },
            Variant::Quantization { bucket_size: 32 },
            Variant::Clustering { clusters: 16, query_top: 2 },
        ];
        for v in timed {
            let spec = Sparsefinder::new(v).with_blocks(32, 32);
            let t512 = median((0..5).map(|_| {
                let t = Instant::now();
                let _ = model.build(0, &q, &k, &spec);
                t.elapsed().as_secs_f64() * 1e3
            }).collect());
            let mut last = None;
            let t8k = median((0..3).map(|_| {
                let t = Instant::now();
                last = model.build(0, &q8, &k8, &spec).ok();
                t.elapsed().as_secs_f64() * 1e3
            }).collect());
            let (bs, es) = match &last {
                Some(p) => (
                    (0..heads).map(|h| block_sparsity(p, h, false)).sum::<f64>() / heads as f64,
                    (0..heads).map(|h| element_sparsity(p, h, false)).sum::<f64>() / heads as f64,
                ),
                None => (f64::NAN, f64::NAN),
            };
            let (knob, value) = v.knob();
            println!("| {} | {knob} | {value} | {t512:.1} | {t8k:.0} | {bs:.3} | {es:.3} |", v.name());
        }
        let _ = Axis(0);
    }
    Ok(())
}
