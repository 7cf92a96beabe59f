//! Quality measures (CPU only): gold entmax support, recall, sparsity, output error.

use ndarray::{array, s, Array2, Array4};
use sparse_attn::data::{default_data_path, fixture_path, AttentionData};
use sparse_attn::metrics::{block_sparsity, element_sparsity, gold_support, output_error, output_errors, recall, GoldSupport};
use sparse_attn::patterns::{Causal, Dense, Window};
use sparse_attn::{AttentionShape, Error};

fn fixture() -> AttentionData {
    AttentionData::open(fixture_path()).expect("fixture opens")
}

fn scale(d: &AttentionData) -> f64 {
    1.0 / (d.head_dim() as f64).sqrt()
}

/// Gold entmax-1.5 support of (text, layer, head) of the fixture.
fn fixture_gold(d: &AttentionData, text: &str, layer: usize, head: usize) -> GoldSupport {
    let (q, k, _) = d.layer(text, layer).unwrap();
    gold_support(&q.slice(s![0, head, .., ..]), &k.slice(s![0, head, .., ..]), scale(d), 1.5, false).expect("gold support")
}

#[test]
fn hand_made_gold_support() {
    // Scores 10 and 0 (and -3): sparsemax and entmax-1.5 keep only the first key.
    let q = array![[1.0f32, 0.0], [0.0, 0.0]];
    let k = array![[10.0f32, 0.0], [0.0, 1.0], [-3.0, 0.0]];
    for alpha in [2.0, 1.5, 1.7] {
        let g = gold_support(&q.view(), &k.view(), 1.0, alpha, false).expect("gold support");
        assert_eq!(g.rows(), 2);
        assert_eq!(g.row(0), &[0], "alpha {alpha}");
        // Row 1: all scores equal (0) → uniform, every key in the support.
        assert_eq!(g.row(1), &[0, 1, 2], "alpha {alpha}");
        assert_eq!(g.total(), 4);
        assert!((g.mean_support() - 2.0).abs() < 1e-12);
    }
    // Close scores stay in the support together.
    let k2 = array![[1.0f32, 0.0], [0.9, 0.0], [-30.0, 0.0]];
    let g = gold_support(&q.view(), &k2.view(), 1.0, 2.0, false).expect("gold support");
    assert_eq!(g.row(0), &[0, 1]);
    // Causal with seq_q == seq_kv: query i sees keys 0..=i.
    let q3 = array![[1.0f32, 0.0], [1.0, 0.0], [1.0, 0.0]];
    let g = gold_support(&q3.view(), &k.view(), 1.0, 2.0, true).expect("gold support");
    assert_eq!(g.row(0), &[0]);
    assert_eq!(g.row(1), &[0]);
    assert_eq!(g.row(2), &[0]);
    let g = gold_support(&q3.view(), &k.view(), 1.0, 1.0, true).expect("gold support");
    assert_eq!((g.row(0), g.row(1), g.row(2)), (&[0u32][..], &[0u32, 1][..], &[0u32, 1, 2][..]));
    // Causal with fewer queries than keys: the last query sees every key.
    let g = gold_support(&q.slice(s![..1, ..]), &k.view(), 1.0, 1.0, true).expect("gold support");
    assert_eq!(g.row(0), &[0, 1, 2]);
}

#[test]
fn gold_support_refuses_mismatched_or_non_finite_inputs() {
    let q = array![[1.0f32, 0.0], [0.0, 0.0]];
    let k = array![[10.0f32, 0.0], [0.0, 1.0]];
    let k3 = array![[10.0f32, 0.0, 1.0]];
    assert!(matches!(gold_support(&q.view(), &k3.view(), 1.0, 1.5, false), Err(Error::Shape(_))));
    let mut k_nan = k.clone();
    k_nan[[1, 0]] = f32::NAN;
    assert!(matches!(gold_support(&q.view(), &k_nan.view(), 1.0, 1.5, false), Err(Error::NonFinite { tensor: "k", index: 2, .. })));
    assert!(matches!(gold_support(&q.view(), &k.view(), f64::INFINITY, 1.5, false), Err(Error::NonFinite { tensor: "scale", .. })));
    assert!(matches!(gold_support(&q.view(), &k.view(), 1.0, f64::NAN, false), Err(Error::Normalizer(_))));
}

