// Without SUBGROUP (or switched off): the fused kernels reduce across a row group's lanes in
// workgroup memory. Same names as fused_lanes_subgroup.wgsl; `lanes_split` is declared unused
// so both variants have the footprint tiles::FusedTile::workgroup_bytes counts.

struct LaneIds {
    @builtin(local_invocation_index) lid: u32,
}

var<workgroup> lanes_split: atomic<u32>;

fn row_lanes_in_subgroups(ids: LaneIds, lanes: u32) -> bool {
    return false;
}

fn lanes_max(x: f32, lanes: u32) -> f32 {
    return x;
}

fn lanes_sum(x: f32, lanes: u32) -> f32 {
    return x;
}

fn barrier_then_lanes_in_subgroups() -> bool {
    workgroupBarrier();
    return false;
}

fn lanes_reduce4(x: vec4<f32>, lanes: u32, maxes: bool) -> vec4<f32> {
    return x;
}
