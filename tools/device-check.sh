#!/usr/bin/env bash
# The GPU check a session runs on a lent device machine, in one call (prepare it with
# tools/stage-device-bins.sh; device time is scarce, so everything is bounded): the adapter,
# the GPU test suites (CI=true: a missing adapter fails), then `attn-bench speed` per sequence
# length with the tuner on, each part under its own timeout so a slow part costs only itself.
# Writes at most 7 files to $OUT (the tool returns 8): info.txt, tests.log, speed.log,
# speed.csv (every finished part, one header), speed_no_subgroups.csv (seq 4096 again with
# SPARSE_ATTN_NO_SUBGROUPS=1 on the same tuned tiles: the fused kernels' subgroup reductions
# on ÷ off), tune.json (the tuner's choices; speed.log has each candidate's time) and commit.
#
# Env: TEST_S (seconds per test binary, default 80), SPEED_S (per sweep part, default 75),
#      AB_S (the subgroups-off part, default 60): at most 525 s in all, inside one call (600 s)
#      and a 15-minute lease with the start, SEQS (default "1024 4096 16384"), AB_SEQ (4096), DENSITIES
#      (default 1,0.5,0.25,0.1,0.05).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/device-check}
mkdir -p "$OUT"
bins=.device
if [ ! -x "$bins/attn-bench" ]; then
  echo "device-check: $bins/attn-bench is missing; run tools/stage-device-bins.sh first" >&2
  exit 2
fi
cp "$bins/commit" "$OUT/commit" 2>/dev/null || true
# Vulkan loader and NVIDIA's ICD (device README).
if ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -e "$icd" ]; then
  export VK_DRIVER_FILES=$icd
fi
# The binaries read shaders/fixtures/models under the build machine's checkout path.
manifest=$(cat "$bins/manifest_dir")
if [ ! -e "$manifest" ]; then
  mkdir -p "$(dirname "$manifest")"
  ln -s "$PWD" "$manifest"
fi
export CI=true
"$bins/attn-bench" info >"$OUT/info.txt" 2>&1
echo "info rc $?" >>"$OUT/info.txt"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv >>"$OUT/info.txt" 2>&1
fi
: >"$OUT/tests.log"
for t in gpu_suite gpu_fused gpu_paths; do
  echo "== $t" >>"$OUT/tests.log"
  start=$SECONDS
  timeout "${TEST_S:-80}" "$bins/$t" >>"$OUT/tests.log" 2>&1
  echo "== $t rc $? in $((SECONDS - start)) s" >>"$OUT/tests.log"
done
export SPARSE_ATTN_TUNE_CACHE=$OUT/tune.json
# The tuner's stand-in sizes and every candidate's median go to speed.log: what a tile sweep
# on this GPU would show, without one.
export RUST_LOG=sparse_attn=debug
: >"$OUT/speed.log"
for seq in ${SEQS:-1024 4096 16384}; do
  part=$OUT/speed_$seq
  # The three-kernel path at 16384 dense materialises 8.6 GB of scores: fused only there.
  paths=fused,three-kernel
  [ "$seq" -ge 16384 ] && paths=fused
  start=$SECONDS
  timeout "${SPEED_S:-75}" "$bins/attn-bench" speed --seqs "$seq" --densities "${DENSITIES:-1,0.5,0.25,0.1,0.05}" \
    --normalizers softmax,entmax15 --dtypes auto --paths "$paths" --autotune on --repeats 5 \
    --out "$part" >>"$OUT/speed.log" 2>&1
  echo "== seq $seq rc $? in $((SECONDS - start)) s" >>"$OUT/speed.log"
  if [ -s "$part/speed.csv" ]; then
    if [ -s "$OUT/speed.csv" ]; then tail -n +2 "$part/speed.csv" >>"$OUT/speed.csv"; else cp "$part/speed.csv" "$OUT/speed.csv"; fi
  fi
  rm -rf "$part"
done
part=$OUT/speed_nosg
start=$SECONDS
SPARSE_ATTN_NO_SUBGROUPS=1 timeout "${AB_S:-60}" "$bins/attn-bench" speed --seqs "${AB_SEQ:-4096}" --densities 1,0.25 \
  --normalizers softmax,entmax15 --dtypes auto --paths fused --autotune on --repeats 5 \
  --out "$part" >>"$OUT/speed.log" 2>&1
echo "== seq ${AB_SEQ:-4096} subgroups off rc $? in $((SECONDS - start)) s" >>"$OUT/speed.log"
[ -s "$part/speed.csv" ] && cp "$part/speed.csv" "$OUT/speed_no_subgroups.csv"
rm -rf "$part"
tail -n 3 "$OUT/tests.log" "$OUT/speed.log"
