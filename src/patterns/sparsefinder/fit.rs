//! Fitting: gold α-entmax support (f64 oracle), triplet hinge loss with hand-written gradients,
//! Adam, per-head calibration of distance thresholds and k-means centroids.

use super::kmeans::kmeans;
use super::model::{round12, Centroids, FitInfo, HeadModel, Projection, SparsefinderModel};
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
        data: Some(path.as_ref().file_name().map_or_else(|| path.as_ref().display().to_string(), |n| n.to_string_lossy().into_owned())),
        texts: texts.iter().map(|t| t.to_string()).collect(),
        fit_seconds: round12(start.elapsed().as_secs_f64()),
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
    let results: Vec<Result<FittedHead>> = if threads == 1 {
        todo.iter().map(|s| fit_head(s, alpha, scale, config)).collect()
    } else {
        let todo = &todo;
        let mut slots: Vec<Option<Result<FittedHead>>> = (0..todo.len()).map(|_| None).collect();
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
    let (mut head_models, curves): (Vec<HeadModel>, Vec<Vec<CurvePoint>>) = results.into_iter().collect::<Result<Vec<_>>>()?.into_iter().unzip();
    for (h, curve) in head_models.iter_mut().zip(allocate(&curves, &config.calibration_recalls)) {
        h.mean_recall_curve = curve;
    }
    let info = FitInfo { data: None, texts: Vec::new(), fit_seconds: round12(start.elapsed().as_secs_f64()), note: String::new() };
    SparsefinderModel::new(alpha, round12(scale), (layers, heads, head_dim), config.clone(), info, head_models)
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

/// The distance a projection is trained for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    /// `‖q'−k'‖²` (distance and clustering variants).
    L2,
    /// `min_c (q'_c − k'_c)²` (quantization: a pair is kept when it is close in any coordinate).
    Min,
}

impl Metric {
    /// The distance of a difference vector and its gradient with respect to that vector.
    fn eval(self, diff: &[f64], grad: &mut [f64]) -> f64 {
        match self {
            Metric::L2 => {
                for (g, &x) in grad.iter_mut().zip(diff) {
                    *g = 2.0 * x;
                }
                diff.iter().map(|x| x * x).sum()
            }
            Metric::Min => {
                let mut best = (f64::INFINITY, 0);
                for (c, &x) in diff.iter().enumerate() {
                    if x * x < best.0 {
                        best = (x * x, c);
                    }
                }
                grad.iter_mut().for_each(|g| *g = 0.0);
                if let Some(g) = grad.get_mut(best.1) {
                    *g = 2.0 * diff[best.1];
                }
                best.0
            }
        }
    }
}

