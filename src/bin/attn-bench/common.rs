//! Shared plumbing of the subcommands: errors and exit codes, provenance, output files,
//! progress bars, list parsing and small text helpers.

use serde::Serialize;
use serde_json::{json, Value};
use sparse_attn::Engine;
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// An error the binary reports as one line. `Input` (bad flags, files, sizes) exits with 2,
/// `Runtime` (no adapter, GPU failure, I/O while writing results) with 1.
#[derive(Debug)]
pub enum BenchError {
    Input(String),
    Runtime(String),
}

impl BenchError {
    pub fn input(msg: impl Into<String>) -> Self {
        BenchError::Input(msg.into())
    }
    pub fn runtime(msg: impl Into<String>) -> Self {
        BenchError::Runtime(msg.into())
    }
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Input(_) => 2,
            BenchError::Runtime(_) => 1,
        }
    }
    /// Prefixes the message with context (`"text gpl3, layer 3: ..."`).
    pub fn context(self, what: impl fmt::Display) -> Self {
        match self {
            BenchError::Input(m) => BenchError::Input(format!("{what}: {m}")),
            BenchError::Runtime(m) => BenchError::Runtime(format!("{what}: {m}")),
        }
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = match self {
            BenchError::Input(m) | BenchError::Runtime(m) => m,
        };
        // Always one line: wgpu and I/O errors may span several.
        let one: Vec<&str> = m.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        f.write_str(&one.join("; "))
    }
}

impl std::error::Error for BenchError {}

impl From<sparse_attn::Error> for BenchError {
    fn from(e: sparse_attn::Error) -> Self {
        use sparse_attn::Error as E;
        match &e {
            E::NoAdapter(_) | E::RequestDevice(_) | E::Gpu(_) => BenchError::Runtime(e.to_string()),
            _ => BenchError::Input(e.to_string()),
        }
    }
}

impl From<std::io::Error> for BenchError {
    fn from(e: std::io::Error) -> Self {
        BenchError::Runtime(format!("I/O error: {e}"))
    }
}

pub type BResult<T> = Result<T, BenchError>;

/// Flags every subcommand understands.
#[derive(Clone, Debug, Default)]
pub struct Globals {
    pub quiet: bool,
    pub json: bool,
    pub adapter: Option<String>,
}

impl Globals {
    /// Whether human-readable text goes to stdout (not with `--quiet` or `--json`).
    pub fn human(&self) -> bool {
        !self.quiet && !self.json
    }
    /// Creates the engine (`--adapter`, else `SPARSE_ATTN_ADAPTER`, else the best adapter).
    pub fn engine(&self) -> BResult<Engine> {
        let e = match &self.adapter {
            Some(a) => Engine::with_adapter(Some(a)),
            None => Engine::new(),
        };
        e.map_err(BenchError::from)
    }
    /// Prints `summary` as JSON on stdout when `--json` was given.
    pub fn print_json(&self, summary: &Value) -> BResult<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(summary).map_err(|e| BenchError::runtime(e.to_string()))?);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Provenance

/// The git revision of the crate's checkout at run time (`unknown` when git or the checkout is
/// missing), with `-dirty` when the working tree has changes.
pub fn git_revision() -> (String, Option<bool>) {
    let dir = env!("CARGO_MANIFEST_DIR");
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) if !rev.is_empty() => {
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
            (rev, dirty)
        }
        _ => ("unknown".into(), None),
    }
}

/// UTC date-time as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, no date crate).
pub fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The command line, shell-quoted where needed.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Adapter facts of an engine, for provenance and `info`.
pub fn adapter_json(info: &wgpu::AdapterInfo) -> Value {
    json!({
        "name": info.name,
        "backend": info.backend.to_str(),
        "device_type": format!("{:?}", info.device_type),
        "driver": info.driver,
        "driver_info": info.driver_info,
        "vendor": format!("{:#06x}", info.vendor),
        "device": format!("{:#06x}", info.device),
    })
}

