//! Seeded k-means (k-means++ initialisation, Lloyd iterations) on small low-dimensional points.

use rand::Rng;

/// Squared Euclidean distance.
pub(crate) fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Index of the nearest centroid (`centroids` is `k × dim`, row-major).
pub(crate) fn nearest(point: &[f64], centroids: &[f64], dim: usize) -> usize {
    let mut best = (f64::INFINITY, 0);
    for (c, centre) in centroids.chunks_exact(dim).enumerate() {
        let d = dist2(point, centre);
        if d < best.0 {
            best = (d, c);
        }
    }
    best.1
}

/// Sum of squared distances of the points to their nearest centroid.
fn inertia(points: &[f64], centroids: &[f64], dim: usize) -> f64 {
    points.chunks_exact(dim).map(|p| dist2(p, &centroids[nearest(p, centroids, dim) * dim..][..dim])).sum()
}

/// k-means of `points` (`n × dim`, row-major) into `k` clusters, the best (least inertia) of
/// `restarts` seeded runs; returns `k × dim` centroids. Deterministic for a given RNG state.
pub(crate) fn kmeans(points: &[f64], dim: usize, k: usize, iterations: usize, restarts: usize, rng: &mut impl Rng) -> Vec<f64> {
    let mut best: Option<(f64, Vec<f64>)> = None;
    for _ in 0..restarts.max(1) {
        let c = kmeans_once(points, dim, k, iterations, rng);
        let e = inertia(points, &c, dim);
        if best.as_ref().is_none_or(|(b, _)| e < *b) {
            best = Some((e, c));
        }
    }
    best.map_or_else(|| vec![0.0; k * dim], |(_, c)| c)
}

/// One k-means run: k-means++ initialisation, then Lloyd iterations. With fewer distinct points
/// than `k`, some centroids repeat (harmless for prediction: a tie goes to the first).
fn kmeans_once(points: &[f64], dim: usize, k: usize, iterations: usize, rng: &mut impl Rng) -> Vec<f64> {
    let n = points.len() / dim;
    if n == 0 || k == 0 {
        return vec![0.0; k * dim];
    }
    let point = |i: usize| &points[i * dim..(i + 1) * dim];
    // k-means++.
    let mut centroids = Vec::with_capacity(k * dim);
    centroids.extend_from_slice(point(rng.random_range(0..n)));
    let mut d2: Vec<f64> = (0..n).map(|i| dist2(point(i), &centroids[0..dim])).collect();
    for c in 1..k {
        let total: f64 = d2.iter().sum();
        let pick = if total > 0.0 {
            let mut x = rng.random::<f64>() * total;
            let mut pick = n - 1;
            for (i, &w) in d2.iter().enumerate() {
                if x < w {
                    pick = i;
                    break;
                }
                x -= w;
            }
            pick
        } else {
            rng.random_range(0..n)
        };
        centroids.extend_from_slice(point(pick));
        let new = &centroids[c * dim..(c + 1) * dim];
        for (i, d) in d2.iter_mut().enumerate() {
            *d = d.min(dist2(point(i), new));
        }
    }
    // Lloyd.
    let mut assign = vec![usize::MAX; n];
    for _ in 0..iterations {
        let mut changed = false;
        for (i, a) in assign.iter_mut().enumerate() {
            let c = nearest(point(i), &centroids, dim);
            if *a != c {
                *a = c;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        let mut sums = vec![0.0; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &a) in assign.iter().enumerate() {
            counts[a] += 1;
            for (s, &x) in sums[a * dim..(a + 1) * dim].iter_mut().zip(point(i)) {
                *s += x;
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                for t in 0..dim {
                    centroids[c * dim + t] = sums[c * dim + t] / counts[c] as f64;
                }
            } else {
                // Re-seed an empty cluster at the point farthest from its centroid.
                let far = (0..n)
                    .map(|i| (dist2(point(i), &centroids[assign[i] * dim..(assign[i] + 1) * dim]), i))
                    .fold((f64::NEG_INFINITY, 0), |a, b| if b.0 > a.0 { b } else { a })
                    .1;
                centroids[c * dim..(c + 1) * dim].copy_from_slice(point(far));
                assign[far] = c;
            }
        }
    }
    centroids
}