#[test]
fn recall_of_dense_is_one_and_narrow_window_less() {
    let d = fixture();
    let shape = AttentionShape::new(1, d.heads(), d.seq(), d.head_dim());
    let dense = Dense::new().build(&shape).unwrap();
    let window = Window::new(8).with_blocks(16, 16).build(&shape).unwrap();
    let wide = Window::new(64).with_blocks(16, 16).build(&shape).unwrap();
    for head in 0..d.heads() {
        let gold = fixture_gold(&d, "gpl3", 1, head);
        assert_eq!(recall(&dense, dense.pattern_slice(head), &gold), 1.0);
        let r = recall(&window, 0, &gold);
        let r_wide = recall(&wide, 0, &gold);
        eprintln!("gpl3 layer 3 head {head}: recall window(8) = {r:.3}, window(64) = {r_wide:.3}");
        assert!(r < 1.0, "window(8) recall {r}");
        assert!(r > 0.0 && r <= r_wide, "recall {r} vs wider {r_wide}");
        // Cross-check against the dense mask (test only).
        let m = window.to_dense_mask(0);
        let hit: usize = (0..gold.rows()).map(|i| gold.row(i).iter().filter(|&&j| m[[i, j as usize]]).count()).sum();
        assert_eq!(r, hit as f64 / gold.total() as f64);
    }
}

#[test]
fn recall_of_empty_gold_is_one() {
    let shape = AttentionShape::new(1, 1, 64, 8);
    let window = Window::new(4).with_blocks(16, 16).build(&shape).unwrap();
    let q = Array2::<f32>::zeros((0, 8));
    let g = gold_support(&q.view(), &Array2::<f32>::zeros((64, 8)).view(), 1.0, 1.5, false).expect("gold support");
    assert_eq!(g.total(), 0);
    assert_eq!(recall(&window, 0, &g), 1.0);
}

#[test]
fn element_and_block_sparsity() {
    for (n, w, b) in [(256usize, 16u32, 16u32), (200, 31, 32), (100, 7, 16)] {
        let shape = AttentionShape::new(1, 1, n, 32);
        let dense = Dense::new().with_blocks(b, b).build(&shape).unwrap();
        assert_eq!(element_sparsity(&dense, 0, false), 0.0);
        assert_eq!(block_sparsity(&dense, 0, false), 0.0);

        let window = Window::new(w).with_blocks(b, b).build(&shape).unwrap();
        let (lo, hi) = (-((w as i64 - 1) / 2), w as i64 / 2);
        let pairs: i64 = (0..n as i64).map(|i| (i + hi).min(n as i64 - 1) - (i + lo).max(0) + 1).sum();
        assert_eq!(window.allowed_pairs(0), pairs as u64);
        let expect = 1.0 - pairs as f64 / (n * n) as f64;
        let got = element_sparsity(&window, 0, false);
        assert!((got - expect).abs() < 1e-12, "n {n} w {w}: {got} vs {expect}");
        assert!((got - (1.0 - w as f64 / n as f64)).abs() < w as f64 * w as f64 / (n * n) as f64);
        let bs = block_sparsity(&window, 0, false);
        assert!((bs - (1.0 - window.slice_nnz(0) as f64 / (window.q_blocks() * window.k_blocks()) as f64)).abs() < 1e-12);
        assert!(bs < got, "block sparsity {bs} should be below element sparsity {got}");

        // Causal pattern: nothing missing under causal counting; half-ish sparse otherwise.
        let causal = Causal::new().with_blocks(b, b).build(&shape).unwrap();
        assert_eq!(element_sparsity(&causal, 0, true), 0.0);
        assert_eq!(block_sparsity(&causal, 0, true), 0.0);
        let tri = (n * (n + 1) / 2) as f64;
        assert!((element_sparsity(&causal, 0, false) - (1.0 - tri / (n * n) as f64)).abs() < 1e-12);
        // Dense under causal counting: only its causal pairs count → 0 as well.
        assert_eq!(element_sparsity(&dense, 0, true), 0.0);
        assert_eq!(block_sparsity(&dense, 0, true), 0.0);
        // A symmetric window under causal counting: its causal half over the causal triangle.
        let causal_window_pairs: i64 = (0..n as i64).map(|i| i - (i + lo).max(0) + 1).sum();
        let got = element_sparsity(&window, 0, true);
        assert!((got - (1.0 - causal_window_pairs as f64 / tri)).abs() < 1e-12, "{got}");
    }
    // Causal with seq_kv > seq_q (decoder offset).
    let shape = AttentionShape::new(1, 1, 64, 32).with_seq_kv(160);
    let causal = Causal::new().with_blocks(16, 16).build(&shape).unwrap();
    assert_eq!(element_sparsity(&causal, 0, true), 0.0);
    assert_eq!(block_sparsity(&causal, 0, true), 0.0);
    assert!(element_sparsity(&causal, 0, false) > 0.0);
}