/// The limits the planner and kernels rely on.
pub fn limits_json(l: &wgpu::Limits) -> Value {
    json!({
        "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
        "max_buffer_size": l.max_buffer_size,
        "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
        "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
        "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
        "max_compute_workgroup_size_x": l.max_compute_workgroup_size_x,
        "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
        "min_storage_buffer_offset_alignment": l.min_storage_buffer_offset_alignment,
        "max_uniform_buffer_binding_size": l.max_uniform_buffer_binding_size,
    })
}

pub fn feature_names(f: wgpu::Features) -> Vec<String> {
    f.iter_names().map(|(name, _)| name.to_string()).collect()
}

/// What every result file records about how it was produced.
#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    pub tool: &'static str,
    pub crate_version: &'static str,
    pub git_revision: String,
    pub git_dirty: Option<bool>,
    pub date_utc: String,
    pub command_line: String,
    /// `gpu` or `cpu` (the CPU reference computed the attention).
    pub device: String,
    pub adapter: Value,
    pub limits: Value,
    pub features: Vec<String>,
    pub capabilities: Value,
    pub dtype: String,
    pub seed: u64,
    /// `SPARSE_ATTN_*` environment variables in effect (adapter choice, f16/subgroup switches,
    /// autotuning, tile cache).
    pub env: std::collections::BTreeMap<String, String>,
    pub data: Option<Value>,
}

impl Provenance {
    pub fn new(engine: Option<&Engine>, device: &str, dtype: &str, seed: u64) -> Self {
        let (git_revision, git_dirty) = git_revision();
        let (adapter, limits, features, capabilities) = match engine {
            Some(e) => (
                adapter_json(e.adapter_info()),
                limits_json(&e.device().limits()),
                feature_names(e.device().features()),
                serde_json::to_value(e.capabilities()).unwrap_or(Value::Null),
            ),
            None => (Value::Null, Value::Null, Vec::new(), Value::Null),
        };
        Self {
            tool: "attn-bench",
            crate_version: env!("CARGO_PKG_VERSION"),
            git_revision,
            git_dirty,
            date_utc: utc_now(),
            command_line: command_line(),
            device: device.into(),
            adapter,
            limits,
            features,
            capabilities,
            dtype: dtype.into(),
            seed,
            env: std::env::vars().filter(|(k, _)| k.starts_with("SPARSE_ATTN_")).collect(),
            data: None,
        }
    }

    pub fn with_data(mut self, data: &sparse_attn::data::AttentionData) -> Self {
        self.data = Some(json!({
            "path": data.path().display().to_string(),
            "texts": data.texts(),
            "layers": data.layer_ids(),
            "heads": data.head_ids(),
            "seq": data.seq(),
            "head_dim": data.head_dim(),
            "model": data.metadata().get("model"),
        }));
        self
    }

    /// Adapter name for titles (`CPU reference` without an engine).
    pub fn adapter_label(&self) -> String {
        match (self.adapter.get("name").and_then(Value::as_str), self.adapter.get("backend").and_then(Value::as_str)) {
            (Some(n), Some(b)) => format!("{n} ({b})"),
            _ => "CPU reference".into(),
        }
    }

    /// Columns appended to every CSV row: `crate_version,git_rev,adapter,backend,driver,seed,date`.
    pub fn csv_header() -> &'static str {
        "crate_version,git_rev,adapter,backend,driver,seed,date_utc"
    }
    pub fn csv_cells(&self) -> String {
        let s = |k: &str| self.adapter.get(k).and_then(Value::as_str).unwrap_or(if self.device == "cpu" { "cpu-reference" } else { "" }).to_string();
        [
            self.crate_version.to_string(),
            self.git_revision.clone(),
            s("name"),
            s("backend"),
            s("driver"),
            self.seed.to_string(),
            self.date_utc.clone(),
        ]
        .iter()
        .map(|c| csv_cell(c))
        .collect::<Vec<_>>()
        .join(",")
    }
}

// ---------------------------------------------------------------------------------------------
// Files

pub fn default_out(cmd: &str) -> PathBuf {
    Path::new("target").join("attn-bench").join(cmd)
}

