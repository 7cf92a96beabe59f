//! End-to-end tests of the `attn-bench` binary on tiny problems: every subcommand runs, its JSON
//! is parsed back and checked, and bad input exits non-zero with a one-line message.
//!
//! GPU-dependent tests skip with a one-line reason when no adapter exists, except with CI=true,
//! where a missing adapter fails them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_attn-bench");

fn fixture() -> PathBuf {
    sparse_attn::data::fixture_path()
}

/// A fresh directory under the target's test scratch space.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("attn-bench-cli").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Whether a GPU adapter exists; without one, a failure under CI=true and a skip elsewhere.
fn gpu() -> bool {
    static AVAILABLE: OnceLock<Result<String, String>> = OnceLock::new();
    let r = AVAILABLE.get_or_init(|| sparse_attn::Engine::new().map(|e| e.adapter_info().name.clone()).map_err(|e| e.to_string()));
    match r {
        Ok(_) => true,
        Err(reason) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but no GPU adapter: {reason}");
            }
            eprintln!("skipping GPU CLI test: {reason}");
            false
        }
    }
}

fn run_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("SPARSE_ATTN_DATA").env("SPARSE_ATTN_AUTOTUNE", "0");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.output().expect("run attn-bench")
}

fn run(args: &[&str]) -> Output {
    run_in(None, args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "attn-bench {args:?} failed ({}):\nstdout: {}\nstderr: {}", out.status, text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// Runs with --json and parses stdout.
fn ok_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let stdout = ok(&a);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("attn-bench {args:?} --json printed invalid JSON ({e}):\n{stdout}"))
}

fn read_json(path: &Path) -> Value {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Expects exit code 2 and a single stderr line containing `needle`.
fn bad(args: &[&str], needle: &str) {
    let out = run(args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "attn-bench {args:?}: expected exit code 2, got {}; stderr: {err}", out.status);
    assert!(err.contains(needle), "attn-bench {args:?}: stderr lacks `{needle}`:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    if !needle.starts_with("error: invalid value") {
        assert_eq!(lines.len(), 1, "attn-bench {args:?}: expected a one-line error, got:\n{err}");
    }
    assert!(!err.contains("panicked"), "attn-bench {args:?} panicked:\n{err}");
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("expected a number, got {v}"))
}

fn check_provenance(p: &Value, device: &str) {
    for key in ["crate_version", "git_revision", "date_utc", "command_line", "dtype", "seed", "adapter", "limits", "features"] {
        assert!(p.get(key).is_some(), "provenance lacks `{key}`: {p}");
    }
    assert_eq!(p["crate_version"], env!("CARGO_PKG_VERSION"));
    assert!(!p["git_revision"].as_str().unwrap_or("").is_empty());
    assert!(p["date_utc"].as_str().unwrap_or("").ends_with('Z'));
    if device == "gpu" {
        assert!(!p["adapter"]["name"].as_str().unwrap_or("").is_empty(), "no adapter name in {p}");
        assert!(p["adapter"]["backend"].is_string() && p["adapter"]["driver"].is_string());
    }
}

fn per_head(report: &Value, key: &str) -> Vec<f64> {
    report["heads"].as_array().expect("heads").iter().map(|h| f(&h[key])).collect()
}

// ---------------------------------------------------------------------------------------------
// CPU-only

#[test]
fn help_documents_subcommands_and_flags() {
    let top = ok(&["--help"]);
    for sub in ["demo", "info", "quality", "pareto", "speed", "fit-sparsefinder"] {
        assert!(top.contains(sub), "--help lacks `{sub}`:\n{top}");
    }
    let quality = ok(&["quality", "--help"]);
    for flag in ["--data", "--text", "--layer", "--method", "--normalizer", "--device", "--out", "--dump-output", "--width", "--variant", "[default: entmax15]"] {
        assert!(quality.contains(flag), "quality --help lacks `{flag}`:\n{quality}");
    }
    let pareto = ok(&["pareto", "--help"]);
    for flag in ["--methods", "--texts", "--layers", "--sparsefinder-model", "--widths", "--max-cells"] {
        assert!(pareto.contains(flag), "pareto --help lacks `{flag}`");
    }
    let speed = ok(&["speed", "--help"]);
    for flag in ["--seqs", "--densities", "--methods", "--paths", "--dtypes", "256,512,1024 on a CPU adapter"] {
        assert!(speed.contains(flag), "speed --help lacks `{flag}`");
    }
}

