#!/usr/bin/env python3
"""The streaming benchmark's layer shapes under Hugging Face accelerate's cpu_offload.

A stack of equal pre-norm attention + MLP blocks (the shapes of bench_streaming.cpp) in bf16;
every other block is offloaded with accelerate.cpu_offload (weights in CPU RAM, moved to the GPU
by hooks at each forward), the rest stays on the GPU. Prints the step time, the offloaded bytes,
the measured H2D bandwidth and the ratio to max(compute, bytes / bandwidth), where compute is the
step time with every block resident.
"""
import argparse
import math
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.width = width
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.width)
        y = x + self.proj(scores.softmax(-1) @ v)
        return y + self.fc2(nn.functional.gelu(self.fc1(self.norm2(y))))


def step_time(model, x, repeats=5):
    with torch.no_grad():
        model(x)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    from accelerate import cpu_offload

    device = torch.device("cuda:0")
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.width, device=device, dtype=torch.bfloat16)

    resident = nn.Sequential(*[Block(args.width, 4 * args.width) for _ in range(args.blocks)]).to(torch.bfloat16)
    resident.to(device)
    compute = step_time(resident, x)
    del resident
    torch.cuda.empty_cache()

    blocks = [Block(args.width, 4 * args.width).to(torch.bfloat16) for _ in range(args.blocks)]
    offloaded = 0
    for i, block in enumerate(blocks):
        if i % 2 == 1:
            offloaded += sum(p.numel() * p.element_size() for p in block.parameters())
            cpu_offload(block, execution_device=device)
        else:
            block.to(device)
    model = nn.Sequential(*blocks)
    step = step_time(model, x)

    one = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    host = torch.empty(one, dtype=torch.uint8).pin_memory()
    target = torch.empty(one, dtype=torch.uint8, device=device)
    target.copy_(host)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        target.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    bandwidth = 5 * one / (time.perf_counter() - start)

    bound = max(compute, offloaded / bandwidth)
    print(f"accelerate cpu_offload: step {step * 1e3:.2f} ms, compute {compute * 1e3:.2f} ms, "
          f"offloaded {offloaded / 2**20:.1f} MiB, H2D {bandwidth / 1e9:.2f} GB/s, ratio {step / bound:.3f}")


if __name__ == "__main__":
    main()
