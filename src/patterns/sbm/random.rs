//! Random draws the SBM sampler needs: Poisson (inversion / PTRS) and Walker–Vose alias tables.

use rand::Rng;

/// `ln(k!)`: exact sum below 32, Stirling series (error < 1e-12) above.
pub(crate) fn ln_factorial(k: u64) -> f64 {
    if k < 32 {
        return (2..=k).map(|i| (i as f64).ln()).sum();
    }
    let n = k as f64;
    let inv = 1.0 / n;
    let inv2 = inv * inv;
    n * n.ln() - n + 0.5 * (std::f64::consts::TAU * n).ln() + inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))
}

/// One Poisson(λ) draw. λ < 10: inversion by sequential search (exact); λ ≥ 10: Hörmann's PTRS
/// transformed rejection ("The transformed rejection method for generating Poisson random
/// variables", 1993), exact as well. λ <= 0 or non-finite gives 0.
pub(crate) fn poisson(lambda: f64, rng: &mut impl Rng) -> u64 {
    if lambda.is_nan() || lambda <= 0.0 || !lambda.is_finite() {
        return 0;
    }
    if lambda < 10.0 {
        let mut p = (-lambda).exp();
        let mut cdf = p;
        let u: f64 = rng.random();
        let mut k = 0u64;
        while u > cdf && k < 1000 {
            k += 1;
            p *= lambda / k as f64;
            cdf += p;
        }
        return k;
    }
    let slam = lambda.sqrt();
    let loglam = lambda.ln();
    let b = 0.931 + 2.53 * slam;
    let a = -0.059 + 0.02483 * b;
    let inv_alpha = 1.1239 + 1.1328 / (b - 3.4);
    let vr = 0.9277 - 3.6224 / (b - 2.0);
    loop {
        let u = rng.random::<f64>() - 0.5;
        let v: f64 = rng.random();
        let us = 0.5 - u.abs();
        let k = ((2.0 * a / us + b) * u + lambda + 0.43).floor();
        if us >= 0.07 && v <= vr {
            return k.max(0.0) as u64;
        }
        if k < 0.0 || (us < 0.013 && v > us) {
            continue;
        }
        if v.ln() + inv_alpha.ln() - (a / (us * us) + b).ln() <= -lambda + k * loglam - ln_factorial(k as u64) {
            return k as u64;
        }
    }
}

/// Walker–Vose alias table over non-negative weights: O(n) to build, O(1) per draw.
#[derive(Clone, Debug)]
pub(crate) struct Alias {
    prob: Vec<f64>,
    alias: Vec<u32>,
}

impl Alias {
    /// None when no weight is positive.
    pub(crate) fn new(weights: &[f64]) -> Option<Self> {
        let n = weights.len();
        let total: f64 = weights.iter().filter(|w| **w > 0.0).sum();
        if n == 0 || total.is_nan() || total <= 0.0 || !total.is_finite() {
            return None;
        }
        let mut prob: Vec<f64> = weights.iter().map(|&w| if w > 0.0 { w * n as f64 / total } else { 0.0 }).collect();
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<u32>, Vec<u32>) = (0..n as u32).partition(|&i| prob[i as usize] < 1.0);
        while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
            small.pop();
            alias[s as usize] = l;
            prob[l as usize] -= 1.0 - prob[s as usize];
            if prob[l as usize] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // Leftovers (rounding) keep themselves with probability 1.
        for i in small.into_iter().chain(large) {
            prob[i as usize] = 1.0;
        }
        Some(Self { prob, alias })
    }

    pub(crate) fn sample(&self, rng: &mut impl Rng) -> usize {
        let i = rng.random_range(0..self.prob.len());
        if rng.random::<f64>() < self.prob[i] {
            i
        } else {
            self.alias[i] as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn poisson_moments() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for lambda in [0.3, 4.0, 9.9, 10.0, 37.5, 1e4] {
            let t = 20_000;
            let xs: Vec<f64> = (0..t).map(|_| poisson(lambda, &mut rng) as f64).collect();
            let mean = xs.iter().sum::<f64>() / t as f64;
            let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (t - 1) as f64;
            // Mean: 5 standard errors; variance: 10 % (its s.e. is ~1 % here).
            assert!((mean - lambda).abs() < 5.0 * (lambda / t as f64).sqrt(), "λ {lambda}: mean {mean}");
            assert!((var / lambda - 1.0).abs() < 0.1, "λ {lambda}: var {var}");
        }
        assert_eq!(poisson(0.0, &mut rng), 0);
    }

    #[test]
    fn ln_factorial_matches_sum() {
        for k in [0u64, 1, 5, 31, 32, 33, 100, 1000] {
            let exact: f64 = (2..=k).map(|i| (i as f64).ln()).sum();
            assert!((ln_factorial(k) - exact).abs() < 1e-9 * exact.max(1.0), "{k}");
        }
    }

    #[test]
    fn alias_frequencies() {
        let w = [1.0, 0.0, 3.0, 6.0];
        let a = Alias::new(&w).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let mut c = [0usize; 4];
        for _ in 0..100_000 {
            c[a.sample(&mut rng)] += 1;
        }
        assert_eq!(c[1], 0);
        for i in [0, 2, 3] {
            let p = w[i] / 10.0;
            assert!((c[i] as f64 / 1e5 - p).abs() < 5.0 * (p * (1.0 - p) / 1e5).sqrt(), "{c:?}");
        }
    }
}
