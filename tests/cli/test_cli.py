#!/usr/bin/env python3
"""End-to-end checks of the distorch command-line program: outputs and exit codes (0 ok, 1 bad
input) of version, validate, plan (--units and --model), inspect and lora inspect. Weight files are
written here by hand from the safetensors spec (struct + json), independent of distorch's writer.
Usage: test_cli.py PATH/TO/distorch"""
import json
import os
import struct
import subprocess
import sys
import tempfile

exe = sys.argv[1]
failures = []
checks = 0


def run(*args):
    p = subprocess.run([exe, *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def check(name, condition, detail=""):
    global checks
    checks += 1
    if not condition:
        failures.append(f"{name}: {detail}")


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header, offset, data = {}, 0, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


with tempfile.TemporaryDirectory() as tmp:
    rc, out, err = run("version")
    check("version", rc == 0 and out.startswith("distorch "), out + err)
    rc, out, _ = run("version", "--json")
    check("version --json", rc == 0 and "distorch" in json.loads(out), out)

    rc, out, err = run("validate", "--alloc", "cuda:0,2.5gb;cpu,*")
    check("validate ok", rc == 0 and out.strip() == "ok", out + err)
    rc, out, err = run("validate", "--alloc", "cuda:0,2.5gb;cpu,abc")
    check("validate bad value", rc == 1 and "column" in err and err.count("\n") == 1, err)
    rc, out, err = run("validate", "--alloc", "cuda:0,25%;cpu,0.5")
    check("validate mixed modes", rc == 1 and "allocation_error" in err, err)
    rc, out, err = run("validate", "--alloc", "cuda:1,1gb;cpu,*", "--devices", "cuda:0=8GiB,cpu=16GiB")
    check("validate device not present", rc == 1 and "cuda:1" in err, err)
    rc, out, err = run("validate")
    check("validate without --alloc", rc == 1, err)

    units = os.path.join(tmp, "units.json")
    with open(units, "w") as f:
        json.dump([{"name": f"blocks.{i}", "bytes": 100 << 20} for i in range(10)], f)
    rc, out, err = run("plan", "--alloc", "cuda:0,300mb;cpu,*", "--devices", "cuda:0=2GiB,cpu=16GiB",
                       "--compute", "cuda:0", "--units", units, "--json")
    check("plan --units --json", rc == 0, err)
    if rc == 0:
        plan = json.loads(out)
        homes = [u["device"] for u in plan["units"]]
        # Tail-first: the head stays on the compute device, the tail goes to the donor.
        check("plan head on compute", homes[0] == "cuda:0" and homes[-1] == "cpu", str(homes))
        check("plan compute holds its quota", homes.count("cuda:0") == 3, str(homes))
    rc, out, err = run("plan", "--alloc", "cuda:0,300mb;cpu,*", "--devices", "cuda:0=2GiB,cpu=16GiB",
                       "--compute", "cuda:0", "--units", units)
    check("plan table", rc == 0 and "cuda:0" in out and "cpu" in out, out + err)
    rc, out, err = run("plan", "--alloc", "cuda:0,1gb;cpu,*", "--devices", "cuda:0=2GiB,cpu=16GiB",
                       "--units", os.path.join(tmp, "missing.json"))
    check("plan missing units file", rc == 1 and err.count("\n") == 1, err)
    rc, out, err = run("plan", "--alloc", "cuda:0,1gb;cpu,*", "--devices", "cuda:0=2GiB,cpu=16GiB")
    check("plan without a model", rc == 1, err)

    model = os.path.join(tmp, "model.safetensors")
    write_safetensors(model, [(f"blocks.{i}.w", "F32", [256, 256], struct.pack("<f", float(i)) * 65536) for i in range(4)]
                      + [("head.w", "F16", [2], struct.pack("<e", 1.5) * 2)])
    rc, out, err = run("plan", "--alloc", "cuda:0,300kb;cpu,*", "--devices", "cuda:0=1GiB,cpu=16GiB",
                       "--compute", "cuda:0", "--model", model, "--group", r"blocks\.\d+", "--json")
    check("plan --model", rc == 0, err)
    if rc == 0:
        names = [u["name"] for u in json.loads(out)["units"]]
        check("plan --model grouping", names[:4] == [f"blocks.{i}" for i in range(4)], str(names))

    rc, out, err = run("inspect", model, "--json")
    check("inspect --json", rc == 0, err)
    if rc == 0:
        text = json.dumps(json.loads(out))
        check("inspect lists tensors", "blocks.3.w" in text and "head.w" in text, text[:200])
    rc, out, err = run("inspect", model, "--tensor", "head.w", "--values", "--json")
    check("inspect values", rc == 0 and "1.5" in out, out + err)
    rc, out, err = run("inspect", model, "--tensor", "nope", "--values")
    check("inspect unknown tensor", rc == 1 and "nope" in err, err)
    bad = os.path.join(tmp, "bad.safetensors")
    with open(bad, "wb") as f:
        f.write(b"\x05")
    rc, out, err = run("inspect", bad)
    check("inspect truncated file", rc == 1 and "format_error" in err and err.count("\n") == 1, err)

    lora = os.path.join(tmp, "lora.safetensors")
    write_safetensors(lora, [("blocks.0.lora_A.weight", "F32", [2, 256], struct.pack("<f", 0.5) * 512),
                             ("blocks.0.lora_B.weight", "F32", [256, 2], struct.pack("<f", 0.25) * 512)])
    rc, out, err = run("lora", "inspect", lora, "--json")
    check("lora inspect", rc == 0, err)

    rc, out, err = run("no-such-command")
    check("unknown command", rc == 1, err)

print(f"cli checks: {checks - len(failures)} passed, {len(failures)} failed")
for f in failures:
    print("FAILED", f)
sys.exit(1 if failures else 0)
