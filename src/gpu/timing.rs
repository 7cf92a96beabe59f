//! GPU-side pass timing with timestamp queries (when the adapter has TIMESTAMP_QUERY).

use crate::error::Result;
use std::collections::BTreeMap;

/// Records a begin/end timestamp pair per compute pass and sums durations per pass label.
#[derive(Debug)]
pub struct PassTimer {
    query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    capacity: u32,
    labels: Vec<&'static str>,
    period_ns: f64,
    /// The last run had a pass without timestamps (capacity used up) or a pass whose end
    /// preceded its start: its sum is not the run's time.
    incomplete: bool,
}

impl PassTimer {
    /// A timer for up to `passes` passes; `None` when the device lacks TIMESTAMP_QUERY.
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue, passes: u32) -> Option<Self> {
        if !device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return None;
        }
        let capacity = passes.clamp(1, 2048) * 2;
        let bytes = capacity as u64 * 8;
        Some(Self {
            query_set: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("sparse-attn pass timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: capacity,
            }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sparse-attn timestamp resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            read: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sparse-attn timestamp readback"),
                size: bytes,
                usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
                mapped_at_creation: false,
            }),
            capacity,
            labels: Vec::new(),
            period_ns: queue.get_timestamp_period() as f64,
            incomplete: false,
        })
    }

    /// Timestamp writes for the next pass, or None once capacity is used up.
    pub fn pass_writes(&mut self, label: &'static str) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
        let i = self.labels.len() as u32 * 2;
        if i + 2 > self.capacity {
            self.incomplete = true;
            return None;
        }
        self.labels.push(label);
        Some(wgpu::ComputePassTimestampWrites { query_set: &self.query_set, beginning_of_pass_write_index: Some(i), end_of_pass_write_index: Some(i + 1) })
    }

    /// Records the resolve and copy; call once after the timed passes, before submit.
    pub fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        let n = self.labels.len() as u32 * 2;
        if n > 0 {
            encoder.resolve_query_set(&self.query_set, 0..n, &self.resolve, 0);
            encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, n as u64 * 8);
        }
    }

    /// Reads back (waits for the GPU) and returns nanoseconds per label, then resets.
    pub fn read(&mut self, engine: &super::engine::Engine) -> Result<BTreeMap<&'static str, f64>> {
        let mut out = BTreeMap::new();
        if self.labels.is_empty() {
            return Ok(out);
        }
        let ticks: Vec<u64> = engine.read_buffer(&self.read)?;
        for (p, label) in self.labels.iter().enumerate() {
            let (start, end) = (ticks[2 * p], ticks[2 * p + 1]);
            // A counter that wrapped (fewer than 64 valid bits) or a driver's disorder.
            self.incomplete |= end < start;
            *out.entry(*label).or_insert(0.0) += end.saturating_sub(start) as f64 * self.period_ns;
        }
        self.labels.clear();
        Ok(out)
    }

    /// Whether the run last read (and any run since the timer was made) missed a pass or read
    /// timestamps out of order; its sums then understate the run. Sticky: callers fall back to
    /// the wall clock for the whole series.
    pub fn incomplete(&self) -> bool {
        self.incomplete
    }
}
