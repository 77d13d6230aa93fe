#!/usr/bin/env bash
# Builds distorch against the LibTorch of this machine's PyTorch install and runs the GPU checks:
# the test suites (the runtime's included), the examples, and the streaming benchmark, then the
# same layer shapes under Python accelerate's cpu_offload for comparison. Results go to
# $OUT_DIR (default: ./gpu-results), ready for docs/benchmarks.md.
# Usage: bench/gpu/run-gpu.sh [BUILD_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${1:-$root/build-gpu}"
out="${OUT_DIR:-$root/gpu-results}"
mkdir -p "$out"

python="${PYTHON:-python3}"
torch_dir="$($python -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
echo "LibTorch from $torch_dir" | tee "$out/machine.txt"
$python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda); print(torch.cuda.get_device_name(0))' | tee -a "$out/machine.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv | tee -a "$out/machine.txt" || true
date -u | tee -a "$out/machine.txt"

if [ ! -d "$build" ]; then
  meson setup "$build" "$root" -Dtorch_dir="$torch_dir" -Dbuildtype=release
fi
jobs="$(nproc)"
meson compile -C "$build" -j "$jobs" test_runtime quickstart block_loop custom_loader registry_example bench_streaming

# The runtime tests and the examples (the quickstart computes on cuda:0 when there is a GPU).
"$build/tests/runtime/test_runtime" 2>&1 | tee "$out/test_runtime.txt"
for ex in quickstart block_loop custom_loader registry_example; do
  "$build/examples/$ex" 2>&1 | tee "$out/$ex.txt"
done

# The streaming benchmark: all resident, prefetch depth 1 and 2, synchronous fetch per unit.
"$build/bench/bench_streaming" --benchmark_counters_tabular=true \
  --benchmark_out="$out/bench_streaming.json" --benchmark_out_format=json 2>&1 | tee "$out/bench_streaming.txt"

# The same layer shapes under accelerate's cpu_offload.
width="${DISTORCH_BENCH_WIDTH:-4096}" blocks="${DISTORCH_BENCH_BLOCKS:-12}" tokens="${DISTORCH_BENCH_TOKENS:-2048}"
$python "$here/accelerate_offload.py" --width "$width" --blocks "$blocks" --tokens "$tokens" 2>&1 | tee "$out/accelerate_offload.txt"
echo "results in $out"
