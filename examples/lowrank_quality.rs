//! Low-rank reconstruction of attention scores (Bhojanapalli et al. 2021) on the real MiniLM data.
//!
//! ```text
//! cargo run --release --example lowrank_quality -- [--data FILE] [--test gpl3] [--stride 2] [--layers 0,1,2,3,4,5]
//! ```
//! Fits one basis on every layer and head of every text except `--test` (every `--stride`-th
//! query row) and one per layer, then prints markdown tables:
//! 1. explained variance at r = 8, 16, 32, 64 (on the fit rows, and held out on the test text:
//!    1 − Σ‖(I − UUᵀ)(s − μ)‖² / Σ‖s − μ‖², μ and U from the other texts);
//! 2. eigenspace overlap between the per-layer bases (mean cos² of the principal angles, r = 16
//!    and 32; random subspaces give ≈ r/n);
//! 3. on the test text, versus rank r and subset size m: score reconstruction error
//!    ‖ŝ − s‖/‖s − s̄‖ per row (s̄ the row mean; the normaliser ignores row shifts), output error
//!    of entmax-1.5 on the reconstructed rows against exact dense entmax-1.5, and recall of the
//!    exact entmax support by the reconstructed rows' support;
//! 4. the pattern predictor (top blocks of the reconstructed rows, r = 32, m = 64) against a
//!    window at equal block density (block 32): recall and output error of entmax-1.5 computed
//!    exactly on the pattern.

#![allow(clippy::needless_range_loop)]

use ndarray::{s, Array2, Array4};
use sparse_attn::data::{default_data_path, fixture_path, AttentionData};
use sparse_attn::lowrank::{
    eigenspace_overlap, LowRankConfig, LowRankFitter, LowRankModel, LowRankPattern, LowRankPlan,
};
use sparse_attn::metrics::{block_sparsity, gold_support, output_error, recall};
use sparse_attn::patterns::Window;
use sparse_attn::{reference, AttentionShape, BlockPattern, Normalizer};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Exact score rows of one head, `[n, n]` f64.
fn exact_scores(q: &Array4<f32>, k: &Array4<f32>, h: usize) -> Array2<f64> {
    let (n, d) = (q.dim().2, q.dim().3);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = Array2::<f64>::zeros((n, n));
    for i in 0..n {
        for j in 0..n {
            out[[i, j]] = scale
                * (0..d)
                    .map(|c| q[[0, h, i, c]] as f64 * k[[0, h, j, c]] as f64)
                    .sum::<f64>();
        }
    }
    out
}

/// Test-text data of one layer: per head exact scores, exact entmax-1.5 probabilities, exact output.
struct LayerTruth {
    v: Array4<f32>,
    scores: Vec<Array2<f64>>,
    probs: Vec<Array2<f64>>,
    o: Vec<Array2<f32>>,
}

fn truth(q: &Array4<f32>, k: &Array4<f32>, v: Array4<f32>) -> LayerTruth {
    let (heads, n, d) = (q.dim().1, q.dim().2, q.dim().3);
    let (mut scores, mut probs, mut outs) = (Vec::new(), Vec::new(), Vec::new());
    for h in 0..heads {
        let s = exact_scores(q, k, h);
        let mut p = Array2::<f64>::zeros((n, n));
        for i in 0..n {
            let row = reference::entmax15(s.row(i).as_slice().unwrap_or(&[]));
            p.row_mut(i).iter_mut().zip(row).for_each(|(a, b)| *a = b);
        }
        outs.push(pv(&p, &v, h, d));
        scores.push(s);
        probs.push(p);
    }
    LayerTruth {
        v,
        scores,
        probs,
        o: outs,
    }
}

fn pv(p: &Array2<f64>, v: &Array4<f32>, h: usize, d: usize) -> Array2<f32> {
    let n = p.nrows();
    let mut o = Array2::<f32>::zeros((n, d));
    for i in 0..n {
        for c in 0..d {
            o[[i, c]] = (0..p.ncols())
                .filter(|&j| p[[i, j]] != 0.0)
                .map(|j| p[[i, j]] * v[[0, h, j, c]] as f64)
                .sum::<f64>() as f32;
        }
    }
    o
}

/// (score error, output error, recall) of one plan on one layer, averaged over heads.
fn measure(plan: &LowRankPlan, t: &LayerTruth) -> (f64, f64, f64) {
    let heads = t.scores.len();
    let (n, d) = (t.scores[0].nrows(), t.v.dim().3);
    let (mut serr, mut oerr, mut rec) = (0.0, 0.0, 0.0);
    for h in 0..heads {
        let s = &t.scores[h];
        let mut p = Array2::<f64>::zeros((n, n));
        let (mut num, mut den) = (0.0, 0.0);
        let (mut hit, mut gold) = (0usize, 0usize);
        for i in 0..n {
            let exact: Vec<f64> = plan.subset().iter().map(|&j| s[[i, j]]).collect();
            let Ok(row) = plan.reconstruct_row(&exact) else {
                continue;
            };
            let mean = s.row(i).sum() / n as f64;
            for j in 0..n {
                num += (row[j] - s[[i, j]]).powi(2);
                den += (s[[i, j]] - mean).powi(2);
            }
            let pr = reference::entmax15(&row);
            for j in 0..n {
                if t.probs[h][[i, j]] > 0.0 {
                    gold += 1;
                    hit += usize::from(pr[j] > 0.0);
                }
            }
            p.row_mut(i).iter_mut().zip(pr).for_each(|(a, b)| *a = b);
        }
        serr += (num / den.max(1e-300)).sqrt();
        oerr += output_error(&pv(&p, &t.v, h, d).view(), &t.o[h].view());
        rec += hit as f64 / gold.max(1) as f64;
    }
    let hf = heads as f64;
    (serr / hf, oerr / hf, rec / hf)
}

