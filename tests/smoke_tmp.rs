mod common;
use sparse_attn::*;
#[test]
fn smoke() {
    let Some(e) = common::engine() else { return };
    let shape = AttentionShape::new(1, 2, 100, 32);
    let q = common::random4((1, 2, 100, 32), 1, 2.0);
    let k = common::random4((1, 2, 100, 32), 2, 2.0);
    let v = common::random4((1, 2, 100, 32), 3, 1.0);
    for p in [patterns::Dense::new().with_blocks(16,32).build(&shape).unwrap(), patterns::Window::new(20).build(&shape).unwrap(), patterns::RandomBlocks::new(0.5, 3).with_partial(0.5).with_blocks(16,16).build(&shape).unwrap()] {
      for n in [Normalizer::Softmax, Normalizer::ENTMAX15, Normalizer::Sparsemax, Normalizer::Entmax{alpha:1.2}] {
        let o = e.attention(&q, &k, &v, &p, n).unwrap();
        let r = reference::attention(&q, &k, &v, &p, n).unwrap();
        common::assert_close(&format!("{n:?}"), o.as_slice().unwrap(), r.as_slice().unwrap(), common::tolerance(DType::F32));
      }
    }
}
