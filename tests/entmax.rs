//! CPU oracle of the normalisers: closed forms and properties over random inputs.

use proptest::prelude::*;
use sparse_attn::reference::{entmax15, entmax_bisect, normalize, softmax, sparsemax};
use sparse_attn::Normalizer;

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn closed_form_cases() {
    // Two far-apart scores: sparsemax and 1.5-entmax are one-hot.
    assert_eq!(sparsemax(&[0.0, 10.0]), vec![0.0, 1.0]);
    assert_eq!(entmax15(&[10.0, 0.0]), vec![1.0, 0.0]);
    // Equal scores: uniform.
    for p in [sparsemax(&[3.0; 4]), entmax15(&[3.0; 4]), entmax_bisect(&[3.0; 4], 1.3), softmax(&[3.0; 4])] {
        assert!(close(&p, &[0.25; 4], 1e-12), "{p:?}");
    }
    // Sparsemax of (0, 0.5): τ = -0.25 → (0.25, 0.75).
    assert!(close(&sparsemax(&[0.0, 0.5]), &[0.25, 0.75], 1e-15));
    // 1.5-entmax of (0, 1): z = (−0.5, 0) shifted; τ solves (−0.5−τ)² + τ² = 1 → τ = (−0.5 − √1.75)/2.
    let tau: f64 = (-0.5 - 1.75f64.sqrt()) / 2.0;
    assert!(close(&entmax15(&[0.0, 1.0]), &[(-0.5 - tau).powi(2), tau.powi(2)], 1e-12));
    // Empty rows stay empty.
    assert!(sparsemax(&[]).is_empty() && entmax15(&[]).is_empty() && softmax(&[]).is_empty());
}

#[test]
fn bisection_matches_closed_forms() {
    let s = [0.3, -1.2, 2.5, 2.4, 0.0, 1.9, -3.0];
    assert!(close(&entmax_bisect(&s, 1.5), &entmax15(&s), 1e-10));
    assert!(close(&entmax_bisect(&s, 2.0), &sparsemax(&s), 1e-10));
}

fn scores() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-20.0f64..20.0, 1..40)
}

proptest! {
    #[test]
    fn probabilities_are_a_distribution_on_a_top_set(s in scores(), alpha in 1.05f64..=2.0) {
        let normalizer = Normalizer::Entmax { alpha: alpha as f32 };
        let alpha = normalizer.alpha().unwrap();
        let p = normalize(&s, normalizer);
        prop_assert!(p.iter().all(|&x| x >= 0.0));
        prop_assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // The support is a top set: every kept score is >= every dropped score.
        let kept_min = s.iter().zip(&p).filter(|(_, &x)| x > 0.0).map(|(&v, _)| v).fold(f64::INFINITY, f64::min);
        let dropped_max = s.iter().zip(&p).filter(|(_, &x)| x == 0.0).map(|(&v, _)| v).fold(f64::NEG_INFINITY, f64::max);
        prop_assert!(kept_min >= dropped_max, "alpha {alpha}: kept {kept_min} < dropped {dropped_max}");
        // Monotone: a larger score never gets a smaller probability.
        for i in 0..s.len() { for j in 0..s.len() { if s[i] > s[j] { prop_assert!(p[i] >= p[j] - 1e-12); } } }
    }

    #[test]
    fn continuous_in_alpha_near_two_and_softmax_near_one(s in scores()) {
        let near2 = entmax_bisect(&s, 2.0 - 1e-6);
        prop_assert!(close(&near2, &sparsemax(&s), 1e-4), "{near2:?} vs {:?}", sparsemax(&s));
        // α → 1: entmax approaches softmax (checked on a moderate spread).
        let t: Vec<f64> = s.iter().map(|x| x / 10.0).collect();
        let near1 = entmax_bisect(&t, 1.001);
        prop_assert!(close(&near1, &softmax(&t), 2e-2), "{near1:?} vs {:?}", softmax(&t));
    }

    #[test]
    fn shift_invariant(s in scores(), c in -1e3f64..1e3) {
        let shifted: Vec<f64> = s.iter().map(|x| x + c).collect();
        for n in [Normalizer::Softmax, Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax { alpha: 1.3 }] {
            prop_assert!(close(&normalize(&s, n), &normalize(&shifted, n), 1e-8));
        }
    }
}

#[test]
fn normalizer_domain_and_parsing() {
    for bad in [1.0f32, 0.5, 2.5, f32::NAN, f32::INFINITY] {
        assert!(Normalizer::Entmax { alpha: bad }.validate().is_err(), "alpha {bad} accepted");
    }
    assert!(Normalizer::Entmax { alpha: 1.0 }.validate().unwrap_err().to_string().contains("Softmax"));
    assert_eq!(Normalizer::parse("entmax15").unwrap(), Normalizer::ENTMAX15);
    assert_eq!(Normalizer::parse("entmax:1.25").unwrap(), Normalizer::Entmax { alpha: 1.25 });
    assert!(Normalizer::parse("entmax:3").is_err() && Normalizer::parse("relu").is_err());
}
