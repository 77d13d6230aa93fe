#!/usr/bin/python3
"""The LoRA merge in Python PyTorch next to distorch's, in one run.

Usage: /usr/bin/python3 bench/lora_merge.py BUILD/bench/bench_lora [--threads N]

Runs the C++ benchmark (distorch::merge_into and a memcpy baseline), then times the same merge
written plainly in PyTorch the way ComfyUI does it (float32 copy of the weight, + strength*scale *
(up @ down), cast back), with the same number of threads, and prints one table of weight-traffic
GB/s: distorch, the share of memcpy bandwidth it reaches, Python, and distorch / Python.
Weight traffic is one read and one write of the stored weight, as in bench_lora.cpp.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SIDE = 4096


def python_merge_seconds(rank, dtype, repeats):
    w = (torch.randn(SIDE, SIDE) * 0.02).to(dtype)
    up = torch.randn(SIDE, rank) * 0.01
    down = torch.randn(rank, SIDE) * 0.01
    scale = (rank / 2) / rank
    times = []
    sign = 1.0
    for _ in range(repeats + 1):
        start = time.perf_counter()
        if dtype == torch.float32:
            w += (sign * scale) * (up @ down)
        else:
            w = (w.to(torch.float32) + (sign * scale) * (up @ down)).to(dtype)
        times.append(time.perf_counter() - start)
        sign = -sign
    return statistics.median(times[1:])  # the first run pays one-time allocation


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bench_lora")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = subprocess.run([args.bench_lora, "--benchmark_format=json", "--benchmark_min_time=0.5"],
                         env=env, check=True, capture_output=True, text=True).stdout
    runs = json.loads(out)["benchmarks"]
    memcpy = next(r for r in runs if r["name"].startswith("memcpy_bandwidth"))["bytes_per_second"]

    torch.set_num_threads(args.threads)
    print("threads: %d   memcpy: %.2f GB/s (read + write)" % (args.threads, memcpy / 1e9))
    print("%-5s %-9s %14s %10s %14s %16s" % ("rank", "dtype", "distorch GB/s", "% memcpy", "python GB/s", "distorch/python"))
    for r in runs:
        if not r["name"].startswith("lora_merge"):
            continue
        parts = dict(p.split(":") for p in r["name"].split("/")[1:] if ":" in p)
        rank, bits = int(parts["rank"]), int(parts["bits"])
        dtype = torch.float32 if bits == 32 else torch.bfloat16
        traffic = 2 * SIDE * SIDE * (4 if bits == 32 else 2)
        py = traffic / python_merge_seconds(rank, dtype, args.repeats)
        ours = r["bytes_per_second"]
        print("%-5d %-9s %14.2f %9.0f%% %14.2f %15.2fx" % (rank, "float32" if bits == 32 else "bfloat16", ours / 1e9,
                                                          100 * ours / memcpy, py / 1e9, ours / py))


if __name__ == "__main__":
    sys.exit(main())