#[test]
fn quality_on_the_cpu_reference() {
    let out = scratch("quality_cpu");
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let dense = ok_json(&["quality", "--data", fx, "--text", "json_decoder_py", "--layer", "5", "--method", "dense", "--device", "cpu", "--out", out.to_str().unwrap()]);
    check_provenance(&dense["provenance"], "cpu");
    assert!(per_head(&dense, "recall").iter().all(|&r| r == 1.0), "dense recall must be exactly 1");
    assert!(per_head(&dense, "output_error").iter().all(|&e| e < 1e-6), "dense on the reference is the reference");
    let support = per_head(&dense, "mean_support");
    let gold = per_head(&dense, "gold_mean_support");
    for (s, g) in support.iter().zip(&gold) {
        assert!((s - g).abs() < 1e-9, "dense entmax-1.5 support {s} must equal the gold support {g}");
    }
    assert!(out.join("metrics.json").exists());
}

#[test]
fn bad_input_is_a_one_line_error_with_exit_code_2() {
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let dir = scratch("bad_input");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    let garbage = garbage.to_str().unwrap();
    let out = dir.to_str().unwrap();
    bad(&["quality", "--data", "/nonexistent/qkv.safetensors", "--out", out], "not found");
    bad(&["quality", "--data", garbage, "--out", out], "not a valid safetensors file");
    bad(&["quality", "--data", fx, "--text", "nope", "--out", out], "unknown text `nope`");
    bad(&["quality", "--data", fx, "--layer", "4", "--out", out], "unknown layer 4");
    bad(&["quality", "--data", fx, "--method", "window", "--variant", "distance", "--out", out], "--variant does not apply to --method window");
    bad(&["quality", "--data", fx, "--method", "dense", "--width", "8", "--out", out], "--width does not apply to --method dense");
    bad(&["quality", "--data", fx, "--method", "sparsefinder", "--variant", "quantization", "--recall", "0.9", "--out", out], "--recall does not apply to --variant quantization");
    bad(&["quality", "--data", fx, "--normalizer", "entmax:3", "--out", out], "alpha must lie in (1, 2]");
    bad(&["quality", "--data", fx, "--block", "48", "--out", out], "power of two");
    bad(&["quality", "--data", fx, "--method", "sparsefinder", "--model", "/nonexistent/model.json", "--out", out], "sparsefinder model");
    bad(&["pareto", "--data", fx, "--methods", "dense", "--widths", "8", "--out", out], "--widths applies to method window");
    bad(&["pareto", "--data", fx, "--methods", "window,bogus", "--out", out], "unknown method `bogus`");
    bad(&["pareto", "--data", fx, "--layers", "0,2", "--out", out], "unknown layer 2");
    bad(&["pareto", "--data", fx, "--max-cells", "3", "--out", out], "sweep too big");
    bad(&["fit-sparsefinder", "--data", fx, "--texts", "gpl3,nope", "--out", out], "unknown text `nope`");
    bad(&["quality", "--method", "bogus"], "error: invalid value");
}

// ---------------------------------------------------------------------------------------------
// GPU

#[test]
fn info_lists_adapters() {
    if !gpu() {
        return;
    }
    let human = ok(&["info"]);
    assert!(human.contains("adapters") && human.contains("limits"), "{human}");
    let j = ok_json(&["info"]);
    assert!(!j["adapters"].as_array().expect("adapters").is_empty());
    assert!(j["engine"]["adapter"]["name"].is_string());
    assert!(j["engine"]["limits"]["max_storage_buffer_binding_size"].as_u64().unwrap() > 0);
    check_provenance(&j["provenance"], "gpu");
}

#[test]
fn demo_without_arguments_prints_the_entmax_row_and_writes_its_report() {
    if !gpu() {
        return;
    }
    let dir = scratch("demo");
    let out = run_in(Some(&dir), &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "demo failed: {stdout}\n{}", text(&out.stderr));
    for needle in ["softmax", "entmax15", "dense", "window(width=64)", "max_abs_err", "support/query", "report:"] {
        assert!(stdout.contains(needle), "demo output lacks `{needle}`:\n{stdout}");
    }
    let report = read_json(&dir.join("target/attn-bench/demo/report.json"));
    check_provenance(&report["provenance"], "gpu");
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4, "softmax and entmax15 x dense and window");
    for r in rows {
        assert!(f(&r["max_abs_error_vs_reference"]) < 1e-4, "GPU vs CPU reference: {r}");
        assert!(f(&r["attention_ms"]) > 0.0);
        let recall = f(&r["recall"]);
        if r["method"] == "dense" {
            assert_eq!(recall, 1.0, "{r}");
        } else {
            assert!(recall < 1.0, "{r}");
        }
        if r["normalizer"] == "entmax15" {
            assert!(f(&r["mean_support"]) >= 1.0, "entmax rows report the support: {r}");
        }
    }
}

