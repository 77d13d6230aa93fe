#!/usr/bin/env python3
"""Consumer tests: distorch used from outside, the way its users build against it.

    consumer.py MODE BUILD_ROOT

MODE is one of
  install     install BUILD_ROOT to a temporary prefix and check what landed there: every header of
              include/distorch, a `distorch` tool that runs, distorch.pc, the CMake config files;
  pkgconfig   a Meson project finds the installed distorch through pkg-config;
  cmake       a CMake project finds it with find_package(distorch CONFIG);
  subproject  a Meson project builds distorch as a subproject through packaging/wrap/distorch.wrap.

The three build modes compile tests/consumer/program.cpp, run it, and check its line.

Installing reuses the tree the test command already built (`meson install --destdir`) instead of
configuring and building the source a second time: the files are the very ones `meson install`
gives users, and the tool (one LibTorch translation unit per command) is not compiled twice. The
CMake config is relocatable by construction; the .pc file names its prefix, which is checked and
then rewritten to the temporary one, as vcpkg's and Conan's pkg-config fixups do.

Compiles run with -j1. With DISTORCH_DEV_COMPILE=1 they go through scripts/dev-compile.sh (a shared
machine's global compile slots).
"""
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_ROOT = Path(os.environ.get("DISTORCH_SOURCE_ROOT", HERE.parent.parent)).resolve()
LINE = re.compile(r"^distorch consumer ok: distorch (\S+), (\d+) units, .+, blocks\.3 on (\S+)$", re.M)


class Failure(Exception):
    pass


def run(cmd, cwd=None, env=None, compile_step=False):
    """Runs a command; its output goes to the test log. Returns stdout."""
    cmd = [str(c) for c in cmd]
    if compile_step and os.environ.get("DISTORCH_DEV_COMPILE") == "1":
        cmd = [str(SOURCE_ROOT / "scripts/dev-compile.sh")] + cmd
    print("$", " ".join(cmd), flush=True)
    started = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(p.stdout, end="" if p.stdout.endswith("\n") or not p.stdout else "\n")
    print(f"  ({time.monotonic() - started:.1f} s, exit {p.returncode})", flush=True)
    if p.returncode != 0:
        raise Failure(f"`{' '.join(cmd)}` failed with exit code {p.returncode}")
    return p.stdout


def meson():
    exe = shutil.which("meson")
    if exe is None:
        raise Failure("meson not found on PATH")
    return exe