#[test]
fn output_error_measures() {
    let o = Array4::from_shape_fn((2, 3, 16, 8), |(b, h, i, j)| ((b * 7 + h * 5 + i * 3 + j) as f32 * 0.37).sin());
    let errs = output_errors(&o, &o).unwrap();
    assert_eq!(errs, vec![0.0; 6]);
    let twice = o.mapv(|x| 2.0 * x);
    for e in output_errors(&twice, &o).unwrap() {
        assert!((e - 1.0).abs() < 1e-12, "{e}");
    }
    let o2 = o.slice(s![0, 0, .., ..]);
    assert!((output_error(&twice.slice(s![0, 0, .., ..]), &o2) - 1.0).abs() < 1e-12);
    let zero = Array2::<f32>::zeros((16, 8));
    assert_eq!(output_error(&zero.view(), &zero.view()), 0.0);
    let ones = Array2::<f32>::ones((16, 8));
    assert!((output_error(&ones.view(), &zero.view()) - (128f64).sqrt()).abs() < 1e-12);
    match output_errors(&o, &Array4::zeros((2, 3, 16, 4))) {
        Err(Error::Shape(msg)) => assert!(msg.contains("[2, 3, 16, 4]"), "{msg}"),
        other => panic!("expected Error::Shape, got {other:?}"),
    }
}

#[test]
fn entmax15_support_on_fixture_is_sparse() {
    let d = fixture();
    let (mut total, mut rows) = (0usize, 0usize);
    for text in d.texts() {
        for layer in 0..d.layers() {
            let (q, k, _) = d.layer(text, layer).unwrap();
            for head in 0..d.heads() {
                let g = gold_support(&q.slice(s![0, head, .., ..]), &k.slice(s![0, head, .., ..]), scale(&d), 1.5, false).expect("gold support");
                assert_eq!(g.rows(), d.seq());
                assert!((0..g.rows()).all(|i| !g.row(i).is_empty() && g.row(i).windows(2).all(|w| w[0] < w[1])));
                eprintln!(
                    "{text} layer {} head {}: mean support {:.2} keys ({:.2} %)",
                    d.layer_ids()[layer],
                    d.head_ids()[head],
                    g.mean_support(),
                    100.0 * g.mean_support() / d.seq() as f64
                );
                total += g.total();
                rows += g.rows();
            }
        }
    }
    let mean = total as f64 / rows as f64;
    let share = mean / d.seq() as f64;
    eprintln!("fixture entmax-1.5 mean support: {mean:.2} of {} keys ({:.2} %)", d.seq(), 100.0 * share);
    assert!(share > 0.001 && share < 0.30, "mean support {mean} keys ({share})");
}

#[test]
fn entmax15_support_on_full_data() {
    let path = default_data_path();
    if !path.exists() {
        eprintln!("skipping: full data file {} absent", path.display());
        return;
    }
    let d = AttentionData::open(&path).unwrap();
    let t = std::time::Instant::now();
    let (mut total, mut rows) = (0usize, 0usize);
    for text in d.texts() {
        for layer in 0..d.layers() {
            let (q, k, _) = d.layer(text, layer).unwrap();
            for head in 0..d.heads() {
                let g = gold_support(&q.slice(s![0, head, .., ..]), &k.slice(s![0, head, .., ..]), scale(&d), 1.5, false).expect("gold support");
                total += g.total();
                rows += g.rows();
            }
        }
    }
    let mean = total as f64 / rows as f64;
    let share = mean / d.seq() as f64;
    eprintln!("full data entmax-1.5 mean support: {mean:.2} of {} keys ({:.2} %), {:?}", d.seq(), 100.0 * share, t.elapsed());
    // DESIGN.md: 1–5 % of keys per query on this file.
    assert!(share > 0.005 && share < 0.10, "mean support {mean} keys ({share})");
}
