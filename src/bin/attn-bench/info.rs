//! `attn-bench info`: every adapter wgpu sees, and the default engine's device in detail.

use crate::common::{adapter_json, feature_names, limits_json, BResult, Globals, Provenance};
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Debug, Clone)]
pub struct InfoArgs {}

pub fn run(g: &Globals, _args: &InfoArgs) -> BResult<()> {
    let adapters: Vec<Value> = sparse_attn::gpu::device::enumerate_adapters()
        .iter()
        .map(|a| {
            let info = a.get_info();
            let mut j = adapter_json(&info);
            j["compute_shaders"] = json!(a.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS));
            j["features"] = json!(feature_names(a.features()));
            j
        })
        .collect();
    let engine = g.engine();
    let (engine_json, err) = match &engine {
        Ok(e) => {
            let caps = e.capabilities();
            (
                json!({
                    "adapter": adapter_json(e.adapter_info()),
                    "capabilities": caps,
                    "features_enabled": feature_names(e.device().features()),
                    "limits": limits_json(&e.device().limits()),
                }),
                None,
            )
        }
        Err(err) => (Value::Null, Some(err.to_string())),
    };
    let prov = Provenance::new(engine.as_ref().ok(), "gpu", "-", 0);
    let summary = json!({
        "provenance": prov,
        "env": {
            "SPARSE_ATTN_ADAPTER": std::env::var(sparse_attn::gpu::device::ENV_ADAPTER).ok(),
            "SPARSE_ATTN_NO_F16": std::env::var(sparse_attn::gpu::device::ENV_NO_F16).ok(),
            "SPARSE_ATTN_NO_SUBGROUPS": std::env::var(sparse_attn::gpu::device::ENV_NO_SUBGROUPS).ok(),
        },
        "adapters": adapters,
        "engine": engine_json,
        "engine_error": err,
    });
    if g.human() {
        println!("attn-bench {} (git {})", env!("CARGO_PKG_VERSION"), prov.git_revision);
        println!("adapters ({}):", adapters.len());
        for a in &adapters {
            println!(
                "  - {} [{} {}] driver: {} {}{}",
                a["name"].as_str().unwrap_or("?"),
                a["backend"].as_str().unwrap_or("?"),
                a["device_type"].as_str().unwrap_or("?"),
                a["driver"].as_str().unwrap_or(""),
                a["driver_info"].as_str().unwrap_or(""),
                if a["compute_shaders"].as_bool() == Some(false) { " (no compute shaders)" } else { "" }
            );
        }
        match &engine {
            Ok(e) => {
                let info = e.adapter_info();
                println!("default engine: {} ({}, {:?})", info.name, info.backend.to_str(), info.device_type);
                println!("  driver:       {} {}", info.driver, info.driver_info);
                let c = e.capabilities();
                println!("  capabilities: f16={} subgroups={} timestamps={}", c.f16, c.subgroups, c.timestamps);
                println!("  features:     {}", feature_names(e.device().features()).join(", "));
                println!("  limits:");
                if let Value::Object(m) = limits_json(&e.device().limits()) {
                    for (k, v) in m {
                        println!("    {k:<40} {v}");
                    }
                }
            }
            Err(err) => println!("default engine: unavailable: {err}"),
        }
    }
    g.print_json(&summary)?;
    match engine {
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}