def introspect(build_root, what):
    p = subprocess.run([meson(), "introspect", what, str(build_root)], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(p.stdout)


def project_version(build_root):
    return introspect(build_root, "--projectinfo")["version"]


def install_dirs(build_root):
    """prefix and the install folders, absolute, as BUILD_ROOT was configured."""
    opts = {o["name"]: o["value"] for o in introspect(build_root, "--buildoptions")}
    prefix = Path(opts["prefix"])
    return {"prefix": prefix, **{k: prefix / opts[k] for k in ("bindir", "libdir", "includedir")}}


def under(dest, path):
    """Where an absolute install path lands under DESTDIR."""
    return Path(str(dest) + str(path))


def install(build_root, tmp):
    """Installs BUILD_ROOT under tmp/dest and returns the install folders there, relocated."""
    dest = tmp / "dest"
    # Two consumer tests may install from the same build folder at once; meson install writes its
    # log there, so they take turns.
    with open(Path(build_root) / "meson-private" / "distorch-consumer-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run([meson(), "install", "-C", build_root, "--no-rebuild", "--quiet", "--destdir", dest])
    dirs = install_dirs(build_root)
    where = {k: under(dest, v) for k, v in dirs.items()}
    pc = where["libdir"] / "pkgconfig" / "distorch.pc"
    if not pc.is_file():
        raise Failure(f"meson install did not install {pc.relative_to(dest)}")
    text = pc.read_text()
    if f"prefix={dirs['prefix']}\n" not in text:
        raise Failure(f"distorch.pc does not name the configured prefix {dirs['prefix']}:\n{text}")
    pc.write_text(text.replace(f"prefix={dirs['prefix']}\n", f"prefix={where['prefix']}\n", 1))
    return where


def fresh_project(tmp, kind):
    """A consumer project folder outside the source tree: the build file and program.cpp."""
    project = tmp / "project"
    shutil.copytree(HERE / kind, project)
    shutil.copy(HERE / "program.cpp", project / "program.cpp")
    return project


def include_dirs(entry):
    """The -I / -isystem folders of one compile_commands.json entry, absolute and normalized."""
    args = entry.get("arguments") or shlex.split(entry["command"])
    dirs = []
    for i, a in enumerate(args):
        for flag in ("-I", "-isystem"):
            if a == flag and i + 1 < len(args):
                dirs.append(args[i + 1])
            elif a.startswith(flag) and len(a) > len(flag) and not (flag == "-I" and a.startswith("-isystem")):
                dirs.append(a[len(flag):])
    return [os.path.normpath(os.path.join(entry["directory"], d)) for d in dirs]


def check_program(exe, version, expect_include):
    """Runs the consumer program; checks its line and that it compiled against `expect_include`."""
    out = run([exe])
    m = LINE.search(out)
    if m is None:
        raise Failure(f"the consumer program did not print its line:\n{out}")
    if m.group(1) != version:
        raise Failure(f"the consumer program reports distorch {m.group(1)}, the project is {version}")
    commands = json.loads((exe.parent / "compile_commands.json").read_text())
    program = [c for c in commands if c["file"].endswith("program.cpp")]
    if not program:
        raise Failure("compile_commands.json has no entry for program.cpp")
    dirs = include_dirs(program[0])
    if os.path.normpath(expect_include) not in dirs:
        raise Failure(f"program.cpp was not compiled against {expect_include}: its include folders are {dirs}")
    source_include = os.path.realpath(SOURCE_ROOT / "include")
    if os.path.realpath(expect_include) != source_include and any(os.path.realpath(d) == source_include for d in dirs):
        raise Failure(f"program.cpp saw the source tree's headers, not the installed ones: {dirs}")


def mode_install(build_root, tmp):
    where = install(build_root, tmp)
    version = project_version(build_root)
    source = SOURCE_ROOT / "include" / "distorch"
    installed = where["includedir"] / "distorch"
    want = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    got = sorted(str(p.relative_to(installed)) for p in installed.rglob("*") if p.is_file())
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        raise Failure(f"installed headers differ from include/distorch: missing {missing}, unexpected {extra}")
    print(f"{len(got)} headers installed")
    for p in source.rglob("*"):
        if p.is_file() and (installed / p.relative_to(source)).read_bytes() != p.read_bytes():
            raise Failure(f"installed {p.relative_to(source)} differs from the source")

    tool = where["bindir"] / "distorch"
    if not os.access(tool, os.X_OK):
        raise Failure(f"meson install did not install the tool at {tool}")
    reported = json.loads(run([tool, "version", "--json"]))
    if reported.get("distorch") != version:
        raise Failure(f"the installed tool reports {reported}, the project is {version}")

    pc = (where["libdir"] / "pkgconfig" / "distorch.pc").read_text()
    fields = dict(re.findall(r"^(\w+): (.*)$", pc, re.M))
    if fields.get("Version") != version:
        raise Failure(f"distorch.pc says Version {fields.get('Version')}, the project is {version}")
    for flag in ("-I${includedir}", "-std=c++20"):
        if flag not in fields.get("Cflags", ""):
            raise Failure(f"distorch.pc Cflags lack {flag}: {fields.get('Cflags')}")
    if "-ltorch" not in fields.get("Libs", ""):
        raise Failure(f"distorch.pc Libs lack LibTorch: {fields.get('Libs')}")

    cmake_dir = where["libdir"] / "cmake" / "distorch"
    for name in ("distorchConfig.cmake", "distorchConfigVersion.cmake"):
        if not (cmake_dir / name).is_file():
            raise Failure(f"meson install did not install {name} into {cmake_dir}")
    config = (cmake_dir / "distorchConfig.cmake").read_text()
    for needed in ("distorch::distorch", "range-v3::range-v3", "nlohmann_json::nlohmann_json", "Threads::Threads",
                   "distorch::torch", "cxx_std_20"):
        if needed not in config:
            raise Failure(f"distorchConfig.cmake does not mention {needed}")
    if f'PACKAGE_VERSION "{version}"' not in (cmake_dir / "distorchConfigVersion.cmake").read_text():
        raise Failure(f"distorchConfigVersion.cmake does not carry version {version}")
    print(f"install ok: {len(got)} headers, tool, distorch.pc and the CMake config at version {version}")


def mode_pkgconfig(build_root, tmp):
    where = install(build_root, tmp)
    version = project_version(build_root)
    project = fresh_project(tmp, "meson-pkgconfig")
    env = dict(os.environ, PKG_CONFIG_PATH=str(where["libdir"] / "pkgconfig"))
    modversion = run(["pkg-config", "--modversion", "distorch"], env=env).strip()
    if modversion != version:
        raise Failure(f"pkg-config finds distorch {modversion}, the project is {version}")
    run([meson(), "setup", tmp / "build", project], env=env)
    run([meson(), "compile", "-C", tmp / "build", "-j1"], env=env, compile_step=True)
    check_program(tmp / "build" / "consumer", version, where["includedir"])
    print("pkg-config consumer ok")


def mode_cmake(build_root, tmp):
    where = install(build_root, tmp)
    version = project_version(build_root)
    project = fresh_project(tmp, "cmake")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", project, "-B", tmp / "build", *generator, f"-DCMAKE_PREFIX_PATH={where['prefix']}",
         f"-DDISTORCH_EXPECTED_VERSION={version}", "-DCMAKE_BUILD_TYPE=",
         "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"])
    run(["cmake", "--build", tmp / "build", "-j", "1"], compile_step=True)
    check_program(tmp / "build" / "consumer", version, where["includedir"])
    print("CMake consumer ok")


