//! The real-data loader on the shipped fixture (CPU only).

use sparse_attn::data::{default_data_path, fixture_path, AttentionData};
use sparse_attn::Error;

fn fixture() -> AttentionData {
    AttentionData::open(fixture_path()).expect("fixture opens")
}

#[test]
fn fixture_shape_and_ids() {
    let d = fixture();
    assert_eq!(d.path(), fixture_path().as_path());
    assert_eq!(d.texts(), &["gpl3".to_string(), "json_decoder_py".to_string()]);
    assert_eq!((d.layers(), d.heads(), d.seq(), d.head_dim()), (3, 4, 256, 32));
    assert_eq!(d.layer_ids(), &[0, 3, 5]);
    assert_eq!(d.head_ids(), &[0, 1, 2, 3]);
    assert!(d.metadata().get("model").is_some_and(|m| m.contains("MiniLM")));
}

#[test]
fn fixture_values_are_real() {
    let d = fixture();
    for text in d.texts() {
        let set = d.load(text).unwrap();
        assert_eq!(set.tokens.len(), 256);
        for (name, a) in [("q", &set.q), ("k", &set.k), ("v", &set.v)] {
            assert_eq!(a.shape(), &[3, 4, 256, 32], "{text}.{name}");
            assert!(a.iter().all(|x| x.is_finite()), "{text}.{name} has non-finite values");
            assert!(a.iter().any(|&x| x != 0.0), "{text}.{name} is all zero");
        }
        // Distinct tokens: real text, not padding.
        let mut t = set.tokens.clone();
        t.sort();
        t.dedup();
        assert!(t.len() > 20, "{text}: only {} distinct tokens", t.len());
    }
}

#[test]
fn layer_is_a_batch_one_slice_of_load() {
    let d = fixture();
    let set = d.load("gpl3").unwrap();
    for l in 0..d.layers() {
        let (q, k, v) = d.layer("gpl3", l).unwrap();
        assert_eq!(q.shape(), &[1, 4, 256, 32]);
        assert_eq!(q.index_axis(ndarray::Axis(0), 0), set.q.index_axis(ndarray::Axis(0), l));
        assert_eq!(k.index_axis(ndarray::Axis(0), 0), set.k.index_axis(ndarray::Axis(0), l));
        assert_eq!(v.index_axis(ndarray::Axis(0), 0), set.v.index_axis(ndarray::Axis(0), l));
    }
}

#[test]
fn unknown_text_and_layer_are_named() {
    let d = fixture();
    let e = d.load("nope").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Data(_)), "{msg}");
    assert!(msg.contains("nope") && msg.contains("gpl3") && msg.contains("json_decoder_py"), "{msg}");
    let e = d.layer("nope", 0).unwrap_err();
    assert!(matches!(e, Error::Data(_)), "{e}");

    let e = d.layer("gpl3", 3).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Data(_)), "{msg}");
    assert!(msg.contains("layer") && msg.contains("0..3"), "{msg}");
}

#[test]
fn missing_file_is_io_naming_the_path() {
    let path = std::env::temp_dir().join("sparse_attn_no_such_dir").join("missing.safetensors");
    match AttentionData::open(&path) {
        Err(e @ Error::Io { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("missing.safetensors"), "{msg}");
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn truncated_file_is_data_error() {
    let bytes = std::fs::read(fixture_path()).unwrap();
    let dir = std::env::temp_dir().join(format!("sparse_attn_data_test_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&str, &[u8]); 3] = [
        ("truncated.safetensors", &bytes[..bytes.len() / 2]),
        ("tiny.safetensors", &bytes[..4]),
        ("header_only.safetensors", &bytes[..1000]),
    ];
    for (name, content) in cases {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        match AttentionData::open(&path) {
            Err(e @ Error::Data(_)) => eprintln!("{name}: {e}"),
            other => panic!("{name}: expected Error::Data, got {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fixture_is_derived_from_the_full_file() {
    let full_path = default_data_path();
    if !full_path.exists() {
        eprintln!("skipping: full data file {} absent", full_path.display());
        return;
    }
    let full = AttentionData::open(&full_path).unwrap();
    assert_eq!((full.layers(), full.heads(), full.seq(), full.head_dim()), (6, 12, 512, 32));
    let d = fixture();
    let (fq, fk, fv) = d.layer("gpl3", 1).unwrap(); // original layer 3
    let (q, k, v) = full.layer("gpl3", 3).unwrap();
    for (name, small, big) in [("q", &fq, &q), ("k", &fk, &k), ("v", &fv, &v)] {
        let s = small.slice(ndarray::s![0, 2, .., ..]);
        let b = big.slice(ndarray::s![0, 2, ..256, ..]);
        assert_eq!(s, b, "{name}: fixture layer 3 head 2 differs from the full file");
    }
    let full_tokens = full.load("gpl3").unwrap().tokens;
    assert_eq!(d.load("gpl3").unwrap().tokens, full_tokens[..256]);
}
