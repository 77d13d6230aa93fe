#!/usr/bin/env python3
"""End-to-end checks of the distorch command-line program: outputs and exit codes (0 ok, 1 bad
input) of version, validate, plan (--units and --model), inspect, lora inspect|apply and demo;
--help with examples for every command; --json as one object on stdout; CLI11's own parse errors
as one line; the progress bar (never when piped, drawn on a pseudo-terminal). Weight files are
written and read back here by the safetensors package (independent of distorch's writer), and .bin
adapters by PyTorch's torch.save. Runs under $DISTORCH_PYTHON's interpreter (meson starts it so),
the pinned environment with torch, numpy and safetensors.
Usage: test_cli.py PATH/TO/distorch"""
import json
import os
import pty
import select
import subprocess
import sys
import tempfile

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

exe = sys.argv[1]
failures = []
checks = 0


def run(*args):
    p = subprocess.run([exe, *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def run_on_pty(*args):
    """Runs with stderr on a pseudo-terminal (stdout still a pipe); returns rc, stdout, terminal text."""
    master, slave = pty.openpty()
    p = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif p.poll() is not None:
            break
    out = p.stdout.read().decode()
    rc = p.wait()
    os.close(master)
    return rc, out, seen.decode(errors="replace")


def one_line_error(name, result, *needles):
    """A failure: exit 1, nothing on stdout, exactly one line on stderr containing every needle."""
    rc, out, err = result
    check(name, rc == 1 and out == "" and err.count("\n") == 1 and err.endswith("\n")
          and all(n in err for n in needles), f"rc={rc} stdout={out!r} stderr={err!r}")


def json_object(name, result):
    """Success with one JSON object as the whole of stdout; returns it (or None)."""
    rc, out, err = result
    try:
        value = json.loads(out)
    except ValueError:
        value = None
    check(name, rc == 0 and isinstance(value, dict), f"rc={rc} stdout={out[:300]!r} stderr={err[-300:]!r}")
    return value if isinstance(value, dict) else None


def described(array):
    """(dtype, shape, raw bytes): a tensor compared bit for bit."""
    return str(array.dtype), list(array.shape), array.tobytes()


def read_safetensors(path):
    """{name: (dtype, shape, raw bytes)} and the metadata, read back by the safetensors package."""
    with safe_open(path, framework="np") as f:
        return {k: described(f.get_tensor(k)) for k in f.keys()}, f.metadata() or {}


def check(name, condition, detail=""):
    global checks
    checks += 1
    if not condition:
        failures.append(f"{name}: {detail}")


def write_safetensors(path, tensors):
    """tensors: {name: numpy array}, written by the safetensors package (no metadata)."""
    save_file(tensors, path)


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
    # Storage suffixes plan as without them, and are shown (table line, JSON "storage").
    rc, out, err = run("plan", "--alloc", "cuda:0,300mb;cpu,*:fp8", "--devices", "cuda:0=2GiB,cpu=16GiB",
                       "--compute", "cuda:0", "--units", units, "--json")
    check("plan storage --json", rc == 0, err)
    if rc == 0:
        plan = json.loads(out)
        check("plan storage json", plan.get("storage") == {"cpu": "float8_e4m3fn"}, str(plan.get("storage")))
        check("plan storage same homes", [u["device"] for u in plan["units"]] == ["cuda:0"] * 3 + ["cpu"] * 7, str(plan["units"]))
    rc, out, err = run("plan", "--alloc", "cuda:0,300mb;cpu,*:bf16", "--devices", "cuda:0=2GiB,cpu=16GiB",
                       "--compute", "cuda:0", "--units", units)
    check("plan storage table", rc == 0 and "storage: cpu=bfloat16" in out, out + err)
    rc, out, err = run("plan", "--alloc", "cuda:0,300mb;cpu,*:int8", "--devices", "cuda:0=2GiB,cpu=16GiB",
                       "--compute", "cuda:0", "--units", units)
    check("plan bad storage suffix", rc == 1 and "unknown storage dtype" in err and "bf16" in err and err.count("\n") == 1, err)
    rc, out, err = run("plan", "--alloc", "cuda:0,1gb;cpu,*", "--devices", "cuda:0=2GiB,cpu=16GiB",
                       "--units", os.path.join(tmp, "missing.json"))
    check("plan missing units file", rc == 1 and err.count("\n") == 1, err)
    rc, out, err = run("plan", "--alloc", "cuda:0,1gb;cpu,*", "--devices", "cuda:0=2GiB,cpu=16GiB")
    check("plan without a model", rc == 1, err)

    model = os.path.join(tmp, "model.safetensors")
    write_safetensors(model, {**{f"blocks.{i}.w": np.full((256, 256), float(i), np.float32) for i in range(4)},
                              "head.w": np.full(2, 1.5, np.float16)})
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
    write_safetensors(lora, {"blocks.0.lora_A.weight": np.full((2, 256), 0.5, np.float32),
                             "blocks.0.lora_B.weight": np.full((256, 2), 0.25, np.float32)})
    rc, out, err = run("lora", "inspect", lora, "--json")
    check("lora inspect", rc == 0, err)

    rc, out, err = run("no-such-command")
    check("unknown command", rc == 1, err)

    # ---- --help: a description and examples for every command --------------------------------
    rc, out, err = run("--help")
    check("top-level --help", rc == 0 and "Examples:" in out and err == "", out + err)
    for command in ("inspect", "validate", "plan", "lora", "profile", "demo", "version"):
        check(f"--help lists {command}", f"\n  {command}" in out, out)
    for command in (["version"], ["validate"], ["plan"], ["inspect"], ["lora"], ["lora", "inspect"],
                    ["lora", "apply"], ["profile"], ["demo"]):
        rc, out, err = run(*command, "--help")
        name = " ".join(command)
        check(f"{name} --help", rc == 0 and "Examples:" in out and f"distorch {name}" in out and err == "",
              f"rc={rc} {out[-300:]!r} {err!r}")
    rc, out, _ = run("lora", "apply", "--help")
    check("lora apply --help names .bin", ".bin" in out and "--json" in out, out)
    rc, out, _ = run("lora", "inspect", "--help")
    check("lora inspect --help names .bin", ".bin" in out, out)

    # ---- CLI11's own parse errors: exit 1, one line, pointing at --help ------------------------
    one_line_error("no command", run(), "--help")
    one_line_error("unknown command one line", run("no-such-command"), "'no-such-command'", "--help")
    for command in (["version"], ["validate", "--alloc", "cpu,*"], ["inspect", model], ["lora", "inspect", lora],
                    ["demo"], ["plan", "--alloc", "cpu,*", "--devices", "cpu=1GiB", "--units", units]):
        name = " ".join(command[:2] if command[0] == "lora" else command[:1])
        one_line_error(f"{name} unknown flag", run(*command, "--bogus-flag"), "--bogus-flag", f"distorch {name} --help")
    one_line_error("validate missing --alloc", run("validate"), "--alloc", "distorch validate --help")
    one_line_error("inspect missing FILE", run("inspect"), "FILE", "distorch inspect --help")
    one_line_error("lora without subcommand", run("lora"), "distorch lora --help")
    one_line_error("lora apply missing --out", run("lora", "apply", model, lora), "--out", "distorch lora apply --help")
    one_line_error("lora apply missing LORA", run("lora", "apply", model, "--out", os.path.join(tmp, "x.safetensors")),
                   "LORA", "distorch lora apply --help")
    one_line_error("demo --forwards out of range", run("demo", "--forwards", "0"), "--forwards", "distorch demo --help")
    one_line_error("plan --prefetch not a number", run("plan", "--alloc", "cpu,*", "--devices", "cpu=1GiB", "--units", units,
                                                        "--prefetch", "many"), "--prefetch", "distorch plan --help")
    one_line_error("version extra argument", run("version", "extra"), "extra")

    # ---- distorch errors: one line naming the input and the fix --------------------------------
    missing = os.path.join(tmp, "missing.safetensors")
    one_line_error("inspect missing file", run("inspect", missing), missing, "fix")
    one_line_error("inspect --json missing file", run("inspect", missing, "--json"), missing, "fix")
    one_line_error("inspect --values without --tensor", run("inspect", model, "--values"), "--tensor")
    one_line_error("lora inspect missing file", run("lora", "inspect", missing), missing, "fix")
    # A model file is no adapter: it holds no adapter keys, and saying "groups: 0" would hide that.
    one_line_error("lora inspect model file", run("lora", "inspect", model), model, "no adapter keys", "lora_error")
    one_line_error("lora inspect --json model file", run("lora", "inspect", model, "--json"), model, "no adapter keys")
    one_line_error("lora apply model file as adapter", run("lora", "apply", model, model, "--out", os.path.join(tmp, "y.safetensors")),
                   model, "no adapter keys")
    # A grouping rule that groups nothing is a mistake (here a missing '\.'), not a request for leaf units.
    one_line_error("plan --group matching nothing", run("plan", "--alloc", "cuda:0,300kb;cpu,*", "--devices", "cuda:0=1GiB,cpu=16GiB",
                                                        "--compute", "cuda:0", "--model", model, "--group", r"blocks\d+"),
                   r"blocks\d+", "grouping rule", "matches no")
    one_line_error("plan --units --group matching nothing", run("plan", "--alloc", "cuda:0,300mb;cpu,*", "--devices", "cuda:0=2GiB,cpu=16GiB",
                                                                "--units", units, "--group", r"block\.\d+", "--json"),
                   r"block\.\d+", "grouping rule", "matches no")
    one_line_error("validate --json invalid", run("validate", "--alloc", "cuda:0,2.5gb;cpu,abc", "--json"), "column", "fix")

    # ---- --json: one object, the whole of stdout ---------------------------------------------
    v = json_object("version --json object", run("version", "--json"))
    check("version --json fields", v is not None and {"distorch", "libtorch"} <= v.keys(), str(v))
    v = json_object("validate --json", run("validate", "--alloc", "cuda:0,2.5gb;cpu,*", "--json"))
    if v:
        check("validate --json bytes", v["ok"] is True and v["mode"] == "bytes"
              and [e["device"] for e in v["entries"]] == ["cuda:0", "cpu"]
              and v["entries"][0]["bytes"] == int(2.5 * (1 << 30)) and v["entries"][1]["wildcard"] is True, str(v))
    v = json_object("validate --json ratio", run("validate", "--alloc", "cuda:0,8%;cpu,4%", "--json"))
    if v:
        check("validate --json ratio values", v["mode"] == "ratio" and [e["value"] for e in v["entries"]] == [8, 4], str(v))
    v = json_object("validate --json vvram", run("validate", "--alloc", "cuda:0;4;cpu", "--json"))
    if v:
        check("validate --json vvram", v["compute"] == "cuda:0" and v["offload_bytes"] == 4 << 30
              and [e["device"] for e in v["entries"]] == ["cpu"], str(v))
    rc, out, err = run("validate", "--alloc", "cuda:0,30gb;cpu,*", "--devices", "cuda:0=24GiB,cpu=64GiB", "--json")
    v = json_object("validate --json with warning", (rc, out, err))
    if v:
        check("validate --json warning listed", len(v["warnings"]) == 1 and "cuda:0" in v["warnings"][0], str(v))
    v = json_object("inspect --tensor --json", run("inspect", model, "--tensor", "blocks.2.w", "--json"))
    if v:
        check("inspect --tensor fields", v["name"] == "blocks.2.w" and v["shape"] == [256, 256]
              and v["bytes"] == 256 * 256 * 4 and "values" not in v, str(v)[:300])
    v = json_object("lora inspect --json object", run("lora", "inspect", lora, "--model", model, "--json"))
    if v:
        check("lora inspect --json groups", [g["key"] for g in v["groups"]] == ["blocks.0"] and v["groups"][0]["rank"] == 2,
              str(v)[:300])

    # ---- lora apply: .safetensors and .bin adapters, summary, JSON, progress ------------------
    base = os.path.join(tmp, "base.safetensors")
    base_tensors = {f"blocks.{i}.weight": np.full((256, 256), 0.125 * i, np.float32) for i in range(3)}
    base_tensors["norm.weight"] = np.full(256, 1.0, np.float16)
    write_safetensors(base, base_tensors)
    lora_bin = os.path.join(tmp, "lora.bin")
    python = os.environ.get("DISTORCH_PYTHON", sys.executable)
    made = subprocess.run([python, "-c", (
        "import sys, torch\n"
        "torch.save({'blocks.0.lora_A.weight': torch.full((2, 256), 0.5),\n"
        "            'blocks.0.lora_B.weight': torch.full((256, 2), 0.25)}, sys.argv[1])\n"), lora_bin],
        capture_output=True, text=True)
    check("torch.save wrote the .bin adapter", made.returncode == 0 and os.path.exists(lora_bin), made.stderr[-500:])

    merged_st = os.path.join(tmp, "merged-st.safetensors")
    rc, out, err = run("lora", "apply", base, lora, "--out", merged_st)
    check("lora apply .safetensors", rc == 0 and merged_st in out and "\r" not in err, f"rc={rc} {out!r} {err!r}")
    check("lora apply summary on stdout", "1 merged" in out and "4 written" in out, out)

    merged_bin = os.path.join(tmp, "merged-bin.safetensors")
    rc, out, err = run("lora", "apply", base, f"{lora_bin}:1", "--out", merged_bin, "--json")
    v = json_object("lora apply .bin --json", (rc, out, err))
    check("lora apply piped: no progress bar", "\r" not in err and "%" not in err, repr(err))
    if v:
        check("lora apply --json summary", v["out"] == merged_bin and v["tensors"] == 4 and v["patched"] == 1
              and v["matched"] == 1 and v["unmatched"] == [] and v["adapters"] == [{"file": lora_bin, "strength": 1.0}],
              str(v))
    if os.path.exists(merged_st) and os.path.exists(merged_bin):
        a, _ = read_safetensors(merged_st)
        b, meta = read_safetensors(merged_bin)
        original = {name: described(array) for name, array in base_tensors.items()}
        check("lora apply .bin = .safetensors adapter", a == b, "merged files differ")
        check("lora apply .bin patched its target", b["blocks.0.weight"][2] != original["blocks.0.weight"][2], "unchanged")
        check("lora apply .bin left the rest", all(b[n] == original[n] for n in ("blocks.1.weight", "blocks.2.weight",
                                                                               "norm.weight")), "changed")
        check("lora apply .bin metadata", "lora.bin" in meta.get("distorch_lora", ""), str(meta))

    rc, out, term = run_on_pty("lora", "apply", base, lora, "--out", os.path.join(tmp, "merged-pty.safetensors"), "--json")
    json_object("lora apply on a terminal: JSON on stdout", (rc, out, term))
    check("lora apply progress bar drawn", "\r" in term and "100%" in term and "4/4 tensors" in term, repr(term))
    check("lora apply progress bar ends its line", term.rstrip(" ").endswith("\n"), repr(term[-80:]))

    one_line_error("lora apply bad device", run("lora", "apply", base, lora, "--out", merged_st, "--device", "nodevice"),
                   "nodevice", "fix")
    one_line_error("lora apply absent device", run("lora", "apply", base, lora, "--out", merged_st, "--device", "cuda:63"),
                   "cuda:63", "fix")
    one_line_error("lora apply infinite strength", run("lora", "apply", base, f"{lora}:inf", "--out", merged_st),
                   f"{lora}:inf", "fix")
    bad_adapter = os.path.join(tmp, "bad.bin")
    with open(bad_adapter, "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    one_line_error("lora apply malformed .bin", run("lora", "apply", base, bad_adapter, "--out", merged_st), bad_adapter)

    # ---- demo ----------------------------------------------------------------------------------
    rc, out, err = run("demo", "--json", "--forwards", "1")
    v = json_object("demo --json", (rc, out, err))
    check("demo piped: no progress bar", "\r" not in err, repr(err))
    if v:
        check("demo --json parity", v["bit_identical"] is True and v["max_abs_diff"] == 0 and v["forwards"] == 1, str(v)[:300])
    rc, out, term = run_on_pty("demo", "--json", "--forwards", "1")
    v = json_object("demo on a terminal: JSON on stdout", (rc, out, term))
    if v:
        units_count = len(v["plan"]["units"])
        check("demo progress bar drawn", "\r" in term and "100%" in term and f"{units_count}/{units_count} units" in term,
              repr(term[-300:]))

print(f"cli checks: {checks - len(failures)} passed, {len(failures)} failed")
for f in failures:
    print("FAILED", f)
sys.exit(1 if failures else 0)
