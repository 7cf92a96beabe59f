//! Fitting: gold α-entmax support (f64 oracle), triplet hinge loss with hand-written gradients,
//! Adam, per-head calibration of distance thresholds and k-means centroids.

use super::kmeans::kmeans;
use super::model::{Centroids, FitInfo, HeadModel, SparsefinderModel};
use super::predict::{dist2, project_rows, rows_of, Structure};
use super::SparsefinderConfig;
use crate::data::AttentionData;
use crate::error::{Error, Result};
use crate::metrics::{gold_support, GoldSupport};
use ndarray::{Array2, Axis};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::time::Instant;

/// Fitting samples of one (layer, head): one `(q [seq_q, head_dim], k [seq_kv, head_dim])` pair
/// per sequence (e.g. per text).
#[derive(Clone, Debug)]
pub struct HeadSamples {
    pub layer: usize,
    pub head: usize,
    pub pairs: Vec<(Array2<f32>, Array2<f32>)>,
}

/// Samples of every (layer, head) of `data` over `texts` (layer-major).
pub fn samples_from_data(data: &AttentionData, texts: &[&str]) -> Result<Vec<HeadSamples>> {
    if texts.is_empty() {
        return Err(Error::Data("no texts given to fit on".into()));
    }
    let mut samples: Vec<HeadSamples> = (0..data.layers() * data.heads())
        .map(|i| HeadSamples { layer: i / data.heads(), head: i % data.heads(), pairs: Vec::new() })
        .collect();
    for text in texts {
        let set = data.load(text)?;
        for s in samples.iter_mut() {
            let q = set.q.index_axis(Axis(0), s.layer).index_axis(Axis(0), s.head).to_owned();
            let k = set.k.index_axis(Axis(0), s.layer).index_axis(Axis(0), s.head).to_owned();
            s.pairs.push((q, k));
        }
    }
    Ok(samples)
}

/// Opens a Q/K/V file, fits on `texts` of it and records the provenance and fit time.
pub fn fit_from_data(path: impl AsRef<Path>, texts: &[&str], alpha: f64, config: &SparsefinderConfig) -> Result<SparsefinderModel> {
    let start = Instant::now();
    let data = AttentionData::open(path.as_ref())?;
    let samples = samples_from_data(&data, texts)?;
    let mut model = fit(&samples, alpha, config)?;
    let note = data.metadata().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ");
    model.fit_info = FitInfo {
        data: Some(path.as_ref().display().to_string()),
        texts: texts.iter().map(|t| t.to_string()).collect(),
        fit_seconds: start.elapsed().as_secs_f64(),
        note: format!("layer ids {:?}, head ids {:?}; data metadata: {note}", data.layer_ids(), data.head_ids()),
    };
    Ok(model)
}

