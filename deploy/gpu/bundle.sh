#!/usr/bin/env bash
# Builds everything the GPU check runs, here (the GPU machine has no Rust toolchain), into
# target/gpu-bundle: release binaries (debug info stripped), the GPU test and bench binaries,
# the grok1-tiny-a fixture and the PyTorch baseline. Carry target/gpu-bundle to the device and
# run deploy/gpu/check.sh there.
#   deploy/gpu/bundle.sh [REFERENCE_DIR]   (default ../shared beside the checkout)
set -euo pipefail
cd "$(dirname "$0")/../.."
REF=${1:-${GROK_REFERENCE_DIR:-../shared}}
B=target/gpu-bundle
rm -rf "$B" && mkdir -p "$B/reference/fixtures" "$B/reference/bench"

cargo build --release -p grok-coordinator -p grok-worker
# Test and bench executables: cargo prints their paths as JSON messages.
exe() {
  cargo "$@" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    try:
        m = json.loads(l)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | tail -1
}
cp "$(exe test --release -p grok-shared --test cuda_fixture)" "$B/cuda_fixture"
cp "$(exe test --release -p grok-shared --test cuda_kernels)" "$B/cuda_kernels"
cp "$(exe test --release -p grok-shared --lib)" "$B/shared_lib"
cp "$(exe bench -p grok-shared --bench cuda_layer)" "$B/cuda_layer"
cp "$(exe bench -p grok-shared --bench collectives)" "$B/collectives"
cp target/release/grok target/release/grok-worker "$B/"
for f in "$B"/grok "$B"/grok-worker "$B"/cuda_fixture "$B"/cuda_kernels "$B"/shared_lib "$B"/cuda_layer "$B"/collectives; do
  objcopy --strip-debug "$f"
done
cp -r "$REF/fixtures/grok1-tiny-a" "$B/reference/fixtures/"
cp "$REF/bench/torch_grok_layer.py" "$B/reference/bench/"
cp deploy/gpu/check.sh "$B/"
du -sh "$B"
