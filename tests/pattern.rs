//! BlockPattern invariants, builders against their definitions, and the pattern algebra.

use proptest::prelude::*;
use sparse_attn::pattern::{BlockPattern, PatternError, PatternGeometry, FULL};
use sparse_attn::patterns::{Causal, Dense, GlobalTokens, RandomBlocks, Window};
use sparse_attn::AttentionShape;

fn geom(seq_q: u32, seq_kv: u32) -> PatternGeometry {
    PatternGeometry { block_q: 16, block_k: 16, seq_q, seq_kv, slices: 1 }
}

#[test]
fn new_checked_names_each_violated_invariant() {
    let g = geom(32, 32); // 2 x 2 blocks
    let err = |rp: Vec<u32>, ci: Vec<u32>, mo: Vec<u32>, m: Vec<u32>| BlockPattern::new_checked(g, rp, ci, mo, m).unwrap_err();
    assert!(matches!(BlockPattern::new_checked(PatternGeometry { block_q: 24, ..g }, vec![0], vec![], vec![], vec![]), Err(PatternError::BlockSize { which: "q", value: 24 })));
    assert!(matches!(BlockPattern::new_checked(PatternGeometry { block_k: 256, ..g }, vec![0], vec![], vec![], vec![]), Err(PatternError::BlockSize { which: "k", .. })));
    assert!(matches!(err(vec![0, 1], vec![0], vec![FULL], vec![]), PatternError::RowPtrLength { got: 2, expected: 3 }));
    assert!(matches!(err(vec![1, 1, 1], vec![0], vec![FULL], vec![]), PatternError::RowPtrStart(1)));
    assert!(matches!(err(vec![0, 2, 1], vec![0, 1], vec![FULL; 2], vec![]), PatternError::RowPtrNotMonotone { row: 1, .. }));
    assert!(matches!(err(vec![0, 1, 1], vec![0, 1], vec![FULL; 2], vec![]), PatternError::RowPtrEnd { end: 1, nnz: 2 }));
    assert!(matches!(err(vec![0, 1, 1], vec![2], vec![FULL], vec![]), PatternError::ColOutOfRange { col: 2, k_blocks: 2, .. }));
    assert!(matches!(err(vec![0, 2, 2], vec![1, 1], vec![FULL; 2], vec![]), PatternError::ColNotIncreasing { row: 0, position: 1, .. }));
    assert!(matches!(err(vec![0, 1, 1], vec![0], vec![], vec![]), PatternError::MaskOfLength { got: 0, nnz: 1 }));
    assert!(matches!(err(vec![0, 1, 1], vec![0], vec![1], vec![0; 16]), PatternError::MaskOutOfRange { position: 0, offset: 1, words: 16, pool: 16 }));
    assert!(BlockPattern::new_checked(g, vec![0, 1, 1], vec![0], vec![0], vec![1; 16]).is_ok());
    // The message says what failed.
    assert!(err(vec![0, 2, 2], vec![1, 1], vec![FULL; 2], vec![]).to_string().contains("strictly increasing"));
}

#[test]
fn deserialising_checks_the_invariants_like_new_checked() {
    let shape = AttentionShape::new(1, 1, 70, 16);
    let p = Window::new(20).with_blocks(16, 16).build(&shape).unwrap();
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<BlockPattern>(&json).unwrap(), p);
    // A stored pattern edited by hand: a column past the grid, a row_ptr that decreases.
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["col_idx"][0] = 9.into();
    let err = serde_json::from_value::<BlockPattern>(v).unwrap_err().to_string();
    assert!(err.contains("col_idx[0] = 9") && err.contains("out of range"), "{err}");
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["row_ptr"][1] = 1000.into();
    let err = serde_json::from_value::<BlockPattern>(v).unwrap_err().to_string();
    assert!(err.contains("row_ptr decreases"), "{err}");
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["block_q"] = 0.into();
    let err = serde_json::from_value::<BlockPattern>(v).unwrap_err().to_string();
    assert!(err.contains("block_q = 0"), "{err}");
}

#[test]
fn the_accumulator_reports_malformed_blocks_instead_of_dropping_them() {
    use sparse_attn::pattern::{BlockMask, PatternAccumulator};
    let g = geom(32, 40); // 2 x 3 blocks, one mask word per block row (block_k 16)
    let build = |rows: Vec<Vec<(u32, BlockMask)>>| {
        let mut acc = PatternAccumulator::new(g).unwrap();
        for r in rows {
            acc.push_row(r);
        }
        acc.finish()
    };
    let ok = build(vec![vec![(0, BlockMask::Full), (2, BlockMask::Bits(vec![1; 16]))], vec![(1, BlockMask::Full)]]).unwrap();
    assert_eq!(ok.nnz(), 3);
    // A mask one word short would shift every later mask's offset.
    let err = build(vec![vec![(0, BlockMask::Bits(vec![1; 15]))], vec![(1, BlockMask::Full)]]).unwrap_err();
    assert!(matches!(err, PatternError::MaskWords { row: 0, col: 0, got: 15, expected: 16 }), "{err:?}");
    // A key block past the grid is an error, full or masked, not an empty block.
    for mask in [BlockMask::Full, BlockMask::Bits(vec![u32::MAX; 16])] {
        let err = build(vec![vec![(0, BlockMask::Full)], vec![(3, mask)]]).unwrap_err();
        assert!(matches!(err, PatternError::ColOutOfRange { row: 1, col: 3, k_blocks: 3, .. }), "{err:?}");
    }
}