/// Trains one projection pair with Adam on the triplet hinge (plus the absolute hinge); returns
/// the parameters and the mean loss of the last epoch.
fn train(seqs: &[Sequence], queries: &mut [(usize, usize)], lay: &Layout, metric: Metric, config: &SparsefinderConfig, rng: &mut ChaCha8Rng) -> (Vec<f64>, f64) {
    let (d, r) = (lay.d, lay.r);
    // Initialisation: uniform with variance 1/d per weight, zero biases.
    let mut theta = vec![0.0f64; lay.len()];
    let a = (3.0 / d as f64).sqrt();
    for w in [lay.wq(), lay.wk()] {
        for x in &mut theta[w..w + d * r] {
            *x = (rng.random::<f64>() * 2.0 - 1.0) * a;
        }
    }
    let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut m = vec![0.0; theta.len()];
    let mut v = vec![0.0; theta.len()];
    let mut step = 0i32;
    let mut final_loss = 0.0;
    let (mut qp, mut kpos, mut kneg) = (vec![0.0; r], vec![0.0; r], vec![0.0; r]);
    let (mut dpos_v, mut dneg_v) = (vec![0.0; r], vec![0.0; r]);
    let (mut gpos_d, mut gneg_d) = (vec![0.0; r], vec![0.0; r]);
    let (mut gq, mut gk) = (vec![0.0; r], vec![0.0; r]);
    let mut picks: Vec<usize> = Vec::new();
    let absolute = config.absolute_weight;
    let (inner, outer) = (config.radius - config.margin / 2.0, config.radius + config.margin / 2.0);
    let mut grad = vec![0.0; theta.len()];
    for _epoch in 0..config.epochs {
        queries.shuffle(rng);
        let (mut epoch_loss, mut epoch_count) = (0.0, 0usize);
        for batch in queries.chunks(config.batch_queries) {
            grad.iter_mut().for_each(|g| *g = 0.0);
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
                    for c in 0..r {
                        dpos_v[c] = qp[c] - kpos[c];
                    }
                    // D₊ = D(q' − k'₊) and ∇D₊ (with respect to the difference).
                    let dpos = metric.eval(&dpos_v, &mut gpos_d);
                    if absolute > 0.0 && dpos > inner {
                        // λ·relu(D₊ − (R − ω/2)): pulls the positive inside the radius.
                        loss += absolute * (dpos - inner);
                        for c in 0..r {
                            gq[c] = absolute * gpos_d[c];
                            gk[c] = -absolute * gpos_d[c];
                        }
                        lay.accumulate(&mut grad, lay.wq(), lay.bq(), xq, &gq);
                        lay.accumulate(&mut grad, lay.wk(), lay.bk(), xp, &gk);
                    }
                    for _ in 0..config.negatives_per_positive {
                        let Some(jn) = sample_negative(rng, seq, i) else { continue };
                        let xn = &seq.k[jn * d..(jn + 1) * d];
                        lay.project(&theta, lay.wk(), lay.bk(), xn, &mut kneg);
                        for c in 0..r {
                            dneg_v[c] = qp[c] - kneg[c];
                        }
                        let dneg = metric.eval(&dneg_v, &mut gneg_d);
                        count += 1;
                        // The paper's triplet hinge relu(ω + D₊ − D₋).
                        let l = config.margin + dpos - dneg;
                        if l > 0.0 {
                            loss += l;
                            for c in 0..r {
                                gq[c] = gpos_d[c] - gneg_d[c];
                            }
                            lay.accumulate(&mut grad, lay.wq(), lay.bq(), xq, &gq);
                            for c in 0..r {
                                gk[c] = -gpos_d[c];
                            }
                            lay.accumulate(&mut grad, lay.wk(), lay.bk(), xp, &gk);
                            lay.accumulate(&mut grad, lay.wk(), lay.bk(), xn, &gneg_d);
                        }
                        if absolute > 0.0 && dneg < outer {
                            // λ·relu((R + ω/2) − D₋): pushes the negative outside the radius.
                            loss += absolute * (outer - dneg);
                            for c in 0..r {
                                gq[c] = -absolute * gneg_d[c];
                                gk[c] = absolute * gneg_d[c];
                            }
                            lay.accumulate(&mut grad, lay.wq(), lay.bq(), xq, &gq);
                            lay.accumulate(&mut grad, lay.wk(), lay.bk(), xn, &gk);
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
    (theta, final_loss)
}

/// `x` as f32 rounded to 6 significant digits: keeps the model file small (the rounded weights
/// are the model: calibration and prediction both use them).
fn short(x: f64) -> f32 {
    if x == 0.0 || !x.is_finite() {
        return x as f32;
    }
    format!("{x:.5e}").parse::<f32>().unwrap_or(x as f32)
}

fn to_projection(theta: &[f64], lay: &Layout) -> Projection {
    let to32 = |at: usize, n: usize| theta[at..at + n].iter().map(|&x| short(x)).collect::<Vec<f32>>();
    let (d, r) = (lay.d, lay.r);
    Projection { w_q: to32(lay.wq(), d * r), b_q: to32(lay.bq(), r), w_k: to32(lay.wk(), d * r), b_k: to32(lay.bk(), r) }
}

/// A fitted head and its threshold → (recall, density) curve on the fitting data.
type FittedHead = (HeadModel, Vec<CurvePoint>);

fn fit_head(s: &HeadSamples, alpha: f64, scale: f64, config: &SparsefinderConfig) -> Result<FittedHead> {
    let d = s.pairs[0].0.ncols();
    let r = config.rank;
    let lay = Layout { d, r };
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream((s.layer as u64) << 32 | s.head as u64);

    // Gold support and the uncovered positives.
    let mut seqs = Vec::with_capacity(s.pairs.len());
    for (q, k) in &s.pairs {
        let gold = gold_support(&q.view(), &k.view(), scale, alpha, config.causal)?;
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

    let (theta, final_loss) = train(&seqs, &mut queries, &lay, Metric::L2, config, &mut rng);
    let distance = to_projection(&theta, &lay);
    let (quantization, quantization_loss) = if config.quantization_min_distance {
        let (theta, loss) = train(&seqs, &mut queries, &lay, Metric::Min, config, &mut rng);
        (Some(to_projection(&theta, &lay)), loss)
    } else {
        (None, final_loss)
    };

    // Calibration with the same f32 projection prediction uses.
    let mut uncovered: Vec<f32> = Vec::new();
    let mut others: Vec<f32> = Vec::new();
    let (mut total, mut covered) = (0usize, 0usize);
    let (mut pairs, mut covered_pairs) = (0usize, 0usize);
    let mut points: Vec<f64> = Vec::new();
    let mut support_rows = (0usize, 0usize);
    for ((q, k), seq) in s.pairs.iter().zip(&seqs) {
        let pq = project_rows(&q.view(), &distance.w_q, &distance.b_q, r)?;
        let pk = project_rows(&k.view(), &distance.w_k, &distance.b_k, r)?;
        let (rq, rk) = (rows_of(&pq), rows_of(&pk));
        for (i, qi) in rq.iter().enumerate() {
            let gold = seq.gold.row(i);
            for (j, kj) in rk.iter().enumerate().take(seq.structure.key_end(i as u32) as usize) {
                pairs += 1;
                if seq.structure.covers(i as u32, j as u32) {
                    covered_pairs += 1;
                } else if gold.binary_search(&(j as u32)).is_err() {
                    others.push(dist2(qi, kj));
                }
            }
            for &j in gold {
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
    others.sort_unstable_by(|a, b| a.total_cmp(b));
    // The squared distance reaching `target` recall of the gold support (window and global
    // tokens count as found); -1 when they alone reach it.
    let threshold_for = |target: f64| {
        let need = (target * total as f64 - 1e-9).ceil() as i64 - covered as i64;
        if need <= 0 || uncovered.is_empty() {
            -1.0
        } else {
            uncovered[(need as usize).min(uncovered.len()) - 1] as f64
        }
    };
    let distance_curve = config.calibration_recalls.iter().map(|&target| (target as f32, threshold_for(target) as f32)).collect();
    // Recall and density of the pattern at thresholds reaching recalls 0, 0.005, ..., 1 on the
    // fitting data: the trade-off curve the model-wide allocation picks from.
    let count_le = |v: &[f32], t: f64| v.partition_point(|&x| (x as f64) <= t);
    let mut curve: Vec<CurvePoint> = Vec::new();
    for step in 0..=200 {
        let t = threshold_for(step as f64 / 200.0);
        if curve.last().is_some_and(|p| p.threshold == t) {
            continue;
        }
        let found = covered + count_le(&uncovered, t);
        let kept = covered_pairs + count_le(&uncovered, t) + count_le(&others, t);
        curve.push(CurvePoint {
            threshold: t,
            recall: if total > 0 { found as f64 / total as f64 } else { 1.0 },
            density: if pairs > 0 { kept as f64 / pairs as f64 } else { 0.0 },
        });
    }

    let clusterings = config
        .cluster_counts
        .iter()
        .map(|&c| Centroids {
            clusters: c,
            centroids: kmeans(&points, r, c, config.kmeans_iterations, config.kmeans_restarts, &mut rng).into_iter().map(short).collect(),
        })
        .collect();

    Ok((HeadModel {
        layer: s.layer,
        head: s.head,
        distance,
        quantization,
        distance_curve,
        mean_recall_curve: Vec::new(),
        clusterings,
        final_loss: round12(final_loss),
        quantization_loss: round12(quantization_loss),
        mean_support: if support_rows.1 > 0 { round12(support_rows.0 as f64 / support_rows.1 as f64) } else { 0.0 },
    }, curve))
}

/// One point of a head's threshold → (recall, density) curve on the fitting data.
#[derive(Clone, Copy, Debug)]
struct CurvePoint {
    threshold: f64,
    recall: f64,
    density: f64,
}

/// For each target mean recall, the per-head thresholds that reach it (averaged over heads, on
/// the fitting data) at the least mean density: every head takes the point of its curve that
/// maximises `recall − λ·density`, with one λ for all heads, the largest λ that reaches the
/// target (equal marginal cost of recall across heads).
fn allocate(curves: &[Vec<CurvePoint>], targets: &[f64]) -> Vec<Vec<(f32, f32)>> {
    let pick = |curve: &[CurvePoint], lambda: f64| -> usize {
        let mut best = (f64::NEG_INFINITY, 0);
        for (i, p) in curve.iter().enumerate() {
            let v = p.recall - lambda * p.density;
            if v > best.0 {
                best = (v, i);
            }
        }
        best.1
    };
    let mean_recall = |lambda: f64| -> f64 {
        let n = curves.len().max(1) as f64;
        curves.iter().map(|c| c.get(pick(c, lambda)).map_or(1.0, |p| p.recall)).sum::<f64>() / n
    };
    let mut out: Vec<Vec<(f32, f32)>> = vec![Vec::with_capacity(targets.len()); curves.len()];
    for &target in targets {
        // Bisection on log λ: mean recall falls as λ grows.
        let (mut lo, mut hi) = (-12.0f64, 12.0f64);
        if mean_recall(10f64.powf(hi)) >= target {
            lo = hi;
        }
        for _ in 0..80 {
            let mid = 0.5 * (lo + hi);
            if mean_recall(10f64.powf(mid)) >= target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let lambda = if lo <= -12.0 { 0.0 } else { 10f64.powf(lo) };
        for (h, c) in curves.iter().enumerate() {
            let t = c.get(pick(c, lambda)).map_or(-1.0, |p| p.threshold) as f32;
            let t = out[h].last().map_or(t, |&(_, prev): &(f32, f32)| t.max(prev));
            out[h].push((target as f32, t));
        }
    }
    out
}