/// Held-out explained variance of a basis at rank r on the test scores.
fn held_out_ev(model: &LowRankModel, truths: &[LayerTruth], r: usize) -> f64 {
    let Some(t0) = truths.first() else {
        return f64::NAN;
    };
    let n = t0.scores[0].nrows();
    let Ok(b) = model.basis(n) else {
        return f64::NAN;
    };
    let (mut resid, mut total) = (0.0, 0.0);
    let mut c = vec![0f64; r];
    for t in truths {
        for s in &t.scores {
            for i in 0..n {
                let x: Vec<f64> = (0..n).map(|j| s[[i, j]] - b.mean[j]).collect();
                for (k, ck) in c.iter_mut().enumerate() {
                    *ck = (0..n).map(|j| b.basis[j * b.rank + k] * x[j]).sum();
                }
                for j in 0..n {
                    let proj: f64 = (0..r).map(|k| b.basis[j * b.rank + k] * c[k]).sum();
                    resid += (x[j] - proj).powi(2);
                    total += x[j] * x[j];
                }
            }
        }
    }
    1.0 - resid / total
}

/// Recall and output error of entmax-1.5 on `pattern` (exact on the pattern), mean over heads.
fn pattern_quality(
    pattern: &BlockPattern,
    q: &Array4<f32>,
    k: &Array4<f32>,
    t: &LayerTruth,
) -> Res<(f64, f64, f64)> {
    let heads = q.dim().1;
    let scale = 1.0 / (q.dim().3 as f64).sqrt();
    let o = reference::attention(q, k, &t.v, pattern, Normalizer::ENTMAX15)?;
    let (mut rec, mut err, mut dens) = (0.0, 0.0, 0.0);
    for h in 0..heads {
        let gold = gold_support(
            &q.slice(s![0, h, .., ..]),
            &k.slice(s![0, h, .., ..]),
            scale,
            1.5,
            false,
        ).expect("gold support");
        let ps = pattern.pattern_slice(h);
        rec += recall(pattern, ps, &gold);
        dens += 1.0 - block_sparsity(pattern, ps, false);
        err += output_error(&o.slice(s![0, h, .., ..]), &t.o[h].view());
    }
    let hf = heads as f64;
    Ok((rec / hf, err / hf, dens / hf))
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = arg(&args, "--data")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(default_data_path);
    let path = if path.exists() {
        path
    } else {
        eprintln!("{} not found; using the fixture", path.display());
        fixture_path()
    };
    let data = AttentionData::open(&path)?;
    let test = arg(&args, "--test").unwrap_or_else(|| "gpl3".into());
    let stride: usize = arg(&args, "--stride")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2);
    let layers: Vec<usize> = match arg(&args, "--layers") {
        Some(l) => l
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()?,
        None => (0..data.layers()).collect(),
    };
    let train: Vec<String> = data
        .texts()
        .iter()
        .filter(|t| **t != test)
        .cloned()
        .collect();
    let n = data.seq();
    let max_rank = 64.min(n);
    println!("# Low-rank score reconstruction on `{}`\n", path.display());
    println!("fit on {:?} (every {stride}-th query row, layers {layers:?}, {} heads), measured on `{test}`; n = {n}\n", train, data.heads());

    // Fit: one basis over every layer, one per layer.
    let t0 = Instant::now();
    let mut all = LowRankFitter::new(max_rank)?;
    let mut per_layer: Vec<LowRankFitter> = layers
        .iter()
        .map(|_| LowRankFitter::new(max_rank))
        .collect::<Result<_, _>>()?;
    for text in &train {
        for (li, &layer) in layers.iter().enumerate() {
            let (q, k, _) = data.layer(text, layer)?;
            all.add_scores(&q.view(), &k.view(), stride)?;
            per_layer[li].add_scores(&q.view(), &k.view(), stride)?;
        }
    }
    let model = all.finish()?;
    let layer_models: Vec<LowRankModel> = per_layer
        .into_iter()
        .map(|f| f.finish())
        .collect::<Result<_, _>>()?;
    println!(
        "fit: {:.1} s ({} rows in the all-layer basis)\n",
        t0.elapsed().as_secs_f64(),
        model.basis(n)?.rows
    );

    let t1 = Instant::now();
    let mut truths = Vec::new();
    let mut qks = Vec::new();
    for &layer in &layers {
        let (q, k, v) = data.layer(&test, layer)?;
        truths.push(truth(&q, &k, v));
        qks.push((q, k));
    }
    eprintln!("exact reference: {:.1} s", t1.elapsed().as_secs_f64());

    // 1. Explained variance.
    println!("## Explained variance\n");
    let ranks: Vec<usize> = [8, 16, 32, 64]
        .into_iter()
        .filter(|&r| r <= max_rank)
        .collect();
    print!("| basis |");
    for r in &ranks {
        print!(" r = {r} |");
    }
    println!();
    println!("|---|{}", "---|".repeat(ranks.len()));
    let b = model.basis(n)?;
    print!("| all layers, fit rows |");
    for &r in &ranks {
        print!(" {:.3} |", b.explained_variance(r));
    }
    println!();
    print!("| all layers, held out (`{test}`) |");
    for &r in &ranks {
        print!(" {:.3} |", held_out_ev(&model, &truths, r));
    }
    println!();
    for (li, m) in layer_models.iter().enumerate() {
        print!("| layer {}, fit rows |", layers[li]);
        for &r in &ranks {
            print!(" {:.3} |", m.basis(n)?.explained_variance(r));
        }
        println!();
    }
    println!();

    // 2. Eigenspace overlap between layers.
    for r in [16usize, 32].into_iter().filter(|&r| r <= max_rank) {
        println!("## Eigenspace overlap between layers, r = {r} (mean cos² of the principal angles; random ≈ {:.3})\n", r as f64 / n as f64);
        print!("| layer |");
        for l in &layers {
            print!(" {l} |");
        }
        println!(" all |");
        println!("|---|{}---|", "---|".repeat(layers.len()));
        for (a, ma) in layer_models.iter().enumerate() {
            print!("| {} |", layers[a]);
            for mb in &layer_models {
                print!(
                    " {:.3} |",
                    eigenspace_overlap(ma.basis(n)?, mb.basis(n)?, r)?.mean_cos2
                );
            }
            println!(
                " {:.3} |",
                eigenspace_overlap(ma.basis(n)?, model.basis(n)?, r)?.mean_cos2
            );
        }
        println!();
    }

    // 3. Error versus (r, m) on the test text.
    let t2 = Instant::now();
    println!("## Reconstruction on `{test}` versus rank r and subset size m (entmax-1.5; all-layer basis; mean over layers × heads)\n");
    println!("| r | m | score error | output error | recall |");
    println!("|---|---|---|---|---|");
    for &r in &ranks {
        for m in [16usize, 32, 64, 128] {
            if m < r || m > n {
                continue;
            }
            let plan = model.plan(&LowRankConfig::new(r, m), n)?;
            let (mut se, mut oe, mut rc) = (0.0, 0.0, 0.0);
            for t in &truths {
                let (a, b, c) = measure(&plan, t);
                se += a;
                oe += b;
                rc += c;
            }
            let l = truths.len() as f64;
            println!(
                "| {r} | {m} | {:.3} | {:.3} | {:.3} |",
                se / l,
                oe / l,
                rc / l
            );
        }
    }
    // The subset alone (exact scores on S, nothing reconstructed) would give recall |S ∩ gold| / |gold|;
    // the mean alone (r = 0) is the baseline the eigenbasis improves on.
    eprintln!("error table: {:.1} s", t2.elapsed().as_secs_f64());
    println!();

    // 4. Pattern predictor versus window at equal block density.
    let t3 = Instant::now();
    let (pr, pm) = (32.min(max_rank), 64.min(n));
    let plan = model.plan(&LowRankConfig::new(pr, pm), n)?;
    println!("## Pattern predictor (r = {pr}, m = {pm}) versus window at equal block density (block 32, entmax-1.5 on the pattern, mean over layers × heads)\n");
    println!("| window width | block density (window) | window recall | window output error | block density (lowrank) | lowrank recall | lowrank output error |");
    println!("|---|---|---|---|---|---|---|");
    let shape = AttentionShape::new(1, data.heads(), n, data.head_dim());
    for width in [32u32, 64, 128, 256] {
        let window = Window::new(width).with_blocks(32, 32).build(&shape)?;
        let (mut w, mut p) = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0));
        for (t, (q, k)) in truths.iter().zip(&qks) {
            let wq = pattern_quality(&window, q, k, t)?;
            let density = wq.2;
            let pat = LowRankPattern::new(density).with_blocks(32, 32).build(
                &plan,
                &q.view(),
                &k.view(),
            )?;
            let pq = pattern_quality(&pat, q, k, t)?;
            w = (w.0 + wq.0, w.1 + wq.1, w.2 + wq.2);
            p = (p.0 + pq.0, p.1 + pq.1, p.2 + pq.2);
        }
        let l = truths.len() as f64;
        println!(
            "| {width} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            w.2 / l,
            w.0 / l,
            w.1 / l,
            p.2 / l,
            p.0 / l,
            p.1 / l
        );
    }
    eprintln!("pattern table: {:.1} s", t3.elapsed().as_secs_f64());
    Ok(())
}
