#!/usr/bin/python3
"""Writes LoRA and LoHa merge references with Debian's python3-torch, for tests/lora/test_merge.cpp.

Usage: make_reference.py OUT_DIR

The merge formulas are written out plainly here (ComfyUI semantics, float32), independent of the
C++ code. Every tensor is written as raw little-endian bytes (float32, or bfloat16 as its 16 bits)
and listed in OUT_DIR/manifest.txt, one line per tensor:

    CASE NAME DTYPE NDIM D0 D1 ... FILE

plus one line per scalar:

    CASE NAME scalar VALUE

Cases whose name starts with "exact_" use dyadic values small enough that every float32 product
and sum is exact: there the C++ result must match bit for bit. The others use normal random
values and are compared with a tolerance.
"""
import os
import sys

import torch


def main(out):
    os.makedirs(out, exist_ok=True)
    lines = []
    gen = torch.Generator().manual_seed(1234)

    def put(case, name, t):
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
            kind = "bf16"
        else:
            t = t.to(torch.float32)
            raw = t.numpy().astype("<f4").tobytes()
            kind = "f32"
        fname = "%s.%s.bin" % (case, name)
        with open(os.path.join(out, fname), "wb") as f:
            f.write(raw)
        lines.append(" ".join([case, name, kind, str(t.dim())] + [str(d) for d in t.shape] + [fname]))

    def scalar(case, name, value):
        lines.append("%s %s scalar %r" % (case, name, float(value)))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    def dyadic(*shape, bits=3):
        # integers in [-8, 8] over 2**bits: few significant bits, so float32 sums stay exact
        return torch.randint(-8, 9, shape, generator=gen).to(torch.float32) / (2 ** bits)

    # ---- LoRA, linear: W' = W*strength_model + (strength*alpha/rank) * (up @ down) ----
    def lora_linear(case, make, out_f, in_f, rank, alpha, strength, strength_model):
        w = make(out_f, in_f)
        up = make(out_f, rank)
        down = make(rank, in_f)
        scale = alpha / rank
        delta = up.flatten(1) @ down.flatten(1)
        result = w * strength_model + (strength * scale) * delta.reshape(w.shape)
        put(case, "weight", w)
        put(case, "up", up)
        put(case, "down", down)
        scalar(case, "alpha", alpha)
        scalar(case, "strength", strength)
        scalar(case, "strength_model", strength_model)
        put(case, "expected", result)
        # the same merge into bfloat16 storage: float32 math, one rounding at the end
        wb = w.to(torch.bfloat16)
        rb = (wb.to(torch.float32) * strength_model + (strength * scale) * delta.reshape(w.shape)).to(torch.bfloat16)
        put(case, "weight_bf16", wb)
        put(case, "expected_bf16", rb)

    # ---- LoRA, conv with a Tucker mid: dW[o,i,h,w] = sum_r sum_s up[o,r] mid[r,s,h,w] down[s,i] ----
    def lora_conv_mid(case, make, out_c, in_c, k, rank, alpha, strength):
        w = make(out_c, in_c, k, k)
        up = make(out_c, rank, 1, 1)
        mid = make(rank, rank, k, k)
        down = make(rank, in_c, 1, 1)
        delta = torch.einsum("or,rshw,si->oihw", up.flatten(1), mid, down.flatten(1))
        result = w + (strength * alpha / rank) * delta
        put(case, "weight", w)
        put(case, "up", up)
        put(case, "mid", mid)
        put(case, "down", down)
        scalar(case, "alpha", alpha)
        scalar(case, "strength", strength)
        put(case, "expected", result)

    # ---- LoHa: dW = (w1a @ w1b) * (w2a @ w2b) ----
    def loha(case, make, out_f, in_f, rank, alpha, strength):
        w = make(out_f, in_f)
        w1a, w1b = make(out_f, rank), make(rank, in_f)
        w2a, w2b = make(out_f, rank), make(rank, in_f)
        delta = (w1a @ w1b) * (w2a @ w2b)
        result = w + (strength * alpha / rank) * delta
        for n, t in [("weight", w), ("w1a", w1a), ("w1b", w1b), ("w2a", w2a), ("w2b", w2b)]:
            put(case, n, t)
        scalar(case, "alpha", alpha)
        scalar(case, "strength", strength)
        put(case, "expected", result)
        wb = w.to(torch.bfloat16)
        put(case, "weight_bf16", wb)
        put(case, "expected_bf16", (wb.to(torch.float32) + (strength * alpha / rank) * delta).to(torch.bfloat16))

    # ---- LoHa with Tucker cores: factor = einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a) ----
    def loha_tucker(case, make, out_c, in_c, k, rank, alpha, strength):
        w = make(out_c, in_c, k, k)
        t1, t2 = make(rank, rank, k, k), make(rank, rank, k, k)
        w1a, w1b = make(rank, out_c), make(rank, in_c)
        w2a, w2b = make(rank, out_c), make(rank, in_c)
        m1 = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
        m2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
        result = w + (strength * alpha / rank) * (m1 * m2)
        for n, t in [("weight", w), ("t1", t1), ("t2", t2), ("w1a", w1a), ("w1b", w1b), ("w2a", w2a), ("w2b", w2b)]:
            put(case, n, t)
        scalar(case, "alpha", alpha)
        scalar(case, "strength", strength)
        put(case, "expected", result)

    lora_linear("exact_lora", dyadic, 24, 40, 4, 8.0, 0.5, 1.0)
    lora_linear("random_lora", randn, 64, 96, 8, 4.0, 0.75, 0.5)
    lora_conv_mid("exact_lora_mid", dyadic, 6, 5, 3, 2, 4.0, 1.0)
    lora_conv_mid("random_lora_mid", randn, 8, 6, 3, 4, 2.0, 0.8)
    loha("exact_loha", lambda *s: dyadic(*s, bits=2), 16, 20, 2, 4.0, 0.5)
    loha("random_loha", randn, 32, 48, 4, 2.0, 1.25)
    loha_tucker("random_loha_tucker", randn, 6, 4, 3, 3, 3.0, 0.6)

    with open(os.path.join(out, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
