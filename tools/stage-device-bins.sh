#!/usr/bin/env bash
# Prepares a GPU check on a lent device machine (workplace `device` tool): builds the release
# bench and GPU test binaries here, copies them into .device/ and the Vulkan loader packages
# into .gl/ (both git-ignored through .git/info/exclude), so that one `run` carrying
# `.device` and `.gl` can execute tools/device-check.sh there without a Rust toolchain:
#
#   bash tools/stage-device-bins.sh
#   run(command="bash tools/device-check.sh", carry=[".device", ".gl"], timeout_s=580)
#
# The binaries find the shaders, fixtures and bundled model through this checkout's path
# (CARGO_MANIFEST_DIR), recorded in .device/manifest_dir; device-check.sh links it there.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
for p in /.device/ /.gl/; do
  grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >>.git/info/exclude
done
cargo build --release --bin attn-bench
rm -rf .device && mkdir -p .device
cp target/release/attn-bench .device/
# The test executables' paths, from cargo's JSON messages.
cargo test --release --no-run --test gpu_suite --test gpu_fused --test gpu_paths --message-format=json \
  | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["kind"] == ["test"]:
        shutil.copy(msg["executable"], ".device/" + msg["target"]["name"])
        print("staged", msg["target"]["name"])
'
echo "$root" >.device/manifest_dir
git rev-parse --short HEAD >.device/commit
if ! ls .gl/*.deb >/dev/null 2>&1; then
  # The device machine's image may lack the Vulkan loader (device README's recipe).
  mkdir -p .gl /tmp/amd64/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  # shellcheck disable=SC2086
  apt-get $o update -qq && (cd .gl && apt-get $o download libvulkan1 >/dev/null)
fi
du -sh .device .gl
