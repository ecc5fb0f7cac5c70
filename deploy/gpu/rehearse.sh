#!/usr/bin/env bash
# The device check rehearsed without a GPU, before device time is spent: builds the bundle
# (deploy/gpu/bundle.sh) and the emulated device (shared/tests/cuda_emu: the CUDA driver,
# NVRTC and cuBLAS over host memory, every kernel run on the CPU), then runs
# deploy/gpu/check.sh here against it, as the device would: the canaries (which pass here
# unless GROK_EMU_BROKEN breaks one), the GPU tests (at smaller matrices, as on the emulated
# device), the layer bench at the tiny preset's shapes, the worker processes. Every time
# limit is 3 times the device's.
# Its figures mean nothing; NCCL (not emulated) and nvidia-smi fail as they should, and some
# parts may run past their limits on 2 cores. What it shows is that the script, the bundle
# and the host code run their whole course. About 17 minutes on 2 cores.
#   deploy/gpu/rehearse.sh [REFERENCE_DIR]   (REHEARSE_BUNDLE=keep: use target/gpu-bundle as is)
# GROK_EMU_BROKEN=attention_decode_ (kernel-name prefixes, comma-separated) makes those
# kernels write nothing, so that their canaries fail and the check's ways around them run.
# Results under target/rehearsal (cleared first).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${REHEARSE_BUNDLE:-build}" != keep ]; then
  bash deploy/gpu/bundle.sh "$@"
fi
DEV="$PWD/target/emulated-device"
rm -rf "$DEV"
EMU_ENV=$(cargo run -q -p grok-shared --example emulated_device -- "$DEV")
OUT="$PWD/target/rehearsal"
rm -rf "$OUT" && mkdir -p "$OUT"
# Its own bench model and caches: nothing of the emulated device's may reach a real GPU's.
# shellcheck disable=SC2086 # EMU_ENV is NAME=VALUE words
env $EMU_ENV OUT="$OUT" GROK_CHECK_TIME_SCALE=3 GROK_BENCH_PRESET=tiny GROK_BENCH_LAYERS=2 \
  GROK_BENCH_MODEL="$DEV/bench-model" CUDA_CACHE_PATH="$DEV/jit-cache" SKIP_TORCH=1 \
  bash deploy/gpu/check.sh