pub fn create_out_dir(dir: &Path) -> BResult<()> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::input(format!("cannot create output directory `{}`: {e}", dir.display())))
}

pub fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> BResult<()> {
    std::fs::write(path, contents).map_err(|e| BenchError::runtime(format!("cannot write `{}`: {e}", path.display())))
}

pub fn write_json(path: &Path, value: &Value) -> BResult<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| BenchError::runtime(e.to_string()))?;
    write_file(path, text + "\n")
}

/// Quotes a CSV cell when it holds a comma, quote or newline.
pub fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A float for CSV: 6 decimals, scientific below 1e-3 (empty for NaN / missing).
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        String::new()
    } else if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:.6e}")
    } else {
        format!("{x:.6}")
    }
}

/// JSON number, or null when not finite.
pub fn jnum(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// Inserts the provenance as a `<desc>` element into an SVG written by plotters.
pub fn stamp_svg(path: &Path, prov: &Provenance) -> BResult<()> {
    let svg = std::fs::read_to_string(path).map_err(|e| BenchError::runtime(format!("cannot read `{}`: {e}", path.display())))?;
    let text = serde_json::to_string(prov).unwrap_or_default();
    let escaped = text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let out = match svg.find("<svg").and_then(|s| svg[s..].find('>').map(|e| s + e + 1)) {
        Some(pos) => format!("{}\n<desc id=\"provenance\">{escaped}</desc>{}", &svg[..pos], &svg[pos..]),
        None => svg,
    };
    write_file(path, out)
}

// ---------------------------------------------------------------------------------------------
// Progress

/// A progress bar on stderr, hidden with `--quiet` / `--json` or when stderr is not a terminal.
pub fn progress(globals: &Globals, len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if globals.quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta}) {msg}") {
            bar.set_style(style);
        }
    }
    bar.set_prefix(what.to_string());
    bar
}

// ---------------------------------------------------------------------------------------------
// Parsing and misc

/// Parses a comma-separated list, naming the flag on error.
pub fn parse_list<T: std::str::FromStr>(flag: &str, s: &str) -> BResult<Vec<T>>
where
    T::Err: fmt::Display,
{
    let items: Vec<&str> = s.split(',').map(str::trim).filter(|x| !x.is_empty()).collect();
    if items.is_empty() {
        return Err(BenchError::input(format!("{flag}: empty list")));
    }
    items.iter().map(|x| x.parse::<T>().map_err(|e| BenchError::input(format!("{flag}: cannot parse `{x}`: {e}")))).collect()
}

pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub fn mean(xs: &[f64]) -> f64 {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

pub fn median(xs: &[f64]) -> f64 {
    sparse_attn::gpu::engine::median(xs)
}

/// `dtype` from the CLI spelling.
pub fn parse_dtype(s: &str) -> BResult<sparse_attn::DType> {
    match s {
        "f32" => Ok(sparse_attn::DType::F32),
        "f16" => Ok(sparse_attn::DType::F16),
        other => Err(BenchError::input(format!("unknown dtype `{other}` (f32, f16)"))),
    }
}

pub fn parse_path(s: &str) -> BResult<sparse_attn::ExecPath> {
    match s {
        "auto" => Ok(sparse_attn::ExecPath::Auto),
        "fused" => Ok(sparse_attn::ExecPath::Fused),
        "three-kernel" | "threekernel" | "three" => Ok(sparse_attn::ExecPath::ThreeKernel),
        other => Err(BenchError::input(format!("unknown kernel path `{other}` (auto, fused, three-kernel)"))),
    }
}

pub fn parse_normalizer(s: &str) -> BResult<sparse_attn::Normalizer> {
    sparse_attn::Normalizer::parse(s).map_err(|e| BenchError::input(format!("--normalizer: {e}")))
}

/// Block size: a power of two in 16..=128 (what BlockPattern accepts).
pub fn check_block(block: u32) -> BResult<()> {
    if !(16..=128).contains(&block) || !block.is_power_of_two() {
        return Err(BenchError::input(format!("--block {block}: the block size must be a power of two in 16..=128")));
    }
    Ok(())
}
