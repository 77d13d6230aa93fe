#!/usr/bin/env python3
"""The LibTorch a build is pointed at is checked at configure time: a folder that is not a LibTorch,
one without its libraries, one older than the supported floor, and -Dcuda=enabled with a CPU-only
LibTorch are each a configure error that names what was found, what is needed and how to point
the build elsewhere. Each case runs `meson setup` on a made-up LibTorch root.

Usage: configure_errors.py SOURCE_ROOT
"""
import os
import subprocess
import sys
import tempfile

DEBIAN_LIBS = "/usr/lib/x86_64-linux-gnu"
failures = []


def setup(source, work, *options):
    build = tempfile.mkdtemp(dir=work)
    os.rmdir(build)
    run = subprocess.run(["meson", "setup", build, source, "-Dtests=false", "-Dbenchmarks=false",
                          "-Dexamples=false", "-Dtools=false", *options],
                         capture_output=True, text=True, env={**os.environ, "Torch_DIR": ""})
    return run.returncode, run.stdout + run.stderr


def expect_error(name, result, *needles):
    code, out = result
    missing = [n for n in needles if n not in out]
    ok = code != 0 and not missing
    print(("ok   " if ok else "FAIL ") + name)
    if not ok:
        failures.append(name)
        print(f"  exit {code}; missing from the output: {missing}\n" + "\n".join(out.splitlines()[-8:]))


def fake_root(work, version=None, libs=()):
    root = tempfile.mkdtemp(dir=work)
    api = os.path.join(root, "include", "torch", "csrc", "api", "include", "torch")
    os.makedirs(api)
    os.makedirs(os.path.join(root, "lib"))
    if version:
        major, minor, patch = version.split(".")
        with open(os.path.join(api, "version.h"), "w") as f:
            f.write(f"#pragma once\n#define TORCH_VERSION_MAJOR {major}\n#define TORCH_VERSION_MINOR {minor}\n"
                    f"#define TORCH_VERSION_PATCH {patch}\n#define TORCH_VERSION \"{version}\"\n")
    for lib in libs:
        os.symlink(os.path.join(DEBIAN_LIBS, f"lib{lib}.so"), os.path.join(root, "lib", f"lib{lib}.so"))
    return root


def main(source):
    with tempfile.TemporaryDirectory() as work:
        empty = tempfile.mkdtemp(dir=work)
        expect_error("a folder without include/ is not a LibTorch", setup(source, work, f"-Dtorch_dir={empty}"),
                     f"LibTorch not found in {empty}", "no include/ folder", "1.13.0", "-Dtorch_dir")
        no_libs = fake_root(work, "2.5.1")
        expect_error("a LibTorch without its libraries", setup(source, work, f"-Dtorch_dir={no_libs}"),
                     f"LibTorch not found in {no_libs}", "missing: libtorch, libtorch_cpu, libc10", "-Dtorch_dir")
        if all(os.path.exists(os.path.join(DEBIAN_LIBS, f"lib{n}.so")) for n in ("torch", "torch_cpu", "c10")):
            old = fake_root(work, "1.12.1", ("torch", "torch_cpu", "c10"))
            expect_error("a LibTorch older than the floor", setup(source, work, f"-Dtorch_dir={old}"),
                         f"LibTorch 1.12.1 found in {old} is older than the supported floor 1.13.0", "-Dtorch_dir")
            expect_error("-Dcuda=enabled with a CPU-only LibTorch", setup(source, work, "-Dtorch_dir=", "-Dcuda=enabled"),
                         "-Dcuda=enabled, but LibTorch 1.13", "is not a CUDA build")
        else:
            print("skip the floor and CUDA cases: Debian's libtorch-dev is not installed")
    print(f"{4 - len(failures)} checks passed, {len(failures)} failed" if not failures else f"failed: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
