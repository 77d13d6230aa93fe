#!/usr/bin/env bash
# The one script a lent GPU machine runs (one H100/H200, 16 cores, a PyTorch 2.x install with
# CUDA, Meson and Ninja, no internet). It
#   - finds the LibTorch inside that PyTorch install, and stops at once with one clear line when
#     there is none or it is not a CUDA build;
#   - builds only what it runs (tests/cuda, the streaming benchmark, the distorch tool) against it;
#   - runs the CUDA tests, the streaming benchmark (real PCIe/NVLink link) and `distorch profile`;
#   - writes every result and log under $OUT (default ./gpu-results), with 00-summary.txt first.
# Headers and libraries the machine lacks come from .carry/ (bench/gpu/carry.sh fills it here).
#
# Usage: OUT=/path bench/gpu/run-gpu.sh
# Environment: PYTHON (default python3), DISTORCH_GPU_BUILD (default build-gpu),
#              DISTORCH_GPU_JOBS (default: nproc), DISTORCH_BENCH_WIDTH/_BLOCKS/_TOKENS (benchmark
#              size, see bench/gpu/bench_streaming.cpp), DISTORCH_GPU_BUILD_ONLY=1 (build, run nothing),
#              DISTORCH_GPU_BUILD_SECONDS (default 300: the build's time limit; a 2-core rehearsal needs more).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$root/gpu-results}
build=${DISTORCH_GPU_BUILD:-$root/build-gpu}
python=${PYTHON:-python3}
jobs=${DISTORCH_GPU_JOBS:-$(nproc)}
mkdir -p "$out"
summary=$out/00-summary.txt
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
fail() { say "run-gpu.sh: FAILED: $*"; exit 1; }
step() {  # name, seconds, command...: runs one step with a time limit, its log in $out/NAME.txt
  local name=$1 limit=$2; shift 2
  local started=$SECONDS rc
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  rc=$?
  say "$(printf '%-18s exit %3d  %4ds  (log: %s.txt)' "$name" "$rc" $((SECONDS - started)) "$name")"
  return $rc
}

say "distorch GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null) \
  || fail "no PyTorch install importable by '$python' (set PYTHON to the interpreter whose torch to build against)"
torch_version=$("$python" -c 'import torch; print(torch.__version__)')
torch_cuda=$("$python" -c 'import torch; print(torch.version.cuda or "")')
[ -n "$torch_cuda" ] && [ -f "$torch_dir/lib/libtorch_cuda.so" ] \
  || fail "PyTorch $torch_version in $torch_dir is not a CUDA build (torch.version.cuda is empty or lib/libtorch_cuda.so is missing)"
say "PyTorch $torch_version (CUDA $torch_cuda) in $torch_dir"
gpus=$(nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader 2>/dev/null)
say "GPUs: ${gpus:-(nvidia-smi not found)}"

extra=()
if [ -d "$root/.carry/include" ]; then
  # Meson refuses absolute include folders inside the source tree: relative to it, then.
  extra=(-Dextra_include_dirs=.carry/include -Dextra_lib_dirs="$root/.carry/lib")
fi
if [ ! -f "$build/build.ninja" ]; then
  step configure 120 meson setup "$build" "$root" -Dtorch_dir="$torch_dir" -Dcuda=enabled -Dpython="$python" \
    -Dbuildtype=release -Dtests=true -Dbenchmarks=true -Dexamples=false -Dtools=true "${extra[@]}" \
    || fail "meson setup (see configure.txt)"
fi
step build "${DISTORCH_GPU_BUILD_SECONDS:-300}" meson compile -C "$build" -j "$jobs" tests/cuda/test_cuda bench/bench_streaming tools/distorch \
  || { tail -n 30 "$out/build.txt" >> "$summary"; fail "build (see build.txt)"; }
[ "${DISTORCH_GPU_BUILD_ONLY:-0}" = 1 ] && { say "built; DISTORCH_GPU_BUILD_ONLY=1: nothing run"; exit 0; }

status=0
export DISTORCH_SOURCE_ROOT=$root DISTORCH_PYTHON=$python
step test_cuda 150 "$build/tests/cuda/test_cuda" || status=1
grep -E '^\[doctest\] (test cases|assertions)' "$out/test_cuda.txt" | tee -a "$summary"
grep -E 'skipped:' "$out/test_cuda.txt" | head -n 3 | tee -a "$summary"
step bench_streaming 240 "$build/bench/bench_streaming" --benchmark_counters_tabular=true \
  --benchmark_out="$out/bench_streaming.json" --benchmark_out_format=json || status=1
grep -E '^(BM_|-|Benchmark)' "$out/bench_streaming.txt" | head -n 20 >> "$summary"
step profile 120 "$build/tools/distorch" profile --json --out "$out/profile.json" || status=1
say "done: $( [ $status = 0 ] && echo "every step passed" || echo "some step FAILED" ); results in $out"
exit $status