#[test]
fn selected_slices_keep_their_masks() {
    let shape = AttentionShape::new(2, 3, 70, 16);
    let p = RandomBlocks::new(0.5, 11).with_partial(0.4).per_slice(true).with_blocks(16, 32).build(&shape).unwrap();
    let part = p.select_slices(2..5).unwrap();
    assert_eq!(part.slices(), 3);
    for s in 0..3 {
        assert_eq!(part.to_dense_mask(s), p.to_dense_mask(2 + s), "slice {}", 2 + s);
    }
    assert!(matches!(p.select_slices(5..7), Err(PatternError::ShapeMismatch(_))));
    assert!(matches!(p.select_slices(3..3), Err(PatternError::ShapeMismatch(_))));
    // A shared pattern stands for every slice.
    let shared = Window::new(9).with_blocks(16, 16).build(&shape).unwrap();
    assert_eq!(shared.select_slices(4..6).unwrap(), shared);
}

fn check_against(p: &BlockPattern, n: usize, m: usize, rule: impl Fn(i64, i64) -> bool) {
    let dense = p.to_dense_mask(0);
    for i in 0..n {
        for j in 0..m {
            assert_eq!(dense[[i, j]], rule(i as i64, j as i64), "({i}, {j})");
        }
        let keys: Vec<u32> = (0..m as u32).filter(|&j| rule(i as i64, j as i64)).collect();
        assert_eq!(p.row_keys(0, i), keys, "row_keys({i})");
    }
    assert_eq!(p.allowed_pairs(0), dense.iter().filter(|&&x| x).count() as u64);
}

#[test]
fn builders_follow_their_definitions() {
    for (n, m, bq, bk) in [(100, 100, 16, 32), (37, 90, 32, 16), (64, 64, 64, 64), (5, 5, 16, 16)] {
        let shape = AttentionShape::new(1, 1, n, 8).with_seq_kv(m);
        let off = m as i64 - n as i64;
        check_against(&Dense::new().with_blocks(bq, bk).build(&shape).unwrap(), n, m, |_, _| true);
        check_against(&Causal::new().with_blocks(bq, bk).build(&shape).unwrap(), n, m, |i, j| j <= i + off);
        check_against(&Window::new(11).with_blocks(bq, bk).build(&shape).unwrap(), n, m, |i, j| (j - i - off) >= -5 && (j - i - off) <= 5);
        check_against(&Window::new(8).with_blocks(bq, bk).build(&shape).unwrap(), n, m, |i, j| (j - i - off) >= -3 && (j - i - off) <= 4);
        check_against(&Window::causal(7).with_blocks(bq, bk).build(&shape).unwrap(), n, m, |i, j| (j - i - off) >= -6 && j - i - off <= 0);
        let (nn, mm) = (n as i64, m as i64);
        check_against(&GlobalTokens::new(2, 1).with_blocks(bq, bk).build(&shape).unwrap(), n, m, |i, j| i < 2 || i + 1 >= nn || j < 2 || j + 1 >= mm);
    }
}

#[test]
fn full_blocks_are_full_and_ragged_tails_are_masked() {
    let shape = AttentionShape::new(1, 1, 40, 8);
    let p = Dense::new().with_blocks(16, 16).build(&shape).unwrap();
    assert!(p.mask_of().iter().all(|&m| m == FULL), "dense blocks must be FULL (no mask work)");
    assert_eq!(p.nnz(), 9);
    assert_eq!(p.allowed_pairs(0), 40 * 40);
}

#[test]
fn window_memory_is_linear_in_sequence() {
    // seq 65 536 with block 64: a band of ~3 blocks per row, never an n×n structure.
    let shape = AttentionShape::new(1, 1, 65_536, 8);
    let p = Window::new(64).with_blocks(64, 64).build(&shape).unwrap();
    assert!(p.nnz() <= 3 * 1024, "nnz {}", p.nnz());
    assert!(p.masks().len() <= 2 * 3 * 1024 * 64 * 2);
}

fn random(seed: u64, slices: bool) -> BlockPattern {
    let shape = AttentionShape::new(1, 2, 70, 8).with_seq_kv(50);
    RandomBlocks::new(0.5, seed).with_partial(0.6).per_slice(slices).with_blocks(16, 32).build(&shape).unwrap()
}

proptest! {
    #[test]
    fn union_and_intersection_match_dense_masks(a in 0u64..1000, b in 0u64..1000, sa: bool, sb: bool) {
        let (pa, pb) = (random(a, sa), random(b, sb));
        let (u, x) = (pa.union(&pb).unwrap(), pa.intersect(&pb).unwrap());
        for slice in 0..2 {
            let ma = pa.to_dense_mask(pa.pattern_slice(slice));
            let mb = pb.to_dense_mask(pb.pattern_slice(slice));
            prop_assert_eq!(u.to_dense_mask(u.pattern_slice(slice)), &ma | &mb);
            prop_assert_eq!(x.to_dense_mask(x.pattern_slice(slice)), &ma & &mb);
        }
        // O(nnz): the union stores at most the blocks of both (a shared slice counts per use).
        let per = |p: &BlockPattern| p.nnz() * (u.slices() / p.slices()) as usize;
        prop_assert!(u.nnz() <= per(&pa) + per(&pb));
    }
}

#[test]
fn combining_mismatched_patterns_is_an_error() {
    let a = Dense::new().with_blocks(16, 16).build(&AttentionShape::new(1, 1, 32, 8)).unwrap();
    let b = Dense::new().with_blocks(32, 16).build(&AttentionShape::new(1, 1, 32, 8)).unwrap();
    assert!(matches!(a.union(&b), Err(PatternError::Incompatible(_))));
}