#[test]
fn quality_dense_and_window_on_the_fixture() {
    if !gpu() {
        return;
    }
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let out = scratch("quality_gpu");
    let o = out.to_str().unwrap();
    let dense = ok_json(&["quality", "--data", fx, "--text", "gpl3", "--layer", "3", "--method", "dense", "--out", o, "--dump-output", "--repeats", "1"]);
    check_provenance(&dense["provenance"], "gpu");
    assert!(per_head(&dense, "recall").iter().all(|&r| r == 1.0), "dense recall must be exactly 1: {}", dense["heads"]);
    assert!(per_head(&dense, "element_sparsity").iter().all(|&s| s == 0.0));
    assert!(per_head(&dense, "output_error").iter().all(|&e| e < 1e-4));
    assert!(f(&dense["summary"]["max_abs_error_vs_reference"]) < 1e-4);
    // metrics.json holds the same report; output.safetensors holds o [heads, seq, head_dim].
    let metrics = read_json(&out.join("metrics.json"));
    assert_eq!(metrics["heads"].as_array().unwrap().len(), 4);
    let bytes = std::fs::read(out.join("output.safetensors")).expect("output.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let o_t = st.tensor("o").expect("tensor o");
    assert_eq!(o_t.shape(), &[4, 256, 32]);
    assert_eq!(o_t.dtype(), safetensors::Dtype::F32);

    let window = ok_json(&["quality", "--data", fx, "--text", "gpl3", "--layer", "3", "--method", "window", "--width", "32", "--out", o, "--repeats", "1"]);
    let recalls = per_head(&window, "recall");
    assert!(recalls.iter().all(|r| (0.0..=1.0).contains(r)), "{recalls:?}");
    assert!(f(&window["summary"]["recall"]) < 1.0, "a 32-token window misses part of the entmax support");
    assert!(per_head(&window, "element_sparsity").iter().all(|&s| s > 0.5 && s < 1.0));
    assert!(per_head(&window, "output_error").iter().all(|&e| e > 0.0 && e.is_finite()));
    assert_eq!(window["config"]["method"], "window");
    assert_eq!(window["config"]["value"], "32");
}

#[test]
fn pareto_on_the_fixture_writes_csv_json_and_svg() {
    if !gpu() {
        return;
    }
    let fx = fixture();
    let out = scratch("pareto");
    let j = ok_json(&[
        "pareto", "--data", fx.to_str().unwrap(), "--texts", "gpl3", "--layers", "0,5", "--methods", "window", "--widths", "16,64", "--out", out.to_str().unwrap(),
    ]);
    check_provenance(&j["provenance"], "gpu");
    let rows = j["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3, "dense + two widths");
    for r in rows {
        let recall = f(&r["recall"]);
        assert!((0.0..=1.0).contains(&recall), "{r}");
        assert!((0.0..=1.0).contains(&f(&r["element_sparsity"])) && (0.0..=1.0).contains(&f(&r["block_sparsity"])));
        if r["method"] == "dense" {
            assert_eq!(recall, 1.0);
        } else {
            assert!(recall < 1.0, "window recall below 1 on the fixture: {r}");
        }
    }
    let w16 = rows.iter().find(|r| r["value"] == "16").unwrap();
    let w64 = rows.iter().find(|r| r["value"] == "64").unwrap();
    assert!(f(&w64["recall"]) > f(&w16["recall"]) && f(&w64["element_sparsity"]) < f(&w16["element_sparsity"]));

    let csv = std::fs::read_to_string(out.join("pareto.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(header.starts_with("method,variant,knob,value,recall,element_sparsity,block_sparsity,output_error,build_ms,attention_ms"), "{header}");
    assert_eq!(csv.lines().count(), 4);
    let full = read_json(&out.join("pareto.json"));
    assert_eq!(full["cells"].as_array().unwrap().len(), 2 * 3);
    for svg in ["pareto.svg", "recall_vs_element_sparsity.svg", "recall_vs_block_sparsity.svg", "error_vs_sparsity.svg"] {
        let s = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(s.starts_with("<svg") && s.contains("provenance") && s.contains("window") && s.contains("recall"), "{svg}");
    }
}

#[test]
fn speed_on_a_tiny_sweep() {
    if !gpu() {
        return;
    }
    let out = scratch("speed");
    let j = ok_json(&[
        "speed", "--seqs", "64,128", "--densities", "1,0.5", "--methods", "random,window", "--heads", "2", "--head-dim", "32", "--dtypes", "f32",
        "--paths", "fused,three-kernel", "--warmup", "0", "--repeats", "1", "--score-std", "1.5", "--out", out.to_str().unwrap(),
    ]);
    check_provenance(&j["provenance"], "gpu");
    assert_eq!(f(&read_json(&out.join("speed.json"))["config"]["score_std"]), 1.5);
    let rows = j["rows"].as_array().expect("rows");
    // 2 seqs x (dense + 2 methods) x 2 normalizers x 1 dtype x 2 paths.
    assert_eq!(rows.len(), 2 * 3 * 2 * 2);
    let mut ran = 0;
    for r in rows {
        match r["status"].as_str().unwrap() {
            "ok" => {
                ran += 1;
                assert!(f(&r["attention_ms"]) > 0.0 && f(&r["gflops"]) > 0.0, "{r}");
                // Fused entmax cells report which branches their tiles took (every tile ends once).
                let paths = &r["entmax_paths"];
                if r["path"] == "fused" && r["normalizer"] != "softmax" {
                    let ends: f64 = ["cache_gathered", "cache_staged", "pool_gathered", "pool_recomputed"].iter().map(|k| f(&paths[*k])).sum();
                    assert!(ends > 0.0, "{r}");
                } else {
                    assert!(paths.is_null(), "{r}");
                }
            }
            "skipped" => assert!(r["reason"].is_string(), "a skipped cell says why: {r}"),
            other => panic!("cell status {other}: {r}"),
        }
        let d = f(&r["density"]);
        assert!(d > 0.0 && d <= 1.0);
        if r["method"] == "dense" {
            assert_eq!(d, 1.0);
        }
    }
    assert!(ran > 0);
    let csv = std::fs::read_to_string(out.join("speed.csv")).unwrap();
    assert!(csv.starts_with("method,path,normalizer,dtype,seq,heads,head_dim,block,density,build_ms,attention_ms,gflops"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + rows.len());
    for (svg, axis) in [("speed.svg", "sequence length"), ("speed_vs_seq.svg", "sequence length"), ("speed_vs_density.svg", "block density")] {
        let s = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(s.starts_with("<svg") && s.contains("provenance") && s.contains(axis), "{svg}");
    }
    // Asking for more than the adapter allows names the limit.
    bad(&["speed", "--seqs", "100000000", "--out", out.to_str().unwrap()], "sweep too big");
    bad(&["speed", "--max-cells", "5", "--out", out.to_str().unwrap()], "exceed --max-cells 5");
    bad(&["speed", "--score-std=0", "--out", out.to_str().unwrap()], "--score-std must be finite and > 0");
}

#[test]
fn fit_sparsefinder_then_use_the_model() {
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let dir = scratch("sparsefinder");
    let model = dir.join("sf.json");
    let fit = ok_json(&["fit-sparsefinder", "--data", fx, "--texts", "json_decoder_py", "--epochs", "1", "--out", model.to_str().unwrap()]);
    assert!(model.exists(), "{fit}");
    assert_eq!(fit["layers"], 3);
    // Quality with the fitted model on the held-out text (CPU reference: no GPU needed).
    let q = ok_json(&[
        "quality", "--data", fx, "--text", "gpl3", "--layer", "0", "--method", "sparsefinder", "--variant", "distance", "--recall", "0.9",
        "--model", model.to_str().unwrap(), "--device", "cpu", "--out", dir.to_str().unwrap(),
    ]);
    let recalls = per_head(&q, "recall");
    assert!(recalls.iter().all(|r| (0.0..=1.0).contains(r)), "{recalls:?}");
    assert_eq!(q["config"]["variant"], "distance");
    if gpu() {
        let p = ok_json(&[
            "pareto", "--data", fx, "--texts", "gpl3", "--layers", "0", "--methods", "window,sparsefinder", "--widths", "32", "--variants",
            "distance,quantization", "--recalls", "0.9", "--bucket-sizes", "16", "--sparsefinder-model", model.to_str().unwrap(), "--out",
            dir.join("pareto").to_str().unwrap(),
        ]);
        let rows = p["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 4, "dense, window, sparsefinder distance and quantization");
        assert!(rows.iter().all(|r| (0.0..=1.0).contains(&f(&r["recall"]))));
    }
}

// ---------------------------------------------------------------------------------------------
// SBM and top-k (CPU reference: no adapter needed)

fn recall_in_unit_interval(report: &Value) {
    let recalls = per_head(report, "recall");
    assert!(!recalls.is_empty() && recalls.iter().all(|r| (0.0..=1.0).contains(r)), "{recalls:?}");
    let r = f(&report["summary"]["recall"]);
    assert!((0.0..=1.0).contains(&r), "summary recall {r}");
    assert!(f(&report["summary"]["build_ms"]) >= 0.0);
}

#[test]
fn quality_sbm_and_topk_on_the_fixture() {
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let out = scratch("quality_sbm_topk");
    let o = out.to_str().unwrap();
    let common = ["quality", "--data", fx, "--text", "gpl3", "--layer", "0", "--device", "cpu", "--out", o];

    let sbm = ok_json(&[&common[..], &["--method", "sbm", "--edges-per-query", "16", "--clusters", "8", "--seed", "3"]].concat());
    let metrics = read_json(&out.join("metrics.json"));
    recall_in_unit_interval(&metrics);
    assert_eq!(metrics["config"]["method"], "sbm");
    assert_eq!(metrics["config"]["knob"], "edges_per_query");
    assert_eq!(metrics["config"]["value"], "16");
    assert!(per_head(&metrics, "element_sparsity").iter().all(|&s| s > 0.0 && s < 1.0));
    // Seeded: the same command gives the same pattern.
    let again = ok_json(&[&common[..], &["--method", "sbm", "--edges-per-query", "16", "--clusters", "8", "--seed", "3"]].concat());
    assert_eq!(per_head(&sbm, "element_sparsity"), per_head(&again, "element_sparsity"));

    ok_json(&[&common[..], &["--method", "topk", "--k", "16", "--window", "5", "--first", "2", "--last", "0"]].concat());
    let metrics = read_json(&out.join("metrics.json"));
    recall_in_unit_interval(&metrics);
    assert_eq!(metrics["config"]["method"], "topk");
    assert_eq!(metrics["config"]["knob"], "k");
    assert_eq!(metrics["config"]["value"], "16");
    assert!(per_head(&metrics, "element_sparsity").iter().all(|&s| s > 0.5 && s < 1.0));
}

#[test]
fn sbm_and_topk_flags_for_the_wrong_method_are_errors() {
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let dir = scratch("bad_sbm_topk");
    let out = dir.to_str().unwrap();
    bad(&["quality", "--data", fx, "--method", "sbm", "--k", "8", "--out", out], "--k does not apply to --method sbm");
    bad(&["quality", "--data", fx, "--method", "topk", "--edges-per-query", "8", "--out", out], "--edges-per-query does not apply to --method topk");
    bad(&["quality", "--data", fx, "--method", "window", "--scorer", "s.json", "--out", out], "--scorer does not apply to --method window");
    bad(&["quality", "--data", fx, "--method", "sbm", "--edges-per-query", "8", "--density-scale", "1", "--out", out], "alternatives");
    bad(&["quality", "--data", fx, "--method", "sbm", "--sbm-model", "/nonexistent/sbm.safetensors", "--out", out], "sbm model");
    bad(&["pareto", "--data", fx, "--methods", "window", "--sbm-edges", "8", "--out", out], "--sbm-edges applies to method sbm");
    bad(&["pareto", "--data", fx, "--methods", "sbm", "--topk-ks", "8", "--out", out], "--topk-ks applies to method topk");
    for (sub, flags) in [("quality", &["--edges-per-query", "--density-scale", "--sbm-model", "--k", "--window", "--scorer"][..]), ("pareto", &["--sbm-edges", "--topk-ks", "--sbm-model", "--topk-scorer"][..])] {
        let help = ok(&[sub, "--help"]);
        for flag in flags {
            assert!(help.contains(flag), "{sub} --help lacks `{flag}`");
        }
    }
}

#[test]
fn pareto_sweeps_sbm_density_and_topk_k() {
    let fx = fixture();
    let out = scratch("pareto_sbm_topk");
    let j = ok_json(&[
        "pareto", "--data", fx.to_str().unwrap(), "--texts", "gpl3", "--layers", "0", "--methods", "sbm,topk", "--sbm-edges", "8,64",
        "--topk-ks", "8,64", "--device", "cpu", "--out", out.to_str().unwrap(),
    ]);
    let rows = j["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 5, "dense + two sbm densities + two k");
    for r in rows {
        assert!((0.0..=1.0).contains(&f(&r["recall"])), "{r}");
    }
    for (method, knob) in [("sbm", "edges_per_query"), ("topk", "k")] {
        let lo = rows.iter().find(|r| r["method"] == method && r["value"] == "8").unwrap_or_else(|| panic!("{method} 8"));
        let hi = rows.iter().find(|r| r["method"] == method && r["value"] == "64").unwrap_or_else(|| panic!("{method} 64"));
        assert_eq!(lo["knob"], knob);
        assert!(f(&hi["element_sparsity"]) < f(&lo["element_sparsity"]), "{method}: more edges/keys, less sparsity");
        assert!(f(&hi["recall"]) >= f(&lo["recall"]), "{method}: more edges/keys, no less recall");
    }
}

#[test]
fn quality_lowrank_pattern_and_full_row_on_the_fixture() {
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let out = scratch("quality_lowrank");
    let o = out.to_str().unwrap();
    let common = ["quality", "--data", fx, "--text", "gpl3", "--layer", "0", "--device", "cpu", "--out", o];

    // No --lowrank-model: fitted on the fixture's other text, cached under --out.
    ok_json(&[&common[..], &["--method", "lowrank-pattern", "--rank", "8", "--subset", "32", "--density", "0.25"]].concat());
    let metrics = read_json(&out.join("metrics.json"));
    recall_in_unit_interval(&metrics);
    assert_eq!(metrics["config"]["method"], "lowrank-pattern");
    assert_eq!(metrics["config"]["knob"], "density");
    assert_eq!(metrics["config"]["value"], "0.25");
    let fit = &metrics["config"]["lowrank_model"];
    assert_eq!(fit["source"], "fitted", "{fit}");
    let fit0 = &fit["fits"][0];
    assert_eq!(fit0["evaluated_text"], "gpl3");
    let on: Vec<&str> = fit0["fitted_on_texts"].as_array().expect("fitted_on_texts").iter().map(|t| t.as_str().unwrap()).collect();
    assert!(!on.is_empty() && !on.contains(&"gpl3"), "fitted on the evaluated text: {on:?}");
    let cache = PathBuf::from(fit0["cache_file"].as_str().expect("cache_file"));
    assert!(cache.exists() && cache.starts_with(&out), "cache {}", cache.display());
    // 256 tokens at block 32: 8 key blocks, density 0.25 keeps 2 per row.
    assert!(per_head(&metrics, "block_sparsity").iter().all(|&s| (s - 0.75).abs() < 1e-9), "{metrics}");

    // Full-row reconstruction reuses the cached fit (same rank).
    ok_json(&[&common[..], &["--method", "lowrank", "--rank", "8", "--subset", "32"]].concat());
    let metrics = read_json(&out.join("metrics.json"));
    recall_in_unit_interval(&metrics);
    assert_eq!(metrics["config"]["method"], "lowrank");
    assert_eq!(metrics["config"]["lowrank_model"]["fits"][0]["loaded_from_cache"], true);
    assert!(per_head(&metrics, "element_sparsity").iter().all(|&s| (s - (1.0 - 32.0 / 256.0)).abs() < 1e-9));
    assert!(per_head(&metrics, "output_error").iter().all(|e| e.is_finite()));
}

#[test]
fn lowrank_flags_for_the_wrong_method_are_errors() {
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let dir = scratch("bad_lowrank");
    let out = dir.to_str().unwrap();
    bad(&["quality", "--data", fx, "--method", "window", "--rank", "8", "--out", out], "--rank does not apply to --method window");
    bad(&["quality", "--data", fx, "--method", "lowrank", "--density", "0.25", "--out", out], "--density does not apply to --method lowrank");
    bad(&["quality", "--data", fx, "--method", "lowrank", "--rank", "16", "--subset", "8", "--out", out], "--subset 8 must be at least --rank 16");
    bad(&["pareto", "--data", fx, "--methods", "lowrank", "--lowrank-densities", "0.5", "--out", out], "--lowrank-densities applies to method lowrank-pattern");
    bad(&["pareto", "--data", fx, "--methods", "window", "--lowrank-ranks", "8", "--out", out], "--lowrank-ranks applies to method lowrank");
    bad(&["quality", "--data", fx, "--method", "lowrank", "--lowrank-model", "/nonexistent/lr.safetensors", "--out", out], "lowrank model");
}

#[test]
fn pareto_sweeps_lowrank_rank_subset_and_density() {
    let fx = fixture();
    let out = scratch("pareto_lowrank");
    let j = ok_json(&[
        "pareto", "--data", fx.to_str().unwrap(), "--texts", "gpl3", "--layers", "0", "--methods", "lowrank,lowrank-pattern", "--lowrank-ranks", "8",
        "--lowrank-subsets", "32,64", "--lowrank-densities", "0.25,0.5", "--device", "cpu", "--out", out.to_str().unwrap(),
    ]);
    let rows = j["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1 + 2 + 4, "dense + 2 (rank, subset) + 2 x 2 densities");
    for r in rows {
        assert!((0.0..=1.0).contains(&f(&r["recall"])), "{r}");
    }
    let lo = rows.iter().find(|r| r["method"] == "lowrank-pattern" && r["variant"] == "r8-m64" && r["value"] == "0.25").expect("d=0.25");
    let hi = rows.iter().find(|r| r["method"] == "lowrank-pattern" && r["variant"] == "r8-m64" && r["value"] == "0.5").expect("d=0.5");
    assert!(f(&hi["recall"]) >= f(&lo["recall"]), "denser pattern, no less recall");
    assert_eq!(j["config"]["lowrank_model"]["source"], "fitted");
}

#[test]
fn quality_lowrank_on_the_gpu_matches_its_cpu_reference() {
    if !gpu() {
        return;
    }
    let fx = fixture();
    let out = scratch("quality_lowrank_gpu");
    ok_json(&[
        "quality", "--data", fx.to_str().unwrap(), "--text", "gpl3", "--layer", "0", "--method", "lowrank", "--rank", "8", "--subset", "32",
        "--repeats", "1", "--out", out.to_str().unwrap(),
    ]);
    let metrics = read_json(&out.join("metrics.json"));
    recall_in_unit_interval(&metrics);
    let err = f(&metrics["summary"]["max_abs_error_vs_reference"]);
    assert!(err < 1e-3, "GPU low-rank vs CPU reference: {err}");
}

// ---------------------------------------------------------------------------------------------
// MRA

/// `quality --method mra` in both modes at the same budget (softmax, so MRA-2 applies): same
/// pattern (recall, sparsity), and MRA-2's merged coarse remainder brings the output no further
/// from exact dense attention than dropping it (MRA-2-s). On the CPU reference, and on the GPU
/// where there is one (which must agree with the reference).
#[test]
fn quality_mra_full_and_sparse_on_the_fixture() {
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let mut devices = vec!["cpu"];
    if gpu() {
        devices.push("gpu");
    }
    for device in devices {
        let mut errors = Vec::new();
        let mut recalls = Vec::new();
        for mode in ["full", "sparse"] {
            let out = scratch(&format!("quality_mra_{device}_{mode}"));
            ok_json(&[
                "quality", "--data", fx, "--text", "gpl3", "--layer", "0", "--method", "mra", "--mode", mode, "--blocks-per-row", "2",
                "--normalizer", "softmax", "--device", device, "--repeats", "1", "--out", out.to_str().unwrap(),
            ]);
            let metrics = read_json(&out.join("metrics.json"));
            recall_in_unit_interval(&metrics);
            assert_eq!(metrics["config"]["method"], "mra");
            assert_eq!(metrics["config"]["variant"], mode);
            assert_eq!(metrics["config"]["knob"], "blocks_per_row");
            assert_eq!(metrics["config"]["value"], "2");
            let sp = f(&metrics["summary"]["block_sparsity"]);
            assert!(sp > 0.0 && sp < 1.0, "{device} {mode}: block sparsity {sp}");
            if device == "gpu" {
                let e = f(&metrics["summary"]["max_abs_error_vs_reference"]);
                assert!(e < 1e-4, "{device} {mode}: GPU vs MRA reference {e}");
            }
            errors.push(f(&metrics["summary"]["output_error"]));
            recalls.push(per_head(&metrics, "recall"));
        }
        assert_eq!(recalls[0], recalls[1], "{device}: the modes share the pattern");
        assert!(errors[0] <= errors[1], "{device}: MRA-2 output error {} > MRA-2-s {}", errors[0], errors[1]);
    }
}

#[test]
fn mra_full_with_entmax_and_wrong_method_flags_are_errors() {
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let dir = scratch("bad_mra");
    let out = dir.to_str().unwrap();
    bad(&["quality", "--data", fx, "--method", "mra", "--mode", "full", "--normalizer", "entmax15", "--out", out], "--mode sparse");
    bad(&["quality", "--data", fx, "--method", "mra", "--mode", "full", "--normalizer", "entmax15", "--device", "cpu", "--out", out], "--normalizer softmax");
    bad(&["pareto", "--data", fx, "--methods", "mra", "--mra-modes", "full", "--normalizer", "sparsemax", "--out", out], "--mode sparse");
    bad(&["quality", "--data", fx, "--method", "window", "--blocks-per-row", "4", "--out", out], "--blocks-per-row does not apply to --method window");
    bad(&["quality", "--data", fx, "--method", "window", "--mode", "sparse", "--out", out], "--mode does not apply to --method window");
    bad(&["quality", "--data", fx, "--method", "mra", "--width", "8", "--out", out], "--width does not apply to --method mra");
    bad(&["quality", "--data", fx, "--method", "mra", "--blocks-per-row", "0", "--out", out], "--blocks-per-row must be at least 1");
    bad(&["pareto", "--data", fx, "--methods", "window", "--mra-blocks-per-row", "1,2", "--out", out], "--mra-blocks-per-row applies to method mra");
    bad(&["speed", "--methods", "random", "--mra-modes", "full", "--seqs", "64", "--out", out], "--mra-modes applies to method mra");
    for (sub, flags) in [("quality", &["--mode", "--blocks-per-row"][..]), ("pareto", &["--mra-blocks-per-row", "--mra-modes"][..]), ("speed", &["--mra-modes"][..])] {
        let help = ok(&[sub, "--help"]);
        for flag in flags {
            assert!(help.contains(flag), "{sub} --help lacks `{flag}`");
        }
    }
}

/// The pareto sweep of the MRA budget (CPU reference, softmax: both modes): recall grows with
/// the budget, and at each budget MRA-2's error is at most MRA-2-s's.
#[test]
fn pareto_sweeps_mra_blocks_per_row() {
    let fx = fixture();
    let out = scratch("pareto_mra");
    let j = ok_json(&[
        "pareto", "--data", fx.to_str().unwrap(), "--texts", "gpl3", "--layers", "0", "--methods", "mra", "--mra-blocks-per-row", "1,4",
        "--normalizer", "softmax", "--device", "cpu", "--out", out.to_str().unwrap(),
    ]);
    let rows = j["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 5, "dense + two budgets x two modes: {rows:?}");
    let get = |variant: &str, value: &str| rows.iter().find(|r| r["method"] == "mra" && r["variant"] == variant && r["value"] == value).unwrap_or_else(|| panic!("mra {variant} {value}"));
    for r in rows {
        assert!((0.0..=1.0).contains(&f(&r["recall"])), "{r}");
    }
    for variant in ["full", "sparse"] {
        assert!(f(&get(variant, "4")["recall"]) >= f(&get(variant, "1")["recall"]), "{variant}: larger budget, no less recall");
    }
    for value in ["1", "4"] {
        assert!(f(&get("full", value)["output_error"]) <= f(&get("sparse", value)["output_error"]), "budget {value}: MRA-2 error above MRA-2-s");
    }
    // The default normaliser (entmax15) sweeps the sparse mode only.
    let j = ok_json(&[
        "pareto", "--data", fx.to_str().unwrap(), "--texts", "gpl3", "--layers", "0", "--methods", "mra", "--mra-blocks-per-row", "2",
        "--no-dense", "--device", "cpu", "--out", out.to_str().unwrap(),
    ]);
    let rows = j["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["variant"], "sparse");
}

#[test]
fn speed_times_mra_build_and_attention_separately() {
    if !gpu() {
        return;
    }
    let out = scratch("speed_mra");
    let j = ok_json(&[
        "speed", "--methods", "mra", "--seqs", "128", "--densities", "0.25", "--normalizers", "softmax,entmax15", "--dtypes", "f32", "--paths",
        "fused", "--heads", "2", "--repeats", "1", "--warmup", "0", "--out", out.to_str().unwrap(),
    ]);
    let rows = j["rows"].as_array().expect("rows");
    let mra: Vec<&Value> = rows.iter().filter(|r| r["method"] == "mra").collect();
    assert_eq!(mra.len(), 4, "two modes x two normalisers: {rows:?}");
    for r in &mra {
        let full = r["label"].as_str().unwrap().starts_with("mra-full");
        if full && r["normalizer"] != "softmax" {
            assert_eq!(r["status"], "skipped", "{r}");
        } else {
            assert_eq!(r["status"], "ok", "{r}");
            assert!(f(&r["build_ms"]) > 0.0 && f(&r["attention_ms"]) > 0.0, "{r}");
            assert!(f(&r["density"]) > 0.0 && f(&r["density"]) < 1.0, "{r}");
        }
    }
}