/// Fits a model on samples of every (layer, head) in `0..layers × 0..heads` (each exactly once;
/// any order), against the exact α-entmax support of `scale·q·k`. Deterministic for a given
/// `config.seed`, whatever `config.threads`.
pub fn fit(samples: &[HeadSamples], alpha: f64, config: &SparsefinderConfig) -> Result<SparsefinderModel> {
    let start = Instant::now();
    config.validate()?;
    if !(alpha > 1.0 && alpha <= 2.0) {
        return Err(Error::Normalizer(format!("sparsefinder predicts an α-entmax support: alpha must lie in (1, 2], got {alpha}")));
    }
    let Some(first) = samples.first() else { return Err(Error::Data("no samples to fit on".into())) };
    let Some((q0, _)) = first.pairs.first() else {
        return Err(Error::Data(format!("layer {} head {}: no (q, k) pairs", first.layer, first.head)));
    };
    let head_dim = q0.ncols();
    let layers = samples.iter().map(|s| s.layer).max().map_or(0, |m| m + 1);
    let heads = samples.iter().map(|s| s.head).max().map_or(0, |m| m + 1);
    let mut order: Vec<Option<&HeadSamples>> = vec![None; layers * heads];
    for s in samples {
        let slot = &mut order[s.layer * heads + s.head];
        if slot.is_some() {
            return Err(Error::Data(format!("layer {} head {} appears twice in the samples", s.layer, s.head)));
        }
        *slot = Some(s);
        if s.pairs.is_empty() {
            return Err(Error::Data(format!("layer {} head {}: no (q, k) pairs", s.layer, s.head)));
        }
        for (t, (q, k)) in s.pairs.iter().enumerate() {
            if q.ncols() != head_dim || k.ncols() != head_dim {
                return Err(Error::Shape(format!(
                    "layer {} head {} pair {t}: q is {:?}, k is {:?}, expected head_dim {head_dim}",
                    s.layer,
                    s.head,
                    q.dim(),
                    k.dim()
                )));
            }
            if q.nrows() == 0 || k.nrows() == 0 || head_dim == 0 {
                return Err(Error::ZeroSize("sample seq / head_dim"));
            }
            if let Some(x) = q.iter().chain(k.iter()).find(|x| !x.is_finite()) {
                return Err(Error::Data(format!("layer {} head {} pair {t}: non-finite value {x}", s.layer, s.head)));
            }
        }
    }
    let mut todo = Vec::with_capacity(order.len());
    for (idx, s) in order.into_iter().enumerate() {
        match s {
            Some(s) => todo.push(s),
            None => {
                return Err(Error::Data(format!(
                    "samples lack layer {} head {} (expected every head of {layers} layers x {heads} heads)",
                    idx / heads,
                    idx % heads
                )))
            }
        }
    }
    let scale = config.scale.unwrap_or(1.0 / (head_dim as f64).sqrt());
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .clamp(1, todo.len());
    let results: Vec<Result<HeadModel>> = if threads == 1 {
        todo.iter().map(|s| fit_head(s, alpha, scale, config)).collect()
    } else {
        let todo = &todo;
        let mut slots: Vec<Option<Result<HeadModel>>> = (0..todo.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|w| {
                    scope.spawn(move || {
                        (w..todo.len()).step_by(threads).map(|i| (i, fit_head(todo[i], alpha, scale, config))).collect::<Vec<_>>()
                    })
                })
                .collect();
            for h in handles {
                match h.join() {
                    Ok(done) => done.into_iter().for_each(|(i, r)| slots[i] = Some(r)),
                    Err(_) => {
                        slots.iter_mut().filter(|s| s.is_none()).for_each(|s| *s = Some(Err(Error::Data("a fitting worker panicked".into()))));
                    }
                }
            }
        });
        slots.into_iter().map(|s| s.unwrap_or_else(|| Err(Error::Data("a head was not fitted".into())))).collect()
    };
    let head_models = results.into_iter().collect::<Result<Vec<_>>>()?;
    let info = FitInfo { data: None, texts: Vec::new(), fit_seconds: start.elapsed().as_secs_f64(), note: String::new() };
    SparsefinderModel::new(alpha, scale, (layers, heads, head_dim), config.clone(), info, head_models)
}

/// One fitting sequence of a head: inputs in f64, gold support and the positives the window and
/// global tokens do not already cover.
struct Sequence {
    q: Vec<f64>,
    k: Vec<f64>,
    n_q: usize,
    gold: GoldSupport,
    structure: Structure,
    pos_start: Vec<usize>,
    pos: Vec<u32>,
}

fn to_f64(a: &Array2<f32>) -> Vec<f64> {
    a.iter().map(|&x| x as f64).collect()
}

/// Parameter layout: `[w_q (d·r) | b_q (r) | w_k (d·r) | b_k (r)]`.
struct Layout {
    d: usize,
    r: usize,
}

impl Layout {
    fn len(&self) -> usize {
        2 * (self.d * self.r + self.r)
    }
    fn wq(&self) -> usize {
        0
    }
    fn bq(&self) -> usize {
        self.d * self.r
    }
    fn wk(&self) -> usize {
        self.d * self.r + self.r
    }
    fn bk(&self) -> usize {
        2 * self.d * self.r + self.r
    }
    /// `x·W + b` with W at `w`, b at `b` in `theta`.
    fn project(&self, theta: &[f64], w: usize, b: usize, x: &[f64], out: &mut [f64]) {
        out.copy_from_slice(&theta[b..b + self.r]);
        for (a, &xa) in x.iter().enumerate() {
            let row = &theta[w + a * self.r..w + (a + 1) * self.r];
            for (o, &wv) in out.iter_mut().zip(row) {
                *o += xa * wv;
            }
        }
    }
    /// Accumulates `x ⊗ g` into the W gradient at `w` and `g` into the b gradient at `b`.
    fn accumulate(&self, grad: &mut [f64], w: usize, b: usize, x: &[f64], g: &[f64]) {
        for (a, &xa) in x.iter().enumerate() {
            let row = &mut grad[w + a * self.r..w + (a + 1) * self.r];
            for (o, &gv) in row.iter_mut().zip(g) {
                *o += xa * gv;
            }
        }
        for (o, &gv) in grad[b..b + self.r].iter_mut().zip(g) {
            *o += gv;
        }
    }
}

/// A key of `seq` outside the gold support of query `i` and not covered by the structure.
fn sample_negative(rng: &mut ChaCha8Rng, seq: &Sequence, i: usize) -> Option<usize> {
    let end = seq.structure.key_end(i as u32) as usize;
    if end == 0 {
        return None;
    }
    let gold = seq.gold.row(i);
    for _ in 0..32 {
        let j = rng.random_range(0..end);
        if gold.binary_search(&(j as u32)).is_err() && !seq.structure.covers(i as u32, j as u32) {
            return Some(j);
        }
    }
    None
}

