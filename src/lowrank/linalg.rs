//! The small dense linear algebra the low-rank method needs, by hand (f64, row-major):
//! a symmetric eigen-solver (Householder tridiagonalisation + implicit QL, after EISPACK
//! `tred2`/`tql2`) and regularised least squares through a Cholesky factorisation.

use crate::error::{Error, Result};

/// Eigen-decomposition of a symmetric matrix: eigenvalues descending, eigenvectors as the
/// columns of `vectors` (`n × n`, row-major: `vectors[i * n + k]` is component `i` of vector `k`).
#[derive(Clone, Debug)]
pub struct SymmetricEigen {
    pub n: usize,
    pub values: Vec<f64>,
    pub vectors: Vec<f64>,
}

/// Eigen-decomposition of the symmetric `n × n` matrix `a` (row-major; only symmetry is assumed,
/// the lower triangle is read). Errors on a wrong length, non-finite input or no convergence.
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<SymmetricEigen> {
    if n == 0 {
        return Err(Error::ZeroSize("eigen-solver matrix size"));
    }
    if a.len() != n * n {
        return Err(Error::Shape(format!(
            "eigen-solver: {} entries for a {n}×{n} matrix",
            a.len()
        )));
    }
    crate::shape::check_finite_values("eigen-solver matrix", a)?;
    // v[i][j] as v[i * n + j]; symmetrise from the lower triangle.
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            v[i * n + j] = a[i * n + j];
            v[j * n + i] = a[i * n + j];
        }
    }
    let mut d = vec![0f64; n];
    let mut e = vec![0f64; n];
    tred2(n, &mut v, &mut d, &mut e);
    tql2(n, &mut v, &mut d, &mut e)?;
    // Sort descending.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| d[y].total_cmp(&d[x]));
    let values: Vec<f64> = order.iter().map(|&k| d[k]).collect();
    let mut vectors = vec![0f64; n * n];
    for i in 0..n {
        for (c, &k) in order.iter().enumerate() {
            vectors[i * n + c] = v[i * n + k];
        }
    }
    Ok(SymmetricEigen { n, values, vectors })
}

