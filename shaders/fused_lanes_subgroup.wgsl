// Row reductions across the lanes of a fused kernel's row group with subgroup shuffles (no
// workgroup memory, no barrier): the softmax's row groups (TX lanes of the register tiles) and
// the entmax kernels' rows (TPR lanes of the per-score work). A row group's lanes are
// consecutive invocations; WGSL does not promise how invocations map onto subgroups, so each
// workgroup checks once that every run of `lanes` consecutive invocations sits in one
// subgroup, in order, and otherwise takes the workgroup-memory reductions (the same results
// up to rounding).

struct LaneIds {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_size) sg_size: u32,
}

var<workgroup> lanes_split: atomic<u32>;

// Whether the row groups of `lanes` (a power of two) lanes lie in subgroups, in lane order: the
// same answer on every thread. Besides the ids, each butterfly partner the reductions use is
// asked for its index: a subgroup made of non-adjacent runs of invocations (which no driver is
// known to build, and which the ids alone would not reveal) splits row groups. Call once,
// from uniform control flow.
fn row_lanes_in_subgroups(ids: LaneIds, lanes: u32) -> bool {
    var split = ids.sg_size % lanes != 0u || ids.sg_lane != ids.lid % ids.sg_size;
    // sg_size is uniform in the subgroup, so every shuffle runs on all its invocations.
    for (var off = 1u; off < min(lanes, ids.sg_size); off *= 2u) {
        // Outside the `||`, which would skip it on invocations already split.
        let partner = subgroupShuffleXor(ids.lid, off);
        split = split || partner != (ids.lid ^ off);
    }
    if (split) {
        atomicOr(&lanes_split, 1u);
    }
    return workgroupUniformLoad(&lanes_split) == 0u;
}

// Max of `x` over the row group's `lanes` lanes (butterfly: the same on every lane).
fn lanes_max(x: f32, lanes: u32) -> f32 {
    var m = x;
    for (var off = 1u; off < lanes; off *= 2u) {
        m = max(m, subgroupShuffleXor(m, off));
    }
    return m;
}

// Sum of `x` over the row group's `lanes` lanes. Each butterfly step adds a + b on one lane and
// b + a on its partner, equal in floating point, so every lane ends with the same bits.
fn lanes_sum(x: f32, lanes: u32) -> f32 {
    var s = x;
    for (var off = 1u; off < lanes; off *= 2u) {
        s += subgroupShuffleXor(s, off);
    }
    return s;
}

// A workgroup barrier, and whether row_lanes_in_subgroups found the layout (uniform): the
// entmax kernels' row_reduce keeps its barrier either way (it also orders its callers'
// workgroup-memory accesses).
fn barrier_then_lanes_in_subgroups() -> bool {
    return workgroupUniformLoad(&lanes_split) == 0u;
}

// Over the row group's lanes: sums, or with `maxes` (max, sum, max, sum) by component (every
// lane ends with the same bits, as in lanes_sum).
fn lanes_reduce4(x: vec4<f32>, lanes: u32, maxes: bool) -> vec4<f32> {
    var a = x;
    for (var off = 1u; off < lanes; off *= 2u) {
        let b = subgroupShuffleXor(a, off);
        if (maxes) {
            a = vec4<f32>(max(a.x, b.x), a.y + b.y, max(a.z, b.z), a.w + b.w);
        } else {
            a += b;
        }
    }
    return a;
}
