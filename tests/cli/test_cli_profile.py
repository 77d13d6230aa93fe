#!/usr/bin/env python3
"""End-to-end checks of `distorch profile`, `distorch plan --predict` and `distorch plan --suggest`:
outputs, exit codes (0 ok, 1 bad input) and one-line errors. Predictions are checked against a
pipeline simulation written here from docs/profiling.md, with a profile written here by hand;
suggestions against plans made by the CLI itself.
Usage: test_cli_profile.py PATH/TO/distorch"""
import json
import os
import subprocess
import sys
import tempfile

exe = sys.argv[1]
failures = []
checks = 0
MiB = 1 << 20


def run(*args):
    p = subprocess.run([exe, *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def check(name, condition, detail=""):
    global checks
    checks += 1
    if not condition:
        failures.append(f"{name}: {detail}")


def close(a, b, rel=1e-9):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def simulate(homes, sizes, compute, work, links, depth):
    """One step: the copy of unit u is issued when compute reaches unit max(0, u - depth); copies
    run in issue order on one stream; compute of a unit waits for its copy."""
    n = len(homes)
    copy_end = [0.0] * n
    stream_free = 0.0
    now = 0.0
    for j in range(n):
        issuing = range(0, min(n, depth + 1)) if j == 0 else ([j + depth] if j + depth < n else [])
        for u in issuing:
            if homes[u] == compute:
                continue
            bandwidth, latency = links[homes[u]]
            start = max(now, stream_free)
            copy_end[u] = start + latency + sizes[u] / bandwidth
            stream_free = copy_end[u]
        start = max(now, copy_end[j]) if homes[j] != compute else now
        now = start + work[j]
    return now


def one_line_error(err):
    return err.count("\n") == 1 and err.startswith("distorch: ")


with tempfile.TemporaryDirectory() as tmp:
    # ---- profile ----------------------------------------------------------------------------
    rc, out, err = run("profile", "--json", "--sizes", "64kb,256kb", "--repeats", "3")
    check("profile --json", rc == 0, err)
    if rc == 0:
        prof = json.loads(out)
        check("profile format", prof["format"] == "distorch-profile" and prof["version"] == 1, out[:200])
        memcpy = [l for l in prof["links"] if l["kind"] == "host_memcpy"]
        check("profile host memcpy", len(memcpy) == 1 and [s["bytes"] for s in memcpy[0]["samples"]] == [64 << 10, 256 << 10], out[:400])
        check("profile figures positive", all(l["bandwidth"] > 0 and l["latency"] >= 0 for l in prof["links"]), out[:400])
        has_h2d = any(l["kind"].startswith("host_to_device") for l in prof["links"])
        if not has_h2d:
            check("profile says pageable is absent", any(a["kind"] == "host_to_device_pageable" for a in prof["absent"]), out)
        check("profile no bar when piped", err == "", err)
    saved = os.path.join(tmp, "measured.json")
    rc, out, err = run("profile", "--out", saved, "--sizes", "64kb", "--repeats", "1")
    check("profile --out", rc == 0 and os.path.exists(saved) and "host_memcpy" in out and "saved to" in out, out + err)
    if rc == 0:
        with open(saved) as f:
            check("profile --out is JSON", json.load(f)["format"] == "distorch-profile")
    for bad in (["--sizes", "0"], ["--sizes", "abc"], ["--sizes", "1mb,,2mb"], ["--repeats", "0"]):
        rc, out, err = run("profile", *bad)
        check(f"profile {' '.join(bad)}", rc == 1 and one_line_error(err), f"rc={rc} {err}")
    rc, out, err = run("profile", "--help")
    check("profile --help", rc == 0 and "Examples" in out and "--sizes" in out, out)

    # ---- plan --predict ---------------------------------------------------------------------
    units = os.path.join(tmp, "units.json")
    sizes = [100 * MiB] * 10
    with open(units, "w") as f:
        json.dump([{"name": f"blocks.{i}", "bytes": s} for i, s in enumerate(sizes)], f)
    hand = {"format": "distorch-profile", "version": 1,
            "machine": {"origin": "hand-written", "host": "", "cpu": "", "libtorch": "", "distorch": "", "date": "",
                        "devices": []},
            "repeats": 1, "warmup": 0,
            "links": [{"kind": "host_to_device_pinned", "source": "cpu", "destination": "cuda:0", "samples": [],
                       "bandwidth": 2.0e9, "latency": 1e-3},
                      {"kind": "host_to_device_pageable", "source": "cpu", "destination": "cuda:0", "samples": [],
                       "bandwidth": 1.0e9, "latency": 1e-3}],
            "absent": []}
    hand_file = os.path.join(tmp, "hand.json")
    with open(hand_file, "w") as f:
        json.dump(hand, f)
    base = ["plan", "--alloc", "cuda:0,300mb;cpu,*", "--devices", "cuda:0=2GiB,cpu=16GiB", "--compute", "cuda:0", "--units", units]
    for depth in (0, 1, 3):
        for pageable in (False, True):
            args = base + ["--predict", "--profile", hand_file, "--compute-ms-per-unit", "40", "--depth", str(depth), "--json"]
            if pageable:
                args.append("--pageable")
            rc, out, err = run(*args)
            check(f"predict depth {depth}", rc == 0, err)
            if rc != 0:
                continue
            j = json.loads(out)
            homes = [u["device"] for u in j["units"]]
            link = hand["links"][1 if pageable else 0]
            expected = simulate(homes, sizes, "cuda:0", [0.040] * 10, {"cpu": (link["bandwidth"], link["latency"])}, depth)
            p = j["prediction"]
            check(f"predict step depth {depth} pageable {pageable}", close(p["step_seconds"], expected), f"{p['step_seconds']} vs {expected}")
            check(f"predict compute depth {depth}", close(p["compute_seconds"], 0.4), str(p["compute_seconds"]))
            offloaded = sum(s for s, h in zip(sizes, homes) if h != "cuda:0")
            check(f"predict bytes depth {depth}", len(p["links"]) == 1 and p["links"][0]["bytes_per_step"] == offloaded, str(p["links"]))
            check(f"predict kind pageable {pageable}",
                  p["links"][0]["kind"] == ("host_to_device_pageable" if pageable else "host_to_device_pinned"), str(p["links"]))
            check(f"predict slowdown depth {depth}", close(p["slowdown"], expected / 0.4), str(p["slowdown"]))
            check(f"predict plan intact depth {depth}", j["units"][0]["device"] == "cuda:0" and j["units"][-1]["device"] == "cpu", out[:200])
    # --compute-gbps: compute time = bytes / (Y * 1e9).
    rc, out, err = run(*(base + ["--predict", "--profile", hand_file, "--compute-gbps", "50", "--json"]))
    check("predict --compute-gbps", rc == 0, err)
    if rc == 0:
        check("predict gbps compute", close(json.loads(out)["prediction"]["compute_seconds"], sum(sizes) / 50e9), out[-300:])
        check("predict depth defaults to --prefetch", json.loads(out)["prediction"]["depth"] == 1, out[-300:])
    rc, out, err = run(*(base + ["--predict", "--compute-ms-per-unit", "5"]))
    check("predict text, default profile", rc == 0 and "prediction" in out and "slowdown" in out and "conservative" in out, out + err)
    rc, out, err = run(*(base + ["--predict"]))
    check("predict needs a compute time", rc == 1 and one_line_error(err) and "--compute" in err, err)
    rc, out, err = run(*(base + ["--predict", "--compute-ms-per-unit", "5", "--compute-gbps", "5"]))
    check("predict takes one compute time", rc == 1 and one_line_error(err), err)
    rc, out, err = run(*(base + ["--predict", "--compute-ms-per-unit", "5", "--profile", os.path.join(tmp, "none.json")]))
    check("predict missing profile", rc == 1 and one_line_error(err) and "format_error" in err, err)
    broken = dict(hand, links=[dict(hand["links"][0], latency=-1)])
    with open(os.path.join(tmp, "broken.json"), "w") as f:
        json.dump(broken, f)
    rc, out, err = run(*(base + ["--predict", "--compute-ms-per-unit", "5", "--profile", os.path.join(tmp, "broken.json")]))
    check("predict bad profile names the field", rc == 1 and one_line_error(err) and "links[0].latency" in err, err)
    memcpy_only = dict(hand, links=[{"kind": "host_memcpy", "source": "cpu", "destination": "cpu", "samples": [],
                                     "bandwidth": 1e10, "latency": 0}])
    with open(os.path.join(tmp, "memcpy.json"), "w") as f:
        json.dump(memcpy_only, f)
    rc, out, err = run(*(base + ["--predict", "--compute-ms-per-unit", "5", "--profile", os.path.join(tmp, "memcpy.json")]))
    check("predict link missing from profile", rc == 1 and one_line_error(err) and "device_error" in err and "cpu -> cuda:0" in err, err)
    if os.path.exists(saved):
        # A measured profile of this machine predicts a plan on simulated host devices.
        rc, out, err = run("plan", "--alloc", "sim:0,300mb;cpu,*", "--devices", "sim:0=2GiB,cpu=16GiB", "--compute", "sim:0",
                           "--units", units, "--predict", "--profile", saved, "--compute-ms-per-unit", "1", "--json")
        check("predict with a measured profile", rc == 0 and json.loads(out)["prediction"]["links"][0]["kind"] == "host_memcpy", out[-300:] + err)

    # ---- plan --suggest ---------------------------------------------------------------------
    sugg = ["plan", "--suggest", "--devices", "cuda:0=600MiB,cpu=16GiB", "--units", units, "--prefetch", "0", "--reserve", "50mb"]
    rc, out, err = run(*(sugg + ["--json"]))
    check("suggest --json", rc == 0, err)
    if rc == 0:
        j = json.loads(out)
        alloc = j["suggestion"]["allocation"]
        # Longest head of 100 MiB units with head + 1 x 100 MiB window (depth 0: the unit that runs)
        # + 50 MiB reserve <= 600 MiB.
        keep = max(k for k in range(11) if k * 100 + (100 if k < 10 else 0) + 50 <= 600)
        check("suggest keeps the longest head", sum(u["device"] == "cuda:0" for u in j["units"]) == keep, out[:300])
        check("suggest offload", j["suggestion"]["offloaded_bytes"] == (10 - keep) * 100 * MiB, str(j["suggestion"]))
        rc2, out2, err2 = run("plan", "--alloc", alloc, "--devices", "cuda:0=600MiB,cpu=16GiB", "--units", units, "--prefetch", "0",
                              "--reserve", "50mb", "--json")
        check("suggestion plans", rc2 == 0 and json.loads(out2)["units"] == j["units"], err2)
        rc3, _, err3 = run("plan", "--alloc", f"cuda:0,{(keep + 1) * 100}mb;cpu,*", "--devices", "cuda:0=600MiB,cpu=16GiB", "--units",
                           units, "--prefetch", "0", "--reserve", "50mb")
        check("one more unit does not fit", rc3 == 1 and one_line_error(err3), err3)
    rc, out, err = run(*sugg)
    check("suggest text", rc == 0 and any(line.startswith("suggest: cuda:0,") for line in out.splitlines()), out + err)
    rc, out, err = run("plan", "--suggest", "--devices", "cuda:0=150MiB,cpu=16GiB", "--units", units, "--prefetch", "1")
    check("suggest impossible", rc == 1 and one_line_error(err) and "placement_error" in err, err)
    rc, out, err = run("plan", "--devices", "cuda:0=1GiB,cpu=16GiB", "--units", units)
    check("plan needs --alloc or --suggest", rc == 1 and one_line_error(err), err)
    rc, out, err = run("plan", "--help")
    check("plan --help", rc == 0 and "--predict" in out and "--suggest" in out and "Examples" in out, out)

print(f"cli profile checks: {checks - len(failures)} passed, {len(failures)} failed")
for f in failures:
    print("FAILED", f)
sys.exit(1 if failures else 0)