/// Householder reduction to tridiagonal form (EISPACK tred2, as in JAMA).
fn tred2(n: usize, v: &mut [f64], d: &mut [f64], e: &mut [f64]) {
    let ix = |i: usize, j: usize| i * n + j;
    for j in 0..n {
        d[j] = v[ix(n - 1, j)];
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for dk in d.iter().take(i) {
            scale += dk.abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[ix(i - 1, j)];
                v[ix(i, j)] = 0.0;
                v[ix(j, i)] = 0.0;
            }
        } else {
            for dk in d.iter_mut().take(i) {
                *dk /= scale;
                h += *dk * *dk;
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for ej in e.iter_mut().take(i) {
                *ej = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[ix(j, i)] = f;
                g = e[j] + v[ix(j, j)] * f;
                for k in j + 1..i {
                    g += v[ix(k, j)] * d[k];
                    e[k] += v[ix(k, j)] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[ix(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[ix(i - 1, j)];
                v[ix(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    for i in 0..n - 1 {
        v[ix(n - 1, i)] = v[ix(i, i)];
        v[ix(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[ix(k, i + 1)] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for k in 0..=i {
                    g += v[ix(k, i + 1)] * v[ix(k, j)];
                }
                for k in 0..=i {
                    v[ix(k, j)] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[ix(k, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[ix(n - 1, j)];
        v[ix(n - 1, j)] = 0.0;
    }
    v[ix(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// Implicit QL on the tridiagonal matrix (EISPACK tql2, as in JAMA).
fn tql2(n: usize, v: &mut [f64], d: &mut [f64], e: &mut [f64]) -> Result<()> {
    let ix = |i: usize, j: usize| i * n + j;
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1 = 0.0f64;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 {
            if e[m].abs() <= eps * tst1 {
                break;
            }
            m += 1;
        }
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                if iter > 200 {
                    return Err(Error::Data(format!(
                        "eigen-solver: no convergence for eigenvalue {l} of {n}"
                    )));
                }
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    for k in 0..n {
                        h = v[ix(k, i + 1)];
                        v[ix(k, i + 1)] = s * v[ix(k, i)] + c * h;
                        v[ix(k, i)] = c * v[ix(k, i)] - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    crate::shape::check_finite_values("eigenvalues", &*d)?;
    Ok(())
}

/// Cholesky factor `L` (lower, row-major) of the symmetric positive definite `r × r` matrix `a`.
pub fn cholesky(a: &[f64], r: usize) -> Result<Vec<f64>> {
    if a.len() != r * r {
        return Err(Error::Shape(format!(
            "cholesky: {} entries for a {r}×{r} matrix",
            a.len()
        )));
    }
    let mut l = vec![0f64; r * r];
    // Pivots below this are treated as zero (rank deficiency up to rounding).
    let tiny = 1e-12 * (0..r).map(|i| a[i * r + i].abs()).fold(0.0f64, f64::max);
    for i in 0..r {
        for j in 0..=i {
            let mut s = a[i * r + j];
            for k in 0..j {
                s -= l[i * r + k] * l[j * r + k];
            }
            if i == j {
                if !(s > tiny && s.is_finite()) {
                    return Err(Error::Data(format!(
                        "cholesky: matrix is not positive definite (pivot {i} is {s}); the subset does not determine the basis — use more or better spread positions, or a ridge > 0"
                    )));
                }
                l[i * r + i] = s.sqrt();
            } else {
                l[i * r + j] = s / l[j * r + j];
            }
        }
    }
    Ok(l)
}

/// Solves `L Lᵀ x = b` in place for the Cholesky factor `l` (`r × r`).
pub fn cholesky_solve(l: &[f64], r: usize, b: &mut [f64]) {
    for i in 0..r {
        let mut s = b[i];
        for k in 0..i {
            s -= l[i * r + k] * b[k];
        }
        b[i] = s / l[i * r + i];
    }
    for i in (0..r).rev() {
        let mut s = b[i];
        for k in i + 1..r {
            s -= l[k * r + i] * b[k];
        }
        b[i] = s / l[i * r + i];
    }
}

/// Ridge least-squares operator: for `x` (`m × r`, row-major) returns `A = (XᵀX + λI)⁻¹ Xᵀ`
/// (`r × m`, row-major), so that `c = A·y` minimises `‖X c − y‖² + λ‖c‖²`.
pub fn ridge_operator(x: &[f64], m: usize, r: usize, lambda: f64) -> Result<Vec<f64>> {
    ridge_operator_diag(x, m, r, &vec![lambda; r])
}

/// Like [`ridge_operator`] with a per-coefficient penalty: minimises `‖X c − y‖² + Σ λ_k c_k²`.
pub fn ridge_operator_diag(x: &[f64], m: usize, r: usize, penalty: &[f64]) -> Result<Vec<f64>> {
    if x.len() != m * r || penalty.len() != r {
        return Err(Error::Shape(format!(
            "ridge: {} entries for a {m}×{r} matrix, {} penalties",
            x.len(),
            penalty.len()
        )));
    }
    if let Some(lambda) = penalty.iter().find(|l| !(**l >= 0.0 && l.is_finite())) {
        return Err(Error::Data(format!(
            "ridge: λ must be finite and >= 0, got {lambda}"
        )));
    }
    let mut g = vec![0f64; r * r];
    for row in x.chunks_exact(r) {
        for i in 0..r {
            for j in 0..=i {
                g[i * r + j] += row[i] * row[j];
            }
        }
    }
    for i in 0..r {
        for j in 0..i {
            g[j * r + i] = g[i * r + j];
        }
        g[i * r + i] += penalty[i];
    }
    let l = cholesky(&g, r)?;
    let mut a = vec![0f64; r * m];
    let mut col = vec![0f64; r];
    for (p, row) in x.chunks_exact(r).enumerate() {
        col.copy_from_slice(row);
        cholesky_solve(&l, r, &mut col);
        for i in 0..r {
            a[i * m + p] = col[i];
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    #[test]
    fn eigen_reconstructs_random_symmetric() {
        for n in [1usize, 2, 3, 7, 40] {
            let mut seed = n as u64;
            let mut a = vec![0f64; n * n];
            for i in 0..n {
                for j in 0..=i {
                    let x = lcg(&mut seed);
                    a[i * n + j] = x;
                    a[j * n + i] = x;
                }
            }
            let eig = symmetric_eigen(&a, n).unwrap();
            for w in eig.values.windows(2) {
                assert!(w[0] >= w[1]);
            }
            for i in 0..n {
                for k in 0..n {
                    // (A v_k)_i = λ_k v_ik and orthonormality.
                    let av: f64 = (0..n).map(|j| a[i * n + j] * eig.vectors[j * n + k]).sum();
                    assert!(
                        (av - eig.values[k] * eig.vectors[i * n + k]).abs() < 1e-10,
                        "n {n}"
                    );
                    let dot: f64 = (0..n)
                        .map(|j| eig.vectors[j * n + i] * eig.vectors[j * n + k])
                        .sum();
                    assert!((dot - if i == k { 1.0 } else { 0.0 }).abs() < 1e-10);
                }
            }
        }
    }

    #[test]
    fn eigen_of_diagonal_and_degenerate() {
        let a = [3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0];
        let eig = symmetric_eigen(&a, 3).unwrap();
        assert_eq!(
            eig.values.iter().map(|x| x.round()).collect::<Vec<_>>(),
            vec![3.0, 2.0, 1.0]
        );
        let z = symmetric_eigen(&[0.0; 16], 4).unwrap();
        assert!(z.values.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn ridge_solves_least_squares() {
        // Over-determined exact system: x c = y with c = (1, -2).
        let x = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, -1.0];
        let y = [1.0, -2.0, -1.0, 4.0];
        let a = ridge_operator(&x, 4, 2, 0.0).unwrap();
        let c: Vec<f64> = (0..2)
            .map(|i| (0..4).map(|p| a[i * 4 + p] * y[p]).sum())
            .collect();
        assert!(
            (c[0] - 1.0).abs() < 1e-12 && (c[1] + 2.0).abs() < 1e-12,
            "{c:?}"
        );
        // Singular without ridge, solvable with it.
        let x1 = [1.0, 1.0, 2.0, 2.0];
        assert!(matches!(
            ridge_operator(&x1, 2, 2, 0.0),
            Err(Error::Data(_))
        ));
        assert!(ridge_operator(&x1, 2, 2, 1e-3).is_ok());
    }
}