def mode_subproject(build_root, tmp):
    version = project_version(build_root)
    project = fresh_project(tmp, "meson-subproject")
    subprojects = project / "subprojects"
    subprojects.mkdir()
    # The wrap users copy, resolved against this checkout: Meson uses an existing subproject
    # folder named by the wrap's `directory` instead of cloning.
    shutil.copy(SOURCE_ROOT / "packaging" / "wrap" / "distorch.wrap", subprojects / "distorch.wrap")
    (subprojects / "distorch").symlink_to(SOURCE_ROOT, target_is_directory=True)
    # Force the fallback so that a distorch.pc installed on the machine cannot stand in for it.
    run([meson(), "setup", "--force-fallback-for=distorch", tmp / "build", project])
    info = introspect(tmp / "build", "--projectinfo")
    sub = [s for s in info.get("subprojects", []) if s["name"] == "distorch"]
    if not sub or sub[0]["version"] != version:
        raise Failure(f"the build did not use distorch {version} as a subproject: {info.get('subprojects')}")
    run([meson(), "compile", "-C", tmp / "build", "-j1", "consumer"], compile_step=True)
    check_program(tmp / "build" / "consumer", version, subprojects / "distorch" / "include")
    print("subproject consumer ok")


def exit_on_sigterm():
    """meson test ends a test that runs past its timeout with SIGTERM; exiting through SystemExit
    lets the `finally` blocks remove the temporary folder."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


MODES = {"install": mode_install, "pkgconfig": mode_pkgconfig, "cmake": mode_cmake, "subproject": mode_subproject}


def main(argv):
    if len(argv) != 3 or argv[1] not in MODES:
        print(__doc__, file=sys.stderr)
        return 2
    build_root = Path(argv[2]).resolve()
    exit_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix=f"distorch-consumer-{argv[1]}-"))
    started = time.monotonic()
    try:
        MODES[argv[1]](build_root, tmp)
    except Failure as e:
        print(f"FAIL ({argv[1]}): {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"{argv[1]}: {time.monotonic() - started:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