fn fit_head(s: &HeadSamples, alpha: f64, scale: f64, config: &SparsefinderConfig) -> Result<HeadModel> {
    let d = s.pairs[0].0.ncols();
    let r = config.rank;
    let lay = Layout { d, r };
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream((s.layer as u64) << 32 | s.head as u64);

    // Gold support and the uncovered positives.
    let mut seqs = Vec::with_capacity(s.pairs.len());
    for (q, k) in &s.pairs {
        let gold = gold_support(&q.view(), &k.view(), scale, alpha, config.causal);
        let structure = Structure::new(config, q.nrows(), k.nrows());
        let mut pos_start = vec![0];
        let mut pos = Vec::new();
        for i in 0..q.nrows() {
            pos.extend(gold.row(i).iter().copied().filter(|&j| !structure.covers(i as u32, j)));
            pos_start.push(pos.len());
        }
        seqs.push(Sequence { q: to_f64(q), k: to_f64(k), n_q: q.nrows(), gold, structure, pos_start, pos });
    }
    let mut queries: Vec<(usize, usize)> = Vec::new();
    for (t, seq) in seqs.iter().enumerate() {
        for i in 0..seq.n_q {
            if seq.pos_start[i + 1] > seq.pos_start[i] {
                queries.push((t, i));
            }
        }
    }

    // Initialisation: uniform with variance 1/d per weight, zero biases.
    let mut theta = vec![0.0f64; lay.len()];
    let a = (3.0 / d as f64).sqrt();
    for w in [lay.wq(), lay.wk()] {
        for x in &mut theta[w..w + d * r] {
            *x = (rng.random::<f64>() * 2.0 - 1.0) * a;
        }
    }

    // Adam.
    let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut m = vec![0.0; theta.len()];
    let mut v = vec![0.0; theta.len()];
    let mut step = 0i32;
    let mut final_loss = 0.0;
    let (mut qp, mut kpos, mut kneg) = (vec![0.0; r], vec![0.0; r], vec![0.0; r]);
    let (mut gq, mut gpos, mut gneg) = (vec![0.0; r], vec![0.0; r], vec![0.0; r]);
    let mut picks: Vec<usize> = Vec::new();
    let absolute = config.absolute_weight;
    let (inner, outer) = (config.radius - config.margin / 2.0, config.radius + config.margin / 2.0);
    for _epoch in 0..config.epochs {
        queries.shuffle(&mut rng);
        let (mut epoch_loss, mut epoch_count) = (0.0, 0usize);
        for batch in queries.chunks(config.batch_queries) {
            let mut grad = vec![0.0; theta.len()];
            let (mut loss, mut count) = (0.0, 0usize);
            for &(t, i) in batch {
                let seq = &seqs[t];
                let xq = &seq.q[i * d..(i + 1) * d];
                lay.project(&theta, lay.wq(), lay.bq(), xq, &mut qp);
                let positives = &seq.pos[seq.pos_start[i]..seq.pos_start[i + 1]];
                picks.clear();
                if positives.len() <= config.positives_per_query {
                    picks.extend(0..positives.len());
                } else {
                    picks.extend((0..config.positives_per_query).map(|_| rng.random_range(0..positives.len())));
                }
                for &p in &picks {
                    let jp = positives[p] as usize;
                    let xp = &seq.k[jp * d..(jp + 1) * d];
                    lay.project(&theta, lay.wk(), lay.bk(), xp, &mut kpos);
                    // a = q' − k'₊, d₊ = |a|².
                    let dpos: f64 = (0..r).map(|c| (qp[c] - kpos[c]).powi(2)).sum();
                    if absolute > 0.0 && dpos > inner {
                        // λ·relu(d₊ − (R − ω/2)): pulls the positive inside the radius.
                        loss += absolute * (dpos - inner);
                        for c in 0..r {
                            let ac = qp[c] - kpos[c];
                            gq[c] = absolute * 2.0 * ac;
                            gpos[c] = -absolute * 2.0 * ac;
                        }
                        lay.accumulate(&mut grad, lay.wq(), lay.bq(), xq, &gq);
                        lay.accumulate(&mut grad, lay.wk(), lay.bk(), xp, &gpos);
                    }
                    for _ in 0..config.negatives_per_positive {
                        let Some(jn) = sample_negative(&mut rng, seq, i) else { continue };
                        let xn = &seq.k[jn * d..(jn + 1) * d];
                        lay.project(&theta, lay.wk(), lay.bk(), xn, &mut kneg);
                        count += 1;
                        // c = q' − k'₋, d₋ = |c|²; L = relu(ω + d₊ − d₋).
                        let dneg: f64 = (0..r).map(|c| (qp[c] - kneg[c]).powi(2)).sum();
                        let l = config.margin + dpos - dneg;
                        if l > 0.0 {
                            loss += l;
                            for c in 0..r {
                                let (ac, cc) = (qp[c] - kpos[c], qp[c] - kneg[c]);
                                gq[c] = 2.0 * (ac - cc);
                                gpos[c] = -2.0 * ac;
                                gneg[c] = 2.0 * cc;
                            }
                            lay.accumulate(&mut grad, lay.wq(), lay.bq(), xq, &gq);
                            lay.accumulate(&mut grad, lay.wk(), lay.bk(), xp, &gpos);
                            lay.accumulate(&mut grad, lay.wk(), lay.bk(), xn, &gneg);
                        }
                        if absolute > 0.0 && dneg < outer {
                            // λ·relu((R + ω/2) − d₋): pushes the negative outside the radius.
                            loss += absolute * (outer - dneg);
                            for c in 0..r {
                                let cc = qp[c] - kneg[c];
                                gq[c] = -absolute * 2.0 * cc;
                                gneg[c] = absolute * 2.0 * cc;
                            }
                            lay.accumulate(&mut grad, lay.wq(), lay.bq(), xq, &gq);
                            lay.accumulate(&mut grad, lay.wk(), lay.bk(), xn, &gneg);
                        }
                    }
                }
            }
            if count == 0 {
                continue;
            }
            epoch_loss += loss;
            epoch_count += count;
            step += 1;
            let (c1, c2) = (1.0 - beta1.powi(step), 1.0 - beta2.powi(step));
            for p in 0..theta.len() {
                let g = grad[p] / count as f64;
                m[p] = beta1 * m[p] + (1.0 - beta1) * g;
                v[p] = beta2 * v[p] + (1.0 - beta2) * g * g;
                theta[p] -= config.learning_rate * (m[p] / c1) / ((v[p] / c2).sqrt() + eps);
            }
        }
        final_loss = if epoch_count > 0 { epoch_loss / epoch_count as f64 } else { 0.0 };
    }

    let to32 = |range: std::ops::Range<usize>| theta[range].iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let w_q = to32(lay.wq()..lay.wq() + d * r);
    let b_q = to32(lay.bq()..lay.bq() + r);
    let w_k = to32(lay.wk()..lay.wk() + d * r);
    let b_k = to32(lay.bk()..lay.bk() + r);

    // Calibration with the same f32 projection prediction uses.
    let mut uncovered: Vec<f32> = Vec::new();
    let (mut total, mut covered) = (0usize, 0usize);
    let mut points: Vec<f64> = Vec::new();
    let mut support_rows = (0usize, 0usize);
    for ((q, k), seq) in s.pairs.iter().zip(&seqs) {
        let pq = project_rows(&q.view(), &w_q, &b_q, r)?;
        let pk = project_rows(&k.view(), &w_k, &b_k, r)?;
        let (rq, rk) = (rows_of(&pq), rows_of(&pk));
        for (i, qi) in rq.iter().enumerate() {
            for &j in seq.gold.row(i) {
                total += 1;
                if seq.structure.covers(i as u32, j) {
                    covered += 1;
                } else {
                    uncovered.push(dist2(qi, rk[j as usize]));
                }
            }
        }
        support_rows.0 += seq.gold.total();
        support_rows.1 += seq.gold.rows();
        points.extend(pq.iter().chain(pk.iter()).map(|&x| x as f64));
    }
    uncovered.sort_unstable_by(|a, b| a.total_cmp(b));
    let distance_curve = config
        .calibration_recalls
        .iter()
        .map(|&target| {
            let need = (target * total as f64 - 1e-9).ceil() as i64 - covered as i64;
            let t = if need <= 0 || uncovered.is_empty() {
                -1.0
            } else {
                uncovered[(need as usize).min(uncovered.len()) - 1] as f64
            };
            (target, t)
        })
        .collect();

    let clusterings = config
        .cluster_counts
        .iter()
        .map(|&c| Centroids {
            clusters: c,
            centroids: kmeans(&points, r, c, config.kmeans_iterations, &mut rng).into_iter().map(|x| x as f32).collect(),
        })
        .collect();

    Ok(HeadModel {
        layer: s.layer,
        head: s.head,
        w_q,
        b_q,
        w_k,
        b_k,
        distance_curve,
        clusterings,
        final_loss,
        mean_support: if support_rows.1 > 0 { support_rows.0 as f64 / support_rows.1 as f64 } else { 0.0 },
    })
}
